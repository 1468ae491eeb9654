"""Images per second of fine-tuning pretrained weights: the whole network, and a linear probe.

    python tools/bench_finetune.py [--model=efficientnet_lite0] [--batch_size=32] \
        [--steps=10] [--rounds=5] [--ref=GIT_REF] [--json=FILE]

Each runner is `train.set_up` of a config with `pretrained=MODEL` on synthetic 96x96
images (`harness.config`): `full` trains the backbone at 0.1x the head's learning rate,
`linear` trains the head alone. `--ref` adds both as smallfx at that revision runs them,
in a child process of its own (`harness.Served`), in the same interleaved rounds
(`harness.interleave`). Figures: the median over rounds, and its min-max.
"""

import argparse
import contextlib
import json

import harness  # tools/ is on the path of a script in it; it puts smallfx there too

from smallfx import malloc


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='efficientnet_lite0')
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--ref', default='')
  parser.add_argument('--json', default='')
  args = parser.parse_args()

  fields = lambda mode: {'model': args.model, 'pretrained': args.model, 'finetune': mode,
                         'backbone_lr_mult': 0.1, 'batch_size': args.batch_size}
  with harness.checkout(args.ref) if args.ref else contextlib.nullcontext() as source:
    runners = {mode: harness.Steps(harness.config(**fields(mode))) for mode in ('full', 'linear')}
    if source:
      runners.update({f'{mode}@{args.ref}': harness.Served(fields(mode), source=source,
                                                            count_flops=False)
                      for mode in ('full', 'linear')})
    for runner in runners.values():
      harness.warm(runner)
    timed = harness.interleave(runners, args.steps, args.rounds, rss=False)
  images = {name: [args.batch_size * args.steps / s for s in seconds]
            for name, seconds in timed['wall'].items()}
  record = {'machine': harness.machine(), 'args': vars(args),
            'images_per_sec': {name: harness.spread(v) for name, v in images.items()}}
  print(harness.describe(record['machine']))
  for name, (median, low, high) in record['images_per_sec'].items():
    print(f'{name:>24}: {median:7.1f} img/s [{low:.1f}-{high:.1f}]')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(record, f, indent=1)


if __name__ == '__main__':
  malloc.relaunch()  # measure what the command line runs: see smallfx/malloc.py
  main()
