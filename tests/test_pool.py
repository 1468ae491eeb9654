"""`max_pool_2x2`: nn.max_pool's values, and autodiff's gradients written out."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smallfx.models import simple


def _autodiff_pool(x):
  """The same maths left to autodiff: equal maxima share the gradient (jnp.max's rule)."""
  b, h, w, c = x.shape
  return x[:, :h - h % 2, :w - w % 2].reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


@pytest.mark.parametrize('shape', [(3, 8, 8, 4), (2, 7, 9, 3), (1, 2, 2, 1)])
def test_values_match_flax_max_pool(shape):
  x = jax.random.normal(jax.random.key(0), shape)
  chex.assert_trees_all_equal(simple.max_pool_2x2(x), nn.max_pool(x, (2, 2), (2, 2)))


@pytest.mark.parametrize('shape', [(3, 8, 8, 4), (2, 7, 9, 3)])
def test_gradients_match_autodiff_with_ties(shape):
  kx, kg = jax.random.split(jax.random.key(1))
  x = jax.random.normal(kx, shape)
  # Ties of every size: a flat patch (four equal maxima), a ReLU's zeros, pairs.
  x = x.at[:, :4, :4].set(0.5)
  x = jnp.maximum(x, 0.0).at[:, 4:6, 4:6, 0].set(jnp.array([[1.0, 1.0], [-1.0, 0.2]]))
  dy = jax.random.normal(kg, simple.max_pool_2x2(x).shape)

  def pool_and_grad(x):
    y, vjp = jax.vjp(simple.max_pool_2x2, x)
    return y, vjp(dy)[0]

  y, got = jax.jit(pool_and_grad)(x)
  chex.assert_trees_all_equal(y, nn.max_pool(x, (2, 2), (2, 2)))  # training's forward
  want = jax.jit(lambda x: jax.vjp(_autodiff_pool, x)[1](dy)[0])(x)
  chex.assert_trees_all_close(got, want, rtol=1e-6, atol=0)
  # Each window's shares add up to its output's gradient; a dropped odd row gets none.
  np.testing.assert_allclose(simple._windows(got).sum((2, 4)), dy, rtol=1e-6)
  np.testing.assert_array_equal(got[:, 2 * dy.shape[1]:], 0)
