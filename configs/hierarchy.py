"""Prior knowledge: Fashion-MNIST's classes in a hierarchy, as the cosine loss's targets.

SmallCNN, 10 training images per class, 3 seeds, the cosine loss towards Barz &
Denzler's embedding of hierarchies/fashion_mnist.txt (tops, bottoms, dresses, footwear,
bags): two classes of one group sit at cosine 0.5, of two groups at 0.

    python -m smallfx.main --config=configs/hierarchy.py

The same run with one-hot targets reports the same mistake metrics, for comparison:

    python -m smallfx.main --config=configs/hierarchy.py --config.class_targets=onehot

Needs the Fashion-MNIST IDX files (`apt-get install dataset-fashion-mnist`).
results.json then holds `test_hierarchy`: hierarchical accuracy (mean similarity of
predicted and true class), mistake severity (mean height of their lowest common
ancestor over the mistakes: 1 within a group, 2 across), level-1 accuracy (the group
right) and hierarchical precision at 5.

Result (2-core AMD EPYC, 2026-12-06, about 3 min each; the same 3 seeds and sub-samples,
no tuning: the learning rate and weight decay of smallfx.config):

    targets    top-1            mistake severity  level-1 acc.  hier. precision@5
    hierarchy  0.7573 +- 0.0017  1.252             0.939         0.976
    onehot     0.7523 +- 0.0019  1.263             0.935         0.777

The hierarchy's targets rank a wrong class's siblings next (precision at 5: 0.98 against
0.78); top-1 and severity move little. The tuned comparison at 10, 50 and 250 per class
is experiments/hierarchy/README.md.
"""

from smallfx import config as base


def get_config():
  c = base.default()
  c.dataset = 'fashion_mnist'
  c.model = 'cnn'
  c.loss = 'cosine'
  c.hierarchy = 'hierarchies/fashion_mnist.txt'
  c.class_targets = 'hierarchy'
  c.num_seeds = 3
  c.max_steps = 1000
  return c
