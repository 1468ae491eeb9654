"""Train, evaluate and checkpoint one experiment.

The training split lives on the device as uint8. Each step draws a batch, augments
and normalises it on the device, and updates every member (the seeds x settings of
the experiment, `smallfx.members`): one compiled function, with the state donated.
"""

import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm

from smallfx import baseline as baseline_lib
from smallfx import checkpoint
from smallfx import convert
from smallfx import data as data_lib
from smallfx import evaluation
from smallfx import experiment
from smallfx import gan as gan_lib
from smallfx import generative as generative_lib
from smallfx import malloc
from smallfx import members
from smallfx import metrics as metrics_lib
from smallfx import models
from smallfx import pretrain as pretrain_lib
from smallfx import results as results_lib
from smallfx import steps as steps_lib
from smallfx import tuning
from smallfx import workdir as workdir_lib
from smallfx.errors import UserError

# Why a step's metrics can become non-finite, by the first one that did.
_WATCHED = ('train/loss', 'train/grad_norm', 'train/param_norm')


def make_train_step(layout: members.Layout, exp: experiment.Experiment,
                    setup: experiment.Setup, num_classes: int, mean, std, steps: int = 1):
  """(state, images_u8, labels) -> (state, metrics) over every member, compiled.

  Data parallelism is SPMD under `jax.jit`: the batch is constrained to split over
  the mesh's 'data' axis and XLA inserts the all-reduces of gradients and BatchNorm
  statistics, so the maths is the same on 1 or N devices. With `resample_per_seed`
  every member trains on its own sub-sample: the data has a leading member axis.
  """
  data_axis = 0 if exp.resample_per_seed else None
  draw = functools.partial(steps_lib.draw_batch, batch_size=exp.batch_size,
                           num_classes=num_classes, augment=setup.augment, mean=mean, std=std,
                           generated=setup.generated)
  update = functools.partial(steps_lib.update, model=setup.model, loss=setup.loss, tx=setup.tx,
                             unit_schedule=setup.unit_schedule,
                             frozen=exp.optimizer.frozen)

  def step(state, images_u8, labels):
    x, y = jax.vmap(draw, in_axes=(0, data_axis, data_axis))(state, images_u8, labels)
    if layout.data_devices > 1:
      x = jax.lax.with_sharding_constraint(x, layout.batch_sharding)
      y = jax.lax.with_sharding_constraint(y, layout.batch_sharding)
    return layout.map(update, in_a_row=1)(state, x, y)

  return members.compile_step(layout, step, exp.resample_per_seed, steps)


@dataclasses.dataclass
class Run:
  """A config's experiment, set up on this process's devices: what steps and tools need."""
  exp: experiment.Experiment
  layout: members.Layout
  dataset: data_lib.Dataset
  setup: experiment.Setup
  mean: np.ndarray
  std: np.ndarray
  pretrained: Any = None  # the backbone's variables, when fine-tuning
  pretrained_seeds: int = 0  # > 0: `pretrained` holds one backbone per seed (smallfx.pretrain)
  gan: Any = None  # generative: {'generator', 'discriminator'} per seed (smallfx.gan.load)

  def train_step(self, steps: int = 1, layout: members.Layout | None = None):
    return make_train_step(layout or self.layout, self.exp, self.setup,
                           self.dataset.num_classes, self.mean, self.std, steps=steps)

  def eval_step(self):
    return evaluation.make_eval_step(self.layout, self.setup.model, self.setup.loss,
                                     self.dataset.num_classes, self.mean, self.std)

  def initializer(self):
    """(init, abstract state): init() makes every member's state on its devices."""
    hyperparams = experiment.member_hyperparams(self.exp)
    keys = members.seed_keys(self.exp.seed, self.exp.grid)
    # Pretrained weights may want three channels of grey images (`len(self.mean)`).
    shape = self.dataset.image_shape if self.dataset.is_table else (
        *self.dataset.image_shape[:2], len(self.mean))
    def member(k, h):
      state = steps_lib.init_state(self.setup.model, self.setup.tx, shape, k, h)
      if not self.exp.generative:
        return state
      return state.replace(generator=generative_lib.init_generator(
          self.exp.generative, self.dataset.image_shape, self.dataset.num_classes, k))

    jitted, abstract = self.layout.init(lambda k: jax.vmap(member)(k, hyperparams), keys)

    def fresh():
      state = jitted(keys)
      if self.gan is not None:
        # Member m: its seed's generator, and with dada its discriminator as the classifier.
        gan = self._per_member(self.gan, self.exp.grid.num_seeds)
        state = state.replace(generator=gan['generator'])
        if self.exp.generative.method == 'dada':
          state = state.replace(params=gan['discriminator']['params'],
                                batch_stats=gan['discriminator']['batch_stats'])
        state = self.layout.place(state)
      if self.pretrained is None:
        return state
      # Optimiser state (momenta, zeros) does not depend on the parameter values.
      variables = convert.transfer_backbone(
          {'params': state.params, 'batch_stats': state.batch_stats}, self.per_member_weights())
      # A backbone without BatchNorm (SmallCNN) has no statistics to transfer.
      return self.layout.place(state.replace(
          params=variables['params'], batch_stats=variables.get('batch_stats', state.batch_stats)))

    return fresh, abstract

  def per_member_weights(self):
    """The pretrained variables; one backbone per seed: member m gets its seed's."""
    if not self.pretrained_seeds:
      return self.pretrained
    return self._per_member(self.pretrained, self.pretrained_seeds)

  def _per_member(self, tree, seeds: int):
    """`tree`'s leading seed axis as a member axis: member m gets its seed's."""
    pick = np.array([self.exp.grid.seed_of(m) % seeds for m in range(self.exp.num_members)])
    return jax.tree.map(lambda x: x[pick], tree)

  def training_data(self):
    """The training split on the devices: one copy for all, or a sub-sample per member."""
    if not self.exp.resample_per_seed:
      return jax.device_put((self.dataset.train.images, self.dataset.train.labels),
                            self.layout.replicated)
    # Seed s of a run with `seed=S` draws sub-sample S + s: another `seed` draws others.
    splits = [data_lib.resample_train(self.dataset, self.exp.data,
                                      self.exp.seed + self.exp.grid.seed_of(m))
              for m in range(self.exp.num_members)]
    return jax.device_put((np.stack([s.images for s in splits]),
                           np.stack([s.labels for s in splits])), self.layout.state_sharding)


def set_up(config: ml_collections.ConfigDict, exp: experiment.Experiment | None = None,
           gan: Any = None) -> Run:
  """Devices, platform tuning, data, model and optimiser of `config`'s experiment.

  `gan`: the GANs of a generative run (`smallfx.gan.load`).
  """
  exp = exp or experiment.resolve(config)
  layout = members.make_layout(exp.num_members, exp.member_devices)
  dataset = data_lib.load(exp.data)
  exp = _batch_within(exp, len(dataset.train.labels))
  setup = experiment.build(exp, dataset.num_classes, len(dataset.train.labels),
                           dataset.image_shape, dataset.class_names)
  if exp.batch_size % layout.data_devices:
    raise UserError(f'batch_size={exp.batch_size} must be a multiple of the '
                    f'{layout.data_devices} devices that split it')
  if exp.generative and exp.generative.generated_per_batch(exp.batch_size) % layout.data_devices:
    raise UserError(f'gan.ratio={exp.generative.ratio} x batch_size={exp.batch_size} generated '
                    f'images must be a multiple of the {layout.data_devices} devices that split them')
  pretrained, pretrained_spec = experiment.load_pretrained(exp)
  mean, std = _normalisation(dataset, pretrained_spec)
  # Once every check has passed: the oneDNN build, if any, says so here.
  tuning.prepare(layout.platform, exp.cpu_tuning)
  return Run(exp, layout, dataset, setup, mean, std, pretrained,
             (pretrained_spec or {}).get('pretrained_seeds', 0), gan)


def fit(run: Run, images, labels):
  """Every member trained on its own data for the run's length; the members' state.

  `images` and `labels` have a leading member axis (the run needs `resample_per_seed`).
  No checkpoints, metrics or evaluation: for experiments of many tiny runs, such as
  one table's repeated random splits (tools/olson.py).
  """
  if not run.exp.resample_per_seed:
    raise ValueError('fit trains each member on its own data: set resample_per_seed')
  layout = run.layout
  init, _ = run.initializer()
  parts = layout.split(init())
  data_parts = layout.split(jax.device_put((images, labels), layout.state_sharding))
  chunk = tuning.steps_per_dispatch(layout.platform, run.exp.steps_per_dispatch)
  total = run.setup.total_steps
  step, several = run.train_step(), run.train_step(chunk) if chunk > 1 else None
  done = 0
  with tqdm.tqdm(total=total, unit='step', file=sys.stderr, dynamic_ncols=True,
                 disable=not run.exp.progress or jax.process_index() != 0) as bar:
    while done < total:
      n = chunk if several and done + chunk <= total else 1
      for r in range(layout.rounds):
        parts[r], _ = (several if n > 1 else step)(parts[r], *data_parts[r])
      done += n
      bar.update(n)
  return layout.join(parts)


def _batch_within(exp: experiment.Experiment, train_size: int) -> experiment.Experiment:
  """`exp` with batches of at most the whole training split (full-batch steps beyond)."""
  if exp.batch_size <= train_size:
    return exp
  if jax.process_index() == 0:
    print(f'note: batch_size={exp.batch_size} is more than the {train_size} training '
          f'examples; every step takes all {train_size}', file=sys.stderr)
  return dataclasses.replace(exp, batch_size=train_size)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes, or reports) the experiment of `config` in `workdir`."""
  exp = experiment.resolve(config)
  checkpoint.prepare_workdir(workdir)
  with workdir_lib.lock(workdir), checkpoint.disk_errors(workdir):
    return _train_and_evaluate(config, exp, workdir)


def _train_and_evaluate(config, exp: experiment.Experiment, workdir: str) -> dict:
  results_path = os.path.join(workdir, 'results.json')
  if experiment.check_same_config(config, workdir) and os.path.exists(results_path):
    # Written last, after the final checkpoint, by this very config: report it again.
    with open(results_path) as f:
      results = json.load(f)
    if jax.process_index() == 0:
      print(results_lib.summary_line(results, workdir))
    return results

  if exp.pretraining:
    exp = pretrain_lib.run(config, exp, workdir)
  gan = None
  if exp.generative:
    gan_lib.run(config, exp, workdir, data_lib.load(exp.data))
    gan = gan_lib.load(workdir)
  run = set_up(config, exp, gan)
  exp, layout, dataset, setup = run.exp, run.layout, run.dataset, run.setup
  experiment.write_config(config, workdir, setup.augment_spec)
  if jax.process_index() == 0:
    checkpoint.write_model_spec(workdir, _model_spec(exp, setup, dataset, run.mean, run.std))

  # Init or restore.
  init, abstract = run.initializer()
  mngr, start, state = checkpoint.resume(workdir, init, abstract)
  data = run.training_data()
  parts = layout.split(state)
  data_parts = layout.split(data) if exp.resample_per_seed else [data] * layout.rounds
  del state, data  # from here the parts are the state

  # The loop. The host syncs once per logging window; steps are dispatched unwaited.
  note = malloc.hint(layout.platform)
  if note and jax.process_index() == 0:
    print(note, file=sys.stderr)
  platform = layout.platform
  chunk = tuning.steps_per_dispatch(platform, exp.steps_per_dispatch)
  train_step = run.train_step()
  train_chunk = run.train_step(chunk) if chunk > 1 else None
  eval_step = run.eval_step()
  one_ahead = tuning.one_step_ahead(platform, jax.local_device_count())
  writer = metrics_lib.Writer(workdir, resume_step=start)
  total = setup.total_steps
  bar = tqdm.tqdm(total=total, initial=start, unit='step', file=sys.stderr, dynamic_ncols=True,
                  disable=not exp.progress or jax.process_index() != 0,
                  desc=os.path.basename(workdir.rstrip('/')))
  every = lambda n, step: bool(n) and step % n == 0 or step == total
  pending, val, step, shown = [], {}, start, {}
  window_start = time.perf_counter()
  wall_before = writer.last('train/wall_seconds', 0.0)
  while step < total:
    n = chunk if chunk > 1 and step + chunk <= _next_stop(exp, step, total) else 1
    ms = []
    for r in range(layout.rounds):
      parts[r], m = (train_chunk if n > 1 else train_step)(parts[r], *data_parts[r])
      ms.append(m)
    if one_ahead and pending:
      jax.block_until_ready(pending[-1][1])
    pending.append((n, ms))
    step += n
    bar.update(n)
    log_now, save_now = every(exp.log_every_steps, step), every(exp.checkpoint_every_steps, step)
    eval_now = every(exp.eval_every_steps, step)
    if not (log_now or save_now or eval_now):
      continue
    window = members.fetch(members.window([ms for _, ms in pending]))
    diverged = window['train/diverged'][-1] > 0
    if diverged.all():
      mngr.wait_until_finished()
      bar.close()
      raise UserError(_divergence_message(window, step, mngr, workdir))
    elapsed = time.perf_counter() - window_start
    scalars = _window_scalars(window, diverged)
    scalars['train/images_per_sec'] = exp.batch_size * exp.num_members * len(
        window['train/loss']) / max(elapsed, 1e-9)
    scalars['train/wall_seconds'] = wall_before = wall_before + elapsed
    pending = []
    if save_now:  # before evaluating, so that a failing evaluation never costs the training
      checkpoint.save(mngr, step, layout.join(parts))
      if step == total:
        mngr.wait_until_finished()
    if eval_now and len(dataset.val.labels):
      val = evaluation.evaluate(eval_step, parts, dataset.val, exp.eval_batch_size,
                                tree=setup.tree)
      scalars.update(_member_scalars('val', val, diverged))
      shown['val_acc'] = f"{scalars['val/accuracy']:.3f}"
    writer.write(step, scalars)
    shown['loss'] = f"{scalars['train/loss']:.4f}"
    bar.set_postfix(shown)
    window_start = time.perf_counter()
  bar.close()
  mngr.wait_until_finished()
  mngr.close()

  # Evaluate: validation chooses a setting, the test set reports it.
  diverged = np.asarray(members.fetch(layout.join(parts).diverged))
  if not val and len(dataset.val.labels):  # a resumed run that had finished training
    val = evaluation.evaluate(eval_step, parts, dataset.val, exp.eval_batch_size,
                              tree=setup.tree)
  chosen = results_lib.choose(exp.grid, val['accuracy'] if val else np.zeros(exp.num_members),
                              diverged)
  ensembles = {str(s): results_lib.live_members(exp.grid, s, diverged)
               for s in range(len(exp.grid.settings))}
  test = evaluation.evaluate(eval_step, parts, dataset.test, exp.eval_batch_size, ensembles,
                             setup.tree)
  if not writer.has_step(step, 'test/accuracy'):
    writer.write(step, _member_scalars('test', test, diverged))
  writer.close()

  # Results.
  results = results_lib.summarise(exp.grid, experiment.member_hyperparams(exp), val, test,
                                  diverged, chosen)
  devices = jax.devices()
  results.update({
      'baseline': exp.baseline,
      'baseline_accuracy': baseline_lib.run(exp.baseline, dataset, exp.data.data_seed,
                                            feature_fn(run)),
      'steps': int(step),
      'resumed_from_step': int(start),
      'wall_seconds': float(wall_before),
      'images_per_sec': float(np.median(writer.column('train/images_per_sec') or [0.0])),
      'train_size': int(len(dataset.train.labels)),
      'test_size': int(len(dataset.test.labels)),
      'versions': results_lib.versions(),
      'devices': [str(d) for d in devices],
      'platform': devices[0].platform,
      'pretrain': pretrain_lib.summary(workdir) if exp.pretraining else None,
      'gan': gan_lib.summary(workdir) if exp.generative else None,
  })
  if jax.process_index() == 0:
    # Prediction averages the chosen setting's live members, not every member.
    checkpoint.write_model_spec(workdir, {
        **_model_spec(exp, setup, dataset, run.mean, run.std),
        'members': results_lib.live_members(exp.grid, chosen, diverged)})
    checkpoint.write_json(results_path, results)
    print(results_lib.summary_line(results, workdir))
  return results


def _next_stop(exp, step: int, total: int) -> int:
  """The next step that logs, evaluates, checkpoints or ends the run."""
  everys = [e for e in (exp.log_every_steps, exp.eval_every_steps,
                        exp.checkpoint_every_steps) if e]
  return min([total] + [e * (step // e + 1) for e in everys])


def _window_scalars(window: dict, diverged: np.ndarray) -> dict:
  """Each metric's mean over the window's steps and live members, and per member."""
  live = ~diverged
  out = {'train/diverged': float(diverged.sum())}
  for name, values in window.items():
    if name == 'train/diverged':
      continue
    out[name] = float(np.mean(values[:, live]))
    if values.shape[1] > 1:
      out.update({f'{name}/m{m}': float(np.mean(values[:, m]))
                  for m in range(values.shape[1]) if live[m]})
  return out


def _member_scalars(prefix: str, result: dict, diverged: np.ndarray) -> dict:
  """A split's accuracy, loss and hierarchy metrics: mean over live members, and per member."""
  live = ~diverged
  out = {}
  for name, values in [('accuracy', result['accuracy']), ('loss', result['loss']),
                       *result.get('hierarchy', {}).items()]:
    values = np.asarray(values)
    if not np.isfinite(values[live]).any():  # no mistakes: no mistake severity
      continue
    out[f'{prefix}/{name}'] = float(np.nanmean(values[live]))
    if len(values) > 1:
      out.update({f'{prefix}/{name}/m{m}': float(values[m])
                  for m in range(len(values)) if live[m] and np.isfinite(values[m])})
  return out


def _divergence_message(window: dict, step: int, mngr, workdir: str) -> str:
  """Every member diverged: which metric broke first for the last of them, and when."""
  flags = window['train/diverged'] > 0
  first = flags.argmax(0)  # each member's first diverged step in the window
  member = int(first.argmax())
  offset = int(first[member])
  bad = step - len(flags) + offset + 1
  broke = next((k for k in _WATCHED if not np.isfinite(window[k][offset, member])), _WATCHED[0])
  what = broke.split('/')[1].replace('_', ' ')
  kept = (f'the last good checkpoint (step {mngr.latest_step()}) is kept in '
          f'{workdir}/checkpoints' if mngr.latest_step() is not None
          else 'no checkpoint had been saved yet')
  who = '' if flags.shape[1] == 1 else f'every member diverged; the last, member {member}: '
  return (f'{who}{what} became non-finite at step {bad}; {kept}. Lower '
          '--config.learning_rate or set --config.grad_clip_norm')


def _normalisation(dataset, pretrained_spec):
  """Per-channel mean and std: the pretrained backbone's, or the training split's."""
  if pretrained_spec:
    # Grey images broadcast against three means: the channel repeat happens here.
    return np.array(pretrained_spec['mean']), np.array(pretrained_spec['std'])
  return steps_lib.pixel_stats(dataset.train.images)


def _model_spec(exp, setup, dataset, mean, std) -> dict:
  num_classes = dataset.num_classes
  targets = setup.tree.embedding.tolist() if exp.class_targets == 'hierarchy' else None
  return {'model': exp.model, 'width': exp.width, 'model_options': exp.model_options,
          'dtype': exp.dtype, 'table': dataset.is_table,
          'num_outputs': exp.embedding_dim or num_classes * setup.loss.outputs_per_class,
          'num_classes': num_classes if exp.loss.needs_classifier else 0,
          'loss': exp.loss.name, 'image_size': list(dataset.image_shape[:2]),
          'channels': len(mean), 'mean': mean.tolist(), 'std': std.tolist(),
          'class_names': dataset.class_names, 'class_embeddings': targets,
          'hierarchy': exp.hierarchy or None,
          'num_seeds': exp.num_members}


def feature_fn(run: Run):
  """The pretrained backbone's features of uint8 images, for feature baselines."""
  if run.pretrained is None:
    return None
  pretrained = run.pretrained
  if run.pretrained_seeds:  # one backbone per seed: the first seed's features
    pretrained = jax.tree.map(lambda a: a[0], pretrained)
  variables = {'params': pretrained['params'], 'batch_stats': pretrained.get('batch_stats', {})}
  fn = jax.jit(lambda x: models.features(run.setup.model, variables,
                                         steps_lib.normalise(x, run.mean, run.std)))
  return lambda images: np.concatenate([np.asarray(fn(images[i:i + 256]))
                                        for i in range(0, len(images), 256)])
