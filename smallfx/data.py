"""Data sources by name, stratified sub-sampling, and the splits a run uses.

Every source returns uint8 images (N, H, W, C) and int labels for a train pool and
a test split. The run then carves validation from the train pool (never from the
test split) and sub-samples the rest to `samples_per_class`, both stratified and
seeded by `data_seed`, so the same config always sees the same images.

Names: `digits` (scikit-learn's 8x8 digits, embedded), `fashion_mnist` (IDX files),
`tfds:NAME` (TensorFlow Datasets through `tfds.data_source`, no TensorFlow needed),
`folder:PATH` (one sub-folder of images per class), and tables (`smallfx.tables`):
`sklearn:NAME` and `csv:PATH`, whose rows are float32 feature vectors (N, F) in place
of images, standardised with the training split's statistics.
"""

import dataclasses
import gzip
import os
import re
from typing import Callable
import warnings
import zlib

import numpy as np

from smallfx import tables
from smallfx.errors import UserError

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_CLASSES = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal',
                         'Shirt', 'Sneaker', 'Bag', 'Ankle boot']
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.tif', '.tiff', '.webp')
# Sources without a test split keep this fraction of each class for testing,
# drawn with a fixed seed so that every run of every config tests on the same images.
HELD_OUT_FRACTION = 0.3
HELD_OUT_SEED = 1234


@dataclasses.dataclass(frozen=True)
class Spec:
  """Which images a run reads: the config's data fields, checked by `experiment.resolve`."""
  dataset: str = 'digits'
  data_dir: str = ''
  samples_per_class: int = 10
  val_per_class: int = 10
  data_seed: int = 0
  image_size: int | tuple[int, int] = 0
  channels: int = 0
  max_image_pixels: int = 0  # 0: Pillow's own limit
  unlabelled: str = 'rest'   # for pretraining: 'rest' of the training pool, or 'folder:PATH'
  label_column: str = ''     # csv: the column of the labels
  categorical: str = ''      # csv: comma-separated columns to one-hot encode

  @classmethod
  def from_config(cls, config) -> 'Spec':
    fields = {f.name: config[f.name] for f in dataclasses.fields(cls)}
    if isinstance(fields['image_size'], list):  # a tuple comes back from JSON as a list
      fields['image_size'] = tuple(fields['image_size'])
    return cls(**fields)


@dataclasses.dataclass
class Split:
  images: np.ndarray  # uint8 (N, H, W, C); a table's: float32 features (N, F)
  labels: np.ndarray  # int32 (N,)


@dataclasses.dataclass
class Source:
  train: Split
  test: Split
  class_names: list[str]
  # A table's: raw rows in `images`, encoded as `encoder.fit(training pool rows)` says.
  encoder: tables.Encoder | None = None


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

  @property
  def is_table(self) -> bool:
    return len(self.image_shape) == 1

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
  # Every class of the dataset counts, so a class with no examples here is refused
  # too (it would be an output that is never trained).
  counts = np.bincount(labels, minlength=len(class_names) if class_names is not None else 0)
  classes = np.arange(len(counts))
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


def load_digits(spec) -> Source:
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
  # A damaged .gz raises zlib.error (bad deflate data), EOFError (cut short) or
  # gzip.BadGzipFile (an OSError: bad header or checksum).
  except (OSError, ValueError, EOFError, IndexError, zlib.error) as e:
    raise UserError(f'{path} is not a readable IDX file ({e}); re-download or '
                    're-install it') from None


def load_fashion_mnist(spec) -> Source:
  folder = spec.data_dir or FASHION_MNIST_DIR

  def find(stem):
    for name in (stem, stem + '.gz', stem.replace('-idx', '.idx')):
      if os.path.exists(os.path.join(folder, name)):
        return os.path.join(folder, name)
    raise UserError(
        f'Fashion-MNIST file {stem}[.gz] not found in {folder}; install it with '
        '`apt-get install dataset-fashion-mnist` (puts it in '
        f'{FASHION_MNIST_DIR}) or point --config.data_dir at the IDX files')

  def split(prefix):
    images_path = find(f'{prefix}-images-idx3-ubyte')
    labels_path = find(f'{prefix}-labels-idx1-ubyte')
    images, labels = _read_idx(images_path), _read_idx(labels_path)
    # Indexing would quietly drop the images (or labels) past the shorter file.
    if len(images) != len(labels):
      raise UserError(f'{images_path} holds {len(images)} images but {labels_path} holds '
                      f'{len(labels)} labels; they must match: re-download or re-install both')
    return Split(images[..., None], labels.astype(np.int32))

  return Source(split('train'), split('t10k'), list(FASHION_MNIST_CLASSES))


def load_tfds(name: str, spec) -> Source:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = spec.data_dir or None

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

  size = _size(spec.image_size)

  def image(record):
    x = np.asarray(record['image'], np.uint8)
    x = x if x.ndim == 3 else x[..., None]
    if size and x.shape[:2] != size:  # photographs differ in size: resize each on load
      from PIL import Image  # pylint: disable=g-import-not-at-top
      x = np.asarray(Image.fromarray(x.squeeze(-1) if x.shape[-1] == 1 else x).resize(
          (size[1], size[0]), Image.BILINEAR), np.uint8).reshape(*size, x.shape[-1])
    return x

  def split(source):
    items = [source[i] for i in range(len(source))]
    images = [image(r) for r in items]
    shapes = {x.shape for x in images}
    if len(shapes) > 1:
      raise UserError(f'images of tfds dataset {name!r} differ in size ({sorted(shapes)[:2]}'
                      '...); set --config.image_size to resize them')
    return Split(np.stack(images), np.array([r['label'] for r in items], np.int32))

  names = list(features['label'].names)
  try:
    test = records('test')
  except Exception:  # No test split: hold one out of train, as for the digits.
    whole = split(train)
    return held_out_split(whole.images, whole.labels, names)
  return Source(split(train), split(test), names)


def _to_8_bits(im, path: str):
  """`im` with 8-bit pixels: Pillow's convert() clips 16-bit greyscale to 255 (all white)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if im.mode == 'F':
    raise UserError(f'cannot read image {path}: its pixels are floating point, which have '
                    'no fixed range; save it with 8 or 16 bits per channel')
  if im.mode != 'I' and not im.mode.startswith('I;16'):
    return im  # 8 bits, or deeper colour that Pillow itself reads as 8 bits
  # 16-bit grey reads as 'I;16*', or as 'I' (32-bit) from TIFFs and older Pillows.
  x = np.asarray(im)
  if x.size and (x.min() < 0 or x.max() > 65535):
    raise UserError(f'cannot read image {path}: its 32-bit pixels run from {x.min()} to '
                    f'{x.max()}, outside the 16-bit range; save it with 8 or 16 bits')
  return Image.fromarray(np.round(x / 257).astype(np.uint8))


def read_image(path: str, channels: int = 3, size=None, max_pixels: int = 0) -> np.ndarray:
  """One image file as uint8 (H, W, channels), resized (bilinear) to `size` (H, W).

  Any bit depth Pillow reads is scaled to 8 bits; a file Pillow cannot read, or one
  over its decompression-bomb limit (`max_pixels`, 0: Pillow's), is a UserError naming
  the file.
  """
  from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top
  limit = Image.MAX_IMAGE_PIXELS
  try:
    Image.MAX_IMAGE_PIXELS = max_pixels or limit
    with warnings.catch_warnings():
      # Between the limit and twice it Pillow only warns, in two lines without the file.
      warnings.simplefilter('error', Image.DecompressionBombWarning)
      with Image.open(path) as im:
        im = _to_8_bits(im, path).convert('L' if channels == 1 else 'RGB')
        if size:
          im = im.resize((size[1], size[0]), Image.BILINEAR)
        return np.asarray(im, np.uint8).reshape(im.height, im.width, -1)
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    pixels = re.search(r'\((\d+) pixels\)', str(e))
    raise UserError(f'cannot read image {path}: {pixels.group(1) if pixels else "its"} pixels '
                    f"exceed Pillow's limit of {Image.MAX_IMAGE_PIXELS} (a guard against "
                    'decompression bombs); shrink the image, or raise the limit with '
                    '--config.max_image_pixels=N if you trust the file') from None
  except (OSError, UnidentifiedImageError, ValueError) as e:
    raise UserError(f'cannot read image {path}: {e}') from None
  finally:
    Image.MAX_IMAGE_PIXELS = limit


def _read_image_folder(root: str, size, channels: int, max_pixels: int = 0):
  classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  if not classes:
    raise UserError(f'{root} has no class sub-folders (expected one folder of images per class)')
  if len(classes) == 1:
    # One class: every prediction is right, and the run would report accuracy 1.0.
    raise UserError(f'{root} has one class folder ({classes[0]}); a classifier needs two '
                    'or more, one sub-folder of images per class')
  images, labels = [], []
  for label, name in enumerate(classes):
    files = [f for f in sorted(os.listdir(os.path.join(root, name)))
             if f.lower().endswith(IMAGE_EXTENSIONS)]
    # An empty class would still be one of the outputs, never trained nor tested.
    if not files:
      raise UserError(f'class folder {os.path.join(root, name)} has no images '
                      f'({", ".join(IMAGE_EXTENSIONS)}); add some, or move the folder '
                      f'out of {root}')
    images += [read_image(os.path.join(root, name, f), channels, size, max_pixels)
               for f in files]
    labels += [label] * len(files)
  shapes = {im.shape for im in images}
  if len(shapes) > 1:
    raise UserError(f'images in {root} differ in size ({sorted(shapes)[:3]}...); '
                    'set --config.image_size to resize them')
  return np.stack(images), np.array(labels, np.int32), classes


def load_folder(path: str, spec) -> Source:
  if not os.path.isdir(path):
    raise UserError(f'folder {path} does not exist')
  size = _size(spec.image_size) or (32, 32)
  channels = spec.channels or 3
  if all(os.path.isdir(os.path.join(path, s)) for s in ('train', 'test')):
    tr_x, tr_y, names = _read_image_folder(os.path.join(path, 'train'), size, channels,
                                           spec.max_image_pixels)
    te_x, te_y, te_names = _read_image_folder(os.path.join(path, 'test'), size, channels,
                                              spec.max_image_pixels)
    if te_names != names:
      raise UserError(f'{path}/train and {path}/test have different class folders')
    return Source(Split(tr_x, tr_y), Split(te_x, te_y), names)
  return held_out_split(*_read_image_folder(path, size, channels, spec.max_image_pixels))


def load_sklearn_table(name: str, spec) -> Source:
  del spec
  rows, labels, names, encoder = tables.load_sklearn(name)
  return dataclasses.replace(held_out_split(rows, labels, names), encoder=encoder)


def load_csv(path: str, spec) -> Source:
  rows, labels, names, encoder = tables.load_csv(path, spec.label_column, spec.categorical)
  return dataclasses.replace(held_out_split(rows, labels, names), encoder=encoder)


SOURCES: dict[str, Callable] = {'digits': load_digits, 'fashion_mnist': load_fashion_mnist}
PREFIXES: dict[str, Callable] = {'tfds': load_tfds, 'folder': load_folder,
                                 'sklearn': load_sklearn_table, 'csv': load_csv}
TABLE_PREFIXES = ('sklearn', 'csv')


def is_table(dataset_name: str) -> bool:
  """Whether the source `dataset_name` names gives feature vectors rather than images."""
  return dataset_name.split(':', 1)[0] in TABLE_PREFIXES and ':' in dataset_name


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


def load_source(spec: Spec) -> Source:
  name = spec.dataset
  if ':' in name:
    prefix, arg = name.split(':', 1)
    if prefix in PREFIXES:
      return PREFIXES[prefix](arg, spec)
  elif name in SOURCES:
    return SOURCES[name](spec)
  raise UserError(f"unknown dataset {name!r}; valid: {', '.join(sorted(SOURCES))}, "
                  f"{', '.join(p + (':PATH' if p in ('folder', 'csv') else ':NAME') for p in sorted(PREFIXES))}")


def _grey(split: Split) -> Split:
  """Colour images as grey ones (ITU-R 601 luma, as Pillow's convert('L')); grey unchanged."""
  if split.images.shape[-1] == 1:
    return split
  luma = split.images[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
  return Split(np.clip(np.round(luma), 0, 255).astype(np.uint8)[..., None], split.labels)


def load(spec: Spec) -> Dataset:
  """The run's splits: validation carved from the train pool, then `samples_per_class`."""
  source = load_source(spec)
  if spec.channels == 1:  # colour taken away: one of the playbook's "fewer inputs"
    source = dataclasses.replace(source, train=_grey(source.train), test=_grey(source.test))
  names = source.class_names
  pool, test = source.train, source.test
  if spec.val_per_class:
    val_idx, rest = stratified_split(pool.labels, spec.val_per_class, spec.data_seed, names)
    val = Split(pool.images[val_idx], pool.labels[val_idx])
    pool = Split(pool.images[rest], pool.labels[rest])
  else:
    val = Split(pool.images[:0], pool.labels[:0])
  if source.encoder is not None:  # a table: columns encoded from the training pool alone
    encode = source.encoder.fit(pool.images)
    pool, val, test = (Split(encode(s.images), s.labels) for s in (pool, val, test))
  size = _size(spec.image_size)
  dataset = Dataset(pool, _resize(val, size), _resize(test, size), names, pool=pool)
  if dataset.is_table:
    pool, val, test = tables.standardise(pool, val, test,
                                         pool.images[train_indices(dataset, spec, 0)])
    dataset = Dataset(pool, val, test, names, pool=pool)
  dataset.train = resample_train(dataset, spec, 0)
  return dataset


def train_indices(dataset: Dataset, spec: Spec, k: int) -> np.ndarray:
  """Which images of the training pool the k-th sub-sample labels."""
  if not spec.samples_per_class:
    return np.arange(len(dataset.pool.labels))
  # Another seed stream than validation's, so changing samples_per_class never
  # moves an image between validation and training.
  seed = spec.data_seed + 1 + 7919 * k
  idx, _ = stratified_split(dataset.pool.labels, spec.samples_per_class, seed,
                            dataset.class_names)
  return idx


def resample_train(dataset: Dataset, spec: Spec, k: int) -> Split:
  """The k-th sub-sample of the training pool (k = 0: the run's training split)."""
  idx = train_indices(dataset, spec, k)
  return _resize(Split(dataset.pool.images[idx], dataset.pool.labels[idx]),
                 _size(spec.image_size))


def unlabelled(dataset: Dataset, spec: Spec, subsamples) -> np.ndarray:
  """The images a run may pretrain on without labels, uint8 (N, H, W, C).

  'rest': the training pool without every image that any of `subsamples` (the k of
  `resample_train`) labels; validation was carved out of the pool before, and the
  test split is never part of it. 'folder:PATH': every image file under PATH, in
  the run's image size and channels.
  """
  height, width, channels = dataset.image_shape
  if spec.unlabelled.startswith('folder:'):
    root = spec.unlabelled.split(':', 1)[1]
    if not os.path.isdir(root):
      raise UserError(f'unlabelled folder {root} does not exist')
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(root) for f in names
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
      raise UserError(f'unlabelled folder {root} holds no image files '
                      f'({", ".join(IMAGE_EXTENSIONS)})')
    return np.stack([read_image(f, channels, (height, width), spec.max_image_pixels)
                     for f in files])
  if spec.unlabelled != 'rest':
    raise UserError(f"unlabelled={spec.unlabelled!r}: give 'rest' (the training pool's "
                    "images beyond the labelled ones) or 'folder:PATH'")
  labelled = np.unique(np.concatenate([train_indices(dataset, spec, k) for k in subsamples]))
  rest = np.setdiff1d(np.arange(len(dataset.pool.labels)), labelled)
  if not len(rest):
    raise UserError('pretraining needs unlabelled images, but the labelled sub-sample '
                    'takes the whole training pool (samples_per_class='
                    f'{spec.samples_per_class}); lower --config.samples_per_class or set '
                    '--config.unlabelled=folder:PATH')
  return _resize(Split(dataset.pool.images[rest], dataset.pool.labels[rest]),
                 (height, width)).images
