"""K seeds in one program on CPU: vmapped vs unrolled over the seed axis vs K single runs.

    python tools/bench_seed_layout.py cnn        # or resnet20

Per-step times (medians of 3 x 20 steps) of the real train step
(`smallfx.train.make_train_step(..., unroll=...)`) on synthetic 28x28x1 data.
"""
import time, sys, jax, jax.numpy as jnp, numpy as np
from smallfx import config as base, train, data as data_lib
def make(K, unroll, model='cnn'):
  c = base.default(); c.update(dict(model=model, num_seeds=K, batch_size=32, num_steps=1000, augment='crop(pad=2)|flip'))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2000, 28, 28, 1), dtype=np.uint8); labels = rng.integers(0, 10, 2000).astype(np.int32)
  setup = train.build(c, 10, 2000)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(K))
  st = jax.vmap(lambda k: train.init_state(setup.model, setup.tx, (28, 28, 1), k))(keys)
  mesh = train.make_mesh(c)
  st = train.place_state(st.replace(rng=jax.random.key_data(st.rng)), mesh)
  step = train.make_train_step(setup, 10, 0.5, 0.25, mesh, unroll=unroll)
  return step, st, jnp.asarray(images), jnp.asarray(labels)
def timeit(step, st, x, y, n=20):
  st, m = step(st, x, y); jax.block_until_ready(m)
  ts = []
  for _ in range(3):
    t = time.perf_counter()
    for _ in range(n): st, m = step(st, x, y)
    jax.block_until_ready(m); ts.append((time.perf_counter() - t) / n)
  return np.median(ts)
model = sys.argv[1]
one = timeit(*make(1, False, model))
for K in (4, 8):
  v = timeit(*make(K, False, model)); u = timeit(*make(K, True, model))
  print(f'{model} K={K}: per step vmap {v*1e3:.1f} ms, unrolled {u*1e3:.1f} ms, K x single {K*one*1e3:.1f} ms -> vmap/seq {v/(K*one):.2f}, unrolled/seq {u/(K*one):.2f}', flush=True)
