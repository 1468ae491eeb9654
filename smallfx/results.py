"""A finished run's summary: each member, the setting validation chose, its test figures.

The validation split chooses the setting (highest mean validation accuracy over its
seeds); the test set only reports, for that setting alone: the mean and spread of its
seeds and the accuracy of their ensemble. A diverged member is never chosen, and a
setting with a diverged seed is chosen only when every setting has one.
"""

import importlib.metadata
import platform as platform_lib

import numpy as np

from smallfx import members


def choose(grid: members.Grid, val_accuracy: np.ndarray, diverged: np.ndarray) -> int | None:
  """The setting with the best mean validation accuracy over its live seeds, or None."""
  def key(setting):
    live = [m for m in grid.members_of(setting) if not diverged[m]]
    # Settings whose every seed trained rank before those with diverged seeds.
    return (len(live) == grid.num_seeds, float(np.mean(val_accuracy[live])) if live else -1)

  candidates = [s for s in range(len(grid.settings))
                if any(not diverged[m] for m in grid.members_of(s))]
  return max(candidates, key=key) if candidates else None


def live_members(grid: members.Grid, setting: int, diverged: np.ndarray) -> list[int]:
  return [m for m in grid.members_of(setting) if not diverged[m]]


def summarise(grid: members.Grid, hyperparams: dict, val: dict, test: dict,
              diverged: np.ndarray, chosen: int) -> dict:
  """The per-member table and the chosen setting's test figures.

  `val` and `test` are `evaluation.evaluate`'s (per-member arrays); `test`'s
  ensembles are keyed by setting index. `hyperparams` holds (members,) arrays.
  """
  def value(x):
    return None if x is None else float(x)

  rows = []
  for m in range(grid.num_members):
    ok = not diverged[m]
    rows.append({
        'member': m, 'setting': grid.setting_of(m), 'seed': grid.seed_of(m),
        'hyperparams': {k: float(v[m]) for k, v in hyperparams.items()},
        'diverged': bool(diverged[m]),
        'val_accuracy': value(val['accuracy'][m]) if ok and val else None,
        'test_accuracy': value(test['accuracy'][m]) if ok else None,
        'test_loss': value(test['loss'][m]) if ok else None,
    })
    if 'hierarchy' in test:
      rows[-1]['test_hierarchy'] = {k: _finite_or_none(v[m]) if ok else None
                                    for k, v in test['hierarchy'].items()}
  settings = []
  for s, setting in enumerate(grid.settings):
    live = live_members(grid, s, diverged)
    settings.append({'setting': s, 'values': setting, 'members': grid.members_of(s),
                     'diverged': grid.num_seeds - len(live),
                     'val_accuracy': (float(np.mean(val['accuracy'][live]))
                                      if live and val else None)})
  live = live_members(grid, chosen, diverged)
  test_acc = test['accuracy'][live]
  out = {} if 'hierarchy' not in test else {
      # Mean over the chosen setting's seeds (mistake severity: over those that erred).
      'test_hierarchy': {k: _finite_mean(v[live]) for k, v in test['hierarchy'].items()}}
  return {**out,
      'test_accuracy': float(np.mean(test_acc)),
      'test_loss': float(np.mean(test['loss'][live])),
      'test_accuracy_per_seed': [float(a) for a in test_acc],
      'test_accuracy_std': float(np.std(test_acc)),
      'test_ensemble_accuracy': float(test['ensemble_accuracy'][str(chosen)]),
      'val_accuracy': settings[chosen]['val_accuracy'],
      'num_seeds': grid.num_seeds,
      'num_members': grid.num_members,
      'sweep': {k: list(v) for k, v in grid.values.items()},
      'chosen_setting': {'setting': chosen, 'values': grid.settings[chosen]},
      'diverged_members': [m for m in range(grid.num_members) if diverged[m]],
      'settings': settings,
      'members': rows,
  }


def _finite_or_none(x):
  return float(x) if np.isfinite(x) else None


def _finite_mean(values):
  """The mean of the finite values, or None where there are none."""
  finite = values[np.isfinite(values)]
  return float(finite.mean()) if len(finite) else None


def versions() -> dict:
  out = {'python': platform_lib.python_version()}
  for pkg in ('smallfx', 'jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy'):
    try:
      out[pkg] = importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def summary_line(results: dict, workdir: str) -> str:
  seeds = len(results['test_accuracy_per_seed'])
  acc = f"test accuracy {results['test_accuracy']:.4f}"
  if seeds > 1:
    acc += (f" ± {results['test_accuracy_std']:.4f} over {seeds} seeds, "
            f"ensemble {results['test_ensemble_accuracy']:.4f}")
  chosen = results.get('chosen_setting', {}).get('values')
  if chosen:
    acc += ' | chosen on validation: ' + ', '.join(f'{k}={v:g}' for k, v in chosen.items())
  tree = results.get('test_hierarchy')
  if tree:
    severity = tree.get('mistake_severity')
    acc += (f" | hierarchical accuracy {tree['hierarchical_accuracy']:.4f}, mistake severity "
            + ('-' if severity is None else f'{severity:.3f}'))
  diverged = len(results.get('diverged_members', []))
  if diverged:
    acc += f" | {diverged} of {results['num_members']} members diverged"
  base = results.get('baseline_accuracy')
  base = f" | {results['baseline']} {base:.4f}" if base is not None else ''
  return (f"{acc}{base} | {results['steps']} steps, {results['wall_seconds']:.0f} s, "
          f"{results['images_per_sec']:.0f} img/s | {workdir}")


def machine() -> str:
  """The processor and core count (and accelerators, where any), for records."""
  import os  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  cpu = platform_lib.processor() or platform_lib.machine()
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    pass
  text = f'{len(os.sched_getaffinity(0))}-core {cpu}'
  devices = jax.devices()
  if devices[0].platform != 'cpu':
    text += f', {len(devices)} x {devices[0].device_kind}'
  return text
