"""A hierarchy file from a TFDS dataset's own coarse labels (e.g. CIFAR-100's superclasses).

    python tools/make_hierarchy.py --dataset=tfds:cifar100 [--data_dir=DIR] \
        [--coarse=coarse_label] [--out=hierarchies/cifar100.txt]

Every class goes under the coarse label its training images carry; the file is
what `--config.hierarchy` reads (smallfx/hierarchy.py). Without --out it prints it.
"""

import os
import sys

# Run from a checkout without installing: the package is one folder up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from smallfx import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from smallfx import hierarchy  # pylint: disable=g-import-not-at-top,wrong-import-position
from smallfx.errors import UserError  # pylint: disable=g-import-not-at-top,wrong-import-position

_DATASET = flags.DEFINE_string('dataset', 'tfds:cifar100', 'tfds:NAME')
_DATA_DIR = flags.DEFINE_string('data_dir', None, "TFDS's data folder")
_COARSE = flags.DEFINE_string('coarse', 'coarse_label', 'the coarse label feature')
_OUT = flags.DEFINE_string('out', None, 'the file to write; default: print it')


def main(argv):
  del argv
  if not _DATASET.value.startswith('tfds:'):
    raise UserError(f'--dataset={_DATASET.value}: give tfds:NAME, a dataset with coarse labels')
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  name = _DATASET.value.split(':', 1)[1]
  try:
    source = tfds.data_source(name, split='train', data_dir=_DATA_DIR.value, download=False)
    features = tfds.builder(name, data_dir=_DATA_DIR.value).info.features
  except Exception as e:  # tfds raises many types for a missing dataset.
    raise UserError(f'tfds dataset {name!r} is not available: {str(e).splitlines()[0]}') from None
  if _COARSE.value not in features:
    raise UserError(f'{name} has no feature {_COARSE.value!r}; it has '
                    f'{", ".join(sorted(features))}')
  records = [source[i] for i in range(len(source))]
  text = hierarchy.from_coarse_labels(
      features['label'].names, features[_COARSE.value].names,
      np.array([r['label'] for r in records]), np.array([r[_COARSE.value] for r in records]),
      root=name)
  if not _OUT.value:
    print(text, end='')
    return
  with open(_OUT.value, 'w') as f:
    f.write(text)
  print(f'{_OUT.value}: {len(set(np.array([r["label"] for r in records]).tolist()))} classes')


if __name__ == '__main__':
  cli.run(main)
