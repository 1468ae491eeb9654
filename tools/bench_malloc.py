"""The train step under each allocator smallfx can start a run under (smallfx/malloc.py).

    python tools/bench_malloc.py --models resnet20:128,cnn:32 --rounds 5 \
        --allocators system,tcmalloc,mimalloc,glibc

An allocator is fixed when a process starts, so each (round, allocator) is a
fresh process timing every model's real train step (`bench_seed_layout.make`,
one seed) for about `--seconds` per model; the allocators alternate within each
round, in a rotated order from round to round. Prints ms per step and minor page
faults per step, median [min-max] over rounds, and the first allocator's median over
each other's (`system / tcmalloc x1.22`: tcmalloc's step is 1.22x as fast); then the
CPU time (user + system) a step cost the process, which other work on the machine
inflates less than the wall time (but it misses time spent waiting on a lock).

An allocator is a name of `malloc.environment` (system, tcmalloc, mimalloc, glibc:
set up as smallfx starts a run) or LABEL=NAME+VAR=VALUE+..., that name with further
environment variables, e.g. `mimalloc-1s=mimalloc+MIMALLOC_PURGE_DELAY=1000` or
`thp=system+GLIBC_TUNABLES=glibc.malloc.hugetlb=1`.
"""
import argparse
import json
import os
import resource
import subprocess
import sys

import jax
import numpy as np

import bench_seed_layout
from smallfx import malloc
from smallfx import tuning

# By default every one installed here.
ALLOCATORS = ','.join(['system'] + [n for n in malloc.ORDER if malloc.environment(n, {})])


def child(specs, seconds):
  tuning.prepare(jax.default_backend(), True)  # as a run's set-up: oneDNN built or loaded
  out = {}
  for model, batch in specs:
    run = bench_seed_layout.make(model, 1, batch, True, True)
    steps = max(2, int(seconds / bench_seed_layout.time_steps(run, 1)))
    before = resource.getrusage(resource.RUSAGE_SELF)
    ms = bench_seed_layout.time_steps(run, steps) * 1e3
    after = resource.getrusage(resource.RUSAGE_SELF)
    faults = (after.ru_minflt - before.ru_minflt) / steps
    cpu_ms = [(getattr(after, f) - getattr(before, f)) * 1e3 / steps
              for f in ('ru_utime', 'ru_stime')]
    out[f'{model}:{batch}'] = {'ms': ms, 'faults': faults, 'user_ms': cpu_ms[0],
                               'sys_ms': cpu_ms[1]}
  print(json.dumps({'malloc': malloc.name(), 'steps': out}))


def parse_allocator(parser, spec):
  """'NAME' or 'LABEL=NAME+VAR=VALUE+...' as (label, name, {VAR: VALUE})."""
  label, _, rest = spec.partition('=') if '+' in spec else (spec, '', spec)
  name, *assignments = rest.split('+')
  extra = dict(a.split('=', 1) for a in assignments if '=' in a)
  if name not in ('system', *malloc.ORDER) or len(extra) != len(assignments):
    parser.error(f'--allocators: {spec!r} is not NAME or LABEL=NAME+VAR=VALUE+... with NAME '
                 f'one of system, {", ".join(malloc.ORDER)}')
  return label, name, extra


def child_env(name, extra):
  """This environment less any allocator settings, then `name`'s, then `extra`."""
  env = {k: v for k, v in os.environ.items()
         if k not in ('LD_PRELOAD', 'GLIBC_TUNABLES', malloc.ENV)
         and not k.startswith('MIMALLOC_')}
  env = malloc.environment(name, env)
  if env is None:
    return None
  env.update(extra)
  env[malloc.ENV] = 'system'  # the child times what it was started under: no relaunch
  return env


def expected_library(name, extra):
  if name in ('tcmalloc', 'mimalloc'):
    return name
  return 'glibc' if 'glibc.malloc' in extra.get('GLIBC_TUNABLES', '') or name == 'glibc' else (
      'system')


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--models', default='resnet20:128,cnn:32,resnet18:32,efficientnet_lite0:32,'
                 'wrn16_8:32,mlp:32', help='MODEL:BATCH,...')
  p.add_argument('--allocators', default=ALLOCATORS,
                 help=f'NAME or LABEL=NAME+VAR=VALUE+..., comma-separated (default {ALLOCATORS})')
  p.add_argument('--rounds', type=int, default=2)
  p.add_argument('--seconds', type=float, default=3.0, help='timed seconds per model and process')
  p.add_argument('--json', help='also write every round\'s figures to this file')
  p.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  args = p.parse_args()
  specs = bench_seed_layout.model_specs(p, args.models)
  if args.child:
    return child(specs, args.seconds)
  allocators = [parse_allocator(p, a) for a in args.allocators.split(',')]
  envs = {}
  for label, name, extra in allocators:
    envs[label] = child_env(name, extra)
    if envs[label] is None:
      sys.exit(f'{label}: {name} is not installed here '
               f'(tcmalloc: {malloc.INSTALL}; mimalloc: {malloc.PIP_INSTALL})')
  labels = [a[0] for a in allocators]
  runs = {label: [] for label in labels}
  for r in range(args.rounds):
    for i in range(len(allocators)):
      label, name, extra = allocators[(i + r) % len(allocators)]
      out = subprocess.run([sys.executable, os.path.abspath(__file__), '--child',
                            f'--models={args.models}', f'--seconds={args.seconds}'],
                           env=envs[label], capture_output=True, text=True, check=False)
      if out.returncode:
        sys.exit(f'{label}: {out.stderr[-2000:]}')
      result = json.loads(out.stdout.strip().splitlines()[-1])
      if result['malloc'] != expected_library(name, extra):
        sys.exit(f'a child meant for {label} ran on {result["malloc"]}')
      runs[label].append(result['steps'])
      print(f'round {r + 1} {label}: ' + ', '.join(
          f'{k} {v["ms"]:.1f} ms (cpu {v["user_ms"]:.0f}+{v["sys_ms"]:.0f} ms, '
          f'{v["faults"]:.0f} faults)' for k, v in result['steps'].items()), flush=True)
  print(f'ms per step (page faults per step), median [min-max] over {args.rounds} rounds:')
  for model, batch in specs:
    key = f'{model}:{batch}'
    ref = np.median([r[key]['ms'] for r in runs[labels[0]]])
    line, ratios = [], []
    for label in labels:
      ms = [r[key]['ms'] for r in runs[label]]
      faults = np.median([r[key]['faults'] for r in runs[label]])
      line.append(f'{label} {np.median(ms):.1f} [{min(ms):.1f}-{max(ms):.1f}] ({faults:.0f})')
      if label != labels[0]:
        ratios.append(f'{labels[0]} / {label} x{ref / np.median(ms):.2f}')
    print(f'{key}: ' + ', '.join(line) + '; ' + ', '.join(ratios), flush=True)
    # CPU time (user + system) per step: what the step cost this process, which other
    # processes on the machine inflate less than they do its wall time.
    cpu = {label: [r[key]['user_ms'] + r[key]['sys_ms'] for r in runs[label]] for label in labels}
    print('  cpu ms per step: ' + ', '.join(
        f'{label} {np.median(v):.0f} [{min(v):.0f}-{max(v):.0f}] (sys '
        f'{np.median([r[key]["sys_ms"] for r in runs[label]]):.0f})'
        for label, v in cpu.items()), flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'allocators': args.allocators, 'models': args.models, 'rounds': runs}, f,
                indent=1)


if __name__ == '__main__':
  main()  # each child is started under its allocator: no relaunch here
