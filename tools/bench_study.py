"""A study's cell against the same grid run as separate `smallfx.main` runs.

    python tools/bench_study.py --config=configs/study/fashion_mnist.py \
        --method=cosine+aug --size=50 [--json FILE] [-- --config.KEY=VALUE ...]

The study side is `python -m smallfx.study` on that one cell (its tuning grid x
`tune_seeds` as members of one program, then the chosen setting on `seeds` fresh seeds
as another). The separate side trains every one of those members as its own `python -m
smallfx.main` process with the cell's exact config (written to JSON and read back by
tools/json_config.py), one member each: the grid's settings, then the chosen setting's
seeds. Both sides are fresh processes with a compilation cache of their own (the
separate runs share theirs, as N launches of a script would), so the totals hold what a
user waits for: start-up, data, compilation, training, evaluation and checkpoints.
Prints each run, then the ratio (study / separate), then the record as one JSON line.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import harness  # tools/ is on the path of a script in it

ROOT = harness.ROOT


def study_of(config_file, overrides, workdir):
  """The resolved study of `python -m smallfx.study --config=FILE OVERRIDES`."""
  from absl import flags as absl_flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from smallfx import cells  # pylint: disable=g-import-not-at-top
  argv = ['smallfx.study', f'--config={config_file}', *overrides]
  values = absl_flags.FlagValues()
  holder = config_flags.DEFINE_config_file('config', None, flag_values=values, sys_argv=argv)
  values(argv)
  return cells.resolve(holder.value, workdir)


def timed(args, cache):
  start = time.perf_counter()
  out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                       check=False, env=dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache))
  if out.returncode:
    sys.exit(f'failed: {" ".join(args)}\n{out.stderr[-2000:]}')
  return time.perf_counter() - start


def separate_configs(study, cell, chosen):
  """One single-member config per member of the cell's two stages, with its seed."""
  from smallfx import cells  # pylint: disable=g-import-not-at-top
  from smallfx import experiment  # pylint: disable=g-import-not-at-top
  out = []
  for stage in cells.stages(study, cell.method):
    config = cells.cell_config(study, cell, stage, chosen if stage == 'final' else {})
    grid = experiment.grid(config)
    for m in range(grid.num_members):
      member = config.copy_and_resolve_references()
      for name, value in grid.settings[grid.setting_of(m)].items():
        member.sweep[name] = ''
        member[name] = value
      member.seed = config.seed + grid.seed_of(m)
      member.num_seeds = 1
      out.append((f'{stage} member {m}', member))
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--config', required=True, help='a study config file')
  p.add_argument('--method', required=True)
  p.add_argument('--size', type=int, required=True)
  p.add_argument('--json', default='', help='also write the record to this file')
  p.add_argument('overrides', nargs='*', help='--config.KEY=VALUE for the study (after --)')
  args = p.parse_args()
  json_path = os.path.abspath(args.json) if args.json else ''
  os.chdir(ROOT)
  from smallfx import cells  # pylint: disable=g-import-not-at-top
  from smallfx import methods  # pylint: disable=g-import-not-at-top
  overrides = [*args.overrides, f'--config.methods={args.method}', f'--config.sizes={args.size}']
  with tempfile.TemporaryDirectory() as tmp:
    study_dir = os.path.join(tmp, 'study')
    together = timed(['-m', 'smallfx.study', f'--config={args.config}', *overrides,
                      f'--workdir={study_dir}'], os.path.join(tmp, 'cache_study'))
    print(f'study of one cell: {together:.1f} s', flush=True)
    study = study_of(args.config, overrides, study_dir)
    cell = cells.Cell(methods.METHODS[args.method], args.size)
    record = cells.read(study, cell)
    separate = []
    for i, (what, config) in enumerate(separate_configs(study, cell, record['chosen'])):
      path = os.path.join(tmp, f'run{i}.json')
      with open(path, 'w') as f:
        f.write(config.to_json())
      seconds = timed(['-m', 'smallfx.main', f'--config=tools/json_config.py:{path}',
                       f'--workdir={os.path.join(tmp, f"run{i}")}'],
                      os.path.join(tmp, 'cache_separate'))
      separate.append(seconds)
      print(f'separate run {i + 1} ({what}): {seconds:.1f} s', flush=True)
  total = sum(separate)
  print(f'{args.method} n={args.size}: the study {together:.1f} s, {len(separate)} separate '
        f'runs {total:.1f} s; ratio {together / total:.3f}', flush=True)
  out = {'config': args.config, 'overrides': args.overrides, 'method': args.method,
         'size': args.size, 'study_s': together, 'separate_s': separate,
         'ratio': together / total, 'chosen': record['chosen'], 'steps': record['steps'],
         'test_accuracy': record['test_accuracy'],
         'machine': {'cpu': harness.cpu_model(), 'cores': harness.cores()}}
  if json_path:
    harness.write_json(json_path, out)
  print(json.dumps(out))


if __name__ == '__main__':
  main()
