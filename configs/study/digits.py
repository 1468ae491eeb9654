"""The small-data playbook on the embedded 8x8 digits: a learning curve per method.

    python -m smallfx.study --config=configs/study/digits.py

Result: see experiments/study/digits/.
"""

from smallfx import config as base


def get_config():
  c = base.study()
  c.base.dataset = 'digits'
  c.base.model = 'cnn'
  c.base.loss = 'cosine'
  c.base.max_steps = 500
  c.sizes = '10,20,40,80'
  c.methods = 'random_forest,gradient_boosting,xent,xent+aug,cosine,cosine+aug,ensemble'
  return c
