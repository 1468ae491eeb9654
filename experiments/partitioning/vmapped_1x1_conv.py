"""XLA's partitioning of a vmapped 1x1 convolution, seeds split over 2 CPU devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python experiments/partitioning/vmapped_1x1_conv.py

Two "seeds" (a leading vmapped axis of both images and kernels), the same values
and gradients computed on one device and with the seed axis split over two. On
XLA:CPU, jax/jaxlib 0.10.2, 2026-11-27 (relative max error of value, image
gradient, kernel gradient):

    3x3 stride 1   [6.5e-07, 0, 0]
    1x1 stride 1   [7.6e-03, 1.1e+00, 1.4e-01]
    1x1 stride 2   [4.3e-07, 0, 0]
    strided slice  [0, 0, 0]

So the 1x1 stride-1 case is wrong. This is why smallfx refuses, on CPU, members
split over some devices while the batch is split over the rest
(`smallfx.members.make_layout`). Members over all CPU devices are trained by
`shard_map` instead (`members.Layout.side_by_side`, `Layout.per_device`), which this
does not touch. Not checked on GPUs.
"""
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

NHWC = ('NHWC', 'HWIO', 'NHWC')


def conv(kernel, strides):
  def loss(x, w):
    w = w[:kernel, :kernel]
    y = lax.conv_general_dilated(x, w, strides, 'VALID', dimension_numbers=NHWC)
    return jnp.sum(y ** 2)
  return loss


CASES = {
    '3x3 stride 1': conv(3, (1, 1)),
    '1x1 stride 1': conv(1, (1, 1)),
    '1x1 stride 2': conv(1, (2, 2)),
    'strided slice': lambda x, w: jnp.sum(x[:, ::2, ::2] ** 2) + 0 * jnp.sum(w),
}


def main():
  devices = jax.devices()
  if len(devices) < 2:
    raise SystemExit('needs 2 devices: set XLA_FLAGS=--xla_force_host_platform_device_count=2')
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 16, 8, 8, 16), np.float32))
  w = jnp.asarray(rng.standard_normal((2, 3, 3, 16, 32), np.float32))
  for name, loss in CASES.items():
    results = []
    for k in (1, 2):
      mesh = jax.sharding.Mesh(np.array(devices[:k]).reshape(k), ('seed',),
                               axis_types=(jax.sharding.AxisType.Auto,))
      seeds = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('seed'))
      f = jax.jit(jax.vmap(jax.value_and_grad(loss, argnums=(0, 1))), in_shardings=(seeds, seeds))
      results.append(jax.device_get(f(jax.device_put(x, seeds), jax.device_put(w, seeds))))
    error = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-12)),
                         results[0], results[1])
    print(f'{name:14s}', [f'{e:.1e}' for e in jax.tree.leaves(error)])


if __name__ == '__main__':
  main()
