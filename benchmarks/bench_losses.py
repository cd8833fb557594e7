"""Time and peak memory of each LK objective, reference vs vocabulary-chunked, for large vocabularies.

  nice python benchmarks/bench_losses.py                      # V in {49152, 131072, 262144}, K=1, B*T=256
  python benchmarks/bench_losses.py --vocab 49152 --repeats 3 --json /tmp/b.json

What is measured, per (V, objective, implementation): ``jax.jit(jax.value_and_grad(lk_loss))`` w.r.t. the
draft logits (full vocabulary, Vd = V, float32 logits ``[K, B, T, V]``, all tokens trained).
  * time: median wall time and median process CPU time (all threads; robust to the process being
    descheduled on a shared machine) of ``--repeats`` calls after one warm-up call (``block_until_ready``),
    all variants of one V timed round-robin so that load changes hit them alike;
  * memory: XLA's compiled memory analysis, ``temp_size_in_bytes + output_size_in_bytes`` of the compiled
    step (arguments excluded: both implementations read the same two logits arrays; the output includes
    the ``[K, B, T, V]`` gradient, which both must produce).
Goals: every LK objective <= 1.1x the KL objective's time; chunked peak at V = 262144 <= 30%
of the reference's.  The table is printed and written as JSON (``--json``, default benchmarks/results/bench_losses.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from lkjax import losses  # noqa: E402

OBJECTIVES = ("kl", "tv", "lk_alpha", "lk_hybrid", "lk_tau")   # lk_tau: a chain over --heads heads


def compile_step(kind: str, chunk_size: int | None, z: jax.Array, y: jax.Array, mask: jax.Array):
  """AOT-compiled ``value_and_grad(lk_loss)`` and its XLA memory analysis."""
  step = jax.jit(jax.value_and_grad(
      lambda a, b: losses.lk_loss(a, b, mask, kind, chunk_size=chunk_size), has_aux=True))
  compiled = step.lower(z, y).compile()
  return compiled, compiled.memory_analysis()


def run(vocabs, heads: int, batch: int, seq: int, repeats: int, chunk_size: int) -> list[dict]:
  """Per V: compile every (objective, implementation), then time them ROUND-ROBIN ``repeats`` times, so
  that load changes on a shared machine hit all variants alike."""
  rows = []
  bar = tqdm(total=len(vocabs) * len(OBJECTIVES) * 2 * (repeats + 2), desc="bench_losses", file=sys.stderr)
  for v in vocabs:
    kz, ky = jax.random.split(jax.random.key(v))
    z = jax.random.normal(kz, (heads, batch, seq, v), jnp.float32)
    y = 2.0 * jax.random.normal(ky, (heads, batch, seq, v), jnp.float32)
    mask = jnp.ones((heads, batch, seq), bool)
    variants = []
    for kind in OBJECTIVES:
      for cs in (None, chunk_size):
        compiled, mem = compile_step(kind, cs, z, y, mask)
        jax.block_until_ready(compiled(z, y))            # warm-up
        bar.update(2)
        variants.append((compiled, dict(
            vocab=v, objective=kind, impl="reference" if cs is None else f"chunked({cs})",
            tokens=heads * batch * seq, temp_bytes=int(mem.temp_size_in_bytes),
            output_bytes=int(mem.output_size_in_bytes),
            peak_bytes=int(mem.temp_size_in_bytes + mem.output_size_in_bytes), times=[], cpu_times=[])))
    for _ in range(repeats):
      for compiled, row in variants:
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(compiled(z, y))
        row["times"].append(time.perf_counter() - t0)
        row["cpu_times"].append(time.process_time() - c0)
        bar.update(1)
    for _, row in variants:
      row["time_s"] = statistics.median(row["times"])
      row["time_min_s"] = min(row["times"])
      row["cpu_s"] = statistics.median(row["cpu_times"])
      rows.append(row)
    del z, y, variants
  bar.close()
  # Ratios the goals are stated in.
  for row in rows:
    same = [r for r in rows if r["vocab"] == row["vocab"] and r["impl"] == row["impl"]]
    kl = next(r for r in same if r["objective"] == "kl")
    ref = next(r for r in rows if r["vocab"] == row["vocab"] and r["objective"] == row["objective"]
               and r["impl"] == "reference")
    row["time_vs_kl"] = row["time_s"] / kl["time_s"]
    row["time_min_vs_kl"] = row["time_min_s"] / kl["time_min_s"]
    row["cpu_vs_kl"] = row["cpu_s"] / kl["cpu_s"]
    row["peak_vs_reference"] = row["peak_bytes"] / ref["peak_bytes"]
  return rows


def table(rows: list[dict]) -> str:
  head = ("| V | objective | implementation | wall ms (median) | wall / KL | CPU ms (median) | CPU / KL "
          "| peak MiB (temp+out) | temp MiB | peak / reference |")
  lines = [head, "|" + "---|" * 10]
  for r in rows:
    lines.append(f"| {r['vocab']} | {r['objective']} | {r['impl']} | {1e3 * r['time_s']:.1f} | "
                 f"{r['time_vs_kl']:.2f} | {1e3 * r['cpu_s']:.1f} | {r['cpu_vs_kl']:.2f} | "
                 f"{r['peak_bytes'] / 2**20:.1f} | {r['temp_bytes'] / 2**20:.1f} | {r['peak_vs_reference']:.2f} |")
  return "\n".join(lines)


def goals(rows: list[dict]) -> list[str]:
  out = []
  for impl in sorted({r["impl"] for r in rows}):
    for stat, what in (("time_vs_kl", "median wall"), ("cpu_vs_kl", "median CPU")):
      worst = max((r for r in rows if r["impl"] == impl and r["objective"] != "kl"), key=lambda r: r[stat])
      out.append(f"{impl}: worst LK {what} time / KL = {worst[stat]:.2f} "
                 f"({worst['objective']}, V={worst['vocab']}) -> goal <= 1.10 {'MET' if worst[stat] <= 1.1 else 'NOT MET'}")
  vmax = max(r["vocab"] for r in rows)
  worst = max((r for r in rows if r["vocab"] == vmax and r["impl"] != "reference"),
              key=lambda r: r["peak_vs_reference"])
  out.append(f"chunked peak / reference at V={vmax}: worst {worst['peak_vs_reference']:.3f} ({worst['objective']}) "
             f"-> goal <= 0.30 {'MET' if worst['peak_vs_reference'] <= 0.3 else 'NOT MET'}")
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--vocab", type=int, nargs="+", default=[49152, 131072, 262144])
  ap.add_argument("--heads", type=int, default=1)
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--chunk_size", type=int, default=8192)
  ap.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                 "bench_losses.json"))
  args = ap.parse_args(argv)
  rows = run(args.vocab, args.heads, args.batch, args.seq, args.repeats, args.chunk_size)
  info = dict(backend=jax.default_backend(), devices=str(jax.devices()[0].device_kind),
              cpu_count=os.cpu_count(), platform=platform.platform(), jax=jax.__version__,
              heads=args.heads, batch=args.batch, seq=args.seq, repeats=args.repeats, chunk_size=args.chunk_size,
              memory_measure="compiled.memory_analysis(): temp_size_in_bytes + output_size_in_bytes")
  print(table(rows))
  for line in goals(rows):
    print(line)
  os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
  with open(args.json, "w") as f:
    json.dump(dict(config=info, rows=rows, goals=goals(rows)), f, indent=1)
  print(f"wrote {os.path.abspath(args.json)}")


if __name__ == "__main__":
  main()
