"""Export an MLP-Speculator to the fms-extras ``MLPSpeculatorPreTrainedModel`` directory (docs/design.md#export-formats).

vLLM's ``mlp_speculator`` and IBM fms-extras load it.  Layout written (float32, PyTorch ``[out, in]``):
  config.json        architectures ["MLPSpeculatorPreTrainedModel"], model_type "mlp_speculator",
                     emb_dim (= target Ht), inner_dim, n_predict K, vocab_size V, tie_weights, scale_input,
                     top_k_tokens_per_head ([1] * K: chain drafting) and n_candidates (1)
  model.safetensors  emb.{i}.weight [V, inner], proj.{i}.weight [inner, emb_dim (i=0) | inner],
                     head.{i}.weight [V, inner], ln.{i}.weight [inner], ln.{i}.bias [inner]
                     for every stage i (tied weights are written once per stage: every loader finds
                     the names it looks for, and vLLM loads the tied copies into one parameter).

vLLM strips a leading ``speculator.`` from names; fms-extras' HF class stores its weights under that
prefix, so pass ``prefix="speculator."`` to target fms-extras' own ``from_pretrained``.

The format has one ``vocab_size`` for embeddings and heads and no token map, so only drafts with the full
target vocabulary (Vd = V) can be exported; a truncated draft raises ValueError.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from lkjax.export.hf_dir import CONFIG_FILE, require_tensor, read_hf_directory, write_hf_directory
from lkjax.models.mlp_speculator import MLPSpeculator
from lkjax.targets.info import TargetInfo


def export_mlp_speculator(model: MLPSpeculator, out_dir: str | os.PathLike, target: TargetInfo, *,
                          prefix: str = "", overwrite: bool = False) -> Path:
  """Write ``model`` as an fms-extras / vLLM MLP-Speculator directory; returns its path."""
  if not isinstance(model, MLPSpeculator):
    raise ValueError(f"export_mlp_speculator: model is a {type(model).__name__}, not an MLP-Speculator draft "
                     f"(use the exporter of its architecture)")
  if (model.emb_dim, model.vocab_size) != (target.hidden_size, target.vocab_size):
    raise ValueError(f"export_mlp_speculator: model (emb_dim {model.emb_dim}, vocab {model.vocab_size}) does not "
                     f"match target {target.name} (hidden {target.hidden_size}, vocab {target.vocab_size})")
  if model.draft_vocab is not None:
    raise ValueError(f"export_mlp_speculator: the draft vocabulary is truncated (Vd={model.draft_vocab_size} < "
                     f"V={model.vocab_size}); the mlp_speculator format has no token map -- train with "
                     f"draft_vocab_size=0")
  K = model.num_heads
  emb = np.asarray(model.emb[...], np.float32)           # [E, V, D]
  head = np.asarray(model.head[...], np.float32)         # [E, D, V]
  ln_w = np.asarray(model.ln_w[...], np.float32)
  ln_b = np.asarray(model.ln_b[...], np.float32)
  proj0 = np.asarray(model.proj0[...], np.float32)       # [emb_dim, D]
  proj = None if model.proj is None else np.asarray(model.proj[...], np.float32)   # [P, D, D]
  tensors: dict[str, np.ndarray] = {}
  for i in range(K):
    e = 0 if model.tie_weights else i
    tensors[f"{prefix}emb.{i}.weight"] = emb[e]
    tensors[f"{prefix}proj.{i}.weight"] = (proj0 if i == 0 else proj[0 if model.tie_weights else i - 1]).T
    tensors[f"{prefix}head.{i}.weight"] = head[e].T
    tensors[f"{prefix}ln.{i}.weight"] = ln_w[e]
    tensors[f"{prefix}ln.{i}.bias"] = ln_b[e]
  config = {
      "architectures": ["MLPSpeculatorPreTrainedModel"], "model_type": "mlp_speculator",
      "emb_dim": model.emb_dim, "inner_dim": model.inner_dim, "n_predict": K, "vocab_size": model.vocab_size,
      "top_k_tokens_per_head": [1] * K, "n_candidates": 1, "tie_weights": model.tie_weights,
      "scale_input": model.scale_input, "torch_dtype": "float32",
      "lkjax": {"arch": "mlp_speculator", "target": target.to_dict()},
  }
  return write_hf_directory(out_dir, config, tensors, overwrite=overwrite)


def load_mlp_speculator(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Read and validate an MLP-Speculator directory -> ``(config, tensors)``; a ``speculator.`` prefix is dropped."""
  config, raw = read_hf_directory(path, model_type="mlp_speculator")
  src = str(Path(path))
  for key in ("emb_dim", "n_predict", "vocab_size"):
    if key not in config:
      raise ValueError(f"{src}/{CONFIG_FILE}: missing {key!r}")
  tensors = {k.removeprefix("speculator."): v for k, v in raw.items()}
  H, V, K = int(config["emb_dim"]), int(config["vocab_size"]), int(config["n_predict"])
  D = int(config.get("inner_dim") or H)
  for i in range(K):
    require_tensor(tensors, f"emb.{i}.weight", (V, D), src)
    require_tensor(tensors, f"proj.{i}.weight", (D, H if i == 0 else D), src)
    require_tensor(tensors, f"head.{i}.weight", (V, D), src)
    require_tensor(tensors, f"ln.{i}.weight", (D,), src)
    require_tensor(tensors, f"ln.{i}.bias", (D,), src)
  return config, tensors
