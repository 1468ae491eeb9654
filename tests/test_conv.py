"""`smallfx.models.conv`: the CPU formulation is lax's convolution, values and gradients."""

import platform
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax import lax
from jax.experimental import serialize_executable

from smallfx import tuning
from smallfx.models import conv, onednn

# (batch, size, C_in, C_out, kernel, stride, padding): every branch of `cpu_conv`
# (stride 1; one input channel; 1x1 strided; space-to-depth; lax's where a rewrite
# does not pay), with SAME, VALID, uneven, negative and over-wide padding, odd
# sizes, kernels > stride.
CASES = [
    (2, 8, 4, 3, 3, 1, 'SAME'),
    (2, 9, 5, 5, 3, 1, 'VALID'),
    (1, 7, 3, 2, 3, 1, ((3, 0), (1, 2))),
    (2, 8, 3, 4, 3, 1, 'SAME'),  # C_out > C_in: lax's kernel gradient
    (2, 8, 4, 6, 1, 1, 'SAME'),
    (2, 8, 4, 6, 1, 2, 'SAME'),
    (2, 9, 4, 6, 1, 2, ((1, 1), (0, 1))),
    (2, 8, 4, 6, 3, 2, 'SAME'),
    (2, 9, 3, 4, 3, 2, 'VALID'),
    (1, 11, 2, 3, 4, 3, ((1, 2), (2, 1))),
    (1, 15, 3, 4, 7, 2, ((3, 3), (3, 3))),
    (2, 8, 32, 5, 3, 2, 'SAME'),  # 4 * 32 channels: lax's strided convolution
    (2, 6, 5, 3, 5, 1, 'SAME'),
    (1, 6, 40, 3, 3, 1, 'SAME'),  # 40 channels: lax's kernel gradient
    (2, 8, 1, 5, 3, 1, 'SAME'),  # one input channel: shifted products
    (2, 9, 1, 4, 2, 1, ((1, 0), (0, 2))),
    (1, 7, 1, 3, 3, 1, 'VALID'),
    (1, 9, 1, 3, 5, 1, 'SAME'),  # 25 taps: back to the convolution
    (1, 8, 1, 3, 3, 1, ((1, -1), (2, 0))),  # a negative pad crops: lax's
    (1, 2, 3, 4, 3, 2, 'VALID'),  # an empty output (oneDNN takes none): lax's
    # Strided 1x1 layers: oneDNN's AVX2 kernel gradient was wrong for the first two.
    (32, 8, 4, 4, 1, 2, 'SAME'),
    (32, 8, 3, 8, 1, 2, 'SAME'),
    (8, 8, 16, 32, 1, 2, 'SAME'),
]


def _reference(x, w, stride, padding):
  return lax.conv_general_dilated(x, w, (stride, stride), padding,
                                  dimension_numbers=conv.NHWC,
                                  precision=lax.Precision.HIGHEST)


@pytest.mark.parametrize('onednn_on', [False, True])
@pytest.mark.parametrize('n,size,cin,cout,k,stride,padding', CASES)
@pytest.mark.slow
def test_cpu_conv_equals_lax_with_gradients(n, size, cin, cout, k, stride, padding, onednn_on):
  with tuning.forced(True, onednn=onednn_on):
    _check_cpu_conv(n, size, cin, cout, k, stride, padding)


def _check_cpu_conv(n, size, cin, cout, k, stride, padding):
  kx, kw, kdy = jax.random.split(jax.random.key(size * k + stride), 3)
  x = jax.random.normal(kx, (n, size, size, cin))
  w = jax.random.normal(kw, (k, k, cin, cout))
  ours = jax.jit(lambda x, w: conv.cpu_conv(x, w, (stride, stride), padding,
                                            lax.Precision.HIGHEST))
  y, vjp = jax.vjp(ours, x, w)
  y_ref, vjp_ref = jax.vjp(lambda x, w: _reference(x, w, stride, padding), x, w)
  chex.assert_trees_all_close(y, y_ref, atol=1e-4, rtol=1e-4)
  dy = jax.random.normal(kdy, y.shape)
  chex.assert_trees_all_close(vjp(dy), vjp_ref(dy), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('cin,stride', [(4, 1), (4, 2), (1, 1)])
@pytest.mark.slow
def test_gradients_under_vmap_as_seeds_use_them(cin, stride):
  with tuning.forced(True):  # the oneDNN calls' vmap rule too
    _check_vmapped(cin, stride)


def _check_vmapped(cin, stride):
  x = jax.random.normal(jax.random.key(0), (3, 2, 8, 8, cin))
  w = jax.random.normal(jax.random.key(1), (3, 3, 3, cin, 6))

  def grads(conv_fn):
    def loss(w, x):
      return jnp.sum(jnp.tanh(conv_fn(x, w)))
    return jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1))))(w, x)

  ours = grads(lambda x, w: conv.cpu_conv(x, w, (stride, stride), 'SAME',
                                          lax.Precision.HIGHEST))
  ref = grads(lambda x, w: _reference(x, w, stride, 'SAME'))
  chex.assert_trees_all_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('kw', [dict(), dict(strides=2), dict(feature_group_count=4),
                                dict(kernel_dilation=2),
                                dict(input_dilation=2, padding=((1, 1), (1, 1)))])
def test_module_matches_flax_conv(kw):
  """Same parameter tree and outputs as nn.Conv; grouped/dilated ones go to lax."""
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 4))
  ours, theirs = conv.Conv(4, (3, 3), **kw), nn.Conv(4, (3, 3), **kw)
  params = theirs.init(jax.random.key(1), x)
  chex.assert_trees_all_equal_shapes(ours.init(jax.random.key(1), x), params)

  def value_and_grad(module):
    return jax.value_and_grad(lambda p: jnp.sum(module.apply(p, x) ** 2))(params)
  chex.assert_trees_all_close(value_and_grad(ours), value_and_grad(theirs), atol=1e-3, rtol=1e-4)


def test_kernel_gradient_stays_in_the_canonical_formulation():
  """XLA swaps dy and x back (non-canonical, reversed) unless dy is x's size."""
  x = jnp.ones((8, 16, 16, 4))
  w = jnp.ones((3, 3, 4, 4))
  with tuning.forced(True, onednn=False):
    grad = jax.jit(jax.grad(lambda w: jnp.sum(conv.cpu_conv(x, w, (1, 1), 'VALID') ** 2)))
    compiled = grad.lower(w).compile()
  convolutions = [line for line in compiled.as_text().splitlines() if ' convolution(' in line]
  assert len(convolutions) == 2, convolutions  # the forward and the kernel gradient
  for line in convolutions:
    assert 'dim_labels=b01f_01io->b01f' in line and 'rhs_reversal' not in line, line


def test_single_channel_layer_runs_without_convolutions():
  """A grey image's first layer: shifted products forward, a matrix product for dW.

  Its padded input stays a dynamic-update-slice (one materialised buffer): as a pad,
  XLA recomputed the input's producer (the augmentation) in every tap.
  """
  w = jnp.ones((3, 3, 1, 8))
  grad = jax.jit(jax.grad(
      lambda w, x: jnp.sum(conv.cpu_conv(jnp.sin(x), w, (1, 1), 'SAME') ** 2)))
  hlo = grad.lower(w, jnp.ones((4, 12, 12, 1))).compile().as_text()
  assert ' convolution(' not in hlo and ' dot(' in hlo
  assert 'dynamic-update-slice(' in hlo and ' pad(' not in hlo


# Where the onednn-cpu-gomp wheels exist, the calls must build and run: no skip.
needs_onednn = pytest.mark.skipif(
    not (sys.platform == 'linux' and platform.machine() == 'x86_64'),
    reason='oneDNN convolutions are built for x86-64 Linux only')


@needs_onednn
def test_onednn_is_available():
  assert onednn.available()


@needs_onednn
@pytest.mark.parametrize('k,stride', [(3, 1), (3, 2), (2, 2)])
def test_layers_train_on_onednn_alone(k, stride):
  """Forward, input and kernel gradient: three oneDNN calls, no XLA convolution."""
  hlo = _compiled_grad(jnp.ones((4, 8, 8, 4)), jnp.ones((k, k, 4, 4)), stride)
  for target in onednn.TARGETS.values():
    assert hlo.count(f'custom_call_target="{target}"') == 1, (target, hlo)
  assert ' convolution(' not in hlo


def _compiled_grad(x, w, stride):
  """The compiled gradient of a layer (both arguments) with CPU tuning and oneDNN on."""
  with tuning.forced(True):
    assert tuning.onednn_calls(), 'oneDNN convolutions did not build here'
    grad = jax.jit(jax.grad(
        lambda x, w: jnp.sum(conv.cpu_conv(jnp.sin(x), w, (stride, stride), 'SAME') ** 2),
        argnums=(0, 1)))
    return grad.lower(x, w).compile().as_text()


@needs_onednn
@pytest.mark.parametrize('stride', [1, 2])
def test_pointwise_layers_stay_matrix_products(stride):
  """XLA fuses their elementwise neighbours into the product; a call would not.

  Only meaningful where oneDNN is on (where it is not, nothing calls it anyway): a 3x3
  layer of the same program shape must go to oneDNN, a 1x1 one (4 -> 6 channels, so
  unblocked when strided) not.
  """
  x = jnp.ones((2, 8, 8, 4))
  assert 'SmallfxConv' in _compiled_grad(x, jnp.ones((3, 3, 4, 6)), stride)
  hlo = _compiled_grad(x, jnp.ones((1, 1, 4, 6)), stride)
  assert 'Smallfx' not in hlo, hlo


@needs_onednn
@pytest.mark.parametrize('stride,padding', [(1, ((1, 1), (1, 1))), (1, ((0, 2), (3, 0))),
                                            (2, ((1, 1), (0, 1))), (3, ((0, 0), (2, 1)))])
@pytest.mark.slow
def test_onednn_calls_match_lax_in_and_out_of_jit(stride, padding):
  x = jax.random.normal(jax.random.key(0), (2, 10, 9, 5))
  w = jax.random.normal(jax.random.key(1), (3, 3, 5, 4))
  strides = (stride, stride)
  y, vjp = jax.vjp(lambda x, w: _reference(x, w, stride, padding), x, w)
  dy = jax.random.normal(jax.random.key(2), y.shape)
  want = (y, *vjp(dy))

  def calls(x, w, dy):
    return (onednn.conv(x, w, strides, padding),
            onednn.input_grad(dy, w, x.shape, strides, padding),
            onednn.kernel_grad(x, dy, w.shape, strides, padding))
  chex.assert_trees_all_close(calls(x, w, dy), jax.jit(calls)(x, w, dy), want,
                              atol=1e-4, rtol=1e-4)


@needs_onednn
def test_programs_with_onednn_calls_serialise():
  """What jax's persistent compilation cache stores: XLA's own oneDNN thunk failed here."""
  with tuning.forced(True):
    grad = jax.jit(jax.grad(lambda w, x: jnp.sum(conv.cpu_conv(x, w, (1, 1), 'SAME') ** 2)))
    compiled = grad.lower(jnp.ones((3, 3, 4, 4)), jnp.ones((2, 8, 8, 4))).compile()
  assert 'SmallfxConv' in compiled.as_text()
  payload, in_tree, out_tree = serialize_executable.serialize(compiled)
  restored = serialize_executable.deserialize_and_load(payload, in_tree, out_tree)
  args = jnp.ones((3, 3, 4, 4)), jnp.arange(2 * 8 * 8 * 4.).reshape(2, 8, 8, 4) / 512
  chex.assert_trees_all_close(restored(*args), compiled(*args))


def test_onednn_probe_runs_inside_a_trace(monkeypatch):
  """A notebook's first layer may load a cached build: the probe must compute, not stage."""
  expected = onednn.available()
  monkeypatch.setattr(onednn, '_available', [])  # a verdict not reached yet
  inside = jax.jit(lambda x: x * onednn.available())(jnp.ones(()))
  assert bool(inside) == expected


@pytest.mark.parametrize('on', [True, False])
def test_onednn_off_gives_lax_programs(on):
  with tuning.forced(on, onednn=False):
    lowered = jax.jit(lambda x, w: conv.cpu_conv(x, w, (1, 1), 'SAME')).lower(
        jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 4))).as_text()  # as lowered, on any backend
  assert 'Smallfx' not in lowered and 'stablehlo.convolution' in lowered


def test_tuning_off_gives_flax_programs():
  """CPU tuning off: `Conv` lowers to what `nn.Conv` lowers to, rewrites and calls alike."""
  x = jnp.ones((2, 8, 8, 1))
  programs = {}
  for name, module in (('ours', conv.Conv(4, (3, 3))), ('flax', nn.Conv(4, (3, 3)))):
    params = module.init(jax.random.key(0), x)
    with tuning.forced(False):
      programs[name] = jax.jit(jax.grad(lambda p, x: jnp.sum(module.apply(p, x) ** 2))).lower(
          params, x).as_text()
  assert programs['ours'] == programs['flax']


@needs_onednn
def test_build_without_a_compiler_says_so(monkeypatch, tmp_path):
  monkeypatch.setenv('SMALLFX_ONEDNN_CACHE', str(tmp_path))  # nothing built yet
  monkeypatch.setenv('CXX', 'no-such-compiler')
  with pytest.raises(RuntimeError, match='C\\+\\+ compiler'):
    onednn.build()


@needs_onednn
def test_build_is_shared_by_checkouts(monkeypatch, tmp_path):
  """The same source at another path (a second clone) reuses the build, without a compiler."""
  built = onednn.build()
  elsewhere = tmp_path / onednn.SOURCE.name
  elsewhere.write_text(onednn.SOURCE.read_text())
  monkeypatch.setattr(onednn, 'SOURCE', elsewhere)
  monkeypatch.setenv('CXX', 'no-such-compiler')
  assert onednn.build() == built
