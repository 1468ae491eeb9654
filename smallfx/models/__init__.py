"""Models by name.

Every model is a backbone that maps images (B, H, W, C) to pooled features (B, F),
wrapped by `Net`, which adds the output layer the loss needs. Backbones are chosen
by name from `BACKBONES`; `build` is the one place that turns a config into a module.
"""

import functools
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from smallfx.errors import unknown
from smallfx.models import cifar_resnet
from smallfx.models import simple

# name -> factory(width: float, dtype) -> backbone module. Further architectures
# register themselves here from their own modules (see the imports at the bottom).
BACKBONES: dict[str, Callable[..., nn.Module]] = {
    'mlp': simple.MLP,
    'cnn': simple.SmallCNN,
    'resnet20': functools.partial(cifar_resnet.CifarResNet, depth=20),
    'resnet56': functools.partial(cifar_resnet.CifarResNet, depth=56),
    'resnet110': functools.partial(cifar_resnet.CifarResNet, depth=110),
    'wrn16_8': functools.partial(cifar_resnet.WideResNet, depth=16, widen=8),
}


def l2_normalize(x, eps=1e-12):
  return x * jnp.reciprocal(jnp.sqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), eps)))


class Net(nn.Module):
  """A backbone plus the layer(s) a loss reads.

  `output` is a linear map of the features to `num_outputs` dims: logits for
  cross-entropy, or the embedding that the cosine loss compares with class targets.
  With `num_classes > 0` a second layer reads the L2-normalised embedding and
  gives `logits` (the small classifier of the cosine+cross-entropy loss).
  """
  backbone: nn.Module
  num_outputs: int
  num_classes: int = 0
  dtype: Any = jnp.float32
  # Fine-tuning a pretrained backbone on a few images: its BatchNorm statistics
  # from millions of images are better than what a batch of 32 would replace them with.
  freeze_backbone_bn: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False) -> dict[str, jnp.ndarray]:
    features = self.backbone(x, train=train and not self.freeze_backbone_bn)
    out = nn.Dense(self.num_outputs, dtype=self.dtype, name='head')(features)
    # The features too: a GAN's feature matching reads them (unused, XLA drops them).
    outputs = {'output': out.astype(jnp.float32), 'features': features}
    if self.num_classes:
      logits = nn.Dense(self.num_classes, dtype=self.dtype, name='classifier')(
          l2_normalize(out))
      outputs['logits'] = logits.astype(jnp.float32)
    return outputs


# Models that take options beyond width and dtype, and which (`--config.depth`, ...);
# an option at its `UNSET` value leaves the model's own default.
OPTIONS = {'mlp': ('depth', 'norm', 'dropout')}
UNSET = {'depth': 0, 'norm': 'none', 'dropout': 0.0}
NORMS = simple.NORMS


def build(name: str, num_outputs: int, num_classes: int = 0, width: float = 1.0,
          dtype=jnp.float32, freeze_backbone_bn: bool = False, **options) -> Net:
  """The model `name` with its output layer(s); `options` only for models in `OPTIONS`."""
  if name not in BACKBONES:
    raise unknown('model', name, BACKBONES)
  backbone = BACKBONES[name](width=width, dtype=dtype, **options)
  return Net(backbone=backbone, num_outputs=num_outputs, num_classes=num_classes,
             dtype=dtype, freeze_backbone_bn=freeze_backbone_bn)


def features(module: Net, variables, images):
  """The backbone's pooled features (for feature baselines), in inference mode."""
  return module.apply(variables, images, method=lambda m, x: m.backbone(x, train=False))

# Architectures with PyTorch-pretrained weights (see smallfx.convert).
from smallfx.models import efficientnet_lite, resnet_imagenet  # noqa: E402
BACKBONES.update(efficientnet_lite.factories())
BACKBONES.update(resnet_imagenet.factories())
