"""CIFAR-style residual networks: ResNet-20/56/110 (He et al. 2016) and WRN-16-8.

These take small images (8 to 32 px) and keep a 3x3 stem with no pooling, so the
8x8 digits and 28x28 Fashion-MNIST go through them unchanged.
"""

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from smallfx.models import conv as conv_lib
from smallfx.models import simple

# PyTorch's BatchNorm defaults (momentum 0.1 = Flax 0.9, eps 1e-5), so results
# compare with the reference implementations.
BatchNorm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)


class BasicBlock(nn.Module):
  features: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(conv_lib.Conv, use_bias=False, dtype=self.dtype)
    norm = functools.partial(BatchNorm, use_running_average=not train, dtype=self.dtype)
    y = conv(self.features, (3, 3), strides=self.strides)(x)
    y = nn.relu(norm()(y))
    y = conv(self.features, (3, 3))(y)
    # Zero-initialised last scale: each block starts as the identity, which makes
    # the deep variants (56, 110) train from the first step.
    y = norm(scale_init=nn.initializers.zeros)(y)
    if x.shape != y.shape:
      x = norm()(conv(self.features, (1, 1), strides=self.strides)(x))
    return nn.relu(x + y)


class CifarResNet(nn.Module):
  depth: int = 20
  width: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    assert (self.depth - 2) % 6 == 0, 'depth must be 6n+2'
    n = (self.depth - 2) // 6
    widths = [int(w * self.width) for w in (16, 32, 64)]
    x = conv_lib.Conv(widths[0], (3, 3), use_bias=False, dtype=self.dtype)(x.astype(self.dtype))
    x = nn.relu(BatchNorm(use_running_average=not train, dtype=self.dtype)(x))
    for stage, features in enumerate(widths):
      for i in range(n):
        strides = 2 if stage > 0 and i == 0 else 1
        x = BasicBlock(features, strides, self.dtype)(x, train)
      simple.sow_stage(self, x)
    return jnp.mean(x, axis=(1, 2))

  def stage_of(self, name: str) -> int:
    """The stem belongs to the first stage; block i to stage i // blocks per stage."""
    if not name.startswith('BasicBlock_'):
      return 0
    return int(name.split('_')[-1]) // ((self.depth - 2) // 6)


class WideBlock(nn.Module):
  """Pre-activation wide block (Zagoruyko & Komodakis 2016)."""
  features: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(conv_lib.Conv, use_bias=False, dtype=self.dtype)
    norm = functools.partial(BatchNorm, use_running_average=not train, dtype=self.dtype)
    o = nn.relu(norm()(x))
    y = conv(self.features, (3, 3), strides=self.strides)(o)
    y = conv(self.features, (3, 3))(nn.relu(norm()(y)))
    if x.shape != y.shape:
      x = conv(self.features, (1, 1), strides=self.strides)(o)
    return x + y


class WideResNet(nn.Module):
  depth: int = 16
  widen: int = 8
  width: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    assert (self.depth - 4) % 6 == 0, 'depth must be 6n+4'
    n = (self.depth - 4) // 6
    k = self.widen * self.width
    x = conv_lib.Conv(16, (3, 3), use_bias=False, dtype=self.dtype)(x.astype(self.dtype))
    for stage, base in enumerate((16, 32, 64)):
      for i in range(n):
        x = WideBlock(int(base * k), 2 if stage > 0 and i == 0 else 1, self.dtype)(x, train)
    x = nn.relu(BatchNorm(use_running_average=not train, dtype=self.dtype)(x))
    return jnp.mean(x, axis=(1, 2))
