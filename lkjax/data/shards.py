"""Hidden-state shards: the on-disk format between the target (precompute) and the trainer.

A shard directory holds
  shard-00000.array_record ...   ArrayRecord files (``group_size:1`` for random access), one msgpack
                                 record per sequence (schema `RECORD_SCHEMA`)
  manifest.json                  what the shards hold (`write_manifest` / `read_manifest`)
  target_head.safetensors        the target's input embedding and LM head (in the checkpoint dtype) and final
                                 norm multiplier (float32); see `lkjax.targets.hf.TargetModel.head_weights`

Record schema (one training sequence, T tokens, target hidden H, A aux layers):
  input_ids    int32[T]
  loss_mask    uint8[T]         1 on assistant tokens
  aux_hidden   bfloat16[T, A*H]  EAGLE-3 aux states [low | mid | high]
  final_hidden bfloat16[T, H]    target last hidden state after its final norm
Optional (`OPTIONAL_SCHEMA`; present in every record when the manifest says ``"target_lse": true``):
  target_lse   float32[T]        logsumexp over the FULL target vocabulary of the logits the trainer would
                                 compute from the stored (bf16-rounded) ``final_hidden``:
                                 ``logsumexp(f32(final_hidden) @ lm_head.T)``; lets the train step skip
                                 the full-vocabulary head (it then only needs the draft-vocabulary columns)

Arrays are stored as msgpack maps ``{dtype, shape, data}`` (raw little-endian bytes); msgpack rather than
``np.load`` because a threaded ``np.load`` crash was seen on these machines (STYLE.md).

Every write is atomic (temporary file + ``os.replace``) so a killed job never leaves a half-written shard
that looks complete.

Integrity: with ``group_size:1`` every record is its own riegeli chunk, stored with a hash of its data, so a
flipped byte fails that record's read; the pipeline reports it as a `ShardError` naming the file and record
(`lkjax.data.pipeline`), and a truncated file is refused when the pipeline opens the shards (record count
against the manifest). No separate checksums are written, so shards from any lkjax version load.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any, Iterable, Mapping

import ml_dtypes
import msgpack
import numpy as np

from lkjax.files import atomic_path, write_json

FORMAT = "lkjax-shards/1"
MANIFEST_FILE = "manifest.json"
TARGET_WEIGHTS_FILE = "target_head.safetensors"
SHARD_PATTERN = "shard-{:05d}.array_record"
TARGET_WEIGHT_KEYS = {"embed_tokens": "embed_tokens.weight", "lm_head": "lm_head.weight", "norm": "norm.weight"}

# name -> (dtype, ndim)
RECORD_SCHEMA: dict[str, tuple[np.dtype, int]] = {
    "input_ids": (np.dtype(np.int32), 1),
    "loss_mask": (np.dtype(np.uint8), 1),
    "aux_hidden": (np.dtype(ml_dtypes.bfloat16), 2),
    "final_hidden": (np.dtype(ml_dtypes.bfloat16), 2),
}

OPTIONAL_SCHEMA: dict[str, tuple[np.dtype, int]] = {
    "target_lse": (np.dtype(np.float32), 1),
}

_DTYPES = {"int32": np.dtype(np.int32), "uint8": np.dtype(np.uint8), "bfloat16": np.dtype(ml_dtypes.bfloat16),
           "float32": np.dtype(np.float32), "float16": np.dtype(np.float16)}


class ShardError(ValueError):
  """A shard, record or manifest that cannot be used; the message names the file and record."""


def _dtype_name(dt: np.dtype) -> str:
  for name, d in _DTYPES.items():
    if d == dt:
      return name
  raise ValueError(f"dtype {dt} cannot be stored in a shard (allowed: {sorted(_DTYPES)})")


def encode_record(record: Mapping[str, np.ndarray]) -> bytes:
  """Serialise one record (must follow `RECORD_SCHEMA`, see `validate_record`) to msgpack bytes."""
  out = {}
  for name, arr in record.items():
    arr = np.ascontiguousarray(arr)
    out[name] = {"dtype": _dtype_name(arr.dtype), "shape": list(arr.shape), "data": arr.tobytes()}
  return msgpack.packb(out, use_bin_type=True)


def decode_record(data: bytes, *, where: str = "record") -> dict[str, np.ndarray]:
  """Inverse of `encode_record`; ``where`` (e.g. ``"shard-00003.array_record record 17"``) names errors."""
  try:
    raw = msgpack.unpackb(data, raw=False)
  except Exception as e:  # msgpack raises several unrelated exception types on garbage
    raise ShardError(f"{where}: not a msgpack record ({type(e).__name__}: {e})") from e
  if not isinstance(raw, dict):
    raise ShardError(f"{where}: record is a {type(raw).__name__}, expected a map")
  out = {}
  for name, item in raw.items():
    try:
      dt = _DTYPES[item["dtype"]]
      shape = tuple(int(s) for s in item["shape"])
      buf = item["data"]
    except (KeyError, TypeError) as e:
      raise ShardError(f"{where}: field {name!r} is not an encoded array ({e})") from e
    if len(buf) != int(np.prod(shape, dtype=np.int64)) * dt.itemsize:
      raise ShardError(f"{where}: field {name!r} holds {len(buf)} bytes, shape {shape} {dt} needs "
                       f"{int(np.prod(shape)) * dt.itemsize}")
    out[name] = np.frombuffer(buf, dtype=dt).reshape(shape)
  return out


def validate_record(record: Mapping[str, np.ndarray], *, hidden_size: int | None = None,
                    num_aux: int | None = None, where: str = "record") -> int:
  """Check a record against `RECORD_SCHEMA` / `OPTIONAL_SCHEMA` (and the target's sizes); returns its length T."""
  missing = [k for k in RECORD_SCHEMA if k not in record]
  if missing:
    raise ShardError(f"{where}: missing fields {missing} (schema: {list(RECORD_SCHEMA)})")
  extra = [k for k in record if k not in RECORD_SCHEMA and k not in OPTIONAL_SCHEMA]
  if extra:
    raise ShardError(f"{where}: unexpected fields {extra} (schema: {list(RECORD_SCHEMA)}, optional: "
                     f"{list(OPTIONAL_SCHEMA)})")
  length = None
  fields = dict(RECORD_SCHEMA, **{k: v for k, v in OPTIONAL_SCHEMA.items() if k in record})
  for name, (dt, ndim) in fields.items():
    arr = record[name]
    if arr.dtype != dt or arr.ndim != ndim:
      raise ShardError(f"{where}: field {name!r} is {arr.dtype}{list(arr.shape)}, expected {dt} with {ndim} dims")
    if length is None:
      length = arr.shape[0]
    elif arr.shape[0] != length:
      raise ShardError(f"{where}: field {name!r} has {arr.shape[0]} positions, input_ids has {length}")
  if length == 0:
    raise ShardError(f"{where}: empty sequence")
  h = record["final_hidden"].shape[1]
  if hidden_size is not None and h != hidden_size:
    raise ShardError(f"{where}: final_hidden width {h} != target hidden size {hidden_size}")
  if num_aux is not None and record["aux_hidden"].shape[1] != num_aux * h:
    raise ShardError(f"{where}: aux_hidden width {record['aux_hidden'].shape[1]} != {num_aux} aux layers x {h}")
  return int(length)


def write_shard(path: str | os.PathLike, records: Iterable[bytes]) -> int:
  """Write encoded records to one ArrayRecord file atomically; returns the record count."""
  from array_record.python.array_record_module import ArrayRecordWriter

  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = atomic_path(path)
  n = 0
  try:
    writer = ArrayRecordWriter(str(tmp), "group_size:1")
    for rec in records:
      writer.write(rec)
      n += 1
    writer.close()
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()
  return n


def read_shard(path: str | os.PathLike) -> list[dict[str, np.ndarray]]:
  """All records of one shard, decoded (for tests and tools; training reads through grain)."""
  from array_record.python.array_record_module import ArrayRecordReader

  path = pathlib.Path(path)
  if not path.exists():
    raise ShardError(f"{path}: shard file is missing")
  try:
    reader = ArrayRecordReader(str(path))
    n = reader.num_records()
    raw = reader.read_all() if n else []
    reader.close()
  except Exception as e:
    raise ShardError(f"{path}: cannot read ArrayRecord file ({e}); it may be truncated — re-run precompute") from e
  return [decode_record(r, where=f"{path.name} record {i}") for i, r in enumerate(raw)]


def shard_paths(directory: str | os.PathLike) -> list[pathlib.Path]:
  """Shard files of a directory in order."""
  return sorted(pathlib.Path(directory).glob("shard-*.array_record"))


def write_manifest(directory: str | os.PathLike, manifest: Mapping[str, Any]) -> pathlib.Path:
  """Write ``manifest.json`` atomically (adds ``format``)."""
  path = pathlib.Path(directory) / MANIFEST_FILE
  write_json(path, {"format": FORMAT, **manifest}, indent=1)
  return path


MANIFEST_REQUIRED = ("target", "max_length", "num_records", "num_tokens", "num_loss_tokens", "shards",
                     "token_freqs")


def read_manifest(directory: str | os.PathLike, *, check_files: bool = True) -> dict[str, Any]:
  """Read and check ``manifest.json``.

  Returns the manifest dict; ``manifest["target"]`` is a `TargetInfo` dict and
  ``manifest["token_freqs"]`` a list of V counts of target tokens under the loss mask.
  ``manifest["shards"]`` is a list of ``{"file", "num_records", "num_tokens"}``.
  """
  from lkjax.targets.info import TargetInfo

  directory = pathlib.Path(directory)
  path = directory / MANIFEST_FILE
  if not path.exists():
    raise FileNotFoundError(f"{path}: no manifest — this directory holds no precomputed shards "
                            "(run experiments/precompute.py)")
  try:
    manifest = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ShardError(f"{path}: not valid JSON ({e})") from e
  if manifest.get("format") != FORMAT:
    raise ShardError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
  missing = [k for k in MANIFEST_REQUIRED if k not in manifest]
  if missing:
    raise ShardError(f"{path}: missing keys {missing}")
  info = TargetInfo.from_dict(manifest["target"], source=str(path))
  if len(manifest["token_freqs"]) != info.vocab_size:
    raise ShardError(f"{path}: token_freqs has {len(manifest['token_freqs'])} entries, vocab_size is {info.vocab_size}")
  if check_files:
    for s in manifest["shards"]:
      f = directory / s["file"]
      if not f.exists():
        raise ShardError(f"{path}: lists {s['file']} but {f} is missing")
  return manifest


def has_target_lse(manifest: Mapping[str, Any]) -> bool:
  """Whether every record of the manifest's shards carries ``target_lse`` (`OPTIONAL_SCHEMA`)."""
  return bool(manifest.get("target_lse", False))


def target_info(manifest: Mapping[str, Any]):
  """The `TargetInfo` of a manifest."""
  from lkjax.targets.info import TargetInfo

  return TargetInfo.from_dict(manifest["target"])


HEAD_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
               "float16": np.dtype(np.float16)}


def round_to_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
  """``x`` rounded to ``dtype`` (a `HEAD_DTYPES` name) and back to float32."""
  if dtype not in HEAD_DTYPES:
    raise ValueError(f"dtype={dtype!r}: expected one of {sorted(HEAD_DTYPES)}")
  return np.asarray(x, np.float32).astype(HEAD_DTYPES[dtype]).astype(np.float32)


def save_target_weights(directory: str | os.PathLike, *, embed_tokens: np.ndarray, lm_head: np.ndarray,
                        norm: np.ndarray, dtype: str = "float32") -> pathlib.Path:
  """Write the target's embedding [V, H] and LM head [V, H] in ``dtype`` (the checkpoint's: a 256k x H head
  in bf16 is half the float32 file) and its final norm [H] in float32 (safetensors)."""
  from safetensors.numpy import save_file

  if dtype not in HEAD_DTYPES:
    raise ValueError(f"dtype={dtype!r}: expected one of {sorted(HEAD_DTYPES)}")
  path = pathlib.Path(directory) / TARGET_WEIGHTS_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  tensors = {TARGET_WEIGHT_KEYS["embed_tokens"]: np.asarray(embed_tokens, np.float32).astype(HEAD_DTYPES[dtype]),
             TARGET_WEIGHT_KEYS["lm_head"]: np.asarray(lm_head, np.float32).astype(HEAD_DTYPES[dtype]),
             TARGET_WEIGHT_KEYS["norm"]: np.asarray(norm, np.float32)}
  tmp = atomic_path(path)
  try:
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()
  return path


def load_target_weights(directory: str | os.PathLike) -> dict[str, np.ndarray]:
  """``{"embed_tokens": [V, H], "lm_head": [V, H], "norm": [H]}`` float32 from the shard directory (whatever
  dtype the file stores)."""
  from safetensors.numpy import load_file

  path = pathlib.Path(directory) / TARGET_WEIGHTS_FILE
  if not path.exists():
    raise FileNotFoundError(f"{path}: target head/embedding file is missing (run experiments/precompute.py)")
  raw = load_file(str(path))
  out = {}
  for key, name in TARGET_WEIGHT_KEYS.items():
    if name not in raw:
      raise ShardError(f"{path}: missing tensor {name!r}")
    out[key] = raw[name].astype(np.float32)
  return out


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while True:
      b = f.read(chunk)
      if not b:
        break
      h.update(b)
  return h.hexdigest()
