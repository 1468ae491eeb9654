import atexit
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The runs of one test session share a compilation cache of their own, not the user's.
COMPILATION_CACHE = tempfile.mkdtemp(prefix='smallfx_test_jax_cache_')
atexit.register(shutil.rmtree, COMPILATION_CACHE, True)


def run_cli(*args, env=None, timeout=600, cwd=None):
  """Runs `python -m ARGS...` as a user would; returns the CompletedProcess.

  `env` adds to the environment; a value of None removes that variable.
  """
  full_env = {'JAX_COMPILATION_CACHE_DIR': COMPILATION_CACHE, **os.environ, **(env or {})}
  full_env = {k: v for k, v in full_env.items() if v is not None}
  return subprocess.run([sys.executable, '-m', *args], capture_output=True, text=True,
                        timeout=timeout, env=full_env, cwd=cwd or REPO)


@pytest.fixture
def cli():
  return run_cli
