"""MLP-Speculator draft (IBM fms-extras ``MLPSpeculator``, vLLM ``mlp_speculator``), docs/design.md#architectures.

A recurrent chain of K stages over the target's final hidden state h_t (after its final norm):

    state_weight = 0.5 ** (0.5 / K),   emb_weight = sqrt(1 - state_weight**2)
    s_0 = ln0(h_t) / sqrt(2)  if scale_input  else  h_t              (ln0: RMS norm, no parameters)
    stage i:  z   = emb_i[tok_i] * emb_weight * sqrt(inner_dim / 2)
              s   = GELU(ln_i(s @ proj_i * state_weight + z))        (exact erf GELU, as torch nn.GELU)
              logits_i = s @ head_i                                   [.., Vd]
    ln(x) = x * rsqrt(mean(x**2) + 1e-6) * w + b                      (fms LayerNormParameterized, no mean)

Stage 0 at position t reads tok_0 = x[t+1] (the token the target produced from h_t) and predicts x[t+2];
stage i reads tok_i = x[t+1+i] (teacher forcing in training, its own drafted token in `propose`).

The per-stage embeddings ``emb_i`` are the draft's own trainable tables over the FULL target vocabulary V
(stage 0 reads any target token; the serving format has one ``vocab_size`` for ``emb`` and ``head``).
The heads produce logits over the draft vocabulary Vd (= V for a servable export).

``tie_weights`` (fms-extras ``tie_wts``, vLLM ``tie_weights``): one embedding, one head and one ln shared
by all stages, and one projection shared by stages >= 1; ``proj_0`` stays separate because its input width
is ``emb_dim`` (= Ht), which may differ from ``inner_dim``.  Tied parameters are stored once.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lkjax.models.base import Frozen, shift_left
from lkjax.models.layers import (check_draft_vocab, draft_to_target, parse_dtype, partitioned_param,
                                 ctx_num_valid, rms_norm, sample_tokens, split_keys, unstack)
from lkjax.perf import PerfOptions, matmul, or_default
from lkjax.targets.info import TargetInfo

LN_EPS = 1e-6


def speculator_norm(x: jax.Array, w: jax.Array | None = None, b: jax.Array | None = None) -> jax.Array:
  """fms-extras LayerNormParameterized without mean-centring: ``x * rsqrt(mean(x**2) + 1e-6) * w + b``.

  Computed in float32 and cast back to ``x.dtype`` (`lkjax.models.layers.rms_norm`, on rows); ``w``/``b``
  None gives the parameter-free ``ln0``.
  """
  return rms_norm(x, w, LN_EPS, x.dtype, bias=b)


class MLPSpeculator(nnx.Module):
  """K-stage MLP-Speculator.

  Attributes (E = 1 if tie_weights else K; P = 1 if tie_weights else K - 1):
    emb: Param ``[E, V, inner_dim]`` per-stage token embeddings (target ids).
    proj0: Param ``[emb_dim, inner_dim]`` (``x @ proj0``) the projection from the target hidden.
    proj: Param ``[P, inner_dim, inner_dim]`` projections of stages 1..K-1 (None when K = 1).
    head: Param ``[E, inner_dim, Vd]`` LM heads (no bias).
    ln_w, ln_b: Param ``[E, inner_dim]`` norm scale and shift.
    draft_vocab: Frozen ``int32[Vd]`` target ids, or None when Vd = V.
  """

  def __init__(self, *, emb_dim: int, vocab_size: int, num_heads: int = 6, inner_dim: int = 0,
               tie_weights: bool = False, scale_input: bool = False, draft_vocab=None,
               dtype: Any = jnp.float32, rngs: nnx.Rngs, perf: PerfOptions | None = None):
    """Builds the speculator.

    Args:
      emb_dim: width of the target's final hidden state (Ht).
      vocab_size: V (target).
      num_heads: K stages (n_predict).
      inner_dim: the speculator's state width (0 = emb_dim).
      tie_weights: share weights across stages (see module docstring); needs K >= 3 as fms-extras asserts.
      scale_input: apply ``ln0(h) / sqrt(2)`` to the target hidden first.
      draft_vocab: int ``[Vd]`` ascending target ids, or None (Vd = V).
      dtype: compute dtype (parameters are float32).
      rngs: nnx.Rngs with a ``params`` stream.
      perf: `lkjax.perf.PerfOptions` (None: this backend's default).
    """
    if num_heads < 1:
      raise ValueError(f"num_heads={num_heads}: must be >= 1")
    if tie_weights and num_heads < 3:
      raise ValueError(f"tie_weights=True needs num_heads >= 3 (fms-extras ties the transitions of stages "
                       f">= 1 and asserts n_predict > 2), got num_heads={num_heads}")
    ids = check_draft_vocab(draft_vocab, vocab_size)
    self.num_heads = int(num_heads)
    self.emb_dim = int(emb_dim)
    self.inner_dim = int(inner_dim) if inner_dim else int(emb_dim)
    self.vocab_size = int(vocab_size)
    self.draft_vocab_size = int(vocab_size if ids is None else ids.size)
    self.tie_weights = bool(tie_weights)
    self.scale_input = bool(scale_input)
    self.dtype = dtype
    self.perf = or_default(perf)
    self.state_weight = 0.5 ** (0.5 / self.num_heads)
    self.emb_weight = math.sqrt(1.0 - self.state_weight ** 2)
    K, D, V, Vd = self.num_heads, self.inner_dim, self.vocab_size, self.draft_vocab_size
    E = 1 if self.tie_weights else K
    P = 1 if self.tie_weights else K - 1

    # fms-extras reset_parameters: every embedding / linear weight ~ truncated normal with std
    # 1/sqrt(inner_dim), norm scale 1, shift 0.
    init = nnx.initializers.truncated_normal(stddev=1.0 / math.sqrt(D))
    self.emb = partitioned_param(init, (None, "vocab", "embed"), rngs.params(), (E, V, D))
    self.proj0 = partitioned_param(init, ("embed", "mlp"), rngs.params(), (self.emb_dim, D))
    self.proj = partitioned_param(init, (None, "embed", "mlp"), rngs.params(), (P, D, D)) if P > 0 else None
    self.head = partitioned_param(init, (None, "embed", "vocab"), rngs.params(), (E, D, Vd))
    self.ln_w = partitioned_param(nnx.initializers.ones, (None, None), rngs.params(), (E, D))
    self.ln_b = partitioned_param(nnx.initializers.zeros, (None, None), rngs.params(), (E, D))
    self.draft_vocab = None if ids is None else Frozen(jnp.asarray(ids))

  def _stage_index(self, i: int) -> tuple[int, int]:
    """(index into emb/head/ln, index into proj) of stage i >= 1 (stage 0 uses proj0)."""
    if self.tie_weights:
      return 0, 0
    return i, i - 1

  def init_state(self, h: jax.Array) -> jax.Array:
    """Target final hidden ``[..., emb_dim]`` -> the chain's initial state (optionally ln0 / sqrt 2)."""
    if h.shape[-1] != self.emb_dim:
      raise ValueError(f"final_hidden: last dim {h.shape[-1]} != emb_dim {self.emb_dim}")
    s = h.astype(self.dtype)
    if self.scale_input:
      s = speculator_norm(s) / jnp.asarray(math.sqrt(2.0), s.dtype)
    return s

  def stage(self, i: int, state: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Stage i: ``state [..., in]``, target ids ``tokens int[...]`` -> (new state ``[..., D]``, logits ``[..., Vd]``)."""
    state = self.stage_state(i, state, tokens)
    return state, self.feature_logits(state, i)

  def stage_state(self, i: int, state: jax.Array, tokens: jax.Array) -> jax.Array:
    """Stage i's new state ``[..., D]`` (`stage` without the head)."""
    e, p = self._stage_index(i)
    z = jnp.take(self.emb[...][e], tokens, axis=0)
    proj = self.proj0[...] if i == 0 else self.proj[...][p]
    return self._transition(state, z, proj, self.ln_w[...][e], self.ln_b[...][e])

  def _transition(self, state: jax.Array, z: jax.Array, proj: jax.Array, ln_w: jax.Array,
                  ln_b: jax.Array) -> jax.Array:
    """``GELU(ln(state @ proj * state_weight + z * emb_weight * sqrt(inner_dim / 2)))``, ``z`` the
    stage's embedding rows."""
    dt = self.dtype
    z = z.astype(dt) * jnp.asarray(self.emb_weight * math.sqrt(self.inner_dim / 2.0), dt)
    x = matmul(state, proj.astype(dt), self.perf.nn) * jnp.asarray(self.state_weight, dt) + z
    x = speculator_norm(x, ln_w, ln_b)
    return jax.nn.gelu(x, approximate=False)

  def __call__(self, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Teacher-forced training forward -> logits ``[K, B, T, Vd]`` (compute dtype).

    Reads ``final_hidden [B, T, Ht]`` and ``input_ids [B, T]``; stage i at t reads x[t+1+i] (zero past
    the end of the row, where `head_mask` is False) and predicts x[t+2+i].
    """
    return jnp.stack([f(s) for f, s in zip(self.output_layers(), self.features(batch))], axis=0)

  def features(self, batch: Mapping[str, jax.Array]) -> list[jax.Array]:
    """The K stages' states ``[B, T, inner_dim]`` (see `__call__`).

    The same stages as `stage_state`, arranged for the gradient: every stage's embedding rows come from
    ONE gather on the ``[E, V, D]`` tables (its gradient is one scatter-add, not K full-size tables), and
    the stacked per-stage weights are split once (`layers.unstack`).
    """
    K = self.num_heads
    state = self.init_state(batch["final_hidden"])
    ids = batch["input_ids"].astype(jnp.int32)
    table = np.array([self._stage_index(i)[0] for i in range(K)], np.int32)[:, None, None]
    toks = jnp.stack([shift_left(ids, 1 + i, axis=1) for i in range(K)])         # [K, B, T]
    z = unstack(self.emb[...][table, toks])                                       # K x [B, T, D]
    ln_w, ln_b = unstack(self.ln_w[...]), unstack(self.ln_b[...])
    proj = unstack(self.proj[...]) if self.proj is not None else ()
    out = []
    for i in range(K):
      e, p = self._stage_index(i)
      state = self._transition(state, z[i], self.proj0[...] if i == 0 else proj[p], ln_w[e], ln_b[e])
      out.append(state)
    return out

  def feature_logits(self, features: jax.Array, k: int) -> jax.Array:
    """Stage k's logits from its state (its own head, or the shared one)."""
    e, _ = self._stage_index(k)
    return matmul(features, self.head[...][e].astype(self.dtype), self.perf.nn)

  def output_layers(self) -> list:
    """The K heads as functions (`feature_logits`), the stacked weight split once (`layers.unstack`)."""
    heads = unstack(self.head[...].astype(self.dtype))
    return [lambda f, w=heads[self._stage_index(k)[0]]: matmul(f, w, self.perf.nn) for k in range(self.num_heads)]

  def init_cache(self, batch_size: int, max_len: int) -> dict[str, jax.Array]:
    """Drafting state: last committed final hidden ``hidden f32[B, Ht]`` and token ``token int32[B]``."""
    del max_len
    return {"hidden": jnp.zeros((batch_size, self.emb_dim), jnp.float32),
            "token": jnp.zeros((batch_size,), jnp.int32)}

  def propose(self, cache: Mapping[str, jax.Array], ctx: Mapping[str, jax.Array], *, num_tokens: int,
              temperature: float, rng: jax.Array | None,
              forced_tokens: jax.Array | None = None) -> tuple[dict, jax.Array, jax.Array]:
    """Commit ctx's last position (its final hidden and committed token), run stages 0..num_tokens-1.

    Each stage's token (greedy at T <= 0, else sampled from softmax(logits / T)), or ``forced_tokens[:, i]``
    when given, feeds the next stage.  Returns ``(cache, tokens int32[B, n] target ids, logits f32[B, n, Vd])``.
    """
    if not 1 <= num_tokens <= self.num_heads:
      raise ValueError(f"num_tokens={num_tokens}: the MLP-Speculator has {self.num_heads} stages")
    hidden, token = cache["hidden"], cache["token"]
    b, n = ctx["final_hidden"].shape[:2]
    if n > 0:    # a row with num_valid 0 (`lkjax.models.base`) keeps its state
      some = ctx_num_valid(ctx, b, n) > 0
      hidden = jnp.where(some[:, None], ctx["final_hidden"][:, -1].astype(jnp.float32), hidden)
      token = jnp.where(some, ctx["next_tokens"][:, -1].astype(jnp.int32), token)
    keys = split_keys(rng, num_tokens)
    state, tok = self.init_state(hidden), token
    tokens, all_logits = [], []
    for i in range(num_tokens):
      state, logits = self.stage(i, state, tok)
      logits = logits.astype(jnp.float32)
      tok = draft_to_target(self.draft_vocab, sample_tokens(logits, temperature, keys[i]))
      if forced_tokens is not None:
        tok = jnp.asarray(forced_tokens[:, i], jnp.int32)
      tokens.append(tok)
      all_logits.append(logits)
    return {"hidden": hidden, "token": token}, jnp.stack(tokens, axis=1), jnp.stack(all_logits, axis=1)


def from_config(cfg, target: TargetInfo, *, draft_vocab=None,
                target_weights: Mapping[str, np.ndarray] | None = None, rngs: nnx.Rngs,
                perf: PerfOptions | None = None) -> MLPSpeculator:
  """Builds an `MLPSpeculator` from an ml_collections config.

  cfg keys: ``arch`` ('mlp_speculator'), ``num_heads`` (6), ``inner_dim`` (0 = Ht), ``emb_dim`` (0 = Ht;
  must equal Ht, it is the width of the target hidden read by proj_0), ``tie_weights`` (False),
  ``scale_input`` (False), ``draft_vocab_size`` (0 = V), ``dtype`` ('float32').
  ``target_weights`` is accepted for a uniform registry signature and unused: the speculator owns its
  embeddings and heads (fms-extras initialises them at random).
  """
  del target_weights
  arch = cfg.get("arch", "mlp_speculator")
  if arch != "mlp_speculator":
    raise ValueError(f"cfg.arch={arch!r}: lkjax.models.mlp_speculator builds arch 'mlp_speculator'")
  emb_dim = int(cfg.get("emb_dim", 0)) or target.hidden_size
  if emb_dim != target.hidden_size:
    raise ValueError(f"cfg.emb_dim={emb_dim}: must be 0 or the target hidden size {target.hidden_size} "
                     f"(it is the width of the target final hidden the speculator reads)")
  ids = check_draft_vocab(draft_vocab, target.vocab_size, int(cfg.get("draft_vocab_size", 0)))
  return MLPSpeculator(emb_dim=emb_dim, vocab_size=target.vocab_size, num_heads=int(cfg.get("num_heads", 6)),
                       inner_dim=int(cfg.get("inner_dim", 0)) or target.hidden_size,
                       tie_weights=bool(cfg.get("tie_weights", False)),
                       scale_input=bool(cfg.get("scale_input", False)), draft_vocab=ids,
                       dtype=parse_dtype(cfg.get("dtype", "float32")), rngs=rngs, perf=perf)
