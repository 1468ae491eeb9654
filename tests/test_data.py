import os

import ml_collections
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
  with pytest.raises(UserError, match='digits, fashion_mnist.*folder:NAME, tfds:NAME'):
    data.load(cfg(dataset='digit'))


def test_tfds_data_source_with_mock_data():
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=60, policy=tfds.testing.MockPolicy.USE_CODE):
    d = data.load(cfg(dataset='tfds:cifar10', samples_per_class=2, val_per_class=1))
  assert d.train.images.shape == (20, 32, 32, 3) and d.train.images.dtype == np.uint8
  assert d.num_classes == len(d.class_names) == 10
  assert len(d.test.labels) == 60
