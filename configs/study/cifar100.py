"""Barz & Denzler's CIFAR-100 setting (WACV 2020, "Deep learning on small data sets
using the cosine loss"), for a GPU: from-scratch losses at 10 to 250 images per class.

    python -m smallfx.study --config=configs/study/cifar100.py

Needs CIFAR-100 prepared for TensorFlow Datasets (`tfds build cifar100` on a machine
with internet, then --config.base.data_dir=DIR). ResNet-110 as in the paper; it is
too slow for a CPU. Not yet run: no result to quote.
"""

from smallfx import config as base


def get_config():
  c = base.study()
  c.base.dataset = 'tfds:cifar100'
  c.base.model = 'resnet110'
  c.base.loss = 'cosine'
  c.base.val_per_class = 10
  c.base.max_steps = 30000
  c.base.eval_batch_size = 1000
  c.sizes = '10,25,50,100,250'
  c.methods = ('random_forest,xent,xent+aug,cosine,cosine+aug,cosine_xent,cosine_xent+aug,'
               'ensemble')
  return c
