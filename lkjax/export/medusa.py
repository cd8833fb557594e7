"""Export MEDUSA heads to the vLLM ``MedusaModel`` Hugging Face directory (docs/design.md#export-formats; vLLM <= 0.32).

Layout written (float32, PyTorch ``[out, in]``):
  config.json        architectures ["MedusaModel"], model_type "medusa", hidden_size (= target Ht),
                     vocab_size (target V), num_heads K, num_hidden_layers L, medusa_fc_bias,
                     truncated_vocab_size (= Vd, only when the draft vocabulary is truncated)
  model.safetensors  blocks.{k}.layers.{l}.weight [Ht, Ht], blocks.{k}.layers.{l}.bias [Ht] (fc_bias),
                     lm_heads.{k}.weight [V, Ht], and when truncated token_map bool [V] (the draft
                     vocabulary's membership mask, t2d)

A truncated draft vocabulary, in the one layout vLLM 0.32 loads.  vLLM 0.32's ``Medusa`` builds every
head with V rows and its weight loader requires V rows; with an integer ``token_map`` of length Vd it
first gathers ``head[token_map]`` (Vd rows) and then fails that check.  So the head is written with V
rows, the Vd draft rows FIRST in draft order and zeros after, and ``token_map`` is the boolean mask of
the draft ids: the loader then leaves the head alone (the mask is not shorter than the head), the logits
processor keeps the first ``truncated_vocab_size`` = Vd logits, and vLLM scatters them into a V-wide row
of -inf at ``token_map`` -- a boolean mask selects its True positions in ascending order, which is the
draft vocabulary's order (target id = draft_vocab[i]).  That is lkjax's convention that q is zero
outside the draft vocabulary; `tests/test_vllm_serving.py` checks it in real vLLM.  (An int64
``token_map`` with a Vd-row head, the layout vLLM's docstring describes, loads only in older releases;
`load_medusa` still reads it.)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from lkjax.export.hf_dir import CONFIG_FILE, read_hf_directory, require_tensor, write_hf_directory
from lkjax.models.medusa import Medusa
from lkjax.targets.info import TargetInfo


def export_medusa(model: Medusa, out_dir: str | os.PathLike, target: TargetInfo, *,
                  overwrite: bool = False) -> Path:
  """Write ``model`` as a vLLM MedusaModel directory; returns its path.

  Raises ValueError for a model of another architecture or one built for a different target.
  """
  if not isinstance(model, Medusa):
    raise ValueError(f"export_medusa: model is a {type(model).__name__}, not a MEDUSA draft "
                     f"(use the exporter of its architecture)")
  if (model.hidden_size, model.vocab_size) != (target.hidden_size, target.vocab_size):
    raise ValueError(f"export_medusa: model (hidden {model.hidden_size}, vocab {model.vocab_size}) does not match "
                     f"target {target.name} (hidden {target.hidden_size}, vocab {target.vocab_size})")
  w = np.asarray(model.w[...], np.float32)                         # [K, L, in, out]
  b = None if model.b is None else np.asarray(model.b[...], np.float32)
  head = np.asarray(model.lm_head[...], np.float32)                # [K, Ht, Vd]
  tensors: dict[str, np.ndarray] = {}
  for k in range(model.num_heads):
    for l in range(model.num_layers):
      tensors[f"blocks.{k}.layers.{l}.weight"] = w[k, l].T
      if b is not None:
        tensors[f"blocks.{k}.layers.{l}.bias"] = b[k, l]
    tensors[f"lm_heads.{k}.weight"] = head[k].T
  if model.draft_vocab is not None:
    ids = np.asarray(model.draft_vocab[...], np.int64)
    for k in range(model.num_heads):
      full = np.zeros((model.vocab_size, model.hidden_size), np.float32)
      full[:ids.size] = tensors[f"lm_heads.{k}.weight"]
      tensors[f"lm_heads.{k}.weight"] = full
    mask = np.zeros(model.vocab_size, np.bool_)
    mask[ids] = True
    tensors["token_map"] = mask
  config = {
      "architectures": ["MedusaModel"], "model_type": "medusa", "hidden_size": model.hidden_size,
      "vocab_size": model.vocab_size, "num_heads": model.num_heads, "num_hidden_layers": model.num_layers,
      "medusa_fc_bias": model.fc_bias, "torch_dtype": "float32",
      "lkjax": {"arch": "medusa", "target": target.to_dict()},
  }
  if model.draft_vocab is not None:
    config["truncated_vocab_size"] = model.draft_vocab_size
  return write_hf_directory(out_dir, config, tensors, overwrite=overwrite)


def load_medusa(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Read and validate a MedusaModel directory -> ``(config, tensors)`` (numpy, PyTorch layout).

  Both truncated layouts are read (module docstring) and returned in the compact one: ``lm_heads.{k}.weight``
  ``[Vd, Ht]`` and ``token_map`` int64 ``[Vd]`` (ascending target ids).
  """
  config, tensors = read_hf_directory(path, model_type="medusa")
  src = str(Path(path))
  for key in ("hidden_size", "vocab_size", "num_heads", "num_hidden_layers"):
    if key not in config:
      raise ValueError(f"{src}/{CONFIG_FILE}: missing {key!r}")
  H, V = int(config["hidden_size"]), int(config["vocab_size"])
  Vd = int(config.get("truncated_vocab_size") or V)
  for k in range(int(config["num_heads"])):
    for l in range(int(config["num_hidden_layers"])):
      require_tensor(tensors, f"blocks.{k}.layers.{l}.weight", (H, H), src)
      if config.get("medusa_fc_bias", False):
        require_tensor(tensors, f"blocks.{k}.layers.{l}.bias", (H,), src)
  if Vd < V:
    tm = tensors.get("token_map")
    if tm is not None and tm.dtype == np.bool_:
      require_tensor(tensors, "token_map", (V,), src)
      if int(tm.sum()) != Vd:
        raise ValueError(f"{src}: token_map marks {int(tm.sum())} ids, expected truncated_vocab_size={Vd}")
      tensors["token_map"] = np.flatnonzero(tm).astype(np.int64)
      for k in range(int(config["num_heads"])):
        name = f"lm_heads.{k}.weight"
        require_tensor(tensors, name, (V, H), src)
        tensors[name] = np.ascontiguousarray(tensors[name][:Vd])
    else:
      require_tensor(tensors, "token_map", (Vd,), src)
  for k in range(int(config["num_heads"])):
    require_tensor(tensors, f"lm_heads.{k}.weight", (Vd, H), src)
  return config, tensors
