"""Convolutions on CPU: the train step with CPU tuning on (smallfx's) against off (lax's).

    python tools/bench_conv.py --models resnet20:128,cnn:32,wrn16_8:32

Times each model's train step (one seed, synthetic data; `tools/harness.py`) built and
compiled twice in this process, interleaved in rounds: 'lax' with CPU tuning off
(`tuning.forced(False)`, `cpu_tuning=False`: `lax.conv_general_dilated` unchanged on
XLA's own kernels, and XLA's default CPU options) and 'smallfx' with it on (the
convolutions' CPU formulations and oneDNN calls of `smallfx.models.conv`, and
`tuning.CPU_OPTIONS`). `--no-onednn` keeps the formulations but leaves oneDNN out.
Prints milliseconds per step (median [min-max]) and the ratio.
"""
import argparse

import jax
import numpy as np

import harness  # tools/ is on the path of a script in it
from bench_seed_layout import AUGMENT
from smallfx import malloc
from smallfx import tuning


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--models', default='resnet20:128,cnn:32,wrn16_8:32,resnet18:32,'
                 'efficientnet_lite0:32', help='MODEL:BATCH,... (image sizes: harness.image_shape)')
  p.add_argument('--steps', type=int, default=0, help='steps per round (0: about 1 s)')
  p.add_argument('--rounds', type=int, default=5)
  p.add_argument('--augment', default=AUGMENT, help="the steps' augmentation")
  p.add_argument('--no-onednn', action='store_true', help="'smallfx' without oneDNN calls")
  args = p.parse_args()
  specs = harness.model_specs(p, args.models)
  print(f'{jax.devices()[0].device_kind}, {args.rounds} rounds, augment {args.augment!r}'
        f'{", no oneDNN" if args.no_onednn else ""}; ms per step')
  for model, batch in specs:
    runs = {}
    for name, on in (('lax', False), ('smallfx', True)):
      run = harness.set_up(harness.config(model=model, batch_size=batch, augment=args.augment,
                                          cpu_tuning=on))
      # After the set-up, which decides for the process; the step is traced and compiled
      # inside, and keeps what it was traced with.
      with tuning.forced(on, onednn=False if args.no_onednn else None):
        runs[name] = harness.Steps(run)
    first = runs['lax'].seconds_per_step(1)
    steps = args.steps or max(1, int(1.0 / first))
    timed = harness.interleave(runs, steps, args.rounds)
    ms = {name: [1e3 * t / steps for t in ts] for name, ts in timed['wall'].items()}
    med = {name: np.median(t) for name, t in ms.items()}
    print(f'{model} b{batch}: ' + ', '.join(
        f'{name} {med[name]:.1f} [{min(t):.1f}-{max(t):.1f}]' for name, t in ms.items())
          + f'; lax / smallfx x{med["lax"] / med["smallfx"]:.2f}', flush=True)


if __name__ == '__main__':
  malloc.relaunch()  # measure what the command line runs: see smallfx/malloc.py
  main()
