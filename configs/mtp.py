"""DeepSeek-V3-style MTP on the packaged SmolLM2 target: ``python experiments/train.py --config=configs/mtp.py``.

K = 7 depths of enorm/hnorm + eh_proj + one target-shaped decoder block, the target's LM head shared
(restricted to the 8192-token draft vocabulary); one set of depth weights shared by all depths
(``share_weights``); eta = 3. See configs/base.py for the recipe and the config arguments.
"""
from __future__ import annotations

import ml_collections

from lkjax.config_args import import_sibling
from lkjax.models import registry

base = import_sibling(__file__, "base")


def model_config() -> ml_collections.ConfigDict:
  return registry.model_config("mtp")   # the defaults live in lkjax/models/registry.py


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return base.build("mtp", model_config(), arg)


def sweep(add, grid: str = "standard") -> None:
  base.sweep("mtp", add, grid)
