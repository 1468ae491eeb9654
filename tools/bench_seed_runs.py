"""Total time of K seeds: K separate training runs against one run with num_seeds=K.

    python tools/bench_seed_runs.py --seeds 8 -- --config=configs/cosine.py \
        --config.model=cnn --config.dataset=fashion_mnist

Each run is a fresh `python -m smallfx.main` process with the given flags, so the
totals include what a user waits for: start-up, data, the random-forest baseline,
compilation, training, evaluation and checkpoints. The separate runs use
`--config.seed=0..K-1`; the single run `--config.num_seeds=K`. Each side starts
from an empty compilation cache of its own, as on a first study: the separate runs
share theirs (the first compiles, the others load), like K launches of a script.
Workdirs and caches go to a temporary folder that is removed afterwards.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(flags, workdir, cache):
  t = time.perf_counter()
  out = subprocess.run([sys.executable, '-m', 'smallfx.main', *flags, f'--workdir={workdir}'],
                       cwd=ROOT, capture_output=True, text=True, check=False,
                       env=dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache))
  if out.returncode:
    sys.exit(f'run failed ({" ".join(flags)}):\n{out.stderr[-2000:]}')
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  return time.perf_counter() - t, results


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--seeds', type=int, default=8)
  p.add_argument('flags', nargs='*', help='flags for smallfx.main (after --)')
  args = p.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    separate = []
    for s in range(args.seeds):
      seconds, _ = run([*args.flags, f'--config.seed={s}'], os.path.join(tmp, f'seed{s}'),
                       os.path.join(tmp, 'cache_separate'))
      separate.append(seconds)
      print(f'run seed={s}: {seconds:.1f} s', flush=True)
    together, results = run([*args.flags, f'--config.num_seeds={args.seeds}'],
                            os.path.join(tmp, 'together'), os.path.join(tmp, 'cache_together'))
  total = sum(separate)
  print(f'{args.seeds} separate runs: {total:.1f} s; one run of {args.seeds} seeds: '
        f'{together:.1f} s; ratio {together / total:.2f}')
  print(json.dumps({'seeds': args.seeds, 'flags': args.flags, 'separate_s': separate,
                    'together_s': together, 'ratio': together / total,
                    'together_results': {k: v for k, v in results.items()
                                         if isinstance(v, (int, float, str))}}))


if __name__ == '__main__':
  main()
