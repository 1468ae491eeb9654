"""Convolutions and their gradients run by oneDNN, as XLA FFI calls.

XLA:CPU runs convolutions on Eigen's kernels. On a 2-core EPYC (AVX-512), ResNet-20's
16->16 3x3 layer at batch 128 and 32 px takes 9.0 ms forward, 6.0 ms for the input
gradient and 17 ms for the kernel gradient there (with its transposes); oneDNN, the
library PyTorch trains with on CPU, takes 3.2, 3.6 and 3.6 ms. Its forward,
backward-data and backward-weights primitives are called here through three small
FFI handlers (`onednn_conv.cc`), NHWC images and HWIO kernels in place, any stride
and non-negative padding.

The handlers are compiled once per machine (seconds, announced on one line of stderr)
with the C++ compiler ($CXX, else g++), jaxlib's FFI headers and the oneDNN of the
onednn-cpu-gomp wheels, a dependency on x86-64 Linux, by a run's set-up
(`smallfx.tuning.prepare`), never while a model is traced; the library is kept in
~/.cache/smallfx/onednn ($XDG_CACHE_HOME/smallfx/onednn, or $SMALLFX_ONEDNN_CACHE). Unlike a call to XLA's
internal oneDNN thunk, an FFI call is an ordinary custom call that XLA serialises, so
jax's persistent compilation cache keeps these programs. The calls are first-order:
their gradients are not defined. `available()` says whether the library built and
loaded and gives lax's values on a small case of each kind; where it does not (no
compiler, another platform), smallfx keeps XLA's convolutions.
"""

import ctypes
import functools
import hashlib
import importlib.metadata
import logging
import os
import pathlib
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from typing import Sequence

import jax
import jaxlib
import numpy as np
from jax import lax

SOURCE = pathlib.Path(__file__).with_name('onednn_conv.cc')
# What a build takes (g++ 12, 2-core EPYC), for the line that announces one.
BUILD_SECONDS = 10
TARGETS = {'forward': 'SmallfxConvForward', 'input_grad': 'SmallfxConvInputGrad',
           'kernel_grad': 'SmallfxConvKernelGrad'}
_NHWC = ('NHWC', 'HWIO', 'NHWC')

Padding = Sequence[tuple[int, int]]


def conv(x, w, strides: Sequence[int], padding: Padding):
  """NHWC x HWIO cross-correlation, as `lax.conv_general_dilated` with these arguments."""
  out = jax.eval_shape(lambda x, w: _lax_conv(x, w, strides, padding), x, w)
  return _call('forward', out, x, w, strides, padding)


def input_grad(dy, w, x_shape: Sequence[int], strides: Sequence[int], padding: Padding):
  """The gradient of `conv` with respect to its input x (of shape `x_shape`)."""
  return _call('input_grad', jax.ShapeDtypeStruct(tuple(x_shape), dy.dtype), dy, w, strides,
               padding)


def kernel_grad(x, dy, w_shape: Sequence[int], strides: Sequence[int], padding: Padding):
  """The gradient of `conv` with respect to its kernel w (of shape `w_shape`)."""
  return _call('kernel_grad', jax.ShapeDtypeStruct(tuple(w_shape), x.dtype), x, dy, strides,
               padding)


def _call(kind, out, a, b, strides, padding):
  _load()
  (top, bottom), (left, right) = padding
  geometry = dict(stride_h=strides[0], stride_w=strides[1], pad_top=top, pad_bottom=bottom,
                  pad_left=left, pad_right=right)
  # vmapped seeds (and their initialisation) call it once per seed: oneDNN takes
  # no second batch dimension, and the seeds' kernels differ.
  call = jax.ffi.ffi_call(TARGETS[kind], out, vmap_method='sequential_unrolled')
  return call(a, b, threads=np.int64(threads_per_device()),
              **{k: np.int64(v) for k, v in geometry.items()})


def threads_per_device() -> int:
  """Each CPU device's share of the cores: devices run their calls side by side."""
  return max(1, len(os.sched_getaffinity(0)) // jax.local_device_count('cpu'))


def _lax_conv(x, w, strides, padding):
  return lax.conv_general_dilated(x, w, tuple(strides), tuple(map(tuple, padding)),
                                  dimension_numbers=_NHWC, precision=lax.Precision.HIGHEST)


def _dist_file(dist: str, suffix: str) -> pathlib.Path | None:
  try:
    found = importlib.metadata.distribution(dist)
  except importlib.metadata.PackageNotFoundError:
    return None
  for f in found.files or []:
    if str(f).endswith(suffix):
      return pathlib.Path(found.locate_file(f)).resolve()
  return None


def _build_plan() -> tuple[list[str], pathlib.Path]:
  """The compiler flags and the cached library's path (which exists once built)."""
  if not (sys.platform == 'linux' and platform.machine() == 'x86_64'):
    raise RuntimeError('built on x86-64 Linux only (oneDNN\'s wheels)')
  lib = _dist_file('onednn-cpu-gomp', '/libdnnl.so.3')
  header = _dist_file('onednn-devel-cpu-gomp', 'include/oneapi/dnnl/dnnl.hpp')
  if lib is None or header is None:
    raise RuntimeError(
        'oneDNN is not installed (pip install onednn-cpu-gomp onednn-devel-cpu-gomp)')
  flags = ['-O2', '-std=c++17', '-shared', '-fPIC', '-fopenmp', '-w', str(SOURCE),
           f'-I{jax.ffi.include_dir()}', f'-I{header.parents[2]}', f'-L{lib.parent}',
           '-l:libdnnl.so.3', f'-Wl,-rpath,{lib.parent}']
  # By the source's text, not its path: another checkout of the same code reuses the build.
  key = hashlib.sha256('\0'.join([
      SOURCE.read_text(), jaxlib.__version__, importlib.metadata.version('onednn-cpu-gomp'),
      *[f for f in flags if f != str(SOURCE)]]).encode())
  return flags, cache_dir() / f'onednn_conv-{key.hexdigest()[:16]}.so'


def cache_dir() -> pathlib.Path:
  """$SMALLFX_ONEDNN_CACHE, else $XDG_CACHE_HOME/smallfx/onednn (~/.cache/smallfx/onednn)."""
  root = os.environ.get('XDG_CACHE_HOME') or '~/.cache'
  return pathlib.Path(
      os.environ.get('SMALLFX_ONEDNN_CACHE', f'{root}/smallfx/onednn')).expanduser()


def built() -> bool:
  """Whether this source's library is already in the cache (nothing to compile)."""
  try:
    return _build_plan()[1].exists()
  except Exception:  # pylint: disable=broad-except
    return False


def build(rebuild: bool = False) -> pathlib.Path:
  """Compiles `onednn_conv.cc` (once: the result is cached by its inputs); its path.

  A compile says so on one line of stderr: it takes seconds, once per machine.
  """
  flags, target = _build_plan()
  if target.exists() and not rebuild:
    return target
  compiler = shlex.split(os.environ.get('CXX', 'g++'))
  if not compiler or shutil.which(compiler[0]) is None:
    raise RuntimeError('no C++ compiler (g++, or $CXX) to build the oneDNN calls')
  cache = target.parent
  cache.mkdir(parents=True, exist_ok=True)
  print(f'building oneDNN convolutions for this CPU (once, ~{BUILD_SECONDS} s; cached in '
        f'{cache})', file=sys.stderr, flush=True)
  # Built under another name and renamed: concurrent first runs never load half a file.
  with tempfile.TemporaryDirectory(dir=cache) as tmp:
    partial = pathlib.Path(tmp) / target.name
    done = subprocess.run([*compiler, *flags, '-o', str(partial)], capture_output=True, text=True)
    if done.returncode:
      raise RuntimeError(f'{" ".join(compiler + flags)} failed:\n{done.stderr[-2000:]}')
    os.replace(partial, target)
  return target


@functools.cache
def _load():
  """Builds (where needed) and loads the library, and registers its handlers with XLA."""
  try:
    library = ctypes.cdll.LoadLibrary(str(build()))
  except OSError:  # a damaged cached build (a full disk, say): once more, afresh
    library = ctypes.cdll.LoadLibrary(str(build(rebuild=True)))
  for name in TARGETS.values():
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, name)), platform='cpu')


_available: list[bool] = []  # the verdict, once reached


def available(build: bool = True) -> bool:  # pylint: disable=redefined-outer-name
  """Whether the oneDNN calls are built, registered and give lax's values here.

  `build=False` answers False, without a compiler ever running, where no build is
  cached yet (and asks again next time); a cached build is loaded and checked.
  """
  if _available:
    return _available[0]
  if not build and not built():
    return False
  try:
    _load()
    # The first caller may be a convolution being traced: compute here, eagerly.
    with jax.ensure_compile_time_eval():
      verdict = _matches_lax()
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('oneDNN convolutions unavailable, XLA\'s are used: %s', e)
    verdict = False
  _available.append(verdict)
  return verdict


def _matches_lax() -> bool:
  rng = np.random.default_rng(0)
  cpu = jax.local_devices(backend='cpu')[0]  # this process's: another's cannot be read here
  # A strided layer with uneven padding and a row and a column left unread.
  x_shape, w_shape, strides, padding = (2, 6, 7, 3), (3, 3, 3, 4), (2, 2), ((1, 1), (0, 1))
  x, w = (jax.device_put(rng.standard_normal(s, np.float32), cpu) for s in (x_shape, w_shape))
  y, vjp = jax.vjp(lambda x, w: _lax_conv(x, w, strides, padding), x, w)
  dy = jax.device_put(rng.standard_normal(y.shape, np.float32), cpu)
  dx, dw = vjp(dy)
  got = jax.jit(lambda x, w, dy: (conv(x, w, strides, padding),
                                  input_grad(dy, w, x_shape, strides, padding),
                                  kernel_grad(x, dy, w_shape, strides, padding)))(x, w, dy)
  for name, a, b in zip(('forward', 'input gradient', 'kernel gradient'), got, (y, dx, dw)):
    if a.shape != b.shape or not np.allclose(a, b, rtol=1e-4, atol=1e-4):
      logging.warning('oneDNN convolutions unused: the %s differs from lax\'s (max error %s)',
                      name, np.max(np.abs(np.asarray(a) - np.asarray(b)))
                      if a.shape == b.shape else f'shape {a.shape}, not {b.shape}')
      return False
  return True
