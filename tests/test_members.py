"""Members: seeds x hyperparameter settings as one program; the setting chosen on validation."""

import json

import chex
import jax
import numpy as np
import pytest

from smallfx import config as base
from smallfx import experiment
from smallfx import members
from smallfx import results as results_lib
from smallfx import train
from smallfx.errors import UserError

from conftest import run_cli, start_and_kill_after


def config(**kw):
  c = base.default()
  c.update(dict(model='cnn', width=0.5, num_steps=6, augment='crop(pad=1)', progress=False,
                baseline='none'))
  sweep = kw.pop('sweep', {})
  c.update(kw)
  for name, values in sweep.items():
    c.sweep[name] = values
  return c


def trained(c, steps=None):
  """The state of every member after `steps` steps (all of the config's by default)."""
  run = train.set_up(c)
  init, _ = run.initializer()
  state, step, data = init(), run.train_step(), run.training_data()
  for _ in range(steps or run.setup.total_steps):
    state, _ = step(state, *data)
  return run, step, state


def member(state, m):
  return jax.tree.map(lambda a: a[m], state.params)


def test_grid_orders_members_by_setting_then_seed():
  grid = experiment.grid(config(num_seeds=2, sweep={'learning_rate': '0.1,0.3',
                                                    'weight_decay': '0,1e-3'}))
  assert grid.num_members == 8
  assert grid.settings[1] == {'learning_rate': 0.1, 'weight_decay': 1e-3}
  assert [grid.setting_of(m) for m in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
  np.testing.assert_allclose(grid.column('learning_rate', 9), [.1, .1, .1, .1, .3, .3, .3, .3])
  np.testing.assert_allclose(grid.column('momentum', 0.9), [0.9] * 8)


@pytest.mark.parametrize('sweep, message', [
    ({'learning_rate': '0.1,x'}, 'comma-separated numbers'),
    ({'learning_rate': '0.1,-1'}, 'learning_rate must be > 0'),
    ({'momentum': '0.5,0.5'}, 'repeats'),
])
def test_bad_sweeps_are_user_errors(sweep, message):
  with pytest.raises(UserError, match=message):
    experiment.resolve(config(sweep=sweep))


def test_a_sweep_needs_validation_data():
  with pytest.raises(UserError, match='val_per_class'):
    experiment.resolve(config(val_per_class=0, sweep={'learning_rate': '0.1,0.3'}))


@pytest.mark.parametrize('name, values, loss', [
    ('learning_rate', (0.05, 0.2), 'cosine'),
    ('weight_decay', (0.0, 0.05), 'cosine'),
    ('momentum', (0.0, 0.9), 'cosine'),
    ('label_smoothing', (0.0, 0.3), 'xent_smooth'),
    ('cosine_xent_weight', (0.0, 1.0), 'cosine_xent'),
])
@pytest.mark.slow
def test_a_swept_member_is_the_run_with_that_value(name, values, loss):
  """Each setting trains exactly as a single run configured with its value would."""
  # An MLP: the settings reach the optimiser and the loss whatever the model.
  _, _, swept = trained(config(loss=loss, model='mlp', sweep={name: ','.join(map(str, values))}))
  for m, value in enumerate(values):
    _, _, single = trained(config(loss=loss, model='mlp', **{name: value}))
    chex.assert_trees_all_close(member(swept, m), member(single, 0), rtol=1e-4, atol=1e-5)
  diff = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), member(swept, 0), member(swept, 1))
  assert max(jax.tree.leaves(diff)) > 1e-4, f'{name} made no difference'


@pytest.mark.slow
def test_changing_swept_values_compiles_nothing_new():
  run_a, step, _ = trained(config(sweep={'learning_rate': '0.05,0.2'}), steps=1)
  run_b = train.set_up(config(sweep={'learning_rate': '0.1,0.4'}))
  init_b, _ = run_b.initializer()
  state_b = init_b()
  assert step._cache_size() == 1  # pylint: disable=protected-access
  state_b, _ = step(state_b, *run_b.training_data())
  assert step._cache_size() == 1, 'other values of a swept field compiled the step again'  # pylint: disable=protected-access
  np.testing.assert_allclose(state_b.opt_state.hyperparams['learning_rate'], [0.1, 0.4])


@pytest.mark.slow
def test_a_diverged_member_is_frozen_and_the_others_train_on():
  c = config(loss='xent', model='mlp', sweep={'learning_rate': '0.1,1e30'}, num_steps=4)
  run, step, state = trained(c)
  init, _ = run.initializer()
  start = init()
  np.testing.assert_array_equal(np.asarray(state.diverged), [False, True])
  # Member 1 blew up on its first step: it keeps its initial, finite weights.
  chex.assert_trees_all_equal(member(state, 1), member(start, 1))
  _, _, single = trained(config(loss='xent', model='mlp', learning_rate=0.1, num_steps=4))
  chex.assert_trees_all_close(member(state, 0), member(single, 0), rtol=1e-4, atol=1e-5)


def test_validation_chooses_and_diverged_members_never_are():
  grid = members.Grid({'learning_rate': (0.1, 0.3, 1.0)}, num_seeds=2)
  val = np.array([0.5, 0.6, 0.8, 0.7, 0.99, 0.1])
  none = np.zeros(6, bool)
  assert results_lib.choose(grid, val, none) == 1  # means 0.55, 0.75, 0.545
  assert results_lib.choose(grid, np.array([.5, .6, .8, .7, .99, .99]), none) == 2
  # A setting with a diverged seed loses to one whose seeds all trained...
  assert results_lib.choose(grid, np.array([.5, .6, .8, .7, .99, .99]),
                            np.array([0, 0, 0, 0, 0, 1], bool)) == 1
  # ...and is chosen on its live seeds only when every setting has lost one.
  assert results_lib.choose(grid, val, np.array([1, 0, 1, 0, 0, 1], bool)) == 2
  assert results_lib.choose(grid, val, np.ones(6, bool)) is None


@pytest.mark.slow
def test_sweep_run_reports_each_member_and_the_chosen_setting(tmp_path):
  c = config(loss='xent', model='mlp', num_seeds=2, num_steps=30,
             sweep={'learning_rate': '0.05,1e30'})
  r = train.train_and_evaluate(c, str(tmp_path))
  assert r['num_members'] == 4 and r['diverged_members'] == [2, 3]
  assert r['chosen_setting'] == {'setting': 0, 'values': {'learning_rate': 0.05}}
  rows = r['members']
  assert [row['diverged'] for row in rows] == [False, False, True, True]
  assert rows[2]['test_accuracy'] is None and rows[0]['val_accuracy'] is not None
  assert r['test_accuracy_per_seed'] == [rows[0]['test_accuracy'], rows[1]['test_accuracy']]
  assert r['val_accuracy'] == pytest.approx(np.mean([rows[0]['val_accuracy'],
                                                     rows[1]['val_accuracy']]))
  logged = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  last_train = [row for row in logged if 'train/diverged' in row][-1]
  assert last_train['train/diverged'] == 2
  assert 'val/accuracy/m1' in last_train and 'val/accuracy/m2' not in last_train
  assert 'test/accuracy/m0' in logged[-1] and 'test/accuracy/m3' not in logged[-1]
  assert json.load(open(tmp_path / 'config.json'))['sweep']['learning_rate'] == '0.05,1e30'


@pytest.mark.slow
def test_sweep_killed_and_resumed_matches_an_uninterrupted_run(tmp_path):
  args = ['--config=configs/cosine.py', '--config.model=cnn', '--config.width=0.5',
          '--config.num_steps=300', '--config.checkpoint_every_steps=50',
          '--config.log_every_steps=25', '--config.progress=False', '--config.baseline=none',
          '--config.num_seeds=2', '--config.sweep.learning_rate=0.03,0.3',
          '--config.sweep.weight_decay=0,5e-3']
  straight = run_cli('smallfx.main', *args, f'--workdir={tmp_path / "straight"}')
  assert straight.returncode == 0, straight.stderr
  workdir = tmp_path / 'killed'
  start_and_kill_after(args, workdir, step=100)
  resumed = run_cli('smallfx.main', *args, f'--workdir={workdir}')
  assert resumed.returncode == 0, resumed.stderr
  a = json.load(open(tmp_path / 'straight' / 'results.json'))
  b = json.load(open(workdir / 'results.json'))
  assert a['chosen_setting'] == b['chosen_setting']
  assert [m['val_accuracy'] for m in a['members']] == [m['val_accuracy'] for m in b['members']]
  assert a['test_accuracy'] == b['test_accuracy']
  assert 'chosen on validation' in resumed.stdout
