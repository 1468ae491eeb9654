"""Losses by name, as optax-style pure functions.

The primitives take arrays and return one loss per example, like
`optax.softmax_cross_entropy`. Labels are class-probability vectors (B, C): one-hot,
smoothed or mixed by mixup/cutmix. Class *targets* for the cosine loss are
`labels @ class_embeddings` (identity = one-hot targets; a class hierarchy gives
unit vectors whose dot products encode semantic similarity), so a mixed label is
exactly a mixed target vector.

`get(name)` returns a `Loss`, which reads the model's output dict and also says
how to turn outputs into class scores (for accuracy, ensembles and prediction).
"""

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax

from smallfx.errors import unknown
from smallfx.models import l2_normalize

# Barz & Denzler (WACV 2020) weight the cross-entropy term of cosine+xent by 0.1.
COSINE_XENT_LAMBDA = 0.1
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
  per_example: Callable[[dict, jax.Array], jax.Array]
  scores: Callable[[dict], jax.Array]  # class logits: argmax = prediction
  needs_classifier: bool = False       # the model must emit outputs['logits']


def get(name: str, class_embeddings: Optional[jax.Array] = None) -> Loss:
  """The loss `name`; `class_embeddings` (C, D) are the cosine targets (default one-hot)."""

  def targets(labels):
    return labels if class_embeddings is None else labels @ class_embeddings

  def cosine_scores(outputs):
    emb = l2_normalize(outputs['output'])
    classes = (jnp.eye(emb.shape[-1]) if class_embeddings is None
               else l2_normalize(class_embeddings))
    return COSINE_SCORE_SCALE * emb @ classes.T

  table = {
      'xent': Loss('xent', lambda o, y: xent(o['output'], y), lambda o: o['output']),
      'xent_smooth': Loss('xent_smooth', lambda o, y: xent_smooth(o['output'], y),
                          lambda o: o['output']),
      'cosine': Loss('cosine', lambda o, y: cosine(o['output'], targets(y)), cosine_scores),
      'cosine_xent': Loss(
          'cosine_xent',
          lambda o, y: cosine(o['output'], targets(y)) + COSINE_XENT_LAMBDA * xent(o['logits'], y),
          lambda o: o['logits'], needs_classifier=True),
  }
  if name not in table:
    raise unknown('loss', name, table)
  return table[name]


NAMES = ('xent', 'xent_smooth', 'cosine', 'cosine_xent')
