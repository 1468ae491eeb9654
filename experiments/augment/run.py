"""Issue 4, item 6: does augmentation help on Fashion-MNIST with 10 and 50 images per class?

    python experiments/augment/run.py             # train what is missing, then report
    python experiments/augment/run.py --report    # only collect results, table and plot

Every cell is one run of the real command line (3 seeds as one vmapped program,
each seed on its own stratified sub-sample):

    python -m smallfx.main --config=configs/cosine.py --config.dataset=fashion_mnist
        --config.samples_per_class=N --config.num_seeds=3 --config.resample_per_seed=True
        --config.augment=SPEC --config.model=MODEL --config.num_steps=STEPS
        --config.baseline=none --config.progress=False
        --workdir=experiments/augment/runs/MODEL-STEPS/spcN-NAME

Re-running skips finished cells (the command reports a finished run's results
again) and resumes interrupted ones from their last checkpoint. The report goes to
results.json, results.csv and accuracy.png next to this file.
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

# Display name -> spec. Slugs name the run directories.
PIPELINES = {
    'none': 'none',
    'crop2-flip': 'crop(pad=2)|flip',
    'crop4-flip': 'crop(pad=4)|flip',
    'crop2-flip-trivial': 'crop(pad=2)|flip|trivial',
}
SAMPLES_PER_CLASS = (10, 50)
SEEDS = 3


def command(spc, spec, workdir, model, steps):
  return [sys.executable, '-m', 'smallfx.main', '--config=configs/cosine.py',
          '--config.dataset=fashion_mnist', f'--config.samples_per_class={spc}',
          f'--config.num_seeds={SEEDS}', '--config.resample_per_seed=True',
          f'--config.augment={spec}', f'--config.model={model}',
          f'--config.num_steps={steps}', '--config.baseline=none', '--config.progress=False',
          f'--workdir={workdir}']


def run_dir(args, spc, name):
  return os.path.join(HERE, 'runs', f'{args.model}-{args.steps}', f'spc{spc}-{name}')


def train(args):
  # The pad=4 variant last: if time runs short, the three-way comparison is complete.
  order = sorted(args.pipelines, key=lambda n: n == 'crop4-flip')
  for name in order:
    for spc in args.samples_per_class:
      workdir = run_dir(args, spc, name)
      if os.path.exists(os.path.join(workdir, 'results.json')):
        print(f'done: {os.path.relpath(workdir, ROOT)}', flush=True)
        continue
      cmd = command(spc, PIPELINES[name], os.path.relpath(workdir, ROOT), args.model,
                    args.steps)
      print('$ python ' + ' '.join(f"'{c}'" if '|' in c or '(' in c else c for c in cmd[1:]),
            flush=True)
      t = time.time()
      subprocess.run(cmd, cwd=ROOT, check=True)
      print(f'  {time.time() - t:.0f} s', flush=True)


def collect(args):
  rows = []
  for spc in args.samples_per_class:
    for name in args.pipelines:
      path = os.path.join(run_dir(args, spc, name), 'results.json')
      if not os.path.exists(path):
        continue
      with open(path) as f:
        r = json.load(f)
      per_seed = r['test_accuracy_per_seed']
      rows.append({
          'samples_per_class': spc, 'pipeline': name, 'augment': PIPELINES[name],
          'model': args.model, 'steps': r['steps'], 'seeds': len(per_seed),
          'test_accuracy_mean': float(np.mean(per_seed)),
          # Sample standard deviation over the seeds (ddof=1); results.json's
          # test_accuracy_std is the population one.
          'test_accuracy_std': float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0,
          'test_accuracy_per_seed': per_seed,
          'test_ensemble_accuracy': r['test_ensemble_accuracy'],
          'val_accuracy': r['val_accuracy'],
          'wall_seconds': r['wall_seconds'], 'images_per_sec': r['images_per_sec'],
          'platform': r['platform'],
      })
  # Seed k of every pipeline trains on the same sub-sample from the same initial
  # weights (both depend only on the seed index), so the per-seed difference to
  # 'none' is a paired comparison: much less noisy than the two means apart.
  for r in rows:
    base = next((b for b in rows if b['samples_per_class'] == r['samples_per_class']
                 and b['pipeline'] == 'none'), None)
    if base is not None and len(base['test_accuracy_per_seed']) == len(
        r['test_accuracy_per_seed']):
      diff = np.subtract(r['test_accuracy_per_seed'], base['test_accuracy_per_seed'])
      r['gain_vs_none_mean'] = float(diff.mean())
      r['gain_vs_none_std'] = float(diff.std(ddof=1)) if len(diff) > 1 else 0.0
      r['gain_vs_none_per_seed'] = [float(d) for d in diff]
  return rows


def _cell(rows, spc, name):
  return next((r for r in rows if r['samples_per_class'] == spc and r['pipeline'] == name),
              None)


def write(args, rows):
  meta = {'model': args.model, 'steps': args.steps, 'seeds': SEEDS,
          'dataset': 'fashion_mnist', 'config': 'configs/cosine.py',
          'pipelines': {n: PIPELINES[n] for n in args.pipelines}}
  with open(os.path.join(HERE, 'results.json'), 'w') as f:
    json.dump({'meta': meta, 'rows': rows}, f, indent=1)
  lists = ('test_accuracy_per_seed', 'gain_vs_none_per_seed')
  keys = list(dict.fromkeys(k for r in rows for k in r if k not in lists)) + list(lists)
  with open(os.path.join(HERE, 'results.csv'), 'w', newline='') as f:
    w = csv.DictWriter(f, keys)
    w.writeheader()
    for r in rows:
      w.writerow({**r, **{k: ' '.join(f'{a:.4f}' for a in r[k]) for k in lists if k in r}})

  print(f"\n| samples/class | {' | '.join(args.pipelines)} |")
  print('|---' * (len(args.pipelines) + 1) + '|')
  for spc in args.samples_per_class:
    cells = []
    for name in args.pipelines:
      r = next((r for r in rows if r['samples_per_class'] == spc and r['pipeline'] == name),
               None)
      cells.append(f"{r['test_accuracy_mean']:.3f} ± {r['test_accuracy_std']:.3f}"
                   if r else '—')
    print(f"| {spc} | {' | '.join(cells)} |")
  print('\npaired gain over none (per-seed differences, mean ± std):')
  for spc in args.samples_per_class:
    cells = []
    for name in args.pipelines:
      r = _cell(rows, spc, name)
      cells.append(f"{r['gain_vs_none_mean']:+.3f} ± {r['gain_vs_none_std']:.3f}"
                   if r and 'gain_vs_none_mean' in r else '—')
    print(f"| {spc} | {' | '.join(cells)} |")

  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4))
  n = len(args.pipelines)
  width = 0.8 / n
  for j, name in enumerate(args.pipelines):
    xs, ys, es, pts = [], [], [], []
    for i, spc in enumerate(args.samples_per_class):
      r = next((r for r in rows if r['samples_per_class'] == spc and r['pipeline'] == name),
               None)
      if r:
        x = i + (j - (n - 1) / 2) * width
        xs.append(x)
        ys.append(r['test_accuracy_mean'])
        es.append(r['test_accuracy_std'])
        pts += [(x, a) for a in r['test_accuracy_per_seed']]
    if not xs:
      continue
    ax.bar(xs, ys, width, yerr=es, capsize=3, color=f'C{list(PIPELINES).index(name)}',
           label=PIPELINES[name])
    ax.plot(*zip(*pts), '.', color='k', ms=3, alpha=0.6)
  ax.set_xticks(range(len(args.samples_per_class)))
  ax.set_xticklabels([f'{s} per class' for s in args.samples_per_class])
  lo = min(r['test_accuracy_mean'] - r['test_accuracy_std'] for r in rows)
  hi = max(max(r['test_accuracy_per_seed']) for r in rows)
  ax.set_ylim(max(0, lo - 0.05), min(1, hi + 0.03))
  ax.set_ylabel('test accuracy (mean ± std; dots: seeds)')
  ax.set_title(f'Fashion-MNIST, {args.model}, cosine loss, {args.steps} steps')
  ax.legend(fontsize=8, loc='upper left')
  ax.grid(axis='y', alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(HERE, 'accuracy.png'), dpi=120)


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--report', action='store_true', help='only collect results and plot')
  p.add_argument('--model', default='cnn')
  p.add_argument('--steps', type=int, default=1000)
  p.add_argument('--samples-per-class', default=','.join(map(str, SAMPLES_PER_CLASS)))
  p.add_argument('--pipelines', default=','.join(PIPELINES))
  args = p.parse_args()
  args.samples_per_class = [int(s) for s in args.samples_per_class.split(',')]
  args.pipelines = args.pipelines.split(',')
  for name in args.pipelines:
    if name not in PIPELINES:
      p.error(f'unknown pipeline {name!r}; valid: {", ".join(PIPELINES)}')
  if not args.report:
    train(args)
  rows = collect(args)
  if rows:
    write(args, rows)


if __name__ == '__main__':
  main()
