"""A run refuses what it cannot do well, and loses nothing it has done."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from smallfx import checkpoint
from smallfx import config as base
from smallfx import evaluation
from smallfx import experiment
from smallfx import metrics
from smallfx import train
from smallfx import workdir
from smallfx.errors import UserError

from conftest import REPO, run_cli


def config(**kw):
  c = base.default()
  c.update(dict(model='mlp', num_steps=20, log_every_steps=10, eval_every_steps=10,
                checkpoint_every_steps=10, progress=False, baseline='none'))
  c.update(kw)
  return c


@pytest.mark.parametrize('field, value, message', [
    ('learning_rate', -1.0, 'learning_rate must be > 0, got -1'),
    ('num_steps', -5, 'num_steps must be >= 0, got -5'),
    ('eval_batch_size', 0, 'eval_batch_size must be >= 1'),
    ('log_every_steps', 0, 'log_every_steps must be >= 1'),
    ('width', 0.0, 'width must be > 0'),
    ('image_size', -3, 'image_size must be'),
    ('momentum', 1.5, r'momentum must be in \[0, 1\)'),
    ('num_seeds', 0, 'num_seeds must be >= 1'),
])
def test_numbers_out_of_range_are_refused_by_name(field, value, message):
  with pytest.raises(UserError, match=message):
    experiment.resolve(config(**{field: value}))


def test_a_failed_check_writes_no_config(tmp_path):
  """The corrected command on the same workdir must not be refused as another config."""
  with pytest.raises(UserError, match='per class asked for'):
    train.train_and_evaluate(config(samples_per_class=5000), str(tmp_path))
  assert not (tmp_path / 'config.json').exists()
  train.train_and_evaluate(config(samples_per_class=8), str(tmp_path))
  assert json.load(open(tmp_path / 'config.json'))['samples_per_class'] == 8


def test_checkpoint_every_0_saves_the_end_only(tmp_path):
  train.train_and_evaluate(config(checkpoint_every_steps=0), str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['20']


def test_auto_augment_follows_the_images_and_is_written_resolved(tmp_path):
  assert experiment.auto_augment((8, 8, 1)) == 'crop(pad=1)'
  assert experiment.auto_augment((28, 28, 1)) == 'crop(pad=2)|flip|trivial'
  train.train_and_evaluate(config(), str(tmp_path))
  assert json.load(open(tmp_path / 'config.json'))['augment'] == 'crop(pad=1)'
  # The same command again reports the finished run: 'auto' matches what it resolved to.
  assert train.train_and_evaluate(config(), str(tmp_path))['steps'] == 20


def test_final_checkpoint_lands_before_the_final_evaluation(tmp_path, monkeypatch):
  def broken(*args, **kwargs):
    raise RuntimeError('evaluation crashed')
  monkeypatch.setattr(evaluation, 'evaluate', broken)
  with pytest.raises(RuntimeError):
    train.train_and_evaluate(config(eval_every_steps=0), str(tmp_path))
  with checkpoint.manager(str(tmp_path)) as mngr:
    assert mngr.latest_step() == 20


def test_results_rebuilt_after_a_finished_training_match_the_first(tmp_path):
  """Killed during the final evaluation (or results.json deleted): the same results again."""
  first = train.train_and_evaluate(config(), str(tmp_path))
  lines = len(metrics.read(str(tmp_path)))
  os.remove(tmp_path / 'results.json')
  again = train.train_and_evaluate(config(), str(tmp_path))
  for key in ('test_accuracy', 'val_accuracy', 'wall_seconds', 'images_per_sec', 'steps',
              'members', 'chosen_setting'):
    assert again[key] == first[key], key
  assert len(metrics.read(str(tmp_path))) == lines, 'the test line was logged twice'


@pytest.mark.slow
def test_a_second_run_on_a_busy_workdir_is_refused(tmp_path):
  args = ['--config=configs/cosine.py', '--config.model=mlp', '--config.num_steps=100000',
          '--config.progress=False', '--config.baseline=none', f'--workdir={tmp_path}']
  first = subprocess.Popen([sys.executable, '-m', 'smallfx.main', *args], cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / 'metrics.jsonl').exists():
      time.sleep(0.1)
    second = run_cli('smallfx.main', *args)
    assert second.returncode == 2, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and f'process {first.pid}' in lines[0], lines
  finally:
    first.kill()
    first.wait()
  # The killed run's lock died with it: the folder is free again at once.
  with workdir.lock(str(tmp_path)):
    pass


@pytest.mark.slow
def test_ctrl_c_during_checkpoints_is_one_line_and_keeps_them_whole(tmp_path):
  """A save is in flight at every step here; Ctrl-C lets it land, then says one line."""
  args = ['--config=configs/cosine.py', '--config.model=mlp', '--config.num_steps=100000',
          '--config.checkpoint_every_steps=1', '--config.log_every_steps=1',
          '--config.progress=False', '--config.baseline=none', f'--workdir={tmp_path}']
  # faulthandler: a run that hangs is stopped with SIGABRT below and prints every
  # thread's stack (this failed once in ~30 suites, and did not again by hand).
  proc = subprocess.Popen([sys.executable, '-m', 'smallfx.main', *args], cwd=REPO, text=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          env=dict(os.environ, PYTHONFAULTHANDLER='1'))
  deadline, ckpts = time.time() + 120, tmp_path / 'checkpoints'
  while time.time() < deadline and not (ckpts.exists() and len(os.listdir(ckpts)) >= 3):
    time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  try:
    _, err = proc.communicate(timeout=120)
  except subprocess.TimeoutExpired:
    proc.send_signal(signal.SIGABRT)
    try:
      _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
      proc.kill()  # never left running beside the rest of the suite
      _, err = proc.communicate()
    pytest.fail(f'Ctrl-C did not stop the run within 120 s; its threads:\n{err[-12000:]}')
  assert proc.returncode == 130, err
  # The oneDNN build's line (a first run with the tests' own cache) may come before it.
  lines = [line for line in err.strip().splitlines()
           if line.strip() and not line.startswith('building oneDNN')]
  assert len(lines) == 1 and lines[0].startswith('interrupted'), err
  with checkpoint.manager(str(tmp_path)) as mngr:
    step, _ = checkpoint.restore_latest(mngr)
  assert step is not None and step >= 1


def test_a_run_written_before_a_field_existed_resumes(tmp_path):
  """A config.json without a field smallfx added since (at its default) is the same run."""
  config = base.default()
  old = json.loads(config.to_json(sort_keys=True))
  del old['max_steps'], old['max_image_pixels']
  (tmp_path / 'config.json').write_text(json.dumps(old))
  assert experiment.check_same_config(config, str(tmp_path))
  config.max_steps = 100  # but a value other than the default is another run
  with pytest.raises(UserError, match='differs in: max_steps'):
    experiment.check_same_config(config, str(tmp_path))
