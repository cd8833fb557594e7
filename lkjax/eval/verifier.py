"""Target-side verification: a transformers causal LM with its KV cache, and the features drafts need.

One `Verifier` holds one sequence (batch size 1).  ``feed(tokens)`` appends tokens at the end of the
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
