"""Resident memory and page faults per EAGLE-3 train step under the retained heap (lkjax/runtime.py).

Run from the repository root (2026-11-23), output in heap_growth.txt:

  T=glibc.malloc.hugetlb=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=70368744177664:glibc.malloc.arena_max=1
  GLIBC_TUNABLES=$T N=3 python docs/bench_train_runs/heap_growth.py 1,1,1 lk_hybrid,kl
  GLIBC_TUNABLES=$T XLA_FLAGS=--xla_force_host_platform_device_count=8 N=8 \
      python docs/bench_train_runs/heap_growth.py 8,1,1 lk_hybrid
  GLIBC_TUNABLES=$T XLA_FLAGS=--xla_force_host_platform_device_count=8 N=6 \
      python docs/bench_train_runs/heap_growth.py 8,1,1 lk_hybrid,kl

Session 7, jemalloc instead of the retained heap for the 8-device process (lkjax/runtime.py's setting;
output in 29_heap_jemalloc.txt):

  LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 MALLOC_CONF=narenas:1,dirty_decay_ms:-1,muzzy_decay_ms:-1 \
      XLA_FLAGS=--xla_force_host_platform_device_count=8 N=10 \
      python docs/bench_train_runs/heap_growth.py 8,1,1 lk_hybrid,kl

Arguments: the mesh (data,fsdp,tensor) and the loss kinds whose steps run alternately (batch 8 x 256,
SmolLM2 dims, bf16). It stops once the resident size passes 15 GB (the machine has 24 GB).
"""
import importlib.util
import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
spec = importlib.util.spec_from_file_location("bt", os.path.join(ROOT, "experiments/bench_train.py"))
bt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bt)
info = bt.target_info(False)
mesh = tuple(int(x) for x in sys.argv[1].split(","))
kw = dict(small=False, batch=8, seq=256, mesh_shape=mesh, precision="bf16")
progs = [bt.build_step("eagle3", k, info, **kw) for k in sys.argv[2].split(",")]   # each runs one warm-up step


def rss_gb():
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


for i in range(int(os.environ.get("N", "8"))):
  for p in progs:
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    p["run"]()
    dt = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    print(f"{i} {p['kind']} {dt:.2f}s faults {r1.ru_minflt - r0.ru_minflt} sys {r1.ru_stime - r0.ru_stime:.2f} "
          f"rss {rss_gb():.1f} GB", flush=True)
    if rss_gb() > 15:
      sys.exit("too big")
