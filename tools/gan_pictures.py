"""Generated images beside real ones, per class, for a run of generative augmentation.

    python tools/gan_pictures.py --out=DIR RUN [RUN ...]

RUN: a `smallfx.main` workdir trained with `--config.generative=dada|cgan_augment`.
Writes `DIR/generated_NAME.png` (NAME: the workdir's folder name): a row per class,
`--real` of that seed's labelled training images on the left, `--generated` images of
that class from its generator on the right, and the spread of each (the mean pixel
standard deviation within the class; generated images far below the real ones have
collapsed towards a few modes). TensorBoard shows the same generator during training
(`WORKDIR/gan`, images tab).
"""

import os
import sys

# Run from a checkout without installing: the package is one folder up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from smallfx import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from smallfx import gan  # pylint: disable=g-import-not-at-top,wrong-import-position
from smallfx import generative  # pylint: disable=g-import-not-at-top,wrong-import-position
from smallfx.errors import UserError  # pylint: disable=g-import-not-at-top,wrong-import-position

_OUT = flags.DEFINE_string('out', 'gan_pictures', 'the folder to write the PNGs to')
_REAL = flags.DEFINE_integer('real', 6, 'real images per class')
_GENERATED = flags.DEFINE_integer('generated', 10, 'generated images per class')
_SEED = flags.DEFINE_integer('seed', 0, "whose generator (and labelled images): the run's seed s")


def _show(ax, image):
  ax.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap='gray', vmin=0, vmax=1)
  ax.set_xticks([])
  ax.set_yticks([])
  for side in ax.spines.values():
    side.set_visible(False)


def draw(trained: gan.Trained, path: str, seed: int, n_real: int, n_fake: int) -> dict:
  """Writes the picture; returns the spreads {'real': (K,), 'generated': (K,)}."""
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  if not 0 <= seed < len(trained.splits):
    raise UserError(f'--seed={seed}: the run trained seeds 0 to {len(trained.splits) - 1}')
  k = trained.objective.num_classes
  split = trained.splits[seed]
  real = split.images.astype(np.float32) / 255.0
  fake, labels = trained.samples(seed, max(n_fake, 16))
  fake, labels = np.asarray(fake), np.asarray(labels)
  spreads = {'real': np.asarray(generative.spread(real, split.labels, k)),
             'generated': np.asarray(generative.spread(fake, labels, k))}
  cols = n_real + n_fake + 1
  fig, axes = plt.subplots(k, cols, figsize=(0.8 * cols, 0.85 * k), squeeze=False)
  names = trained.dataset.class_names or [str(c) for c in range(k)]
  for c in range(k):
    mine = real[split.labels == c][:n_real]
    for i in range(n_real):
      _show(axes[c, i], mine[i]) if i < len(mine) else axes[c, i].axis('off')
    axes[c, n_real].axis('off')
    for i, image in enumerate(fake[labels == c][:n_fake]):
      _show(axes[c, n_real + 1 + i], image)
    axes[c, 0].set_ylabel(f"{names[c]}\n{spreads['real'][c]:.2f} | "
                          f"{spreads['generated'][c]:.2f}", fontsize=7, rotation=0,
                          ha='right', va='center')
  spec = trained.exp.generative
  fig.suptitle(f'{spec.method}, seed {seed}, {spec.steps} GAN steps: real (left) and generated '
               '(right); spread real | generated', fontsize=9)
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  fig.savefig(path, dpi=110, bbox_inches='tight')
  plt.close(fig)
  return spreads


def main(argv):
  runs = argv[1:]
  if not runs:
    raise UserError('name one or more workdirs of runs with --config.generative')
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  for workdir in runs:
    name = os.path.basename(os.path.normpath(workdir))
    path = os.path.join(_OUT.value, f'generated_{name}.png')
    spreads = draw(gan.restore(workdir), path, _SEED.value, _REAL.value, _GENERATED.value)
    print(f"{path}: spread real {spreads['real'].mean():.3f}, generated "
          f"{spreads['generated'].mean():.3f} (mean over classes)")


if __name__ == '__main__':
  cli.run(main)
