"""`Conv`: flax's convolution, with gradients that XLA:CPU computes fast.

The same maths as `nn.Conv` (same parameters and names, equal values and
gradients to float rounding); only the formulation XLA receives differs, and only
on CPU, where XLA runs convolutions on Eigen's kernels, about half as fast as oneDNN's.

On CPU, float32 layers on one device run forward, input and kernel gradient on
oneDNN (`smallfx.models.onednn`, FFI calls built by a run's set-up: `_onednn`): ResNet-20's
train step (batch 128, 2-core EPYC) is then 1.4-1.6x faster than with XLA's kernels in
the formulations below, SmallCNN's 1.07x (experiments/bench/README.md, "oneDNN through
FFI"). Grey images' first layers keep item 3, which beats oneDNN there. Without oneDNN
(not x86-64 Linux, no C++ compiler, bfloat16, several devices, or not built yet where
no run's set-up built it: `smallfx.tuning`), three things are slow in XLA's kernels, and
the layers are rewritten so that XLA runs them faster: ResNet-20's step 1.35x with
items 1-2, SmallCNN's 1.15x with 3 ("Convolution gradients").

All of this is CPU tuning, decided by `smallfx.tuning` when a convolution is traced
(`tuning.cpu_formulations`, `tuning.onednn_calls`): SMALLFX_CPU_TUNING=0 or
`config.cpu_tuning=False` gives `lax`'s convolution everywhere.

1. The kernel gradient. JAX writes it as a convolution whose *input* is the
   layer's input x with the batch as feature dimension; XLA:CPU's kernels want
   the feature dimension innermost, so it transposes x to (C, H, W, N) and fuses
   into that transpose a recomputation of x's producer (BatchNorm, ReLU, the
   residual sum), read at a stride of H*W*C floats: up to 77 ms of a 500 ms step
   for one layer. Here the roles are swapped: dy is the input and x the kernel,
   (N, H, W, C) -> (H, W, N, C), a transpose that keeps C's contiguous runs. XLA
   moves operands back unless dy is as large as x, so dy is zero-padded to x's size.
   The strided transpose now falls on dy, so this is done where dy is no larger
   than x (C_out <= C_in) and the layer is narrow (C_in <= 32): wider layers gain
   nothing, and 1x1 kernels keep lax's form, a matrix product XLA gives YNNPACK.

2. Strided convolutions. Their gradients are convolutions with lhs or rhs
   dilation, which XLA:CPU runs through slow generic kernels (and the kernel
   gradient through the transpose above). A 1x1 stride-s convolution is a 1x1
   convolution of the strided slice; a k x k one is a stride-1 convolution of the
   space-to-depth input (s*s*C channels, ceil(k/s) taps). The latter does up to
   (4/3)^2 = 1.8x the FLOPs for k=3, s=2, which pays off for narrow layers only:
   measured per layer (fwd+bwd, batch 128): 16->32 channels 20.5 -> 19.2 ms,
   32->64 10.6 -> 12.8 ms, 128->256 (batch 32) 121 -> 163 ms. Hence the limit
   `SPACE_TO_DEPTH_MAX_CHANNELS` on s*s*C.

3. One input channel (grey images' first layer). Eigen's kernels vectorise over
   input channels: on one core, SmallCNN's first layer (1->32) ran at ~10 GFLOP/s
   against ~90 for its second. In training it is computed as one shifted product
   per tap instead (`_one_channel`).

GPUs (cuDNN) handle all of these natively, so elsewhere this is `lax`'s own.
Grouped (depthwise) and dilated convolutions always go to `lax` unchanged.
The rewritten layers define reverse-mode gradients only (a custom VJP): on CPU,
forward-mode AD through them (`jax.jvp`, `jax.jacfwd`) raises, and so do second
derivatives on oneDNN (CPU tuning off gives both); nothing in smallfx uses either.
"""

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from smallfx import tuning
from smallfx.models import onednn

NHWC = ('NHWC', 'HWIO', 'NHWC')

# Where each rewrite pays, from the train steps of `python tools/bench_conv.py`
# (lax / rewrite, 2-core EPYC). The swapped kernel gradient, C_out <= C_in and
# C_in <= 32: ResNet-20 x1.31-1.35, SmallCNN (1->32, 32->64) untouched; without
# C_out <= C_in, SmallCNN x0.93; up to C_in 64, ResNet-18 (64-512 channels, 96 px)
# x0.96; always, ResNet-18 x0.91. Space-to-depth for s*s*C_in <= 64: ResNet-20
# 505 -> 386 ms; <= 128, 397 ms; always, 396 ms and WRN-16-8 (128+ channels)
# x0.94; only 1x1 ones, 448 ms.
SWAPPED_KERNEL_GRAD_MAX_CHANNELS = 32
SPACE_TO_DEPTH_MAX_CHANNELS = 64
# One input channel (a grey image's first layer) as shifted products, up to 3x3
# (`tools/bench_conv.py --models cnn:32 --rounds 11 [--augment ...]`): SmallCNN
# x1.15 with crop|flip and x1.33 with crop|flip|trivial (TrivialAugment is no
# longer recomputed: `_padded`); ResNet-20 b32 on 28x28x1 x0.97-1.02 and on 8x8x1
# x1.04, i.e. noise. Three channels in the same form cost ResNet-20 (32x32x3) x0.94-0.98.
SHIFTED_PRODUCTS_MAX_TAPS = 9
# Float32 layers' forward and both gradients on oneDNN, where it builds (not one
# input channel, not stride-1 1x1: `tools/bench_conv.py`-style A/B, 2-core EPYC):
# ResNet-20 b128 x1.44-1.58 (312-345 -> 216-218 ms), SmallCNN b32 x1.07, ResNet-20 on
# 8x8x1 b32 x1.10, ResNet-18 (96 px) x1.19, WRN-16-8 x1.13, EfficientNet-Lite0 (96 px,
# mostly depthwise and 1x1 layers) x0.94-0.98. SmallCNN's 1->32 first layer as shifted
# products beats it (x1.07). With stride-1 1x1 layers on oneDNN as well: EfficientNet-Lite0
# x0.85, and x0.96-0.97 against this rule for ResNet-18 and ResNet-20.
# Unlike XLA's own oneDNN thunk, FFI calls serialise: jax's compilation cache keeps them.
# Whether they are used is `tuning.onednn_calls()` (`tuning.forced` for tools and tests).


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated`, in the CPU formulation where CPU tuning is on."""
  if not tuning.cpu_formulations() or not _is_plain_2d(
      lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
      batch_group_count, preferred_element_type):
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision, preferred_element_type)
  return cpu_conv(lhs, rhs, window_strides, padding, precision)


def _is_plain_2d(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers,
                 feature_group_count, batch_group_count, preferred_element_type):
  def ones(dilation):
    return dilation is None or all(d == 1 for d in dilation)
  return (lhs.ndim == 4 and dimension_numbers is not None  # None means NCHW to lax
          and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
          == lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)
          and ones(lhs_dilation) and ones(rhs_dilation) and feature_group_count == 1
          and batch_group_count == 1 and preferred_element_type is None)


def lax_conv(x, w, strides, padding, precision=None):
  """The NHWC x HWIO convolution as lax writes it (what the CPU formulation replaces)."""
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC,
                                  precision=precision)


def cpu_conv(x, w, strides, padding, precision=None):
  """NHWC x HWIO convolution in the CPU formulation (any platform, for tests)."""
  strides = tuple(strides)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(x.shape[1:3], w.shape[:2], strides, padding)
  padding = tuple(tuple(p) for p in padding)
  if not (strides == (1, 1) and _one_channel_fits(x, w, padding)) and _onednn_fits(
      x, w, strides, padding):
    return _onednn(x, w, strides, padding, precision)
  if strides == (1, 1):
    return _stride_1(x, w, padding, precision)
  out = [(x.shape[1 + d] + sum(padding[d]) - w.shape[d]) // strides[d] + 1 for d in range(2)]
  if w.shape[:2] == (1, 1):
    x = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (*padding[0], 0), (*padding[1], 0),
                                            (0, 0, 0)))
    x = x[:, ::strides[0], ::strides[1]][:, :out[0], :out[1]]
    return _stride_1(x, w, ((0, 0), (0, 0)), precision)
  if strides[0] * strides[1] * x.shape[-1] > SPACE_TO_DEPTH_MAX_CHANNELS:
    return lax_conv(x, w, strides, padding, precision)
  return _stride_1(*_space_to_depth(x, w, strides, padding, out), ((0, 0), (0, 0)), precision)


def _one_channel_fits(x, w, padding):
  return (x.shape[-1] == 1 and 1 < w.shape[0] * w.shape[1] <= SHIFTED_PRODUCTS_MAX_TAPS
          and min(min(p) for p in padding) >= 0)  # a negative pad (a crop) stays lax's


def _stride_1(x, w, padding, precision):
  if _one_channel_fits(x, w, padding):
    return _one_channel(x, w, padding, precision)
  # A 1x1 kernel's gradient is a matrix product, which XLA already gives to a
  # fast library (YNNPACK); as a convolution it would not be.
  if w.shape[:2] == (1, 1) or not _swaps_kernel_grad(w):
    return lax_conv(x, w, (1, 1), padding, precision)
  return _conv(x, w, padding, precision)


def _swaps_kernel_grad(w):
  """Whether the kernel gradient pays in the swapped form (item 1)."""
  return w.shape[3] <= w.shape[2] <= SWAPPED_KERNEL_GRAD_MAX_CHANNELS


def _onednn_fits(x, w, strides, padding):
  # A stride-1 1x1 layer is a matrix product, which XLA fuses with its elementwise
  # neighbours (YNNPACK); a call would materialise them. A strided 1x1 layer goes to
  # oneDNN (5x faster than XLA's slice and product for ResNet-20's shortcuts) only
  # where its channels fill oneDNN's blocks of 8 (AVX2) or 16 (AVX-512): oneDNN 3.2's
  # AVX2 kernel gradient for it (jit_1x1:avx2) is wrong where the weights are padded
  # to blocks, and differs from run to run (a 4->4 or 4->8 layer on 8x8 images:
  # relative error 0.7-0.97 on a Zen 3 EPYC; tests/test_conv.py). One device, or one
  # device's part of a `shard_map`: the partitioner would gather a sharded batch for a
  # custom call. oneDNN takes no negative padding (a crop), and no empty operand or output.
  pointwise = w.shape[:2] == (1, 1)
  unblocked = w.shape[2] % 16 or w.shape[3] % 16
  return (not (pointwise and (strides == (1, 1) or unblocked))
          and jax.default_backend() == 'cpu' and _one_device_program()
          and x.dtype == w.dtype == jnp.float32 and min(min(p) for p in padding) >= 0
          and min(x.shape + w.shape) > 0
          and all(x.shape[1 + d] + sum(padding[d]) >= w.shape[d] for d in range(2))
          and tuning.onednn_calls())


def _one_device_program() -> bool:
  mesh = jax.sharding.get_abstract_mesh()
  manual = not mesh.empty and all(t == jax.sharding.AxisType.Manual for t in mesh.axis_types)
  return manual or jax.device_count() == 1


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _onednn(x, w, strides, padding, precision):
  del precision  # oneDNN computes in float32 throughout
  return onednn.conv(x, w, strides, padding)


def _onednn_fwd(x, w, strides, padding, precision):
  return _onednn(x, w, strides, padding, precision), (x, w)


def _onednn_bwd(strides, padding, precision, residuals, dy):
  del precision
  x, w = residuals
  return (onednn.input_grad(dy, w, x.shape, strides, padding),
          onednn.kernel_grad(x, dy, w.shape, strides, padding))


_onednn.defvjp(_onednn_fwd, _onednn_bwd)


def _space_to_depth(x, w, strides, padding, out):
  """A stride-s convolution's operands as a stride-1 (VALID) convolution's.

  With taps k = s*a + b, y[i] = sum_k x[s*i + k] w[k] = sum_{a,b} X[i + a, b] W[a, b]
  where X[j, b] = x[s*j + b] and W[a, b] = w[s*a + b] (zero beyond the kernel).
  """
  n, _, _, c = x.shape
  kh, kw, _, o = w.shape
  taps = [-(-k // s) for k, s in zip((kh, kw), strides)]
  size = [o_ + t - 1 for o_, t in zip(out, taps)]
  # Pad (or crop: lax.pad takes negative amounts) to exactly s * size rows and columns.
  x = lax.pad(x, jnp.zeros((), x.dtype), (
      (0, 0, 0),
      *[(padding[d][0], strides[d] * size[d] - x.shape[1 + d] - padding[d][0], 0)
        for d in range(2)],
      (0, 0, 0)))
  x = x.reshape(n, size[0], strides[0], size[1], strides[1], c)
  x = x.transpose(0, 1, 3, 2, 4, 5).reshape(n, size[0], size[1], strides[0] * strides[1] * c)
  w = jnp.pad(w, ((0, taps[0] * strides[0] - kh), (0, taps[1] * strides[1] - kw), (0, 0), (0, 0)))
  w = w.reshape(taps[0], strides[0], taps[1], strides[1], c, o).transpose(0, 2, 1, 3, 4, 5)
  return x, w.reshape(taps[0], taps[1], strides[0] * strides[1] * c, o)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, w, padding, precision):
  """Stride-1 NHWC convolution whose kernel gradient takes dy as the input."""
  return lax_conv(x, w, (1, 1), padding, precision)


def _conv_fwd(x, w, padding, precision):
  return _conv(x, w, padding, precision), (x, w)


def _conv_bwd(padding, precision, residuals, dy):
  x, w = residuals
  _, input_grad = jax.vjp(lambda x: lax_conv(x, w, (1, 1), padding, precision), x)
  dx, = input_grad(dy)
  return dx, _kernel_grad(x, dy, w.shape[:2], padding, precision)


def _kernel_grad(x, dy, kernel, padding, precision):
  # dW[k] = sum_i dy[i] x[i + k - lo] is a correlation of dy (the input: batch
  # C_out, features N) with x (the kernel: in N, out C_in), flipped: output j = K-1-k
  # with dy padded by K-1-lo in front. Padded at the end to x's size as well.
  grow = [max(x.shape[1 + d] - dy.shape[1 + d], 0) for d in range(2)]
  dy = jnp.pad(dy, ((0, 0), (0, grow[0]), (0, grow[1]), (0, 0)))
  pads = []
  for d, k in enumerate(kernel):
    front = k - 1 - padding[d][0]
    pads.append((front, k + x.shape[1 + d] - 1 - dy.shape[1 + d] - front))
  dw = lax.conv_general_dilated(dy, x, (1, 1), pads, dimension_numbers=('CHWN', 'IHWO', 'HWCN'),
                                precision=precision)
  return dw[::-1, ::-1]


_conv.defvjp(_conv_fwd, _conv_bwd)


def _padded(x, w, padding):
  """x (N, H, W, 1) zero-padded to (N, H', W') in a buffer of its own, as float32.

  Written into zeros by a dynamic_update_slice at runtime offsets (zero plus the
  padding, taken from w so that XLA cannot fold it into a pad): a buffer XLA must
  materialise. As a plain pad, XLA fused x's producer into every tap of every
  consumer instead: with TrivialAugment, which it then recomputed per tap and output
  channel, SmallCNN's step was x0.89 of lax's convolution's; with this buffer, x1.33.
  (Under jax.vmap, i.e. seeds vmapped on CPU, the batched offsets make it a scatter:
  correct, but that layout was not timed.)
  """
  x = x[..., 0].astype(jnp.float32)
  # nan_to_num: a diverged kernel must still give offset 0, whatever a backend makes of int(NaN).
  zero = (0 * jnp.nan_to_num(w.reshape(-1)[0])).astype(jnp.int32)
  shape = (x.shape[0], *[x.shape[1 + d] + sum(padding[d]) for d in range(2)])
  return lax.dynamic_update_slice(jnp.zeros(shape, jnp.float32), x,
                                  (zero, zero + padding[0][0], zero + padding[1][0]))


def _taps(padded, kernel):
  """The (N, H_out, W_out) slices of the padded input that each tap of the kernel reads."""
  out = [padded.shape[1 + d] - kernel[d] + 1 for d in range(2)]
  return [padded[:, i:i + out[0], j:j + out[1]]
          for i in range(kernel[0]) for j in range(kernel[1])]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _one_channel(x, w, padding, precision):
  """A stride-1 convolution of one input channel, trained as shifted products.

  XLA:CPU's convolution kernels vectorise over input channels; with one, SmallCNN's
  first layer (b32, 28 px, 32 outputs) took 1.4 ms of a 12.7 ms single-core train
  step for 2% of its FLOPs. In training (the custom VJP's forward) it is the sum
  over taps of x's shift times a row of w, one loop fused with the bias and ReLU
  that follow, and the kernel gradient one matrix product (taps x pixels) @ dy.
  Without gradients (evaluation) it stays lax's convolution: at evaluation sizes (8
  seeds x 500 images) shifted products took 277 ms per batch against 239 ms, and
  twice as long to compile.
  """
  return lax_conv(x, w, (1, 1), padding, precision)


def _shifted_products(x, w, padding, precision):
  del precision  # elementwise products, accumulated in float32
  padded = _padded(x, w, padding)
  rows = w.reshape(-1, w.shape[-1]).astype(jnp.float32)
  y = sum(t[..., None] * rows[i] for i, t in enumerate(_taps(padded, w.shape[:2])))
  return y.astype(jnp.result_type(x, w)), (x, w, padded)


def _one_channel_bwd(padding, precision, residuals, dy):
  x, w, padded = residuals
  # Taps stacked in front: (T, N, H, W) contracts with dy (N, H, W, O) with no transpose.
  taps = jnp.stack(_taps(padded, w.shape[:2])).astype(dy.dtype)
  dw = lax.dot_general(taps, dy, (((1, 2, 3), (0, 1, 2)), ((), ())), precision=precision,
                       preferred_element_type=jnp.float32)
  # The input gradient (unused, hence removed by XLA, for a first layer).
  _, input_grad = jax.vjp(lambda x: lax_conv(x, w, (1, 1), padding, precision), x)
  dx, = input_grad(dy)
  return dx, dw.reshape(w.shape).astype(w.dtype)


_one_channel.defvjp(_shifted_products, _one_channel_bwd)


class Conv(nn.Conv):
  """`nn.Conv` computed by `conv_general_dilated` above; same parameters and names."""
  conv_general_dilated: Callable = conv_general_dilated
