"""Target-side verification: a transformers causal LM with its KV cache, and the features drafts need.

One `Verifier` holds one sequence (batch size 1); a `BatchedVerifier` holds B sequences that advance by
different numbers of tokens per round (speculative evaluation of a batch of prompts).  ``feed(tokens)`` appends tokens at the end of the
cached sequence and returns, for each fed position j,

  logits        f32[n, V]        target logits at j (they predict x[j+1])
  aux_hidden    f32[n, A*Ht]     concat of ``output_hidden_states[L]`` for L in ``aux_layer_ids``
                                 (the residual stream ENTERING decoder layer L; index 0 = embeddings)
  final_hidden  f32[n, Ht]       the input of the LM head (last hidden state AFTER the final norm)

``crop(length)`` drops cached positions >= length (rejected draft tokens).

Why the final hidden is taken from a forward pre-hook on the LM head: in transformers 5 the last element
of ``hidden_states`` for Llama happens to be the normed state (it is ``last_hidden_state``, replacing the
output of the last decoder layer), but that is a per-model convention; the input of the output embedding
is what docs/design.md#evaluation defines, for every architecture.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch

from lkjax.targets.info import eagle3_aux_layer_ids


@dataclasses.dataclass
class TargetStep:
  """Target outputs for n fed positions (numpy float32 / torch float32 logits)."""

  logits: torch.Tensor        # f32[n, V] (torch, so sampling uses the target-side torch.Generator)
  aux_hidden: np.ndarray      # f32[n, A*Ht]
  final_hidden: np.ndarray    # f32[n, Ht]


def unwrap_causal_lm(model) -> torch.nn.Module:
  """Accept a transformers causal LM or a wrapper exposing it as ``.model``."""
  if isinstance(model, torch.nn.Module):
    return model
  inner = getattr(model, "model", None)
  if isinstance(inner, torch.nn.Module):
    return inner
  raise ValueError(f"model: expected a transformers causal LM (torch.nn.Module), got {type(model).__name__}")


class Verifier:
  """Incremental target forward with a KV cache for one sequence (batch size 1;
  `lkjax.targets.decode.preallocated_cache`).

  Args:
    model: a transformers causal LM (or an object whose ``.model`` is one), in eval mode.
    aux_layer_ids: hidden-state indices to concatenate; default ``(2, N//2, N-3)``.
    max_context: positions the target may hold; default ``config.max_position_embeddings``.
    kv_cache: ``preallocated`` (keys/values written in place) or ``dynamic`` (transformers' `DynamicCache`,
      which concatenates the whole cache every round; kept as the benchmark's baseline).
  """

  def __init__(self, model, aux_layer_ids: Sequence[int] | None = None, max_context: int | None = None,
               kv_cache: str = "preallocated"):
    self.model = unwrap_causal_lm(model).eval()
    if kv_cache not in ("preallocated", "dynamic"):
      raise ValueError(f"kv_cache={kv_cache!r}: expected 'preallocated' or 'dynamic'")
    self.kv_cache = kv_cache
    cfg = self.model.config
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    self.num_layers = int(cfg.num_hidden_layers)
    self.hidden_size = int(cfg.hidden_size)
    self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
    ids = eagle3_aux_layer_ids(self.num_layers) if aux_layer_ids is None else tuple(int(i) for i in aux_layer_ids)
    bad = [i for i in ids if not 0 <= i < self.num_layers]
    if bad:
      # hidden_states[N] is not the residual leaving the last layer in transformers 5 (it is normed).
      raise ValueError(f"aux_layer_ids={ids}: ids must lie in [0, {self.num_layers}) for a "
                       f"{self.num_layers}-layer target")
    self.aux_layer_ids = ids
    self.max_context = int(max_context or getattr(cfg, "max_position_embeddings", 0) or 0) or None
    self._captured: list[torch.Tensor] = []
    self._hook = self.model.get_output_embeddings().register_forward_pre_hook(self._capture)
    self.reset()

  def _capture(self, module, args):
    self._captured.append(args[0].detach())

  def close(self) -> None:
    """Remove the LM-head hook (the verifier is unusable afterwards)."""
    self._hook.remove()

  def reset(self) -> None:
    """Start a new sequence (empty cache)."""
    from transformers import DynamicCache

    from lkjax.targets.decode import preallocated_cache

    self.cache = (preallocated_cache(self.model, 1024) if self.kv_cache == "preallocated"
                  else DynamicCache(config=self.model.config))
    self.length = 0

  @torch.no_grad()
  def feed(self, tokens: Sequence[int] | np.ndarray) -> TargetStep:
    """Run the target over ``tokens`` at positions ``length .. length+n-1``; the cache keeps them all."""
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64).reshape(1, -1))
    n = ids.shape[1]
    if n == 0:
      raise ValueError("tokens: feed needs at least one token")
    if self.max_context is not None and self.length + n > self.max_context:
      raise ValueError(f"tokens: {self.length}+{n} positions exceed the target context {self.max_context}")
    if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
      raise ValueError(f"tokens: ids must lie in [0, {self.vocab_size}), got {ids.tolist()}")
    pos = torch.arange(self.length, self.length + n).unsqueeze(0)
    self._captured.clear()
    out = self.model(input_ids=ids, position_ids=pos, past_key_values=self.cache, use_cache=True,
                     output_hidden_states=True)
    if len(self._captured) != 1:
      raise RuntimeError(f"expected one LM-head call per forward, saw {len(self._captured)}")
    self.cache = out.past_key_values
    self.length += n
    aux = torch.cat([out.hidden_states[i][0] for i in self.aux_layer_ids], dim=-1)
    final = self._captured.pop()[0]
    return TargetStep(logits=out.logits[0].float(), aux_hidden=aux.float().numpy(),
                      final_hidden=final.float().numpy())

  def crop(self, length: int) -> None:
    """Keep only cached positions ``< length`` (drop rejected draft tokens)."""
    if not 0 <= length <= self.length:
      raise ValueError(f"length={length}: must lie in [0, {self.length}]")
    if length < self.length:
      self.cache.crop(length - self.length)  # transformers 5: a negative count removes that many tokens
      self.length = length
    if self.cache.get_seq_length() != self.length:
      raise RuntimeError(f"KV cache holds {self.cache.get_seq_length()} positions, expected {self.length}")


@dataclasses.dataclass
class BatchStep:
  """Target outputs for B rows and n fed positions each (batched `TargetStep`)."""

  logits: torch.Tensor        # f32[B, n, V] (or [B, 1, V]: the prompt pass keeps only the last position)
  aux_hidden: np.ndarray      # f32[B, n, A*Ht]
  final_hidden: np.ndarray    # f32[B, n, Ht]


class BatchedVerifier(Verifier):
  """The target over B sequences at once, each row advancing by its own number of tokens per round.

  Layout (docs/design.md#evaluation): one preallocated KV cache of ``B`` rows whose slots are shared by
  all rows.  The prompt pass writes the prompts right-aligned (left padding); every later `feed` writes
  the same number of tokens n for every row at the same slots, and `commit` keeps a per-row prefix of them
  (``keep[b]`` in [0, n]).  The cache is cropped to the longest kept prefix; the slots a row did not keep
  (its rejected tokens, and the padding) stay in the cache as holes that the 2-D attention mask hides.
  ``lengths[b]`` counts row b's committed tokens, which is the RoPE position of its next token, so a row's
  forward is its batch-1 forward with masked-out extra keys.  `select` drops rows (finished prompts).

  Args: as `Verifier` (the cache is always preallocated).
  """

  def __init__(self, model, aux_layer_ids: Sequence[int] | None = None, max_context: int | None = None):
    super().__init__(model, aux_layer_ids=aux_layer_ids, max_context=max_context, kv_cache="preallocated")

  def reset(self) -> None:
    """No sequences (`start` begins a batch)."""
    self.cache = None
    self.mask = torch.zeros((0, 0), dtype=torch.long)
    self.lengths = torch.zeros((0,), dtype=torch.long)
    self.length = 0

  @property
  def batch_size(self) -> int:
    return int(self.lengths.shape[0])

  def _forward(self, ids: torch.Tensor, pos: torch.Tensor, logits_to_keep: int) -> tuple:
    self._captured.clear()
    out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=pos, past_key_values=self.cache,
                     use_cache=True, output_hidden_states=True, logits_to_keep=logits_to_keep)
    if len(self._captured) != 1:
      raise RuntimeError(f"expected one LM-head call per forward, saw {len(self._captured)}")
    self.cache = out.past_key_values
    aux = torch.cat([out.hidden_states[i] for i in self.aux_layer_ids], dim=-1)
    return out, aux.float().numpy(), self._captured.pop()

  @torch.no_grad()
  def start(self, prompts: Sequence[Sequence[int]]) -> BatchStep:
    """Prompt pass over B prompts, right-aligned to the longest -> features of every prompt slot.

    Returns ``logits [B, 1, V]`` at each prompt's last token (the only ones decoding reads: the LM head
    is not run over the prompts), ``aux_hidden`` / ``final_hidden [B, W, ...]`` (W = longest prompt;
    row b's prompt features are its last ``len(prompts[b])`` entries, the rest is padding).
    """
    from lkjax.targets.decode import preallocated_cache

    if not prompts or any(len(p) == 0 for p in prompts):
      raise ValueError("prompts: start needs at least one prompt and no empty prompt")
    b, w = len(prompts), max(len(p) for p in prompts)
    if self.max_context is not None and w > self.max_context:
      raise ValueError(f"prompts: a prompt of {w} tokens exceeds the target context {self.max_context}")
    ids = torch.zeros((b, w), dtype=torch.long)
    self.mask = torch.zeros((b, w), dtype=torch.long)
    for i, p in enumerate(prompts):
      row = torch.as_tensor(np.asarray(p, dtype=np.int64))
      if int(row.min()) < 0 or int(row.max()) >= self.vocab_size:
        raise ValueError(f"prompts[{i}]: ids must lie in [0, {self.vocab_size})")
      ids[i, w - len(p):] = row
      self.mask[i, w - len(p):] = 1
    self.lengths = self.mask.sum(-1)
    pos = (self.mask.cumsum(-1) - 1).clamp(min=0)
    self.cache = preallocated_cache(self.model, 2 * w + 64)

    # The final hidden of every prompt slot is the decoder's last hidden state (the LM head's input,
    # which with logits_to_keep=1 only sees the last slot: both are checked equal there).
    decoder_out: list[torch.Tensor] = []
    hook = self.model.get_decoder().register_forward_hook(
        lambda module, args, output: decoder_out.append(getattr(output, "last_hidden_state", None)
                                                        if hasattr(output, "last_hidden_state") else output[0]))
    try:
      out, aux, head_in = self._forward(ids, pos, logits_to_keep=1)
    finally:
      hook.remove()
    final = decoder_out[-1]
    if final.shape[:2] != (b, w) or not torch.equal(final[:, -1:], head_in):
      raise RuntimeError("the decoder's last hidden state is not the LM head's input for this target; "
                         "batched evaluation needs it for the prompt features")
    self.length = w
    return BatchStep(logits=out.logits.float(), aux_hidden=aux, final_hidden=final.float().numpy())

  @torch.no_grad()
  def feed(self, tokens) -> BatchStep:
    """Every row appends ``tokens [B, n]`` after its committed tokens (positions ``lengths[b] + i``)."""
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    if ids.ndim != 2 or ids.shape[0] != self.batch_size or ids.shape[1] == 0:
      raise ValueError(f"tokens: expected shape [{self.batch_size}, n >= 1], got {tuple(ids.shape)}")
    if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
      raise ValueError(f"tokens: ids must lie in [0, {self.vocab_size}), got {ids.tolist()}")
    n = ids.shape[1]
    pos = self.lengths[:, None] + torch.arange(n)[None]
    if self.max_context is not None:
      # Rows held but no longer decoding (`commit` with keep 0) stay at their length; live rows are
      # checked by the caller's context reservation.  Clamp so no row reads past the position table.
      pos = pos.clamp(max=self.max_context - 1)
    self.mask = torch.cat([self.mask, torch.ones((self.batch_size, n), dtype=torch.long)], dim=1)
    out, aux, final = self._forward(ids, pos, logits_to_keep=0)
    self._fed = n
    self.length += n
    return BatchStep(logits=out.logits.float(), aux_hidden=aux, final_hidden=final.float().numpy())

  def commit(self, keep: Sequence[int]) -> None:
    """Row b keeps the first ``keep[b]`` tokens of the last `feed` (0..n); the rest become holes."""
    n = getattr(self, "_fed", None)
    if n is None:
      raise ValueError("commit: nothing fed since the last commit")
    keep_t = torch.as_tensor(np.asarray(keep, dtype=np.int64)).reshape(-1)
    if keep_t.shape[0] != self.batch_size or int(keep_t.min()) < 0 or int(keep_t.max()) > n:
      raise ValueError(f"keep: expected {self.batch_size} counts in [0, {n}], got {keep_t.tolist()}")
    base = self.length - n
    top = int(keep_t.max())
    if top < n:
      self.cache.crop(top - n)
    self.mask = self.mask[:, :base + top].clone()
    hole = torch.arange(top)[None] >= keep_t[:, None]                 # [B, top]
    self.mask[:, base:base + top][hole] = 0
    self.lengths = self.lengths + keep_t
    self.length = base + top
    self._fed = None
    if self.cache.get_seq_length() != self.length:
      raise RuntimeError(f"KV cache holds {self.cache.get_seq_length()} slots, expected {self.length}")

  def select(self, rows: Sequence[int]) -> None:
    """Keep only batch rows ``rows`` (in that order)."""
    idx = torch.as_tensor(np.asarray(rows, dtype=np.int64))
    self.cache.batch_select_indices(idx)
    self.mask, self.lengths = self.mask[idx], self.lengths[idx]

  def crop(self, length: int) -> None:
    raise NotImplementedError("BatchedVerifier: use commit(keep) (rows keep different numbers of tokens)")
