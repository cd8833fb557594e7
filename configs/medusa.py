"""MEDUSA heads on the packaged SmolLM2 target: ``python experiments/train.py --config=configs/medusa.py``.

K = 6 heads on the target's final hidden state, one residual SiLU block each (with bias), LM heads over
the 8192-token draft vocabulary initialised from the target's head; eta = 10 (the paper's MEDUSA setting).
See configs/base.py for the training recipe, the scaled default and the config arguments.
"""
from __future__ import annotations

import ml_collections

from lkjax.config_args import import_sibling

base = import_sibling(__file__, "base")


def model_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      arch="medusa", num_heads=6, draft_vocab_size=8192, dtype="",  # "": follow config.precision
      num_layers=1, fc_bias=True, init_head_from_target=True))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = base.build("medusa", model_config(), arg, default_eta=10.0)
  # Several devices: FSDP, the heads' "embed" dims split over all of them, in the per-device gradient
  # program (gather the heads once, reduce-scatter their gradients). MEDUSA has the most parameters per
  # token of the data-parallel drafts, and replicated they cost every device the whole AdamW update; on 8
  # CPU devices this layout kept 86% / 90% of one device's throughput against 76% / 78% data parallel in
  # two side-by-side runs (benchmarks/bench_mesh.py). On one device it is the same program as (-1, 1, 1).
  c.mesh.shape = (1, -1, 1)
  c.mesh.gather_split_params = True
  return c


def sweep(add) -> None:
  base.standard_sweep(add)
