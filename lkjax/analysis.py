"""Helpers shared by the notebooks: reading training metrics and evaluation files, fitting slopes.

Pure functions (numpy + stdlib); nothing here computes a loss -- the notebooks call `lkjax.losses`.

  * `load_metrics(path)`: records of a training run's ``metrics.jsonl`` (the format of
    `lkjax.train.metrics`: one JSON object per line, ``{"step", "split", "alpha/0", "lambda/0", ...}``);
    ``path`` is the JSONL file itself or the run's workdir.
  * `head_traces(records, name)`: per-head series ``name/0 .. name/K-1`` as ``(steps [n], values [n, K])``.
  * `expand_paths(pattern)`: comma-separated paths / globs -> sorted existing files.
  * `loglog_slope(x, y)`: least-squares slope of ``log y`` against ``log x``.
"""
from __future__ import annotations

import glob
import math
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from lkjax.train.metrics import METRICS_FILE, read_metrics


def _float(v: Any) -> Any:
  # The metric writer stores NaN / inf as strings ("nan", "inf"): turn them back into floats.
  if isinstance(v, str) and v.lower() in ("nan", "inf", "-inf", "+inf"):
    return float(v)
  return v


def metrics_path(path: str | os.PathLike) -> str:
  """``path`` if it is a file, else ``<path>/metrics.jsonl`` (a training workdir)."""
  path = os.fspath(path)
  return os.path.join(path, METRICS_FILE) if os.path.isdir(path) else path


def load_metrics(path: str | os.PathLike, split: str | None = None) -> list[dict[str, Any]]:
  """All records of a metrics JSONL file (or of ``<workdir>/metrics.jsonl``), optionally one split.

  Raises FileNotFoundError when the file is missing and ValueError (naming the line) on a bad line.
  """
  return [{k: _float(v) for k, v in rec.items()} for rec in read_metrics(path, split, missing_ok=False)]


def num_heads(records: Iterable[Mapping[str, Any]], name: str = "alpha") -> int:
  """The largest K such that ``name/0 .. name/K-1`` appear in some record."""
  k = 0
  for r in records:
    while f"{name}/{k}" in r:
      k += 1
  return k


def head_traces(records: Sequence[Mapping[str, Any]], name: str) -> tuple[np.ndarray, np.ndarray]:
  """Per-head series of ``name``: ``(steps [n], values [n, K])`` over the records that carry ``name/0``.

  Missing heads of a record are NaN. Records are sorted by step; a repeated step (a resumed run) keeps
  the last record written.
  """
  k = num_heads(records, name)
  by_step: dict[int, Mapping[str, Any]] = {}
  for r in records:
    if f"{name}/0" in r:
      by_step[int(r["step"])] = r
  steps = np.array(sorted(by_step), dtype=np.int64)
  values = np.full((len(steps), k), np.nan)
  for i, s in enumerate(steps):
    for j in range(k):
      v = by_step[int(s)].get(f"{name}/{j}")
      if v is not None:
        values[i, j] = float(v)
  return steps, values


def scalar_trace(records: Sequence[Mapping[str, Any]], name: str) -> tuple[np.ndarray, np.ndarray]:
  """``(steps [n], values [n])`` of a scalar metric (``loss``, ``tau`` ...), sorted by step."""
  pts = {int(r["step"]): float(r[name]) for r in records if name in r}
  steps = np.array(sorted(pts), dtype=np.int64)
  return steps, np.array([pts[int(s)] for s in steps], dtype=np.float64)


def expand_paths(pattern: str) -> list[str]:
  """Comma-separated paths and globs -> the sorted, de-duplicated list of existing files."""
  files: set[str] = set()
  for part in str(pattern).split(","):
    part = os.path.expanduser(part.strip())
    if not part:
      continue
    hits = glob.glob(part, recursive=True)
    files.update(h for h in hits if os.path.isfile(h))
  return sorted(files)


def loglog_slope(x: Sequence[float], y: Sequence[float]) -> float:
  """Least-squares slope of ``log y`` against ``log x`` (the exponent of a power law ``y ~ x^s``)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.shape != y.shape or x.size < 2:
    raise ValueError(f"need two equal-length series of at least 2 points, got {x.shape} and {y.shape}")
  if np.any(x <= 0) or np.any(y <= 0):
    raise ValueError("log-log slope needs positive x and y")
  return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def lambda_of_alpha(alpha, eta: float) -> np.ndarray:
  """The `lk_hybrid` weight ``lambda = exp(-eta * alpha)`` (numpy, for plotting; the loss computes its own)."""
  if not math.isfinite(eta) or eta < 0:
    raise ValueError(f"eta={eta}: must be finite and >= 0")
  return np.exp(-float(eta) * np.asarray(alpha, np.float64))


__all__ = ["METRICS_FILE", "metrics_path", "load_metrics", "num_heads", "head_traces", "scalar_trace",
           "expand_paths", "loglog_slope", "lambda_of_alpha"]
