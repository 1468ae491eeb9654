"""The study: methods by name, cells, statistics, outputs, resume and shards."""

import csv
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, run_cli
from smallfx import cells
from smallfx import config as config_lib
from smallfx import curves
from smallfx import methods
from smallfx import report
from smallfx.errors import UserError

STUDY = 'configs/study/digits.py'
# A study of seconds: two sizes, two settings, 40 steps.
TINY = ['--config.sizes=10,20', '--config.methods=random_forest,cosine,xent,ensemble',
        '--config.grid.learning_rate=0.1,0.3', '--config.grid.weight_decay=5e-4',
        '--config.seeds=2', '--config.base.max_steps=40', '--config.base.eval_every_steps=0',
        '--config.base.checkpoint_every_steps=20']


def _one_error_line(result, *texts):
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr[-2000:]
  for text in texts:
    assert text in lines[0], lines[0]


# ---------------------------------------------------------------------------
# Methods.


def test_methods_help_lists_every_method_in_one_line_each(cli):
  result = cli('smallfx.study', f'--config={STUDY}', '--config.methods=help')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert [line.split()[0] for line in lines] == list(methods.METHODS)
  for name in ('random_forest', 'gradient_boosting', 'logistic_features', 'xent', 'cosine+aug',
               'cosine_xent', 'finetune', 'linear_probe', 'resnet56', 'ensemble'):
    assert name in methods.METHODS


@pytest.mark.parametrize('override, texts', [
    ('--config.methods=cosine,no_such', ["unknown method 'no_such'", 'random_forest', 'xent']),
    ('--config.sizes=', ['sizes is empty']),
    ('--config.sizes=25,10', ['strictly ascending']),
    ('--config.sizes=10,10', ['strictly ascending']),
    ('--config.sizes=10,ten', ['comma-separated numbers']),
    ('--config.sizes=10,500', ["size 500 per class", 'has only', 'the largest size can be']),
    ('--config.base.sweep.learning_rate=0.1,0.2', ['--config.grid.NAME']),
    ('--config.grid.learning_rate=-1', ['learning_rate must be > 0']),
    ('--config.base.model=no_such', ["unknown model 'no_such'"]),
    ('--config.seeds=0', ['seeds must be >= 1']),
    ('--config.methods=ensemble', ['name one too']),
])
def test_bad_study_input_is_one_line(cli, tmp_path, override, texts):
  result = cli('smallfx.study', f'--config={STUDY}', f'--workdir={tmp_path}', override)
  _one_error_line(result, *texts)


def test_a_method_that_needs_a_missing_package_names_it():
  method = methods.Method('needs_x', 'needs a package', needs={'no_such_module_x': 'no-such-pkg'})
  with pytest.raises(UserError, match="needs the pip package 'no-such-pkg'"):
    method.check_available()


def test_a_registered_method_plugs_into_the_study(tmp_path):
  """A technique registers a recipe; the study's cells run it with no change."""
  smooth = methods.register(methods.Method(
      'test_smooth', 'label smoothing 0.2', overrides=dict(loss='xent_smooth',
                                                           label_smoothing=0.2)))
  try:
    config = config_lib.study()
    config.methods = 'test_smooth,random_forest'
    study = cells.resolve(config, str(tmp_path))
    assert study.methods[0] is smooth
    tune = cells.cell_config(study, cells.Cell(smooth, 25), 'tune', {})
    assert (tune.loss, tune.label_smoothing, tune.samples_per_class) == ('xent_smooth', 0.2, 25)
    assert tune.sweep.learning_rate == config.grid.learning_rate
    assert tune.num_seeds == config.tune_seeds and tune.seed == cells.TUNE_SEED_OFFSET
    final = cells.cell_config(study, cells.Cell(smooth, 25), 'final', {'learning_rate': 0.3})
    assert final.learning_rate == 0.3 and not final.sweep.learning_rate
    assert (final.num_seeds, final.seed) == (config.seeds, 0)
  finally:
    del methods.METHODS['test_smooth']


def test_pretraining_methods_are_study_methods_and_older_records_still_match(tmp_path):
  config = config_lib.study()
  config.methods = 'dae,stacked_ae,simclr,cosine'
  study = cells.resolve(config, str(tmp_path))
  dae, _, _, cosine = study.methods
  tune = cells.cell_config(study, cells.Cell(dae, 10), 'tune', {})
  assert (tune.pretrain, tune.finetune, tune.backbone_lr_mult) == ('dae', 'full', 1.0)
  # A cell without pretraining hashes as it did before those fields existed.
  before = cells.fingerprint(study, cells.Cell(cosine, 10))
  study.base.pretraining.steps = 7
  assert cells.fingerprint(study, cells.Cell(cosine, 10)) == before
  assert cells.fingerprint(study, cells.Cell(dae, 10)) != cells.fingerprint(
      dataclasses.replace(study, base=config_lib.study().base), cells.Cell(dae, 10))


@pytest.mark.slow
def test_a_pretraining_method_runs_as_a_study_cell(tmp_path):
  r = run_cli('smallfx.study', f'--config={STUDY}', f'--workdir={tmp_path}', '--config.sizes=10',
              '--config.methods=random_forest,dae', *TINY[2:],
              '--config.base.pretraining.steps=6', '--config.base.pretraining.batch_size=16')
  assert r.returncode == 0, r.stderr[-3000:]
  for stage in ('tune', 'final'):
    done = json.loads((tmp_path / 'cells' / 'dae' / 'n0010' / stage / 'pretrain' /
                       'results.json').read_text())
    assert done['steps'] == 6
  assert '| dae |' in (tmp_path / 'report.md').read_text()


def test_shards_are_disjoint_and_cover_every_cell():
  all_cells = list(range(11))
  shares = [cells.shard(all_cells, i, 3) for i in range(3)]
  assert sorted(sum(shares, [])) == all_cells


# ---------------------------------------------------------------------------
# Statistics.


def test_power_law_fit_recovers_its_parameters_and_forecasts():
  law = curves.PowerLaw(a=0.8, b=0.6, c=0.05)
  sizes = [10, 25, 50, 100, 250]
  fitted = curves.fit(sizes, law.error(sizes))
  np.testing.assert_allclose([fitted.a, fitted.b, fitted.c], [0.8, 0.6, 0.05], rtol=1e-3)
  f = curves.forecast(sizes, 1 - law.error(sizes), [0.002] * 5)
  assert f.trusted and f.check[0] == 250
  best = 1 - law.error(250)
  assert [a for a, _ in f.needed] == pytest.approx([best + g for g in curves.MILESTONES])
  for accuracy, samples in f.needed:
    if accuracy < 0.94:  # near the floor the samples needed explode with any error
      assert samples == pytest.approx(law.samples_for(accuracy), rel=1e-2)
      assert samples > 250
  assert law.samples_for(0.96) == math.inf  # beyond the floor of 0.95


def test_forecast_refuses_a_curve_that_does_not_fall_or_is_badly_predicted():
  flat = curves.forecast([10, 25, 50, 100], [0.80, 0.81, 0.80, 0.80], [0.01] * 4)
  assert not flat.trusted and 'does not fall' in flat.reason
  # Steady gains, then a jump the first three sizes could not predict.
  jump = curves.forecast([10, 25, 50, 100], [0.60, 0.65, 0.68, 0.90], [0.005] * 4)
  assert not jump.trusted and 'predicts' in jump.reason and not jump.needed
  few = curves.forecast([10, 25, 50], [0.6, 0.7, 0.75], [0.01] * 3)
  assert not few.trusted and 'needs 4' in few.reason
  straight = curves.forecast([10, 20, 40, 80], [1 - 0.4 * n ** -0.5 for n in (10, 20, 40, 80)],
                             [0.001] * 4)
  assert not straight.trusted and 'not bent' in straight.reason


def test_interval_and_paired_test():
  mean, std, half = curves.interval([0.8, 0.82, 0.84])
  assert (mean, std) == pytest.approx((0.82, 0.02))
  assert half == pytest.approx(4.303 * 0.02 / math.sqrt(3), rel=1e-3)
  paired = lambda a, b: curves.paired_p(dict(enumerate(a)), dict(enumerate(b)))
  assert math.isnan(paired([0.9, 0.91, 0.92], [0.8, 0.81, 0.82]))  # a gap with no spread
  assert paired([0.9, 0.8, 0.85], [0.9, 0.8, 0.85]) == 1.0
  assert paired([0.9, 0.8, 0.85], [0.8, 0.9, 0.85]) > 0.5
  assert paired([0.90, 0.91, 0.93, 0.92], [0.80, 0.82, 0.81, 0.80]) < 0.01
  assert math.isnan(paired([0.9], [0.8]))
  # Seeds pair by name, not by position.
  assert curves.paired_p({0: 0.9, 1: 0.8, 2: 0.7}, {2: 0.7, 0: 0.9, 1: 0.8}) == 1.0


def _record(method, size, val, test, ensemble=None, kind='trained'):
  return {'method': method, 'size': size, 'kind': kind, 'num_classes': 10,
          'seeds': list(range(len(test))), 'val_accuracy': val, 'test_accuracy': test,
          'ensemble_accuracy': ensemble, 'chosen': {'learning_rate': 0.1}, 'steps': 100,
          'seconds': {'final': 1.0}, 'diverged': 0, 'rows': []}


def test_ensemble_takes_the_method_best_on_validation_and_lift_is_over_the_forest(tmp_path):
  config = config_lib.study()
  config.methods = 'random_forest,xent,cosine,ensemble'
  config.sizes = '10'
  study = cells.resolve(config, str(tmp_path))
  records = {
      ('random_forest', 10): _record('random_forest', 10, [0.7] * 3, [0.70, 0.71, 0.72],
                                     kind='baseline'),
      # xent: better on validation, worse on test; the ensemble must follow validation.
      ('xent', 10): _record('xent', 10, [0.9] * 3, [0.80, 0.80, 0.80], ensemble=0.82),
      ('cosine', 10): _record('cosine', 10, [0.8] * 3, [0.85, 0.85, 0.85], ensemble=0.88),
  }
  rows = {r['method']: r for r in report.summarise(study, records)}
  assert rows['ensemble']['of'] == 'xent' and rows['ensemble']['test_accuracy'] == 0.82
  assert rows['cosine']['lift'] == pytest.approx(0.85 - 0.71)
  assert rows['random_forest']['lift'] == pytest.approx(0.0)


def test_each_technique_is_paired_with_its_recipe_without_it(tmp_path):
  config = config_lib.study()  # base loss: cosine
  config.methods = 'random_forest,xent,xent+aug,cosine+aug,dada,cgan_augment+aug'
  config.sizes = '10,20'
  study = cells.resolve(config, str(tmp_path))
  assert methods.METHODS['cgan_augment+aug'].comparison(study.base.loss) == 'cosine+aug'
  assert 'default augmentation [against xent]' in methods.help_text('cosine')  # xent+aug
  records = {(m, n): _record(m, n, [0.8] * 3, test) for m, n, test in (
      ('xent', 10, [0.70, 0.72, 0.74]),
      ('xent+aug', 10, [0.75, 0.78, 0.80]),  # +5, +6, +6 points: helps
      ('dada', 10, [0.72, 0.71, 0.75]),      # +2, -1, +1 against xent: no difference
      ('xent', 20, [0.80, 0.81, 0.82]),
      ('dada', 20, [0.78, 0.795, 0.80]),     # -2, -1.5, -2: hurts
      ('cosine+aug', 10, [0.8] * 3))}        # cgan_augment+aug has no cell: no row
  records[('random_forest', 10)] = _record('random_forest', 10, [0.7] * 3, [0.7] * 3,
                                           kind='baseline')
  lines = report._techniques(study, report.summarise(study, records))
  rows = [line for line in lines if line.startswith('| ') and '---' not in line][1:]
  assert [r.split(' | ')[:3] for r in rows] == [
      ['| xent+aug', 'xent', '10'], ['| dada', 'xent', '10'], ['| dada', 'xent', '20']]
  assert '+5.7 ± 0.6 | helps (p=' in rows[0]
  assert '+0.7 ± 1.5 | no difference (p=' in rows[1]
  assert '-1.8 ± 0.3 | hurts (p=' in rows[2]


def test_many_methods_get_a_panel_per_family_beside_baselines_and_references(tmp_path):
  config = config_lib.study()  # base loss: cosine
  names = ['random_forest', 'xent', 'cosine', 'cosine+aug', 'resnet20', 'resnet56',
           'finetune', 'linear_probe', 'dae', 'ensemble']
  config.methods = ','.join(names)
  config.sizes = '10'
  study = cells.resolve(config, str(tmp_path))
  summary = [{'method': m, 'size': 10} for m in names if m != 'linear_probe']
  panels = {title: ([m.name for m in members], [m.name for m in refs])
            for title, members, refs in report._panels(study, summary)}
  assert panels == {
      'from scratch': (['xent', 'cosine', 'cosine+aug', 'ensemble'], ['random_forest']),
      'depth': (['resnet20', 'resnet56'], ['random_forest', 'cosine+aug']),
      'transfer': (['finetune'], ['random_forest', 'cosine+aug']),  # no linear_probe cell
      'pretraining': (['dae'], ['random_forest', 'cosine+aug'])}
  # A few methods share one panel.
  (title, members, refs), = report._panels(study, summary[:5])
  assert (title, len(members), refs) == ('', 5, [])
  # And the figure draws either way.
  summary = [dict(r, test_accuracy=0.8, ci95=0.01) for r in summary]
  report.plot(str(tmp_path / 'curve'), study, summary, 'title')
  assert (tmp_path / 'curve.png').stat().st_size > 0


# ---------------------------------------------------------------------------
# End to end.


def _rows(path):
  with open(path) as f:
    return list(csv.DictReader(f))


@pytest.mark.slow
def test_study_end_to_end_resumes_and_reports_only(cli, tmp_path):
  workdir = str(tmp_path / 'study')
  result = cli('smallfx.study', f'--config={STUDY}', f'--workdir={workdir}', *TINY)
  assert result.returncode == 0, result.stderr[-3000:]
  for name in ('results.csv', 'summary.csv', 'learning_curve.png', 'learning_curve.svg',
               'report.md'):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  summary = _rows(os.path.join(workdir, 'summary.csv'))
  assert sorted((r['method'], r['size']) for r in summary) == sorted(
      (m, s) for m in ('random_forest', 'cosine', 'xent', 'ensemble') for s in ('10', '20'))
  for r in summary:
    assert 0.3 < float(r["test_accuracy"]) <= 1, r  # 40 steps: well above chance (0.1)
  rows = _rows(os.path.join(workdir, 'results.csv'))
  tune = [r for r in rows if r['method'] == 'cosine' and r['size'] == '10' and
          r['stage'] == 'tune']
  final = [r for r in rows if r['method'] == 'cosine' and r['size'] == '10' and
           r['stage'] == 'final']
  assert len(tune) == 2 and sum(r['chosen'] == 'True' for r in tune) == 1  # 2 settings x 1
  assert len(final) == 2 and {r['seed'] for r in final} == {'0', '1'}
  cosine = next(r for r in summary if r['method'] == 'cosine' and r['size'] == '10')
  chosen = next(r for r in tune if r['chosen'] == 'True')
  assert all(r['test_accuracy'] == '' for r in tune if r['chosen'] == 'False')  # test reports
  assert chosen['setting'].startswith(cosine['chosen'].split()[0])
  assert np.mean([float(r['test_accuracy']) for r in final]) == pytest.approx(
      float(cosine['test_accuracy']), abs=1e-5)
  text = open(os.path.join(workdir, 'report.md')).read()
  for part in ('## 10 per class', '## 20 per class', '## How much more data', 'paired t-test',
               '100 labelled images', 'fresh seeds', '## Time'):
    assert part in text, part

  # Re-running skips every finished cell.
  stamps = {p: os.path.getmtime(p) for p in _cell_files(workdir)}
  again = cli('smallfx.study', f'--config={STUDY}', f'--workdir={workdir}', *TINY)
  assert again.returncode == 0, again.stderr[-2000:]
  assert stamps == {p: os.path.getmtime(p) for p in _cell_files(workdir)}
  assert 'test accuracy' not in again.stdout  # no run was started

  # The same folder with other seeds would mix two studies: refused.
  other = cli('smallfx.study', f'--config={STUDY}', f'--workdir={workdir}', *TINY,
              '--config.seeds=3')
  _one_error_line(other, 'holds a cell of another study config')

  # --report_only rebuilds the outputs from the cells.
  os.remove(os.path.join(workdir, 'report.md'))
  os.remove(os.path.join(workdir, 'summary.csv'))
  rebuilt = cli('smallfx.study', f'--config={STUDY}', f'--workdir={workdir}', *TINY,
                '--report_only')
  assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
  assert _rows(os.path.join(workdir, 'summary.csv')) == summary
  assert '## 20 per class' in open(os.path.join(workdir, 'report.md')).read()


def _cell_files(workdir):
  return sorted(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(workdir, 'cells'))
                for f in fs if f == 'cell.json')


@pytest.mark.slow
def test_study_killed_and_rerun_finishes_what_was_left(cli, tmp_path):
  """SIGKILL while a cell trains; the same command finishes the study."""
  workdir = str(tmp_path / 'study')
  args = [sys.executable, '-m', 'smallfx.study', f'--config={STUDY}', f'--workdir={workdir}',
          *TINY[:-3], '--config.base.max_steps=400', '--config.base.checkpoint_every_steps=50',
          '--config.methods=cosine', '--config.sizes=10,20']
  proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpts = os.path.join(workdir, 'cells', 'cosine', 'n0020', 'tune', 'checkpoints')
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(ckpts) and any(d.isdigit() and int(d) >= 100 for d in os.listdir(ckpts)):
      break
    time.sleep(0.05)
  assert proc.poll() is None, 'the study finished before it could be killed'
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert len(_cell_files(workdir)) == 1  # n=10 was done, n=20 was not
  result = cli('smallfx.study', *args[3:])
  assert result.returncode == 0, result.stderr[-2000:]
  assert len(_cell_files(workdir)) == 2
  with open(os.path.join(workdir, 'cells', 'cosine', 'n0020', 'tune', 'results.json')) as f:
    assert json.load(f)['resumed_from_step'] >= 100


@pytest.mark.slow
def test_two_shards_at_once_then_report_only(tmp_path):
  workdir = str(tmp_path / 'study')
  base = [sys.executable, '-m', 'smallfx.study', f'--config={STUDY}', f'--workdir={workdir}',
          *TINY]
  procs = [subprocess.Popen([*base, f'--shard={i}/2'], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-2000:]
  assert len(_cell_files(workdir)) == 6  # 3 methods that run x 2 sizes
  result = subprocess.run([*base, '--report_only'], cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-2000:]
  assert len(_rows(os.path.join(workdir, 'summary.csv'))) == 8  # with the ensemble


def test_report_only_without_cells_is_one_line(cli, tmp_path):
  result = cli('smallfx.study', f'--config={STUDY}', f'--workdir={tmp_path}', '--report_only')
  _one_error_line(result, 'no finished cells')


@pytest.mark.slow
@pytest.mark.parametrize('name, num_classes, shape', [
    ('cifar100', 100, (32, 32, 3)), ('caltech_birds2011', 200, (224, 224, 3))])
def test_gpu_study_configs_on_tfds_mock_data(tmp_path, name, num_classes, shape):
  """Barz & Denzler's settings resolve, and their data loads at the config's image size
  (the birds are photographs of many sizes, resized on load)."""
  tfds = pytest.importorskip('tensorflow_datasets')
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, 'configs', 'study',
                                                                   f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  study = cells.resolve(config, str(tmp_path))
  assert study.base.dataset == f'tfds:{name}' and len(study.sizes) >= 4
  # The mock has about 15 random images of each class.
  config.base.val_per_class, config.base.samples_per_class, config.sizes = 1, 2, '1,2'
  with tfds.testing.mock_data(num_examples=15 * num_classes,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    from smallfx import data  # pylint: disable=g-import-not-at-top
    assert cells.check_sizes(cells.resolve(config, str(tmp_path))) == num_classes
    d = data.load(data.Spec.from_config(config.base))
  assert d.num_classes == num_classes
  assert d.train.images.shape == (2 * num_classes, *shape)


def test_help_exits_0_and_lists_keys_and_methods(cli):
  result = cli('smallfx.study', '--help')
  assert result.returncode == 0, result.stderr
  for text in ('--config.sizes=', '--config.grid.learning_rate=', '--config.base.model=',
               'cosine+aug', '--shard', '--report_only'):
    assert text in result.stdout, text
