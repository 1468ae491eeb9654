"""Tables as data sources: `sklearn:NAME` and `csv:PATH`.

A table's rows play the part of images: `Split.images` holds float32 features (N, F).
The loaders return raw rows and an `Encoder`, which `data.load` fits on the training
pool (the rows that are neither validation nor test) and applies to every split:
numeric columns as they are, a missing value replaced by the pool's median;
categorical columns one-hot over the categories the pool holds (one seen only in
validation or test: all zeros; a missing value: a category of its own). `data.load`
then standardises every feature with the training split's mean and std.
"""

import csv
import dataclasses
import os
import sys

import numpy as np

from smallfx.errors import UserError, unknown

# scikit-learn's shipped classification tables (digits as 64 pixel features).
SKLEARN_TABLES = {'iris': 'load_iris', 'wine': 'load_wine',
                  'breast_cancer': 'load_breast_cancer', 'digits': 'load_digits'}
# Cells read as missing values (compared lower-case, stripped).
MISSING = frozenset({'', 'na', 'n/a', 'nan', 'null', 'none', '?'})
MISSING_CATEGORY = '(missing)'


def _is_missing(cell: str) -> bool:
  return cell.strip().lower() in MISSING


def _number(cell: str) -> float | None:
  try:
    return float(cell)
  except ValueError:
    return None


def _numbers(column) -> np.ndarray:
  return np.array([np.nan if _is_missing(str(v)) else float(v) for v in column])


def _categories(column) -> list[str]:
  return [MISSING_CATEGORY if _is_missing(v) else v.strip() for v in column]


@dataclasses.dataclass(frozen=True)
class Encoder:
  """How a table's raw columns become features; `fit` reads only the rows it is given."""
  columns: tuple[str, ...]
  categorical: tuple[bool, ...]

  def fit(self, rows: np.ndarray):
    """The encoding learnt from `rows` (object (N, columns)): a function of raw rows."""
    plans = []  # per column: its categories, or the median that fills a missing number
    for j, is_category in enumerate(self.categorical):
      if is_category:
        plans.append(sorted(set(_categories(rows[:, j]))))
      else:
        numbers = _numbers(rows[:, j])
        plans.append(float(np.nanmedian(numbers)) if np.isfinite(numbers).any() else 0.0)

    def encode(raw: np.ndarray) -> np.ndarray:
      parts = []
      for j, plan in enumerate(plans):
        if isinstance(plan, list):
          values = np.array(_categories(raw[:, j]), dtype=object)
          parts.append((values[:, None] == np.array(plan, dtype=object)[None]).astype(
              np.float32))
        else:
          x = _numbers(raw[:, j])
          parts.append(np.where(np.isnan(x), plan, x)[:, None])
      return np.concatenate(parts, axis=1).astype(np.float32)

    return encode


def load_sklearn(name: str):
  """(rows float (N, F), labels, class names, Encoder) of a table scikit-learn ships."""
  if name not in SKLEARN_TABLES:
    raise unknown('scikit-learn table', name, SKLEARN_TABLES)
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  bunch = getattr(datasets, SKLEARN_TABLES[name])()
  rows = np.asarray(bunch.data, np.float64).reshape(len(bunch.target), -1)
  names = [str(n) for n in bunch.target_names]
  columns = getattr(bunch, 'feature_names', None)
  if columns is None or len(columns) != rows.shape[1]:
    columns = [f'x{j}' for j in range(rows.shape[1])]
  return (rows.astype(object), bunch.target.astype(np.int32), names,
          Encoder(tuple(map(str, columns)), (False,) * rows.shape[1]))


def _read_rows(path: str) -> tuple[list[str], list[list[str]]]:
  if not os.path.isfile(path):
    raise UserError(f'csv file {path} does not exist')
  try:
    with open(path, newline='', encoding='utf-8-sig') as f:
      text = f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f'cannot read csv file {path}: {e}') from None
  if not text.strip():
    raise UserError(f'csv file {path} is empty; it needs a header line and one row per example')
  try:
    dialect = csv.Sniffer().sniff(text[:4096], delimiters=',;\t')
  except csv.Error:
    dialect = csv.excel
  lines = [r for r in csv.reader(text.splitlines(), dialect) if any(c.strip() for c in r)]
  header, rows = [c.strip() for c in lines[0]], lines[1:]
  if not rows:
    raise UserError(f'csv file {path} has a header but no rows')
  if len(set(header)) != len(header):
    twice = sorted({c for c in header if header.count(c) > 1})
    raise UserError(f'csv file {path} names column {twice[0]!r} twice; columns need '
                    'distinct names')
  for i, row in enumerate(rows):
    if len(row) != len(header):
      raise UserError(f'csv file {path}: data row {i + 1} has {len(row)} fields, the header '
                      f'{len(header)}')
  return header, rows


def load_csv(path: str, label_column: str, categorical: str):
  """(raw rows object (N, F), labels, class names, Encoder) of the user's table."""
  header, rows = _read_rows(path)
  valid = ', '.join(header)
  if not label_column:
    raise UserError(f'csv:{path} needs the label column: set --config.label_column=NAME '
                    f'(columns: {valid})')
  if label_column not in header:
    raise UserError(f'label_column {label_column!r} is not a column of {path} '
                    f'(columns: {valid})')
  declared = [c.strip() for c in categorical.split(',') if c.strip()]
  for name in declared:
    if name not in header:
      raise UserError(f'categorical column {name!r} is not a column of {path} '
                      f'(columns: {valid})')
  y_col = header.index(label_column)
  labels_raw = [r[y_col].strip() for r in rows]
  for i, v in enumerate(labels_raw):
    if _is_missing(v):
      raise UserError(f'csv file {path}: data row {i + 1} has no label (column {label_column!r}); '
                      'remove the row or give it its class')
  numeric = all(_number(v) is not None for v in labels_raw)
  names = sorted(set(labels_raw), key=(lambda v: float(v)) if numeric else None)
  if len(names) < 2:
    raise UserError(f'label column {label_column!r} of {path} holds one class ({names[0]!r}); '
                    'a classifier needs two or more')
  index = {n: i for i, n in enumerate(names)}
  columns = [c for c in header if c != label_column]
  if not columns:
    raise UserError(f'csv file {path} has no column besides the label {label_column!r}')
  table = np.array([[r[header.index(c)] for c in columns] for r in rows], dtype=object)
  is_category = tuple(c in declared for c in columns)
  missing = {}
  for j, (name, category) in enumerate(zip(columns, is_category)):
    for i, cell in enumerate(table[:, j]):
      if _is_missing(cell):
        missing[name] = missing.get(name, 0) + 1
      elif not category and _number(cell) is None:
        raise UserError(f'column {name!r} of {path} is not numeric (data row {i + 1}: {cell!r}); '
                        f'declare it categorical with --config.categorical={name} (several: '
                        'comma-separated)')
  if missing:
    counts = ', '.join(f'{n}: {k}' for n, k in missing.items())
    print(f'note: {path} has {sum(missing.values())} missing values ({counts}): numeric '
          "ones are filled with the training pool's median, categorical ones are a category "
          f'{MISSING_CATEGORY!r} of their own', file=sys.stderr)
  labels = np.array([index[v] for v in labels_raw], np.int32)
  return table, labels, names, Encoder(tuple(columns), is_category)


def standardiser(train_rows: np.ndarray):
  """x -> x standardised with `train_rows`' mean and std (a constant feature stays 0)."""
  mean, std = train_rows.mean(0), train_rows.std(0)
  std = np.where(std > 0, std, 1.0)
  return lambda x: ((x - mean) / std).astype(np.float32)


def standardise(pool, val, test, train_rows: np.ndarray):
  """The three splits' features standardised with `train_rows`' mean and std."""
  scale = standardiser(train_rows)
  return tuple(dataclasses.replace(s, images=scale(s.images)) for s in (pool, val, test))
