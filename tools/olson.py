"""Olson et al.'s question on scikit-learn's tables: do deep MLP ensembles beat the forest?

    python tools/olson.py [--out=experiments/tabular] [--tables=iris,wine,breast_cancer,digits] \
        [--splits=25] [--nets=4] [--depth=8] [--learning_rate=0.03] [--epochs=200] [--max_steps=1000]

Olson, Wyner & Berk (NeurIPS 2018) trained large networks on small UCI tables over 25
random 80/20 splits. Here, on every table scikit-learn ships: 25 random stratified 80/20
splits (scikit-learn's `StratifiedShuffleSplit`, seed 0). On each split, `--nets` MLPs of
`--depth` layers of 256 units (configs/tabular.py's recipe: cross-entropy, SGD with
momentum, weight decay 5e-4, cosine schedule) from their own seeds, their probabilities
averaged, against scikit-learn's random forest (500 trees) on the same rows. Neither is
tuned per table. The learning rate, 0.03, is what validation chose for 8-layer MLPs at 3
of 4 sizes of configs/study/tabular.py; at 0.1, 7 of 10 such nets diverged on wine. Features are encoded and standardised from each split's
training rows alone. All splits x nets of a table are the members of one program
(`train.fit`: each member trains on its own split's rows).

A table is a win, tie or loss for the ensemble by a paired t-test of the 25 per-split
accuracy differences (p < 0.05). Wall time: the members' program (set-up, compile and
training) against the 25 forests' fits, on the same machine.

Writes OUT/olson.json (every split's accuracies) and prints a Markdown table.
"""

import argparse
import datetime
import json
import math
import os
import sys
import time

import harness  # tools/ is on the path of a script in it; it puts smallfx there too
import jax
import numpy as np

from smallfx import cli
from smallfx import config as config_lib
from smallfx import evaluation
from smallfx import members
from smallfx import tables
from smallfx import train


def split_rows(rows, labels, encoder, splits: int):
  """Per split: (train features, train labels, test features, test labels)."""
  from sklearn.model_selection import StratifiedShuffleSplit  # pylint: disable=g-import-not-at-top
  out = []
  for tr, te in StratifiedShuffleSplit(splits, test_size=0.2, random_state=0).split(
      np.zeros(len(labels)), labels):
    encode = encoder.fit(rows[tr])
    x_tr, x_te = encode(rows[tr]), encode(rows[te])
    scale = tables.standardiser(x_tr)
    out.append((scale(x_tr), labels[tr], scale(x_te), labels[te]))
  return out


def forests(parts, seed: int = 0):
  """Each split's random-forest test accuracy, and the seconds the fits took."""
  from sklearn.ensemble import RandomForestClassifier  # pylint: disable=g-import-not-at-top
  start, accuracies = time.perf_counter(), []
  for x_tr, y_tr, x_te, y_te in parts:
    forest = RandomForestClassifier(n_estimators=500, random_state=seed, n_jobs=-1)
    accuracies.append(float(np.mean(forest.fit(x_tr, y_tr).predict(x_te) == y_te)))
  return accuracies, time.perf_counter() - start


def mlp_config(args, table: str, nets: int, steps: int):
  recipe = os.path.join(harness.ROOT, 'configs', 'tabular.py')
  config = config_lib.sibling(recipe, 'tabular').get_config()
  config.update_from_flattened_dict({
      'dataset': f'sklearn:{table}', 'depth': args.depth, 'val_per_class': 0,
      'num_seeds': args.splits * nets, 'resample_per_seed': True, 'num_steps': steps,
      'baseline': 'none', 'progress': args.progress, 'learning_rate': args.learning_rate,
      'norm': args.norm})
  return config


def mlp_ensembles(args, table: str, parts):
  """Per split: the mean single-net and the ensemble's test accuracy; the seconds."""
  n_train = len(parts[0][1])
  steps = min(args.max_steps, math.ceil(args.epochs * n_train / 32))
  start = time.perf_counter()
  run = train.set_up(mlp_config(args, table, args.nets, steps))
  # Member m = split m // nets: its split's rows.
  pick = lambda i: np.stack([parts[m // args.nets][i] for m in range(args.splits * args.nets)])
  state = train.fit(run, pick(0), pick(1))
  probs = evaluation.member_probabilities(run.setup.model, run.setup.loss,
                                          members.fetch(state), pick(2), run.mean, run.std)
  seconds = time.perf_counter() - start
  diverged = np.asarray(members.fetch(state.diverged))
  single, ensemble = [], []
  for s, (_, y_tr, _, y_te) in enumerate(parts):
    # A diverged net scores as a failed model would: the training rows' majority class.
    guess = lambda m: (probs[m].argmax(-1) if not diverged[m] else
                       np.full(len(y_te), np.bincount(y_tr).argmax()))
    group = range(s * args.nets, (s + 1) * args.nets)
    single.append(float(np.mean([np.mean(guess(m) == y_te) for m in group])))
    live = [m for m in group if not diverged[m]]
    ensemble.append(float(np.mean((probs[live].mean(0).argmax(-1) if live else guess(
        group[0])) == y_te)))
  return single, ensemble, seconds, steps, int(diverged.sum())


def verdict(ours, theirs, alpha: float = 0.05):
  from scipy import stats  # pylint: disable=g-import-not-at-top
  diff = np.asarray(ours) - np.asarray(theirs)
  p = 1.0 if np.all(diff == 0) else float(stats.ttest_rel(ours, theirs).pvalue)
  return ('win' if diff.mean() > 0 else 'loss') if p < alpha else 'tie', p


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default='experiments/tabular')
  parser.add_argument('--tables', default=','.join(tables.SKLEARN_TABLES))
  parser.add_argument('--splits', type=int, default=25)
  parser.add_argument('--nets', type=int, default=4)
  parser.add_argument('--depth', type=int, default=8)
  parser.add_argument('--learning_rate', type=float, default=0.03)
  parser.add_argument('--norm', default='none')
  parser.add_argument('--epochs', type=float, default=200)
  parser.add_argument('--max_steps', type=int, default=1000)
  parser.add_argument('--progress', action=argparse.BooleanOptionalAction, default=True)
  args = parser.parse_args()
  cli.use_cpu_devices(lambda: members.cpu_devices(args.splits * args.nets))
  rows_out, md = [], ['| table | rows x features | MLP ensemble | single MLP | forest | '
                      'ensemble - forest | p | verdict | MLP s | forest s |',
                      '|---|---|---|---|---|---|---|---|---|---|']
  for table in args.tables.split(','):
    rows, labels, _, encoder = tables.load_sklearn(table)
    parts = split_rows(rows, labels, encoder, args.splits)
    forest, forest_s = forests(parts)
    single, ensemble, mlp_s, steps, diverged = mlp_ensembles(args, table, parts)
    result, p = verdict(ensemble, forest)
    rows_out.append(dict(table=table, rows=len(labels), features=parts[0][0].shape[1],
                         steps=steps, diverged=diverged, ensemble=ensemble, single=single,
                         forest=forest, p=p, verdict=result, mlp_seconds=mlp_s,
                         forest_seconds=forest_s))
    ms = lambda v: f'{np.mean(v):.3f} ± {np.std(v, ddof=1):.3f}'
    md.append(f'| {table} | {len(labels)} x {parts[0][0].shape[1]} | {ms(ensemble)} | '
              f'{ms(single)} | {ms(forest)} | {np.mean(ensemble) - np.mean(forest):+.3f} | '
              f'{p:.2g} | {result} | {mlp_s:.0f} | {forest_s:.0f} |')
    print(md[-1], file=sys.stderr)
  counts = {v: sum(r['verdict'] == v for r in rows_out) for v in ('win', 'tie', 'loss')}
  md.append(f"\nMLP ensemble against the forest: {counts['win']} wins, {counts['tie']} ties, "
            f"{counts['loss']} losses (paired t-test over {args.splits} splits, p < 0.05).")
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'olson.json'), 'w') as f:
    json.dump({'command': ' '.join(sys.argv), 'date': datetime.date.today().isoformat(),
               'machine': harness.machine(), 'devices': [str(d) for d in jax.devices()],
               'args': vars(args), 'tables': rows_out, 'counts': counts}, f, indent=1)
  print('\n'.join(md))


if __name__ == '__main__':
  main()
