"""The input gradient of a bf16 `matmul`, two ways, on one device (session 13).

    python docs/bench_train_runs/dx_transpose.py [--rows=128,256,512,2048] [--rounds=15]

(with the project's environment). For ``x [M, K] @ w [K, N]`` the backward pass needs ``dx = g @ w.T``.
`lkjax.models.matmul` computes it with NN dots only, which needs one transposed copy:

  w.T        ``g @ T(w)``: the weight ``[K, N]`` is copied transposed (K * N elements)
  (w g.T).T  ``T(w @ T(g))``: the cotangent ``[M, N]`` and the ``[K, M]`` product are (M * (N + K))

(``T`` = `lkjax.models.matmul.physical_transpose`, each variant ending in the bf16 cast the backward
pass makes). Prints the median milliseconds of each over ``--rounds`` alternating calls
(`experiments/bench_parts.py`'s ``time_rotating``), for the LM-head
shape ``[576, 8192]`` and the 576-wide layers' shapes, and the rule `matmul.transposes_cotangent`'s pick.
The process takes the malloc settings every entry script takes (`lkjax.runtime`).
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "experiments")]

from lkjax import runtime  # noqa: E402

SHAPES = ((576, 8192), (576, 576), (576, 1536), (1536, 576))   # (K, N)


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--rows", default="128,256,512,2048")
  ap.add_argument("--rounds", type=int, default=15)
  args = ap.parse_args()
  import jax
  import jax.numpy as jnp
  import numpy as np
  from bench_parts import time_rotating   # warm-up call, then rounds in rotating order
  from lkjax.models import matmul as mm
  print(f"MALLOC {runtime.describe()}", flush=True)
  r = np.random.default_rng(0)
  mk = lambda *s: jnp.asarray(r.standard_normal(s), jnp.bfloat16)  # noqa: E731
  by_w = jax.jit(lambda g, w: mm._dot_f32(g, mm.physical_transpose(w)).astype(jnp.bfloat16))
  by_g = jax.jit(lambda g, w: mm.physical_transpose(mm._dot_f32(w, mm.physical_transpose(g)).astype(jnp.bfloat16)))
  print(f"{'M':>5s} {'K':>5s} {'N':>5s} {'w.T ms':>8s} {'(w g.T).T ms':>13s} {'ratio':>6s}  rule picks")
  for m in (int(v) for v in args.rows.split(",")):
    for k, n in SHAPES:
      g, w = mk(m, n), mk(k, n)
      np.testing.assert_allclose(np.asarray(by_w(g, w), np.float32), np.asarray(by_g(g, w), np.float32),
                                 rtol=2e-2, atol=0.5)   # the same dx up to the f32 sums' order
      times = time_rotating({"w.T": (by_w, (g, w)), "(w g.T).T": (by_g, (g, w))}, args.rounds)
      a, b = (1e3 * float(np.median(times[name])) for name in ("w.T", "(w g.T).T"))
      pick = "(w g.T).T" if mm.transposes_cotangent(m, k, n) else "w.T"
      print(f"{m:5d} {k:5d} {n:5d} {a:8.2f} {b:13.2f} {b / a:6.2f}  {pick}", flush=True)


if __name__ == "__main__":
  runtime.reexec_with_malloc_tunables()
  main()
