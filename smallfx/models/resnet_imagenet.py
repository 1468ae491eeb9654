"""ImageNet ResNet-18/34/50 (He et al. 2016) in torchvision's layout.

The layout is torchvision's so its pretrained weights load one to one: a 7x7/2
stem, 3x3/2 max pool, four stages `layer1..4`, a 1x1 conv + batch norm
`downsample` on the shortcut where the shape changes, and (v1.5) the stride of
a Bottleneck on its 3x3 conv rather than the first 1x1. Padding is PyTorch's
symmetric padding, not 'SAME': the two differ for stride 2 on even inputs, and
the weights were trained with PyTorch's.
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from smallfx.models import conv as conv_lib

# PyTorch's BatchNorm defaults: momentum 0.1 (Flax 0.9) and eps 1e-5.
BatchNorm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)

# torchvision initialises convolutions with He-normal over the output fan.
_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _conv(features, kernel, strides=1, name=None, dtype=jnp.float32):
  pad = kernel // 2
  return conv_lib.Conv(features, (kernel, kernel), strides=strides, padding=((pad, pad), (pad, pad)),
                 use_bias=False, kernel_init=_conv_init, dtype=dtype, name=name)


class BasicBlock(nn.Module):
  """Two 3x3 convolutions (ResNet-18/34)."""
  features: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    norm = functools.partial(BatchNorm, use_running_average=not train, dtype=self.dtype)
    y = nn.relu(norm(name='bn1')(_conv(self.features, 3, self.strides, 'conv1', self.dtype)(x)))
    y = norm(name='bn2')(_conv(self.features, 3, 1, 'conv2', self.dtype)(y))
    return nn.relu(_shortcut(x, y, self.strides, norm, self.dtype) + y)


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (strided, v1.5), 1x1 expand by 4 (ResNet-50)."""
  features: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    norm = functools.partial(BatchNorm, use_running_average=not train, dtype=self.dtype)
    y = nn.relu(norm(name='bn1')(_conv(self.features, 1, 1, 'conv1', self.dtype)(x)))
    y = nn.relu(norm(name='bn2')(_conv(self.features, 3, self.strides, 'conv2', self.dtype)(y)))
    y = norm(name='bn3')(_conv(self.features * 4, 1, 1, 'conv3', self.dtype)(y))
    return nn.relu(_shortcut(x, y, self.strides, norm, self.dtype) + y)


def _shortcut(x, y, strides, norm, dtype):
  """Identity, or torchvision's `downsample` (1x1 conv + BN) where shapes differ."""
  if strides == 1 and x.shape[-1] == y.shape[-1]:
    return x
  x = _conv(y.shape[-1], 1, strides, 'downsample_conv', dtype)(x)
  return norm(name='downsample_bn')(x)


class ResNet(nn.Module):
  stage_sizes: Sequence[int]
  block: Any  # BasicBlock or Bottleneck
  width: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = functools.partial(BatchNorm, use_running_average=not train, dtype=self.dtype)
    base = int(64 * self.width)
    x = _conv(base, 7, 2, 'conv1', self.dtype)(x.astype(self.dtype))
    x = nn.relu(norm(name='bn1')(x))
    # Flax pads max pooling with -inf, as PyTorch does.
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for i, n in enumerate(self.stage_sizes):
      for j in range(n):
        strides = 2 if i > 0 and j == 0 else 1
        x = self.block(base * 2**i, strides, self.dtype, name=f'layer{i + 1}_{j}')(x, train)
    return jnp.mean(x, axis=(1, 2))


# name -> (blocks per stage, block type)
ARCHS = {
    'resnet18': ((2, 2, 2, 2), BasicBlock),
    'resnet34': ((3, 4, 6, 3), BasicBlock),
    'resnet50': ((3, 4, 6, 3), Bottleneck),
}


def factories():
  """Registry entries: name -> factory(width, dtype)."""
  return {name: functools.partial(ResNet, stage_sizes=sizes, block=block)
          for name, (sizes, block) in ARCHS.items()}
