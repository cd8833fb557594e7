"""Run ``experiments/bench_train.py`` with one named config change (session 11's layout probes).

    PATCH=vocab_rules  python docs/bench_train_runs/config_patch.py --archs=medusa --mesh=1,1,8 ...
    PATCH=draft_vocab:1024 python docs/bench_train_runs/config_patch.py --archs=medusa --mesh=1,1,1 ...

(with the project's environment). Every argument goes to bench_train.py unchanged, followed by the
patch as its ``--config_overrides``:

* ``vocab_rules``: the config's logical-axis rules become "batch over every mesh axis, the vocabulary
  over ``tensor``, everything else replicated". On a ``1,1,8`` mesh (``--explicit_grad_reduce=false``:
  the partitioner places the collectives) MEDUSA's LM heads are then split over the draft vocabulary,
  the partitioner's version of a vocabulary-parallel head.
* ``draft_vocab:N``: the draft vocabulary has N columns instead of the config's: one device's share of
  the heads' work when N columns are split over several devices (full-size runs; ``--small`` fixes 512).
"""
from __future__ import annotations

import json
import os
import sys

VOCAB_RULES = (("batch", ("data", "fsdp", "tensor")), ("vocab", "tensor"), ("embed", None), ("hidden", None),
               ("mlp", None), ("heads", None), ("kv", None), ("head_dim", None))


def overrides(spec: str) -> dict:
  """The dotted config overrides (bench_train.py ``--config_overrides``) that ``spec`` names."""
  name, _, value = spec.partition(":")
  if spec == "vocab_rules":
    return {"mesh.rules": VOCAB_RULES}
  if name == "draft_vocab" and value.isdigit():
    return {"model.draft_vocab_size": int(value)}
  raise SystemExit(f"PATCH={spec!r}: expected vocab_rules or draft_vocab:N")


def main():
  extra = overrides(os.environ.get("PATCH", ""))
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "experiments", "bench_train.py")
  os.execv(sys.executable, [sys.executable, script, *sys.argv[1:], f"--config_overrides={json.dumps(extra)}"])


if __name__ == "__main__":
  main()
