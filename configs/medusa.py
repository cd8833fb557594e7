"""MEDUSA heads on the packaged SmolLM2 target: ``python experiments/train.py --config=configs/medusa.py``.

K = 6 heads on the target's final hidden state, one residual SiLU block each (with bias), LM heads over
the 8192-token draft vocabulary initialised from the target's head; eta = 10 (the paper's MEDUSA setting).
See configs/base.py for the training recipe, the scaled default and the config arguments.
"""
from __future__ import annotations

import ml_collections

from lkjax.config_args import import_sibling
from lkjax.models import registry

base = import_sibling(__file__, "base")


def model_config() -> ml_collections.ConfigDict:
  return registry.model_config("medusa")   # the defaults live in lkjax/models/registry.py


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return base.build("medusa", model_config(), arg)


def sweep(add, grid: str = "standard") -> None:
  base.sweep("medusa", add, grid)
