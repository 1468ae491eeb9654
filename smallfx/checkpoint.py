"""Checkpoints in a workdir, and the inference spec beside them.

A workdir holds Orbax checkpoints under `checkpoints/` (one pytree per step) and
`model.json`, everything needed to rebuild the network for prediction or
fine-tuning without the training config: model name and sizes, loss, input
size, normalisation, class names and class targets. Training runs and
`tools/convert_torch.py` both write this pair, so `smallfx.predict` and
`--config.pretrained` read either.
"""

import contextlib
import errno
import glob
import json
import os
import shutil
import signal
import socket
import sys
import threading
import time
from typing import Any
import weakref

import jax
import numpy as np
import orbax.checkpoint as ocp

from smallfx.errors import UserError

MODEL_SPEC = 'model.json'


# Managers of this process, so that an interrupted run can let a save in flight land
# (`finish_saves`) instead of dying with it at interpreter shutdown.
_MANAGERS = weakref.WeakSet()


def manager(workdir: str, max_to_keep: int = 3) -> ocp.CheckpointManager:
  _quiet_closed_loop()  # writes that a failed save cuts short report to a closed loop
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  mngr = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'),
                               options=options)
  _MANAGERS.add(mngr)
  return mngr


@contextlib.contextmanager
def uninterrupted():
  """Ctrl-C inside the block is raised when it ends, in the caller's code.

  A KeyboardInterrupt raised inside Orbax's save can be caught there: the run then went
  on as if nothing had happened (seen with a save at every step, on a loaded machine).
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  pending = []
  previous = signal.signal(signal.SIGINT, lambda *_: pending.append(True))
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, previous)
    if pending:
      raise KeyboardInterrupt


def save(mngr: ocp.CheckpointManager, step: int, state) -> None:
  """Starts saving `state` at `step` (asynchronously); Ctrl-C waits until it has started."""
  with uninterrupted():
    mngr.save(step, args=ocp.args.StandardSave(state))


def finish_saves() -> None:
  """Waits for every save in flight (after Ctrl-C): a checkpoint lands whole or not at all."""
  _quiet_closed_loop()  # TensorStore's writes cut short report to a closed loop
  for mngr in list(_MANAGERS):
    try:
      mngr.wait_until_finished()
      mngr.close()
    except Exception:  # pylint: disable=broad-except
      pass  # a save that fails now leaves only its temporary folder, which Orbax ignores


def write_json(path: str, data) -> None:
  """Writes `data` to `path` whole or not at all (a temporary file of this process, renamed)."""
  tmp = f'{path}.{socket.gethostname()}.{os.getpid()}.tmp'
  with open(tmp, 'w') as f:
    json.dump(data, f, indent=1)
  os.replace(tmp, path)


def write_model_spec(workdir: str, spec: dict[str, Any]) -> None:
  os.makedirs(workdir, exist_ok=True)
  write_json(os.path.join(workdir, MODEL_SPEC), spec)


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


def _one_line(e: Exception) -> str:
  """The gist of an Orbax error: TensorStore's are a chain of clauses and a spec dump."""
  text = ' '.join(str(e).split()).split(' [tensorstore_spec=')[0]
  return f'{type(e).__name__}: {text if len(text) < 120 else text.split(": ")[-1][:200]}'


def _quiet_closed_loop() -> None:
  """Drops the tracebacks of TensorStore reads that finish after a failed restore.

  (And of writes cut short by Ctrl-C: `finish_saves`.)

  Orbax closes its event loop when the first array fails; the reads of the others
  then report to the closed loop from TensorStore's threads, each as an "unraisable"
  RuntimeError traceback on stderr, long after the one line that said what happened.
  """
  previous = sys.unraisablehook
  if getattr(previous, 'smallfx_quiet', False):
    return

  def hook(unraisable):
    if not (unraisable.exc_type is RuntimeError
            and str(unraisable.exc_value) == 'Event loop is closed'):
      previous(unraisable)

  hook.smallfx_quiet = True
  sys.unraisablehook = hook


def restore_latest(mngr: ocp.CheckpointManager, abstract=None) -> tuple[Any, Any]:
  """(step, state) of the newest readable checkpoint, or (None, None) if there is none.

  An unreadable checkpoint (a truncated file, a crash while writing) costs one warning
  line and the work since the next older one; it is left on disk as it is. `abstract`
  is the state's pytree of shapes and dtypes (or arrays), as StandardRestore takes it.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  newest = None
  for step, older in zip(steps, steps[1:] + [None]):
    try:
      # Reading the metadata fails as the arrays do where a checkpoint is damaged.
      target = abstract if abstract is not None else _here(mngr, step)
      return step, mngr.restore(step, args=ocp.args.StandardRestore(target))
    except Exception as e:  # Orbax raises many types for a damaged file.
      _quiet_closed_loop()
      newest = newest or f'step {step}: {_one_line(e)}'
      if older is not None:
        print(f'warning: checkpoint {step} in {mngr.directory} is unreadable ({_one_line(e)}); '
              f'falling back to {older}', file=sys.stderr)
  if steps:
    older = f'; and {len(steps) - 1} older' if len(steps) > 1 else ''
    raise UserError(f'no checkpoint in {mngr.directory} is readable ({newest}{older}); '
                    'move that folder aside to start afresh')
  return None, None


def _here(mngr: ocp.CheckpointManager, step: int):
  """The checkpoint's arrays as shapes on this process's first device.

  Without a target Orbax restores each array onto the devices it was saved from: a
  run trained over 2 CPU devices then fails to load in a process with one (predict).
  """
  meta = ocp.StandardCheckpointHandler().metadata(mngr.directory / str(step) / 'default')
  here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here)
                      if hasattr(m, 'shape') else m, meta)


def resume(workdir: str, init, abstract) -> tuple[ocp.CheckpointManager, int, Any]:
  """(manager, step, state): where a run in `workdir` goes on from.

  The newest readable checkpoint, or `init()` at step 0 where there is none; unreadable
  newer ones are set aside, since the run will save their step numbers again.
  """
  mngr = manager(workdir)
  start, state = restore_latest(mngr, abstract)
  if start is None:
    state, start = init(), 0
  set_aside_newer(mngr, start)
  return mngr, start, state


def set_aside_newer(mngr: ocp.CheckpointManager, step: int) -> None:
  """Moves checkpoints newer than `step` (unreadable ones) to `damaged-checkpoints/`.

  Training resumed from `step` will save those step numbers again; the damaged files
  are kept for a look, not deleted.
  """
  newer = [s for s in mngr.all_steps() if s > step]
  if not newer or jax.process_index() != 0:
    return
  aside = os.path.join(os.path.dirname(str(mngr.directory)), 'damaged-checkpoints')
  os.makedirs(aside, exist_ok=True)
  for s in newer:
    os.replace(os.path.join(str(mngr.directory), str(s)),
               os.path.join(aside, f'{s}-{int(time.time())}'))
  mngr.reload()


def load_variables(workdir: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """The newest readable checkpoint's {'params', 'batch_stats'} as numpy, and the spec.

  Training checkpoints carry a leading seed axis on every leaf (spec['num_seeds']);
  it is kept, so callers can average an ensemble or pick one member.
  """
  spec = read_model_spec(workdir)
  with manager(workdir) as mngr:
    step, state = restore_latest(mngr)
    if step is None:
      raise UserError(f'no checkpoint in {workdir}/checkpoints')
  state = jax.tree.map(np.asarray, dict(state))
  return {k: state[k] for k in ('params', 'batch_stats') if k in state}, spec


def prepare_workdir(workdir: str) -> None:
  """Creates `workdir` and checks that a file can be written there; one line if not.

  Run before anything else is written, so that a bad --workdir fails at once and
  not after training, when the first checkpoint is due.
  """
  probe = os.path.join(workdir, f'.smallfx-write-test-{os.getpid()}')
  try:
    os.makedirs(workdir, exist_ok=True)
    with open(probe, 'w') as f:
      f.write('smallfx')  # a few bytes, so that a full disk shows here too
    os.remove(probe)
  except OSError as e:
    raise UserError(_workdir_problem(workdir, e)) from None


# What a failed write says, in an OSError's errno or in the text TensorStore wraps it in.
_DISK_PROBLEMS = (
    ((errno.ENOSPC, errno.EDQUOT), ('No space left on device', "os_error_code='28'",
                                    'Disk quota exceeded'), 'no space left on its disk'),
    ((errno.EROFS,), ('Read-only file system',), 'its file system became read-only'),
    ((errno.EACCES, errno.EPERM), ('Permission denied',), 'permission denied'),
)


def _disk_problem(e: BaseException) -> str | None:
  seen = []
  while e is not None and e not in seen:
    seen.append(e)
    for codes, texts, problem in _DISK_PROBLEMS:
      if getattr(e, 'errno', None) in codes or any(t in str(e) for t in texts):
        return problem
    e = e.__cause__ or e.__context__
  return None


@contextlib.contextmanager
def disk_errors(workdir: str):
  """A write that fails mid-run (a full disk) as one line; the last good checkpoint stays.

  Orbax writes a step into a temporary folder and renames it when complete, so a
  failed save leaves earlier steps whole; its temporary folder is removed here.
  """
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    problem = _disk_problem(e)
    if problem is None:
      raise
    finish_saves()
    folder = os.path.join(workdir, 'checkpoints')
    for partial in glob.glob(os.path.join(folder, '*.orbax-checkpoint-tmp*')):
      shutil.rmtree(partial, ignore_errors=True)
    steps = sorted(int(d) for d in os.listdir(folder) if d.isdigit()) if os.path.isdir(
        folder) else []
    kept = (f'the last good checkpoint (step {steps[-1]}) is kept' if steps
            else 'no checkpoint had been saved')
    raise UserError(f'cannot write to workdir {workdir}: {problem}; {kept}. Free some space '
                    '(or fix the folder) and re-run the same command to resume') from None


def _workdir_problem(workdir: str, e: OSError) -> str:
  """One line for why `workdir` cannot be written, and what to do."""
  what = f'cannot write to workdir {workdir}'
  if e.errno in (errno.ENOTDIR, errno.EEXIST):
    # The deepest part of the path that exists is the file in the way.
    part = os.path.abspath(workdir)
    while not os.path.exists(part) and os.path.dirname(part) != part:
      part = os.path.dirname(part)
    return f'{what}: {part} is a file, not a folder; pick another --workdir'
  if e.errno in (errno.EACCES, errno.EPERM):
    return f'{what}: permission denied; pick another --workdir or change its permissions'
  if e.errno == errno.EROFS:
    return f'{what}: it is on a read-only file system; pick another --workdir'
  if e.errno in (errno.ENOSPC, errno.EDQUOT):
    return f'{what}: no space left on its disk; free some space or pick another --workdir'
  return f'{what}: {e.strerror or e}; pick another --workdir'
