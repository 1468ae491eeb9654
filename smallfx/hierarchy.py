"""Class hierarchies: the file, Barz & Denzler's class embedding, and how wrong a mistake is.

A hierarchy file holds one `child parent` pair a line; names are the data source's
class names and any inner nodes you like, quoted where they hold spaces
(`"Ankle boot" footwear`); `#` starts a comment. It must be one tree: one root, no
cycle, one parent per name, every class of the data a leaf and every leaf a class.

Barz & Denzler (WACV 2019, "Hierarchy-based image embeddings for semantic image
retrieval") measure two classes' dissimilarity as the height of their lowest common
ancestor over the height of the tree (a node's height: its longest way down to a
leaf), and place the classes on the unit sphere so that dot products are one minus
that: `embedding` computes those targets exactly, class by class.
"""

import dataclasses
import functools
import os
import shlex

import numpy as np
from scipy import linalg

from smallfx.errors import UserError

# Hierarchical precision is reported at this k (at most the number of classes).
PRECISION_AT = 5


@dataclasses.dataclass(frozen=True)
class Hierarchy:
  """A checked tree of names: each name's parent (the root has none)."""
  path: str
  parent: dict[str, str]
  root: str
  line_of: dict[str, int]  # where each child was named, for errors

  @functools.cached_property
  def children(self) -> dict[str, list[str]]:
    out = {}
    for child, parent in self.parent.items():
      out.setdefault(parent, []).append(child)
    return out

  @functools.cached_property
  def height(self) -> dict[str, int]:
    """Each node's longest way down to a leaf (a leaf: 0)."""
    out = {}

    def visit(node):
      if node not in out:
        out[node] = 1 + max(map(visit, self.children[node])) if node in self.children else 0
      return out[node]

    visit(self.root)
    return out

  def ancestry(self, node: str) -> list[str]:
    """The root, then each node down to `node`."""
    path = [node]
    while path[-1] in self.parent:
      path.append(self.parent[path[-1]])
    return path[::-1]


def read(path: str) -> Hierarchy:
  """Reads and checks a hierarchy file's shape: pairs, one parent each, no cycle, one root."""
  if not os.path.isfile(path):
    raise UserError(f'hierarchy file {path} does not exist')
  parent, line_of = {}, {}
  with open(path) as f:
    for number, line in enumerate(f, 1):
      try:
        names = shlex.split(line, comments=True)
      except ValueError as e:
        raise UserError(f'{path}, line {number}: {e}') from None
      if not names:
        continue
      if len(names) != 2:
        raise UserError(f'{path}, line {number}: give `child parent` (quote names with '
                        f'spaces), got {line.strip()!r}')
      child, par = names
      if child in parent and parent[child] != par:
        raise UserError(f'{path}, line {number}: {child!r} has two parents, '
                        f'{parent[child]!r} (line {line_of[child]}) and {par!r}')
      parent[child], line_of[child] = par, line_of.get(child, number)
  if not parent:
    raise UserError(f'hierarchy file {path} holds no `child parent` pairs')
  for start in parent:
    seen = [start]
    while seen[-1] in parent:
      seen.append(parent[seen[-1]])
      if seen[-1] in seen[:-1]:
        cycle = seen[seen.index(seen[-1]):]
        raise UserError(f'{path}: a cycle, {" -> ".join(map(repr, cycle))}')
  roots = sorted({p for p in parent.values() if p not in parent})
  if len(roots) > 1:
    raise UserError(f'{path}: {len(roots)} roots ({", ".join(map(repr, roots))}); a '
                    'hierarchy has one: give them a common parent')
  return Hierarchy(path, parent, roots[0], line_of)


@dataclasses.dataclass(frozen=True)
class ClassTree:
  """A hierarchy as a dataset's classes see it, in the dataset's class order."""
  class_names: tuple[str, ...]
  lca_height: np.ndarray   # (C, C): height of each pair's lowest common ancestor
  max_height: int          # the root's
  levels: np.ndarray       # (L, C): each class's ancestor at depth 1..L (itself below)

  @property
  def similarity(self) -> np.ndarray:
    """Barz & Denzler's: 1 - height(lca) / height(root); 1 on the diagonal."""
    return 1.0 - self.lca_height / self.max_height

  @functools.cached_property
  def embedding(self) -> np.ndarray:
    return embedding(self.similarity)

def for_classes(tree: Hierarchy, class_names) -> ClassTree:
  """`tree` over a dataset's classes: every class a leaf of it, every leaf a class."""
  class_names = list(class_names)
  where = f'hierarchy {tree.path}'
  missing = [c for c in class_names if c not in tree.height]
  if missing:
    raise UserError(f'{where} lacks {len(missing)} class(es) of the data: {_some(missing)} '
                    '(names as the data source gives them; quote those with spaces)')
  inner = [c for c in class_names if c in tree.children]
  if inner:
    raise UserError(f'{where}: class {inner[0]!r} has children; the classes of the data '
                    'must be leaves')
  strangers = sorted(n for n in tree.parent if n not in tree.children and n not in class_names)
  if strangers:
    name = strangers[0]
    raise UserError(f'{where}, line {tree.line_of[name]}: {name!r} is neither a class of the '
                    f'data nor an inner node (classes: {_some(class_names)})')
  if len(class_names) < 2:
    raise UserError(f'{where}: a hierarchy needs at least two classes')
  paths = [tree.ancestry(c) for c in class_names]
  n = len(class_names)
  lca = np.zeros((n, n), np.int64)
  for i in range(n):
    for j in range(n):
      common = [a for a, b in zip(paths[i], paths[j]) if a == b]
      lca[i, j] = tree.height[common[-1]]
  depth = max(len(p) for p in paths) - 1
  # Level d: each class's ancestor d steps below the root; a class above that depth is
  # its own ancestor there. The deepest level is the classes themselves: left out.
  node_ids = {}
  levels = np.array([[node_ids.setdefault(p[min(d, len(p) - 1)], len(node_ids))
                      for p in paths] for d in range(1, depth)], np.int64).reshape(-1, n)
  return ClassTree(tuple(class_names), lca, tree.height[tree.root], levels)


def _some(names, shown: int = 5) -> str:
  return ', '.join(map(repr, names[:shown])) + (' ...' if len(names) > shown else '')


def load(path: str, class_names) -> ClassTree:
  return for_classes(read(path), class_names)


def embedding(similarity: np.ndarray) -> np.ndarray:
  """Unit vectors whose pairwise dot products are `similarity` (C, C), exactly.

  Barz & Denzler's construction: class 0 is e0; class i has coordinates only in the
  first i + 1 axes, the first i solving a lower-triangular system against the classes
  before it and the last one setting its norm to one. Computed in float64.
  """
  s = np.asarray(similarity, np.float64)
  n = len(s)
  out = np.zeros((n, n))
  out[0, 0] = 1.0
  for i in range(1, n):
    x = linalg.solve_triangular(out[:i, :i], s[i, :i], lower=True)
    rest = 1.0 - x @ x
    if rest <= 1e-12:
      raise UserError('these class similarities have no unit-sphere embedding (two classes '
                      'in the same place?)')
    out[i, :i], out[i, i] = x, np.sqrt(rest)
  return out


def sums(tree: ClassTree, probs: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> dict:
  """Per-member masked sums of every metric over a batch; `means` finishes them.

  probs: (M, B, C) class probabilities (or any scores ranking the classes); labels (B,).
  """
  pred = probs.argmax(-1)                                       # (M, B)
  wrong = (pred != labels) * mask
  out = {'count': np.broadcast_to(mask.sum(), (len(probs),)).astype(np.float64),
         'wrong': wrong.sum(-1),
         'hierarchical_accuracy': (tree.similarity[pred, labels] * mask).sum(-1),
         'mistake_severity': (tree.lca_height[pred, labels] * wrong).sum(-1)}
  for d, level in enumerate(tree.levels, 1):
    out[f'level{d}_accuracy'] = ((level[pred] == level[labels]) * mask).sum(-1)
  k = min(PRECISION_AT, probs.shape[-1])
  top = np.argsort(-probs, axis=-1, kind='stable')[..., :k]     # (M, B, k)
  sim = tree.similarity[:, labels].T                            # (B, C): to the true class
  got = np.take_along_axis(np.broadcast_to(sim, probs.shape), top, -1).sum(-1)
  best = -np.sort(-sim, axis=-1)[:, :k].sum(-1)                 # the best k classes' sum
  out[f'hierarchical_precision@{k}'] = (got / best * mask).sum(-1)
  return out


def means(totals: dict) -> dict:
  """Metric -> (M,) means; mistake severity over the wrong predictions only (nan: none)."""
  count, wrong = totals['count'], totals['wrong']
  out = {}
  for name, value in totals.items():
    if name in ('count', 'wrong'):
      continue
    if name == 'mistake_severity':
      with np.errstate(invalid='ignore', divide='ignore'):
        out[name] = np.where(wrong > 0, value / np.maximum(wrong, 1), np.nan)
    else:
      out[name] = value / count
  return out


def metrics(tree: ClassTree, scores: np.ndarray, labels: np.ndarray) -> dict:
  """Every metric of one model's (N, C) scores: floats."""
  scores = np.asarray(scores)[None]
  labels = np.asarray(labels)
  out = means(sums(tree, scores, labels, np.ones(len(labels))))
  return {k: float(v[0]) for k, v in out.items()}


def from_coarse_labels(class_names, coarse_names, labels, coarse_labels,
                       root: str = 'root') -> str:
  """A hierarchy file's text from a dataset that labels every image twice (fine, coarse).

  Each class goes under the coarse label its images carry; a class whose images carry
  two is refused.
  """
  parents = {}
  for fine, coarse in set(zip(np.asarray(labels).tolist(), np.asarray(coarse_labels).tolist())):
    if parents.setdefault(fine, coarse) != coarse:
      raise UserError(f'class {class_names[fine]!r} has images under two coarse labels, '
                      f'{coarse_names[parents[fine]]!r} and {coarse_names[coarse]!r}')
  quote = shlex.quote
  lines = [f'{quote(class_names[f])} {quote(coarse_names[c])}' for f, c in sorted(
      parents.items(), key=lambda fc: (fc[1], fc[0]))]
  lines += [f'{quote(coarse_names[c])} {quote(root)}' for c in sorted(set(parents.values()))]
  return '\n'.join(lines) + '\n'
