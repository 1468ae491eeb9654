"""The small-data playbook on Fashion-MNIST: 10 to 250 training images per class.

    python -m smallfx.study --config=configs/study/fashion_mnist.py

Needs the IDX files (`apt-get install dataset-fashion-mnist`). Every method of the
playbook is listed. On 2 CPU cores, the run recorded in experiments/study/fashion_mnist/
(2026-12-02, 2-core AMD EPYC) took 81 min, half of it beside a test suite, for the
baselines and three from-scratch methods:

    python -m smallfx.study --config=configs/study/fashion_mnist.py \
        --config.methods=random_forest,gradient_boosting,logistic_features,cosine+aug,xent+aug,cosine,ensemble

Pretraining without labels (dae, stacked_ae, simclr) was added on 2026-12-06 at 10 and 50
per class (experiments/pretrain/README.md):

    python -m smallfx.study --config=configs/study/fashion_mnist.py \
        --config.methods=random_forest,cosine+aug,dae,stacked_ae,simclr --config.sizes=10,50

`xent` (2026-12-07, 30 min), `finetune` at 10 and 50 per class (64 min), `linear_probe`
at every size (7-11 min a cell since its step skips the frozen backbone's backward pass),
`cosine_xent` at every size and `cosine_xent+aug` (88 min), and the
pretraining methods at 250 per class (39 min):

    python -m smallfx.study --config=configs/study/fashion_mnist.py \
        --config.methods=finetune --config.sizes=10,50

The ResNets (2026-12-07): resnet20 at every size, resnet56 at 10 (3.4 h); finetune at
25, 100 and 250 per class (2026-12-08, 96 min); resnet56 at 25 (2026-12-08, 124 min, the
first 60 beside a test suite):

    python -m smallfx.study --config=configs/study/fashion_mnist.py \
        --config.methods=resnet20

Per cell: 2-7 min for a SmallCNN method (9 settings, then 3 seeds), longer beside other
work; 12-25 min with pretraining; 1-2.5 min for gradient boosting, 30-40 s for
logistic_features; about 30 min for finetune (6 runs of 300 EfficientNet-Lite0 steps at
96x96); 23-27 min for resnet20 (3 learning rates, then 3 seeds), 50 min for resnet56 at
10 per class and about 2 h from 25 on. Not yet run here: resnet56 beyond 25 per class
(resnet110, a method too, is left out of the list: about twice resnet56's cost).
Result: SmallCNN with augmentation beats every baseline at every size (0.744 against the
random forest's 0.707 at 10 per class, 0.870 against 0.829 at 250); cross-entropy and the
cosine loss are within seed noise with augmentation up to 100 per class; fine-tuning
ImageNet weights gives the best single model at every size (0.767 at 10 per class, 0.871
at 250), 0.1 to 2.3 points above SmallCNN's cosine+aug, within seed noise of the best
SmallCNN method at each size;
a linear probe on them levels off at 0.81; pretraining without labels changes nothing;
depth costs accuracy at 10 per class (ResNet-20 0.715, ResNet-56 0.730 against
SmallCNN's 0.744); ResNet-20 is also below at 25 and 100, level at 50 and 0.6 points up
at 250 (0.864); ResNet-56 is level with SmallCNN at 25 (0.802).
The report has the rest.
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
  # Pretraining without labels (dae, stacked_ae, simclr) on the other ~59,000 training
  # images: 500 steps of 128 (about one pass), one backbone per seed, what 2 CPU cores
  # afford beside the rest; more passes may change the answer (experiments/pretrain/).
  c.base.pretraining.steps = 500
  c.notes = ('Durations: 300 epochs, at most 2,000 steps (experiments/study/durations.md: '
             'at 250 per class 2,000 steps gain 2 points over 1,000; more may gain more). '
             "Augmentation: the library's default for 28x28 images, measured in "
             'experiments/augment/.')
  c.sizes = '10,25,50,100,250'
  c.methods = ('random_forest,gradient_boosting,logistic_features,xent,xent+aug,cosine,'
               'cosine+aug,cosine_xent,cosine_xent+aug,resnet20,resnet56,finetune,'
               'linear_probe,dae,stacked_ae,simclr,ensemble')
  return c
