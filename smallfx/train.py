"""Train, evaluate and checkpoint one experiment.

The training split lives on the device as uint8. Each step draws a batch,
augments and normalises it on the device, and updates the model: one jitted
function, with the state donated. `num_seeds` models share that function through
`jax.vmap` over a leading seed axis of the state, so K seeds cost one program.
"""

import dataclasses
import functools
import hashlib
import json
import math
import os
import platform
import sys
import time
from typing import Any, Callable

import flax
import flax.struct
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm

from smallfx import augment as augment_lib
from smallfx import baseline as baseline_lib
from smallfx import checkpoint
from smallfx import convert
from smallfx import data as data_lib
from smallfx import losses
from smallfx import malloc
from smallfx import metrics as metrics_lib
from smallfx import models
from smallfx import optim
from smallfx import shuffle
from smallfx.errors import UserError, unknown

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key data, so that checkpoints hold plain arrays


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything a run builds from its config before touching data."""
  model: models.Net
  loss: losses.Loss
  tx: optax.GradientTransformation
  learning_rate: optax.Schedule
  augment: Callable
  total_steps: int
  batch_size: int


# ---------------------------------------------------------------------------
# The pure functions.


def normalise(images_u8: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
  return (images_u8.astype(jnp.float32) / 255.0 - mean) / std


def init_state(model, tx, image_shape, seed_key) -> TrainState:
  """One model's state; vmapped over seed keys for K seeds."""
  init_key, train_key = jax.random.split(seed_key)
  variables = model.init(init_key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
  params = variables['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get('batch_stats', {}),
                    opt_state=tx.init(params), rng=train_key)


def global_norm(tree) -> jax.Array:
  """optax.tree.norm's value, with each leaf flattened before its sum of squares.

  XLA:CPU splits a sum over a many-axis array into a tree of small reduce-window
  ops; over one axis it is a single loop. With the three norms logged every step,
  SmallCNN's step (batch 32, 2-core CPU, jax 0.10.2) went from 9.5 to 8.6 ms.
  """
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.reshape(-1))) for x in jax.tree.leaves(tree)))


def update(state: TrainState, images: jax.Array, labels: jax.Array, *, model, loss, tx,
           learning_rate) -> tuple[TrainState, dict]:
  """The one update: (state, batch) -> (state, metrics). `labels` are (B, C) probabilities."""

  def loss_fn(params):
    outputs, new_vars = model.apply({'params': params, 'batch_stats': state.batch_stats},
                                    images, train=True, mutable=['batch_stats'])
    return loss.per_example(outputs, labels).mean(), (outputs, new_vars)

  (value, (outputs, new_vars)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  accuracy = jnp.mean(jnp.argmax(loss.scores(outputs), -1) == jnp.argmax(labels, -1))
  metrics = {
      'train/loss': value,
      'train/accuracy': accuracy,
      'train/learning_rate': learning_rate(state.step),
      'train/grad_norm': global_norm(grads),
      'train/param_norm': global_norm(params),
      'train/update_norm': global_norm(updates),
  }
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            batch_stats=new_vars.get('batch_stats', state.batch_stats))
  return new_state, metrics


def draw_batch(state: TrainState, images_u8, labels, *, batch_size, num_classes, augment,
               mean, std):
  """The batch of this step: a slice of this epoch's permutation, augmented, normalised."""
  n = labels.shape[0]
  steps_per_epoch = n // batch_size
  epoch, i = jnp.divmod(state.step, steps_per_epoch)
  key = jax.random.wrap_key_data(state.rng)
  idx = shuffle.permuted(jax.random.fold_in(key, epoch), i * batch_size + jnp.arange(batch_size), n)
  x = images_u8[idx].astype(jnp.float32) / 255.0
  y = jax.nn.one_hot(labels[idx], num_classes)
  x, y = augment(jax.random.fold_in(jax.random.fold_in(key, 1 << 30), state.step), x, y)
  return (x - mean) / std, y


def make_mesh(config) -> jax.sharding.Mesh:
  """A ('seed', 'data') mesh over every device of every process.

  `seed_devices` devices lie along the seeds and the rest split the batch
  ('data'). Laying seeds over devices is worth it when there are more devices than
  a small batch can keep busy. By default (0) the seeds take every CPU device when
  they divide evenly over them (the devices `cpu_devices_for_seeds` made), and
  every other device splits the batch.
  """
  n, cpu = jax.device_count(), jax.default_backend() == 'cpu'
  k = config.seed_devices or (n if cpu and config.num_seeds % n == 0 else 1)
  if k < 1 or n % k or config.num_seeds % k:
    raise UserError(f'seed_devices={k} must divide both the device count ({n}) and '
                    f'num_seeds ({config.num_seeds})')
  if cpu and 1 < k < n:
    # Seeds over some CPU devices and the batch over the rest is XLA's partitioning
    # of vmapped seeds, which gives a vmapped 1x1 convolution wrong values and
    # gradients on XLA:CPU (jaxlib 0.10.2: ResNet-20's shortcuts; 3x3 layers agree).
    raise UserError(f'seed_devices={k}: on CPU the seeds take all {n} devices '
                    f'(--config.seed_devices={n}) or one (--config.seed_devices=1)')
  auto = (jax.sharding.AxisType.Auto,) * 2
  return jax.make_mesh((k, n // k), ('seed', 'data'), axis_types=auto)


def _shardings(mesh):
  P = jax.sharding.PartitionSpec  # pylint: disable=invalid-name
  named = lambda *spec: jax.sharding.NamedSharding(mesh, P(*spec))
  # state: seed axis over 'seed'; batch: (seed, batch) over ('seed', 'data');
  # the dataset is small, so every device keeps all of it.
  return named('seed'), named(None, 'data'), named()


def place_state(state: TrainState, mesh) -> TrainState:
  """The state laid out as the jitted steps expect it (seed axis over 'seed').

  A state that is laid out otherwise would still run, but compile the step anew.
  """
  return jax.device_put(state, _shardings(mesh)[0])


def over_seeds(fn: Callable, unroll: bool, in_a_row: int | None = None) -> Callable:
  """`fn` mapped over the leading seed axis of every argument.

  `jax.vmap` turns a convolution with per-seed weights into one grouped
  convolution, which GPUs run well and XLA:CPU slowly. On CPU the seeds are
  unrolled instead. With `in_a_row=i`, seed s+1's argument i (its first input,
  the images) also takes a data dependency, that changes no value, on seed s's
  scalar outputs, so XLA cannot interleave the K models: interleaved, their
  activations crowd each other out of cache; in a row, each runs like a single
  model. SmallCNN train step, batch 32, 8 seeds, 2-core CPU
  (tools/bench_seed_layout.py): vmapped 133 ms, unrolled 92 ms, unrolled in a
  row 76 ms, against 66 ms for 8 separate single-seed steps. With oneDNN
  convolutions: in a row 72.7 ms, `lax.map` over seeds 103.5 ms (it compiles one
  seed's step, 3.3 against 7.1 s, but inside the loop XLA recomputes the first
  layer in each of its consumers). With the seeds over several CPU devices the
  training loop gives each device one seed per call instead (`seed_rounds`).
  """
  if not unroll:
    return jax.vmap(fn)

  def unrolled(*args):
    k = jax.tree.leaves(args)[0].shape[0]
    outs = []
    for s in range(k):
      seed_args = [jax.tree.map(lambda a, s=s: a[s], a) for a in args]
      if in_a_row is not None and outs:
        seed_args[in_a_row] = _after(seed_args[in_a_row], outs[-1])
      outs.append(fn(*seed_args))
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

  return unrolled


def _after(x, previous):
  """`x` unchanged, but computed only once `previous`'s float scalars are."""
  scalars = [v.reshape(()) for v in jax.tree.leaves(previous)
             if v.size == 1 and jnp.issubdtype(v.dtype, jnp.floating)]
  if not scalars:
    return x
  # nan_to_num: a diverged seed (inf, NaN) must still add exactly zero to the next.
  return x + (0 * jnp.nan_to_num(sum(scalars))).astype(x.dtype)


def unroll_seeds(mesh) -> bool:
  """On CPU, unless seeds and batch are both split over devices (then vmapped, as SPMD)."""
  return jax.default_backend() == 'cpu' and 1 in (mesh.shape['seed'], mesh.shape['data'])


def runs_side_by_side(mesh, unroll: bool) -> bool:
  """Whether unrolled seeds lie over several devices: each then runs its own (`side_by_side`)."""
  return unroll and mesh.shape['seed'] > 1


def side_by_side(fn: Callable, mesh, in_specs) -> Callable:
  """`fn` run by each device of the 'seed' axis on its own seeds (every output has one).

  Used on CPU, where `cpu_devices_for_seeds` gave each group of seeds a device: the
  devices run their parts at once, each on its share of the cores, as separate
  processes would. Within one device a second core does little for a small step's
  many short fusions. 8 SmallCNN seeds at batch 32, 2-core EPYC: 59-65 ms a step
  over 2 devices against 89-90 ms on one, same hour; 46-55 ms since oneDNN calls
  given one thread run on XLA's own (experiments/bench/README.md, changes 12-13).
  The training loop calls it with one seed per device (`seed_rounds`). Every output,
  the metrics too, stays on the device of its seeds (`metrics_sharding`).
  """
  P = jax.sharding.PartitionSpec  # pylint: disable=invalid-name
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=P('seed'), check_vma=False)


def seed_rounds(mesh, num_seeds: int) -> int:
  """How many calls of the train step make one step of every seed.

  When seeds run side by side on D CPU devices, a step of K seeds is K/D calls of
  one program that trains one seed on each device (`split_seeds` lays the state out
  so). One program with all K/D of a device's seeds unrolled was slower and took
  longer to compile: 8 SmallCNN seeds on 2 devices, paired rounds, 0.87x
  [0.79-0.92] the step time, and 5.5 s against 11.2 s to compile (half-speed 2-core
  EPYC, experiments/bench/README.md, change 14). Elsewhere 1: all seeds in one call.
  """
  return num_seeds // mesh.shape['seed'] if runs_side_by_side(mesh, unroll_seeds(mesh)) else 1


def split_seeds(tree, rounds: int, mesh) -> list:
  """`tree` (leading seed axis, laid out over 'seed') as `rounds` trees of one seed per device.

  Device d holds seeds d*K/D to (d+1)*K/D - 1; round r takes the r-th of each, so no
  seed leaves its device. `join_seeds` puts them back.
  """
  return [tree] if rounds == 1 else _split(tree, rounds, mesh)


def join_seeds(parts: list, mesh):
  """The inverse of `split_seeds`: one tree with every seed, in seed order."""
  return parts[0] if len(parts) == 1 else _join(parts, mesh)


def _split(tree, rounds, mesh):
  # Seeds side by side exist on CPU devices only, whose arrays are host memory: each
  # device's rows are copied out as they are. As a jitted reshape and slice this took
  # 0.6-0.8 s to compile for 8 SmallCNN seeds on 2 devices, and the copies take
  # milliseconds (experiments/bench/README.md, change 15).
  sharding = _shardings(mesh)[0]

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


def _join(parts, mesh):
  # As `_split`, by copies on the host: jitted, 1.0-1.4 s to compile for 8 SmallCNN seeds.
  sharding = _shardings(mesh)[0]

  def glue(*xs):
    rows = [{shard.device: np.asarray(shard.data) for shard in x.addressable_shards} for x in xs]
    return jax.make_array_from_single_device_arrays(
        (xs[0].shape[0] * len(xs), *xs[0].shape[1:]), sharding,
        [jax.device_put(np.concatenate([r[d] for r in rows]), d, may_alias=False)
         for d in rows[0]])

  return jax.tree.map(glue, *parts)


@jax.jit
def window_metrics(calls: list[list[dict]]) -> dict:
  """A logging window's metrics as one array per name, (steps, seeds) in seed order.

  `calls` holds, for each call of the loop, its rounds' metrics: each (D,) for one
  step, or (n, D) for a chunk of n steps. Stacked on the device and copied once: one
  copy per array, round and step cost ~90 ms per window of 50 steps in 4 rounds on 2
  CPU devices, stacked 2.4 ms. Seed d*K/D + r is device d's in round r (`split_seeds`),
  so (steps, D, rounds) reshaped to (steps, K) is in seed order.
  """
  def one(name):
    per_call = [jnp.stack([r[name].reshape(-1, r[name].shape[-1]) for r in rounds], -1)
                for rounds in calls]
    steps = jnp.concatenate(per_call)  # (steps, D, rounds)
    return steps.reshape(len(steps), -1)

  return {name: one(name) for name in calls[0][0]}


def metrics_sharding(mesh, steps: int = 1) -> jax.sharding.NamedSharding:
  """Where a train step leaves its metrics: per seed, on the devices of that seed.

  Gathering them to every device in the step costs an all-gather per metric per
  step, each a rendezvous of the devices, which a step of seeds side by side on CPU
  devices otherwise never needs (8 SmallCNN seeds on 2 devices: ~3.7 of a device's
  45.7 ms in a trace; 0.98x [0.93-1.03] the step time without them, paired rounds;
  experiments/bench/README.md, changes 13-14). The host reads them once per logging
  window instead (`window_metrics`, `fetch`). A chunk of `steps` steps puts its steps
  first.
  """
  P = jax.sharding.PartitionSpec  # pylint: disable=invalid-name
  return jax.sharding.NamedSharding(mesh, P('seed') if steps == 1 else P(None, 'seed'))


def fetch(tree):
  """Host copies of arrays laid out over the mesh, wherever their devices are.

  An array spread over the devices of several processes is gathered first, so that
  every process reads the same values.
  """
  if jax.process_count() > 1:
    tree = multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def cpu_devices_for_seeds(config) -> None:
  """Before JAX starts: one CPU device per group of seeds that run side by side.

  A run of K seeds on a CPU gets the largest divisor of K not above the number of
  cores (8 seeds on 2 cores: 2 devices of 4 seeds), or `seed_devices` where set.
  Each device's oneDNN convolutions take its share of the cores
  (`models.onednn.threads_per_device`). Devices set by the user (XLA_FLAGS'
  --xla_force_host_platform_device_count, JAX_NUM_CPU_DEVICES) are kept; other
  backends do not use these devices.
  """
  if (config.num_seeds < 2 or config.seed_devices == 1 or jax.config.jax_num_cpu_devices >= 0
      or 'xla_force_host_platform_device_count' in os.environ.get('XLA_FLAGS', '')):
    return
  groups = config.seed_devices or seed_groups(config.num_seeds, len(os.sched_getaffinity(0)))
  if groups > 1:
    jax.config.update('jax_num_cpu_devices', groups)


def seed_groups(num_seeds: int, cores: int) -> int:
  """The largest divisor of `num_seeds` not above `cores`: groups of equal size."""
  return max(d for d in range(1, max(1, min(cores, num_seeds)) + 1) if num_seeds % d == 0)


def make_train_step(setup: Setup, num_classes: int, mean, std, mesh=None,
                    per_seed_data: bool = False, unroll: bool | None = None,
                    in_a_row: bool = True, steps: int = 1):
  """(state, images_u8, labels) -> (state, metrics), mapped over seeds and jitted.

  Seeds are vmapped, or on CPU unrolled (`unroll`, see `unroll_seeds`), one after
  another unless `in_a_row=False` (see `over_seeds`); with several CPU devices along
  the seeds, each runs its own seeds so, side by side (`side_by_side`; the
  training loop hands it one seed per device, `seed_rounds`). With
  `steps` > 1 one call runs that many steps under `lax.scan`, and every metric gets
  a leading axis of `steps` (see `steps_per_dispatch`).

  Data parallelism is SPMD under `jax.jit`: the batch is constrained to split
  over the mesh's 'data' axis and XLA inserts the all-reduces of gradients and
  BatchNorm statistics, so the maths is the same on 1 or N devices.
  """
  mesh = mesh or jax.make_mesh((1, 1), ('seed', 'data'), (jax.sharding.AxisType.Auto,) * 2)
  state_sharding, batch_sharding, replicated = _shardings(mesh)
  # With `resample_per_seed` every seed trains on its own sub-sample: the data
  # gets a leading seed axis, laid out like the state.
  data_axis, data_sharding = (0, state_sharding) if per_seed_data else (None, replicated)
  unroll = unroll_seeds(mesh) if unroll is None else unroll

  def step(state, images_u8, labels):
    x, y = jax.vmap(functools.partial(
        draw_batch, batch_size=setup.batch_size, num_classes=num_classes,
        augment=setup.augment, mean=mean, std=std), in_axes=(0, data_axis, data_axis))(
            state, images_u8, labels)
    if mesh.shape['data'] > 1:
      x = jax.lax.with_sharding_constraint(x, batch_sharding)
      y = jax.lax.with_sharding_constraint(y, batch_sharding)
    return over_seeds(functools.partial(update, model=setup.model, loss=setup.loss, tx=setup.tx,
                                        learning_rate=setup.learning_rate), unroll,
                      in_a_row=1 if in_a_row else None)(state, x, y)

  if runs_side_by_side(mesh, unroll):
    data_spec = state_sharding.spec if per_seed_data else replicated.spec
    step = side_by_side(step, mesh, (state_sharding.spec, data_spec, data_spec))

  def several(state, images_u8, labels):
    return jax.lax.scan(lambda st, _: step(st, images_u8, labels), state, length=steps)

  return jax.jit(step if steps == 1 else several, donate_argnums=0,
                 in_shardings=(state_sharding, data_sharding, data_sharding),
                 out_shardings=(state_sharding, metrics_sharding(mesh, steps)),
                 compiler_options=compiler_options(mesh))


def steps_per_dispatch(config) -> int:
  """How many train steps one call of the jitted program runs.

  0 (the default) picks by backend. GPU: 25 under `lax.scan`. At small-data
  batch sizes a step is a chain of short kernels and the card waits on their
  launches. On one H200, the digits jobs (938 steps, batch 32) trained at 3.3x
  (ResNet-20) and 7.5x (SmallCNN) the images per second of one step per call, and
  whole runs took 17.0 s against 18.9 and 9.0 against 11.5 with the compilation
  cache filled; a first run, which also compiles the scan, gains nothing (ResNet-20
  23 s in the loop against 17). experiments/bench/GPU.md. 25 divides the default
  logging, evaluation and checkpoint intervals, so windows stay whole. CPU: 1.
  XLA:CPU keeps the convolution gradients inside a loop in a layout its fast
  kernels do not take, and the scanned step ran 13x (SmallCNN) to 41x (ResNet-20)
  slower (experiments/bench/dispatch_cpu.log).
  """
  if config.steps_per_dispatch:
    return int(config.steps_per_dispatch)
  return 1 if jax.default_backend() == 'cpu' else 25


def compiler_options(mesh) -> dict | None:
  """XLA options for the train step on this mesh's platform.

  CPU: YNNPACK takes matrix products and reductions only; convolutions go to
  XLA's own (Eigen) kernels and elementwise fusions to its loop emitter. Per-step
  speed-up over XLA's defaults, measured side by side in one process (2-core AMD
  EPYC, jax 0.10.2, batch 32 unless noted): SmallCNN x1.27, ResNet-20 (b128)
  x1.13, EfficientNet-Lite0 (96 px) x1.36, ResNet-18 (96 px) x1.19, WRN-16-8
  x1.13, MLP x1.05. Adding YNN elementwise fusions helps ResNet-20 more (x1.4
  over the default) but leaves EfficientNet-Lite0 at x0.71 and SmallCNN at x1.02-1.10
  of the default (experiments/bench/README.md).
  """
  if mesh.devices.flat[0].platform != 'cpu' or not _cpu_options_accepted():
    return None
  return CPU_OPTIONS


def init_compiler_options(mesh) -> dict | None:
  """XLA options for the program that initialises the state: run once, compiled quickly.

  That program is mostly the random number generator (threefry) of every initialiser,
  thousands of lines of straight-line HLO that LLVM's full optimisation (level 3)
  takes seconds over, for a program that then runs for milliseconds. Level 1 gives
  the same values, bit for bit (`tests/test_train.py`), and compiles 1.5-5x faster;
  level 0 does not (its floating-point code differs in the last bit). 2-core EPYC,
  jax 0.10.2, build and compile, level 3 against level 1: ResNet-20 4.5 against 2.0
  s, 8 seeds 10.8 against 2.0 s; SmallCNN 1.6 against 0.7 s, 8 seeds 3.6 against 0.8
  s; EfficientNet-Lite0 9.1 against 6.0 s. A first run pays this (the compilation
  cache keeps it for later ones). Only measured on CPU, so only used there.
  """
  if mesh.devices.flat[0].platform != 'cpu':
    return None
  return {'xla_backend_optimization_level': 1}


CPU_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type':
                   'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE'}


@functools.cache
def _cpu_options_accepted() -> bool:
  # Experimental XLA options come and go between jaxlib releases; one that this
  # jaxlib does not know would fail every compile.
  try:
    jax.jit(lambda x: x + 1).lower(jnp.zeros(2)).compile(compiler_options=CPU_OPTIONS)
    return True
  except Exception:  # pylint: disable=broad-except
    return False


def make_eval_step(setup: Setup, num_classes: int, mean, std, mesh=None):
  """(parts, images_u8, labels, mask) -> per-part, per-seed sums and probabilities.

  `parts` is the state as the train step takes it (`split_seeds`): evaluation
  runs in the same rounds, so one compiled program serves each.
  """
  mesh = mesh or jax.make_mesh((1, 1), ('seed', 'data'), (jax.sharding.AxisType.Auto,) * 2)
  state_sharding, _, replicated = _shardings(mesh)
  P = jax.sharding.PartitionSpec  # pylint: disable=invalid-name
  examples = jax.sharding.NamedSharding(mesh, P('data'))

  def step(state, images_u8, labels, mask):
    outputs = setup.model.apply({'params': state.params, 'batch_stats': state.batch_stats},
                                normalise(images_u8, mean, std), train=False)
    onehot = jax.nn.one_hot(labels, num_classes)
    scores = setup.loss.scores(outputs)
    correct = (jnp.argmax(scores, -1) == labels) * mask
    loss = setup.loss.per_example(outputs, onehot) * mask
    return {'correct': correct.sum(), 'loss': loss.sum()}, jax.nn.softmax(scores)

  unroll = unroll_seeds(mesh)
  per_seed = lambda state, *batch: over_seeds(lambda st: step(st, *batch), unroll)(state)
  if runs_side_by_side(mesh, unroll):
    # With the seeds over every device, each device takes the whole batch.
    per_seed = side_by_side(per_seed, mesh, (state_sharding.spec, *[replicated.spec] * 3))
  jitted = jax.jit(per_seed,
                   in_shardings=(state_sharding, examples, examples, examples),
                   out_shardings=replicated)

  def run(parts, *host_arrays):
    # Every process holds the same host batch; each device takes its slice of it
    # (the one way to feed numpy data to devices that span several processes).
    batch = [jax.make_array_from_callback(a.shape, examples, lambda i, a=a: a[i])
             for a in host_arrays]
    return [jitted(part, *batch) for part in parts]

  return run


def evaluate(eval_step, parts: list, split: data_lib.Split, batch_size: int) -> dict:
  """Accuracy and loss of every seed, and of their ensemble (averaged probabilities).

  `parts`: the state as `split_seeds` lays it out ([state] for all seeds in one call).

  The last batch is padded to the full batch size and masked, so one compiled
  function serves every batch.
  """
  n = len(split.labels)
  if n == 0:
    return {}
  # Every batch has the same shape (one compiled function) and splits evenly over devices.
  devices = jax.device_count()
  batch_size = -(-min(batch_size, n) // devices) * devices
  totals, correct_ensemble = None, 0
  for start in range(0, n, batch_size):
    x, y = split.images[start:start + batch_size], split.labels[start:start + batch_size]
    pad = batch_size - len(y)
    mask = np.concatenate([np.ones(len(y), np.float32), np.zeros(pad, np.float32)])
    x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
    y = np.concatenate([y, np.zeros(pad, y.dtype)])
    outs = eval_step(parts, x, y, mask)
    rounds = jax.device_get([sums for sums, _ in outs])
    # (D,) per round: seed d*K/D + r is device d's in round r (`split_seeds`).
    sums = {k: np.stack([r[k] for r in rounds], -1).reshape(-1) for k in rounds[0]}
    totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
    # The ensemble's argmax needs the sum of the seeds' probabilities, in any order.
    ensemble = np.argmax(sum(np.asarray(probs).sum(0) for _, probs in outs), -1)
    correct_ensemble += int(((ensemble == y) * mask).sum())
  accuracy = totals['correct'] / n
  return {'accuracy': float(accuracy.mean()), 'loss': float((totals['loss'] / n).mean()),
          'accuracy_per_seed': [float(a) for a in accuracy],
          'loss_per_seed': [float(l) for l in totals['loss'] / n],
          'ensemble_accuracy': correct_ensemble / n}


# ---------------------------------------------------------------------------
# The run.


def build(config: ml_collections.ConfigDict, num_classes: int, train_size: int) -> Setup:
  """Checks every name in the config and builds the run's parts (no data needed)."""
  if config.dtype not in DTYPES:
    raise unknown('dtype', config.dtype, DTYPES)
  loss = losses.get(config.loss)
  augment = augment_lib.build(config.augment)
  batch_size = config.batch_size
  if batch_size < 1:
    raise UserError(f'batch_size must be positive, got {batch_size}')
  if batch_size > train_size:
    raise UserError(f'batch_size={batch_size} is larger than the training split '
                    f'({train_size} images); lower --config.batch_size')
  if config.num_steps > 0:
    total_steps = int(config.num_steps)
  elif config.num_epochs > 0:
    total_steps = max(1, math.ceil(config.num_epochs * train_size / batch_size))
  else:
    raise UserError('set --config.num_steps or --config.num_epochs to a positive number')
  tx, learning_rate = optim.make(config, total_steps)
  num_outputs = config.embedding_dim or num_classes
  model = models.build(config.model, num_outputs,
                       num_classes if loss.needs_classifier else 0, config.width,
                       DTYPES[config.dtype],
                       freeze_backbone_bn=bool(config.pretrained) and (
                           config.freeze_bn or config.finetune == 'linear'))
  return Setup(model, loss, tx, learning_rate, augment, total_steps, batch_size)


def load_pretrained(config) -> tuple[Any, dict | None]:
  """Variables and model spec of `config.pretrained`, or (None, None).

  A folder is a converted model (tools/convert_torch.py) or an earlier run (its
  first seed); an architecture name converts the weights its pip package ships.
  """
  if not config.pretrained:
    return None, None
  if os.path.isdir(config.pretrained):
    variables, spec = checkpoint.load_variables(config.pretrained)
    if 'num_seeds' in spec:  # a training run: leaves carry a seed axis
      variables = jax.tree.map(lambda x: x[0], variables)
  elif config.pretrained in convert.ARCHS:
    path = convert.packaged_weights(config.pretrained)
    variables, _ = convert.convert_state_dict(config.pretrained, convert.load_state_dict(path),
                                              source=path)
    spec = convert.model_spec(config.pretrained, 1000, path)
  else:
    raise UserError(f'pretrained={config.pretrained!r} is neither a folder nor an '
                    f"architecture with packaged weights ({', '.join(sorted(convert.ARCHS))})")
  if spec['model'] != config.model or spec.get('width', 1.0) != config.width:
    raise UserError(f"pretrained weights are for model={spec['model']} width="
                    f"{spec.get('width', 1.0)}; set --config.model and --config.width to match")
  return variables, spec


def check_names(config) -> None:
  """Fails fast on a misspelt name, before any data is read."""
  losses.get(config.loss)
  if config.model not in models.BACKBONES:
    raise unknown('model', config.model, models.BACKBONES)
  if config.optimizer not in optim.OPTIMIZERS:
    raise unknown('optimizer', config.optimizer, optim.OPTIMIZERS)
  if config.schedule not in optim.SCHEDULES:
    raise unknown('schedule', config.schedule, optim.SCHEDULES)
  if config.baseline not in baseline_lib.BASELINES:
    raise unknown('baseline', config.baseline, baseline_lib.BASELINES)
  if config.dtype not in DTYPES:
    raise unknown('dtype', config.dtype, DTYPES)
  if config.finetune not in optim.FINETUNE:
    raise unknown('finetune mode', config.finetune, optim.FINETUNE)
  if config.num_seeds < 1:
    raise UserError(f'num_seeds must be at least 1, got {config.num_seeds}')
  if config.steps_per_dispatch < 0:
    raise UserError(f'steps_per_dispatch must be >= 0, got {config.steps_per_dispatch}')
  augment_lib.build(config.augment)


def default_workdir(config, config_name: str = 'run') -> str:
  """runs/NAME-DATASET-HASH: the same command resumes, a changed override starts afresh."""
  digest = hashlib.sha1(config.to_json(sort_keys=True).encode()).hexdigest()[:8]
  dataset = config.dataset.split(':')[-1].rstrip('/').split('/')[-1]
  return os.path.join('runs', f'{config_name}-{dataset}-{digest}')


def _write_config(config, workdir: str) -> None:
  """Saves the resolved config; refuses to resume a workdir made by another config."""
  path = os.path.join(workdir, 'config.json')
  resolved = json.loads(config.to_json(sort_keys=True))
  if os.path.exists(path):
    with open(path) as f:
      before = json.load(f)
    ignore = {'progress', 'steps_per_dispatch', 'seed_devices'}  # none changes the maths
    changed = sorted(k for k in set(before) | set(resolved)
                     if k not in ignore and before.get(k) != resolved.get(k))
    if changed:
      raise UserError(f'{workdir} holds a run with another config (differs in: '
                      f"{', '.join(changed)}); use another --workdir or delete it")
    return
  if jax.process_index() == 0:
    with open(path + '.tmp', 'w') as f:
      json.dump(resolved, f, indent=1)
    os.replace(path + '.tmp', path)


def versions() -> dict:
  import importlib.metadata as md  # pylint: disable=g-import-not-at-top
  out = {'python': platform.python_version()}
  for pkg in ('smallfx', 'jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy'):
    try:
      out[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      pass
  return out


def summary_line(results: dict, workdir: str) -> str:
  seeds = results['num_seeds']
  acc = f"test accuracy {results['test_accuracy']:.4f}"
  if seeds > 1:
    acc += (f" ± {results['test_accuracy_std']:.4f} over {seeds} seeds, "
            f"ensemble {results['test_ensemble_accuracy']:.4f}")
  base = results.get('baseline_accuracy')
  base = f" | {results['baseline']} {base:.4f}" if base is not None else ''
  return (f"{acc}{base} | {results['steps']} steps, {results['wall_seconds']:.0f} s, "
          f"{results['images_per_sec']:.0f} img/s | {workdir}")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes, or reports) the experiment of `config` in `workdir`."""
  check_names(config)
  os.makedirs(workdir, exist_ok=True)
  _write_config(config, workdir)
  results_path = os.path.join(workdir, 'results.json')
  if os.path.exists(results_path):
    # Written last, after the final checkpoint, by this very config (checked
    # above): the run is finished, so report it without loading anything.
    with open(results_path) as f:
      results = json.load(f)
    if jax.process_index() == 0:
      print(summary_line(results, workdir))
    return results

  mesh = make_mesh(config)
  note = malloc.hint(jax.default_backend())
  if note and jax.process_index() == 0:
    print(note, file=sys.stderr)
  dataset = data_lib.load(config)
  num_classes = dataset.num_classes
  setup = build(config, num_classes, len(dataset.train.labels))
  if setup.batch_size % mesh.shape['data']:
    raise UserError(f'batch_size={setup.batch_size} must be a multiple of the '
                    f"{mesh.shape['data']} devices that split it")
  pretrained, pretrained_spec = load_pretrained(config)
  if pretrained_spec:
    # The statistics the backbone was trained with. Grey images broadcast
    # against three means: the channel repeat happens in the normalisation.
    mean, std = np.array(pretrained_spec['mean']), np.array(pretrained_spec['std'])
  else:
    train_float = dataset.train.images.astype(np.float32) / 255.0
    mean = train_float.mean(axis=(0, 1, 2))
    std = np.maximum(train_float.std(axis=(0, 1, 2)), 1e-3)
    del train_float
  if jax.process_index() == 0:
    checkpoint.write_model_spec(workdir, {
        'model': config.model, 'width': config.width, 'dtype': config.dtype,
        'num_outputs': config.embedding_dim or num_classes,
        'num_classes': num_classes if setup.loss.needs_classifier else 0,
        'loss': config.loss, 'image_size': list(dataset.image_shape[:2]),
        'channels': len(mean), 'mean': mean.tolist(), 'std': std.tolist(),
        'class_names': dataset.class_names, 'class_embeddings': None,
        'num_seeds': config.num_seeds})

  seed_keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(config.seed), i))(
      jnp.arange(config.num_seeds))
  input_shape = (*dataset.image_shape[:2], len(mean))
  state_sharding, _, replicated = _shardings(mesh)

  def init_raw(keys):
    state = jax.vmap(lambda k: init_state(setup.model, setup.tx, input_shape, k))(keys)
    return state.replace(rng=jax.random.key_data(state.rng))

  # Made where the steps want it: a state moved there afterwards (`place_state`) costs a
  # compiled slice per parameter shape on several devices (0.7 s for 8 SmallCNN seeds).
  init = jax.jit(init_raw, out_shardings=state_sharding,
                 compiler_options=init_compiler_options(mesh))
  abstract = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=state_sharding),
      jax.eval_shape(init, seed_keys))

  mngr = checkpoint.manager(workdir)
  start = mngr.latest_step()
  if start is None:
    state = init(seed_keys)
    if pretrained is not None:
      # Optimiser state (momenta, zeros) does not depend on the parameter values.
      variables = convert.transfer_backbone(
          {'params': state.params, 'batch_stats': state.batch_stats}, pretrained)
      state = state.replace(params=variables['params'], batch_stats=variables['batch_stats'])
    state = place_state(state, mesh)
    start = 0
  else:
    state = mngr.restore(start, args=ocp.args.StandardRestore(abstract))

  train_step = make_train_step(setup, num_classes, mean, std, mesh, config.resample_per_seed)
  chunk = steps_per_dispatch(config)
  train_steps = (make_train_step(setup, num_classes, mean, std, mesh, config.resample_per_seed,
                                 steps=chunk) if chunk > 1 else None)
  eval_step = make_eval_step(setup, num_classes, mean, std, mesh)
  if config.resample_per_seed:
    splits = [dataset.train] + [data_lib.resample_train(dataset, config, k)
                                for k in range(1, config.num_seeds)]
    images_dev = jax.device_put(np.stack([s.images for s in splits]), state_sharding)
    labels_dev = jax.device_put(np.stack([s.labels for s in splits]), state_sharding)
  else:
    images_dev = jax.device_put(dataset.train.images, replicated)
    labels_dev = jax.device_put(dataset.train.labels, replicated)
  # The state (and per-seed data) as `rounds` parts, each one call of the step.
  rounds = seed_rounds(mesh, config.num_seeds)
  parts = split_seeds(state, rounds, mesh)
  data_parts = (split_seeds((images_dev, labels_dev), rounds, mesh) if config.resample_per_seed
                else [(images_dev, labels_dev)] * rounds)
  # From here the parts are the state: split copies would otherwise stay alive beside them.
  del state, images_dev, labels_dev
  writer = metrics_lib.Writer(workdir, resume_step=start)
  images_per_step = setup.batch_size * config.num_seeds

  bar = tqdm.tqdm(total=setup.total_steps, initial=start,
                  disable=not config.progress or jax.process_index() != 0,
                  desc=os.path.basename(workdir.rstrip('/')), unit='step', file=sys.stderr,
                  dynamic_ncols=True)
  pending, window_start, throughput = [], time.perf_counter(), []
  t0, val = time.perf_counter(), {}
  step = start
  # XLA:CPU runs every device's share of a step on one shared thread pool. With
  # several CPU devices and dozens of steps queued, their all-reduces wait on each
  # other until XLA aborts (a 40 s rendezvous timeout): 2 virtual devices, SmallCNN,
  # 938 steps, 2 runs out of 2. Waiting for step t-1 before queueing step t+1 keeps
  # two in flight, which ran 300 steps as fast as fully blocking steps (10.2 vs 10.5
  # ms) and never stuck.
  one_ahead = jax.default_backend() == 'cpu' and jax.local_device_count() > 1

  def next_stop(step):
    """The next step that logs, evaluates, checkpoints or ends the run."""
    everys = [e for e in (config.log_every_steps, config.eval_every_steps,
                          config.checkpoint_every_steps) if e]
    return min([setup.total_steps] + [e * (step // e + 1) for e in everys])

  while step < setup.total_steps:
    # `chunk` steps per call where they fit before the next log, evaluation or
    # checkpoint (see steps_per_dispatch), single steps otherwise.
    n = chunk if chunk > 1 and step + chunk <= next_stop(step) else 1
    ms = []
    for r in range(rounds):
      parts[r], m = (train_steps if n > 1 else train_step)(parts[r], *data_parts[r])
      ms.append(m)
    if one_ahead and pending:
      jax.block_until_ready(pending[-1][1])
    pending.append((n, ms))
    step += n
    bar.update(n)
    log_now = step % config.log_every_steps == 0 or step == setup.total_steps
    save_now = step % config.checkpoint_every_steps == 0 or step == setup.total_steps
    eval_now = (config.eval_every_steps and step % config.eval_every_steps == 0
                or step == setup.total_steps)
    if not (log_now or save_now or eval_now):
      continue
    # The one host sync per window: earlier steps were dispatched without waiting.
    per_name = fetch(window_metrics([ms for _, ms in pending]))
    window = [{k: v[i] for k, v in per_name.items()} for i in range(sum(n for n, _ in pending))]
    elapsed = time.perf_counter() - window_start
    for offset, w in enumerate(window):
      # A finite loss with an infinite gradient already poisons the parameters.
      bad_keys = [k for k in ('train/loss', 'train/grad_norm', 'train/param_norm')
                  if not np.all(np.isfinite(w[k]))]
      if bad_keys:
        bad = step - len(window) + offset + 1
        mngr.wait_until_finished()
        bar.close()
        what = bad_keys[0].split('/')[1].replace('_', ' ')
        kept = (f'the last good checkpoint (step {mngr.latest_step()}) is kept in '
                f'{workdir}/checkpoints' if mngr.latest_step() is not None
                else 'no checkpoint had been saved yet')
        raise UserError(f'{what} became non-finite at step {bad}; {kept}. Lower '
                        '--config.learning_rate or set --config.grad_clip_norm')
    scalars = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
    rate = images_per_step * len(window) / max(elapsed, 1e-9)
    throughput.append(rate)
    scalars['train/images_per_sec'] = rate
    pending = []
    if eval_now and len(dataset.val.labels):
      val = evaluate(eval_step, parts, dataset.val, config.eval_batch_size)
      scalars['val/accuracy'], scalars['val/loss'] = val['accuracy'], val['loss']
    writer.write(step, scalars)
    bar.set_postfix(loss=f"{scalars['train/loss']:.4f}",
                    val_acc=f"{val['accuracy']:.3f}" if val else '-')
    if save_now:
      mngr.save(step, args=ocp.args.StandardSave(join_seeds(parts, mesh)))
    window_start = time.perf_counter()
  bar.close()
  mngr.wait_until_finished()
  mngr.close()
  wall = time.perf_counter() - t0

  test = evaluate(eval_step, parts, dataset.test, config.eval_batch_size)
  writer.write(step, {'test/accuracy': test['accuracy'], 'test/loss': test['loss']})
  writer.close()
  features = None
  if pretrained is not None:
    backbone_vars = {'params': pretrained['params'], 'batch_stats': pretrained['batch_stats']}
    feature_fn = jax.jit(lambda x: models.features(setup.model, backbone_vars,
                                                   normalise(x, mean, std)))
    features = lambda images: np.concatenate([np.asarray(feature_fn(images[i:i + 256]))
                                              for i in range(0, len(images), 256)])
  base_acc = baseline_lib.run(config.baseline, dataset, config.data_seed, features)
  devices = jax.devices()
  results = {
      'test_accuracy': test['accuracy'],
      'test_loss': test['loss'],
      'test_accuracy_per_seed': test['accuracy_per_seed'],
      'test_accuracy_std': float(np.std(test['accuracy_per_seed'])),
      'test_ensemble_accuracy': test['ensemble_accuracy'],
      'val_accuracy': val.get('accuracy'),
      'baseline': config.baseline,
      'baseline_accuracy': base_acc,
      'num_seeds': config.num_seeds,
      'steps': int(step),
      'resumed_from_step': int(start),
      'wall_seconds': wall,
      'images_per_sec': float(np.median(throughput)) if throughput else 0.0,
      'train_size': int(len(dataset.train.labels)),
      'test_size': int(len(dataset.test.labels)),
      'versions': versions(),
      'devices': [str(d) for d in devices],
      'platform': devices[0].platform,
  }
  if jax.process_index() == 0:
    with open(results_path + '.tmp', 'w') as f:
      json.dump(results, f, indent=1)
    os.replace(results_path + '.tmp', results_path)
    print(summary_line(results, workdir))
  return results
