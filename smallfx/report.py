"""A study's outputs, rebuilt from its finished cells: CSVs, the learning curve, the report.

    results.csv        one row per (method, size, stage, seed, setting)
    summary.csv        per (method, size): mean, spread and 95% interval over seeds,
                       the ensemble's accuracy and the lift over the random forest
    learning_curve.png test accuracy against samples per class, and .svg
    report.md          per size the methods ranked, what each technique adds, the
                       tuning, and how much more data
"""

import csv
import datetime
import io
import math
import os

import numpy as np

from smallfx import cells as cells_lib
from smallfx import curves
from smallfx import data as data_lib

REFERENCE = 'random_forest'
# Below this p-value of the paired t-test a method is "below the best".
ALPHA = 0.05


def _verdict(p: float, significant: str) -> str:
  """The paired test's word on a comparison: `significant` where p < ALPHA."""
  if not np.isfinite(p):
    return 'untested (under 2 shared seeds, or a gap that does not vary)'
  return f'{significant} (p={p:.3f})' if p < ALPHA else f'no difference (p={p:.2f})'


def _acc(x) -> str:
  return '' if x is None or not np.isfinite(x) else f'{x:.4f}'


def summarise(study: cells_lib.Study, records: dict) -> list[dict]:
  """One row per (method, size) with a finished cell, in the study's order."""
  out = []
  for method in study.methods:
    for size in study.sizes:
      if method.kind == 'ensemble':
        row = _ensemble_row(study, records, size)
      else:
        rec = records.get((method.name, size))
        if rec is None:
          continue
        mean, std, half = curves.interval(rec['test_accuracy'])
        row = {'method': method.name, 'size': size, 'kind': method.kind,
               'seeds': len(rec['test_accuracy']), 'test_accuracy': mean, 'std': std,
               'ci95': half, 'ensemble_accuracy': rec['ensemble_accuracy'],
               'val_accuracy': curves.interval(rec['val_accuracy'])[0],
               'chosen': ' '.join(f'{k}={v:g}' for k, v in sorted(rec['chosen'].items())),
               'steps': rec['steps'], 'seconds': sum(rec['seconds'].values()),
               'per_seed': dict(zip(rec['seeds'], rec['test_accuracy'])), 'of': '',
               'hierarchy': {k: dict(zip(rec['seeds'], v))
                             for k, v in rec.get('hierarchy', {}).items()}}
      if row is None:
        continue
      ref = records.get((REFERENCE, size))
      row['lift'] = (row['test_accuracy'] - curves.interval(ref['test_accuracy'])[0]
                     if ref else math.nan)
      out.append(row)
  return out


def _ensemble_row(study, records, size) -> dict | None:
  """The from-scratch method best on validation at `size`: its seeds averaged."""
  candidates = [records[(m.name, size)] for m in study.methods
                if m.from_scratch and (m.name, size) in records]
  if not candidates:
    return None
  def val(record):
    mean = curves.interval(record['val_accuracy'])[0]
    return mean if np.isfinite(mean) else -math.inf

  best = max(candidates, key=val)
  return {'method': 'ensemble', 'size': size, 'kind': 'ensemble', 'seeds': len(best['seeds']),
          'test_accuracy': best['ensemble_accuracy'], 'std': math.nan, 'ci95': math.nan,
          'ensemble_accuracy': best['ensemble_accuracy'],
          'val_accuracy': curves.interval(best['val_accuracy'])[0],
          'chosen': ' '.join(f'{k}={v:g}' for k, v in sorted(best['chosen'].items())),
          'steps': best['steps'], 'seconds': 0.0, 'per_seed': {}, 'of': best['method'],
          'hierarchy': {}}


RESULT_COLUMNS = ('method', 'size', 'stage', 'seed', 'setting', 'chosen', 'diverged',
                  'val_accuracy', 'test_accuracy', 'steps', 'wall_seconds')
SUMMARY_COLUMNS = ('method', 'size', 'kind', 'seeds', 'test_accuracy', 'std', 'ci95_low',
                   'ci95_high', 'ensemble_accuracy', 'lift_over_random_forest', 'val_accuracy',
                   'chosen', 'ensemble_of', 'steps', 'wall_seconds', 'hierarchical_accuracy',
                   'mistake_severity')


def _csv(path: str, columns, rows) -> None:
  text = io.StringIO()
  writer = csv.DictWriter(text, columns, lineterminator='\n')
  writer.writeheader()
  for row in rows:
    writer.writerow({k: ('' if v is None or (isinstance(v, float) and math.isnan(v))
                         else round(v, 6) if isinstance(v, float) else v)
                     for k, v in row.items()})
  _replace(path, text.getvalue())


def _replace(path: str, text: str) -> None:
  """Writes atomically: shards that finish together never leave half a file."""
  tmp = f'{path}.{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def write_results(path, records) -> None:
  """A row per member of every run; test accuracy only where validation chose the setting."""
  rows = []
  for rec in records.values():
    swept = set(rec.get('grid', {}))
    for r in rec['rows']:
      setting = ' '.join(v for v in r['setting'].split() if v.split('=')[0] in swept)
      rows.append({'method': rec['method'], 'size': rec['size'], **r, 'setting': setting,
                   'test_accuracy': r['test_accuracy'] if r['chosen'] else None,
                   'steps': rec['steps'], 'wall_seconds': rec['seconds'].get(r['stage'])})
  _csv(path, RESULT_COLUMNS, rows)


def write_summary(path, summary) -> None:
  _csv(path, SUMMARY_COLUMNS, [{
      'method': r['method'], 'size': r['size'], 'kind': r['kind'], 'seeds': r['seeds'],
      'test_accuracy': r['test_accuracy'], 'std': r['std'],
      'ci95_low': r['test_accuracy'] - r['ci95'], 'ci95_high': r['test_accuracy'] + r['ci95'],
      'ensemble_accuracy': r['ensemble_accuracy'], 'lift_over_random_forest': r['lift'],
      'val_accuracy': r['val_accuracy'], 'chosen': r['chosen'], 'ensemble_of': r['of'],
      'steps': r['steps'], 'wall_seconds': r['seconds'],
      'hierarchical_accuracy': _mean(r['hierarchy'].get('hierarchical_accuracy')),
      'mistake_severity': _mean(r['hierarchy'].get('mistake_severity'))} for r in summary])


def _mean(per_seed: dict | None) -> float:
  return curves.interval(list((per_seed or {}).values()))[0]


def _examples(study) -> str:
  return 'rows' if data_lib.is_table(study.base.dataset) else 'images'


# More lines than this and their bands blur into one: a panel per family instead.
_LINES_PER_PANEL = 8


def _panels(study, summary) -> list[tuple[str, list, list]]:
  """(title, methods drawn with their band, methods drawn thin for reference) per panel.

  Few methods share one panel. Many get a panel per family, each beside the baselines
  and the methods its techniques are measured against.
  """
  present = [m for m in study.methods if any(r['method'] == m.name for r in summary)]
  baselines = [m for m in present if m.kind == 'baseline']
  others = [m for m in present if m.kind != 'baseline']
  families = list(dict.fromkeys(m.family for m in others))
  if len(present) <= _LINES_PER_PANEL or len(families) < 2:
    return [('', present, [])]
  panels = []
  for family in families:
    members = [m for m in others if m.family == family]
    against = {m.comparison(study.base.loss) for m in members}
    references = [m for m in others if m.name in against and m not in members]
    panels.append((family, members, baselines + references))
  return panels


def plot(path_stem: str, study, summary, title: str) -> None:
  """Test accuracy against samples per class: a line per method, its 95% interval shaded."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  panels = _panels(study, summary)
  cols = 2 if len(panels) in (2, 4) else min(3, len(panels))
  nrows = -(-len(panels) // cols)
  size = (7.5, 5) if len(panels) == 1 else (4.6 * cols, 3.8 * nrows)
  fig, axes = plt.subplots(nrows, cols, figsize=size, dpi=150, sharey=True, squeeze=False)
  tab20 = plt.get_cmap('tab20').colors
  # A method keeps its colour in every panel.
  colour = {m.name: tab20[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20]
            for i, m in enumerate(study.methods)}
  for ax, (family, members, references) in zip(axes.flat, panels):
    for method, main in [(m, False) for m in references] + [(m, True) for m in members]:
      rows = [r for r in summary if r['method'] == method.name]
      n = np.array([r['size'] for r in rows])
      y = np.array([r['test_accuracy'] for r in rows])
      half = np.array([r['ci95'] for r in rows])
      style = {'baseline': '--', 'ensemble': ':'}.get(method.kind, '-')
      ax.plot(n, y, style, marker='o' if method.kind == 'trained' else 's',
              ms=4 if main else 2.5, lw=1.5 if main else 0.8, alpha=1 if main else 0.7,
              color=colour[method.name], label=method.name)
      ok = np.isfinite(half)
      if main and ok.sum() > 1:
        ax.fill_between(n[ok], (y - half)[ok], (y + half)[ok], color=colour[method.name],
                        alpha=0.15, lw=0)
    ax.set_xscale('log')
    ax.set_xticks(list(study.sizes))
    ax.set_xticklabels([str(s) for s in study.sizes])
    ax.minorticks_off()
    ax.set_xlabel(f'training {_examples(study)} per class')
    ax.set_ylabel('test accuracy')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8 if len(panels) == 1 else 6.5, loc='lower right',
              ncol=2 if len(members) + len(references) > 6 else 1)
    if family:
      ax.set_title(f'{family} (thin: baselines and references)', fontsize=9)
  for ax in list(axes.flat)[len(panels):]:
    ax.set_visible(False)
  if len(panels) == 1:
    axes[0, 0].set_title(title, fontsize=10)
  else:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  for ext in ('png', 'svg'):
    tmp = f'{path_stem}.{os.getpid()}.{ext}'
    fig.savefig(tmp)
    os.replace(tmp, f'{path_stem}.{ext}')
  plt.close(fig)


def _ranking(summary, size) -> list[str]:
  rows = sorted([r for r in summary if r['size'] == size], key=lambda r: -r['test_accuracy'])
  if not rows:
    return []
  best = next((r for r in rows if r['per_seed']), rows[0])
  lines = ['| rank | method | test accuracy (mean ± sd, 95% interval) | lift over '
           f'{REFERENCE} | against {best["method"]} | chosen on validation | val accuracy |',
           '|---|---|---|---|---|---|---|']
  for rank, r in enumerate(rows, 1):
    if r['kind'] == 'ensemble':
      acc = f"{r['test_accuracy']:.4f} ({r['seeds']} seeds of {r['of']} averaged)"
      verdict = 'one ensemble, no spread'
    else:
      acc = f"{r['test_accuracy']:.4f} ± {r['std']:.4f}"
      if np.isfinite(r['ci95']):
        acc += f" [{r['test_accuracy'] - r['ci95']:.4f}, {r['test_accuracy'] + r['ci95']:.4f}]"
      if r is best:
        verdict = 'best'
      else:
        verdict = _verdict(curves.paired_p(best['per_seed'], r['per_seed']), 'below')
    lift = ('-' if r['method'] == REFERENCE or not np.isfinite(r['lift'])
            else f"{100 * r['lift']:+.1f} points")
    lines.append(f"| {rank} | {r['method']} | {acc} | {lift} | {verdict} | "
                 f"{r['chosen'] or '-'} | {_acc(r['val_accuracy'])} |")
  return lines


def _more_data(study, summary) -> list[str]:
  lines = []
  for method in study.methods:
    rows = [r for r in summary if r['method'] == method.name]
    if method.kind == 'ensemble' or not rows:
      continue
    sizes = [r['size'] for r in rows]
    f = curves.forecast(sizes, [r['test_accuracy'] for r in rows], [r['ci95'] for r in rows])
    if not f.trusted:
      lines.append(f'- **{method.name}**: no forecast; {f.reason}.')
      continue
    law, (n, pred, meas, tol) = f.law, f.check
    needs = []
    for acc, samples in f.needed:
      if not np.isfinite(samples):
        needs.append(f'{acc:.3f} and above are beyond its floor ({1 - law.c:.3f})')
        break
      elif samples > curves.MAX_EXTRAPOLATION * sizes[-1]:
        needs.append(f'{acc:.3f} lies beyond {curves.MAX_EXTRAPOLATION}x the largest size, '
                     'further than the fit can say')
      else:
        needs.append(f'{acc:.3f} at about {samples:,.0f} per class')
    best = max(r['test_accuracy'] for r in rows)
    lines.append(
        f'- **{method.name}**: err(n) = {law.a:.3g} n^-{law.b:.2f} + {law.c:.3f} (floor: '
        f'accuracy {1 - law.c:.3f}). Check: fitted without n={n}, it predicts {pred:.3f} '
        f'there; measured {meas:.3f} (within {tol:.3f}). Forecast from the best measured '
        f'{best:.3f}: ' + '; '.join(needs) + '.')
  return lines


def write_report(path, study, summary, records, meta: dict) -> None:
  """report.md: the setup, per size the ranking, the tuning, and how much more data."""
  base = study.base
  done = [r for r in records.values()]
  trained = [r for r in done if r['kind'] == 'trained']
  num_classes = meta.get('num_classes')
  val_labels = base.val_per_class * num_classes if num_classes else None
  stamp = [r.get('finished', '') for r in done if r.get('finished')]
  parts = {}
  for r in done:
    for stage, s in r['seconds'].items():
      key = f"{r['method']} ({stage})" if r['kind'] == 'trained' else r['method']
      parts[key] = parts.get(key, 0.0) + s
  out = [f'# Study `{meta.get("name", "")}`: {base.dataset}', '',
         f'    {meta.get("command", "")}', '',
         f'Machine: {meta.get("machine", "")}. Cells finished between '
         f'{min(stamp) if stamp else "-"} and {max(stamp) if stamp else "-"} (UTC); '
         f'{len(done)} of {len(cells_lib.cells(study))} cells present; '
         f'compute {sum(parts.values()) / 60:.1f} min in all. Report written '
         f'{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.', '',
         '![learning curve](learning_curve.png)', '']
  out += ['## Setup', '',
          f'- Data: `{base.dataset}`; training {_examples(study)} per class: '
          f'{", ".join(map(str, study.sizes))}. Validation: {base.val_per_class} per class'
          + (f' ({val_labels} labelled {_examples(study)}, on top of the training ones)'
             if val_labels else '') + ', carved from the training pool; the test split '
          'only reports.',
          f'- Base experiment: model `{base.model}`, loss `{base.loss}`, optimiser '
          f'`{base.optimizer}` ({base.schedule} schedule), batch {base.batch_size}; duration '
          + (f'{base.num_steps} steps' if base.num_steps else
             f'{base.num_epochs:g} epochs') + (f', at most {base.max_steps} steps'
                                               if base.max_steps else '') + '.',
          '- Tuning: each trained method gets ' + _grid_text(study) + ', trained as members '
          'of one program; validation accuracy (mean over the tuning seeds) chooses the '
          'setting per (method, size). ' + (
              f'The tuning trains {study.tune_seeds} seed(s) per setting; the chosen setting '
              f'is then trained again on {study.seeds} fresh seeds (their own initialisation '
              'and training sub-sample), which give every figure below, so the choice does '
              'not flatter them.' if study.tune_seeds else
              f'The {study.seeds} seeds of the tuning run give the figures of the chosen '
              'setting (no retraining: the choice flatters them a little).'),
          '- Test accuracy is reported only for the chosen setting. Seed k of every method '
          'trains on the same sub-sample, so methods are compared seed by seed: the paired '
          f't-test over seeds against the best method, at p < {ALPHA}, each comparison on '
          'its own (no correction for the many made; with 3 seeds only large gaps pass).',
          '- Baselines (dashed) fit scikit-learn on the same sub-samples.']
  pipelines = sorted({(r['method'], r['augment']) for r in trained if r.get('augment')})
  if pipelines:
    out.append('- Augmentation: ' + '; '.join(f'{m}: `{a}`' for m, a in pipelines) + '.')
  if study.notes:
    out.append(f'- {study.notes}')
  out.append('')
  for size in study.sizes:
    lines = _ranking(summary, size)
    if lines:
      out += [f'## {size} per class', ''] + lines + ['']
  out += _techniques(study, summary)
  out += _mistakes(study, summary)
  out += ['## How much more data', '',
          'A saturating power law err(n) = a n^-b + c is fitted per method to the mean test '
          'error; it earns a forecast only if, fitted without the largest size, it predicts '
          'that size within the larger of 0.01 and the measured 95% interval.', '']
  out += _more_data(study, summary) + ['']
  if trained:
    out += ['## Chosen settings, and steps trained', '',
            'In brackets: the steps, and how many of the settings tried lie within one '
            'validation image of the chosen one (those the validation split cannot tell '
            'apart).', '', '| method | ' + ' | '.join(f'n={n}' for n in study.sizes) + ' |',
            '|---' * (len(study.sizes) + 1) + '|']
    for method in study.methods:
      if method.kind != 'trained':
        continue
      row = [records.get((method.name, n)) for n in study.sizes]
      out.append(f'| {method.name} | ' + ' | '.join(
          (' '.join(f'{k}={v:g}' for k, v in sorted(r['chosen'].items())) or 'no grid')
          + f" ({r['steps']} steps{_ties(r, val_labels)})" if r else '-' for r in row) + ' |')
    out.append('')
  out += ['## Time', '', '| part | minutes |', '|---|---|']
  out += [f'| {k} | {v / 60:.1f} |' for k, v in sorted(parts.items(), key=lambda kv: -kv[1])]
  diverged = [f"{r['method']} n={r['size']}" for r in done if r['diverged']]
  if diverged:
    out += ['', f'Members diverged in {", ".join(diverged)} (results.csv says which); a '
            'diverged member is left out of every figure, and a setting with one is chosen '
            'only when every setting has one.']
  _replace(path, '\n'.join(out) + '\n')


def _techniques(study, summary) -> list[str]:
  """Each method against the same recipe without its technique, seed by seed."""
  rows = {(r['method'], r['size']): r for r in summary if r['per_seed']}
  lines = []
  for method in study.methods:
    other = method.comparison(study.base.loss)
    for size in study.sizes:
      a, b = rows.get((method.name, size)), rows.get((other, size))
      if a is None or b is None:
        continue
      seeds = sorted(set(a['per_seed']) & set(b['per_seed']))
      gaps = [100 * (a['per_seed'][s] - b['per_seed'][s]) for s in seeds]
      verdict = _verdict(curves.paired_p(a['per_seed'], b['per_seed']),
                         'helps' if np.mean(gaps) > 0 else 'hurts')
      spread = f' ± {np.std(gaps, ddof=1):.1f}' if len(gaps) > 1 else ''
      lines.append(f'| {method.name} | {other} | {size} | {np.mean(gaps):+.1f}{spread} | '
                   f'{verdict} |')
  if not lines:
    return []
  return ['## What each technique adds', '',
          'Each method against the same recipe without its technique (the pairs are the '
          "methods' own), both tuned alike: the test accuracy gained, seed by seed "
          f'(points, mean ± sd over seeds), and the paired t-test at p < {ALPHA}.', '',
          '| method | against | per class | gain in points | verdict |', '|---|---|---|---|---|',
          *lines, '']


def _mistakes(study, summary) -> list[str]:
  """Per size, how wrong each method's mistakes are by the class hierarchy."""
  rows = [r for r in summary if r['hierarchy']]
  if not rows:
    return []
  names = list(rows[0]['hierarchy'])
  out = ['## Mistakes, by the class hierarchy', '',
         f'The hierarchy `{study.base.hierarchy}`. Hierarchical accuracy: the mean similarity '
         'of predicted and true class (1 - height of their lowest common ancestor / height '
         'of the tree; 1 when right). Mistake severity: the mean height of that ancestor '
         'over the wrong predictions only (lower is better). Level d: the prediction has '
         "the true class's ancestor d steps below the root. Hierarchical precision at k: "
         "the similarities of the k top-ranked classes to the true one, summed, over the "
         'best such sum. Mean ± sd over seeds; against the lowest severity: the paired '
         f't-test over seeds, p < {ALPHA}.', '']
  for size in study.sizes:
    here = sorted([r for r in rows if r['size'] == size],
                  key=lambda r: _mean(r['hierarchy']['mistake_severity']))
    if not here:
      continue
    gentlest = here[0]
    out += [f'### {size} per class', '',
            '| method | top-1 | ' + ' | '.join(n.replace('_', ' ') for n in names)
            + f' | severity against {gentlest["method"]} |',
            '|---' * (len(names) + 3) + '|']
    for r in here:
      cells = [f"{r['test_accuracy']:.4f} ± {r['std']:.4f}"]
      for n in names:
        mean, sd, _ = curves.interval(list(r['hierarchy'][n].values()))
        cells.append('-' if not np.isfinite(mean) else f'{mean:.3f} ± {sd:.3f}')
      if r is gentlest:
        verdict = 'lowest'
      else:
        verdict = _verdict(curves.paired_p(gentlest['hierarchy']['mistake_severity'],
                                           r['hierarchy']['mistake_severity']), 'higher')
      out.append(f"| {r['method']} | " + ' | '.join(cells) + f' | {verdict} |')
    out.append('')
  return out


def _ties(record, val_labels) -> str:
  """', k of n tied': settings whose mean validation accuracy is within one image of the best."""
  by_setting = {}
  for r in record['rows']:
    if r['stage'] == 'tune' and r['val_accuracy'] is not None:
      by_setting.setdefault(r['setting'], []).append(r['val_accuracy'])
  if len(by_setting) < 2 or not val_labels:
    return ''
  means = [np.mean(v) for v in by_setting.values()]
  tied = sum(m >= max(means) - 1 / val_labels - 1e-9 for m in means)
  return f', {tied} of {len(means)} tied'


def _grid_text(study) -> str:
  def text(grid):
    return ' x '.join(f'{k} in {{{v}}}' for k, v in grid.items()) or 'no grid (its defaults)'
  own = [m for m in study.methods if m.kind == 'trained' and m.grid is not None]
  out = f'the same grid, {text(study.grid)}'
  if own:
    out += ' (except ' + '; '.join(f'{m.name}: {text(m.grid)}' for m in own) + ', whose '
    out += 'steps are slow)'
  return out


def write(study, records: dict, meta: dict) -> list[str]:
  """Every output, from the records of the finished cells; returns their paths."""
  summary = summarise(study, records)
  d = study.workdir
  write_results(os.path.join(d, 'results.csv'), records)
  write_summary(os.path.join(d, 'summary.csv'), summary)
  plot(os.path.join(d, 'learning_curve'), study, summary,
       f'{study.base.dataset}: test accuracy, mean of {study.seeds} seeds with 95% intervals')
  write_report(os.path.join(d, 'report.md'), study, summary, records, meta)
  return [os.path.join(d, f) for f in ('report.md', 'summary.csv', 'results.csv',
                                       'learning_curve.png', 'learning_curve.svg')]
