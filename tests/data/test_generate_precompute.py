"""Regeneration + precompute on a tiny random Llama: selection, resume, shard round trip, counts, bad input."""
from __future__ import annotations

import json
import os
import warnings

import ml_dtypes
import numpy as np
import pytest
import torch

from lkjax.data import generate, precompute, shards
from lkjax.data.generate import EvalOverlap, Prompt
from test_targets import WORDS, make_target

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def target():
  return make_target()


def _prompts(n, seed=0):
  rng = np.random.default_rng(seed)
  return [Prompt(f"p{i}", " ".join(rng.choice(WORDS, size=int(rng.integers(2, 9))))) for i in range(n)]


class Recording:
  """Wraps a target and records every prompt it generates for."""

  def __init__(self, target):
    self.target, self.seen = target, []
    self.info = target.info

  def generate(self, prompts, **kw):
    self.seen.extend(prompts)
    return self.target.generate(prompts, **kw)


# --- selection ---------------------------------------------------------------------------------------------

def test_eval_overlap_rule():
  ov = EvalOverlap(["Write a Python function that reverses a list of numbers, please!", "Hi"],
                   min_overlap_chars=20)
  assert ov("write a python function that REVERSES a list of numbers please")   # normalised equality
  assert ov("hi")                                                              # short: exact only
  assert not ov("hi there")
  assert ov("Intro. Write a python function that reverses a list of numbers, please. Thanks")  # contains
  assert ov("function that reverses a list of numbers")                        # contained, long enough
  assert not ov("reverses a list")                                             # contained but short
  assert not ov("write a haskell function that reverses a list of numbers")


def test_select_prompts_counts_and_exclusions(tmp_path):
  convs = [
      {"id": "a", "conversations": [{"from": "human", "value": "tell me a story about the cat"},
                                    {"from": "gpt", "value": "x"}]},
      {"id": "b", "conversations": [{"from": "gpt", "value": "I start"}]},
      {"id": "c", "conversations": []},
      {"id": "d", "conversations": [{"from": "human", "value": "   "}]},
      {"id": "e", "conversations": [{"from": "human", "value": "Tell me a story about the cat!"}]},  # dup text
      {"id": "f", "conversations": [{"from": "human", "value": "Compose an engaging travel blog post about "
                                                               "a recent trip to Hawaii"}]},
      {"id": "g", "conversations": [{"from": "human", "value": "what is the sun " * 50}]},
      {"id": "h", "conversations": [{"from": "human", "value": "why is the sky blue"}]},
  ]
  path = tmp_path / "sharegpt.json"
  path.write_text(json.dumps(convs))
  ov = EvalOverlap(["Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural "
                    "experiences and must-see attractions."])
  got, counts = generate.select_prompts(path, 2, overlap=ov, seed=0, max_prompt_chars=200)
  assert sorted(p.id for p in got) in (["a", "h"], ["e", "h"])
  assert set(p.text for p in got) <= {"tell me a story about the cat", "Tell me a story about the cat!",
                                      "why is the sky blue"}
  with pytest.raises(ValueError, match="only 2 usable prompts"):
    generate.select_prompts(path, 3, overlap=ov, seed=0, max_prompt_chars=200)
  # all conversations scanned when asking for more than exist: every skip reason counted once
  with pytest.raises(ValueError) as err:
    generate.select_prompts(path, 8, overlap=ov, seed=0, max_prompt_chars=200)
  msg = str(err.value)
  for key, n in dict(conversations=8, source_truncated=0, scanned=8, no_human_first_turn=2, empty=1, duplicate=1, too_long=1, eval_overlap=1,
                     selected=2).items():
    assert f"'{key}': {n}" in msg


def test_sharegpt_truncated_file_keeps_complete_conversations(tmp_path, capsys):
  convs = [{"id": str(i), "conversations": [{"from": "human", "value": f"what is {i}"}]} for i in range(3)]
  full = json.dumps(convs, indent=2)
  cut = tmp_path / "cut.json"
  cut.write_text(full[:full.index('"2"') + 5])   # ends inside the third conversation
  with warnings.catch_warnings():
    warnings.simplefilter("error")   # a known, handled condition: one lkjax line, no UserWarning
    data, truncated = generate.load_sharegpt(cut)
  assert truncated and data == convs[:2]
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "[lkjax] cut.json ends inside conversation 2" in err
  ok = tmp_path / "ok.json"
  ok.write_text(full)
  assert generate.load_sharegpt(ok) == (convs, False)
  bad = tmp_path / "bad.json"
  bad.write_text(full.replace('"what is 1"', '"what is 1" oops'))
  with pytest.raises(ValueError, match="bad.json: conversation 1 is not valid JSON"):
    generate.load_sharegpt(bad)


# --- generation resume -------------------------------------------------------------------------------------

def test_generation_resume_nothing_twice_nothing_lost(target, tmp_path):
  prompts = _prompts(7)
  ref_path = tmp_path / "ref.jsonl"
  generate.generate_replies(target, prompts, ref_path, max_new_tokens=5, batch_size=3, progress=False)
  ref = {r["id"]: r for r in generate.read_replies(ref_path)[0]}

  out = tmp_path / "out.jsonl"
  rec = Recording(target)
  s1 = generate.generate_replies(rec, prompts, out, max_new_tokens=5, batch_size=3, max_batches=1, progress=False)
  assert not s1["complete"] and s1["num_written"] == 3
  with open(out, "a") as f:   # a kill in the middle of writing the next batch
    f.write('{"id": "p3", "prompt": "the ca')
  with pytest.raises(ValueError, match="last line is incomplete"):
    generate.read_replies(out)
  s2 = generate.generate_replies(rec, prompts, out, max_new_tokens=5, batch_size=3, progress=False)
  assert s2["complete"] and s2["repaired_partial_line"] and s2["num_written"] == 7
  assert sorted(rec.seen) == sorted(p.text for p in prompts)   # every prompt generated exactly once
  got = generate.read_replies(out)[0]
  assert [r["id"] for r in got] == [p.id for p in sorted(prompts, key=lambda p: len(p.text))]
  for r in got:   # greedy + the same fixed batches: identical to the uninterrupted run
    assert r == ref[r["id"]]
  summary = json.loads(generate.summary_path(out).read_text())
  assert summary["num_written"] == 7 and summary["complete"]
  # a third run has nothing to do
  rec.seen.clear()
  generate.generate_replies(rec, prompts, out, max_new_tokens=5, batch_size=3, progress=False)
  assert rec.seen == []


def test_generation_counts_empty_replies_and_rejects_foreign_ids(target, tmp_path):
  class Empty(Recording):
    def generate(self, prompts, **kw):
      gens = super().generate(prompts, **kw)
      for p, g in zip(prompts, gens):
        if p == prompts[0]:
          g.text = "  "
      return gens

  prompts = _prompts(4)
  out = tmp_path / "r.jsonl"
  s = generate.generate_replies(Empty(target), prompts, out, max_new_tokens=3, batch_size=2, progress=False)
  assert s["num_empty"] == 2 and s["num_written"] == 4
  with pytest.raises(ValueError, match="not in this prompt selection"):
    generate.generate_replies(target, _prompts(2, seed=5)[:1] + [Prompt("zz", "x")], out, max_new_tokens=3,
                              progress=False)
  lines = out.read_text().splitlines()
  lines[1] = "{not json"
  out.write_text("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match=r"r\.jsonl:2: malformed"):
    generate.read_replies(out, repair=True)


# --- precompute --------------------------------------------------------------------------------------------

def _write_replies(path, items):
  path.write_text("".join(json.dumps(dict(id=i, prompt=p, reply=r, finished=True)) + "\n" for i, p, r in items))


def _items(n, seed=0):
  rng = np.random.default_rng(seed)
  return [(f"r{i}", " ".join(rng.choice(WORDS, size=int(rng.integers(2, 8)))),
           " ".join(rng.choice(WORDS, size=int(rng.integers(1, 10))))) for i in range(n)]


def test_records_round_trip_exactly(target, tmp_path):
  seqs = [target.encode_conversation(p, r) for _, p, r in _items(5)]
  recs = precompute.compute_records(target, seqs, batch_tokens=40)
  shards.write_shard(tmp_path / "s.array_record", [shards.encode_record(r) for r in recs])
  back = shards.read_shard(tmp_path / "s.array_record")
  assert len(back) == 5
  for a, b in zip(recs, back):
    assert set(a) == set(b)
    for k in a:
      assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
      np.testing.assert_array_equal(a[k].view(np.uint8), b[k].view(np.uint8))


def test_precompute_matches_target_and_manifest(target, tmp_path):
  items = _items(9)
  src = tmp_path / "replies.jsonl"
  _write_replies(src, items)
  out = tmp_path / "shards"
  m = precompute.precompute(target, src, out, max_length=64, shard_size=4, batch_tokens=48, progress=False)
  man = shards.read_manifest(out)
  assert m == man
  assert [s["file"] for s in man["shards"]] == [f"shard-{i:05d}.array_record" for i in range(3)]
  assert [s["num_records"] for s in man["shards"]] == [4, 4, 1]
  freqs = np.zeros(64, np.int64)
  n_tok = n_loss = 0
  w = shards.load_target_weights(out)
  assert man["target_lse"] is True
  for s, chunk in zip(man["shards"], [items[0:4], items[4:8], items[8:]]):
    recs = shards.read_shard(out / s["file"])
    assert sum(len(r["input_ids"]) for r in recs) == s["num_tokens"]
    for r, (_, p, rep) in zip(recs, chunk):
      shards.validate_record(r, hidden_size=32, num_aux=3)
      ids, mask = target.encode_conversation(p, rep)
      np.testing.assert_array_equal(r["input_ids"], ids)
      np.testing.assert_array_equal(r["loss_mask"], mask)
      f = target.features(ids[None])   # oracle: unbatched float32 forward
      np.testing.assert_allclose(r["aux_hidden"].astype(np.float32), f.aux_hidden[0].numpy(), rtol=1e-2, atol=1e-2)
      np.testing.assert_allclose(r["final_hidden"].astype(np.float32), f.final_hidden[0].numpy(), rtol=1e-2,
                                 atol=1e-2)
      assert r["aux_hidden"].dtype == np.dtype(ml_dtypes.bfloat16)
      # target_lse: the full-vocabulary logsumexp of the logits from the STORED (bf16) final hidden state.
      logits = r["final_hidden"].astype(np.float64) @ w["lm_head"].astype(np.float64).T
      mx = logits.max(-1)
      np.testing.assert_allclose(r["target_lse"], mx + np.log(np.exp(logits - mx[:, None]).sum(-1)),
                                 rtol=1e-5, atol=1e-5)
      freqs += np.bincount(ids[mask == 1], minlength=64)
      n_tok += len(ids)
      n_loss += int(mask.sum())
  assert man["token_freqs"] == freqs.tolist()
  assert (man["num_records"], man["num_tokens"], man["num_loss_tokens"]) == (9, n_tok, n_loss)
  assert man["target"] == target.info.to_dict() and man["dtype"] == "bfloat16"
  assert (man["truncated"], man["skipped_empty"]) == (0, 0)
  np.testing.assert_array_equal(w["norm"], target.model.model.norm.weight.detach().numpy())


def test_precompute_resume_skips_finished_shards(target, tmp_path):
  src = tmp_path / "replies.jsonl"
  _write_replies(src, _items(10, seed=1))
  out = tmp_path / "shards"
  assert precompute.precompute(target, src, out, max_length=64, shard_size=3, max_shards=2, progress=False) is None
  assert not (out / shards.MANIFEST_FILE).exists()
  first = out / "shard-00000.array_record"
  stamp = first.stat().st_mtime_ns, first.stat().st_ino
  calls = []
  orig = target.features
  target.features = lambda ids, attn=None, **kw: calls.append(ids.shape[0]) or orig(ids, attn, **kw)
  try:
    man = precompute.precompute(target, src, out, max_length=64, shard_size=3, progress=False)
  finally:
    del target.features
  assert sum(calls) == 4   # only shards 2 (3 seqs) and 3 (1 seq) were computed
  assert (first.stat().st_mtime_ns, first.stat().st_ino) == stamp
  fresh = precompute.precompute(target, src, tmp_path / "fresh", max_length=64, shard_size=3, progress=False)
  assert man["token_freqs"] == fresh["token_freqs"] and man["shards"] == fresh["shards"]
  for s in man["shards"]:
    for a, b in zip(shards.read_shard(out / s["file"]), shards.read_shard(tmp_path / "fresh" / s["file"])):
      for k in a:
        np.testing.assert_array_equal(a[k].view(np.uint8), b[k].view(np.uint8))
  # different settings against the same directory: refused, naming the progress file
  with pytest.raises(ValueError, match="precompute_progress.json"):
    precompute.precompute(target, src, out, max_length=32, shard_size=3, progress=False)


def test_precompute_started_without_target_lse_finishes_without_it(target, tmp_path):
  """A directory begun without target_lse (or by a version without it) is finished the same way: no mixed shards."""
  src = tmp_path / "replies.jsonl"
  _write_replies(src, _items(6, seed=2))
  out = tmp_path / "shards"
  assert precompute.precompute(target, src, out, max_length=64, shard_size=3, max_shards=1, progress=False,
                               target_lse=False) is None
  with pytest.warns(UserWarning, match="started without target_lse"):
    man = precompute.precompute(target, src, out, max_length=64, shard_size=3, progress=False)
  assert man["target_lse"] is False
  for s in man["shards"]:
    assert all("target_lse" not in r for r in shards.read_shard(out / s["file"]))


def test_truncation_and_empty_counts(target, tmp_path):
  long_prompt = " ".join(["the"] * 40)
  items = [("ok", "the cat", "sat on the mat"), ("empty", "the dog", "   "),
           ("trunc", "the cat", " ".join(["big"] * 30)), ("nolos", long_prompt, "yes")]
  src = tmp_path / "replies.jsonl"
  _write_replies(src, items)
  with pytest.warns(UserWarning) as rec:
    man = precompute.precompute(target, src, tmp_path / "o", max_length=20, shard_size=10, progress=False)
  msgs = " ".join(str(w.message) for w in rec)
  assert "id 'empty'" in msgs and "id 'nolos'" in msgs and "replies.jsonl:2" in msgs
  assert (man["num_records"], man["truncated"], man["skipped_empty"], man["skipped_no_loss_tokens"]) == (2, 2, 1, 1)
  assert {s["id"] for s in man["skipped"]} == {"empty", "nolos"}
  recs = shards.read_shard(tmp_path / "o" / man["shards"][0]["file"])
  assert [len(r["input_ids"]) for r in recs] == [len(target.encode_conversation("the cat", "sat on the mat")[0]), 20]


def test_bad_inputs_name_the_file_and_record(target, tmp_path):
  src = tmp_path / "replies.jsonl"
  _write_replies(src, _items(3))
  out = tmp_path / "o"
  precompute.precompute(target, src, out, max_length=64, shard_size=8, progress=False)
  shard = out / "shard-00000.array_record"
  # truncated shard file
  data = shard.read_bytes()
  bad = tmp_path / "bad.array_record"
  bad.write_bytes(data[:len(data) // 2])
  with pytest.raises(shards.ShardError, match="bad.array_record"):
    shards.read_shard(bad)
  # a record with the wrong schema
  rec = shards.read_shard(shard)[1]
  wrong = dict(rec, loss_mask=rec["loss_mask"].astype(np.int32))
  shards.write_shard(tmp_path / "w.array_record", [shards.encode_record(wrong)])
  back = shards.read_shard(tmp_path / "w.array_record")[0]
  with pytest.raises(shards.ShardError, match="w.array_record record 0.*loss_mask"):
    shards.validate_record(back, where="w.array_record record 0")
  # missing manifest
  os.remove(out / shards.MANIFEST_FILE)
  with pytest.raises(FileNotFoundError, match="manifest.json"):
    shards.read_manifest(out)
  # a partial replies file is refused by precompute (finish generation first)
  with open(src, "a") as f:
    f.write('{"id": "x", "pro')
  with pytest.raises(ValueError, match="replies.jsonl: the last line is incomplete"):
    precompute.precompute(target, src, tmp_path / "o2", progress=False)
