"""Optimisers and learning-rate schedules from the config, built from optax parts."""

import jax
import optax

from smallfx.errors import UserError, unknown

SCHEDULES = ('cosine', 'sgdr', 'constant')
OPTIMIZERS = ('sgd', 'adamw')


def schedule(config, total_steps: int) -> optax.Schedule:
  lr, warmup = config.learning_rate, min(config.warmup_steps, max(total_steps - 1, 0))
  if config.schedule == 'constant':
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
  if config.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1))
  if config.schedule == 'sgdr':
    # Warm restarts (Loshchilov & Hutter 2017): cycles that double in length and
    # together fill the run exactly.
    cycles = max(1, config.sgdr_cycles)
    first = max(1, total_steps // (2**cycles - 1))
    kwargs = [dict(init_value=0.0, peak_value=lr, warmup_steps=min(warmup, first // 2),
                   decay_steps=first * 2**i) for i in range(cycles)]
    return optax.sgdr_schedule(kwargs)
  raise unknown('schedule', config.schedule, SCHEDULES)


def _decay_mask(params):
  # Weight decay on kernels only: decaying BatchNorm scales and biases hurts small
  # models and is not what the reference recipes do.
  return jax.tree.map(lambda p: p.ndim > 1, params)


FINETUNE = ('full', 'linear')


def make(config, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimiser; with pretrained weights, the backbone gets its own treatment.

  `finetune='linear'` freezes the backbone (a linear probe); 'full' trains it
  at `backbone_lr_mult` times the head's learning rate.
  """
  lr = schedule(config, total_steps)
  if not config.pretrained:
    return _optimizer(config, lr), lr
  if config.finetune not in FINETUNE:
    raise unknown('finetune mode', config.finetune, FINETUNE)
  mult = config.backbone_lr_mult
  backbone = (optax.set_to_zero() if config.finetune == 'linear'
              else _optimizer(config, lambda step: mult * lr(step)))
  labels = lambda params: {k: 'backbone' if k == 'backbone' else 'head' for k in params}
  return optax.multi_transform({'head': _optimizer(config, lr), 'backbone': backbone},
                               labels), lr


def _optimizer(config, lr) -> optax.GradientTransformation:
  if config.optimizer == 'sgd':
    tx = optax.chain(optax.add_decayed_weights(config.weight_decay, _decay_mask),
                     optax.sgd(lr, momentum=config.momentum, nesterov=True))
  elif config.optimizer == 'adamw':
    tx = optax.adamw(lr, weight_decay=config.weight_decay, mask=_decay_mask)
  else:
    raise unknown('optimizer', config.optimizer, OPTIMIZERS)
  if config.grad_clip_norm:
    if config.grad_clip_norm < 0:
      raise UserError(f'grad_clip_norm must be >= 0, got {config.grad_clip_norm}')
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  return tx
