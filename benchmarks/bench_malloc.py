"""Train-step speed under glibc's default malloc, huge-page malloc and the retained heap (`benchmarks/malloc.py`),
as alternating processes.

``python benchmarks/bench_malloc.py --archs=eagle3 --rounds=2 --steps=3 --out=benchmarks/results/bench_malloc.json``

glibc tunables are read at process start, so the settings cannot share a process: each round runs
`benchmarks/bench_train.py` once per setting, the order rotating from round to round, and collects from
each run the L_lambda and KL step times, tokens/s, and the L_lambda step's minor page faults and kernel
(system) CPU time per step. The settings (``--settings``):

* ``default``: no tunables (no ``LKJAX_MALLOC_TUNING``);
* ``hugepages``: ``glibc.malloc.hugetlb=1`` only;
* ``retained``: the retained heap plus huge pages, what `malloc.reexec_with_malloc_tunables` sets when opted in.

It prints one row per run and the medians per setting, with each setting's L_lambda step time relative to
the first setting's, and writes them as JSON (``--out``).
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags

import bench_processes

flags.DEFINE_string("archs", "eagle3", "Comma-separated architectures (bench_train.py --archs).")
flags.DEFINE_list("settings", ["default", "hugepages", "retained"], "Malloc settings to compare (see the docstring).")
flags.DEFINE_integer("rounds", 2, "Rounds; each runs every setting once.")
flags.DEFINE_integer("steps", 3, "Timed steps per bench_train.py run.")
flags.DEFINE_bool("small", False, "Tiny dims (checks the script, not a measurement).")
flags.DEFINE_string("out", "runs/bench_malloc.json", "Where the JSON goes.")
FLAGS = flags.FLAGS

ROOT = bench_processes.ROOT
SETTINGS = ("default", "hugepages", "retained")


def setting_env(setting: str, base: dict[str, str] | None = None) -> dict[str, str]:
  """The environment a bench_train.py child runs under for ``setting``; the malloc tunables the parent had
  are dropped first, any other tunable is kept. The setting's tunables are named explicitly (as a user's),
  so the child's `malloc.reexec_with_malloc_tunables` keeps them and adds nothing unless opted in."""
  import malloc
  if setting not in SETTINGS:
    raise ValueError(f"--settings: unknown {setting!r}; expected one of {SETTINGS}")
  env = dict(os.environ if base is None else base)
  env.pop(malloc.OPT_IN_ENV, None)
  env.pop(malloc.ADDED_ENV, None)
  tunables = [malloc.strip_malloc_tunables(env.get("GLIBC_TUNABLES", ""))]
  if setting == "retained":
    env[malloc.OPT_IN_ENV] = "1"
  if setting != "default":
    want = dict(malloc.RETAIN_TUNABLES) if setting == "retained" else {}
    want[malloc.HUGETLB_TUNABLE] = "1"
    tunables += [f"{k}={v}" for k, v in want.items()]
  env["GLIBC_TUNABLES"] = ":".join(filter(None, tunables))
  return env


def run_once(setting: str, out: str) -> dict:
  args = [f"--archs={FLAGS.archs}", f"--steps={FLAGS.steps}"] + (["--small"] if FLAGS.small else [])
  hugepages, retained = {"default": (False, False), "hugepages": (True, False), "retained": (True, True)}[setting]
  return bench_processes.run_bench_train(args, setting_env(setting), out, setting,
                                         expect=dict(hugepage_malloc=hugepages, retained_heap=retained))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  import numpy as np
  import malloc
  settings = list(FLAGS.settings)
  for s in settings:
    setting_env(s)   # validates the name before any run
  if not malloc.hugepage_malloc_supported():
    print("note: this machine cannot use huge-page malloc (see benchmarks/malloc.py)")
  runs = []
  for r, setting, table in bench_processes.in_rounds(settings, FLAGS.rounds, run_once):
    for row in table["rows"]:
      runs.append(dict(round=r, setting=setting, **bench_processes.step_record(row)))
      print(f"round {r} {setting:<10} {row['arch']:<15} {row['tokens_per_s']:7.0f} tok/s  "
            f"LK {row['step_s']:.2f} s  KL {row['kl_step_s']:.2f} s  faults/step "
            f"{row['page_faults_per_step']:>9.0f}  kernel s/step {row['kernel_s_per_step']:.2f}", flush=True)
  summary = []
  keys = ("tokens_per_s", "lk_step_s", "kl_step_s", "page_faults_per_step", "kernel_s_per_step")
  for arch in dict.fromkeys(r["arch"] for r in runs):
    per = {s: {k: float(np.median([r[k] for r in runs if r["arch"] == arch and r["setting"] == s])) for k in keys}
           for s in settings}
    for s in settings:
      per[s]["lk_step_vs_first"] = per[s]["lk_step_s"] / per[settings[0]]["lk_step_s"]
    summary.append(dict(arch=arch, settings=per))
    print(f"{arch}: " + "; ".join(
        f"{s} {per[s]['tokens_per_s']:.0f} tok/s, faults/step {per[s]['page_faults_per_step']:.0f}, "
        f"kernel s/step {per[s]['kernel_s_per_step']:.2f}, LK step / {settings[0]}'s {per[s]['lk_step_vs_first']:.2f}"
        for s in settings))
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  with open(FLAGS.out, "w") as f:
    json.dump(dict(archs=FLAGS.archs, settings=settings, rounds=FLAGS.rounds, steps=FLAGS.steps, small=FLAGS.small,
                   hugepage_supported=malloc.hugepage_malloc_supported(),
                   retained_supported=malloc.retained_heap_supported(), runs=runs, summary=summary), f, indent=1)
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  app.run(main)
