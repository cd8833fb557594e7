"""Atomic file writes (a killed job leaves the old file or the new one, never half of one) and provenance.

`write_json` is the one JSON writer of lkjax (manifests, summaries, reports, results files); `atomic_path`
gives a temporary sibling for writers of other formats (shards), to be moved into place with ``os.replace``;
`git_commit` is what every results file records as the code that produced it.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import tempfile
from typing import Any


def atomic_path(path: str | os.PathLike) -> pathlib.Path:
  """A fresh temporary file next to ``path`` (same directory, so ``os.replace`` onto ``path`` is atomic)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  os.close(fd)
  return pathlib.Path(tmp)


def git_commit(path: str | os.PathLike | None = None) -> str:
  """The short commit of the checkout holding ``path`` (default: this lkjax), ``+dirty`` when tracked files
  differ from it; ``"unknown"`` outside a git checkout."""
  cwd = os.fspath(path) if path is not None else os.path.dirname(os.path.abspath(__file__))
  if os.path.isfile(cwd):
    cwd = os.path.dirname(cwd)
  try:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True,
                          check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True,
                           text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"
  return head + ("+dirty" if dirty else "")


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
