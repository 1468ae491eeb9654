import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from smallfx import optim
from smallfx.errors import UserError

HYPER = {'learning_rate': 0.1, 'weight_decay': 5e-4, 'momentum': 0.9, 'label_smoothing': 0.1,
         'cosine_xent_weight': 0.1}


def test_cosine_schedule_warms_up_then_decays_to_zero():
  unit = optim.unit_schedule('cosine', 100, warmup_steps=10)
  values = np.array([unit(s) for s in range(101)])
  assert values[0] == 0 and np.isclose(values[10], 1.0)
  assert np.all(np.diff(values[:11]) > 0) and np.all(np.diff(values[10:]) <= 1e-9)
  assert values[100] < 1e-6


def test_sgdr_restarts_in_cycles_that_double_and_fill_the_run():
  unit = optim.unit_schedule('sgdr', 70, warmup_steps=0, sgdr_cycles=3)
  values = np.array([unit(s) for s in range(70)])
  # cycles of 10, 20 and 40 steps: the rate jumps back up at steps 10 and 30.
  jumps = np.flatnonzero(np.diff(values) > 0.5) + 1
  np.testing.assert_array_equal(jumps, [10, 30])
  assert values[9] < 0.1 and values[29] < 0.1 and values[69] < 0.1


def test_clipping_and_weight_decay_only_on_kernels():
  params = {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones((2,))}
  opt = optim.Optimizer('sgd', schedule='constant', warmup_steps=0)
  tx, _ = optim.make(opt, 10, {**HYPER, 'learning_rate': 1.0, 'momentum': 0.0,
                               'weight_decay': 0.5})
  zero = {'kernel': jnp.zeros((2, 2)), 'bias': jnp.zeros((2,))}
  updates, _ = tx.update(zero, tx.init(params), params)
  np.testing.assert_allclose(updates['kernel'], -0.5 * np.ones((2, 2)))
  np.testing.assert_allclose(updates['bias'], np.zeros(2))
  tx, _ = optim.make(optim.Optimizer('adamw', grad_clip_norm=1.0), 10, HYPER)
  big = {'kernel': 100 * jnp.ones((2, 2)), 'bias': 100 * jnp.ones((2,))}
  updates, _ = tx.update(big, tx.init(params), params)
  assert np.all(np.isfinite(optax.tree.norm(updates)))


def test_hyperparameters_live_in_the_state_and_drive_the_update():
  """A member's values replace the initial ones: the same update function, other steps."""
  params = {'kernel': jnp.ones((2, 2))}
  grads = {'kernel': jnp.ones((2, 2))}
  opt = optim.Optimizer('sgd', schedule='constant', warmup_steps=0)
  tx, unit = optim.make(opt, 10, {**HYPER, 'momentum': 0.0, 'weight_decay': 0.0})
  update = jax.jit(tx.update)
  state = tx.init(params)
  assert float(optim.hyperparams(state)['learning_rate']) == pytest.approx(0.1)
  fast = optim.with_hyperparams(state, {'learning_rate': 0.4})
  slow_updates, _ = update(grads, state, params)
  fast_updates, _ = update(grads, fast, params)
  np.testing.assert_allclose(fast_updates['kernel'], 4 * slow_updates['kernel'], rtol=1e-6)
  assert update._cache_size() == 1  # pylint: disable=protected-access
  assert float(unit(5)) == 1.0


def test_unknown_names_raise_user_errors():
  with pytest.raises(UserError, match='adamw, sgd'):
    optim.Optimizer('adam')
  with pytest.raises(UserError, match='constant, cosine, sgdr'):
    optim.Optimizer('sgd', schedule='step')


def test_a_linear_probe_computes_no_backbone_gradient():
  """The frozen backbone gets no backward pass (fewer FLOPs), and the same update."""
  import functools  # pylint: disable=g-import-not-at-top
  from smallfx import losses, models, steps  # pylint: disable=g-import-not-at-top
  model = models.build('cnn', 10)
  opt = optim.Optimizer('sgd', finetune='linear')
  tx, unit = optim.make(opt, 10, HYPER)
  state = steps.init_state(model, tx, (28, 28, 1), jax.random.key(0), HYPER)
  images = jax.random.uniform(jax.random.key(1), (8, 28, 28, 1))
  labels = jax.nn.one_hot(jnp.arange(8) % 10, 10)
  step = lambda frozen: jax.jit(functools.partial(
      steps.update, model=model, loss=losses.get('xent'), tx=tx, unit_schedule=unit,
      frozen=frozen))
  plain, probe = step(()), step(opt.frozen)
  (new_plain, m_plain), (new_probe, m_probe) = plain(state, images, labels), probe(
      state, images, labels)
  jax.tree.map(np.testing.assert_array_equal, new_probe.params, new_plain.params)
  jax.tree.map(np.testing.assert_array_equal, new_probe.params['backbone'],
               state.params['backbone'])
  assert float(m_probe['train/grad_norm']) < float(m_plain['train/grad_norm'])
  flops = lambda f: f.lower(state, images, labels).compile().cost_analysis()['flops']
  assert flops(probe) < 0.75 * flops(plain)
