"""smallfx.tuning: CPU tuning behind one switch, decided at a run's set-up."""

import fnmatch
import logging
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import conftest
from smallfx import models
from smallfx import tuning
from smallfx.models import onednn

REPO = conftest.REPO
ONEDNN_BUILDS = sys.platform == 'linux' and os.uname().machine == 'x86_64'


@pytest.fixture(autouse=True)
def undecided(monkeypatch):
  """Each test starts as a fresh process would: nothing prepared, the switch unset."""
  monkeypatch.setattr(tuning, '_state', {'on': None, 'onednn': None})
  monkeypatch.delenv(tuning.ENV, raising=False)


def _make_step(model):
  """One SGD step of `model` (a new function each call: jit traces it afresh)."""
  def step(variables, x, y):
    def loss_fn(params):
      out, new_state = model.apply({**variables, 'params': params}, x, train=True,
                                   mutable=['batch_stats'])
      return optax.softmax_cross_entropy_with_integer_labels(out['output'], y).mean(), new_state
    (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables['params'])
    params = jax.tree.map(lambda p, g: p - 0.1 * g, variables['params'], grads)
    return loss, grads, {**new_state, 'params': params}
  return step


@pytest.mark.parametrize('name,shape', [('cnn', (8, 28, 28, 1)), ('resnet20', (8, 32, 32, 3))])
@pytest.mark.slow
def test_train_step_is_the_same_with_cpu_tuning_on_and_off(name, shape):
  """Loss, gradients, new weights and batch statistics: equal to float rounding."""
  model = models.build(name, 10)
  x = jax.random.normal(jax.random.key(0), shape)
  y = jnp.arange(shape[0]) % 10
  variables = model.init(jax.random.key(1), x[:2], train=False)
  got, programs = {}, {}
  for on in (True, False):
    with tuning.forced(on):
      step = jax.jit(_make_step(model))
      programs[on] = step.lower(variables, x, y).as_text()
      got[on] = step(variables, x, y)
  assert programs[True] != programs[False]  # tuning changed what XLA was given...
  assert 'Smallfx' not in programs[False]
  if jax.default_backend() == 'cpu' and ONEDNN_BUILDS and name == 'resnet20':
    assert 'SmallfxConv' in programs[True]
  chex.assert_trees_all_close(got[True], got[False], rtol=2e-4, atol=2e-5)  # ...not the values


def test_models_apply_in_either_position(cpu_tuning):
  """The fixture every model test can take: one run per switch position."""
  model = models.build('resnet20', 10)
  x = jnp.ones((2, 16, 16, 3))
  variables = model.init(jax.random.key(0), x)
  lowered = jax.jit(lambda v: model.apply(v, x)).lower(variables).as_text()
  assert ('SmallfxConv' in lowered) == (cpu_tuning and tuning.onednn_calls())
  assert tuning.cpu_formulations() == (cpu_tuning and jax.default_backend() == 'cpu')


@pytest.mark.parametrize('platform,requested,env,on', [
    ('cpu', True, None, True),
    ('cpu', False, None, False),
    ('cpu', True, '0', False),
    ('cpu', True, 'false', False),
    ('cpu', True, '1', True),
    ('gpu', True, None, False),
    ('tpu', True, '1', False),
])
def test_prepare_decides_by_platform_config_and_environment(platform, requested, env, on,
                                                           monkeypatch):
  if env is not None:
    monkeypatch.setenv(tuning.ENV, env)
  monkeypatch.setattr(onednn, 'available', lambda build=True: True)  # not what is tested
  assert tuning.enabled(platform, requested) == on
  tuning.prepare(platform, requested)
  on_cpu = jax.default_backend() == 'cpu'
  assert tuning.cpu_formulations() == (on and on_cpu)
  assert tuning.onednn_calls() == (on and on_cpu)
  assert (tuning.compiler_options('cpu') is not None) == (
      on and tuning._cpu_options_accepted())  # pylint: disable=protected-access
  assert tuning.compiler_options('gpu') is None


def test_prepare_off_never_builds_onednn(monkeypatch):
  monkeypatch.setattr(onednn, 'available', lambda build=True: pytest.fail('looked for oneDNN'))
  tuning.prepare('cpu', False)
  assert not tuning.onednn_calls()


# Traces a ResNet-20 train step without prepare() (a notebook), then calls prepare().
# CXX is a stand-in compiler that notes each call and fails: the build is announced,
# attempted and refused, and XLA's convolutions stay.
_NOTEBOOK = """
import os, sys, jax, jax.numpy as jnp
from smallfx import models, tuning
model = models.build('resnet20', 10)
x = jnp.ones((2, 16, 16, 3))
v = model.init(jax.random.key(0), x)
f = jax.jit(jax.grad(lambda v: jnp.sum(model.apply(v, x, train=True, mutable=['batch_stats'])[0]['output'])))
hlo = f.lower(v).as_text()
jax.block_until_ready(f(v))
print('traced', 'Smallfx' in hlo, os.path.exists(sys.argv[1]), flush=True)
tuning.prepare('cpu', True)
print('prepared', os.path.exists(sys.argv[1]), tuning.onednn_calls(), flush=True)
"""


@pytest.mark.skipif(not ONEDNN_BUILDS, reason='oneDNN convolutions are built for x86-64 Linux')
@pytest.mark.slow
def test_no_compiler_runs_while_a_model_is_traced(tmp_path):
  called = tmp_path / 'compiler_called'
  compiler = tmp_path / 'cxx'
  compiler.write_text(f'#!/bin/sh\ntouch {called}\nexit 1\n')
  compiler.chmod(0o755)
  r = subprocess.run([sys.executable, '-c', _NOTEBOOK, str(called)], cwd=REPO, timeout=600,
                     capture_output=True, text=True, check=False, env=dict(
                         os.environ, JAX_PLATFORMS='cpu', CXX=str(compiler),
                         SMALLFX_ONEDNN_CACHE=str(tmp_path / 'empty_cache')))
  assert r.returncode == 0, r.stderr
  assert r.stdout.split('\n')[:2] == ['traced False False', 'prepared True False'], r.stdout
  announced = [line for line in r.stderr.splitlines() if line.startswith('building oneDNN')]
  assert len(announced) == 1 and str(tmp_path / 'empty_cache') in announced[0], r.stderr


@pytest.mark.skipif(not ONEDNN_BUILDS, reason='oneDNN convolutions are built for x86-64 Linux')
@pytest.mark.slow
def test_prepare_builds_once_with_one_line_then_a_notebook_uses_the_build(tmp_path):
  code = ('from smallfx import tuning; tuning.prepare("cpu", True); tuning.prepare("cpu", True);'
          'print(tuning.onednn_calls())')
  env = dict(os.environ, JAX_PLATFORMS='cpu', SMALLFX_ONEDNN_CACHE=str(tmp_path))
  runs = [subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env, timeout=600,
                         capture_output=True, text=True, check=False) for _ in range(2)]
  for r in runs:
    assert r.returncode == 0 and r.stdout.strip() == 'True', r.stderr
  first, second = (r.stderr.strip().splitlines() for r in runs)
  assert len(first) == 1 and first[0].startswith('building oneDNN convolutions for this CPU (once'), first
  assert str(tmp_path) in first[0]
  assert not second, second  # built already: nothing to say
  # A notebook (no prepare) on this machine now gets the build without a word.
  code = 'from smallfx import tuning; print(tuning.onednn_calls())'
  r = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env, timeout=600,
                     capture_output=True, text=True, check=False)
  assert (r.stdout.strip(), r.stderr.strip()) == ('True', ''), r.stderr


@pytest.mark.skipif(not ONEDNN_BUILDS, reason='oneDNN convolutions are built for x86-64 Linux')
def test_tests_leave_the_users_onednn_cache_alone():
  """tests/conftest.py: a session's build goes to a temporary folder, subprocesses' too."""
  user_cache, before = conftest.USER_ONEDNN_CACHE
  assert os.path.realpath(onednn.cache_dir()) == os.path.realpath(conftest.ONEDNN_CACHE)
  assert not os.path.realpath(conftest.ONEDNN_CACHE).startswith(os.path.realpath(user_cache))
  assert onednn.available()  # built here, if nothing built it before
  assert any(f.endswith('.so') for f in os.listdir(conftest.ONEDNN_CACHE))
  r = conftest.run_cli('smallfx.tuning', env={'JAX_PLATFORMS': 'cpu'})
  assert r.returncode == 0, r.stderr
  assert os.path.realpath(conftest.ONEDNN_CACHE) in r.stdout, r.stdout
  assert conftest._listing(user_cache) == before  # pylint: disable=protected-access


def test_refused_xla_option_is_said_once(monkeypatch, caplog):
  monkeypatch.setattr(tuning, 'CPU_OPTIONS', {'xla_cpu_no_such_option': 'true'})
  tuning._cpu_options_accepted.cache_clear()  # pylint: disable=protected-access
  try:
    with caplog.at_level(logging.WARNING):
      assert tuning.compiler_options('cpu') is None
      assert tuning.compiler_options('cpu') is None
  finally:
    tuning._cpu_options_accepted.cache_clear()  # pylint: disable=protected-access
  warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert len(warned) == 1, warned
  assert 'xla_cpu_no_such_option=true' in warned[0] and 'slower' in warned[0]
  assert '\n' not in warned[0]


def test_accepted_options_say_nothing(caplog):
  with caplog.at_level(logging.WARNING):
    assert tuning.compiler_options('cpu') == tuning.CPU_OPTIONS
  assert not caplog.records


@pytest.mark.parametrize('env,plugins,devices,cpu', [
    ({'JAX_PLATFORMS': 'cpu'}, ['jax_cuda12_plugin'], ['/dev/nvidia0'], True),
    ({'JAX_PLATFORMS': 'cuda,cpu'}, [], [], False),
    ({'JAX_PLATFORMS': 'tpu'}, [], [], False),
    ({}, [], [], True),
    ({}, ['jax_cuda12_plugin'], [], True),  # a GPU plugin on a machine without a GPU
    ({}, ['jax_cuda12_plugin'], ['/dev/nvidia0'], False),
    ({}, ['libtpu'], ['/dev/accel0'], False),
])
def test_will_use_cpu_without_starting_jax(env, plugins, devices, cpu, monkeypatch):
  monkeypatch.setattr(tuning, '_installed', lambda module: module in plugins)
  monkeypatch.setattr(tuning, '_device_files',
                      lambda pattern: any(fnmatch.fnmatch(d, pattern) for d in devices))
  assert tuning.will_use_cpu(env) == cpu


@pytest.mark.parametrize('argv,off', [
    ([], False),
    (['--config=configs/cosine.py', '--config.cpu_tuning=False'], True),
    (['--config.cpu_tuning=0'], True),
    (['--noconfig.cpu_tuning'], True),
    (['--config.cpu_tuning=false', '--config.cpu_tuning=true'], False),
    (['--config.cpu_tuning'], False),
])
def test_command_line_switch_is_seen_before_jax_starts(argv, off):
  assert tuning._argv_turns_off(argv) == off  # pylint: disable=protected-access


def test_import_leaves_jax_unimported():
  """An entry point's relaunch runs before JAX starts: importing tuning must not start it."""
  r = subprocess.run([sys.executable, '-c', 'import sys; from smallfx import malloc, tuning; '
                      'print("jax" in sys.modules)'], cwd=REPO, capture_output=True, text=True,
                     timeout=120, check=False)
  assert r.stdout.strip() == 'False', r.stderr


def test_forced_restores_what_was_decided():
  tuning.prepare('cpu', False)
  with tuning.forced(True, onednn=False):
    assert tuning.cpu_formulations() == (jax.default_backend() == 'cpu')
    assert not tuning.onednn_calls()
  assert not tuning.cpu_formulations()
  assert tuning._state == {'on': False, 'onednn': None}  # pylint: disable=protected-access
