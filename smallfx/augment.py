"""Data augmentation on the accelerator, from one config string.

Spec grammar: ops separated by `|`, each `name` or `name(key=value, ...)`;
'' or 'none' means no augmentation. Example: 'crop(pad=4)|flip'.
"""

import ast
import inspect
from typing import Callable

import jax
import jax.numpy as jnp

from smallfx.errors import UserError, unknown


def crop(pad: int = 4, mode: str = 'zero'):
  """Random crop of the image padded by `pad` pixels on every side."""
  if mode not in ('zero', 'reflect'):
    raise UserError(f"augment op 'crop': bad mode {mode!r}; valid: reflect, zero")
  pad = int(pad)

  def op(key, image):
    if pad == 0:
      return image
    h, w, c = image.shape
    padded = jnp.pad(image, ((pad, pad), (pad, pad), (0, 0)),
                     mode='constant' if mode == 'zero' else 'reflect')
    dy, dx = jax.random.randint(key, (2,), 0, 2 * pad + 1)
    return jax.lax.dynamic_slice(padded, (dy, dx, 0), (h, w, c))
  return op


def flip(p: float = 0.5):
  """Horizontal flip with probability p."""
  def op(key, image):
    return jnp.where(jax.random.bernoulli(key, p), image[:, ::-1], image)
  return op


OPS = {'crop': crop, 'flip': flip}


def _parse(spec):
  ops = []
  for item in spec.split('|'):
    item = item.strip()
    if not item:
      continue
    tree = ast.parse(item, mode='eval').body
    if isinstance(tree, ast.Name):
      name, kwargs = tree.id, {}
    else:
      name = tree.func.id
      kwargs = {k.arg: ast.literal_eval(k.value) for k in tree.keywords}
    if name not in OPS:
      raise unknown('augmentation', name, OPS)
    ops.append(OPS[name](**kwargs))
  return ops


def build(spec: str) -> Callable:
  """Returns apply(key, images f32[B,H,W,C] in [0,1], labels f32[B,K]) -> (images, labels)."""
  spec = (spec or '').strip()
  ops = [] if spec.lower() == 'none' else _parse(spec)

  def one(key, image):
    for k, op in zip(jax.random.split(key, max(len(ops), 1)), ops):
      image = op(k, image)
    return image

  def apply(key, images, labels):
    if not ops:
      return images, labels
    keys = jax.random.split(key, images.shape[0])
    return jax.vmap(one)(keys, images), labels
  return apply
