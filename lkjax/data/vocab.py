"""The draft vocabulary: the Vd most frequent target tokens and the maps between draft and target ids.

Conventions (docs/design.md#target-features-and-the-draft-vocabulary, the layout vLLM / SGLang EAGLE-3 checkpoints use):
  token_ids  int64[Vd]  target ids of the draft vocabulary, strictly ascending
  d2t        int64[Vd]  offsets: target id = i + d2t[i] (so ``d2t = token_ids - arange(Vd)``)
  t2d        bool[V]    membership of each target id in the draft vocabulary

The draft's logits index draft ids ``0..Vd-1``; `DraftVocab.draft_to_target` maps them back to target ids,
`DraftVocab.target_to_draft` maps target ids to draft ids (-1 for tokens outside the draft vocabulary).
"""
from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class DraftVocab:
  """A draft vocabulary over a target vocabulary of ``vocab_size`` tokens.

  Attributes:
    token_ids: int64[Vd] target ids, strictly ascending.
    d2t: int64[Vd], ``token_ids[i] = i + d2t[i]``.
    t2d: bool[V], ``t2d[v]`` iff target id v is in the draft vocabulary.
    coverage: share of loss-masked training tokens whose target id is in the draft vocabulary (NaN when
      unknown, e.g. for a vocabulary rebuilt from ``d2t`` alone).
  """

  token_ids: np.ndarray
  d2t: np.ndarray
  t2d: np.ndarray
  coverage: float = math.nan

  def __post_init__(self):
    ids = np.asarray(self.token_ids)
    d2t = np.asarray(self.d2t)
    t2d = np.asarray(self.t2d)
    if ids.ndim != 1 or d2t.ndim != 1 or t2d.ndim != 1:
      raise ValueError(f"DraftVocab: token_ids, d2t, t2d must be 1-D, got shapes {ids.shape}, {d2t.shape}, "
                       f"{t2d.shape}")
    if ids.size == 0:
      raise ValueError("DraftVocab: empty draft vocabulary")
    if np.any(np.diff(ids) <= 0):
      raise ValueError("DraftVocab: token_ids must be strictly ascending (sorted, no duplicates)")
    if ids[0] < 0 or ids[-1] >= t2d.size:
      raise ValueError(f"DraftVocab: token_ids span [{ids[0]}, {ids[-1]}], outside the target vocabulary "
                       f"[0, {t2d.size})")
    if not np.array_equal(ids, np.arange(ids.size) + d2t):
      raise ValueError("DraftVocab: d2t does not satisfy token_ids[i] = i + d2t[i]")
    if t2d.dtype != np.bool_ or int(t2d.sum()) != ids.size or not t2d[ids].all():
      raise ValueError("DraftVocab: t2d must be a bool mask holding exactly the token_ids")
    for name, arr, dt in (("token_ids", ids, np.int64), ("d2t", d2t, np.int64), ("t2d", t2d, np.bool_)):
      arr = np.array(arr, dtype=dt)
      arr.setflags(write=False)   # frozen dataclass: keep the arrays immutable too
      object.__setattr__(self, name, arr)
    object.__setattr__(self, "coverage", float(self.coverage))

  @property
  def size(self) -> int:
    """Vd, the draft vocabulary size."""
    return int(self.token_ids.size)

  @property
  def vocab_size(self) -> int:
    """V, the target vocabulary size."""
    return int(self.t2d.size)

  @property
  def is_full(self) -> bool:
    """True when the draft vocabulary is the whole target vocabulary (Vd = V, d2t = 0)."""
    return self.size == self.vocab_size

  def draft_to_target(self, ids) -> np.ndarray:
    """Draft ids (any shape, values in [0, Vd)) -> target ids int64 of the same shape."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= self.size):
      raise ValueError(f"draft_to_target: draft ids span [{ids.min()}, {ids.max()}], valid range is "
                       f"[0, {self.size})")
    return self.token_ids[ids.astype(np.int64)]

  def target_to_draft(self, ids) -> np.ndarray:
    """Target ids (any shape, values in [0, V)) -> draft ids int64, -1 where not in the draft vocabulary."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      raise ValueError(f"target_to_draft: target ids span [{ids.min()}, {ids.max()}], valid range is "
                       f"[0, {self.vocab_size})")
    table = np.full(self.vocab_size, -1, np.int64)
    table[self.token_ids] = np.arange(self.size)
    return table[ids.astype(np.int64)]

  def coverage_of(self, token_freqs) -> float:
    """Share of the tokens counted in ``token_freqs`` (int[V]) that the draft vocabulary covers."""
    freqs = _check_freqs(token_freqs, "token_freqs")
    if freqs.size != self.vocab_size:
      raise ValueError(f"coverage_of: token_freqs has {freqs.size} entries, vocab_size is {self.vocab_size}")
    total = freqs.sum()
    return float(freqs[self.token_ids].sum() / total) if total > 0 else math.nan

  def save(self, path: str | os.PathLike) -> pathlib.Path:
    """Write ``d2t`` / ``t2d`` to ``.npz`` or ``.safetensors`` (chosen by the suffix)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npz":
      with open(path, "wb") as f:
        np.savez(f, d2t=self.d2t, t2d=self.t2d, coverage=np.float64(self.coverage))
    elif path.suffix == ".safetensors":
      from safetensors.numpy import save_file
      save_file({"d2t": np.ascontiguousarray(self.d2t), "t2d": np.ascontiguousarray(self.t2d)}, str(path),
                metadata={"coverage": repr(self.coverage)})
    else:
      raise ValueError(f"{path}: draft vocabulary files end in .npz or .safetensors")
    return path

  @classmethod
  def load(cls, path: str | os.PathLike) -> "DraftVocab":
    """Inverse of `save`."""
    path = pathlib.Path(path)
    if not path.exists():
      raise FileNotFoundError(f"{path}: draft vocabulary file is missing")
    coverage = math.nan
    if path.suffix == ".npz":
      with np.load(path, allow_pickle=False) as z:
        missing = [k for k in ("d2t", "t2d") if k not in z.files]
        if missing:
          raise ValueError(f"{path}: missing arrays {missing}")
        d2t, t2d = z["d2t"], z["t2d"]
        if "coverage" in z.files:
          coverage = float(z["coverage"])
    elif path.suffix == ".safetensors":
      from safetensors import safe_open
      with safe_open(str(path), framework="numpy") as f:
        missing = [k for k in ("d2t", "t2d") if k not in f.keys()]
        if missing:
          raise ValueError(f"{path}: missing tensors {missing}")
        d2t, t2d = f.get_tensor("d2t"), f.get_tensor("t2d")
        coverage = float((f.metadata() or {}).get("coverage", "nan"))
    else:
      raise ValueError(f"{path}: draft vocabulary files end in .npz or .safetensors")
    try:
      vocab = from_d2t(d2t, t2d.size)
    except ValueError as e:
      raise ValueError(f"{path}: {e}") from e
    if not np.array_equal(vocab.t2d, t2d.astype(bool)):
      raise ValueError(f"{path}: t2d disagrees with d2t")
    return dataclasses.replace(vocab, coverage=coverage)

  def to_dict(self) -> dict[str, Any]:
    """Small JSON-friendly summary (sizes and coverage, not the arrays)."""
    return {"draft_vocab_size": self.size, "vocab_size": self.vocab_size, "coverage": self.coverage}


def _check_freqs(token_freqs, name: str) -> np.ndarray:
  freqs = np.asarray(token_freqs)
  if freqs.ndim != 1 or freqs.size == 0:
    raise ValueError(f"{name}: expected a non-empty 1-D array of counts, got shape {freqs.shape}")
  if not np.issubdtype(freqs.dtype, np.number) or np.issubdtype(freqs.dtype, np.complexfloating):
    raise ValueError(f"{name}: expected numeric counts, got dtype {freqs.dtype}")
  if not np.all(np.isfinite(freqs)) or np.any(freqs < 0):
    raise ValueError(f"{name}: counts must be finite and >= 0")
  return freqs.astype(np.float64) if np.issubdtype(freqs.dtype, np.floating) else freqs.astype(np.int64)


def build_draft_vocab(token_freqs, vd: int) -> DraftVocab:
  """The ``vd`` most frequent target tokens, sorted ascending.

  Args:
    token_freqs: int[V] counts of each target token under the loss mask (``manifest["token_freqs"]``).
    vd: draft vocabulary size; 0 or V means the full target vocabulary.

  Ties in frequency go to the lower target id, so the result is a pure function of the counts.
  """
  freqs = _check_freqs(token_freqs, "token_freqs")
  v = freqs.size
  if isinstance(vd, bool) or not isinstance(vd, (int, np.integer)):
    raise ValueError(f"vd={vd!r}: the draft vocabulary size must be an integer")
  vd = int(vd)
  if vd < 0 or vd > v:
    raise ValueError(f"vd={vd}: the draft vocabulary size must be in [0, V={v}] (0 means the full vocabulary)")
  if vd == 0:
    vd = v
  # lexsort sorts by the LAST key first: descending frequency, then ascending id.
  order = np.lexsort((np.arange(v), -freqs))
  token_ids = np.sort(order[:vd]).astype(np.int64)
  t2d = np.zeros(v, bool)
  t2d[token_ids] = True
  total = freqs.sum()
  coverage = float(freqs[token_ids].sum() / total) if total > 0 else math.nan
  return DraftVocab(token_ids=token_ids, d2t=token_ids - np.arange(vd, dtype=np.int64), t2d=t2d,
                    coverage=coverage)


def from_d2t(d2t, vocab_size: int) -> DraftVocab:
  """Rebuild a `DraftVocab` from the offsets ``d2t`` (int[Vd]) of a serving checkpoint."""
  d2t = np.asarray(d2t)
  if d2t.ndim != 1 or not np.issubdtype(d2t.dtype, np.integer):
    raise ValueError(f"d2t: expected a 1-D integer array, got {d2t.dtype}{list(d2t.shape)}")
  if int(vocab_size) < d2t.size:
    raise ValueError(f"vocab_size={vocab_size} is smaller than the draft vocabulary ({d2t.size})")
  token_ids = np.arange(d2t.size, dtype=np.int64) + d2t.astype(np.int64)
  if np.any(np.diff(token_ids) <= 0):
    raise ValueError("d2t: the target ids i + d2t[i] are not strictly ascending")
  if token_ids.size and (token_ids[0] < 0 or token_ids[-1] >= vocab_size):
    raise ValueError(f"d2t: target ids span [{token_ids[0]}, {token_ids[-1]}], outside [0, {vocab_size})")
  t2d = np.zeros(int(vocab_size), bool)
  t2d[token_ids] = True
  return DraftVocab(token_ids=token_ids, d2t=d2t.astype(np.int64), t2d=t2d)
