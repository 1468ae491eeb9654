"""The training path: the jitted step, seeds, outputs, resume and user errors."""

import collections
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smallfx import checkpoint
from smallfx import config as base
from smallfx import cli
from smallfx import evaluation
from smallfx import experiment
from smallfx import metrics
from smallfx import members
from smallfx import steps as steps_lib
from smallfx import train
from smallfx import tuning

from conftest import REPO, run_cli, start_and_kill_after

# Whole runs where the model is not the point: an MLP with batch norm carries state and
# statistics as ResNet-20 does, in a fraction of its compile time.
QUICK = ['--config.model=mlp', '--config.norm=batch', '--config.num_steps=120',
         '--config.log_every_steps=20', '--config.eval_every_steps=40',
         '--config.checkpoint_every_steps=40', '--config.progress=False']


# Where convolutions are the point: the smallest ResNet-20.
RESNET = dict(model='resnet20', width=0.25, norm='none')


def small_config(**kw):
  c = base.default()
  c.update(dict(model='mlp', norm='batch', num_steps=30, augment='crop(pad=1)|flip'))
  c.update(kw)
  return c


def _setup(config):
  run = train.set_up(config)
  init, _ = run.initializer()
  return run, init()


@pytest.mark.slow
def test_train_step_compiles_once_and_learns(monkeypatch):
  config = small_config(loss='cosine_xent', **RESNET)
  monkeypatch.setattr(steps_lib, 'update', chex.assert_max_traces(steps_lib.update, n=1))
  run, state = _setup(config)
  step = run.train_step()
  images, labels = run.training_data()
  losses = []
  for _ in range(30):
    state, m = step(state, images, labels)
    losses.append(float(m['train/loss'][0]))
  assert set(m) >= {'train/loss', 'train/accuracy', 'train/learning_rate', 'train/grad_norm',
                    'train/param_norm', 'train/update_norm'}
  chex.assert_shape(m['train/loss'], (1,))
  assert int(state.step[0]) == 30
  assert np.mean(losses[-5:]) < np.mean(losses[:5])


@pytest.mark.slow
def test_seeds_are_independent_and_seed0_matches_a_single_run():
  run1, s1 = _setup(small_config(num_seeds=1))
  run3, s3 = _setup(small_config(num_seeds=3))
  step1, step3 = run1.train_step(), run3.train_step()
  images, labels = run1.training_data()
  for _ in range(5):
    s1, m1 = step1(s1, images, labels)
    s3, m3 = step3(s3, images, labels)
  chex.assert_trees_all_close(jax.tree.map(lambda x: x[0], s3.params),
                              jax.tree.map(lambda x: x[0], s1.params), rtol=1e-4, atol=1e-5)
  first = jax.tree.leaves(s3.params)[0]
  assert not np.allclose(first[0], first[1]), 'seeds must start from different weights'
  chex.assert_shape(m3['train/loss'], (3,))


@pytest.mark.slow
def test_unrolled_and_vmapped_seeds_agree():
  # Unrolling changes how the seeds' convolutions are laid out; batch norm rides along.
  run, state = _setup(small_config(num_seeds=2, **RESNET))
  images, labels = run.training_data()
  results = []
  for unroll in (False, True):
    step = run.train_step(layout=dataclasses.replace(run.layout, unroll=unroll))
    s = jax.tree.map(jnp.copy, state)
    for _ in range(3):
      s, m = step(s, images, labels)
    results.append((s.params, m['train/loss']))
  chex.assert_trees_all_close(results[0], results[1], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_evaluate_pads_last_batch_and_counts_every_image():
  run, state = _setup(small_config(num_seeds=2))
  ev, test = run.eval_step(), run.dataset.test
  both = {'both': [0, 1]}
  full = evaluation.evaluate(ev, [state], test, len(test.labels), both)
  chunked = evaluation.evaluate(ev, [state], test, 64, both)  # 535 = 8 * 64 + 23
  np.testing.assert_allclose(chunked['accuracy'], full['accuracy'])
  np.testing.assert_allclose(chunked['loss'], full['loss'], rtol=1e-5)
  assert chunked['ensemble_accuracy'] == full['ensemble_accuracy']
  chex.assert_shape(full['accuracy'], (2,))


@pytest.mark.slow
def test_main_writes_outputs_and_reports_again(tmp_path):
  workdir = str(tmp_path / 'run')
  # The default cache folder, and every program kept however fast it compiled.
  cache = {'XDG_CACHE_HOME': str(tmp_path / 'cache'), 'JAX_COMPILATION_CACHE_DIR': None,
           'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0'}
  r = run_cli('smallfx.main', '--config=configs/cosine.py', f'--workdir={workdir}', *QUICK,
              env=cache)
  assert r.returncode == 0, r.stderr
  # The train step is kept for the next run with the same shapes.
  kept = os.listdir(tmp_path / 'cache' / 'smallfx' / 'jax')
  assert any(name.startswith('jit_step') for name in kept), kept
  assert 'test accuracy' in r.stdout and 'random_forest' in r.stdout
  for name in ('config.json', 'metrics.jsonl', 'results.json', 'model.json', 'checkpoints'):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir))
  results = json.load(open(os.path.join(workdir, 'results.json')))
  assert results['steps'] == 120 and 0.0 <= results['test_accuracy'] <= 1.0
  assert 0.5 < results['baseline_accuracy'] <= 1.0
  assert results['images_per_sec'] > 0 and results['versions']['jax'] == jax.__version__
  logged = metrics.read(workdir)
  assert [m['step'] for m in logged if 'train/loss' in m] == list(range(20, 121, 20))
  assert any('val/accuracy' in m for m in logged)
  # A finished run reports again without training.
  again = run_cli('smallfx.main', '--config=configs/cosine.py', f'--workdir={workdir}', *QUICK)
  assert again.returncode == 0 and again.stdout == r.stdout
  assert len(metrics.read(workdir)) == len(logged)
  variables, spec = checkpoint.load_variables(workdir)
  assert spec['num_seeds'] == 1 and spec['loss'] == 'cosine'
  assert jax.tree.leaves(variables['params'])[0].shape[0] == 1


@pytest.mark.slow
def test_several_steps_per_dispatch_train_and_log_like_one(tmp_path, monkeypatch):
  """Chunks of 4 steps (a scan) stop at every log boundary and give the same run."""
  calls, make = collections.Counter(), train.make_train_step

  def counting_make(*args, steps=1, **kwargs):
    fn = make(*args, steps=steps, **kwargs)
    return lambda *a: (calls.update([steps]), fn(*a))[1]
  monkeypatch.setattr(train, 'make_train_step', counting_make)
  results, logged = {}, {}
  for n in (1, 4):
    config = small_config(num_steps=12, log_every_steps=5, steps_per_dispatch=n,
                          baseline='none', progress=False)
    workdir = str(tmp_path / f'n{n}')
    results[n] = train.train_and_evaluate(config, workdir)
    logged[n] = metrics.read(workdir)
  assert [r['step'] for r in logged[4]] == [r['step'] for r in logged[1]] == [5, 10, 12, 12]
  for a, b in zip(logged[1], logged[4]):
    for k in ('train/loss', 'train/grad_norm', 'train/learning_rate'):
      if k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, err_msg=k)
  np.testing.assert_allclose(results[4]['test_accuracy'], results[1]['test_accuracy'], atol=0.01)
  # 12 single steps for n=1; then 0-3 and 5-8 as chunks, 4, 9, 10 and 11 alone.
  assert calls == {1: 12 + 4, 4: 2}, calls


@pytest.mark.skipif(importlib.util.find_spec('torch') is None, reason='needs torch')
def test_metrics_writer_leaves_torch_unimported(tmp_path):
  """Importing torch for tensorboardX cost every run over a second; torch still imports later."""
  code = ('import sys; from smallfx import metrics; w = metrics.Writer(sys.argv[1]); '
          'w.write(3, {"train/loss": 0.5}); w.close(); '
          'assert "torch" not in sys.modules, "torch was imported"; import torch')
  r = subprocess.run([sys.executable, '-c', code, str(tmp_path)], cwd=REPO,
                     capture_output=True, text=True, check=False)
  assert r.returncode == 0, r.stderr
  assert metrics.read(str(tmp_path)) == [{'step': 3, 'train/loss': 0.5}]
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(tmp_path))


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
  # Enough steps after 100 to kill it in time.
  args = ['--config=configs/cosine.py', *QUICK, '--config.baseline=none', '--config.num_steps=1000',
          '--config.checkpoint_every_steps=100']
  straight = run_cli('smallfx.main', *args, f'--workdir={tmp_path / "straight"}')
  assert straight.returncode == 0, straight.stderr
  workdir = tmp_path / 'killed'
  start_and_kill_after(args, workdir, step=100)
  assert not (workdir / 'results.json').exists()
  resumed = run_cli('smallfx.main', *args, f'--workdir={workdir}')
  assert resumed.returncode == 0, resumed.stderr
  a = json.load(open(tmp_path / 'straight' / 'results.json'))
  b = json.load(open(workdir / 'results.json'))
  assert b['resumed_from_step'] >= 100
  assert a['test_accuracy'] == b['test_accuracy']
  np.testing.assert_allclose(a['test_loss'], b['test_loss'], rtol=1e-5)
  steps = [m['step'] for m in metrics.read(workdir) if 'train/loss' in m]
  assert steps == sorted(set(steps)), 'resumed metrics must not repeat steps'


@pytest.mark.parametrize('flag, message', [
    ('--config.lossy=xent', 'lossy'),
    ('--config.loss=cosin', "unknown loss 'cosin'; valid: cosine, cosine_xent, dada, xent, xent_smooth"),
    ('--config.model=resnet21', "unknown model 'resnet21'; valid:.*resnet20"),
    ('--config.optimizer=adam', "unknown optimizer 'adam'; valid: adamw, sgd"),
    ('--config.dataset=digitz', "unknown dataset 'digitz'"),
    ('--config.samples_per_class=500', "class '.' has only"),
    ('--config.dataset=fashion_mnist --config.data_dir=/nonexistent', 'apt-get install'),
    ('--config.augment=flop', "flop"),
    ('--config.steps_per_dispatch=-1', 'steps_per_dispatch must be >= 0'),
])
@pytest.mark.slow
def test_bad_input_is_one_line_and_exit_2(tmp_path, flag, message):
  r = run_cli('smallfx.main', '--config=configs/cosine.py', f'--workdir={tmp_path}',
              *flag.split())
  assert r.returncode == 2, r.stderr
  lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1 and 'Traceback' not in r.stderr, r.stderr
  assert __import__('re').search(message, lines[0]), lines[0]


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  r = run_cli('smallfx.main', '--config=configs/xent.py', f'--workdir={tmp_path}',
              '--config.model=mlp', '--config.learning_rate=300', '--config.schedule=constant',
              '--config.warmup_steps=100', '--config.checkpoint_every_steps=5',
              '--config.log_every_steps=5', '--config.num_steps=200', '--config.progress=False')
  assert r.returncode == 2
  line = r.stderr.strip().splitlines()[-1]
  bad = int(__import__('re').search(r'non-finite at step (\d+)', line).group(1))
  variables, _ = checkpoint.load_variables(str(tmp_path))
  assert f'(step {bad - bad % 5 if bad % 5 else bad - 5})' in line
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(variables))


@pytest.mark.slow
def test_changed_config_refuses_to_resume(tmp_path):
  r = run_cli('smallfx.main', '--config=configs/cosine.py', f'--workdir={tmp_path}', *QUICK,
              '--config.num_steps=20')
  assert r.returncode == 0, r.stderr
  r = run_cli('smallfx.main', '--config=configs/cosine.py', f'--workdir={tmp_path}', *QUICK,
              '--config.num_steps=20', '--config.learning_rate=0.05')
  assert r.returncode == 2 and 'learning_rate' in r.stderr


def test_compilation_cache_folder_and_switch(monkeypatch):
  monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR', raising=False)
  monkeypatch.setenv('XDG_CACHE_HOME', '/somewhere')
  assert cli.compilation_cache_dir() == '/somewhere/smallfx/jax'
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', '')  # empty: off
  saved = jax.config.jax_compilation_cache_dir
  try:
    cli.enable_compilation_cache()
    assert jax.config.jax_compilation_cache_dir is None
  finally:
    jax.config.update('jax_compilation_cache_dir', saved)


@pytest.mark.parametrize('model', ['cnn', 'resnet20'])
@pytest.mark.slow
def test_quickly_compiled_init_gives_the_same_state(model):
  """The init program's options change its compile time, not one bit of the state."""
  exp = experiment.resolve(small_config(model=model, norm='none', num_seeds=2))
  setup = experiment.build(exp, 10, 100, (8, 8, 3))
  keys = members.seed_keys(3, exp.grid)
  hyper = experiment.member_hyperparams(exp)
  init = jax.vmap(lambda k, h: steps_lib.init_state(setup.model, setup.tx, (8, 8, 3), k, h))
  options = tuning.init_compiler_options(jax.default_backend())
  quick = jax.jit(init, compiler_options=options)(keys, hyper)
  full = jax.jit(init)(keys, hyper)
  if jax.default_backend() == 'cpu':
    assert options
  chex.assert_trees_all_equal(quick, full)
