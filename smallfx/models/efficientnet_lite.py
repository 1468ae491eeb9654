"""EfficientNet-Lite0..4 (Tan & Le 2019; the variants TensorFlow made for mobile).

Lite differs from EfficientNet-B0..7 in ways that matter for loading weights:
ReLU6 instead of swish, no squeeze-and-excite, and the stem (32 channels), the
head (1280) and the first and last stage's repeats are not scaled with the
model size. The pretrained weights were trained in TensorFlow, so convolutions
use TF 'SAME' padding: for stride 2 on an even input the extra row and column
go at the bottom and right. Flax's 'SAME' is exactly that rule.

Module names follow the PyTorch port's state_dict (`conv_stem`, `bn0`,
`blocks_N.depthwise_conv`, ...) so `smallfx.convert` maps keys one to one.
The backbone returns the pooled 1280 features; `Net` adds the classifier.
"""

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from smallfx.models import conv as conv_lib

# TF's batch norm: epsilon 1e-3 and moving-average decay 0.99, which is Flax's
# `momentum` (PyTorch writes the same thing as momentum = 1 - 0.99 = 0.01).
BatchNorm = functools.partial(nn.BatchNorm, momentum=0.99, epsilon=1e-3)

# TF's initialisers: He-normal over the output fan for convolutions.
_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# A depthwise kernel (kh, kw, 1, C) sees kh*kw inputs per output; Flax would
# count C outputs into the fan-out and shrink it C-fold, so use the fan-in.
_depthwise_init = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')

# The Lite0 stages: (repeats, kernel, stride, expand ratio, in, out channels).
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)

# name -> (width coefficient, depth coefficient, native resolution), as in
# TF's efficientnet_lite_builder.
VARIANTS = {
    'efficientnet_lite0': (1.0, 1.0, 224),
    'efficientnet_lite1': (1.0, 1.1, 240),
    'efficientnet_lite2': (1.1, 1.2, 260),
    'efficientnet_lite3': (1.2, 1.4, 280),
    'efficientnet_lite4': (1.4, 1.8, 300),
}

STEM_FEATURES = 32
HEAD_FEATURES = 1280


def round_filters(filters: int, multiplier: float, divisor: int = 8) -> int:
  """Channels times `multiplier`, to a multiple of 8, never 10% below (as TF)."""
  scaled = filters * multiplier
  rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * scaled:
    rounded += divisor
  return int(rounded)


def block_args(width: float, depth: float) -> tuple[tuple[int, int, int, int, int], ...]:
  """(kernel, stride, expand ratio, in, out channels) of every block, in order."""
  blocks = []
  for i, (repeats, kernel, stride, expand, cin, cout) in enumerate(STAGES):
    fixed = i in (0, len(STAGES) - 1)  # Lite keeps these stages' depth.
    # The first stage reads the stem, which Lite does not scale.
    cin = STEM_FEATURES if i == 0 else round_filters(cin, width)
    cout = round_filters(cout, width)
    n = repeats if fixed else int(math.ceil(depth * repeats))
    for j in range(n):
      blocks.append((kernel, stride if j == 0 else 1, expand, cin if j == 0 else cout, cout))
  return tuple(blocks)


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TF 'SAME' padding: the odd extra pixel goes after (bottom, right)."""
  total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def depthwise_conv_shifted(x, kernel, stride: int):
  """Depthwise 'SAME' convolution as a sum of k*k shifted, strided slices.

  XLA:CPU has no fast path for grouped convolutions: measured on a 2-core CPU
  (jax 0.10, batch 32), `feature_group_count` convolutions of EfficientNet-Lite's
  shapes ran 10-30x slower forward and 6-11x slower forward+backward than this
  form, which fuses into one elementwise loop (4 GFLOP/s for the whole Lite0
  forward pass with them, against 48 for ResNet-18). GPUs and TPUs have fast
  grouped convolutions and keep them.
  """
  k = kernel.shape[0]
  height, width = x.shape[1:3]
  (top, bottom), (left, right) = (_same_pads(height, k, stride), _same_pads(width, k, stride))
  xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  out_h, out_w = -(-height // stride), -(-width // stride)
  out = None
  for i in range(k):
    for j in range(k):
      window = jax.lax.slice(xp, (0, i, j, 0),
                             (xp.shape[0], i + (out_h - 1) * stride + 1,
                              j + (out_w - 1) * stride + 1, xp.shape[3]),
                             (1, stride, stride, 1))
      term = window * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


class DepthwiseConv(nn.Module):
  """A bias-free depthwise convolution with TF 'SAME' padding.

  The kernel is (k, k, 1, C), what `nn.Conv(feature_group_count=C)` holds, so
  converted weights load either way.
  """
  kernel_size: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    kernel = self.param('kernel', _depthwise_init, (self.kernel_size, self.kernel_size, 1,
                                                    channels), jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if jax.default_backend() == 'cpu':
      return depthwise_conv_shifted(x, kernel, self.strides)
    return jax.lax.conv_general_dilated(
        x, kernel, (self.strides, self.strides),
        [_same_pads(x.shape[1], self.kernel_size, self.strides),
         _same_pads(x.shape[2], self.kernel_size, self.strides)],
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=channels)


class MBConv(nn.Module):
  """Inverted residual: 1x1 expand, depthwise kxk, 1x1 project (MobileNetV2)."""
  kernel: int
  strides: int
  expand: int
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(conv_lib.Conv, use_bias=False, padding='SAME', dtype=self.dtype,
                             kernel_init=_conv_init)
    norm = functools.partial(BatchNorm, use_running_average=not train, dtype=self.dtype)
    hidden = x.shape[-1] * self.expand
    y = x
    if self.expand != 1:
      y = nn.relu6(norm(name='bn0')(conv(hidden, (1, 1), name='expand_conv')(y)))
    y = DepthwiseConv(self.kernel, self.strides, self.dtype, name='depthwise_conv')(y)
    y = nn.relu6(norm(name='bn1')(y))
    # Linear bottleneck: no activation after the projection.
    y = norm(name='bn2')(conv(self.features, (1, 1), name='project_conv')(y))
    if self.strides == 1 and x.shape[-1] == self.features:
      y = y + x
    return y


class EfficientNetLite(nn.Module):
  """EfficientNet-Lite backbone; `width` further scales the blocks' channels."""
  width_coefficient: float = 1.0
  depth_coefficient: float = 1.0
  width: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = functools.partial(conv_lib.Conv, use_bias=False, padding='SAME', dtype=self.dtype,
                             kernel_init=_conv_init)
    norm = functools.partial(BatchNorm, use_running_average=not train, dtype=self.dtype)
    x = conv(STEM_FEATURES, (3, 3), strides=2, name='conv_stem')(x.astype(self.dtype))
    x = nn.relu6(norm(name='bn0')(x))
    blocks = block_args(self.width_coefficient * self.width, self.depth_coefficient)
    for i, (kernel, strides, expand, _, features) in enumerate(blocks):
      x = MBConv(kernel, strides, expand, features, self.dtype, name=f'blocks_{i}')(x, train)
    x = conv(HEAD_FEATURES, (1, 1), name='conv_head')(x)
    x = nn.relu6(norm(name='bn1')(x))
    return jnp.mean(x, axis=(1, 2))


def factories():
  """Registry entries: name -> factory(width, dtype)."""
  return {name: functools.partial(EfficientNetLite, width_coefficient=w, depth_coefficient=d)
          for name, (w, d, _) in VARIANTS.items()}
