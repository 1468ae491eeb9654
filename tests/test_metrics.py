"""smallfx.metrics: TensorBoard's event files, written without TensorFlow or torch."""

import os
import subprocess
import sys
import time

from smallfx import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_events_read_back_in_tensorboard(tmp_path):
  """Read with TensorBoard's own loader, as `tensorboard --logdir` does."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  writer = metrics.EventWriter(str(tmp_path))
  writer.add_scalar('train/loss', 0.25, 41)
  writer.add_scalar('train/loss', 0.125, 2**40)
  writer.add_scalar('val/accuracy', 0.875, 0)
  writer.close()
  assert all(name.startswith('events.out.tfevents.') for name in os.listdir(tmp_path))
  events = event_accumulator.EventAccumulator(str(tmp_path))
  events.Reload()
  assert [(e.step, e.value) for e in events.Scalars('train/loss')] == [(41, 0.25),
                                                                       (2**40, 0.125)]
  assert [(e.step, e.value) for e in events.Scalars('val/accuracy')] == [(0, 0.875)]


def test_a_resumed_run_purges_the_steps_it_logs_again(tmp_path):
  """The killed part logged steps 10-30; resumed from 20, TensorBoard keeps 10 and 20."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  first = metrics.EventWriter(str(tmp_path))
  for step in (10, 20, 30):
    first.add_scalar('train/loss', step / 100, step)
  first.close()
  time.sleep(1.1)  # event files are ordered by the second in their names
  resumed = metrics.EventWriter(str(tmp_path), purge_step=21)
  resumed.add_scalar('train/loss', 0.99, 30)
  resumed.close()
  events = event_accumulator.EventAccumulator(str(tmp_path), purge_orphaned_data=True)
  events.Reload()
  assert [(e.step, round(e.value, 2)) for e in events.Scalars('train/loss')] == [
      (10, 0.1), (20, 0.2), (30, 0.99)]


# A concurrent `import torch` (another thread, a notebook's cell) must never find
# sys.modules['torch'] set to None: an audit hook looks at every import while the
# writer is made.
_HOOK = """
import sys
seen = []
sys.addaudithook(lambda event, args: seen.append(1) if event == 'import'
                 and 'torch' in sys.modules and sys.modules['torch'] is None else None)
from smallfx import metrics
w = metrics.Writer(sys.argv[1])
w.write(1, {'train/loss': 0.5})
w.close()
print(len(seen), 'torch' in sys.modules)
"""


def test_writer_never_hides_torch(tmp_path):
  r = subprocess.run([sys.executable, '-c', _HOOK, str(tmp_path)], cwd=REPO,
                     capture_output=True, text=True, timeout=120, check=False)
  assert r.returncode == 0, r.stderr
  assert r.stdout.split() == ['0', 'False'], r.stdout
