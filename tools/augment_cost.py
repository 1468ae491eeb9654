"""How much of the real train step is spent in augmentation.

    python tools/augment_cost.py [--model resnet20] [--dataset fashion_mnist] [--batch 32]
                                 [--augment SPEC ...] [--seeds 1] [--samples-per-class 10]
                                 [--repeats 7] [--steps 10] [--json FILE] [--quick]

For each pipeline SPEC this times, on the data and state a training run has
(`tools/harness.py`: the run as `smallfx.train.set_up` sets it up, its members on this
process's one device):

  with      the run's compiled train step (draw, augment, normalise, forward,
            backward, update) with `augment=SPEC`;
  without   the same step with `augment='none'`;
  augment   the pipeline alone (the run's `exp.augment`), jitted, on one fixed batch of
            the training images (float, [0, 1], one-hot labels), vmapped over the
            members like the step, a fresh key per call.

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

`measure(config, repeats, steps)` is the library entry point (tools/bench.py imports
it): it times `config.augment` against 'none' and returns a dict. A config's data can
be synthetic: `config.dataset = harness.synthetic(shape, n)`.
"""

import argparse
import sys
import time

import numpy as np

import harness  # tools/ is on the path of a script in it
from smallfx import malloc

# The default specs timed by the command line: the library default plus the
# pipelines compared in experiments/augment/.
DEFAULT_SPECS = ('crop(pad=2)|flip', 'crop(pad=4)|flip', 'crop(pad=2)|flip|trivial')


def _step(config, spec) -> harness.Steps:
  """The run of `config` with `augment=spec`: its compiled step, state and data."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.augment = spec
  return harness.Steps(c)


class _AugmentAlone:
  """The pipeline of `steps`' run alone, on its first batch, vmapped over the members.

  The batch is an argument, not a closed-over constant that XLA could fold (padding,
  blurs and lumas of a constant image cost nothing at run time); a new key per call.
  """

  def __init__(self, steps: harness.Steps):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    self.jax = jax
    exp = steps.train_run.exp
    images, labels = (np.asarray(a) for a in steps.data[0])
    b = exp.batch_size
    if exp.resample_per_seed:  # each member's own split: (members, N, ...)
      x, y = images[:, :b], labels[:, :b]
    else:
      x = np.broadcast_to(images[:b], (exp.num_members, *images[:b].shape))
      y = np.broadcast_to(labels[:b], (exp.num_members, b))
    self.x = jnp.asarray(x, jnp.float32) / 255.0
    self.y = jax.nn.one_hot(jnp.asarray(y), steps.train_run.dataset.num_classes)
    self.keys = jax.random.split(jax.random.key(exp.seed), len(x))
    apply = steps.train_run.setup.augment

    def run(keys, i, x, y):
      keys = jax.vmap(lambda k: jax.random.fold_in(k, i))(keys)
      return jax.vmap(apply)(keys, x, y)

    t = time.perf_counter()
    self.compiled = jax.jit(run).lower(self.keys, jnp.int32(0), self.x, self.y).compile()
    self.compile_seconds = time.perf_counter() - t
    self.calls = 0

  def run(self, steps):
    out = None
    for _ in range(steps):
      self.calls += 1
      out = self.compiled(self.keys, self.calls, self.x, self.y)
    self.jax.block_until_ready(out)


def measure_specs(config, specs, repeats: int = 7, steps: int = 10, warmup: int = 2,
                  log=None) -> dict:
  """Times the step without augmentation and, per spec, with it and the pipeline alone.

  Returns {'without': stats, 'specs': {spec: {...}}, ...}; times are seconds per call.
  """
  from smallfx import augment as augment_lib  # pylint: disable=g-import-not-at-top
  specs = list(dict.fromkeys(specs))
  for spec in specs:
    if spec != 'auto':  # (the run picks that one by image size)
      augment_lib.build(spec)  # a bad spec fails here, before any compile
  runners = {'without': _step(config, 'none')}
  for spec in specs:
    runners[f'with {spec}'] = _step(config, spec)
    runners[f'augment {spec}'] = _AugmentAlone(runners[f'with {spec}'])
  (log or (lambda *_: None))(f'compiled {len(runners)} functions; warm-up {warmup} call(s) each')
  for r in runners.values():
    r.run(warmup)
  timed = harness.interleave(runners, steps, repeats, log=log)
  wall = {n: [t / steps for t in ts] for n, ts in timed['wall'].items()}
  cpu = {n: [t / steps for t in ts] for n, ts in timed['cpu'].items()}
  run = runners['without'].train_run
  out = {
      'model': config.model, 'width': config.width, 'dataset': config.dataset,
      'image_shape': list(run.dataset.image_shape[:2]) + [len(run.mean)],
      'batch_size': config.batch_size, 'num_seeds': config.num_seeds,
      'resample_per_seed': bool(config.resample_per_seed),
      'samples_per_class': config.samples_per_class, 'repeats': repeats, 'steps': steps,
      'warmup': warmup, 'units': 'seconds per call (one train step / one pipeline call)',
      'without': {**harness.stats(wall['without']), 'cpu': harness.stats(cpu['without']),
                  'compile_s': runners['without'].compile_seconds},
      'specs': {}, **harness.machine(),
  }
  t_without, c_without = out['without']['median'], out['without']['cpu']['median']
  for spec in specs:
    w, a = f'with {spec}', f'augment {spec}'
    t_with, t_aug = harness.stats(wall[w]), harness.stats(wall[a])
    c_with, c_aug = harness.stats(cpu[w]), harness.stats(cpu[a])
    # Paired per round: the share in each round, whose median is robust to a round
    # where the machine was busier for every variant alike.
    paired = harness.spread((x - y) / x for x, y in zip(wall[w], wall['without']))
    out['specs'][spec] = {
        'pipeline': runners[w].train_run.setup.augment_spec,
        'with': {**t_with, 'cpu': c_with, 'compile_s': runners[w].compile_seconds},
        'augment': {**t_aug, 'cpu': c_aug, 'compile_s': runners[a].compile_seconds},
        'share': (t_with['median'] - t_without) / t_with['median'],
        'share_paired_median': paired[0], 'share_paired_min': paired[1],
        'share_paired_max': paired[2],
        'alone_share': t_aug['median'] / t_with['median'],
        # The same two shares from CPU time (all threads of this process).
        'cpu_share': (c_with['median'] - c_without) / c_with['median'],
        'cpu_alone_share': c_aug['median'] / c_with['median'],
    }
  return out


def measure(config, repeats: int = 7, steps: int = 10) -> dict:
  """The cost of `config.augment` in the train step of `config` (for tools/bench.py).

  Returns the pipeline (`augment`, 'auto' resolved as the run resolves it), seconds
  per step with (`t_with`) and without (`t_without`) the pipeline, the pipeline alone
  (`t_augment`), `share` = (t_with - t_without) / t_with and `alone_share` = t_augment /
  t_with, the same two from CPU time (`cpu_share`, `cpu_alone_share`: the steadier ones
  on a shared machine), and the full record under `detail`.
  """
  spec = config.augment
  full = measure_specs(config, [spec], repeats=repeats, steps=steps)
  r = full['specs'][spec]
  return {'augment': r['pipeline'], 't_with': r['with']['median'],
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
  from smallfx.errors import UserError  # pylint: disable=g-import-not-at-top

  def run():
    c = harness.config(model=args.model, width=args.width, dataset=args.dataset,
                       batch_size=args.batch, num_seeds=args.seeds,
                       resample_per_seed=args.seeds > 1,
                       samples_per_class=args.samples_per_class)
    c.lock()
    result = measure_specs(c, specs, args.repeats, args.steps,
                           log=lambda s: print(s, file=sys.stderr, flush=True))
    result['command'] = ' '.join(['python', 'tools/augment_cost.py', *(argv or sys.argv[1:])])
    print(format_table(result))
    if args.json:
      harness.write_json(args.json, result)

  try:
    run()
  except UserError as e:
    cli.fail(str(e))


if __name__ == '__main__':
  malloc.relaunch()  # measure what the command line runs: see smallfx/malloc.py
  main()
