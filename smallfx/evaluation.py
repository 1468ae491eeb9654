"""Evaluation of every member on a split: accuracy, loss, and ensembles of members.

The last batch is padded to the full batch size and masked, so one compiled function
serves every batch; it runs in the layout's rounds, on the state as training holds it.
"""

import functools

import jax
import numpy as np

from smallfx import data as data_lib
from smallfx import hierarchy as hierarchy_lib
from smallfx import members
from smallfx import steps


def make_eval_step(layout: members.Layout, model, loss, num_classes: int, mean, std):
  """(parts, images_u8, labels, mask) -> per round: per-member sums, probabilities."""
  return members.compile_eval(layout, functools.partial(
      steps.evaluate_batch, model=model, loss=loss, num_classes=num_classes, mean=mean, std=std))


def evaluate(eval_step, parts: list, split: data_lib.Split, batch_size: int,
             ensembles: dict | None = None,
             tree: hierarchy_lib.ClassTree | None = None) -> dict:
  """Each member's accuracy and loss, (members,) arrays in member order.

  `ensembles` names groups of members whose averaged probabilities are scored as one
  model: {'name': [member, ...]} gives 'ensemble_accuracy': {'name': accuracy}. With a
  class hierarchy, 'hierarchy' holds each of its metrics (`hierarchy.sums`) per member.
  """
  n = len(split.labels)
  if n == 0:
    return {}
  ensembles = {k: v for k, v in (ensembles or {}).items() if v}
  # Every batch has the same shape (one compiled function) and splits evenly over devices.
  devices = jax.device_count()
  batch_size = -(-min(batch_size, n) // devices) * devices
  totals, correct_ensemble, tree_totals = None, dict.fromkeys(ensembles, 0), None
  for start in range(0, n, batch_size):
    x, y = split.images[start:start + batch_size], split.labels[start:start + batch_size]
    pad = batch_size - len(y)
    mask = np.concatenate([np.ones(len(y), np.float32), np.zeros(pad, np.float32)])
    x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
    y = np.concatenate([y, np.zeros(pad, y.dtype)])
    outs = jax.device_get(eval_step(parts, x, y, mask))
    # Round r holds member d*R + r on device d (`members.Layout.split`).
    sums = {k: np.stack([o[0][k] for o in outs], -1).reshape(-1) for k in outs[0][0]}
    totals = sums if totals is None else {k: totals[k] + sums[k] for k in sums}
    if ensembles or tree is not None:
      probs = np.stack([o[1] for o in outs], 1).reshape(-1, *outs[0][1].shape[1:])
    if tree is not None:
      batch = hierarchy_lib.sums(tree, probs, y, mask)
      tree_totals = batch if tree_totals is None else {
          k: tree_totals[k] + batch[k] for k in batch}
    if ensembles:
      for name, group in ensembles.items():
        guess = np.argmax(probs[group].sum(0), -1)
        correct_ensemble[name] += int(((guess == y) * mask).sum())
  out = {'accuracy': totals['correct'] / n, 'loss': totals['loss'] / n,
         'ensemble_accuracy': {k: v / n for k, v in correct_ensemble.items()}}
  if tree is not None:
    out['hierarchy'] = hierarchy_lib.means(tree_totals)
  return out


def member_probabilities(model, loss, state, images, mean, std) -> np.ndarray:
  """Each member's class probabilities on its own inputs: (members, N, classes).

  `images` has a leading member axis, as `train.fit`'s data: for experiments whose
  members each hold out rows of their own (tools/olson.py). Tables are small: one call.
  """
  def one(params, batch_stats, x):
    outputs = model.apply({'params': params, 'batch_stats': batch_stats},
                          steps.normalise(x, mean, std), train=False)
    return jax.nn.softmax(loss.scores(outputs))

  return np.asarray(jax.jit(jax.vmap(one))(state.params, state.batch_stats, images))
