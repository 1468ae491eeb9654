"""Barz & Denzler's CUB-200-2011 setting (WACV 2020), for a GPU: 200 bird species,
5 to 25 training images per class (the full split has about 30), from scratch.

    python -m smallfx.study --config=configs/study/caltech_birds2011.py

Needs the dataset prepared for TensorFlow Datasets (`tfds build caltech_birds2011`,
then --config.base.data_dir=DIR). ResNet-50 at 224x224 (the paper used 448x448);
`+aug` methods use the library's default pipeline. Not yet run: no result to quote.
"""

from smallfx import config as base


def get_config():
  c = base.study()
  c.base.dataset = 'tfds:caltech_birds2011'
  c.base.image_size = 224
  c.base.model = 'resnet50'
  c.base.loss = 'cosine'
  c.base.val_per_class = 3
  c.base.batch_size = 32
  c.base.max_steps = 20000
  c.base.eval_batch_size = 200
  c.sizes = '5,10,15,20,25'
  c.methods = 'random_forest,xent,xent+aug,cosine,cosine+aug,cosine_xent+aug,ensemble'
  return c
