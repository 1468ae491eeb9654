"""Command-line plumbing shared by the entry points: one-line errors, exit status 2."""

import functools
import logging as std_logging
import os
import re
import sys
import traceback
from typing import Callable

from absl import app
from absl import flags
from absl import logging
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

from smallfx.errors import UserError

EXIT_USER_ERROR = 2


def fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)


HELP_FLAGS = frozenset({'-h', '-?', '-help', '--help', '--helpshort', '--helpfull'})


def _config_files(argv) -> list[str]:
  """The files given to config-file flags (`--config=FILE[:ARG]` or `--config FILE`)."""
  names = {name for name in flags.FLAGS
           if isinstance(flags.FLAGS[name].parser, ConfigFileFlagParser)}
  files = []
  for arg, after in zip(argv[1:], argv[2:] + ['']):
    if arg == '--':
      break
    name, eq, value = arg.lstrip('-').partition('=')
    if arg.startswith('-') and name in names:
      files.append((value if eq else after).split(':', 1)[0])
  return files


def _check_config_files(argv) -> None:
  # ml_collections defers a missing file to the first override, then tracebacks.
  for path in _config_files(argv):
    if not os.path.isfile(path):
      folder = os.path.dirname(path) or '.'
      there = os.listdir(folder) if os.path.isdir(folder) else []
      there = ', '.join(sorted(f for f in there if f.endswith('.py')))
      fail(f'config file {path} not found' + (f'; {folder} has: {there}' if there else ''))


def _config_error(e: BaseException, argv) -> str | None:
  """One line for an error in a config file (naming file and line), else None."""
  files = {os.path.abspath(f): f for f in _config_files(argv)}
  chain = []  # The error the file raised is the innermost: absl and ml_collections rewrap it.
  while e is not None and e not in chain:
    chain.append(e)
    e = e.__cause__ or e.__context__
  for error in reversed(chain):
    # config_flags only logs a get_config() that returned None; an override or the
    # required-flag check then fails on it.
    if files and any(text in str(error) for text in ("<class 'NoneType'>.",
                                                      'must have a value other than None')):
      return f'get_config() in {", ".join(files.values())} returned None, not a ConfigDict'
    if isinstance(error, AttributeError) and getattr(error, 'name', None) == 'get_config':
      path = files.get(os.path.abspath(getattr(error.obj, '__file__', None) or ''))
      if path:
        return f'config file {path} has no get_config() that returns its ConfigDict'
    where = (error.filename or '', error.lineno) if isinstance(error, SyntaxError) else ('', 0)
    for frame, line in traceback.walk_tb(error.__traceback__):  # the config file's last line
      if os.path.abspath(frame.f_code.co_filename) in files:
        where = (frame.f_code.co_filename, line)
    path = files.get(os.path.abspath(where[0])) if where[0] else None
    if path:
      text = error.msg if isinstance(error, SyntaxError) else ' '.join(str(error).split())
      return f'config file {path}, line {where[1]}: {type(error).__name__}: {text[:300]}'
  return None


def _parse_flags(argv, help_text: Callable[[], str] | None = None):
  """absl's flag parsing, with one line and exit 2 for every mistake; --help exits 0."""
  if HELP_FLAGS & set(argv[1:]):
    app.usage(shorthelp='--helpfull' not in argv, writeto_stdout=True)
    if help_text:
      print(help_text())
    sys.exit(0)
  _check_config_files(argv)
  # config_flags logs a get_config() that returned None as a warning, then fails
  # elsewhere; one line below says it instead.
  logging.set_verbosity(logging.ERROR)
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    fail(_config_error(e, argv) or _flag_error(e))


def _flag_error(e: Exception) -> str:
  """One line for a bad flag; any other error is re-raised."""
  # absl prints the whole usage text and exits 1 on a bad flag; a misspelt config
  # key deserves one line naming it, and exit 2 like every other user error.
  if isinstance(e, flags.Error):
    return str(e).splitlines()[0] if str(e) else type(e).__name__
  if isinstance(e, (AttributeError, KeyError)):
    # ml_collections reports an unknown `--config.KEY` as a nested KeyError text.
    text = str(e).replace('\\n', ' ').replace("\\'", "'")
    key = re.search(r"'(\w+)'", text)
    hint = re.search(r'Did you mean "(\w+)"', text)
    return (f"unknown config key {key.group(1) if key else text!r}"
            + (f' (did you mean {hint.group(1)!r}?)' if hint else ''))
  if isinstance(e, (ValueError, TypeError)):
    return f'bad flag value: {" ".join(str(e).split())}'
  raise e


def config_keys(defaults, title: str) -> str:
  """--help's list of every `--config.KEY` with its default, under `title`."""
  import ml_collections  # pylint: disable=g-import-not-at-top

  def keys(c, prefix=''):
    for k, v in c.items():
      if isinstance(v, ml_collections.ConfigDict):
        yield from keys(v, f'{prefix}{k}.')
      else:
        yield f'  --config.{prefix}{k}={v!r}'

  return '\n'.join([title, 'the --config file changes some, and --config.KEY=VALUE any:',
                    *keys(defaults)])


def use_cpu_devices(count: Callable[[], int]) -> None:
  """Before JAX starts: `count()` CPU devices, one per group of members side by side.

  An entry point owns its process, so it may set JAX's global config; the library
  never does. Devices set by the user (XLA_FLAGS' --xla_force_host_platform_device_count,
  JAX_NUM_CPU_DEVICES) are kept; other backends do not use these devices.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if (jax.config.jax_num_cpu_devices >= 0
      or 'xla_force_host_platform_device_count' in os.environ.get('XLA_FLAGS', '')):
    return
  n = count()
  if n > 1:
    jax.config.update('jax_num_cpu_devices', n)


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


def _quiet(record) -> bool:
  """Whether a log record is shown: not those whose error the main thread reports.

  Ctrl-C during a wait for a save makes Orbax log the interrupt with its traceback; a
  failed asynchronous save (a full disk) is logged by Orbax's threads and by asyncio
  for each of its tasks, then raised in the main thread, where it becomes one line
  (checkpoint.disk_errors) or a traceback.
  """
  if record.exc_info and record.exc_info[0] is KeyboardInterrupt:
    return False
  if 'orbax' in record.pathname and record.levelno >= std_logging.ERROR:
    return False
  return not (record.name == 'asyncio' and 'exception was never retrieved' in str(record.msg))


def run(main: Callable, help_text: Callable[[], str] | None = None) -> None:
  """absl's app.run, with UserError turned into one line on stderr and exit 2.

  `help_text()`, if given, is printed after the flags by --help.
  """

  def wrapped(argv):
    # Orbax and JAX log every checkpoint step at INFO; the progress bar says enough.
    logging.set_verbosity(logging.WARNING)
    logging.get_absl_handler().addFilter(_quiet)
    enable_compilation_cache()
    try:
      main(argv)
    except UserError as e:
      fail(str(e))
    except KeyboardInterrupt:
      if 'smallfx.checkpoint' in sys.modules:
        sys.modules['smallfx.checkpoint'].finish_saves()
      print('\ninterrupted: re-run the same command to resume from the last checkpoint',
            file=sys.stderr)
      sys.exit(130)

  app.run(wrapped, flags_parser=functools.partial(_parse_flags, help_text=help_text))
