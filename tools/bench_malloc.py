"""The train step under glibc's malloc against tcmalloc (smallfx/malloc.py).

    python tools/bench_malloc.py --models resnet20:128,cnn:32,efficientnet_lite0:32 --rounds 2

An allocator is fixed when a process starts, so each (round, allocator) is a
fresh process timing every model's real train step (`bench_seed_layout.make`,
one seed) for about `--seconds` per model; the allocators alternate within each
round. Prints ms per step and minor page faults per step, median [min-max]
over rounds, and the ratio glibc / tcmalloc.
"""
import argparse
import json
import os
import resource
import subprocess
import sys

import numpy as np

import bench_seed_layout
from smallfx import malloc

ALLOCATORS = ('system', 'tcmalloc')


def child(specs, seconds):
  out = {}
  for model, batch in specs:
    run = bench_seed_layout.make(model, 1, batch, True, True)
    steps = max(2, int(seconds / bench_seed_layout.time_steps(run, 1)))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ms = bench_seed_layout.time_steps(run, steps) * 1e3
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / steps
    out[f'{model}:{batch}'] = {'ms': ms, 'faults': faults}
  print(json.dumps({'malloc': 'tcmalloc' if malloc.active() else 'system', 'steps': out}))


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--models', default='resnet20:128,cnn:32,resnet18:32,efficientnet_lite0:32,'
                 'wrn16_8:32,mlp:32', help='MODEL:BATCH,...')
  p.add_argument('--rounds', type=int, default=2)
  p.add_argument('--seconds', type=float, default=3.0, help='timed seconds per model and process')
  p.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  args = p.parse_args()
  specs = bench_seed_layout.model_specs(p, args.models)
  if args.child:
    return child(specs, args.seconds)
  if not malloc.library():
    sys.exit(f'no tcmalloc on this machine: {malloc.INSTALL}')
  runs = {a: [] for a in ALLOCATORS}
  for r in range(args.rounds):
    for allocator in ALLOCATORS:
      env = {k: v for k, v in os.environ.items() if k not in ('LD_PRELOAD', malloc.ENV)}
      if allocator == 'system':
        env[malloc.ENV] = 'system'
      out = subprocess.run([sys.executable, os.path.abspath(__file__), '--child',
                            f'--models={args.models}', f'--seconds={args.seconds}'],
                           env=env, capture_output=True, text=True, check=False)
      if out.returncode:
        sys.exit(out.stderr[-2000:])
      result = json.loads(out.stdout.strip().splitlines()[-1])
      if result['malloc'] != allocator:
        sys.exit(f'a child meant for {allocator} ran on {result["malloc"]}')
      runs[allocator].append(result['steps'])
      print(f'round {r + 1} {allocator}: ' + ', '.join(
          f'{k} {v["ms"]:.1f} ms' for k, v in result['steps'].items()), flush=True)
  print('ms per step (page faults per step), median [min-max] over rounds:')
  for model, batch in specs:
    key = f'{model}:{batch}'
    line = []
    for allocator in ALLOCATORS:
      ms = [r[key]['ms'] for r in runs[allocator]]
      faults = np.median([r[key]['faults'] for r in runs[allocator]])
      line.append(f'{allocator} {np.median(ms):.1f} [{min(ms):.1f}-{max(ms):.1f}] ({faults:.0f})')
    ratio = (np.median([r[key]['ms'] for r in runs['system']])
             / np.median([r[key]['ms'] for r in runs['tcmalloc']]))
    print(f'{key}: ' + ', '.join(line) + f'; system / tcmalloc x{ratio:.2f}', flush=True)


if __name__ == '__main__':
  malloc.relaunch()  # children: unless SMALLFX_MALLOC=system
  main()
