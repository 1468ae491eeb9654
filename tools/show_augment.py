"""Draws training images before and after the configured augmentation pipeline.

    python tools/show_augment.py --config=configs/cosine.py --out grid.png
    python tools/show_augment.py --config=configs/cosine.py \
        --config.augment='crop(pad=2)|rotate(deg=20)|cutmix' --rows 4 --cols 6

Left: the original images with their class; right: the same images, in the same
places, after `config.augment` (one batch, as a training step would see it), with
the top classes of the possibly mixed label. Use it to check that a spec does
what you think before spending a run on it.
"""

import os
import sys

# Run from a checkout without installing: the package is one folder up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import matplotlib  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from smallfx import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from smallfx import data  # pylint: disable=g-import-not-at-top,wrong-import-position
from smallfx import experiment  # pylint: disable=g-import-not-at-top,wrong-import-position
from smallfx.errors import UserError  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file('config', None, 'experiment config file')
_OUT = flags.DEFINE_string('out', 'augment_grid.png', 'where to write the PNG')
_ROWS = flags.DEFINE_integer('rows', 8, 'rows of images in each grid')
_COLS = flags.DEFINE_integer('cols', 8, 'columns of images in each grid')
_SEED = flags.DEFINE_integer('seed', 0, 'which images, and which augmentations')


def _label_text(names, probs):
  """'cat' for a one-hot label, 'cat .70 / dog .30' for a mixed one."""
  top = np.argsort(-probs)[:2]
  if probs[top[0]] > 0.995:
    return names[top[0]]
  return ' / '.join(f'{names[k]} {probs[k]:.2f}' for k in top if probs[k] > 0.005)


def _draw(subfig, images, labels, names, rows, cols, title):
  subfig.suptitle(title, fontsize=12, fontweight='bold')
  axes = subfig.subplots(rows, cols, squeeze=False)
  for i, ax in enumerate(axes.flat):
    image = np.clip(images[i], 0, 1)
    if image.shape[-1] == 3:
      ax.imshow(image, interpolation='nearest')
    else:  # one channel (or an odd count: show the first)
      ax.imshow(image[..., 0], cmap='gray', vmin=0, vmax=1, interpolation='nearest')
    ax.set_title(_label_text(names, labels[i]), fontsize=7, pad=2)
    ax.set_xticks([])
    ax.set_yticks([])


def make_grid(config, out, rows=8, cols=8, seed=0):
  """Writes the before/after PNG to `out`; returns the augmented batch."""
  if rows < 1 or cols < 1:
    raise UserError(f'--rows and --cols must be at least 1, got {rows} x {cols}')
  # The config checked as a run checks it (a bad spec fails here, before loading data),
  # and the pipeline the run's train step applies ('auto' resolved by image size).
  exp = experiment.resolve(config)
  dataset = data.load(exp.data)
  setup = experiment.build(exp, dataset.num_classes, len(dataset.train.labels),
                           dataset.image_shape)
  apply = setup.augment
  images_u8 = np.asarray(dataset.train.images)
  n = rows * cols
  if not len(images_u8):
    raise UserError('the training split is empty: nothing to draw')
  # A random draw like a training batch; tiled when the split is smaller than the
  # grid, which also shows one image augmented several ways.
  order = np.random.default_rng(seed).permutation(len(images_u8))
  idx = np.resize(order, n)
  x = images_u8[idx].astype(np.float32) / 255.0
  y = np.eye(dataset.num_classes, dtype=np.float32)[np.asarray(dataset.train.labels)[idx]]
  aug_x, aug_y = jax.jit(apply)(jax.random.key(seed), x, y)
  aug_x, aug_y = np.asarray(aug_x), np.asarray(aug_y)

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  names = [str(c) for c in dataset.class_names]
  fig = plt.figure(figsize=(2 * cols * 1.1 + 0.6, rows * 1.2 + 0.9), layout='constrained')
  before, after = fig.subfigures(1, 2, wspace=0.04)
  spec = setup.augment_spec.strip() or 'none'
  _draw(before, x, y, names, rows, cols, 'before')
  _draw(after, aug_x, aug_y, names, rows, cols, f'after: {spec}')
  fig.suptitle(f'{config.dataset}: {n} training images, augment={spec!r}', fontsize=10)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return aug_x, aug_y


def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  if _CONFIG.value is None:
    raise UserError('--config is required, e.g. --config=configs/cosine.py')
  make_grid(_CONFIG.value, _OUT.value, _ROWS.value, _COLS.value, _SEED.value)
  print(_OUT.value)


if __name__ == '__main__':
  cli.run(main)
