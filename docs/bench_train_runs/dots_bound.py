"""MEDUSA's LM-head dots alone, on one device against N virtual CPU devices (session 12).

    python docs/bench_train_runs/dots_bound.py [--devices=8] [--rounds=3]

(with the project's environment). The parent runs alternating child processes, one device and
``--devices`` devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N``), the order rotating each
round (`bench_processes.rotated`). Each child first takes the malloc settings every entry script takes
(`lkjax.runtime.reexec_with_malloc_tunables`: the retained heap and huge pages on one device, jemalloc
with several).

Each child times one program: for each of the K = 6 heads, the three NN dots of a ``[T, 576] @ [576, 8192]``
layer's forward and backward pass as `lkjax.models.matmul` runs them in training (``x @ W``,
``g @ W^T``, ``x^T @ g``, bf16 operands, float32 results, every operand already materialised), each result
reduced to a sum of squares. T = 2048 rows (MEDUSA's 8 x 256) on one device; on N devices each device
runs the same dots on its T / N rows with its own copy of the weights, and nothing else: no collective,
no transpose, no optimizer. The ratio of the two is what 8 virtual devices sharing this machine's cores
leave of one device's speed for the work that dominates MEDUSA's step (348 of its 392 GFLOP).
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path[:0] = [ROOT, os.path.join(ROOT, "experiments")]
import bench_processes  # noqa: E402
from lkjax import runtime  # noqa: E402

K, H, V, T = 6, 576, 8192, 2048


def child(reps: int) -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  n = jax.device_count()

  def dot(a, b):
    return jax.lax.dot(a, b, preferred_element_type=jnp.float32)

  def per_device(xs, xts, gs, ws, wts):
    s = jnp.zeros((), jnp.float32)
    for x, xt, g, w, wt in zip(xs, xts, gs, ws, wts):
      s += jnp.sum(jnp.square(dot(x, w))) + jnp.sum(jnp.square(dot(g, wt))) + jnp.sum(jnp.square(dot(xt, g)))
    return s

  keys = iter(jax.random.split(jax.random.key(0), 5 * K))
  normal = lambda shape: jax.random.normal(next(keys), shape, jnp.bfloat16)  # noqa: E731
  args = ([normal((T, H)) for _ in range(K)], [normal((H, T)) for _ in range(K)], [normal((T, V)) for _ in range(K)],
          [normal((H, V)) for _ in range(K)], [normal((V, H)) for _ in range(K)])
  if n > 1:
    mesh = Mesh(np.array(jax.devices()), ("d",))
    specs = (P("d"), P(None, "d"), P("d"), P(), P())   # rows split; weights replicated (a copy per device)
    fn = jax.jit(jax.shard_map(lambda *a: per_device(*a)[None], mesh=mesh, in_specs=specs, out_specs=P("d")))
    args = tuple([jax.device_put(a, NamedSharding(mesh, s)) for a in group] for group, s in zip(args, specs))
  else:
    fn = jax.jit(per_device)
  jax.block_until_ready(fn(*args))
  times, cpu = [], []
  for _ in range(reps):
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    jax.block_until_ready(fn(*args))
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    times.append(time.perf_counter() - t0)
    cpu.append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
  step = float(np.median(times))
  gflop = 3 * 2 * T * H * V * K / 1e9
  print(f"RESULT devices={n} step_ms={step * 1e3:.1f} tokens_per_s={T / step:.0f} gflops={gflop / step:.1f} "
        f"cpu_s={float(np.median(cpu)):.2f}", flush=True)


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--devices", type=int, default=8)
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--reps", type=int, default=9, help="timed calls per child (median)")
  ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  a = ap.parse_args()
  if a.child:
    runtime.reexec_with_malloc_tunables()   # restarts the child with its device count's malloc settings
    print(f"MALLOC {runtime.describe()}", flush=True)
    child(a.reps)
    return
  if T % a.devices:
    sys.exit(f"--devices={a.devices} does not divide the {T} rows")
  results = {1: [], a.devices: []}
  for r in range(a.rounds):
    for n in bench_processes.rotated([1, a.devices], r):
      env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
      out = subprocess.run([sys.executable, __file__, "--child", f"--reps={a.reps}"], env=env,
                           capture_output=True, text=True, check=True).stdout
      line = [x for x in out.splitlines() if x.startswith("RESULT")][0]
      malloc = [x for x in out.splitlines() if x.startswith("MALLOC")][-1]
      print(f"round {r} {line[len('RESULT '):]}  ({malloc[len('MALLOC '):]})", flush=True)
      results[n].append(float(line.split("tokens_per_s=")[1].split()[0]))
  ratios = [b / o for o, b in zip(results[1], results[a.devices])]
  print(f"{a.devices} devices / 1 device, per round: {' '.join(f'{x:.3f}' for x in ratios)}")


if __name__ == "__main__":
  main()
