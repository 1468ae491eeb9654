"""Trains, evaluates and checkpoints one experiment.

    python -m smallfx.main --config=configs/cosine.py [--workdir=DIR] [--config.KEY=VALUE ...]

Re-running the same command resumes from the newest checkpoint in DIR; a finished
run prints its results again without training.
"""

import os

from absl import flags
from ml_collections import config_flags

from smallfx import cli
from smallfx import malloc

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output folder; default runs/NAME-DATASET-HASH.')
flags.mark_flags_as_required(['config'])


def _initialize_distributed():
  """Joins a multi-process run through JAX's own runtime.

  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID name the run where
  set; otherwise jax.distributed detects the cluster (SLURM, Open MPI, TPU pods).
  """
  import jax  # pylint: disable=g-import-not-at-top
  env = os.environ
  kwargs = {}
  if 'JAX_NUM_PROCESSES' in env:
    kwargs = dict(coordinator_address=env.get('JAX_COORDINATOR_ADDRESS'),
                  num_processes=int(env['JAX_NUM_PROCESSES']),
                  process_id=int(env.get('JAX_PROCESS_ID', 0)))
  try:
    jax.distributed.initialize(**kwargs)
  except (ValueError, RuntimeError) as e:
    raise cli.UserError(f'cannot start the multi-process run: {" ".join(str(e).split())}; set '
                        'JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID') from None


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  from smallfx import experiment  # pylint: disable=g-import-not-at-top
  from smallfx import train  # pylint: disable=g-import-not-at-top
  path = config_flags.get_config_filename(flags.FLAGS['config'])
  try:
    config = _CONFIG.value
    config.to_json()  # config_flags defers loading errors to the first use.
  except OSError as e:
    raise cli.UserError(f'cannot load config {path}: '
                        f'{str(e).strip().splitlines()[-1].strip()}') from None
  except AttributeError:  # get_config() returned something else, a dict say
    raise cli.UserError(f'get_config() in {path} returned {type(_CONFIG.value).__name__}, '
                        'not a ConfigDict') from None
  name = os.path.splitext(os.path.basename(path))[0]
  if config.distributed:
    _initialize_distributed()
  else:
    cli.use_cpu_devices(lambda: experiment.cpu_devices(config))
  train.train_and_evaluate(config, _WORKDIR.value or experiment.default_workdir(config, name))


def _config_help() -> str:
  """--help's list of config keys, with the defaults that every config file starts from."""
  from smallfx import config as base  # pylint: disable=g-import-not-at-top
  return cli.config_keys(base.default(), f'\nConfig keys, as the defaults of {base.__file__} '
                         '(whose comments explain them);')


if __name__ == '__main__':
  malloc.relaunch()
  cli.run(main, help_text=_config_help)
