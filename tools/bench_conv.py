"""Convolutions on CPU: smallfx's formulation (`smallfx.models.conv`) against lax's.

    python tools/bench_conv.py --models resnet20:128,cnn:32,wrn16_8:32

Times the real train step (`smallfx.train.make_train_step`, one seed) of each
model with `smallfx.models.conv` as it is and with its convolutions handed to
`lax.conv_general_dilated` unchanged, both compiled in this process and timed in
interleaved rounds. Prints milliseconds per step (median [min-max]) and the ratio.
"""
import argparse

import jax
import numpy as np

import bench_seed_layout
from smallfx import malloc
from smallfx.models import conv


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--models', default='resnet20:128,cnn:32,wrn16_8:32,resnet18:32,'
                 'efficientnet_lite0:32', help='MODEL:BATCH,... (image sizes: bench_seed_layout.image_shape)')
  p.add_argument('--steps', type=int, default=0, help='steps per round (0: about 1 s)')
  p.add_argument('--rounds', type=int, default=5)
  p.add_argument('--augment', default=bench_seed_layout.AUGMENT,
                 help="the steps' augmentation")
  args = p.parse_args()
  specs = bench_seed_layout.model_specs(p, args.models)
  print(f'{jax.devices()[0].device_kind}, {args.rounds} rounds, augment {args.augment!r}; '
        'ms per step')
  ours = conv.cpu_conv
  for model, batch in specs:
    runs = {}
    for name, fn in (('lax', conv.lax_conv), ('smallfx', ours)):
      conv.cpu_conv = fn  # read when the step is traced, i.e. inside make()
      runs[name] = bench_seed_layout.make(model, 1, batch, True, True, augment=args.augment)
    conv.cpu_conv = ours
    first = bench_seed_layout.time_steps(runs['lax'], 1)
    steps = args.steps or max(1, int(1.0 / first))
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
      for name, run in runs.items():
        times[name].append(bench_seed_layout.time_steps(run, steps) * 1e3)
    med = {name: np.median(t) for name, t in times.items()}
    print(f'{model} b{batch}: ' + ', '.join(
        f'{name} {med[name]:.1f} [{min(t):.1f}-{max(t):.1f}]' for name, t in times.items())
          + f'; lax / smallfx x{med["lax"] / med["smallfx"]:.2f}', flush=True)


if __name__ == '__main__':
  malloc.relaunch()  # measure what the command line runs: see smallfx/malloc.py
  main()
