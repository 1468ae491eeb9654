"""Pretraining a run's backbone on unlabelled images, before its training.

`python -m smallfx.main --config.pretrain=dae|stacked_ae|simclr` first trains one
backbone per seed of the run on the unlabelled pool (`data.unlabelled`), as members of
one program, in `WORKDIR/pretrain/`: its own checkpoints (resumable), metrics.jsonl,
TensorBoard, progress bar and `model.json`. The run then fine-tunes from there through
the transfer path of ImageNet weights (`finetune`, `backbone_lr_mult`, `freeze_bn`):
member m starts from the backbone pretrained with its seed. The objectives are in
`smallfx.pretext`.
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
from smallfx import members
from smallfx import metrics as metrics_lib
from smallfx import models
from smallfx import pretext
from smallfx import tuning
from smallfx.errors import UserError

FOLDER = 'pretrain'
LOG_EVERY_STEPS = 50
# Pretraining seeds are their own stream: seed s pretrains from key(seed) folded with s
# and with this, so its initialisation differs from the training run's own for seed s.
_STREAM = 7


def subsamples(exp: experiment.Experiment) -> list[int]:
  """The labelled sub-samples of the run (`data.resample_train`'s k), kept out of the pool."""
  if exp.resample_per_seed:
    return [exp.seed + s for s in range(exp.grid.num_seeds)]
  return [0]


def pool(exp: experiment.Experiment):
  """(the unlabelled images, the run's dataset) for `exp`."""
  dataset = data_lib.load(exp.data)
  images = data_lib.unlabelled(dataset, exp.data, subsamples(exp))
  if len(images) < exp.pretraining.batch_size:
    raise UserError(f'the unlabelled pool holds {len(images)} images, fewer than '
                    f'pretraining.batch_size={exp.pretraining.batch_size}; lower it or add images')
  return images, dataset


def objective(exp: experiment.Experiment, images: np.ndarray) -> pretext.Objective:
  """The pretraining objective of `exp` on `images` (their statistics normalise it)."""
  x = images.astype(np.float32) / 255.0
  mean, std = x.mean(axis=(0, 1, 2)), np.maximum(x.std(axis=(0, 1, 2)), 1e-3)
  backbone = models.BACKBONES[exp.model](width=exp.width, dtype=experiment.DTYPES[exp.dtype])
  return pretext.Objective(exp.pretraining, backbone, tuple(images.shape[1:]), mean, std)


@dataclasses.dataclass
class Pretrained:
  """A finished pretraining, read back: for pictures and tools."""
  exp: experiment.Experiment
  objective: pretext.Objective
  variables: dict    # {'params', 'batch_stats'}, a leading axis of one backbone per seed
  dataset: data_lib.Dataset
  initial: dict      # seed 0's variables before pretraining: the random-init reference


def restore(workdir: str) -> Pretrained:
  """The pretraining of the run in `workdir` (its config.json and pretrain/ folder)."""
  folder = os.path.join(workdir, FOLDER)
  if not os.path.exists(os.path.join(folder, 'results.json')):
    raise UserError(f'{workdir} holds no finished pretraining ({folder}/results.json)')
  with open(os.path.join(workdir, 'config.json')) as f:
    exp = experiment.resolve(ml_collections.ConfigDict(json.load(f)))
  images, dataset = pool(exp)
  goal = objective(exp, images)
  variables, _ = checkpoint.load_variables(folder)
  init = goal.init(_keys(exp, 1)[0])
  return Pretrained(exp, goal, variables, dataset,
                    {'params': init.params, 'batch_stats': init.batch_stats})


def _keys(exp: experiment.Experiment, seeds: int):
  return jax.vmap(lambda s: jax.random.fold_in(jax.random.fold_in(
      jax.random.key(exp.seed), s), _STREAM))(np.arange(seeds))


def summary(workdir: str) -> dict:
  """The finished pretraining's results.json (method, steps, loss, images, time)."""
  with open(os.path.join(workdir, FOLDER, 'results.json')) as f:
    return json.load(f)


def run(config, exp: experiment.Experiment, workdir: str) -> experiment.Experiment:
  """Pretrains (or resumes, or finds done) `exp`'s backbones; `exp` fine-tuning from them."""
  folder = os.path.join(workdir, FOLDER)
  if not os.path.exists(os.path.join(folder, 'results.json')):
    images, dataset = pool(exp)
    # Written before the long part, so that a re-run with another config is refused.
    experiment.write_config(config, workdir, experiment.augment_spec(exp, dataset.image_shape))
    _pretrain(exp, images, folder)
  return dataclasses.replace(exp, pretrained=folder)


@dataclasses.dataclass
class Session:
  """A pretraining set up on this process's devices: what the loop and benchmarks call."""
  exp: experiment.Experiment
  objective: pretext.Objective
  layout: members.Layout
  images: np.ndarray

  def initializer(self):
    """(init, abstract state): init() makes every seed's state on its devices."""
    keys = _keys(self.exp, self.exp.grid.num_seeds)
    jitted, abstract = self.layout.init(jax.vmap(self.objective.init), keys)
    return (lambda: jitted(keys)), abstract

  def data(self):
    """(the pool, a placeholder for the labels the step's signature has) on the devices."""
    return (jax.device_put(self.images, self.layout.replicated),
            jax.device_put(np.zeros((1,), np.int32), self.layout.replicated))

  def step(self, phase: pretext.Phase):
    """(state, images, unused) -> (state, metrics): one step of `phase`, compiled."""
    return members.compile_step(self.layout, pretext.step_fn(self.objective, phase, self.layout),
                                False)


def set_up(exp: experiment.Experiment, images: np.ndarray) -> Session:
  """The devices, objective and platform tuning of `exp`'s pretraining on `images`."""
  layout = members.make_layout(exp.grid.num_seeds)
  if exp.pretraining.batch_size % layout.data_devices:
    raise UserError(f'pretraining.batch_size={exp.pretraining.batch_size} must be a multiple '
                    f'of the {layout.data_devices} devices that split it')
  tuning.prepare(layout.platform, exp.cpu_tuning)
  return Session(exp, objective(exp, images), layout, images)


def _pretrain(exp: experiment.Experiment, images: np.ndarray, folder: str) -> None:
  spec = exp.pretraining
  session = set_up(exp, images)
  goal, layout, seeds = session.objective, session.layout, exp.grid.num_seeds
  os.makedirs(folder, exist_ok=True)
  is_main = jax.process_index() == 0
  if is_main:
    checkpoint.write_model_spec(folder, {
        'model': exp.model, 'width': exp.width, 'dtype': exp.dtype, 'pretrain': spec.method,
        'pretrained_seeds': seeds, 'image_size': list(images.shape[1:3]),
        'channels': int(images.shape[-1]), 'mean': goal.mean.tolist(),
        'std': goal.std.tolist(), 'unlabelled_images': int(len(images)),
        'num_outputs': 0, 'num_classes': 0, 'loss': 'none', 'class_names': None,
        'class_embeddings': None})

  init, abstract = session.initializer()
  mngr, start, state = checkpoint.resume(folder, init, abstract)
  data, unused = session.data()
  parts = layout.split(state)
  del state

  writer = metrics_lib.Writer(folder, resume_step=start)
  wall = writer.last('pretrain/wall_seconds', 0.0)
  bar = tqdm.tqdm(total=spec.steps, initial=start, unit='step', file=sys.stderr,
                  dynamic_ncols=True, disable=not exp.progress or not is_main,
                  desc=f'pretrain {spec.method}')
  step = start
  for phase in goal.phases():
    if step >= phase.end:
      continue
    bar.set_description(f'pretrain {spec.method}' + (
        f' ({phase.name})' if phase.name != spec.method else ''))
    train = session.step(phase)
    window, window_start = [], time.perf_counter()
    while step < phase.end:
      window.append([None] * layout.rounds)
      for r in range(layout.rounds):
        parts[r], window[-1][r] = train(parts[r], data, unused)
      step += 1
      bar.update(1)
      save = spec.checkpoint_every_steps and step % spec.checkpoint_every_steps == 0
      if not (step % LOG_EVERY_STEPS == 0 or step == phase.end or save):
        continue
      values = members.fetch(members.window(window))
      loss = values['pretrain/loss']
      if not np.isfinite(loss).all():
        bar.close()
        raise UserError(f'the pretraining loss became non-finite by step {step} ({phase.name}); '
                        'lower --config.pretraining.learning_rate')
      elapsed = time.perf_counter() - window_start
      wall += elapsed
      scalars = {'pretrain/loss': float(loss.mean()),
                 'pretrain/grad_norm': float(values['pretrain/grad_norm'].mean()),
                 'pretrain/images_per_sec': spec.batch_size * seeds * len(loss) / max(elapsed, 1e-9),
                 'pretrain/wall_seconds': wall}
      if seeds > 1:
        scalars.update({f'pretrain/loss/m{m}': float(loss[:, m].mean()) for m in range(seeds)})
      writer.write(step, scalars)
      bar.set_postfix(loss=f'{scalars["pretrain/loss"]:.4f}')
      if save or step == phase.end:
        checkpoint.save(mngr, step, layout.join(parts))
      window, window_start = [], time.perf_counter()
  bar.close()
  mngr.wait_until_finished()
  mngr.close()
  writer.close()
  if is_main:
    results = {'method': spec.method, 'steps': step, 'resumed_from_step': start,
               'final_loss': writer.last('pretrain/loss'), 'wall_seconds': wall,
               'images_per_sec': float(np.median(writer.column('pretrain/images_per_sec'))),
               'unlabelled_images': int(len(images)), 'seeds': seeds}
    checkpoint.write_json(os.path.join(folder, 'results.json'), results)
    print(f'pretrained {spec.method}: loss {results["final_loss"]:.4f} after {step} steps on '
          f'{len(images)} unlabelled images, {wall:.0f} s', file=sys.stderr)
