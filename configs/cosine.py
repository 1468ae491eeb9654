"""Cosine loss (Barz & Denzler, WACV 2020): 1 - cos(embedding, one-hot class target).

ResNet-20 on the embedded 8x8 digits with 10 training images per class.

    python -m smallfx.main --config=configs/cosine.py

Sweep a setting as one program, chosen on validation (see README, "Members"):

    python -m smallfx.main --config=configs/cosine.py --config.num_seeds=2 \
        --config.sweep.learning_rate=0.03,0.1,0.3 --config.sweep.weight_decay=5e-5,5e-4,5e-3

Result (seed 0, 2-core CPU, ~25 s): test accuracy 0.935 on the 535 held-out digits
(2026-12-02; 0.927 before the learning rate became a member's value, which rounds
differently), against 0.888 for the random forest on the same 100 training images. The
3 x 3 sweep above, 2 seeds: 0.933 +- 0.002, ensemble 0.936, lr 0.1 and weight decay
5e-4 chosen, though all nine settings lie within 1.5 of the 100 validation images.
Across losses at this size (earlier): cosine 0.925, xent 0.933, cosine_xent 0.931
(one seed each: the differences are within seed noise: float rounding alone moved single seeds by up to 0.02;
cosine over 4 seeds, --config.num_seeds=4: 0.934 +- 0.011, their ensemble 0.948).
"""

from smallfx import config as base


def get_config():
  c = base.default()  # augment 'auto': a one-pixel shift on 8x8 digits
  c.loss = 'cosine'
  return c
