"""Optimisers and learning-rate schedules, built from optax parts.

Scalar hyperparameters (`HYPERPARAMS`) live in the optimiser state through
`optax.inject_hyperparams`: a member of a sweep is the same program with other
values in its state. The learning rate there is the schedule's peak; the schedule's
shape (warm-up, decay) is fixed by the config. The loss's hyperparameters ride in the
same dict, so that everything a member varies is in one place.
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax

from smallfx import losses
from smallfx.errors import UserError, unknown

SCHEDULES = ('cosine', 'sgdr', 'constant')
OPTIMIZERS = ('sgd', 'adamw')
FINETUNE = ('full', 'linear')
HYPERPARAMS = ('learning_rate', 'weight_decay', 'momentum', *losses.HYPERPARAMS)


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """What the config says about optimisation, checked (see `experiment.resolve`)."""
  name: str = 'sgd'
  schedule: str = 'cosine'
  warmup_steps: int = 50
  sgdr_cycles: int = 3
  grad_clip_norm: float = 0.0
  finetune: str = ''              # '' (from scratch), 'full' or 'linear'
  backbone_lr_mult: float = 0.1

  @property
  def frozen(self) -> tuple[str, ...]:
    """The parameter collections this mode leaves as they are: a linear probe's backbone."""
    return ('backbone',) if self.finetune == 'linear' else ()

  def __post_init__(self):
    if self.name not in OPTIMIZERS:
      raise unknown('optimizer', self.name, OPTIMIZERS)
    if self.schedule not in SCHEDULES:
      raise unknown('schedule', self.schedule, SCHEDULES)
    if self.finetune and self.finetune not in FINETUNE:
      raise unknown('finetune mode', self.finetune, FINETUNE)
    if self.grad_clip_norm < 0:
      raise UserError(f'grad_clip_norm must be >= 0, got {self.grad_clip_norm}')


def unit_schedule(kind: str, total_steps: int, warmup_steps: int,
                  sgdr_cycles: int = 3) -> optax.Schedule:
  """The schedule's shape, peaking at 1: times a member's learning rate, its schedule."""
  warmup = min(warmup_steps, max(total_steps - 1, 0))
  if kind == 'constant':
    return optax.join_schedules(
        [optax.linear_schedule(0.0, 1.0, warmup), optax.constant_schedule(1.0)], [warmup])
  if kind == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup, max(total_steps, warmup + 1))
  if kind == 'sgdr':
    # Warm restarts (Loshchilov & Hutter 2017): cycles that double in length and
    # together fill the run exactly.
    cycles = max(1, sgdr_cycles)
    first = max(1, total_steps // (2**cycles - 1))
    kwargs = [dict(init_value=0.0, peak_value=1.0, warmup_steps=min(warmup, first // 2),
                   decay_steps=first * 2**i) for i in range(cycles)]
    return optax.sgdr_schedule(kwargs)
  raise unknown('schedule', kind, SCHEDULES)


def _decay_mask(params):
  # Weight decay on kernels only: decaying BatchNorm scales and biases hurts small
  # models and is not what the reference recipes do.
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make(opt: Optimizer, total_steps: int, hyperparams: dict[str, float]
         ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(the optimiser, the schedule's shape); `hyperparams` are the initial values.

  With pretrained weights, `finetune='linear'` freezes the backbone (a linear probe)
  and 'full' trains it at `backbone_lr_mult` times the head's learning rate.
  """
  unit = unit_schedule(opt.schedule, total_steps, opt.warmup_steps, opt.sgdr_cycles)

  def factory(learning_rate, weight_decay, momentum, label_smoothing, cosine_xent_weight):
    del label_smoothing, cosine_xent_weight  # the loss's: read by the update from the state
    lr = lambda count: learning_rate * unit(count)
    head = _optimizer(opt, lr, weight_decay, momentum)
    if not opt.finetune:
      return head
    backbone = (optax.set_to_zero() if 'backbone' in opt.frozen else
                _optimizer(opt, lambda c: opt.backbone_lr_mult * lr(c), weight_decay, momentum))
    labels = lambda params: {k: 'backbone' if k == 'backbone' else 'head' for k in params}
    return optax.multi_transform({'head': head, 'backbone': backbone}, labels)

  values = {name: float(hyperparams[name]) for name in HYPERPARAMS}
  return optax.inject_hyperparams(factory, hyperparam_dtype=jnp.float32)(**values), unit


def _optimizer(opt, lr, weight_decay, momentum) -> optax.GradientTransformation:
  if opt.name == 'sgd':
    tx = optax.chain(optax.add_decayed_weights(weight_decay, _decay_mask),
                     optax.sgd(lr, momentum=momentum, nesterov=True))
  else:
    tx = optax.adamw(lr, weight_decay=weight_decay, mask=_decay_mask)
  if opt.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
  return tx


def hyperparams(opt_state) -> dict[str, jax.Array]:
  """The hyperparameter values in an optimiser state of `make`'s optimiser."""
  return opt_state.hyperparams


def with_hyperparams(opt_state, values: dict[str, jax.Array]):
  """`opt_state` with some hyperparameters replaced (a member's setting)."""
  new = dict(opt_state.hyperparams)
  for name, value in values.items():
    new[name] = jnp.asarray(value, new[name].dtype)
  return opt_state._replace(hyperparams=new)
