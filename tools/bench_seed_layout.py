"""K seeds in one program on CPU: how the seed axis is laid out, against K single runs.

    python tools/bench_seed_layout.py --model cnn --seeds 4,8

Times the real train step (`smallfx.train.make_train_step`) on synthetic data in
each layout, interleaved in rounds so that all share the machine's load:

  single        one seed per program; its step time x K (K separate runs)
  vmapped       `jax.vmap` over seeds (grouped convolutions)
  unrolled      K copies of the step in one program, free to interleave
  in a row      unrolled, each seed's inputs waiting on the previous seed
                (smallfx's CPU default)
  looped        `jax.lax.map` over seeds: one copy of the step in a while loop
                (compiles like one seed; not used by smallfx, see below)
  dispatched    K single-seed states, the one-seed program called K times per
                step (what a training loop holding K states would run)

Prints milliseconds per K seed-steps (median and [min-max] over rounds), and
each layout's compile time. `--model cnn --seeds 4,8 --rounds 7` on a 2-core EPYC,
K=8: in a row 72.7 ms (7.1 s to build and compile), looped 103.5 ms (3.3 s),
dispatched 79.9 ms (71.6 against 74.2 in a row in another run); experiments/bench/
README.md, "Seeds".
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from smallfx import config as base
from smallfx import malloc
from smallfx import models
from smallfx import train


def model_specs(parser: argparse.ArgumentParser, text: str) -> list[tuple[str, int]]:
  """'MODEL:BATCH,...' as [(model, batch)]; a bad entry is a usage error naming it."""
  specs = [spec.split(':') for spec in text.split(',')]
  for spec in specs:
    if len(spec) != 2 or spec[0] not in models.BACKBONES or not spec[1].isdigit():
      parser.error(f'--models: {":".join(spec)!r} is not MODEL:BATCH with MODEL one of '
                   f'{", ".join(sorted(models.BACKBONES))}')
  return [(model, int(batch)) for model, batch in specs]


def image_shape(model):
  """Fashion-MNIST size for the small nets, CIFAR for CIFAR-style ones, 96 px otherwise."""
  if model in ('cnn', 'mlp'):
    return (28, 28, 1)
  if model.startswith(('resnet18', 'resnet34', 'resnet50', 'efficientnet')):
    return (96, 96, 3)
  return (32, 32, 3)


AUGMENT = 'crop(pad=2)|flip'  # the steps' augmentation unless a tool asks for another


def make(model, k, batch, unroll, in_a_row, n=2000, augment=AUGMENT, looped=False):
  if looped:  # the step is traced inside make(), so the stand-in covers only this one
    unrolled_over_seeds = train.over_seeds
    train.over_seeds = lambda fn, unroll, in_a_row=None: (
        lambda *args: jax.lax.map(lambda seed_args: fn(*seed_args), args))
    try:
      return make(model, k, batch, unroll, in_a_row, n, augment)
    finally:
      train.over_seeds = unrolled_over_seeds
  c = base.default()
  c.update(dict(model=model, num_seeds=k, batch_size=batch, num_steps=1000, augment=augment))
  shape = image_shape(model)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
  labels = rng.integers(0, 10, n).astype(np.int32)
  setup = train.build(c, 10, n)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(k))
  state = jax.vmap(lambda key: train.init_state(setup.model, setup.tx, shape, key))(keys)
  mesh = train.make_mesh(c)
  state = train.place_state(state.replace(rng=jax.random.key_data(state.rng)), mesh)
  step = train.make_train_step(setup, 10, 0.5, 0.25, mesh, unroll=unroll, in_a_row=in_a_row)
  x, y = jnp.asarray(images), jnp.asarray(labels)
  state, m = step(state, x, y)  # compile
  jax.block_until_ready(m)
  make_step = lambda mesh, steps=1: train.make_train_step(
      setup, 10, 0.5, 0.25, mesh, unroll=unroll, in_a_row=in_a_row, steps=steps)
  return [step, state, x, y, make_step]


def time_steps(run, steps):
  step, state, x, y = run[:4]
  t = time.perf_counter()
  for _ in range(steps):
    state, m = step(state, x, y)
  jax.block_until_ready(m)
  run[1] = state
  return (time.perf_counter() - t) / steps


def dispatched(single, k):
  """A run of K one-seed states that `time_steps` steps one after another."""
  step, state, x, y = single[:4]
  states = [jax.tree.map(jnp.copy, state) for _ in range(k)]

  def each(states, x, y):
    metrics = None
    for s, st in enumerate(states):  # dispatched asynchronously, run in this order
      states[s], metrics = step(st, x, y)
    return states, metrics

  return [each, states, x, y]


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--model', default='cnn', choices=sorted(models.BACKBONES))
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--seeds', default='4,8')
  p.add_argument('--steps', type=int, default=20)
  p.add_argument('--rounds', type=int, default=5)
  args = p.parse_args()
  print(f'{args.model} batch {args.batch}, {jax.devices()[0].device_kind}, '
        f'{args.rounds} rounds x {args.steps} steps; ms per K seed-steps')
  single = make(args.model, 1, args.batch, True, True)
  for k in [int(v) for v in args.seeds.split(',')]:
    builders = {'vmapped': lambda: make(args.model, k, args.batch, False, False),
                'unrolled': lambda: make(args.model, k, args.batch, True, False),
                'in a row': lambda: make(args.model, k, args.batch, True, True),
                'looped': lambda: make(args.model, k, args.batch, True, True, looped=True)}
    layouts, build_s = {'single x K': single}, {}
    for name, build in builders.items():
      t = time.perf_counter()
      layouts[name] = build()
      build_s[name] = time.perf_counter() - t
    layouts['dispatched'] = dispatched(single, k)
    time_steps(layouts['dispatched'], 1)
    times = {name: [] for name in layouts}
    for _ in range(args.rounds):
      for name, run in layouts.items():
        times[name].append(time_steps(run, args.steps) * 1e3 * (k if run is single else 1))
    ref = np.median(times['single x K'])
    print(f'K={k}: ' + ', '.join(
        f'{name} {np.median(t):.1f} [{min(t):.1f}-{max(t):.1f}] (x{np.median(t) / ref:.2f})'
        for name, t in times.items()), flush=True)
    print('  build and compile (s): ' + ', '.join(f'{n} {v:.1f}' for n, v in build_s.items()),
          flush=True)


if __name__ == '__main__':
  malloc.relaunch()  # measure what the command line runs: see smallfx/malloc.py
  main()
