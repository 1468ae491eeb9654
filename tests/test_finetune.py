"""Fine-tuning from an earlier run's weights: the backbone transfers, the head is new."""

import jax
import numpy as np
import pytest

from smallfx import checkpoint

from conftest import run_cli

BASE = ['--config=configs/cosine.py', '--config.width=0.5', '--config.num_steps=20',
        '--config.progress=False', '--config.baseline=none']


@pytest.mark.slow
def test_linear_probe_keeps_the_pretrained_backbone(tmp_path):
  source = tmp_path / 'source'
  r = run_cli('smallfx.main', *BASE, f'--workdir={source}')
  assert r.returncode == 0, r.stderr
  probe = tmp_path / 'probe'
  r = run_cli('smallfx.main', *BASE, f'--workdir={probe}', f'--config.pretrained={source}',
              '--config.finetune=linear', '--config.loss=xent')
  assert r.returncode == 0, r.stderr
  before, _ = checkpoint.load_variables(str(source))
  after, spec = checkpoint.load_variables(str(probe))
  assert spec['loss'] == 'xent'
  # Frozen backbone: weights and BatchNorm statistics unchanged, to the bit.
  for collection in ('params', 'batch_stats'):
    jax.tree.map(np.testing.assert_array_equal, before[collection]['backbone'],
                 after[collection]['backbone'])
  # The head was trained from a fresh start.
  assert not np.allclose(before['params']['head']['kernel'], after['params']['head']['kernel'])


@pytest.mark.slow
def test_full_finetune_moves_the_backbone_and_feature_baseline_runs(tmp_path):
  source = tmp_path / 'source'
  assert run_cli('smallfx.main', *BASE, f'--workdir={source}').returncode == 0
  tuned = tmp_path / 'tuned'
  r = run_cli('smallfx.main', *BASE[:-1], f'--workdir={tuned}', f'--config.pretrained={source}',
              '--config.finetune=full', '--config.freeze_bn=False',
              '--config.baseline=logistic_features')
  assert r.returncode == 0, r.stderr
  assert 'logistic_features' in r.stdout
  before, _ = checkpoint.load_variables(str(source))
  after, _ = checkpoint.load_variables(str(tuned))
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: not np.allclose(a, b),
                                       before['params']['backbone'], after['params']['backbone']))
  assert any(moved)


@pytest.mark.slow
def test_pretrained_for_another_model_is_a_one_line_error(tmp_path):
  source = tmp_path / 'source'
  assert run_cli('smallfx.main', *BASE, f'--workdir={source}').returncode == 0
  r = run_cli('smallfx.main', *BASE, f'--workdir={tmp_path / "x"}', '--config.model=resnet56',
              f'--config.pretrained={source}')
  assert r.returncode == 2 and 'model=resnet20' in r.stderr, r.stderr
