"""Mesh scaling of the train step: one device against an N-device mesh on the same machine, as alternating
processes.

``python benchmarks/bench_mesh.py --archs=eagle3 --meshes=1x1x1,8x1x1 --rounds=3 --steps=3 --out=benchmarks/results/bench_mesh.json``

A process's device count is fixed when JAX starts, so each mesh runs in its own
`benchmarks/bench_train.py` process (``XLA_FLAGS=--xla_force_host_platform_device_count=N`` for an
N-device mesh on CPU, where N is the mesh's size). Each round runs every mesh once, the order rotating
from round to round, with the same global batch (``--batch`` x ``--seq``). The per-core efficiency of a
mesh is its tokens/s over the first mesh's tokens/s *in the same round* (the same physical cores run
both), and the summary gives the median of those per-round ratios, next to the medians of tokens/s, page
faults and kernel time. On a machine with N real devices the first mesh should be set to the same device
count per process; here all meshes share the same 2 cores.

A mesh written ``8x1x1/compiler`` runs the step with ``--explicit_grad_reduce=False``: the gradient
collectives placed by the partitioner instead of the step's one explicit sum over the data-parallel
devices (`lkjax.train.step.make_train_step`), for a side-by-side comparison of the two. One written
``1x8x1/gather`` runs it with ``--gather_split_params``: on an FSDP mesh, the per-device program too, with
the split parameters gathered once and their gradients reduce-scattered; ``1x8x1/tables`` also keeps the
embedding tables split (``--split_tables``: the MLP-Speculator's ``emb``, the target embedding
``embed_tokens`` of EAGLE-3 and MTP; MEDUSA has none).

A mesh written ``8x1x1/grad`` (data parallel only) times, instead of the train step, its bound on this
machine (``bench_train.py --program=grad_only``): each device's forward and backward pass of its share of
the batch with the parameters already in bf16 and replicated, and no collective, gradient sum or
optimizer update (the tables above are left out of the gradient). Such a mesh's efficiency is taken
against the first ``/grad`` mesh in ``--meshes`` (``1x1x1/grad``), a step mesh's against the first step
mesh. ``--meshes=1x1x1,config:8,1x1x1/grad,8x1x1/grad`` thus puts the step's scaling next to the scaling
of the work every device must do in it, measured side by side.
"""
from __future__ import annotations

import json
import math
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import malloc  # noqa: E402

import bench_processes  # noqa: E402

flags.DEFINE_string("archs", "eagle3", "Comma-separated architectures (bench_train.py --archs).")
flags.DEFINE_list("meshes", ["1x1x1", "8x1x1"], "Meshes as DATAxFSDPxTENSOR (see above); the first one of "
                  "each program (train step, /grad) is the reference of the others.")
flags.DEFINE_integer("batch", 8, "Global batch rows (divisible by every mesh's data x fsdp).")
flags.DEFINE_bool("batch_per_shard", False, "--batch is per batch shard: a mesh whose batch is split N ways "
                  "runs N x --batch rows, so each device's share stays the same (weak scaling). Default: "
                  "every mesh runs the same global batch (strong scaling).")
flags.DEFINE_integer("seq", 256, "Tokens per row.")
flags.DEFINE_integer("rounds", 3, "Rounds; each runs every mesh once.")
flags.DEFINE_integer("steps", 3, "Timed steps per bench_train.py run.")
flags.DEFINE_integer("warmup", 2, "Untimed rounds per bench_train.py run (bench_train.py --warmup): the "
                     "single-device run's retained heap reaches its steady size over the first two.")
flags.DEFINE_bool("small", False, "Tiny dims (checks the script, not a measurement).")
flags.DEFINE_string("out", "runs/bench_mesh.json", "Where the JSON goes.")
FLAGS = flags.FLAGS



COMPILER_SUFFIX = "/compiler"
GATHER_SUFFIX = "/gather"
TABLES_SUFFIX = "/tables"
GRAD_SUFFIX = "/grad"
TABLES = ("emb", "embed_tokens")   # each draft keeps the ones it has (bench_train.py --split_tables)
CONFIG_PREFIX = "config:"


def parse_mesh(text: str) -> dict:
  """``DATAxFSDPxTENSOR[/compiler|/gather|/tables]``, ``DATAx1x1/grad`` or ``config:N`` -> ``dict(devices,
  args, expect, split_batch, program)``: the child's device count, its layout flags for bench_train.py, the
  top-level fields its table must report, how many ways the batch is split and what it times."""
  if text.endswith(GRAD_SUFFIX):
    body = text[: -len(GRAD_SUFFIX)]
    parts = body.split("x")
    if len(parts) != 3 or not parts[0].isdigit() or int(parts[0]) < 1 or parts[1:] != ["1", "1"]:
      raise app.UsageError(f"--meshes: {text!r}: a {GRAD_SUFFIX} mesh is data parallel, DATAx1x1{GRAD_SUFFIX} "
                           f"(e.g. 8x1x1{GRAD_SUFFIX})")
    n = int(parts[0])
    return dict(devices=n, args=["--program=grad_only", f"--mesh={n},1,1", f"--split_tables={','.join(TABLES)}"],
                expect=dict(program="grad_only"), split_batch=n, program="grad_only")
  if text.startswith(CONFIG_PREFIX):
    n = text[len(CONFIG_PREFIX):]
    if not n.isdigit() or int(n) < 1:
      raise app.UsageError(f"--meshes: {text!r}: expected {CONFIG_PREFIX}N with N devices, e.g. {CONFIG_PREFIX}8")
    # Every config's batch rule splits the batch over all devices (mesh.shape (-1,1,1) or (1,-1,1)).
    return dict(devices=int(n), args=["--mesh=config"], expect=dict(mesh="config", program="step"),
                split_batch=int(n), program="step")
  body, explicit, gather, tables = text, True, False, ()
  if text.endswith(COMPILER_SUFFIX):
    body, explicit = text[: -len(COMPILER_SUFFIX)], False
  elif text.endswith(GATHER_SUFFIX):
    body, gather = text[: -len(GATHER_SUFFIX)], True
  elif text.endswith(TABLES_SUFFIX):
    body, gather, tables = text[: -len(TABLES_SUFFIX)], True, TABLES
  try:
    shape = tuple(int(x) for x in body.split("x"))
  except ValueError:
    shape = ()
  if len(shape) != 3 or min(shape) < 1:
    raise app.UsageError(f"--meshes: {text!r} is not DATAxFSDPxTENSOR with positive sizes, e.g. 8x1x1, "
                         f"optionally followed by {COMPILER_SUFFIX}, {GATHER_SUFFIX} or {TABLES_SUFFIX}, "
                         f"or {CONFIG_PREFIX}N")
  args = [f"--mesh={','.join(map(str, shape))}", f"--explicit_grad_reduce={explicit}",
          f"--gather_split_params={gather}", f"--split_tables={','.join(tables)}"]
  expect = dict(explicit_grad_reduce=explicit, gather_split_params=gather, split_tables=list(tables), program="step")
  return dict(devices=math.prod(shape), args=args, expect=expect, split_batch=shape[0] * shape[1], program="step")


def global_batch(entry: dict) -> int:
  """The batch rows a mesh's process runs: --batch, or --batch per batch shard with --batch_per_shard."""
  return FLAGS.batch * entry["split_batch"] if FLAGS.batch_per_shard else FLAGS.batch


def run_once(entry: dict, out: str) -> dict:
  args = [f"--archs={FLAGS.archs}", f"--steps={FLAGS.steps}", f"--warmup={FLAGS.warmup}",
          f"--batch={global_batch(entry)}", f"--seq={FLAGS.seq}", *entry["args"]]
  args += ["--small"] if FLAGS.small else []
  flags_env = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
  flags_env.append(f"--xla_force_host_platform_device_count={entry['devices']}")
  # The child decides its own malloc tunables for its device count (benchmarks/malloc.py: no retained heap
  # with several CPU devices, jemalloc instead where installed); the check below holds it to that.
  env = dict(os.environ, XLA_FLAGS=" ".join(flags_env))
  return bench_processes.run_bench_train(
      args, env, out, expect=dict(devices=entry["devices"], **entry["expect"], **malloc.planned_malloc(env)))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  import numpy as np
  meshes = [parse_mesh(m) for m in FLAGS.meshes]
  for name, m in zip(FLAGS.meshes, meshes):
    if global_batch(m) % m["split_batch"]:
      raise app.UsageError(f"--batch={FLAGS.batch} is not divisible by data x fsdp = {m['split_batch']} of mesh {name}")
  if len(set(FLAGS.meshes)) != len(FLAGS.meshes):
    raise app.UsageError(f"--meshes: {FLAGS.meshes} names a mesh twice")
  names = list(FLAGS.meshes)   # the summary's keys, in --meshes order
  # Each mesh's reference: the first mesh in --meshes that times the same program.
  reference = {name: next(n for n, m2 in zip(names, meshes) if m2["program"] == m["program"])
               for name, m in zip(names, meshes)}
  runs = []
  for r, entry, table in bench_processes.in_rounds(meshes, FLAGS.rounds, run_once):
    name = names[meshes.index(entry)]
    for row in table["rows"]:
      data, fsdp, _ = row["mesh_shape"]
      if data * fsdp != entry["split_batch"]:   # config:N assumes the config splits the batch over every device
        raise RuntimeError(f"mesh {name}: {row['arch']} ran on {row['mesh_shape']}, whose batch is split "
                           f"{data * fsdp} ways, not {entry['split_batch']}")
      runs.append(dict(round=r, mesh=name, devices=table["devices"], program=table["program"],
                       gflop_per_step=row["gflop_per_step"],
                       batch=table["batch"], mesh_shape=row["mesh_shape"],
                       explicit_grad_reduce=row["explicit_grad_reduce"], gather_split_params=row["gather_split_params"],
                       retained_heap=table["retained_heap"], jemalloc=table["jemalloc"],
                       **bench_processes.step_record(row)))
      print(f"round {r} mesh {name:<16} {row['arch']:<15} {row['tokens_per_s']:7.0f} tok/s  "
            f"LK {row['step_s']:.2f} s  faults/step {row['page_faults_per_step']:>8.0f}  "
            f"kernel s/step {row['kernel_s_per_step']:.2f}  user s/step {row['user_s_per_step']:.2f}  "
            f"CPU s/step {row['cpu_s_per_step']:.2f}", flush=True)
  summary = []
  for arch in dict.fromkeys(r["arch"] for r in runs):
    def pick(name, r):
      (row,) = [x for x in runs if x["arch"] == arch and x["mesh"] == name and x["round"] == r]
      return row
    for name in names:
      sel = [pick(name, r) for r in range(FLAGS.rounds)]
      ratios = [pick(name, r)["tokens_per_s"] / pick(reference[name], r)["tokens_per_s"] for r in range(FLAGS.rounds)]
      summary.append(dict(arch=arch, mesh=name, devices=sel[0]["devices"], program=sel[0]["program"],
                          reference=reference[name],
                          tokens_per_s=float(np.median([x["tokens_per_s"] for x in sel])),
                          efficiency=float(np.median(ratios)), efficiency_per_round=ratios,
                          gflop_per_step=sel[0]["gflop_per_step"],
                          page_faults_per_step=float(np.median([x["page_faults_per_step"] for x in sel])),
                          kernel_s_per_step=float(np.median([x["kernel_s_per_step"] for x in sel])),
                          user_s_per_step=float(np.median([x["user_s_per_step"] for x in sel])),
                          cpu_s_per_step=float(np.median([x["cpu_s_per_step"] for x in sel])),
                          retained_heap=sel[0]["retained_heap"], jemalloc=sel[0]["jemalloc"]))
  print(f"{'arch':<16}{'mesh':<17}{'devices':>8}{'tok/s':>9}{'vs ref':>12}{'per round':>24}"
        f"{'GFLOP/step':>12}{'faults':>9}{'kernel s':>10}{'user s':>8}{'CPU s':>7}")
  for s in summary:
    print(f"{s['arch']:<16}{s['mesh']:<17}{s['devices']:>8}{s['tokens_per_s']:>9.0f}{s['efficiency']:>12.1%}"
          f"{' '.join(f'{x:.2f}' for x in s['efficiency_per_round']):>24}{s['gflop_per_step']:>12.1f}"
          f"{s['page_faults_per_step']:>9.0f}{s['kernel_s_per_step']:>10.2f}{s['user_s_per_step']:>8.2f}"
          f"{s['cpu_s_per_step']:>7.2f}")
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  with open(FLAGS.out, "w") as f:
    json.dump(dict(archs=FLAGS.archs, meshes=names, batch=FLAGS.batch, batch_per_shard=FLAGS.batch_per_shard,
                   seq=FLAGS.seq, rounds=FLAGS.rounds,
                   steps=FLAGS.steps, warmup=FLAGS.warmup, small=FLAGS.small,
                   glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""),
                   runs=runs, summary=summary), f, indent=1)
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  malloc.reexec_with_malloc_tunables()   # opt-in; children re-decide theirs (see malloc.py)
  app.run(main)
