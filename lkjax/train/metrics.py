"""Training metrics: JSONL + TensorBoard event files in the workdir.

Every record is ``{"step": s, "split": "train" | "val", <name>: value, ...}`` with per-head arrays ``[K]``
flattened to ``<name>/<k>`` (``alpha/0``, ``lambda/0``, ``kl/0``, ``tv/0`` ...) and scalars (``loss``,
``tau`` -- the offline expected acceptance length, ``tokens_per_s``, ``step_time_s``, ``lr`` ...) kept
as they are. ``metrics.jsonl`` holds one JSON object per line; TensorBoard scalars are tagged
``<split>/<name>``. Only process 0 writes.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Iterator, Mapping

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tensorboard"


def flatten(metrics: Mapping[str, Any]) -> dict[str, float]:
  """``{"alpha": [a0, a1], "loss": l}`` -> ``{"alpha/0": a0, "alpha/1": a1, "loss": l}`` (python floats)."""
  out: dict[str, float] = {}
  for name, value in metrics.items():
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
      out[name] = float(arr)
    elif arr.ndim == 1:
      for k, v in enumerate(arr):
        out[f"{name}/{k}"] = float(v)
    else:
      raise ValueError(f"metric {name!r} has shape {arr.shape}; only scalars and per-head [K] are logged")
  return out


def _jsonable(v: float) -> Any:
  return v if math.isfinite(v) else str(v)  # JSON has no NaN/inf; keep them visible as strings


class MetricWriter:
  """Appends metrics to ``<workdir>/metrics.jsonl`` and TensorBoard events in ``<workdir>/tensorboard``."""

  def __init__(self, workdir: str | os.PathLike, *, tensorboard: bool = True):
    self.workdir = os.fspath(workdir)
    self.path = os.path.join(self.workdir, METRICS_FILE)
    self.enabled = jax.process_index() == 0
    self._tb = None
    if self.enabled:
      os.makedirs(self.workdir, exist_ok=True)
      if tensorboard:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(self.workdir, TB_DIR))

  def truncate_after(self, step: int) -> None:
    """Drop records with step > ``step`` (a resumed run rewrites the steps after its checkpoint)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    keep = [r for r in read_metrics(self.workdir) if r["step"] <= step]
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      for r in keep:
        f.write(json.dumps(r) + "\n")
    os.replace(tmp, self.path)

  def write(self, step: int, metrics: Mapping[str, Any], split: str = "train") -> dict[str, float]:
    flat = flatten(metrics)
    if self.enabled:
      record = {"step": int(step), "split": split, **{k: _jsonable(v) for k, v in flat.items()}}
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")
      if self._tb is not None:
        for k, v in flat.items():
          self._tb.add_scalar(f"{split}/{k}", v, int(step))
    return flat

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_metrics(path: str | os.PathLike, split: str | None = None, *,
                 missing_ok: bool = True) -> list[dict[str, Any]]:
  """Records of a metrics JSONL file, or of ``<path>/metrics.jsonl`` when ``path`` is a workdir.

  Values are as stored (non-finite numbers stay the strings ``"nan"`` / ``"inf"``). A missing file gives
  ``[]`` (``missing_ok``) or FileNotFoundError; a bad line raises ValueError naming the file and line.
  """
  path = os.fspath(path)
  file = os.path.join(path, METRICS_FILE) if os.path.isdir(path) else path
  if not os.path.exists(file):
    if missing_ok:
      return []
    raise FileNotFoundError(f"{file}: no metrics file (expected a metrics.jsonl or a training workdir)")
  out = []
  with open(file) as f:
    for i, line in enumerate(f):
      line = line.strip()
      if not line:
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{file} line {i + 1}: not JSON ({e})") from e
      if not isinstance(rec, dict) or "step" not in rec:
        raise ValueError(f"{file} line {i + 1}: expected an object with a 'step' field")
      if split is None or rec.get("split") == split:
        out.append(rec)
  return out


def iter_heads(record: Mapping[str, Any], name: str) -> Iterator[float]:
  """The per-head values ``name/0, name/1, ...`` of a flattened record."""
  k = 0
  while f"{name}/{k}" in record:
    yield record[f"{name}/{k}"]
    k += 1
