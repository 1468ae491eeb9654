"""Phase 1 of generative augmentation: a class-conditional GAN per seed, before training.

`python -m smallfx.main --config.generative=dada|cgan_augment` first trains one GAN per
seed of the run on that seed's labelled training images (no augmentation), as members
of one program, in `WORKDIR/gan/`: its own checkpoints (resumable), metrics.jsonl,
TensorBoard (losses, and a grid of generated images every `gan.sample_every_steps`),
progress bar, `model.json` and `results.json`. Training then gives member m its seed's
generator, frozen, whose images join every batch (`steps.draw_batch`); with `dada` its
discriminator is also where the classifier starts. The objective is in
`smallfx.generative`.

A non-finite loss or a collapsed generator (a class whose generated images hardly vary,
`gan.min_spread`) stops the run with the step; checkpoints are written only after a
window's checks, so the last one is good.
"""

import dataclasses
import json
import os
import sys
import time

import jax
import ml_collections
import numpy as np
import tqdm

from smallfx import checkpoint
from smallfx import data as data_lib
from smallfx import experiment
from smallfx import generative
from smallfx import members
from smallfx import metrics as metrics_lib
from smallfx import models
from smallfx import steps as steps_lib
from smallfx import tuning
from smallfx.errors import UserError

FOLDER = 'gan'
LOG_EVERY_STEPS = 50
PICTURE_PER_CLASS = 8
# GAN seeds are their own stream, as pretraining's (smallfx.pretrain).
_STREAM = 11
_WATCHED = ('gan/d_loss', 'gan/g_loss', 'gan/d_grad_norm', 'gan/g_grad_norm')


def labelled(exp: experiment.Experiment, dataset: data_lib.Dataset) -> list[data_lib.Split]:
  """Each seed's labelled training images: its own sub-sample, or the one split."""
  seeds = exp.grid.num_seeds
  if exp.resample_per_seed:
    return [data_lib.resample_train(dataset, exp.data, exp.seed + s) for s in range(seeds)]
  return [dataset.train] * seeds


def objective(exp: experiment.Experiment, dataset: data_lib.Dataset) -> generative.Objective:
  spec, k = exp.generative, dataset.num_classes
  mean, std = steps_lib.pixel_stats(dataset.train.images)
  discriminator = models.build(spec.discriminator, 2 * k, 0, exp.width,
                               experiment.DTYPES[exp.dtype])
  return generative.Objective(spec, discriminator, tuple(dataset.image_shape), k, mean, std)


def _keys(exp: experiment.Experiment, seeds: int):
  return jax.vmap(lambda s: jax.random.fold_in(jax.random.fold_in(
      jax.random.key(exp.seed), s), _STREAM))(np.arange(seeds))


@dataclasses.dataclass
class Session:
  """A GAN training set up on this process's devices: what the loop and tools call."""
  exp: experiment.Experiment
  objective: generative.Objective
  layout: members.Layout
  splits: list[data_lib.Split]

  def initializer(self):
    keys = _keys(self.exp, self.exp.grid.num_seeds)
    jitted, abstract = self.layout.init(jax.vmap(self.objective.init), keys)
    return (lambda: jitted(keys)), abstract

  def data(self):
    """Each seed's images and labels, a leading seed axis, on its devices."""
    return jax.device_put((np.stack([s.images for s in self.splits]),
                           np.stack([s.labels for s in self.splits])),
                          self.layout.state_sharding)

  def step(self):
    goal = self.objective
    identity = lambda key, x, y: (x, y)
    draw = lambda state, images, labels: steps_lib.draw_batch(
        state, images, labels, batch_size=self.exp.generative.batch_size,
        num_classes=goal.num_classes, augment=identity, mean=goal.mean, std=goal.std)
    return members.compile_step(self.layout, generative.step_fn(goal, self.layout, draw), True)


def set_up(exp: experiment.Experiment, dataset: data_lib.Dataset) -> Session:
  spec = exp.generative
  layout = members.make_layout(exp.grid.num_seeds)
  splits = labelled(exp, dataset)
  if spec.batch_size > len(splits[0].labels):
    raise UserError(f'gan.batch_size={spec.batch_size} is larger than the labelled training '
                    f'images ({len(splits[0].labels)}); lower it')
  if spec.batch_size % layout.data_devices:
    raise UserError(f'gan.batch_size={spec.batch_size} must be a multiple of the '
                    f'{layout.data_devices} devices that split it')
  tuning.prepare(layout.platform, exp.cpu_tuning)
  return Session(exp, objective(exp, dataset), layout, splits)


def run(config, exp: experiment.Experiment, workdir: str, dataset: data_lib.Dataset) -> None:
  """Trains (or resumes, or finds done) `exp`'s GANs in WORKDIR/gan."""
  folder = os.path.join(workdir, FOLDER)
  if os.path.exists(os.path.join(folder, 'results.json')):
    return
  # Written before the long part, so that a re-run with another config is refused.
  experiment.write_config(config, workdir, experiment.augment_spec(exp, dataset.image_shape))
  _train(set_up(exp, dataset), folder)


def load(workdir: str) -> dict:
  """The finished GANs: {'generator', 'discriminator'}, each {'params', 'batch_stats'}
  with a leading seed axis."""
  variables, _ = checkpoint.load_variables(os.path.join(workdir, FOLDER))
  return {net: {'params': variables['params'][net],
                'batch_stats': variables.get('batch_stats', {}).get(net, {})}
          for net in ('generator', 'discriminator')}


def summary(workdir: str) -> dict:
  with open(os.path.join(workdir, FOLDER, 'results.json')) as f:
    return json.load(f)


@dataclasses.dataclass
class Trained:
  """A finished run's GANs, read back: for pictures and tools."""
  exp: experiment.Experiment
  objective: generative.Objective
  dataset: data_lib.Dataset
  splits: list[data_lib.Split]
  generators: dict  # {'params', 'batch_stats'}, a leading seed axis

  def samples(self, seed: int, per_class: int, key=0):
    """`per_class` generated images of each class (class-major) from `seed`'s generator."""
    variables = jax.tree.map(lambda a: a[seed], self.generators)
    return jax.jit(self.objective.samples, static_argnums=2)(
        variables, jax.random.key(key), per_class)


def restore(workdir: str) -> Trained:
  if not os.path.exists(os.path.join(workdir, FOLDER, 'results.json')):
    raise UserError(f'{workdir} holds no finished GAN ({workdir}/{FOLDER}/results.json)')
  with open(os.path.join(workdir, 'config.json')) as f:
    exp = experiment.resolve(ml_collections.ConfigDict(json.load(f)))
  dataset = data_lib.load(exp.data)
  return Trained(exp, objective(exp, dataset), dataset, labelled(exp, dataset),
                 load(workdir)['generator'])


def _bad_step(window: dict, step: int) -> tuple[int, int, str] | None:
  """(step, member, metric) of the window's first non-finite value, or None."""
  for offset in range(len(window[_WATCHED[0]])):
    for name in _WATCHED:
      bad = ~np.isfinite(window[name][offset])
      if bad.any():
        return step - len(window[name]) + offset + 1, int(bad.argmax()), name
  return None


def _train(session: Session, folder: str) -> None:
  exp, goal, layout = session.exp, session.objective, session.layout
  spec, seeds = exp.generative, exp.grid.num_seeds
  os.makedirs(folder, exist_ok=True)
  is_main = jax.process_index() == 0
  if is_main:
    checkpoint.write_model_spec(folder, {
        'generative': spec.method, 'discriminator': spec.discriminator, 'width': exp.width,
        'image_shape': list(goal.image_shape), 'num_classes': goal.num_classes,
        'mean': goal.mean.tolist(), 'std': goal.std.tolist(), 'gan_seeds': seeds})

  init, abstract = session.initializer()
  mngr, start, state = checkpoint.resume(folder, init, abstract)
  parts, data_parts = layout.split(state), layout.split(session.data())
  del state
  train = session.step()
  sample = jax.jit(goal.samples, static_argnums=2)

  writer = metrics_lib.Writer(folder, resume_step=start)
  wall = writer.last('gan/wall_seconds', 0.0)
  bar = tqdm.tqdm(total=spec.steps, initial=start, unit='step', file=sys.stderr,
                  dynamic_ncols=True, disable=not exp.progress or not is_main,
                  desc=f'gan ({spec.method})')
  step, window, window_start = start, [], time.perf_counter()
  while step < spec.steps:
    window.append([None] * layout.rounds)
    for r in range(layout.rounds):
      parts[r], window[-1][r] = train(parts[r], *data_parts[r])
    step += 1
    bar.update(1)
    save = spec.checkpoint_every_steps and step % spec.checkpoint_every_steps == 0
    if not (step % LOG_EVERY_STEPS == 0 or step == spec.steps or save):
      continue
    values = members.fetch(members.window(window))
    kept = (f'the last good checkpoint (step {mngr.latest_step()}) is kept in {folder}/checkpoints'
            if mngr.latest_step() is not None else 'no checkpoint had been saved yet')
    bad = _bad_step(values, step)
    if bad:
      bar.close()
      mngr.wait_until_finished()
      raise UserError(f'the GAN diverged: {bad[2]} of seed {bad[1]} became non-finite at step '
                      f'{bad[0]}; {kept}. Lower --config.gan.learning_rate')
    spread = values['gan/spread'].mean(0)
    if (spread < spec.min_spread).any():
      bar.close()
      mngr.wait_until_finished()
      raise UserError(
          f'the GAN collapsed: by step {step} the generated images of a class of seed '
          f'{int(spread.argmin())} vary by {spread.min():.4f} (mean pixel std, under '
          f'gan.min_spread={spec.min_spread}); {kept}. With few images per class GANs often '
          'do (experiments/generative/); the same command with --config.gan.min_spread=0 '
          'resumes and trains on with it')
    elapsed = time.perf_counter() - window_start
    wall += elapsed
    scalars = {name: float(v.mean()) for name, v in values.items()}
    scalars['gan/images_per_sec'] = spec.batch_size * seeds * len(values['gan/d_loss']) / max(
        elapsed, 1e-9)
    scalars['gan/wall_seconds'] = wall
    if seeds > 1:
      scalars.update({f'{name}/m{m}': float(v[:, m].mean()) for name, v in values.items()
                      for m in range(seeds)})
    writer.write(step, scalars)
    if spec.sample_every_steps and (step % spec.sample_every_steps == 0 or step == spec.steps):
      # Seed 0's generator (the first member of the first round).
      variables = jax.tree.map(lambda a: np.asarray(a)[0], members.fetch(
          {'params': parts[0].params['generator'],
           'batch_stats': parts[0].batch_stats['generator']}))
      images, _ = sample(variables, jax.random.key(0), PICTURE_PER_CLASS)
      writer.image(step, 'gan/samples', generative.picture(images, goal.num_classes))
    bar.set_postfix(d=f"{scalars['gan/d_loss']:.3f}", g=f"{scalars['gan/g_loss']:.3f}",
                    spread=f"{scalars['gan/spread']:.3f}")
    if save or step == spec.steps:
      checkpoint.save(mngr, step, layout.join(parts))
    window, window_start = [], time.perf_counter()
  bar.close()
  mngr.wait_until_finished()
  mngr.close()
  writer.close()
  if is_main:
    results = {'method': spec.method, 'steps': step, 'resumed_from_step': start,
               'd_loss': writer.last('gan/d_loss'), 'g_loss': writer.last('gan/g_loss'),
               'spread': writer.last('gan/spread'), 'wall_seconds': wall,
               'images_per_sec': float(np.median(writer.column('gan/images_per_sec') or [0])),
               'labelled_images': int(len(session.splits[0].labels)), 'seeds': seeds}
    checkpoint.write_json(os.path.join(folder, 'results.json'), results)
    print(f'trained {seeds} GAN(s) ({spec.method}): discriminator loss '
          f'{results["d_loss"]:.3f}, generator loss {results["g_loss"]:.3f} after {step} steps '
          f'on {results["labelled_images"]} labelled images, {wall:.0f} s', file=sys.stderr)
