"""Per-platform choices of a run, made in one place: CPU tuning's one door.

The training loop and the models read the same on every platform; what differs
between XLA:CPU and an accelerator is decided here, from the platform the run's
devices are on: how members are laid out (vmapped or unrolled), how many train steps
one call runs, XLA's compiler options, and whether the host waits one step behind.
Measurements behind each choice: experiments/bench/README.md.

CPU tuning, with one switch: the convolutions' CPU formulations and oneDNN calls
(`smallfx.models.conv`, `smallfx.models.onednn`), XLA's CPU options
(`compiler_options`) and the allocator the process starts under (`smallfx.malloc`).
On by default on CPU and never used elsewhere; `config.cpu_tuning=False`, or
SMALLFX_CPU_TUNING=0 in the environment (read when a run starts), turns it off, and
the models are then plain `flax.linen` on XLA's own kernels (equal values to float
rounding, `tests/test_tuning.py`). The members' layout, steps per call and the
initialiser's options are not tuning but how smallfx runs on a CPU at all; they stay.

When it happens:
  - `relaunch_allocator()`: an entry point's first line (its `__main__` block, via
    `malloc.relaunch()`), before JAX starts: re-executes the process under an allocator
    that keeps freed memory, where the run will use the CPU (`will_use_cpu`, decided
    without starting JAX) and the switch is on.
  - `prepare(platform, enabled)`: a run's set-up, once its devices are known and before
    any model is traced. Decides whether the CPU formulations are used and, where they
    are, builds or loads the oneDNN calls right there; a build (once per machine and
    source, ~10 s) says so on one line of stderr.

Without `prepare` (a notebook that imports smallfx.models and calls `init`/`apply`),
the CPU formulations follow SMALLFX_CPU_TUNING (on by default) on a CPU backend, and
the oneDNN calls are used only where a run's `prepare` already built them on this
machine (a cached build is loaded; nothing is ever compiled inside a trace): else XLA's
convolutions. `prepare('cpu', True)` in a notebook builds them. `forced` overrides
everything for tests and tools.
"""

import contextlib
import functools
import glob
import importlib.util
import logging
import os
import sys

from smallfx import malloc

ENV = 'SMALLFX_CPU_TUNING'

# YNNPACK takes matrix products and reductions only; convolutions go to XLA's own
# (Eigen) kernels and elementwise fusions to its loop emitter (experiments/bench/README.md,
# "XLA options": SmallCNN x1.27, ResNet-20 x1.13, EfficientNet-Lite0 x1.36 per step).
CPU_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type':
                   'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE'}

# GPU: a small step is a chain of short kernels and the card waits on their launches;
# 25 steps under `lax.scan` per call (digits jobs on an H200: 3.3x ResNet-20, 7.5x
# SmallCNN images per second, experiments/bench/GPU.md). 25 divides the default
# logging, evaluation and checkpoint intervals. CPU: 1, since XLA:CPU keeps convolution
# gradients inside a loop in a layout its fast kernels do not take (13-41x slower,
# experiments/bench/dispatch_cpu.log).
STEPS_PER_DISPATCH = {'cpu': 1}
STEPS_PER_DISPATCH_DEFAULT = 25


def steps_per_dispatch(platform: str, requested: int = 0) -> int:
  """Train steps per call of the compiled program: `requested`, or the platform's."""
  if requested:
    return int(requested)
  return STEPS_PER_DISPATCH.get(platform, STEPS_PER_DISPATCH_DEFAULT)


def unroll_members(platform: str, member_devices: int, data_devices: int) -> bool:
  """Whether members are unrolled rather than vmapped.

  `jax.vmap` turns a convolution with per-member weights into one grouped
  convolution, which GPUs run well and XLA:CPU slowly (8 SmallCNN seeds, 2-core CPU:
  vmapped 133 ms, unrolled one after another 76 ms a step). When members and batch are
  both split over devices the program is SPMD and stays vmapped.
  """
  return platform == 'cpu' and 1 in (member_devices, data_devices)


def one_step_ahead(platform: str, local_devices: int) -> bool:
  """Whether the host waits for step t-1 before queueing step t+1.

  XLA:CPU runs every device's share of a step on one shared thread pool. With
  several CPU devices and dozens of steps queued, their all-reduces wait on each
  other until XLA aborts (a 40 s rendezvous timeout). Two in flight ran as fast as
  fully blocking steps and never stuck.
  """
  return platform == 'cpu' and local_devices > 1


def compiler_options(platform: str) -> dict | None:
  """XLA options for the train step: CPU tuning's, where it is on."""
  if not decided(platform) or not _cpu_options_accepted():
    return None
  return CPU_OPTIONS


def init_compiler_options(platform: str) -> dict | None:
  """XLA options for the program that initialises the state: run once, compiled quickly.

  That program is mostly the random number generator of every initialiser, thousands
  of lines of straight-line HLO that LLVM's level 3 takes seconds over. Level 1 gives
  the same values bit for bit (`tests/test_train.py`) and compiles 1.5-5x faster on CPU
  (ResNet-20, 8 seeds: 10.8 against 2.0 s). Only measured on CPU, so only used there.
  """
  return {'xla_backend_optimization_level': 1} if platform == 'cpu' else None


@functools.cache
def _cpu_options_accepted() -> bool:
  """Whether this jaxlib compiles with `CPU_OPTIONS`; says once, on one line, if not.

  Experimental XLA options come and go between jaxlib releases; one that this
  jaxlib does not know would fail every compile, so a refused one is left out, and
  the run is slower for it.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  try:
    jax.jit(lambda x: x + 1).lower(jnp.zeros(2)).compile(compiler_options=CPU_OPTIONS)
    return True
  except Exception as e:  # pylint: disable=broad-except
    reason = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
    logging.warning(
        'XLA:CPU refused %s (jaxlib %s: %s); train steps compile without it, up to '
        '1.1-1.4x slower (smallfx/tuning.py, CPU_OPTIONS)',
        ', '.join(f'{k}={v}' for k, v in CPU_OPTIONS.items()), _jaxlib_version(), reason)
    return False


def _jaxlib_version() -> str:
  try:
    import jaxlib  # pylint: disable=g-import-not-at-top
    return jaxlib.__version__
  except Exception:  # pylint: disable=broad-except
    return '?'


# The switch.


def switch_on() -> bool:
  """SMALLFX_CPU_TUNING: anything but 0 (or false, off, no) leaves CPU tuning on."""
  return os.environ.get(ENV, '1').strip().lower() not in ('0', 'false', 'off', 'no')


def enabled(platform: str, requested: bool = True) -> bool:
  """Whether a run on `platform` with `config.cpu_tuning=requested` is CPU-tuned."""
  return platform == 'cpu' and bool(requested) and switch_on()


_enabled = enabled

# What `prepare` decided, or `forced` says: None where undecided.
_state = {'on': None, 'onednn': None}


def prepare(platform: str, enabled: bool = True) -> None:  # pylint: disable=redefined-outer-name
  """A run's set-up, once its devices are known and before a model is traced.

  `enabled` is `config.cpu_tuning`. Decides whether the CPU formulations and oneDNN
  calls are used in this process (`enabled(platform, enabled)`, the function) and, where
  oneDNN is, builds or loads it now: the one place a compiler may run, with one line on
  stderr when it does. Where oneDNN cannot be had (no C++ compiler, not x86-64 Linux),
  one warning, and XLA's convolutions.
  """
  on = _enabled(platform, enabled)
  _state['on'] = on
  _state['onednn'] = None
  if on:
    from smallfx.models import onednn  # pylint: disable=g-import-not-at-top
    _state['onednn'] = onednn.available()


def cpu_formulations() -> bool:
  """Whether a convolution traced now takes its CPU formulation (`smallfx.models.conv`)."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.default_backend() != 'cpu':
    return False
  return switch_on() if _state['on'] is None else _state['on']


def onednn_calls() -> bool:
  """Whether a convolution traced now may run on oneDNN: never builds it (see `prepare`)."""
  if not cpu_formulations():
    return False
  if _state['onednn'] is not None:
    return _state['onednn']
  from smallfx.models import onednn  # pylint: disable=g-import-not-at-top
  return onednn.available(build=False)


def decided(platform: str) -> bool:
  """Whether CPU tuning is on for `platform`: as `prepare` decided, else by the switch."""
  return platform == 'cpu' and (enabled(platform) if _state['on'] is None else _state['on'])


@contextlib.contextmanager
def forced(on: bool, onednn: bool | None = None):
  """Tests and tools: CPU tuning on or off meanwhile, whatever `prepare` decided.

  `onednn` defaults to `on` (and then to whether the calls build here). Functions
  jitted before keep what they were traced with: jit fresh ones inside.
  """
  before = dict(_state)
  if on and onednn is not False:
    from smallfx.models import onednn as onednn_lib  # pylint: disable=g-import-not-at-top
    onednn = onednn_lib.available()
  _state.update(on=on, onednn=bool(on and onednn))
  try:
    yield
  finally:
    _state.update(before)


# The allocator, before JAX starts.

# Plugins that give JAX another platform, with the device files that platform needs:
# without them, JAX falls back to the CPU.
_ACCELERATORS = {'jax_cuda12_plugin': '/dev/nvidia[0-9]*',
                 'jax_cuda13_plugin': '/dev/nvidia[0-9]*',
                 'jax_rocm60_plugin': '/dev/kfd', 'jax_rocm7_plugin': '/dev/kfd',
                 'libtpu': '/dev/accel*'}


def will_use_cpu(environ=None) -> bool:
  """Whether a run started now will compute on the CPU, decided without starting JAX.

  JAX_PLATFORMS (its first entry) decides where set. Otherwise the CPU unless a GPU or
  TPU plugin of JAX is installed and its device files exist.
  """
  environ = os.environ if environ is None else environ
  platforms = environ.get('JAX_PLATFORMS') or environ.get('JAX_PLATFORM_NAME') or ''
  if platforms.strip():
    return platforms.split(',')[0].strip().lower() == 'cpu'
  return not any(_installed(module) and _device_files(devices)
                 for module, devices in _ACCELERATORS.items())


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):
    return False


def _device_files(pattern: str) -> bool:
  return bool(glob.glob(pattern))


def _argv_turns_off(argv) -> bool:
  """Whether the command line sets `config.cpu_tuning` false (its last setting wins)."""
  off = False
  for arg in argv:
    if arg == '--noconfig.cpu_tuning':
      off = True
    elif arg == '--config.cpu_tuning':
      off = False
    elif arg.startswith('--config.cpu_tuning='):
      off = arg.split('=', 1)[1].strip().lower() in ('0', 'false', 'no', 'off')
  return off


def relaunch_allocator(argv=None) -> None:
  """Re-executes this process under the allocator of a CPU run; returns where it need not.

  Entry points call it (as `malloc.relaunch()`) before anything else. Only for a run on
  the CPU (`will_use_cpu`) with CPU tuning on (SMALLFX_CPU_TUNING, and
  `--config.cpu_tuning` on the command line: a config file's own setting is read too
  late for this), except that SMALLFX_MALLOC naming an allocator is always obeyed.
  Which allocator and why: `smallfx.malloc`.
  """
  argv = sys.argv if argv is None else argv
  chosen = malloc.choice()
  explicit = os.environ.get(malloc.ENV, 'auto') not in ('auto', 'system')
  if not explicit and (not switch_on() or _argv_turns_off(argv[1:]) or not will_use_cpu()):
    return
  malloc.relaunch_now(chosen)


def main() -> None:
  """`python -m smallfx.tuning`: what a run started here would get, without building."""
  print(f'{ENV}: {"on" if switch_on() else "off"}; a run here will use the CPU: '
        f'{will_use_cpu()}')
  print(f'allocator: {malloc.choice()} (this process: {malloc.name()}); '
        f'tcmalloc {malloc.library() or "not installed"}, '
        f'mimalloc {malloc.mimalloc_library() or "not installed"}, glibc with huge pages '
        f'{"possible" if malloc.glibc_huge_pages() else "not possible"}')
  from smallfx.models import onednn  # pylint: disable=g-import-not-at-top
  print(f'oneDNN convolutions: {"built" if onednn.built() else "not built"} in '
        f'{onednn.cache_dir()}')


if __name__ == '__main__':
  main()
