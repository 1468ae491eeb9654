"""The pure functions of one member: init, draw a batch, update, evaluate.

Each takes and returns one member's state; `members.Layout.map` runs them over the
leading member axis. Nothing here knows about devices or platforms.
"""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from smallfx import optim
from smallfx import shuffle


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any     # holds the member's hyperparameters (optim.hyperparams)
  rng: jax.Array     # raw uint32 key data, so that checkpoints hold plain arrays
  diverged: jax.Array  # bool: frozen since its loss or gradients became non-finite
  # A frozen generator's variables (smallfx.generative): its images join each batch.
  generator: Any = None


def to_unit(x):
  """Inputs in the units augmentation works in: uint8 pixels in [0, 1]; a table's
  features (already standardised by `data.load`) as they are."""
  return x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)


def normalise(images_u8: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
  return (to_unit(images_u8) - mean) / std


def init_state(model, tx, image_shape, key, hyperparams: dict) -> TrainState:
  """One member's state: its seed's weights and its setting's hyperparameters."""
  init_key, train_key = jax.random.split(key)
  variables = model.init(init_key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
  params = variables['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get('batch_stats', {}),
                    opt_state=optim.with_hyperparams(tx.init(params), hyperparams),
                    rng=jax.random.key_data(train_key), diverged=jnp.zeros((), bool))


def global_norm(tree) -> jax.Array:
  """optax.tree.norm's value, with each leaf flattened before its sum of squares.

  XLA:CPU splits a sum over a many-axis array into a tree of small reduce-window
  ops; over one axis it is a single loop (SmallCNN's step 9.5 -> 8.6 ms on CPU).
  """
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.reshape(-1))) for x in jax.tree.leaves(tree)))


def update(state: TrainState, images: jax.Array, labels: jax.Array, *, model, loss, tx,
           unit_schedule, frozen: tuple[str, ...] = ()) -> tuple[TrainState, dict]:
  """The one update: (state, batch) -> (state, metrics). `labels` are (B, C) probabilities.

  A member whose loss, gradients or parameters become non-finite keeps its last
  finite state from then on and is marked `diverged`; the other members train on.
  `frozen` names top-level parameter collections the optimiser leaves as they are (a
  linear probe's backbone): no gradient flows into them, so their backward pass is
  never computed, where the gradient norm alone would keep it alive.
  """
  hyperparams = optim.hyperparams(state.opt_state)

  dropout = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.rng), 1 << 29),
                               state.step)

  def loss_fn(params):
    params = {k: jax.lax.stop_gradient(v) if k in frozen else v for k, v in params.items()}
    outputs, new_vars = model.apply({'params': params, 'batch_stats': state.batch_stats},
                                    images, train=True, mutable=['batch_stats'],
                                    rngs={'dropout': dropout})
    return loss.per_example(outputs, labels, hyperparams).mean(), (outputs, new_vars)

  (value, (outputs, new_vars)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {
      'train/loss': value,
      'train/accuracy': jnp.mean(jnp.argmax(loss.scores(outputs), -1) == jnp.argmax(labels, -1)),
      'train/learning_rate': hyperparams['learning_rate'] * unit_schedule(state.step),
      'train/grad_norm': global_norm(grads),
      'train/param_norm': global_norm(params),
      'train/update_norm': global_norm(updates),
  }
  # A finite loss with an infinite gradient already poisons the parameters.
  finite = jnp.isfinite(value) & jnp.isfinite(metrics['train/grad_norm']) & jnp.isfinite(
      metrics['train/param_norm'])
  diverged = state.diverged | ~finite
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(diverged, o, n), new, old)
  metrics['train/diverged'] = diverged.astype(jnp.float32)
  return state.replace(
      step=state.step + 1, params=keep(params, state.params),
      opt_state=keep(opt_state, state.opt_state),
      batch_stats=keep(new_vars.get('batch_stats', state.batch_stats), state.batch_stats),
      diverged=diverged), metrics


def pixel_stats(images_u8):
  """Per-channel mean and std of uint8 images in [0, 1] units: the inputs' normalisation.

  A table's features come standardised from `data.load` (a feature constant on the
  training split keeps a std of 1 there): 0 and 1 per feature.
  """
  if images_u8.dtype != np.uint8:
    n = images_u8.shape[-1]
    return np.zeros(n, np.float32), np.ones(n, np.float32)
  x = images_u8.astype(np.float32) / 255.0
  return x.mean(axis=(0, 1, 2)), np.maximum(x.std(axis=(0, 1, 2)), 1e-3)


def draw_batch(state: TrainState, images_u8, labels, *, batch_size, num_classes, augment,
               mean, std, generated=None):
  """The batch of this step: a slice of this epoch's permutation, augmented, normalised.

  `generated(generator variables, key) -> (images in [0, 1], one-hot labels)` appends
  the member's generated images, after the augmentation, which is for real images.
  """
  n = labels.shape[0]
  steps_per_epoch = n // batch_size
  epoch, i = jnp.divmod(state.step, steps_per_epoch)
  key = jax.random.wrap_key_data(state.rng)
  idx = shuffle.permuted(jax.random.fold_in(key, epoch), i * batch_size + jnp.arange(batch_size), n)
  x = to_unit(images_u8[idx])
  y = jax.nn.one_hot(labels[idx], num_classes)
  x, y = augment(jax.random.fold_in(jax.random.fold_in(key, 1 << 30), state.step), x, y)
  if generated is not None:
    x_g, y_g = generated(state.generator,
                         jax.random.fold_in(jax.random.fold_in(key, 1 << 28), state.step))
    x, y = jnp.concatenate([x, x_g.astype(x.dtype)]), jnp.concatenate([y, y_g])
  return (x - mean) / std, y


def evaluate_batch(state: TrainState, images_u8, labels, mask, *, model, loss, num_classes,
                   mean, std):
  """Masked sums of correct predictions and loss over a batch, and the probabilities."""
  outputs = model.apply({'params': state.params, 'batch_stats': state.batch_stats},
                        normalise(images_u8, mean, std), train=False)
  scores = loss.scores(outputs)
  correct = (jnp.argmax(scores, -1) == labels) * mask
  per_example = loss.per_example(outputs, jax.nn.one_hot(labels, num_classes),
                                 optim.hyperparams(state.opt_state))
  return {'correct': correct.sum(), 'loss': (per_example * mask).sum()}, jax.nn.softmax(scores)
