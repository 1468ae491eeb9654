"""Pretraining objectives without labels: what a backbone learns from unlabelled images.

- `dae`: a denoising autoencoder. The backbone encodes a corrupted image (a fraction
  `mask` of its pixels zeroed, Gaussian `noise` on the rest) to its pooled features, a
  small decoder (dense, then nearest upsampling and 3x3 convolutions) rebuilds the clean
  image; the loss is the mean squared error in normalised pixels.
- `stacked_ae`: greedy layer-wise, the classic stacked autoencoder (Bengio et al. 2007,
  Vincent et al. 2010): for each stage of the backbone in turn, a one-layer decoder
  rebuilds the stage's clean input from its output on the corrupted image, and only that
  stage learns (the stages below are frozen, those above unused); then the whole stack
  trains end to end as `dae`. The steps are shared equally among the stages and the
  whole stack.
- `simclr`: SimCLR (Chen et al. 2020). Two augmented views of each image go through the
  backbone and a projection head; the NT-Xent loss with a `temperature` pulls the views
  of one image together and pushes the batch's other 2B - 2 views away.

Everything here is one member's pure function; `smallfx.pretrain` runs them over the
members and the devices.
"""

import dataclasses
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from smallfx import augment as augment_lib
from smallfx import shuffle
from smallfx import steps as steps_lib
from smallfx.errors import UserError, unknown
from smallfx.models import conv as conv_lib
from smallfx.models import l2_normalize
from smallfx.models.simple import STAGES

METHODS = {
    'dae': 'denoising autoencoder: the backbone encodes a corrupted image, a decoder '
           'rebuilds it',
    'stacked_ae': 'stacked autoencoder, greedy layer-wise (each stage rebuilds its input '
                  'with the stages below frozen), then the whole stack',
    'simclr': "SimCLR: two augmented views, a projection head and the NT-Xent loss",
}

# AdamW's peak learning rate where `pretraining.learning_rate` is 0. Fashion-MNIST,
# SmallCNN, 10 per class, 2 seeds: stacked_ae at 1e-3 left 95-98% of the dense
# layer's units dead and fine-tuned to 0.32 test accuracy; 3e-4 0.719, 1e-4 0.750.
# dae and simclr at 1e-3 fine-tuned to 0.758 and 0.757 (300 + 300 steps).
LEARNING_RATES = {'dae': 1e-3, 'stacked_ae': 1e-4, 'simclr': 1e-3}

# simclr's views when `augment='auto'`, by the images' smaller side: random resized
# crops and flips are SimCLR's core; on grey images the colour distortion becomes
# TrivialAugment's photometric and geometric ops.
AUTO_VIEWS = ((16, 'crop(pad=1)|trivial'), (None, 'rrc(scale_min=0.2)|flip|trivial'))


@dataclasses.dataclass(frozen=True)
class Pretraining:
  """`config.pretrain` and `config.pretraining`, checked."""
  method: str
  steps: int
  batch_size: int
  learning_rate: float
  weight_decay: float
  warmup_steps: int
  mask: float
  noise: float
  augment: str
  temperature: float
  projection_dim: int
  checkpoint_every_steps: int

  @classmethod
  def from_config(cls, config) -> 'Pretraining | None':
    if not config.pretrain:
      return None
    if config.pretrain not in METHODS:
      raise unknown('pretrain method', config.pretrain, METHODS)
    p = config.pretraining
    checks = {
        'steps': p.steps >= 1, 'batch_size': p.batch_size >= 2, 'learning_rate': p.learning_rate >= 0,
        'weight_decay': p.weight_decay >= 0, 'warmup_steps': p.warmup_steps >= 0,
        'mask': 0 <= p.mask < 1, 'noise': p.noise >= 0, 'temperature': p.temperature > 0,
        'projection_dim': p.projection_dim >= 1, 'checkpoint_every_steps': p.checkpoint_every_steps >= 0,
    }
    for name, ok in checks.items():
      if not ok:
        raise UserError(f'pretraining.{name}={p[name]} is out of range')
    if p.augment != 'auto':
      augment_lib.build(p.augment)  # a bad pipeline fails here
    return cls(method=config.pretrain, steps=int(p.steps), batch_size=int(p.batch_size),
               learning_rate=float(p.learning_rate or LEARNING_RATES[config.pretrain]),
               weight_decay=float(p.weight_decay),
               warmup_steps=int(p.warmup_steps), mask=float(p.mask), noise=float(p.noise),
               augment=p.augment, temperature=float(p.temperature),
               projection_dim=int(p.projection_dim),
               checkpoint_every_steps=int(p.checkpoint_every_steps))

  def views(self, image_shape) -> str:
    """The pipeline of simclr's views for images of `image_shape`."""
    if self.augment != 'auto':
      return self.augment
    side = min(image_shape[:2])
    return next(spec for limit, spec in AUTO_VIEWS if limit is None or side <= limit)


def has_stages(backbone_factory) -> bool:
  """Whether a backbone sows its stages and names their parameters (`stacked_ae`)."""
  return hasattr(getattr(backbone_factory, 'func', backbone_factory), 'stage_of')


# --- heads ---------------------------------------------------------------------


class Decoder(nn.Module):
  """Pooled features (B, F) -> an image (B, H, W, C): dense to H/4 x W/4, two upsamplings."""
  image_shape: tuple[int, int, int]
  width: int = 64

  @nn.compact
  def __call__(self, h):
    height, width, channels = self.image_shape
    h0, w0 = math.ceil(height / 4), math.ceil(width / 4)
    x = nn.relu(nn.Dense(h0 * w0 * self.width)(h)).reshape(-1, h0, w0, self.width)
    for features in (self.width // 2, channels):
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
      x = conv_lib.Conv(features, (3, 3))(x)
      if features != channels:
        x = nn.relu(x)
    return x[:, :height, :width]


class StageDecoder(nn.Module):
  """One layer from a stage's output back to its input: upsampling + 3x3, or dense."""
  target_shape: tuple[int, ...]  # the stage's input, without the batch axis

  @nn.compact
  def __call__(self, y):
    if y.ndim == 2 or len(self.target_shape) == 1:
      out = nn.Dense(math.prod(self.target_shape))(y.reshape(y.shape[0], -1))
      return out.reshape(-1, *self.target_shape)
    height, width, channels = self.target_shape
    factor = math.ceil(height / y.shape[1])
    y = jnp.repeat(jnp.repeat(y, factor, axis=1), factor, axis=2)
    return conv_lib.Conv(channels, (3, 3))(y)[:, :height, :width]


class Projection(nn.Module):
  """SimCLR's projection head: features -> hidden -> `dim`, used only by the loss."""
  dim: int

  @nn.compact
  def __call__(self, h):
    return nn.Dense(self.dim)(nn.relu(nn.Dense(h.shape[-1])(h)))


# --- the objective -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Phase:
  """A stretch of pretraining with one loss: `stage` None trains everything.

  Each phase is an optimisation of its own: AdamW starts afresh (moments, count and
  schedule) at `start`, so a stage never inherits moments, or a schedule already past
  its warm-up, from the phases before it.
  """
  name: str
  start: int
  end: int
  stage: int | None = None


def nt_xent(z1: jax.Array, z2: jax.Array, temperature: float) -> jax.Array:
  """SimCLR's loss: each view must pick its partner among the other 2B - 1 views."""
  z = l2_normalize(jnp.concatenate([z1, z2]))
  n = z1.shape[0]
  logits = z @ z.T / temperature
  logits = jnp.where(jnp.eye(2 * n, dtype=bool), -1e9, logits)
  partner = jnp.concatenate([jnp.arange(n) + n, jnp.arange(n)])
  return optax.softmax_cross_entropy_with_integer_labels(logits, partner).mean()


def corrupt(key, x, mask: float, noise: float):
  """A fraction `mask` of the pixels zeroed (the mean, normalised), noise on the rest."""
  keep_key, noise_key = jax.random.split(key)
  keep = jax.random.bernoulli(keep_key, 1.0 - mask, (*x.shape[:-1], 1))
  return jnp.where(keep, x + noise * jax.random.normal(noise_key, x.shape), 0.0)


@dataclasses.dataclass(frozen=True)
class Objective:
  """A pretraining method on one backbone: its heads, phases, draw and update."""
  spec: Pretraining
  backbone: nn.Module
  image_shape: tuple[int, int, int]
  mean: Any
  std: Any

  @functools.cached_property
  def stage_shapes(self) -> list[tuple[int, ...]]:
    """Each stage's output shape (without the batch axis), from an abstract pass."""
    x = jnp.zeros((1, *self.image_shape), jnp.float32)

    def stages(x):
      variables = self._init_backbone(jax.random.key(0), x)
      _, sown = self.backbone.apply(variables, x, train=False, mutable=[STAGES])
      return sown[STAGES]['out']

    return [s.shape[1:] for s in jax.eval_shape(stages, x)]

  def _init_backbone(self, key, x) -> dict:
    return self.backbone.init(key, x, train=False)

  @functools.cached_property
  def heads(self) -> dict[str, nn.Module]:
    method = self.spec.method
    if method == 'simclr':
      return {'projection': Projection(self.spec.projection_dim)}
    heads = {'decoder': Decoder(self.image_shape)}
    if method == 'stacked_ae':
      inputs = [tuple(self.image_shape)] + self.stage_shapes[:-1]
      heads.update({f'stage_{k}': StageDecoder(shape) for k, shape in enumerate(inputs)})
    return heads

  def phases(self) -> list[Phase]:
    total = self.spec.steps
    if self.spec.method != 'stacked_ae':
      return [Phase(self.spec.method, 0, total)]
    n = len(self.stage_shapes)
    per = total // (n + 1)
    if not per:
      raise UserError(f'pretraining.steps={total} is too few for stacked_ae: its {n} stages '
                      f'and the whole stack need at least {n + 1}')
    return [Phase(f'stage {k + 1}/{n}', per * k, per * (k + 1), k) for k in range(n)] + [
        Phase('whole stack', per * n, total)]

  def tx(self, phase: Phase) -> optax.GradientTransformation:
    s = self.spec
    steps = phase.end - phase.start
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, s.learning_rate, min(s.warmup_steps, steps // 2), steps)
    return optax.adamw(schedule, weight_decay=s.weight_decay,
                       mask=lambda p: jax.tree.map(lambda a: a.ndim > 1, p))

  def init(self, key) -> steps_lib.TrainState:
    """One member's state: backbone and heads, from `key`."""
    init_key, train_key = jax.random.split(key)
    x = jnp.zeros((1, *self.image_shape), jnp.float32)
    keys = jax.random.split(init_key, 1 + len(self.heads))
    variables = self._init_backbone(keys[0], x)
    h = self.backbone.apply(variables, x, train=False)
    params = {'backbone': variables['params']}
    if self.spec.method == 'stacked_ae':
      _, sown = self.backbone.apply(variables, x, train=False, mutable=[STAGES])
      outputs = sown[STAGES]['out']
    for k, (name, head) in zip(keys[1:], self.heads.items()):
      head_input = outputs[int(name.split('_')[1])] if name.startswith('stage_') else h
      params[name] = head.init(k, head_input)['params']
    return steps_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params=params,
        batch_stats={'backbone': variables.get('batch_stats', {})},
        opt_state=self.tx(self.phases()[0]).init(params), rng=jax.random.key_data(train_key),
        diverged=jnp.zeros((), bool))

  def draw(self, state: steps_lib.TrainState, images_u8) -> jax.Array:
    """This step's batch in [0, 1]: a slice of this epoch's permutation of the pool.

    simclr returns its two views stacked (2B, H, W, C): view one, then view two.
    """
    n, b = images_u8.shape[0], self.spec.batch_size
    epoch, i = jnp.divmod(state.step, max(1, n // b))
    key = jax.random.wrap_key_data(state.rng)
    idx = shuffle.permuted(jax.random.fold_in(key, epoch), i * b + jnp.arange(b), n)
    x = images_u8[idx].astype(jnp.float32) / 255.0
    if self.spec.method != 'simclr':
      return x
    views = augment_lib.build(self.spec.views(self.image_shape))
    k1, k2 = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, 1 << 30), state.step))
    dummy = jnp.zeros((b, 1), jnp.float32)
    return jnp.concatenate([views(k1, x, dummy)[0], views(k2, x, dummy)[0]])

  def _encode(self, params, batch_stats, x, stages: bool = False):
    mutable = ['batch_stats', STAGES] if stages else ['batch_stats']
    h, new = self.backbone.apply({'params': params['backbone'],
                                  'batch_stats': batch_stats['backbone']},
                                 x, train=True, mutable=mutable)
    return h, {'backbone': new.get('batch_stats', batch_stats['backbone'])}, new.get(
        STAGES, {}).get('out', ())

  def loss(self, phase: Phase, params, batch_stats, x01, key):
    """(loss, new batch statistics) of a batch in [0, 1] (simclr: the two views)."""
    heads = self.heads
    x = (x01 - self.mean) / self.std
    if self.spec.method == 'simclr':
      h, new_stats, _ = self._encode(params, batch_stats, x)
      z = heads['projection'].apply({'params': params['projection']}, h)
      half = z.shape[0] // 2
      return nt_xent(z[:half], z[half:], self.spec.temperature), new_stats
    noisy = corrupt(key, x, self.spec.mask, self.spec.noise)
    if phase.stage is None:
      h, new_stats, _ = self._encode(params, batch_stats, noisy)
      if jax.tree.leaves(batch_stats):
        # BatchNorm's running statistics from the clean images, which fine-tuning sees.
        _, new_stats, _ = self._encode(jax.lax.stop_gradient(params), batch_stats, x)
      rebuilt = heads['decoder'].apply({'params': params['decoder']}, h)
      return jnp.mean(jnp.square(rebuilt - x)), new_stats
    k = phase.stage
    # The stages below are frozen: no gradient reaches them (nor their moments).
    params = jax.tree.map(lambda p, ok: p if ok else jax.lax.stop_gradient(p), params,
                          self.trains(phase, params))
    _, new_stats, clean = self._encode(jax.lax.stop_gradient(params), batch_stats, x,
                                       stages=True)
    target = x if k == 0 else jax.lax.stop_gradient(clean[k - 1])
    _, _, outputs = self._encode(params, batch_stats, noisy, stages=True)
    rebuilt = heads[f'stage_{k}'].apply({'params': params[f'stage_{k}']}, outputs[k])
    return jnp.mean(jnp.square(rebuilt - target)), new_stats

  def trains(self, phase: Phase, tree) -> Any:
    """Per leaf of a params-shaped `tree`: whether `phase` may change it."""
    def top(path):
      return path[0].key, (path[1].key if len(path) > 1 else '')

    def ok(path, _):
      if phase.stage is None:
        return True
      head, name = top(path)
      if head == 'backbone':
        return self.backbone.stage_of(name) == phase.stage
      return head == f'stage_{phase.stage}'

    return jax.tree_util.tree_map_with_path(ok, tree)

  def update(self, phase: Phase, state: steps_lib.TrainState, x01) -> tuple[Any, dict]:
    """One step of `phase` for one member: (state, metrics)."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.rng), 1 << 29),
                             state.step)
    (value, new_stats), grads = jax.value_and_grad(
        lambda p: self.loss(phase, p, state.batch_stats, x01, key), has_aux=True)(state.params)
    tx = self.tx(phase)
    fresh = state.step == phase.start
    opt_state = jax.tree.map(lambda new, old: jnp.where(fresh, new, old),
                             tx.init(state.params), state.opt_state)
    updates, opt_state = tx.update(grads, opt_state, state.params)
    if phase.stage is not None:  # greedy: only this stage and its decoder move
      updates = jax.tree.map(lambda u, ok: u if ok else jnp.zeros_like(u), updates,
                             self.trains(phase, updates))
      new_stats = jax.tree.map(lambda n, o, ok: n if ok else o, new_stats, state.batch_stats,
                               self.trains(phase, new_stats))
    params = optax.apply_updates(state.params, updates)
    metrics = {'pretrain/loss': value, 'pretrain/grad_norm': steps_lib.global_norm(grads)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         batch_stats=new_stats), metrics


def reconstruct(objective: Objective, variables: dict, x01, key):
  """One member's (corrupted, rebuilt) images in [0, 1]: what an autoencoder sees and makes."""
  x = (x01 - objective.mean) / objective.std
  noisy = corrupt(key, x, objective.spec.mask, objective.spec.noise)
  h = objective.backbone.apply({'params': variables['params']['backbone'],
                                'batch_stats': variables['batch_stats'].get('backbone', {})},
                               noisy, train=False)
  rebuilt = objective.heads['decoder'].apply({'params': variables['params']['decoder']}, h)
  back = lambda z: jnp.clip(z * objective.std + objective.mean, 0.0, 1.0)
  return back(noisy), back(rebuilt)


def features(objective: Objective, variables: dict, x01):
  """One member's backbone features of images in [0, 1] (inference mode)."""
  return objective.backbone.apply(
      {'params': variables['params']['backbone'],
       'batch_stats': variables['batch_stats'].get('backbone', {})},
      (x01 - objective.mean) / objective.std, train=False)


def step_fn(objective: Objective, phase: Phase, layout) -> Callable:
  """(state, images_u8, unused) -> (state, metrics) over every member of `layout`."""
  def step(state, images_u8, _):
    x = jax.vmap(objective.draw, in_axes=(0, None))(state, images_u8)
    if layout.data_devices > 1:
      x = jax.lax.with_sharding_constraint(x, layout.batch_sharding)
    return layout.map(lambda st, xs: objective.update(phase, st, xs), in_a_row=1)(state, x)
  return step
