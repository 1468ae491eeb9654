"""Training throughput: smallfx's real train step against an equivalent PyTorch eager loop.

    python tools/bench.py [--platform cpu|gpu] [--cases resnet20,cnn,seeds,augment]
                          [--json FILE] [--quick] [--ref GIT_REF]

Both sides train the same model, batch size, augmentation (random crop with 4-pixel
zero padding, horizontal flip) and optimiser (SGD, momentum 0.9, Nesterov, weight
decay 5e-4 on kernels only, cross-entropy) on the same synthetic uint8 data, which
lives on the device as in the training loop. smallfx runs what `python -m smallfx.main`
runs, set up by the library (`tools/harness.py`: `train.set_up(config)`, the run's
initializer, training data and compiled step, called in the layout's rounds). PyTorch
runs an eager loop with the batch gathered, cropped and flipped in torch from a uint8
tensor; its memory format (channels-last or NCHW) is chosen per case by a short
trial, so it gets whichever is faster here.

Timing: compile and a few steps are excluded as warm-up; then `--repeats` rounds
of `--steps` steps, the frameworks interleaved within each round (in an order rotated
from round to round) so that other load on a shared machine hits both alike. Figures
are medians with the min-max spread; ratios are smallfx / PyTorch throughput (> 1:
smallfx faster), and per-round ratios come from the same round.

Cases:
  resnet20  CIFAR ResNet-20 on 32x32x3, batch 128.
  resnet56  the same at depth 56 (only when named in --cases).
  cnn       SmallCNN (conv32-pool-conv64-pool-dense128) on 28x28x1, batch 32.
  seeds     K seeds (K in --seeds) as members of one program (JSON key 'vmapped') against
            K sequential single-seed smallfx runs and K sequential PyTorch runs (same
            total work). The K-member program runs as a run of K seeds does: on a CPU,
            side by side on one CPU device per group of members (`members.cpu_devices`),
            in a child process that this one drives step by step (`harness.Served`;
            `member_devices` in the JSON); the single runs and PyTorch stay here, on one
            device with every core. Whole runs, start-up included:
            tools/bench_seed_runs.py.
  augment   the share of the cnn case's step spent in the default augmentation
            (tools/augment_cost.py).

`--ref REF` also times the smallfx of git revision REF (or of a checkout at that path)
in the same rounds: a temporary `git worktree`, imported by a child process of its own
(`harness.checkout`, `harness.Served`). REF must have `smallfx.train.set_up` (issue 22).

Allocator: like `python -m smallfx.main`, the benchmark re-executes itself under the
allocator smallfx/malloc.py picks (mimalloc, else tcmalloc), and PyTorch then shares
it; SMALLFX_MALLOC=system runs both on glibc's malloc. The header line says which.

Memory: on CPU the peak RSS of the process while each framework runs (VmHWM, reset
through /proc/self/clear_refs before each; both share the process, so it includes the
other's resident baseline, and `rss_growth` is the peak minus the RSS just before).
On GPU: for smallfx, XLA's memory analysis of the compiled step (arguments, outputs and
temporaries, donated buffers counted once), for PyTorch `torch.cuda.max_memory_allocated`
(reset before each case); no `rss_growth`. FLOP/s use XLA's cost analysis of the smallfx
step as lowered (`harness.Steps.flops_per_step`; the same model maths for both
frameworks). Utilisation is against `--peak-tflops` where given.
"""

import argparse
import contextlib
import os
import sys
import time

import numpy as np

import harness  # tools/ is on the path of a script in it
from smallfx import malloc
from smallfx import members

NUM_CLASSES = 10
PAD = 4
CASES = {
    # name: (model, image shape, batch size, steps per round, quick steps)
    'resnet20': ('resnet20', (32, 32, 3), 128, 4, 2),
    'resnet56': ('resnet56', (32, 32, 3), 128, 2, 1),  # not in the default --cases
    'cnn': ('cnn', (28, 28, 1), 32, 40, 4),
}
# The config of the maths that `TorchRun` writes out by hand.
MATCHED = {'augment': f'crop(pad={PAD})|flip', 'loss': 'xent', 'optimizer': 'sgd',
           'momentum': 0.9, 'weight_decay': 5e-4, 'learning_rate': 0.05,
           'schedule': 'constant', 'warmup_steps': 0, 'dtype': 'float32'}


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
  p.add_argument('--ref', default='', help='also time smallfx at this git revision (or folder)')
  p.add_argument('--no-torch', action='store_true')
  args = p.parse_args(argv)
  args.repeats = args.repeats or (2 if args.quick else 5)
  args.train_size = args.train_size or (256 if args.quick else 5000)
  args.cases = [c.strip() for c in args.cases.split(',') if c.strip()]
  for c in args.cases:
    if c not in (*CASES, 'seeds', 'augment'):
      p.error(f'unknown case {c!r}; valid: {", ".join([*CASES, "seeds", "augment"])}')
  args.seeds = [int(k) for k in args.seeds.split(',')]
  return args


# --------------------------------------------------------------------------- smallfx


def case_fields(model, shape, batch, num_seeds, train_size) -> dict:
  """The config fields of a case (`harness.config`): the matched maths on synthetic data."""
  return {'model': model, 'batch_size': batch, 'num_seeds': num_seeds,
          'dataset': harness.synthetic(shape, train_size, NUM_CLASSES), **MATCHED}


def smallfx_runner(args, fields, source=None):
  """The smallfx side of a case: here, or in a child for side-by-side members or --ref."""
  devices = members.cpu_devices(fields['num_seeds']) if args.platform == 'cpu' else 1
  if source or devices > 1:
    return harness.Served(fields, devices, source)
  return harness.Steps(harness.config(**fields))


def member_devices(runner) -> int:
  return runner.member_devices if isinstance(runner, harness.Served) else (
      runner.layout.member_devices)


def close(runners):
  for r in runners:
    if isinstance(r, harness.Served):
      r.close()


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
    return harness.reset_peak_rss()

  def peak_memory_mb(self):
    if self.device.startswith('cuda'):
      return self.torch.cuda.max_memory_allocated() / 2**20
    return harness.peak_rss_mb()


# --------------------------------------------------------------------------- cases


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


def flops_figures(flops_per_step, steps_per_sec, peak_tflops):
  out = {'xla_flops_per_step': flops_per_step,
         'tflops_per_sec': flops_per_step * steps_per_sec / 1e12}
  if peak_tflops:
    out['utilisation'] = out['tflops_per_sec'] / peak_tflops
  return out


def rates(times, work):
  """Round times (s) and images per round -> median/min/max images per second."""
  median, lo, hi = harness.spread([work / t for t in times])
  return {'images_per_sec': median, 'images_per_sec_min': lo, 'images_per_sec_max': hi,
          'round_seconds': [float(t) for t in times]}


def bench_single(case, args, sources, torch_device):
  model, shape, batch, steps, quick_steps = CASES[case]
  steps = args.steps or (quick_steps if args.quick else steps)
  fields = case_fields(model, shape, batch, 1, args.train_size)
  runners, info = {}, {'model': model, 'image_shape': list(shape), 'batch_size': batch,
                       'steps_per_round': steps, 'rounds': args.repeats,
                       'train_size': args.train_size}
  try:
    for name, source in sources.items():
      run = smallfx_runner(args, fields, source)
      info[f'{name}_compile_seconds'] = run.compile_seconds
      info[f'{name}_warmup_seconds'] = harness.warm(run)
      runners[name] = run
    if torch_device:
      images, labels = harness.synthetic_arrays(shape, args.train_size, NUM_CLASSES)
      cl, run = pick_torch_format(
          lambda cl: TorchRun(model, shape, batch, images, labels, torch_device, cl),
          max(1, steps // 2))
      info['torch_channels_last'] = cl
      runners['torch'] = run
    timed = harness.interleave(runners, steps, args.repeats, args.platform == 'cpu')
    flops = runners['smallfx'].flops_per_step()
    out = {'case': case, **info, 'results': {}}
    for name, run in runners.items():
      s = rates(timed['wall'][name], steps * batch)
      s['peak_memory_mb'], s['rss_growth_mb'] = timed['peak_mb'][name], timed['growth_mb'][name]
      s['final_loss'] = run.loss()
      s.update(flops_figures(flops, s['images_per_sec'] / batch, args.peak_tflops))
      out['results'][name] = s
  finally:
    close(runners.values())
  res, wall = out['results'], timed['wall']
  if 'torch' in res:
    for name in sources:
      res[name]['ratio_vs_torch'] = res[name]['images_per_sec'] / res['torch']['images_per_sec']
      res[name]['round_ratio_vs_torch'] = harness.spread(
          t / s for s, t in zip(wall[name], wall['torch']))
  if 'ref' in res:
    res['smallfx']['speedup_vs_ref'] = (res['smallfx']['images_per_sec'] /
                                        res['ref']['images_per_sec'])
  return out


def bench_seeds(args, sources, torch_device):
  model, shape, batch, steps, quick_steps = CASES[args.seeds_model]
  steps = args.steps or (quick_steps if args.quick else max(4, steps // 2))
  out = {'case': 'seeds', 'model': model, 'image_shape': list(shape), 'batch_size': batch,
         'steps_per_round': steps, 'rounds': args.repeats, 'train_size': args.train_size,
         'by_k': {}}
  torch_cl = None
  images, labels = harness.synthetic_arrays(shape, args.train_size, NUM_CLASSES)
  for k in args.seeds:
    runners = {}
    try:
      runners['vmapped'] = smallfx_runner(args, case_fields(model, shape, batch, k,
                                                            args.train_size))
      # K separate runs share one compiled single-seed step, like K launches of a script
      # would share the persistent compilation cache.
      single = harness.Steps(harness.config(**case_fields(model, shape, batch, 1,
                                                          args.train_size)))
      runners['sequential'] = harness.Sequential([single] + [single.twin()
                                                             for _ in range(k - 1)])
      if 'ref' in sources:  # the K-member program of the reference revision
        runners['ref_vmapped'] = smallfx_runner(
            args, case_fields(model, shape, batch, k, args.train_size), sources['ref'])
      for r in runners.values():
        harness.warm(r)
      if torch_device:
        if torch_cl is None:
          torch_cl, _ = pick_torch_format(
              lambda cl: TorchRun(model, shape, batch, images, labels, torch_device, cl),
              max(1, steps // 2))
        runners['torch'] = harness.Sequential([
            TorchRun(model, shape, batch, images, labels, torch_device, torch_cl, seed=s)
            for s in range(k)])
        harness.warm(runners['torch'])
      timed = harness.interleave(runners, steps, args.repeats, args.platform == 'cpu')
      res = {}
      for name, run in runners.items():
        total = harness.spread(timed['wall'][name])
        res[name] = {'total_seconds': total[0], 'total_seconds_min': total[1],
                     'total_seconds_max': total[2],
                     'images_per_sec': float(np.median([steps * batch * k / t
                                                        for t in timed['wall'][name]])),
                     'peak_memory_mb': timed['peak_mb'][name],
                     'rss_growth_mb': timed['growth_mb'][name], 'final_loss': run.loss()}
      v = res['vmapped']
      v['member_devices'] = member_devices(runners['vmapped'])
      v['flops_per_step'] = runners['vmapped'].flops_per_step()
    finally:
      close(runners.values())
    wall = timed['wall']
    v['time_vs_sequential'] = harness.spread(
        a / b for a, b in zip(wall['vmapped'], wall['sequential']))
    if 'ref_vmapped' in res:
      v['speedup_vs_ref'] = harness.spread(r / a for a, r in zip(wall['vmapped'],
                                                                  wall['ref_vmapped']))
    if 'torch' in res:
      v['time_vs_torch'] = harness.spread(a / t for a, t in zip(wall['vmapped'], wall['torch']))
    out['by_k'][str(k)] = res
  out['torch_channels_last'] = torch_cl
  return out


def bench_augment(args):
  """The share of the cnn case's train step spent in the default augmentation."""
  import augment_cost  # pylint: disable=g-import-not-at-top
  model, shape, batch, steps, quick_steps = CASES['cnn']
  config = harness.config(model=model, batch_size=batch,  # the default `augment`
                          dataset=harness.synthetic(shape, args.train_size, NUM_CLASSES))
  r = augment_cost.measure(config, repeats=args.repeats,
                           steps=args.steps or (quick_steps if args.quick else steps))
  return {'case': 'augment', 'model': model, 'batch': batch, 'augment': r['augment'],
          'ms_with': 1e3 * r['t_with'], 'ms_without': 1e3 * r['t_without'],
          'ms_augment_alone': 1e3 * r['t_augment'], 'share': r['share'],
          'alone_share': r['alone_share']}


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
    where = f" on {v['member_devices']} devices" if v['member_devices'] > 1 else ''
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


def fmt_augment(r) -> str:
  return (f"augment {r['augment']!r} in the {r['model']} step (batch {r['batch']}): "
          f"{r['ms_with']:.2f} ms with, {r['ms_without']:.2f} ms without -> "
          f"{100 * r['share']:.1f}% of the step; the pipeline alone "
          f"{r['ms_augment_alone']:.2f} ms ({100 * r['alone_share']:.1f}%)")


def start_torch(args):
  """(device, version, threads) of PyTorch, or Nones where it is not installed or not asked."""
  if args.no_torch:
    return None, None, None
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    print('torch is not installed: timing smallfx only', file=sys.stderr)
    return None, None, None
  if args.platform == 'gpu':
    if not torch.cuda.is_available():
      raise SystemExit('--platform gpu: torch sees no CUDA device')
    torch.backends.cudnn.benchmark = True
    # Same arithmetic on both sides: jax's default precision lets XLA use TF32 for
    # float32 convolutions and matmuls; torch does for cuDNN convolutions by
    # default, and for matmuls only when asked.
    torch.set_float32_matmul_precision('high')
    return 'cuda', torch.__version__, None
  torch.set_num_threads(args.threads or harness.cores())
  return 'cpu', torch.__version__, torch.get_num_threads()


def main(argv=None):
  args = parse_args(argv)
  # On GPU the host CPU backend too: it counts the FLOPs (harness.Steps.host_flops).
  os.environ.setdefault('JAX_PLATFORMS', 'cuda,cpu' if args.platform == 'gpu' else 'cpu')
  torch_device, torch_version, torch_threads = start_torch(args)
  meta = {**harness.machine(),
          'command': ' '.join(['python', 'tools/bench.py', *(argv or sys.argv[1:])]),
          'torch': torch_version, 'torch_threads': torch_threads,
          'xla_flags': os.environ.get('XLA_FLAGS', ''), 'ref': args.ref or None,
          'quick': args.quick, 'peak_tflops': args.peak_tflops or None}
  print(f'{harness.describe(meta)}, torch {torch_version} (both frameworks on that malloc)',
        flush=True)
  results = []
  t0 = time.perf_counter()
  with contextlib.ExitStack() as stack:
    sources = {'smallfx': None}
    if args.ref:
      sources['ref'] = stack.enter_context(harness.checkout(args.ref))
    for case in args.cases:
      if case == 'seeds':
        r = bench_seeds(args, sources, torch_device)
        print(fmt_seeds(r), flush=True)
      elif case == 'augment':
        r = bench_augment(args)
        print(fmt_augment(r), flush=True)
      else:
        r = bench_single(case, args, sources, torch_device)
        print(fmt_single(r), flush=True)
      results.append(r)
  meta['wall_seconds'] = time.perf_counter() - t0
  if args.json:
    harness.write_json(args.json, {'meta': meta, 'cases': results})
  return results


if __name__ == '__main__':
  malloc.relaunch()  # measure what the command line runs: see smallfx/malloc.py
  main()
