"""One metrics writer: JSON lines plus TensorBoard events, on process 0 only."""

import json
import os
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
    self._tb = EventWriter(workdir, purge_step=resume_step + 1 if resume_step else None)

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

  def image(self, step: int, tag: str, picture) -> None:
    """A uint8 picture (H, W, C) in TensorBoard's images."""
    if self.enabled:
      self._tb.add_image(tag, picture, step)

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


class EventWriter:
  """TensorBoard's event file of scalars, written with tensorboard's own writer.

  tensorboard's `EventFileWriter` and protocol buffers need neither TensorFlow nor
  torch (tensorboardX's SummaryWriter imports torch, which cost every run 1.1-1.8 s
  of its start on a 2-core CPU). `purge_step`: TensorBoard drops the steps from it on
  that an earlier, killed part of the run had logged.
  """

  def __init__(self, logdir: str, purge_step: int | None = None):
    # Imported here: a process that never writes events never pays for protobuf.
    from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import summary_pb2  # pylint: disable=g-import-not-at-top
    from tensorboard.summary.writer import event_file_writer  # pylint: disable=g-import-not-at-top
    self._event, self._summary = event_pb2, summary_pb2
    self._writer = event_file_writer.EventFileWriter(logdir, flush_secs=10)
    if purge_step is not None:
      self._writer.add_event(event_pb2.Event(
          step=purge_step, wall_time=time.time(),
          session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

  def add_scalar(self, tag: str, value: float, step: int) -> None:
    value = self._summary.Summary.Value(tag=tag, simple_value=float(value))
    self._writer.add_event(self._event.Event(
        step=int(step), wall_time=time.time(), summary=self._summary.Summary(value=[value])))

  def add_image(self, tag: str, picture, step: int) -> None:
    import io  # pylint: disable=g-import-not-at-top
    from PIL import Image  # pylint: disable=g-import-not-at-top
    png = io.BytesIO()
    Image.fromarray(picture[..., 0] if picture.shape[-1] == 1 else picture).save(png, 'PNG')
    image = self._summary.Summary.Image(height=picture.shape[0], width=picture.shape[1],
                                        colorspace=picture.shape[2],
                                        encoded_image_string=png.getvalue())
    value = self._summary.Summary.Value(tag=tag, image=image)
    self._writer.add_event(self._event.Event(
        step=int(step), wall_time=time.time(), summary=self._summary.Summary(value=[value])))

  def close(self) -> None:
    self._writer.close()


def _step(line: str):
  try:
    return json.loads(line)['step']
  except (ValueError, KeyError, TypeError):
    return None


def read(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]
