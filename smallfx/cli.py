"""Command-line plumbing shared by the entry points: one-line errors, exit status 2."""

import os
import re
import sys
from typing import Callable

from absl import app
from absl import flags
from absl import logging

from smallfx.errors import UserError

EXIT_USER_ERROR = 2


def fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)


def _parse_flags(argv):
  # absl prints the whole usage text and exits 1 on a bad flag; a misspelt config
  # key deserves one line naming it, and exit 2 like every other user error.
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
  except (AttributeError, KeyError) as e:
    # ml_collections reports an unknown `--config.KEY` as a nested KeyError text.
    text = str(e).replace('\\n', ' ').replace("\\'", "'")
    key = re.search(r"'(\w+)'", text)
    hint = re.search(r'Did you mean "(\w+)"', text)
    fail(f"unknown config key {key.group(1) if key else text!r}"
         + (f' (did you mean {hint.group(1)!r}?)' if hint else ''))
  except (ValueError, TypeError) as e:
    fail(f'bad flag value: {" ".join(str(e).split())}')


def compilation_cache_dir() -> str:
  """Where compiled programs are kept: $JAX_COMPILATION_CACHE_DIR if set ('' turns it off)."""
  if 'JAX_COMPILATION_CACHE_DIR' in os.environ:
    return os.environ['JAX_COMPILATION_CACHE_DIR']
  root = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(root, 'smallfx', 'jax')


def enable_compilation_cache() -> None:
  """Keeps compiled programs on disk: a later run with the same shapes skips compiling.

  Runs of one study share their programs (re-runs, resumes, seeds, configs that change
  only numbers). The default job again, in a new workdir: 30.2 -> 22.9 s for the whole
  process on a 2-core CPU, same results (experiments/bench/compile_cache.log); on GPU,
  compiling includes cuDNN autotuning (ResNet-20's step: 8-9 s on an H200). jax keys each
  entry by program, backend, versions and flags, and deletes the least recently used
  beyond 2 GiB. jax decides at the first compilation whether to use a cache, so this runs
  before anything is compiled.
  """
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_compilation_cache_dir', compilation_cache_dir() or None)
  jax.config.update('jax_compilation_cache_max_size', 2 * 2**30)


def run(main: Callable) -> None:
  """absl's app.run, with UserError turned into one line on stderr and exit 2."""

  def wrapped(argv):
    # Orbax and JAX log every checkpoint step at INFO; the progress bar says enough.
    logging.set_verbosity(logging.WARNING)
    enable_compilation_cache()
    try:
      main(argv)
    except UserError as e:
      fail(str(e))
    except KeyboardInterrupt:
      print('\ninterrupted: re-run the same command to resume from the last checkpoint',
            file=sys.stderr)
      sys.exit(130)

  app.run(wrapped, flags_parser=_parse_flags)
