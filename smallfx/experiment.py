"""A config, resolved once into the typed parts of a run.

`resolve` checks every name and every number of a config in one place, with one error
path (a `UserError` naming the field and what it accepts), and returns an
`Experiment`; `build` adds what needs the data (sizes, class count). Modules below
take these objects, not the `ConfigDict`.
"""

import dataclasses
import hashlib
import json
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from smallfx import augment as augment_lib
from smallfx import baseline as baseline_lib
from smallfx import checkpoint
from smallfx import config as config_lib
from smallfx import convert
from smallfx import data as data_lib
from smallfx import generative as generative_lib
from smallfx import hierarchy as hierarchy_lib
from smallfx import losses
from smallfx import members
from smallfx import models
from smallfx import optim
from smallfx import pretext
from smallfx.errors import UserError, unknown

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}

# Each numeric field's valid range: (test, what it accepts).
_AT_LEAST_0 = (lambda v: v >= 0, '>= 0')
_AT_LEAST_1 = (lambda v: v >= 1, '>= 1')
_POSITIVE = (lambda v: v > 0, '> 0')
RANGES = {
    'samples_per_class': _AT_LEAST_0, 'val_per_class': _AT_LEAST_0, 'data_seed': _AT_LEAST_0,
    'channels': (lambda v: v in (0, 1, 3), '0 (auto), 1 or 3'), 'max_image_pixels': _AT_LEAST_0,
    'width': _POSITIVE, 'embedding_dim': _AT_LEAST_0, 'backbone_lr_mult': _AT_LEAST_0,
    'batch_size': _AT_LEAST_1, 'num_steps': _AT_LEAST_0, 'num_epochs': _AT_LEAST_0,
    'max_steps': _AT_LEAST_0,
    'learning_rate': _POSITIVE, 'momentum': (lambda v: 0 <= v < 1, 'in [0, 1)'),
    'weight_decay': _AT_LEAST_0, 'warmup_steps': _AT_LEAST_0, 'sgdr_cycles': _AT_LEAST_1,
    'grad_clip_norm': _AT_LEAST_0, 'label_smoothing': (lambda v: 0 <= v < 1, 'in [0, 1)'),
    'cosine_xent_weight': _AT_LEAST_0, 'seed': _AT_LEAST_0, 'num_seeds': _AT_LEAST_1,
    'depth': _AT_LEAST_0, 'dropout': (lambda v: 0 <= v < 1, 'in [0, 1)'),
    'member_devices': _AT_LEAST_0, 'steps_per_dispatch': _AT_LEAST_0,
    'log_every_steps': _AT_LEAST_1, 'eval_every_steps': _AT_LEAST_0,
    'checkpoint_every_steps': _AT_LEAST_0, 'eval_batch_size': _AT_LEAST_1,
}


# augment='auto', by the images' smaller side: (at most this many pixels, pipeline).
# 8x8 digits, ResNet-20, 10 per class: a one-pixel shift 0.94 against 0.88 without;
# flips and 4-pixel shifts hurt. Fashion-MNIST, SmallCNN, 10 and 50 per class, 3 seeds
# (experiments/augment/): crop|flip|trivial +1.9 and +1.5 points over none, better on
# every seed, ~3% of a ResNet-20 step on CPU.
AUTO_AUGMENT = ((16, 'crop(pad=1)'), (None, 'crop(pad=2)|flip|trivial'))


def auto_augment(image_shape) -> str:
  """The pipeline `augment='auto'` means for images of `image_shape` (H, W, C); a
  table's rows (F,) get none."""
  if len(image_shape) == 1:
    return 'none'
  side = min(image_shape[:2])
  return next(spec for limit, spec in AUTO_AUGMENT if limit is None or side <= limit)


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Everything a run reads from its config, checked."""
  data: data_lib.Spec
  model: str
  width: float
  model_options: dict[str, Any]      # the MLP's depth, norm and dropout (`models.OPTIONS`)
  dtype: str
  loss: losses.Loss                  # one-hot targets; `Setup.loss` has the run's own
  hierarchy: str                     # a hierarchy file, or ''
  class_targets: str                 # CLASS_TARGETS
  augment: str                       # a pipeline, or 'auto' (`auto_augment`)
  optimizer: optim.Optimizer
  hyperparams: dict[str, float]      # every member's, except where `grid` sweeps them
  grid: members.Grid
  seed: int
  batch_size: int
  num_steps: int
  num_epochs: float
  max_steps: int                     # 0: no cap
  embedding_dim: int
  pretrained: str
  pretraining: pretext.Pretraining | None  # `pretrain`: a backbone from unlabelled images first
  generative: generative_lib.Gan | None     # `generative`: a GAN first, its images join training
  freeze_bn: bool
  resample_per_seed: bool
  baseline: str
  member_devices: int
  steps_per_dispatch: int
  cpu_tuning: bool
  log_every_steps: int
  eval_every_steps: int        # 0: at the end only
  checkpoint_every_steps: int  # 0: at the end only
  eval_batch_size: int
  progress: bool

  @property
  def num_members(self) -> int:
    return self.grid.num_members

  def total_steps(self, train_size: int) -> int:
    """The run's length: `num_steps`, else `num_epochs` over `train_size`; at most `max_steps`."""
    steps = self.num_steps or max(1, math.ceil(self.num_epochs * train_size / self.batch_size))
    return min(steps, self.max_steps) if self.max_steps else steps


@dataclasses.dataclass(frozen=True)
class Setup:
  """What a run builds once its data is known."""
  model: models.Net
  loss: losses.Loss                  # with the class targets
  tree: hierarchy_lib.ClassTree | None  # the class hierarchy, for targets and metrics
  augment: Callable
  augment_spec: str                  # the pipeline `augment` runs, 'auto' resolved
  tx: optax.GradientTransformation
  unit_schedule: optax.Schedule
  total_steps: int
  # (generator variables, key) -> (images, labels) added to each batch (`generative`).
  generated: Callable | None = None


def _check_range(name: str, value) -> None:
  test, accepts = RANGES[name]
  if not test(value):
    raise UserError(f'{name} must be {accepts}, got {value}')


def grid(config) -> members.Grid:
  """The sweep's settings (`config.sweep`) times `num_seeds`."""
  values = {}
  for name, text in config.sweep.items():
    if name not in config_lib.SWEEPABLE:
      raise unknown('sweep field', name, config_lib.SWEEPABLE)
    if not str(text).strip():
      continue
    try:
      values[name] = tuple(float(v) for v in str(text).split(',') if v.strip())
    except ValueError:
      raise UserError(f'sweep.{name}={text!r}: give comma-separated numbers, '
                      'e.g. 0.03,0.1,0.3') from None
    if len(set(values[name])) != len(values[name]):
      raise UserError(f'sweep.{name}={text!r} repeats a value')
    for v in values[name]:
      _check_range(name, v)
  _check_range('num_seeds', config.num_seeds)
  return members.Grid(values, int(config.num_seeds))


def cpu_devices(config) -> int:
  """How many CPU devices the members of `config` want (see `members.cpu_devices`)."""
  return members.cpu_devices(grid(config).num_members, int(config.member_devices))


def resolve(config: ml_collections.ConfigDict) -> Experiment:
  """Checks every name and number of `config`, before any data is read."""
  for name in RANGES:
    _check_range(name, config[name])
  sizes = config.image_size if isinstance(config.image_size, (tuple, list)) else [
      config.image_size]
  if len(sizes) not in (1, 2) or any(not isinstance(v, int) or v < 0 for v in sizes):
    raise UserError(f'image_size must be 0 (native), N or (H, W) with N, H, W > 0, got '
                    f'{config.image_size}')
  if config.dtype not in DTYPES:
    raise unknown('dtype', config.dtype, DTYPES)
  if config.model not in models.BACKBONES:
    raise unknown('model', config.model, models.BACKBONES)
  if config.baseline not in baseline_lib.BASELINES:
    raise unknown('baseline', config.baseline, baseline_lib.BASELINES)
  if config.num_steps == 0 and config.num_epochs == 0:
    raise UserError('set --config.num_steps or --config.num_epochs to a positive number')
  sweep = grid(config)
  if sweep.values and not config.val_per_class:
    raise UserError('a sweep is chosen on validation data: set --config.val_per_class > 0')
  if 'momentum' in sweep.values and config.optimizer != 'sgd':
    raise UserError(f"sweep.momentum: optimizer {config.optimizer!r} has no momentum to sweep")
  pretraining = pretext.Pretraining.from_config(config)
  if pretraining and config.pretrained:
    raise UserError(f'pretrain={config.pretrain!r} trains the backbone from scratch on '
                    f'unlabelled images; pretrained={config.pretrained!r} asks for given '
                    'weights: set one of them')
  if pretraining and pretraining.method == 'stacked_ae' and not pretext.has_stages(
      models.BACKBONES[config.model]):
    stacked = [n for n, f in models.BACKBONES.items() if pretext.has_stages(f)]
    raise UserError(f"pretrain='stacked_ae' needs a backbone with stages; model "
                    f"{config.model!r} has none (valid: {', '.join(stacked)})")
  optimizer = optim.Optimizer(
      name=config.optimizer, schedule=config.schedule, warmup_steps=int(config.warmup_steps),
      sgdr_cycles=int(config.sgdr_cycles), grad_clip_norm=float(config.grad_clip_norm),
      finetune=config.finetune if config.pretrained or pretraining else '',
      backbone_lr_mult=float(config.backbone_lr_mult))
  if config.finetune not in optim.FINETUNE:
    raise unknown('finetune mode', config.finetune, optim.FINETUNE)
  if config.augment != 'auto':
    augment_lib.build(config.augment)  # a bad pipeline fails here, before any data is read
  _check_class_targets(config)
  gan = generative_lib.Gan.from_config(config)
  if gan and gan.discriminator not in models.BACKBONES:
    raise unknown('gan.discriminator', gan.discriminator, models.BACKBONES)
  if config.loss == 'dada' and config.embedding_dim:
    raise UserError("loss 'dada' has two outputs per class; leave --config.embedding_dim at 0")
  if data_lib.is_table(config.dataset):
    _check_table(config)
  return Experiment(
      data=data_lib.Spec.from_config(config), model=config.model, width=float(config.width),
      model_options=_model_options(config),
      dtype=config.dtype, loss=losses.get(config.loss), hierarchy=config.hierarchy,
      class_targets=config.class_targets, augment=config.augment, optimizer=optimizer,
      hyperparams={name: float(config[name]) for name in optim.HYPERPARAMS},
      grid=sweep, seed=int(config.seed), batch_size=int(config.batch_size),
      num_steps=int(config.num_steps), num_epochs=float(config.num_epochs),
      max_steps=int(config.max_steps),
      embedding_dim=int(config.embedding_dim), pretrained=config.pretrained,
      pretraining=pretraining, generative=gan,
      freeze_bn=bool(config.freeze_bn), resample_per_seed=bool(config.resample_per_seed),
      baseline=config.baseline, member_devices=int(config.member_devices),
      steps_per_dispatch=int(config.steps_per_dispatch), cpu_tuning=bool(config.cpu_tuning),
      log_every_steps=int(config.log_every_steps), eval_every_steps=int(config.eval_every_steps),
      checkpoint_every_steps=int(config.checkpoint_every_steps),
      eval_batch_size=int(config.eval_batch_size), progress=bool(config.progress))


def _model_options(config) -> dict[str, Any]:
  """The options of the model (`models.OPTIONS`) that the config sets; one set for a
  model without it is refused."""
  if config.norm not in models.NORMS:
    raise unknown('norm', config.norm, models.NORMS)
  given = {name: config[name] for name in models.UNSET}
  given = {name: value for name, value in given.items() if value != models.UNSET[name]}
  for name, value in given.items():
    if name not in models.OPTIONS.get(config.model, ()):
      takers = [m for m, names in models.OPTIONS.items() if name in names]
      raise UserError(f"{name}={value} is an option of model {', '.join(takers)}; model "
                      f"{config.model!r} has none (a ResNet's depth is in its name)")
  if given.get('dropout') and (config.pretrain or config.generative):
    raise UserError('dropout is for training the classifier; leave --config.dropout at 0 '
                    'with pretrain or generative')
  return given


def _check_table(config) -> None:
  """A table's run: a model of feature vectors, and nothing that needs images."""
  if config.model != 'mlp':
    raise UserError(f'model {config.model!r} takes images; a table\'s rows take model '
                    "'mlp' (--config.model=mlp)")
  for field, what in (('pretrain', 'pretraining without labels'),
                      ('generative', 'generative augmentation'),
                      ('pretrained', 'pretrained weights')):
    if config[field]:
      raise UserError(f'{field}={config[field]!r}: {what} is for images; '
                      f'{config.dataset} is a table')
  for field in ('image_size', 'channels'):
    if config[field]:
      raise UserError(f'{field}={config[field]} is for images; {config.dataset} is a table: '
                      'leave it at 0')
  augment_lib.check_for_tables(config.augment)


# What the cosine losses steer each class's output towards.
CLASS_TARGETS = ('onehot', 'hierarchy')


def _check_class_targets(config) -> None:
  if config.class_targets not in CLASS_TARGETS:
    raise unknown('class_targets', config.class_targets, CLASS_TARGETS)
  if config.class_targets == 'hierarchy':
    if not config.hierarchy:
      raise UserError("class_targets='hierarchy' needs a hierarchy: set --config.hierarchy="
                      'PATH, e.g. hierarchies/fashion_mnist.txt (in a study: '
                      '--config.base.hierarchy=PATH)')
    if config.loss not in ('cosine', 'cosine_xent'):
      raise UserError(f"class_targets='hierarchy' are targets of the cosine losses; loss "
                      f"{config.loss!r} has none: set --config.loss=cosine or cosine_xent")
    if config.embedding_dim:
      raise UserError("class_targets='hierarchy' embeds the classes in as many dimensions as "
                      'there are classes; leave --config.embedding_dim at 0')
  if config.hierarchy:
    hierarchy_lib.read(config.hierarchy)  # a broken file fails before any data is read


def build(exp: Experiment, num_classes: int, train_size: int, image_shape,
          class_names=None) -> Setup:
  """The network, augmentation, optimiser and the run's length, once the data is known."""
  tree = None
  if exp.hierarchy and class_names is not None:
    tree = hierarchy_lib.load(exp.hierarchy, class_names)
  loss = exp.loss
  if exp.class_targets == 'hierarchy':
    if tree is None:
      raise ValueError("class_targets='hierarchy' needs the dataset's class_names")
    loss = losses.get(exp.loss.name, jnp.asarray(tree.embedding, jnp.float32))
  if exp.batch_size > train_size:
    raise UserError(f'batch_size={exp.batch_size} is larger than the training split '
                    f'({train_size} images); lower --config.batch_size')
  total_steps = exp.total_steps(train_size)
  tx, unit = optim.make(exp.optimizer, total_steps, exp.hyperparams)
  model = models.build(exp.model, exp.embedding_dim or num_classes * loss.outputs_per_class,
                       num_classes if exp.loss.needs_classifier else 0, exp.width,
                       DTYPES[exp.dtype],
                       freeze_backbone_bn=bool(exp.pretrained or exp.pretraining) and (
                           exp.freeze_bn or exp.optimizer.finetune == 'linear'),
                       **exp.model_options)
  spec = augment_spec(exp, image_shape)
  generated = exp.generative and generative_lib.sampler(exp.generative, image_shape,
                                                        num_classes, exp.batch_size)
  return Setup(model, loss, tree, augment_lib.build(spec), spec, tx, unit, total_steps,
               generated or None)


def augment_spec(exp: Experiment, image_shape) -> str:
  """The pipeline `exp` trains with: its own, or 'auto' resolved by the image size."""
  return auto_augment(image_shape) if exp.augment == 'auto' else exp.augment


def member_hyperparams(exp: Experiment) -> dict[str, jax.Array]:
  """Each hyperparameter as a (members,) array: the member's setting or the default."""
  return {name: jnp.asarray(exp.grid.column(name, exp.hyperparams[name]))
          for name in optim.HYPERPARAMS}


def load_pretrained(exp: Experiment) -> tuple[Any, dict | None]:
  """Variables and model spec of `exp.pretrained`, or (None, None).

  A folder is a converted model (tools/convert_torch.py), an earlier run (its first
  member) or a pretraining (`smallfx.pretrain`: one backbone per seed, the leading
  axis kept); an architecture name converts the weights its pip package ships.
  """
  if not exp.pretrained:
    return None, None
  if os.path.isdir(exp.pretrained):
    variables, spec = checkpoint.load_variables(exp.pretrained)
    if 'num_seeds' in spec and 'pretrained_seeds' not in spec:  # a run's members: the first
      variables = jax.tree.map(lambda x: x[0], variables)
  elif exp.pretrained in convert.ARCHS:
    path = convert.packaged_weights(exp.pretrained)
    variables, _ = convert.convert_state_dict(exp.pretrained, convert.load_state_dict(path),
                                              source=path)
    spec = convert.model_spec(exp.pretrained, 1000, path)
  else:
    raise UserError(f'pretrained={exp.pretrained!r} is neither a folder nor an '
                    f"architecture with packaged weights ({', '.join(sorted(convert.ARCHS))})")
  if spec['model'] != exp.model or spec.get('width', 1.0) != exp.width:
    raise UserError(f"pretrained weights are for model={spec['model']} width="
                    f"{spec.get('width', 1.0)}; set --config.model and --config.width to match")
  return variables, spec


def default_workdir(config, config_name: str = 'run') -> str:
  """runs/NAME-DATASET-HASH: the same command resumes, a changed override starts afresh."""
  digest = hashlib.sha1(config.to_json(sort_keys=True).encode()).hexdigest()[:8]
  dataset = config.dataset.split(':')[-1].rstrip('/').split('/')[-1]
  return os.path.join('runs', f'{config_name}-{dataset}-{digest}')


# Fields that change how fast a run goes, never its maths: a resume may change them.
_SPEED_ONLY = {'progress', 'steps_per_dispatch', 'member_devices', 'cpu_tuning'}
# ... and nested fields that only decide when a run stops: a GAN stopped as collapsed
# resumes from its last good checkpoint with the check lowered.
_STOP_ONLY = {'gan': ('min_spread',)}


def _without_stop_only(resolved: dict) -> dict:
  """A config's JSON form without the `_STOP_ONLY` fields."""
  return {k: ({f: x for f, x in v.items() if f not in _STOP_ONLY[k]}
              if k in _STOP_ONLY and isinstance(v, dict) else v) for k, v in resolved.items()}


def check_same_config(config, workdir: str) -> bool:
  """Whether `workdir` holds this config's run; refuses one made by another config."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return False
  with open(path) as f:
    before = _without_stop_only(json.load(f))
  resolved = _without_stop_only(json.loads(config.to_json(sort_keys=True)))
  # A field added to smallfx since that run was written had its default then.
  defaults = _without_stop_only(json.loads(config_lib.default().to_json(sort_keys=True)))
  # 'auto' was written resolved; the same dataset resolves it the same way.
  changed = sorted(k for k in set(before) | set(resolved)
                   if k not in _SPEED_ONLY and before.get(k, defaults.get(k)) != resolved.get(k)
                   and resolved.get(k) != 'auto')
  if changed:
    raise UserError(f'{workdir} holds a run with another config (differs in: '
                    f"{', '.join(changed)}); use another --workdir or delete it")
  return True


def write_config(config, workdir: str, augment_spec: str) -> None:
  """Saves the resolved config (once it has passed every check), 'auto' values resolved."""
  path = os.path.join(workdir, 'config.json')
  if jax.process_index() == 0 and not os.path.exists(path):
    resolved = json.loads(config.to_json(sort_keys=True))
    resolved['augment'] = augment_spec
    checkpoint.write_json(path, resolved)
