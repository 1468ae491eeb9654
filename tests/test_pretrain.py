"""Pretraining without labels: the unlabelled pool, the objectives, the run around them."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smallfx import checkpoint
from smallfx import config as config_lib
from smallfx import data as data_lib
from smallfx import experiment
from smallfx import models
from smallfx import pretext
from smallfx.errors import UserError

from conftest import REPO, run_cli

BASE = ['--config=configs/cosine.py', '--config.model=cnn', '--config.width=0.5',
        '--config.num_steps=20', '--config.progress=False', '--config.baseline=none',
        '--config.pretraining.steps=8', '--config.pretraining.batch_size=16',
        '--config.pretraining.checkpoint_every_steps=4']


def _numbered_source(spec):
  """400 train and 100 test images in 4 classes, each image's pixels its own number."""
  def split(start, n):
    ids = np.arange(start, start + n)
    images = np.zeros((n, 4, 4, 1), np.uint8)
    images[:, 0, 0, 0], images[:, 0, 1, 0] = ids // 256, ids % 256
    return data_lib.Split(images, (ids % 4).astype(np.int32))
  return data_lib.Source(split(0, 400), split(400, 100), ['a', 'b', 'c', 'd'])


def _ids(images):
  return set((images[:, 0, 0, 0].astype(int) * 256 + images[:, 0, 1, 0]).tolist())


@pytest.mark.parametrize('per_seed', [False, True])
def test_the_unlabelled_pool_never_holds_labelled_validation_or_test_images(monkeypatch,
                                                                            per_seed):
  monkeypatch.setitem(data_lib.SOURCES, 'numbered', _numbered_source)
  config = config_lib.default()
  config.dataset, config.samples_per_class, config.val_per_class = 'numbered', 5, 3
  config.pretrain, config.num_seeds, config.resample_per_seed = 'dae', 3, per_seed
  config.seed = 7
  exp = experiment.resolve(config)
  dataset = data_lib.load(exp.data)
  from smallfx import pretrain  # pylint: disable=g-import-not-at-top
  ks = pretrain.subsamples(exp)
  assert ks == ([7, 8, 9] if per_seed else [0])
  pool = _ids(data_lib.unlabelled(dataset, exp.data, ks))
  labelled = set().union(*(_ids(data_lib.resample_train(dataset, exp.data, k).images)
                           for k in ks))
  assert len(labelled) == 4 * 5 * len(ks) or per_seed  # sub-samples may overlap
  assert not pool & labelled
  assert not pool & _ids(dataset.val.images)
  assert not pool & _ids(dataset.test.images)
  # Everything else of the training pool is in it.
  assert pool | labelled | _ids(dataset.val.images) == set(range(400))


def test_a_pool_that_the_labels_take_whole_or_an_empty_folder_is_refused(tmp_path):
  spec = data_lib.Spec(samples_per_class=0, val_per_class=0)
  dataset = data_lib.load(spec)
  with pytest.raises(UserError, match='takes the whole training pool'):
    data_lib.unlabelled(dataset, spec, [0])
  (tmp_path / 'notes.txt').write_text('no images here')
  spec = data_lib.Spec(unlabelled=f'folder:{tmp_path}')
  with pytest.raises(UserError, match='holds no image files'):
    data_lib.unlabelled(data_lib.load(spec), spec, [0])


def test_an_unlabelled_folder_is_read_at_the_runs_size(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  (tmp_path / 'sub').mkdir()
  for i in range(3):
    Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(tmp_path / 'sub' / f'{i}.png')
  spec = data_lib.Spec(unlabelled=f'folder:{tmp_path}')
  images = data_lib.unlabelled(data_lib.load(spec), spec, [0])
  assert images.shape == (3, 8, 8, 1) and images.dtype == np.uint8


def test_nt_xent_matches_its_definition():
  rng = np.random.default_rng(0)
  z1, z2 = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
  z = np.concatenate([z1, z2])
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  sim = z @ z.T / 0.5
  losses = []
  for i in range(12):
    j = (i + 6) % 12
    others = [sim[i, k] for k in range(12) if k != i]
    losses.append(-sim[i, j] + np.log(np.sum(np.exp(others))))
  np.testing.assert_allclose(pretext.nt_xent(jnp.array(z1), jnp.array(z2), 0.5),
                             np.mean(losses), rtol=1e-5)
  # Views equal to each other and apart from the rest: a lower loss.
  apart = np.eye(6, 5) * 10
  assert pretext.nt_xent(jnp.array(apart), jnp.array(apart), 0.5) < np.mean(losses)


def _objective(method, model='cnn', shape=(8, 8, 1)):
  config = config_lib.default()
  config.pretrain, config.pretraining.batch_size = method, 16
  config.pretraining.warmup_steps = 0
  spec = pretext.Pretraining.from_config(config)
  backbone = models.BACKBONES[model](width=0.5, dtype=jnp.float32)
  return pretext.Objective(spec, backbone, shape, np.zeros(shape[-1]), np.ones(shape[-1]))


def test_stacked_ae_gives_each_stage_a_phase_then_the_whole_stack():
  goal = _objective('stacked_ae')
  phases = goal.phases()
  assert [p.stage for p in phases] == [0, 1, 2, None]
  assert [(p.start, p.end) for p in phases] == [(0, 250), (250, 500), (500, 750), (750, 1000)]
  # Each stage decoder rebuilds the stage's input: the image, then the stage below.
  assert goal.stage_shapes == [(4, 4, 16), (2, 2, 32), (64,)]
  assert sorted(goal.heads) == ['decoder', 'stage_0', 'stage_1', 'stage_2']


@pytest.mark.parametrize('model', ['cnn', 'resnet20'])
def test_a_greedy_phase_moves_its_stage_alone(model):
  goal = _objective('stacked_ae', model)
  state = goal.init(jax.random.key(0))
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (40, 8, 8, 1), np.uint8))
  phase = goal.phases()[1]
  step = jax.jit(lambda st: goal.update(phase, st, goal.draw(st, images)))
  new, _ = step(state)
  new, metrics = step(new)
  assert np.isfinite(metrics['pretrain/loss'])
  backbone = goal.backbone
  for name, before in state.params['backbone'].items():
    moved = any(jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), before,
                                             new.params['backbone'][name])))
    assert moved == (backbone.stage_of(name) == 1), name
    # No gradient reaches a frozen stage, so its moments stay empty for its own phase.
    moments = new.opt_state[0].mu['backbone'][name]
    assert any(np.any(m != 0) for m in jax.tree.leaves(moments)) == moved, name
  for head in goal.heads:
    moved = any(jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b),
                                             state.params[head], new.params[head])))
    assert moved == (head == 'stage_1'), head


@pytest.mark.parametrize('method', ['dae', 'simclr'])
def test_a_few_steps_lower_the_loss(method):
  goal = _objective(method, shape=(8, 8, 1))
  images = jnp.asarray(np.round(np.asarray(data_lib.load(data_lib.Spec()).pool.images)))
  phase = goal.phases()[0]
  step = jax.jit(lambda st: goal.update(phase, st, goal.draw(st, images)))
  state = goal.init(jax.random.key(1))
  losses = []
  for _ in range(60):
    state, metrics = step(state)
    losses.append(float(metrics['pretrain/loss']))
  # simclr's floor at this batch is far from 0; its start is log(2B - 1).
  assert np.mean(losses[-10:]) < (0.9 if method == 'dae' else 0.97) * np.mean(losses[:10]), losses


def test_bad_pretraining_configs_are_refused_before_any_data_is_read():
  config = config_lib.default()
  config.pretrain = 'autoencoder'
  with pytest.raises(UserError, match="unknown pretrain method 'autoencoder'.*dae"):
    experiment.resolve(config)
  config.pretrain, config.model = 'stacked_ae', 'efficientnet_lite0'
  with pytest.raises(UserError, match='needs a backbone with stages'):
    experiment.resolve(config)
  config.pretrain, config.model, config.pretrained = 'dae', 'cnn', 'efficientnet_lite0'
  with pytest.raises(UserError, match='set one of them'):
    experiment.resolve(config)
  config.pretrained, config.pretraining.temperature = '', 0.0
  config.pretrain = 'simclr'
  with pytest.raises(UserError, match='temperature'):
    experiment.resolve(config)


@pytest.mark.slow
@pytest.mark.parametrize('method', ['dae', 'stacked_ae', 'simclr'])
def test_each_method_pretrains_then_every_seed_starts_from_its_own_backbone(tmp_path, method):
  """A linear probe keeps the backbone: each member's must be its seed's pretrained one."""
  workdir = tmp_path / method
  r = run_cli('smallfx.main', *BASE, f'--workdir={workdir}', f'--config.pretrain={method}',
              '--config.num_seeds=2', '--config.sweep.learning_rate=0.05,0.1',
              '--config.finetune=linear')
  assert r.returncode == 0, r.stderr
  done = json.loads((workdir / 'pretrain' / 'results.json').read_text())
  assert done['steps'] == 8 and done['seeds'] == 2 and done['method'] == method
  pretrained, spec = checkpoint.load_variables(str(workdir / 'pretrain'))
  assert spec['pretrained_seeds'] == 2
  tuned, tuned_spec = checkpoint.load_variables(str(workdir))
  assert tuned_spec['mean'] == spec['mean']  # normalised as in pretraining
  for m in range(4):  # members: setting m // 2, seed m % 2
    jax.tree.map(lambda a, b, m=m: np.testing.assert_array_equal(a[m % 2], b[m]),
                 pretrained['params']['backbone'], tuned['params']['backbone'])
  seeds_differ = jax.tree.leaves(jax.tree.map(lambda a: not np.array_equal(a[0], a[1]),
                                              pretrained['params']['backbone']))
  assert any(seeds_differ)
  results = json.loads((workdir / 'results.json').read_text())
  assert 0 <= results['test_accuracy'] <= 1
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4).save(tmp_path / 'x.png')
  r = run_cli('smallfx.predict', f'--workdir={workdir}', str(tmp_path / 'x.png'))
  assert r.returncode == 0 and 'x.png' in r.stdout, r.stderr


@pytest.mark.slow
def test_an_interrupted_pretraining_resumes_to_the_same_weights_and_pictures_draw(tmp_path):
  workdir = tmp_path / 'run'
  args = [*BASE, f'--workdir={workdir}', '--config.pretrain=dae']
  assert run_cli('smallfx.main', *args).returncode == 0
  r = subprocess.run([sys.executable, 'tools/pretrain_pictures.py', f'--out={tmp_path / "pics"}',
                      '--points=60', '--images=4', str(workdir)], capture_output=True,
                     text=True, cwd=REPO)
  assert r.returncode == 0, r.stderr[-2000:]
  assert sorted(os.listdir(tmp_path / 'pics')) == ['embeddings.png', 'reconstructions_run.png']
  whole, _ = checkpoint.load_variables(str(workdir / 'pretrain'))
  # As if killed after the checkpoint at step 4: later files and the training gone.
  for name in os.listdir(workdir):
    if name not in ('pretrain', 'config.json'):
      path = workdir / name
      shutil.rmtree(path) if path.is_dir() else path.unlink()
  shutil.rmtree(workdir / 'pretrain' / 'checkpoints' / '8')
  (workdir / 'pretrain' / 'results.json').unlink()
  r = run_cli('smallfx.main', *args)
  assert r.returncode == 0, r.stderr
  done = json.loads((workdir / 'pretrain' / 'results.json').read_text())
  assert done['resumed_from_step'] == 4
  resumed, _ = checkpoint.load_variables(str(workdir / 'pretrain'))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               whole['params'], resumed['params'])


@pytest.mark.slow
def test_no_unlabelled_images_and_a_changed_config_are_one_line(tmp_path):
  r = run_cli('smallfx.main', *BASE, f'--workdir={tmp_path / "a"}', '--config.pretrain=dae',
              '--config.samples_per_class=0', '--config.val_per_class=0')
  assert r.returncode == 2, r.stderr
  assert r.stderr.strip().count('\n') == 0 and 'takes the whole training pool' in r.stderr
  empty = tmp_path / 'empty'
  empty.mkdir()
  r = run_cli('smallfx.main', *BASE, f'--workdir={tmp_path / "b"}', '--config.pretrain=dae',
              f'--config.unlabelled=folder:{empty}')
  assert r.returncode == 2 and 'holds no image files' in r.stderr, r.stderr
