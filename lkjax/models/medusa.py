"""MEDUSA draft heads (Cai et al. 2024) in the vLLM ``MedusaModel`` layout (docs/design.md#architectures).

K independent heads read the target's final hidden state h_t (after its final norm) at position t;
head k predicts x[t+k+2].  Head k is ``num_layers`` residual blocks followed by its own LM head:

    x_0 = h_t,   x_{l+1} = x_l + SiLU(x_l W_{k,l} + b_{k,l}),   logits_k = x_L U_k     (U_k: [Ht, Vd], no bias)

Tokens are not inputs, so drafting needs no KV cache: the cache holds the last committed final hidden.
The K heads are stored stacked (``w [K, L, Ht, Ht]``, ``b [K, L, Ht]``, ``lm_head [K, Ht, Vd]``, all
``x @ W`` layout) so one einsum serves every head; the export transposes to PyTorch ``[out, in]``.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lkjax.models.base import Frozen
from lkjax.models.layers import (check_draft_vocab, draft_to_target, parse_dtype, partitioned_param,
                                 ctx_num_valid, sample_tokens, split_keys, unstack)
from lkjax.perf import PerfOptions, matmul, or_default
from lkjax.targets.info import TargetInfo


class Medusa(nnx.Module):
  """K MEDUSA heads over the target's final hidden state.

  Attributes:
    num_heads: K.
    draft_vocab_size: Vd.
    vocab_size: the target vocabulary V.
    hidden_size: Ht (the residual blocks keep the target width, as vLLM requires).
    num_layers: residual blocks per head L.
    w: Param ``[K, L, Ht, Ht]`` (``x @ w``), zero-initialised so every head starts as its LM head
      alone (the MEDUSA recipe: with the head copied from the target it starts at the next-token guess).
    b: Param ``[K, L, Ht]`` or None (``fc_bias=False``).
    lm_head: Param ``[K, Ht, Vd]``.
    draft_vocab: Frozen ``int32[Vd]`` target ids, or None when Vd = V.
  """

  def __init__(self, *, hidden_size: int, vocab_size: int, num_heads: int = 6, num_layers: int = 1,
               fc_bias: bool = True, draft_vocab=None, target_lm_head: np.ndarray | None = None,
               dtype: Any = jnp.float32, rngs: nnx.Rngs, perf: PerfOptions | None = None):
    """Builds the heads.

    Args:
      hidden_size: Ht.
      vocab_size: V (target).
      num_heads: K >= 1.
      num_layers: L >= 1 residual blocks per head.
      fc_bias: whether the residual blocks have a bias (vLLM ``medusa_fc_bias``).
      draft_vocab: int ``[Vd]`` ascending target ids, or None (Vd = V).
      target_lm_head: ``[V, Ht]`` (PyTorch layout) target LM head; when given every head's LM head is
        initialised from its rows for the draft vocabulary, else from a truncated normal (std 1/sqrt(Ht)).
      dtype: compute dtype (parameters are float32).
      rngs: nnx.Rngs with a ``params`` stream.
      perf: `lkjax.perf.PerfOptions` (None: this backend's default).
    """
    if num_heads < 1 or num_layers < 1:
      raise ValueError(f"num_heads={num_heads}, num_layers={num_layers}: both must be >= 1")
    ids = check_draft_vocab(draft_vocab, vocab_size)
    self.num_heads = int(num_heads)
    self.num_layers = int(num_layers)
    self.hidden_size = int(hidden_size)
    self.vocab_size = int(vocab_size)
    self.draft_vocab_size = int(vocab_size if ids is None else ids.size)
    self.fc_bias = bool(fc_bias)
    self.dtype = dtype
    self.perf = or_default(perf)
    K, L, H, Vd = self.num_heads, self.num_layers, self.hidden_size, self.draft_vocab_size

    zeros = nnx.initializers.zeros
    self.w = partitioned_param(zeros, (None, None, "embed", "mlp"), rngs.params(), (K, L, H, H))
    self.b = partitioned_param(zeros, (None, None, "mlp"), rngs.params(), (K, L, H)) if self.fc_bias else None

    if target_lm_head is not None:
      head = np.asarray(target_lm_head, np.float32)
      if head.shape != (vocab_size, H):
        raise ValueError(f"target_weights['lm_head']: expected shape {(vocab_size, H)}, got {head.shape}")
      rows = head if ids is None else head[ids]
      init = lambda key, shape, dtype: jnp.broadcast_to(jnp.asarray(rows.T, dtype), shape)
    else:
      # fan_in = Ht per head: the stacked K axis is a batch axis, not part of the fan.
      init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1,
                                               batch_axis=(0,))
    self.lm_head = partitioned_param(init, (None, "embed", "vocab"), rngs.params(), (K, H, Vd))
    self.draft_vocab = None if ids is None else Frozen(jnp.asarray(ids))

  def head_features(self, h: jax.Array) -> list[jax.Array]:
    """Each head's residual blocks on final hidden states ``h [..., Ht]`` -> K arrays ``[..., Ht]``."""
    if h.shape[-1] != self.hidden_size:
      raise ValueError(f"final_hidden: last dim {h.shape[-1]} != hidden_size {self.hidden_size}")
    dt = self.dtype
    K, L, H = self.num_heads, self.num_layers, self.hidden_size
    # [K, L, ...] split once into K*L blocks (layers.unstack: the gradient is one stack, not K*L pads).
    w = unstack(self.w[...].astype(dt).reshape(K * L, H, H))
    b = None if self.b is None else unstack(self.b[...].astype(dt).reshape(K * L, H))
    xs = [h.astype(dt)] * K
    for l in range(L):
      for k in range(K):
        y = matmul(xs[k], w[k * L + l], self.perf.nn)
        if b is not None:
          y = y + b[k * L + l]
        xs[k] = xs[k] + jax.nn.silu(y)
    return xs

  def feature_logits(self, features: jax.Array, k: int) -> jax.Array:
    """Head k's LM head: ``[..., Ht] -> [..., Vd]``."""
    return matmul(features, self.lm_head[...][k].astype(self.dtype), self.perf.nn)

  def output_layers(self) -> list:
    """The K LM heads as functions (`feature_logits`), the stacked weight split once (`layers.unstack`)."""
    heads = unstack(self.lm_head[...].astype(self.dtype))
    return [lambda f, w=w: matmul(f, w, self.perf.nn) for w in heads]

  def head_logits(self, h: jax.Array) -> jax.Array:
    """All K heads on final hidden states ``h [..., Ht]`` -> logits ``[K, ..., Vd]`` (compute dtype)."""
    return jnp.stack([f(x) for f, x in zip(self.output_layers(), self.head_features(h))])

  def features(self, batch: Mapping[str, jax.Array]) -> list[jax.Array]:
    """The K heads' inputs to their LM heads, ``[B, T, Ht]`` each (see `__call__`)."""
    return self.head_features(batch["final_hidden"])

  def __call__(self, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Training forward: ``batch['final_hidden'] [B, T, Ht]`` -> logits ``[K, B, T, Vd]``.

    ``logits[k, b, t]`` predicts x[t+k+2] (base.py alignment); no token input is needed.
    """
    return self.head_logits(batch["final_hidden"])

  def init_cache(self, batch_size: int, max_len: int) -> dict[str, jax.Array]:
    """Drafting state: the last committed final hidden ``hidden f32[B, Ht]`` (max_len is unused)."""
    del max_len
    return {"hidden": jnp.zeros((batch_size, self.hidden_size), jnp.float32)}

  def propose(self, cache: Mapping[str, jax.Array], ctx: Mapping[str, jax.Array], *, num_tokens: int,
              temperature: float, rng: jax.Array | None,
              forced_tokens: jax.Array | None = None) -> tuple[dict, jax.Array, jax.Array]:
    """Commit ctx's last position, draft ``num_tokens <= K`` tokens from heads 0..num_tokens-1.

    Returns ``(cache, tokens int32[B, n] target ids, logits f32[B, n, Vd])``.  Heads are independent,
    so each head's token is drawn on its own (greedy at T <= 0, else from softmax(logits / T)).
    ``forced_tokens`` only replaces the returned tokens (MEDUSA never reads its own tokens).
    """
    if not 1 <= num_tokens <= self.num_heads:
      raise ValueError(f"num_tokens={num_tokens}: MEDUSA has {self.num_heads} heads")
    hidden = cache["hidden"]
    b, n = ctx["final_hidden"].shape[:2]
    if n > 0:    # a row with num_valid 0 (`lkjax.models.base`) keeps its state
      some = (ctx_num_valid(ctx, b, n) > 0)[:, None]
      hidden = jnp.where(some, ctx["final_hidden"][:, -1].astype(jnp.float32), hidden)
    logits = self.head_logits(hidden)[:num_tokens].astype(jnp.float32)      # [n, B, Vd]
    keys = split_keys(rng, num_tokens)
    ids = jnp.stack([sample_tokens(logits[i], temperature, keys[i]) for i in range(num_tokens)], axis=1)
    tokens = draft_to_target(self.draft_vocab, ids)
    if forced_tokens is not None:
      tokens = jnp.asarray(forced_tokens, jnp.int32)
    return {"hidden": hidden}, tokens, jnp.transpose(logits, (1, 0, 2))


def from_config(cfg, target: TargetInfo, *, draft_vocab=None,
                target_weights: Mapping[str, np.ndarray] | None = None, rngs: nnx.Rngs,
                perf: PerfOptions | None = None) -> Medusa:
  """Builds a `Medusa` from an ml_collections config.

  cfg keys: ``arch`` ('medusa'), ``num_heads`` (6), ``num_layers`` (1), ``fc_bias`` (True),
  ``draft_vocab_size`` (0 = V), ``init_head_from_target`` (True), ``dtype`` ('float32').
  ``target_weights`` (``{"lm_head": [V, Ht], ...}`` float32) seeds the LM heads; None = random init.
  """
  arch = cfg.get("arch", "medusa")
  if arch != "medusa":
    raise ValueError(f"cfg.arch={arch!r}: lkjax.models.medusa builds arch 'medusa'")
  ids = check_draft_vocab(draft_vocab, target.vocab_size, int(cfg.get("draft_vocab_size", 0)))
  head = None
  if cfg.get("init_head_from_target", True) and target_weights is not None:
    if "lm_head" not in target_weights:
      raise ValueError("target_weights: missing 'lm_head' (needed by init_head_from_target)")
    head = target_weights["lm_head"]
  return Medusa(hidden_size=target.hidden_size, vocab_size=target.vocab_size,
                num_heads=int(cfg.get("num_heads", 6)), num_layers=int(cfg.get("num_layers", 1)),
                fc_bias=bool(cfg.get("fc_bias", True)), draft_vocab=ids, target_lm_head=head,
                dtype=parse_dtype(cfg.get("dtype", "float32")), rngs=rngs, perf=perf)
