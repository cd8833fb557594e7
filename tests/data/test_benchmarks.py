"""Benchmark prompt loaders on small hand-made files."""
import gzip
import json
import random

import pytest

from lkjax.data import benchmarks as B


def test_mtbench_two_turns(tmp_path):
  p = tmp_path / "question.jsonl"
  p.write_text("\n".join(json.dumps({"question_id": i, "category": "x", "turns": [f"q{i}a", f"q{i}b"]})
                         for i in (81, 82)) + "\n")
  got = B.load_mtbench(p)
  assert [g.id for g in got] == ["81", "82"]
  assert got[1].turns == ("q82a", "q82b") and got[0].benchmark == "mt_bench"


def test_mtbench_bad_line_names_file_and_line(tmp_path):
  p = tmp_path / "question.jsonl"
  p.write_text(json.dumps({"question_id": 1, "turns": ["a"]}) + "\n{not json\n")
  with pytest.raises(ValueError, match=r"question.jsonl: line 2"):
    B.load_mtbench(p)


def test_humaneval_gz(tmp_path):
  p = tmp_path / "HumanEval.jsonl.gz"
  with gzip.open(p, "wt") as f:
    f.write(json.dumps({"task_id": "HumanEval/0", "prompt": "def f():\n"}) + "\n")
  (got,) = B.load_humaneval(p)
  assert got.id == "HumanEval/0" and got.turns[0].endswith("def f():\n")
  assert got.turns[0].startswith(B.HUMANEVAL_INSTRUCTION)


def test_gsm_symbolic_follows_reasoning_gym_sampling(tmp_path):
  # A fake wheel layout: two generator files, a task list, and a utils module the generators import.
  root = tmp_path / "reasoning_gym"
  gsm = root / "arithmetic" / "gsm_symbolic"
  gsm.mkdir(parents=True)
  (root / "utils.py").write_text("def format_number(x):\n  return str(x)\n")
  (gsm / "gsm_symbolic.py").write_text("tasks_ok = [\n  0,\n  51,\n]\ntasks_need_fix = [1]\n")
  gen = ("from reasoning_gym.utils import format_number\n"
         "def generate_{i}(rng, difficulty=1.0):\n"
         "  return {{'question': 'T{i} ' + format_number(rng.randint(0, 10**6))}}\n")
  (gsm / "generators_00_49.py").write_text(gen.format(i=0))
  (gsm / "generators_50_99.py").write_text(gen.format(i=51))
  got = B.load_gsm_symbolic(gsm, size=6, seed=7)
  tasks = random.Random(7).choices([0, 51], k=6)
  expected = [f"T{t} {random.Random(7 + i).randint(0, 10**6)}{B.GSM_SUFFIX}" for i, t in enumerate(tasks)]
  assert [g.turns[0] for g in got] == expected
  assert [g.id for g in got] == [f"gsm_symbolic/7/{i}" for i in range(6)]
  import sys
  assert "reasoning_gym" not in sys.modules   # the shim is removed again


def test_unknown_benchmark():
  with pytest.raises(ValueError, match="benchmark 'mmlu' is unknown"):
    B.load_benchmark("mmlu")


def test_gsm_symbolic_equals_reasoning_gym_dataset():
  """The packaged generators through lkjax's loader == reasoning-gym's own GSMSymbolicDataset class.

  reasoning-gym's dataset module is imported from the fetched wheel files with only its `factory` base
  class stubbed (the stub just stores seed and size, as ProceduralDataset does), so its own task list,
  sampling and question suffix are the oracle.
  """
  import importlib
  import sys
  import types

  from lkjax import assets

  gsm_dir = assets.fetch("gsm_symbolic")
  root = gsm_dir.parent.parent                       # .../reasoning_gym
  saved = {k: v for k, v in sys.modules.items() if k == "reasoning_gym" or k.startswith("reasoning_gym.")}
  try:
    for name, path in (("reasoning_gym", root), ("reasoning_gym.arithmetic", root / "arithmetic")):
      pkg = types.ModuleType(name)
      pkg.__path__ = [str(path)]
      sys.modules[name] = pkg
    factory = types.ModuleType("reasoning_gym.factory")

    class ProceduralDataset:
      def __init__(self, config, seed, size):
        self.config, self.seed, self.size = config, seed, size

    factory.ProceduralDataset = ProceduralDataset
    factory.register_dataset = lambda *a, **k: None
    sys.modules["reasoning_gym.factory"] = factory
    mod = importlib.import_module("reasoning_gym.arithmetic.gsm_symbolic.gsm_symbolic")
    ds = mod.GSMSymbolicDataset(mod.GSMSymbolicDatasetConfig(seed=B.GSM_SEED, size=12))
    expected = [ds[i]["question"] for i in range(12)]
  finally:
    for k in [k for k in sys.modules if k == "reasoning_gym" or k.startswith("reasoning_gym.")]:
      del sys.modules[k]
    sys.modules.update(saved)
  got = B.load_gsm_symbolic(gsm_dir, size=12, seed=B.GSM_SEED)
  assert [g.turns[0] for g in got] == expected
