"""Class hierarchies: the file's checks, the exact embedding, the mistake metrics, a run."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smallfx import cells
from smallfx import config as config_lib
from smallfx import data as data_lib
from smallfx import hierarchy
from smallfx import losses
from smallfx import methods
from smallfx import models
from smallfx.errors import UserError

from conftest import REPO, run_cli

DIGITS = [str(i) for i in range(10)]
# Digits by shape, unbalanced on purpose: 1 and 7 are strokes, 0 6 8 9 have loops (6 and 9
# closed at one end), the rest curves; 4 sits directly under the root.
DIGITS_TREE = """
# child parent
1 strokes
7 strokes
0 loops
8 loops
6 hooks
9 hooks
hooks loops
2 curves
3 curves
5 curves
strokes digits
loops digits
curves digits
4 digits
"""


def _config_file(path):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('study_config', os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _write(tmp_path, text, name='tree.txt'):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


@pytest.mark.parametrize('tree,names', [
    ('hierarchies/fashion_mnist.txt', data_lib.FASHION_MNIST_CLASSES),
    ('hierarchies/cifar100.txt', None),
    (None, DIGITS),
])
def test_the_embedding_is_exact_and_on_the_unit_sphere(tmp_path, tree, names):
  path = os.path.join(REPO, tree) if tree else _write(tmp_path, DIGITS_TREE)
  if names is None:  # CIFAR-100: the leaves, in the alphabetical order of its labels
    read = hierarchy.read(path)
    names = sorted(n for n in read.parent if n not in read.children)
    assert len(names) == 100 and len(read.children) == 21  # 20 superclasses and the root
  classes = hierarchy.load(path, names)
  e = classes.embedding
  chex.assert_shape(e, (len(names), len(names)))
  chex.assert_trees_all_close(np.linalg.norm(e, axis=1), np.ones(len(names)), atol=1e-6)
  chex.assert_trees_all_close(e @ e.T, classes.similarity, atol=1e-6)
  # In float32, as the loss uses them.
  e32 = np.asarray(jnp.asarray(e, jnp.float32))
  chex.assert_trees_all_close(e32 @ e32.T, classes.similarity, atol=1e-6)


def test_similarities_follow_the_lowest_common_ancestor(tmp_path):
  classes = hierarchy.load(_write(tmp_path, DIGITS_TREE), DIGITS)
  s = classes.similarity
  # The tree's height is 3 (digits > loops > hooks > 6).
  assert classes.max_height == 3
  assert s[6, 9] == pytest.approx(1 - 1 / 3)   # under 'hooks' (height 1)
  assert s[0, 6] == pytest.approx(1 - 2 / 3)   # under 'loops' (height 2)
  assert s[1, 7] == pytest.approx(1 - 1 / 3)   # under 'strokes' (height 1)
  assert s[1, 0] == 0 and s[4, 2] == 0         # only the root in common
  assert (np.diag(s) == 1).all()
  # Level 1: strokes, loops, curves and 4; level 2: hooks apart from 0 and 8.
  lv1, lv2 = classes.levels
  assert lv1[6] == lv1[0] == lv1[8] and lv1[1] == lv1[7] and lv1[4] not in lv1[[0, 1, 2]]
  assert lv2[6] == lv2[9] and lv2[6] != lv2[0] and lv2[0] != lv2[8]


def test_the_metrics_match_a_hand_count():
  # Fashion-MNIST: 0 T-shirt, 2 Pullover, 4 Coat, 6 Shirt are tops; 5 7 9 footwear.
  classes = hierarchy.load(os.path.join(REPO, 'hierarchies/fashion_mnist.txt'),
                           data_lib.FASHION_MNIST_CLASSES)
  labels = np.array([0, 0, 5, 8])
  scores = np.full((4, 10), 0.0)
  ranks = [[0, 2, 4, 6, 1],   # right; then the other tops: the best top-5 there is
           [2, 0, 1, 3, 5],   # a pullover: wrong within tops (height 1)
           [8, 7, 9, 5, 0],   # a bag for a sandal: wrong across groups (height 2)
           [8, 0, 1, 2, 3]]   # right, bags have one class
  for i, order in enumerate(ranks):
    scores[i, order] = [5, 4, 3, 2, 1]
  got = hierarchy.metrics(classes, scores, labels)
  assert got['hierarchical_accuracy'] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
  assert got['mistake_severity'] == pytest.approx((1 + 2) / 2)
  assert got['level1_accuracy'] == pytest.approx(3 / 4)
  # Top-5 similarity sums over the best possible (1 + 0.5 * 3 + 0 = 2.5 for a top; 2 for
  # a sandal: itself and two shoes; 1 for the bag).
  precision = [2.5 / 2.5, (0.5 + 1 + 0 + 0 + 0) / 2.5, (0 + 0.5 + 0.5 + 1 + 0) / 2, 1 / 1]
  assert got['hierarchical_precision@5'] == pytest.approx(np.mean(precision))
  # No mistakes: no severity (not zero).
  assert np.isnan(hierarchy.metrics(classes, scores[[0, 3]], labels[[0, 3]])[
      'mistake_severity'])


@pytest.mark.parametrize('text,message', [
    ('0 a\n1 a\na b\nb a\n', "a cycle, 'a' -> 'b' -> 'a'"),
    ('0 a\n1 b\n', "2 roots ('a', 'b')"),
    ('0 a\n0 b\n', "line 2: '0' has two parents, 'a' (line 1) and 'b'"),
    ('0 a b\n', 'line 1: give `child parent`'),
    ('# nothing\n', 'holds no `child parent` pairs'),
])
def test_a_broken_file_is_refused_with_its_reason(tmp_path, text, message):
  with pytest.raises(UserError, match=None) as e:
    hierarchy.read(_write(tmp_path, text))
  assert message in str(e.value)


@pytest.mark.parametrize('extra,message', [
    ('', "lacks 1 class(es) of the data: '4'"),
    ('4 digits\nsquiggle curves\n', "line 17: 'squiggle' is neither a class of the data "
     'nor an inner node'),
    ('4 digits\n10 4\n', "class '4' has children"),
])
def test_a_hierarchy_must_fit_the_classes(tmp_path, extra, message):
  text = DIGITS_TREE.replace('4 digits\n', '') + extra
  with pytest.raises(UserError) as e:
    hierarchy.load(_write(tmp_path, text), DIGITS)
  assert message in str(e.value)


def test_a_file_with_a_missing_class_stops_the_run_with_one_line(tmp_path):
  path = _write(tmp_path, DIGITS_TREE.replace('4 digits\n', ''))
  out = run_cli('smallfx.main', '--config=configs/cosine.py', f'--config.hierarchy={path}',
                '--config.class_targets=hierarchy', f'--workdir={tmp_path / "run"}')
  assert out.returncode == 2, out.stderr
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and 'lacks 1 class(es) of the data' in lines[0], out.stderr


def test_class_targets_are_checked_before_any_data_is_read(tmp_path):
  from smallfx import experiment  # pylint: disable=g-import-not-at-top
  config = config_lib.default()
  config.class_targets = 'hierarchy'
  with pytest.raises(UserError, match='needs a hierarchy'):
    experiment.resolve(config)
  config.hierarchy, config.loss = _write(tmp_path, DIGITS_TREE), 'xent'
  with pytest.raises(UserError, match='targets of the cosine losses'):
    experiment.resolve(config)
  config.class_targets = 'tree'
  with pytest.raises(UserError, match="unknown class_targets 'tree'"):
    experiment.resolve(config)


def test_cosine_losses_use_the_embedding_as_targets(tmp_path):
  e = jnp.asarray(hierarchy.load(_write(tmp_path, DIGITS_TREE), DIGITS).embedding, jnp.float32)
  outputs = {'output': e[jnp.array([6, 2])] * 3.0, 'logits': jnp.zeros((2, 10))}
  labels = jax.nn.one_hot(jnp.array([6, 2]), 10)
  for name in ('cosine', 'cosine_xent'):
    loss = losses.get(name, e)
    cos = loss.per_example(outputs, labels, {'cosine_xent_weight': 0.0})
    chex.assert_trees_all_close(cos, jnp.zeros(2), atol=1e-6)
  # Scores rank classes by similarity to the targets: 9 (a sibling of 6) before 1.
  scores = losses.get('cosine', e).scores({'output': e[jnp.array([6])]})[0]
  assert scores[6] > scores[9] > scores[1]


@pytest.mark.slow
def test_a_run_with_hierarchy_targets_reports_metrics_that_its_predictions_give(tmp_path):
  from smallfx import predict  # pylint: disable=g-import-not-at-top
  path = _write(tmp_path, DIGITS_TREE)
  workdir = tmp_path / 'run'
  out = run_cli('smallfx.main', '--config=configs/cosine.py', '--config.model=cnn',
                '--config.num_steps=60', '--config.progress=False', '--config.baseline=none',
                f'--config.hierarchy={path}', '--config.class_targets=hierarchy',
                f'--workdir={workdir}')
  assert out.returncode == 0, out.stderr
  results = json.loads((workdir / 'results.json').read_text())
  spec = json.loads((workdir / 'model.json').read_text())
  classes = hierarchy.load(path, DIGITS)
  chex.assert_trees_all_close(np.array(spec['class_embeddings']), classes.embedding, atol=1e-12)
  # The metrics again, by hand, from what smallfx.predict makes of the test images.
  probabilities, _ = predict.predictor(str(workdir))
  dataset = data_lib.load(data_lib.Spec())
  scores = probabilities(dataset.test.images)
  assert np.mean(scores.argmax(1) == dataset.test.labels) == pytest.approx(
      results['test_accuracy'], abs=1e-6)
  by_hand = hierarchy.metrics(classes, scores, dataset.test.labels)
  for name, value in by_hand.items():
    assert results['test_hierarchy'][name] == pytest.approx(value, abs=1e-5), name
  # ... and predict ranks by similarity to the stored targets.
  model = models.build('cnn', 10)
  from smallfx import checkpoint  # pylint: disable=g-import-not-at-top
  variables, _ = checkpoint.load_variables(str(workdir))
  x = (dataset.test.images[:8] / 255.0 - np.array(spec['mean'])) / np.array(spec['std'])
  out = model.apply(jax.tree.map(lambda a: a[0], variables), jnp.asarray(x, jnp.float32),
                    train=False)['output']
  cos = np.asarray(models.l2_normalize(out)) @ classes.embedding.T
  np.testing.assert_array_equal(cos.argmax(1), scores[:8].argmax(1))
  # TensorBoard and metrics.jsonl have them too.
  last = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()][-1]
  assert last['test/mistake_severity'] == pytest.approx(
      results['test_hierarchy']['mistake_severity'])


def test_hierarchy_methods_are_study_methods_and_older_records_still_match(tmp_path):
  config = config_lib.study()
  config.base.hierarchy = _write(tmp_path, DIGITS_TREE)
  config.methods = 'cosine_hierarchy,cosine_xent_hierarchy,small_images,small_model,grey,cosine'
  study = cells.resolve(config, str(tmp_path))
  hier = cells.cell_config(study, cells.Cell(study.methods[0], 10), 'tune', {})
  assert (hier.loss, hier.class_targets, hier.augment) == ('cosine', 'hierarchy', 'auto')
  xent_hier = cells.cell_config(study, cells.Cell(study.methods[1], 10), 'tune', {})
  assert xent_hier.loss == 'cosine_xent'
  assert {m.name for m in study.methods if m.from_scratch} == {m.name for m in study.methods}
  # A study without a hierarchy hashes its cells as before those fields existed: the
  # records written before still match.
  plain = _config_file('configs/study/fashion_mnist.py')
  plain.methods = 'cosine'
  recorded = cells.resolve(plain, os.path.join(REPO, 'experiments/study/fashion_mnist'))
  cell = cells.Cell(recorded.methods[0], 10)
  assert cells.read(recorded, cell)['method'] == 'cosine'
  before = cells.fingerprint(recorded, cell)
  recorded.base.hierarchy = config.base.hierarchy
  assert cells.fingerprint(recorded, cell) != before
  # Without a hierarchy in the base, the hierarchy methods say what to set.
  bare = config_lib.study()
  bare.methods = 'cosine_hierarchy'
  with pytest.raises(UserError, match='--config.base.hierarchy'):
    cells.resolve(bare, str(tmp_path))
  assert 'cosine_hierarchy' in methods.METHODS


def test_grey_takes_the_colour_away_as_pillow_does():
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
  grey = data_lib._grey(data_lib.Split(images, np.zeros(5, np.int32))).images
  chex.assert_shape(grey, (5, 6, 7, 1))
  pillow = np.stack([np.asarray(Image.fromarray(x).convert('L')) for x in images])[..., None]
  assert np.abs(grey.astype(int) - pillow).max() <= 1


def test_a_file_from_coarse_labels_loads_and_mixed_labels_are_refused(tmp_path):
  fine, coarse = ['apple', 'sweet pepper', 'bee'], ['fruit', 'insects']
  text = hierarchy.from_coarse_labels(fine, coarse, [0, 1, 2, 0, 2], [0, 0, 1, 0, 1],
                                      root='tiny')
  classes = hierarchy.load(_write(tmp_path, text), fine)
  np.testing.assert_allclose(classes.similarity, [[1, 0.5, 0], [0.5, 1, 0], [0, 0, 1]])
  with pytest.raises(UserError, match="class 'bee' has images under two coarse labels"):
    hierarchy.from_coarse_labels(fine, coarse, [2, 2], [1, 0])
