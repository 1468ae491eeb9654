"""The benchmark tools' one harness: smallfx's train step, set up by smallfx itself.

Every tool times what `python -m smallfx.main` runs, through the library's public API:

    steps = harness.Steps(harness.config(model='cnn', batch_size=32, num_seeds=8))
    steps.run(20)           # 20 train steps of every member, waited for

`Steps(config)` is the run that `smallfx.train.set_up(config)` sets up (the members'
layout, data, model and optimiser), its state from `Run.initializer()`, its data from
`Run.training_data()` and its step from `Run.train_step()`, compiled once and called in
the layout's rounds as the training loop calls it. `Served` is the same in a child
process, for a run that wants other CPU devices than this process has (members side by
side, as a run of several members gets them) or another revision's smallfx (`checkout`:
a git worktree for `--ref`). Around them: synthetic data as a dataset name
(`synthetic`), interleaved timing rounds (`interleave`), memory and FLOP counts, and the
machine's description.

Nothing here builds a model, an optimiser or a layout: where a tool needs a variant
(vmapped members, another mapping), it passes a `members.Layout` to `Run.train_step`.

    python tools/harness.py --serve SPEC     the child of `Served` (internal)
"""

import argparse
import contextlib
import copy
import dataclasses
import datetime
import json
import os
import platform as platform_lib
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Where smallfx is imported from: this checkout, or (in a child of `Served` for `--ref`)
# another checkout, named by the parent in this variable.
SOURCE_ENV = 'SMALLFX_BENCH_SOURCE'
SOURCE = os.environ.get(SOURCE_ENV) or ROOT
sys.path.insert(0, SOURCE)
if SOURCE != ROOT:
  # An editable install of this checkout would fill in the modules the other one lacks.
  sys.meta_path[:] = [f for f in sys.meta_path
                      if not getattr(f, '__module__', '').startswith('__editable___smallfx')]

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

try:
  from smallfx import config as config_lib
  from smallfx import data as data_lib
  from smallfx import malloc
  from smallfx import train
  from smallfx import tuning
  train.set_up  # pylint: disable=pointless-statement
except (ImportError, AttributeError) as e:
  if SOURCE == ROOT:
    raise
  sys.exit(f'--ref: smallfx in {SOURCE} lacks what the harness uses ({e}); it compares '
           'revisions that have smallfx.train.set_up (issue 22) and later')
# pylint: enable=g-import-not-at-top,wrong-import-position

# What every benchmark config sets: all of the synthetic images train, nothing else runs.
BENCH_FIELDS = {'samples_per_class': 0, 'val_per_class': 0, 'baseline': 'none',
                'num_steps': 1000, 'progress': False}


# --------------------------------------------------------------------------- configs


def synthetic(shape, n: int = 2000, num_classes: int = 10) -> str:
  """The dataset name of `n` random uint8 images of `shape` (H, W, C) in `num_classes` classes."""
  return f"synthetic:{'x'.join(map(str, shape))}:{n}:{num_classes}"


def synthetic_arrays(shape, n: int = 2000, num_classes: int = 10):
  """The images (uint8) and labels (int32) of `synthetic(shape, n, num_classes)`."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
  labels = rng.integers(0, num_classes, n).astype(np.int32)
  return images, labels


def _load_synthetic(arg: str, config) -> data_lib.Source:
  del config
  shape, n, num_classes = arg.split(':')
  num_classes = int(num_classes)
  images, labels = synthetic_arrays(tuple(int(d) for d in shape.split('x')), int(n), num_classes)
  test = data_lib.Split(images[:num_classes], np.arange(num_classes, dtype=np.int32))
  return data_lib.Source(data_lib.Split(images, labels), test,
                         [str(k) for k in range(num_classes)])


def set_up(config_) -> train.Run:
  """`train.set_up(config_)`, where `synthetic(...)` names a data source too.

  That source joins the library's (`smallfx.data.PREFIXES`) only meanwhile: a process
  that imports the harness (a test session) sees the library's own list otherwise.
  """
  added = 'synthetic' not in data_lib.PREFIXES
  data_lib.PREFIXES.setdefault('synthetic', _load_synthetic)
  try:
    return train.set_up(config_)
  finally:
    if added:
      data_lib.PREFIXES.pop('synthetic', None)


def image_shape(model: str) -> tuple[int, int, int]:
  """Fashion-MNIST size for the small nets, CIFAR for CIFAR-style ones, 96 px otherwise."""
  if model in ('cnn', 'mlp'):
    return (28, 28, 1)
  if model.startswith(('resnet18', 'resnet34', 'resnet50', 'efficientnet')):
    return (96, 96, 3)
  return (32, 32, 3)


def config(**fields) -> ml_collections.ConfigDict:
  """smallfx's default config with `BENCH_FIELDS` and `fields` set.

  Dotted names reach into sub-configs (`**{'sweep.learning_rate': '0.1,0.3'}`). Without a
  `dataset`, synthetic images of the model's usual shape (`image_shape`).
  """
  c = config_lib.default()
  fields = {**BENCH_FIELDS, **fields}
  fields.setdefault('dataset', synthetic(image_shape(fields.get('model', c.model))))
  for name, value in fields.items():
    *path, last = name.split('.')
    node = c
    for part in path:
      node = node[part]
    node[last] = value
  return c


def model_specs(parser: argparse.ArgumentParser, text: str) -> list[tuple[str, int]]:
  """'MODEL:BATCH,...' as [(model, batch)]; a bad entry is a usage error naming it."""
  from smallfx import models  # pylint: disable=g-import-not-at-top
  specs = [spec.split(':') for spec in text.split(',')]
  for spec in specs:
    if len(spec) != 2 or spec[0] not in models.BACKBONES or not spec[1].isdigit():
      parser.error(f'{":".join(spec)!r} is not MODEL:BATCH with MODEL one of '
                   f'{", ".join(sorted(models.BACKBONES))}')
  return [(model, int(batch)) for model, batch in specs]


# --------------------------------------------------------------------------- the steps


class Steps:
  """A config's members stepping as `train.train_and_evaluate` steps them, in this process.

  `run`: a config (set up here) or a `train.Run` that several `Steps` share (kept as
  `train_run`); each has its own state from `run.initializer()`. `layout`: a variant
  of the run's `members.Layout` (same mesh) for the step, e.g.
  `dataclasses.replace(run.layout, unroll=False)`. `steps_per_call` > 1: that many steps
  under `lax.scan` per call (`Run.train_step(steps)`). To time a step with CPU tuning
  on or off, set the run up from a config with `cpu_tuning=on` (its set-up decides for
  the process), then build the `Steps` of that run inside `tuning.forced(on)`.
  """

  def __init__(self, run, steps_per_call: int = 1, layout=None):
    self.train_run = run if isinstance(run, train.Run) else set_up(run)
    self.layout = layout or self.train_run.layout
    self.steps_per_call = steps_per_call
    init, _ = self.train_run.initializer()
    data = self.train_run.training_data()
    self.parts = self.layout.split(init())
    self.data = (self.layout.split(data) if self.train_run.exp.resample_per_seed
                 else [data] * self.layout.rounds)
    step = self.train_run.train_step(steps_per_call, self.layout)
    self.lowered = step.lower(self.parts[0], *self.data[0])
    t = time.perf_counter()
    self.compiled = self.lowered.compile()
    self.compile_seconds = time.perf_counter() - t
    # As the training loop: with several CPU devices, at most two steps in flight.
    self.one_ahead = tuning.one_step_ahead(self.layout.platform, jax.local_device_count())
    self.metrics = None
    self._flops = None

  @property
  def num_members(self) -> int:
    return self.train_run.exp.num_members

  def dispatch(self, steps: int) -> None:
    """Queues `steps` train steps of every member (calls of `steps_per_call` steps)."""
    previous = None
    for _ in range(max(1, steps // self.steps_per_call)):
      metrics = []
      for r, part in enumerate(self.parts):
        self.parts[r], m = self.compiled(part, *self.data[r])
        metrics.append(m)
      if self.one_ahead and previous is not None:
        jax.block_until_ready(previous)
      previous = self.metrics = metrics

  def wait(self) -> None:
    jax.block_until_ready((self.parts, self.metrics))

  def run(self, steps: int) -> None:
    """`steps` train steps of every member, waited for."""
    self.dispatch(steps)
    self.wait()

  def seconds_per_step(self, steps: int) -> float:
    t = time.perf_counter()
    self.run(steps)
    return (time.perf_counter() - t) / max(1, steps // self.steps_per_call) / self.steps_per_call

  def twin(self) -> 'Steps':
    """Another run of the same compiled step: its own copy of the state (K separate runs)."""
    other = copy.copy(self)
    other.parts = [jax.tree.map(jnp.copy, part) for part in self.parts]
    other.metrics = None
    return other

  def loss(self) -> float:
    return float(np.mean([np.asarray(m['train/loss']) for m in self.metrics]))

  def flops_per_step(self) -> float:
    """XLA's count of one train step of every member, every convolution XLA's own.

    Counted on the program as lowered, before the backend compiles it: a oneDNN call
    counts nothing, so the step is traced again with oneDNN off (`tuning.forced`), and
    on GPU, whose plugin counts nothing, for the host CPU (`host_flops`).
    """
    if self._flops is None:
      args = (self.parts[0], *self.data[0])
      with tuning.forced(tuning.cpu_formulations(), onednn=False):
        per_call = flops(self.train_run.train_step(layout=self.layout).lower(*args))
      per_call = per_call or self.host_flops()
      # A side-by-side program's count is one device's part of it: one member per device.
      devices = self.layout.member_devices if self.layout.side_by_side else 1
      self._flops = per_call * devices * self.layout.rounds
    return self._flops

  def host_flops(self) -> float:
    """One call's FLOPs with the same program (the platform's) lowered for the host CPU."""
    try:
      cpu = jax.devices('cpu')[:1]
    except RuntimeError:  # JAX_PLATFORMS without cpu
      return 0.0
    mesh = self.layout.mesh
    host = jax.make_mesh((1,) * len(mesh.axis_names), mesh.axis_names,
                         axis_types=mesh.axis_types, devices=cpu)
    args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                        (self.parts[0], *self.data[0]))
    with tuning.forced(tuning.cpu_formulations(), onednn=False):
      step = self.train_run.train_step(layout=dataclasses.replace(self.layout, mesh=host))
      return flops(step.lower(*args))

  def step_bytes(self) -> int:
    """XLA's memory analysis of the step: arguments, outputs, temporaries (donated once)."""
    mem = self.compiled.memory_analysis()
    return mem and (mem.argument_size_in_bytes + mem.output_size_in_bytes -
                    mem.alias_size_in_bytes + mem.temp_size_in_bytes)

  def reset_peak(self) -> bool:
    return self.layout.platform == 'cpu' and reset_peak_rss()

  def peak_memory_mb(self) -> float:
    """The process's peak RSS on CPU; elsewhere the step's own memory (`step_bytes`)."""
    if self.layout.platform == 'cpu':
      return peak_rss_mb()
    return (self.step_bytes() or 0) / 2**20


def flops(lowered) -> float:
  """XLA's FLOP count of a lowered program (0 where the backend gives none)."""
  try:
    cost = lowered.cost_analysis()
  except NotImplementedError:
    return 0.0
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get('flops', 0.0))


class Sequential:
  """K runs of one kind one after another: the total time of K separate runs."""

  def __init__(self, runs):
    self.runs = runs

  def run(self, steps):
    for r in self.runs:
      r.run(steps)

  def loss(self):
    return float(np.mean([r.loss() for r in self.runs]))

  def reset_peak(self):
    return self.runs[0].reset_peak()

  def peak_memory_mb(self):
    return self.runs[0].peak_memory_mb()


# --------------------------------------------------------------------------- child processes


class Served:
  """`Steps(config(**fields))` in a child process that this one drives step by step.

  `cpu_devices` > 1: the child asks JAX for that many CPU devices before it starts, as
  `python -m smallfx.main` does for a run of several members (`members.cpu_devices`),
  which this process, whose other runners have one device and every core, cannot
  have too. `source`: a checkout whose smallfx the child imports (`checkout`). The
  child answers one line of JSON per request; `run` waits for it, so interleaved
  rounds time the child's steps like this process's own.
  """

  def __init__(self, fields: dict, cpu_devices: int = 1, source: str | None = None,
               count_flops: bool = True):
    spec = {'fields': fields, 'cpu_devices': cpu_devices, 'flops': count_flops}
    env = dict(os.environ)
    if source:
      env[SOURCE_ENV] = source
    self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), '--serve',
                                  json.dumps(spec)], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
    ready = self._reply()
    self.devices = ready['devices']
    self.compile_seconds = ready['compile_seconds']
    self._flops = ready['flops_per_step']
    self.member_devices = ready['member_devices']

  def _reply(self):
    line = self.proc.stdout.readline()
    if not line:
      code = self.proc.wait()
      raise SystemExit(f'a benchmark child process ended (exit {code}); its error is above')
    return json.loads(line)

  def _ask(self, *words):
    self.proc.stdin.write(' '.join(map(str, words)) + '\n')
    self.proc.stdin.flush()
    return self._reply()

  def run(self, steps):
    self._ask('run', steps)

  def loss(self):
    return self._ask('loss')

  def reset_peak(self):
    return self._ask('reset_peak')

  def peak_memory_mb(self):
    return self._ask('peak')

  def rss_mb(self):
    return self._ask('rss')

  def flops_per_step(self):
    return self._flops

  def close(self):
    with contextlib.suppress(OSError, ValueError):
      self.proc.stdin.close()
    try:
      self.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
      self.proc.kill()


def serve(spec: dict) -> None:
  """The child of `Served`: sets its devices, builds its `Steps`, answers requests."""
  if spec['cpu_devices'] > 1:
    jax.config.update('jax_num_cpu_devices', spec['cpu_devices'])
  steps = Steps(config(**spec['fields']))  # warmed up, like one here, by the caller
  answers = {'run': lambda n: steps.run(int(n)), 'loss': steps.loss,
             'reset_peak': steps.reset_peak, 'peak': steps.peak_memory_mb, 'rss': rss_mb}
  print(json.dumps({'devices': jax.device_count(), 'compile_seconds': steps.compile_seconds,
                    'member_devices': steps.layout.member_devices,
                    'flops_per_step': steps.flops_per_step() if spec['flops'] else 0.0}),
        flush=True)
  for line in sys.stdin:
    what, *rest = line.split()
    print(json.dumps(answers[what](*rest)), flush=True)


@contextlib.contextmanager
def checkout(ref: str):
  """A folder holding smallfx at `ref`: a temporary git worktree, or `ref` if a folder.

  The worktree is detached at the revision and removed afterwards; the repository
  and this checkout are not touched otherwise.
  """
  if os.path.isdir(ref):
    yield os.path.abspath(ref)
    return
  tmp = tempfile.mkdtemp(prefix='smallfx_ref_')
  path = os.path.join(tmp, 'smallfx')
  made = subprocess.run(['git', '-C', ROOT, 'worktree', 'add', '--detach', '--quiet', path,
                         ref], capture_output=True, text=True, check=False)
  if made.returncode:
    shutil.rmtree(tmp, ignore_errors=True)
    raise SystemExit(f'--ref {ref}: {made.stderr.strip() or "git worktree add failed"}')
  try:
    yield path
  finally:
    subprocess.run(['git', '-C', ROOT, 'worktree', 'remove', '--force', path],
                   capture_output=True, check=False)
    shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- timing


def interleave(runners: dict, steps: int, repeats: int, rss: bool = True, log=None) -> dict:
  """Rounds of `steps` steps of every runner, in an order rotated from round to round.

  Other load on a shared machine then hits every runner alike. Returns
  {'wall': {name: [seconds per round]}, 'cpu': {...this process's CPU seconds},
  'peak_mb': {name: peak memory in the first round}, 'growth_mb': {name: that peak
  minus the resident memory before it, where the peaks are resident memory (`rss`)}}.
  """
  names = list(runners)
  out = {'wall': {n: [] for n in names}, 'cpu': {n: [] for n in names},
         'peak_mb': {}, 'growth_mb': {}}
  for r in range(repeats):
    for name in names[r % len(names):] + names[:r % len(names)]:
      runner = runners[name]
      if r == 0:
        before = getattr(runner, 'rss_mb', rss_mb)()
        getattr(runner, 'reset_peak', reset_peak_rss)()
      c, t = time.process_time(), time.perf_counter()
      runner.run(steps)
      out['wall'][name].append(time.perf_counter() - t)
      out['cpu'][name].append(time.process_time() - c)
      if r == 0:
        out['peak_mb'][name] = getattr(runner, 'peak_memory_mb', peak_rss_mb)()
        out['growth_mb'][name] = out['peak_mb'][name] - before if rss else None
    if log:
      log(f'round {r + 1}/{repeats}: ' + ', '.join(
          f'{n} {out["wall"][n][-1]:.3f} s' for n in names))
  return out


def warm(runner, steps: int = 2) -> float:
  t = time.perf_counter()
  runner.run(steps)
  return time.perf_counter() - t


def spread(values) -> list[float]:
  """[median, min, max]."""
  values = sorted(values)
  return [float(np.median(values)), float(values[0]), float(values[-1])]


def stats(values) -> dict:
  median, lo, hi = spread(values)
  return {'median': median, 'min': lo, 'max': hi}


# --------------------------------------------------------------------------- memory


def _status_kb(field):
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith(field + ':'):
          return int(line.split()[1])
  except OSError:
    pass
  return None


def reset_peak_rss() -> bool:
  """Resets the kernel's RSS high-water mark (VmHWM) of this process (Linux >= 4.0)."""
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    return True
  except OSError:
    return False


def peak_rss_mb() -> float:
  hwm = _status_kb('VmHWM')
  if hwm is None:  # no /proc: the lifetime peak (KiB on Linux, bytes on macOS)
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 / (1024 if sys.platform == 'darwin' else 1)
  return hwm / 1024


def rss_mb() -> float:
  rss = _status_kb('VmRSS')
  return rss / 1024 if rss is not None else float('nan')


# --------------------------------------------------------------------------- the machine


def cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def cpu_model() -> str:
  """lscpu's model name (what the tables quote), else platform's guess."""
  try:
    out = subprocess.run(['lscpu'], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
      if line.startswith('Model name'):
        return line.split(':', 1)[1].strip()
  except (OSError, subprocess.CalledProcessError):
    pass
  return platform_lib.processor() or platform_lib.machine()


def machine() -> dict:
  """What a record says about where it ran."""
  devices = jax.devices()
  return {'cpu': cpu_model(), 'cores': cores(), 'devices': [str(d) for d in devices],
          'device_kind': devices[0].device_kind, 'platform': devices[0].platform,
          'jax': jax.__version__, 'malloc': malloc.name(),
          'cpu_tuning': tuning.cpu_formulations(),
          'date': datetime.datetime.now().astimezone().isoformat(timespec='seconds')}


def describe(m: dict) -> str:
  return (f"{m['cpu']} ({m['cores']} cores), {m['devices'][0]} ({m['device_kind']}), "
          f"jax {m['jax']}, malloc {m['malloc']}, CPU tuning "
          f"{'on' if m['cpu_tuning'] else 'off'}")


def write_json(path: str, record) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + '.tmp', 'w') as f:
    json.dump(record, f, indent=1)
  os.replace(path + '.tmp', path)


if __name__ == '__main__':
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--serve', required=True, help='JSON: fields, cpu_devices, flops')
  serve(json.loads(p.parse_args().serve))
