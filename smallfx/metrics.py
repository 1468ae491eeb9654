"""One metrics writer: JSON lines plus TensorBoard events, on process 0 only."""

import functools
import json
import os
import socket
import struct
import time

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
    keep = []
    if os.path.exists(self.path):
      with open(self.path) as f:
        keep = [line for line in f if _step(line) is not None and _step(line) <= resume_step]
    # What a resumed run logged before, for figures over the whole run (`last`, `column`).
    self.rows = [json.loads(line) for line in keep]
    if not self.enabled:
      return
    if os.path.exists(self.path):
      with open(self.path + '.tmp', 'w') as f:
        f.writelines(keep)
      os.replace(self.path + '.tmp', self.path)
    self._tb = _summary_writer_class()(workdir, purge_step=resume_step + 1 if resume_step else None)

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      self.rows.append({'step': int(step), **scalars})
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self.rows.append({'step': int(step), **scalars})
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': int(step), **scalars}) + '\n')
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, step)

  def column(self, name: str) -> list[float]:
    """Every value of `name` logged in this run, resumed parts included."""
    return [row[name] for row in self.rows if name in row]

  def last(self, name: str, default=None):
    values = self.column(name)
    return values[-1] if values else default

  def has_step(self, step: int, name: str) -> bool:
    return any(row['step'] == step and name in row for row in self.rows)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _summary_writer_class():
  """The TensorBoard writer: `EventWriter`, scalars only, torch never imported.

  tensorboardX's SummaryWriter imports torch when imported (to accept torch tensors
  as values), which cost every run 1.1-1.8 s of its start on a 2-core CPU; smallfx
  logs floats. `EventWriter` writes the same records with the standard library alone.
  """
  return EventWriter


class EventWriter:
  """TensorBoard's event file of scalars: what tensorboardX's `add_scalar` writes.

  A TFRecord file (`events.out.tfevents.TIME.HOST...`) of `Event` protocol buffers,
  encoded here by hand (tensorboard's event.proto and summary.proto: `wall_time` = 1,
  `step` = 2, `file_version` = 3, `summary` = 5, `session_log` = 7; `Summary.value` = 1
  with `tag` = 1 and `simple_value` = 2; `SessionLog.status` = 1, START = 1).
  `purge_step` as tensorboardX's: TensorBoard drops the steps from it on logged by an
  earlier (killed) part of the run. Every record is flushed when written.
  """

  def __init__(self, logdir: str, purge_step: int | None = None, filename_suffix: str = ''):
    os.makedirs(logdir, exist_ok=True)
    now = time.time()
    name = (f'events.out.tfevents.{int(now):010d}.{socket.gethostname()}.{os.getpid()}'
            f'{filename_suffix}')
    self.path = os.path.join(logdir, name)
    self._file = open(self.path, 'ab')  # pylint: disable=consider-using-with
    self._record(_double(1, now) + _bytes(3, b'brain.Event:2'))
    if purge_step is not None:
      self._record(_double(1, now) + _varint_field(2, purge_step)
                   + _bytes(7, _varint_field(1, 1)))

  def add_scalar(self, tag: str, value: float, step: int) -> None:
    summary_value = _bytes(1, tag.encode()) + b'\x15' + struct.pack('<f', float(value))
    self._record(_double(1, time.time()) + _varint_field(2, int(step))
                 + _bytes(5, _bytes(1, summary_value)))

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    if not self._file.closed:
      self._file.close()

  def _record(self, data: bytes) -> None:
    header = struct.pack('<Q', len(data))
    self._file.write(header + struct.pack('<I', _masked_crc32c(header)) + data
                     + struct.pack('<I', _masked_crc32c(data)))
    self._file.flush()


def _varint(n: int) -> bytes:
  n &= (1 << 64) - 1  # int64 as protobuf sends it: two's complement
  out = bytearray()
  while True:
    byte, n = n & 0x7f, n >> 7
    out.append(byte | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _varint_field(field: int, n: int) -> bytes:
  return _varint(field << 3) + _varint(n)


def _double(field: int, x: float) -> bytes:
  return _varint(field << 3 | 1) + struct.pack('<d', x)


def _bytes(field: int, data: bytes) -> bytes:
  return _varint(field << 3 | 2) + _varint(len(data)) + data


@functools.cache
def _crc32c_table() -> tuple[int, ...]:
  table = []
  for n in range(256):
    for _ in range(8):
      n = (n >> 1) ^ 0x82f63b78 if n & 1 else n >> 1
    table.append(n)
  return tuple(table)


def _masked_crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), masked as TFRecord stores it."""
  table, crc = _crc32c_table(), 0xffffffff
  for byte in data:
    crc = table[(crc ^ byte) & 0xff] ^ (crc >> 8)
  crc ^= 0xffffffff
  return (((crc >> 15) | (crc << 17)) + 0xa282ead8) & 0xffffffff


def _step(line: str):
  try:
    return json.loads(line)['step']
  except (ValueError, KeyError, TypeError):
    return None


def read(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]
