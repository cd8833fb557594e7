"""Atomic file writes: a killed job leaves the old file or the new one, never half of one.

`write_json` is the one JSON writer of lkjax (manifests, summaries, reports, results files); `atomic_path`
gives a temporary sibling for writers of other formats (shards), to be moved into place with ``os.replace``.
"""
from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Any


def atomic_path(path: str | os.PathLike) -> pathlib.Path:
  """A fresh temporary file next to ``path`` (same directory, so ``os.replace`` onto ``path`` is atomic)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  os.close(fd)
  return pathlib.Path(tmp)


def _to_json(o: Any) -> Any:
  """numpy arrays / scalars / jax arrays -> lists / numbers; paths -> str; anything else is an error."""
  if hasattr(o, "tolist"):
    return o.tolist()
  if isinstance(o, os.PathLike):
    return os.fspath(o)
  raise TypeError(f"write_json: {type(o).__name__} is not JSON-serialisable")


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2, allow_nan: bool = True) -> None:
  """Write ``obj`` as JSON to ``path`` atomically (parent directories created; numpy values converted).

  ``allow_nan=False`` rejects NaN/inf (strict JSON, e.g. for results files other tools read)."""
  tmp = atomic_path(path)
  try:
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=indent, allow_nan=allow_nan, default=_to_json)
      f.write("\n")
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()
