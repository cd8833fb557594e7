"""Evaluation prompts: MT-bench (80 x 2 turns), HumanEval (164) and GSM8K-style GSM-Symbolic problems.

Each benchmark is a list of `EvalPrompt` (a conversation of user turns; MT-bench's second turn is asked
after the model's own first answer). Files come from the packaged assets (`lkjax.assets.fetch`); the
loaders also take explicit paths so tests can use small files.

GSM-Symbolic is generated exactly as reasoning-gym's ``gsm_symbolic`` dataset does (its task list, its
per-item ``Random(seed + idx)`` and its question suffix), but by importing only the generator files and the
stdlib-only ``reasoning_gym/utils.py`` from the wheel, so none of reasoning-gym's dependencies are needed.
"""
from __future__ import annotations

import ast
import dataclasses
import gzip
import importlib.util
import json
import pathlib
import random
import sys
import types
from typing import Sequence

BENCHMARKS = ("mt_bench", "humaneval", "gsm8k")
GSM_SEED = 42          # fixed seed for the GSM-Symbolic sample (documented in the report)
GSM_SIZE = 100         # problems drawn by default (the paper's GSM8K subsets are of this order)
GSM_SUFFIX = " Give the result as your final answer. Do not include units."
HUMANEVAL_INSTRUCTION = "Complete the following Python function. Reply with the full function.\n\n"


@dataclasses.dataclass(frozen=True)
class EvalPrompt:
  benchmark: str
  id: str
  turns: tuple[str, ...]     # user turns, asked in order; later turns see the model's own earlier answers


def load_mtbench(path: str | pathlib.Path) -> list[EvalPrompt]:
  """MT-bench ``question.jsonl``: ``{"question_id", "category", "turns": [q1, q2]}`` per line."""
  path = pathlib.Path(path)
  out = []
  for i, line in enumerate(path.read_text().splitlines()):
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
      turns = tuple(str(t) for t in rec["turns"])
      qid = str(rec["question_id"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise ValueError(f"{path}: line {i + 1} is not an MT-bench question ({e})") from e
    if not turns:
      raise ValueError(f"{path}: line {i + 1} (question {qid}) has no turns")
    out.append(EvalPrompt("mt_bench", qid, turns))
  return out


def load_humaneval(path: str | pathlib.Path) -> list[EvalPrompt]:
  """HumanEval ``HumanEval.jsonl.gz``: ``{"task_id", "prompt", ...}``; the code prompt is the user turn."""
  path = pathlib.Path(path)
  opener = gzip.open if path.suffix == ".gz" else open
  out = []
  with opener(path, "rt") as f:
    for i, line in enumerate(f):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
        out.append(EvalPrompt("humaneval", str(rec["task_id"]), (HUMANEVAL_INSTRUCTION + rec["prompt"],)))
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: line {i + 1} is not a HumanEval task ({e})") from e
  return out


def _gsm_task_list(gsm_dir: pathlib.Path) -> list[int]:
  """The ``tasks_ok`` list of reasoning-gym's gsm_symbolic.py, read without importing it."""
  src = gsm_dir / "gsm_symbolic.py"
  tree = ast.parse(src.read_text())
  for node in tree.body:
    if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "tasks_ok" for t in node.targets):
      return [int(v) for v in ast.literal_eval(node.value)]
  raise ValueError(f"{src}: no tasks_ok list found")


def _load_gsm_generators(gsm_dir: pathlib.Path, utils_path: pathlib.Path) -> dict[int, object]:
  # The generator files do `from reasoning_gym.utils import ...`; register just that module under a
  # private package object so nothing else of reasoning-gym (or its dependencies) is needed.
  pkg_name = "reasoning_gym"
  saved = {k: sys.modules.get(k) for k in (pkg_name, f"{pkg_name}.utils")}
  pkg = types.ModuleType(pkg_name)
  pkg.__path__ = []
  spec = importlib.util.spec_from_file_location(f"{pkg_name}.utils", utils_path)
  utils = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(utils)
  pkg.utils = utils
  sys.modules[pkg_name], sys.modules[f"{pkg_name}.utils"] = pkg, utils
  gens = {}
  try:
    for fname in ("generators_00_49.py", "generators_50_99.py"):
      spec = importlib.util.spec_from_file_location(f"_lkjax_gsm_{fname[:-3]}", gsm_dir / fname)
      mod = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(mod)
      for name in dir(mod):
        if name.startswith("generate_") and name[len("generate_"):].isdigit():
          gens[int(name[len("generate_"):])] = getattr(mod, name)
  finally:
    for k, v in saved.items():
      if v is None:
        sys.modules.pop(k, None)
      else:
        sys.modules[k] = v
  return gens


def load_gsm_symbolic(gsm_dir: str | pathlib.Path, *, size: int = GSM_SIZE, seed: int = GSM_SEED,
                      utils_path: str | pathlib.Path | None = None) -> list[EvalPrompt]:
  """``size`` GSM-Symbolic problems, identical to ``reasoning_gym`` ``gsm_symbolic`` with this seed.

  ``gsm_dir`` is the wheel's ``reasoning_gym/arithmetic/gsm_symbolic`` directory; ``utils_path`` its
  ``reasoning_gym/utils.py`` (default: ``gsm_dir/../../utils.py`` as laid out in the wheel).
  """
  gsm_dir = pathlib.Path(gsm_dir)
  utils_path = pathlib.Path(utils_path) if utils_path else gsm_dir.parent.parent / "utils.py"
  if not utils_path.exists():
    raise FileNotFoundError(f"{utils_path}: reasoning_gym/utils.py is needed to run the GSM-Symbolic generators")
  tasks = _gsm_task_list(gsm_dir)
  gens = _load_gsm_generators(gsm_dir, utils_path)
  task_indices = random.Random(seed).choices(tasks, k=size)
  out = []
  for idx in range(size):
    example = gens[task_indices[idx]](random.Random(seed + idx), 1.0)
    out.append(EvalPrompt("gsm8k", f"gsm_symbolic/{seed}/{idx}", (example["question"] + GSM_SUFFIX,)))
  return out


def load_benchmark(name: str, *, limit: int | None = None, cache_dir=None) -> list[EvalPrompt]:
  """One benchmark by name (`BENCHMARKS`), files fetched from the packaged assets; ``limit`` keeps the first N."""
  if name not in BENCHMARKS:
    raise ValueError(f"benchmark {name!r} is unknown; choose from {BENCHMARKS}")
  from lkjax import assets

  if name == "mt_bench":
    prompts = load_mtbench(assets.fetch("mtbench", cache_dir=cache_dir))
  elif name == "humaneval":
    prompts = load_humaneval(assets.fetch("humaneval", cache_dir=cache_dir))
  elif name == "gsm8k":
    size = GSM_SIZE if limit is None else min(limit, GSM_SIZE)
    prompts = load_gsm_symbolic(assets.fetch("gsm_symbolic", cache_dir=cache_dir), size=size)
  return prompts if limit is None else prompts[:limit]


def all_eval_texts(prompts: Sequence[EvalPrompt]) -> list[str]:
  """Every user turn of the given prompts (used to keep training prompts disjoint from evaluation)."""
  return [t for p in prompts for t in p.turns]
