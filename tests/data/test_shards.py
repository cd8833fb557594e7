"""The shard format (`lkjax.data.shards`): exact round trips and clear errors on bad input."""
from __future__ import annotations

import json

import ml_dtypes
import msgpack
import numpy as np
import pytest

from lkjax.data import shards
from lkjax.targets.info import TargetInfo

BF16 = np.dtype(ml_dtypes.bfloat16)
H, A = 4, 3


def _record(rng, length=6, hidden=H):
  return {"input_ids": rng.integers(0, 1000, length).astype(np.int32),
          "loss_mask": (rng.random(length) < 0.5).astype(np.uint8),
          "aux_hidden": rng.standard_normal((length, A * hidden)).astype(BF16),
          "final_hidden": rng.standard_normal((length, hidden)).astype(BF16)}


def _info(vocab_size=10):
  return TargetInfo(name="tiny", model_type="llama", num_layers=6, hidden_size=H, vocab_size=vocab_size,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=2, intermediate_size=8,
                    rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=32)


def _assert_records_equal(a, b):
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    # Compare raw bytes: bit-exact, NaN payloads included.
    assert a[k].tobytes() == b[k].tobytes(), k


def test_encode_decode_round_trip_is_bit_exact():
  rng = np.random.default_rng(0)
  rec = _record(rng)
  rec["aux_hidden"][0, 0] = np.nan
  rec["final_hidden"][1, 2] = -np.inf
  out = shards.decode_record(shards.encode_record(rec))
  _assert_records_equal(out, rec)
  assert shards.validate_record(out, hidden_size=H, num_aux=A) == 6
  # Non-contiguous input is stored by value.
  rec2 = dict(rec, final_hidden=np.asfortranarray(rec["final_hidden"]))
  _assert_records_equal(shards.decode_record(shards.encode_record(rec2)), rec)
  # The wire format is a plain msgpack map {name: {dtype, shape, data}}.
  raw = msgpack.unpackb(shards.encode_record(rec), raw=False)
  assert raw["aux_hidden"]["dtype"] == "bfloat16" and raw["aux_hidden"]["shape"] == [6, A * H]
  assert raw["input_ids"]["data"] == rec["input_ids"].astype("<i4").tobytes()


def test_write_read_shard_round_trip(tmp_path):
  rng = np.random.default_rng(1)
  recs = [_record(rng, length=n) for n in (1, 7, 30)]
  path = tmp_path / shards.SHARD_PATTERN.format(3)
  assert shards.write_shard(path, (shards.encode_record(r) for r in recs)) == 3
  back = shards.read_shard(path)
  assert len(back) == 3
  for a, b in zip(back, recs):
    _assert_records_equal(a, b)
  assert [p.name for p in tmp_path.iterdir()] == [path.name]      # no temporary file left behind
  assert shards.write_shard(tmp_path / "shard-00004.array_record", []) == 0
  assert shards.read_shard(tmp_path / "shard-00004.array_record") == []
  assert [p.name for p in shards.shard_paths(tmp_path)] == ["shard-00003.array_record",
                                                            "shard-00004.array_record"]


def test_write_shard_is_atomic_on_failure(tmp_path):
  rng = np.random.default_rng(2)
  path = tmp_path / "shard-00000.array_record"

  def records():
    yield shards.encode_record(_record(rng))
    raise RuntimeError("killed")

  with pytest.raises(RuntimeError, match="killed"):
    shards.write_shard(path, records())
  assert list(tmp_path.iterdir()) == []                           # neither the shard nor a temp file


def test_decode_errors_name_the_record():
  where = "shard-00002.array_record record 5"
  with pytest.raises(shards.ShardError, match=f"{where}: not a msgpack record"):
    shards.decode_record(b"\xc1garbage", where=where)
  with pytest.raises(shards.ShardError, match=f"{where}: record is a list"):
    shards.decode_record(msgpack.packb([1, 2]), where=where)
  with pytest.raises(shards.ShardError, match=f"{where}: field 'x' is not an encoded array"):
    shards.decode_record(msgpack.packb({"x": {"dtype": "float64", "shape": [1], "data": b"\0" * 8}}),
                         where=where)
  with pytest.raises(shards.ShardError, match=f"{where}: field 'x' holds 3 bytes"):
    shards.decode_record(msgpack.packb({"x": {"dtype": "int32", "shape": [1], "data": b"abc"}}),
                         where=where)


def test_encode_rejects_unstorable_dtype():
  with pytest.raises(ValueError, match="float64"):
    shards.encode_record({"input_ids": np.zeros(3, np.float64)})


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.pop("loss_mask"), "missing fields"),
    (lambda r: r.__setitem__("extra", np.zeros(6, np.int32)), "unexpected fields"),
    (lambda r: r.__setitem__("input_ids", r["input_ids"].astype(np.uint8)), "'input_ids' is uint8"),
    (lambda r: r.__setitem__("final_hidden", r["final_hidden"].astype(np.float32)), "'final_hidden' is float32"),
    (lambda r: r.__setitem__("loss_mask", r["loss_mask"][:5]), "'loss_mask' has 5 positions"),
    (lambda r: r.__setitem__("aux_hidden", r["aux_hidden"][None]), "expected bfloat16 with 2 dims"),
    (lambda r: r.__setitem__("target_lse", np.zeros(6, np.float16)), "'target_lse' is float16"),
    (lambda r: r.__setitem__("target_lse", np.zeros(5, np.float32)), "'target_lse' has 5 positions"),
])
def test_validate_record_errors(mutate, message):
  rec = _record(np.random.default_rng(3))
  mutate(rec)
  with pytest.raises(shards.ShardError, match=f"^rec 9: .*{message}"):
    shards.validate_record(rec, where="rec 9")


def test_validate_record_accepts_the_optional_target_lse():
  rec = _record(np.random.default_rng(3))
  n = rec["input_ids"].shape[0]
  rec["target_lse"] = np.zeros(n, np.float32)
  assert shards.validate_record(rec) == n
  back = shards.decode_record(shards.encode_record(rec))
  np.testing.assert_array_equal(back["target_lse"], rec["target_lse"])
  assert shards.has_target_lse({"target_lse": True}) and not shards.has_target_lse({})


def test_validate_record_sizes():
  rng = np.random.default_rng(4)
  rec = _record(rng)
  with pytest.raises(shards.ShardError, match="final_hidden width 4 != target hidden size 8"):
    shards.validate_record(rec, hidden_size=8)
  with pytest.raises(shards.ShardError, match="aux_hidden width 12 != 2 aux layers x 4"):
    shards.validate_record(rec, num_aux=2)
  empty = {k: v[:0] for k, v in rec.items()}
  with pytest.raises(shards.ShardError, match="empty sequence"):
    shards.validate_record(empty)


def _manifest(directory, **over):
  m = {"target": _info().to_dict(), "max_length": 32, "num_records": 0, "num_tokens": 0,
       "num_loss_tokens": 0, "shards": [], "token_freqs": [0] * 10, **over}
  return shards.write_manifest(directory, m)


def test_manifest_round_trip(tmp_path):
  rng = np.random.default_rng(5)
  shards.write_shard(tmp_path / "shard-00000.array_record", [shards.encode_record(_record(rng))])
  entry = {"file": "shard-00000.array_record", "num_records": 1, "num_tokens": 6}
  path = _manifest(tmp_path, shards=[entry], num_records=1, num_tokens=6, token_freqs=list(range(10)))
  assert path == tmp_path / shards.MANIFEST_FILE
  m = shards.read_manifest(tmp_path)
  assert m["format"] == shards.FORMAT and m["shards"] == [entry] and m["token_freqs"] == list(range(10))
  assert shards.target_info(m) == _info()


def test_manifest_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no manifest"):
    shards.read_manifest(tmp_path)
  _manifest(tmp_path, format="other/1")
  with pytest.raises(shards.ShardError, match="format 'other/1'"):
    shards.read_manifest(tmp_path)
  (tmp_path / shards.MANIFEST_FILE).write_text("{not json")
  with pytest.raises(shards.ShardError, match="manifest.json: not valid JSON"):
    shards.read_manifest(tmp_path)
  (tmp_path / shards.MANIFEST_FILE).write_text(json.dumps({"format": shards.FORMAT, "target": {}}))
  with pytest.raises(shards.ShardError, match="missing keys"):
    shards.read_manifest(tmp_path)
  _manifest(tmp_path, token_freqs=[0] * 9)
  with pytest.raises(shards.ShardError, match="token_freqs has 9 entries, vocab_size is 10"):
    shards.read_manifest(tmp_path)
  _manifest(tmp_path, shards=[{"file": "shard-00000.array_record", "num_records": 1, "num_tokens": 1}])
  with pytest.raises(shards.ShardError, match="lists shard-00000.array_record but .* is missing"):
    shards.read_manifest(tmp_path)
  assert shards.read_manifest(tmp_path, check_files=False)["shards"][0]["num_records"] == 1
  bad_target = dict(_info().to_dict(), colour="red")
  _manifest(tmp_path, target=bad_target)
  with pytest.raises(ValueError, match="unknown target fields"):
    shards.read_manifest(tmp_path)


def test_read_shard_missing_file(tmp_path):
  with pytest.raises(shards.ShardError, match="shard-00000.array_record: shard file is missing"):
    shards.read_shard(tmp_path / "shard-00000.array_record")


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_read_shard_truncated_file_raises(tmp_path, keep):
  # A truncated ArrayRecord file still opens and reports 0 records; the error surfaces on read / close.
  rng = np.random.default_rng(6)
  path = tmp_path / "shard-00000.array_record"
  shards.write_shard(path, [shards.encode_record(_record(rng, length=40)) for _ in range(8)])
  data = path.read_bytes()
  path.write_bytes(data[: int(len(data) * keep)])
  with pytest.raises(shards.ShardError, match="shard-00000.array_record"):
    shards.read_shard(path)


def test_target_weights_round_trip(tmp_path):
  rng = np.random.default_rng(7)
  emb, head, norm = rng.standard_normal((10, H)), rng.standard_normal((10, H)), rng.standard_normal(H)
  shards.save_target_weights(tmp_path, embed_tokens=emb, lm_head=head, norm=norm)
  w = shards.load_target_weights(tmp_path)
  for k, ref in (("embed_tokens", emb), ("lm_head", head), ("norm", norm)):
    assert w[k].dtype == np.float32
    np.testing.assert_array_equal(w[k], ref.astype(np.float32))
  (tmp_path / shards.TARGET_WEIGHTS_FILE).unlink()
  with pytest.raises(FileNotFoundError, match="target_head.safetensors"):
    shards.load_target_weights(tmp_path)


def test_file_sha256(tmp_path):
  import hashlib
  p = tmp_path / "x.bin"
  payload = bytes(range(256)) * 5000
  p.write_bytes(payload)
  assert shards.file_sha256(p, chunk=1000) == hashlib.sha256(payload).hexdigest()
