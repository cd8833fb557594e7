"""Two versions of the code side by side: train-step tokens/s of a baseline commit against this checkout.

``python benchmarks/bench_versions.py --before=1f36ccc --rounds=3 --out=benchmarks/results/bench_versions.json``

A Python process can import one version of lkjax only, so every (version, architecture) runs in its own
`benchmarks/bench_train.py` process (one device, the checkout's own defaults), in rounds whose order
rotates, so both versions see the same machine load. The baseline is checked out into a temporary git
worktree at ``--before`` (removed afterwards); its own ``benchmarks/bench_train.py`` times it. The table
gives, per architecture, the median tokens/s of each version and the median over rounds of the per-round
ratio after / before (the same physical cores ran both within a round).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_processes  # noqa: E402
from lkjax.files import git_commit  # noqa: E402

flags.DEFINE_string("before", None, "Baseline commit (anything `git worktree add` takes).")
flags.DEFINE_string("archs", "eagle3,medusa,mlp_speculator,mtp", "Comma-separated architectures.")
flags.DEFINE_integer("rounds", 3, "Rounds; each runs every (version, architecture) once.")
flags.DEFINE_integer("steps", 3, "Timed steps per bench_train.py run.")
flags.DEFINE_integer("warmup", 2, "Untimed rounds per bench_train.py run.")
flags.DEFINE_bool("small", False, "Tiny dims (checks the script, not a measurement).")
flags.DEFINE_string("out", "runs/bench_versions.json", "Where the JSON goes.")
FLAGS = flags.FLAGS

ROOT = bench_processes.ROOT


def _git(*args: str, cwd: str = ROOT) -> str:
  res = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
  if res.returncode:
    raise app.UsageError(f"git {' '.join(args)}: {res.stderr.strip()}")
  return res.stdout.strip()


def summarise(runs: list[dict], archs: list[str]) -> list[dict]:
  """Per architecture: median tokens/s of each version and the median of the per-round after/before ratios."""
  import numpy as np
  out = []
  for arch in archs:
    by = {(r["round"], r["version"]): r["tokens_per_s"] for r in runs if r["arch"] == arch}
    rounds = sorted({rd for rd, _ in by})
    ratios = [by[(rd, "after")] / by[(rd, "before")] for rd in rounds if (rd, "after") in by and (rd, "before") in by]
    out.append(dict(arch=arch, before_tokens_per_s=float(np.median([by[(rd, "before")] for rd in rounds])),
                    after_tokens_per_s=float(np.median([by[(rd, "after")] for rd in rounds])),
                    after_over_before=float(np.median(ratios)), ratios=ratios))
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not FLAGS.before:
    raise app.UsageError("--before=COMMIT is required")
  archs = [a for a in FLAGS.archs.split(",") if a]
  before = _git("rev-parse", "--short", FLAGS.before)
  after = git_commit(ROOT)
  env = dict(os.environ, XLA_FLAGS="")   # one device in every child
  common = [f"--steps={FLAGS.steps}", f"--warmup={FLAGS.warmup}"] + (["--small"] if FLAGS.small else [])
  runs = []
  with tempfile.TemporaryDirectory() as tmp:
    tree = os.path.join(tmp, "before")
    _git("worktree", "add", "--detach", tree, before)
    try:
      roots = {"before": tree, "after": ROOT}
      configs = [(v, a) for a in archs for v in ("before", "after")]

      def run(config, out):
        version, arch = config
        return bench_processes.run_bench_train(common + [f"--archs={arch}"], env, out, what=f"{version} {arch}",
                                               root=roots[version])

      for rd, (version, arch), table in bench_processes.in_rounds(configs, FLAGS.rounds, run):
        (row,) = table["rows"]
        runs.append(dict(round=rd, version=version, **bench_processes.step_record(row)))
        print(f"  round {rd} {version:<6} {arch:<15} {row['tokens_per_s']:8.0f} tok/s", flush=True)
    finally:
      _git("worktree", "remove", "--force", tree)
  summary = summarise(runs, archs)
  print(f"{'arch':<16}{'before tok/s':>14}{'after tok/s':>13}{'after/before':>14}   (before {before}, after {after})")
  for s in summary:
    print(f"{s['arch']:<16}{s['before_tokens_per_s']:>14.0f}{s['after_tokens_per_s']:>13.0f}"
          f"{s['after_over_before']:>14.3f}")
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  with open(FLAGS.out, "w") as f:
    json.dump(dict(before=before, after=after, small=FLAGS.small, rounds=FLAGS.rounds, steps=FLAGS.steps,
                   warmup=FLAGS.warmup, summary=summary, runs=runs), f, indent=2)
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
