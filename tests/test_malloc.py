"""smallfx.malloc: entry points re-execute themselves once under an allocator that keeps memory."""

import json
import os
import subprocess
import sys

import pytest

from smallfx import malloc
from smallfx import tuning

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Prints one JSON line after relaunch(): a process that re-executed prints it
# only in its second life, so two lines would mean the command ran twice.
SCRIPT = """
import json, os, sys
from smallfx import malloc
from smallfx import tuning
malloc.relaunch()
print(json.dumps([malloc.name(), sys.argv[1:], os.environ.get('GLIBC_TUNABLES')]))
"""
ARGS = ['two words', '--flag=1']

needs_tcmalloc = pytest.mark.skipif(
    sys.platform != 'linux' or not malloc.library(),
    reason=f'no tcmalloc on this machine ({malloc.INSTALL}; .ci/run installs it)')
needs_mimalloc = pytest.mark.skipif(
    sys.platform != 'linux' or not malloc.mimalloc_library(),
    reason=f'no mimalloc on this machine ({malloc.PIP_INSTALL})')
linux = pytest.mark.skipif(sys.platform != 'linux', reason='allocators are chosen on Linux only')


def _run(*args, **env):
  clean = {k: v for k, v in os.environ.items()
           if k not in ('LD_PRELOAD', 'GLIBC_TUNABLES', malloc.ENV, 'SMALLFX_CPU_TUNING',
                        'JAX_PLATFORMS') and not k.startswith('MIMALLOC_')}
  r = subprocess.run([sys.executable, '-c', SCRIPT, *ARGS, *args],
                     env=dict(clean, **env), cwd=REPO, capture_output=True, text=True,
                     timeout=120, check=False)
  assert r.returncode == 0, r.stderr
  lines = r.stdout.strip().splitlines()
  assert len(lines) == 1, r.stdout
  name, argv, tunables = json.loads(lines[0])
  assert argv == [*ARGS, *args]
  return name, tunables, r.stderr


@linux
def test_relaunch_reruns_the_same_command_once_under_the_best_installed(monkeypatch):
  monkeypatch.delenv(malloc.ENV, raising=False)
  best = malloc.choice()
  if best == 'system':
    pytest.skip(f'no allocator to relaunch under here ({malloc.PIP_INSTALL})')
  assert _run(JAX_PLATFORMS='cpu')[0] == best


@needs_tcmalloc
def test_tcmalloc_where_installed():
  assert _run(SMALLFX_MALLOC='tcmalloc')[0] == 'tcmalloc'


@needs_mimalloc
def test_mimalloc_from_the_wheel():
  assert _run(SMALLFX_MALLOC='mimalloc')[0] == 'mimalloc'


@pytest.mark.skipif(not malloc.glibc_huge_pages(), reason='needs glibc 2.35+ and THP')
def test_glibc_tunables_need_no_package():
  name, tunables, _ = _run(SMALLFX_MALLOC='glibc')
  assert name == 'glibc' and tunables == malloc.GLIBC_TUNABLES


@linux
@pytest.mark.parametrize('env,args', [
    (dict(SMALLFX_MALLOC='system'), []),
    (dict(SMALLFX_CPU_TUNING='0'), []),  # the switch: no tuning, no allocator
    (dict(JAX_PLATFORMS='cuda'), []),  # not a CPU run
    ({}, ['--config.cpu_tuning=False']),
    (dict(GLIBC_TUNABLES='glibc.malloc.arena_max=2'), []),  # the user's own choice
])
def test_no_relaunch(env, args):
  name, tunables, _ = _run(*args, **env)
  assert tunables == env.get('GLIBC_TUNABLES')
  assert name == ('glibc' if tunables else 'system')


def test_an_allocator_the_user_preloaded_is_kept():
  # An unloadable library in LD_PRELOAD only draws a loader warning; relaunch()
  # must leave the choice alone rather than add another allocator to it.
  assert _run(LD_PRELOAD='libnot_a_real_malloc.so')[0] == 'system'


@linux
def test_an_allocator_not_installed_is_said(monkeypatch):
  name, _, stderr = _run(SMALLFX_MALLOC='nosuchmalloc')
  assert name == 'system' and 'nosuchmalloc' in stderr


def test_choice_is_the_first_installed(monkeypatch):
  monkeypatch.delenv(malloc.ENV, raising=False)
  monkeypatch.setattr(malloc, 'library', lambda: None)  # no tcmalloc: a pip-only install
  monkeypatch.setattr(malloc, 'mimalloc_library', lambda: '/wheel/libmimalloc.so')
  monkeypatch.setattr(malloc, 'glibc_huge_pages', lambda: True)
  assert malloc.choice() == [n for n in malloc.ORDER if n != 'tcmalloc'][0]
  monkeypatch.setattr(malloc, 'mimalloc_library', lambda: None)
  assert malloc.choice() == 'glibc'
  monkeypatch.setattr(malloc, 'glibc_huge_pages', lambda: False)  # old glibc, or THP never
  assert malloc.choice() == 'system'
  monkeypatch.setenv(malloc.ENV, 'mimalloc')
  assert malloc.choice() == 'mimalloc'


def test_glibc_huge_pages_need_glibc_2_35_and_thp(monkeypatch, tmp_path):
  thp = tmp_path / 'enabled'
  monkeypatch.setattr(malloc, 'THP', str(thp))
  for version, mode, expected in [('glibc 2.36', 'always [madvise] never', True),
                                  ('glibc 2.35', '[always] madvise never', True),
                                  ('glibc 2.34', 'always [madvise] never', False),
                                  ('glibc 2.36', 'always madvise [never]', False)]:
    thp.write_text(mode)
    monkeypatch.setattr(malloc.os, 'confstr', lambda name, version=version: version)
    assert malloc.glibc_huge_pages() == expected, (version, mode)
  thp.unlink()
  assert not malloc.glibc_huge_pages()


def test_hint_only_for_cpu_tuned_runs_on_plain_glibc(monkeypatch):
  # As in a fresh process: no earlier test's `tuning.prepare` decides for this one.
  monkeypatch.setitem(tuning._state, 'on', None)  # pylint: disable=protected-access
  monkeypatch.delenv(malloc.ENV, raising=False)
  monkeypatch.delenv('LD_PRELOAD', raising=False)
  monkeypatch.delenv('SMALLFX_CPU_TUNING', raising=False)
  monkeypatch.setattr(malloc, 'name', lambda: 'system')
  if sys.platform == 'linux':
    note = malloc.hint('cpu')
    assert 'SMALLFX_MALLOC=system' in note and '\n' not in note
    best = malloc.choice()
    assert (malloc.setting(best) if best != 'system' else malloc.PIP_INSTALL) in note
    monkeypatch.setenv('SMALLFX_CPU_TUNING', '0')
    assert malloc.hint('cpu') is None
    monkeypatch.delenv('SMALLFX_CPU_TUNING')
  assert malloc.hint('gpu') is None
  monkeypatch.setenv(malloc.ENV, 'system')
  assert malloc.hint('cpu') is None
  monkeypatch.delenv(malloc.ENV)
  for other in ('tcmalloc', 'mimalloc', 'glibc'):
    monkeypatch.setattr(malloc, 'name', lambda other=other: other)
    assert malloc.hint('cpu') is None
