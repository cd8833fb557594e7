"""`benchmarks/bench_train.py` as child processes, one configuration per process, in rounds whose order
rotates: for comparisons whose sides cannot share a process (glibc malloc tunables, which glibc reads at
start; two versions of the code, which cannot be imported side by side). Used by `bench_malloc.py` and
`bench_versions.py`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any, Callable, Iterator, Mapping, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rotated(items: Sequence, r: int) -> list:
  """``items`` starting at position ``r`` (mod its length): round r's order."""
  k = r % len(items)
  return list(items[k:]) + list(items[:k])


def run_bench_train(args: list[str], env: dict[str, str], out: str, what: str = "",
                    expect: Mapping[str, Any] | None = None, root: str = ROOT) -> dict:
  """Run ``bench_train.py ARGS --out=OUT`` of the checkout ``root`` (default: this one) under ``env`` (with
  that checkout on PYTHONPATH) and return the table it wrote; a failed run raises with the command and the
  end of its stderr, and so does a table whose top-level fields differ from ``expect`` (what the child
  process must have run with)."""
  cmd = [sys.executable, os.path.join(root, "benchmarks/bench_train.py"), *args, f"--out={out}"]
  label = f"{' '.join(cmd)}{f' ({what})' if what else ''}"
  res = subprocess.run(cmd, cwd=root, env=dict(env, PYTHONPATH=root), capture_output=True, text=True)
  if res.returncode:
    raise RuntimeError(f"{label} failed:\n{res.stderr[-3000:]}")
  with open(out) as f:
    table = json.load(f)
  got = {k: table.get(k) for k in expect or {}}
  if got != dict(expect or {}):
    raise RuntimeError(f"{label} reported {got}, expected {dict(expect)}")
  return table


def in_rounds(configs: Sequence, rounds: int, run: Callable[[object, str], dict]) -> Iterator[tuple[int, object, dict]]:
  """``(round, config, table)`` for every config in every round, the order rotating from round to round;
  ``run(config, out_path)`` makes one table."""
  with tempfile.TemporaryDirectory() as tmp:
    for r in range(rounds):
      for i, config in enumerate(rotated(configs, r)):
        yield r, config, run(config, os.path.join(tmp, f"{r}_{i}.json"))


def step_record(row: dict) -> dict:
  """The fields of one bench_train.py row that the process comparisons keep."""
  keys = ("arch", "tokens_per_s", "page_faults_per_step", "kernel_s_per_step", "user_s_per_step", "cpu_s_per_step",
          "lk_times", "kl_times", "all_reduce_mb", "all_gather_mb", "reduce_scatter_mb")
  return dict({k: row.get(k) for k in keys}, lk_step_s=row["step_s"], kl_step_s=row["kl_step_s"])
