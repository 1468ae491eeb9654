"""Data parallelism, seed sharding, multi-process runs: same maths on any layout."""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from smallfx import members
from smallfx import metrics

from conftest import REPO, run_cli

ARGS = ['--config=configs/cosine.py', '--config.width=0.5', '--config.num_steps=40',
        '--config.log_every_steps=10', '--config.eval_every_steps=20',
        '--config.checkpoint_every_steps=20', '--config.progress=False',
        '--config.baseline=none']
# Where convolutions are not the point: an MLP compiles in a fraction of ResNet-20's time,
# and its batch norm still checks that the statistics are the whole batch's on any layout.
MLP = ['--config.model=mlp', '--config.norm=batch']
CNN = ['--config.model=cnn']  # convolutions (oneDNN's, where built) without ResNet's compile


def devices(n):
  return {'XLA_FLAGS': f'--xla_force_host_platform_device_count={n}'}


def train_losses(workdir):
  return [m['train/loss'] for m in metrics.read(workdir) if 'train/loss' in m]


def results(workdir):
  with open(os.path.join(workdir, 'results.json')) as f:
    return json.load(f)


@pytest.mark.slow
def test_one_two_four_devices_agree(tmp_path):
  runs = {}
  for n in (1, 2, 4):
    r = run_cli('smallfx.main', *ARGS, *MLP, f'--workdir={tmp_path / str(n)}', env=devices(n))
    assert r.returncode == 0, r.stderr
    runs[n] = tmp_path / str(n)
    assert len(results(runs[n])['devices']) == n
  for n in (2, 4):
    np.testing.assert_allclose(train_losses(runs[n]), train_losses(runs[1]), rtol=1e-4)
    assert abs(results(runs[n])['test_accuracy'] - results(runs[1])['test_accuracy']) <= 2 / 535


@pytest.mark.slow
def test_step_is_partitioned_over_devices():
  """The batch really is split: the compiled step all-reduces gradients across devices."""
  code = '''
import jax
from smallfx import config as base, train
c = base.default(); c.width = 0.25
run = train.set_up(c)
state = run.initializer()[0]()
hlo = run.train_step().lower(state, *run.training_data()).compile().as_text()
print('ALLREDUCE' if 'all-reduce' in hlo else 'NONE', jax.device_count())
'''
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=REPO,
                       env=dict(os.environ, **devices(4)), timeout=300)
  assert out.returncode == 0, out.stderr
  assert out.stdout.split() == ['ALLREDUCE', '4']


@pytest.mark.parametrize('num_members, cores, groups', [
    (8, 2, 2), (3, 2, 1), (6, 4, 3), (1, 16, 1), (8, 16, 8), (4, 1, 1)])
def test_cpu_devices_for_members(num_members, cores, groups):
  assert members.cpu_devices(num_members, 0, cores) == groups


def test_cpu_devices_leave_the_process_config_alone():
  """A library call must not change JAX's global config; only an entry point may."""
  before = jax.config.jax_num_cpu_devices
  assert members.cpu_devices(8, 0, 2) == 2
  assert jax.config.jax_num_cpu_devices == before


@pytest.mark.slow
def test_seeds_side_by_side_on_cpu_cores(tmp_path):
  """A run of 2 seeds gets a CPU device per seed (on 2+ cores): the numbers of one device."""
  cores = len(os.sched_getaffinity(0))
  args = [*ARGS, *CNN, '--config.num_seeds=2']
  runs = {}
  for name, extra in (('side', []), ('one', ['--config.member_devices=1'])):
    runs[name] = tmp_path / name
    r = run_cli('smallfx.main', *args, *extra, f'--workdir={runs[name]}',
                env={'XLA_FLAGS': None, 'JAX_NUM_CPU_DEVICES': None})
    assert r.returncode == 0, r.stderr
  assert len(results(runs['side'])['devices']) == min(2, cores)
  assert len(results(runs['one'])['devices']) == 1
  np.testing.assert_allclose(train_losses(runs['side']), train_losses(runs['one']), rtol=1e-4)
  np.testing.assert_allclose(results(runs['side'])['test_accuracy_per_seed'],
                             results(runs['one'])['test_accuracy_per_seed'], atol=2 / 535)


@pytest.mark.slow
def test_side_by_side_step_keeps_each_seed_on_its_device():
  """Seeds over 2 CPU devices: no all-reduce, and each device's convolutions on oneDNN."""
  code = '''
import jax
from smallfx import config as base, train
from smallfx.models import onednn
c = base.default(); c.width = 0.25; c.num_seeds = 4
run = train.set_up(c)
state = run.initializer()[0]()
hlo = run.train_step().lower(state, *run.training_data()).compile().as_text()
print(run.layout.member_devices, 'all-reduce' in hlo, 'SmallfxConv' in hlo, onednn.available())
'''
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=REPO,
                       env=dict(os.environ, **devices(2)), timeout=300)
  assert out.returncode == 0, out.stderr
  seeds_over, all_reduce, onednn_calls, onednn_here = out.stdout.split()
  assert (seeds_over, all_reduce) == ('2', 'False')
  assert onednn_calls == onednn_here  # wherever oneDNN works, each device calls it


def test_seed_rounds_keep_each_seed_on_its_device():
  """8 seeds on 4 CPU devices: 2 calls a step, each with one seed per device, no copies."""
  code = '''
import jax, jax.numpy as jnp, numpy as np
from smallfx import members
layout = members.make_layout(8)
rounds = layout.rounds
tree = layout.place({'w': jnp.arange(8 * 3.0).reshape(8, 3), 'step': jnp.arange(8)})
parts = layout.split(tree)
home = {int(s): sh.device for sh in tree['step'].addressable_shards for s in np.asarray(sh.data)}
moved = [int(s) for p in parts for sh in p['step'].addressable_shards
         for s in np.asarray(sh.data) if sh.device != home[int(s)]]
back = layout.join(parts)
same = all(np.array_equal(back[k], tree[k]) for k in tree) and back['w'].sharding == tree['w'].sharding
order = members.window([[{'loss': p['step']} for p in parts]])['loss']
print(rounds, [np.asarray(p['step']).tolist() for p in parts], moved, same, order.tolist()[0])
'''
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=REPO,
                       env=dict(os.environ, **devices(4)), timeout=300)
  assert out.returncode == 0, out.stderr
  assert out.stdout.split('\n')[0] == '2 [[0, 2, 4, 6], [1, 3, 5, 7]] [] True [0, 1, 2, 3, 4, 5, 6, 7]'


def member_accuracies(workdir):
  return [m['test_accuracy'] for m in results(workdir)['members']]


@pytest.mark.slow
def test_members_on_devices_and_resume(tmp_path):
  """2 seeds x 2 settings, each seed its own sub-sample: any device layout, resumed or not."""
  args = [*ARGS, *MLP, '--config.num_seeds=2', '--config.resample_per_seed=True',
          '--config.sweep.learning_rate=0.05,0.2']
  workdir = tmp_path / 'run'
  r = run_cli('smallfx.main', *args, f'--workdir={workdir}', env=devices(4))
  assert r.returncode == 0, r.stderr
  first = results(workdir)
  assert first['num_members'] == 4 and len(first['test_accuracy_per_seed']) == 2
  assert len(set(member_accuracies(workdir))) > 1
  assert 'ensemble' in r.stdout and 0 <= first['test_ensemble_accuracy'] <= 1
  np.testing.assert_allclose(first['test_accuracy'], np.mean(first['test_accuracy_per_seed']))
  # Drop the final checkpoint and the results: the run resumes from step 20 on a
  # different device layout and must end where it ended before.
  shutil.rmtree(workdir / 'checkpoints' / '40')
  os.remove(workdir / 'results.json')
  r = run_cli('smallfx.main', *args, f'--workdir={workdir}', env=devices(2))
  assert r.returncode == 0, r.stderr
  second = results(workdir)
  assert second['resumed_from_step'] == 20
  np.testing.assert_allclose(member_accuracies(workdir),
                             [m['test_accuracy'] for m in first['members']], atol=2 / 535)
  assert second['chosen_setting'] == first['chosen_setting']
  # And both match the members trained on one device.
  one = tmp_path / 'one'
  r = run_cli('smallfx.main', *args, '--config.member_devices=1', f'--workdir={one}',
              env=devices(1))
  assert r.returncode == 0, r.stderr
  np.testing.assert_allclose(member_accuracies(one), [m['test_accuracy'] for m in first['members']],
                             atol=2 / 535)


def test_seeds_over_some_cpu_devices_is_refused(tmp_path):
  r = run_cli('smallfx.main', *ARGS, '--config.num_seeds=2', '--config.member_devices=2',
              f'--workdir={tmp_path}', env=devices(4))
  assert r.returncode == 2 and 'members take all 4 devices' in r.stderr, r.stderr


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _two_processes(args, workdir, devices_each):
  """One run of `smallfx.main` as two local processes; their (stdout, stderr), each checked."""
  env = dict(os.environ, **devices(devices_each),
             JAX_COORDINATOR_ADDRESS=f'localhost:{_free_port()}', JAX_NUM_PROCESSES='2',
             JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo')
  procs = [subprocess.Popen([sys.executable, '-m', 'smallfx.main', *args, f'--workdir={workdir}',
                             '--config.distributed=True'], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(env, JAX_PROCESS_ID=str(i))) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err
  return outs


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  single = tmp_path / 'single'
  r = run_cli('smallfx.main', *ARGS, *MLP, f'--workdir={single}', env=devices(4))
  assert r.returncode == 0, r.stderr
  multi = tmp_path / 'multi'
  outs = _two_processes([*ARGS, *MLP], multi, devices_each=2)
  assert 'test accuracy' in outs[0][0] and 'test accuracy' not in outs[1][0], 'only process 0 reports'
  assert len(results(multi)['devices']) == 4
  np.testing.assert_allclose(train_losses(multi), train_losses(single), rtol=1e-5)
  assert results(multi)['test_accuracy'] == results(single)['test_accuracy']


@pytest.mark.slow
def test_seeds_side_by_side_over_two_processes(tmp_path):
  """Two seeds, one CPU device in each of two processes, as one process with two devices
  runs them; each process's oneDNN probe reads a device of its own (it once read device
  0, which only process 0 can, so the other process fell back to XLA's convolutions)."""
  args = [*ARGS, *CNN, '--config.num_seeds=2']
  single = tmp_path / 'single'
  r = run_cli('smallfx.main', *args, f'--workdir={single}', env=devices(2))
  assert r.returncode == 0, r.stderr
  multi = tmp_path / 'multi'
  for _, err in _two_processes(args, multi, devices_each=1):
    assert 'oneDNN convolutions unavailable' not in err, err
  assert len(results(multi)['devices']) == 2
  np.testing.assert_allclose(train_losses(multi), train_losses(single), rtol=1e-5)
  np.testing.assert_allclose(results(multi)['test_accuracy_per_seed'],
                             results(single)['test_accuracy_per_seed'], atol=1e-6)


@pytest.mark.slow
def test_many_queued_steps_on_two_cpu_devices_finish(tmp_path):
  """Dozens of steps in flight once made two CPU devices wait on each other's all-reduces
  until XLA aborted the run (2 runs out of 2); the loop now keeps two in flight."""
  r = run_cli('smallfx.main', '--config=configs/cosine.py', '--config.model=cnn',
              '--config.num_steps=600', '--config.log_every_steps=200',
              '--config.eval_every_steps=0', '--config.checkpoint_every_steps=600',
              '--config.progress=False', '--config.baseline=none',
              f'--workdir={tmp_path}', env=devices(2))
  assert r.returncode == 0, r.stderr[-2000:]
  assert results(tmp_path)['steps'] == 600
