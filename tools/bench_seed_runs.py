"""Total time of N members: N separate training runs against one run of N members.

    python tools/bench_seed_runs.py -- --config=configs/cosine.py --config.model=cnn \
        --config.dataset=fashion_mnist --config.sweep.learning_rate=0.01,0.03,0.1,0.3 \
        --config.num_seeds=2
    python tools/bench_seed_runs.py --seeds 8 -- --config=configs/cosine.py ...

The flags after `--` are `python -m smallfx.main`'s; their members (the sweep's settings
x `num_seeds`, `smallfx.experiment.grid`; `--seeds K` adds `--config.num_seeds=K`) train
as one run of those flags, and as one separate run per member: its setting's values as
plain fields (the sweep emptied), `--config.seed=SEED+s`, `--config.num_seeds=1`.

Each run is a fresh `python -m smallfx.main` process, so the totals include what a user
waits for: start-up, data, the baseline, compilation, training, evaluation and
checkpoints. Each side starts from an empty compilation cache of its own, as on a first
study: the separate runs share theirs (the first compiles, the others load), like N
launches of a script. Workdirs and caches go to a temporary folder that is removed
afterwards. Prints one line per run, then the members line (one run / N separate, the
ratio), then the record as one JSON line (`--json FILE` writes it too). Paths in the
flags are relative to the repository's root.
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


def members_of(flags):
  """(grid, seed) of the config that `python -m smallfx.main FLAGS` would run."""
  from absl import flags as absl_flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from smallfx import experiment  # pylint: disable=g-import-not-at-top
  argv = ['smallfx.main', *flags]
  values = absl_flags.FlagValues()
  holder = config_flags.DEFINE_config_file('config', None, flag_values=values, sys_argv=argv)
  absl_flags.DEFINE_string('workdir', None, '', flag_values=values)
  values(argv)
  config = holder.value
  return experiment.grid(config), int(config.seed)


def separate_flags(flags, grid, seed, member):
  """The flags of member `member` trained alone: its setting plain, its own seed."""
  setting = grid.settings[grid.setting_of(member)]
  return [*flags, *(f'--config.sweep.{name}=' for name in grid.values),
          *(f'--config.{name}={value!r}' for name, value in setting.items()),
          f'--config.seed={seed + grid.seed_of(member)}', '--config.num_seeds=1']


def run(flags, workdir, cache):
  t = time.perf_counter()
  out = subprocess.run([sys.executable, '-m', 'smallfx.main', *flags, f'--workdir={workdir}',
                        '--config.progress=False'], cwd=ROOT, capture_output=True, text=True,
                       check=False, env=dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache))
  if out.returncode:
    sys.exit(f'run failed ({" ".join(flags)}):\n{out.stderr[-2000:]}')
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  return time.perf_counter() - t, results


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--seeds', type=int, default=0, help='adds --config.num_seeds=SEEDS')
  p.add_argument('--json', default='', help='also write the record to this file')
  p.add_argument('flags', nargs='*', help='flags for smallfx.main (after --)')
  args = p.parse_args()
  json_path = os.path.abspath(args.json) if args.json else ''
  os.chdir(ROOT)
  flags = [*args.flags, *([f'--config.num_seeds={args.seeds}'] if args.seeds else [])]
  grid, seed = members_of(flags)
  n = grid.num_members
  what = f'{n} members ({len(grid.settings)} settings x {grid.num_seeds} seeds)'
  with tempfile.TemporaryDirectory() as tmp:
    separate = []
    for m in range(n):
      member = separate_flags(flags, grid, seed, m)
      seconds, _ = run(member, os.path.join(tmp, f'member{m}'),
                       os.path.join(tmp, 'cache_separate'))
      separate.append(seconds)
      print(f'run {m + 1}/{n} ({" ".join(member[len(flags):])}): {seconds:.1f} s', flush=True)
    together, results = run(flags, os.path.join(tmp, 'together'),
                            os.path.join(tmp, 'cache_together'))
  total = sum(separate)
  print(f'{what} in one program: {together:.1f} s, against {n} separate runs: {total:.1f} s; '
        f'ratio {together / total:.3f}', flush=True)
  record = {'members': n, 'settings': grid.settings, 'seeds': grid.num_seeds, 'flags': flags,
            'separate_s': separate, 'together_s': together, 'ratio': together / total,
            'machine': {'cpu': harness.cpu_model(), 'cores': harness.cores()},
            'together_results': {k: v for k, v in results.items()
                                 if isinstance(v, (int, float, str))}}
  if json_path:
    harness.write_json(json_path, record)
  print(json.dumps(record))


if __name__ == '__main__':
  main()
