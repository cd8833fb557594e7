r"""Benchmark: grain input pipeline read MB/s vs raw ArrayRecord reads of the same shards, in one run.

  python benchmarks/bench_grain.py                       # synthetic SmolLM2-sized shards in a temp dir
  python benchmarks/bench_grain.py --data_dir=/path/to/shards --max_length=2048

Rows (MB = record payload bytes on disk, so every row measures the same data):
  raw sequential     ArrayRecordReader.read_all per shard
  raw shuffled       ArrayRecordReader.read(indices) in the pipeline's shuffled order (same access pattern)
  grain source       grain MapDataset over ArrayRecordDataSource, shuffled (I/O path only)
  grain pipeline     lkjax.data.pipeline.make_loader: read + decode + validate + pad + batch
Goal: grain pipeline >= 80% of raw shuffled.  Files are read once before timing so every row reads from the
page cache (this measures the pipeline's overhead, not the disk).  Results go to benchmarks/results/bench_grain.json.
"""
from __future__ import annotations

import json
import pathlib
import platform
import sys
import tempfile
import time

from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

_DATA_DIR = flags.DEFINE_string("data_dir", None, "Shard directory; default: synthetic shards in a temp dir.")
_NUM_RECORDS = flags.DEFINE_integer("num_records", 192, "Synthetic: number of records.")
_HIDDEN = flags.DEFINE_integer("hidden", 576, "Synthetic: target hidden size (SmolLM2-135M: 576).")
_MEAN_LEN = flags.DEFINE_integer("mean_len", 256, "Synthetic: mean sequence length.")
_MAX_LENGTH = flags.DEFINE_integer("max_length", 512, "Pipeline max_length.")
_BATCH = flags.DEFINE_integer("batch", 8, "Pipeline batch size.")
_WORKERS = flags.DEFINE_integer("workers", 0, "grain worker processes for the pipeline row.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions per row (best is reported).")
_OUT = flags.DEFINE_string("out", str(ROOT / "benchmarks" / "results" / "bench_grain.json"), "Where the JSON results go.")


def _synthesize(directory: pathlib.Path, num_records: int, hidden: int, mean_len: int) -> None:
  from lkjax.data import shards
  from lkjax.targets.info import TargetInfo

  rng = np.random.default_rng(0)
  vocab, num_aux, per_shard = 49152, 3, 64
  info = TargetInfo(name="synthetic", model_type="llama", num_layers=30, hidden_size=hidden, vocab_size=vocab,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, intermediate_size=1536,
                    rms_norm_eps=1e-5, rope_theta=1e5, max_position_embeddings=8192)
  entries, tokens = [], 0
  for s, start in enumerate(range(0, num_records, per_shard)):
    lengths = np.clip(rng.exponential(mean_len, min(per_shard, num_records - start)).astype(int), 8, 4 * mean_len)
    recs = []
    for n in lengths:
      recs.append(shards.encode_record({
          "input_ids": rng.integers(0, vocab, n).astype(np.int32),
          "loss_mask": (rng.random(n) < 0.7).astype(np.uint8),
          "aux_hidden": rng.standard_normal((n, num_aux * hidden), np.float32).astype(ml_dtypes.bfloat16),
          "final_hidden": rng.standard_normal((n, hidden), np.float32).astype(ml_dtypes.bfloat16)}))
    name = shards.SHARD_PATTERN.format(s)
    shards.write_shard(directory / name, recs)
    entries.append({"file": name, "num_records": len(recs), "num_tokens": int(lengths.sum())})
    tokens += int(lengths.sum())
  shards.write_manifest(directory, {"target": info.to_dict(), "max_length": 4 * mean_len,
                                    "num_records": num_records, "num_tokens": tokens, "num_loss_tokens": 0,
                                    "shards": entries, "token_freqs": [0] * vocab})


def _best(fn, repeats: int) -> tuple[float, int]:
  """(best seconds, bytes) over ``repeats`` runs of ``fn() -> bytes``."""
  best, nbytes = float("inf"), 0
  for _ in range(repeats):
    t0 = time.perf_counter()
    nbytes = fn()
    best = min(best, time.perf_counter() - t0)
  return best, nbytes


def main(argv):
  del argv
  import grain
  from array_record.python.array_record_module import ArrayRecordReader

  from lkjax.data import pipeline

  tmp = None
  if _DATA_DIR.value:
    data_dir = pathlib.Path(_DATA_DIR.value)
  else:
    tmp = tempfile.TemporaryDirectory(prefix="bench_grain_")
    data_dir = pathlib.Path(tmp.name)
    print(f"writing {_NUM_RECORDS.value} synthetic records (hidden {_HIDDEN.value}) to {data_dir} ...")
    _synthesize(data_dir, _NUM_RECORDS.value, _HIDDEN.value, _MEAN_LEN.value)

  shard_set = pipeline.open_shards(data_dir)
  files = [str(f) for f in shard_set.files]
  n = shard_set.num_records
  # The pipeline's order: one process, all records (val_fraction=0), seed 0.
  order = np.asarray(list(grain.MapDataset.range(n).shuffle(seed=0)), np.int64)
  sizes = np.zeros(n, np.int64)

  def raw_sequential() -> int:
    total = 0
    for f in files:
      r = ArrayRecordReader(f)
      total += sum(len(b) for b in r.read_all())
      r.close()
    return total

  readers = [ArrayRecordReader(f) for f in files]

  def raw_shuffled() -> int:
    total = 0
    for g in order:
      s = int(np.searchsorted(shard_set.offsets, g, side="right")) - 1
      (b,) = readers[s].read([int(g - shard_set.offsets[s])])
      sizes[g] = len(b)
      total += len(b)
    return total

  def grain_source() -> int:
    ds = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(files)).shuffle(seed=0)
    return sum(len(b) for b in ds.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=32)))

  def grain_pipeline() -> int:
    loader = pipeline.make_loader(data_dir, split="train", global_batch_size=_BATCH.value,
                                  max_length=_MAX_LENGTH.value, val_fraction=0.0, seed=0,
                                  drop_remainder=False, worker_count=_WORKERS.value, process_index=0,
                                  process_count=1)
    it = iter(loader)
    try:
      for _ in it:
        pass
    finally:
      it.close()
    assert it.stats["docs"] == n, it.stats
    return int(sizes.sum())   # the same record payload the raw rows read

  raw_sequential()            # warm the page cache (and fill `sizes` below) before any timing
  raw_shuffled()
  rows = []
  for name, fn in (("raw sequential", raw_sequential), ("raw shuffled", raw_shuffled),
                   ("grain source", grain_source), ("grain pipeline", grain_pipeline)):
    secs, nbytes = _best(fn, _REPEATS.value)
    rows.append({"name": name, "seconds": secs, "mb": nbytes / 1e6, "mb_per_s": nbytes / 1e6 / secs})
  for r in readers:
    r.close()
  ref = rows[1]["mb_per_s"]
  for r in rows:
    r["vs_raw_shuffled"] = r["mb_per_s"] / ref

  print(f"\n{n} records, {rows[0]['mb']:.1f} MB, batch {_BATCH.value}, max_length {_MAX_LENGTH.value}, "
        f"workers {_WORKERS.value}, best of {_REPEATS.value}")
  print(f"{'reader':<16} {'seconds':>9} {'MB/s':>9} {'vs raw shuffled':>16}")
  for r in rows:
    print(f"{r['name']:<16} {r['seconds']:>9.3f} {r['mb_per_s']:>9.1f} {100 * r['vs_raw_shuffled']:>15.1f}%")
  ratio = rows[3]["vs_raw_shuffled"]
  print(f"grain pipeline / raw shuffled = {100 * ratio:.1f}% (goal >= 80%): {'PASS' if ratio >= 0.8 else 'MISS'}")

  result = {"rows": rows, "goal": 0.8, "pipeline_vs_raw": ratio, "num_records": n,
            "data_dir": str(data_dir) if _DATA_DIR.value else "synthetic",
            "config": {"hidden": shard_set.hidden_size, "batch": _BATCH.value, "max_length": _MAX_LENGTH.value,
                       "workers": _WORKERS.value, "repeats": _REPEATS.value,
                       "mean_len": None if _DATA_DIR.value else _MEAN_LEN.value},
            "machine": {"platform": platform.platform(), "python": platform.python_version(),
                        "grain": grain.__version__ if hasattr(grain, "__version__") else "0.2.x"}}
  out = pathlib.Path(_OUT.value)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=1))
  print(f"wrote {out}")
  if tmp is not None:
    tmp.cleanup()


if __name__ == "__main__":
  app.run(main)
