"""Images per second of the pretraining step, per method and model, as `smallfx.main` runs it.

    python tools/bench_pretrain.py --models=cnn,resnet20 --methods=dae,stacked_ae,simclr \
        [--dataset=fashion_mnist] [--seeds=1] [--steps=20] [--rounds=3] [--out=FILE.json]

Each (model, method) is `pretrain.set_up` of a config with those fields: the pool,
objective, members' layout and compiled step of a real run. Each phase's step is
compiled and warmed, then `--rounds` timings of `--steps` steps each; the figure is the
median over rounds of (batch x seeds x steps / seconds). stacked_ae is timed on its
greedy phases and the whole stack alike (the mean of the phases' medians).
"""

import argparse
import time

import harness  # tools/ is on the path of a script in it; it puts smallfx there too
import jax
import numpy as np

from smallfx import config as config_lib
from smallfx import experiment
from smallfx import malloc
from smallfx import pretrain


def measure(model: str, method: str, args) -> dict:
  config = config_lib.default()
  config.update_from_flattened_dict({
      'dataset': args.dataset, 'model': model, 'pretrain': method, 'num_seeds': args.seeds,
      'samples_per_class': 10, 'pretraining.batch_size': args.batch_size})
  exp = experiment.resolve(config)
  images, _ = pretrain.pool(exp)
  session = pretrain.set_up(exp, images)
  init, _ = session.initializer()
  parts = session.layout.split(init())
  data, unused = session.data()
  per_phase = []
  for phase in session.objective.phases():
    step = session.step(phase)

    def run(n):
      for _ in range(n):
        for r in range(len(parts)):
          parts[r], metrics = step(parts[r], data, unused)
      jax.block_until_ready(metrics)

    run(2)  # compile and warm
    rates = []
    for _ in range(args.rounds):
      start = time.perf_counter()
      run(args.steps)
      rates.append(args.batch_size * args.seeds * args.steps / (time.perf_counter() - start))
    per_phase.append({'phase': phase.name, 'images_per_sec': harness.stats(rates)})
  return {'model': model, 'method': method, 'seeds': args.seeds, 'batch_size': args.batch_size,
          'images_per_sec': float(np.mean([p['images_per_sec']['median'] for p in per_phase])),
          'phases': per_phase}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--models', default='cnn,resnet20')
  parser.add_argument('--methods', default='dae,stacked_ae,simclr')
  parser.add_argument('--dataset', default='fashion_mnist')
  parser.add_argument('--seeds', type=int, default=1)
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  rows = []
  for model in args.models.split(','):
    for method in args.methods.split(','):
      rows.append(measure(model, method, args))
      print(f"{model:10s} {method:11s} {rows[-1]['images_per_sec']:8.0f} img/s", flush=True)
  if args.out:
    harness.write_json(args.out, {'machine': harness.machine(), 'args': vars(args),
                                  'rows': rows})


if __name__ == '__main__':
  malloc.relaunch()  # measure what the command line runs: see smallfx/malloc.py
  main()
