"""How much of the real train step is spent in augmentation.

    python tools/augment_cost.py [--model resnet20] [--dataset fashion_mnist] [--batch 32]
                                 [--augment SPEC ...] [--seeds 1] [--samples-per-class 10]
                                 [--repeats 7] [--steps 10] [--json FILE] [--quick]

For each pipeline SPEC this times, on the same data and state layout as a training run:

  with      the jitted step of `smallfx.train.make_train_step` (draw, augment,
            normalise, forward, backward, update) built with `augment=SPEC`;
  without   the same step built with `augment='none'`;
  augment   the pipeline alone (`smallfx.augment.build(SPEC)`), jitted, on one
            fixed batch of the training images (float, [0, 1], one-hot labels),
            vmapped over the seeds like the step, a fresh key per call.

Compilation and two warm-up calls are excluded. Then `--repeats` rounds, each
running `--steps` calls of every variant back to back (the order rotated from
round to round), so that other load on a shared machine hits all of them alike.
Times are per call, medians over rounds (with min and max). Reported shares:

  share         = (t_with - t_without) / t_with   the step time augmentation adds
  alone_share   = t_augment / t_with              the pipeline run on its own

both from wall time and (`cpu_share`, `cpu_alone_share`) from this process's CPU
time, which on a machine shared with other jobs swings much less than wall time.
`share_paired_median` is the median of the per-round shares. The two kinds of
share differ when XLA overlaps or fuses the pipeline with the rest of the step;
`share` is the one that matters for training throughput, but when the pipeline
costs less than the timing noise it is noise (even negative), and `alone_share`
is then the tighter bound.

`measure(config, repeats, steps)` is the library entry point (tools/bench.py can
import it): it times `config.augment` against 'none' and returns a dict.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# The default specs timed by the command line: the library default plus the
# pipelines compared in experiments/augment/.
DEFAULT_SPECS = ('crop(pad=2)|flip', 'crop(pad=4)|flip', 'crop(pad=2)|flip|trivial')


def cpu_model() -> str:
  """lscpu's model name (what the README tables quote), else platform's guess."""
  try:
    out = subprocess.run(['lscpu'], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
      if line.startswith('Model name'):
        return line.split(':', 1)[1].strip()
  except (OSError, subprocess.CalledProcessError):
    pass
  return platform.processor() or platform.machine()


def _stats(times):
  times = sorted(times)
  return {'median': float(np.median(times)), 'min': float(times[0]), 'max': float(times[-1])}


class _Variant:
  """One thing to time: a callable run `steps` times, blocking at the end.

  Records wall time and this process's CPU time (all threads) per call. On a
  machine shared with other jobs the wall time swings with their load; the CPU
  time is the work done, and is the steadier measure of what a pipeline adds.
  """

  def __init__(self, name, call):
    self.name, self.call, self.times, self.cpu_times = name, call, [], []

  def round(self, steps):
    c, t = time.process_time(), time.perf_counter()
    self.call(steps)
    self.times.append((time.perf_counter() - t) / steps)
    self.cpu_times.append((time.process_time() - c) / steps)


def _step_variant(name, train, config, spec, num_classes, mean, std, images, labels,
                  per_seed):
  """The real train step of `config` with `augment=spec`, state and data on the device."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.augment = spec
  train_size = labels.shape[-1]
  setup = train.build(c, num_classes, train_size)
  mesh = train.make_mesh(c)
  state_sharding, _, replicated = train._shardings(mesh)  # pylint: disable=protected-access
  step = train.make_train_step(setup, num_classes, mean, std, mesh, per_seed)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(c.seed), i))(
      jnp.arange(c.num_seeds))
  image_shape = images.shape[-3:]
  state = jax.jit(jax.vmap(lambda k: train.init_state(setup.model, setup.tx, image_shape,
                                                      k)))(keys)
  state = jax.device_put(state.replace(rng=jax.random.key_data(state.rng)), state_sharding)
  data_sharding = state_sharding if per_seed else replicated
  images_dev = jax.device_put(images, data_sharding)
  labels_dev = jax.device_put(labels, data_sharding)
  t = time.perf_counter()
  compiled = step.lower(state, images_dev, labels_dev).compile()
  compile_s = time.perf_counter() - t
  box = {'state': state}

  def call(steps):
    s = box['state']
    for _ in range(steps):
      s, m = compiled(s, images_dev, labels_dev)
    jax.block_until_ready((s, m))
    box['state'] = s

  v = _Variant(name, call)
  v.compile_s = compile_s
  return v


def _augment_variant(name, spec, config, num_classes, images, labels, per_seed):
  """The pipeline alone on one fixed batch, vmapped over seeds, a new key per call."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from smallfx import augment as augment_lib  # pylint: disable=g-import-not-at-top
  apply = augment_lib.build(spec)
  k, b = config.num_seeds, config.batch_size
  # The first `batch` training images of each seed's split, as the step sees them.
  x = images[:, :b] if per_seed else np.broadcast_to(images[:b], (k, *images[:b].shape))
  y = labels[:, :b] if per_seed else np.broadcast_to(labels[:b], (k, b))
  x = jnp.asarray(np.asarray(x), jnp.float32) / 255.0
  y = jax.nn.one_hot(jnp.asarray(np.asarray(y)), num_classes)
  seed_keys = jax.random.split(jax.random.key(config.seed), k)

  def run(keys, i, x, y):
    keys = jax.vmap(lambda kk: jax.random.fold_in(kk, i))(keys)
    return jax.vmap(apply)(keys, x, y)

  # The batch is an argument, not a closed-over constant that XLA could fold
  # (padding, blurs and lumas of a constant image cost nothing at run time).
  fn = jax.jit(run)
  t = time.perf_counter()
  compiled = fn.lower(seed_keys, jnp.int32(0), x, y).compile()
  compile_s = time.perf_counter() - t
  counter = [0]

  def call(steps):
    out = None
    for _ in range(steps):
      counter[0] += 1
      out = compiled(seed_keys, jnp.int32(counter[0]), x, y)
    jax.block_until_ready(out)

  v = _Variant(name, call)
  v.compile_s = compile_s
  return v


def _load(config):
  """The run's training data exactly as train_and_evaluate lays it out."""
  from smallfx import data as data_lib  # pylint: disable=g-import-not-at-top
  dataset = data_lib.load(config)
  train_float = dataset.train.images.astype(np.float32) / 255.0
  mean = train_float.mean(axis=(0, 1, 2))
  std = np.maximum(train_float.std(axis=(0, 1, 2)), 1e-3)
  if config.resample_per_seed:
    splits = [dataset.train] + [data_lib.resample_train(dataset, config, k)
                                for k in range(1, config.num_seeds)]
    images = np.stack([s.images for s in splits])
    labels = np.stack([s.labels for s in splits])
  else:
    images, labels = dataset.train.images, dataset.train.labels
  return dataset.num_classes, mean, std, images, labels


def measure_specs(config, specs, repeats: int = 7, steps: int = 10, warmup: int = 2,
                  data=None, log=None) -> dict:
  """Times the step without augmentation and, per spec, with it and the pipeline alone.

  `data` = (num_classes, mean, std, images_u8, labels) replaces loading `config.dataset`
  (images (N, H, W, C) uint8, or (seeds, N, H, W, C) with `config.resample_per_seed`).
  Returns {'without': stats, 'specs': {spec: {...}}, ...}; times are seconds per call.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from smallfx import train  # pylint: disable=g-import-not-at-top
  from smallfx import augment as augment_lib  # pylint: disable=g-import-not-at-top
  log = log or (lambda *_: None)
  specs = list(dict.fromkeys(specs))
  for spec in specs:
    augment_lib.build(spec)  # a bad spec fails here, before any compile
  num_classes, mean, std, images, labels = data or _load(config)
  per_seed = bool(config.resample_per_seed)
  common = (train, config)
  variants = [_step_variant('without', *common, 'none', num_classes, mean, std, images,
                            labels, per_seed)]
  for spec in specs:
    variants.append(_step_variant(('with', spec), *common, spec, num_classes, mean, std,
                                  images, labels, per_seed))
    variants.append(_augment_variant(('augment', spec), spec, config, num_classes, images,
                                     labels, per_seed))
  log(f'compiled {len(variants)} functions; warm-up {warmup} call(s) each')
  for v in variants:
    v.call(warmup)
  for r in range(repeats):
    # Rotate the order so that no variant always runs first (or last) in a round.
    shift = r % len(variants)
    for v in variants[shift:] + variants[:shift]:
      v.round(steps)
    log(f'round {r + 1}/{repeats}: ' + ', '.join(
        f'{v.name if isinstance(v.name, str) else v.name[0] + " " + v.name[1]} '
        f'{1e3 * v.times[-1]:.1f} ms' for v in variants))

  without = variants[0]
  t_without = _stats(without.times)
  out = {
      'model': config.model, 'width': config.width, 'dataset': config.dataset,
      'image_shape': list(images.shape[-3:]), 'batch_size': config.batch_size,
      'num_seeds': config.num_seeds, 'resample_per_seed': per_seed,
      'samples_per_class': config.samples_per_class, 'repeats': repeats, 'steps': steps,
      'warmup': warmup, 'units': 'seconds per call (one train step / one pipeline call)',
      'without': {**t_without, 'cpu': _stats(without.cpu_times),
                  'compile_s': without.compile_s},
      'specs': {},
      'cpu': cpu_model(), 'cores': len(os.sched_getaffinity(0)),
      'devices': [str(d) for d in jax.devices()], 'platform': jax.devices()[0].platform,
      'jax': jax.__version__,
      'date': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
  }
  for spec in specs:
    with_v = next(v for v in variants if v.name == ('with', spec))
    aug_v = next(v for v in variants if v.name == ('augment', spec))
    t_with, t_aug = _stats(with_v.times), _stats(aug_v.times)
    c_with, c_aug = _stats(with_v.cpu_times), _stats(aug_v.cpu_times)
    c_without = out['without']['cpu']
    # Paired per round: the share in each round, whose median is robust to a round
    # where the machine was busier for every variant alike.
    paired = [(w - wo) / w for w, wo in zip(with_v.times, without.times)]
    out['specs'][spec] = {
        'with': {**t_with, 'cpu': c_with, 'compile_s': with_v.compile_s},
        'augment': {**t_aug, 'cpu': c_aug, 'compile_s': aug_v.compile_s},
        'share': (t_with['median'] - t_without['median']) / t_with['median'],
        'share_paired_median': float(np.median(paired)),
        'share_paired_min': float(min(paired)), 'share_paired_max': float(max(paired)),
        'alone_share': t_aug['median'] / t_with['median'],
        # The same two shares from CPU time (all threads of this process).
        'cpu_share': (c_with['median'] - c_without['median']) / c_with['median'],
        'cpu_alone_share': c_aug['median'] / c_with['median'],
    }
  return out


def measure(config, repeats: int = 7, steps: int = 10, data=None) -> dict:
  """The cost of `config.augment` in the train step of `config` (for tools/bench.py).

  Returns seconds per step with (`t_with`) and without (`t_without`) the pipeline,
  the pipeline alone (`t_augment`), `share` = (t_with - t_without) / t_with and
  `alone_share` = t_augment / t_with, the same two from CPU time (`cpu_share`,
  `cpu_alone_share`: the steadier ones on a shared machine), and the full record
  under `detail`.
  """
  spec = config.augment
  full = measure_specs(config, [spec], repeats=repeats, steps=steps, data=data)
  r = full['specs'][spec]
  return {'augment': spec, 't_with': r['with']['median'],
          't_without': full['without']['median'], 't_augment': r['augment']['median'],
          'share': r['share'], 'alone_share': r['alone_share'],
          'cpu_share': r['cpu_share'], 'cpu_alone_share': r['cpu_alone_share'],
          'detail': full}


def format_table(result) -> str:
  """Wall-time and CPU-time columns, milliseconds per call and shares in percent."""
  wo = result['without']
  head = (f"{result['model']} on {result['dataset']} {tuple(result['image_shape'])}, "
          f"batch {result['batch_size']} x {result['num_seeds']} seed(s), "
          f"{result['repeats']} rounds x {result['steps']} steps, medians\n"
          f"cpu: {result['cpu']} ({result['cores']} cores), {result['platform']}, "
          f"jax {result['jax']}, {result['date']}\n"
          f"{'':32s} {'--------------- wall ---------------':>36s}  "
          f"{'------------ cpu time ------------':>34s}\n")
  rows = [f"{'pipeline':32s} {'step ms':>8s} {'aug ms':>7s} {'share':>6s} {'paired':>6s} "
          f"{'alone':>6s}  {'step ms':>8s} {'aug ms':>7s} {'share':>6s} {'alone':>6s}",
          f"{'none':32s} {1e3 * wo['median']:8.1f} {'':29s}  {1e3 * wo['cpu']['median']:8.1f}"]
  for spec, r in result['specs'].items():
    rows.append(f"{spec:32s} {1e3 * r['with']['median']:8.1f} "
                f"{1e3 * r['augment']['median']:7.2f} {100 * r['share']:5.1f}% "
                f"{100 * r['share_paired_median']:5.1f}% {100 * r['alone_share']:5.1f}%  "
                f"{1e3 * r['with']['cpu']['median']:8.1f} "
                f"{1e3 * r['augment']['cpu']['median']:7.2f} {100 * r['cpu_share']:5.1f}% "
                f"{100 * r['cpu_alone_share']:5.1f}%")
  return head + '\n'.join(rows)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--model', default='resnet20')
  p.add_argument('--width', type=float, default=1.0)
  p.add_argument('--dataset', default='fashion_mnist')
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--seeds', type=int, default=1, help='num_seeds (vmapped)')
  p.add_argument('--samples-per-class', type=int, default=10)
  p.add_argument('--augment', action='append', default=None,
                 help='pipeline spec; repeat for several (default: %s)' % ', '.join(
                     DEFAULT_SPECS))
  p.add_argument('--repeats', type=int, default=0, help='rounds (default 7; quick 2)')
  p.add_argument('--steps', type=int, default=0, help='calls per round (default 10; quick 2)')
  p.add_argument('--json', default='')
  p.add_argument('--quick', action='store_true',
                 help='smoke run: cnn on digits, batch 8, 2 rounds of 2 steps')
  args = p.parse_args(argv)
  if args.quick:
    # Only what the user left at its default changes.
    if args.model == 'resnet20':
      args.model = 'cnn'
    if args.dataset == 'fashion_mnist':
      args.dataset = 'digits'
    if args.batch == 32:
      args.batch = 8
  args.repeats = args.repeats or (2 if args.quick else 7)
  args.steps = args.steps or (2 if args.quick else 10)
  specs = args.augment or (['crop(pad=1)|flip'] if args.quick else list(DEFAULT_SPECS))

  from smallfx import cli  # pylint: disable=g-import-not-at-top
  from smallfx import config as config_lib  # pylint: disable=g-import-not-at-top
  from smallfx.errors import UserError  # pylint: disable=g-import-not-at-top

  def run():
    c = config_lib.default()
    c.model, c.width, c.dataset, c.batch_size = args.model, args.width, args.dataset, args.batch
    c.num_seeds, c.resample_per_seed = args.seeds, args.seeds > 1
    c.samples_per_class, c.baseline, c.num_steps = args.samples_per_class, 'none', 1000
    c.lock()
    from smallfx import train  # pylint: disable=g-import-not-at-top
    train.check_names(c)
    result = measure_specs(c, specs, args.repeats, args.steps,
                           log=lambda s: print(s, file=sys.stderr, flush=True))
    result['command'] = ' '.join(['python', 'tools/augment_cost.py', *(argv or sys.argv[1:])])
    print(format_table(result))
    if args.json:
      os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
      with open(args.json + '.tmp', 'w') as f:
        json.dump(result, f, indent=1)
      os.replace(args.json + '.tmp', args.json)

  try:
    run()
  except UserError as e:
    cli.fail(str(e))


if __name__ == '__main__':
  from smallfx import malloc  # pylint: disable=g-import-not-at-top
  malloc.relaunch()  # measure what the command line runs: see smallfx/malloc.py
  main()
