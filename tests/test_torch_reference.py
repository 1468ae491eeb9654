"""tools/torch_reference.py runs end to end on a fake digits cell of a few steps."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tools'))


@pytest.mark.slow
def test_torch_reference_trains_a_cell_and_reports_accuracies(tmp_path, capsys):
  pytest.importorskip('torch')
  import torch_reference  # pylint: disable=g-import-not-at-top
  # A cell.json as the study writes one, without a fingerprint (which the tool then
  # cannot check), for the digits study config's `xent` at 10 per class.
  cell = tmp_path / 'cells' / 'xent' / 'n0010'
  cell.mkdir(parents=True)
  (cell / 'cell.json').write_text(json.dumps({
      'method': 'xent', 'size': 10, 'kind': 'trained',
      'chosen': {'learning_rate': 0.1, 'weight_decay': 5e-4}, 'steps': 3,
      'seeds': [0, 1], 'test_accuracy': [0.95, 0.96]}))
  out = tmp_path / 'reference.json'
  assert torch_reference.main([
      f'--cell={cell}', f'--config={ROOT}/configs/study/digits.py', '--seeds=2',
      '--steps=3', '--threads=1', f'--json={out}']) == 0
  printed = capsys.readouterr().out
  assert 'seed 1: torch' in printed and 'torch reference:' in printed, printed
  report = json.loads(out.read_text())
  assert report['seeds'] == [0, 1] and report['steps'] == 3
  assert all(0 <= a <= 1 for a in report['torch']['test_accuracy'])
  assert report['smallfx']['mean'] == pytest.approx(0.955)
  assert isinstance(report['within_spread'], bool)
