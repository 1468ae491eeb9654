"""The per-step shuffle: a bijection of range(n), different per key, uniform enough."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smallfx import shuffle


@pytest.mark.parametrize('n', [1, 2, 3, 10, 100, 1000, 4097, 50_000])
def test_every_index_once(n):
  out = np.asarray(shuffle.permuted(jax.random.key(3), jnp.arange(n), n))
  np.testing.assert_array_equal(np.sort(out), np.arange(n))


def test_slices_agree_with_the_whole():
  key, n = jax.random.key(0), 1000
  whole = np.asarray(shuffle.permuted(key, jnp.arange(n), n))
  part = np.asarray(shuffle.permuted(key, 96 + jnp.arange(32), n))
  np.testing.assert_array_equal(part, whole[96:128])


def test_keys_give_different_orders_and_positions_spread():
  n, trials = 100, 400
  keys = jax.vmap(jax.random.key)(jnp.arange(trials))
  orders = np.asarray(jax.jit(jax.vmap(lambda k: shuffle.permuted(k, jnp.arange(n), n)))(keys))
  assert len({o.tobytes() for o in orders}) == trials
  assert not np.array_equal(orders[0], np.arange(n))
  # Where index 0 lands: close to uniform over the n positions (chi-square,
  # 99 dof; 160 is far in the tail for a uniform shuffle).
  counts = np.bincount(np.argmax(orders == 0, axis=1), minlength=n)
  expected = trials / n
  assert ((counts - expected) ** 2 / expected).sum() < 160
  # And the first entry's value: the same.
  counts = np.bincount(orders[:, 0], minlength=n)
  assert ((counts - expected) ** 2 / expected).sum() < 160


def test_under_vmap_and_jit():
  keys = jax.vmap(jax.random.key)(jnp.arange(4))
  f = jax.jit(jax.vmap(lambda k: shuffle.permuted(k, jnp.arange(50), 50)))
  out = np.asarray(f(keys))
  for k in range(4):
    np.testing.assert_array_equal(out[k], np.asarray(shuffle.permuted(keys[k], jnp.arange(50), 50)))
    np.testing.assert_array_equal(np.sort(out[k]), np.arange(50))
