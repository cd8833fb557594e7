"""lkjax.targets.decode against transformers' own generate and forward, on a tiny random Llama."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lkjax.targets import decode
from test_targets import make_model

torch.set_num_threads(1)

PAD, EOS = 1, 3


def _hf_greedy(model, prompts, max_new_tokens, eos=EOS):
  """``model.generate`` greedy on the same left-padded batch -> new tokens per row, cut before EOS."""
  width = max(len(p) for p in prompts)
  ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
  mask = torch.zeros_like(ids)
  for i, p in enumerate(prompts):
    ids[i, width - len(p):] = torch.tensor(p)
    mask[i, width - len(p):] = 1
  out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                       pad_token_id=PAD, eos_token_id=eos)
  rows = []
  for row in out[:, width:].tolist():
    rows.append((row[:row.index(eos)], True) if eos in row else (row, False))
  return rows


@pytest.fixture(scope="module")
def model():
  return make_model(num_layers=4, vocab_size=64, seed=1)


def _prompts(n, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(4, 64, int(rng.integers(1, 12))).tolist() for _ in range(n)]


@pytest.mark.parametrize("prefill_tokens,compact_below", [(4096, 0.0), (24, 0.99)])
def test_greedy_equals_transformers_generate(model, prefill_tokens, compact_below):
  """Chunked prefill and batch compaction leave greedy decoding token-identical to ``model.generate``."""
  prompts = _prompts(7)
  # Stop on a token that greedy decoding emits in some rows but not all, so rows end at different steps.
  free = [row for row, _ in _hf_greedy(model, prompts, 20, eos=None)]
  stop = next(t for t in sorted({t for r in free for t in r}) if 0 < sum(t in r for r in free) < len(free) - 1)
  ref = _hf_greedy(model, prompts, 20, eos=stop)
  got = decode.decode(model, prompts, max_new_tokens=20, pad_token_id=PAD, stop_token_ids=[stop],
                      prefill_tokens=prefill_tokens, compact_below=compact_below)
  assert [(d.token_ids, d.finished) for d in got] == ref
  assert any(f for _, f in ref) and not all(f for _, f in ref)   # the test exercised both kinds of row


def test_sampling_is_seeded_and_follows_the_model(model):
  prompts = _prompts(5, seed=2)
  a = decode.decode(model, prompts, max_new_tokens=8, pad_token_id=PAD, stop_token_ids=[EOS], temperature=1.0,
                    seed=4)
  b = decode.decode(model, prompts, max_new_tokens=8, pad_token_id=PAD, stop_token_ids=[EOS], temperature=1.0,
                    seed=4)
  assert [d.token_ids for d in a] == [d.token_ids for d in b]
  # One sampled step from a single prompt: its frequencies follow softmax(logits) (chi-square-style bound).
  p = [5, 6, 7]
  with torch.no_grad():
    probs = torch.softmax(model(input_ids=torch.tensor([p])).logits[0, -1], -1).numpy()
  draws = decode.decode(model, [p] * 400, max_new_tokens=1, pad_token_id=PAD, stop_token_ids=(),
                        temperature=1.0, seed=0)
  counts = np.bincount([d.token_ids[0] for d in draws], minlength=probs.size)
  top = np.argsort(probs)[-5:]
  freq, want = counts[top] / 400, probs[top]
  assert np.all(np.abs(freq - want) <= 4 * np.sqrt(want * (1 - want) / 400) + 0.005), (freq, want)


def test_preallocated_cache_matches_dynamic_cache(model):
  """Features through the preallocated cache, fed in pieces with a crop, equal one full forward."""
  ids = torch.tensor([_prompts(1, seed=3)[0] + [9, 10, 11, 12, 13]])
  with torch.no_grad():
    full = model(input_ids=ids).logits
    cache = decode.preallocated_cache(model, capacity=4)   # grows on demand
    n = ids.shape[1]
    model(input_ids=ids[:, :3], past_key_values=cache, use_cache=True)
    model(input_ids=ids[:, 3:n - 1], past_key_values=cache, use_cache=True)
    cache.crop(-2)                                           # drop two positions, then feed them again
    assert cache.get_seq_length() == n - 3
    out = model(input_ids=ids[:, n - 3:], past_key_values=cache, use_cache=True,
                position_ids=torch.arange(n - 3, n)[None])
  torch.testing.assert_close(out.logits, full[:, n - 3:], rtol=1e-5, atol=1e-5)


def test_empty_prompt_is_an_error(model):
  with pytest.raises(ValueError, match="at least one token"):
    decode.decode(model, [[5], []], max_new_tokens=2, pad_token_id=PAD)


def test_on_step_counts_every_emitted_token(model):
  prompts = _prompts(6, seed=5)
  counts = []
  out = decode.decode(model, prompts, max_new_tokens=9, pad_token_id=PAD, stop_token_ids=[EOS, 7, 9],
                      temperature=1.0, seed=1, compact_below=0.9, on_step=counts.append)
  assert len(counts) >= 1 and sum(counts) == sum(len(d.token_ids) + d.finished for d in out)
