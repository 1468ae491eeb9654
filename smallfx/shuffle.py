"""Positions in a random permutation of range(n), computed without the permutation.

The train step draws its batch as positions [i*B, (i+1)*B) of the epoch's
shuffle. `jax.random.permutation` sorts all n keys to get those B entries, once
per step: on a 2-core CPU that cost 0.4 ms per 1,000 training images per step
(SmallCNN, batch 32: 10.5 ms at n=500, 18.2 ms at n=20,000), so it dominated the
step for a few thousand images per class. A keyed Feistel network is a bijection
of [0, 2^2h) that can be evaluated at just the B positions needed; cycle-walking
(applying it again to values >= n) restricts it to a bijection of [0, n). The
work per step is O(B), independent of n, and needs no state between steps.
"""

import jax
import jax.numpy as jnp

ROUNDS = 6


def _mix(x):
  # A 32-bit integer hash with full avalanche ("lowbias32"): the round function.
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def _feistel(x, round_keys, half_bits):
  mask = jnp.uint32((1 << half_bits) - 1)
  left, right = x >> half_bits, x & mask
  for k in range(ROUNDS):
    left, right = right, left ^ (_mix(right ^ round_keys[k]) & mask)
  return (left << half_bits) | right


def permuted(key, positions, n: int):
  """Entries `positions` of a random permutation of range(n) determined by `key`.

  Same key and n, all positions 0..n-1: every index exactly once.
  """
  half_bits = max(1, ((n - 1).bit_length() + 1) // 2)
  if 2 * half_bits > 32:
    raise ValueError(f'n={n} is too large to shuffle (at most 2^32)')
  round_keys = jax.random.bits(key, (ROUNDS,), jnp.uint32)
  x = _feistel(jnp.asarray(positions).astype(jnp.uint32), round_keys, half_bits)
  # The network permutes [0, 4^half_bits), less than 4n values: each walk
  # lands below n with probability over 1/4, so a few rounds finish a batch.
  x = jax.lax.while_loop(lambda x: jnp.any(x >= n),
                         lambda x: jnp.where(x >= n, _feistel(x, round_keys, half_bits), x), x)
  return x.astype(jnp.int32)
