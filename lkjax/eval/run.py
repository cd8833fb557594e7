"""Benchmark driver: tau of a draft on MT-bench, HumanEval and GSM8K-style prompts at T = 0 and T = 1.

`evaluate_draft` runs, for every benchmark and temperature, each prompt twice in the same process and
interleaved (so both see the same machine load): chain speculative decoding (`speculative_generate`)
and plain target-only decoding (`target_generate`), which gives tau, per-position acceptance, tokens/s
and the wall-clock speed-up of one run.  Multi-turn prompts (MT-bench) are conversations: turn j+1 is
formatted with the target's chat template as ``user, assistant(own answer to turn j), user`` -- each
decoding mode conditions on ITS OWN earlier answers -- or as plain completion text when the target has
no template (`lkjax.targets.hf.TargetModel.format_prompt`).  The turns of one question are one entry of
the report (acceptance pooled over both turns), so bootstrap CIs resample questions, not turns.

Batching (``batch_size``, default `BATCH_SIZE`).  The prompts of one turn are sorted by length and
decoded ``batch_size`` at a time (`speculative_generate_batch`: one target forward verifies every row,
each row accepts on its own; `target_generate_batch` for the baseline), first speculative then
target-only for each (benchmark, temperature).  Every prompt keeps its own random streams
(`_prompt_seed` of benchmark, prompt and turn, never of the batch or the draft), so its output is the
one batch-1 decoding gives (``batch_size=1``: each prompt alone, both modes interleaved), and every draft
of a study sees the same streams for the same prompt (paired comparisons).

Timing.  The draft runs jitted (`JittedDraft`); every shape it will see is compiled, and one real
prompt per temperature is decoded both ways, before the clock starts (the warm-up is in no number).

`offline_estimate` is the training-time estimate tau_off = 1 + sum_k prod_{j<=k} alpha_bar_j on the
validation split of the draft's shard directory, computed with the trainer's own eval step (target
logits = the shard's final hidden states through the target LM head, exactly as in training).  Its
alpha is TV-acceptance at T = 1, so it is reported next to the measured tau at T = 1.

Outputs in ``out_dir``: ``report.json`` / ``report.md`` / ``report.png`` (`lkjax.eval.report`) and
``answers.jsonl`` (the decoded answers of both modes, per benchmark, temperature, prompt and turn).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import platform
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lkjax.data.benchmarks import BENCHMARKS, GSM_SEED, EvalPrompt, load_benchmark
from lkjax.eval import report as report_lib
from lkjax.eval.speculative import (GenerationResult, check_draft_fits, draft_vocab_ids, speculative_generate,
                                    speculative_generate_batch, target_generate, target_generate_batch)
from lkjax.eval.verifier import BatchedVerifier, Verifier

ANSWERS_FILE = "answers.jsonl"
COMMIT_CHUNK = 64          # largest ctx chunk the jitted draft commits at once (power of two)
BATCH_SIZE = 16            # prompts decoded at once by default (1 = batch-1 decoding, `speculative_generate`)
WARMUP_MAX_NEW_TOKENS = 8  # the warm-up prompt only needs to exercise every code path once


# ----------------------------------------------------------------------------------------------------
# A jitted draft with a bounded set of compiled shapes


def _pow2_chunks(n: int, largest: int) -> list[int]:
  """``n`` as a sum of powers of two <= ``largest``, largest first (e.g. 75, 64 -> [64, 8, 2, 1])."""
  out = [largest] * (n // largest)
  rest = n % largest
  bit = largest
  while rest:
    if rest >= bit:
      out.append(bit)
      rest -= bit
    bit //= 2
  return out


class JittedDraft:
  """A `DraftModel` whose ``propose`` runs under ``jax.jit`` with few distinct shapes.

  ``propose`` is traced per ctx length n, so jitting it directly would compile once per prompt length.
  Here the n newly committed positions are committed in power-of-two chunks (<= ``chunk``) by
  commit-only calls (``num_tokens=1``, greedy, result discarded), and the last position alone is
  committed by the call that drafts.  Committing positions in several calls equals committing them at
  once for every lkjax draft (commits are causal and only the last committed position's state starts
  drafting, `lkjax.models.base`); `tests/test_evaluate.py` checks it against the plain draft.  Compiled
  shapes: ``log2(chunk) + 1`` commit-only, plus one drafting call per (num_tokens, temperature).

  Attributes not defined here (``draft_vocab``, ``num_heads``, ``target_hidden_size``, ``config``, ...)
  are the wrapped draft's, so `check_draft_fits` and `speculative_generate` see the same draft.
  """

  def __init__(self, draft: Any, *, chunk: int = COMMIT_CHUNK):
    if chunk < 1 or chunk & (chunk - 1):
      raise ValueError(f"chunk={chunk}: must be a power of two >= 1")
    self.draft = draft
    self.chunk = int(chunk)
    graphdef, self._state = nnx.split(draft)
    self._key0 = jax.random.key(0)

    @functools.partial(jax.jit, static_argnames=("num_tokens", "temperature"))
    def propose(state, cache, ctx, rng, *, num_tokens, temperature):
      return nnx.merge(graphdef, state).propose(cache, ctx, num_tokens=num_tokens, temperature=temperature,
                                                rng=rng)

    self._propose = propose

  def __getattr__(self, name: str) -> Any:
    # Only reached for names not found on the wrapper itself.
    try:
      draft = self.__dict__["draft"]
    except KeyError:
      raise AttributeError(name) from None
    return getattr(draft, name)

  def init_cache(self, batch_size: int, max_len: int) -> Any:
    return self.draft.init_cache(batch_size, max_len)

  def propose(self, cache: Any, ctx: Mapping[str, jax.Array], *, num_tokens: int, temperature: float,
              rng: jax.Array | None, forced_tokens: jax.Array | None = None):
    """Same contract as the wrapped draft's ``propose`` (teacher forcing falls back to it, unjitted)."""
    if forced_tokens is not None:
      return self.draft.propose(cache, ctx, num_tokens=num_tokens, temperature=temperature, rng=rng,
                                forced_tokens=forced_tokens)
    # Slice on the host: eager jax slicing compiles once per distinct (start, size), which costs more
    # than the draft itself; numpy inputs go straight into the compiled call.
    ctx = {k: np.asarray(v) for k, v in ctx.items()}
    valid = ctx.pop("num_valid", None)     # right-aligned ragged rows (`lkjax.models.base`)
    n = int(ctx["next_tokens"].shape[1])

    def piece(start: int, stop: int) -> dict[str, np.ndarray]:
      part = {k: v[:, start:stop] for k, v in ctx.items()}
      if valid is not None:
        part["num_valid"] = np.clip(valid - (n - stop), 0, stop - start).astype(np.int32)
      return part

    start = 0
    for size in _pow2_chunks(max(n - 1, 0), self.chunk):
      cache, _, _ = self._propose(self._state, cache, piece(start, start + size), self._key0, num_tokens=1,
                                  temperature=0.0)
      start += size
    last = piece(start, n)
    return self._propose(self._state, cache, last, self._key0 if rng is None else rng,
                         num_tokens=int(num_tokens), temperature=float(temperature))

  def compile(self, *, max_len: int, aux_width: int, hidden_size: int, num_tokens: int,
              temperatures: Sequence[float], batch_sizes: Sequence[int] | None = None) -> float:
    """Compile every shape decoding will use (cache of ``max_len`` slots) -> seconds spent.

    ``batch_sizes``: None = batch-1 decoding (`speculative_generate`); else the batched calls (ragged ctx
    with ``num_valid``, one key per row; `speculative_generate_batch`) for each number of rows B given.
    """
    t0 = time.perf_counter()
    dv = draft_vocab_ids(self.draft)
    tok = int(dv[0]) if dv is not None and dv.size else 0

    def ctx(b, n):
      out = dict(aux_hidden=np.zeros((b, n, aux_width), np.float32),
                 final_hidden=np.zeros((b, n, hidden_size), np.float32),
                 next_tokens=np.full((b, n), tok, np.int32),
                 positions=np.broadcast_to(np.arange(n, dtype=np.int32), (b, n)).copy())
      if batch_sizes is not None:
        out["num_valid"] = np.full((b,), n, np.int32)
      return out

    sizes = [1 << i for i in range(self.chunk.bit_length())]
    for b in (1,) if batch_sizes is None else dict.fromkeys(int(b) for b in batch_sizes):
      rng = self._key0 if batch_sizes is None else jax.random.split(self._key0, b)
      for size in sizes:
        out = self._propose(self._state, self.init_cache(b, max_len), ctx(b, size), self._key0, num_tokens=1,
                            temperature=0.0)
        jax.block_until_ready(out)
      for t in dict.fromkeys(float(t) for t in temperatures):
        out = self._propose(self._state, self.init_cache(b, max_len), ctx(b, 1), rng,
                            num_tokens=int(num_tokens), temperature=t)
        jax.block_until_ready(out)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------------
# One conversation


@dataclasses.dataclass
class Turn:
  """One decoded turn: the prompt it saw, the result, and the decoded answer text."""

  prompt_ids: list[int]
  result: GenerationResult
  answer: str


@dataclasses.dataclass
class MergedResult:
  """The turns of one question as one `BenchmarkRun` entry (duck-types `GenerationResult`)."""

  accept_lengths: list[int]
  num_draft: int
  num_new_tokens: int
  seconds: float
  truncated_prompt_tokens: int

  @classmethod
  def of(cls, turns: Sequence[Turn], num_draft: int) -> "MergedResult":
    return cls(accept_lengths=[a for t in turns for a in t.result.accept_lengths], num_draft=num_draft,
               num_new_tokens=sum(t.result.num_new_tokens for t in turns),
               seconds=float(sum(t.result.seconds for t in turns)),
               truncated_prompt_tokens=max(t.result.truncated_prompt_tokens for t in turns))


def _answer_text(target: Any, result: GenerationResult) -> str:
  """The answer as text for the next turn (the end-of-turn token is the template's to write)."""
  ids = result.tokens[:-1] if result.stopped_by_eos else result.tokens
  return target.tokenizer.decode(ids, skip_special_tokens=True)


def run_conversation(target: Any, prompt: EvalPrompt, decode) -> list[Turn]:
  """Ask ``prompt.turns`` in order; turn j+1 sees the model's own answers to turns <= j.

  Args:
    target: a `TargetModel` (``encode_prompt`` formats the messages; ``tokenizer.decode``).
    prompt: the user turns.
    decode: ``decode(prompt_ids, turn_index) -> GenerationResult``.
  """
  messages: list[dict[str, str]] = []
  turns = []
  for j, text in enumerate(prompt.turns):
    messages.append({"role": "user", "content": text})
    ids = list(target.encode_prompt(messages))
    result = decode(ids, j)
    answer = _answer_text(target, result)
    messages.append({"role": "assistant", "content": answer})
    turns.append(Turn(ids, result, answer))
  return turns


def run_conversations(target: Any, prompts: Sequence[EvalPrompt], decode_batch) -> list[list[Turn]]:
  """`run_conversation` of many prompts at once, turn by turn (turn j+1 of every prompt after turn j).

  Args:
    target: as `run_conversation`.
    prompts: the questions.
    decode_batch: ``decode_batch([(prompt_ids, prompt_index, turn_index), ...]) -> [GenerationResult]``
      (one result per item, in order); it decodes them in batches.
  """
  messages: list[list[dict[str, str]]] = [[] for _ in prompts]
  turns: list[list[Turn]] = [[] for _ in prompts]
  for j in range(max(len(p.turns) for p in prompts)):
    items = []
    for i, p in enumerate(prompts):
      if j < len(p.turns):
        messages[i].append({"role": "user", "content": p.turns[j]})
        items.append((list(target.encode_prompt(messages[i])), i, j))
    for (ids, i, _), result in zip(items, decode_batch(items)):
      answer = _answer_text(target, result)
      messages[i].append({"role": "assistant", "content": answer})
      turns[i].append(Turn(ids, result, answer))
  return turns


def batch_plan(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
  """Indices of ``lengths`` sorted by length (ascending, stable) in chunks of at most ``batch_size``.

  Sorting keeps the right-aligned padding of each batch small (docs/design.md#evaluation).
  """
  order = sorted(range(len(lengths)), key=lambda i: lengths[i])
  return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def _batch_sizes(prompt_sets: Mapping[str, Sequence[EvalPrompt]], batch_size: int) -> list[int]:
  """Every number of rows the batched draft will see: first batches of each turn, then compaction's."""
  sizes = set()
  for ps in prompt_sets.values():
    for j in range(max(len(p.turns) for p in ps)):
      n = sum(1 for p in ps if j < len(p.turns))
      sizes.update(len(c) for c in batch_plan([0] * n, batch_size))
  top = max(sizes)
  sizes.update(1 << i for i in range(top.bit_length()) if 1 << i <= top)
  return sorted(sizes)


def _prompt_seed(seed: int, bench_index: int, prompt_index: int, turn: int) -> int:
  """A per-(benchmark, prompt, turn) seed, the same for both decoding modes and both temperatures."""
  return int(np.random.SeedSequence([int(seed), bench_index, prompt_index, turn]).generate_state(1)[0])


# ----------------------------------------------------------------------------------------------------
# The driver


@contextlib.contextmanager
def torch_threads(n: int | None):
  """Run the block with ``torch.set_num_threads(n)`` (default: all cores), restoring the old value."""
  import torch

  old = torch.get_num_threads()
  torch.set_num_threads(max(1, int(n or os.cpu_count() or 1)))
  try:
    yield torch.get_num_threads()
  finally:
    torch.set_num_threads(old)


def _check_args(benchmarks, temperatures, num_draft: int, max_new_tokens: int, prompts) -> None:
  if not benchmarks:
    raise ValueError("benchmarks: nothing to evaluate")
  unknown = [b for b in benchmarks if b not in BENCHMARKS and (prompts is None or b not in prompts)]
  if unknown:
    raise ValueError(f"benchmarks: unknown {unknown}; choose from {BENCHMARKS}")
  if len(set(benchmarks)) != len(benchmarks):
    raise ValueError(f"benchmarks: duplicates in {list(benchmarks)}")
  if not temperatures or any(not float(t) >= 0 for t in temperatures):
    raise ValueError(f"temperatures={list(temperatures)}: need at least one, each >= 0")
  if len({float(t) for t in temperatures}) != len(temperatures):
    raise ValueError(f"temperatures: duplicates in {list(temperatures)}")
  if num_draft < 1:
    raise ValueError(f"num_draft={num_draft}: speculative decoding needs K >= 1")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")


def evaluate_draft(draft: Any, target: Any, *, benchmarks: Sequence[str] = BENCHMARKS,
                   temperatures: Sequence[float] = (0.0, 1.0), num_draft: int, max_new_tokens: int = 256,
                   limit: int | None = None, seed: int = 0, max_context: int | None = None,
                   offline: Mapping[str, Any] | None = None, out_dir: str | os.PathLike | None = None,
                   label: str = "draft", prompts: Mapping[str, Sequence[EvalPrompt]] | None = None,
                   num_threads: int | None = None, jit: bool = True, warmup: bool = True,
                   progress: bool = True, n_boot: int = 2000, commit_chunk: int = COMMIT_CHUNK,
                   meta: Mapping[str, Any] | None = None, baseline: bool = True,
                   batch_size: int = BATCH_SIZE) -> dict[str, Any]:
  """Measure tau (and speed) of ``draft`` against ``target``; write and return the report.

  Args:
    draft: a `lkjax.models.base.DraftModel` (NNX) built for ``target``.
    target: a `lkjax.targets.hf.TargetModel` (its ``model``, ``info``, ``encode_prompt``, ``tokenizer``).
    benchmarks: names from `lkjax.data.benchmarks.BENCHMARKS` (or keys of ``prompts``).
    temperatures: decoding temperatures; 0 = greedy verification, > 0 = exact rejection sampling.
    num_draft: K draft tokens per round (the config's K: 7 EAGLE-3/MTP, 6 MEDUSA/MLP-Speculator).
    max_new_tokens: per turn.
    limit: first N prompts of each benchmark (None: all: 80 MT-bench x 2 turns, 164 HumanEval, 100 GSM).
    seed: seeds every prompt's sampling (`_prompt_seed`), identically for both decoding modes.
    max_context: positions available (default: the target's); longer prompts keep their last tokens
      and are counted as truncated.
    offline: `offline_estimate` output, shown as the offline tau next to the measured tau at T = 1.
    out_dir: where to write report.{json,md,png} and answers.jsonl (None: write nothing).
    label: the draft's name in tables.
    prompts: explicit prompts per benchmark (tests); default `load_benchmark(name, limit=limit)`.
    num_threads: torch threads for the target (default: all cores; restored afterwards).
    jit: run the draft through `JittedDraft` (False: call its ``propose`` eagerly).
    warmup: compile every draft shape and decode one prompt per temperature before timing.
    progress: tqdm bars per (benchmark, temperature).
    n_boot: bootstrap replicates for the 95% CIs.
    commit_chunk: largest ctx chunk of the jitted draft (`JittedDraft`).
    meta: extra entries for ``report["meta"]``.
    baseline: also decode every prompt with the target alone (interleaved, same seeds) for tokens/s and
      the speed-up; False skips it (tau only, about a third less decoding time; target fields are None).
    batch_size: prompts decoded at once (`speculative_generate_batch` / `target_generate_batch`, prompts
      of one turn sorted by length); 1 = batch-1 decoding (`speculative_generate`), each prompt's two
      modes interleaved.  Each prompt's result is the same either way (its own random streams, seeded
      by `_prompt_seed`); batched, a prompt's ``seconds`` is its batch's wall clock / rows, so tokens/s
      and the speed-up are throughput figures of batched decoding.

  Returns:
    The `lkjax.eval.report.build_report` dict plus ``"prompts"`` (one record per prompt and turn:
    prompt length, truncation, acceptance lengths, tokens and seconds of both modes) and, with
    ``out_dir``, ``"files"`` (paths written).

  Raises:
    ValueError: bad arguments, or a draft whose vocabulary / hidden size / aux layers do not fit the
      target (`check_draft_fits`, before anything is decoded).
  """
  from tqdm.auto import tqdm

  benchmarks = list(benchmarks)
  temperatures = [float(t) for t in temperatures]
  _check_args(benchmarks, temperatures, num_draft, max_new_tokens, prompts)
  info = target.info
  check_draft_fits(draft, info)  # vocabulary / hidden size / aux layers: fail before any decoding
  eos = list(getattr(target, "stop_token_ids", ()) or ()) or target.eot_token_id   # every stop token
  runner = JittedDraft(draft, chunk=commit_chunk) if jit else draft
  if int(batch_size) < 1:
    raise ValueError(f"batch_size={batch_size}: must be >= 1 (1 = batch-1 decoding)")
  batch_size = int(batch_size)
  if batch_size == 1:
    verifier = Verifier(target.model, aux_layer_ids=info.aux_layer_ids, max_context=max_context)
  else:
    verifier = bverifier = BatchedVerifier(target.model, aux_layer_ids=info.aux_layer_ids, max_context=max_context)
  ctx_len = verifier.max_context
  if ctx_len is None:
    raise ValueError(f"target {info.name} declares no max_position_embeddings: pass max_context")
  prompt_sets = {b: list(prompts[b]) if prompts is not None and b in prompts else load_benchmark(b, limit=limit)
                 for b in benchmarks}
  if limit is not None:
    prompt_sets = {b: p[:limit] for b, p in prompt_sets.items()}
  empty = [b for b, p in prompt_sets.items() if not p]
  if empty:
    raise ValueError(f"benchmarks {empty}: no prompts (limit={limit})")

  def spec(ids, t, s, n=max_new_tokens):
    return speculative_generate(verifier, runner, ids, num_draft=num_draft, temperature=t, max_new_tokens=n,
                                eos_token_id=eos, seed=s, max_context=ctx_len)

  def plain(ids, t, s, n=max_new_tokens):
    # num_draft reserves the same context room, so both modes truncate a long prompt identically.
    return target_generate(verifier, ids, temperature=t, max_new_tokens=n, eos_token_id=eos, seed=s,
                           max_context=ctx_len, num_draft=num_draft)

  def spec_batch(batch, t, seeds, n=max_new_tokens):
    return speculative_generate_batch(bverifier, runner, batch, num_draft=num_draft, temperature=t,
                                      max_new_tokens=n, eos_token_id=eos, seeds=seeds, max_context=ctx_len)

  def plain_batch(batch, t, seeds, n=max_new_tokens):
    return target_generate_batch(bverifier, batch, temperature=t, max_new_tokens=n, eos_token_id=eos, seeds=seeds,
                                 max_context=ctx_len, num_draft=num_draft)

  runs, records, answers = [], [], []
  timings: dict[str, float] = {}
  try:
    with torch_threads(num_threads) as threads:
      t0 = time.perf_counter()
      if warmup:
        if jit:
          timings["compile_s"] = runner.compile(
              max_len=ctx_len, aux_width=info.num_aux * info.hidden_size, hidden_size=info.hidden_size,
              num_tokens=num_draft, temperatures=temperatures,
              batch_sizes=None if batch_size == 1 else _batch_sizes(prompt_sets, batch_size))
        # One real prompt per temperature through both modes: first-call costs of torch and jax.
        first = prompt_sets[benchmarks[0]][0]
        ids = list(target.encode_prompt(first.turns[0]))
        short = min(max_new_tokens, WARMUP_MAX_NEW_TOKENS)
        for t in temperatures:
          if batch_size == 1:
            for fn in (spec, plain) if baseline else (spec,):
              fn(ids, t, seed, short)
          else:
            for fn in (spec_batch, plain_batch) if baseline else (spec_batch,):
              fn([ids, ids], t, [seed, seed + 1], short)
        timings["warmup_s"] = time.perf_counter() - t0
      t_run = time.perf_counter()
      for bi, bench in enumerate(benchmarks):
        for t in temperatures:
          spec_res, tgt_res = [], []
          ps = prompt_sets[bench]

          def add(p, s_turns, t_turns):
            spec_res.append(MergedResult.of(s_turns, num_draft))
            if baseline:
              tgt_res.append(MergedResult.of(t_turns, num_draft))
            for j, (st, tt) in enumerate(zip(s_turns, t_turns)):
              r = st.result
              records.append(dict(
                  benchmark=bench, temperature=t, id=p.id, turn=j, prompt_tokens=r.prompt_tokens,
                  truncated_prompt_tokens=r.truncated_prompt_tokens, accept_lengths=list(r.accept_lengths),
                  tau=report_lib.tau(r.accepted, r.drafted, num_draft) if r.drafted else None,
                  new_tokens=r.num_new_tokens, seconds=r.seconds, stopped_by_eos=r.stopped_by_eos,
                  target_prompt_tokens=tt.result.prompt_tokens if tt else None,
                  target_new_tokens=tt.result.num_new_tokens if tt else None,
                  target_seconds=tt.result.seconds if tt else None))
              answers.append(dict(benchmark=bench, temperature=t, id=p.id, turn=j, prompt_tokens=len(st.prompt_ids),
                                  speculative=st.answer, target=tt.answer if tt else None))

          if batch_size == 1:
            bar = tqdm(ps, desc=f"{bench} T={t:g}", disable=not progress, dynamic_ncols=True)
            for pi, p in enumerate(bar):
              # Interleaved per prompt: both modes see the same machine load (shared CPUs drift).
              s_turns = run_conversation(target, p, lambda ids, j: spec(ids, t, _prompt_seed(seed, bi, pi, j)))
              t_turns = (run_conversation(target, p, lambda ids, j: plain(ids, t, _prompt_seed(seed, bi, pi, j)))
                         if baseline else [None] * len(s_turns))
              add(p, s_turns, t_turns)
              acc = sum(sum(m.accept_lengths) for m in spec_res)
              rounds = sum(len(m.accept_lengths) for m in spec_res)
              if rounds:
                bar.set_postfix(tau=f"{report_lib.tau(acc, num_draft * rounds, num_draft):.3f}", refresh=False)
          else:
            # Turn by turn, each mode in length-sorted batches; the modes alternate per (benchmark, T).
            n_turns = sum(len(p.turns) for p in ps) * (2 if baseline else 1)
            bar = tqdm(total=n_turns, desc=f"{bench} T={t:g}", disable=not progress, dynamic_ncols=True)

            def batches(fn):
              def decode_batch(items):
                out = [None] * len(items)
                for chunk in batch_plan([len(ids) for ids, _, _ in items], batch_size):
                  res = fn([items[c][0] for c in chunk], t,
                           [_prompt_seed(seed, bi, items[c][1], items[c][2]) for c in chunk])
                  for c, r in zip(chunk, res):
                    out[c] = r
                  bar.update(len(chunk))
                return out
              return decode_batch

            s_all = run_conversations(target, ps, batches(spec_batch))
            t_all = (run_conversations(target, ps, batches(plain_batch)) if baseline
                     else [[None] * len(x) for x in s_all])
            for p, s_turns, t_turns in zip(ps, s_all, t_all):
              add(p, s_turns, t_turns)
          bar.close()
          off = None
          if offline is not None and t == 1.0:
            off = float(offline["tau"])
          runs.append(report_lib.BenchmarkRun.from_results(bench, t, spec_res, tgt_res if baseline else None,
                                                           offline_tau=off))
      timings["decode_s"] = time.perf_counter() - t_run
  finally:
    verifier.close()

  meta_out = dict(
      target=info.name, target_weights_sha256=info.weights_sha256, num_draft=int(num_draft),
      draft_heads=int(getattr(draft, "num_heads", 0) or 0) or None,
      draft_vocab_size=int(getattr(draft, "draft_vocab_size", 0) or 0) or None,
      max_new_tokens=int(max_new_tokens), max_context=int(ctx_len), limit=limit, seed=int(seed),
      benchmarks=benchmarks, temperatures=temperatures,
      num_prompts={b: len(p) for b, p in prompt_sets.items()},
      num_turns={b: sum(len(x.turns) for x in p) for b, p in prompt_sets.items()},
      truncated_turns=sum(int(r["truncated_prompt_tokens"] > 0) for r in records),
      gsm_symbolic_seed=GSM_SEED, eos_token_id=eos, chat_template=bool(getattr(target, "has_chat_template", False)),
      torch_threads=threads, jit=bool(jit), warmup=bool(warmup), baseline=bool(baseline), timings=timings,
      batch_size=batch_size,
      offline=None if offline is None else dict(offline),
      host=dict(machine=platform.machine(), cpus=os.cpu_count(), jax_backend=jax.default_backend()))
  meta_out.update(meta or {})
  rep = report_lib.build_report(runs, label=label, n_boot=n_boot, seed=seed, meta=meta_out)
  rep["prompts"] = records
  if out_dir is not None:
    files = report_lib.write_report(rep, os.fspath(out_dir))
    files["answers"] = os.path.join(os.fspath(out_dir), ANSWERS_FILE)
    with open(files["answers"], "w") as f:
      for a in answers:
        f.write(json.dumps(a) + "\n")
    rep["files"] = files
  return rep


# ----------------------------------------------------------------------------------------------------
# Offline estimate from the validation shards


def offline_estimate(draft: Any, config: Any, data_dir: str | os.PathLike | None = None, *,
                     batch_size: int | None = None, max_batches: int | None = None) -> dict[str, Any]:
  """tau_off of ``draft`` on the validation split, with the trainer's eval step (T = 1).

  Per head k, alpha_bar_k is the token-weighted mean over the split of ``sum_v min(p_v, q_v)`` where p is
  the target's distribution from the shard's final hidden states through the target LM head (full
  vocabulary) and q the draft's (`lkjax.train.step.make_eval_step`, `lkjax.train.step.aggregate_eval`).

  Args:
    draft: the NNX draft (parameters as trained).
    config: its training config (``loss``, ``precision``, ``data.*``; ``batch_size`` by default).
    data_dir: the shard directory (default ``config.data.dir``).
    batch_size: rows per eval batch (default ``config.batch_size``).
    max_batches: stop after this many batches (None: the whole split).

  Returns:
    ``{"tau", "alpha" [K], "tokens" [K], "num_batches", "split", "temperature", "data_dir"}``.
  """
  from lkjax.data import shards
  from lkjax.data.pipeline import make_loader
  from lkjax.train import step as step_lib
  from lkjax.train.loop import use_target_lse

  data_dir = os.fspath(data_dir or config.data.dir)
  shards.read_manifest(data_dir)
  weights = shards.load_target_weights(data_dir)
  rows = int(batch_size or config.batch_size)
  target = jax.tree.map(jnp.asarray, step_lib.make_target(weights["lm_head"], draft_vocab_ids(draft)))
  graphdef, params, rest = nnx.split(draft, nnx.Param, ...)
  params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
  rest = step_lib.precast_rest(rest, config.precision)
  eval_step = step_lib.make_eval_step(graphdef, config.loss, total_steps=max(int(config.get("num_steps", 0)), 1),
                                      precision=config.precision)
  loader = make_loader(data_dir, split="val", global_batch_size=rows, max_length=int(config.data.max_length),
                       seed=int(config.data.seed), num_epochs=1, shuffle=False, packing=bool(config.data.packing),
                       val_fraction=float(config.data.val_fraction), worker_count=0, drop_remainder=False,
                       process_index=0, process_count=1, target_lse=use_target_lse(config))
  ms = []
  for i, batch in enumerate(loader):
    if max_batches is not None and i >= max_batches:
      break
    # Pad the last batch to full size (segment_ids 0 = masked): one compiled shape, metrics unchanged.
    padded = {k: np.concatenate([np.asarray(v), np.zeros((rows - len(v),) + np.shape(v)[1:], np.asarray(v).dtype)])
              if len(v) < rows else np.asarray(v) for k, v in batch.items()}
    ms.append(jax.device_get(eval_step(params, rest, target, jax.tree.map(jnp.asarray, padded),
                                       jnp.asarray(0, jnp.int32))))
  agg = step_lib.aggregate_eval(ms)
  alpha = [float(a) for a in np.asarray(agg["alpha"]).reshape(-1)]
  return dict(tau=report_lib.offline_tau(alpha), alpha=alpha,
              tokens=[int(x) for x in np.asarray(agg["tokens"]).reshape(-1)], num_batches=len(ms), split="val",
              temperature=1.0, data_dir=os.path.abspath(data_dir))


# ----------------------------------------------------------------------------------------------------
# Loading what a trained draft was trained against (used by experiments/evaluate.py)


def load_target_for(info: Any, override: str | os.PathLike | None = None, *, cache_dir=None):
  """The `TargetModel` a draft was trained against, from its shards' `TargetInfo`.

  ``override`` (a packaged name or HF directory) replaces the recorded one; either way the loaded
  weights must have the recorded sha256 (features of other weights would make tau meaningless).
  """
  from lkjax.targets.hf import PACKAGED, TargetModel

  name = override
  if name is None:
    packaged = {v: k for k, v in PACKAGED.items()}
    if info.name in packaged:
      name = packaged[info.name]
    elif os.path.isdir(info.name):
      name = info.name
    else:
      raise FileNotFoundError(f"the draft was trained on target {info.name!r}, which is neither packaged "
                              f"({sorted(PACKAGED)}) nor a directory here: pass the target explicitly")
  target = TargetModel.load(name, cache_dir=cache_dir)
  if info.weights_sha256 and target.info.weights_sha256 != info.weights_sha256:
    raise ValueError(f"target {name}: weights sha256 {target.info.weights_sha256[:12]}... differ from "
                     f"{info.weights_sha256[:12]}... recorded in the training data (target {info.name})")
  return target


def evaluate_checkpoint(workdir_or_checkpoint: str | os.PathLike, *, config: Any = None,
                        target: str | os.PathLike | None = None, num_draft: int | None = None,
                        offline: bool = True, out_dir: str | os.PathLike | None = None,
                        label: str | None = None, **kwargs) -> dict[str, Any]:
  """`evaluate_draft` of a training run's draft (`lkjax.train.loop.load_trained_draft`).

  Args:
    workdir_or_checkpoint: a train workdir (latest checkpoint) or ``<workdir>/checkpoints/<step>``.
    config: the run's config (default: the workdir's ``config.json``).
    target: override of the target recorded in the shard manifest.
    num_draft: K (default: the config's ``model.num_heads``).
    offline: also compute `offline_estimate` on the run's validation split.
    out_dir: default ``<workdir>/eval``.
    label: default the config's name.
    kwargs: passed to `evaluate_draft`.
  """
  from lkjax.train.loop import load_trained_draft

  trained = load_trained_draft(workdir_or_checkpoint, config)
  cfg = trained.config
  k = int(num_draft or cfg.model.num_heads)
  off = offline_estimate(trained.model, cfg) if offline else None  # reads every val record: fails before the target loads
  tm = load_target_for(trained.target_info, target)
  path = os.path.abspath(os.fspath(workdir_or_checkpoint))
  workdir = os.path.dirname(os.path.dirname(path)) if os.path.basename(path).isdigit() else path
  meta = dict(kwargs.pop("meta", None) or {}, arch=str(cfg.model.arch), checkpoint=path, step=trained.step,
              loss=dict(kind=str(cfg.loss.kind), eta=float(cfg.loss.eta)), data_dir=str(cfg.data.dir))
  return evaluate_draft(trained.model, tm, num_draft=k, offline=off,
                        out_dir=out_dir or os.path.join(workdir, "eval"), label=label or str(cfg.get("name", "draft")),
                        meta=meta, **kwargs)


def evaluate_eagle3_import(hf_dir: str | os.PathLike, *, target: str | os.PathLike = "smollm2",
                           num_draft: int = 7, out_dir: str | os.PathLike | None = None,
                           label: str | None = None, **kwargs) -> dict[str, Any]:
  """`evaluate_draft` of a public (HF / SpecForge / speculators) EAGLE-3 directory on ``target``."""
  from lkjax.export import import_eagle3
  from lkjax.targets.hf import TargetModel

  tm = TargetModel.load(target)
  embed = tm.head_weights()["embed_tokens"]
  draft, _ = import_eagle3(hf_dir, tm.info, target_embed=embed, num_heads=int(num_draft))
  name = os.path.basename(os.path.normpath(os.fspath(hf_dir)))
  meta = dict(kwargs.pop("meta", None) or {}, arch="eagle3", imported_from=os.path.abspath(os.fspath(hf_dir)))
  return evaluate_draft(draft, tm, num_draft=int(num_draft), out_dir=out_dir or os.path.join("runs", "eval", name),
                        label=label or name, meta=meta, **kwargs)
