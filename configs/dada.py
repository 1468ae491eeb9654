"""DADA on Fashion-MNIST, 10 images per class: a class-conditional GAN per seed, then its
discriminator trained on as the classifier with real (augmented) and generated images.

    python -m smallfx.main --config=configs/dada.py
    python tools/gan_pictures.py --out=pics runs/dada-fashion_mnist-*

Needs the Fashion-MNIST IDX files (`apt-get install dataset-fashion-mnist`). The setting is
the one the Fashion-MNIST generative study chose on validation data (learning rate 0.1,
weight decay 5e-3), and this run is that study's final stage (experiments/generative/):
3 seeds, each on its own sub-sample, 0.731 ± 0.021 test accuracy (2-core AMD EPYC,
2026-12-07, 15 min with a second study beside it), against 0.736 ± 0.010 for the same
network with augmentation and no GAN (`xent+aug`): no difference. Its generators had
collapsed to about one image per class (the pictures tool shows it); their spread stayed
above the collapse check's threshold (0.013 against 0.01), which another seed crossed.
"""

from smallfx import config as base


def get_config():
  c = base.default()
  c.dataset = 'fashion_mnist'
  c.samples_per_class = 10
  c.model = 'cnn'
  c.loss = 'dada'
  c.generative = 'dada'
  c.augment = 'auto'
  c.max_steps = 2000
  c.learning_rate = 0.1
  c.weight_decay = 5e-3
  c.num_seeds = 3
  c.resample_per_seed = True
  # What 2 CPU cores afford: 400 iterations of 32, the generator at a quarter of DADA's
  # channels (64, 32 at 28x28).
  c.gan.steps = 400
  c.gan.batch_size = 32
  c.gan.width = 0.25
  return c
