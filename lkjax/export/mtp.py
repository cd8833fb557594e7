"""Export a DeepSeek-V3-style MTP draft with DeepSeek's tensor naming (docs/design.md#export-formats).

Layout written (float32, PyTorch ``[out, in]``; N = the target's number of layers, M = the number of
MTP modules = 1 with ``share_weights`` else K; module m is ``model.layers.{N+m}``):

  config.json        architectures ["LkjaxMTP"], model_type (the target's), the target's layer shape
                     (hidden_size, intermediate_size, num_attention_heads, num_key_value_heads, head_dim,
                     rms_norm_eps, rope_theta + rope_parameters, hidden_act, max_position_embeddings),
                     num_hidden_layers N, num_nextn_predict_layers M, vocab_size V, draft_vocab_size Vd,
                     and an ``lkjax`` block (K depths, share_weights, the target info)
  model.safetensors  model.layers.{N+m}.enorm.weight [H], .hnorm.weight [H], .eh_proj.weight [H, 2H],
                     .shared_head.norm.weight [H], .shared_head.head.weight [Vd, H] (or [V, H], see
                     ``full_lm_head``), .self_attn.{q,k,v,o}_proj.weight, .mlp.{gate,up,down}_proj.weight,
                     .input_layernorm.weight, .post_attention_layernorm.weight;
                     model.layers.{N}.embed_tokens.weight [V, H] once (DeepSeek shares one embedding;
                     vLLM loads only the first MTP layer's); d2t int64 [Vd] and t2d bool [V] as for EAGLE-3.

Who can serve it.  In vLLM and SGLang an MTP draft is not a stand-alone model: the MTP layers live in
the TARGET's checkpoint and are served by an MTP class written for that target architecture
(vLLM ``DeepSeekMTP`` for DeepSeek-V3/R1, and the MTP classes of Qwen3-Next, MiMo, GLM-4.5, ...), with
``speculative_config={"method": "mtp", "num_speculative_tokens": k}`` (older vLLM: "deepseek_mtp").
To use these tensors there, merge them into such a target's checkpoint (they already carry its layer
numbering N+m) with ``num_nextn_predict_layers`` set in its config; the decoder block must then be of
that architecture.  lkjax's MTP block is a Llama layer, so for a Llama target such as the default
SmolLM2 there is NO serving path in vLLM or SGLang today: evaluate it with lkjax
(``experiments/evaluate.py``), which drafts exactly as it was trained.  Two further differences from
vLLM's DeepSeek MTP proposer if someone ports the block: vLLM recycles the PRE-norm output of a module
(lkjax: the post-``shared_head.norm`` state, docs/design.md#architectures) and zeroes the embedding at position 0; with
M = 1 it chains one module along positions rather than per depth (see `lkjax.models.mtp`).

Norm weights are multipliers (``x / rms(x) * w``, DeepSeek's RMSNorm), also for a target whose own norms
multiply by ``1 + w`` (Gemma): ``shared_head.norm`` starts from that target's ``1 + w``.

``shared_head.head`` is the target's LM head, frozen in lkjax, which keeps only its draft-vocabulary
rows; with a truncated vocabulary pass ``full_lm_head`` (the target's ``[V, H]`` head) to write the
full head a DeepSeek-style loader expects, otherwise the ``[Vd, H]`` rows are written with ``d2t``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from lkjax.export.eagle3 import (LAYER_NORMS, LINEARS, assign, draft_vocab_maps, layer_tensors, read_config,
                                 rope_theta_of, set_layer)
from lkjax.export.hf_dir import WEIGHTS_FILE, require_tensor, write_hf_directory
from lkjax.models import layers as L
from lkjax.models.mtp import MTP
from lkjax.targets.info import TargetInfo

ARCHITECTURE = "LkjaxMTP"
_MODULE_NORMS = ("enorm", "hnorm", "shared_head_norm")


def _names(module_prefix: str) -> dict[str, str]:
  """lkjax `MTPModule` attribute -> DeepSeek tensor name (non-block tensors)."""
  return {"enorm": f"{module_prefix}enorm.weight", "hnorm": f"{module_prefix}hnorm.weight",
          "shared_head_norm": f"{module_prefix}shared_head.norm.weight",
          "eh_proj": f"{module_prefix}eh_proj.weight"}


def export_mtp(model: MTP, out_dir: str | os.PathLike, target: TargetInfo, *,
               full_lm_head: np.ndarray | None = None, overwrite: bool = False) -> Path:
  """Write ``model`` with DeepSeek MTP naming (atomically); returns the directory.

  Args:
    model: a trained `MTP`.
    out_dir: directory to create (replaced only with ``overwrite=True``).
    target: the `TargetInfo` it was trained on (N = ``target.num_layers`` numbers the layers).
    full_lm_head: optional ``[V, H]`` target LM head, written as ``shared_head.head`` instead of the
      draft-vocabulary rows; it must agree with the model's rows.
  Raises:
    ValueError: another architecture, a different target, or a ``full_lm_head`` that disagrees.
  """
  if not isinstance(model, MTP):
    raise ValueError(f"export_mtp: model is a {type(model).__name__}, not an MTP draft "
                     f"(use the exporter of its architecture)")
  if (model.hidden_size, model.vocab_size) != (target.hidden_size, target.vocab_size):
    raise ValueError(f"export_mtp: model (hidden {model.hidden_size}, vocab {model.vocab_size}) does not match "
                     f"target {target.name} (hidden {target.hidden_size}, vocab {target.vocab_size})")
  N, V, H = target.num_layers, model.vocab_size, model.hidden_size
  d2t, t2d = draft_vocab_maps(model.draft_vocab, V)
  head = np.asarray(model.lm_head[...], np.float32)                  # [Vd, H]
  if full_lm_head is not None:
    full = np.asarray(full_lm_head, np.float32)
    if full.shape != (V, H):
      raise ValueError(f"full_lm_head: expected shape ({V}, {H}), got {full.shape}")
    if not np.array_equal(full[np.arange(d2t.size) + d2t], head):
      raise ValueError("full_lm_head: its draft-vocabulary rows differ from the model's shared head "
                       "(not the head this draft was trained with)")
    head = full
  tensors: dict[str, np.ndarray] = {"d2t": d2t, "t2d": t2d,
                                    f"model.layers.{N}.embed_tokens.weight": np.asarray(model.embed_tokens[...],
                                                                                      np.float32)}
  for m, module in enumerate(model.mtp):
    p = f"model.layers.{N + m}."
    names = _names(p)
    for attr in _MODULE_NORMS:
      tensors[names[attr]] = np.asarray(getattr(module, attr).weight[...], np.float32)
    tensors[names["eh_proj"]] = np.asarray(module.eh_proj.kernel[...], np.float32).T
    tensors[f"{p}shared_head.head.weight"] = head
    tensors.update(layer_tensors(module.block, p))
  attn = model.mtp[0].block.self_attn
  theta = float(attn.rope_theta)
  config: dict[str, Any] = {
      "architectures": [ARCHITECTURE], "model_type": target.model_type,
      "hidden_size": H, "intermediate_size": int(model.mtp[0].block.mlp.gate_proj.kernel.shape[1]),
      "num_attention_heads": attn.num_heads, "num_key_value_heads": attn.num_kv_heads, "head_dim": attn.head_dim,
      "rms_norm_eps": float(model.mtp[0].enorm.eps), "hidden_act": "silu",
      "rope_theta": theta, "rope_parameters": {"rope_type": "default", "rope_theta": theta},
      "max_position_embeddings": int(target.max_position_embeddings),
      "num_hidden_layers": N, "num_nextn_predict_layers": len(model.mtp),
      "vocab_size": V, "draft_vocab_size": model.draft_vocab_size, "tie_word_embeddings": False,
      "torch_dtype": "float32",
      "lkjax": {"arch": "mtp", "num_heads": model.num_heads, "share_weights": model.share_weights,
                "full_lm_head": full_lm_head is not None, "target": target.to_dict()},
  }
  return write_hf_directory(out_dir, config, tensors, overwrite=overwrite)


def load_mtp(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Read and validate an `export_mtp` directory -> ``(config, tensors)`` (numpy, PyTorch layout)."""
  d, config = read_config(path)
  src = str(d)
  if (config.get("lkjax") or {}).get("arch") != "mtp" or "num_nextn_predict_layers" not in config:
    raise ValueError(f"{src}/config.json: architectures={config.get('architectures')}, model_type="
                     f"{config.get('model_type')!r} is not an lkjax MTP export")
  if not (d / WEIGHTS_FILE).is_file():
    raise ValueError(f"{d / WEIGHTS_FILE}: missing")
  from safetensors.numpy import load_file
  tensors = dict(load_file(str(d / WEIGHTS_FILE)))
  for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size"):
    if key not in config:
      raise ValueError(f"{src}/config.json: missing {key!r}")
  N, H, V = int(config["num_hidden_layers"]), int(config["hidden_size"]), int(config["vocab_size"])
  Vd = int(config.get("draft_vocab_size") or V)
  rows = V if config["lkjax"].get("full_lm_head") else Vd
  require_tensor(tensors, "d2t", (Vd,), src)
  require_tensor(tensors, f"model.layers.{N}.embed_tokens.weight", (V, H), src)
  for m in range(int(config["num_nextn_predict_layers"])):
    p = f"model.layers.{N + m}."
    for name in ("enorm", "hnorm", "shared_head.norm"):
      require_tensor(tensors, f"{p}{name}.weight", (H,), src)
    require_tensor(tensors, f"{p}eh_proj.weight", (H, 2 * H), src)
    require_tensor(tensors, f"{p}shared_head.head.weight", (rows, H), src)
    for name in LINEARS + LAYER_NORMS:
      if f"{p}{name}.weight" not in tensors:
        raise ValueError(f"{src}: missing tensor '{p}{name}.weight'")
  return config, tensors


def import_mtp(path: str | os.PathLike, target: TargetInfo | None = None, *,
               dtype: str = "float32") -> tuple[MTP, TargetInfo]:
  """Rebuild the lkjax `MTP` of an `export_mtp` directory -> ``(model, target_info)`` (exact).

  Raises ValueError when the directory is not an lkjax MTP export, a tensor is missing or has the wrong
  shape, or ``target`` disagrees with the recorded target (hidden size, vocabulary, depth).
  """
  config, tensors = load_mtp(path)
  src = str(Path(path))
  info = target if target is not None else TargetInfo.from_dict(config["lkjax"]["target"], source=src)
  N, H, V = int(config["num_hidden_layers"]), int(config["hidden_size"]), int(config["vocab_size"])
  if (N, H, V) != (info.num_layers, info.hidden_size, info.vocab_size):
    raise ValueError(f"{src}: layers/hidden/vocab ({N}, {H}, {V}) do not match target {info.name} "
                     f"({info.num_layers}, {info.hidden_size}, {info.vocab_size})")
  Vd = int(config.get("draft_vocab_size") or V)
  ids = np.arange(Vd, dtype=np.int64) + np.asarray(tensors["d2t"], np.int64)
  draft_vocab = L.check_draft_vocab(ids, V, Vd) if Vd < V else None
  head = np.asarray(tensors[f"model.layers.{N}.shared_head.head.weight"], np.float32)
  full_head = head if head.shape[0] == V else np.zeros((V, H), np.float32)
  if head.shape[0] != V:
    full_head[ids] = head          # only the draft rows exist; MTP keeps exactly those
  heads = int(config["num_attention_heads"])
  lk = config["lkjax"]
  model = MTP(hidden_size=H, vocab_size=V, num_attention_heads=heads,
              num_key_value_heads=int(config.get("num_key_value_heads") or heads),
              head_dim=int(config.get("head_dim") or H // heads), intermediate_size=int(config["intermediate_size"]),
              rms_norm_eps=float(config["rms_norm_eps"]), rope_theta=rope_theta_of(config, src),
              num_heads=int(lk["num_heads"]), share_weights=bool(lk["share_weights"]), draft_vocab=draft_vocab,
              target_weights={"embed_tokens": np.asarray(tensors[f"model.layers.{N}.embed_tokens.weight"], np.float32),
                              "lm_head": full_head, "norm": np.ones(H, np.float32)},
              dtype=L.parse_dtype(dtype), rngs=nnx.Rngs(0))
  if len(model.mtp) != int(config["num_nextn_predict_layers"]):
    raise ValueError(f"{src}: num_nextn_predict_layers={config['num_nextn_predict_layers']} but lkjax.share_weights="
                     f"{lk['share_weights']} with K={lk['num_heads']} needs {len(model.mtp)}")
  for m, module in enumerate(model.mtp):
    p = f"model.layers.{N + m}."
    names = _names(p)
    for attr in _MODULE_NORMS:
      assign(getattr(module, attr).weight, tensors, names[attr], src)
    assign(module.eh_proj.kernel, tensors, names["eh_proj"], src, transpose=True)
    set_layer(module.block, tensors, p, src)
  return model, info
