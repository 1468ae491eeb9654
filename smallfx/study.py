"""Runs the small-data playbook on one dataset: a learning curve per method, and a report.

    python -m smallfx.study --config=configs/study/digits.py [--workdir=DIR] \
        [--config.KEY=VALUE ...] [--shard=I/N] [--report_only]

Every (method, samples per class) cell is tuned on validation data and trained on
several seeds as ordinary `smallfx.main` runs under DIR/cells/ (see smallfx/cells.py).
DIR then holds results.csv, summary.csv, learning_curve.png/.svg and report.md, rebuilt
after every cell. Re-running the same command skips finished cells and resumes an
interrupted one; `--shard=I/N` runs every N-th cell from the I-th (a cluster's array
job runs I = 0..N-1 at once in one DIR); `--report_only` rebuilds the outputs from the
cells that exist. `--config.methods=help` lists the methods.
"""

import hashlib
import json
import os
import shlex
import sys

from absl import flags
from ml_collections import config_flags
import tqdm

from smallfx import cli
from smallfx import malloc

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a study config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output folder; default runs/study-NAME-HASH.')
_SHARD = flags.DEFINE_string('shard', '0/1', 'I/N: run every N-th cell from the I-th.')
_REPORT_ONLY = flags.DEFINE_bool('report_only', False,
                                 'Rebuild the outputs from the finished cells; train nothing.')
flags.mark_flags_as_required(['config'])


def _shard(text: str) -> tuple[int, int]:
  try:
    index, count = (int(v) for v in text.split('/'))
  except ValueError:
    raise cli.UserError(f'--shard={text!r}: give I/N, e.g. 0/4') from None
  if not 0 <= index < count:
    raise cli.UserError(f'--shard={text}: I must be in 0..N-1')
  return index, count


def _weight(study, cell, num_classes: int) -> float:
  """A cell's rough cost, for the time-left estimate: member-steps of its runs.

  A baseline's fits cost about as much as 1.5 steps per training image and seed
  (500 trees, or boosting, on 2,500 Fashion-MNIST images against SmallCNN steps).
  """
  if cell.method.kind != 'trained':
    return 1.5 * study.seeds * cell.size * num_classes
  from smallfx import cells as cells_lib  # pylint: disable=g-import-not-at-top
  from smallfx import experiment  # pylint: disable=g-import-not-at-top
  total = 0.0
  for stage in cells_lib.stages(study, cell.method):
    exp = experiment.resolve(cells_lib.cell_config(study, cell, stage, {}))
    total += (exp.total_steps(cell.size * num_classes) * exp.num_members
              * (40 if exp.pretrained else 1))
  return total


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  from smallfx import methods  # pylint: disable=g-import-not-at-top
  path = config_flags.get_config_filename(flags.FLAGS['config'])
  config = _CONFIG.value
  if str(config.methods).strip() == 'help':
    print(methods.help_text(config.base.loss))
    return
  from smallfx import cells as cells_lib  # pylint: disable=g-import-not-at-top
  from smallfx import report  # pylint: disable=g-import-not-at-top
  name = os.path.splitext(os.path.basename(path))[0]
  # What the cells depend on: another method or size adds cells to the same folder.
  digest = hashlib.sha1(json.dumps([config.base.to_dict(), config.grid.to_dict(), config.seeds,
                                    config.tune_seeds], sort_keys=True, default=str).encode()
                        ).hexdigest()[:8]
  workdir = _WORKDIR.value or os.path.join('runs', f'study-{name}-{digest}')
  index, count = _shard(_SHARD.value)
  study = cells_lib.resolve(config, workdir)
  meta = {'name': name,
          'command': 'python -m smallfx.study ' + ' '.join(
              shlex.quote(a) for a in sys.argv[1:] if not a.startswith(('--shard',
                                                                        '--report_only')))}
  failed = []
  if not _REPORT_ONLY.value:
    cells_lib.check_available(study)
    cli.use_cpu_devices(lambda: cells_lib.cpu_devices(study))  # the largest stage's
    num_classes = cells_lib.check_sizes(study)
    todo = [c for c in cells_lib.shard(cells_lib.cells(study), index, count)
            if cells_lib.read(study, c) is None]  # finished cells take no time
    weights = [_weight(study, c, num_classes) for c in todo]
    bar = tqdm.tqdm(total=sum(weights), file=sys.stderr, dynamic_ncols=True,
                    bar_format='{l_bar}{bar}| [{elapsed}<{remaining}] {postfix}', desc=name)
    for i, (cell, weight) in enumerate(zip(todo, weights)):
      bar.set_postfix_str(f'cell {i + 1}/{len(todo)}: {cell.name}')
      try:
        cells_lib.run(study, cell)
      except cli.UserError as e:  # every member diverged, a cell in use, ...: go on
        failed.append(str(e))
        tqdm.tqdm.write(f'error: {e}', file=sys.stderr)
      bar.update(weight)
      _write_outputs(study, cells_lib, report, meta)
    bar.close()
  written = _write_outputs(study, cells_lib, report, meta)
  if written:
    print(f'{workdir}: ' + ', '.join(os.path.basename(p) for p in written))
  if failed:
    raise cli.UserError(f'{len(failed)} cell(s) did not finish (their lines are above); '
                        'the report has the others. Fix the cause and re-run the same command')
  if not written:
    raise cli.UserError(f'no finished cells in {workdir} yet: run the study without '
                        '--report_only first')


def _write_outputs(study, cells_lib, report, meta) -> list[str]:
  records = {(c.method.name, c.size): r for c in cells_lib.cells(study)
             if (r := cells_lib.read(study, c)) is not None}
  if not records:
    return []
  meta['num_classes'] = next(iter(records.values()))['num_classes']
  meta['machine'] = '; '.join(sorted({r.get('machine', '?') for r in records.values()}))
  return report.write(study, records, meta)


def _help() -> str:
  from smallfx import config as base  # pylint: disable=g-import-not-at-top
  from smallfx import methods  # pylint: disable=g-import-not-at-top
  return '\n'.join([
      cli.config_keys(base.study(), '\nStudy config keys, as the defaults of '
                      "smallfx.config.study() (whose comments explain them; base.* are "
                      "smallfx.main's);"),
      '\nMethods (--config.methods=NAME,NAME,...):', methods.help_text()])


if __name__ == '__main__':
  malloc.relaunch()
  cli.run(main, help_text=_help)
