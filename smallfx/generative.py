"""Generative augmentation: a class-conditional GAN, one member's pure functions.

- `dada`: DADA (Zhang et al., "DADA: Deep Adversarial Data Augmentation for Extremely
  Low Data Regime Classification", 2019), as its public code trains it. The
  discriminator is the run's classifier with two outputs per class, "real of class k"
  and "fake of class k". Phase 1 (here): per example, a two-way softmax over the pair
  of its class tells real from fake; the generator learns to pass as real, plus
  feature matching (the L1 distance of the batch means of the discriminator's
  features, weight `feature_matching`). Each iteration is one discriminator step on a
  real batch and a generated one (uniform labels), then `g_steps` generator steps
  conditioned on the real batch's labels; Adam(3e-4, b1=0.5) for both. Phase 2 is the
  ordinary training loop (`smallfx.train`): the generator frozen, the discriminator
  trains on as a K-way classifier of the summed pair logits (loss `dada`), on real
  images plus as many generated ones.
- `cgan_augment`: the same GAN (its discriminator the run's backbone unless
  `gan.discriminator` names one), then the run's own model and loss train from
  scratch on real images plus `ratio` generated ones per real one.

The generator is DADA's but for its upsampling: the one-hot label joins the noise
z ~ U[0, 1)^z_dim and every layer's input channels; a dense layer to (H/2^u, W/2^u), then
u doublings of the size (nearest upsampling and a 3x3 convolution, where DADA has 5x5
transposed convolutions of stride 2), BatchNorm without scale on batch statistics (also
when sampling) and ReLU between, tanh last. The discriminator's input
noise (`input_noise`) is DADA's, in phase 1; left out of the original: the
discriminator's weight normalisation and dropout (the run's model is used as it is) and
the averaged (EMA) test weights.

`smallfx.gan` runs phase 1 over the members and devices; `sampler` feeds phase 2.
"""

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from smallfx import steps as steps_lib
from smallfx.models import conv as conv_lib
from smallfx.errors import UserError, unknown

METHODS = {
    'dada': 'DADA: a class-conditional GAN whose discriminator, with a real and a fake '
            'output per class, then trains on as the classifier on real and generated images',
    'cgan_augment': 'a class-conditional GAN first, then the run\'s own model and loss on '
                    'real plus generated images',
}

# Generated images per real one in each phase-2 batch, where `gan.ratio` is 0.
# DADA trains on as many generated images as real ones; cgan_augment takes half as many.
RATIOS = {'dada': 1.0, 'cgan_augment': 0.5}


@dataclasses.dataclass(frozen=True)
class Gan:
  """`config.generative` and `config.gan`, checked."""
  method: str
  steps: int
  batch_size: int
  learning_rate: float
  b1: float
  g_steps: int
  z_dim: int
  width: float
  feature_matching: float
  input_noise: float
  ratio: float
  discriminator: str
  min_spread: float
  checkpoint_every_steps: int
  sample_every_steps: int

  @classmethod
  def from_config(cls, config) -> 'Gan | None':
    if not config.generative:
      return None
    if config.generative not in METHODS:
      raise unknown('generative method', config.generative, METHODS)
    g = config.gan
    checks = {'steps': g.steps >= 1, 'batch_size': g.batch_size >= 2,
              'learning_rate': g.learning_rate > 0, 'b1': 0 <= g.b1 < 1,
              'g_steps': g.g_steps >= 1, 'z_dim': g.z_dim >= 1, 'width': g.width > 0,
              'feature_matching': g.feature_matching >= 0, 'ratio': g.ratio >= 0,
              'input_noise': g.input_noise >= 0,
              'min_spread': g.min_spread >= 0, 'checkpoint_every_steps':
              g.checkpoint_every_steps >= 0, 'sample_every_steps': g.sample_every_steps >= 0}
    for name, ok in checks.items():
      if not ok:
        raise UserError(f'gan.{name}={g[name]} is out of its range (see smallfx/config.py)')
    if config.generative == 'dada':
      if config.loss != 'dada':
        raise UserError("generative='dada' trains its discriminator on as the classifier, "
                        f"with a real and a fake output per class: set --config.loss=dada "
                        f"(got {config.loss!r})")
      if g.discriminator and g.discriminator != config.model:
        raise UserError(f"generative='dada': the discriminator is the run's model "
                        f"({config.model!r}); leave gan.discriminator empty")
      if config.pretrained or config.pretrain:
        raise UserError("generative='dada' starts the classifier from its GAN's "
                        'discriminator; pretrained and pretrain ask for other weights')
    return cls(method=config.generative, steps=int(g.steps), batch_size=int(g.batch_size),
               learning_rate=float(g.learning_rate), b1=float(g.b1), g_steps=int(g.g_steps),
               z_dim=int(g.z_dim), width=float(g.width),
               feature_matching=float(g.feature_matching), input_noise=float(g.input_noise),
               ratio=float(g.ratio) or RATIOS[config.generative],
               discriminator=g.discriminator or config.model,
               min_spread=float(g.min_spread),
               checkpoint_every_steps=int(g.checkpoint_every_steps),
               sample_every_steps=int(g.sample_every_steps))

  def generated_per_batch(self, batch_size: int) -> int:
    return int(round(self.ratio * batch_size))


def upsamplings(image_shape) -> int:
  """How many times the generator doubles its size: the most (up to 3) that keep a start
  of at least 4 pixels and divide the size (28x28: 2, from 7x7; 32x32: 3, from 4x4)."""
  h, w = image_shape[:2]
  return max([u for u in range(4) if h % 2**u == 0 and w % 2**u == 0
              and min(h, w) // 2**u >= 4], default=0)


def _with_labels(x, y):
  """The one-hot labels `y` (B, K) as K constant channels of `x` (B, H, W, C)."""
  return jnp.concatenate([x, jnp.broadcast_to(y[:, None, None, :], (*x.shape[:3], y.shape[-1]))],
                         -1)


class Generator(nn.Module):
  """(z, one-hot labels) -> images in [-1, 1] of `image_shape`."""
  image_shape: tuple[int, int, int]
  width: float = 1.0

  @nn.compact
  def __call__(self, z, y):
    h, w, c = self.image_shape
    u = upsamplings(self.image_shape)
    # 32x32 at width 1: 512, 256, 128 channels, DADA's CIFAR generator.
    channels = [max(1, int(64 * 2**(u - j) * self.width)) for j in range(u)]
    norm = lambda x: nn.relu(nn.BatchNorm(use_running_average=False, use_scale=False,
                                          epsilon=1e-6)(x))
    x = nn.Dense(h // 2**u * w // 2**u * (channels[0] if u else c), use_bias=False,
                 kernel_init=nn.initializers.normal(0.05))(jnp.concatenate([z, y], -1))
    x = x.reshape(-1, h // 2**u, w // 2**u, channels[0] if u else c)
    for j in range(u):
      x = norm(x)
      # Twice the size: nearest upsampling and a 3x3 convolution, not DADA's 5x5
      # transposed convolution, which XLA:CPU ran 4x slower (28x28, batch 64).
      x = jnp.repeat(jnp.repeat(_with_labels(x, y), 2, axis=1), 2, axis=2)
      x = conv_lib.Conv(channels[j + 1] if j + 1 < u else c, (3, 3), use_bias=j + 1 == u,
                        kernel_init=nn.initializers.normal(0.05))(x)
    return jnp.tanh(x)


def init_generator(spec: Gan, image_shape, num_classes: int, key) -> dict:
  """A fresh generator's variables ({'params', 'batch_stats'})."""
  variables = Generator(tuple(image_shape), spec.width).init(
      key, jnp.zeros((1, spec.z_dim)), jnp.zeros((1, num_classes)))
  return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}


def generate(generator: Generator, variables: dict, key, labels, num_classes: int, z_dim: int):
  """Images in [0, 1] of `labels`, BatchNorm on the batch's statistics (DADA's sampling)."""
  z = jax.random.uniform(key, (labels.shape[0], z_dim))
  x, _ = generator.apply(variables, z, jax.nn.one_hot(labels, num_classes),
                         mutable=['batch_stats'])
  return (x + 1.0) / 2.0


def sampler(spec: Gan, image_shape, num_classes: int, batch_size: int) -> Callable:
  """Phase 2's (generator variables, key) -> (images in [0, 1], one-hot labels), uniform labels."""
  generator = Generator(tuple(image_shape), spec.width)
  count = spec.generated_per_batch(batch_size)

  def draw(variables, key):
    label_key, z_key = jax.random.split(key)
    labels = jax.random.randint(label_key, (count,), 0, num_classes)
    return (generate(generator, variables, z_key, labels, num_classes, spec.z_dim),
            jax.nn.one_hot(labels, num_classes))

  return draw


def spread(images, labels, num_classes: int):
  """Per class, the mean over pixels of the images' standard deviation (0: all alike)."""
  onehot = jax.nn.one_hot(labels, num_classes)                       # (N, K)
  count = jnp.maximum(onehot.sum(0), 1.0)
  flat = images.reshape(images.shape[0], -1)
  mean = onehot.T @ flat / count[:, None]
  var = onehot.T @ jnp.square(flat) / count[:, None] - jnp.square(mean)
  return jnp.sqrt(jnp.maximum(var, 0.0)).mean(-1)


def _pair(logits, labels):
  """(real, fake) logits of each example's own class: DADA's two-way softmax."""
  k = logits.shape[-1] // 2
  real = jnp.take_along_axis(logits[:, :k], labels[:, None], -1)[:, 0]
  fake = jnp.take_along_axis(logits[:, k:], labels[:, None], -1)[:, 0]
  return real, fake


@dataclasses.dataclass(frozen=True)
class Objective:
  """Phase 1 of a generative method for one member: init, draw and update."""
  spec: Gan
  discriminator: nn.Module  # a `models.Net` with two outputs per class
  image_shape: tuple[int, int, int]
  num_classes: int
  mean: Any
  std: Any

  @property
  def generator(self) -> Generator:
    return Generator(tuple(self.image_shape), self.spec.width)

  def tx(self) -> optax.GradientTransformation:
    # DADA's Adam: eps inside the square root, no decay.
    return optax.adam(self.spec.learning_rate, b1=self.spec.b1, b2=0.999, eps=0.0,
                      eps_root=1e-8)

  def init(self, key) -> steps_lib.TrainState:
    g_key, d_key, train_key = jax.random.split(key, 3)
    g = init_generator(self.spec, self.image_shape, self.num_classes, g_key)
    d = self.discriminator.init(d_key, jnp.zeros((1, *self.image_shape)), train=False)
    params = {'generator': g['params'], 'discriminator': d['params']}
    return steps_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params=params,
        batch_stats={'generator': g['batch_stats'],
                     'discriminator': d.get('batch_stats', {})},
        opt_state={name: self.tx().init(p) for name, p in params.items()},
        rng=jax.random.key_data(train_key), diverged=jnp.zeros((), bool))

  def _fake(self, g_params, g_stats, key, labels):
    x01 = generate(self.generator, {'params': g_params, 'batch_stats': g_stats}, key, labels,
                   self.num_classes, self.spec.z_dim)
    return (x01 - self.mean) / self.std

  def _discriminate(self, d_params, d_stats, x, key):
    # DADA's discriminator starts with Gaussian noise on its input: with few real
    # images, it keeps the discriminator from telling them apart by heart.
    x = x + self.spec.input_noise * jax.random.normal(key, x.shape)
    outputs, new = self.discriminator.apply({'params': d_params, 'batch_stats': d_stats}, x,
                                            train=True, mutable=['batch_stats'])
    return outputs['output'], outputs['features'], new.get('batch_stats', d_stats)

  def update(self, state: steps_lib.TrainState, x, y) -> tuple[steps_lib.TrainState, dict]:
    """One iteration: a discriminator step, then `g_steps` generator steps.

    `x` is the real batch, normalised; `y` its one-hot labels.
    """
    key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.rng), 1 << 29),
                             state.step)
    labels = jnp.argmax(y, -1)
    b = labels.shape[0]
    params, stats, opt = dict(state.params), dict(state.batch_stats), dict(state.opt_state)
    tx = self.tx()

    # The discriminator: real batch real, a generated batch of uniform labels fake.
    label_key, z_key, noise_key, key = jax.random.split(key, 4)
    fake_labels = jax.random.randint(label_key, (b,), 0, self.num_classes)
    fake = self._fake(params['generator'], stats['generator'], z_key, fake_labels)
    spreads = spread(fake * self.std + self.mean, fake_labels, self.num_classes)
    present = jax.nn.one_hot(fake_labels, self.num_classes).sum(0) >= 2

    def d_loss(d_params):
      logits, _, new_stats = self._discriminate(d_params, stats['discriminator'],
                                                jnp.concatenate([x, fake]), noise_key)
      real, fake_ = _pair(logits, jnp.concatenate([labels, fake_labels]))
      # CE([real, fake], 0) on real images, CE(., 1) on generated ones.
      target_real = jnp.concatenate([jnp.ones(b), jnp.zeros(b)])
      margin = jnp.where(target_real > 0, fake_ - real, real - fake_)
      return 2 * jax.nn.softplus(margin).mean(), new_stats

    (d_value, d_stats), d_grads = jax.value_and_grad(d_loss, has_aux=True)(
        params['discriminator'])
    updates, opt['discriminator'] = tx.update(d_grads, opt['discriminator'],
                                              params['discriminator'])
    params['discriminator'] = optax.apply_updates(params['discriminator'], updates)
    stats['discriminator'] = d_stats

    # The generator, conditioned on the real batch's labels: pass as real, and match
    # the batch mean of the discriminator's features on real images.
    def g_loss(g_params, key):
      z_key, noise_key = jax.random.split(key)
      fake = self._fake(g_params, stats['generator'], z_key, labels)
      logits, features, _ = self._discriminate(params['discriminator'], stats['discriminator'],
                                               jnp.concatenate([x, fake]), noise_key)
      real, fake_ = _pair(logits[b:], labels)
      adversarial = jax.nn.softplus(fake_ - real).mean()
      matching = jnp.abs(features[:b].mean(0) - features[b:].mean(0)).mean()
      return adversarial + self.spec.feature_matching * matching

    g_values, g_norms = [], []
    for g_key in jax.random.split(key, self.spec.g_steps):
      g_value, g_grads = jax.value_and_grad(g_loss)(params['generator'], g_key)
      updates, opt['generator'] = tx.update(g_grads, opt['generator'], params['generator'])
      params['generator'] = optax.apply_updates(params['generator'], updates)
      g_values.append(g_value)
      g_norms.append(steps_lib.global_norm(g_grads))

    metrics = {'gan/d_loss': d_value, 'gan/g_loss': g_values[-1],
               'gan/d_grad_norm': steps_lib.global_norm(d_grads), 'gan/g_grad_norm': g_norms[-1],
               # The least varied class of the generated batch (`spread`): collapse.
               'gan/spread': jnp.min(jnp.where(present, spreads, jnp.inf))}
    return state.replace(step=state.step + 1, params=params, batch_stats=stats,
                         opt_state=opt), metrics

  def samples(self, variables: dict, key, per_class: int):
    """`per_class` images in [0, 1] of each class (class-major) from one member's generator."""
    labels = jnp.repeat(jnp.arange(self.num_classes), per_class)
    return generate(self.generator, variables, key, labels, self.num_classes,
                    self.spec.z_dim), labels


def picture(images, rows: int):
  """Images in [0, 1] (N, H, W, C), row-major in `rows` rows, as one uint8 picture."""
  images = np.clip(np.asarray(images) * 255.0 + 0.5, 0, 255).astype(np.uint8)
  n, h, w, c = images.shape
  cols = -(-n // rows)
  canvas = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, c), 255, np.uint8)
  for i, image in enumerate(images):
    r, q = divmod(i, cols)
    canvas[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = image
  return canvas


def step_fn(objective: Objective, layout, draw: Callable) -> Callable:
  """(state, images_u8, labels) -> (state, metrics) over every member of `layout`."""
  def step(state, images_u8, labels):
    x, y = jax.vmap(draw, in_axes=(0, 0, 0))(state, images_u8, labels)
    if layout.data_devices > 1:
      x = jax.lax.with_sharding_constraint(x, layout.batch_sharding)
      y = jax.lax.with_sharding_constraint(y, layout.batch_sharding)
    return layout.map(objective.update, in_a_row=1)(state, x, y)
  return step
