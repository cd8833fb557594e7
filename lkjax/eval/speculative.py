"""Exact chain speculative decoding (batch size 1): a JAX draft proposes, a transformers target verifies.

One round (docs/design.md#evaluation).  The committed sequence ends at position t; x[t+1] was produced by the target
and is not yet in the target's KV cache.

  1. The draft proposes ``d_1..d_K`` (TARGET ids) and raw logits ``z [K, Vd]``.  T = 0: greedy.
     T > 0: sampled from ``q_i = softmax(z_i / T)`` mapped to target ids (q is 0 outside the draft
     vocabulary).
  2. The target runs ONE forward over ``[x[t+1], d_1..d_K]`` -> ``p_1..p_{K+1} = softmax(logits / T)``.
  3. T = 0: accept d_i iff ``d_i == argmax p_i``; the first mismatch emits ``argmax p_i``.
     T > 0: accept d_i with probability ``min(1, p_i(d_i) / q_i(d_i))``; the first rejection emits a
     sample of ``normalise(max(p_i - q_i, 0))`` over the full target vocabulary.
     All K accepted: a bonus token from ``p_{K+1}``.  So a round emits ``a + 1`` tokens, a in [0, K].
  4. The target cache is cropped to the committed prefix and the draft is handed the features of the
     newly committed positions, taken from that same verification forward (no extra target pass).

Sampling and acceptance run in torch float64 with a ``torch.Generator`` (target side); the draft gets a
``jax.random`` key per round.  Both are seeded from ``seed``, so runs are reproducible.

Counting rule (documented so tau is unambiguous): generation stops once at least ``max_new_tokens``
tokens are emitted or an EOS token is emitted.  The output is then cut at the first EOS (kept) and at
``max_new_tokens``.  Acceptance is counted for EVERY round that ran, in full (K drafted, a accepted), even
when the last round overshoots or runs past an EOS: the verification happened and its outcome does not
depend on where the output is cut, so truncating it would bias tau.  The first new token (from the
prefill logits) is a plain target token and belongs to no round.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import torch

from lkjax.eval.verifier import BatchedVerifier, TargetStep, Verifier
from lkjax.targets.info import TargetInfo


# ----------------------------------------------------------------------------------------------------
# Sampling and acceptance (pure functions on torch float64)


def target_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
  """``softmax(logits / T)`` in float64 over the last axis (T > 0)."""
  if temperature <= 0:
    raise ValueError(f"temperature={temperature}: probabilities need T > 0")
  return torch.softmax(logits.double() / temperature, dim=-1)


def sample_token(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> int:
  """One token from ``logits [V]``: argmax at T = 0, else a sample of ``softmax(logits / T)``."""
  if temperature == 0:
    return int(torch.argmax(logits))
  return int(torch.multinomial(target_probs(logits, temperature), 1, generator=generator))


def draft_probs(draft_logits: np.ndarray, draft_vocab: np.ndarray | None, vocab_size: int,
                temperature: float) -> torch.Tensor:
  """Draft distribution on the TARGET vocabulary: ``q [K, V]`` float64, zero outside the draft vocab.

  Args:
    draft_logits: ``[K, Vd]`` raw draft logits.
    draft_vocab: int ``[Vd]`` target ids of the draft ids, or None when Vd = V.
  """
  z = torch.as_tensor(np.asarray(draft_logits, dtype=np.float64))
  qd = torch.softmax(z / temperature, dim=-1)
  if draft_vocab is None:
    return qd
  q = torch.zeros(z.shape[0], vocab_size, dtype=torch.float64)
  q[:, torch.as_tensor(np.asarray(draft_vocab, dtype=np.int64))] = qd
  return q


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
  """``normalise(max(p - q, 0))`` over the last axis ``[V]``.

  When p = q the residual is empty; rejection then has probability 0, and p is returned so the
  function stays total under rounding.
  """
  r = torch.clamp(p - q, min=0.0)
  mass = r.sum(-1, keepdim=True)
  return torch.where(mass > 0, r / torch.where(mass > 0, mass, 1.0), p)


def verify_greedy(draft_tokens: np.ndarray, target_logits: torch.Tensor,
                  best: torch.Tensor | None = None) -> tuple[int, int]:
  """T = 0 verification -> ``(a, next_token)``.

  Args:
    draft_tokens: int ``[K]`` target ids.
    target_logits: ``[K+1, V]``; row i predicts the token after ``d_i`` (row 0 after x[t+1]).
    best: ``argmax(target_logits, -1)`` when already computed (a batch takes it once for all rows).
  """
  k = len(draft_tokens)
  best = (torch.argmax(target_logits, dim=-1) if best is None else best).tolist()
  for i in range(k):
    if int(draft_tokens[i]) != best[i]:
      return i, best[i]
  return k, best[k]


def verify_sampled(draft_tokens: np.ndarray, q: torch.Tensor, p: torch.Tensor,
                   generator: torch.Generator) -> tuple[int, int]:
  """T > 0 rejection sampling -> ``(a, next_token)``; the emitted sequence is distributed as p's.

  Args:
    draft_tokens: int ``[K]`` target ids sampled from q.
    q: ``[K, V]`` draft probabilities on the target vocabulary.
    p: ``[K+1, V]`` target probabilities.
  """
  k = len(draft_tokens)
  for i in range(k):
    d = int(draft_tokens[i])
    qd, pd = float(q[i, d]), float(p[i, d])
    if qd <= 0:
      raise ValueError(f"draft token {d} at step {i} has draft probability 0: the draft did not sample "
                       "from its own logits (or maps draft ids wrongly)")
    # accept with probability min(1, p/q): u < p/q  <=>  u * q < p  for u ~ U[0, 1)
    u = float(torch.rand((), dtype=torch.float64, generator=generator))
    if u * qd >= pd:
      r = residual_distribution(p[i], q[i])
      return i, int(torch.multinomial(r, 1, generator=generator))
  return k, int(torch.multinomial(p[k], 1, generator=generator))


# ----------------------------------------------------------------------------------------------------
# Bookkeeping


@dataclasses.dataclass
class GenerationResult:
  """One generated continuation and its acceptance record.

  ``accept_lengths[r]`` = a in [0, num_draft] accepted draft tokens in round r (empty for target-only
  decoding).  tau for one prompt = ``num_draft * accepted / drafted + 1``.
  """

  tokens: list[int]               # new tokens, cut at the first EOS (kept) and at max_new_tokens
  prompt_tokens: int              # prompt length after truncation
  truncated_prompt_tokens: int    # tokens dropped from the front of the prompt (0 = not truncated)
  accept_lengths: list[int]
  num_draft: int
  seconds: float                  # wall clock of prefill + decoding
  stopped_by_eos: bool

  @property
  def num_new_tokens(self) -> int:
    return len(self.tokens)

  @property
  def drafted(self) -> int:
    return self.num_draft * len(self.accept_lengths)

  @property
  def accepted(self) -> int:
    return int(sum(self.accept_lengths))

  @property
  def tau(self) -> float:
    return self.num_draft * self.accepted / self.drafted + 1.0 if self.drafted else float("nan")


def _eos_set(eos_token_id: int | Sequence[int] | None) -> frozenset[int]:
  if eos_token_id is None:
    return frozenset()
  if isinstance(eos_token_id, (int, np.integer)):
    return frozenset([int(eos_token_id)])
  return frozenset(int(e) for e in eos_token_id)


def _finish(tokens: list[int], eos: frozenset[int], max_new_tokens: int) -> tuple[list[int], bool]:
  """Cut at the first EOS (kept) and at max_new_tokens."""
  for i, t in enumerate(tokens[:max_new_tokens]):
    if t in eos:
      return tokens[:i + 1], True
  return tokens[:max_new_tokens], False


def fit_prompt(prompt: Sequence[int], max_context: int | None, reserve: int) -> tuple[list[int], int]:
  """Keep the LAST tokens of ``prompt`` so that ``len + reserve <= max_context`` -> (ids, dropped)."""
  ids = [int(t) for t in prompt]
  if not ids:
    raise ValueError("prompt: empty prompt")
  if max_context is None:
    return ids, 0
  room = max_context - reserve
  if room < 1:
    raise ValueError(f"max_context={max_context} leaves no room for a prompt after reserving {reserve} "
                     "positions (max_new_tokens + num_draft + 1)")
  dropped = max(0, len(ids) - room)
  return ids[dropped:], dropped


def _check_args(temperature: float, max_new_tokens: int, num_draft: int) -> None:
  if not temperature >= 0:
    raise ValueError(f"temperature={temperature}: must be >= 0")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
  if num_draft < 0:
    raise ValueError(f"num_draft={num_draft}: must be >= 0")


# ----------------------------------------------------------------------------------------------------
# Decoding loops


def target_generate(verifier: Verifier, prompt: Sequence[int], *, temperature: float, max_new_tokens: int,
                    eos_token_id: int | Sequence[int] | None = None, seed: int = 0,
                    max_context: int | None = None, num_draft: int = 0) -> GenerationResult:
  """Plain target-only decoding (greedy at T = 0, else sampled with `sample_token`).

  ``num_draft`` only reserves the same context room as `speculative_generate` with that K, so both
  truncate a long prompt identically.
  """
  _check_args(temperature, max_new_tokens, num_draft)
  max_context = max_context or verifier.max_context
  ids, dropped = fit_prompt(prompt, max_context, max_new_tokens + num_draft + 1)
  eos = _eos_set(eos_token_id)
  gen = torch.Generator().manual_seed(int(seed))
  verifier.reset()
  t0 = time.perf_counter()
  step = verifier.feed(ids)
  out = [sample_token(step.logits[-1], temperature, gen)]
  while len(out) < max_new_tokens and out[-1] not in eos:
    step = verifier.feed(out[-1:])
    out.append(sample_token(step.logits[-1], temperature, gen))
  seconds = time.perf_counter() - t0
  tokens, by_eos = _finish(out, eos, max_new_tokens)
  return GenerationResult(tokens, len(ids), dropped, [], 0, seconds, by_eos)


def draft_vocab_ids(draft: Any) -> np.ndarray | None:
  """The draft's ``draft_vocab`` (a `Frozen` variable of target ids) as int64 numpy, or None."""
  dv = getattr(draft, "draft_vocab", None)
  if dv is None:
    return None
  return np.asarray(dv[...], dtype=np.int64)


def _ctx(step: TargetStep, rows: int, next_tokens: Sequence[int], start: int) -> dict[str, np.ndarray]:
  """Draft ctx for committed positions ``start .. start+rows-1`` (first ``rows`` rows of ``step``).

  Plain numpy: the draft's (jitted) propose transfers it once; eager jnp ops here would dispatch and
  compile small per-shape kernels every round.
  """
  return dict(
      aux_hidden=np.ascontiguousarray(step.aux_hidden[None, :rows]),
      final_hidden=np.ascontiguousarray(step.final_hidden[None, :rows]),
      next_tokens=np.asarray(next_tokens, np.int32)[None],
      positions=np.arange(start, start + rows, dtype=np.int32)[None])


def speculative_generate(verifier: Verifier, draft: Any, prompt: Sequence[int], *, num_draft: int,
                         temperature: float, max_new_tokens: int,
                         eos_token_id: int | Sequence[int] | None = None, seed: int = 0,
                         max_context: int | None = None) -> GenerationResult:
  """Chain speculative decoding of one prompt (module docstring); lossless w.r.t. `target_generate`.

  Args:
    verifier: the target (its cache is reset here).
    draft: a `lkjax.models.base.DraftModel` (init_cache / propose / draft_vocab).
    prompt: target token ids; longer than ``max_context - max_new_tokens - num_draft - 1`` -> the last
      tokens are kept and the number dropped is recorded.
    num_draft: K draft tokens per round (>= 1).
    temperature: 0 = greedy verification, > 0 = rejection sampling at that temperature.
    max_context: positions available (default: the target's); the draft cache gets this length.
  """
  _check_args(temperature, max_new_tokens, num_draft)
  if num_draft < 1:
    raise ValueError(f"num_draft={num_draft}: speculative decoding needs K >= 1")
  max_context = max_context or verifier.max_context
  ids, dropped = fit_prompt(prompt, max_context, max_new_tokens + num_draft + 1)
  eos = _eos_set(eos_token_id)
  dvocab = draft_vocab_ids(draft)
  vocab = verifier.vocab_size
  gen = torch.Generator().manual_seed(int(seed))
  key = jax.random.key(int(seed))
  verifier.reset()

  t0 = time.perf_counter()
  cache = draft.init_cache(1, int(max_context or len(ids) + max_new_tokens + num_draft + 1))
  step = verifier.feed(ids)
  x = sample_token(step.logits[-1], temperature, gen)
  out = [x]
  ctx = _ctx(step, len(ids), ids[1:] + [x], 0)
  rounds: list[int] = []
  while len(out) < max_new_tokens and not (eos & set(out)):
    key, sub = jax.random.split(key)
    cache, d, z = draft.propose(cache, ctx, num_tokens=num_draft, temperature=float(temperature), rng=sub)
    d = np.asarray(d).reshape(-1).astype(np.int64)
    if d.shape != (num_draft,):
      raise ValueError(f"draft.propose returned tokens of shape {np.shape(d)}, expected [1, {num_draft}]")
    base = verifier.length            # = position of x[t+1]
    step = verifier.feed([x, *d.tolist()])
    if temperature == 0:
      a, y = verify_greedy(d, step.logits)
    else:
      q = draft_probs(np.asarray(z)[0], dvocab, vocab, temperature)
      a, y = verify_sampled(d, q, target_probs(step.logits, temperature), gen)
    rounds.append(a)
    verifier.crop(base + a + 1)       # keep x[t+1], d_1..d_a; y is not in the cache yet
    new = [*d[:a].tolist(), y]
    ctx = _ctx(step, a + 1, new, base)
    out += new
    x = y
  seconds = time.perf_counter() - t0
  tokens, by_eos = _finish(out, eos, max_new_tokens)
  return GenerationResult(tokens, len(ids), dropped, rounds, num_draft, seconds, by_eos)


# ----------------------------------------------------------------------------------------------------
# Batched decoding: B prompts at once, per-row acceptance, per-prompt random streams


def _bucket(n: int) -> int:
  """The power of two >= n (batch sizes the jitted draft is compiled for)."""
  return 1 << max(0, n - 1).bit_length()


_split_rows = jax.jit(jax.vmap(jax.random.split))   # [B] keys -> [B, 2]: row b as split(key_b)


def _row_keys(seeds: Sequence[int]) -> jax.Array:
  """One draft key per row, ``jax.random.key(seed_b)`` -- the key batch-1 decoding of that prompt uses."""
  return jnp.stack([jax.random.key(int(s)) for s in seeds])


def _check_batch(prompts: Sequence[Sequence[int]], seeds: Sequence[int]) -> None:
  if not len(prompts):
    raise ValueError("prompts: need at least one prompt")
  if len(seeds) != len(prompts):
    raise ValueError(f"seeds: {len(seeds)} seeds for {len(prompts)} prompts (one per prompt)")


class _Rows:
  """Which prompt each batch row holds, and the compaction rule shared by both batched loops.

  A prompt whose output is complete stops decoding: its row is "held" (it feeds the target but commits
  nothing, `BatchedVerifier.commit` with keep 0, and drafts from unchanged state) until the running rows
  fall to half the batch or below; the batch is then cut to the next power of two >= the running rows,
  keeping running rows first (held ones fill up), so the jitted draft sees few distinct batch sizes.
  """

  def __init__(self, n: int):
    self.prompt = list(range(n))

  def compact(self, running: Sequence[bool]) -> list[int] | None:
    """Batch rows to keep (None: keep all); ``running[r]`` for batch row r."""
    live = [r for r, on in enumerate(running) if on]
    size = len(self.prompt)
    if not live or len(live) > size // 2:
      return None
    held = [r for r, on in enumerate(running) if not on]
    keep = sorted(live + held[:_bucket(len(live)) - len(live)])
    self.prompt = [self.prompt[r] for r in keep]
    return keep


def speculative_generate_batch(verifier: BatchedVerifier, draft: Any, prompts: Sequence[Sequence[int]], *,
                               num_draft: int, temperature: float, max_new_tokens: int,
                               eos_token_id: int | Sequence[int] | None = None, seeds: Sequence[int],
                               max_context: int | None = None) -> list[GenerationResult]:
  """Chain speculative decoding of B prompts at once; per prompt the same result as `speculative_generate`.

  Every round, each running row drafts K tokens, the target verifies all rows in ONE forward over
  ``[B, K+1]`` tokens (`BatchedVerifier.feed`), and each row accepts on its own (the rule of the module
  docstring, row by row), so rows commit different numbers of tokens (`BatchedVerifier.commit`: the
  target cache keeps rejected slots as masked holes; the draft gets a right-aligned ctx with
  ``num_valid``, `lkjax.models.base`).  Prompt b uses its own random streams, seeded by ``seeds[b]``
  exactly as `speculative_generate` seeds with ``seed`` (a ``torch.Generator`` for the target-side draws,
  ``jax.random.key(seed)`` split per round for the draft): its output does not depend on the other
  prompts of the batch, and at T = 0 it is batch-1 decoding's (up to float rounding of batched matmuls).

  ``seconds`` of each result is the batch's wall clock divided by B (so summed seconds = wall clock).
  Rows are decoded in the given order; callers sort prompts by length to keep the padding small.
  """
  _check_args(temperature, max_new_tokens, num_draft)
  _check_batch(prompts, seeds)
  if num_draft < 1:
    raise ValueError(f"num_draft={num_draft}: speculative decoding needs K >= 1")
  max_context = max_context or verifier.max_context
  fitted = [fit_prompt(p, max_context, max_new_tokens + num_draft + 1) for p in prompts]
  ids = [f[0] for f in fitted]
  n = len(ids)
  eos = _eos_set(eos_token_id)
  dvocab = draft_vocab_ids(draft)
  vocab = verifier.vocab_size
  gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
  keys = _row_keys(seeds)

  t0 = time.perf_counter()
  cache = draft.init_cache(n, int(max_context or max(map(len, ids)) + max_new_tokens + num_draft + 1))
  step = verifier.start(ids)
  w = step.aux_hidden.shape[1]
  out = [[sample_token(step.logits[b, -1], temperature, gens[b])] for b in range(n)]
  next_tokens, positions = np.zeros((n, w), np.int32), np.zeros((n, w), np.int32)
  for b, p in enumerate(ids):
    next_tokens[b, w - len(p):] = p[1:] + [out[b][0]]
    positions[b, w - len(p):] = np.arange(len(p))
  ctx = dict(aux_hidden=step.aux_hidden, final_hidden=step.final_hidden, next_tokens=next_tokens,
             positions=positions, num_valid=np.asarray([len(p) for p in ids], np.int32))
  done = [len(o) >= max_new_tokens or bool(eos & set(o)) for o in out]
  rounds: list[list[int]] = [[] for _ in range(n)]
  rows = _Rows(n)
  while not all(done):
    keep = rows.compact([not done[i] for i in rows.prompt])
    if keep is not None:
      sel = np.asarray(keep)
      verifier.select(keep)
      cache = jax.tree.map(lambda a: a[sel], cache)
      keys = keys[sel]
      ctx = {k: v[sel] for k, v in ctx.items()}
    prompt = rows.prompt
    pairs = _split_rows(keys)
    keys, subs = pairs[:, 0], pairs[:, 1]
    cache, d, z = draft.propose(cache, ctx, num_tokens=num_draft, temperature=float(temperature), rng=subs)
    d = np.asarray(d).astype(np.int64)
    if d.shape != (len(prompt), num_draft):
      raise ValueError(f"draft.propose returned tokens of shape {d.shape}, expected [{len(prompt)}, {num_draft}]")
    base = verifier.lengths.numpy().copy()     # = position of x[t+1] per row
    x = np.asarray([out[i][-1] for i in prompt], np.int64)
    step = verifier.feed(np.concatenate([x[:, None], d], axis=1))
    accepted = np.zeros(len(prompt), np.int64)
    new: dict[int, list[int]] = {}
    best = torch.argmax(step.logits, dim=-1) if temperature == 0 else None
    zs = np.asarray(z) if temperature > 0 else None
    for r, i in enumerate(prompt):
      if done[i]:
        continue
      if temperature == 0:
        a, y = verify_greedy(d[r], step.logits[r], best=best[r])
      else:
        q = draft_probs(zs[r], dvocab, vocab, temperature)
        a, y = verify_sampled(d[r], q, target_probs(step.logits[r], temperature), gens[i])
      rounds[i].append(a)
      new[r] = [*d[r, :a].tolist(), y]
      out[i] += new[r]
      accepted[r] = a + 1
      done[i] = len(out[i]) >= max_new_tokens or bool(eos & set(new[r]))
    verifier.commit(accepted)
    m = int(accepted.max())
    ctx = dict(aux_hidden=np.zeros((len(prompt), m) + step.aux_hidden.shape[2:], np.float32),
               final_hidden=np.zeros((len(prompt), m) + step.final_hidden.shape[2:], np.float32),
               next_tokens=np.zeros((len(prompt), m), np.int32), positions=np.zeros((len(prompt), m), np.int32),
               num_valid=accepted.astype(np.int32))
    for r, toks in new.items():
      k = len(toks)
      ctx["aux_hidden"][r, m - k:] = step.aux_hidden[r, :k]
      ctx["final_hidden"][r, m - k:] = step.final_hidden[r, :k]
      ctx["next_tokens"][r, m - k:] = toks
      ctx["positions"][r, m - k:] = base[r] + np.arange(k)
  seconds = time.perf_counter() - t0
  results = []
  for i in range(n):
    tokens, by_eos = _finish(out[i], eos, max_new_tokens)
    results.append(GenerationResult(tokens, len(ids[i]), fitted[i][1], rounds[i], num_draft, seconds / n, by_eos))
  return results


def target_generate_batch(verifier: BatchedVerifier, prompts: Sequence[Sequence[int]], *, temperature: float,
                          max_new_tokens: int, eos_token_id: int | Sequence[int] | None = None,
                          seeds: Sequence[int], max_context: int | None = None,
                          num_draft: int = 0) -> list[GenerationResult]:
  """Target-only decoding of B prompts at once; per prompt `target_generate` with seed ``seeds[b]``.

  ``num_draft`` reserves the same context room as `speculative_generate_batch`; ``seconds`` as there.
  """
  _check_args(temperature, max_new_tokens, num_draft)
  _check_batch(prompts, seeds)
  max_context = max_context or verifier.max_context
  fitted = [fit_prompt(p, max_context, max_new_tokens + num_draft + 1) for p in prompts]
  ids = [f[0] for f in fitted]
  n = len(ids)
  eos = _eos_set(eos_token_id)
  gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
  t0 = time.perf_counter()
  step = verifier.start(ids)
  out = [[sample_token(step.logits[b, -1], temperature, gens[b])] for b in range(n)]
  done = [len(o) >= max_new_tokens or o[-1] in eos for o in out]
  rows = _Rows(n)
  while not all(done):
    keep = rows.compact([not done[i] for i in rows.prompt])
    if keep is not None:
      verifier.select(keep)
    prompt = rows.prompt
    step = verifier.feed(np.asarray([[out[i][-1]] for i in prompt], np.int64))
    fed = np.zeros(len(prompt), np.int64)
    for r, i in enumerate(prompt):
      if done[i]:
        continue
      out[i].append(sample_token(step.logits[r, -1], temperature, gens[i]))
      fed[r] = 1
      done[i] = len(out[i]) >= max_new_tokens or out[i][-1] in eos
    verifier.commit(fed)
  seconds = time.perf_counter() - t0
  results = []
  for i in range(n):
    tokens, by_eos = _finish(out[i], eos, max_new_tokens)
    results.append(GenerationResult(tokens, len(ids[i]), fitted[i][1], [], 0, seconds / n, by_eos))
  return results


# ----------------------------------------------------------------------------------------------------
# Shape checks before decoding


def _attr(draft: Any, *names: str):
  """First attribute found on the draft or its ``config`` (drafts name these differently)."""
  for obj in (draft, getattr(draft, "config", None)):
    if obj is None:
      continue
    for n in names:
      v = obj.get(n) if isinstance(obj, dict) else getattr(obj, n, None)
      if v is not None:
        return n, v
  return None, None


def check_draft_fits(draft: Any, target: TargetInfo, *, probe: bool = True) -> None:
  """Raise ValueError when the draft's vocabulary, hidden size or aux layers do not fit ``target``.

  Checks declared attributes (``draft_vocab``/``draft_vocab_size``, ``target_hidden_size``,
  ``num_aux``/``aux_layer_ids``, ``target_vocab_size``, on the draft or its ``config``), then, with
  ``probe``, runs one ``propose`` on a fresh cache with zero features of the target's shapes
  (``aux [1,1,A*Ht]``, ``final [1,1,Ht]``) so an undeclared width mismatch also fails here, not mid-run.
  """
  vsize = int(target.vocab_size)
  vd = int(getattr(draft, "draft_vocab_size"))
  dv = draft_vocab_ids(draft)
  if dv is None:
    if vd != vsize:
      raise ValueError(f"draft: draft_vocab_size={vd} without a draft_vocab map must equal the target "
                       f"vocab size {vsize} ({target.name})")
  else:
    if dv.ndim != 1 or dv.shape[0] != vd:
      raise ValueError(f"draft: draft_vocab has shape {dv.shape}, expected [{vd}] (draft_vocab_size)")
    if dv.size and (dv.min() < 0 or dv.max() >= vsize):
      raise ValueError(f"draft: draft_vocab ids must lie in [0, {vsize}) for target {target.name}, "
                       f"got range [{dv.min()}, {dv.max()}]")
    if np.any(np.diff(dv) <= 0):
      raise ValueError("draft: draft_vocab must be strictly ascending target ids (docs/design.md#target-features-and-the-draft-vocabulary)")
  name, v = _attr(draft, "target_vocab_size")
  if name and int(v) != vsize:
    raise ValueError(f"draft: {name}={v} but target {target.name} has vocab_size={vsize}")
  name, v = _attr(draft, "target_hidden_size")
  if name and int(v) != target.hidden_size:
    raise ValueError(f"draft: {name}={v} but target {target.name} has hidden_size={target.hidden_size}")
  name, v = _attr(draft, "aux_layer_ids", "eagle_aux_hidden_state_layer_ids")
  if name and tuple(int(i) for i in v) != tuple(target.aux_layer_ids):
    raise ValueError(f"draft: {name}={tuple(v)} but target {target.name} uses aux layers "
                     f"{tuple(target.aux_layer_ids)}")
  name, v = _attr(draft, "num_aux", "num_aux_hidden_states")
  if name and int(v) != target.num_aux:
    raise ValueError(f"draft: {name}={v} but target {target.name} provides {target.num_aux} aux states")
  if not probe:
    return
  tok = int(dv[0]) if dv is not None and dv.size else 0
  ctx = dict(aux_hidden=jnp.zeros((1, 1, target.num_aux * target.hidden_size), jnp.float32),
             final_hidden=jnp.zeros((1, 1, target.hidden_size), jnp.float32),
             next_tokens=jnp.full((1, 1), tok, jnp.int32), positions=jnp.zeros((1, 1), jnp.int32))
  try:
    cache = draft.init_cache(1, 8)
    _, toks, logits = draft.propose(cache, ctx, num_tokens=1, temperature=0.0, rng=jax.random.key(0))
  except Exception as e:  # shape errors surface as TypeError/ValueError/XlaRuntimeError depending on op
    raise ValueError(f"draft does not accept features of target {target.name} (aux [1,1,"
                     f"{target.num_aux}*{target.hidden_size}], final [1,1,{target.hidden_size}]): {e}") from e
  if tuple(np.shape(logits)) != (1, 1, vd):
    raise ValueError(f"draft: propose returned logits of shape {np.shape(logits)}, expected [1, 1, {vd}]")
  t = int(np.asarray(toks).reshape(-1)[0])
  allowed = dv if dv is not None else np.arange(vsize)
  if t not in set(allowed.tolist()):
    raise ValueError(f"draft: propose returned token {t}, which is not in its draft vocabulary")
