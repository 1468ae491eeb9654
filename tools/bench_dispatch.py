"""Where a train step's time goes: the host's dispatch, or the device's work.

    python tools/bench_dispatch.py [--models resnet20:128,cnn:32] [--scan 1,20]

Times smallfx's train step (one seed, synthetic data on the device; `tools/harness.py`)
dispatched once per step, and N steps per dispatch (the same step under `jax.lax.scan`:
`Run.train_step(N)`, as the training loop runs it on GPUs), interleaved in rounds. For
each:

  ms/step    wall time per training step (median [min-max] over rounds)
  host ms    time the Python loop spends issuing the dispatches, per step: when it
             equals ms/step, no dispatch returned before its work was (nearly) done,
             so Python never ran ahead of the device
  GFLOP/s    XLA's cost analysis of one step (`harness.Steps.flops_per_step`) over
             its measured time

and, for the single step, the kernels XLA launches per step (instructions of the
compiled entry computation that run on the device: fusions, library calls, copies;
loops and conditionals count once).
A step that runs at the same speed at 4x the batch is bound by latency (launches,
dispatch), not by arithmetic.
"""
import argparse
import re
import time

import jax
import numpy as np

import harness  # tools/ is on the path of a script in it
from smallfx import malloc

# Entry-computation instructions that are bookkeeping, not a kernel launch.
_NOT_KERNELS = ('parameter', 'constant', 'tuple', 'get-tuple-element', 'bitcast',
                'after-all', 'opt-barrier')


def kernels_per_step(compiled) -> int:
  entry = compiled.as_text().split('\nENTRY ', 1)[-1].split('\n}', 1)[0]
  # `%name = SHAPE op(...)`, SHAPE a tuple `(f32[..], ...)` for multi-output instructions.
  ops = re.findall(r'= (?:\(.*?\)|\S+) ([a-z-]+)\(', entry)
  return sum(op not in _NOT_KERNELS for op in ops)


class Timed:
  """N steps per dispatch of a run; `time` gives wall and issuing seconds per step."""

  def __init__(self, run, n):
    self.steps = harness.Steps(run, steps_per_call=n)
    self.n = n
    if n == 1:  # (the cost analysis of a scan counts its body once)
      self.flops = self.steps.flops_per_step()
      self.kernels = kernels_per_step(self.steps.compiled)
    self.steps.run(2 * n)  # warm-up: the first executions allocate and autotune

  def time(self, steps):
    """(wall seconds per step, host seconds per step to issue the dispatches)."""
    calls = max(1, steps // self.n)
    t = time.perf_counter()
    self.steps.dispatch(calls * self.n)
    issued = time.perf_counter() - t
    self.steps.wait()
    wall = time.perf_counter() - t
    return wall / (calls * self.n), issued / (calls * self.n)


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--models', default='resnet20:128,cnn:32', help='MODEL:BATCH,...')
  p.add_argument('--scan', default='1,20', help='steps per dispatch to compare')
  p.add_argument('--steps', type=int, default=40, help='steps per round')
  p.add_argument('--rounds', type=int, default=5)
  args = p.parse_args()
  specs = harness.model_specs(p, args.models)
  scans = sorted({1, *(int(n) for n in args.scan.split(','))})  # 1: the baseline
  print(f'{jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, '
        f'{args.rounds} rounds x {args.steps} steps', flush=True)
  for model, batch in specs:
    run = harness.set_up(harness.config(model=model, batch_size=batch))
    runs = {n: Timed(run, n) for n in scans}
    wall = {n: [] for n in scans}
    host = {n: [] for n in scans}
    for _ in range(args.rounds):
      for n, timed in runs.items():
        w, h = timed.time(args.steps)
        wall[n].append(w)
        host[n].append(h)
    base, flops = np.median(wall[1]), runs[1].flops
    print(f'{model} batch {batch}: {runs[1].kernels} kernels per step, '
          f'{flops / 1e9:.2f} GFLOP per step')
    for n in scans:
      w = np.array(wall[n]) * 1e3
      print(f'  {n:3d} step(s)/dispatch: {np.median(w):8.3f} ms/step [{w.min():.3f}-{w.max():.3f}]'
            f'  host {np.median(host[n]) * 1e3:7.3f} ms  '
            f'{flops / np.median(wall[n]) / 1e9:8.1f} GFLOP/s  '
            f'x{base / np.median(wall[n]):.2f}', flush=True)


if __name__ == '__main__':
  malloc.relaunch()  # measure what the command line runs: see smallfx/malloc.py
  main()
