"""Top-k predictions of a trained or converted model for image files.

    python -m smallfx.predict --workdir=DIR [--top_k=5] IMAGE...

prints one JSON line per image:

    {"image": "cat.png", "top_k": [{"index": 285, "name": "Egyptian cat", "prob": 0.79}, ...]}

DIR is a training run's workdir or one written by tools/convert_torch.py: its
`model.json` says how to rebuild the network and prepare pixels (size,
channels, mean and std), its newest checkpoint holds the weights. Images are
prepared the way `smallfx.data` prepares training images (Pillow, bilinear
resize to the model's size, scaled to [0, 1], then normalised). Seeds trained
together are an ensemble here: their probabilities are averaged.
"""

import json
import sys

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from smallfx import checkpoint
from smallfx import cli
from smallfx import data
from smallfx import losses
from smallfx import malloc
from smallfx import models
from smallfx.errors import UserError

_WORKDIR = flags.DEFINE_string('workdir', None, 'A training or converted workdir.')
_TOP_K = flags.DEFINE_integer('top_k', 5, 'How many classes to print per image.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 32, 'Images per forward pass.')
flags.mark_flags_as_required(['workdir'])


def read_images(paths, spec) -> np.ndarray:
  """uint8 (N, H, W, C) at the model's size and channels, read as training reads them."""
  size = tuple(spec['image_size'])
  return np.stack([data.read_image(path, spec.get('channels', 3), size) for path in paths])


def predictor(workdir: str):
  """(probabilities(uint8 images) -> (N, classes) float32, the model spec)."""
  variables, spec = checkpoint.load_variables(workdir)
  model = models.build(spec['model'], spec['num_outputs'], spec.get('num_classes', 0),
                       spec.get('width', 1.0), jnp.dtype(spec.get('dtype', 'float32')),
                       **spec.get('model_options', {}))
  embeddings = spec.get('class_embeddings')
  loss = losses.get(spec.get('loss', 'xent'),
                    None if embeddings is None else jnp.asarray(embeddings, jnp.float32))
  mean = jnp.asarray(spec['mean'], jnp.float32)
  std = jnp.asarray(spec['std'], jnp.float32)

  def probs(v, x):
    # The loss knows which output holds class scores (logits, or scaled
    # cosine similarities to the class targets).
    return jax.nn.softmax(loss.scores(model.apply(v, x, train=False)).astype(jnp.float32))

  @jax.jit
  def fn(v, images):
    x = (images.astype(jnp.float32) / 255.0 - mean) / std
    if 'num_seeds' in spec:  # training checkpoints: a leading seed axis on every leaf
      return jnp.mean(jax.vmap(probs, in_axes=(0, None))(v, x), axis=0)
    return probs(v, x)

  if 'members' in spec:  # a run's chosen setting: its members that did not diverge
    variables = jax.tree.map(lambda a: a[np.asarray(spec['members'], int)], variables)
  variables = jax.device_put(variables)
  return (lambda images: np.asarray(fn(variables, images))), spec


def predict(workdir: str, paths, top_k: int = 5, batch_size: int = 32):
  """Yields one {"image", "top_k": [{"index", "name", "prob"}]} dict per path."""
  if top_k < 1:
    raise UserError(f'top_k must be at least 1, got {top_k}')
  if batch_size < 1:
    raise UserError(f'batch_size must be at least 1, got {batch_size}')
  fn, spec = predictor(workdir)
  if spec.get('table'):
    raise UserError(f"{workdir} holds a table's model; smallfx.predict reads image files, "
                    'and does not yet encode rows of a table')
  names = spec.get('class_names')
  for start in range(0, len(paths), batch_size):
    chunk = list(paths[start:start + batch_size])
    images = read_images(chunk, spec)
    # Pad to a full batch: one compiled shape for every chunk.
    pad = min(batch_size, len(paths)) - len(chunk)
    if pad:
      images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
    probs = fn(images)[:len(chunk)]
    for path, p in zip(chunk, probs):
      top = np.argsort(-p, kind='stable')[:top_k]
      yield {'image': path, 'top_k': [
          {'index': int(i), 'name': names[i] if names else None, 'prob': float(p[i])}
          for i in top]}


def main(argv):
  paths = argv[1:]
  if not paths:
    raise UserError('no images given: python -m smallfx.predict --workdir=DIR IMAGE...')
  for result in predict(_WORKDIR.value, paths, _TOP_K.value, _BATCH_SIZE.value):
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == '__main__':
  malloc.relaunch()
  cli.run(main)
