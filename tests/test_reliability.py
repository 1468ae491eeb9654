"""Mistakes a user can make end with one line naming the problem, and lose nothing.

Config files that do not load, --help, damaged checkpoints and unusable workdirs (the
data's own mistakes are in tests/test_data.py, weights files' in tests/test_convert.py).
"""

import errno
import glob
import os
import re
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from smallfx import checkpoint
from smallfx import models
from smallfx.errors import UserError


def _one_error_line(result, message):
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  assert result.returncode == 2, result.stderr
  assert len(lines) == 1 and 'Traceback' not in result.stderr, result.stderr
  assert lines[0].startswith('error: ') and message in lines[0], lines[0]
  return lines[0]


# --- config files ------------------------------------------------------------------


@pytest.mark.parametrize('source, message', [
    (None, 'config file {path} not found'),
    ('def get_config(:\n  pass\n', 'config file {path}, line 1: SyntaxError: invalid syntax'),
    ('import no_such_module\n', "config file {path}, line 1: ModuleNotFoundError: No module "
                                "named 'no_such_module'"),
    ('def get_config():\n  return 1 / 0\n', 'config file {path}, line 2: ZeroDivisionError'),
    ('def get_config():\n  raise ValueError("bad")\n', 'line 2: ValueError: bad'),
    ('CONFIG = 1\n', 'config file {path} has no get_config()'),
    ('def get_config():\n  pass\n', 'get_config() in {path} returned None'),
])
@pytest.mark.parametrize('override', [False, True])
def test_config_file_that_does_not_load_is_one_line(tmp_path, cli, source, message, override):
  """With or without an override (which made ml_collections load it differently)."""
  path = str(tmp_path / 'my_config.py')
  if source is not None:
    with open(path, 'w') as f:
      f.write(source)
  result = cli('smallfx.main', f'--config={path}', f'--workdir={tmp_path / "run"}',
               *(['--config.num_steps=2'] if override else []))
  _one_error_line(result, message.format(path=path))
  assert not os.path.exists(tmp_path / 'run')


def test_missing_config_lists_the_folder(cli, tmp_path):
  result = cli('smallfx.main', '--config=configs/cosin.py', '--config.num_steps=2',
               f'--workdir={tmp_path}')
  _one_error_line(result, 'config file configs/cosin.py not found; configs has: cosine.py, ')


def test_help_exits_0_and_lists_config_keys(cli):
  result = cli('smallfx.main', '--help')
  assert result.returncode == 0 and not result.stderr, result.stderr
  assert '--workdir' in result.stdout
  assert os.path.join('smallfx', 'config.py') in result.stdout
  assert "--config.dataset='digits'" in result.stdout
  assert '--config.sweep.learning_rate=' in result.stdout
  result = cli('smallfx.predict', '--help')
  assert result.returncode == 0 and '--top_k' in result.stdout, result.stderr


# --- checkpoints ---------------------------------------------------------------------


def _workdir(path, steps=(0,)):
  """A predict-able workdir (a tiny MLP) with a checkpoint per step; their variables."""
  model = models.build('mlp', 3)
  spec = {'model': 'mlp', 'width': 1.0, 'num_outputs': 3, 'num_classes': 0, 'loss': 'xent',
          'image_size': [4, 4], 'channels': 1, 'mean': [0.5], 'std': [0.25],
          'class_names': ['a', 'b', 'c'], 'class_embeddings': None, 'dtype': 'float32'}
  saved = {}
  for step in steps:
    variables = model.init(jax.random.key(step), jnp.zeros((1, 4, 4, 1)))
    saved[step] = jax.tree.map(np.asarray, dict(variables))
  checkpoint.write_model_spec(str(path), spec)
  with checkpoint.manager(str(path)) as mngr:
    for step in steps:
      mngr.save(step, args=ocp.args.StandardSave(saved[step]), force=True)
    mngr.wait_until_finished()
  return saved


def _truncate(path, step):
  """Cuts every data file of checkpoint `step`, as a crash or a full disk would."""
  files = glob.glob(f'{path}/checkpoints/{step}/**/d/*', recursive=True)
  assert files
  for name in files:
    os.truncate(name, 10)
  return sorted(files)


def test_restore_latest_falls_back_to_an_older_readable_checkpoint(tmp_path, capsys):
  saved = _workdir(tmp_path, steps=(0, 5))
  damaged = _truncate(tmp_path, 5)
  with checkpoint.manager(str(tmp_path)) as mngr:
    step, state = checkpoint.restore_latest(mngr)
  assert step == 0
  jax.tree.map(np.testing.assert_array_equal, dict(state), saved[0])
  lines = capsys.readouterr().err.splitlines()
  assert len(lines) == 1, lines
  assert lines[0].startswith(f'warning: checkpoint 5 in {tmp_path}/checkpoints is unreadable (')
  assert lines[0].endswith('; falling back to 0') and 'tensorstore' not in lines[0], lines[0]
  # The damaged checkpoint is left as it was, for the user to look at.
  assert sorted(glob.glob(f'{tmp_path}/checkpoints/5/**/d/*', recursive=True)) == damaged
  variables, _ = checkpoint.load_variables(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, variables['params'], saved[0]['params'])


def test_restore_latest_without_checkpoints(tmp_path):
  with checkpoint.manager(str(tmp_path)) as mngr:
    assert checkpoint.restore_latest(mngr) == (None, None)


def test_resume_goes_on_from_the_newest_readable_and_sets_damaged_ones_aside(tmp_path):
  fresh = {'w': np.full(3, 7.0, np.float32)}
  mngr, start, state = checkpoint.resume(str(tmp_path / 'new'), lambda: fresh, None)
  with mngr:
    assert start == 0 and state is fresh
  saved = _workdir(tmp_path, steps=(0, 5))
  _truncate(tmp_path, 5)
  mngr, start, state = checkpoint.resume(str(tmp_path), lambda: fresh, None)
  with mngr:
    assert start == 0 and mngr.all_steps() == [0]
    jax.tree.map(np.testing.assert_array_equal, dict(state), saved[0])
  # Kept for a look, out of the way of the step the run will save again.
  assert [os.path.basename(p).split('-')[0]
          for p in glob.glob(f'{tmp_path}/damaged-checkpoints/*')] == ['5']


def test_predict_on_damaged_checkpoints(tmp_path, cli, capsys):
  """Newest unreadable: one warning, then the older one; none readable: one error line."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from smallfx import predict  # pylint: disable=g-import-not-at-top
  _workdir(tmp_path, steps=(0, 5))
  _truncate(tmp_path, 5)
  photo = str(tmp_path / 'x.png')
  Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4) * 16).save(photo)
  assert [r['image'] for r in predict.predict(str(tmp_path), [photo])] == [photo]
  [warning] = capsys.readouterr().err.splitlines()
  assert warning.startswith('warning: checkpoint 5 in ') and 'falling back to 0' in warning
  _truncate(tmp_path, 0)
  result = cli('smallfx.predict', f'--workdir={tmp_path}', photo)
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  assert len(lines) == 2 and lines[0].startswith('warning: checkpoint 5'), result.stderr
  assert result.returncode == 2 and 'Traceback' not in result.stderr and not result.stdout
  assert lines[1].startswith(f'error: no checkpoint in {tmp_path}/checkpoints is readable '
                             '(step 5: ')
  assert 'tensorstore' not in lines[1] and len(lines[1]) < 300, lines[1]


# --- workdirs ------------------------------------------------------------------------


def test_prepare_workdir_creates_it_and_leaves_nothing(tmp_path):
  workdir = tmp_path / 'a' / 'b'
  checkpoint.prepare_workdir(str(workdir))
  checkpoint.prepare_workdir(str(workdir))  # an existing one is fine too
  assert os.listdir(workdir) == []


@pytest.mark.parametrize('below', ['', 'sub/run'])
def test_workdir_at_or_under_a_file_is_one_line(tmp_path, below):
  in_the_way = tmp_path / 'notes'
  in_the_way.write_text('keep me')
  workdir = os.path.join(in_the_way, below) if below else str(in_the_way)
  with pytest.raises(UserError, match=f'{in_the_way} is a file, not a folder; pick another '
                     '--workdir'):
    checkpoint.prepare_workdir(workdir)
  assert in_the_way.read_text() == 'keep me'


@pytest.mark.parametrize('code, message', [
    (errno.EROFS, 'it is on a read-only file system'),
    (errno.EACCES, 'permission denied'),
    (errno.ENOSPC, 'no space left on its disk'),
])
def test_unwritable_workdir_is_one_line(tmp_path, monkeypatch, code, message):
  """What each OSError says. Tests run as root, whom neither chmod nor a read-only
  bind mount (unavailable here) stops, so the error is simulated at the probe write:
  this proves the messages and that the probe is where they surface, not that a real
  read-only disk raises EROFS there (it does, on Linux: open(O_CREAT) fails so)."""

  def refuse(*args, **kwargs):
    raise OSError(code, os.strerror(code))

  monkeypatch.setattr(checkpoint, 'open', refuse, raising=False)
  with pytest.raises(UserError, match=f'cannot write to workdir {tmp_path}: {message}'):
    checkpoint.prepare_workdir(str(tmp_path))


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes through chmod 0o500')
def test_read_only_folder_is_one_line(tmp_path):
  os.chmod(tmp_path, 0o500)
  try:
    with pytest.raises(UserError, match='permission denied'):
      checkpoint.prepare_workdir(str(tmp_path / 'run'))
  finally:
    os.chmod(tmp_path, 0o700)


@pytest.fixture
def small_disk(tmp_path):
  """A 1.5 MB file system (tmpfs): room for a few SmallCNN checkpoints, then full."""
  mount = tmp_path / 'disk'
  mount.mkdir()
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=1500k', 'tmpfs', str(mount)],
                    capture_output=True, check=False).returncode:
    pytest.skip('cannot mount a small tmpfs here (needs root)')
  yield mount
  subprocess.run(['umount', str(mount)], check=False)


@pytest.mark.slow
def test_full_disk_mid_run_is_one_line_and_keeps_the_last_checkpoint(cli, small_disk):
  workdir = small_disk / 'run'
  result = cli('smallfx.main', '--config=configs/cosine.py', '--config.model=cnn',
               '--config.num_steps=400', '--config.checkpoint_every_steps=50',
               '--config.baseline=none', '--config.progress=False', f'--workdir={workdir}')
  assert result.returncode == 2, result.stderr[-2000:]
  lines = [line for line in result.stderr.strip().splitlines()
           if not line.startswith('building oneDNN')]  # the test session's first build
  assert len(lines) == 1 and 'no space left on its disk' in lines[0], result.stderr[-2000:]
  kept = re.search(r'last good checkpoint \(step (\d+)\) is kept', lines[0])
  assert kept, lines[0]
  left = os.listdir(workdir / 'checkpoints')
  assert kept.group(1) in left and not [d for d in left if 'tmp' in d], left
