"""The grain input pipeline: hidden-state shards -> fixed-shape training batches (`lkjax.models.base` schema).

    ArrayRecord shards (checked against manifest.json)
      -> split (train / val: a fixed, seed-independent hash of the global record index)
      -> global shuffle (grain index shuffle, reshuffled every epoch) -> this process's strided share
      -> repeat(num_epochs) -> tag each record with its epoch
      -> decode + validate + truncate to max_length (counted)      numpy only, runs in grain workers
      -> pad to max_length | first-fit pack several documents per row
      -> batch (global_batch_size // process_count rows)
      -> [mp_prefetch(worker_count)] -> strip + accumulate statistics (main process)

A batch is a dict of numpy arrays with exactly `lkjax.models.base.BATCH_KEYS`, T = max_length:
  input_ids int32[B, T], loss_mask uint8[B, T], segment_ids int32[B, T] (0 = padding, 1..n = document),
  positions int32[B, T] (restart at 0 per document, 0 on padding), aux_hidden bf16[B, T, A*H],
  final_hidden bf16[B, T, H].  Padding positions hold zeros everywhere.
When the manifest says the shards carry ``target_lse`` (and ``target_lse=True``, the default), batches
also hold ``target_lse f32[B, T]`` (`lkjax.data.shards.OPTIONAL_SCHEMA`; `lkjax.train.step` then skips the
full-vocabulary target head).

Per process and epoch, each process reads ``N // process_count`` records of the split's N (a fresh global
permutation each epoch, strided across processes); the ``N % process_count`` left over are skipped for that
epoch so that all processes make the same number of steps (`LoaderInfo.skipped_per_epoch`).

The iterator (``iter(loader)``) is a `grain.DatasetIterator`: ``get_state()`` / ``set_state()`` give exact
resumption and it works with ``grain.checkpoint.CheckpointSave/CheckpointRestore`` in an orbax manager.
Its state also carries the statistics (`loader_stats`): documents read, tokens, and the sequences longer
than ``max_length`` that were truncated (with the number of tokens cut) -- nothing is dropped silently --
and, per epoch, a digest of WHICH records this process read (`epoch_records`: their count and the sum and
xor of a 64-bit hash of their global index). Digests of all processes combine (`combine_digests`) and equal
`records_digest` of the split exactly when every record was read once in that epoch (`skipped_per_epoch`
aside): how a multi-process run is checked from the loaders' own counters.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import pathlib
from typing import Any, Mapping

import grain
import ml_dtypes
import numpy as np

from lkjax.data import shards

SPLITS = ("train", "val")
_STAT_PREFIX = "_stat_"
_ROW_STATS = ("docs", "tokens", "loss_tokens", "truncated_docs", "truncated_tokens")
# A fixed salt: the validation split must not move when the training seed changes.
_SPLIT_SALT = np.uint64(0x6C6B6A6178766C31)
_BF16 = np.dtype(ml_dtypes.bfloat16)
_HIDDEN_KEYS = ("aux_hidden", "final_hidden")
# Per document of a row: its global record index and epoch (-1: no document), for the per-epoch digests.
_REC_INDEX, _REC_EPOCH = "_rec_index", "_rec_epoch"
_MASK64 = (1 << 64) - 1


# ------------------------------------------------------------------------------------------ shard directory


@dataclasses.dataclass(frozen=True)
class ShardSet:
  """A shard directory whose files were checked against its manifest.

  Attributes:
    directory: the shard directory.
    manifest: the parsed ``manifest.json``.
    files: shard files in manifest order.
    counts: int64[S] records per shard; offsets: int64[S+1] global index of each shard's first record.
  """

  directory: pathlib.Path
  manifest: dict
  files: tuple[pathlib.Path, ...]
  counts: np.ndarray
  offsets: np.ndarray

  @property
  def num_records(self) -> int:
    return int(self.offsets[-1])

  @property
  def hidden_size(self) -> int:
    return int(self.manifest["target"]["hidden_size"])

  @property
  def num_aux(self) -> int:
    return len(shards.target_info(self.manifest).aux_layer_ids)


def open_shards(data_dir: str | os.PathLike) -> ShardSet:
  """Read the manifest and check every shard file: listed, present, readable, with the listed record count.

  Raises:
    FileNotFoundError: no manifest.
    ShardError: a missing, unlisted, truncated or short shard; the message names the file.
  """
  from array_record.python.array_record_module import ArrayRecordReader

  directory = pathlib.Path(data_dir)
  manifest = shards.read_manifest(directory)
  mpath = directory / shards.MANIFEST_FILE
  listed = [directory / s["file"] for s in manifest["shards"]]
  if not listed:
    raise shards.ShardError(f"{mpath}: lists no shards")
  unlisted = sorted(set(shards.shard_paths(directory)) - set(listed))
  if unlisted:
    raise shards.ShardError(f"{mpath}: shard files {[p.name for p in unlisted]} are not in the manifest "
                            "(an interrupted precompute? re-run it to finish the manifest)")
  counts = []
  for s, path in zip(manifest["shards"], listed):
    expected = int(s["num_records"])
    try:
      reader = ArrayRecordReader(str(path))
      found = reader.num_records()
      reader.close()
    except Exception as e:  # array_record raises bare RuntimeErrors
      raise shards.ShardError(f"{path}: cannot open ArrayRecord file ({type(e).__name__}: {e}); it may be "
                              "truncated -- re-run precompute") from e
    # A truncated ArrayRecord file opens fine and reports fewer (often 0) records.
    if found != expected:
      raise shards.ShardError(f"{path}: holds {found} records, the manifest lists {expected} "
                              "(truncated or replaced file? re-run precompute)")
    counts.append(expected)
  total = sum(counts)
  if total != int(manifest["num_records"]):
    raise shards.ShardError(f"{mpath}: num_records={manifest['num_records']} but its shards hold {total}")
  counts = np.asarray(counts, np.int64)
  return ShardSet(directory=directory, manifest=manifest, files=tuple(listed), counts=counts,
                  offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))


def validate_against_config(manifest: Mapping[str, Any] | str | os.PathLike, *, hidden_size: int,
                            num_aux: int, vocab_size: int, aux_layer_ids=None,
                            source: str | None = None) -> None:
  """Check that the shards were made for the model a draft config describes.

  Args:
    manifest: a shard directory, a ``manifest.json`` path, or a manifest dict (then ``source`` names it).
    hidden_size, num_aux, vocab_size, aux_layer_ids: what the draft expects of the target
      (``aux_layer_ids=None`` skips that check).

  Raises:
    ValueError: naming the manifest path and the mismatching field.
  """
  if isinstance(manifest, (str, os.PathLike)):
    path = pathlib.Path(manifest)
    directory = path.parent if path.name == shards.MANIFEST_FILE else path
    source = source or str(directory / shards.MANIFEST_FILE)
    manifest = shards.read_manifest(directory, check_files=False)
  source = source or "manifest"
  info = shards.target_info(manifest)
  checks = [("hidden_size", info.hidden_size, int(hidden_size)), ("num_aux", info.num_aux, int(num_aux)),
            ("vocab_size", info.vocab_size, int(vocab_size))]
  if aux_layer_ids is not None:
    checks.append(("aux_layer_ids", tuple(info.aux_layer_ids), tuple(int(i) for i in aux_layer_ids)))
  for name, have, want in checks:
    if have != want:
      raise ValueError(f"{source}: target {name} is {have}, the draft config expects {want} -- these shards "
                       "were precomputed for a different target or config")


# ------------------------------------------------------------------------------------------ split


def _mix64(x: np.ndarray) -> np.ndarray:
  """splitmix64 finaliser on uint64 (wrapping arithmetic): a fixed, platform-independent hash."""
  with np.errstate(over="ignore"):
    x = (x ^ _SPLIT_SALT) + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def split_indices(num_records: int, split: str, val_fraction: float) -> np.ndarray:
  """Global record indices (int64, ascending) of ``split``.

  The validation split is the ``round(num_records * val_fraction)`` records (at least one when
  ``val_fraction > 0``) with the smallest hash of their index: deterministic, independent of the training
  seed and process count, disjoint from the training split, and the two together cover every record.
  """
  if split not in SPLITS:
    raise ValueError(f"split={split!r}: expected one of {SPLITS}")
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"val_fraction={val_fraction}: must be in [0, 1)")
  n_val = int(round(num_records * val_fraction))
  if val_fraction > 0:
    n_val = max(n_val, 1)
  if n_val >= num_records:
    raise ValueError(f"val_fraction={val_fraction}: {num_records} records leave no training data")
  if split == "val" and n_val == 0:
    raise ValueError("split='val' with val_fraction=0: there is no validation split")
  order = np.argsort(_mix64(np.arange(num_records, dtype=np.uint64)), kind="stable")
  is_val = np.zeros(num_records, bool)
  is_val[order[:n_val]] = True
  return np.flatnonzero(is_val if split == "val" else ~is_val).astype(np.int64)


# ------------------------------------------------------------------------------------------ transforms
# Everything below runs in grain worker processes: numpy only, picklable, no jax.


class _SplitSource(grain.sources.RandomAccessDataSource):
  """Record ``i`` of a split -> ``(global_index, raw bytes)``.

  ArrayRecord files written with ``group_size:1`` hold one chunk per record, each with riegeli's hash of its
  data: a flipped byte fails that record's read, which is reported as a `ShardError` naming the file and
  the record (so shards need no checksums of their own and older shards keep loading).
  """

  def __init__(self, files, indices: np.ndarray, offsets: np.ndarray | None = None):
    self._files = [str(f) for f in files]
    self._indices = np.asarray(indices, np.int64)
    self._offsets = None if offsets is None else np.asarray(offsets, np.int64)
    self._source = grain.sources.ArrayRecordDataSource(self._files)

  def __len__(self) -> int:
    return int(self._indices.size)

  def __getitem__(self, i):
    g = int(self._indices[int(i)])
    try:
      return g, self._source[g]
    except Exception as e:  # array_record / riegeli raise bare RuntimeErrors (hash mismatch, short file)
      where = f"record {g}"
      if self._offsets is not None:
        s = int(np.searchsorted(self._offsets, g, side="right")) - 1
        where = f"{self._files[s]} record {g - int(self._offsets[s])}"
      raise shards.ShardError(f"{where} is corrupted ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                              "nothing was trained on it. Delete that file and re-run the precompute command that made "
                              "its directory (only missing shards are redone), or restore the file.") from None

  def __repr__(self) -> str:
    return f"_SplitSource({len(self._files)} shards, {self._indices.size} records)"


class _TagEpoch(grain.transforms.MapWithIndex):
  """``(global_index, bytes)`` at position ``i`` of this process's repeated stream -> ``(global_index, epoch,
  bytes)``; each epoch is ``per_epoch`` consecutive positions."""

  def __init__(self, per_epoch: int):
    self._per_epoch = int(per_epoch)

  def map_with_index(self, index, element):
    g, data = element
    return g, int(index) // self._per_epoch, data


class _Decode(grain.transforms.Map):
  """``(global_index, epoch, bytes)`` -> validated record dict, truncated to ``max_length`` (+ ``orig_len``,
  ``record``, ``epoch``)."""

  def __init__(self, names, offsets, *, hidden_size: int, num_aux: int, max_length: int,
               optional: tuple[str, ...] = ()):
    self._names = list(names)
    self._optional = tuple(optional)
    self._offsets = np.asarray(offsets, np.int64)
    self._hidden_size = hidden_size
    self._num_aux = num_aux
    self._max_length = max_length

  def map(self, element):
    g, epoch, data = element
    s = int(np.searchsorted(self._offsets, g, side="right")) - 1
    where = f"{self._names[s]} record {g - int(self._offsets[s])}"
    rec = shards.decode_record(data, where=where)
    length = shards.validate_record(rec, hidden_size=self._hidden_size, num_aux=self._num_aux, where=where)
    keep = min(length, self._max_length)
    missing = [k for k in self._optional if k not in rec]
    if missing:
      raise shards.ShardError(f"{where}: missing fields {missing}, which the manifest says every record has")
    out = {k: rec[k][:keep] for k in (*shards.RECORD_SCHEMA, *self._optional)}
    out["orig_len"] = length
    out["record"], out["epoch"] = int(g), int(epoch)
    return out


class _Single(grain.transforms.Map):
  """Padding mode: a row holds one document."""

  def map(self, doc):
    return [doc]


class _Collate:
  """Rows (lists of decoded documents) -> one batch dict, copying each document once into ``[B, T, ...]``.

  Documents are laid out one after another from the row's start: segment ids 1..n, positions restarting
  at 0, zeros on padding.  Per-row statistics ride along under ``_stat_*`` keys (int64[B]) until
  `LoaderIterator` strips them in the main process.
  """

  def __init__(self, *, max_length: int, aux_width: int, hidden_size: int, optional: tuple[str, ...] = (),
               max_docs: int = 1):
    self._max_docs = int(max_docs)    # documents a row can hold (1 without packing)
    self._optional = tuple(optional)
    self._max_length = max_length
    self._aux_width = aux_width
    self._hidden_size = hidden_size

  def __call__(self, rows) -> dict[str, np.ndarray]:
    b, t = len(rows), self._max_length
    out = {
        "input_ids": np.zeros((b, t), np.int32),
        "loss_mask": np.zeros((b, t), np.uint8),
        "segment_ids": np.zeros((b, t), np.int32),
        "positions": np.zeros((b, t), np.int32),
        # uint16 storage: numpy zero-fills custom dtypes (bf16) element by element; calloc is ~free.
        "aux_hidden": np.zeros((b, t, self._aux_width), np.uint16),
        "final_hidden": np.zeros((b, t, self._hidden_size), np.uint16),
    }
    for k in self._optional:
      dt, ndim = shards.OPTIONAL_SCHEMA[k]
      assert ndim == 1, k
      out[k] = np.zeros((b, t), dt)
    stats = {k: np.zeros(b, np.int64) for k in _ROW_STATS}
    rec_index = np.full((b, self._max_docs), -1, np.int64)
    rec_epoch = np.full((b, self._max_docs), -1, np.int64)
    for r, docs in enumerate(rows):
      start = 0
      for seg, doc in enumerate(docs, start=1):
        n = doc["input_ids"].shape[0]
        if start + n > t:
          raise AssertionError(f"row {r}: documents hold {start + n} tokens > max_length {t}")
        sl = slice(start, start + n)
        for k in (*shards.RECORD_SCHEMA, *self._optional):
          out[k][r, sl] = doc[k].view(out[k].dtype) if k in _HIDDEN_KEYS else doc[k]
        out["segment_ids"][r, sl] = seg
        out["positions"][r, sl] = np.arange(n, dtype=np.int32)
        start += n
        cut = int(doc["orig_len"]) - n
        stats["docs"][r] += 1
        stats["tokens"][r] += n
        stats["loss_tokens"][r] += int(np.count_nonzero(doc["loss_mask"]))
        stats["truncated_docs"][r] += int(cut > 0)
        stats["truncated_tokens"][r] += cut
        rec_index[r, seg - 1], rec_epoch[r, seg - 1] = doc["record"], doc["epoch"]
    for k in _HIDDEN_KEYS:
      out[k] = out[k].view(_BF16)
    for k, v in stats.items():
      out[_STAT_PREFIX + k] = v
    out[_REC_INDEX], out[_REC_EPOCH] = rec_index, rec_epoch
    return out


class _PackIterDataset(grain.IterDataset):
  """Greedy first-fit packing of documents into rows (lists of documents) of at most ``max_length`` tokens.

  Documents are placed, in input order, into the first open row with room; when one fits no open row and
  ``num_bins`` rows are open, the open rows are emitted (in opening order) and the document starts the next
  group.  State = parent state at the start of the current group + rows already emitted from it, so a
  restored iterator rebuilds the group and continues exactly.
  """

  def __init__(self, parent: grain.IterDataset, *, max_length: int, num_bins: int):
    super().__init__(parent)
    self._kw = dict(max_length=max_length, num_bins=num_bins)

  def __iter__(self):
    return _PackIterator(self._parent.__iter__(), **self._kw)

  def __str__(self) -> str:
    return f"_PackIterDataset(max_length={self._kw['max_length']}, num_bins={self._kw['num_bins']})"


class _PackIterator(grain.DatasetIterator):

  def __init__(self, parent, *, max_length: int, num_bins: int):
    super().__init__(parent)
    self._max_length = max_length
    self._num_bins = num_bins
    self._reset(self._parent.get_state(), next_row=0)

  def _reset(self, group_state, next_row: int):
    self._group_state = group_state   # parent state before the first document of the current group
    self._rows = None                 # the current group's rows, once built
    self._next_row = next_row
    self._carry = None                # a document read but not yet placed (starts the next group)
    self._carry_state = None          # parent state before `_carry` was read

  def _build_group(self):
    bins: list[list[dict]] = []
    used: list[int] = []
    while True:
      if self._carry is not None:
        doc, state = self._carry, self._carry_state
        self._carry = None
      else:
        state = self._parent.get_state()
        try:
          doc = next(self._parent)
        except StopIteration:
          self._carry_state = self._parent.get_state()
          break
      n = doc["input_ids"].shape[0]
      for b in range(len(bins)):
        if used[b] + n <= self._max_length:
          bins[b].append(doc)
          used[b] += n
          break
      else:
        if len(bins) < self._num_bins:
          bins.append([doc])
          used.append(n)
        else:
          self._carry, self._carry_state = doc, state
          break
    return bins

  def __next__(self):
    self._assert_not_closed()
    while self._rows is None or self._next_row >= len(self._rows):
      if self._rows is not None:         # the group is used up: the next one starts at the carry
        carry, carry_state = self._carry, self._carry_state
        self._reset(carry_state, next_row=0)
        self._carry, self._carry_state = carry, carry_state
      self._rows = self._build_group()
      if not self._rows:
        self._rows = None
        raise StopIteration
    row = self._rows[self._next_row]
    self._next_row += 1
    return row

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._group_state, "next_row": self._next_row}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    # The group is rebuilt lazily by __next__ from the restored parent; its first next_row rows are skipped.
    self._reset(state["parent"], next_row=int(state["next_row"]))

  def __str__(self) -> str:
    return "_PackIterator"


# ------------------------------------------------------------------------------------------ statistics


class _StatsIterDataset(grain.IterDataset):
  """Main-process tail: removes the per-row statistics from batches and accumulates them."""

  def __iter__(self):
    return LoaderIterator(self._parent.__iter__())


class LoaderIterator(grain.DatasetIterator):
  """Yields batch dicts with exactly `BATCH_KEYS`; ``stats`` holds the running totals of this process.

  ``stats`` keys: docs, tokens, loss_tokens (after truncation), truncated_docs, truncated_tokens (tokens cut
  off sequences longer than max_length), rows, pad_tokens.  ``epoch_records``: per epoch, the digest of
  the records read (`records_digest`).  Both are part of ``get_state()``.
  """

  def __init__(self, parent):
    super().__init__(parent)
    self._stats = dict.fromkeys(_ROW_STATS + ("rows", "pad_tokens"), 0)
    self._epochs: dict[int, dict[str, int]] = {}
    self._warned = False

  @property
  def stats(self) -> dict[str, int]:
    return dict(self._stats)

  @property
  def epoch_records(self) -> dict[int, dict[str, int]]:
    """``{epoch: {"records": n, "sum": s, "xor": x}}`` of the records this process has read."""
    return {e: dict(d) for e, d in sorted(self._epochs.items())}

  def _count_records(self, index: np.ndarray, epoch: np.ndarray) -> None:
    valid = index >= 0
    index, epoch = index[valid], epoch[valid]
    for e in np.unique(epoch):
      part = records_digest(index[epoch == e])
      self._epochs[int(e)] = combine_digests([self._epochs.get(int(e), _EMPTY_DIGEST), part])

  def __next__(self) -> dict[str, np.ndarray]:
    self._assert_not_closed()
    batch = next(self._parent)
    for k in _ROW_STATS:
      self._stats[k] += int(np.sum(batch.pop(_STAT_PREFIX + k)))
    self._count_records(batch.pop(_REC_INDEX), batch.pop(_REC_EPOCH))
    b, t = batch["input_ids"].shape
    self._stats["rows"] += b
    self._stats["pad_tokens"] = self._stats["rows"] * t - self._stats["tokens"]
    if self._stats["truncated_docs"] and not self._warned:
      self._warned = True
      logging.warning("input pipeline: sequences longer than max_length=%d are truncated (%d so far; see "
                      "loader_stats)", t, self._stats["truncated_docs"])
    return batch

  def get_state(self) -> dict[str, Any]:
    # Epoch keys as strings: the state goes through JSON (grain's checkpoint handler).
    return {"pipeline": self._parent.get_state(), "stats": dict(self._stats),
            "epoch_records": {str(e): dict(d) for e, d in sorted(self._epochs.items())}}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["pipeline"])
    self._stats = {k: int(state["stats"].get(k, 0)) for k in self._stats}
    self._epochs = {int(e): {k: int(v) for k, v in d.items()}
                    for e, d in state.get("epoch_records", {}).items()}

  def __str__(self) -> str:
    return "LoaderIterator"


_EMPTY_DIGEST = {"records": 0, "sum": 0, "xor": 0}


def records_digest(indices) -> dict[str, int]:
  """Order-independent digest of a multiset of global record indices: ``{"records": count, "sum": sum of
  h(i) mod 2**64, "xor": xor of h(i)}`` with h a fixed 64-bit mix (splitmix64). A repeated or missing
  record changes it (up to a 64-bit hash collision)."""
  h = _mix64(np.asarray(indices, np.int64).astype(np.uint64))
  with np.errstate(over="ignore"):
    total = int(np.sum(h, dtype=np.uint64)) if h.size else 0
  xor = int(np.bitwise_xor.reduce(h)) if h.size else 0
  return {"records": int(h.size), "sum": total & _MASK64, "xor": xor}


def combine_digests(digests) -> dict[str, int]:
  """The `records_digest` of the union (with multiplicity) of the multisets behind ``digests``."""
  out = dict(_EMPTY_DIGEST)
  for d in digests:
    out = {"records": out["records"] + int(d["records"]), "sum": (out["sum"] + int(d["sum"])) & _MASK64,
           "xor": out["xor"] ^ int(d["xor"])}
  return out


def loader_stats(iterator: LoaderIterator) -> dict[str, int]:
  """Running statistics of a loader iterator (truncations included); see `LoaderIterator`."""
  if not isinstance(iterator, LoaderIterator):
    raise TypeError(f"loader_stats expects an iterator from iter(make_loader(...)), got {type(iterator)}")
  return iterator.stats


# ------------------------------------------------------------------------------------------ loader


@dataclasses.dataclass(frozen=True)
class LoaderInfo:
  """Sizes of one process's view of a split."""

  split: str
  num_records: int            # records in the split (all processes)
  records_per_epoch: int      # records this process reads per epoch
  skipped_per_epoch: int      # split records no process reads in an epoch (num_records % process_count)
  batch_size: int             # rows per batch on this process
  global_batch_size: int
  max_length: int
  process_index: int
  process_count: int
  target_lse: bool = False    # batches carry ``target_lse f32[B, T]``


class Loader(grain.IterDataset):
  """The dataset `make_loader` returns: ``iter(loader)`` -> `LoaderIterator`; ``loader.info`` -> `LoaderInfo`."""

  def __init__(self, tail: grain.IterDataset, info: LoaderInfo, shard_set: ShardSet):
    super().__init__(tail)
    self.info = info
    self.shards = shard_set

  def __iter__(self) -> LoaderIterator:
    return self._parent.__iter__()

  def __str__(self) -> str:
    return f"Loader({self.info})"


def _process(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # only for the defaults; workers never get here
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index}, process_count={process_count}: need "
                     "0 <= process_index < process_count")
  return int(process_index), int(process_count)


def _local_batch(global_batch_size: int, process_count: int) -> int:
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size}: must be a positive multiple of "
                     f"process_count={process_count}")
  return global_batch_size // process_count


def make_loader(data_dir: str | os.PathLike, *, split: str, global_batch_size: int, max_length: int,
                seed: int = 0, num_epochs: int | None = 1, shuffle: bool = True, packing: bool = False,
                val_fraction: float = 0.05, worker_count: int = 0, drop_remainder: bool = True,
                process_index: int | None = None, process_count: int | None = None,
                pack_bins: int | None = None, read_threads: int = 4,
                prefetch_buffer_size: int | None = None, worker_buffer_size: int = 2,
                target_lse: bool = True) -> Loader:
  """Build the input pipeline over a shard directory (see the module docstring for the stages).

  Args:
    data_dir: shard directory (``manifest.json`` + ``shard-*.array_record``).
    split: "train" or "val" (`split_indices`).
    global_batch_size: rows per step over all processes; this process yields ``global // process_count``.
    max_length: T; longer sequences are truncated and counted (`loader_stats`).
    seed: shuffle seed (each epoch is reshuffled deterministically).
    num_epochs: passes over the split; None repeats forever.
    shuffle: global shuffle (off: record order, for evaluation).
    packing: pack several documents per row (first fit over ``pack_bins`` rows) instead of one per row.
    val_fraction: share of records held out as the validation split.
    worker_count: grain worker processes (0 = in this process).  With packing, the rows depend on it.
    drop_remainder: drop the last partial batch of the run.
    process_index, process_count: this process's share; default ``jax.process_index()/process_count()``.
    pack_bins: rows open at once when packing (default: the local batch size).
    read_threads, prefetch_buffer_size: grain ReadOptions for record reads (buffer default: 2 batches).
    worker_buffer_size: batches each worker keeps ready.
    target_lse: include the shards' ``target_lse`` in the batches when the manifest has it
      (``loader.info.target_lse`` says whether it does).
  """
  if split not in SPLITS:
    raise ValueError(f"split={split!r}: expected one of {SPLITS}")
  if max_length < 1:
    raise ValueError(f"max_length={max_length}: must be >= 1")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs={num_epochs}: must be >= 1 or None (forever)")
  if worker_count < 0:
    raise ValueError(f"worker_count={worker_count}: must be >= 0")
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed={seed}: must be in [0, 2**32)")
  pi, pc = _process(process_index, process_count)
  batch_size = _local_batch(global_batch_size, pc)
  shard_set = open_shards(data_dir)
  indices = split_indices(shard_set.num_records, split, val_fraction)
  per_process = indices.size // pc
  if per_process == 0:
    raise ValueError(f"{shard_set.directory}: split {split!r} has {indices.size} records, fewer than "
                     f"process_count={pc}")
  hidden, num_aux = shard_set.hidden_size, shard_set.num_aux
  use_lse = bool(target_lse) and shards.has_target_lse(shard_set.manifest)
  optional = ("target_lse",) if use_lse else ()
  info = LoaderInfo(split=split, num_records=int(indices.size), records_per_epoch=per_process,
                    skipped_per_epoch=int(indices.size - per_process * pc), batch_size=batch_size,
                    global_batch_size=global_batch_size, max_length=max_length, process_index=pi,
                    process_count=pc, target_lse=use_lse)

  ds = grain.MapDataset.source(_SplitSource(shard_set.files, indices, shard_set.offsets))
  if shuffle:
    ds = ds.shuffle(seed=seed)
  # Strided share of each epoch's permutation; repeat() reseeds the shuffle above every epoch, so every
  # epoch is a new global permutation and the processes' shares stay disjoint within it.
  ds = ds[pi:per_process * pc:pc]
  ds = ds.repeat(num_epochs)
  ds = ds.map_with_index(_TagEpoch(per_process))
  ds = ds.map(_Decode([f.name for f in shard_set.files], shard_set.offsets, hidden_size=hidden,
                      num_aux=num_aux, max_length=max_length, optional=optional))
  if not packing:
    ds = ds.map(_Single())
  read = grain.ReadOptions(num_threads=read_threads,
                           prefetch_buffer_size=prefetch_buffer_size or max(2 * batch_size, 8))
  it_ds = ds.to_iter_dataset(read)
  if packing:
    it_ds = _PackIterDataset(it_ds, max_length=max_length, num_bins=pack_bins or batch_size)
  # Rows are lists of documents until here; collating copies each document once into the batch arrays.
  it_ds = it_ds.batch(batch_size, drop_remainder=drop_remainder,
                      batch_fn=_Collate(max_length=max_length, aux_width=num_aux * hidden, hidden_size=hidden,
                                        optional=optional, max_docs=max_length if packing else 1))
  if worker_count > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                           per_worker_buffer_size=worker_buffer_size))
  return Loader(_StatsIterDataset(it_ds), info, shard_set)


def num_batches(data_dir: str | os.PathLike, *, split: str, global_batch_size: int, max_length: int,
                num_epochs: int = 1, packing: bool = False, val_fraction: float = 0.05,
                drop_remainder: bool = True, process_count: int | None = None) -> int:
  """Batches one process yields over ``num_epochs`` (what the trainer uses for schedules).

  Exact without packing.  With packing the row count is only known after reading, so this returns the
  lower bound ``ceil(tokens / max_length)`` rows, from the manifest's token count scaled to the split
  (sequences longer than max_length are counted in full, so it may overestimate slightly for those).
  """
  _, pc = _process(0, process_count)
  batch_size = _local_batch(global_batch_size, pc)
  shard_set = open_shards(data_dir)
  n_split = split_indices(shard_set.num_records, split, val_fraction).size
  if packing:
    tokens = int(shard_set.manifest["num_tokens"]) * n_split / shard_set.num_records
    rows = math.ceil(tokens * num_epochs / pc / max_length)
  else:
    rows = (n_split // pc) * num_epochs
  return rows // batch_size if drop_remainder else math.ceil(rows / batch_size)


steps_per_epoch = num_batches
