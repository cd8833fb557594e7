"""The contract every lkjax draft model follows, and the alignment helpers they share.

Batch (numpy from the input pipeline, jax arrays inside the step), all ``[B, T, ...]``:
  input_ids    int32[B, T]        target token ids
  loss_mask    uint8/bool[B, T]   1 on assistant (trained) tokens
  segment_ids  int32[B, T]        0 = padding, 1.. = document id within the row (packing)
  positions    int32[B, T]        position of the token inside its document (RoPE)
  aux_hidden   bf16[B, T, A*Ht]   EAGLE-3 aux target states, A = len(aux_layer_ids), [low|mid|high]
  final_hidden bf16[B, T, Ht]     target last hidden state after its final norm
Optional (models never read it; `lkjax.train.step.batch_target` does):
  target_lse   f32[B, T]          full-vocabulary target logsumexp precomputed into the shards

Alignment (the same for all four architectures): ``logits[k, b, t]`` (head / step / stage / depth k,
k = 0..K-1) is the draft's prediction of token ``x[t+k+2]``; it is compared with the TARGET's
distribution at position ``t+k+1`` (the target's logits at position j predict x[j+1]).  It is trained
iff ``x[t+k+2]`` exists in the same document as ``x[t]`` and is an assistant token -- see `head_mask`.

Drafting (evaluation) uses `DraftModel.init_cache` / `DraftModel.propose`:
  ctx = dict(aux_hidden [B,n,A*Ht], final_hidden [B,n,Ht], next_tokens int32[B,n], positions int32[B,n])
  holds the target's features for n newly COMMITTED positions j and the committed token x[j+1] at each.
  ``propose`` appends the step-0 state of those positions to the cache, then drafts ``num_tokens`` tokens
  one at a time after the last committed position and returns
  ``(cache, tokens int32[B, num_tokens] TARGET ids, logits f32[B, num_tokens, Vd] un-tempered)``.
  Speculative (step >= 1) state is never kept in the cache.  Batched evaluation commits a different
  number of positions per row: ctx may then carry ``num_valid int32[B]``, and row b's committed positions
  are its LAST ``num_valid[b]`` entries (right-aligned; the entries before them are padding, which
  ``propose`` ignores; 0 = nothing committed in that row).  Without it every entry is committed.
  ``rng`` is one key, or one key per row (`lkjax.models.layers.split_keys`).  With ``forced_tokens`` (TARGET ids
  [B, num_tokens]) the drafted tokens are replaced by the given ones (teacher forcing), which is how the
  tests check that drafting reproduces the training forward's logits.
"""
from __future__ import annotations

from typing import Any, Mapping, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

BATCH_KEYS = ("input_ids", "loss_mask", "segment_ids", "positions", "aux_hidden", "final_hidden")


class Frozen(nnx.Variable):
  """A non-trainable array (target embedding / LM head / norm, vocabulary maps).

  Optimizers are built with ``wrt=nnx.Param``, so ``Frozen`` variables get no gradient and no optimizer
  state; they are loaded from the precompute export, not checkpointed with the draft.
  """


class DraftModel(Protocol):
  num_heads: int            # K draft positions
  draft_vocab_size: int     # Vd

  def __call__(self, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Teacher-forced training forward -> logits ``[K, B, T, Vd]`` (alignment above)."""

  def features(self, batch: Mapping[str, jax.Array]) -> list[jax.Array]:
    """The same forward up to each head's input: K arrays ``[B, T, D]`` (``__call__`` = their logits).

    The trainer works head by head from these (`lkjax.train.step`): it never builds ``[K, B, T, Vd]``.
    """

  def feature_logits(self, features: jax.Array, k: int) -> jax.Array:
    """Head / step / stage k's output layer: ``[..., D] -> [..., Vd]`` (compute dtype)."""

  # Optional: ``output_layers() -> list`` of the K functions ``features -> feature_logits(features, k)``.
  # A model whose heads are slices of one stacked parameter provides it so that the trainer takes the
  # slices once per forward (`lkjax.models.layers.unstack`) instead of once per head.

  def init_cache(self, batch_size: int, max_len: int) -> Any:
    """Empty drafting state (a pytree of arrays)."""

  def propose(self, cache: Any, ctx: Mapping[str, jax.Array], *, num_tokens: int,
              temperature: float, rng: jax.Array | None,
              forced_tokens: jax.Array | None = None) -> tuple[Any, jax.Array, jax.Array]:
    """Commit ctx, draft num_tokens tokens -> (cache, tokens [B, n] target ids, logits [B, n, Vd])."""


def _shift(x: jax.Array, n: int, axis: int, fill, *, left: bool) -> jax.Array:
  """Move ``x`` by ``n >= 0`` slots along ``axis`` (left: towards index 0), padding with ``fill``."""
  if n == 0:
    return x
  size = x.shape[axis]
  if n >= size:
    return jnp.full_like(x, fill)
  body = jax.lax.slice_in_dim(x, n, size, axis=axis) if left else jax.lax.slice_in_dim(x, 0, size - n, axis=axis)
  pad_shape = list(x.shape)
  pad_shape[axis] = n
  pad = jnp.full(pad_shape, fill, x.dtype)
  return jnp.concatenate([body, pad] if left else [pad, body], axis=axis)


def shift_left(x: jax.Array, n: int, axis: int = 1, fill=0) -> jax.Array:
  """``y[..., t, ...] = x[..., t+n, ...]``, padded with ``fill`` past the end (n >= 0)."""
  return _shift(x, n, axis, fill, left=True)


def shift_right(x: jax.Array, n: int, axis: int = 1, fill=0) -> jax.Array:
  """``y[..., t, ...] = x[..., t-n, ...]``, padded with ``fill`` before the start (n >= 0)."""
  return _shift(x, n, axis, fill, left=False)


def head_mask(loss_mask: jax.Array, segment_ids: jax.Array, num_heads: int) -> jax.Array:
  """Which ``[K, B, T]`` draft predictions are trained: x[t+k+2] is an assistant token of t's document."""
  seg = segment_ids.astype(jnp.int32)
  out = []
  for k in range(num_heads):
    tgt = shift_left(loss_mask.astype(bool), k + 2, axis=1, fill=False)
    same_doc = (shift_left(seg, k + 2, axis=1, fill=0) == seg) & (seg > 0)
    out.append(tgt & same_doc)
  return jnp.stack(out, axis=0)


def head_targets(x: jax.Array, num_heads: int) -> jax.Array:
  """Stack the target-side array at positions t+k+1 for each head: ``[B, T, ...] -> [K, B, T, ...]``.

  Use it on target logits (or on final hidden states before the LM head).  Positions past the end are
  zero-filled; `head_mask` is False there.
  """
  return jnp.stack([shift_left(x, k + 1, axis=1) for k in range(num_heads)], axis=0)
