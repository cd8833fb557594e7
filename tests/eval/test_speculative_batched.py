"""Batched speculative evaluation (`speculative_generate_batch`): per prompt, batch-1 decoding's result.

Oracles: today's batch-1 `speculative_generate` on the same prompts and seeds (T = 0: accepted tokens and
tau identical, for all four draft architectures, prompts of different lengths, rows finishing at
different rounds); the prompt decoded alone vs inside a batch (T = 1: per-prompt random streams); exact
target sequence probabilities by enumeration (T = 1 lossless, as tests/eval/test_speculative.py); the ragged
draft ctx (``num_valid``) against committing the same positions row by row.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from lkjax.eval import run as run_lib
from lkjax.eval import speculative as spec
from lkjax.eval.verifier import BatchedVerifier, Verifier
from lkjax.models import registry

from test_evaluate import make_target
from test_speculative import exact_sequence_probs, target_info, tiny_target, tv_threshold, empirical

ARCHS = ("eagle3", "mtp", "medusa", "mlp_speculator")
K = 3
EOS = 3
MAX_NEW = 14

torch.set_num_threads(1)


def build_draft(arch: str, target, *, seed: int = 0, vocab=None):
  info = target.info if hasattr(target, "info") else target_info(target)
  embed = (target.head_weights() if hasattr(target, "head_weights")
           else {"embed_tokens": target.model.embed_tokens.weight.detach().numpy(),
                 "lm_head": target.lm_head.weight.detach().numpy(),
                 "norm": target.model.norm.weight.detach().numpy()})
  cfg = registry.default_model_config(arch, info)
  cfg.num_heads = K
  if vocab is not None:
    cfg.draft_vocab_size = len(vocab)
  return registry.build_draft(cfg, info, draft_vocab=vocab, target_weights=embed, rngs=nnx.Rngs(params=seed))


@functools.lru_cache(maxsize=None)
def tiny():
  """A TargetModel (tokenizer, chat template) for the driver test."""
  return make_target(max_positions=96)


class Model:
  """A tiny untied Llama target whose greedy answers vary (a tied one repeats its last token)."""

  def __init__(self):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                      tie_word_embeddings=False)
    torch.manual_seed(1)
    self.model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
      self.model.lm_head.weight.normal_(0.0, 2.0 / 32 ** 0.5)
    self.info = target_info(self.model)

  def head_weights(self):
    return {"embed_tokens": self.model.model.embed_tokens.weight.detach().numpy().copy(),
            "lm_head": self.model.lm_head.weight.detach().numpy().copy(),
            "norm": self.model.model.norm.weight.detach().numpy().copy()}


@functools.lru_cache(maxsize=None)
def untied() -> Model:
  return Model()


def prompt_set(n: int = 5) -> list[list[int]]:
  """Prompts of lengths 2..~30, in no particular order (the batch must not care)."""
  rng = np.random.default_rng(7)
  v = untied().info.vocab_size
  lengths = [9, 2, 30, 17, 5, 23, 12][:n]
  return [[int(t) for t in rng.integers(8, v, size=L)] for L in lengths]


@functools.lru_cache(maxsize=None)
def stop_token() -> int:
  """A token the target's greedy answers reach at different points: rows then end in different rounds."""
  verifier = Verifier(untied().model)
  outs = [spec.target_generate(verifier, p, temperature=0.0, max_new_tokens=MAX_NEW).tokens for p in prompt_set()]
  for tok in sorted({t for o in outs for t in o}):
    first = {o.index(tok) if tok in o else None for o in outs}
    if None in first and len(first - {None}) >= 2 and min(first - {None}) >= 2:
      return tok
  raise AssertionError(f"no token ends the greedy answers at different points: {outs}")


def _draft_vocab(v: int) -> np.ndarray:
  ids = np.unique(np.concatenate([[EOS], np.random.default_rng(1).choice(v, 40, replace=False)]))
  return ids.astype(np.int32)


@functools.lru_cache(maxsize=None)
def drafts(arch: str):
  target = untied()
  vocab = _draft_vocab(target.info.vocab_size) if arch in ("eagle3", "medusa") else None
  draft = build_draft(arch, target, vocab=vocab)
  return draft, run_lib.JittedDraft(draft, chunk=8)


def batch1(verifier, draft, prompts, seeds, temperature, max_new=MAX_NEW, eos=EOS):
  return [spec.speculative_generate(verifier, draft, p, num_draft=K, temperature=temperature, max_new_tokens=max_new,
                                    eos_token_id=eos, seed=s, max_context=96) for p, s in zip(prompts, seeds)]


def batched(draft, prompts, seeds, temperature, max_new=MAX_NEW, model=None, eos=EOS):
  verifier = BatchedVerifier(model if model is not None else untied().model)
  try:
    return spec.speculative_generate_batch(verifier, draft, prompts, num_draft=K, temperature=temperature,
                                           max_new_tokens=max_new, eos_token_id=eos, seeds=seeds, max_context=96)
  finally:
    verifier.close()


# ----------------------------------------------------------------------------------------------------
# T = 0: identical to batch-1 decoding


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_batched_equals_batch1(arch):
  draft, jitted = drafts(arch)
  prompts, seeds, eos = prompt_set(), [11, 12, 13, 14, 15], stop_token()
  verifier = Verifier(untied().model)
  ref = batch1(verifier, jitted, prompts, seeds, 0.0, eos=eos)
  got = batched(jitted, prompts, seeds, 0.0, eos=eos)
  for r, g in zip(ref, got):
    assert g.tokens == r.tokens
    assert g.accept_lengths == r.accept_lengths
    assert g.tau == r.tau or (np.isnan(g.tau) and np.isnan(r.tau))
    assert (g.prompt_tokens, g.stopped_by_eos) == (r.prompt_tokens, r.stopped_by_eos)
  # and both are greedy target decoding
  for p, g in zip(prompts, got):
    assert g.tokens == spec.target_generate(verifier, p, temperature=0.0, max_new_tokens=MAX_NEW,
                                            eos_token_id=eos).tokens
  # rows finished in different rounds (by the stop token or by the length), and drafts were rejected
  assert len({len(g.accept_lengths) for g in got}) > 1
  assert {g.stopped_by_eos for g in got} == {True, False}
  rounds = [a for g in got for a in g.accept_lengths]
  assert min(rounds) < K
  if arch == "eagle3":    # the untrained drafts of the other three accept nothing at T = 0 here (T = 1 does)
    assert sum(rounds) > 0


def test_greedy_batch_of_one_row():
  """A batch of one prompt is batch-1 decoding too."""
  _, jitted = drafts("eagle3")
  prompts, seeds = prompt_set(3), [1, 2, 3]
  ref = batch1(Verifier(untied().model), jitted, prompts[1:2], seeds[1:2], 0.0, max_new=8)
  one = batched(jitted, prompts[1:2], seeds[1:2], 0.0, max_new=8)[0]
  assert (one.tokens, one.accept_lengths) == (ref[0].tokens, ref[0].accept_lengths)


def test_target_generate_batch_equals_batch1():
  prompts, seeds = prompt_set(), [4, 5, 6, 7, 8]
  verifier = Verifier(untied().model)
  for t in (0.0, 1.0):
    ref = [spec.target_generate(verifier, p, temperature=t, max_new_tokens=MAX_NEW, eos_token_id=EOS, seed=s,
                                num_draft=K) for p, s in zip(prompts, seeds)]
    bv = BatchedVerifier(untied().model)
    got = spec.target_generate_batch(bv, prompts, temperature=t, max_new_tokens=MAX_NEW, eos_token_id=EOS,
                                     seeds=seeds, num_draft=K)
    bv.close()
    assert [g.tokens for g in got] == [r.tokens for r in ref]
    assert [g.stopped_by_eos for g in got] == [r.stopped_by_eos for r in ref]


# ----------------------------------------------------------------------------------------------------
# T = 1: per-prompt random streams


@pytest.mark.parametrize("arch", ARCHS)
def test_sampled_output_does_not_depend_on_the_batch(arch):
  """A prompt's T = 1 output is the same alone, in a batch, in another batch, and in batch-1 decoding."""
  _, jitted = drafts(arch)
  prompts, seeds = prompt_set(), [21, 22, 23, 24, 25]
  full = batched(jitted, prompts, seeds, 1.0)
  alone = batched(jitted, prompts[2:3], seeds[2:3], 1.0)[0]
  other = batched(jitted, [prompts[2], prompts[0]], [seeds[2], seeds[0]], 1.0)
  ref = batch1(Verifier(untied().model), jitted, prompts[2:3], seeds[2:3], 1.0)[0]
  for g in (alone, other[0], ref):
    assert (g.tokens, g.accept_lengths) == (full[2].tokens, full[2].accept_lengths)
  assert (other[1].tokens, other[1].accept_lengths) == (full[0].tokens, full[0].accept_lengths)
  # the streams differ between prompts and seeds (the test above could not pass by ignoring them)
  again = batched(jitted, prompts[2:3], [99], 1.0)[0]
  assert (again.tokens, again.accept_lengths) != (alone.tokens, alone.accept_lengths)


# ----------------------------------------------------------------------------------------------------
# T = 1: lossless (the batch's sequence distribution is the target's)


N_SAMPLES, N_NEW, PROMPT = 600, 3, [1, 4, 6, 2]


def test_lossless_sampling_batched():
  """600 copies of one prompt with 600 seeds in batches of 64: TV to the exact target law is small."""
  model = tiny_target()
  vocab = np.asarray([0, 2, 3, 5, 7], np.int32)
  draft = run_lib.JittedDraft(build_draft("eagle3", model, vocab=vocab), chunk=8)
  p = exact_sequence_probs(model, PROMPT, N_NEW)
  thr = tv_threshold(p, N_SAMPLES)
  outs, rounds = [], []
  for s in range(0, N_SAMPLES, 64):
    seeds = list(range(s, min(N_SAMPLES, s + 64)))
    res = batched(draft, [PROMPT] * len(seeds), seeds, 1.0, max_new=N_NEW, model=model, eos=None)
    outs += [r.tokens for r in res]
    rounds += [a for r in res for a in r.accept_lengths]
  assert all(len(o) == N_NEW for o in outs)
  assert 0 < sum(rounds) < K * len(rounds)          # acceptances and rejections both happened
  tv = 0.5 * np.abs(empirical(outs, 8, N_NEW) - p).sum()
  assert tv < thr, (tv, thr)


def test_lossless_batched_catches_a_broken_rule(monkeypatch):
  """The same test fails when every draft token is accepted (no ratio test): it has power."""
  model = tiny_target()
  draft = run_lib.JittedDraft(build_draft("eagle3", model, vocab=np.asarray([0, 2, 3, 5, 7], np.int32)), chunk=8)
  p = exact_sequence_probs(model, PROMPT, N_NEW)

  def accept_all(draft_tokens, q, p_, generator):
    k = len(draft_tokens)
    return k, int(torch.multinomial(p_[k], 1, generator=generator))

  monkeypatch.setattr(spec, "verify_sampled", accept_all)
  outs = []
  for s in range(0, N_SAMPLES, 100):
    outs += [r.tokens for r in batched(draft, [PROMPT] * 100, list(range(s, s + 100)), 1.0, max_new=N_NEW,
                                       model=model, eos=None)]
  tv = 0.5 * np.abs(empirical(outs, 8, N_NEW) - p).sum()
  assert tv > tv_threshold(p, N_SAMPLES), tv


# ----------------------------------------------------------------------------------------------------
# Pieces


@pytest.mark.parametrize("arch", ARCHS)
def test_ragged_ctx_commits_like_rows_one_by_one(arch):
  """``num_valid``: right-aligned ragged rows give each row the drafts of its own batch-1 commits
  (through `JittedDraft`, which also splits the ragged block into commit chunks)."""
  _, draft = drafts(arch)
  info = untied().info
  rng = np.random.default_rng(0)
  n, w = 3, 5
  valid = np.asarray([5, 2, 0], np.int32)
  full = dict(aux_hidden=rng.normal(size=(n, w, info.num_aux * info.hidden_size)).astype(np.float32),
              final_hidden=rng.normal(size=(n, w, info.hidden_size)).astype(np.float32),
              next_tokens=rng.integers(8, info.vocab_size, size=(n, w)).astype(np.int32),
              positions=np.broadcast_to(np.arange(w, dtype=np.int32), (n, w)).copy())
  first = {k: v[:, :2] for k, v in full.items()}      # every row first commits 2 positions
  rest = {k: v[:, 2:] for k, v in full.items()}
  cache = draft.init_cache(n, 16)
  cache, _, _ = draft.propose(cache, first, num_tokens=1, temperature=0.0, rng=None)
  # then a ragged commit of the last `valid` entries of a width-3 block (row 2: nothing)
  block = {k: np.zeros_like(v) for k, v in rest.items()}
  for b in range(n):
    m = min(int(valid[b]), 3)
    for k in block:
      block[k][b, 3 - m:] = rest[k][b, :m]
    block["positions"][b, 3 - m:] = 2 + np.arange(m)
  _, toks, logits = draft.propose(cache, dict(block, num_valid=np.minimum(valid, 3)), num_tokens=K,
                                  temperature=0.0, rng=None)
  for b in range(n):
    m = min(int(valid[b]), 3)
    c1 = draft.init_cache(1, 16)
    c1, _, _ = draft.propose(c1, {k: v[b:b + 1] for k, v in first.items()}, num_tokens=1, temperature=0.0, rng=None)
    one = {k: v[b:b + 1, :m] for k, v in rest.items()}
    one["positions"] = 2 + np.arange(m, dtype=np.int32)[None]
    _, t1, l1 = draft.propose(c1, one, num_tokens=K, temperature=0.0, rng=None)
    np.testing.assert_array_equal(np.asarray(toks)[b], np.asarray(t1)[0])
    np.testing.assert_allclose(np.asarray(logits)[b], np.asarray(l1)[0], atol=2e-5)


def test_row_keys_sample_each_row_like_batch1():
  from lkjax.models import layers as L

  logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 9)), jnp.float32)
  keys = jnp.stack([jax.random.key(s) for s in (3, 4, 5, 6)])
  got = L.sample_tokens(logits, 1.0, keys)
  for b in range(4):
    assert int(got[b]) == int(L.sample_tokens(logits[b:b + 1], 1.0, keys[b])[0])
  split = L.split_keys(keys, 3)
  for b in range(4):
    one = L.split_keys(keys[b], 3)
    for i in range(3):
      assert np.array_equal(jax.random.key_data(split[i][b]), jax.random.key_data(one[i]))


def test_batched_verifier_masks_holes():
  """After ragged commits, each row's next logits equal a no-cache forward of its own committed tokens."""
  model = untied().model
  v = BatchedVerifier(model)
  prompts = [[9, 10, 11, 12], [13, 14]]
  v.start(prompts)
  v.feed([[20, 21, 22], [23, 24, 25]])
  v.commit([3, 1])
  v.feed([[30, 31], [32, 33]])
  v.commit([0, 2])
  step = v.feed([[40], [41]])
  seqs = [prompts[0] + [20, 21, 22, 40], prompts[1] + [23, 32, 33, 41]]
  for b, s in enumerate(seqs):
    with torch.no_grad():
      ref = model(torch.as_tensor([s])).logits[0, -1]
    np.testing.assert_allclose(step.logits[b, -1].numpy(), ref.numpy(), atol=1e-4)
  assert v.lengths.tolist() == [7, 5]
  with pytest.raises(ValueError, match="keep"):
    v.commit([2, 0])
  v.close()


def test_batched_args_are_checked():
  _, jitted = drafts("eagle3")
  v = BatchedVerifier(untied().model)
  with pytest.raises(ValueError, match="seeds"):
    spec.speculative_generate_batch(v, jitted, [[9, 10]], num_draft=K, temperature=0.0, max_new_tokens=4,
                                    seeds=[1, 2])
  with pytest.raises(ValueError, match="prompts"):
    spec.speculative_generate_batch(v, jitted, [], num_draft=K, temperature=0.0, max_new_tokens=4, seeds=[])
  v.close()


# ----------------------------------------------------------------------------------------------------
# The evaluation driver


def test_evaluate_draft_batched_equals_batch1():
  """``batch_size`` changes no answer, acceptance record or tau (multi-turn included), at T = 0 and 1."""
  from test_evaluate import prompts as eval_prompts

  target = tiny()
  draft = build_draft("eagle3", target, vocab=_draft_vocab(target.info.vocab_size))
  kw = dict(benchmarks=("mt_bench", "humaneval"), temperatures=(0.0, 1.0), num_draft=K, max_new_tokens=8,
            max_context=96, seed=3, prompts=eval_prompts(), num_threads=1, progress=False, n_boot=50,
            commit_chunk=8, warmup=False)
  one = run_lib.evaluate_draft(draft, target, batch_size=1, **kw)
  many = run_lib.evaluate_draft(draft, target, batch_size=3, **kw)
  key = lambda r: (r["benchmark"], r["temperature"], r["id"], r["turn"])
  fields = ("accept_lengths", "new_tokens", "stopped_by_eos", "prompt_tokens", "target_new_tokens", "tau")
  a = {key(r): tuple(r[f] for f in fields) for r in one["prompts"]}
  b = {key(r): tuple(r[f] for f in fields) for r in many["prompts"]}
  assert a == b and len(a) == 2 * (2 * 2 + 2)
  assert many["meta"]["batch_size"] == 3 and one["meta"]["batch_size"] == 1
  for t in ("0", "1"):
    for bench in ("mt_bench", "humaneval"):
      assert (many["temperatures"][t]["benchmarks"][bench]["tau"]
              == pytest.approx(one["temperatures"][t]["benchmarks"][bench]["tau"]))


def test_batch_plan_sorts_by_length():
  assert run_lib.batch_plan([5, 1, 4, 2, 3], 2) == [[1, 3], [4, 2], [0]]
  assert run_lib._batch_sizes({"b": eval_prompts_of(5)}, 2) == [1, 2]


def eval_prompts_of(n):
  from lkjax.data.benchmarks import EvalPrompt

  return [EvalPrompt("b", str(i), ("a b",) * (1 + i % 2)) for i in range(n)]
