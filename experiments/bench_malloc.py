"""Train-step speed with and without huge-page malloc (`lkjax/runtime.py`), as alternating processes.

``python experiments/bench_malloc.py --archs=eagle3 --rounds=2 --steps=3 --out=docs/bench_malloc.json``

glibc tunables are read at process start, so the two settings cannot share a process: each round runs
`experiments/bench_train.py` once with ``glibc.malloc.hugetlb=1`` and once without
(``LKJAX_NO_HUGEPAGE_MALLOC=1``), alternating which goes first, and collects from each run the L_lambda
and KL step times, tokens/s, and the L_lambda step's minor page faults and kernel (system) CPU time per
step. It prints one row per run and the medians per setting, and writes them as JSON (``--out``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from absl import app, flags

flags.DEFINE_string("archs", "eagle3", "Comma-separated architectures (bench_train.py --archs).")
flags.DEFINE_integer("rounds", 2, "Rounds; each runs both settings once.")
flags.DEFINE_integer("steps", 3, "Timed steps per bench_train.py run.")
flags.DEFINE_bool("small", False, "Tiny dims (checks the script, not a measurement).")
flags.DEFINE_string("out", "runs/bench_malloc.json", "Where the JSON goes.")
FLAGS = flags.FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(hugepages: bool) -> dict[str, str]:
  from lkjax import runtime
  env = dict(os.environ, PYTHONPATH=ROOT)
  tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t and not t.startswith(runtime.HUGETLB_TUNABLE)]
  if hugepages:
    tunables.append(f"{runtime.HUGETLB_TUNABLE}=1")
    env.pop(runtime.OPT_OUT_ENV, None)
  else:
    env[runtime.OPT_OUT_ENV] = "1"
  env["GLIBC_TUNABLES"] = ":".join(tunables)
  return env


def run_once(hugepages: bool, out: str) -> dict:
  cmd = [sys.executable, os.path.join(ROOT, "experiments/bench_train.py"), f"--archs={FLAGS.archs}",
         f"--steps={FLAGS.steps}", f"--out={out}"] + (["--small"] if FLAGS.small else [])
  res = subprocess.run(cmd, cwd=ROOT, env=_env(hugepages), capture_output=True, text=True)
  if res.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
  with open(out) as f:
    table = json.load(f)
  if table["hugepage_malloc"] != hugepages:
    raise RuntimeError(f"bench_train.py reported hugepage_malloc={table['hugepage_malloc']}, expected {hugepages}")
  return table


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  import numpy as np
  from lkjax import runtime
  if not runtime.hugepage_malloc_supported():
    print("note: this machine cannot use huge-page malloc (see lkjax/runtime.py); both settings behave alike")
  runs = []
  with tempfile.TemporaryDirectory() as tmp:
    for r in range(FLAGS.rounds):
      order = (True, False) if r % 2 == 0 else (False, True)
      for hp in order:
        table = run_once(hp, os.path.join(tmp, f"{r}_{hp}.json"))
        for row in table["rows"]:
          runs.append(dict(round=r, hugepage_malloc=hp, arch=row["arch"], tokens_per_s=row["tokens_per_s"],
                           lk_step_s=row["step_s"], kl_step_s=row["kl_step_s"],
                           page_faults_per_step=row["page_faults_per_step"],
                           kernel_s_per_step=row["kernel_s_per_step"], lk_times=row["lk_times"]))
          print(f"round {r} huge pages {'on ' if hp else 'off'} {row['arch']:<15} {row['tokens_per_s']:7.0f} tok/s  "
                f"LK {row['step_s']:.2f} s  KL {row['kl_step_s']:.2f} s  faults/step "
                f"{row['page_faults_per_step']:>9.0f}  kernel s/step {row['kernel_s_per_step']:.2f}", flush=True)
  summary = []
  for arch in dict.fromkeys(r["arch"] for r in runs):
    per = {}
    for hp in (True, False):
      sel = [r for r in runs if r["arch"] == arch and r["hugepage_malloc"] == hp]
      per[hp] = {k: float(np.median([r[k] for r in sel])) for k in
                 ("tokens_per_s", "lk_step_s", "kl_step_s", "page_faults_per_step", "kernel_s_per_step")}
    summary.append(dict(arch=arch, on=per[True], off=per[False],
                        speedup=per[False]["lk_step_s"] / per[True]["lk_step_s"]))
    print(f"{arch}: median tokens/s {per[True]['tokens_per_s']:.0f} (huge pages) vs {per[False]['tokens_per_s']:.0f}; "
          f"L_lambda step off / on = {summary[-1]['speedup']:.2f}; faults/step "
          f"{per[True]['page_faults_per_step']:.0f} vs {per[False]['page_faults_per_step']:.0f}")
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  with open(FLAGS.out, "w") as f:
    json.dump(dict(archs=FLAGS.archs, rounds=FLAGS.rounds, steps=FLAGS.steps, small=FLAGS.small,
                   supported=runtime.hugepage_malloc_supported(), runs=runs, summary=summary), f, indent=1)
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  app.run(main)
