"""MLP-Speculator (IBM fms-extras) on the packaged SmolLM2 target:
``python experiments/train.py --config=configs/mlp_speculator.py``.

K = 6 stages; inner_dim / emb_dim 0 = the target's hidden size (576); untied stages, no input scaling;
draft vocabulary 8192 of 49152; eta = 3. See configs/base.py for the recipe and the config arguments.
"""
from __future__ import annotations

import ml_collections

from lkjax.config_args import import_sibling

base = import_sibling(__file__, "base")


def model_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      arch="mlp_speculator", num_heads=6, draft_vocab_size=8192, dtype="",  # "": follow config.precision
      inner_dim=0, emb_dim=0, tie_weights=False, scale_input=False))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = base.build("mlp_speculator", model_config(), arg, default_eta=3.0)
  # Several devices: FSDP (200 M trainable parameters, 170 M of them the six [49152, 576] embedding tables;
  # replicated with their Adam moments on 8 devices they would take 19 GB). The per-device gradient
  # program gathers the heads and projections once and keeps the tables split: each device looks up its
  # columns for every device's tokens (`mesh.split_tables`). On 8 CPU devices: 84% of one device's
  # throughput against 73% with the partitioner's FSDP, side by side (benchmarks/bench_mesh.py; latest
  # table in benchmarks/README.md). On one device it is the same program as (-1, 1, 1).
  c.mesh.shape = (1, -1, 1)
  c.mesh.gather_split_params = True
  c.mesh.split_tables = ("emb",)
  return c


def sweep(add) -> None:
  base.standard_sweep(add)
