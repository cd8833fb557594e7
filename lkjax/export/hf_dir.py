"""Hugging Face export directories (``config.json`` + ``model.safetensors``): atomic write, checked read."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from safetensors.numpy import load_file, save_file

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
