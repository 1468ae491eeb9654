"""One metrics writer: JSON lines plus TensorBoard events, on process 0 only."""

import json
import os
import sys

import jax


class Writer:
  """Appends `{'step': s, **scalars}` to metrics.jsonl and to TensorBoard.

  On resume, lines past the restored step are dropped first: a killed run may have
  logged steps whose checkpoint never landed, and they will be logged again.
  """

  def __init__(self, workdir: str, resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if not self.enabled:
      return
    if os.path.exists(self.path):
      with open(self.path) as f:
        keep = [line for line in f if _step(line) is not None and _step(line) <= resume_step]
      with open(self.path + '.tmp', 'w') as f:
        f.writelines(keep)
      os.replace(self.path + '.tmp', self.path)
    self._tb = _summary_writer_class()(workdir, purge_step=resume_step + 1 if resume_step else None)

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': int(step), **scalars}) + '\n')
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without importing torch.

  tensorboardX tries `import torch` when imported, only to accept torch tensors
  as values; smallfx logs floats, and the import cost every run 1.1-1.8 s of its
  start (2-core CPU). A `None` entry in sys.modules makes that import fail fast.
  """
  hide = 'torch' not in sys.modules
  if hide:
    sys.modules['torch'] = None
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    if hide and sys.modules.get('torch', 0) is None:
      del sys.modules['torch']
  return SummaryWriter


def _step(line: str):
  try:
    return json.loads(line)['step']
  except (ValueError, KeyError, TypeError):
    return None


def read(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]
