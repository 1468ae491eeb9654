"""The allocator a CPU run lives under: one that keeps its freed memory.

Why: XLA:CPU allocates each step's temporary buffers afresh on every execution
(one block of 313 MB for ResNet-20 at batch 128, plus per-op scratch) and frees
them when the step ends. glibc's malloc hands blocks that large (above 32 MB, or
64 MB from a worker thread, whatever `mallopt` says) to mmap and returns them
with munmap, so every step faults its whole working set back in and the kernel
zeroes it: 75,000 page faults and 120-140 ms of system time per ResNet-20 step.

Which allocator (`ORDER`: the first one installed; experiments/bench/allocators.md,
`python tools/bench_malloc.py`, alternating processes, 2-core AMD EPYC, jax 0.10.2,
glibc 2.36; ResNet-20 b128 train step on a quiet machine, glibc's plain malloc = 1):

  mimalloc  the `cmeel-mimalloc` wheel (3.4), a dependency of smallfx on Linux: what a
            pip-only install gets. x1.59; no page faults in any round, loaded or not
            (with `MIMALLOC_OPTIONS`).
  tcmalloc  apt's libtcmalloc-minimal4 (2.10), where installed and mimalloc is not:
            x1.68, level with mimalloc within the noise; no faults on a quiet machine,
            but 15,000-37,600 a step in 8 of 20 rounds under load.
  glibc     glibc's own malloc, asked for transparent huge pages (`GLIBC_TUNABLES`,
            glibc 2.35 and later, THP not `never`): no package at all. x1.46.
SmallCNN b32 (28 px) allocates little: the same under all four.

An allocator is chosen when a process starts (LD_PRELOAD, GLIBC_TUNABLES), so
`relaunch()` re-executes the interpreter once, with the same command line, under the
chosen one. Only entry points call it, from their `__main__` block: a library import
must never replace the process it lives in (a notebook, a test runner). Whether it
happens at all (a CPU run, CPU tuning on) is `smallfx.tuning.relaunch_allocator`'s
decision: `relaunch()` is that function.

SMALLFX_MALLOC chooses: unset (or `auto`) the first installed of `ORDER`; `system`
glibc's malloc untouched (and no hint); `mimalloc`, `tcmalloc` or `glibc` that one.
An allocator already preloaded by the user (LD_PRELOAD), or glibc tunables of the
user's own, are kept. This module imports nothing beyond the standard library: it
runs before anything else in an entry point's process.
"""

import ctypes.util
import importlib.metadata
import os
import pathlib
import sys

ENV = 'SMALLFX_MALLOC'
INSTALL = 'apt-get install libtcmalloc-minimal4'
PIP_INSTALL = 'pip install cmeel-mimalloc'

# The best first (experiments/bench/allocators.md).
ORDER = ('mimalloc', 'tcmalloc', 'glibc')

# mimalloc 3.4 returns freed memory to the OS 1 s after it is freed (`purge_delay`,
# 1000 ms), which brings the page faults back wherever a step takes longer (WRN-16-8,
# EfficientNet-Lite0 at batch 32 on 2 cores); -1 never does: a run keeps its peak.
# Blocks up to `arena_max_object_size` (2 GiB) come from its arenas, in huge pages.
MIMALLOC_OPTIONS = {'MIMALLOC_PURGE_DELAY': '-1'}

# glibc: its large blocks still come from mmap and go back with munmap, but in
# transparent huge pages (madvise(MADV_HUGEPAGE), glibc 2.35 and later, where the
# kernel's THP is not `never`): 512 times fewer page faults, each zeroing 2 MB at once.
# Keeping the blocks instead (no mmap, one arena, no trim: glibc.malloc.mmap_max=0:
# glibc.malloc.arena_max=1:glibc.malloc.trim_threshold=...) was slower, and still
# faulted in some runs (experiments/bench/allocators.md).
GLIBC_TUNABLES = 'glibc.malloc.hugetlb=1'
THP = '/sys/kernel/mm/transparent_hugepage/enabled'


def glibc_huge_pages() -> bool:
  """Whether glibc's malloc can ask for transparent huge pages here."""
  try:
    version = os.confstr('CS_GNU_LIBC_VERSION').split()[-1]  # 'glibc 2.36'
    if tuple(int(v) for v in version.split('.')[:2]) < (2, 35):
      return False
    with open(THP) as f:
      return '[never]' not in f.read()
  except (ValueError, OSError, AttributeError, IndexError):
    return False


def library() -> str | None:
  """The installed tcmalloc, as the dynamic loader names it, or None."""
  return ctypes.util.find_library('tcmalloc_minimal') or ctypes.util.find_library('tcmalloc')


def mimalloc_library() -> str | None:
  """mimalloc's shared library from the cmeel-mimalloc wheel (or the system's), or None."""
  try:
    dist = importlib.metadata.distribution('cmeel-mimalloc')
  except importlib.metadata.PackageNotFoundError:
    dist = None
  for f in (dist.files or []) if dist else []:
    if pathlib.PurePosixPath(str(f)).name.startswith('libmimalloc.so'):
      path = pathlib.Path(dist.locate_file(f))
      if path.exists():
        return str(path.resolve())
  return ctypes.util.find_library('mimalloc')


def environment(name: str, env: dict | None = None) -> dict | None:
  """The environment `env` (default: this process's) under allocator `name`.

  None where `name` is not installed here. `system` drops smallfx's own settings.
  """
  env = dict(os.environ if env is None else env)
  preload = env.get('LD_PRELOAD', '')
  if name == 'system':
    return env
  if name == 'glibc':
    if not glibc_huge_pages():
      return None
    env['GLIBC_TUNABLES'] = ':'.join(filter(None, [env.get('GLIBC_TUNABLES'), GLIBC_TUNABLES]))
    return env
  path = {'tcmalloc': library, 'mimalloc': mimalloc_library}[name]()
  if not path:
    return None
  env['LD_PRELOAD'] = f'{path} {preload}'.strip()
  if name == 'mimalloc':
    env.update({k: env.get(k, v) for k, v in MIMALLOC_OPTIONS.items()})  # the user's win
  return env


def choice() -> str:
  """The allocator a CPU run should start under: SMALLFX_MALLOC's, or the best installed."""
  wanted = os.environ.get(ENV, 'auto')
  if wanted != 'auto':
    return wanted
  for name in ORDER:
    if environment(name, {}) is not None:
      return name
  return 'system'


def user_chose() -> bool:
  """Whether the allocator was set before smallfx looked (or by an earlier relaunch)."""
  return ('malloc' in os.environ.get('LD_PRELOAD', '')
          or 'glibc.malloc' in os.environ.get('GLIBC_TUNABLES', '')
          or os.environ.get(ENV) == 'system')


def relaunch_now(name: str) -> None:
  """Re-executes this process under allocator `name`; returns where it cannot."""
  if sys.platform != 'linux' or name == 'system' or user_chose():
    return
  if name not in ORDER:
    print(f'note: {ENV}={name} is not one of system, auto, {", ".join(ORDER)}; '
          f'glibc\'s malloc is used', file=sys.stderr)
    return
  env = environment(name)
  if env is None:
    print(f'note: {ENV}={name}, but {name} is not installed here; glibc\'s malloc is used',
          file=sys.stderr)
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, sys.orig_argv, env)
  except OSError:
    pass  # an interpreter that cannot be re-executed still runs, under glibc


def relaunch() -> None:
  """`smallfx.tuning.relaunch_allocator()`: entry points call it first thing."""
  from smallfx import tuning  # pylint: disable=g-import-not-at-top
  tuning.relaunch_allocator()


def name() -> str:
  """The allocator this process runs under: tcmalloc, mimalloc, glibc (tuned) or system."""
  try:
    with open('/proc/self/maps') as f:
      maps = f.read()
  except OSError:
    maps = ''
  for lib in ('tcmalloc', 'mimalloc', 'jemalloc'):
    if lib in maps:
      return lib
  if 'glibc.malloc' in os.environ.get('GLIBC_TUNABLES', ''):
    return 'glibc'
  return 'system'


def active() -> bool:
  """Whether this process runs under an allocator that keeps freed memory."""
  return name() != 'system'


def setting(name: str) -> str:
  """What starts a process under allocator `name`, as VAR=VALUE ... for a shell."""
  env = environment(name, {})
  return ' '.join(f'{k}={v}' for k, v in sorted((env or {}).items()))


def hint(platform: str) -> str | None:
  """One line for a CPU-tuned run under glibc's plain malloc, or None.

  Such a run was not started by an entry point (a notebook, a test) or found no
  better allocator; the line says how to get one.
  """
  if platform != 'cpu' or sys.platform != 'linux' or os.environ.get(ENV) == 'system':
    return None
  if active() or 'malloc' in os.environ.get('LD_PRELOAD', ''):
    return None
  from smallfx import tuning  # pylint: disable=g-import-not-at-top
  if not tuning.decided(platform):
    return None
  best = choice()
  how = (f'start Python with {setting(best)}' if best in ORDER and environment(best, {})
         else f'`{PIP_INSTALL}` or `{INSTALL}`')
  return (f'note: under glibc\'s malloc XLA:CPU re-faults its step buffers every step '
          f'(ResNet-20\'s step 1.5-1.7x slower); {how} (smallfx\'s entry points do; '
          f'{ENV}=system silences this)')
