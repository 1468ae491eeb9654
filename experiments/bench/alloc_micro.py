"""XLA:CPU's step buffer in isolation: malloc, write, free N MB from a worker thread.

    python3 experiments/bench/alloc_micro.py 313 20
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python3 experiments/bench/alloc_micro.py 313 20
    LD_PRELOAD=libtcmalloc_minimal.so.4 python3 experiments/bench/alloc_micro.py 313 20

Prints one JSON line: ms per buffer (min and median, the first two left out), minor
page faults and system ms per buffer. `allocators.md`, "The step buffer alone".
"""
import ctypes
import json
import resource
import statistics
import sys
import threading
import time

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
n = int(float(sys.argv[1]) * 2**20)
reps = int(sys.argv[2])
times = []
def work():
  for _ in range(reps):
    t = time.perf_counter()
    p = libc.malloc(n); libc.memset(p, 1, n); libc.free(p)
    times.append((time.perf_counter() - t) * 1e3)
r0 = resource.getrusage(resource.RUSAGE_SELF)
th = threading.Thread(target=work); th.start(); th.join()
r1 = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({'min': min(times[2:]), 'median': statistics.median(times[2:]),
                  'faults': (r1.ru_minflt - r0.ru_minflt) / reps,
                  'sys_ms': (r1.ru_stime - r0.ru_stime) * 1e3 / reps}))
