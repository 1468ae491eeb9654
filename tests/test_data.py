import gzip
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from smallfx import config as base
from smallfx import data
from smallfx.errors import UserError


def cfg(**kw):
  c = base.default()
  c.update(kw)
  return c


def test_digits_subsample_is_stratified_reproducible_and_disjoint():
  d = data.load(cfg(samples_per_class=7, val_per_class=5))
  assert d.train.images.dtype == np.uint8 and d.train.images.shape[1:] == (8, 8, 1)
  np.testing.assert_array_equal(np.bincount(d.train.labels), [7] * 10)
  np.testing.assert_array_equal(np.bincount(d.val.labels), [5] * 10)
  again = data.load(cfg(samples_per_class=7, val_per_class=5))
  np.testing.assert_array_equal(d.train.images, again.train.images)
  other = data.load(cfg(samples_per_class=7, val_per_class=5, data_seed=1))
  assert not np.array_equal(d.train.images, other.train.images)
  rows = lambda s: {x.tobytes() for x in s.images}
  # Validation comes from the train pool, never from test, and never overlaps training.
  assert not rows(d.train) & rows(d.val)
  assert len(d.test.labels) == len(again.test.labels) == len(other.test.labels)
  np.testing.assert_array_equal(d.test.images, other.test.images)


def test_more_samples_keep_validation_fixed():
  a = data.load(cfg(samples_per_class=5))
  b = data.load(cfg(samples_per_class=20))
  np.testing.assert_array_equal(a.val.images, b.val.images)


def test_too_many_samples_names_smallest_class():
  with pytest.raises(UserError, match=r"class '\d' has only \d+"):
    data.load(cfg(samples_per_class=1000))


def test_fashion_mnist_missing_folder_says_how_to_get_it(tmp_path):
  with pytest.raises(UserError, match='apt-get install dataset-fashion-mnist'):
    data.load(cfg(dataset='fashion_mnist', data_dir=str(tmp_path)))


@pytest.mark.skipif(not os.path.isdir(data.FASHION_MNIST_DIR), reason='package not installed')
def test_fashion_mnist_reads_idx_files():
  d = data.load(cfg(dataset='fashion_mnist', samples_per_class=3, val_per_class=2))
  assert d.train.images.shape == (30, 28, 28, 1)
  assert d.test.images.shape == (10000, 28, 28, 1)
  assert d.class_names[9] == 'Ankle boot'


def _write_folder(root, classes=('cat', 'dog'), per_class=6, size=(20, 30)):
  rng = np.random.default_rng(0)
  for c in classes:
    os.makedirs(root / c, exist_ok=True)
    for i in range(per_class):
      Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / c / f'{i}.png')


def test_folder_dataset_resizes_and_names_classes(tmp_path):
  _write_folder(tmp_path)
  d = data.load(cfg(dataset=f'folder:{tmp_path}', samples_per_class=2, val_per_class=1,
                    image_size=16))
  assert d.class_names == ['cat', 'dog']
  assert d.train.images.shape == (4, 16, 16, 3)
  assert len(d.test.labels) == 2 * int(6 * data.HELD_OUT_FRACTION)


def test_folder_dataset_names_unreadable_file(tmp_path):
  _write_folder(tmp_path)
  (tmp_path / 'dog' / 'broken.jpg').write_bytes(b'not a jpeg')
  with pytest.raises(UserError, match='broken.jpg'):
    data.load(cfg(dataset=f'folder:{tmp_path}', samples_per_class=2, val_per_class=1))


def test_unknown_dataset_lists_choices():
  with pytest.raises(UserError, match='digits, fashion_mnist, csv:PATH, folder:PATH, sklearn:NAME, tfds:NAME'):
    data.load(cfg(dataset='digit'))


def test_tfds_data_source_with_mock_data():
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=60, policy=tfds.testing.MockPolicy.USE_CODE):
    d = data.load(cfg(dataset='tfds:cifar10', samples_per_class=2, val_per_class=1))
  assert d.train.images.shape == (20, 32, 32, 3) and d.train.images.dtype == np.uint8
  assert d.num_classes == len(d.class_names) == 10
  assert len(d.test.labels) == 60


# --- mistakes in the data: one line naming the file or folder --------------------


def _write_png16(path, pixels):
  """A 16-bit PNG (grey, or RGB for (H, W, 3)): Pillow can read these but not write RGB."""
  pixels = np.asarray(pixels, '>u2')
  height, width = pixels.shape[:2]
  color_type = 2 if pixels.ndim == 3 else 0

  def chunk(tag, body):
    return (struct.pack('>I', len(body)) + tag + body
            + struct.pack('>I', zlib.crc32(tag + body)))

  rows = b''.join(b'\0' + row.tobytes() for row in pixels)
  with open(path, 'wb') as f:
    f.write(b'\x89PNG\r\n\x1a\n'
            + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 16, color_type, 0, 0, 0))
            + chunk(b'IDAT', zlib.compress(rows)) + chunk(b'IEND', b''))


# Two classes that differ only in where the light is, over the whole 16-bit range.
_RAMP = np.round(np.linspace(0, 65535, 6)).astype(np.uint16)
_PATTERNS16 = {'left': np.tile(_RAMP[::-1], (6, 1)), 'right': np.tile(_RAMP, (6, 1))}


def _load_all(root, **kw):
  d = data.load(cfg(dataset=f'folder:{root}', samples_per_class=0, val_per_class=0,
                    image_size=6, **kw))
  return (np.concatenate([d.train.images, d.test.images]),
          np.concatenate([d.train.labels, d.test.labels]), d.class_names)


def test_folder_dataset_scales_16_bit_grey_to_8_bits(tmp_path):
  """Pillow's convert() clips 16-bit grey to 255: every image was white, accuracy chance."""
  for name, pattern in _PATTERNS16.items():
    os.makedirs(tmp_path / name)
    for i in range(4):
      Image.fromarray(pattern).save(tmp_path / name / f'{i}.png')  # mode I;16
  images, labels, names = _load_all(tmp_path, channels=1)
  assert names == ['left', 'right']
  for image, label in zip(images, labels):
    expected = np.round(_PATTERNS16[names[label]] / 257).astype(np.uint8)
    np.testing.assert_array_equal(image[..., 0], expected)
  assert images.max() == 255 and images.min() == 0


@pytest.mark.parametrize('kind, channels', [('grey16.png', 1), ('grey16.png', 3),
                                             ('rgb16.png', 3), ('grey32.tif', 1)])
def test_predict_reads_deep_images_as_training_does(tmp_path, kind, channels):
  """Every depth Pillow reads comes out as 8 bits, the pattern kept and 65535 -> 255."""
  from smallfx import predict  # pylint: disable=g-import-not-at-top
  pattern = _PATTERNS16['right']
  path = str(tmp_path / kind)
  if kind == 'rgb16.png':
    _write_png16(path, np.stack([pattern, pattern[::-1, ::-1], pattern * 0], axis=-1))
    expected = np.stack([pattern, pattern[::-1, ::-1], pattern * 0], axis=-1) / 257
  else:
    # Pillow writes and reads 16-bit grey PNGs as mode I;16, and 32-bit TIFFs as mode I.
    image = Image.fromarray(pattern)
    (image.convert('I') if kind.endswith('tif') else image).save(path)
    expected = np.repeat(pattern[..., None], channels, -1) / 257
  [image] = predict.read_images([path], {'image_size': [6, 6], 'channels': channels})
  assert image.dtype == np.uint8 and image.shape == (6, 6, channels)
  # Pillow reads 16-bit RGB as the high byte, smallfx rounds grey: within one level.
  assert np.abs(image - expected).max() <= 1
  assert image[0, 0, 0] == 0 and image[0, -1, 0] == 255 and len(np.unique(image[..., 0])) == 6


def test_float_pixels_are_refused_naming_the_file(tmp_path):
  Image.fromarray(np.ones((4, 6), np.float32)).save(tmp_path / 'x.tif')
  with pytest.raises(UserError, match=r'x\.tif: its pixels are floating point'):
    data.read_image(str(tmp_path / 'x.tif'))


def test_empty_class_folder_is_refused_naming_it(tmp_path):
  _write_folder(tmp_path)
  os.makedirs(tmp_path / 'emu')
  (tmp_path / 'emu' / 'notes.txt').write_text('no images here')
  with pytest.raises(UserError, match=f'class folder {tmp_path}/emu has no images'):
    data.load(cfg(dataset=f'folder:{tmp_path}', samples_per_class=2, val_per_class=1))


def test_one_class_folder_is_refused(tmp_path):
  """One class: every prediction is right, and the run reported accuracy 1.0."""
  _write_folder(tmp_path, classes=('cat',))
  with pytest.raises(UserError, match=f'{tmp_path} has one class folder \\(cat\\)'):
    data.load(cfg(dataset=f'folder:{tmp_path}', samples_per_class=2, val_per_class=1))


@pytest.mark.parametrize('limit', [100, 400])  # 600 pixels: Pillow's error, its warning
def test_image_over_pillow_pixel_limit_is_one_line(tmp_path, monkeypatch, limit):
  _write_folder(tmp_path)  # 20 x 30 images
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', limit)
  with pytest.raises(UserError, match=f"cat/0.png: 600 pixels exceed Pillow's limit of {limit}"):
    data.load(cfg(dataset=f'folder:{tmp_path}', samples_per_class=2, val_per_class=1))
  # The config may raise the limit for files the user trusts; Pillow's own is restored.
  d = data.load(cfg(dataset=f'folder:{tmp_path}', samples_per_class=2, val_per_class=1,
                    max_image_pixels=600))
  assert len(d.train.labels) == 4 and Image.MAX_IMAGE_PIXELS == limit


def _write_idx(path, array):
  array = np.asarray(array, np.uint8)
  raw = bytes([0, 0, 8, array.ndim]) + b''.join(struct.pack('>I', n) for n in array.shape)
  raw += array.tobytes()
  with open(path, 'wb') as f:
    f.write(gzip.compress(raw) if path.endswith('.gz') else raw)  # a 10-byte gzip header


def _write_fashion_mnist(folder, train=(6, 6), test=(3, 3)):
  rng = np.random.default_rng(0)
  for prefix, (n_images, n_labels) in (('train', train), ('t10k', test)):
    _write_idx(f'{folder}/{prefix}-images-idx3-ubyte.gz', rng.integers(0, 255, (n_images, 4, 4)))
    _write_idx(f'{folder}/{prefix}-labels-idx1-ubyte.gz', np.arange(n_labels) % 2)


@pytest.mark.parametrize('counts', [(6, 5), (5, 6)])
def test_idx_labels_that_do_not_match_the_images_are_refused(tmp_path, counts):
  _write_fashion_mnist(tmp_path, train=counts)
  images, labels = (f'{tmp_path}/train-{k}-idx{d}-ubyte.gz' for k, d in (('images', 3),
                                                                           ('labels', 1)))
  with pytest.raises(UserError, match=f'{images} holds {counts[0]} images but {labels} holds '
                     f'{counts[1]} labels'):
    data.load(cfg(dataset='fashion_mnist', data_dir=str(tmp_path), samples_per_class=0,
                  val_per_class=0))


@pytest.mark.parametrize('damage', ['deflate', 'truncated', 'header'])
def test_damaged_gz_is_one_line_naming_the_file(tmp_path, damage):
  _write_fashion_mnist(tmp_path)
  data.load(cfg(dataset='fashion_mnist', data_dir=str(tmp_path), samples_per_class=0,
                val_per_class=0))  # readable as written
  path = tmp_path / 'train-images-idx3-ubyte.gz'
  gz = path.read_bytes()
  path.write_bytes({'deflate': gz[:10] + b'\xff' * (len(gz) - 18) + gz[-8:],  # zlib.error
                    'truncated': gz[:len(gz) // 2],  # EOFError
                    'header': b'\0' + gz[1:]}[damage])  # gzip.BadGzipFile
  with pytest.raises(UserError, match=f'{path} is not a readable IDX file'):
    data.load(cfg(dataset='fashion_mnist', data_dir=str(tmp_path), samples_per_class=0,
                  val_per_class=0))
