"""Exact speculative decoding: lossless at T = 1 (sequence distribution), identical to greedy at T = 0.

Oracles: exact target sequence probabilities by enumeration (a batched no-cache forward of every
continuation), a fresh no-cache forward for the draft features, and closed-form rejection-sampling marginals.
"""
from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lkjax.eval import speculative as spec
from lkjax.eval.verifier import Verifier
from lkjax.models.base import Frozen
from lkjax.targets.info import TargetInfo

V, H, LAYERS, CTX = 8, 16, 4, 32
AUX = (2, 2, 1)  # eagle3_aux_layer_ids(4)
PROMPT = [1, 4, 6, 2]

# Tiny matrices: torch's default thread pool only adds contention on the shared CI cores.
torch.set_num_threads(1)


@functools.lru_cache(maxsize=None)
def tiny_target(vocab: int = V, seed: int = 0) -> LlamaForCausalLM:
  cfg = LlamaConfig(vocab_size=vocab, hidden_size=H, intermediate_size=32, num_hidden_layers=LAYERS,
                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=CTX,
                    tie_word_embeddings=False)
  torch.manual_seed(seed)
  model = LlamaForCausalLM(cfg).eval()
  with torch.no_grad():
    # Logit std ~2.5 (the init gives ~0.1): peaked enough that short sequences have few likely outcomes.
    model.lm_head.weight.normal_(0.0, 2.5 / H ** 0.5)
  return model


def target_info(model) -> TargetInfo:
  c = model.config
  return TargetInfo(name="tiny-llama", model_type="llama", num_layers=c.num_hidden_layers,
                    hidden_size=c.hidden_size, vocab_size=c.vocab_size,
                    num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                    head_dim=c.hidden_size // c.num_attention_heads, intermediate_size=c.intermediate_size,
                    rms_norm_eps=c.rms_norm_eps, rope_theta=10000.0,
                    max_position_embeddings=c.max_position_embeddings)


@functools.partial(jax.jit, static_argnames=("num_tokens", "temperature"))
def _draft_chain(table, w, vocab, last, feat, key, *, num_tokens, temperature):
  """Draft logits = table[last token] (+ feat @ w at the first step); chained through own tokens."""
  toks, logits = [], []
  tok = last
  for i in range(num_tokens):
    z = table[tok] + (feat @ w if i == 0 else 0.0)
    if temperature == 0:
      idx = jnp.argmax(z, axis=-1)
    else:
      key, sub = jax.random.split(key)
      idx = jax.random.categorical(sub, z / temperature, axis=-1)
    tok = vocab[idx]
    toks.append(tok)
    logits.append(z)
  return jnp.stack(toks, 1), jnp.stack(logits, 1)


class TableDraft:
  """A protocol-honest test draft: a logit table indexed by the last token, plus a feature term.

  ``vocab`` (target ids of the draft ids) makes it a truncated-vocabulary draft when shorter than V.
  ``greedy_always`` is the vLLM bug: it drafts greedily even when asked to sample.
  """

  def __init__(self, table, vocab=None, feat_dim=(len(AUX) + 1) * H, seed=0, greedy_always=False,
               record=False):
    table = np.asarray(table, np.float32)
    self.draft_vocab_size = table.shape[1]
    self.num_heads = 3
    self.draft_vocab = None if vocab is None else Frozen(jnp.asarray(vocab, jnp.int32))
    self._vocab = jnp.arange(table.shape[1], dtype=jnp.int32) if vocab is None else jnp.asarray(vocab, jnp.int32)
    self._table = jnp.asarray(table)
    self._w = jnp.asarray(np.random.default_rng(seed).normal(0, 0.1, (feat_dim, table.shape[1])), jnp.float32)
    self.greedy_always = greedy_always
    self.log = [] if record else None

  def init_cache(self, batch_size, max_len):
    return dict(last=jnp.zeros((batch_size,), jnp.int32),
                feat=jnp.zeros((batch_size, self._w.shape[0]), jnp.float32),
                length=jnp.zeros((batch_size,), jnp.int32))

  def propose(self, cache, ctx, *, num_tokens, temperature, rng, forced_tokens=None):
    if self.log is not None:
      self.log.append({k: np.asarray(v) for k, v in ctx.items()})
    feat = jnp.concatenate([ctx["aux_hidden"][:, -1], ctx["final_hidden"][:, -1]], axis=-1)
    cache = dict(last=ctx["next_tokens"][:, -1], feat=feat,
                 length=cache["length"] + ctx["next_tokens"].shape[1])
    t = 0.0 if self.greedy_always else float(temperature)
    toks, logits = _draft_chain(self._table, self._w, self._vocab, cache["last"], feat, rng,
                                num_tokens=num_tokens, temperature=t)
    return cache, toks, logits


def single_token_logits(model) -> np.ndarray:
  """Target logits after a one-token context, ``[V, V]``: a draft table that agrees with it often."""
  with torch.no_grad():
    return model(torch.arange(model.config.vocab_size)[:, None]).logits[:, 0].double().numpy()


def make_draft(model, vocab=None, noise=1.0, seed=0, **kw) -> TableDraft:
  table = single_token_logits(model)
  table = table + np.random.default_rng(seed).normal(0, noise, table.shape)
  if vocab is not None:
    table = table[:, vocab]
  return TableDraft(table, vocab=vocab, seed=seed, **kw)


def exact_sequence_probs(model, prompt, n_new, temperature=1.0) -> np.ndarray:
  """``P_target(s)`` for every ``s in V^n_new`` (row-major over the product), by one batched forward."""
  vocab = model.config.vocab_size
  seqs = np.array(list(itertools.product(range(vocab), repeat=n_new)), np.int64)
  ids = torch.as_tensor(np.concatenate([np.tile(prompt, (len(seqs), 1)), seqs[:, :-1]], 1))
  with torch.no_grad():
    logits = model(ids).logits[:, len(prompt) - 1:].double().numpy()
  logp = logits / temperature - np.logaddexp.reduce(logits / temperature, axis=-1, keepdims=True)
  return np.exp(np.take_along_axis(logp, seqs[:, :, None], -1)[..., 0].sum(1))


def empirical(outputs, vocab, n_new) -> np.ndarray:
  idx = np.zeros(len(outputs), np.int64)
  for t in range(n_new):
    idx = idx * vocab + np.array([o[t] for o in outputs])
  return np.bincount(idx, minlength=vocab ** n_new) / len(outputs)


def tv_threshold(p: np.ndarray, n: int, quantile=0.999, reps=4000) -> float:
  """The ``quantile`` of TV(empirical, p) for n iid draws from p (simulated in numpy)."""
  counts = np.random.default_rng(123).multinomial(n, p, size=reps)
  return float(np.quantile(0.5 * np.abs(counts / n - p).sum(1), quantile))


# ----------------------------------------------------------------------------------------------------
# Rejection step in isolation


def _rand_dist(rng, v, zeros=()):
  x = rng.gamma(0.5, size=v)
  x[list(zeros)] = 0
  return x / x.sum()


def test_residual_marginal_is_exactly_p():
  """min(p, q) + (1 - alpha) * normalise(max(p - q, 0)) = p, for full and truncated q (float64 oracle)."""
  rng = np.random.default_rng(0)
  for zeros in [(), (1, 4, 6)]:
    p, q = _rand_dist(rng, 9), _rand_dist(rng, 9, zeros)
    r = spec.residual_distribution(torch.as_tensor(p), torch.as_tensor(q)).numpy()
    alpha = np.minimum(p, q).sum()
    np.testing.assert_allclose(np.minimum(p, q) + (1 - alpha) * r, p, atol=1e-12)
    np.testing.assert_allclose(r, np.maximum(p - q, 0) / np.maximum(p - q, 0).sum(), atol=1e-12)


def test_verify_sampled_marginals_match_closed_form():
  """K=2 chain with q_2 independent of d_1: emitted-first-token law = p_1; acceptance counts match
  P(a >= 1) = alpha_1, P(a = 2) = alpha_1 * alpha_2 (Monte Carlo vs closed form)."""
  rng = np.random.default_rng(1)
  v = 6
  p = np.stack([_rand_dist(rng, v), _rand_dist(rng, v), _rand_dist(rng, v)])
  q = np.stack([_rand_dist(rng, v, (0, 3)), _rand_dist(rng, v)])
  pt, qt = torch.as_tensor(p), torch.as_tensor(q)
  gen = torch.Generator().manual_seed(0)
  n = 12000
  d = np.stack([rng.choice(v, size=n, p=q[0]), rng.choice(v, size=n, p=q[1])], 1)
  first, acc = np.zeros(n, np.int64), np.zeros(n, np.int64)
  for j in range(n):
    a, y = spec.verify_sampled(d[j], qt, pt, gen)
    acc[j] = a
    first[j] = d[j, 0] if a >= 1 else y
  alpha = np.minimum(p[:2], q).sum(1)
  se = lambda x: 4.5 * np.sqrt(x * (1 - x) / n) + 1e-9
  freq = np.bincount(first, minlength=v) / n
  assert np.all(np.abs(freq - p[0]) < se(p[0])), (freq, p[0])
  assert abs(np.mean(acc >= 1) - alpha[0]) < se(alpha[0])
  assert abs(np.mean(acc == 2) - alpha.prod()) < se(alpha.prod())
  # a draft token outside the draft's own support is a protocol violation
  with pytest.raises(ValueError, match="draft probability 0"):
    spec.verify_sampled(np.array([0, 1]), qt, pt, gen)


def test_verify_greedy_hand_example():
  logits = torch.tensor([[0., 3., 1.], [2., 0., 1.], [0., 0., 5.]])
  assert spec.verify_greedy(np.array([1, 0]), logits) == (2, 2)   # both accepted, bonus argmax row 2
  assert spec.verify_greedy(np.array([1, 2]), logits) == (1, 0)   # second rejected -> emit argmax row 1
  assert spec.verify_greedy(np.array([0, 0]), logits) == (0, 1)


def test_draft_probs_maps_truncated_vocab():
  z = np.array([[0.0, np.log(3.0)]])
  q = spec.draft_probs(z, np.array([2, 5]), 7, temperature=1.0).numpy()
  np.testing.assert_allclose(q, [[0, 0, 0.25, 0, 0, 0.75, 0]], atol=1e-12)
  q = spec.draft_probs(z, None, 2, temperature=0.5).numpy()
  np.testing.assert_allclose(q, [[0.1, 0.9]], atol=1e-12)


# ----------------------------------------------------------------------------------------------------
# Verifier features and cache cropping


def test_ctx_features_equal_a_fresh_forward():
  """Every committed position reaches the draft exactly once, in order, with the features a no-cache
  forward of the final sequence gives (so the cache crop after rejections is right)."""
  model = tiny_target()
  draft = make_draft(model, vocab=[0, 2, 3, 5, 7], noise=1.5, record=True)
  res = spec.speculative_generate(Verifier(model), draft, PROMPT, num_draft=3, temperature=1.0,
                                  max_new_tokens=14, seed=3)
  assert any(a < 3 for a in res.accept_lengths) and res.accepted > 0  # exercises accept AND reject
  log = draft.log
  pos = np.concatenate([c["positions"][0] for c in log])
  nxt = np.concatenate([c["next_tokens"][0] for c in log])
  seq = np.array(PROMPT + res.tokens)
  np.testing.assert_array_equal(pos, np.arange(len(pos)))
  np.testing.assert_array_equal(nxt, seq[1:len(pos) + 1])
  with torch.no_grad():
    out = model(torch.as_tensor(seq[None, :len(pos)]), output_hidden_states=True)
    final = model.model(torch.as_tensor(seq[None, :len(pos)])).last_hidden_state[0].numpy()
  aux = torch.cat([out.hidden_states[i][0] for i in AUX], -1).numpy()
  np.testing.assert_allclose(np.concatenate([c["aux_hidden"][0] for c in log]), aux, atol=2e-5)
  np.testing.assert_allclose(np.concatenate([c["final_hidden"][0] for c in log]), final, atol=2e-5)
  # the final hidden is post-norm: it reproduces the logits through the LM head
  np.testing.assert_allclose(model.lm_head(torch.as_tensor(final)).detach().numpy(),
                             out.logits[0].numpy(), atol=1e-4)


# ----------------------------------------------------------------------------------------------------
# T = 0: token-for-token equal to greedy decoding


@pytest.mark.parametrize("vocab", [None, [0, 1, 3, 4, 6]])
def test_greedy_speculative_equals_greedy_target(vocab):
  model = tiny_target()
  verifier = Verifier(model)
  draft = make_draft(model, vocab=vocab, noise=0.5)
  rounds = []
  for s, prompt in enumerate([PROMPT, [3], [7, 7, 0, 5, 1, 2]]):
    ref = spec.target_generate(verifier, prompt, temperature=0.0, max_new_tokens=16)
    res = spec.speculative_generate(verifier, draft, prompt, num_draft=3, temperature=0.0,
                                    max_new_tokens=16, seed=s)
    assert res.tokens == ref.tokens and len(res.tokens) == 16
    rounds += res.accept_lengths
  assert 0 < sum(rounds) < 3 * len(rounds)  # both acceptances and rejections happened


def test_eos_and_max_new_tokens_counting():
  model = tiny_target()
  verifier = Verifier(model)
  draft = make_draft(model, noise=0.5)
  ref = spec.target_generate(verifier, PROMPT, temperature=0.0, max_new_tokens=10)
  eos = ref.tokens[4]
  cut = ref.tokens[:ref.tokens.index(eos) + 1]
  res = spec.speculative_generate(verifier, draft, PROMPT, num_draft=3, temperature=0.0,
                                  max_new_tokens=10, eos_token_id=[eos, 99], seed=0)
  assert res.tokens == cut and res.stopped_by_eos
  assert spec.target_generate(verifier, PROMPT, temperature=0.0, max_new_tokens=10,
                              eos_token_id=eos).tokens == cut
  # every round that ran is counted in full; emitted = 1 (prefill) + sum(a + 1) >= kept tokens
  res = spec.speculative_generate(verifier, draft, PROMPT, num_draft=3, temperature=0.0, max_new_tokens=5)
  assert len(res.tokens) == 5 and res.drafted == 3 * len(res.accept_lengths)
  assert 1 + sum(a + 1 for a in res.accept_lengths) >= 5 > 1 + sum(a + 1 for a in res.accept_lengths[:-1])
  assert res.tau == pytest.approx(np.mean(res.accept_lengths) + 1)


def test_long_prompt_is_truncated_to_its_last_tokens():
  model = tiny_target()
  verifier = Verifier(model)
  draft = make_draft(model, noise=0.5)
  prompt = list(np.random.default_rng(0).integers(0, V, 40))
  res = spec.speculative_generate(verifier, draft, prompt, num_draft=3, temperature=0.0, max_new_tokens=6)
  room = CTX - 6 - 3 - 1
  assert res.prompt_tokens == room and res.truncated_prompt_tokens == 40 - room
  ref = spec.target_generate(verifier, prompt[-room:], temperature=0.0, max_new_tokens=6)
  assert res.tokens == ref.tokens
  with pytest.raises(ValueError, match="max_context"):
    spec.speculative_generate(verifier, draft, prompt, num_draft=3, temperature=0.0, max_new_tokens=28)


# ----------------------------------------------------------------------------------------------------
# T = 1: the sequence distribution is the target's (and a broken rule is caught)


N_SAMPLES, N_NEW, K = 600, 3, 2
TRUNC_VOCAB = [0, 2, 3, 5, 7]


def _sample_outputs(draft, n=N_SAMPLES, prompt=PROMPT):
  model = tiny_target()
  verifier = Verifier(model)
  return [spec.speculative_generate(verifier, draft, prompt, num_draft=K, temperature=1.0,
                                    max_new_tokens=N_NEW, seed=s).tokens for s in range(n)]


@functools.lru_cache(maxsize=None)
def _exact_and_threshold():
  p = exact_sequence_probs(tiny_target(), PROMPT, N_NEW)
  return p, tv_threshold(p, N_SAMPLES)


def test_lossless_sampling_truncated_vocab():
  model = tiny_target()
  p, thr = _exact_and_threshold()
  assert abs(p.sum() - 1) < 1e-9
  outs = _sample_outputs(make_draft(model, vocab=TRUNC_VOCAB, noise=1.5))
  tv = 0.5 * np.abs(empirical(outs, V, N_NEW) - p).sum()
  assert tv < thr, (tv, thr)
  # The plain target sampler (same sampling code) passes the same test.
  verifier = Verifier(model)
  ref = [spec.target_generate(verifier, PROMPT, temperature=1.0, max_new_tokens=N_NEW, seed=s).tokens
         for s in range(N_SAMPLES)]
  assert 0.5 * np.abs(empirical(ref, V, N_NEW) - p).sum() < thr


def test_lossless_test_catches_greedy_drafting_treated_as_sampled():
  p, thr = _exact_and_threshold()
  outs = _sample_outputs(make_draft(tiny_target(), vocab=TRUNC_VOCAB, noise=1.5, greedy_always=True))
  tv = 0.5 * np.abs(empirical(outs, V, N_NEW) - p).sum()
  assert tv > thr, (tv, thr)


def test_lossless_test_catches_acceptance_without_ratio_test(monkeypatch):
  p, thr = _exact_and_threshold()

  def accept_all(draft_tokens, q, p_, generator):
    k = len(draft_tokens)
    return k, int(torch.multinomial(p_[k], 1, generator=generator))

  monkeypatch.setattr(spec, "verify_sampled", accept_all)
  outs = _sample_outputs(make_draft(tiny_target(), vocab=TRUNC_VOCAB, noise=1.5), n=N_SAMPLES)
  tv = 0.5 * np.abs(empirical(outs, V, N_NEW) - p).sum()
  assert tv > thr, (tv, thr)


def test_sampling_is_reproducible():
  draft = make_draft(tiny_target(), vocab=TRUNC_VOCAB, noise=1.5)
  verifier = Verifier(tiny_target())
  run = lambda s: spec.speculative_generate(verifier, draft, PROMPT, num_draft=3, temperature=1.0,
                                            max_new_tokens=12, seed=s)
  a, b, c = run(5), run(5), run(6)
  assert a.tokens == b.tokens and a.accept_lengths == b.accept_lengths
  assert (a.tokens, a.accept_lengths) != (c.tokens, c.accept_lengths)


# ----------------------------------------------------------------------------------------------------
# Bad input


def test_check_draft_fits():
  model = tiny_target()
  info = target_info(model)
  spec.check_draft_fits(make_draft(model), info)
  spec.check_draft_fits(make_draft(model, vocab=TRUNC_VOCAB), info)
  with pytest.raises(ValueError, match="vocab size"):
    spec.check_draft_fits(TableDraft(np.zeros((V, V - 1))), info)
  with pytest.raises(ValueError, match=r"lie in \[0, 8\)"):
    spec.check_draft_fits(TableDraft(np.zeros((V, 3)), vocab=[0, 5, 8]), info)
  with pytest.raises(ValueError, match="ascending"):
    spec.check_draft_fits(TableDraft(np.zeros((V, 3)), vocab=[0, 5, 2]), info)
  with pytest.raises(ValueError, match="does not accept features"):  # draft built for Ht = 24
    spec.check_draft_fits(TableDraft(np.zeros((V, V)), feat_dim=4 * 24), info)
  with pytest.raises(ValueError, match="does not accept features"):  # draft built for 2 aux layers
    spec.check_draft_fits(TableDraft(np.zeros((V, V)), feat_dim=3 * H), info)
  draft = make_draft(model)
  draft.target_hidden_size = 24
  with pytest.raises(ValueError, match="target_hidden_size=24"):
    spec.check_draft_fits(draft, info, probe=False)
  draft = make_draft(model)
  draft.config = dict(num_aux_hidden_states=2)
  with pytest.raises(ValueError, match="num_aux_hidden_states=2"):
    spec.check_draft_fits(draft, info, probe=False)


def test_engine_results_feed_the_report(tmp_path):
  """Speculative + target-only results of a few prompts -> a report whose tau lies in [1, K+1]."""
  from lkjax.eval import report as rp

  model = tiny_target()
  verifier = Verifier(model)
  draft = make_draft(model, vocab=TRUNC_VOCAB, noise=0.5)
  prompts = [PROMPT, [3, 1], list(range(8)) * 5]  # the last one is truncated to fit CTX
  runs = []
  for t in (0.0, 1.0):
    res = [spec.speculative_generate(verifier, draft, p, num_draft=3, temperature=t, max_new_tokens=8, seed=i)
           for i, p in enumerate(prompts)]
    ref = [spec.target_generate(verifier, p, temperature=t, max_new_tokens=8, seed=i, num_draft=3)
           for i, p in enumerate(prompts)]
    runs.append(rp.BenchmarkRun.from_results("tiny", t, res, ref))
  report = rp.build_report(runs, n_boot=200)
  for t in ("0", "1"):
    s = report["temperatures"][t]["benchmarks"]["tiny"]
    assert 1 <= s["tau"] <= 4 and s["truncated_prompts"] == 1 and s["speedup"] > 0
    assert s["tau"] == pytest.approx(1 + np.nansum(np.cumprod(s["position_acceptance"])))
  assert set(rp.write_report(report, str(tmp_path))) == {"json", "md", "png"}
