"""MLP-Speculator (IBM fms-extras) on the packaged SmolLM2 target:
``python experiments/train.py --config=configs/mlp_speculator.py``.

K = 6 stages; inner_dim / emb_dim 0 = the target's hidden size (576); untied stages, no input scaling;
draft vocabulary 8192 of 49152; eta = 3. See configs/base.py for the recipe and the config arguments.
"""
from __future__ import annotations

import ml_collections

from lkjax.config_args import import_sibling
from lkjax.models import registry

base = import_sibling(__file__, "base")


def model_config() -> ml_collections.ConfigDict:
  return registry.model_config("mlp_speculator")   # the defaults live in lkjax/models/registry.py


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = base.build("mlp_speculator", model_config(), arg)
  # Several devices: FSDP. 200 M trainable parameters, 170 M of them the six [49152, 576] embedding tables;
  # replicated with their Adam moments on 8 devices they would take 19 GB.
  c.mesh.shape = (1, -1, 1)
  return c


def sweep(add, grid: str = "standard") -> None:
  base.sweep("mlp_speculator", add, grid)
