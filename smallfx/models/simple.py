"""Small models: an MLP and a two-layer CNN (the sizes a laptop trains in seconds)."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from smallfx.models import conv as conv_lib

# The collection where a backbone sows each stage's output, in order (for greedy
# layer-wise pretraining, smallfx.pretext). Backbones with stages also name the stage
# of each top-level parameter (`stage_of`). Unless applied with it mutable, sowing is free.
STAGES = 'stages'


def sow_stage(module: nn.Module, x) -> None:
  """Records the output of one of `module`'s stages; never while initialising, so
  that the stages are no variables of the model."""
  if not module.is_initializing():
    module.sow(STAGES, 'out', x)


class MLP(nn.Module):
  """`depth` dense layers of 256 x `width` units, each followed by the norm ('batch',
  'layer' or 'none'), a ReLU and dropout: a table's model, or pixels flattened."""
  width: float = 1.0
  depth: int = 2
  norm: str = 'none'
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape((x.shape[0], -1)).astype(self.dtype)
    for _ in range(self.depth):
      x = nn.Dense(max(1, int(256 * self.width)), dtype=self.dtype)(x)
      if self.norm == 'batch':
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x)
      elif self.norm == 'layer':
        x = nn.LayerNorm(dtype=self.dtype)(x)
      x = nn.relu(x)
      if self.dropout:
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
      sow_stage(self, x)
    return x

  def stage_of(self, name: str) -> int:
    """The stage (see `STAGES`) a top-level parameter or statistic belongs to."""
    return int(name.split('_')[-1])


NORMS = ('none', 'batch', 'layer')


def _windows(x):
  """(B, H, W, C) -> (B, H/2, 2, W/2, 2, C): the 2x2 windows (an odd last row/column dropped)."""
  b, h, w, c = x.shape
  return x[:, :h - h % 2, :w - w % 2].reshape(b, h // 2, 2, w // 2, 2, c)


@jax.custom_vjp
def max_pool_2x2(x):
  """2x2 max pooling, stride 2, VALID (an odd last row/column is dropped): nn.max_pool's maths.

  Not `nn.max_pool`'s reduce_window: under the seed vmap its gradient is lowered to a
  variadic reduce_window that tracks argmax positions with full-size iotas plus a
  scatter, over half of SmallCNN's step time on a 2-core CPU (tools/bench.py, jax
  0.10). Equal maxima share the gradient (jnp.max's rule) instead of the first one
  taking it all: after a ReLU most ties are zeros, whose gradient the ReLU drops, and
  the rest (a flat background) read equal inputs.

  Without gradients (evaluation) the max is taken over the four strided slices of the
  windows, one elementwise loop: 2.2-3.3x faster on one core than the max over the
  window axes, a reduction XLA:CPU gives YNNPACK, and 8 SmallCNN seeds evaluated
  9.3 s against 10.0 s (Zen 3 EPYC, 2 cores, medians of 5 in one process).
  """
  w = _windows(x)
  return jnp.maximum(jnp.maximum(w[:, :, 0, :, 0], w[:, :, 0, :, 1]),
                     jnp.maximum(w[:, :, 1, :, 0], w[:, :, 1, :, 1]))


def _max_pool_fwd(x):
  # In training, the reduction: its output is a buffer of its own. The slices'
  # elementwise max was fused into the gradient's mask, which then recomputed it (and
  # the first layer before it) for each of the four positions: 3.3 ms of a 25 ms step.
  y = _windows(x).max(axis=(2, 4))
  return y, (x, y)


def _max_pool_bwd(residuals, dy):
  # Written out: autodiff of the max counts the ties by a reduction over the window
  # axes, a separate YNNPACK pass. SmallCNN's single-seed step (batch 32, one core of
  # a Zen 3 EPYC) 23.3 -> 20.0 ms, 8 seeds on 2 cores 105 -> 96 ms (medians of 7 in
  # one process), with equal gradients (tests/test_pool.py).
  x, y = residuals
  b, h, w, c = x.shape
  hit = _windows(x) == y[:, :, None, :, None]
  count = sum(hit[:, :, i, :, j].astype(dy.dtype) for i in range(2) for j in range(2))
  dx = jnp.where(hit, (dy / count)[:, :, None, :, None], 0).astype(x.dtype)
  dx = dx.reshape(b, h - h % 2, w - w % 2, c)
  return (jnp.pad(dx, ((0, 0), (0, h % 2), (0, w % 2), (0, 0))),)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


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
      sow_stage(self, x)
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(int(128 * self.width), dtype=self.dtype)(x))
    sow_stage(self, x)
    return x

  def stage_of(self, name: str) -> int:
    return {'Conv_0': 0, 'Conv_1': 1, 'Dense_0': 2}[name]
