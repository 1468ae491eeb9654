"""Tables: `sklearn:NAME` and `csv:PATH` sources, the MLP's options, runs and refusals."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, run_cli
from smallfx import augment
from smallfx import baseline
from smallfx import config as config_lib
from smallfx import data
from smallfx import evaluation
from smallfx import experiment
from smallfx import models
from smallfx import predict
from smallfx import train
from smallfx.errors import UserError


def spec(dataset, **kw):
  return data.Spec(dataset=dataset, **{'samples_per_class': 10, 'val_per_class': 5, **kw})


def config(**kw):
  c = config_lib.default()
  c.dataset = 'sklearn:iris'
  c.model = 'mlp'
  c.loss = 'xent'
  c.batch_size = 16
  c.num_steps = 60
  c.progress = False
  c.eval_every_steps = 0
  c.checkpoint_every_steps = 0
  c.baseline = 'none'
  c.update(kw)
  return c


def write_csv(path, lines):
  path.write_text('\n'.join(lines) + '\n')
  return str(path)


@pytest.mark.parametrize('name, features, classes', [
    ('iris', 4, 3), ('wine', 13, 3), ('breast_cancer', 30, 2), ('digits', 64, 10)])
def test_sklearn_tables_are_standardised_feature_vectors(name, features, classes):
  d = data.load(spec(f'sklearn:{name}'))
  assert d.is_table and d.image_shape == (features,) and d.num_classes == classes
  assert d.train.images.dtype == np.float32 and len(d.train.labels) == 10 * classes
  # Standardised with the training split's statistics: exactly 0 and 1 there.
  varying = d.train.images.std(0) > 0
  np.testing.assert_allclose(d.train.images.mean(0), 0, atol=1e-5)
  np.testing.assert_allclose(d.train.images.std(0)[varying], 1, atol=1e-4)
  # A held-out test split (30% of each class), never part of the pool.
  total = len(d.test.labels) + len(d.pool.labels) + len(d.val.labels)
  assert abs(len(d.test.labels) / total - 0.3) < 0.02


def test_an_unknown_sklearn_table_names_the_valid_ones():
  with pytest.raises(UserError, match="unknown scikit-learn table 'boston'.*iris"):
    data.load(spec('sklearn:boston'))


def test_csv_columns_are_encoded_from_the_training_pool_only(tmp_path, capsys):
  # 'violet' appears only in rows the held-out split takes; age is missing once.
  rows = ['age,colour,label']
  for i in range(40):
    colour = 'red' if i % 2 else 'blue'
    rows.append(f'{"" if i == 3 else i},{colour},{"a" if i < 20 else "b"}')
  path = write_csv(tmp_path / 't.csv', rows)
  source = data.load_source(spec(f'csv:{path}', label_column='label', categorical='colour'))
  test_rows = source.test.images
  test_rows[0, 1] = 'violet'  # a category the pool never holds
  encode = source.encoder.fit(source.train.images)
  features = encode(test_rows)
  assert features.shape == (len(test_rows), 3)  # age, colour=blue, colour=red
  np.testing.assert_array_equal(features[0, 1:], [0, 0])
  # A missing number is the pool's median.
  pool_ages = [float(v) for v in source.train.images[:, 0] if v != '']
  missing = np.array([['', 'red']], dtype=object)
  assert encode(missing)[0, 0] == np.median(pool_ages)
  assert 'missing values (age: 1)' in capsys.readouterr().err
  assert source.class_names == ['a', 'b']


def test_a_missing_category_is_a_category_of_its_own(tmp_path):
  rows = ['x,c,y'] + [f'{i},{"NA" if i % 4 == 0 else "u"},{i % 2}' for i in range(40)]
  path = write_csv(tmp_path / 't.csv', rows)
  d = data.load(spec(f'csv:{path}', label_column='y', categorical='c', samples_per_class=8))
  # x, c=(missing), c=u: one-hot columns standardised, so two values each.
  assert d.image_shape == (3,)
  assert len(np.unique(d.pool.images[:, 1])) == 2


@pytest.mark.parametrize('lines, kw, message', [
    (['a,b,y', '1,2,p', '3,4,q'], dict(label_column='z'), "label_column 'z' is not a column"),
    (['a,b,y', '1,2,p', '3,4,p'], dict(label_column='y'), "holds one class \\('p'\\)"),
    (['a,b,y', '1,red,p', '3,4,q'], dict(label_column='y'),
     "column 'b' .* is not numeric .*'red'.*--config.categorical=b"),
    ([''], dict(label_column='y'), 'is empty'),
    (['a,b,y'], dict(label_column='y'), 'a header but no rows'),
    (['a,b,y', '1,2,', '3,4,q'], dict(label_column='y'), 'data row 1 has no label'),
    (['a,b,y', '1,2,p', '3,4,q'], dict(label_column=''), 'set --config.label_column=NAME'),
    (['a,b,y', '1,2,p', '3,4'], dict(label_column='y'), 'data row 2 has 2 fields'),
    (['a,b,y', '1,2,p', '3,4,q'], dict(label_column='y', categorical='c'),
     "categorical column 'c' is not a column"),
])
def test_bad_csv_input_is_one_clear_error(tmp_path, lines, kw, message):
  path = write_csv(tmp_path / 't.csv', lines)
  with pytest.raises(UserError, match=message):
    data.load_source(spec(f'csv:{path}', **kw))


def test_a_csv_that_does_not_exist_is_named(tmp_path):
  with pytest.raises(UserError, match='does not exist'):
    data.load_source(spec(f'csv:{tmp_path}/none.csv', label_column='y'))


@pytest.mark.parametrize('kw, message', [
    (dict(model='cnn'), "model 'cnn' takes images; a table's rows take model 'mlp'"),
    (dict(augment='crop(pad=2)|flip'), "augment op 'crop' works on images"),
    (dict(pretrain='dae'), 'pretraining without labels is for images'),
    (dict(generative='dada', loss='dada'), 'generative augmentation is for images'),
    (dict(image_size=8), 'image_size=8 is for images'),
    (dict(channels=1), 'channels=1 is for images'),
])
def test_what_needs_images_is_refused_for_a_table(kw, message):
  with pytest.raises(UserError, match=message):
    experiment.resolve(config(**kw))


def test_model_options_belong_to_the_mlp():
  with pytest.raises(UserError, match="depth=8 is an option of model mlp; model 'resnet20'"):
    experiment.resolve(config(dataset='digits', model='resnet20', depth=8))
  with pytest.raises(UserError, match="unknown norm 'group'"):
    experiment.resolve(config(norm='group'))
  with pytest.raises(UserError, match=r'dropout must be in \[0, 1\)'):
    experiment.resolve(config(dropout=1.0))
  exp = experiment.resolve(config(depth=3, norm='layer'))
  assert exp.model_options == {'depth': 3, 'norm': 'layer'}
  assert experiment.resolve(config()).model_options == {}


@pytest.mark.parametrize('norm', ['none', 'batch', 'layer'])
def test_the_mlp_has_depth_layers_of_its_width_and_its_norm(norm):
  model = models.build('mlp', 3, width=0.25, depth=5, norm=norm, dropout=0.5)
  variables = model.init(jax.random.key(0), jnp.zeros((2, 7)))
  layers = variables['params']['backbone']
  assert sorted(k for k in layers if k.startswith('Dense')) == [f'Dense_{i}' for i in range(5)]
  assert layers['Dense_4']['kernel'].shape == (64, 64)
  assert ('batch_stats' in variables) == (norm == 'batch')
  x = jax.random.normal(jax.random.key(3), (4, 7))
  # Dropout only in training, and drawn from the 'dropout' key.
  out = lambda key: model.apply(variables, x, train=True, rngs={'dropout': key},
                                mutable=['batch_stats'])[0]['features']
  assert not np.allclose(out(jax.random.key(1)), out(jax.random.key(2)))
  first = model.apply(variables, x, train=False)['features']
  np.testing.assert_array_equal(first, model.apply(variables, x, train=False)['features'])


def test_feature_noise_is_unclipped_and_tables_take_it():
  x = jnp.full((5,), 3.0)
  y = augment.feature_noise(std=0.5)(jax.random.key(0), x)
  assert y.max() > 1 and not np.allclose(y, x)
  assert augment.feature_noise(std=0.0)(jax.random.key(0), x) is x
  augment.check_for_tables('feature_noise(std=0.1)|mixup(alpha=0.2)')
  assert experiment.auto_augment((13,)) == 'none'


def test_baselines_fit_a_table():
  d = data.load(spec('sklearn:wine', samples_per_class=20))
  for name in ('random_forest', 'gradient_boosting', 'logistic_regression'):
    assert baseline.run(name, d) > 0.8, name


@pytest.mark.slow
def test_a_table_trains_with_seeds_and_a_batch_larger_than_the_data(tmp_path, capsys):
  c = config(num_seeds=2, depth=3, norm='batch', dropout=0.1, augment='feature_noise(std=0.1)',
             batch_size=64, baseline='random_forest')
  c.sweep.learning_rate = '0.1'
  results = train.train_and_evaluate(c, str(tmp_path))
  assert 'every step takes all 30' in capsys.readouterr().err
  assert results['train_size'] == 30 and len(results['members']) == 2
  assert results['test_accuracy'] > 0.8 and results['baseline_accuracy'] > 0.8
  spec_ = json.loads((tmp_path / 'model.json').read_text())
  assert spec_['table'] and spec_['model_options'] == {'depth': 3, 'norm': 'batch',
                                                       'dropout': 0.1}
  with pytest.raises(UserError, match="a table's model; smallfx.predict reads image files"):
    list(predict.predict(str(tmp_path), ['row.png']))


@pytest.mark.slow
def test_a_csv_run_end_to_end_and_its_errors_exit_2(tmp_path):
  rows = ['size,colour,weight,kind']
  rng = np.random.default_rng(0)
  for i in range(90):
    k = i % 3
    colour = '' if i == 4 else ['red', 'green', 'blue'][(k + (i % 7 == 0)) % 3]
    rows.append(f'{k + rng.normal(0, .3):.2f},{colour},{"" if i == 8 else rng.normal()},'
                f'{["ant", "bee", "cat"][k]}')
  path = write_csv(tmp_path / 'mine.csv', rows)
  args = ['smallfx.main', '--config=configs/tabular.py', f'--config.dataset=csv:{path}',
          '--config.label_column=kind', '--config.num_steps=100']
  r = run_cli(*args, '--config.categorical=colour', f'--workdir={tmp_path}/run')
  assert r.returncode == 0, r.stderr[-2000:]
  assert 'missing values (colour: 1, weight: 1)' in r.stderr
  assert json.loads((tmp_path / 'run' / 'results.json').read_text())['test_accuracy'] > 0.8
  r = run_cli(*args, f'--workdir={tmp_path}/bad')
  assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith('error: column')
  assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_fit_trains_each_member_on_its_own_rows(tmp_path):
  """Member 1 learns labels shifted by one class: its predictions are member 0's, shifted."""
  run = train.set_up(config(num_seeds=2, resample_per_seed=True, num_steps=150,
                            val_per_class=0, samples_per_class=0))
  x, y = run.dataset.train.images, run.dataset.train.labels
  state = train.fit(run, np.stack([x, x]), np.stack([y, (y + 1) % 3]))
  test = run.dataset.test
  probs = evaluation.member_probabilities(run.setup.model, run.setup.loss, state,
                                          np.stack([test.images, test.images]), run.mean,
                                          run.std)
  assert probs.shape == (2, len(test.labels), 3)
  assert np.mean(probs[0].argmax(-1) == test.labels) > 0.85
  assert np.mean(probs[1].argmax(-1) == (test.labels + 1) % 3) > 0.85


@pytest.mark.slow
def test_the_olson_tool_writes_every_split(tmp_path):
  r = subprocess.run([sys.executable, os.path.join(REPO, 'tools', 'olson.py'),
                      f'--out={tmp_path}', '--tables=iris', '--splits=3', '--nets=2',
                      '--depth=2', '--max_steps=40', '--no-progress'],
                     capture_output=True, text=True, timeout=600, cwd=REPO)
  assert r.returncode == 0, r.stderr[-2000:]
  record = json.loads((tmp_path / 'olson.json').read_text())
  assert [t['table'] for t in record['tables']] == ['iris']
  for table in record['tables']:
    assert len(table['ensemble']) == len(table['forest']) == 3
    assert table['verdict'] in ('win', 'tie', 'loss') and table['mlp_seconds'] > 0
  assert sum(record['counts'].values()) == 1
  assert '| iris | 150 x 4 |' in r.stdout


@pytest.mark.slow
def test_a_study_runs_on_a_table(tmp_path):
  r = run_cli('smallfx.study', '--config=configs/study/tabular.py', f'--workdir={tmp_path}',
              '--config.base.dataset=sklearn:iris', '--config.sizes=5',
              '--config.methods=random_forest,logistic_regression,mlp2,ensemble',
              '--config.grid.learning_rate=0.03,0.1', '--config.grid.weight_decay=5e-4',
              '--config.seeds=2', '--config.base.max_steps=60')
  assert r.returncode == 0, r.stderr[-3000:]
  report = (tmp_path / 'report.md').read_text()
  assert 'training rows per class: 5.' in report
  for method in ('random_forest', 'logistic_regression', 'mlp2', 'ensemble'):
    assert f'| {method} |' in report
