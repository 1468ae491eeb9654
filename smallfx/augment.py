"""Data augmentation on the accelerator, built from one config string.

Spec grammar (`config.augment`)::

    spec := '' | 'none' | op ('|' op)*
    op   := NAME | NAME '(' [arg (',' arg)*] ')'
    arg  := KEY '=' VALUE | VALUE          (positional values follow the signature)

VALUEs are Python literals read with `ast.literal_eval`; a bare word is a string
(`crop(pad=4, mode=reflect)`). Ops run left to right, e.g.
'crop(pad=4)|flip|trivial|cutmix(alpha=1.0)'.

Per-example ops, `(key, image f32[H,W,C] in [0,1]) -> image`, vmapped over the batch:

    crop(pad=4, mode=zero|reflect)     random crop of the padded image
    rrc(scale_min, scale_max, ratio_min, ratio_max)  random resized crop, bilinear
    flip(p=0.5), vflip(p=0.5)          horizontal / vertical flip
    rotate(deg=15)                     bilinear rotation by U(-deg, deg)
    translate(frac=0.1)                whole-pixel shift by up to frac of the size
    scale(min=0.9, max=1.1)            zoom about the centre
    shear(deg=10)                      shear along a random axis by U(-deg, deg)
    brightness/contrast/saturation/sharpness(strength=0.2)  factor U(1-s, 1+s)
    hue(strength=0.05)                 hue rotation by up to strength turns
    grayscale(p=0.2), solarize(strength=1.0), posterize(bits=4), noise(std=0.05)
    cutout(size=0.25, p=1.0, fill=zero|gray|noise), erase(p=0.5, ...)
    trivial(strength=1.0)              TrivialAugment: one random op per image
    feature_noise(std=0.1)             a table's row: Gaussian noise, unclipped

Batch ops see the whole batch and mix the soft labels f32[B, K]:

    mixup(alpha=0.2, p=1.0), cutmix(alpha=1.0, p=1.0)

Every op with strength or probability 0 is exactly the identity, keeps shape and
dtype, and clips its output to [0, 1] (feature_noise excepted: a table's standardised
features have no range; `TABLE_OPS` are the ops a table takes). saturation, hue and grayscale need RGB and
are the identity on one channel. `describe()` lists the ops with their defaults.

Primitives come from dm-pix (DeepMind's JAX image library) where it has the same
op at no extra cost on XLA:CPU: flip, vflip and solarize. The rest are written
here, each for one of two reasons given at the op: dm-pix's op of that name is a
different operation (brightness, contrast, saturation: TF's definitions, where
TrivialAugment's magnitudes are PIL's), or it is 1.9-74x slower under vmap on
XLA:CPU (resampling, random crop, grayscale, hue). The figures are process CPU
time per call on a batch of 32 images, jitted and vmapped as build() runs them,
medians of 21 rounds on a shared 2-core AMD EPYC, jax 0.10.2, dm-pix 0.4.5;
command and table in experiments/augment/dm_pix.md.
"""

import ast
import inspect
import math
from typing import Callable

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np

from smallfx.errors import UserError, unknown

# ITU-R 601 luma weights: what "grayscale" means for PIL and torchvision too.
_LUMA = (0.299, 0.587, 0.114)


# --------------------------------------------------------------------------- helpers


def _identity(key, image):
  del key
  return image


def _check(op, name, value, lo=None, hi=None, integer=False, choices=None):
  """Validates one argument at build time, so a bad spec fails before tracing."""
  if choices is not None:
    if value not in choices:
      raise UserError(f'augment op {op!r}: bad {name}={value!r}; '
                      f'valid: {", ".join(choices)}')
    return value
  ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  if integer:
    ok = ok and float(value).is_integer()
  ok = ok and (lo is None or value >= lo) and (hi is None or value <= hi)
  if not ok:
    kind = 'an integer' if integer else 'a number'
    bounds = (f' in [{lo}, {hi}]' if lo is not None and hi is not None else
              f' >= {lo}' if lo is not None else f' <= {hi}' if hi is not None else '')
    raise UserError(f'augment op {op!r}: bad {name}={value!r}; must be {kind}{bounds}')
  return int(value) if integer else float(value)


def _gray(image):
  """Luma as (H, W, 1); a one-channel image is already gray."""
  if image.shape[-1] == 1:
    return image
  if image.shape[-1] != 3:
    raise UserError(f'augment: colour ops need 1 or 3 channels, got {image.shape[-1]}')
  # Weighted channel sum, not a matmul: a 3-long contraction per pixel is a tiny
  # batched dot under vmap, which CPU XLA runs many times slower than this.
  # dm_pix.rgb_to_grayscale is that tensordot: grayscale(p=1) on 32 x 32x32x3
  # takes 91 us with it against 47 us with this sum (1.9x).
  return sum(wt * image[..., i:i + 1] for i, wt in enumerate(_LUMA))


def _bilinear(image, ys, xs, edge=False):
  """Samples image at float pixel coordinates ys, xs (H', W') with bilinear weights.

  Four gathers and a weighted sum: XLA fuses this well on CPU and GPU, unlike a
  per-channel map_coordinates. Outside the image is zero, or the nearest edge
  pixel with `edge=True`. Integer coordinates give back exact pixel values (the
  other corners get weight exactly 0), which keeps zero-strength ops exact.

  Known cost on CPU: XLA fuses one resampling op's output into the next op's
  gathers (e.g. 'rrc|flip', 'rotate|scale'), which then run 5-10x slower than
  either op alone (still ~10 ms per 128 images of 32x32x3); optimization_barrier
  does not stop it. Putting flips before a resampling op avoids it.

  Why not dm_pix.affine_transform / dm_pix.rotate: they compute the same thing
  (rotate on a one-pixel zero border in 'nearest' mode matches `rotate` here to
  4e-6; affine_transform in 'nearest' mode matches `rrc` to 2e-6), but resample
  all three axes (eight corners, the channel one with weight 0) through a flat
  gather that XLA:CPU runs slowly under vmap: rotate(deg=30) on 32 images takes
  6.4 ms at 28x28x1 and 17 ms at 32x32x3 against 0.17 and 0.23 ms here (37x, 74x);
  rrc 3.3 / 10.6 ms against 0.11 / 0.17 ms (31x, 62x). Every geometric op of
  `trivial` runs on every image under vmap, so that would multiply the step's cost.
  """
  h, w, _ = image.shape
  if edge:
    ys = jnp.clip(ys, 0, h - 1)
    xs = jnp.clip(xs, 0, w - 1)
  y0 = jnp.floor(ys)
  x0 = jnp.floor(xs)
  wy = ys - y0
  wx = xs - x0
  y0 = y0.astype(jnp.int32)
  x0 = x0.astype(jnp.int32)
  out = jnp.zeros(ys.shape + image.shape[-1:], image.dtype)
  for dy, wgt_y in ((0, 1 - wy), (1, wy)):
    for dx, wgt_x in ((0, 1 - wx), (1, wx)):
      yi = y0 + dy
      xi = x0 + dx
      inside = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
      wgt = jnp.where(inside, wgt_y * wgt_x, 0).astype(image.dtype)
      pix = image[jnp.clip(yi, 0, h - 1), jnp.clip(xi, 0, w - 1)]
      out = out + wgt[..., None] * pix
  return out


def _affine(image, mat, shift=(0.0, 0.0)):
  """Warps image about its centre: source = mat @ (target - centre) + centre + shift.

  `mat` maps output offsets (dy, dx) to source offsets, i.e. it is the inverse of
  the visible transform; the ops draw symmetric parameters, so the sign is moot.
  """
  h, w, _ = image.shape
  cy, cx = (h - 1) / 2, (w - 1) / 2
  dy = jnp.arange(h, dtype=jnp.float32)[:, None] - cy
  dx = jnp.arange(w, dtype=jnp.float32)[None, :] - cx
  ys = mat[0][0] * dy + mat[0][1] * dx + cy + shift[0]
  xs = mat[1][0] * dy + mat[1][1] * dx + cx + shift[1]
  return jnp.clip(_bilinear(image, ys, xs), 0, 1)


def _box(h, w, y0, y1, x0, x1):
  """(H, W) bool mask of the pixels whose centres lie in [y0, y1) x [x0, x1)."""
  yc = jnp.arange(h, dtype=jnp.float32)[:, None] + 0.5
  xc = jnp.arange(w, dtype=jnp.float32)[None, :] + 0.5
  return (yc >= y0) & (yc < y1) & (xc >= x0) & (xc < x1)


def _u(key, n):
  """n uniforms in [0, 1) from one PRNG call.

  Every op draws all its random numbers at once: each jax.random call inlines a
  threefry hash, and under vmap those dominate compile time on CPU.
  """
  return jax.random.uniform(key, (n,), jnp.float32)


def _between(u, lo, hi):
  return lo + (hi - lo) * u


def _factor(key, strength):
  return _between(_u(key, 1)[0], 1 - strength, 1 + strength)


# --------------------------------------------------------------------------- geometry


def crop(pad: int = 4, mode: str = 'zero'):
  """Random crop of the image padded by `pad` pixels on every side."""
  pad = _check('crop', 'pad', pad, lo=0, integer=True)
  mode = _check('crop', 'mode', mode, choices=('reflect', 'zero'))
  if pad == 0:
    return _identity

  def op(key, image):
    h, w, c = image.shape
    if mode == 'reflect' and pad >= min(h, w):
      raise UserError(f'augment op \'crop\': reflect padding needs pad < image size '
                      f'({min(h, w)}), got pad={pad}')
    padded = jnp.pad(image, ((pad, pad), (pad, pad), (0, 0)),
                     mode='constant' if mode == 'zero' else 'reflect')
    # A dynamic_slice of the padded image: one gather under vmap, no roll or mask.
    # dm_pix.random_crop is this slice too, but draws each offset with its own
    # split key and randint (seven threefry hashes per image instead of one):
    # crop(pad=2) on 32 images takes 89 us at 28x28x1 and 106 us at 32x32x3 with
    # it, 23 and 42 us with this (3.8x, 2.5x).
    dy, dx = jnp.minimum(jnp.floor(_u(key, 2) * (2 * pad + 1)), 2 * pad).astype(jnp.int32)
    return jax.lax.dynamic_slice(padded, (dy, dx, 0), (h, w, c))
  return op


def rrc(scale_min: float = 0.08, scale_max: float = 1.0,
        ratio_min: float = 0.75, ratio_max: float = 1.333):
  """Random resized crop: a box of random area and aspect, resized back (bilinear)."""
  scale_min = _check('rrc', 'scale_min', scale_min, lo=1e-3, hi=1)
  scale_max = _check('rrc', 'scale_max', scale_max, lo=scale_min, hi=1)
  ratio_min = _check('rrc', 'ratio_min', ratio_min, lo=1e-2)
  ratio_max = _check('rrc', 'ratio_max', ratio_max, lo=ratio_min)
  if scale_min == 1 and ratio_min == 1 and ratio_max == 1:
    return _identity

  def op(key, image):
    h, w, _ = image.shape
    u = _u(key, 4)
    area = _between(u[0], scale_min, scale_max)
    ratio = jnp.exp(_between(u[1], math.log(ratio_min), math.log(ratio_max)))
    # Aspect is relative to the image's own aspect, so scale=ratio=1 is the whole
    # image for any shape. Clipping instead of torchvision's 10 rejection tries
    # keeps this branch-free; it only biases extreme aspects towards the edge.
    ch = jnp.clip(h * jnp.sqrt(area / ratio), 1, h)
    cw = jnp.clip(w * jnp.sqrt(area * ratio), 1, w)
    y0 = u[2] * (h - ch)
    x0 = u[3] * (w - cw)
    ys = y0 + (jnp.arange(h, dtype=jnp.float32)[:, None] + 0.5) * (ch / h) - 0.5
    xs = x0 + (jnp.arange(w, dtype=jnp.float32)[None, :] + 0.5) * (cw / w) - 0.5
    ys, xs = jnp.broadcast_arrays(ys, xs)
    # Edge clamping: half-pixel overshoot at the box border must not pull in black.
    return jnp.clip(_bilinear(image, ys, xs, edge=True), 0, 1)
  return op


def flip(p: float = 0.5):
  """Horizontal (left-right) flip with probability p."""
  p = _check('flip', 'p', p, lo=0, hi=1)
  if p == 0:
    return _identity

  def op(key, image):
    return pix.random_flip_left_right(key, image, probability=p)
  return op


def vflip(p: float = 0.5):
  """Vertical (up-down) flip with probability p."""
  p = _check('vflip', 'p', p, lo=0, hi=1)
  if p == 0:
    return _identity

  def op(key, image):
    return pix.random_flip_up_down(key, image, probability=p)
  return op


def rotate(deg: float = 15.0):
  """Rotation about the centre by U(-deg, deg) degrees, bilinear, zero fill."""
  deg = _check('rotate', 'deg', deg, lo=0, hi=180)
  if deg == 0:
    return _identity

  def op(key, image):
    a = jnp.deg2rad(_between(_u(key, 1)[0], -deg, deg))
    c, s = jnp.cos(a), jnp.sin(a)
    return _affine(image, ((c, -s), (s, c)))
  return op


def translate(frac: float = 0.1):
  """Shift by whole pixels, up to `frac` of the height/width each way, zero fill."""
  frac = _check('translate', 'frac', frac, lo=0, hi=1)
  if frac == 0:
    return _identity

  def op(key, image):
    h, w, _ = image.shape
    # Whole pixels: a sub-pixel shift would blur every image for no benefit.
    t = jnp.round(_between(_u(key, 2), -frac, frac) * jnp.asarray([h, w], jnp.float32))
    return _affine(image, ((1.0, 0.0), (0.0, 1.0)), (t[0], t[1]))
  return op


def scale(min: float = 0.9, max: float = 1.1):  # pylint: disable=redefined-builtin
  """Zoom about the centre by a factor U(min, max), bilinear, zero fill."""
  lo = _check('scale', 'min', min, lo=0.05)
  hi = _check('scale', 'max', max, lo=lo)
  if lo == 1 and hi == 1:
    return _identity

  def op(key, image):
    z = 1 / _between(_u(key, 1)[0], lo, hi)
    return _affine(image, ((z, 0.0), (0.0, z)))
  return op


def shear(deg: float = 10.0):
  """Shear along a random axis (x or y) by U(-deg, deg) degrees, bilinear."""
  deg = _check('shear', 'deg', deg, lo=0, hi=80)
  if deg == 0:
    return _identity

  def op(key, image):
    u = _u(key, 2)
    t = jnp.tan(jnp.deg2rad(_between(u[0], -deg, deg)))
    # One axis at a time (as shear_x / shear_y in AutoAugment): keeps the area.
    on_x = u[1] < 0.5
    zero = jnp.zeros((), jnp.float32)
    return _affine(image, ((1.0, jnp.where(on_x, zero, t)),
                           (jnp.where(on_x, t, zero), 1.0)))
  return op


# --------------------------------------------------------------------------- colour


# brightness, contrast and saturation stay written here: dm-pix's ops of those
# names are TensorFlow's, which are different operations from PIL's (the ones
# TrivialAugment's magnitudes and torchvision are defined with):
#   dm_pix.adjust_brightness adds a delta; PIL multiplies (blends with black).
#   dm_pix.adjust_contrast blends each channel with its own mean, which tints a
#     low-contrast RGB image; PIL blends with the mean gray level. (On one
#     channel the two agree and cost the same: 25 us with dm-pix, 23 us here.)
#   dm_pix.adjust_saturation scales HSV saturation, clipped at 1; PIL blends with
#     the gray image, and can overshoot. It is also 2.7x slower (228 against
#     85 us on 32 x 32x32x3).


def brightness(strength: float = 0.2):
  """Multiplies by a factor U(1-s, 1+s)."""
  s = _check('brightness', 'strength', strength, lo=0, hi=1)
  if s == 0:
    return _identity

  def op(key, image):
    return jnp.clip(image * _factor(key, s), 0, 1)
  return op


def contrast(strength: float = 0.2):
  """Blends with the image's mean gray level by a factor U(1-s, 1+s)."""
  s = _check('contrast', 'strength', strength, lo=0, hi=1)
  if s == 0:
    return _identity

  def op(key, image):
    # Mean of the luma = luma of the channel means: reduce first, it is cheaper.
    mean = jnp.mean(_gray(jnp.mean(image, axis=(0, 1), keepdims=True)))
    return jnp.clip(mean + _factor(key, s) * (image - mean), 0, 1)
  return op


def saturation(strength: float = 0.2):
  """Blends with the grayscale image by a factor U(1-s, 1+s). RGB only."""
  s = _check('saturation', 'strength', strength, lo=0, hi=1)
  if s == 0:
    return _identity

  def op(key, image):
    if image.shape[-1] == 1:
      return image
    gray = _gray(image)
    return jnp.clip(gray + _factor(key, s) * (image - gray), 0, 1)
  return op


# RGB <-> YIQ. A hue shift is a rotation of the (I, Q) chroma plane about the gray
# axis: one 3x3 matrix per image instead of an RGB->HSV->RGB round trip with its
# piecewise branches. dm_pix.adjust_hue is that HSV round trip (TF's and
# torchvision's hue): hue(strength=0.1) on 32 x 32x32x3 takes 239 us with it
# against 107 us with this (2.2x). Both keep gray pixels gray; they differ in how
# far each colour moves for a given angle.
_YIQ = np.array([[0.299, 0.587, 0.114],
                 [0.595716, -0.274453, -0.321263],
                 [0.211456, -0.522591, 0.311135]], np.float32)
_YIQ_INV = np.linalg.inv(_YIQ).astype(np.float32)


def hue(strength: float = 0.05):
  """Rotates the hue by U(-s, s) turns (0.5 = opposite colour). RGB only."""
  s = _check('hue', 'strength', strength, lo=0, hi=0.5)
  if s == 0:
    return _identity

  def op(key, image):
    if image.shape[-1] == 1:
      return image
    a = 2 * jnp.pi * _between(_u(key, 1)[0], -s, s)
    c, si = jnp.cos(a), jnp.sin(a)
    rot = jnp.array([[1, 0, 0], [0, c, -si], [0, si, c]], jnp.float32)
    mat = (jnp.asarray(_YIQ_INV) @ rot @ jnp.asarray(_YIQ)).astype(image.dtype)
    # Channel sums rather than `image @ mat.T`: see _gray (about 10x faster on CPU).
    out = jnp.stack([sum(mat[r, k] * image[..., k] for k in range(3)) for r in range(3)], -1)
    return jnp.clip(out, 0, 1)
  return op


def grayscale(p: float = 0.2):
  """Replaces the image by its luma (kept 3-channel) with probability p."""
  p = _check('grayscale', 'p', p, lo=0, hi=1)
  if p == 0:
    return _identity

  def op(key, image):
    if image.shape[-1] == 1:
      return image
    gray = jnp.broadcast_to(_gray(image), image.shape)
    return jnp.where(_u(key, 1)[0] < p, gray, image)
  return op


def sharpness(strength: float = 0.2):
  """Blends with a 3x3 smoothed copy (PIL's kernel) by a factor U(1-s, 1+s)."""
  s = _check('sharpness', 'strength', strength, lo=0, hi=1)
  if s == 0:
    return _identity

  def op(key, image):
    h, w, _ = image.shape
    padded = jnp.pad(image, ((1, 1), (1, 1), (0, 0)), mode='edge')
    # Nine shifted slices instead of a conv: no layout change, fuses into one loop.
    blur = sum(padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3))
    blur = (blur + 4 * image) / 13
    return jnp.clip(blur + _factor(key, s) * (image - blur), 0, 1)
  return op


def solarize(strength: float = 1.0):
  """Inverts pixels above a threshold U(1-s, 1)."""
  s = _check('solarize', 'strength', strength, lo=0, hi=1)
  if s == 0:
    return _identity

  def op(key, image):
    t = _between(_u(key, 1)[0], 1 - s, 1)
    return pix.solarize(image, t)  # inverts the pixels >= t
  return op


def posterize(bits: int = 4):
  """Keeps U{bits..8} high bits of each 8-bit value (8 bits = unchanged)."""
  bits = _check('posterize', 'bits', bits, lo=1, hi=8, integer=True)
  if bits == 8:
    return _identity

  def op(key, image):
    b = jnp.minimum(bits + jnp.floor(_u(key, 1)[0] * (9 - bits)), 8)
    step = jnp.exp2(8 - b).astype(image.dtype)
    q = jnp.floor(jnp.round(image * 255) / step) * step / 255
    return jnp.where(b >= 8, image, q)
  return op


def noise(std: float = 0.05):
  """Adds Gaussian noise of standard deviation `std`."""
  std = _check('noise', 'std', std, lo=0)
  if std == 0:
    return _identity

  def op(key, image):
    return jnp.clip(image + std * jax.random.normal(key, image.shape, image.dtype), 0, 1)
  return op


def feature_noise(std: float = 0.1):
  """Adds Gaussian noise of standard deviation `std`, unclipped: a table's standardised features."""
  std = _check('feature_noise', 'std', std, lo=0)
  if std == 0:
    return _identity

  def op(key, x):
    return x + std * jax.random.normal(key, x.shape, x.dtype)
  return op


# --------------------------------------------------------------------------- occlusion


def _fill(key, image, mask, fill):
  if fill == 'noise':
    value = jax.random.uniform(jax.random.fold_in(key, 1), image.shape, image.dtype)
  else:
    value = jnp.full_like(image, 0.5 if fill == 'gray' else 0.0)
  return jnp.where(mask[..., None], value, image)


def cutout(size: float = 0.25, p: float = 1.0, fill: str = 'zero'):
  """Blanks a box of `size` x the height and width, centred anywhere in the image."""
  size = _check('cutout', 'size', size, lo=0, hi=1)
  p = _check('cutout', 'p', p, lo=0, hi=1)
  fill = _check('cutout', 'fill', fill, choices=('gray', 'noise', 'zero'))
  if size == 0 or p == 0:
    return _identity

  def op(key, image):
    h, w, _ = image.shape
    u = _u(key, 3)
    # The centre may lie near the border so the box is partly outside, as in
    # DeVries & Taylor: border pixels get cut as often as central ones.
    cy, cx = u[0] * h, u[1] * w
    hh, hw = size * h / 2, size * w / 2
    mask = _box(h, w, cy - hh, cy + hh, cx - hw, cx + hw) & (u[2] < p)
    return _fill(key, image, mask, fill)
  return op


def erase(p: float = 0.5, scale_min: float = 0.02, scale_max: float = 0.33,
          ratio_min: float = 0.3, ratio_max: float = 3.3, fill: str = 'noise'):
  """Random erasing: a box of random area and aspect inside the image, noise-filled."""
  p = _check('erase', 'p', p, lo=0, hi=1)
  scale_min = _check('erase', 'scale_min', scale_min, lo=0, hi=1)
  scale_max = _check('erase', 'scale_max', scale_max, lo=scale_min, hi=1)
  ratio_min = _check('erase', 'ratio_min', ratio_min, lo=1e-2)
  ratio_max = _check('erase', 'ratio_max', ratio_max, lo=ratio_min)
  fill = _check('erase', 'fill', fill, choices=('gray', 'noise', 'zero'))
  if p == 0 or scale_max == 0:
    return _identity

  def op(key, image):
    h, w, _ = image.shape
    u = _u(key, 5)
    area = _between(u[0], scale_min, scale_max)
    ratio = jnp.exp(_between(u[1], math.log(ratio_min), math.log(ratio_max)))
    bh = jnp.minimum(h * jnp.sqrt(area / ratio), h)
    bw = jnp.minimum(w * jnp.sqrt(area * ratio), w)
    y0, x0 = u[2] * (h - bh), u[3] * (w - bw)
    mask = _box(h, w, y0, y0 + bh, x0, x0 + bw) & (u[4] < p)
    return _fill(key, image, mask, fill)
  return op


# --------------------------------------------------------------------------- policy


def trivial(strength: float = 1.0):
  """TrivialAugment: per image, one uniformly chosen op at a uniform random strength.

  Each op below draws its parameter uniformly from a symmetric range, which is the
  same as TrivialAugment's uniform magnitude with a random sign. The ranges are
  the RandAugment/TrivialAugment (not "wide") ones, times `strength`.
  """
  s = _check('trivial', 'strength', strength, lo=0, hi=1)
  if s == 0:
    return _identity
  geometric = [rotate(30 * s), shear(math.degrees(math.atan(0.3)) * s),
               translate(0.45 * s)]
  tone = [brightness(0.9 * s), contrast(0.9 * s), sharpness(0.9 * s),
          solarize(s), posterize(8 - round(4 * s))]
  colour = [saturation(0.9 * s)]

  def op(key, image):
    # Chosen at trace time from the static channel count, so gray images do not
    # get a dead (identity) colour branch that skews the op frequencies.
    branches = [_identity] + geometric + tone + (colour if image.shape[-1] == 3 else [])
    k_op, k_arg = jax.random.split(key)
    index = jnp.minimum(jnp.floor(_u(k_op, 1)[0] * len(branches)), len(branches) - 1)
    # Under vmap the index is batched and lax.switch becomes a select over all
    # branches; they are all cheap elementwise or gather ops, so that is fine.
    return jax.lax.switch(index.astype(jnp.int32), branches, k_arg, image)
  return op


# --------------------------------------------------------------------------- batch ops
#
# Labels are class-probability vectors f32[B, K] (one-hot, or already mixed), and
# the mixed label is lam * y_a + (1 - lam) * y_b, so rows still sum to one. For
# the cosine loss the training code turns these into target vectors by a matrix
# product with the class embedding matrix; that product is linear, so mixing the
# probability vectors here is exactly mixing the target vectors.


def _lam_and_partner(key, alpha, p, batch):
  """The mixing weight (1 where the op is skipped) and each example's partner.

  Partners are a random cyclic shift of the batch: one gather, and unlike a
  permutation it never pairs an example with itself. The batch is a random draw
  from the training set, so the pairs are as random as with a permutation.
  """
  k_lam, k_u = jax.random.split(key)
  u = _u(k_u, 2)
  lam = jnp.where(u[0] < p, jax.random.beta(k_lam, alpha, alpha), 1.0).astype(jnp.float32)
  shift = 1 + jnp.floor(u[1] * (batch - 1)).astype(jnp.int32) if batch > 1 else 0
  return lam, (jnp.arange(batch) + shift) % batch


def mixup(alpha: float = 0.2, p: float = 1.0):
  """Mixup: x = lam x_a + (1 - lam) x_b with lam ~ Beta(alpha, alpha) per batch."""
  alpha = _check('mixup', 'alpha', alpha, lo=0)
  p = _check('mixup', 'p', p, lo=0, hi=1)
  if alpha == 0 or p == 0:
    return None

  def op(key, images, labels):
    lam, perm = _lam_and_partner(key, alpha, p, images.shape[0])
    images = lam.astype(images.dtype) * images + (1 - lam).astype(images.dtype) * images[perm]
    labels = lam.astype(labels.dtype) * labels + (1 - lam).astype(labels.dtype) * labels[perm]
    return images, labels
  return op


def cutmix(alpha: float = 1.0, p: float = 1.0):
  """CutMix: paste a box of area ~ 1 - lam from a shuffled batch; lam = kept area."""
  alpha = _check('cutmix', 'alpha', alpha, lo=0)
  p = _check('cutmix', 'p', p, lo=0, hi=1)
  if alpha == 0 or p == 0:
    return None

  def op(key, images, labels):
    _, h, w, _ = images.shape
    k_lam, k_pos = jax.random.split(key)
    drawn, perm = _lam_and_partner(k_lam, alpha, p, images.shape[0])
    cut = jnp.sqrt(1 - drawn)
    cy, cx = _u(k_pos, 2) * jnp.asarray([h, w], jnp.float32)
    # Whole-pixel box edges, clipped to the image: then the label weight below is
    # exactly the pasted pixel fraction, not the drawn lam.
    y0 = jnp.clip(jnp.round(cy - cut * h / 2), 0, h)
    y1 = jnp.clip(jnp.round(cy + cut * h / 2), 0, h)
    x0 = jnp.clip(jnp.round(cx - cut * w / 2), 0, w)
    x1 = jnp.clip(jnp.round(cx + cut * w / 2), 0, w)
    mask = _box(h, w, y0, y1, x0, x1)
    lam = 1 - jnp.mean(mask.astype(jnp.float32))
    images = jnp.where(mask[None, :, :, None], images[perm], images)
    labels = lam.astype(labels.dtype) * labels + (1 - lam).astype(labels.dtype) * labels[perm]
    return images, labels
  return op


# --------------------------------------------------------------------------- registry

# name -> per-example op factory: keyword arguments -> (key, image) -> image.
OPS = {f.__name__: f for f in (
    crop, rrc, flip, vflip, rotate, translate, scale, shear, brightness, contrast,
    saturation, hue, grayscale, sharpness, solarize, posterize, noise, feature_noise, cutout,
    erase, trivial)}
# name -> batch op factory: -> (key, images, labels) -> (images, labels), or None
# when the arguments make it the identity.
BATCH_OPS = {f.__name__: f for f in (mixup, cutmix)}


# The ops that make sense for a table's feature vectors (the rest move pixels).
TABLE_OPS = ('feature_noise', 'mixup')


def check_for_tables(spec: str) -> None:
  """Refuses, in one line, an op of `spec` that only makes sense for images."""
  spec = (spec or '').strip()
  if spec.lower() in ('', 'none', 'auto'):
    return
  for item in spec.split('|'):
    name = _parse_op(item.strip())[0]
    if name not in TABLE_OPS:
      raise UserError(f'augment op {name!r} works on images; a table\'s rows take '
                      f"{', '.join(TABLE_OPS)} (e.g. --config.augment='feature_noise(std=0.1)')")


def describe() -> str:
  """One line per op: its call with default arguments and what it does."""
  lines = []
  for name, factory in {**OPS, **BATCH_OPS}.items():
    args = ', '.join(f'{p.name}={p.default!r}'
                     for p in inspect.signature(factory).parameters.values())
    doc = (factory.__doc__ or '').strip().splitlines()[0]
    lines.append(f'  {name}({args}): {doc}')
  return ('augment spec: ops joined by "|", e.g. "crop(pad=4)|flip|trivial"; '
          '"" or "none" for no augmentation.\n' + '\n'.join(lines))


def _value(node, item):
  if isinstance(node, ast.Name):  # bare word: crop(mode=reflect)
    return node.id
  try:
    return ast.literal_eval(node)
  except ValueError:
    raise UserError(f'augment spec {item!r}: arguments must be literals, '
                    f'got {ast.unparse(node)!r}') from None


def _parse_op(item):
  """'name(k=v, ...)' -> (name, args, kwargs), without evaluating any code."""
  try:
    node = ast.parse(item, mode='eval').body
  except SyntaxError:
    raise UserError(f'augment spec {item!r}: not of the form name or '
                    f'name(key=value, ...)') from None
  if isinstance(node, ast.Name):
    return node.id, [], {}
  if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
      and all(k.arg is not None for k in node.keywords)
      and not any(isinstance(a, ast.Starred) for a in node.args)):
    return (node.func.id, [_value(a, item) for a in node.args],
            {k.arg: _value(k.value, item) for k in node.keywords})
  raise UserError(f'augment spec {item!r}: not of the form name or '
                  f'name(key=value, ...)')


def _make(item):
  name, args, kwargs = _parse_op(item)
  registry = OPS if name in OPS else BATCH_OPS
  if name not in registry:
    raise unknown('augmentation', name, [*OPS, *BATCH_OPS])
  factory = registry[name]
  signature = inspect.signature(factory)
  valid = ', '.join(signature.parameters) or '(none)'
  for key in kwargs:
    if key not in signature.parameters:
      raise UserError(f'augment op {name!r}: unknown argument {key!r}; valid: {valid}')
  try:
    signature.bind(*args, **kwargs)
  except TypeError as e:
    raise UserError(f'augment op {name!r}: {e}; valid arguments: {valid}') from None
  return registry is BATCH_OPS, factory(*args, **kwargs)


def parse(spec: str):
  """Spec string -> list of stages: ('example', [ops]) or ('batch', op)."""
  spec = (spec or '').strip()
  if spec.lower() in ('', 'none'):
    return []
  stages = []
  for item in spec.split('|'):
    item = item.strip()
    if not item:
      raise UserError(f'augment spec {spec!r}: empty op between "|"')
    is_batch, op = _make(item)
    if op is None or op is _identity:
      continue
    if is_batch:
      stages.append(('batch', op))
    elif stages and stages[-1][0] == 'example':
      stages[-1][1].append(op)
    else:
      stages.append(('example', [op]))
  return stages


def _chain(ops):
  def one(keys, image):
    for k, op in zip(keys, ops):
      image = op(k, image).astype(image.dtype)
    return image
  return one


def build(spec: str) -> Callable[[jax.Array, jax.Array, jax.Array],
                                 tuple[jax.Array, jax.Array]]:
  """Returns apply(key, images f32[B,H,W,C] in [0,1], labels f32[B,K]) -> (images, labels).

  Per-example ops are jax.vmap-ped over the batch with a split key per example;
  batch ops (mixup, cutmix) see the whole batch. Pure, jit-able. Raises UserError
  for a bad spec, here rather than at trace time.
  """
  stages = [(kind, _chain(ops), len(ops)) if kind == 'example' else (kind, ops, 0)
            for kind, ops in parse(spec)]

  def apply(key, images, labels):
    if not stages:
      return images, labels
    for k, (kind, fn, n) in zip(jax.random.split(key, len(stages)), stages):
      if kind == 'example':
        # All per-example keys in one split outside the vmap: a split inside it
        # would be another batched threefry per op.
        keys = jax.random.split(k, (images.shape[0], n))
        images = jax.vmap(fn)(keys, images)
      else:
        images, labels = fn(k, images, labels)
    return images, labels
  return apply
