"""Data sources by name, stratified sub-sampling, and the splits a run uses.

Every source returns uint8 images (N, H, W, C) and int labels for a train pool and
a test split. The run then carves validation from the train pool (never from the
test split) and sub-samples the rest to `samples_per_class`, both stratified and
seeded by `data_seed`, so the same config always sees the same images.

Names: `digits` (scikit-learn's 8x8 digits, embedded), `fashion_mnist` (IDX files),
`tfds:NAME` (TensorFlow Datasets through `tfds.data_source`, no TensorFlow needed),
`folder:PATH` (one sub-folder of images per class).
"""

import dataclasses
import gzip
import os
from typing import Callable

import numpy as np

from smallfx.errors import UserError

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_CLASSES = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal',
                         'Shirt', 'Sneaker', 'Bag', 'Ankle boot']
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.tif', '.tiff', '.webp')
# Sources without a test split keep this fraction of each class for testing,
# drawn with a fixed seed so that every run of every config tests on the same images.
HELD_OUT_FRACTION = 0.3
HELD_OUT_SEED = 1234


@dataclasses.dataclass
class Split:
  images: np.ndarray  # uint8 (N, H, W, C)
  labels: np.ndarray  # int32 (N,)


@dataclasses.dataclass
class Source:
  train: Split
  test: Split
  class_names: list[str]


@dataclasses.dataclass
class Dataset:
  """What a run trains and evaluates on."""
  train: Split
  val: Split
  test: Split
  class_names: list[str]
  pool: Split | None = None  # the train pool minus validation, before sub-sampling

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def image_shape(self) -> tuple[int, ...]:
    return self.train.images.shape[1:]

  # Flat aliases, for tools that only want the training images.
  @property
  def train_images(self):
    return self.train.images

  @property
  def train_labels(self):
    return self.train.labels


def stratified_split(labels: np.ndarray, per_class: int, seed: int,
                     class_names=None) -> tuple[np.ndarray, np.ndarray]:
  """Indices of `per_class` examples of every class, and of the rest (both sorted)."""
  classes, counts = np.unique(labels, return_counts=True)
  if per_class > counts.min():
    c = classes[np.argmin(counts)]
    name = class_names[c] if class_names is not None else c
    raise UserError(f'{per_class} per class asked for, but class {name!r} has only '
                    f'{counts.min()} examples left in the training pool; ask for at most that')
  rng = np.random.default_rng(seed)
  take = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in classes]
  take = np.sort(np.concatenate(take))
  rest = np.setdiff1d(np.arange(len(labels)), take)
  return take, rest


def held_out_split(images, labels, class_names) -> Source:
  """A test split for sources that ship none: a fixed fraction of each class."""
  counts = np.bincount(labels)
  rng = np.random.default_rng(HELD_OUT_SEED)
  test = np.sort(np.concatenate([
      rng.choice(np.flatnonzero(labels == c), max(1, int(n * HELD_OUT_FRACTION)), replace=False)
      for c, n in enumerate(counts) if n]))
  train = np.setdiff1d(np.arange(len(labels)), test)
  return Source(Split(images[train], labels[train]), Split(images[test], labels[test]),
                class_names)


def load_digits(config) -> Source:
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  d = datasets.load_digits()
  images = np.round(d.images * (255 / 16)).astype(np.uint8)[..., None]
  return held_out_split(images, d.target.astype(np.int32), [str(i) for i in range(10)])


def _read_idx(path: str) -> np.ndarray:
  try:
    with gzip.open(path) if path.endswith('.gz') else open(path, 'rb') as f:
      raw = f.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    return data.reshape(shape)
  except (OSError, ValueError, EOFError, IndexError) as e:
    raise UserError(f'{path} is not a readable IDX file: {e}') from None


def load_fashion_mnist(config) -> Source:
  folder = config.data_dir or FASHION_MNIST_DIR

  def find(stem):
    for name in (stem, stem + '.gz', stem.replace('-idx', '.idx')):
      if os.path.exists(os.path.join(folder, name)):
        return os.path.join(folder, name)
    raise UserError(
        f'Fashion-MNIST file {stem}[.gz] not found in {folder}; install it with '
        '`apt-get install dataset-fashion-mnist` (puts it in '
        f'{FASHION_MNIST_DIR}) or point --config.data_dir at the IDX files')

  def split(prefix):
    images = _read_idx(find(f'{prefix}-images-idx3-ubyte'))[..., None]
    labels = _read_idx(find(f'{prefix}-labels-idx1-ubyte')).astype(np.int32)
    return Split(images, labels)

  return Source(split('train'), split('t10k'), list(FASHION_MNIST_CLASSES))


def load_tfds(name: str, config) -> Source:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = config.data_dir or None

  def records(split):
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)

  try:
    train = records('train')
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # tfds raises many types for a missing or unknown dataset.
    raise UserError(f'tfds dataset {name!r} is not available: {str(e).splitlines()[0]} '
                    '(prepare it with tfds first; this machine cannot download)') from None
  features = builder.info.features
  if 'image' not in features or 'label' not in features:
    raise UserError(f'tfds dataset {name!r} has no image and label features')

  def split(source):
    items = [source[i] for i in range(len(source))]
    images = np.stack([np.asarray(r['image'], np.uint8) for r in items])
    labels = np.array([r['label'] for r in items], np.int32)
    return Split(images if images.ndim == 4 else images[..., None], labels)

  names = list(features['label'].names)
  try:
    test = records('test')
  except Exception:  # No test split: hold one out of train, as for the digits.
    whole = split(train)
    return held_out_split(whole.images, whole.labels, names)
  return Source(split(train), split(test), names)


def _read_image_folder(root: str, size, channels: int):
  from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top
  classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  if not classes:
    raise UserError(f'{root} has no class sub-folders (expected one folder of images per class)')
  images, labels = [], []
  for label, name in enumerate(classes):
    for fname in sorted(os.listdir(os.path.join(root, name))):
      if not fname.lower().endswith(IMAGE_EXTENSIONS):
        continue
      path = os.path.join(root, name, fname)
      try:
        with Image.open(path) as im:
          im = im.convert('L' if channels == 1 else 'RGB')
          if size:
            im = im.resize((size[1], size[0]), Image.BILINEAR)
          images.append(np.asarray(im, np.uint8))
      except (OSError, UnidentifiedImageError, ValueError) as e:
        raise UserError(f'cannot read image {path}: {e}') from None
      labels.append(label)
  shapes = {im.shape for im in images}
  if len(shapes) > 1:
    raise UserError(f'images in {root} differ in size ({sorted(shapes)[:3]}...); '
                    'set --config.image_size to resize them')
  arr = np.stack(images)
  return (arr if arr.ndim == 4 else arr[..., None]), np.array(labels, np.int32), classes


def load_folder(path: str, config) -> Source:
  if not os.path.isdir(path):
    raise UserError(f'folder {path} does not exist')
  size = _size(config.image_size) or (32, 32)
  channels = config.get('channels') or 3
  if all(os.path.isdir(os.path.join(path, s)) for s in ('train', 'test')):
    tr_x, tr_y, names = _read_image_folder(os.path.join(path, 'train'), size, channels)
    te_x, te_y, te_names = _read_image_folder(os.path.join(path, 'test'), size, channels)
    if te_names != names:
      raise UserError(f'{path}/train and {path}/test have different class folders')
    return Source(Split(tr_x, tr_y), Split(te_x, te_y), names)
  return held_out_split(*_read_image_folder(path, size, channels))


SOURCES: dict[str, Callable] = {'digits': load_digits, 'fashion_mnist': load_fashion_mnist}
PREFIXES: dict[str, Callable] = {'tfds': load_tfds, 'folder': load_folder}


def _size(image_size):
  if not image_size:
    return None
  if isinstance(image_size, int):
    return (image_size, image_size)
  return tuple(image_size)


def _resize(split: Split, size) -> Split:
  import jax  # pylint: disable=g-import-not-at-top
  if size is None or split.images.shape[1:3] == tuple(size):
    return split
  x = jax.image.resize(split.images.astype(np.float32),
                       (len(split.images), *size, split.images.shape[-1]), 'bilinear')
  return Split(np.clip(np.round(np.asarray(x)), 0, 255).astype(np.uint8), split.labels)


def load_source(config) -> Source:
  name = config.dataset
  if ':' in name:
    prefix, arg = name.split(':', 1)
    if prefix in PREFIXES:
      return PREFIXES[prefix](arg, config)
  elif name in SOURCES:
    return SOURCES[name](config)
  raise UserError(f"unknown dataset {name!r}; valid: {', '.join(sorted(SOURCES))}, "
                  f"{', '.join(p + ':NAME' for p in sorted(PREFIXES))}")


def load(config) -> Dataset:
  """The run's splits: validation carved from the train pool, then `samples_per_class`."""
  source = load_source(config)
  names = source.class_names
  pool = source.train
  if config.val_per_class:
    val_idx, rest = stratified_split(pool.labels, config.val_per_class, config.data_seed, names)
    val = Split(pool.images[val_idx], pool.labels[val_idx])
    pool = Split(pool.images[rest], pool.labels[rest])
  else:
    val = Split(pool.images[:0], pool.labels[:0])
  size = _size(config.image_size)
  dataset = Dataset(pool, _resize(val, size), _resize(source.test, size), names, pool=pool)
  dataset.train = resample_train(dataset, config, 0)
  return dataset


def resample_train(dataset: Dataset, config, k: int) -> Split:
  """The k-th sub-sample of the training pool (k = 0: the run's training split)."""
  pool = dataset.pool
  if config.samples_per_class:
    # Another seed stream than validation's, so changing samples_per_class never
    # moves an image between validation and training.
    seed = config.data_seed + 1 + 7919 * k
    idx, _ = stratified_split(pool.labels, config.samples_per_class, seed, dataset.class_names)
    pool = Split(pool.images[idx], pool.labels[idx])
  return _resize(pool, _size(config.image_size))
