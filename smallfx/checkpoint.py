"""Checkpoints in a workdir, and the inference spec beside them.

A workdir holds Orbax checkpoints under `checkpoints/` (one pytree per step) and
`model.json`, everything needed to rebuild the network for prediction or
fine-tuning without the training config: model name and sizes, loss, input
size, normalisation, class names and class targets. Training runs and
`tools/convert_torch.py` both write this pair, so `smallfx.predict` and
`--config.pretrained` read either.
"""

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from smallfx.errors import UserError

MODEL_SPEC = 'model.json'


def manager(workdir: str, max_to_keep: int = 3) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'),
                               options=options)


def write_model_spec(workdir: str, spec: dict[str, Any]) -> None:
  os.makedirs(workdir, exist_ok=True)
  tmp = os.path.join(workdir, MODEL_SPEC + '.tmp')
  with open(tmp, 'w') as f:
    json.dump(spec, f, indent=1)
  os.replace(tmp, os.path.join(workdir, MODEL_SPEC))


def read_model_spec(workdir: str) -> dict[str, Any]:
  path = os.path.join(workdir, MODEL_SPEC)
  if not os.path.exists(path):
    raise UserError(f'{path} not found: {workdir} is not a trained or converted model '
                    '(train with smallfx.main or convert with tools/convert_torch.py)')
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f'{path} is corrupt: {e}') from None


def save_variables(workdir: str, variables: dict[str, Any], spec: dict[str, Any]) -> None:
  """Writes model variables ({'params', 'batch_stats'}) as step 0, and the spec."""
  write_model_spec(workdir, spec)
  with manager(workdir) as mngr:
    mngr.save(0, args=ocp.args.StandardSave(dict(variables)), force=True)
    mngr.wait_until_finished()


def load_variables(workdir: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """The newest checkpoint's {'params', 'batch_stats'} as numpy, and the spec.

  Training checkpoints carry a leading seed axis on every leaf (spec['num_seeds']);
  it is kept, so callers can average an ensemble or pick one member.
  """
  spec = read_model_spec(workdir)
  with manager(workdir) as mngr:
    step = mngr.latest_step()
    if step is None:
      raise UserError(f'no checkpoint in {workdir}/checkpoints')
    try:
      state = mngr.restore(step, args=ocp.args.StandardRestore())
    except Exception as e:  # Orbax raises many types for a damaged file.
      raise UserError(f'checkpoint {step} in {workdir} is unreadable: {e}') from None
  state = jax.tree.map(np.asarray, dict(state))
  return {k: state[k] for k in ('params', 'batch_stats') if k in state}, spec
