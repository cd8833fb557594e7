"""Run a config's sweep grid: ``python experiments/sweep.py --config=configs/eagle3.py:smoke``.

Each run of the config file's ``sweep(add)`` gets its own workdir ``<root>/<run name>`` (resumable;
finished runs -- those whose ``summary.json`` says "finished" -- are skipped). At the end a table of
final metrics per run (validation loss and tau, per-head alpha) is written to ``<root>/summary.json``
and ``<root>/summary.md``.

Flags: ``--config`` (path[:args]), ``--root`` (default ``runs/sweep_<config name>``), ``--only`` (run
names, comma separated), ``--dry_run`` (print the grid and exit), ``--set key=value`` (an override for
every run, repeatable, e.g. ``--set num_steps=20``).
"""
from __future__ import annotations

import ast
import json
import os
import sys
from typing import Any

# The repository root, so the entry point works from a plain checkout too (no pip install -e).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

flags.DEFINE_string("config", None, "Config file with a sweep(add) function, path[:args].")
flags.DEFINE_string("root", None, "Directory of the sweep's workdirs (default runs/sweep_<config name>).")
flags.DEFINE_string("only", "", "Comma-separated run names to run (default: all).")
flags.DEFINE_bool("dry_run", False, "Print the grid and exit.")
flags.DEFINE_enum("grid", "standard", ["standard", "chain"], "standard: the paper's losses; chain: lk_tau and "
                  "reach head weights (docs/design.md#objectives-on-the-draft-chain).")
flags.DEFINE_multi_string("set", [], "key=value override applied to every run.")
FLAGS = flags.FLAGS


def grid(config_spec: str, name: str = "standard") -> list[dict[str, Any]]:
  """The overrides of every run in the config file's ``sweep(add, grid)`` for grid ``name``."""
  from lkjax.config_args import load_config_module
  module, _ = load_config_module(config_spec)
  if not hasattr(module, "sweep"):
    raise ValueError(f"{config_spec}: the config file defines no sweep(add)")
  runs: list[dict[str, Any]] = []
  module.sweep(lambda **kw: runs.append(dict(kw)), name)
  return runs


def run_name(overrides: dict[str, Any]) -> str:
  """``{"loss.kind": "lk_hybrid", "loss.eta": 3.0}`` -> ``kind=lk_hybrid,eta=3.0`` (a directory name)."""
  parts = [f"{k.split('.')[-1]}={v}" for k, v in overrides.items()]
  return ",".join(parts).replace("/", "_") or "default"


def parse_set(items: list[str]) -> dict[str, Any]:
  out = {}
  for item in items:
    key, sep, raw = item.partition("=")
    if not sep:
      raise ValueError(f"--set {item!r}: expected key=value")
    try:
      out[key] = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      out[key] = raw
  return out


def summary_row(name: str, workdir: str) -> dict[str, Any] | None:
  path = os.path.join(workdir, "summary.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    s = json.load(f)
  val, train = s.get("val") or {}, s.get("train") or {}
  src = val or train
  alphas = [src[f"alpha/{k}"] for k in range(64) if f"alpha/{k}" in src]
  return dict(run=name, status=s.get("status"), step=s.get("step"), split="val" if val else "train",
              loss=src.get("loss"), tau=src.get("tau"), alpha=alphas, workdir=workdir)


def write_table(rows: list[dict[str, Any]], root: str) -> tuple[str, str]:
  """``summary.json`` + ``summary.md`` (one line per run, best tau first)."""
  rows = sorted(rows, key=lambda r: -(r["tau"] if isinstance(r.get("tau"), (int, float)) else -1))
  jpath, mpath = os.path.join(root, "summary.json"), os.path.join(root, "summary.md")
  from lkjax.files import write_json
  write_json(jpath, rows)
  lines = ["| run | status | step | split | loss | tau | alpha per head |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    fmt = lambda x: f"{x:.4f}" if isinstance(x, (int, float)) else str(x)  # noqa: E731
    lines.append(f"| {r['run']} | {r['status']} | {r['step']} | {r['split']} | {fmt(r['loss'])} | "
                 f"{fmt(r['tau'])} | {' '.join(f'{a:.3f}' for a in r['alpha'])} |")
  with open(mpath, "w") as f:
    f.write("\n".join(lines) + "\n")
  return jpath, mpath


def run_sweep(config_spec: str, root: str | None = None, *, only: list[str] | None = None,
              extra: dict[str, Any] | None = None, dry_run: bool = False,
              grid_name: str = "standard") -> list[dict[str, Any]]:
  """Run (or resume, or skip when finished) every run of the grid; returns the summary rows."""
  from lkjax.config_args import load_config
  from lkjax.train.loop import train_and_evaluate
  base = load_config(config_spec, extra or {})
  root = root or os.path.join("runs", f"sweep_{base.name}" + ("" if grid_name == "standard" else f"_{grid_name}"))
  runs = [(run_name(o), o) for o in grid(config_spec, grid_name)]
  names = [n for n, _ in runs]
  if len(set(names)) != len(names):
    raise ValueError(f"{config_spec}: sweep runs with the same name: {names}")
  if only:
    unknown = sorted(set(only) - set(names))
    if unknown:
      raise ValueError(f"--only {unknown}: not in the grid {names}")
    runs = [(n, o) for n, o in runs if n in only]
  rows = []
  for i, (name, overrides) in enumerate(runs):
    workdir = os.path.join(root, name)
    print(f"[sweep] {i + 1}/{len(runs)} {name}: {overrides} -> {workdir}", flush=True)
    if dry_run:
      continue
    done = summary_row(name, workdir)
    if done is None or done["status"] != "finished":
      train_and_evaluate(load_config(config_spec, {**(extra or {}), **overrides}), workdir)
    else:
      print(f"[sweep] {name}: finished earlier, skipped", flush=True)
    rows.append(summary_row(name, workdir))
  if not dry_run:
    os.makedirs(root, exist_ok=True)
    jpath, mpath = write_table(rows, root)
    print(f"[sweep] {len(rows)} runs; table: {mpath} (json: {jpath})", flush=True)
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not FLAGS.config:
    raise app.UsageError("--config is required")
  if any(v in os.environ for v in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES")):
    import jax
    jax.distributed.initialize()
  only = [s for s in FLAGS.only.split(",") if s]
  from lkjax import cli
  config = cli.check_config_argv(["sweep.py", f"--config={FLAGS.config}"])
  for item in FLAGS.set:
    key, sep, raw = item.partition("=")
    if not sep:
      raise app.UsageError(f"--set {item!r}: expected key=value, e.g. --set num_steps=20")
    cli.check_override(config, key, None, flag=f"--set {item}")
  run_sweep(FLAGS.config, FLAGS.root, only=only, extra=parse_set(FLAGS.set), dry_run=FLAGS.dry_run,
            grid_name=FLAGS.grid)


if __name__ == "__main__":
  from lkjax import cli
  cli.run(main, config_flag=None)
