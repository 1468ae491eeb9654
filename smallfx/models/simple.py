"""Small models: an MLP and a two-layer CNN (the sizes a laptop trains in seconds)."""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from smallfx.models import conv as conv_lib


class MLP(nn.Module):
  width: float = 1.0
  hidden: Sequence[int] = (256, 256)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = x.reshape((x.shape[0], -1)).astype(self.dtype)
    for h in self.hidden:
      x = nn.relu(nn.Dense(int(h * self.width), dtype=self.dtype)(x))
    return x


def max_pool_2x2(x):
  """2x2 max pooling, stride 2, VALID (an odd last row/column is dropped): nn.max_pool's maths.

  Written as a reshape and a max over the two window axes instead of
  `nn.max_pool`'s reduce_window. Measured on a 2-core CPU (tools/bench.py, jax 0.10):
  under the seed vmap, the reduce_window gradient is lowered to a variadic
  reduce_window that tracks argmax positions with full-size iotas plus a scatter,
  over half of SmallCNN's step time; the reshape form's gradient is an elementwise
  mask that fuses with its neighbours. Equal maxima share the gradient (jnp.max's
  rule) instead of the first one taking it all; after a ReLU those ties are zeros,
  whose gradient the ReLU drops anyway.
  """
  b, h, w, c = x.shape
  x = x[:, :h - h % 2, :w - w % 2]
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class SmallCNN(nn.Module):
  """conv32-pool-conv64-pool-dense128: the classic small Fashion-MNIST network."""
  width: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = x.astype(self.dtype)
    for features in (32, 64):
      x = nn.relu(conv_lib.Conv(int(features * self.width), (3, 3), dtype=self.dtype)(x))
      x = max_pool_2x2(x)
    x = x.reshape((x.shape[0], -1))
    return nn.relu(nn.Dense(int(128 * self.width), dtype=self.dtype)(x))
