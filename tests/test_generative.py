"""Generative augmentation: the generator, DADA's losses, the GAN stage and its checks."""

import json
import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smallfx import cells
from smallfx import config as config_lib
from smallfx import experiment
from smallfx import generative
from smallfx import methods
from smallfx import steps as steps_lib
from smallfx.errors import UserError

from conftest import REPO, run_cli

BASE = ['--config=configs/cosine.py', '--config.model=cnn', '--config.width=0.5',
        '--config.loss=dada', '--config.generative=dada', '--config.num_steps=20',
        '--config.progress=False', '--config.baseline=none', '--config.gan.steps=8',
        '--config.gan.batch_size=20', '--config.gan.width=0.25',
        '--config.gan.checkpoint_every_steps=4', '--config.gan.sample_every_steps=4']


def _config(**fields):
  config = config_lib.default()
  config.model, config.loss, config.generative = 'cnn', 'dada', 'dada'
  config.update_from_flattened_dict(fields)  # dotted names reach into sub-configs
  return config


@pytest.mark.parametrize('shape, ups', [((28, 28, 1), 2), ((32, 32, 3), 3), ((8, 8, 1), 1),
                                        ((6, 6, 3), 0), ((96, 96, 3), 3)])
def test_the_generator_makes_images_of_the_data_in_range(shape, ups):
  assert generative.upsamplings(shape) == ups
  spec = generative.Gan.from_config(_config(**{'gan.width': 0.25}))
  variables = generative.init_generator(spec, shape, 10, jax.random.key(0))
  g = generative.Generator(shape, 0.25)
  x = generative.generate(g, variables, jax.random.key(1), jnp.arange(12) % 10, 10, spec.z_dim)
  chex.assert_shape(x, (12, *shape))
  assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
  # The label conditions the image: the same z, another class, another image.
  x_other = generative.generate(g, variables, jax.random.key(1), (jnp.arange(12) + 1) % 10, 10,
                                spec.z_dim)
  assert float(jnp.abs(x - x_other).max()) > 1e-4


def test_spread_is_zero_for_identical_images_and_the_std_otherwise():
  images = jnp.concatenate([jnp.full((4, 2, 2, 1), 0.3), jnp.array([0.0, 1.0, 0.0, 1.0])[
      :, None, None, None] * jnp.ones((4, 2, 2, 1))])
  labels = jnp.array([0, 0, 0, 0, 1, 1, 1, 1])
  chex.assert_trees_all_close(generative.spread(images, labels, 2), jnp.array([0.0, 0.5]),
                              atol=1e-6)


def test_the_discriminator_reads_only_the_pair_of_the_examples_class():
  logits = jnp.array([[1.0, 2.0, 3.0, 10.0, 20.0, 30.0]])  # real 0..2, fake 0..2
  real, fake = generative._pair(logits, jnp.array([1]))  # pylint: disable=protected-access
  assert (float(real[0]), float(fake[0])) == (2.0, 20.0)


def _objective(shape=(8, 8, 1), k=4, **fields):
  from smallfx import models  # pylint: disable=g-import-not-at-top
  spec = generative.Gan.from_config(_config(**{'gan.width': 0.25, 'gan.batch_size': 8, **fields}))
  d = models.build('cnn', 2 * k, 0, 0.5)
  return generative.Objective(spec, d, shape, k, np.zeros(1, np.float32),
                              np.ones(1, np.float32))


@pytest.mark.slow
def test_one_iteration_moves_both_networks_and_reports_finite_metrics():
  goal = _objective()
  state = goal.init(jax.random.key(0))
  x = jax.random.uniform(jax.random.key(1), (8, 8, 8, 1))
  y = jax.nn.one_hot(jnp.arange(8) % 4, 4)
  new, metrics = jax.jit(goal.update)(state, x, y)
  assert int(new.step) == 1
  for net in ('generator', 'discriminator'):
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), new.params[net],
                         state.params[net])
    assert max(jax.tree.leaves(moved)) > 0, net
  assert all(np.isfinite(float(v)) for v in metrics.values())
  assert 0.0 < float(metrics['gan/spread']) < 1.0


def test_the_discriminator_learns_real_from_fake_of_each_class():
  """A generator held fixed against real images: the discriminator's loss falls towards 0."""
  goal = _objective(**{'gan.learning_rate': 3e-3})
  state = goal.init(jax.random.key(0))
  x = jax.random.uniform(jax.random.key(1), (8, 8, 8, 1)) + 2.0
  y = jax.nn.one_hot(jnp.arange(8) % 4, 4)
  step = jax.jit(goal.update)
  first = None
  for _ in range(30):
    # The generator is put back each time: only the discriminator learns.
    new, metrics = step(state, x, y)
    first = first or float(metrics['gan/d_loss'])
    state = new.replace(params={**new.params, 'generator': state.params['generator']})
  assert float(metrics['gan/d_loss']) < 0.2 * first


def test_generated_images_join_the_batch_after_the_augmentation():
  k, n_gen = 3, 4
  state = steps_lib.TrainState(
      step=jnp.zeros((), jnp.int32), params={}, batch_stats={}, opt_state={},
      rng=jax.random.key_data(jax.random.key(0)), diverged=jnp.zeros((), bool),
      generator={'value': jnp.array(0.75)})
  generated = lambda v, key: (jnp.full((n_gen, 2, 2, 1), v['value']),
                              jax.nn.one_hot(jnp.full((n_gen,), 2), k))
  seen = []
  augment = lambda key, x, y: (seen.append(x.shape) or x * 0.0, y)
  x, y = steps_lib.draw_batch(state, jnp.full((6, 2, 2, 1), 255, jnp.uint8),
                              jnp.array([0, 1, 0, 1, 0, 1]), batch_size=4, num_classes=k,
                              augment=augment, mean=0.0, std=1.0, generated=generated)
  assert seen == [(4, 2, 2, 1)]  # only the real images are augmented
  chex.assert_shape(x, (8, 2, 2, 1))
  np.testing.assert_allclose(np.asarray(x[:4]), 0.0)
  np.testing.assert_allclose(np.asarray(x[4:]), 0.75)
  np.testing.assert_array_equal(np.asarray(y[4:].argmax(-1)), [2] * n_gen)


@pytest.mark.parametrize('fields, match', [
    ({'generative': 'vae'}, "generative method 'vae'; valid: cgan_augment, dada"),
    ({'loss': 'cosine'}, 'set --config.loss=dada'),
    ({'pretrained': 'efficientnet_lite0'}, 'pretrained and pretrain ask for other weights'),
    ({'gan.discriminator': 'resnet20'}, 'leave gan.discriminator empty'),
    ({'generative': 'cgan_augment', 'loss': 'cosine', 'gan.discriminator': 'vgg'},
     "gan.discriminator 'vgg'"),
    ({'gan.g_steps': 0}, r'gan.g_steps=0 is out of its range'),
    ({'embedding_dim': 8, 'generative': ''}, "loss 'dada' has two outputs per class"),
])
def test_bad_generative_configs_are_refused_before_any_data_is_read(fields, match):
  with pytest.raises(UserError, match=match):
    experiment.resolve(_config(**fields))


def test_the_study_methods_and_a_cells_fingerprint():
  names = [m.name for m in methods.get('dada,dada+aug,cgan_augment+aug')]
  assert names == ['dada', 'dada+aug', 'cgan_augment+aug']
  config = config_lib.study()
  config.methods = 'xent+aug,dada+aug'
  study = cells.resolve(config, '/tmp/unused')
  xent, dada = [cells.Cell(m, 10) for m in study.methods]
  stage = cells.cell_config(study, dada, 'final', {})
  assert (stage.generative, stage.loss, stage.augment) == ('dada', 'dada', 'auto')
  before = cells.fingerprint(study, xent), cells.fingerprint(study, dada)
  config.base.gan.steps = 123  # only the cells that train a GAN read it
  study = cells.resolve(config, '/tmp/unused')
  xent, dada = [cells.Cell(m, 10) for m in study.methods]
  assert cells.fingerprint(study, xent) == before[0]
  assert cells.fingerprint(study, dada) != before[1]


def _one_error_line(result, match):
  assert result.returncode == 2, result.stderr[-2000:]
  lines = [l for l in result.stderr.strip().splitlines() if l.startswith('error')]
  assert len(lines) == 1 and match in lines[0], result.stderr[-2000:]
  return lines[0]


@pytest.mark.slow
def test_dada_end_to_end_with_pictures_resume_and_prediction(tmp_path):
  workdir = str(tmp_path / 'run')
  result = run_cli('smallfx.main', *BASE, '--config.num_seeds=2',
                   '--config.resample_per_seed=True', f'--workdir={workdir}')
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  assert results['gan']['steps'] == 8 and results['gan']['seeds'] == 2
  assert results['test_accuracy'] > 0.3  # 10 digits: chance is 0.1
  with open(os.path.join(workdir, 'model.json')) as f:
    spec = json.load(f)
  assert (spec['loss'], spec['num_outputs']) == ('dada', 20)
  # TensorBoard holds the generator's pictures.
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  events = event_accumulator.EventAccumulator(os.path.join(workdir, 'gan'))
  events.Reload()
  assert [e.step for e in events.Images('gan/samples')] == [4, 8]
  # The picture tool, as a user runs it.
  result = run_cli('tools.gan_pictures', f'--out={tmp_path}/pics', workdir)
  assert result.returncode == 0, result.stderr[-2000:]
  assert os.path.getsize(tmp_path / 'pics' / 'generated_run.png') > 1000
  # Prediction reads the summed pair logits: its ensemble scores as the run's.
  from smallfx import data as data_lib  # pylint: disable=g-import-not-at-top
  from smallfx import predict  # pylint: disable=g-import-not-at-top
  probabilities, _ = predict.predictor(workdir)
  test = data_lib.load(data_lib.Spec()).test
  assert np.mean(probabilities(test.images).argmax(1) == test.labels) == pytest.approx(
      results['test_ensemble_accuracy'], abs=1e-6)
  # A GAN stopped after its step-4 checkpoint resumes from there.
  shutil.rmtree(os.path.join(workdir, 'gan', 'checkpoints', '8'))
  os.remove(os.path.join(workdir, 'gan', 'results.json'))
  os.remove(os.path.join(workdir, 'results.json'))
  shutil.rmtree(os.path.join(workdir, 'checkpoints'))
  result = run_cli('smallfx.main', *BASE, '--config.num_seeds=2',
                   '--config.resample_per_seed=True', f'--workdir={workdir}')
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(workdir, 'gan', 'results.json')) as f:
    assert json.load(f)['resumed_from_step'] == 4


@pytest.mark.slow
def test_cgan_augment_feeds_another_loss(tmp_path):
  result = run_cli('smallfx.main', *BASE, '--config.generative=cgan_augment',
                   '--config.loss=cosine', '--config.gan.ratio=0.25', f'--workdir={tmp_path}')
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / 'results.json') as f:
    assert json.load(f)['gan']['method'] == 'cgan_augment'
  with open(tmp_path / 'model.json') as f:
    assert json.load(f)['num_outputs'] == 10


@pytest.mark.slow
@pytest.mark.parametrize('fields, match', [
    (['--config.gan.learning_rate=1e30'], 'the GAN diverged'),
    (['--config.gan.min_spread=0.99'], 'the GAN collapsed: by step 8'),
    (['--config.gan.batch_size=500'], 'gan.batch_size=500 is larger than the labelled'),
])
def test_a_broken_gan_stops_the_run_with_one_line(tmp_path, fields, match):
  result = run_cli('smallfx.main', *BASE, *fields, '--config.gan.checkpoint_every_steps=0',
                   f'--workdir={tmp_path}')
  line = _one_error_line(result, match)
  if 'diverged' in match or 'collapsed' in match:
    assert 'no checkpoint had been saved yet' in line
    assert not os.path.exists(tmp_path / 'results.json')
  if 'collapsed' in match:  # the same command with the check lowered trains on
    result = run_cli('smallfx.main', *BASE, '--config.gan.checkpoint_every_steps=0',
                     '--config.gan.min_spread=0', f'--workdir={tmp_path}')
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_window_names_its_first_non_finite_step():
  from smallfx import gan  # pylint: disable=g-import-not-at-top
  window = {name: np.ones((5, 2)) for name in gan._WATCHED}  # pylint: disable=protected-access
  assert gan._bad_step(window, 50) is None  # pylint: disable=protected-access
  window['gan/g_loss'][3, 1] = np.nan
  window['gan/d_loss'][4, 0] = np.inf
  assert gan._bad_step(window, 50) == (49, 1, 'gan/g_loss')  # pylint: disable=protected-access


@pytest.mark.slow
def test_the_cifar10_config_trains_a_gan_on_tfds_mock_data(tmp_path):
  """DADA's CIFAR-10 setting: 32x32x3 images, the full-width generator (4x4 start)."""
  tfds = pytest.importorskip('tensorflow_datasets')
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      'cifar10', os.path.join(REPO, 'configs', 'study', 'cifar10.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  study = cells.resolve(config, str(tmp_path))
  assert study.base.dataset == 'tfds:cifar10'
  assert [m.name for m in study.methods if m.overrides.get('generative')] == [
      'dada', 'dada+aug', 'cgan_augment+aug']
  base = config.base
  base.samples_per_class, base.val_per_class = 4, 1
  base.model, base.width, base.gan.batch_size = 'cnn', 0.25, 20
  base.generative, base.loss = 'dada', 'dada'
  exp = experiment.resolve(base)
  with tfds.testing.mock_data(num_examples=150, policy=tfds.testing.MockPolicy.USE_CODE):
    from smallfx import data as data_lib  # pylint: disable=g-import-not-at-top
    from smallfx import gan  # pylint: disable=g-import-not-at-top
    session = gan.set_up(exp, data_lib.load(exp.data))
  assert session.objective.image_shape == (32, 32, 3)
  init, _ = session.initializer()
  state = init()
  kernel = state.params['generator']['Dense_0']['kernel']
  assert kernel.shape[-1] == 4 * 4 * 512  # DADA's CIFAR generator starts at 4x4x512
  state, metrics = session.step()(state, *session.data())
  assert np.isfinite(np.asarray(metrics['gan/d_loss'])).all()
