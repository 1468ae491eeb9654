"""Generative augmentation on Fashion-MNIST: DADA and a conditional GAN against classic augmentation.

    python -m smallfx.study --config=configs/study/fashion_mnist_generative.py \
        --workdir=experiments/study/fashion_mnist_generative

The base experiment of configs/study/fashion_mnist.py (SmallCNN, at most 2,000 steps,
the same grid and seeds) with a GAN per seed before training: 400 iterations of batch
32 (one discriminator step, two generator steps each), the generator at a quarter of
DADA's channels (64, 32), what 2 CPU cores afford per cell. Needs the Fashion-MNIST IDX
files (`apt-get install dataset-fashion-mnist`). Each generative method has its
comparison without the GAN: `dada` against `xent`, `dada+aug` against `xent+aug`,
`cgan_augment+aug` against `cosine+aug` (cells of the same config and seeds as
configs/study/fashion_mnist.py).

Expected (3 seeds, 2 CPU cores, 2026-12-07): with augmentation, every GAN method within
the seeds' spread of its comparison at 50 and 250 per class (e.g. dada+aug 0.869 against
xent+aug 0.870 at 250); at 10 per class the collapse check stops the GANs' cells
(`--config.base.gan.min_spread=0` trains on with them). About 3 hours on 2 CPU cores.
Result and times: experiments/generative/README.md.
"""

from smallfx import config as config_lib

fashion_mnist = config_lib.sibling(__file__, 'fashion_mnist')


def get_config():
  c = fashion_mnist.get_config()
  c.base.gan.steps = 400
  c.base.gan.batch_size = 32
  c.base.gan.width = 0.25
  c.sizes = '10,50,250'
  c.methods = 'random_forest,xent,xent+aug,cosine+aug,dada,dada+aug,cgan_augment+aug'
  c.notes = fashion_mnist.get_config().notes + (
      ' GANs: 400 iterations of batch 32 per seed, generator at width 0.25 (64, 32 channels).')
  return c
