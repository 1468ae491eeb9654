"""Pictures of pretraining without labels: reconstructions, and the test set in 2-D.

    python tools/pretrain_pictures.py --out=DIR RUN [RUN ...]

RUN: a `smallfx.main` workdir trained with `--config.pretrain=dae|stacked_ae|simclr`.
For each autoencoder (dae, stacked_ae): `DIR/reconstructions_METHOD.png`, rows of test
images, their corrupted inputs and the reconstructions. For all runs together:
`DIR/embeddings.png`, the test set's backbone features (seed 0) mapped to 2-D by
scikit-learn's t-SNE and coloured by class, one panel per run plus one for the same
backbone at its random initialisation. Classes that form islands in a panel are
what a linear head can pick out from few labels.
"""

import os
import sys

# Run from a checkout without installing: the package is one folder up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import matplotlib  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from smallfx import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from smallfx import pretext  # pylint: disable=g-import-not-at-top,wrong-import-position
from smallfx import pretrain  # pylint: disable=g-import-not-at-top,wrong-import-position
from smallfx.errors import UserError  # pylint: disable=g-import-not-at-top,wrong-import-position

_OUT = flags.DEFINE_string('out', 'pretrain_pictures', 'the folder to write the PNGs to')
_IMAGES = flags.DEFINE_integer('images', 12, 'test images in each reconstruction row')
_POINTS = flags.DEFINE_integer('points', 2000, 'test images in each 2-D map')


def _seed0(variables):
  return jax.tree.map(lambda a: a[0], variables)


def _show(ax, image):
  ax.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap='gray', vmin=0, vmax=1)
  ax.set_xticks([])
  ax.set_yticks([])


def reconstructions(done: pretrain.Pretrained, path: str, n: int) -> None:
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  x = done.dataset.test.images[:n].astype(np.float32) / 255.0
  noisy, rebuilt = jax.jit(lambda v, x: pretext.reconstruct(done.objective, v, x,
                                                            jax.random.key(0)))(
                                                                _seed0(done.variables), x)
  rows = [('test image', x), ('corrupted input', np.asarray(noisy)),
          ('reconstruction', np.asarray(rebuilt))]
  fig, axes = plt.subplots(3, n, figsize=(1.1 * n, 3.8), squeeze=False)
  for r, (label, images) in enumerate(rows):
    for i in range(n):
      _show(axes[r, i], images[i])
    axes[r, 0].set_ylabel(label, fontsize=8)
  fig.suptitle(f'{done.exp.pretraining.method}: mask {done.exp.pretraining.mask}, '
               f'noise {done.exp.pretraining.noise}, seed 0', fontsize=10)
  fig.savefig(path, dpi=110, bbox_inches='tight')
  plt.close(fig)


def embeddings(runs: list[tuple[str, pretrain.Pretrained]], path: str, points: int) -> None:
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  from sklearn.manifold import TSNE  # pylint: disable=g-import-not-at-top
  first = runs[0][1]
  test = first.dataset.test
  idx = np.random.default_rng(0).permutation(len(test.labels))[:points]
  x, y = test.images[idx].astype(np.float32) / 255.0, test.labels[idx]
  panels = [('random init', first, first.initial)] + [
      (done.exp.pretraining.method + ('' if name == done.exp.pretraining.method else f' ({name})'),
       done, _seed0(done.variables))
      for name, done in runs]
  fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.3), squeeze=False)
  cmap = plt.get_cmap('tab10' if first.dataset.num_classes <= 10 else 'tab20')
  for ax, (name, done, variables) in zip(axes[0], panels):
    f = jax.jit(lambda v, x, done=done: pretext.features(done.objective, v, x))
    h = np.concatenate([np.asarray(f(variables, x[i:i + 500])) for i in range(0, len(x), 500)])
    xy = TSNE(init='pca', random_state=0, perplexity=30).fit_transform(h)
    ax.scatter(xy[:, 0], xy[:, 1], c=[cmap(c % cmap.N) for c in y], s=3)
    ax.set_title(name, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
  names = first.dataset.class_names
  handles = [matplotlib.lines.Line2D([], [], marker='o', ls='', color=cmap(c % cmap.N),
                                     label=names[c]) for c in range(len(names))]
  fig.legend(handles=handles, loc='lower center', ncol=min(10, len(names)), fontsize=8)
  fig.suptitle(f'{len(x)} test images, backbone features (seed 0) by t-SNE', fontsize=11)
  fig.savefig(path, dpi=110, bbox_inches='tight')
  plt.close(fig)


def main(argv):
  workdirs = argv[1:]
  if not workdirs:
    raise UserError('name one or more workdirs of runs with --config.pretrain')
  matplotlib.use('Agg')
  os.makedirs(_OUT.value, exist_ok=True)
  runs = [(os.path.basename(w.rstrip('/')), pretrain.restore(w)) for w in workdirs]
  shapes = {done.dataset.test.images.shape[1:] for _, done in runs}
  if len(shapes) > 1:
    raise UserError(f'the runs have different images ({sorted(shapes)}); draw them apart')
  written = []
  for name, done in runs:
    if done.exp.pretraining.method != 'simclr':
      path = os.path.join(_OUT.value, f'reconstructions_{name}.png')
      reconstructions(done, path, _IMAGES.value)
      written.append(path)
  path = os.path.join(_OUT.value, 'embeddings.png')
  embeddings(runs, path, _POINTS.value)
  print('\n'.join(written + [path]))


if __name__ == '__main__':
  cli.run(main)
