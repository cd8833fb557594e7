"""Matmul-form benchmark behind `lkjax.perf`: ``python benchmarks/bench_matmul.py [--out=...]``.

Times, at the draft LM head's shape (``x [2048, 576] @ W [576, 8192]``, bf16 operands), the forward dot
and the two backward dots of a dense layer in the forms XLA's CPU backend gets them:

  fwd NN f32 out      x @ W, f32 result (what `lkjax.perf.matmul` asks for)
  fwd NN bf16 out     x @ W, bf16 result (what a plain bf16 ``nnx.Linear`` produces)
  dX  g @ W.T         autodiff's form (the transpose is folded into the dot's dimension numbers)
  dX  materialised    g @ physical_transpose(W) (`lkjax.perf`'s backward)
  dW  x.T @ g         autodiff's form
  dW  materialised    physical_transpose(x) @ g

and prints GFLOP/s (best of ``--repeats``) per form; the table goes to ``--out`` as JSON.
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

flags.DEFINE_integer("m", 2048, "Rows (tokens).")
flags.DEFINE_integer("k", 576, "Contraction (hidden size).")
flags.DEFINE_integer("n", 8192, "Columns (draft vocabulary).")
flags.DEFINE_integer("repeats", 7, "Timed calls per form (best is reported).")
flags.DEFINE_string("out", "runs/bench_matmul.json", "Where the JSON table goes.")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  import jax
  import jax.numpy as jnp
  from lkjax.perf import physical_transpose

  m, k, n = FLAGS.m, FLAGS.k, FLAGS.n
  bf, f32 = jnp.bfloat16, jnp.float32
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (m, k), bf)
  w = jax.random.normal(keys[1], (k, n), bf)
  g = jax.random.normal(keys[2], (m, n), bf)
  forms = {
      "fwd NN f32 out": (lambda x, w: jnp.dot(x, w, preferred_element_type=f32), (x, w)),
      "fwd NN bf16 out": (lambda x, w: jnp.dot(x, w), (x, w)),
      "dX g @ W.T": (lambda g, w: jnp.dot(g, w.T, preferred_element_type=f32), (g, w)),
      "dX materialised": (lambda g, w: jnp.dot(g, physical_transpose(w), preferred_element_type=f32), (g, w)),
      "dW x.T @ g": (lambda x, g: jnp.dot(x.T, g, preferred_element_type=f32), (x, g)),
      "dW materialised": (lambda x, g: jnp.dot(physical_transpose(x), g, preferred_element_type=f32), (x, g)),
  }
  flop = 2.0 * m * k * n
  rows = []
  print(f"{jax.devices()[0].platform}: [{m}, {k}] x [{k}, {n}] bf16, {FLAGS.repeats} repeats (best)")
  for name, (fn, args) in forms.items():
    f = jax.jit(fn)
    f(*args).block_until_ready()
    best = float("inf")
    for _ in range(FLAGS.repeats):
      t = time.perf_counter()
      f(*args).block_until_ready()
      best = min(best, time.perf_counter() - t)
    rows.append(dict(form=name, seconds=best, gflops=flop / best / 1e9))
    print(f"  {name:<20} {best * 1e3:8.1f} ms {flop / best / 1e9:8.1f} GFLOP/s", flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  with open(FLAGS.out, "w") as f:
    json.dump(dict(m=m, k=k, n=n, platform=jax.devices()[0].platform, rows=rows), f, indent=2)
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
