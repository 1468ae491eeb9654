"""smallfx.malloc: entry points re-execute themselves once under tcmalloc."""

import json
import os
import subprocess
import sys

import pytest

from smallfx import malloc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Prints one JSON line after relaunch(): a process that re-executed prints it
# only in its second life, so two lines would mean the command ran twice.
SCRIPT = """
import json, os, sys
from smallfx import malloc
malloc.relaunch()
print(json.dumps([malloc.active(), sys.argv[1:], os.environ.get(malloc.ENV)]))
"""

needs_tcmalloc = pytest.mark.skipif(
    sys.platform != 'linux' or not malloc.library(),
    reason=f'no tcmalloc on this machine ({malloc.INSTALL}; .ci/run installs it)')


def _run(**env):
  clean = {k: v for k, v in os.environ.items() if k not in ('LD_PRELOAD', malloc.ENV)}
  r = subprocess.run([sys.executable, '-c', SCRIPT, 'two words', '--flag=1'],
                     env=dict(clean, **env), cwd=REPO, capture_output=True, text=True,
                     timeout=120, check=False)
  assert r.returncode == 0, r.stderr
  lines = r.stdout.strip().splitlines()
  assert len(lines) == 1, r.stdout
  return json.loads(lines[0])


@needs_tcmalloc
def test_relaunch_reruns_the_same_command_once_under_tcmalloc():
  assert _run() == [True, ['two words', '--flag=1'], 'tcmalloc']


@needs_tcmalloc
def test_system_keeps_glibc():
  assert _run(SMALLFX_MALLOC='system') == [False, ['two words', '--flag=1'], 'system']


def test_an_allocator_the_user_preloaded_is_kept():
  # An unloadable library in LD_PRELOAD only draws a loader warning; relaunch()
  # must leave the choice alone rather than add tcmalloc to it.
  assert _run(LD_PRELOAD='libnot_a_real_malloc.so') == [False, ['two words', '--flag=1'], None]


def test_hint_only_for_cpu_runs_without_tcmalloc(monkeypatch):
  monkeypatch.delenv(malloc.ENV, raising=False)
  monkeypatch.delenv('LD_PRELOAD', raising=False)
  monkeypatch.setattr(malloc, 'active', lambda: False)
  if sys.platform == 'linux':
    assert malloc.INSTALL in malloc.hint('cpu')
  assert malloc.hint('gpu') is None
  monkeypatch.setenv(malloc.ENV, 'system')
  assert malloc.hint('cpu') is None
  monkeypatch.delenv(malloc.ENV)
  monkeypatch.setattr(malloc, 'active', lambda: True)
  assert malloc.hint('cpu') is None
