"""EAGLE-3 draft on the packaged SmolLM2 target: ``python experiments/train.py --config=configs/eagle3.py``.

One Llama decoder layer over concat(embed, fc(aux states)), K = 7 training-time-test steps, eta = 3.
Target-derived sizes are 0 = "inherit from the target" (hidden 576, 9 heads / 3 kv heads, head_dim 64,
intermediate 1536 for SmolLM2), so this file loads without the target. Draft vocabulary 8192 of 49152.
See configs/base.py for the training recipe, the scaled default and the config arguments.
"""
from __future__ import annotations

import ml_collections

from lkjax.config_args import import_sibling
from lkjax.models import registry

base = import_sibling(__file__, "base")


def model_config() -> ml_collections.ConfigDict:
  return registry.model_config("eagle3")   # the defaults live in lkjax/models/registry.py


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return base.build("eagle3", model_config(), arg)


def sweep(add, grid: str = "standard") -> None:
  base.sweep("eagle3", add, grid)
