"""Batched autoregressive decoding on any transformers causal LM: a preallocated KV cache and batch compaction.

Why not ``model.generate``: its `DynamicCache` concatenates every layer's keys and values at every step
(an O(length) copy per token, which dominates a CPU decode step at batch 64+), and a batch keeps decoding
rows that already ended.  Here:

* `preallocated_cache` gives attention layers (full and sliding-window) a buffer with room to spare: new
  keys/values are written in place and attention gets a view of the filled part (no copy per step, no attention
  over empty slots; the sliding window is the mask's job).  Other layer kinds (linear attention) keep their
  transformers implementation.
* `decode` drops finished rows from the batch (cache, mask, positions) once enough of them ended, so the
  step cost follows the rows still running.
* The prompt pass runs in chunks of rows of similar length, each padded only to its own longest prompt and
  at most ``prefill_tokens`` padded tokens (large activations of a whole batch fall out of the CPU caches),
  written into the same cache.

The math is the model's own forward: greedy output equals ``model.generate(do_sample=False)`` on the same
left-padded batch (tested); sampled output draws from ``softmax(logits / T)`` with no top-k / top-p.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch


def _make_layer_class():
  from transformers.cache_utils import DynamicLayer

  class _Preallocated(DynamicLayer):
    """`DynamicLayer` whose buffer has spare capacity: ``update`` writes in place, returns ``[:, :, :n]`` views."""

    def __init__(self, capacity: int = 256):
      super().__init__()
      self.capacity = int(capacity)
      self.n = 0

    def lazy_initialization(self, key_states, value_states):
      self.dtype, self.device = key_states.dtype, key_states.device
      b, h = key_states.shape[:2]
      cap = max(self.capacity, key_states.shape[-2])
      self._k = key_states.new_empty((b, h, cap, key_states.shape[-1]))
      self._v = value_states.new_empty((b, h, cap, value_states.shape[-1]))
      self.n = 0
      self.is_initialized = True

    def _grow(self, need: int):
      cap = self._k.shape[2]
      if need <= cap:
        return
      new = max(need, 2 * cap)
      for name in ("_k", "_v"):
        old = getattr(self, name)
        buf = old.new_empty(old.shape[:2] + (new,) + old.shape[3:])
        buf[:, :, :self.n] = old[:, :, :self.n]
        setattr(self, name, buf)

    def update(self, key_states, value_states, *args, **kwargs):
      if not self.is_initialized:
        self.lazy_initialization(key_states, value_states)
      t = key_states.shape[-2]
      self._grow(self.n + t)
      self._k[:, :, self.n:self.n + t] = key_states
      self._v[:, :, self.n:self.n + t] = value_states
      self.n += t
      self.keys, self.values = self._k[:, :, :self.n], self._v[:, :, :self.n]
      return self.keys, self.values

    def get_seq_length(self) -> int:
      return self.n if self.is_initialized else 0

    def reset(self) -> None:
      self.n = 0
      self.keys = self.values = None
      self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
      if tokens_to_remove > 0:
        raise ValueError("crop takes a negative count (tokens to remove)")
      if tokens_to_remove == 0 or not self.is_initialized:
        return
      self.n = max(0, self.n + tokens_to_remove)
      self.keys, self.values = self._k[:, :, :self.n], self._v[:, :, :self.n]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
      if not self.is_initialized:
        return
      self._k = self._k.index_select(0, indices)
      self._v = self._v.index_select(0, indices)
      self.keys, self.values = self._k[:, :, :self.n], self._v[:, :, :self.n]

  return _Preallocated


_LAYER_CLS = None


def preallocated_cache(model, capacity: int):
  """A `DynamicCache` for ``model`` whose attention layers are preallocated (``capacity`` positions).

  Sliding-window layers get a preallocated FULL layer too: the model's sliding-window mask (built from
  absolute cache slots) still hides keys outside the window, so the output is unchanged, and the cache
  can be cropped anywhere (transformers' `DynamicSlidingWindowLayer` keeps only the last window and
  cannot roll back past it, which speculative verification needs).  Other layer kinds (linear
  attention) keep their transformers implementation.
  """
  global _LAYER_CLS
  from transformers import DynamicCache
  from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

  if _LAYER_CLS is None:
    _LAYER_CLS = _make_layer_class()
  cache = DynamicCache(config=model.config)
  cache.layers = [_LAYER_CLS(capacity) if type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) else layer
                  for layer in cache.layers]
  return cache


def _all_preallocated(cache) -> bool:
  return all(isinstance(layer, _LAYER_CLS) for layer in cache.layers) and bool(cache.layers)


def _chunked_prefill(model, cache, prompts, ids, mask, capacity: int, prefill_tokens: int) -> torch.Tensor:
  """The prompt pass in chunks of rows of similar length, each padded only to its own longest prompt.

  A chunk's keys/values land right-aligned in the batch cache (slots ``width - w .. width - 1``); the
  slots before them stay unwritten and are masked out by ``mask``.  Returns the last logits ``[n, V]``.
  """
  n, width = ids.shape
  device = ids.device
  order = sorted(range(n), key=lambda i: len(prompts[i]))
  chunks, cur = [], []
  for i in order:     # ascending length: a chunk's width is its last row's length
    if cur and (len(cur) + 1) * len(prompts[i]) > prefill_tokens:
      chunks.append(cur)
      cur = []
    cur.append(i)
  chunks.append(cur)
  logits = None
  for rows in chunks:
    w = max(len(prompts[i]) for i in rows)
    r = torch.tensor(rows, dtype=torch.long, device=device)
    part, m = preallocated_cache(model, w), mask[r, width - w:]
    out = model(input_ids=ids[r, width - w:], attention_mask=m, position_ids=(m.cumsum(-1) - 1).clamp(min=0),
                past_key_values=part, use_cache=True, logits_to_keep=1)
    if logits is None:
      logits = out.logits.new_empty((n, out.logits.shape[-1]))
    logits[r] = out.logits[:, -1]
    for big, small in zip(cache.layers, part.layers):
      if not big.is_initialized:
        k, v = small._k, small._v
        big.lazy_initialization(k.new_empty((n,) + k.shape[1:]), v.new_empty((n,) + v.shape[1:]))
        big._grow(capacity)
      big._k[r, :, width - w:width] = small._k[:, :, :w]
      big._v[r, :, width - w:width] = small._v[:, :, :w]
  for big in cache.layers:
    big.n = width
    big.keys, big.values = big._k[:, :, :width], big._v[:, :, :width]
  return logits


@dataclasses.dataclass
class Decoded:
  """New tokens of one row (up to and excluding the stop token), whether a stop token ended it, and which."""

  token_ids: list[int]
  finished: bool
  stop_token_id: int | None = None


def _sample(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
  """[B, V] -> [B] next tokens: argmax at T = 0, else one draw of softmax(logits / T).

  The draw inverts the float64 CDF at one uniform per row (exact categorical sampling; ``torch.multinomial``
  costs several times more on a [64, 49152] batch on CPU).
  """
  if temperature <= 0:
    return torch.argmax(logits, dim=-1)
  cdf = torch.softmax(logits.double() / float(temperature), dim=-1).cumsum_(-1)
  u = torch.rand((logits.shape[0], 1), dtype=torch.float64, generator=generator, device=logits.device)
  idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)[:, 0]
  return idx.clamp_(max=logits.shape[-1] - 1)


@torch.no_grad()
def decode(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, pad_token_id: int,
           stop_token_ids: Sequence[int] = (), temperature: float = 0.0, seed: int = 0,
           prefill_tokens: int = 4096, compact_below: float = 0.75,
           on_step: Callable[[int], None] | None = None) -> list[Decoded]:
  """Decode a batch of token-id prompts (left padded) to at most ``max_new_tokens`` new tokens each.

  Args:
    model: a transformers causal LM in eval mode.
    prompts: token ids per row (non-empty).
    stop_token_ids: a row ends when it emits one of these (not included in its ``token_ids``).
    temperature: 0 = greedy, else sampling from ``softmax(logits / T)`` with a generator seeded by ``seed``.
    prefill_tokens: padded tokens per prompt-pass chunk (rows are split so chunk rows x width <= this).
    compact_below: drop finished rows once the running rows fall below this fraction of the batch rows.
    on_step: called after every decoding step with the number of tokens that step added (progress bars).

  Returns:
    One `Decoded` per prompt, in order.
  """
  if not prompts:
    return []
  if any(len(p) == 0 for p in prompts):
    raise ValueError("decode: every prompt needs at least one token")
  device = next(model.parameters()).device
  stops = torch.tensor(sorted({int(s) for s in stop_token_ids}) or [-1], dtype=torch.long, device=device)
  n, width = len(prompts), max(len(p) for p in prompts)
  ids = torch.full((n, width), int(pad_token_id), dtype=torch.long)
  mask = torch.zeros((n, width), dtype=torch.long)
  for i, p in enumerate(prompts):
    ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
    mask[i, width - len(p):] = 1
  ids, mask = ids.to(device), mask.to(device)
  gen = torch.Generator(device=device).manual_seed(int(seed)) if temperature > 0 else None

  capacity = width + int(max_new_tokens) + 1
  cache = preallocated_cache(model, capacity)
  if not _all_preallocated(cache):   # sliding-window / recurrent layers: one pass over the padded batch
    out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                past_key_values=cache, use_cache=True, logits_to_keep=1)
    logits = out.logits[:, -1]
  else:
    logits = _chunked_prefill(model, cache, prompts, ids, mask, capacity, prefill_tokens)

  results: list[list[int]] = [[] for _ in range(n)]
  finished = [False] * n
  stopped_by: list[int | None] = [None] * n
  rows = torch.arange(n, device=device)        # original index of each batch row
  positions = mask.sum(-1)                     # position of the next token per row
  running = torch.ones(n, dtype=torch.bool, device=device)
  batch_rows = n
  for step in range(int(max_new_tokens)):
    nxt = _sample(logits, temperature, gen)
    stop = torch.isin(nxt, stops) & running
    for r, t, run, st in zip(rows.tolist(), nxt.tolist(), running.tolist(), stop.tolist()):
      if not run:
        continue
      if st:
        finished[r] = True
        stopped_by[r] = t
      else:
        results[r].append(t)
    if on_step is not None:
      on_step(int(running.sum()))
    running &= ~stop
    n_run = int(running.sum())
    if n_run == 0 or step == max_new_tokens - 1:
      break
    if n_run < compact_below * batch_rows:
      keep = torch.nonzero(running, as_tuple=True)[0]
      cache.batch_select_indices(keep)
      rows, nxt, positions, mask = rows[keep], nxt[keep], positions[keep], mask[keep]
      running = running[keep]
      batch_rows = n_run
    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=positions[:, None],
                past_key_values=cache, use_cache=True)
    logits = out.logits[:, -1]
    positions = positions + 1
  return [Decoded(results[i], finished[i], stopped_by[i]) for i in range(n)]
