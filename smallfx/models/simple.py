"""Small models: an MLP and a two-layer CNN (the sizes a laptop trains in seconds)."""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp


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


class SmallCNN(nn.Module):
  """conv32-pool-conv64-pool-dense128: the classic small Fashion-MNIST network."""
  width: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = x.astype(self.dtype)
    for features in (32, 64):
      x = nn.relu(nn.Conv(int(features * self.width), (3, 3), dtype=self.dtype)(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    return nn.relu(nn.Dense(int(128 * self.width), dtype=self.dtype)(x))
