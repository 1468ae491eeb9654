import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from smallfx import losses
from smallfx.errors import UserError


def test_xent_matches_hand_computation():
  logits = jnp.array([[2.0, 0.0, -1.0]])
  labels = jnp.array([[0.0, 1.0, 0.0]])
  expected = -(0.0 - np.log(np.exp(2.0) + np.exp(0.0) + np.exp(-1.0)))
  chex.assert_trees_all_close(losses.xent(logits, labels), jnp.array([expected]), rtol=1e-6)


def test_xent_smooth_spreads_alpha():
  logits = jnp.array([[1.0, 2.0, 3.0, 4.0]])
  labels = jax.nn.one_hot(jnp.array([3]), 4)
  logp = jax.nn.log_softmax(logits)
  smooth = 0.9 * labels + 0.1 / 4
  chex.assert_trees_all_close(losses.xent_smooth(logits, labels), -(smooth * logp).sum(-1),
                              rtol=1e-6)


def test_cosine_by_hand():
  out = jnp.array([[3.0, 4.0], [1.0, 0.0], [-2.0, 0.0]])
  target = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
  # cos = 3/5, 0, -1
  chex.assert_trees_all_close(losses.cosine(out, target), jnp.array([0.4, 1.0, 2.0]), rtol=1e-6)
  # Scale invariance: the loss reads directions only.
  chex.assert_trees_all_close(losses.cosine(7 * out, target), losses.cosine(out, target),
                              rtol=1e-6)


def test_cosine_xent_is_cosine_plus_tenth_of_xent():
  key = jax.random.key(0)
  out = jax.random.normal(key, (4, 5))
  logits = jax.random.normal(jax.random.fold_in(key, 1), (4, 5))
  labels = jax.nn.one_hot(jnp.arange(4), 5)
  loss = losses.get('cosine_xent')
  got = loss.per_example({'output': out, 'logits': logits}, labels)
  want = losses.cosine(out, labels) + 0.1 * losses.xent(logits, labels)
  chex.assert_trees_all_close(got, want, rtol=1e-6)
  chex.assert_shape(got, (4,))


def test_cosine_with_class_embeddings_mixes_targets():
  emb = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
  loss = losses.get('cosine', class_embeddings=emb)
  mixed = jnp.array([[0.5, 0.5, 0.0]])
  out = jnp.array([[1.0, 1.0]])  # exactly the direction of the mixed target
  chex.assert_trees_all_close(loss.per_example({'output': out}, mixed), jnp.zeros(1), atol=1e-6)
  # Scores rank the class whose embedding is nearest first.
  assert int(jnp.argmax(loss.scores({'output': jnp.array([[0.5, 0.7]])}))) == 2


def test_dada_scores_a_class_by_its_real_and_fake_outputs_summed():
  out = jnp.array([[1.0, 0.0, 2.0, -3.0, 1.0, 0.5]])  # real 0..2, then fake 0..2
  loss = losses.get('dada')
  chex.assert_trees_all_close(loss.scores({'output': out}), jnp.array([[-2.0, 1.0, 2.5]]))
  label = jax.nn.one_hot(jnp.array([1]), 3)
  chex.assert_trees_all_close(loss.per_example({'output': out}, label),
                              losses.xent(jnp.array([[-2.0, 1.0, 2.5]]), label), rtol=1e-6)


@pytest.mark.parametrize('name', losses.NAMES)
def test_gradients_match_finite_differences(name):
  loss = losses.get(name)
  key = jax.random.key(1)
  labels = jax.nn.one_hot(jnp.array([0, 2, 1]), 3)

  def f(out, logits):
    return loss.per_example({'output': out, 'logits': logits}, labels).sum()

  out = jax.random.normal(key, (3, 3 * loss.outputs_per_class),
                          jnp.float64 if jax.config.x64_enabled else jnp.float32)
  logits = jax.random.normal(jax.random.fold_in(key, 2), (3, 3))
  check_grads(f, (out, logits), order=1, modes=['rev'], atol=1e-2, rtol=1e-2)


def test_unknown_loss_lists_valid_names():
  with pytest.raises(UserError, match='cosine_xent'):
    losses.get('cosin')


def test_a_registered_loss_is_in_names(monkeypatch):
  """NAMES is the table's own: a loss added there is in every test over NAMES."""
  monkeypatch.setitem(losses.LOSSES, 'double_xent', lambda e: losses.Loss(
      'double_xent', lambda o, y, h: 2 * losses.xent(o['output'], y), lambda o: o['output']))
  assert 'double_xent' in losses.NAMES
  assert losses.get('double_xent').name == 'double_xent'
  with pytest.raises(UserError) as error:
    losses.get('no such loss')
  assert sorted(str(error.value).split('valid: ')[1].split(', ')) == sorted(losses.NAMES)


@pytest.mark.parametrize('name, field', [('xent_smooth', 'label_smoothing'),
                                         ('cosine_xent', 'cosine_xent_weight')])
def test_loss_hyperparameters_are_values_not_constants(name, field):
  """A loss's hyperparameter may be an array (a member's), and it changes the loss."""
  loss = losses.get(name)
  out = {'output': jnp.array([[2.0, -1.0, 0.5]]), 'logits': jnp.array([[0.3, 0.1, -0.2]])}
  labels = jax.nn.one_hot(jnp.array([0]), 3)
  f = jax.jit(lambda v: loss.per_example(out, labels, {field: v}))
  assert float(f(jnp.float32(0.0))[0]) != float(f(jnp.float32(0.5))[0])
  chex.assert_trees_all_close(loss.per_example(out, labels),
                              f(jnp.float32(losses.HYPERPARAMS[field])))
