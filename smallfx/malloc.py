"""Runs the command-line entry points under tcmalloc where the machine has it.

Why: XLA:CPU allocates each step's temporary buffers afresh on every execution
(one block of 313 MB for ResNet-20 at batch 128, plus per-op scratch) and frees
them when the step ends. glibc's malloc hands blocks that large (above 32 MB, or
64 MB from a worker thread, whatever `mallopt` says) to mmap and returns them
with munmap, so every step faults its whole working set back in and the kernel
zeroes it: ResNet-20 spent 145 ms of system time per ~400 ms step in 76,000 page
faults. tcmalloc keeps freed memory for the next step. Train step, 2-core AMD
EPYC, jax 0.10.2, glibc 2.36 vs tcmalloc 2.10 (`python tools/bench_malloc.py`,
alternating processes; experiments/bench/README.md, change 6): ResNet-20 b128
x1.22, ResNet-18 (96 px) x1.11, EfficientNet-Lite0 (96 px) x2.18, WRN-16-8
x1.10, SmallCNN b32 and the MLP unchanged. glibc with mmap disabled and one
arena removes the faults but not the time (lock contention); jemalloc 5.3 still
faults.

An allocator is chosen when a process starts (LD_PRELOAD), so `relaunch()`
re-executes the interpreter with the same command line under tcmalloc, once.
Only entry points call it, from their `__main__` block: a library import must
never replace the process it lives in (a notebook, a test runner).

SMALLFX_MALLOC=system keeps glibc's malloc and silences the hint.
"""

import ctypes.util
import os
import sys

ENV = 'SMALLFX_MALLOC'
INSTALL = 'apt-get install libtcmalloc-minimal4'


def library() -> str | None:
  """The installed tcmalloc, as the dynamic loader names it, or None."""
  return ctypes.util.find_library('tcmalloc_minimal') or ctypes.util.find_library('tcmalloc')


def relaunch() -> None:
  """Re-executes this process under tcmalloc; returns where it cannot or need not.

  Nothing happens off Linux, when the user chose (SMALLFX_MALLOC set, or any
  allocator already in LD_PRELOAD), when this process is the relaunched one, or
  when no tcmalloc is installed (`hint()` then says how to get it).
  """
  preload = os.environ.get('LD_PRELOAD', '')
  if sys.platform != 'linux' or os.environ.get(ENV) or 'malloc' in preload:
    return
  library_name = library()
  if not library_name:
    return
  env = dict(os.environ, LD_PRELOAD=f'{library_name} {preload}'.strip())
  env[ENV] = 'tcmalloc'  # the relaunched process must not relaunch again
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, sys.orig_argv, env)
  except OSError:
    pass  # an interpreter that cannot be re-executed still runs, under glibc


def active() -> bool:
  """Whether tcmalloc is mapped into this process."""
  try:
    with open('/proc/self/maps') as f:
      return 'tcmalloc' in f.read()
  except OSError:
    return False


def hint(platform: str) -> str | None:
  """One line for a CPU run that lacks tcmalloc, or None."""
  if platform != 'cpu' or sys.platform != 'linux' or os.environ.get(ENV) == 'system':
    return None
  if active() or 'malloc' in os.environ.get('LD_PRELOAD', ''):
    return None
  return (f'note: without tcmalloc, XLA:CPU re-faults its step buffers every step '
          f'(ResNets x1.2, EfficientNet x2 slower); `{INSTALL}` and smallfx uses it '
          f'({ENV}=system silences this)')
