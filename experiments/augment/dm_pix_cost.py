"""The augmentation's cost before and after moving ops to dm-pix, side by side.

    git show fad8070:smallfx/augment.py > /tmp/augment_old.py   # before dm-pix
    python experiments/augment/dm_pix_cost.py [--rounds 15] [--spec SPEC] [--no-step]
    python experiments/augment/dm_pix_cost.py --ops [--rounds 21]  # per-op table

Default mode times, in one process, for the hand-written module (/tmp/augment_old.py,
"old") and smallfx.augment ("new"):

  aug   build(SPEC) alone, jitted, on a fixed batch of 32 images (28x28x1 and
        32x32x3, float in [0, 1], one-hot labels), a fresh key per call;
  step  one SmallCNN training step with SPEC on 28x28x1 and 32x32x3: draw a batch
        of 32 from a uint8 training set of 320, augment, normalise, forward,
        backward, SGD update (smallfx.steps.draw_batch + update, jitted, donated
        state), i.e. the step train.py builds for one member.

Each round runs `--calls` calls of every variant, in an order rotated from round
to round. Per-call medians over rounds, and the new/old
ratio of the medians and the median of the per-round ratios (robust to a round
that was slower for both on a shared machine).

`--ops` times each op that dm-pix also has, the hand-written one against the
dm-pix candidate (smallfx/augment.py's comments quote this table).
"""

import argparse
import inspect
import math
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # this checkout's smallfx, installed or not
sys.path.insert(0, '/tmp')
try:
  import augment_old  # pylint: disable=g-import-not-at-top,wrong-import-position
except ImportError:
  sys.exit('dm_pix_cost.py: no /tmp/augment_old.py; make it with\n'
           '  git show fad8070:smallfx/augment.py > /tmp/augment_old.py')
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import dm_pix as pix  # pylint: disable=g-import-not-at-top,wrong-import-position

from smallfx import augment as augment_new  # pylint: disable=g-import-not-at-top,wrong-import-position

B = 32
SHAPES = ((28, 28, 1), (32, 32, 3))


def _time_rounds(variants, rounds, calls, cpu=None):
  """variants: {name: call(n)}; returns {name: [wall seconds per call, per round]}.

  With a dict `cpu`, also fills it with this process's CPU seconds per call (all
  threads): the work done, steadier than wall time when others load the machine.
  """
  names = list(variants)
  times = {n: [] for n in names}
  for n in names:
    if cpu is not None:
      cpu[n] = []
  for r in range(rounds):
    # Rotated from round to round: no variant always runs first, or always right
    # after a step (whose left-over thread work lands on the next one's CPU time).
    for n in names[r % len(names):] + names[:r % len(names)]:
      c, t = time.process_time(), time.perf_counter()
      variants[n](calls)
      times[n].append((time.perf_counter() - t) / calls)
      if cpu is not None:
        cpu[n].append((time.process_time() - c) / calls)
  return times


def _aug_variant(module, spec, shape, seed=0):
  apply = module.build(spec)
  x = jax.random.uniform(jax.random.key(seed), (B, *shape), jnp.float32)
  y = jax.nn.one_hot(jnp.arange(B) % 10, 10)
  # The batch is an argument, not a constant XLA could fold.
  fn = jax.jit(lambda i, x, y: apply(jax.random.fold_in(jax.random.key(1), i), x, y))
  jax.block_until_ready(fn(0, x, y))
  counter = [0]

  def call(n):
    for _ in range(n):
      counter[0] += 1
      out = fn(counter[0], x, y)
    jax.block_until_ready(out)
  return call


def _step_variant(module, spec, shape, seed=0):
  from smallfx import config as config_lib  # pylint: disable=g-import-not-at-top
  from smallfx import experiment  # pylint: disable=g-import-not-at-top
  from smallfx import steps  # pylint: disable=g-import-not-at-top
  c = config_lib.default()
  c.model, c.batch_size, c.augment, c.num_steps = 'cnn', B, 'none', 1000
  exp = experiment.resolve(c)
  n, classes = 320, 10
  # (experiment.build gained an image_shape argument while this was written.)
  extra = ((shape,) if 'image_shape' in inspect.signature(experiment.build).parameters
           else ())
  setup = experiment.build(exp, classes, n, *extra)
  hyper = {k: v[0] for k, v in experiment.member_hyperparams(exp).items()}
  rng = np.random.default_rng(seed)
  images = jnp.asarray(rng.integers(0, 256, (n, *shape), np.uint8))
  labels = jnp.asarray(np.arange(n) % classes, jnp.int32)
  mean = jnp.full((shape[-1],), 0.5, jnp.float32)
  std = jnp.full((shape[-1],), 0.25, jnp.float32)
  augment = module.build(spec)

  def step(state, images, labels):
    x, y = steps.draw_batch(state, images, labels, batch_size=B, num_classes=classes,
                            augment=augment, mean=mean, std=std)
    return steps.update(state, x, y, model=setup.model, loss=exp.loss, tx=setup.tx,
                        unit_schedule=setup.unit_schedule)

  state = steps.init_state(setup.model, setup.tx, shape, jax.random.key(seed), hyper)
  fn = jax.jit(step, donate_argnums=0)
  state, m = fn(state, images, labels)
  jax.block_until_ready(m)
  box = [state]

  def call(k):
    s = box[0]
    for _ in range(k):
      s, m = fn(s, images, labels)
    jax.block_until_ready(m)
    box[0] = s
  return call


def pipeline(args):
  variants = {}
  for kind in ('aug',) if args.no_step else ('aug', 'step'):
    for shape in SHAPES:
      tag = 'x'.join(map(str, shape))
      for name, module in (('old', augment_old), ('new', augment_new)):
        make = _aug_variant if kind == 'aug' else _step_variant
        variants[(kind, tag, name)] = make(module, args.spec, shape)
  for v in variants.values():
    v(2)  # warm-up
  cpu = {}
  times = _time_rounds(variants, args.rounds, args.calls, cpu)
  print(f'spec {args.spec!r}, batch {B}, {args.rounds} rotated rounds x {args.calls} '
        f'calls, per-call medians; jax {jax.__version__}, dm-pix {pix.__version__}')
  for label, record in (('wall', times), ('cpu time', cpu)):
    print(f'{label}: {"what":14s} {"old us":>9s} {"new us":>9s} {"new/old":>8s} '
          f'{"paired":>7s} {"old min-max":>17s} {"new min-max":>17s}')
    for kind, tag, who in variants:
      if who != 'old':
        continue
      old_t = np.asarray(record[(kind, tag, 'old')]) * 1e6
      new_t = np.asarray(record[(kind, tag, 'new')]) * 1e6
      print(f'{"":{len(label) + 2}s}{kind + " " + tag:14s} {np.median(old_t):9.1f} '
            f'{np.median(new_t):9.1f} {np.median(new_t) / np.median(old_t):8.3f} '
            f'{np.median(new_t / old_t):7.3f} {old_t.min():8.1f}-{old_t.max():8.1f} '
            f'{new_t.min():8.1f}-{new_t.max():8.1f}')


# --ops: the dm-pix candidates, with the old op's semantics where dm-pix can give them.


def _u(key):
  return jax.random.uniform(key, (), jnp.float32)


def _rotate_pix(key, im):
  # One-pixel zero border in 'nearest' mode: bilinear with zero outside, as here.
  a = -jnp.deg2rad(-30 + 60 * _u(key))
  p = jnp.pad(im, ((1, 1), (1, 1), (0, 0)))
  return jnp.clip(pix.rotate(p, a, mode='nearest')[1:-1, 1:-1], 0, 1)


def _rrc_pix(key, im):
  h, w, _ = im.shape
  u = jax.random.uniform(key, (4,))
  area = 0.08 + 0.92 * u[0]
  ratio = jnp.exp(math.log(0.75) + (math.log(1.333) - math.log(0.75)) * u[1])
  ch = jnp.clip(h * jnp.sqrt(area / ratio), 1, h)
  cw = jnp.clip(w * jnp.sqrt(area * ratio), 1, w)
  y0, x0 = u[2] * (h - ch), u[3] * (w - cw)
  m = jnp.diag(jnp.stack([ch / h, cw / w, jnp.float32(1)]))
  off = jnp.stack([y0 + 0.5 * ch / h - 0.5, x0 + 0.5 * cw / w - 0.5, jnp.float32(0)])
  return jnp.clip(pix.affine_transform(im, m, offset=off, mode='nearest'), 0, 1)


OPS = {  # name: (hand-written op, dm-pix candidate)
    'crop(pad=2)': (augment_old.crop(2), lambda k, im: pix.random_crop(
        k, jnp.pad(im, ((2, 2), (2, 2), (0, 0))), im.shape)),
    'flip': (augment_old.flip(), lambda k, im: pix.random_flip_left_right(k, im)),
    'vflip': (augment_old.vflip(), lambda k, im: pix.random_flip_up_down(k, im)),
    'solarize': (augment_old.solarize(1.0), lambda k, im: pix.solarize(im, _u(k))),
    'rotate(deg=30)': (augment_old.rotate(30.0), _rotate_pix),
    'rrc': (augment_old.rrc(), _rrc_pix),
    'contrast(0.9)': (augment_old.contrast(0.9), lambda k, im: jnp.clip(
        pix.adjust_contrast(im, 0.1 + 1.8 * _u(k)), 0, 1)),
    'grayscale(p=1)': (augment_old.grayscale(1.0),
                       lambda k, im: pix.rgb_to_grayscale(im, keep_dims=True)),
    'saturation(0.9)': (augment_old.saturation(0.9), lambda k, im: jnp.clip(
        pix.adjust_saturation(im, 0.1 + 1.8 * _u(k)), 0, 1)),
    'hue(0.1)': (augment_old.hue(0.1), lambda k, im: jnp.clip(
        pix.adjust_hue(im, -0.1 + 0.2 * _u(k)), 0, 1)),
}


def ops(args):
  print(f'per-op, vmapped over {B} images as build() runs it, {args.rounds} rotated '
        f'rounds x {args.calls} calls, median us per call; jax {jax.__version__}, '
        f'dm-pix {pix.__version__}')
  key = jax.random.key(0)
  for shape in SHAPES:
    x = jax.random.uniform(jax.random.key(1), (B, *shape))
    for name, fns in OPS.items():
      if shape[-1] == 1 and name.split('(')[0] in ('grayscale', 'saturation', 'hue'):
        continue
      variants = {}
      for who, fn in zip(('old', 'pix'), fns):
        f = jax.jit(lambda k, x, fn=fn: jax.vmap(fn)(jax.random.split(k, B), x))
        jax.block_until_ready(f(key, x))

        def call(n, f=f):
          for _ in range(n):
            out = f(key, x)
          jax.block_until_ready(out)
        variants[who] = call
      cpu = {}
      t = _time_rounds(variants, args.rounds, args.calls, cpu)
      o, p = np.median(t['old']) * 1e6, np.median(t['pix']) * 1e6
      co, cp = np.median(cpu['old']) * 1e6, np.median(cpu['pix']) * 1e6
      print(f'{"x".join(map(str, shape)):8s} {name:16s} wall: hand-written {o:8.1f}  '
            f'dm-pix {p:8.1f} ({p / o:6.2f}x)   cpu time: {co:8.1f} {cp:8.1f} '
            f'({cp / co:6.2f}x)', flush=True)


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--spec', default='crop(pad=2)|flip|trivial')
  p.add_argument('--rounds', type=int, default=15)
  p.add_argument('--calls', type=int, default=40)
  p.add_argument('--no-step', action='store_true', help='time the pipeline alone')
  p.add_argument('--ops', action='store_true', help='the per-op table instead')
  args = p.parse_args()
  (ops if args.ops else pipeline)(args)


if __name__ == '__main__':
  main()
