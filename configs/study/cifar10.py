"""DADA's CIFAR-10 setting (Zhang et al. 2019), for a GPU: generative augmentation
against classic augmentation at 50 to 1,000 images per class.

    python -m smallfx.study --config=configs/study/cifar10.py

Needs CIFAR-10 prepared for TensorFlow Datasets (`tfds build cifar10` on a machine with
internet, then --config.base.data_dir=DIR). As DADA: the generator at full width (512,
256, 128 channels from 4x4), batches of 100, Adam(3e-4, b1=0.5), one discriminator and
two generator steps per iteration; 2,000 GAN iterations (DADA's 200 epochs are 1,000
iterations at 50 per class and 20,000 at 1,000). The discriminator/classifier is
ResNet-20, not DADA's weight-normalised network. DADA's paper reads 0.455 (DADA with
augmentation) against 0.395 (augmentation alone) at 50 per class. Not yet run here: no
result to quote.
"""

from smallfx import config as base


def get_config():
  c = base.study()
  c.base.dataset = 'tfds:cifar10'
  c.base.model = 'resnet20'
  c.base.loss = 'xent'
  c.base.val_per_class = 10
  c.base.batch_size = 100
  c.base.max_steps = 20000
  c.base.eval_batch_size = 1000
  c.base.gan.steps = 2000
  c.base.gan.batch_size = 100
  c.sizes = '50,100,200,500,1000'
  c.methods = 'random_forest,xent,xent+aug,dada,dada+aug,cgan_augment+aug'
  return c
