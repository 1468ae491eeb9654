"""A second implementation of the study's from-scratch recipes, in PyTorch, to check its figures.

    python tools/torch_reference.py --cell=experiments/study/fashion_mnist/cells/xent/n0050 \
        [--config=configs/study/fashion_mnist.py] [--seeds=3] [--steps=N] [--json=OUT]

A study cell (`python -m smallfx.study`) records in its `cell.json` the chosen
hyperparameters, the steps and each final seed's test accuracy. This tool trains the
same recipe again (`xent`, `cosine` or `cosine_xent`, without augmentation), written
independently in PyTorch from what smallfx's code does, on the very images of the cell's final runs, and sets its mean ± sd over seeds beside
the cell's. A difference within the seeds' spread says that the published figure is
the recipe's, not an artefact of the JAX implementation. The record of the check goes
in experiments/study/reference.md.

Only the data comes from smallfx: the final stage's config is built as the study
builds it (`cells.cell_config`), checked against the cell's fingerprint, and read
through `smallfx.data` (seed s trains on sub-sample s of the training pool,
`resample_per_seed`; every seed tests on the whole test split). `cell.json` does not
name the dataset, so `--config` gives the study config (default Fashion-MNIST's).
Everything after that is this file's, following smallfx (file: what was read):

- inputs: pixels / 255, minus the per-channel mean over the sub-sample of seed 0
  (`data.load`'s training split, which every seed of a run normalises with), over the
  per-channel std (population, at least 1e-3) (train.py `_normalisation`,
  steps.py `pixel_stats`, `draw_batch`, `normalise`);
- SmallCNN (models/simple.py, models/__init__.py `Net`): 3x3 conv 32 (SAME) - ReLU -
  2x2 max pool - 3x3 conv 64 - ReLU - pool - flatten (NHWC order) - dense 128 - ReLU -
  dense head to one logit per class; no BatchNorm, no dropout. Initialisation as flax's
  defaults: LeCun normal (truncated at 2 sd) kernels, zero biases;
- the losses (losses.py), each a mean over the batch, on one-hot labels:
  `xent`: softmax cross-entropy of the head's outputs, no label smoothing (that is
  `xent_smooth`); the prediction is their argmax.
  `cosine` (Barz & Denzler): 1 - cos(head's output, one-hot target), one output per
  class (`embedding_dim` 0); the prediction is the argmax of the L2-normalised output.
  `cosine_xent`: the cosine loss plus `cosine_xent_weight` x the softmax cross-entropy
  of a second dense layer (`classifier`, with bias, LeCun-normal init) over the
  L2-normalised output (models/__init__.py `Net`, `l2_normalize` with its 1e-12 floor
  on the squared norm); the prediction is that classifier's argmax;
- SGD, momentum (config, 0.9), Nesterov, coupled weight decay (added to the gradient
  before the momentum) on kernels only (ndim > 1), no gradient clipping (optim.py
  `_optimizer`, `_decay_mask`) -- the same maths as torch.optim.SGD with two groups;
- learning rate: peak x linear warm-up from 0 over `warmup_steps`, then cosine decay to
  0 at the last step; the first step's rate is 0 (optim.py `unit_schedule`, optax's
  `warmup_cosine_decay_schedule`, its count starting at 0);
- batches: each epoch a fresh permutation of the training images, cut into
  floor(n / batch_size) batches, the remainder left out that epoch (steps.py
  `draw_batch`); no augmentation (`augment='none'`);
- steps: `num_steps`, else ceil(num_epochs x n / batch_size), at most `max_steps`
  (experiment.py `total_steps`); the cell's recorded steps are what trains;
- test accuracy: the final weights (no EMA, no best-on-validation checkpoint), argmax of
  the logits over the whole test split (train.py, evaluation.py, steps.py
  `evaluate_batch`).

What differs, and should not matter beyond seed noise: the random streams (weights,
batch order: torch's generator against JAX keys and a Feistel shuffle), so seed s is not
the same network as smallfx's seed s, only the same training images; max pooling gives
a tie's gradient to one input where smallfx splits it; float rounding (convolutions
from other kernels). A member that diverged in smallfx is frozen and reported apart;
here a non-finite loss shows as an accuracy of nan.
"""

import argparse
import importlib.util
import json
import math
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# What this file implements; a cell whose final config differs anywhere here is refused
# rather than compared against another recipe.
LOSSES = ('xent', 'cosine', 'cosine_xent')
RECIPE = {'model': 'cnn', 'augment': 'none', 'optimizer': 'sgd',
          'schedule': 'cosine', 'grad_clip_norm': 0.0, 'dtype': 'float32', 'embedding_dim': 0,
          'class_targets': 'onehot', 'pretrain': '', 'pretrained': '', 'generative': ''}


class Refused(Exception):
  """The cell is not one this tool can reproduce; the message says why."""


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--cell', required=True, help='a cell folder holding cell.json')
  p.add_argument('--config', default=os.path.join(ROOT, 'configs', 'study', 'fashion_mnist.py'),
                 help='the study config the cell was run with')
  p.add_argument('--seeds', type=int, default=0, help="seeds to train (default: the cell's)")
  p.add_argument('--steps', type=int, default=0,
                 help="steps per seed (default: the cell's; fewer for a smoke test)")
  p.add_argument('--json', default='', help='write the figures here')
  p.add_argument('--threads', type=int, default=0, help="torch threads (default: torch's)")
  p.add_argument('--device', default='cpu', help="torch device, e.g. 'cuda'")
  return p.parse_args(argv)


# --- The cell's data, through smallfx ------------------------------------------------


def load_study_config(path: str):
  spec = importlib.util.spec_from_file_location('study_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def final_config(record: dict, config_path: str, cell_folder: str):
  """The config of the cell's final runs, as the study built it, and its first seed."""
  from smallfx import cells  # pylint: disable=g-import-not-at-top
  study_config = load_study_config(config_path)
  # Only this cell: resolving checks its configs and gives the fingerprint's inputs.
  study_config.methods = record['method']
  study_config.sizes = str(record['size'])
  study = cells.resolve(study_config, os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(cell_folder)))))
  cell = cells.Cell(study.methods[0], record['size'])
  expected = cells.fingerprint(study, cell)
  if record.get('fingerprint', expected) != expected:
    raise Refused(f'{cell_folder}/cell.json was written by another study config than '
                  f'{config_path} (fingerprint {record["fingerprint"]}, this config gives '
                  f'{expected}); pass the one it ran with as --config')
  config = cells.cell_config(study, cell, 'final', record['chosen'])
  differs = {k: (config[k], v) for k, v in RECIPE.items() if config[k] != v}
  if config.loss not in LOSSES:
    differs['loss'] = (config.loss, ' or '.join(LOSSES))
  if differs:
    raise Refused(f'method {record["method"]!r} is not the recipe this tool implements: '
                  + ', '.join(f'{k}={a!r} (needs {b!r})' for k, (a, b) in differs.items()))
  return config, int(study.base.seed)


def load_data(config, seeds):
  """The test split and each seed's training split (uint8 NHWC), and the normalisation."""
  from smallfx import data as data_lib  # pylint: disable=g-import-not-at-top
  spec = data_lib.Spec.from_config(config)
  dataset = data_lib.load(spec)
  if dataset.is_table:
    raise Refused(f'{config.dataset} is a table; this tool trains SmallCNN on images')
  # A run normalises every seed with its own training split's statistics, and that
  # split is sub-sample 0, whichever sub-sample a seed then trains on.
  x = dataset.train.images.astype(np.float32) / 255.0
  mean, std = x.mean(axis=(0, 1, 2)), np.maximum(x.std(axis=(0, 1, 2)), 1e-3)
  # Seed s of a run with seed S trains on sub-sample S + s (`resample_per_seed`).
  train = {s: data_lib.resample_train(dataset, spec, s) if config.resample_per_seed
           else dataset.train for s in seeds}
  return train, dataset.test, dataset.num_classes, mean, std


# --- The recipe, in PyTorch ------------------------------------------------------------


def lecun_normal_(weight, fan_in: int):
  """flax's default kernel init: variance 1 / fan_in, a normal truncated at 2 sd
  (rescaled so that the truncated distribution keeps that variance)."""
  import torch  # pylint: disable=g-import-not-at-top
  std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
  with torch.no_grad():
    torch.nn.init.trunc_normal_(weight, 0.0, std, -2 * std, 2 * std)


def small_cnn(channels: int, image_size, num_classes: int, width: float = 1.0,
              classifier: bool = False):
  """SmallCNN and its head; with `classifier`, also cosine_xent's dense layer over the
  L2-normalised head output. forward gives (head output, classifier logits or None)."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top

  c1, c2, hidden = int(32 * width), int(64 * width), int(128 * width)
  h, w = image_size[0] // 2 // 2, image_size[1] // 2 // 2  # two VALID 2x2 pools

  class SmallCNN(nn.Module):
    def __init__(self):
      super().__init__()
      self.conv1 = nn.Conv2d(channels, c1, 3, padding=1)  # 'SAME' for 3x3, stride 1
      self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
      self.dense = nn.Linear(h * w * c2, hidden)
      self.head = nn.Linear(hidden, num_classes)
      self.classifier = nn.Linear(num_classes, num_classes) if classifier else None
      for layer in filter(None, (self.conv1, self.conv2, self.dense, self.head,
                                 self.classifier)):
        lecun_normal_(layer.weight, layer.weight[0].numel())
        nn.init.zeros_(layer.bias)

    def forward(self, x):
      x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
      x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
      # Flattened in NHWC order as flax does, so that the dense kernel's rows line up.
      x = x.permute(0, 2, 3, 1).flatten(1)
      out = self.head(torch.relu(self.dense(x)))
      return out, (self.classifier(l2_normalize(out)) if classifier else None)

  return SmallCNN()


def l2_normalize(x):
  """x / |x|, with smallfx's floor of 1e-12 on the squared norm."""
  import torch  # pylint: disable=g-import-not-at-top
  return x * torch.rsqrt(torch.clamp((x * x).sum(-1, keepdim=True), min=1e-12))


def loss_and_prediction(name: str, out, logits, labels, cosine_xent_weight: float):
  """The batch's mean loss and its predicted classes, for loss `name` in LOSSES."""
  import torch  # pylint: disable=g-import-not-at-top
  xent = torch.nn.functional.cross_entropy
  if name == 'xent':
    return xent(out, labels), out.argmax(-1)
  # cos(output, one-hot of y) is the normalised output's y-th entry.
  cosine = 1.0 - l2_normalize(out).gather(1, labels[:, None]).mean()
  if name == 'cosine':
    return cosine, out.argmax(-1)  # the argmax of out / |out|, a positive scaling
  return cosine + cosine_xent_weight * xent(logits, labels), logits.argmax(-1)


def unit_schedule(step: int, total_steps: int, warmup_steps: int) -> float:
  """The learning rate's shape, peaking at 1: linear warm-up from 0, then cosine to 0."""
  warmup = min(warmup_steps, max(total_steps - 1, 0))
  if step < warmup:
    return step / warmup
  decay = max(total_steps, warmup + 1) - warmup
  return 0.5 * (1 + math.cos(math.pi * min(step - warmup, decay) / decay))


def total_steps(config, train_size: int, batch_size: int) -> int:
  steps = config.num_steps or max(1, math.ceil(config.num_epochs * train_size / batch_size))
  return min(steps, config.max_steps) if config.max_steps else steps


def to_tensor(images_u8, mean, std, device):
  """uint8 NHWC -> normalised float32 NCHW."""
  import torch  # pylint: disable=g-import-not-at-top
  x = (images_u8.astype(np.float32) / 255.0 - mean) / std
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)


def train_and_test(seed, split, test, num_classes, mean, std, config, steps, device) -> float:
  """One seed trained for `steps` steps; its final weights' test accuracy."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  images = to_tensor(split.images, mean, std, device)
  labels = torch.as_tensor(split.labels, dtype=torch.long, device=device)
  n = len(labels)
  batch_size = min(int(config.batch_size), n)  # smallfx caps a batch at the training split
  model = small_cnn(images.shape[1], images.shape[2:], num_classes, float(config.width),
                    classifier=config.loss == 'cosine_xent').to(device)
  weight = float(config.cosine_xent_weight)
  params = list(model.parameters())
  # Weight decay on kernels (conv and dense weights) only, added to the gradient.
  opt = torch.optim.SGD([{'params': [p for p in params if p.ndim > 1],
                          'weight_decay': float(config.weight_decay)},
                         {'params': [p for p in params if p.ndim <= 1], 'weight_decay': 0.0}],
                        lr=0.0, momentum=float(config.momentum), nesterov=True)
  per_epoch = n // batch_size
  model.train()
  for step in range(steps):
    if step % per_epoch == 0:  # a fresh permutation each epoch; its remainder sits out
      order = torch.randperm(n, device=device)
    idx = order[(step % per_epoch) * batch_size:(step % per_epoch + 1) * batch_size]
    lr = float(config.learning_rate) * unit_schedule(step, steps, int(config.warmup_steps))
    for group in opt.param_groups:
      group['lr'] = lr
    loss, _ = loss_and_prediction(config.loss, *model(images[idx]), labels[idx], weight)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if not torch.isfinite(loss):
      return math.nan
  model.eval()
  correct = 0
  with torch.no_grad():
    for start in range(0, len(test.labels), int(config.eval_batch_size)):
      x = to_tensor(test.images[start:start + int(config.eval_batch_size)], mean, std, device)
      y = torch.as_tensor(test.labels[start:start + len(x)], dtype=torch.long, device=device)
      _, predicted = loss_and_prediction(config.loss, *model(x), y, weight)
      correct += int((predicted == y).sum())
  return correct / len(test.labels)


# --- The comparison --------------------------------------------------------------------


def spread(values) -> tuple[float, float]:
  """Mean and sd (ddof 1, as the study's report; nan for one value)."""
  x = np.asarray(values, float)
  return float(np.mean(x)), (float(np.std(x, ddof=1)) if len(x) > 1 else math.nan)


def compare(torch_acc: list[float], smallfx_acc: list[float], pairs=()) -> dict:
  """The difference of the means and whether it lies within the seeds' spread: within
  2 standard errors of a difference of two means, sqrt(sd1^2/n1 + sd2^2/n2). With
  `pairs` ((torch, smallfx) per seed: the same training images), also a paired t-test's
  p-value, the study report's test; with 3 seeds the 2-s.e. rule is the stricter one
  (it takes the seeds' sds as known)."""
  (m1, s1), (m2, s2) = spread(torch_acc), spread(smallfx_acc)
  se = math.sqrt(s1**2 / len(torch_acc) + s2**2 / len(smallfx_acc))
  from smallfx import curves  # pylint: disable=g-import-not-at-top
  ours, theirs = ({i: pair[k] for i, pair in enumerate(pairs)} for k in (0, 1))
  p = curves.paired_p(ours, theirs)
  return {'difference': m1 - m2, 'standard_error': se, 'p_paired': p,
          'within_spread': bool(abs(m1 - m2) <= 2 * se) if math.isfinite(se) else None}


def _nan_to_none(x):
  if isinstance(x, dict):
    return {k: _nan_to_none(v) for k, v in x.items()}
  if isinstance(x, list):
    return [_nan_to_none(v) for v in x]
  return None if isinstance(x, float) and math.isnan(x) else x


def main(argv=None) -> int:
  args = parse_args(argv)
  with open(os.path.join(args.cell, 'cell.json')) as f:
    record = json.load(f)
  import torch  # pylint: disable=g-import-not-at-top
  from smallfx.errors import UserError  # pylint: disable=g-import-not-at-top
  if args.threads:
    torch.set_num_threads(args.threads)
  try:
    config, first_seed = final_config(record, args.config, args.cell)
    seeds = [first_seed + i for i in range(args.seeds or len(record['seeds']))]
    train, test, num_classes, mean, std = load_data(config, seeds)
  except (Refused, UserError) as e:  # smallfx's: missing data, a bad config, ...
    print(f'error: {e}', file=sys.stderr)
    return 2

  train_size = len(train[seeds[0]].labels)
  recipe_steps = total_steps(config, train_size, min(int(config.batch_size), train_size))
  if recipe_steps != record['steps']:
    print(f"note: the config gives {recipe_steps} steps, the cell ran {record['steps']}",
          file=sys.stderr)
  steps = args.steps or record['steps']
  theirs = dict(zip(record['seeds'], record['test_accuracy']))
  print(f"{record['method']} n={record['size']}: {train_size} training images, "
        f"{len(test.labels)} test, {steps} steps, "
        + ' '.join(f'{k}={v:g}' for k, v in sorted(record['chosen'].items())))
  ours = []
  for seed in seeds:
    start = time.perf_counter()
    ours.append(train_and_test(seed, train[seed], test, num_classes, mean, std, config, steps,
                               args.device))
    other = f'{theirs[seed]:.4f}' if seed in theirs else '-'
    print(f'seed {seed}: torch {ours[-1]:.4f}  smallfx {other}  '
          f'({time.perf_counter() - start:.0f} s)', flush=True)

  (m1, s1), (m2, s2) = spread(ours), spread(record['test_accuracy'])
  verdict = compare(ours, record['test_accuracy'],
                    [(a, theirs[s]) for s, a in zip(seeds, ours) if s in theirs])
  print(f'torch reference:     {m1:.4f} ± {s1:.4f} over {len(ours)} seeds')
  print(f'smallfx (cell.json): {m2:.4f} ± {s2:.4f} over {len(record["test_accuracy"])} seeds')
  if verdict['within_spread'] is None:
    print(f"difference: {verdict['difference']:+.4f} (one seed a side: no spread to judge it by)")
  else:
    print(f"difference: {verdict['difference']:+.4f}, "
          f"{'within' if verdict['within_spread'] else 'outside'} the seeds' spread "
          f"(2 standard errors of the difference: {2 * verdict['standard_error']:.4f}; "
          f"paired t-test over seeds: p={verdict['p_paired']:.2f})")
  if args.json:
    out = {'cell': args.cell, 'config': args.config, 'method': record['method'],
           'size': record['size'], 'chosen': record['chosen'], 'steps': steps,
           'cell_steps': record['steps'], 'seeds': seeds,
           'torch': {'test_accuracy': ours, 'mean': m1, 'std': s1},
           'smallfx': {'seeds': record['seeds'], 'test_accuracy': record['test_accuracy'],
                       'mean': m2, 'std': s2},
           **verdict, 'torch_version': torch.__version__, 'device': args.device}
    with open(args.json, 'w') as f:  # nan (no spread of one seed) as null: strict JSON
      json.dump(_nan_to_none(out), f, indent=1)
  return 0


if __name__ == '__main__':
  sys.exit(main())
