"""Members: the seeds x hyperparameter settings of one experiment, as one program.

Every leaf of the training state has a leading member axis. Member m trains setting
m // num_seeds with seed m % num_seeds; a setting's hyperparameters are values in the
member's optimiser state (`optim.set_hyperparams`), so a sweep is data and changing
its values compiles nothing new.

This module owns where members and their batches live. A `Layout` is a
('member', 'data') mesh over every device of every process plus the rules for running
a per-member function over it:

- vmapped on accelerators; on XLA:CPU unrolled, one member after another
  (`tuning.unroll_members`);
- on several CPU devices, side by side: each device runs its own members, one per
  call (`rounds` calls make one step of every member; `split` and `join` move the
  state between the one-tree and the per-round forms);
- metrics stay on the device of their member until a logging window is read
  (`window`, `fetch`).

The loop, evaluation, checkpoints, benchmarks and tests all go through it.
"""

import dataclasses
import itertools
import os
from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np

from smallfx import tuning
from smallfx.errors import UserError

P = jax.sharding.PartitionSpec


# ---------------------------------------------------------------------------
# Which member is which.


@dataclasses.dataclass(frozen=True)
class Grid:
  """The hyperparameter settings of a sweep (their product) times `num_seeds` seeds.

  `values` maps a swept name to its values; the settings are their product in the
  order given, and member m is setting m // num_seeds, seed m % num_seeds.
  """
  values: dict[str, tuple[float, ...]]
  num_seeds: int

  @property
  def settings(self) -> list[dict[str, float]]:
    names = list(self.values)
    return [dict(zip(names, combo)) for combo in itertools.product(*self.values.values())]

  @property
  def num_members(self) -> int:
    return len(self.settings) * self.num_seeds

  def setting_of(self, member: int) -> int:
    return member // self.num_seeds

  def seed_of(self, member: int) -> int:
    return member % self.num_seeds

  def members_of(self, setting: int) -> list[int]:
    return list(range(setting * self.num_seeds, (setting + 1) * self.num_seeds))

  def column(self, name: str, default: float) -> np.ndarray:
    """Each member's value of `name` (the default where it is not swept)."""
    if name not in self.values:
      return np.full(self.num_members, default, np.float32)
    return np.array([self.settings[self.setting_of(m)][name]
                     for m in range(self.num_members)], np.float32)


def seed_keys(seed: int, grid: Grid) -> jax.Array:
  """Each member's key: seed s of every setting gets the same one (paired settings)."""
  seeds = jnp.array([grid.seed_of(m) for m in range(grid.num_members)])
  return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(seeds)


# ---------------------------------------------------------------------------
# Where members live.


@dataclasses.dataclass(frozen=True)
class Layout:
  mesh: jax.sharding.Mesh
  num_members: int
  unroll: bool

  @property
  def platform(self) -> str:
    return self.mesh.devices.flat[0].platform

  @property
  def member_devices(self) -> int:
    return self.mesh.shape['member']

  @property
  def data_devices(self) -> int:
    return self.mesh.shape['data']

  @property
  def side_by_side(self) -> bool:
    """Whether unrolled members lie over several devices: each then runs its own."""
    return self.unroll and self.member_devices > 1

  @property
  def rounds(self) -> int:
    """How many calls of the train step make one step of every member.

    Side by side, a call trains one member on each device: one program with all of
    a device's members unrolled was slower (0.87x the step time, 8 SmallCNN seeds on 2
    devices) and took twice as long to compile (experiments/bench/README.md, change 14).
    """
    return self.num_members // self.member_devices if self.side_by_side else 1

  def sharding(self, *spec) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(self.mesh, P(*spec))

  @property
  def state_sharding(self):
    return self.sharding('member')

  @property
  def batch_sharding(self):
    return self.sharding(None, 'data')

  @property
  def replicated(self):
    return self.sharding()

  def metrics_sharding(self, steps: int = 1):
    """Per member, on that member's devices; a chunk of steps puts its steps first.

    Gathering metrics in the step costs an all-gather per metric per step (8 SmallCNN
    seeds on 2 CPU devices: ~3.7 of 45.7 ms); the host reads them once per window.
    """
    return self.sharding('member') if steps == 1 else self.sharding(None, 'member')

  def place(self, tree):
    """`tree` (leading member axis) laid out as the compiled steps expect it."""
    return jax.device_put(tree, self.state_sharding)

  def map(self, fn: Callable, in_a_row: int | None = None) -> Callable:
    """`fn` over the leading member axis of every argument (see `over_members`)."""
    return over_members(fn, self.unroll, in_a_row)

  def per_device(self, fn: Callable, in_specs) -> Callable:
    """`fn` run by each device of the 'member' axis on its own members."""
    return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=P('member'),
                         check_vma=False)

  def init(self, init_fn: Callable, keys: jax.Array):
    """(state made on its devices, its abstract form for restoring a checkpoint)."""
    jitted = jax.jit(init_fn, out_shardings=self.state_sharding,
                     compiler_options=tuning.init_compiler_options(self.platform))
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self.state_sharding),
        jax.eval_shape(jitted, keys))
    return jitted, abstract

  def split(self, tree) -> list:
    """`tree` as `rounds` trees of one member per device; `join` puts them back.

    Device d holds members d*K/D to (d+1)*K/D - 1; round r takes the r-th of each,
    so no member leaves its device.
    """
    return [tree] if self.rounds == 1 else _split(tree, self.rounds, self.state_sharding)

  def join(self, parts: list):
    return parts[0] if len(parts) == 1 else _join(parts, self.state_sharding)



def make_layout(num_members: int, member_devices: int = 0) -> Layout:
  """The layout of `num_members` members over every device of every process.

  `member_devices` devices lie along the members and the rest split the batch. By
  default (0) the members take every CPU device when they divide evenly over them
  (the devices `cpu_devices` asked for), and every other device splits the batch.
  """
  n, cpu = jax.device_count(), jax.default_backend() == 'cpu'
  k = member_devices or (n if cpu and num_members % n == 0 else 1)
  if k < 1 or n % k or num_members % k:
    raise UserError(f'member_devices={k} must divide both the device count ({n}) and '
                    f'the number of members ({num_members})')
  if cpu and 1 < k < n:
    # Members over some CPU devices and the batch over the rest is XLA's partitioning
    # of vmapped members, which gives a vmapped 1x1 convolution wrong values and
    # gradients on XLA:CPU (jaxlib 0.10.2: ResNet-20's shortcuts; 3x3 layers agree).
    raise UserError(f'member_devices={k}: on CPU the members take all {n} devices '
                    f'(--config.member_devices={n}) or one (--config.member_devices=1)')
  mesh = jax.make_mesh((k, n // k), ('member', 'data'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  platform = mesh.devices.flat[0].platform
  return Layout(mesh, num_members, tuning.unroll_members(platform, k, n // k))


def cpu_devices(num_members: int, member_devices: int = 0, cores: int | None = None) -> int:
  """How many CPU devices a run of `num_members` members wants (1: the default one).

  The largest divisor of the member count not above the number of cores (8 members
  on 2 cores: 2 devices of 4), or `member_devices` where set. Each device's oneDNN
  convolutions take its share of the cores. An entry point applies it before JAX
  starts (`jax.config.update('jax_num_cpu_devices', n)`); a library never does.
  """
  if num_members < 2 or member_devices == 1:
    return 1
  cores = cores or len(os.sched_getaffinity(0))
  return member_devices or max(
      d for d in range(1, max(1, min(cores, num_members)) + 1) if num_members % d == 0)


def over_members(fn: Callable, unroll: bool, in_a_row: int | None = None) -> Callable:
  """`fn` mapped over the leading member axis of every argument.

  Unrolled (CPU), member m+1's argument `in_a_row` (the images) also takes a data
  dependency, that changes no value, on member m's scalar outputs, so XLA cannot
  interleave the K models: interleaved, their activations crowd each other out of
  cache; in a row, each runs like a single model (8 SmallCNN seeds: unrolled 92 ms,
  in a row 76 ms, 8 separate single-seed steps 66 ms).
  """
  if not unroll:
    return jax.vmap(fn)

  def unrolled(*args):
    k = jax.tree.leaves(args)[0].shape[0]
    outs = []
    for m in range(k):
      member_args = [jax.tree.map(lambda a, m=m: a[m], a) for a in args]
      if in_a_row is not None and outs:
        member_args[in_a_row] = _after(member_args[in_a_row], outs[-1])
      outs.append(fn(*member_args))
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

  return unrolled


def _after(x, previous):
  """`x` unchanged, but computed only once `previous`'s float scalars are."""
  scalars = [v.reshape(()) for v in jax.tree.leaves(previous)
             if v.size == 1 and jnp.issubdtype(v.dtype, jnp.floating)]
  if not scalars:
    return x
  # nan_to_num: a diverged member (inf, NaN) must still add exactly zero to the next.
  return x + (0 * jnp.nan_to_num(sum(scalars))).astype(x.dtype)


def _split(tree, rounds, sharding):
  # Members side by side exist on CPU devices only, whose arrays are host memory: each
  # device's rows are copied out as they are (a jitted reshape and slice took 0.6-0.8 s
  # to compile for 8 SmallCNN seeds on 2 devices; the copies take milliseconds).
  def cut(a):
    rows = [(shard.device, np.asarray(shard.data)) for shard in a.addressable_shards]
    shape = (a.shape[0] // rounds, *a.shape[1:])
    # may_alias=False: the train step donates these buffers, which must be its own.
    return [jax.make_array_from_single_device_arrays(
        shape, sharding, [jax.device_put(x[r:r + 1], d, may_alias=False) for d, x in rows])
            for r in range(rounds)]

  leaves, treedef = jax.tree.flatten(tree)
  cuts = [cut(a) for a in leaves]
  return [treedef.unflatten([c[r] for c in cuts]) for r in range(rounds)]


def _join(parts, sharding):
  def glue(*xs):
    rows = [{shard.device: np.asarray(shard.data) for shard in x.addressable_shards} for x in xs]
    return jax.make_array_from_single_device_arrays(
        (xs[0].shape[0] * len(xs), *xs[0].shape[1:]), sharding,
        [jax.device_put(np.concatenate([r[d] for r in rows]), d, may_alias=False)
         for d in rows[0]])

  return jax.tree.map(glue, *parts)


@jax.jit
def window(calls: list[list[dict]]) -> dict:
  """A logging window's metrics as one array per name, (steps, members) in member order.

  `calls` holds, for each call of the loop, its rounds' metrics: each (D,) for one
  step, or (n, D) for a chunk of n steps. Stacked on the device and copied once (one
  copy per array, round and step cost ~90 ms per window on 2 CPU devices, stacked 2.4 ms).
  """
  def one(name):
    per_call = [jnp.stack([r[name].reshape(-1, r[name].shape[-1]) for r in rounds], -1)
                for rounds in calls]
    steps = jnp.concatenate(per_call)  # (steps, D, rounds)
    return steps.reshape(len(steps), -1)

  return {name: one(name) for name in calls[0][0]}


def fetch(tree):
  """Host copies of arrays laid out over the mesh, wherever their devices are."""
  if jax.process_count() > 1:
    tree = multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def compile_step(layout: Layout, step: Callable, per_member_data: bool, steps: int = 1):
  """`step(state, images, labels)` over members, jitted with the state donated.

  `step` maps over members itself (`layout.map`); here it is run side by side where
  the layout says so, and `steps` > 1 runs that many under `lax.scan` per call.
  """
  data_sharding = layout.state_sharding if per_member_data else layout.replicated
  if layout.side_by_side:
    step = layout.per_device(step, (P('member'), data_sharding.spec, data_sharding.spec))

  def several(state, images_u8, labels):
    return jax.lax.scan(lambda st, _: step(st, images_u8, labels), state, length=steps)

  return jax.jit(step if steps == 1 else several, donate_argnums=0,
                 in_shardings=(layout.state_sharding, data_sharding, data_sharding),
                 out_shardings=(layout.state_sharding, layout.metrics_sharding(steps)),
                 compiler_options=tuning.compiler_options(layout.platform))


def compile_eval(layout: Layout, eval_fn: Callable) -> Callable:
  """(parts, *host arrays) -> per-round outputs of `eval_fn(member_state, *batch)`.

  Evaluation runs in the same rounds as training, so one compiled program serves each.
  """
  examples = layout.sharding('data')
  per_member = lambda state, *batch: layout.map(lambda st: eval_fn(st, *batch))(state)
  if layout.side_by_side:
    # With the members over every device, each device takes the whole batch.
    per_member = layout.per_device(per_member, (P('member'), P(), P(), P()))
  jitted = jax.jit(per_member,
                   in_shardings=(layout.state_sharding, examples, examples, examples),
                   out_shardings=layout.replicated)

  def run(parts, *host_arrays):
    # Every process holds the same host batch; each device takes its slice of it.
    batch = [jax.make_array_from_callback(a.shape, examples, lambda i, a=a: a[i])
             for a in host_arrays]
    return [jitted(part, *batch) for part in parts]

  return run
