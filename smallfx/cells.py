"""A study's cells: one (method, samples per class) each, run, resumed and read back.

A trained method's cell is two ordinary `smallfx.main` runs in the cell's folder:
`tune/` trains the grid's settings x `tune_seeds` as members of one program and
validation chooses a setting; `final/` trains that setting on `seeds` fresh seeds
(their own initialisations and training sub-samples), whose test accuracy is what the
study reports. A baseline's cell fits scikit-learn on the same sub-samples as the final
seeds. Each cell ends by writing `cell.json`, which is what the report reads; a cell
with one is finished, and a re-run skips it.
"""

import dataclasses
import datetime
import hashlib
import json
import os
import time

import ml_collections
import numpy as np

from smallfx import baseline as baseline_lib
from smallfx import checkpoint
from smallfx import config as config_lib
from smallfx import data as data_lib
from smallfx import experiment
from smallfx import methods as methods_lib
from smallfx import results as results_lib
from smallfx import workdir as workdir_lib
from smallfx.errors import UserError

# Tuning runs draw their seeds (initialisations and sub-samples) from here on, so
# the final seeds 0, 1, ... are fresh.
TUNE_SEED_OFFSET = 1000


@dataclasses.dataclass(frozen=True)
class Study:
  """A study config, checked."""
  base: ml_collections.ConfigDict
  sizes: tuple[int, ...]
  methods: tuple[methods_lib.Method, ...]
  grid: dict[str, str]
  seeds: int
  tune_seeds: int
  workdir: str
  notes: str = ''

  def grid_of(self, method: methods_lib.Method) -> dict[str, str]:
    return dict(method.grid) if method.grid is not None else dict(self.grid)


@dataclasses.dataclass(frozen=True)
class Cell:
  method: methods_lib.Method
  size: int

  @property
  def name(self) -> str:
    return f'{self.method.name} n={self.size}'

  def folder(self, study: Study) -> str:
    return os.path.join(study.workdir, 'cells', self.method.name, f'n{self.size:04d}')


def _numbers(field: str, text: str, kind=float) -> tuple:
  try:
    return tuple(kind(v) for v in str(text).split(',') if v.strip())
  except ValueError:
    raise UserError(f'{field}={text!r}: give comma-separated numbers') from None


def resolve(config: ml_collections.ConfigDict, workdir: str) -> Study:
  """Checks a study config: names, sizes, seeds and every cell's experiment."""
  sizes = _numbers('sizes', config.sizes, int)
  if not sizes:
    raise UserError('sizes is empty: give samples per class, e.g. --config.sizes=10,25,50')
  if any(n < 1 for n in sizes) or list(sizes) != sorted(set(sizes)):
    raise UserError(f'sizes={config.sizes!r} must be positive and strictly ascending, '
                    'e.g. 10,25,50')
  if config.seeds < 1 or config.tune_seeds < 0:
    raise UserError(f'seeds must be >= 1 and tune_seeds >= 0; got seeds={config.seeds}, '
                    f'tune_seeds={config.tune_seeds}')
  if any(str(v).strip() for v in config.base.sweep.values()) or config.base.num_seeds != 1:
    raise UserError('the study sets the sweep and the seeds: use --config.grid.NAME and '
                    '--config.seeds, not --config.base.sweep or --config.base.num_seeds')
  for name in config.grid:
    if name not in config_lib.SWEEPABLE:
      raise UserError(f'unknown grid field {name!r}; valid: {", ".join(config_lib.SWEEPABLE)}')
  chosen_methods = methods_lib.get(config.methods)
  if not any(m.kind != 'ensemble' for m in chosen_methods):
    raise UserError('methods: the ensemble averages a from-scratch method; name one too, '
                    'e.g. --config.methods=cosine,ensemble')
  study = Study(base=config.base, sizes=sizes, methods=tuple(chosen_methods),
                grid={k: str(v) for k, v in config.grid.items() if str(v).strip()},
                seeds=int(config.seeds), tune_seeds=int(config.tune_seeds), workdir=workdir,
                notes=str(config.notes))
  for cell in cells(study):
    for stage in stages(study, cell.method):
      experiment.resolve(cell_config(study, cell, stage, chosen={}))
  return study


def check_available(study: Study) -> None:
  """Every method's packages are installed (before anything trains)."""
  for method in study.methods:
    method.check_available()


def check_sizes(study: Study) -> int:
  """Every size fits the smallest class of the training pool (validation carved off).

  Returns the number of classes.
  """
  spec = data_lib.Spec.from_config(study.base)
  dataset = data_lib.load(dataclasses.replace(spec, samples_per_class=0))
  counts = np.bincount(dataset.pool.labels, minlength=dataset.num_classes)
  smallest = int(np.argmin(counts))
  if study.sizes[-1] > counts[smallest]:
    raise UserError(f'size {study.sizes[-1]} per class asked for, but class '
                    f'{dataset.class_names[smallest]!r} has only {counts[smallest]} training '
                    f'images once {spec.val_per_class} per class are kept for validation; '
                    f'the largest size can be {counts[smallest]}')
  return dataset.num_classes


def cells(study: Study) -> list[Cell]:
  """Every cell that runs something: methods x sizes (the ensemble is read off others)."""
  return [Cell(m, n) for m in study.methods if m.kind != 'ensemble' for n in study.sizes]


def shard(all_cells: list[Cell], index: int, count: int) -> list[Cell]:
  """Cells index, index + count, ...: disjoint shares for a cluster's array job."""
  return all_cells[index::count]


def stages(study: Study, method: methods_lib.Method) -> tuple[str, ...]:
  """The runs of a method's cell: a baseline fits once; a trained method without a grid
  has nothing to tune; `tune_seeds=0` reports the tuning run's own seeds."""
  if method.kind != 'trained' or not study.grid_of(method):
    return ('final',)
  return ('tune', 'final') if study.tune_seeds else ('tune',)


def _tune_seed(study: Study) -> int:
  """The first seed of tuning runs: fresh ones when the chosen setting is retrained."""
  return study.base.seed + (TUNE_SEED_OFFSET if study.tune_seeds else 0)


def cpu_devices(study: Study) -> int:
  """The CPU devices the largest stage's members want (`members.cpu_devices`)."""
  return max([experiment.cpu_devices(cell_config(study, cell, stage, {}))
              for cell in cells(study) if cell.method.kind == 'trained'
              for stage in stages(study, cell.method)], default=1)


def cell_config(study: Study, cell: Cell, stage: str, chosen: dict) -> ml_collections.ConfigDict:
  """The `smallfx.main` config of a stage: the base, the method's recipe, size and seeds."""
  config = ml_collections.ConfigDict(study.base.to_dict())
  for key, value in cell.method.overrides.items():
    *parents, name = key.split('.')  # 'pretraining.learning_rate': a nested field
    node = config
    for parent in parents:
      node = node[parent]
    node[name] = value
  config.samples_per_class = cell.size
  config.resample_per_seed = True
  if stage == 'tune':
    for name, values in study.grid_of(cell.method).items():
      config.sweep[name] = values
    config.num_seeds = study.tune_seeds or study.seeds
    config.seed = _tune_seed(study)
  else:
    for name, value in chosen.items():
      config[name] = value
    config.num_seeds = study.seeds
    config.seed = study.base.seed
  return config


def fingerprint(study: Study, cell: Cell) -> str:
  """What a cell's runs depend on: its configs and the seeds; a record must match it."""
  configs = [cell_config(study, cell, stage, {}).to_dict() for stage in stages(study, cell.method)]
  # A stage that does not use a group of fields leaves them out.
  for switch, fields in (('pretrain', config_lib.PRETRAINING_FIELDS),
                         ('generative', config_lib.GENERATIVE_FIELDS)):
    configs = [c if c[switch] else {k: v for k, v in c.items() if k not in fields}
               for c in configs]
  later = config_lib.LATER_FIELDS
  configs = [{k: v for k, v in c.items() if k not in later or v != later[k]} for c in configs]
  text = json.dumps([configs, study.seeds, study.tune_seeds, cell.method.kind],
                    sort_keys=True, default=str)
  return hashlib.sha1(text.encode()).hexdigest()[:12]


def read(study: Study, cell: Cell) -> dict | None:
  """A finished cell's record, or None; a record of another config is refused."""
  path = os.path.join(cell.folder(study), 'cell.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    record = json.load(f)
  expected = fingerprint(study, cell)
  if record.get('fingerprint', expected) != expected:
    raise UserError(f'{cell.folder(study)} holds a cell of another study config (its base '
                    'experiment, grid or seeds differ); use another --workdir or delete it')
  return record


def _write(study: Study, cell: Cell, record: dict) -> None:
  checkpoint.write_json(os.path.join(cell.folder(study), 'cell.json'), record)


def run(study: Study, cell: Cell) -> dict:
  """Runs (or resumes) a cell and returns its record; a finished cell is only read."""
  record = read(study, cell)
  if record is not None:
    return record
  folder = cell.folder(study)
  checkpoint.prepare_workdir(folder)
  with workdir_lib.lock(folder):
    record = read(study, cell)  # another process may have finished it meanwhile
    if record is not None:
      return record
    if cell.method.kind == 'baseline':
      record = _run_baseline(study, cell)
    else:
      record = _run_trained(study, cell)
    record['finished'] = f'{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}'
    record['machine'] = results_lib.machine()
    record['fingerprint'] = fingerprint(study, cell)
    _write(study, cell, record)
  return record


def setting_label(values: dict) -> str:
  return ' '.join(f'{k}={v:g}' for k, v in sorted(values.items()))


def _stage(study: Study, cell: Cell, stage: str, chosen: dict) -> tuple[dict, float]:
  from smallfx import train  # pylint: disable=g-import-not-at-top
  config = cell_config(study, cell, stage, chosen)
  start = time.perf_counter()
  try:
    results = train.train_and_evaluate(config, os.path.join(cell.folder(study), stage))
  except UserError as e:
    raise UserError(f'{cell.name}, {stage}: {e}') from None
  # A resumed stage's process saw only its last part; the run's own training time
  # adds up across resumes.
  return results, max(time.perf_counter() - start, results['wall_seconds'])


def _rows(results: dict, stage: str, seed: int) -> list[dict]:
  """A row per member, as the stage's results.json has it (results.csv shows test
  accuracy only for the chosen setting)."""
  swept = set(results['sweep'])
  chosen = results['chosen_setting']['setting']
  return [{'stage': stage, 'seed': seed + m['seed'],
           'setting': setting_label({k: v for k, v in m['hyperparams'].items() if k in swept}),
           'chosen': m['setting'] == chosen, 'diverged': m['diverged'],
           'val_accuracy': m['val_accuracy'], 'test_accuracy': m['test_accuracy']}
          for m in results['members']]


def _run_trained(study: Study, cell: Cell) -> dict:
  runs, seconds, rows, chosen = {}, {}, [], {}
  for stage in stages(study, cell.method):
    runs[stage], seconds[stage] = _stage(study, cell, stage, chosen)
    rows += _rows(runs[stage], stage, _tune_seed(study) if stage == 'tune' else study.base.seed)
    chosen = chosen or runs[stage]['chosen_setting']['values']
  final = runs[stage]
  with open(os.path.join(cell.folder(study), stage, 'config.json')) as f:
    augment = json.load(f)['augment']  # 'auto' resolved
  live = [m for m in final['members'] if m['setting'] == final['chosen_setting']['setting']
          and not m['diverged']]
  return {
      'method': cell.method.name, 'size': cell.size, 'kind': cell.method.kind,
      'num_classes': final['train_size'] // cell.size,
      'grid': study.grid_of(cell.method), 'chosen': chosen, 'seconds': seconds,
      'steps': final['steps'], 'augment': augment,
      'seeds': [study.base.seed + m['seed'] for m in live],
      'val_accuracy': [m['val_accuracy'] for m in live],
      'test_accuracy': [m['test_accuracy'] for m in live],
      'ensemble_accuracy': final['test_ensemble_accuracy'],
      'diverged': sum(len(r['diverged_members']) for r in runs.values()),
      'rows': rows,
      # Metrics of the class hierarchy, per seed as test_accuracy (None: no mistakes).
      **({'hierarchy': {k: [m['test_hierarchy'][k] for m in live]
                        for k in live[0]['test_hierarchy']}}
         if live and 'test_hierarchy' in live[0] else {}),
  }


def _once_for(features, arrays):
  """`features`, computed once for each of `arrays` (the validation and test images,
  which every seed's fit sees) and afresh for anything else."""
  if features is None:
    return None
  done = {}

  def cached(images):
    if not any(images is a for a in arrays):
      return features(images)
    if id(images) not in done:
      done[id(images)] = features(images)
    return done[id(images)]

  return cached


def _run_baseline(study: Study, cell: Cell) -> dict:
  """The baseline fitted on each final seed's sub-sample; validation and test accuracy."""
  from smallfx import train  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  config = cell_config(study, cell, 'final', {})
  run = train.set_up(config)
  features = _once_for(train.feature_fn(run), [run.dataset.val.images, run.dataset.test.images])
  val, test = [], []
  seeds = [study.base.seed + s for s in range(study.seeds)]
  for seed in seeds:
    split = data_lib.resample_train(run.dataset, run.exp.data, seed)
    predict = baseline_lib.fit(cell.method.name, split, seed, features)
    val.append(baseline_lib.accuracy(predict, run.dataset.val) if len(run.dataset.val.labels)
               else None)
    test.append(baseline_lib.accuracy(predict, run.dataset.test))
  rows = [{'stage': 'final', 'seed': s, 'setting': '', 'chosen': True, 'diverged': False,
           'val_accuracy': v, 'test_accuracy': t} for s, v, t in zip(seeds, val, test)]
  return {'method': cell.method.name, 'size': cell.size, 'kind': 'baseline',
          'num_classes': run.dataset.num_classes, 'grid': {},
          'chosen': {}, 'seconds': {'final': time.perf_counter() - start},
          'steps': 0, 'seeds': seeds, 'val_accuracy': val,
          'test_accuracy': test, 'ensemble_accuracy': None, 'diverged': 0, 'rows': rows}
