import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The runs of one test session share a compilation cache of their own, not the user's.
COMPILATION_CACHE = tempfile.mkdtemp(prefix='smallfx_test_jax_cache_')
atexit.register(shutil.rmtree, COMPILATION_CACHE, True)

# And a oneDNN build of their own (smallfx/models/onednn.py): the user's
# ~/.cache/smallfx/onednn is never written by a test. Set before anything builds, for
# this process and, through the environment, every subprocess (run_cli's too). The
# user's cache as it was, for tests/test_tuning.py to compare with.
_USER_ONEDNN_CACHE = os.path.expanduser(os.environ.get(
    'SMALLFX_ONEDNN_CACHE', os.path.join(os.environ.get('XDG_CACHE_HOME') or '~/.cache',
                                         'smallfx', 'onednn')))


def _listing(folder):
  try:
    return {e.name: e.stat().st_mtime_ns for e in os.scandir(folder)}
  except OSError:
    return None


USER_ONEDNN_CACHE = (_USER_ONEDNN_CACHE, _listing(_USER_ONEDNN_CACHE))
ONEDNN_CACHE = tempfile.mkdtemp(prefix='smallfx_test_onednn_')
atexit.register(shutil.rmtree, ONEDNN_CACHE, True)
os.environ['SMALLFX_ONEDNN_CACHE'] = ONEDNN_CACHE


def run_cli(*args, env=None, timeout=600, cwd=None):
  """Runs `python -m ARGS...` as a user would; returns the CompletedProcess.

  `env` adds to the environment; a value of None removes that variable.
  """
  full_env = {'JAX_COMPILATION_CACHE_DIR': COMPILATION_CACHE, **os.environ,
              'SMALLFX_ONEDNN_CACHE': ONEDNN_CACHE, **(env or {})}
  full_env = {k: v for k, v in full_env.items() if v is not None}
  return subprocess.run([sys.executable, '-m', *args], capture_output=True, text=True,
                        timeout=timeout, env=full_env, cwd=cwd or REPO)


@pytest.fixture
def cli():
  return run_cli


@pytest.fixture(params=[True, False], ids=['cpu_tuning', 'no_cpu_tuning'])
def cpu_tuning(request):
  """Runs a test with CPU tuning on and off (smallfx/tuning.py); the value is the switch."""
  from smallfx import tuning  # pylint: disable=g-import-not-at-top
  with tuning.forced(request.param):
    yield request.param


def start_and_kill_after(args, workdir, step: int, timeout: float = 300) -> None:
  """Starts `python -m smallfx.main ARGS --workdir=WORKDIR` and SIGKILLs it once a
  checkpoint at `step` or later exists, as a crash would; fails if it finished first."""
  proc = subprocess.Popen([sys.executable, '-m', 'smallfx.main', *args, f'--workdir={workdir}'],
                          cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline, ckpts = time.time() + timeout, os.path.join(str(workdir), 'checkpoints')
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(ckpts) and any(d.isdigit() and int(d) >= step for d in os.listdir(ckpts)):
      break
    time.sleep(0.05)
  assert proc.poll() is None, 'the run finished before it could be killed'
  proc.send_signal(signal.SIGKILL)
  proc.wait()
