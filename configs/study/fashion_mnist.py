"""The small-data playbook on Fashion-MNIST: 10 to 250 training images per class.

    python -m smallfx.study --config=configs/study/fashion_mnist.py

Needs the IDX files (`apt-get install dataset-fashion-mnist`). Every method of the
playbook is listed; on 2 CPU cores the from-scratch methods and the scikit-learn
baselines take about an hour, and the slow ones (finetune, linear_probe,
logistic_features at 96x96, resnet56) many more: run those on a GPU, or leave them out
with --config.methods=... The record, with the time each part took, is in
experiments/study/fashion_mnist/.
"""

from smallfx import config as base


def get_config():
  c = base.study()
  c.base.dataset = 'fashion_mnist'
  c.base.model = 'cnn'
  c.base.loss = 'cosine'
  # 300 epochs, at most 2,000 steps. SmallCNN, cosine loss, crop|flip|trivial, 3 seeds
  # (experiments/study/durations.md): at 50 per class 1,000 / 2,000 / 4,000 steps give
  # 0.818 / 0.825 / 0.830, at 250 per class 1,000 / 2,000 give 0.842 / 0.863, so the
  # cap costs the largest size a point or two; raise it where time allows.
  c.base.max_steps = 2000
  c.notes = ('Durations: 300 epochs, at most 2,000 steps (experiments/study/durations.md: '
             'at 250 per class 2,000 steps gain 2 points over 1,000; more may gain more). '
             "Augmentation: the library's default for 28x28 images, measured in "
             'experiments/augment/.')
  c.sizes = '10,25,50,100,250'
  c.methods = ('random_forest,gradient_boosting,logistic_features,xent,xent+aug,cosine,'
               'cosine+aug,cosine_xent,cosine_xent+aug,resnet20,resnet56,finetune,'
               'linear_probe,ensemble')
  return c
