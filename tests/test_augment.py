"""Tests for smallfx.augment: op contracts, exact geometry, label mixing, parsing."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smallfx import augment
from smallfx.errors import UserError

B, H, W, K = 8, 16, 16, 8

# One spec per op, strong enough that different keys visibly differ.
RANDOM_SPECS = [
    'crop(pad=4)', 'crop(pad=3, mode=reflect)', 'rrc', 'flip', 'vflip', 'rotate(deg=30)',
    'translate(frac=0.25)', 'scale(min=0.7, max=1.3)', 'shear(deg=20)',
    'brightness(strength=0.5)', 'contrast(strength=0.5)', 'saturation(strength=0.5)',
    'hue(strength=0.2)', 'grayscale(p=0.5)', 'sharpness(strength=0.9)', 'solarize',
    'posterize(bits=2)', 'noise(std=0.1)', 'cutout(size=0.5)', 'erase(p=1.0)',
    'cutout(size=0.4, fill=noise)', 'trivial', 'mixup(alpha=1.0)', 'cutmix(alpha=1.0)',
]
COLOUR_ONLY = ('saturation', 'hue', 'grayscale')

# The same ops with zero strength or probability.
ZERO_SPECS = [
    'crop(pad=0)', 'rrc(scale_min=1, ratio_min=1, ratio_max=1)', 'flip(p=0)',
    'vflip(p=0)', 'rotate(deg=0)', 'translate(frac=0)', 'scale(min=1, max=1)',
    'shear(deg=0)', 'brightness(strength=0)', 'contrast(strength=0)',
    'saturation(strength=0)', 'hue(strength=0)', 'grayscale(p=0)', 'sharpness(strength=0)',
    'solarize(strength=0)', 'posterize(bits=8)', 'noise(std=0)', 'cutout(size=0)',
    'cutout(p=0)', 'erase(p=0)', 'trivial(strength=0)', 'mixup(alpha=0)', 'cutmix(p=0)',
    'none', '',
]

# Resampling ops at a tiny (but nonzero, so traced) strength: checks the sampling
# grid itself is centred, which the zero-strength shortcut would hide.
TINY_SPECS = [
    'rrc(scale_min=0.9999, ratio_min=0.9999, ratio_max=1.0001)', 'rotate(deg=1e-4)',
    'scale(min=0.99999, max=1.00001)', 'shear(deg=1e-4)', 'hue(strength=1e-6)',
]


# Compiling dominates this file's runtime. So the tests share one image shape
# (B, H, W), and the specs of RANDOM_SPECS run in one jitted function that
# applies all of them (one compile per channel count, about half the time of one
# compile per spec); the result is picked by spec.
@functools.lru_cache(maxsize=None)
def _all_specs():
  fns = {spec: augment.build(spec) for spec in RANDOM_SPECS}
  return jax.jit(lambda key, x, y: {spec: f(key, x, y) for spec, f in fns.items()})


@functools.lru_cache(maxsize=None)
def _jitted(spec):
  if spec in RANDOM_SPECS:
    return lambda key, x, y: _all_specs()(key, x, y)[spec]
  return jax.jit(augment.build(spec))


def _images(seed=0, c=3, b=B, lo=0.0):
  return jax.random.uniform(jax.random.key(seed), (b, H, W, c), jnp.float32, lo, 1.0)


def _labels(b=B):
  return jax.nn.one_hot(jnp.arange(b) % K, K, dtype=jnp.float32)


def _run(spec, seed=0, c=3, key=0, images=None, labels=None):
  images = _images(seed, c) if images is None else jnp.asarray(images, jnp.float32)
  labels = _labels(images.shape[0]) if labels is None else jnp.asarray(labels, jnp.float32)
  return _jitted(spec)(jax.random.key(key), images, labels)


# --------------------------------------------------------------------------- contracts


@pytest.mark.parametrize('c', [1, 3])
@pytest.mark.parametrize('spec', RANDOM_SPECS)
@pytest.mark.slow
def test_shape_dtype_range_and_determinism(spec, c):
  x = _images(c=c)
  out, labels = _run(spec, c=c)
  chex.assert_shape(out, x.shape)
  chex.assert_type(out, jnp.float32)
  chex.assert_shape(labels, (B, K))
  assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
  again, _ = _run(spec, c=c)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(again))
  other, _ = _run(spec, c=c, key=1)
  if c == 1 and spec.split('(')[0] in COLOUR_ONLY:
    # Colour ops are the identity on one channel, whatever the key.
    chex.assert_trees_all_equal(out, x)
    chex.assert_trees_all_equal(other, x)
  else:
    assert not np.array_equal(np.asarray(out), np.asarray(other)), spec
    assert not np.array_equal(np.asarray(out), np.asarray(x)), spec


@pytest.mark.parametrize('c', [1, 3])
@pytest.mark.parametrize('spec', ZERO_SPECS)
def test_zero_strength_is_identity(spec, c):
  x = _images(c=c)
  y = _labels()
  out, labels = augment.build(spec)(jax.random.key(0), x, y)  # eager: no compile
  chex.assert_trees_all_close(out, x, atol=0, rtol=0)
  chex.assert_trees_all_close(labels, y, atol=0, rtol=0)


@pytest.mark.parametrize('spec', TINY_SPECS)
def test_tiny_strength_is_nearly_identity(spec):
  x = _images()
  out, labels = _run(spec, images=x)
  chex.assert_trees_all_close(out, x, atol=2e-3)
  chex.assert_trees_all_equal(labels, _labels())


@pytest.mark.parametrize('spec', [s for s in RANDOM_SPECS if 'mix' not in s])
def test_per_example_ops_leave_labels_alone(spec):
  y = np.random.default_rng(3).dirichlet(np.ones(K), B).astype(np.float32)
  _, labels = _run(spec, labels=y)
  chex.assert_trees_all_equal(labels, y)


def test_per_example_ops_use_a_key_per_example():
  # Identical images in, different augmentations out.
  x = jnp.broadcast_to(_images(b=1), (B, H, W, 3))
  out, _ = _run('rotate(deg=30)', images=x)
  assert len({np.asarray(o).tobytes() for o in out}) == B


# --------------------------------------------------------------------------- geometry


@pytest.mark.parametrize('op', ['flip', 'vflip'])
def test_flip_twice_is_identity_and_flip_mirrors(op):
  x = _images()
  twice, _ = _run(f'{op}(p=1)|{op}(p=1)', images=x)
  chex.assert_trees_all_equal(twice, x)
  once, _ = _run(f'{op}(p=1)', images=x)
  axis = 2 if op == 'flip' else 1
  chex.assert_trees_all_equal(once, jnp.flip(x, axis))
  half, _ = _run(op, images=x)
  flipped = [bool(jnp.array_equal(h, jnp.flip(i, axis - 1))) for h, i in zip(half, x)]
  kept = [bool(jnp.array_equal(h, i)) for h, i in zip(half, x)]
  assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)


def _window_shifts(out, x, pad, mode):
  """The (dy, dx) of the window of the padded x equal to out, or None."""
  padded = np.pad(x, ((pad, pad), (pad, pad), (0, 0)),
                  mode='constant' if mode == 'zero' else 'reflect')
  for dy in range(2 * pad + 1):
    for dx in range(2 * pad + 1):
      if np.array_equal(padded[dy:dy + H, dx:dx + W], out):
        return dy, dx
  return None


@pytest.mark.parametrize('spec, pad, mode', [('crop(pad=4)', 4, 'zero'),
                                             ('crop(pad=3, mode=reflect)', 3, 'reflect')])
def test_crop_is_a_window_of_the_padded_image(spec, pad, mode):
  # Strictly positive pixels, so zero padding is told apart from image content.
  x = np.asarray(_images(c=1, lo=0.1))
  outs = np.concatenate([np.asarray(_run(spec, images=jnp.asarray(x), key=k)[0])
                         for k in range(4)])
  shifts = [_window_shifts(o, i, pad, mode) for o, i in zip(outs, np.tile(x, (4, 1, 1, 1)))]
  assert None not in shifts
  assert len(set(shifts)) > 8  # the offsets are random, not stuck at one corner
  if mode == 'zero':
    for (dy, dx), o in zip(shifts, outs):
      inside = np.zeros((H, W), bool)
      inside[max(pad - dy, 0):H + min(pad - dy, 0), max(pad - dx, 0):W + min(pad - dx, 0)] = True
      assert (o[~inside] == 0).all() and (o[inside] > 0).all()


def test_translate_is_an_exact_whole_pixel_shift():
  x = np.asarray(_images(c=3, lo=0.1))
  out, _ = _run('translate(frac=0.25)', images=jnp.asarray(x))
  shifts = [_window_shifts(o, i, 4, 'zero') for o, i in zip(np.asarray(out), x)]
  assert None not in shifts and len(set(shifts)) > 4


def test_rrc_resamples_a_linear_ramp_linearly():
  ramp = jnp.broadcast_to(jnp.arange(W, dtype=jnp.float32) / (W - 1), (B, H, W))[..., None]
  out, _ = _run('rrc(scale_min=0.25, scale_max=0.25, ratio_min=1, ratio_max=1)',
                images=ramp)
  # A quarter-area square box is half the width, so the slope halves everywhere.
  np.testing.assert_allclose(np.diff(np.asarray(out), axis=2), 0.5 / (W - 1), atol=1e-5)
  np.testing.assert_allclose(np.diff(np.asarray(out), axis=1), 0.0, atol=1e-6)
  assert len({float(o[0, 0, 0]) for o in out}) > 1  # random position


def test_rotation_keeps_a_centred_blob_and_moves_a_bar():
  r2 = ((jnp.arange(H)[:, None] - (H - 1) / 2) ** 2 + (jnp.arange(W)[None] - (W - 1) / 2) ** 2)
  blob = jnp.broadcast_to(jnp.exp(-r2 / 18.0)[..., None], (B, H, W, 1))
  out, _ = _run('rotate(deg=180)', images=blob)
  # Only bilinear interpolation error remains for a radially symmetric image.
  chex.assert_trees_all_close(out, blob, atol=0.03)
  bar = jnp.zeros((B, H, W, 1)).at[:, H // 2 - 1:H // 2 + 1, 2:-2].set(1.0)
  turned, _ = _run('rotate(deg=180)', images=bar)
  assert float(jnp.abs(turned - bar).max()) > 0.5
  # Bilinear weights sum to one: the mass inside the image is roughly kept.
  np.testing.assert_allclose(turned.sum((1, 2, 3)), bar.sum((1, 2, 3)), rtol=0.2)


# --------------------------------------------------------------------------- colour


def test_colour_ops_keep_gray_pixels_gray_and_grayscale_is_gray():
  gray = jnp.broadcast_to(_images(c=1), (B, H, W, 3))
  for spec in ('hue(strength=0.5)', 'saturation(strength=1)'):
    out, _ = _run(spec, images=gray)
    chex.assert_trees_all_close(out, gray, atol=1e-5)
  x = _images()
  out, _ = _run('grayscale(p=1)', images=x)
  chex.assert_trees_all_close(out[..., 0], out[..., 1], out[..., 2])
  hue, _ = _run('hue(strength=0.5)', images=x)
  assert float(jnp.abs(hue - x).mean()) > 0.02


def test_tone_ops_follow_their_formulas():
  x = np.asarray(_images())
  # brightness: one factor per image, within [1 - s, 1 + s].
  out = np.asarray(_run('brightness(strength=0.5)')[0])
  inside = out < 1
  ratio = np.where(inside, out / x, np.nan).reshape(B, -1)
  np.testing.assert_allclose(np.nanmax(ratio, 1), np.nanmin(ratio, 1), rtol=1e-4)
  assert (np.nanmin(ratio, 1) >= 0.5 - 1e-6).all() and (np.nanmax(ratio, 1) <= 1.5 + 1e-6).all()
  # solarize: each pixel is kept or inverted, and the inverted ones are exactly
  # those above one threshold per image.
  out = np.asarray(_run('solarize')[0]).reshape(B, -1)
  flat = x.reshape(B, -1)
  inverted = np.isclose(out, 1 - flat, atol=1e-6) & ~np.isclose(out, flat, atol=1e-6)
  assert (inverted | np.isclose(out, flat, atol=1e-6)).all()
  for xi, inv in zip(flat, inverted):
    assert not inv.any() or not (~inv).any() or xi[inv].min() > xi[~inv].max()
  assert inverted.any()
  # posterize: each image keeps b in [2, 8] bits; 8 bits leaves it as it was.
  out = np.asarray(_run('posterize(bits=2)')[0]).reshape(B, -1)
  for o, xi in zip(out, flat):
    levels = np.unique(np.round(o * 255))
    assert np.array_equal(o, xi) or (
        np.allclose(o * 255, np.round(o * 255), atol=1e-3) and len(levels) <= 128)
  assert min(len(np.unique(np.round(o * 255))) for o in out) <= 4  # some image got 2 bits


def test_trivial_picks_one_op_per_image():
  x = _images()
  same = []
  for key in range(8):
    out, _ = _run('trivial', images=x, key=key)
    same += [bool(jnp.array_equal(o, i)) for o, i in zip(out, x)]
  # About 1 in 10 images draws the identity branch; the rest are changed.
  assert 1 <= sum(same) <= 20


# --------------------------------------------------------------------------- batch ops


def _constant_images(b=B):
  """Image i is the constant (i + 1) / b, label i one-hot: the pixels tell the mix."""
  values = (jnp.arange(b, dtype=jnp.float32) + 1) / b
  return jnp.broadcast_to(values[:, None, None, None], (b, H, W, 3)), jnp.eye(b), values


@pytest.mark.parametrize('key', range(4))
def test_mixup_mixes_images_and_labels_with_the_same_weight(key):
  x, y, values = _constant_images()
  out, labels = _run('mixup(alpha=1.0)', images=x, labels=y, key=key)
  np.testing.assert_allclose(labels.sum(1), 1.0, atol=1e-6)
  # Each image is the label-weighted mix of the constants.
  np.testing.assert_allclose(out[:, 0, 0, 0], labels @ values, atol=1e-5)
  chex.assert_trees_all_close(out, jnp.broadcast_to(out[:, :1, :1], out.shape))
  assert float(labels.max(1).min()) < 1.0  # something was actually mixed


@pytest.mark.parametrize('key', range(6))
def test_cutmix_label_weight_is_the_pasted_area(key):
  x, y, values = _constant_images()
  out, labels = _run('cutmix(alpha=1.0)', images=x, labels=y, key=key)
  np.testing.assert_allclose(labels.sum(1), 1.0, atol=1e-6)
  # Share of image i's pixels that came from image k == label weight of class k.
  share = (np.asarray(out[..., 0])[:, None] == np.asarray(values)[None, :, None, None])
  np.testing.assert_allclose(share.mean((2, 3)), labels, atol=1e-6)


def test_cutmix_pastes_a_box_in_some_batches():
  x, y, _ = _constant_images()
  lams = [float(_run('cutmix(alpha=1.0)', images=x, labels=y, key=k)[1].max()) for k in range(6)]
  assert any(0 < 1 - lam < 1 for lam in lams)


def test_mixing_already_mixed_labels_keeps_rows_summing_to_one():
  x, y, _ = _constant_images()
  out, labels = _run('mixup(alpha=1.0)', images=x, labels=y)
  out, labels = _run('cutmix(alpha=1.0)', images=out, labels=labels, key=1)
  np.testing.assert_allclose(labels.sum(1), 1.0, atol=1e-6)
  assert float(labels.min()) >= 0
  assert float((labels > 0).sum(1).max()) > 2  # mixes of mixes happened


# --------------------------------------------------------------------------- compilation


FULL = 'crop(pad=4)|flip|rotate|cutmix'


def test_pipeline_traces_once_under_jit():
  chex.clear_trace_counter()
  apply = jax.jit(chex.assert_max_traces(augment.build(FULL), n=1))
  for seed in range(2):
    out, labels = apply(jax.random.key(seed), _images(seed), _labels())
    chex.assert_shape(out, (B, H, W, 3))
    chex.assert_shape(labels, (B, K))


def test_pipeline_traces_once_under_vmap_over_seeds():
  chex.clear_trace_counter()
  seeds = 3
  apply = jax.jit(jax.vmap(chex.assert_max_traces(augment.build(FULL), n=1)))
  for step in range(2):
    keys = jax.random.split(jax.random.key(step), seeds)
    x = jnp.stack([_images(step * seeds + s) for s in range(seeds)])
    y = jnp.broadcast_to(_labels(), (seeds, B, K))
    out, labels = apply(keys, x, y)
    chex.assert_shape(out, (seeds, B, H, W, 3))
    np.testing.assert_allclose(labels.sum(-1), 1.0, atol=1e-6)
  assert not np.array_equal(np.asarray(out[0]), np.asarray(out[1]))


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize('spec, words', [
    ('crop(pad=4)|flipp', ['flipp', 'flip', 'crop', 'trivial', 'mixup']),
    ('crop(padding=4)', ['crop', 'padding', 'pad', 'mode']),
    ('crop(pad=-1)', ['crop', 'pad', '-1']),
    ('crop(pad=2.5)', ['crop', 'pad', 'integer']),
    ('crop(mode=wrap)', ['crop', 'wrap', 'reflect', 'zero']),
    ('crop(4, 5, 6)', ['crop', 'pad', 'mode']),
    ('rotate(deg="a lot")', ['rotate', 'deg']),
    ('flip(p=1.5)', ['flip', 'p=1.5', 'in [0, 1]']),
    ('cutout(size=0.25', ['cutout(size=0.25', 'name(key=value']),
    ('crop(pad=__import__("os").getpid())', ['literal']),
    ('crop(pad=4)||flip', ['empty']),
    ('mixup(beta=1)', ['mixup', 'beta', 'alpha']),
])
def test_bad_spec_raises_one_line_user_error(spec, words):
  with pytest.raises(UserError) as e:
    augment.build(spec)
  message = str(e.value)
  assert '\n' not in message
  for word in words:
    assert word in message, (word, message)


def test_spec_syntax_variants():
  x = _images()
  a, _ = _run('crop(pad=3, mode=reflect)', images=x)
  b, _ = _run("  crop(3, mode='reflect') ", images=x)
  chex.assert_trees_all_equal(a, b)
  for name in augment.OPS:
    assert name in augment.describe()
  assert 'mixup' in augment.describe() and 'cutmix' in augment.describe()


def test_reflect_crop_larger_than_image_is_a_user_error():
  with pytest.raises(UserError, match='pad'):
    augment.build('crop(pad=20, mode=reflect)')(jax.random.key(0), _images(), _labels())
