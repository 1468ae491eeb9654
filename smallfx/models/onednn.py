"""Convolutions run by oneDNN, through the convolution thunk XLA:CPU ships.

jaxlib's XLA:CPU carries oneDNN and a runtime for its convolution custom call
(`__onednn$convolution`), but not the rewriter that would turn convolutions into
such calls (a build option the public wheels leave off), so every convolution
goes to XLA's own (Eigen) kernels. On a 2-core EPYC (AVX-512), a 16->16 3x3 layer
at batch 128 and 32 px takes 6.6 ms forward there and 3.7 ms as this call (oneDNN's
brgemm kernels, the ones PyTorch uses); its input gradient 6.0 against 3.6 ms.
This module emits the call directly.

`conv(x, w, ...)` is an undilated, ungrouped forward convolution whose operands
and result may each have their dimensions in any order (the call names them), so
an input gradient (the flipped kernel with its features swapped) needs no transpose
in XLA. Kernel gradients as forward convolutions (a 32x32 "kernel") run on oneDNN's
reference path, hundreds of times slower, so they stay XLA's (`smallfx.models.conv`).

The call's configuration is XLA's internal format, so `available()` compiles and
checks small calls against lax before anything relies on them; with a jaxlib where
that fails, smallfx keeps XLA's convolutions.
"""

import functools
import json
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core
from jax.extend.mlir import ir
from jax.extend.mlir.dialects import stablehlo
from jax.interpreters import batching, mlir

TARGET = '__onednn$convolution'

_conv_p = jex_core.Primitive('onednn_conv')


def conv(x, w, *, lhs_spec: Sequence[int], rhs_spec: Sequence[int], out_spec: Sequence[int],
         strides: Sequence[int], padding: Sequence[tuple[int, int]]):
  """Cross-correlation of x with w, as `lax.conv_general_dilated` with these specs.

  Specs give dimension indices as lax's ConvDimensionNumbers do: lhs (batch,
  feature, *spatial), rhs (out feature, in feature, *spatial), out (batch,
  feature, *spatial).
  """
  return _conv_p.bind(x, w, lhs_spec=tuple(lhs_spec), rhs_spec=tuple(rhs_spec),
                      out_spec=tuple(out_spec), strides=tuple(strides),
                      padding=tuple(tuple(p) for p in padding))


def _out_shape(x_shape, w_shape, lhs_spec, rhs_spec, out_spec, strides, padding):
  spatial = [
      (x_shape[lhs_spec[2 + d]] + sum(padding[d]) - w_shape[rhs_spec[2 + d]]) // strides[d] + 1
      for d in range(len(strides))]
  shape = [0] * len(out_spec)
  shape[out_spec[0]] = x_shape[lhs_spec[0]]
  shape[out_spec[1]] = w_shape[rhs_spec[0]]
  for d, size in enumerate(spatial):
    shape[out_spec[2 + d]] = size
  return tuple(shape)


def _abstract_eval(x, w, *, lhs_spec, rhs_spec, out_spec, strides, padding):
  return jax.core.ShapedArray(
      _out_shape(x.shape, w.shape, lhs_spec, rhs_spec, out_spec, strides, padding), x.dtype)


def _config(x_ndim, lhs_spec, rhs_spec, out_spec, strides, padding, kernel_size):
  # xla.cpu.BackendConfig.onednn_conv_config, as XLA's own rewriter fills it.
  def data(spec):
    return {'dims': x_ndim, 'data': {'batch_dim': spec[0], 'feature_dim': spec[1],
                                     'spatial_dims': list(spec[2:])}}
  return {'onednn_conv_config': {
      'dims': x_ndim,
      'input': data(lhs_spec),
      'kernel': {'dims': x_ndim, 'filter': {'output_feature_dim': rhs_spec[0],
                                            'input_feature_dim': rhs_spec[1],
                                            'spatial_dims': list(rhs_spec[2:])}},
      'output': data(out_spec),
      'window': {'size': list(kernel_size), 'pad_left': [p[0] for p in padding],
                 'pad_right': [p[1] for p in padding], 'strides': list(strides),
                 'window_dilations': [1] * len(strides)},
      'feature_groups': 1}}


def _lowering(ctx, x, w, *, lhs_spec, rhs_spec, out_spec, strides, padding):
  x_aval, w_aval = ctx.avals_in
  out_aval, = ctx.avals_out
  kernel_size = [w_aval.shape[d] for d in rhs_spec[2:]]
  config = _config(x_aval.ndim, lhs_spec, rhs_spec, out_spec, strides, padding, kernel_size)
  row_major = lambda n: ir.DenseIntElementsAttr.get(np.arange(n - 1, -1, -1, dtype=np.int64),
                                                    type=ir.IndexType.get())
  op = stablehlo.CustomCallOp(
      [mlir.aval_to_ir_type(ctx.module_context, out_aval)], [x, w],
      call_target_name=ir.StringAttr.get(TARGET),
      backend_config=ir.StringAttr.get(json.dumps(config)),
      api_version=ir.IntegerAttr.get(ir.IntegerType.get_signless(32), 1),
      operand_layouts=ir.ArrayAttr.get([row_major(x_aval.ndim), row_major(w_aval.ndim)]),
      result_layouts=ir.ArrayAttr.get([row_major(out_aval.ndim)]))
  return op.results


@functools.cache
def _jitted(**params):
  # Outside jit (eager calls), the primitive runs as a one-op compiled program.
  return jax.jit(functools.partial(_conv_p.bind, **params))


_conv_p.def_abstract_eval(_abstract_eval)
_conv_p.def_impl(lambda x, w, **params: _jitted(**params)(x, w))
mlir.register_lowering(_conv_p, _lowering, platform='cpu')


def _batched(args, dims, **params):
  # One call per vmapped index (None: an operand not mapped). The call takes no
  # extra batch dimension, and folding one into the images' would need the weights
  # shared, which vmapped seeds do not.
  size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
  take = lambda a, d, i: a if d is None else lax.index_in_dim(a, i, d, False)
  outs = [_conv_p.bind(*(take(a, d, i) for a, d in zip(args, dims)), **params)
          for i in range(size)]
  return jnp.stack(outs), 0


batching.primitive_batchers[_conv_p] = _batched


def _lax_conv(x, w, *, lhs_spec, rhs_spec, out_spec, strides, padding):
  dn = lax.ConvDimensionNumbers(tuple(lhs_spec), tuple(rhs_spec), tuple(out_spec))
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=dn,
                                  precision=lax.Precision.HIGHEST)


@functools.cache
def available() -> bool:
  """Whether this jaxlib runs the call, and gets lax's values, on this machine's CPU."""
  try:
    # The first caller is usually a convolution being traced: compute here, eagerly.
    with jax.ensure_compile_time_eval():
      return _matches_lax()
  except Exception:  # pylint: disable=broad-except
    # An unknown target or configuration fails the compile: this jaxlib has no such call.
    return False


def _matches_lax() -> bool:
  rng = np.random.default_rng(0)
  nhwc = (0, 3, 1, 2)
  cases = [  # (x, w, lhs/rhs/out specs, strides, padding): the forms conv.py uses
      ((2, 5, 6, 3), (3, 2, 3, 4), nhwc, (3, 2, 0, 1), nhwc, (1, 1), ((1, 1), (0, 1))),
      # an input gradient: the kernel's in and out features swapped
      ((2, 5, 6, 4), (3, 3, 3, 4), nhwc, (2, 3, 0, 1), nhwc, (1, 1), ((2, 0), (1, 1))),
  ]
  cpu = jax.devices('cpu')[0]
  for x_shape, w_shape, *spec in cases:
    x = jax.device_put(rng.standard_normal(x_shape, np.float32), cpu)
    w = jax.device_put(rng.standard_normal(w_shape, np.float32), cpu)
    kw = dict(zip(('lhs_spec', 'rhs_spec', 'out_spec', 'strides', 'padding'), spec))
    got = jax.jit(functools.partial(conv, **kw))(x, w)
    want = _lax_conv(x, w, **kw)
    if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4, atol=1e-4):
      return False
  return True
