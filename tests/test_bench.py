"""The benchmark tools run end to end: smoke runs with tiny sizes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_quick_cnn(tmp_path):
  pytest.importorskip('torch')
  out = tmp_path / 'bench.json'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'bench.py'), '--quick',
                  '--cases', 'cnn', '--repeats', '1', '--steps', '2', '--train-size', '64',
                  '--json', str(out)], check=True, cwd=ROOT, env=env, timeout=600)
  report = json.loads(out.read_text())
  (case,) = report['cases']
  assert case['case'] == 'cnn'
  for name in ('smallfx', 'torch'):
    r = case['results'][name]
    assert r['images_per_sec'] > 0, name
    assert r['peak_memory_mb'] > 0, name
  assert case['results']['smallfx']['xla_flops_per_step'] > 0
  assert case['results']['smallfx']['ratio_vs_torch'] > 0


def test_bench_seeds_run_side_by_side_as_the_training_loop_does(tmp_path):
  """On a CPU the K-seed step runs in a child process with one device per group of seeds."""
  out = tmp_path / 'bench.json'
  subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'bench.py'), '--quick',
                  '--cases', 'seeds', '--seeds', '1,2', '--repeats', '1', '--steps', '2',
                  '--train-size', '64', '--no-torch', '--json', str(out)],
                 check=True, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=600)
  (case,) = json.loads(out.read_text())['cases']
  one, two = case['by_k']['1']['vmapped'], case['by_k']['2']['vmapped']
  assert one['seed_devices'] == 1
  assert two['seed_devices'] == min(2, len(os.sched_getaffinity(0)))
  # Two seeds are twice one seed's maths, whichever devices run them.
  assert two['flops_per_step'] == pytest.approx(2 * one['flops_per_step'], rel=1e-3)
  for k in ('1', '2'):
    for name, r in case['by_k'][k].items():
      assert r['total_seconds'] > 0 and r['peak_memory_mb'] > 0, (k, name)
      assert np.isfinite(r['final_loss']), (k, name)


@pytest.mark.slow
def test_seed_layout_and_seed_runs_tools_run():
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'bench_seed_layout.py'),
                        '--model', 'mlp', '--seeds', '2', '--steps', '2', '--rounds', '1'],
                       check=True, cwd=ROOT, env=env, timeout=600, capture_output=True, text=True)
  assert 'K=2: single x K' in out.stdout and 'in a row' in out.stdout
  out = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'bench_seed_runs.py'),
                        '--seeds', '2', '--', '--config=configs/cosine.py', '--config.model=mlp',
                        '--config.num_steps=5', '--config.baseline=none'],
                       check=True, cwd=ROOT, env=env, timeout=600, capture_output=True, text=True)
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert len(report['separate_s']) == 2 and report['together_s'] > 0
  assert report['together_results']['num_seeds'] == 2


def _tool_line(tool, prefix, *args):
  """Runs tools/TOOL with ARGS on CPU; returns its one stdout line starting with PREFIX."""
  out = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', tool), *args],
                       check=True, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu'),
                       timeout=600, capture_output=True, text=True)
  (line,) = [row for row in out.stdout.splitlines() if row.startswith(prefix)]
  return line


@pytest.mark.slow
def test_conv_tool_times_both_formulations():
  line = _tool_line('bench_conv.py', 'resnet20 b2:',
                    '--models', 'resnet20:2', '--steps', '1', '--rounds', '1')
  assert 'lax ' in line and 'smallfx ' in line and 'lax / smallfx x' in line, line


@pytest.mark.slow
def test_malloc_tool_times_both_allocators():
  from smallfx import malloc  # pylint: disable=g-import-not-at-top
  if sys.platform != 'linux' or not malloc.library():
    pytest.skip(f'no tcmalloc on this machine ({malloc.INSTALL}; .ci/run installs it)')
  # The tool checks that each child ran on the allocator it was meant to.
  line = _tool_line('bench_malloc.py', 'mlp:8:',
                    '--models', 'mlp:8', '--rounds', '1', '--seconds', '0.1')
  assert 'system ' in line and 'tcmalloc ' in line and 'system / tcmalloc x' in line, line


@pytest.mark.slow
def test_dispatch_tool_times_one_and_several_steps_per_dispatch():
  out = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'bench_dispatch.py'),
                        '--models', 'mlp:8', '--scan', '3', '--steps', '3', '--rounds', '1'],
                       check=True, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu'),
                       timeout=600, capture_output=True, text=True)
  assert 'mlp batch 8:' in out.stdout and 'kernels per step' in out.stdout, out.stdout
  for n in (1, 3):
    (line,) = [r for r in out.stdout.splitlines() if f' {n} step(s)/dispatch:' in r]
    assert 'ms/step' in line and 'GFLOP/s' in line and ' 0.0 GFLOP/s' not in line, line


def test_host_flops_counts_the_step_the_device_counts():
  # On GPU the benchmark counts FLOPs on the host CPU (CUDA's plugin gives no cost
  # analysis): the host count must equal the device's own where both exist (CPU here),
  # and cover the step's matrix products.
  sys.path.insert(0, os.path.join(ROOT, 'tools'))
  import bench  # pylint: disable=g-import-not-at-top
  from smallfx import config, train  # pylint: disable=g-import-not-at-top
  images, labels = bench.data((8, 8, 1), 64)
  seeds, batch = 2, 8
  run = bench.SmallfxRun(train, config, 'mlp', (8, 8, 1), batch, seeds, images, labels, 'cpu')
  counted = bench.host_flops(run.make_step, (run.state, run.images, run.labels))
  assert counted == pytest.approx(run.flops_per_step, rel=1e-6)
  # By hand: the MLP's 64-256-256 layers and the 10-class head, forward and both
  # gradients (none for the input), per seed; the rest of the step is elementwise.
  layers = [(64, 256), (256, 256), (256, 10)]
  matmuls = seeds * (3 * sum(2 * batch * i * o for i, o in layers) - 2 * batch * 64 * 256)
  assert matmuls <= counted <= 1.5 * matmuls, (counted, matmuls)
