"""Export MEDUSA heads to the vLLM ``MedusaModel`` Hugging Face directory (DESIGN §5; vLLM <= 0.32).

Layout written (float32, PyTorch ``[out, in]``):
  config.json        architectures ["MedusaModel"], model_type "medusa", hidden_size (= target Ht),
                     vocab_size (target V), num_heads K, num_hidden_layers L, medusa_fc_bias,
                     truncated_vocab_size (= Vd, only when the draft vocabulary is truncated)
  model.safetensors  blocks.{k}.layers.{l}.weight [Ht, Ht], blocks.{k}.layers.{l}.bias [Ht] (fc_bias),
                     lm_heads.{k}.weight [Vd, Ht], token_map int64 [Vd] (target ids, only when truncated)

vLLM scatters each head's Vd logits into a V-wide row filled with -inf at ``token_map``; that is exactly
lkjax's convention that q is zero outside the draft vocabulary.

This module also holds the atomic HF-directory writer/reader shared with the MLP-Speculator export.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from safetensors.numpy import load_file, save_file

from lkjax.models.medusa import Medusa
from lkjax.targets.info import TargetInfo

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def write_hf_directory(out_dir: str | os.PathLike, config: Mapping[str, Any],
                       tensors: Mapping[str, np.ndarray], *, overwrite: bool = False) -> Path:
  """Write ``config.json`` + ``model.safetensors`` into ``out_dir`` atomically.

  Files go to a temporary sibling directory that is renamed into place, so a crash never leaves a
  half-written export at ``out_dir``.  An existing ``out_dir`` is replaced only with ``overwrite=True``.
  """
  out = Path(out_dir).absolute()
  if out.exists() and not overwrite:
    raise ValueError(f"out_dir={out}: already exists (pass overwrite=True to replace it)")
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=out.parent))
  try:
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp / WEIGHTS_FILE),
              metadata={"format": "pt"})
    (tmp / CONFIG_FILE).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
    if out.exists():
      old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old", dir=out.parent))
      os.replace(out, old / "x")
      os.replace(tmp, out)
      shutil.rmtree(old)
    else:
      os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


def read_hf_directory(path: str | os.PathLike, *, model_type: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Read ``(config, tensors)`` from an HF directory, checking ``config['model_type'] == model_type``."""
  d = Path(path)
  cfg_path, w_path = d / CONFIG_FILE, d / WEIGHTS_FILE
  for p in (cfg_path, w_path):
    if not p.is_file():
      raise ValueError(f"{p}: missing (not a {model_type} export directory)")
  config = json.loads(cfg_path.read_text())
  if config.get("model_type") != model_type:
    raise ValueError(f"{cfg_path}: model_type={config.get('model_type')!r}, expected {model_type!r}")
  return config, load_file(str(w_path))


def require_tensor(tensors: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...], source: str) -> None:
  """Raise ValueError naming ``source`` unless ``tensors[name]`` exists with ``shape``."""
  if name not in tensors:
    raise ValueError(f"{source}: missing tensor {name!r}")
  if tuple(tensors[name].shape) != tuple(shape):
    raise ValueError(f"{source}: tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {shape}")


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
  config = {
      "architectures": ["MedusaModel"], "model_type": "medusa", "hidden_size": model.hidden_size,
      "vocab_size": model.vocab_size, "num_heads": model.num_heads, "num_hidden_layers": model.num_layers,
      "medusa_fc_bias": model.fc_bias, "torch_dtype": "float32",
      "lkjax": {"arch": "medusa", "target": target.to_dict()},
  }
  if model.draft_vocab is not None:
    tensors["token_map"] = np.asarray(model.draft_vocab[...], np.int64)
    config["truncated_vocab_size"] = model.draft_vocab_size
  return write_hf_directory(out_dir, config, tensors, overwrite=overwrite)


def load_medusa(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Read and validate a MedusaModel directory -> ``(config, tensors)`` (numpy, PyTorch layout)."""
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
    require_tensor(tensors, f"lm_heads.{k}.weight", (Vd, H), src)
  if Vd < V:
    require_tensor(tensors, "token_map", (Vd,), src)
  return config, tensors
