import numpy as np
import optax
import pytest

from smallfx import config as base
from smallfx import optim
from smallfx.errors import UserError


def cfg(**kw):
  c = base.default()
  c.update(kw)
  return c


def test_cosine_schedule_warms_up_then_decays_to_zero():
  lr = optim.schedule(cfg(schedule='cosine', learning_rate=0.1, warmup_steps=10), 100)
  values = np.array([lr(s) for s in range(101)])
  assert values[0] == 0 and np.isclose(values[10], 0.1)
  assert np.all(np.diff(values[:11]) > 0) and np.all(np.diff(values[10:]) <= 1e-9)
  assert values[100] < 1e-6


def test_sgdr_restarts_in_cycles_that_double_and_fill_the_run():
  lr = optim.schedule(cfg(schedule='sgdr', learning_rate=0.1, warmup_steps=0, sgdr_cycles=3), 70)
  values = np.array([lr(s) for s in range(70)])
  # cycles of 10, 20 and 40 steps: the rate jumps back up at steps 10 and 30.
  jumps = np.flatnonzero(np.diff(values) > 0.05) + 1
  np.testing.assert_array_equal(jumps, [10, 30])
  assert values[9] < 0.01 and values[29] < 0.01 and values[69] < 0.01


def test_clipping_and_weight_decay_only_on_kernels():
  import jax.numpy as jnp
  params = {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones((2,))}
  tx, _ = optim.make(cfg(optimizer='sgd', learning_rate=1.0, momentum=0.0, weight_decay=0.5,
                         warmup_steps=0, schedule='constant', grad_clip_norm=0.0), 10)
  zero = {'kernel': jnp.zeros((2, 2)), 'bias': jnp.zeros((2,))}
  updates, _ = tx.update(zero, tx.init(params), params)
  np.testing.assert_allclose(updates['kernel'], -0.5 * np.ones((2, 2)))
  np.testing.assert_allclose(updates['bias'], np.zeros(2))
  tx, _ = optim.make(cfg(optimizer='adamw', grad_clip_norm=1.0), 10)
  big = {'kernel': 100 * jnp.ones((2, 2)), 'bias': 100 * jnp.ones((2,))}
  updates, _ = tx.update(big, tx.init(params), params)
  assert np.all(np.isfinite(optax.tree.norm(updates)))


def test_unknown_names_raise_user_errors():
  with pytest.raises(UserError, match='adamw, sgd'):
    optim.make(cfg(optimizer='adam'), 10)
  with pytest.raises(UserError, match='constant, cosine, sgdr'):
    optim.make(cfg(schedule='step'), 10)
