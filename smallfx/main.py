"""Trains, evaluates and checkpoints one experiment.

    python -m smallfx.main --config=configs/cosine.py [--workdir=DIR] [--config.KEY=VALUE ...]

Re-running the same command resumes from the newest checkpoint in DIR; a finished
run prints its results again without training.
"""

import os

from absl import flags
from ml_collections import config_flags

from smallfx import cli

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output folder; default runs/NAME-DATASET-HASH.')
flags.mark_flags_as_required(['config'])


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  from smallfx import train  # pylint: disable=g-import-not-at-top
  path = config_flags.get_config_filename(flags.FLAGS['config'])
  try:
    config = _CONFIG.value
    config.to_json()  # config_flags defers loading errors to the first use.
  except OSError as e:
    raise cli.UserError(f'cannot load config {path}: '
                        f'{str(e).strip().splitlines()[-1].strip()}') from None
  name = os.path.splitext(os.path.basename(path))[0]
  train.train_and_evaluate(config, _WORKDIR.value or train.default_workdir(config, name))


if __name__ == '__main__':
  cli.run(main)
