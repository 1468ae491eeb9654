"""K members in one program on CPU: how the member axis is laid out, against K single runs.

    python tools/bench_seed_layout.py --model cnn --seeds 4,8

Times the train step of a run of K seeds (`tools/harness.py`: the run as
`smallfx.train.set_up` sets it up, on synthetic data, on this process's one CPU
device) with its member axis laid out each way, interleaved in rounds so that all
share the machine's load:

  single x K    one seed per program; its step time x K (K separate runs)
  vmapped       `jax.vmap` over members (grouped convolutions): the run's layout,
                `unroll=False`
  unrolled      K copies of the step in one program, free to interleave
  in a row      unrolled, each member's inputs waiting on the previous member
                (smallfx's CPU default: the run's own layout)
  looped        `jax.lax.map` over members: one copy of the step in a while loop
                (compiles like one seed; not used by smallfx)
  dispatched    K single-seed states, the one-seed program called K times per
                step (what a training loop holding K states would run)

The last three are `members.Layout`s with another `map` (`Mapped`), passed to
`Run.train_step(layout=...)`. Prints milliseconds per K member-steps (median and
[min-max] over rounds), and each layout's build and compile time. Records:
experiments/bench/HISTORY.md, "Seeds".
"""
import argparse
import dataclasses
import time

import jax
import numpy as np

import harness  # tools/ is on the path of a script in it
from smallfx import malloc
from smallfx import members
from smallfx import models

AUGMENT = 'crop(pad=2)|flip'  # the steps' augmentation unless a tool asks for another
model_specs = harness.model_specs  # (tools/bench_malloc.py's)


@dataclasses.dataclass(frozen=True)
class Mapped(members.Layout):
  """A layout whose per-member function is mapped another way than smallfx's.

  'unrolled': one copy per member, free to interleave (no in-a-row dependency);
  'looped': `jax.lax.map`, one copy of the step in a loop.
  """
  how: str = 'unrolled'

  def map(self, fn, in_a_row=None):
    if self.how == 'looped':
      return lambda *args: jax.lax.map(lambda member_args: fn(*member_args), args)
    return members.over_members(fn, self.unroll, None)


def mapped(layout: members.Layout, how: str) -> Mapped:
  return Mapped(**{f.name: getattr(layout, f.name) for f in dataclasses.fields(layout)},
                how=how)


def make(model, k, batch, unroll=True, in_a_row=True, n=2000, augment=AUGMENT):
  """The run of K seeds of `model` as `harness.Steps` (also tools/bench_malloc.py's)."""
  run = harness.set_up(harness.config(model=model, num_seeds=k, batch_size=batch,
                                    augment=augment,
                                    dataset=harness.synthetic(harness.image_shape(model), n)))
  layout = dataclasses.replace(run.layout, unroll=unroll)
  if unroll and not in_a_row:
    layout = mapped(layout, 'unrolled')
  return harness.Steps(run, layout=layout)


class Dispatched:
  """K one-seed states, the one-seed program called K times per step, asynchronously."""

  def __init__(self, single: harness.Steps, k: int):
    self.runs = [single.twin() for _ in range(k)]

  def run(self, steps):
    for _ in range(steps):
      for r in self.runs:  # dispatched asynchronously, run in this order
        r.dispatch(1)
    for r in self.runs:
      r.wait()


def time_steps(steps: harness.Steps, n: int) -> float:
  """Seconds per step of every member, over `n` steps."""
  return steps.seconds_per_step(n)


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--model', default='cnn', choices=sorted(models.BACKBONES))
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--seeds', default='4,8')
  p.add_argument('--steps', type=int, default=20)
  p.add_argument('--rounds', type=int, default=5)
  args = p.parse_args()
  print(f'{args.model} batch {args.batch}, {jax.devices()[0].device_kind}, '
        f'{args.rounds} rounds x {args.steps} steps; ms per K member-steps')
  single = make(args.model, 1, args.batch)
  for k in [int(v) for v in args.seeds.split(',')]:
    run = harness.set_up(harness.config(
        model=args.model, num_seeds=k, batch_size=args.batch, augment=AUGMENT,
        dataset=harness.synthetic(harness.image_shape(args.model))))
    builders = {'vmapped': dataclasses.replace(run.layout, unroll=False),
                'unrolled': mapped(run.layout, 'unrolled'),
                'in a row': run.layout,
                'looped': mapped(run.layout, 'looped')}
    layouts, build_s = {'single x K': single}, {}
    for name, layout in builders.items():
      t = time.perf_counter()
      layouts[name] = harness.Steps(run, layout=layout)
      layouts[name].run(1)
      build_s[name] = time.perf_counter() - t
    layouts['dispatched'] = Dispatched(single, k)
    layouts['dispatched'].run(1)
    timed = harness.interleave(layouts, args.steps, args.rounds)
    ms = {name: [1e3 * t / args.steps * (k if name == 'single x K' else 1) for t in ts]
          for name, ts in timed['wall'].items()}
    ref = np.median(ms['single x K'])
    print(f'K={k}: ' + ', '.join(
        f'{name} {np.median(t):.1f} [{min(t):.1f}-{max(t):.1f}] (x{np.median(t) / ref:.2f})'
        for name, t in ms.items()), flush=True)
    print('  build and compile (s): ' + ', '.join(f'{n} {v:.1f}' for n, v in build_s.items()),
          flush=True)


if __name__ == '__main__':
  malloc.relaunch()  # measure what the command line runs: see smallfx/malloc.py
  main()
