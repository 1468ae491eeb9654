"""smallfx.metrics: TensorBoard's event files, written without tensorboardX or torch."""

import os
import struct
import subprocess
import sys

import pytest

from smallfx import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _records(path):
  with open(path, 'rb') as f:
    data = f.read()
  records, i = [], 0
  while i < len(data):
    n, = struct.unpack('<Q', data[i:i + 8])
    records.append((data[i:i + 8], struct.unpack('<I', data[i + 8:i + 12])[0],
                    data[i + 12:i + 12 + n], struct.unpack('<I', data[i + 12 + n:i + 16 + n])[0]))
    i += 16 + n
  return records


def test_events_read_back_as_tensorboard_protos(tmp_path):
  """Checked with tensorboardX's own protocol buffers and CRC, not with this encoder."""
  event_pb2 = pytest.importorskip('tensorboardX.proto.event_pb2')
  crc32c = pytest.importorskip('tensorboardX.crc32c').crc32c
  writer = metrics.EventWriter(str(tmp_path), purge_step=40)
  writer.add_scalar('train/loss', 0.25, 41)
  writer.add_scalar('val/accuracy', 0.875, 2**40)
  writer.add_scalar('train/learning_rate', -1e-3, 0)
  writer.close()
  assert os.path.basename(writer.path).startswith('events.out.tfevents.')
  masked = lambda crc: (((crc >> 15) | (crc << 17)) + 0xa282ead8) & 0xffffffff  # noqa: E731
  events = []
  for header, header_crc, data, data_crc in _records(writer.path):
    assert header_crc == masked(crc32c(header)) and data_crc == masked(crc32c(data))
    events.append(event_pb2.Event.FromString(data))
  assert events[0].file_version == 'brain.Event:2'
  assert events[1].step == 40
  assert events[1].session_log.status == event_pb2.SessionLog.START
  scalars = [(e.step, v.tag, v.simple_value) for e in events[2:] for v in e.summary.value]
  assert scalars == [(41, 'train/loss', 0.25), (2**40, 'val/accuracy', 0.875),
                     (0, 'train/learning_rate', pytest.approx(-1e-3))]
  assert all(e.wall_time > 1e9 for e in events)


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
