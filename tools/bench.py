"""Training throughput: smallfx's real train step against an equivalent PyTorch eager loop.

    python tools/bench.py [--platform cpu|gpu] [--cases resnet20,cnn,seeds,augment]
                          [--json FILE] [--quick] [--ref GIT_REF]

Both sides train the same model, batch size, augmentation (random crop with 4-pixel
zero padding, horizontal flip) and optimiser (SGD, momentum 0.9, Nesterov, weight
decay 5e-4 on kernels only, cross-entropy) on the same synthetic uint8 data, which
lives on the device as in the training loop. smallfx runs exactly what
`smallfx.train` runs: `build(config)` and `make_train_step(...)` (K seeds in one program,
state-donating, drawing and augmenting the batch on the device). PyTorch runs an
eager loop with the batch gathered, cropped and flipped in torch from a uint8
tensor; its memory format (channels-last or NCHW) is chosen per case by a short
trial, so it gets whichever is faster here.

Timing: compile and a few steps are excluded as warm-up; then `--repeats` rounds
of `--steps` steps, the frameworks interleaved within each round so that other
load on a shared machine hits both alike. Figures are medians with the min-max
spread; ratios are smallfx / PyTorch throughput (> 1: smallfx faster).

Cases:
  resnet20  CIFAR ResNet-20 on 32x32x3, batch 128.
  resnet56  the same at depth 56 (only when named in --cases).
  cnn       SmallCNN (conv32-pool-conv64-pool-dense128) on 28x28x1, batch 32.
  seeds     K seeds (K in --seeds): smallfx's K-seed step (JSON key 'vmapped': one
            vmapped program on GPU) against K sequential smallfx runs and K
            sequential PyTorch runs (same total work). On a CPU the K-seed step
            runs as `python -m smallfx.main` runs it: its seeds side by side on one
            CPU device per group of seeds (`smallfx.train.cpu_devices_for_seeds`),
            one seed per device in each of the step's calls
            (`smallfx.train.seed_rounds`), in a process of its own that this one
            drives step by step (`seed_devices` in the JSON); the single runs and
            PyTorch stay here, on one device with every core.

`--ref REF` also times the smallfx of git revision REF (extracted to a temporary
package) in the same rounds: before/after figures from one run.

Allocator: like `python -m smallfx.main`, the benchmark re-executes itself under
tcmalloc where the machine has it (smallfx/malloc.py), and PyTorch then shares it;
SMALLFX_MALLOC=system runs both on glibc's malloc. The header line says which.

Memory: on CPU the peak RSS of the process while each framework runs (VmHWM, reset
through /proc/self/clear_refs before each; both share the process, so it includes the
other's resident baseline, and `rss_growth` is the peak minus the RSS just before).
On GPU: for smallfx, XLA's memory analysis of the compiled step (arguments, outputs and
temporaries, donated buffers counted once: jax's allocator peak cannot be reset between
cases and includes the compile-time autotuner's scratch), for PyTorch
`torch.cuda.max_memory_allocated` (reset before each case); no `rss_growth`.
FLOP/s use XLA's cost analysis of the smallfx step as lowered, before the backend
compiles it (`flops`; the same model maths for both frameworks): after compilation, the
GPU's count leaves out convolutions, which become cuDNN calls (ResNet-20: 0.66 of 29.0
GFLOP per step). Utilisation is against `--peak-tflops` where given.
"""

import argparse
import contextlib
import importlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from augment_cost import cpu_model  # tools/ is on the path of a script in it
from smallfx import malloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 10
PAD = 4
CASES = {
    # name: (model, image shape, batch size, steps per round, quick steps)
    'resnet20': ('resnet20', (32, 32, 3), 128, 4, 2),
    'resnet56': ('resnet56', (32, 32, 3), 128, 2, 1),  # not in the default --cases
    'cnn': ('cnn', (28, 28, 1), 32, 40, 4),
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--platform', choices=('cpu', 'gpu'), default='cpu')
  p.add_argument('--cases', default='resnet20,cnn,seeds,augment')
  p.add_argument('--json', default='')
  p.add_argument('--quick', action='store_true', help='smoke run: tiny sizes, 2 rounds')
  p.add_argument('--repeats', type=int, default=0, help='rounds (default 5; quick 2)')
  p.add_argument('--steps', type=int, default=0, help='steps per round (default per case)')
  p.add_argument('--train-size', type=int, default=0, help='synthetic training images '
                 '(default 5000; quick 256)')
  p.add_argument('--seeds', default='1,4,8', help='K values of the seeds case')
  p.add_argument('--seeds-model', default='cnn', choices=sorted(CASES))
  p.add_argument('--peak-tflops', type=float, default=0.0,
                 help='the device peak (fp32) for FLOP/s utilisation')
  p.add_argument('--threads', type=int, default=0, help='torch threads (default: cores)')
  p.add_argument('--ref', default='', help='also time smallfx at this git revision')
  p.add_argument('--no-torch', action='store_true')
  p.add_argument('--serve-seeds', type=int, default=0, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  args.repeats = args.repeats or (2 if args.quick else 5)
  args.train_size = args.train_size or (256 if args.quick else 5000)
  args.cases = [c.strip() for c in args.cases.split(',') if c.strip()]
  for c in args.cases:
    if c not in (*CASES, 'seeds', 'augment'):
      p.error(f'unknown case {c!r}; valid: {", ".join([*CASES, "seeds", "augment"])}')
  args.seeds = [int(k) for k in args.seeds.split(',')]
  return args


# --------------------------------------------------------------------------- helpers


def cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


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


def summarise(times, work):
  """Round times (s) and images per round -> median/min/max images per second."""
  rates = sorted(work / t for t in times)
  return {'images_per_sec': float(np.median(rates)), 'images_per_sec_min': rates[0],
          'images_per_sec_max': rates[-1], 'round_seconds': [float(t) for t in times]}


def load_ref_smallfx(ref: str, tmp: str):
  """smallfx at git revision `ref` as the package `smallfx_ref` (imports rewritten)."""
  dest = os.path.join(tmp, 'smallfx_ref')
  archive = subprocess.run(['git', '-C', ROOT, 'archive', ref, 'smallfx'],
                           capture_output=True, check=True).stdout
  subprocess.run(['tar', '-x', '-C', tmp], input=archive, check=True)
  shutil.move(os.path.join(tmp, 'smallfx'), dest)
  for dirpath, _, files in os.walk(dest):
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(dirpath, name)
        with open(path) as f:
          src = f.read()
        src = re.sub(r'\b(from|import) smallfx\b', r'\1 smallfx_ref', src)
        with open(path, 'w') as f:
          f.write(src)
  sys.path.insert(0, tmp)
  return importlib.import_module('smallfx_ref.train'), importlib.import_module(
      'smallfx_ref.config')


# --------------------------------------------------------------------------- smallfx


class SmallfxRun:
  """One smallfx training run: the real train step, K seeds, data on the device."""

  def __init__(self, train_mod, config_mod, model, shape, batch, num_seeds, images, labels,
               platform_name):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    self.jax = jax
    c = config_mod.default()
    c.model, c.batch_size, c.num_seeds = model, batch, num_seeds
    c.augment = f'crop(pad={PAD})|flip'
    c.loss, c.optimizer, c.momentum, c.weight_decay = 'xent', 'sgd', 0.9, 5e-4
    c.learning_rate, c.schedule, c.warmup_steps = 0.05, 'constant', 0
    c.num_steps, c.dtype = 10**6, 'float32'
    self.images_per_step = batch * num_seeds
    setup = train_mod.build(c, NUM_CLASSES, len(labels))
    mean = np.full(shape[-1], 0.5, np.float32)
    std = np.full(shape[-1], 0.25, np.float32)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(
        jnp.arange(num_seeds))
    init = jax.jit(jax.vmap(lambda k: train_mod.init_state(setup.model, setup.tx, shape, k)))
    state = init(keys)
    state = state.replace(rng=jax.random.key_data(state.rng))
    # Place state and data exactly as train_and_evaluate does (whatever version).
    if hasattr(train_mod, 'make_mesh'):
      mesh = train_mod.make_mesh(c)
      state_sharding, _, replicated = train_mod._shardings(mesh)  # pylint: disable=protected-access
      self.step = train_mod.make_train_step(setup, NUM_CLASSES, mean, std, mesh)
      state = jax.device_put(state, state_sharding)
      # As many calls per step as the training loop makes (seeds side by side on CPU).
      rounds = train_mod.seed_rounds(mesh, num_seeds) if hasattr(train_mod, 'seed_rounds') else 1
      self.parts = train_mod.split_seeds(state, rounds, mesh) if rounds > 1 else [state]
      self.images = jax.device_put(images, replicated)
      self.labels = jax.device_put(labels, replicated)
    else:
      self.step = train_mod.make_train_step(setup, NUM_CLASSES, mean, std)
      self.parts, self.images, self.labels = [state], jax.device_put(images), jax.device_put(
          labels)
    self.device = jax.devices(platform_name)[0]
    # As the training loop does (smallfx.train.train_and_evaluate): with several CPU
    # devices, at most two steps in flight, or their collectives can stall.
    self.one_ahead = self.device.platform == 'cpu' and jax.local_device_count() > 1
    lowered = self.step.lower(self.state, self.images, self.labels)
    t = time.perf_counter()
    compiled = lowered.compile()
    self.compile_seconds = time.perf_counter() - t
    self.make_step = lambda mesh: train_mod.make_train_step(setup, NUM_CLASSES, mean, std,
                                                            mesh)
    with xla_convolutions(train_mod) as switched:
      # The model's maths, counted with every convolution in XLA's hands.
      counted = self.make_step(mesh).lower(self.state, self.images, self.labels) if switched \
          else lowered
      self.flops_per_step = len(self.parts) * (flops(counted) or host_flops(
          self.make_step, (self.state, self.images, self.labels)))
    mem = compiled.memory_analysis()
    self.step_bytes = mem and (mem.argument_size_in_bytes + mem.output_size_in_bytes -
                               mem.alias_size_in_bytes + mem.temp_size_in_bytes)
    self.metrics = None

  @property
  def state(self):
    """The state one call of the step takes."""
    return self.parts[0]

  def run(self, steps):
    previous = None
    for _ in range(steps):
      metrics = []
      for i, part in enumerate(self.parts):
        self.parts[i], m = self.step(part, self.images, self.labels)
        metrics.append(m)
      if self.one_ahead and previous is not None:
        self.jax.block_until_ready(previous)
      previous = self.metrics = metrics
    self.jax.block_until_ready((self.parts, self.metrics))

  def loss(self):
    return float(np.mean([np.asarray(m['train/loss']) for m in self.metrics]))

  def reset_peak(self):
    return self.device.platform == 'cpu' and reset_peak_rss()

  def peak_memory_mb(self):
    if self.device.platform == 'cpu':
      return peak_rss_mb()
    return (self.step_bytes or 0) / 2**20


@contextlib.contextmanager
def xla_convolutions(train_mod):
  """Convolutions traced meanwhile stay XLA's: cost analysis counts no custom call's FLOPs."""
  conv = sys.modules.get(train_mod.__name__.rsplit('.', 1)[0] + '.models.conv')
  before = getattr(conv, 'ONEDNN', False)  # older revisions have no such switch
  if before:
    conv.ONEDNN = False
  try:
    yield before  # whether a step traced before this needs tracing again
  finally:
    if before:
      conv.ONEDNN = before


def flops(lowered) -> float:
  try:
    cost = lowered.cost_analysis()
  except NotImplementedError:
    return 0.0
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get('flops', 0.0))


def host_flops(make_step, args) -> float:
  """FLOPs of the same step lowered for the host CPU, from abstract arguments.

  CUDA's PJRT plugin gives no cost analysis of a lowered program (no 'flops' from jax 0.11.2
  on an H200). Lowering is traced on the accelerator's backend, so the program (conv
  formulation, seed layout) is the accelerator's; only the count runs on the host.
  """
  import jax  # pylint: disable=g-import-not-at-top
  try:
    cpu = jax.devices('cpu')[:1]
  except RuntimeError:  # JAX_PLATFORMS without cpu
    return 0.0
  mesh = jax.make_mesh((1, 1), ('seed', 'data'), (jax.sharding.AxisType.Auto,) * 2,
                       devices=cpu)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
  return flops(make_step(mesh).lower(*abstract))


# --------------------------------------------------------------------------- PyTorch


def torch_models():
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top,invalid-name

  class Block(nn.Module):
    """smallfx.models.cifar_resnet.BasicBlock: post-activation, 1x1 conv shortcut."""

    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(cout)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(cout)
      nn.init.zeros_(self.bn2.weight)
      self.short = None
      if stride != 1 or cin != cout:
        self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                   nn.BatchNorm2d(cout))

    def forward(self, x):
      y = F.relu(self.bn1(self.conv1(x)))
      y = self.bn2(self.conv2(y))
      return F.relu(y + (x if self.short is None else self.short(x)))

  class CifarResNet(nn.Module):
    """smallfx.models.cifar_resnet.CifarResNet."""

    def __init__(self, channels, num_classes, depth):
      super().__init__()
      self.stem = nn.Conv2d(channels, 16, 3, 1, 1, bias=False)
      self.bn = nn.BatchNorm2d(16)
      blocks, cin = [], 16
      for stage, cout in enumerate((16, 32, 64)):
        for i in range((depth - 2) // 6):
          blocks.append(Block(cin, cout, 2 if stage > 0 and i == 0 else 1))
          cin = cout
      self.blocks = nn.Sequential(*blocks)
      self.head = nn.Linear(64, num_classes)

    def forward(self, x):
      x = self.blocks(F.relu(self.bn(self.stem(x))))
      return self.head(x.mean((2, 3)))

  class SmallCNN(nn.Module):

    def __init__(self, channels, num_classes, size):
      super().__init__()
      self.conv1 = nn.Conv2d(channels, 32, 3, padding=1)
      self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
      self.dense = nn.Linear(64 * (size // 4) ** 2, 128)
      self.head = nn.Linear(128, num_classes)

    def forward(self, x):
      x = F.max_pool2d(F.relu(self.conv1(x)), 2)
      x = F.max_pool2d(F.relu(self.conv2(x)), 2)
      return self.head(F.relu(self.dense(x.flatten(1))))

  return torch, F, {'resnet20': lambda c, s: CifarResNet(c, NUM_CLASSES, 20),
                    'resnet56': lambda c, s: CifarResNet(c, NUM_CLASSES, 56),
                    'cnn': lambda c, s: SmallCNN(c, NUM_CLASSES, s)}


class TorchRun:
  """The same training in PyTorch eager: gather, crop, flip and normalise in torch."""

  def __init__(self, model, shape, batch, images, labels, device, channels_last, seed=0):
    torch, F, factories = torch_models()
    self.torch, self.F, self.device = torch, F, device
    torch.manual_seed(seed)
    h, w, c = shape
    self.net = factories[model](c, h).to(device)
    self.channels_last = channels_last
    if channels_last:
      self.net = self.net.to(memory_format=torch.channels_last)
    decay = [p for p in self.net.parameters() if p.ndim > 1]
    no_decay = [p for p in self.net.parameters() if p.ndim <= 1]
    self.opt = torch.optim.SGD([{'params': decay, 'weight_decay': 5e-4},
                                {'params': no_decay, 'weight_decay': 0.0}],
                               lr=0.05, momentum=0.9, nesterov=True)
    # uint8 NHWC on the device, like smallfx; NCHW uint8 for the gather below.
    self.images = torch.as_tensor(images).permute(0, 3, 1, 2).contiguous().to(device)
    self.labels = torch.as_tensor(labels).long().to(device)
    self.batch, self.h, self.w = batch, h, w
    self.mean, self.std = 0.5, 0.25
    self.gen = torch.Generator(device=device).manual_seed(seed)
    self.last_loss = None
    self.rows = torch.arange(h, device=device)
    self.cols = torch.arange(w, device=device)

  def step(self):
    torch, F, b, dev = self.torch, self.F, self.batch, self.device
    idx = torch.randint(0, self.labels.shape[0], (b,), device=dev, generator=self.gen)
    x = self.images[idx].float().div_(255.0)
    x = F.pad(x, (PAD, PAD, PAD, PAD))
    dy = torch.randint(0, 2 * PAD + 1, (b,), device=dev, generator=self.gen)
    dx = torch.randint(0, 2 * PAD + 1, (b,), device=dev, generator=self.gen)
    flip = torch.rand(b, device=dev, generator=self.gen) < 0.5
    # Flip by mirroring the column indices of the crop: one gather does both.
    cols = dx[:, None] + self.cols[None]
    cols = torch.where(flip[:, None], dx[:, None] + (self.w - 1 - self.cols)[None], cols)
    rows = dy[:, None] + self.rows[None]
    x = x[torch.arange(b, device=dev)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    x = x.permute(0, 3, 1, 2)  # advanced indexing put channels last: back to NCHW
    x = (x - self.mean) / self.std
    x = x.contiguous(memory_format=torch.channels_last if self.channels_last
                     else torch.contiguous_format)
    loss = F.cross_entropy(self.net(x), self.labels[idx])
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    self.opt.step()
    self.last_loss = loss

  def run(self, steps):
    for _ in range(steps):
      self.step()
    self.sync()

  def sync(self):
    if self.device.startswith('cuda'):
      self.torch.cuda.synchronize()
    else:
      self.last_loss.item()

  def loss(self):
    return float(self.last_loss.item())

  def reset_peak(self):
    if self.device.startswith('cuda'):
      self.torch.cuda.reset_peak_memory_stats()
      return True
    return reset_peak_rss()

  def peak_memory_mb(self):
    if self.device.startswith('cuda'):
      return self.torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


# --------------------------------------------------------------------------- timing


def time_rounds(runners, steps, repeats, rss=True):
  """{name: runner}: interleaved rounds -> {name: [seconds per round]}, peak memory.

  `rss`: the runners' peaks are the process's resident memory (CPU), so their growth
  over the RSS before each run means something.
  """
  times = {n: [] for n in runners}
  peak, growth = {}, {}
  for r in range(repeats):
    for name, runner in runners.items():
      first = r == 0
      if first:
        before = getattr(runner, 'rss_mb', rss_mb)()
        runner.reset_peak()
      t = time.perf_counter()
      runner.run(steps)
      times[name].append(time.perf_counter() - t)
      if first:
        peak[name] = runner.peak_memory_mb()
        growth[name] = peak[name] - before if rss else None
  return times, peak, growth


def warm(runner, steps=2):
  t = time.perf_counter()
  runner.run(steps)
  return time.perf_counter() - t


def pick_torch_format(make, steps):
  """Channels-last or NCHW, whichever trains faster here (best of 2 short rounds)."""
  best = None
  for cl in (True, False):
    run = make(cl)
    run.run(2)  # warm-up
    t = min(_timed(run, steps) for _ in range(2))
    if best is None or t < best[0]:
      best = (t, cl, run)
  return best[1], best[2]


def _timed(run, steps):
  t = time.perf_counter()
  run.run(steps)
  return time.perf_counter() - t


def data(shape, n, seed=0):
  rng = np.random.default_rng(seed)
  # Smooth-ish synthetic images (not pure noise) and labels in 10 classes.
  images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
  labels = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
  return images, labels


def flops_figures(flops_per_step, steps_per_sec, peak_tflops):
  out = {'xla_flops_per_step': flops_per_step,
         'tflops_per_sec': flops_per_step * steps_per_sec / 1e12}
  if peak_tflops:
    out['utilisation'] = out['tflops_per_sec'] / peak_tflops
  return out


def bench_single(case, args, impls, torch_device):
  model, shape, batch, steps, quick_steps = CASES[case]
  steps = args.steps or (quick_steps if args.quick else steps)
  images, labels = data(shape, args.train_size)
  runners, info = {}, {'model': model, 'image_shape': list(shape), 'batch_size': batch,
                       'steps_per_round': steps, 'rounds': args.repeats,
                       'train_size': args.train_size}
  for name, (train_mod, config_mod) in impls.items():
    run = SmallfxRun(train_mod, config_mod, model, shape, batch, 1, images, labels,
                     args.platform)
    info[f'{name}_compile_seconds'] = run.compile_seconds
    info[f'{name}_warmup_seconds'] = warm(run)
    runners[name] = run
  if torch_device:
    cl, run = pick_torch_format(
        lambda cl: TorchRun(model, shape, batch, images, labels, torch_device, cl),
        max(1, steps // 2))
    info['torch_channels_last'] = cl
    runners['torch'] = run
  times, peak, growth = time_rounds(runners, steps, args.repeats, args.platform == 'cpu')
  out = {'case': case, **info, 'results': {}}
  for name, run in runners.items():
    s = summarise(times[name], steps * batch)
    s['peak_memory_mb'], s['rss_growth_mb'] = peak[name], growth[name]
    s['final_loss'] = run.loss()
    flops = runners['smallfx'].flops_per_step
    s.update(flops_figures(flops, s['images_per_sec'] / batch, args.peak_tflops))
    out['results'][name] = s
  res = out['results']
  if 'torch' in res:
    for name in impls:
      res[name]['ratio_vs_torch'] = res[name]['images_per_sec'] / res['torch']['images_per_sec']
      # Per-round ratios (same round = same machine load): their median and spread.
      rr = sorted(t / s for s, t in zip(times[name], times['torch']))
      res[name]['round_ratio_vs_torch'] = [float(np.median(rr)), rr[0], rr[-1]]
  if 'ref' in res:
    res['smallfx']['speedup_vs_ref'] = (res['smallfx']['images_per_sec'] /
                                        res['ref']['images_per_sec'])
  return out


class Sequential:
  """K independent runs of one kind, one after another: the total time of K runs."""

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


class SideBySide:
  """The K-seed step in a process of its own, laid out as `smallfx.main` lays it out on CPU.

  A run of K seeds gets one CPU device per group of seeds before JAX starts, which
  this process, whose single runs and PyTorch use one device and every core,
  cannot have too. The child (`--serve-seeds K`) builds the same `SmallfxRun` and
  answers one line of JSON per request; this side times `run` around the request,
  while it waits, so rounds still interleave with the other runners.
  """

  def __init__(self, args, k):
    cmd = [sys.executable, os.path.abspath(__file__), '--serve-seeds', str(k), '--seeds-model',
           args.seeds_model, '--train-size', str(args.train_size)]
    self.proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True)
    ready = self._reply()
    self.seed_devices = ready['devices']
    self.compile_seconds = ready['compile_seconds']
    self.flops_per_step = ready['flops_per_step']

  def _reply(self):
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f'the side-by-side seeds process ended (exit {self.proc.wait()})')
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

  def close(self):
    with contextlib.suppress(OSError, ValueError):
      self.proc.stdin.close()
    try:
      self.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
      self.proc.kill()


def serve_seeds(args):
  """The child of `SideBySide`: K seeds on the devices `smallfx.main` would give them."""
  import jax  # pylint: disable=g-import-not-at-top
  from smallfx import config as config_mod  # pylint: disable=g-import-not-at-top
  from smallfx import train as train_mod  # pylint: disable=g-import-not-at-top
  k = args.serve_seeds
  config = config_mod.default()
  config.num_seeds = k
  train_mod.cpu_devices_for_seeds(config)
  model, shape, batch, _, _ = CASES[args.seeds_model]
  images, labels = data(shape, args.train_size)
  run = SmallfxRun(train_mod, config_mod, model, shape, batch, k, images, labels, 'cpu')
  warm(run)
  answers = {'run': lambda n: run.run(int(n)), 'loss': run.loss, 'reset_peak': run.reset_peak,
             'peak': run.peak_memory_mb, 'rss': rss_mb}
  # The cost analysis of a side-by-side program counts one device's part of it.
  print(json.dumps({'devices': jax.device_count(), 'compile_seconds': run.compile_seconds,
                    'flops_per_step': run.flops_per_step * jax.device_count()}), flush=True)
  for line in sys.stdin:
    what, *rest = line.split()
    print(json.dumps(answers[what](*rest)), flush=True)


def bench_seeds(args, impls, torch_device):
  model, shape, batch, steps, quick_steps = CASES[args.seeds_model]
  steps = args.steps or (quick_steps if args.quick else max(4, steps // 2))
  images, labels = data(shape, args.train_size)
  train_mod, config_mod = impls['smallfx']
  out = {'case': 'seeds', 'model': model, 'image_shape': list(shape), 'batch_size': batch,
         'steps_per_round': steps, 'rounds': args.repeats, 'train_size': args.train_size,
         'by_k': {}}
  torch_cl = None
  side_by_side = args.platform == 'cpu' and hasattr(train_mod, 'cpu_devices_for_seeds')
  for k in args.seeds:
    if side_by_side and train_mod.seed_groups(k, cores()) > 1:
      vmapped = SideBySide(args, k)
    else:
      vmapped = SmallfxRun(train_mod, config_mod, model, shape, batch, k, images, labels,
                           args.platform)
    # K sequential runs share one compiled single-seed step, like K launches of a
    # script would share the persistent compilation cache.
    single = [SmallfxRun(train_mod, config_mod, model, shape, batch, 1, images, labels,
                         args.platform)]
    for _ in range(k - 1):
      twin = object.__new__(SmallfxRun)
      twin.__dict__.update(single[0].__dict__)
      twin.parts = single[0].jax.tree.map(lambda a: a + 0, single[0].parts)
      single.append(twin)
    runners = {'vmapped': vmapped, 'sequential': Sequential(single)}
    if 'ref' in impls:  # the vmapped step of the reference revision
      runners['ref_vmapped'] = SmallfxRun(*impls['ref'], model, shape, batch, k, images,
                                          labels, args.platform)
    for r in runners.values():
      warm(r)
    if torch_device:
      if torch_cl is None:
        torch_cl, _ = pick_torch_format(
            lambda cl: TorchRun(model, shape, batch, images, labels, torch_device, cl),
            max(1, steps // 2))
      runners['torch'] = Sequential([
          TorchRun(model, shape, batch, images, labels, torch_device, torch_cl, seed=s)
          for s in range(k)])
      warm(runners['torch'])
    try:
      times, peak, growth = time_rounds(runners, steps, args.repeats, args.platform == 'cpu')
      res = {}
      for name, run in runners.items():
        tt = sorted(times[name])
        res[name] = {'total_seconds': float(np.median(tt)), 'total_seconds_min': tt[0],
                     'total_seconds_max': tt[-1],
                     'images_per_sec': float(np.median([steps * batch * k / t for t in tt])),
                     'peak_memory_mb': peak[name], 'rss_growth_mb': growth[name],
                     'final_loss': run.loss()}
    finally:
      if isinstance(vmapped, SideBySide):
        vmapped.close()
    res['vmapped']['seed_devices'] = getattr(vmapped, 'seed_devices', 1)
    if 'ref_vmapped' in res:
      rf = sorted(r / v for v, r in zip(times['vmapped'], times['ref_vmapped']))
      res['vmapped']['speedup_vs_ref'] = [float(np.median(rf)), rf[0], rf[-1]]
    rr = sorted(v / s for v, s in zip(times['vmapped'], times['sequential']))
    res['vmapped']['time_vs_sequential'] = [float(np.median(rr)), rr[0], rr[-1]]
    res['vmapped']['flops_per_step'] = vmapped.flops_per_step
    if 'torch' in res:
      rt = sorted(v / t for v, t in zip(times['vmapped'], times['torch']))
      res['vmapped']['time_vs_torch'] = [float(np.median(rt)), rt[0], rt[-1]]
    out['by_k'][str(k)] = res
  out['torch_channels_last'] = torch_cl
  return out


# --------------------------------------------------------------------------- report


def fmt_single(r):
  res = r['results']
  lines = [f"{r['case']}: {r['model']} {'x'.join(map(str, r['image_shape']))} batch "
           f"{r['batch_size']}, {r['rounds']} rounds x {r['steps_per_round']} steps"]
  for name, s in res.items():
    extra = ''
    if 'round_ratio_vs_torch' in s:
      m, lo, hi = s['round_ratio_vs_torch']
      extra = f"  vs torch x{m:.2f} [{lo:.2f}-{hi:.2f}]"
    if 'speedup_vs_ref' in s:
      extra += f"  vs ref x{s['speedup_vs_ref']:.2f}"
    lines.append(f"  {name:8s} {s['images_per_sec']:9.1f} img/s "
                 f"[{s['images_per_sec_min']:.1f}-{s['images_per_sec_max']:.1f}]  "
                 f"peak {s['peak_memory_mb']:.0f} MB  {s['tflops_per_sec'] * 1e3:.1f} GFLOP/s"
                 f"{extra}")
  return '\n'.join(lines)


def fmt_seeds(r):
  lines = [f"seeds: {r['model']} batch {r['batch_size']}, {r['rounds']} rounds x "
           f"{r['steps_per_round']} steps per seed (train steps alone; whole runs, with "
           "start-up, compiling, evaluation and baseline: tools/bench_seed_runs.py)"]
  for k, res in r['by_k'].items():
    v = res['vmapped']
    m, lo, hi = v['time_vs_sequential']
    where = f" on {v['seed_devices']} devices" if v.get('seed_devices', 1) > 1 else ''
    line = (f"  K={k}: one program{where} {v['total_seconds']:.2f}s, sequential "
            f"{res['sequential']['total_seconds']:.2f}s (one program/sequential {m:.2f} "
            f"[{lo:.2f}-{hi:.2f}])")
    if 'torch' in res:
      mt, lt, ht = v['time_vs_torch']
      line += (f", torch {res['torch']['total_seconds']:.2f}s (one program/torch {mt:.2f} "
               f"[{lt:.2f}-{ht:.2f}])")
    if 'speedup_vs_ref' in v:
      line += f", one program vs ref x{v['speedup_vs_ref'][0]:.2f}"
    lines.append(line)
  return '\n'.join(lines)


def bench_augment(args, config_mod):
  """The share of the cnn case's train step spent in the default augmentation."""
  sys.path.insert(0, os.path.join(ROOT, 'tools'))
  import augment_cost  # pylint: disable=g-import-not-at-top
  model, shape, batch, steps, quick_steps = CASES['cnn']
  config = config_mod.default()  # its `augment` is the default pipeline
  config.update(model=model, batch_size=batch)
  images, labels = data(shape, args.train_size)
  r = augment_cost.measure(config, repeats=args.repeats,
                           steps=args.steps or (quick_steps if args.quick else steps),
                           data=(NUM_CLASSES, 0.5, 0.25, images, labels))
  return {'case': 'augment', 'model': model, 'batch': batch, 'augment': r['augment'],
          'ms_with': 1e3 * r['t_with'], 'ms_without': 1e3 * r['t_without'],
          'ms_augment_alone': 1e3 * r['t_augment'], 'share': r['share'],
          'alone_share': r['alone_share']}


def fmt_augment(r) -> str:
  return (f"augment {r['augment']!r} in the {r['model']} step (batch {r['batch']}): "
          f"{r['ms_with']:.2f} ms with, {r['ms_without']:.2f} ms without -> "
          f"{100 * r['share']:.1f}% of the step; the pipeline alone "
          f"{r['ms_augment_alone']:.2f} ms ({100 * r['alone_share']:.1f}%)")


def main(argv=None):
  args = parse_args(argv)
  # On GPU the host CPU backend too: it counts the FLOPs (host_flops).
  os.environ.setdefault('JAX_PLATFORMS', 'cuda,cpu' if args.platform == 'gpu' else 'cpu')
  sys.path.insert(0, ROOT)
  if args.serve_seeds:
    return serve_seeds(args)
  import jax  # pylint: disable=g-import-not-at-top
  from smallfx import config as config_mod  # pylint: disable=g-import-not-at-top
  from smallfx import train as train_mod  # pylint: disable=g-import-not-at-top

  impls = {'smallfx': (train_mod, config_mod)}
  tmp = tempfile.mkdtemp(prefix='smallfx_bench_')
  try:
    if args.ref:
      impls['ref'] = load_ref_smallfx(args.ref, tmp)
    torch_device = None
    torch_version = None
    if not args.no_torch:
      try:
        import torch  # pylint: disable=g-import-not-at-top
        torch_version = torch.__version__
        if args.platform == 'gpu':
          if not torch.cuda.is_available():
            raise SystemExit('--platform gpu: torch sees no CUDA device')
          torch_device = 'cuda'
          torch.backends.cudnn.benchmark = True
          # Same arithmetic on both sides: jax's default precision lets XLA use TF32 for
          # float32 convolutions and matmuls; torch does for cuDNN convolutions by
          # default, and for matmuls only when asked.
          torch.set_float32_matmul_precision('high')
        else:
          torch_device = 'cpu'
          torch.set_num_threads(args.threads or cores())
      except ImportError:
        print('torch is not installed: timing smallfx only', file=sys.stderr)

    meta = {
        'date': time.strftime('%Y-%m-%d %H:%M:%S %Z'),
        'command': ' '.join(['python', 'tools/bench.py', *(argv or sys.argv[1:])]),
        'platform': args.platform, 'cpu': cpu_model(), 'cores': cores(),
        'devices': [str(d) for d in jax.devices()],
        'device_kind': jax.devices()[0].device_kind, 'jax': jax.__version__,
        'torch': torch_version, 'torch_threads': (torch.get_num_threads()
                                                   if torch_device == 'cpu' else None),
        'xla_flags': os.environ.get('XLA_FLAGS', ''), 'ref': args.ref or None,
        'quick': args.quick, 'peak_tflops': args.peak_tflops or None,
        'malloc': 'tcmalloc' if malloc.active() else 'system',
    }
    print(f"{meta['cpu']} ({meta['cores']} cores), {meta['devices'][0]} "
          f"({meta['device_kind']}), jax {meta['jax']}, "
          f"torch {torch_version}, malloc {meta['malloc']} (both frameworks)", flush=True)
    results = []
    t0 = time.perf_counter()
    for case in args.cases:
      if case == 'seeds':
        r = bench_seeds(args, impls, torch_device)
        print(fmt_seeds(r), flush=True)
      elif case == 'augment':
        r = bench_augment(args, config_mod)
        print(fmt_augment(r), flush=True)
      else:
        r = bench_single(case, args, impls, torch_device)
        print(fmt_single(r), flush=True)
      results.append(r)
    meta['wall_seconds'] = time.perf_counter() - t0
    if args.json:
      os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
      with open(args.json, 'w') as f:
        json.dump({'meta': meta, 'cases': results}, f, indent=1)
  finally:
    with contextlib.suppress(OSError):
      shutil.rmtree(tmp)
  return results


if __name__ == '__main__':
  malloc.relaunch()  # measure what the command line runs: see smallfx/malloc.py
  main()
