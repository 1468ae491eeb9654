"""tools/torch_reference.py runs end to end on a fake digits cell of a few steps."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tools'))


@pytest.mark.slow
@pytest.mark.parametrize('method', ['xent', 'cosine_xent'])
def test_torch_reference_trains_a_cell_and_reports_accuracies(tmp_path, capsys, method):
  pytest.importorskip('torch')
  import torch_reference  # pylint: disable=g-import-not-at-top
  # A cell.json as the study writes one, without a fingerprint (which the tool then
  # cannot check), for the digits study config's `method` at 10 per class.
  cell = tmp_path / 'cells' / method / 'n0010'
  cell.mkdir(parents=True)
  (cell / 'cell.json').write_text(json.dumps({
      'method': method, 'size': 10, 'kind': 'trained',
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
  assert isinstance(report['within_spread'], bool) and 'p_paired' in report


def test_a_recipe_the_reference_does_not_implement_is_refused(tmp_path, capsys):
  pytest.importorskip('torch')
  import torch_reference  # pylint: disable=g-import-not-at-top
  cell = tmp_path / 'cells' / 'cosine+aug' / 'n0010'
  cell.mkdir(parents=True)
  (cell / 'cell.json').write_text(json.dumps({
      'method': 'cosine+aug', 'size': 10, 'kind': 'trained',
      'chosen': {'learning_rate': 0.1, 'weight_decay': 5e-4}, 'steps': 3,
      'seeds': [0], 'test_accuracy': [0.9]}))
  assert torch_reference.main([f'--cell={cell}',
                               f'--config={ROOT}/configs/study/digits.py']) == 2
  assert "augment='auto' (needs 'none')" in capsys.readouterr().err


@pytest.mark.parametrize('name', ['xent', 'cosine', 'cosine_xent'])
def test_the_reference_losses_and_predictions_are_smallfx_s(name):
  torch = pytest.importorskip('torch')
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch_reference  # pylint: disable=g-import-not-at-top
  from smallfx import losses  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  out, logits = rng.normal(size=(2, 16, 10)).astype(np.float32)
  labels = rng.integers(0, 10, size=16)
  weight = 0.3  # not the default, so that a weight left out shows
  ours, predicted = torch_reference.loss_and_prediction(
      name, torch.from_numpy(out), torch.from_numpy(logits), torch.from_numpy(labels), weight)
  loss = losses.get(name)
  outputs = {'output': out, 'logits': logits}
  theirs = loss.per_example(outputs, np.eye(10, dtype=np.float32)[labels],
                            {'cosine_xent_weight': weight}).mean()
  assert float(ours) == pytest.approx(float(theirs), rel=1e-5)
  np.testing.assert_array_equal(predicted.numpy(), np.argmax(loss.scores(outputs), -1))


def test_the_comparison_pairs_seeds_that_trained_on_the_same_images():
  import torch_reference  # pylint: disable=g-import-not-at-top
  ours, theirs = [0.80, 0.83, 0.86], [0.79, 0.821, 0.849]
  # Each seed is about 1 point up: hidden by the 3-point spread between seeds, plain when paired.
  verdict = torch_reference.compare(ours, theirs, list(zip(ours, theirs)))
  assert verdict['difference'] == pytest.approx(0.01)
  assert verdict['within_spread'] and verdict['p_paired'] < 0.01
  assert verdict == {**torch_reference.compare(ours, theirs), 'p_paired': verdict['p_paired']}
