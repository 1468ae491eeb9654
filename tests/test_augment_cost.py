"""tools/augment_cost.py: the --quick smoke run and the measure() entry point."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'tools'))

import augment_cost  # pylint: disable=g-import-not-at-top,wrong-import-position
import harness  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.mark.slow
def test_quick_cli_writes_json(tmp_path):
  out = tmp_path / 'cost.json'
  r = subprocess.run([sys.executable, 'tools/augment_cost.py', '--quick', '--json', str(out)],
                     capture_output=True, text=True, cwd=REPO, timeout=600)
  assert r.returncode == 0, r.stderr
  assert 'share' in r.stdout
  result = json.loads(out.read_text())
  assert result['without']['median'] > 0
  (spec, row), = result['specs'].items()
  assert spec == 'crop(pad=1)|flip'
  for key in ('with', 'augment'):
    assert row[key]['median'] > 0 and row[key]['min'] <= row[key]['median'] <= row[key]['max']
  assert np.isclose(row['share'], (row['with']['median'] - result['without']['median'])
                    / row['with']['median'])
  assert result['cpu'] and result['date']


def test_bad_spec_is_one_line_exit_2():
  r = subprocess.run([sys.executable, 'tools/augment_cost.py', '--quick', '--augment', 'flop'],
                     capture_output=True, text=True, cwd=REPO, timeout=600)
  assert r.returncode == 2
  assert 'flop' in r.stderr and 'Traceback' not in r.stderr


@pytest.mark.slow
def test_measure_with_seeds_and_synthetic_data():
  c = harness.config(model='mlp', batch_size=4, num_seeds=2, resample_per_seed=True,
                     samples_per_class=5, augment='crop(pad=1)|flip|trivial',
                     dataset=harness.synthetic((8, 8, 1), 48, 3))
  r = augment_cost.measure(c, repeats=2, steps=1)
  assert r['augment'] == c.augment
  assert r['t_with'] > 0 and r['t_without'] > 0 and r['t_augment'] > 0
  assert np.isclose(r['share'], (r['t_with'] - r['t_without']) / r['t_with'])
  assert np.isclose(r['alone_share'], r['t_augment'] / r['t_with'])
  assert r['cpu_share'] < 1 and r['cpu_alone_share'] > 0
  assert r['detail']['num_seeds'] == 2 and r['detail']['image_shape'] == [8, 8, 1]
