"""Forward + backward time of the train step's parts in isolation, variants side by side.

``python benchmarks/bench_parts.py --rounds=7 --out=benchmarks/results/bench_parts.json``

Full-step timings on these CPU machines scatter by 10-30% between two copies of the same program
(see `benchmarks/README.md`), too much to resolve a change to one part. This script times single parts at
the train step's sizes (EAGLE-3 at SmolLM2 dims, batch 4 x 512), every variant compiled in the same
process and timed interleaved, the order rotating from round to round:

  attention   one EAGLE-3 TTT attention (9 heads / 3 kv heads / head dim 64, 3 own-position keys),
              `gqa_attention(..., causal=True)` with query blocks of 0 (= all keys), 256, 128 and 64 rows
  head loss   one head's per-token alpha and KL over the 8192-token draft vocabulary with the loss
              weights of L_lambda (``grad_alpha`` and ``grad_kl``) or KL (``grad_kl`` only), from the
              shared `target_probs`; and the L_lambda variant with three single-operand sums instead
              of the one variadic reduce (`lkjax.losses_chunked._row_sums`)
  norm        forward + backward (input and weight) of one RMSNorm over 576 features
              (`lkjax.models.layers.rms_norm`, on rows) against the same function on the ``[B, T, 576]``
              array as given, at B x T = 1 x 256 (one sequence per device: a global batch of 8 on the
              8-device mesh) and 8 x 256

It prints the median milliseconds per variant and writes them, with every round's times, as JSON.
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

flags.DEFINE_integer("rounds", 7, "Timed rounds (after one warm-up call of each variant).")
flags.DEFINE_bool("small", False, "Tiny sizes (checks the script, not a measurement).")
flags.DEFINE_string("out", "runs/bench_parts.json", "Where the JSON goes.")
flags.DEFINE_list("groups", ["attention", "head_loss", "norm"], "Which groups of variants to time.")
FLAGS = flags.FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def attention_variants(small: bool) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from lkjax.models import layers as L
  from lkjax.perf import PerfOptions
  b, t, n, nkv, d, s = (2, 64, 4, 2, 16, 3) if small else (4, 512, 9, 3, 64, 3)
  r = np.random.default_rng(0)
  bf = jnp.bfloat16
  q = jnp.asarray(r.standard_normal((b, t, n, d)), bf)
  k, v = (jnp.asarray(r.standard_normal((b, t, nkv, d)), bf) for _ in range(2))
  sk, sv = (jnp.asarray(r.standard_normal((b, t, s, nkv, d)), bf) for _ in range(2))
  seg = jnp.ones((b, t), jnp.int32)
  idx = jnp.broadcast_to(jnp.arange(t), (b, t))
  mask = L.segment_causal_mask(seg, seg, idx, idx)
  smask = jnp.ones((b, t, s), bool)
  g = jnp.asarray(r.standard_normal((b, t, n, d)), bf)
  blocks = (0, 16, 8) if small else (0, 256, 128, 64)
  out = {}

  def f(q, k, v, sk, sv, perf):
    o, vjp = jax.vjp(lambda *a: L.gqa_attention(*a[:3], mask, self_k=a[3], self_v=a[4], self_mask=smask,
                                                causal=True, perf=perf), q, k, v, sk, sv)
    return o, vjp(g)

  for block in blocks:
    perf = PerfOptions(causal_block=block)
    fn = jax.jit(lambda *a, perf=perf: f(*a, perf)).lower(q, k, v, sk, sv).compile()
    name = "attention, all keys" if block == 0 else f"attention, causal blocks of {block}"
    out[name] = (fn, (q, k, v, sk, sv))
  return out


def head_loss_variants(small: bool) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from lkjax import losses_chunked as lc
  b, t, vd = (2, 64, 512) if small else (4, 512, 8192)
  r = np.random.default_rng(0)
  z = jnp.asarray(r.standard_normal((b, t, vd)), jnp.bfloat16)
  y = jnp.asarray(r.standard_normal((b, t, vd)) * 2, jnp.float32)
  lse = jnp.asarray(np.asarray(jax.nn.logsumexp(y, -1)) + 1.0)
  c = jnp.asarray(r.random((b, t)), jnp.float32)
  probs = jax.jit(lc.target_probs)(y, lse)

  def make(grad_alpha: bool, sums=None):
    def f(z, probs):
      a, kl = lc.token_alpha_kl_probs(z, probs, grad_alpha=grad_alpha)
      return jnp.sum(c * (0.7 * kl + 0.3 * (1.0 - a)))
    saved = lc._row_sums
    if sums is not None:
      lc._row_sums = sums                    # read while tracing
    try:
      return jax.jit(jax.value_and_grad(f)).lower(z, probs).compile()
    finally:
      lc._row_sums = saved

  separate = lambda *xs: tuple(jnp.sum(x, axis=-1) for x in xs)  # noqa: E731
  return {"head loss, L_lambda": (make(True), (z, probs)),
          "head loss, KL": (make(False), (z, probs)),
          "head loss, L_lambda, three separate sums": (make(True, separate), (z, probs))}


def _rms_norm_unflattened(x, weight, eps: float, dtype):
  """`lkjax.models.layers.rms_norm` as it was before it moved to rows: the sums over the ``[B, T, dim]`` array."""
  import jax
  import jax.numpy as jnp
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * weight.astype(jnp.float32)).astype(dtype)


def norm_variants(small: bool) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from lkjax.models import layers as L
  d, t = (64, 32) if small else (576, 256)
  r = np.random.default_rng(0)
  w = jnp.asarray(1.0 + 0.1 * r.standard_normal(d), jnp.float32)
  out = {}
  for b in (1, 8):
    x = jnp.asarray(r.standard_normal((b, t, d)), jnp.bfloat16)
    c = jnp.asarray(r.standard_normal((b, t, d)), jnp.float32)
    for name, norm in (("rows", L.rms_norm), ("as given", _rms_norm_unflattened)):
      def f(x, w, c, norm=norm):
        return jnp.sum(norm(x, w, 1e-5, jnp.bfloat16).astype(jnp.float32) * c)
      fn = jax.jit(jax.grad(f, argnums=(0, 1))).lower(x, w, c).compile()
      out[f"rms norm {b}x{t}x{d}, {name}"] = (fn, (x, w, c))
  return out


def time_rotating(variants: dict, rounds: int) -> dict[str, list[float]]:
  import jax
  names = list(variants)
  for fn, args in variants.values():
    jax.block_until_ready(fn(*args))        # warm-up
  times = {n: [] for n in names}
  for i in range(rounds):
    for n in names[i % len(names):] + names[:i % len(names)]:
      fn, args = variants[n]
      t = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[n].append(time.perf_counter() - t)
  return times


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  import numpy as np
  import malloc
  makers = {"attention": attention_variants, "head_loss": head_loss_variants, "norm": norm_variants}
  unknown = sorted(set(FLAGS.groups) - set(makers))
  if unknown:
    raise app.UsageError(f"--groups: unknown {unknown}; expected some of {sorted(makers)}")
  groups = {g: makers[g](FLAGS.small) for g in makers if g in FLAGS.groups}
  result = dict(small=FLAGS.small, rounds=FLAGS.rounds, hugepage_malloc=malloc.hugepage_malloc_active(),
                retained_heap=malloc.retained_heap_active(), groups={})
  for group, variants in groups.items():
    times = time_rotating(variants, FLAGS.rounds)
    rows = [dict(name=n, median_ms=float(np.median(ts)) * 1e3, times_s=ts) for n, ts in times.items()]
    result["groups"][group] = rows
    for row in rows:
      print(f"{row['name']:<45} {row['median_ms']:8.1f} ms", flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  with open(FLAGS.out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  import malloc as _malloc
  _malloc.reexec_with_malloc_tunables()   # opt-in (LKJAX_MALLOC_TUNING=1 or launch.py); see malloc.py
  app.run(main)
