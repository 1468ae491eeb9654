"""Images per second of generative augmentation's two phases beside the plain train step.

    python tools/bench_gan.py [--dataset=fashion_mnist] [--model=cnn] [--seeds=1] \
        [--gan_batch_size=32] [--gan_width=0.25] [--steps=20] [--rounds=5] [--out=FILE.json]

Each runner is the library's own set-up of a config (`gan.set_up`, `train.set_up`):
- `gan`: one GAN iteration (a discriminator step, `g_steps` generator steps), counted in
  real images of the batch (`gan.batch_size`);
- `dada`, `cgan_augment`: the training step with the generator's images added (a
  randomly initialised generator: the cost does not depend on its weights), counted in
  all the images of the batch, real and generated;
- `plain`: the same step without a GAN (loss `xent`).
Rounds of `--steps` steps of every runner alternate (`harness.interleave`); the figure
is the median over rounds.
"""

import argparse
import time

import harness  # tools/ is on the path of a script in it; it puts smallfx there too
import jax

from smallfx import config as config_lib
from smallfx import data as data_lib
from smallfx import experiment
from smallfx import malloc
from smallfx import gan
from smallfx import train


class _Runner:

  def __init__(self, parts, data_parts, step, images_per_step):
    self.parts, self.data_parts, self.step = parts, data_parts, step
    self.images_per_step = images_per_step

  def run(self, n):
    for _ in range(n):
      for r in range(len(self.parts)):
        self.parts[r], metrics = self.step(self.parts[r], *self.data_parts[r])
    jax.block_until_ready(metrics)


def _config(args, **fields):
  config = config_lib.default()
  config.update_from_flattened_dict({
      'dataset': args.dataset, 'model': args.model, 'num_seeds': args.seeds,
      'samples_per_class': args.samples_per_class, 'gan.steps': 1,
      'gan.batch_size': args.gan_batch_size, 'gan.width': args.gan_width, **fields})
  return config


def gan_runner(args) -> _Runner:
  exp = experiment.resolve(_config(args, generative='dada', loss='dada'))
  session = gan.set_up(exp, data_lib.load(exp.data))
  init, _ = session.initializer()
  layout = session.layout
  return _Runner(layout.split(init()), layout.split(session.data()), session.step(),
                 exp.generative.batch_size * args.seeds)


def train_runner(args, **fields) -> _Runner:
  run = train.set_up(_config(args, **fields))
  init, _ = run.initializer()
  generated = run.exp.generative.generated_per_batch(run.exp.batch_size) if (
      run.exp.generative) else 0
  return _Runner(run.layout.split(init()), [run.training_data()] * run.layout.rounds,
                 run.train_step(), (run.exp.batch_size + generated) * run.exp.num_members)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--dataset', default='fashion_mnist')
  parser.add_argument('--model', default='cnn')
  parser.add_argument('--samples_per_class', type=int, default=50)
  parser.add_argument('--seeds', type=int, default=1)
  parser.add_argument('--gan_batch_size', type=int, default=32)
  parser.add_argument('--gan_width', type=float, default=0.25)
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  runners = {'gan': gan_runner(args),
             'dada': train_runner(args, generative='dada', loss='dada'),
             'cgan_augment': train_runner(args, generative='cgan_augment', loss='xent'),
             'plain': train_runner(args, loss='xent')}
  for runner in runners.values():
    harness.warm(runner)
  timings = harness.interleave(runners, args.steps, args.rounds, rss=False)
  rows = []
  for name, runner in runners.items():
    rates = [runner.images_per_step * args.steps / s for s in timings['wall'][name]]
    step_ms = [1000 * s / args.steps for s in timings['wall'][name]]
    rows.append({'runner': name, 'images_per_sec': harness.stats(rates),
                 'ms_per_step': harness.stats(step_ms), 'images_per_step': runner.images_per_step})
    print(f"{name:13s} {rows[-1]['images_per_sec']['median']:8.0f} img/s  "
          f"{rows[-1]['ms_per_step']['median']:7.1f} ms/step", flush=True)
  if args.out:
    harness.write_json(args.out, {'machine': harness.machine(), 'args': vars(args),
                                  'date': time.strftime('%Y-%m-%d'), 'rows': rows})


if __name__ == '__main__':
  malloc.relaunch()  # measure what the command line runs: see smallfx/malloc.py
  main()
