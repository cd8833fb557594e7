"""EAGLE-3 draft on the packaged SmolLM2 target: ``python experiments/train.py --config=configs/eagle3.py``.

One Llama decoder layer over concat(embed, fc(aux states)), K = 7 training-time-test steps, eta = 3.
Target-derived sizes are 0 = "inherit from the target" (hidden 576, 9 heads / 3 kv heads, head_dim 64,
intermediate 1536 for SmolLM2), so this file loads without the target. Draft vocabulary 8192 of 49152.
See configs/base.py for the training recipe, the scaled default and the config arguments.
"""
from __future__ import annotations

import ml_collections

from lkjax.config_args import import_sibling

base = import_sibling(__file__, "base")


def model_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      arch="eagle3", num_heads=7, draft_vocab_size=8192, dtype="",  # "": follow config.precision
      hidden_size=0, num_attention_heads=0, num_key_value_heads=0, head_dim=0, intermediate_size=0,
      num_layers=1, rms_norm_eps=0.0, rope_theta=0.0, init_lm_head_from_target=False))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return base.build("eagle3", model_config(), arg, default_eta=3.0)


def sweep(add) -> None:
  base.standard_sweep(add)
