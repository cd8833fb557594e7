"""The study data set's snapshot / restore: committed token ids come back byte for byte and never clobber work."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
from absl import flags

HERE = os.path.dirname(os.path.abspath(__file__))


def _module():
  """experiments/study/dataset.py, loaded once (its absl flags can be defined only once per process)."""
  import sys

  if "study_dataset" not in sys.modules:
    spec = importlib.util.spec_from_file_location("study_dataset", os.path.join(HERE, "dataset.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules["study_dataset"] = mod
  return sys.modules["study_dataset"]


@pytest.fixture
def ds(tmp_path, monkeypatch):
  mod = _module()
  monkeypatch.setattr(mod, "SNAPSHOT", tmp_path / "snap" / "replies.jsonl.gz")
  monkeypatch.setattr(mod, "MANIFEST", tmp_path / "snap" / "manifest.json")
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return mod


def _lines(n, start=0):
  return "".join(json.dumps({"id": str(i), "prompt": "p", "reply": "r", "finished": i % 2 == 0,
                             "reply_ids": [5] * (i + 1)}) + "\n" for i in range(start, n))


def test_snapshot_then_restore_round_trips(ds, tmp_path, monkeypatch):
  work = tmp_path / "work"
  work.mkdir()
  (work / "replies.jsonl").write_text(_lines(3) + '{"id": "3", "prom')   # a write cut short by a kill
  flags.FLAGS["dir"].value = str(work)
  ds.cmd_snapshot()
  m = json.loads(ds.MANIFEST.read_text())
  assert m["num_replies"] == 3 and m["reply_tokens"] == 1 + 2 + 3 + 2 and not m["complete"]
  first = ds.SNAPSHOT.read_bytes()
  ds.cmd_snapshot()
  assert ds.SNAPSHOT.read_bytes() == first                               # same content, same bytes
  fresh = tmp_path / "fresh"
  flags.FLAGS["dir"].value = str(fresh)
  ds.restore()
  assert (fresh / "replies.jsonl").read_text() == _lines(3)
  (fresh / "replies.jsonl").write_text(_lines(5))                        # more work than the snapshot: kept
  ds.restore()
  assert (fresh / "replies.jsonl").read_text() == _lines(5)
  (fresh / "replies.jsonl").write_text(_lines(2, start=1))               # a different data set: refused
  with pytest.raises(ValueError, match="not a prefix"):
    ds.restore()


def test_precompute_refuses_an_incomplete_data_set(ds, tmp_path, monkeypatch):
  work = tmp_path / "work"
  work.mkdir()
  (work / "replies.jsonl").write_text(_lines(2))
  flags.FLAGS["dir"].value = str(work)
  ds.cmd_snapshot()
  with pytest.raises(ValueError, match="not complete"):
    ds.cmd_precompute()
