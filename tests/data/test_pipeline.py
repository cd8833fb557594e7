"""Input pipeline: layouts against the records written, splits, shuffling, sharding, resume, bad input."""
from __future__ import annotations

import collections
import os
import pathlib

import grain
import ml_dtypes
import numpy as np
import pytest
from etils import epath

from lkjax.data import pipeline, shards
from lkjax.models.base import BATCH_KEYS
from lkjax.targets.info import TargetInfo

H, A, V = 8, 3, 50
BF16 = np.dtype(ml_dtypes.bfloat16)


def _info() -> TargetInfo:
  return TargetInfo(name="tiny", model_type="llama", num_layers=8, hidden_size=H, vocab_size=V,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=4, intermediate_size=16,
                    rms_norm_eps=1e-5, rope_theta=1e4, max_position_embeddings=64)


def _record(rng, length: int, tag: int) -> dict[str, np.ndarray]:
  ids = rng.integers(0, V, length).astype(np.int32)
  ids[0] = tag % V
  return {"input_ids": ids, "loss_mask": (rng.random(length) < 0.6).astype(np.uint8),
          "aux_hidden": rng.standard_normal((length, A * H)).astype(BF16),
          "final_hidden": rng.standard_normal((length, H)).astype(BF16)}


def make_shards(directory: pathlib.Path, shard_sizes=(7, 9, 8), seed: int = 0, min_len=3, max_len=40,
                target_lse=False):
  """Write a shard directory; returns the records in global order."""
  rng = np.random.default_rng(seed)
  records, entries = [], []
  for s, n in enumerate(shard_sizes):
    recs = [_record(rng, int(rng.integers(min_len, max_len + 1)), len(records) + i) for i in range(n)]
    if target_lse:
      for r in recs:
        r["target_lse"] = (5 + rng.random(len(r["input_ids"]))).astype(np.float32)
    name = shards.SHARD_PATTERN.format(s)
    shards.write_shard(directory / name, [shards.encode_record(r) for r in recs])
    entries.append({"file": name, "num_records": n, "num_tokens": sum(len(r["input_ids"]) for r in recs)})
    records += recs
  freqs = np.zeros(V, np.int64)
  for r in records:
    np.add.at(freqs, r["input_ids"][r["loss_mask"] > 0], 1)
  shards.write_manifest(directory, {
      "target": _info().to_dict(), "max_length": max_len, "num_records": len(records),
      "num_tokens": sum(e["num_tokens"] for e in entries), "num_loss_tokens": int(freqs.sum()),
      "shards": entries, "token_freqs": freqs.tolist(), "target_lse": target_lse})
  keys = [tuple(r["input_ids"].tolist()) for r in records]
  assert len(set(keys)) == len(keys)   # rows are matched back to records by their token ids
  return records


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  d = tmp_path_factory.mktemp("shards")
  return d, make_shards(d)


def _loader(d, **kw):
  kw = {"split": "train", "global_batch_size": 4, "max_length": 40, "process_index": 0,
        "process_count": 1, "val_fraction": 0.2, **kw}
  return pipeline.make_loader(d, **kw)


def _docs(batches):
  """Split rows into documents: list of (row, start, length) dicts of the document's arrays."""
  out = []
  for b in batches:
    for r in range(b["input_ids"].shape[0]):
      seg = b["segment_ids"][r]
      t = seg.shape[0]
      n_used = int((seg > 0).sum())
      # Documents sit at the front of the row, numbered 1..k in order; padding (0) only at the end.
      assert np.all(seg[:n_used] > 0) and np.all(seg[n_used:] == 0)
      starts = np.flatnonzero(np.diff(np.concatenate([[0], seg[:n_used]])) != 0)
      np.testing.assert_array_equal(seg[starts], np.arange(1, len(starts) + 1))
      bounds = list(starts) + [n_used]
      for j in range(len(starts)):
        s, e = bounds[j], bounds[j + 1]
        np.testing.assert_array_equal(b["positions"][r, s:e], np.arange(e - s))
        out.append({k: b[k][r, s:e] for k in ("input_ids", "loss_mask", "aux_hidden", "final_hidden",
                                                "target_lse") if k in b})
      # Padding is all zeros.
      for k in b:
        assert not np.any(b[k][r, n_used:].astype(np.float32)), k
      assert t == b["input_ids"].shape[1]
  return out


def _match(docs, records, max_length):
  """Record index of each document; asserts its content equals the (truncated) record."""
  by_prefix = {tuple(r["input_ids"][:max_length].tolist()): i for i, r in enumerate(records)}
  idx = []
  for doc in docs:
    i = by_prefix[tuple(doc["input_ids"].tolist())]
    for k in doc:
      np.testing.assert_array_equal(doc[k], records[i][k][:max_length], err_msg=k)
    idx.append(i)
  return idx


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert sorted(x) == sorted(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_split_is_disjoint_covering_and_seed_free():
  n = 101
  train = pipeline.split_indices(n, "train", 0.1)
  val = pipeline.split_indices(n, "val", 0.1)
  assert val.size == 10 and train.size == 91
  assert not set(train) & set(val) and sorted(set(train) | set(val)) == list(range(n))
  assert not np.array_equal(val, np.arange(n - 10, n))          # a hash, not the tail
  np.testing.assert_array_equal(val, pipeline.split_indices(n, "val", 0.1))
  assert pipeline.split_indices(5, "val", 0.01).size == 1         # a requested split is never empty
  assert pipeline.split_indices(n, "train", 0.0).size == n
  with pytest.raises(ValueError, match="val_fraction"):
    pipeline.split_indices(n, "train", 1.0)
  with pytest.raises(ValueError, match="split="):
    pipeline.split_indices(n, "test", 0.1)


@pytest.mark.parametrize("packing", [False, True])
def test_layout_and_every_record_once(data, packing):
  d, records = data
  loader = _loader(d, packing=packing, drop_remainder=False)
  batches = list(loader)
  for b in batches:
    assert tuple(sorted(b)) == tuple(sorted(BATCH_KEYS))
    t = 40
    assert b["input_ids"].dtype == np.int32 and b["input_ids"].shape[1] == t
    assert b["loss_mask"].dtype == np.uint8 and b["segment_ids"].dtype == np.int32
    assert b["positions"].dtype == np.int32
    assert b["aux_hidden"].dtype == BF16 and b["aux_hidden"].shape[1:] == (t, A * H)
    assert b["final_hidden"].dtype == BF16 and b["final_hidden"].shape[1:] == (t, H)
  docs = _docs(batches)
  seen = _match(docs, records, 40)
  train = pipeline.split_indices(len(records), "train", 0.2)
  assert sorted(seen) == train.tolist()                          # each training record exactly once
  if not packing:
    assert all(int(b["segment_ids"][r].max()) == 1 for b in batches for r in range(len(b["segment_ids"])))
  else:
    rows = sum(len(b["input_ids"]) for b in batches)
    assert rows < len(train)                                     # packing put several documents in a row
  stats = iter(loader)
  for _ in stats:
    pass
  assert stats.stats["docs"] == len(train) and stats.stats["truncated_docs"] == 0
  assert stats.stats["tokens"] == sum(len(records[i]["input_ids"]) for i in train)


def test_hand_padding_example(tmp_path):
  # Two records, no shuffle, no validation split: the exact rows are known.
  rng = np.random.default_rng(5)
  recs = [_record(rng, 3, 0), _record(rng, 5, 1)]
  shards.write_shard(tmp_path / "shard-00000.array_record", [shards.encode_record(r) for r in recs])
  shards.write_manifest(tmp_path, {"target": _info().to_dict(), "max_length": 5, "num_records": 2,
                                   "num_tokens": 8, "num_loss_tokens": 0, "token_freqs": [0] * V,
                                   "shards": [{"file": "shard-00000.array_record", "num_records": 2,
                                               "num_tokens": 8}]})
  kw = dict(split="train", global_batch_size=2, max_length=4, shuffle=False, val_fraction=0.0,
            process_index=0, process_count=1)
  (b,) = list(pipeline.make_loader(tmp_path, **kw))
  np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 1, 0], [1, 1, 1, 1]])
  np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 0], [0, 1, 2, 3]])
  np.testing.assert_array_equal(b["input_ids"], [list(recs[0]["input_ids"]) + [0], recs[1]["input_ids"][:4]])
  np.testing.assert_array_equal(b["loss_mask"][0, :3], recs[0]["loss_mask"])
  assert b["loss_mask"][0, 3] == 0
  np.testing.assert_array_equal(b["final_hidden"][1], recs[1]["final_hidden"][:4])
  # Packed into rows of 8: both documents (3 + 5 tokens) share one row, segments 1 and 2.
  (b,) = list(pipeline.make_loader(tmp_path, **{**kw, "global_batch_size": 1, "max_length": 8,
                                                 "packing": True}))
  np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 1, 2, 2, 2, 2, 2]])
  np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 0, 1, 2, 3, 4]])
  np.testing.assert_array_equal(b["input_ids"][0], np.concatenate([r["input_ids"] for r in recs]))
  np.testing.assert_array_equal(b["aux_hidden"][0], np.concatenate([r["aux_hidden"] for r in recs]))


@pytest.mark.parametrize("packing", [False, True])
def test_truncation_is_counted(data, packing):
  d, records = data
  t = 16
  it = iter(_loader(d, max_length=t, packing=packing, drop_remainder=False))
  docs = _docs(list(it))
  seen = _match(docs, records, t)
  long = [i for i in seen if len(records[i]["input_ids"]) > t]
  assert long                                                     # the fixture has long records
  assert all(len(doc["input_ids"]) == min(t, len(records[i]["input_ids"])) for doc, i in zip(docs, seen))
  s = pipeline.loader_stats(it)
  assert s["truncated_docs"] == len(long)
  assert s["truncated_tokens"] == sum(len(records[i]["input_ids"]) - t for i in long)
  assert s["tokens"] + s["truncated_tokens"] == sum(len(records[i]["input_ids"]) for i in seen)


def _order(loader):
  return [tuple(b["input_ids"][:, 0].tolist()) + tuple(b["input_ids"][:, 1].tolist()) for b in loader]


def test_determinism_and_epochs(data):
  d, records = data
  a = list(_loader(d, seed=3))
  _assert_batches_equal(a, list(_loader(d, seed=3)))
  assert _order(_loader(d, seed=3)) != _order(_loader(d, seed=4))
  # Two epochs: each is a permutation of the training split, reshuffled.
  n_train = pipeline.split_indices(len(records), "train", 0.2).size
  two = _docs(list(_loader(d, seed=3, num_epochs=2, global_batch_size=n_train)))
  idx = _match(two, records, 40)
  first, second = idx[:n_train], idx[n_train:]
  assert sorted(first) == sorted(second) and first != second
  # No shuffle: record order.
  assert _match(_docs(list(_loader(d, shuffle=False, drop_remainder=False))), records, 40) == sorted(first)


def test_val_split_loader(data):
  d, records = data
  val = _match(_docs(list(_loader(d, split="val", drop_remainder=False, global_batch_size=1))), records, 40)
  assert sorted(val) == pipeline.split_indices(len(records), "val", 0.2).tolist()
  assert len(val) == round(0.2 * len(records))


def test_process_sharding(data):
  d, records = data
  kw = dict(global_batch_size=4, process_count=2, drop_remainder=False, seed=7)
  parts = [_match(_docs(list(_loader(d, process_index=p, **kw))), records, 40) for p in range(2)]
  loader = _loader(d, process_index=0, **kw)
  assert loader.info.batch_size == 2
  train = set(pipeline.split_indices(len(records), "train", 0.2).tolist())
  assert not set(parts[0]) & set(parts[1])
  assert len(parts[0]) == len(parts[1]) == len(train) // 2
  assert set(parts[0]) | set(parts[1]) <= train
  assert len(train) - len(set(parts[0]) | set(parts[1])) == loader.info.skipped_per_epoch == len(train) % 2
  for b in _loader(d, process_index=1, **kw):
    assert b["input_ids"].shape[0] <= 2


@pytest.mark.parametrize("packing", [False, True])
def test_resume_gives_the_same_next_batches(data, packing):
  d, _ = data
  # pack_bins=3 with 4-row batches: the saved state falls in the middle of a packing group.
  kw = dict(packing=packing, num_epochs=2, seed=11, max_length=24, pack_bins=3)
  it = iter(_loader(d, **kw))
  _take(it, 3)
  state = it.get_state()
  stats = it.stats
  rest = list(it)
  assert rest
  fresh = iter(_loader(d, **kw))
  fresh.set_state(state)
  assert fresh.stats == stats
  _assert_batches_equal(list(fresh), rest)
  assert fresh.stats == it.stats


def test_resume_with_a_worker_process_and_grain_checkpoint(data, tmp_path):
  d, _ = data
  kw = dict(packing=True, num_epochs=2, seed=2, max_length=24, worker_count=1)
  it = iter(_loader(d, **kw))
  try:
    _take(it, 2)
    # The orbax handler grain ships (used with CheckpointSave/CheckpointRestore in a CheckpointManager).
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(epath.Path(tmp_path), item=it)
    expected = _take(it, 3)
  finally:
    it.close()
  fresh = iter(_loader(d, **kw))
  try:
    handler.restore(epath.Path(tmp_path), item=fresh)
    _assert_batches_equal(_take(fresh, 3), expected)
  finally:
    fresh.close()


@pytest.mark.parametrize("packing", [False, True])
def test_num_batches(data, packing):
  d, records = data
  for drop in (True, False):
    n = sum(1 for _ in _loader(d, packing=packing, drop_remainder=drop, num_epochs=2))
    est = pipeline.num_batches(d, split="train", global_batch_size=4, max_length=40, num_epochs=2,
                               packing=packing, val_fraction=0.2, drop_remainder=drop, process_count=1)
    if packing:
      assert 0 < est <= n
    else:
      assert est == n


# ------------------------------------------------------------------------------------------ bad input


def _copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
  dst.mkdir()
  for f in src.iterdir():
    (dst / f.name).write_bytes(f.read_bytes())
  return dst


def test_missing_and_truncated_shards(data, tmp_path):
  d, _ = data
  missing = _copy(d, tmp_path / "missing")
  (missing / "shard-00001.array_record").unlink()
  with pytest.raises(shards.ShardError, match="shard-00001.array_record"):
    _loader(missing)
  truncated = _copy(d, tmp_path / "truncated")
  f = truncated / "shard-00002.array_record"
  f.write_bytes(f.read_bytes()[: os.path.getsize(f) // 2])
  with pytest.raises(shards.ShardError, match="shard-00002.array_record"):
    _loader(truncated)
  extra = _copy(d, tmp_path / "extra")
  (extra / "shard-00003.array_record").write_bytes((d / "shard-00000.array_record").read_bytes())
  with pytest.raises(shards.ShardError, match="shard-00003.array_record.*not in the manifest"):
    _loader(extra)
  with pytest.raises(FileNotFoundError, match="manifest"):
    _loader(tmp_path / "nothing-here")


@pytest.mark.parametrize("packing", [False, True])
def test_target_lse_rides_along_when_the_manifest_has_it(tmp_path, packing):
  records = make_shards(tmp_path, target_lse=True)
  loader = _loader(tmp_path, packing=packing, drop_remainder=False)
  assert loader.info.target_lse
  batches = list(loader)
  for b in batches:
    assert tuple(sorted(b)) == tuple(sorted(BATCH_KEYS + ("target_lse",)))
    assert b["target_lse"].dtype == np.float32 and b["target_lse"].shape == b["input_ids"].shape
  seen = _match(_docs(batches), records, 40)   # every document's target_lse equals its record's
  assert sorted(seen) == pipeline.split_indices(len(records), "train", 0.2).tolist()
  off = _loader(tmp_path, packing=packing, drop_remainder=False, target_lse=False)
  assert not off.info.target_lse
  assert all("target_lse" not in b for b in off)


def test_record_without_the_promised_target_lse_names_file_and_record(tmp_path):
  make_shards(tmp_path, shard_sizes=(3, 4), target_lse=True)
  recs = shards.read_shard(tmp_path / "shard-00001.array_record")
  del recs[1]["target_lse"]
  shards.write_shard(tmp_path / "shard-00001.array_record", [shards.encode_record(r) for r in recs])
  with pytest.raises(shards.ShardError, match=r"shard-00001.array_record record 1: missing fields \['target_lse'\]"):
    list(_loader(tmp_path, val_fraction=0.0, global_batch_size=1))


def test_wrong_schema_record_names_file_and_record(tmp_path):
  make_shards(tmp_path, shard_sizes=(3, 4))
  rng = np.random.default_rng(1)
  recs = [_record(rng, 5, 100 + i) for i in range(4)]
  recs[2]["final_hidden"] = recs[2]["final_hidden"][:, :H - 1]   # hidden 7 instead of 8
  shards.write_shard(tmp_path / "shard-00001.array_record", [shards.encode_record(r) for r in recs])
  loader = _loader(tmp_path, val_fraction=0.0, global_batch_size=1)
  with pytest.raises(shards.ShardError, match=r"shard-00001.array_record record 2: final_hidden width 7"):
    list(loader)


def test_validate_against_config(data):
  d, _ = data
  good = dict(hidden_size=H, num_aux=A, vocab_size=V, aux_layer_ids=(2, 4, 5))
  pipeline.validate_against_config(d, **good)
  manifest = shards.read_manifest(d)
  pipeline.validate_against_config(manifest, **good)
  for field, bad in [("hidden_size", 16), ("num_aux", 2), ("vocab_size", 51), ("aux_layer_ids", (1, 4, 5))]:
    with pytest.raises(ValueError, match=rf"{d / 'manifest.json'}: target {field}"):
      pipeline.validate_against_config(d, **{**good, field: bad})
  with pytest.raises(ValueError, match="my.json: target hidden_size"):
    pipeline.validate_against_config(manifest, **{**good, "hidden_size": 4}, source="my.json")


def test_bad_arguments(data):
  d, _ = data
  with pytest.raises(ValueError, match="global_batch_size"):
    _loader(d, global_batch_size=3, process_count=2)
  with pytest.raises(ValueError, match="split="):
    _loader(d, split="validation")
  with pytest.raises(ValueError, match="process_index"):
    _loader(d, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="max_length"):
    _loader(d, max_length=0)
  with pytest.raises(ValueError, match="num_epochs"):
    _loader(d, num_epochs=0)
  with pytest.raises(TypeError, match="loader_stats"):
    pipeline.loader_stats(iter([]))


def test_default_process_is_jax_process(data):
  d, _ = data
  loader = pipeline.make_loader(d, split="train", global_batch_size=4, max_length=8, val_fraction=0.2)
  assert (loader.info.process_index, loader.info.process_count) == (0, 1)
  assert collections.Counter(k for b in loader for k in b) == collections.Counter(
      {k: loader.info.records_per_epoch // 4 for k in BATCH_KEYS})
