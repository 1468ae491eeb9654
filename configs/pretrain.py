"""Pretraining without labels, then fine-tuning: Fashion-MNIST with 10 labels per class.

    python -m smallfx.main --config=configs/pretrain.py:dae
    python -m smallfx.main --config=configs/pretrain.py:stacked_ae
    python -m smallfx.main --config=configs/pretrain.py:simclr

SmallCNN first learns from the other 59,800 training images with their labels dropped
(`unlabelled='rest'`; the labelled, validation and test images are never among them):
1,000 steps of 128 images with the named objective (smallfx/pretext.py), in
WORKDIR/pretrain/. Then the whole network is fine-tuned on the 100 labelled images with
the cosine loss and the default augmentation, the backbone at the head's learning rate.
`tools/pretrain_pictures.py WORKDIR` draws the reconstructions and the test set's
embeddings.

Expected (seed 0, 2-core AMD EPYC, beside a study, 2026-12-07): test accuracy dae 0.749,
stacked_ae 0.750, simclr 0.752, against 0.752 for the same run from scratch
(`--config.pretrain=`) and 0.718 for the random forest; 4-6.5 min a run. With 3 seeds and
tuning (experiments/pretrain/README.md) none of the three differs from scratch.
"""

from smallfx import config as base


def get_config(method='dae'):
  c = base.default()
  c.dataset = 'fashion_mnist'
  c.samples_per_class = 10
  c.model = 'cnn'
  c.loss = 'cosine'
  c.augment = 'auto'
  c.pretrain = method
  c.pretraining.steps = 1000
  c.finetune = 'full'
  c.backbone_lr_mult = 1.0
  c.freeze_bn = False
  return c
