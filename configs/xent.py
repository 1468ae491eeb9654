"""Softmax cross-entropy: the baseline loss.

configs/cosine.py with `loss='xent'`: ResNet-20 on the embedded 8x8 digits, 10 training
images per class. Its docstring compares the three losses at this size.

    python -m smallfx.main --config=configs/xent.py

Result (seed 0, 2-core CPU, ~25 s): test accuracy 0.933 on the 535 held-out digits,
against 0.888 for the random forest on the same 100 training images.
"""

from smallfx import config as base


def get_config():
  c = base.default()
  c.loss = 'xent'
  return c
