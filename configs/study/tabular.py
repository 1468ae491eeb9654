"""Small tables: deep and shallow MLPs, their ensemble and the cosine loss against trees.

    python -m smallfx.study --config=configs/study/tabular.py

scikit-learn's breast-cancer table (569 rows, 30 features, 2 classes; 30% held out for
testing), at 10-100 rows per class: MLPs of 2, 4 and 8 layers of 256 units with
cross-entropy, the 4-layer one with the cosine loss, the ensemble of the best one's seeds,
against the random forest, gradient-boosted trees and logistic regression on the same
rows. Each trained cell tunes learning rate x weight decay (3 x 3) on 20 validation rows
and trains the chosen setting on 3 fresh seeds. Any table works the same way:
`--config.base.dataset=sklearn:wine --config.sizes=5,10,20` (its smallest class has 24
training rows), or `--config.base.dataset=csv:PATH --config.base.label_column=NAME`.

Result: experiments/tabular/README.md (command, machine, date and figures).
"""

from smallfx import config as base


def get_config():
  c = base.study()
  c.base.dataset = 'sklearn:breast_cancer'
  c.base.model = 'mlp'
  c.base.depth = 4
  c.base.loss = 'xent'
  c.base.augment = 'none'
  c.base.num_epochs = 300.0
  c.base.max_steps = 1000
  c.sizes = '10,25,50,100'
  c.methods = ('random_forest,gradient_boosting,logistic_regression,mlp2,mlp4,mlp8,cosine,'
               'ensemble')
  return c
