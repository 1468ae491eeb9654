"""Losses by name, as optax-style pure functions.

The primitives take arrays and return one loss per example, like
`optax.softmax_cross_entropy`. Labels are class-probability vectors (B, C): one-hot,
smoothed or mixed by mixup/cutmix. Class *targets* for the cosine loss are
`labels @ class_embeddings` (identity = one-hot targets; a class hierarchy gives
unit vectors whose dot products encode semantic similarity), so a mixed label is
exactly a mixed target vector.

`get(name)` returns a `Loss`, which reads the model's output dict and also says
how to turn outputs into class scores (for accuracy, ensembles and prediction).
A loss's own hyperparameters (`HYPERPARAMS`) arrive as values, not constants: each
member of a sweep carries its own in its optimiser state, and one compiled step
serves them all.
"""

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax

from smallfx.errors import unknown
from smallfx.models import l2_normalize

# The defaults: Barz & Denzler (WACV 2020) weight the cross-entropy term of
# cosine+xent by 0.1; 0.1 is the usual label smoothing.
HYPERPARAMS = {'label_smoothing': 0.1, 'cosine_xent_weight': 0.1}
# Cosine similarities lie in [-1, 1]; a softmax over them at temperature 1 is nearly
# uniform. Scaling by 16 gives calibrated-looking probabilities for ensembles and
# predictions and leaves the argmax (the accuracy) unchanged.
COSINE_SCORE_SCALE = 16.0


def xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy(logits, labels)


def xent_smooth(logits: jax.Array, labels: jax.Array, alpha: float = 0.1) -> jax.Array:
  return optax.softmax_cross_entropy(logits, optax.smooth_labels(labels, alpha))


def cosine(embeddings: jax.Array, targets: jax.Array) -> jax.Array:
  """1 - cos(output, target): both sides are L2-normalised first."""
  return 1.0 - jnp.sum(l2_normalize(embeddings) * l2_normalize(targets), axis=-1)


@dataclasses.dataclass(frozen=True)
class Loss:
  """A named loss over model output dicts; `labels` are class-probability vectors."""
  name: str
  # (outputs, labels, hyperparams) -> (B,); hyperparams as `HYPERPARAMS`, values or arrays.
  _per_example: Callable[[dict, jax.Array, dict], jax.Array]
  scores: Callable[[dict], jax.Array]  # class logits: argmax = prediction
  needs_classifier: bool = False       # the model must emit outputs['logits']
  outputs_per_class: int = 1           # 'output' holds this many blocks of one per class

  def per_example(self, outputs: dict, labels: jax.Array,
                  hyperparams: Optional[dict] = None) -> jax.Array:
    return self._per_example(outputs, labels, {**HYPERPARAMS, **(hyperparams or {})})


def _targets(labels, class_embeddings):
  return labels if class_embeddings is None else labels @ class_embeddings


def pair_sum(logits):
  """DADA's class logits: output k (real of class k) plus output K + k (fake of class k)."""
  k = logits.shape[-1] // 2
  return logits[..., :k] + logits[..., k:]


def _cosine_scores(outputs, class_embeddings):
  emb = l2_normalize(outputs['output'])
  classes = (jnp.eye(emb.shape[-1]) if class_embeddings is None
             else l2_normalize(class_embeddings))
  return COSINE_SCORE_SCALE * emb @ classes.T


# name -> factory(class_embeddings or None) -> Loss. A loss registered here is known to
# `get`, to the error that lists the valid names, and to every test over NAMES.
LOSSES: dict[str, Callable[[Optional[jax.Array]], Loss]] = {
    'xent': lambda e: Loss('xent', lambda o, y, h: xent(o['output'], y), lambda o: o['output']),
    'xent_smooth': lambda e: Loss(
        'xent_smooth', lambda o, y, h: xent_smooth(o['output'], y, h['label_smoothing']),
        lambda o: o['output']),
    'cosine': lambda e: Loss(
        'cosine', lambda o, y, h: cosine(o['output'], _targets(y, e)),
        lambda o: _cosine_scores(o, e)),
    'cosine_xent': lambda e: Loss(
        'cosine_xent',
        lambda o, y, h: (cosine(o['output'], _targets(y, e))
                         + h['cosine_xent_weight'] * xent(o['logits'], y)),
        lambda o: o['logits'], needs_classifier=True),
    # DADA's classifier (smallfx.generative): two outputs per class, scored by their sum.
    'dada': lambda e: Loss('dada', lambda o, y, h: xent(pair_sum(o['output']), y),
                           lambda o: pair_sum(o['output']), outputs_per_class=2),
}
NAMES = LOSSES.keys()  # a live view: never a list kept by hand beside the table


def get(name: str, class_embeddings: Optional[jax.Array] = None) -> Loss:
  """The loss `name`; `class_embeddings` (C, D) are the cosine targets (default one-hot)."""
  if name not in LOSSES:
    raise unknown('loss', name, LOSSES)
  return LOSSES[name](class_embeddings)
