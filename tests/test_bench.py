"""The benchmark tools run end to end: smoke runs with tiny sizes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tools'))

import harness  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.mark.slow
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


@pytest.mark.slow
def test_bench_seeds_run_side_by_side_as_the_training_loop_does(tmp_path):
  """On a CPU the K-member step runs in a child process with one device per group of members."""
  out = tmp_path / 'bench.json'
  subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'bench.py'), '--quick',
                  '--cases', 'seeds', '--seeds', '1,2', '--repeats', '1', '--steps', '2',
                  '--train-size', '64', '--no-torch', '--json', str(out)],
                 check=True, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=600)
  (case,) = json.loads(out.read_text())['cases']
  one, two = case['by_k']['1']['vmapped'], case['by_k']['2']['vmapped']
  assert one['member_devices'] == 1
  assert two['member_devices'] == min(2, len(os.sched_getaffinity(0)))
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
  # Members given as a sweep: 2 settings x 1 seed, against 2 separate runs.
  out = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'bench_seed_runs.py'), '--',
                        '--config=configs/cosine.py', '--config.model=mlp',
                        '--config.num_steps=5', '--config.baseline=none',
                        '--config.sweep.learning_rate=0.05,0.1'],
                       check=True, cwd=ROOT, env=env, timeout=600, capture_output=True, text=True)
  lines = out.stdout.strip().splitlines()
  report = json.loads(lines[-1])
  assert report['members'] == 2 and report['settings'] == [{'learning_rate': 0.05},
                                                           {'learning_rate': 0.1}]
  assert len(report['separate_s']) == 2 and report['together_s'] > 0
  assert report['together_results']['num_members'] == 2
  assert '2 members (2 settings x 1 seeds) in one program' in lines[-2], lines[-2]
  assert 'learning_rate=0.05' in lines[0] and 'seed=0' in lines[0], lines[0]


def test_seed_runs_separate_flags_give_each_member_its_setting_and_seed():
  import bench_seed_runs  # pylint: disable=g-import-not-at-top
  from smallfx import members  # pylint: disable=g-import-not-at-top
  grid = members.Grid({'learning_rate': (0.03, 0.1), 'weight_decay': (0.0,)}, num_seeds=2)
  flags = bench_seed_runs.separate_flags(['--config=c.py'], grid, 5, 3)
  assert flags == ['--config=c.py', '--config.sweep.learning_rate=',
                   '--config.sweep.weight_decay=', '--config.learning_rate=0.1',
                   '--config.weight_decay=0.0', '--config.seed=6', '--config.num_seeds=1']


def test_checkout_is_a_temporary_worktree():
  with harness.checkout('HEAD') as path:
    assert os.path.isfile(os.path.join(path, 'smallfx', 'train.py'))
    listed = subprocess.run(['git', '-C', ROOT, 'worktree', 'list'], capture_output=True,
                            text=True, check=True).stdout
    assert path in listed
  assert not os.path.exists(path)
  listed = subprocess.run(['git', '-C', ROOT, 'worktree', 'list'], capture_output=True,
                          text=True, check=True).stdout
  assert path not in listed
  with harness.checkout(ROOT) as path:  # a folder is used as it is
    assert path == ROOT


@pytest.mark.slow
def test_bench_ref_times_another_checkout_in_a_child(tmp_path):
  out = tmp_path / 'bench.json'
  # This very checkout as the reference: the same step, imported by a child process.
  subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'bench.py'), '--quick',
                  '--cases', 'cnn', '--repeats', '1', '--steps', '2', '--train-size', '64',
                  '--no-torch', '--ref', ROOT, '--json', str(out)],
                 check=True, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=600)
  (case,) = json.loads(out.read_text())['cases']
  mine, ref = case['results']['smallfx'], case['results']['ref']
  assert ref['images_per_sec'] > 0 and mine['speedup_vs_ref'] > 0
  # Same program, same data, same seed: the same loss after the same steps.
  assert ref['final_loss'] == pytest.approx(mine['final_loss'], rel=1e-4)


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


@pytest.mark.slow
def test_bench_ref_before_set_up_is_refused_in_one_line():
  # fad8070: the last revision before smallfx.train.set_up (issue 22).
  r = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'bench.py'), '--quick',
                      '--cases', 'cnn', '--no-torch', '--ref', 'fad8070'],
                     cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=600,
                     capture_output=True, text=True)
  assert r.returncode != 0
  assert 'smallfx.train.set_up' in r.stderr and 'Traceback' not in r.stderr, r.stderr


def test_host_flops_counts_the_step_the_device_counts():
  # On GPU the benchmark counts FLOPs on the host CPU (CUDA's plugin gives no cost
  # analysis): the host count must equal the device's own where both exist (CPU here),
  # and cover the step's matrix products.
  seeds, batch = 2, 8
  steps = harness.Steps(harness.config(model='mlp', batch_size=batch, num_seeds=seeds,
                                       member_devices=1,
                                       dataset=harness.synthetic((8, 8, 1), 64)))
  counted = steps.host_flops()
  assert counted == pytest.approx(steps.flops_per_step(), rel=1e-6)
  # By hand: the MLP's 64-256-256 layers and the 10-class head, forward and both
  # gradients (none for the input), per seed; the rest of the step is elementwise.
  layers = [(64, 256), (256, 256), (256, 10)]
  matmuls = seeds * (3 * sum(2 * batch * i * o for i, o in layers) - 2 * batch * 64 * 256)
  assert matmuls <= counted <= 1.5 * matmuls, (counted, matmuls)


def test_harness_steps_are_the_runs_own():
  """The harness steps a run as set_up makes it: its members, layout and data; twins share."""
  steps = harness.Steps(harness.config(model='mlp', batch_size=8, num_seeds=2,
                                       dataset=harness.synthetic((8, 8, 1), 64, 3)))
  run = steps.train_run
  assert run.dataset.num_classes == 3 and run.dataset.image_shape == (8, 8, 1)
  assert len(run.dataset.train.labels) == 64  # the bench fields keep every image
  assert len(steps.parts) == run.layout.rounds and steps.num_members == 2
  twin = steps.twin()
  steps.run(2)
  twin.run(2)
  assert twin.compiled is steps.compiled
  assert np.isfinite(steps.loss()) and steps.loss() == pytest.approx(twin.loss(), rel=1e-5)


def test_bench_study_separate_runs_are_the_cells_members(tmp_path):
  import bench_study  # pylint: disable=g-import-not-at-top
  from smallfx import cells, methods  # pylint: disable=g-import-not-at-top
  study = bench_study.study_of('configs/study/digits.py', [
      '--config.grid.learning_rate=0.1,0.3', '--config.grid.weight_decay=5e-4',
      '--config.seeds=2', '--config.methods=cosine', '--config.sizes=10'], str(tmp_path))
  runs = bench_study.separate_configs(study, cells.Cell(methods.METHODS['cosine'], 10),
                                      {'learning_rate': 0.3, 'weight_decay': 5e-4})
  got = [(what.split()[0], c.learning_rate, c.seed, c.num_seeds, c.sweep.learning_rate)
         for what, c in runs]
  tune = cells.TUNE_SEED_OFFSET
  assert got == [('tune', 0.1, tune, 1, ''), ('tune', 0.3, tune, 1, ''),
                 ('final', 0.3, 0, 1, ''), ('final', 0.3, 1, 1, '')]


@pytest.mark.slow
def test_bench_study_runs_end_to_end(tmp_path):
  out = tmp_path / 'study.json'
  subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'bench_study.py'),
                  '--config=configs/study/digits.py', '--method=cosine', '--size=10',
                  f'--json={out}', '--', '--config.grid.learning_rate=0.1,0.3',
                  '--config.grid.weight_decay=5e-4', '--config.seeds=2',
                  '--config.base.max_steps=20'], check=True, cwd=ROOT, timeout=900)
  record = json.loads(out.read_text())
  assert len(record['separate_s']) == 4 and record['ratio'] > 0


@pytest.mark.slow
def test_pretraining_bench_times_every_phase(tmp_path):
  out = tmp_path / 'pretrain.json'
  subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'bench_pretrain.py'),
                  '--models=mlp', '--methods=stacked_ae,simclr', '--dataset=digits',
                  '--batch_size=16', '--steps=2', '--rounds=1', f'--out={out}'],
                 check=True, cwd=ROOT, timeout=600, capture_output=True, text=True)
  rows = json.loads(out.read_text())['rows']
  assert [r['method'] for r in rows] == ['stacked_ae', 'simclr']
  # The MLP's two stages, then the whole stack; simclr has one phase.
  assert [p['phase'] for p in rows[0]['phases']] == ['stage 1/2', 'stage 2/2', 'whole stack']
  assert all(r['images_per_sec'] > 0 for r in rows)


@pytest.mark.slow
def test_gan_bench_times_both_phases_and_the_plain_step(tmp_path):
  out = tmp_path / 'gan.json'
  subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'bench_gan.py'),
                  '--dataset=digits', '--samples_per_class=10', '--steps=2', '--rounds=2',
                  f'--out={out}'], check=True, cwd=ROOT, timeout=600, capture_output=True,
                 text=True)
  rows = {r['runner']: r for r in json.loads(out.read_text())['rows']}
  assert list(rows) == ['gan', 'dada', 'cgan_augment', 'plain']
  # DADA's batch holds as many generated images as real ones; cgan_augment half as many.
  assert rows['dada']['images_per_step'] == 2 * rows['plain']['images_per_step']
  assert rows['cgan_augment']['images_per_step'] == 1.5 * rows['plain']['images_per_step']
  assert all(r['images_per_sec']['median'] > 0 for r in rows.values())
