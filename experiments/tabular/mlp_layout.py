"""MLP members on CPU: unrolled in rounds (the default layout) against vmapped in one round.

    python experiments/tabular/mlp_layout.py MEMBERS DEPTH

configs/tabular.py on sklearn:digits with MEMBERS seeds of an MLP of DEPTH layers, set
up by `train.set_up`; the same step compiled for the run's own layout and for that
layout with the members vmapped (`Run.train_step(layout=...)`). Prints compile + first
step and the median of 5 x 20 steps for each. Figures: experiments/tabular/README.md.
"""

import dataclasses
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))
from smallfx import cli  # noqa: E402
from smallfx import config as config_lib  # noqa: E402
from smallfx import members  # noqa: E402
from smallfx import train  # noqa: E402


def main():
  num_members, depth = int(sys.argv[1]), int(sys.argv[2])
  cli.use_cpu_devices(lambda: members.cpu_devices(num_members))
  root = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..')
  config = config_lib.sibling(os.path.join(root, 'configs', 'tabular.py'), 'tabular').get_config()
  config.update_from_flattened_dict({'dataset': 'sklearn:digits', 'depth': depth,
                                     'num_seeds': num_members, 'num_steps': 100,
                                     'progress': False})
  run = train.set_up(config)
  init, _ = run.initializer()
  data = run.training_data()
  for unroll in (True, False):
    layout = dataclasses.replace(run.layout, unroll=unroll)
    step = run.train_step(layout=layout)
    parts = layout.split(init())
    start = time.perf_counter()
    for r in range(layout.rounds):
      parts[r], metrics = step(parts[r], *data)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - start
    times = []
    for _ in range(5):
      start = time.perf_counter()
      for _ in range(20):
        for r in range(layout.rounds):
          parts[r], metrics = step(parts[r], *data)
      jax.block_until_ready(metrics)
      times.append((time.perf_counter() - start) / 20)
    print(f'unroll={unroll} rounds={layout.rounds}: compile + first step {first:.1f} s, '
          f'step median {np.median(times) * 1e3:.1f} ms')


if __name__ == '__main__':
  main()
