"""DeepSeek-V3 style multi-token prediction (MTP) draft (docs/design.md#architectures).

Depth k = 0..K-1 at position t (all widths are the target's, Ht):

    u_t^k   = eh_proj(concat(enorm(embed(x[t+k+1])), hnorm(h_t^{k-1})))       eh_proj: [2Ht -> Ht], no bias
    y^k     = block(u^k)           one target-architecture Llama decoder layer, causal attention over
                                   the depth-k states of the same document (slots s <= t)
    h_t^k   = shared_head_norm(y_t^k)                                          (recycled to depth k+1)
    logits  = h_t^k @ lm_head^T    the target's LM head (frozen), rows of the draft vocabulary

with ``h^{-1}`` = the target's final hidden state (after its final norm).  ``logits[k, :, t]`` predicts
``x[t+k+2]`` (base.py alignment).  Parameter names (``enorm``, ``hnorm``, ``eh_proj``, ``block``,
``shared_head_norm``) map onto DeepSeek's ``model.layers.{N+k}.{enorm, hnorm, eh_proj, shared_head.norm}``
plus the decoder-layer tensors; ``share_weights=True`` reuses one module for every depth (how vLLM
serves a single MTP layer for K speculative tokens).

Exact drafting.  The depth-k query at the last committed position N-1 attends to depth-k keys at all
slots s <= N-1, and the depth-k state at s reads token x[s+k+1].  For s <= N-k-1 that token is
committed: those keys are cached (per depth; the cache of depth k holds slots 0..N-k-1).  For the k
slots s = N-k..N-1 the token is a DRAFTED one (x[N+1..N+k]), so `propose` recomputes that triangle
of speculative states from the drafted tokens at every step (O(K^2) tokens per round) and never
caches it; when tokens are accepted the next commit recomputes those slots from committed tokens.
This is exactly the training forward's computation whenever the drafted tokens equal the real ones
(``forced_tokens``), so drafting and training agree to float rounding.  Note that vLLM's MTP proposer
instead chains one module along positions (step k's query at slot N-1+k sees the depth-0 keys of
committed slots plus its own speculative keys, the EAGLE pattern), which is NOT what DeepSeek-style
per-depth training optimises; lkjax trains and evaluates the per-depth pattern above.

Drafting assumes one document per row with consecutive RoPE positions (true at evaluation).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lkjax.models import layers as L
from lkjax.models.base import shift_left
from lkjax.perf import PerfOptions, matmul_t, or_default
from lkjax.targets.info import TargetInfo


class MTPModule(nnx.Module):
  """One MTP depth: ``enorm``, ``hnorm``, ``eh_proj [2H -> H]``, ``block`` (Llama layer), ``shared_head_norm``."""

  def __init__(self, hidden: int, *, num_heads: int, num_kv_heads: int, head_dim: int, intermediate: int,
               rms_norm_eps: float, rope_theta: float, head_norm: np.ndarray | None = None,
               dtype: Any = jnp.float32, rngs: nnx.Rngs, perf: PerfOptions | None = None):
    kw = dict(dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.enorm = L.RMSNorm(hidden, eps=rms_norm_eps, **kw)
    self.hnorm = L.RMSNorm(hidden, eps=rms_norm_eps, **kw)
    self.eh_proj = L.dense(2 * hidden, hidden, (None, "embed"), perf=perf, **kw)
    self.block = L.LlamaDecoderLayer(hidden, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                                     intermediate=intermediate, rms_norm_eps=rms_norm_eps,
                                     rope_theta=rope_theta, perf=perf, **kw)
    self.shared_head_norm = L.RMSNorm(hidden, eps=rms_norm_eps, **kw)
    if head_norm is not None:
      # Start from the target's final norm (its multiplier, 1 + w for Gemma: docs/design.md#target-families):
      # h^k then lives where the target's final hidden lives.
      self.shared_head_norm.weight[...] = jnp.asarray(head_norm, jnp.float32)

  def __call__(self, emb: jax.Array, h_prev: jax.Array, positions: jax.Array,
               attend: L.Attend) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """``emb, h_prev [B, T, H]`` -> ``(h [B, T, H] = shared_head_norm(y), (k, v))``."""
    u = self.eh_proj(jnp.concatenate([self.enorm(emb), self.hnorm(h_prev)], axis=-1))
    y, kv = self.block.forward(u, positions, attend)
    return self.shared_head_norm(y), kv


class MTP(nnx.Module):
  """K-depth MTP draft sharing the target's embedding and LM head (both `Frozen`).

  Attributes:
    num_heads: K depths; draft_vocab_size: Vd; share_weights: one module for all depths.
    embed_tokens: `Frozen` ``[V, Ht]``; lm_head: `Frozen` ``[Vd, Ht]`` (the target head's draft-vocab rows).
    mtp: ``nnx.List`` of `MTPModule` (1 if share_weights else K).
    draft_vocab: `Frozen` ``int32[Vd]`` target ids, or None (Vd = V).
  """

  def __init__(self, *, hidden_size: int, vocab_size: int, num_attention_heads: int, num_key_value_heads: int,
               head_dim: int, intermediate_size: int, rms_norm_eps: float, rope_theta: float,
               num_heads: int = 7, share_weights: bool = True, draft_vocab: np.ndarray | None = None,
               target_weights: Mapping[str, np.ndarray] | None = None, dtype: Any = jnp.float32,
               rngs: nnx.Rngs, perf: PerfOptions | None = None):
    """Builds the model.

    Args:
      hidden_size .. rope_theta: the target's layer shape (Ht, heads, kv heads, head_dim, I, eps, theta).
      num_heads: K depths (>= 1).
      share_weights: one `MTPModule` reused at every depth.
      draft_vocab: validated ``int32[Vd]`` target ids, or None.
      target_weights: checked ``{"embed_tokens", "lm_head" [V, Ht], "norm" [Ht]}`` float32, or None (random).
      dtype: compute dtype; parameters are float32.
      perf: `lkjax.perf.PerfOptions` (None: this backend's default).
    """
    if num_heads < 1:
      raise ValueError(f"num_heads={num_heads}: must be >= 1")
    self.num_heads = int(num_heads)
    self.share_weights = bool(share_weights)
    self.vocab_size = int(vocab_size)
    self.draft_vocab_size = int(vocab_size if draft_vocab is None else len(draft_vocab))
    self.hidden_size, self.num_kv_heads, self.head_dim = int(hidden_size), int(num_key_value_heads), int(head_dim)
    self.dtype = dtype
    self.perf = or_default(perf)
    H, V = self.hidden_size, self.vocab_size
    if target_weights is None:
      k1, k2 = jax.random.split(rngs.params())
      emb = 0.02 * jax.random.normal(k1, (V, H), jnp.float32)
      head = 0.02 * jax.random.normal(k2, (V, H), jnp.float32)
      norm = None
    else:
      emb, head, norm = target_weights["embed_tokens"], target_weights["lm_head"], target_weights["norm"]
    self.embed_tokens = L.frozen(emb, ("vocab", "embed"))
    self.lm_head = L.frozen(head if draft_vocab is None else head[np.asarray(draft_vocab)], ("vocab", "embed"))
    n_mod = 1 if self.share_weights else self.num_heads
    self.mtp = nnx.List([
        MTPModule(H, num_heads=num_attention_heads, num_kv_heads=num_key_value_heads, head_dim=head_dim,
                  intermediate=intermediate_size, rms_norm_eps=rms_norm_eps, rope_theta=rope_theta,
                  head_norm=norm, dtype=dtype, rngs=rngs, perf=self.perf) for _ in range(n_mod)])
    self.draft_vocab = None if draft_vocab is None else L.frozen(np.asarray(draft_vocab, np.int32), ("vocab",))

  def module(self, depth: int) -> MTPModule:
    return self.mtp[0 if self.share_weights else depth]

  def _embed(self, tokens: jax.Array) -> jax.Array:
    return self.embed_tokens[...][tokens.astype(jnp.int32)].astype(self.dtype)

  def _logits(self, h: jax.Array) -> jax.Array:
    """``h [..., Ht] -> [..., Vd]`` with the frozen shared head."""
    return matmul_t(h, self.lm_head[...].astype(self.dtype), self.perf.nn)   # rows [Vd, Ht], PyTorch layout

  def _check_hidden(self, h: jax.Array) -> None:
    if h.shape[-1] != self.hidden_size:
      raise ValueError(f"final_hidden: last dim {h.shape[-1]} != target hidden size {self.hidden_size}")

  # ------------------------------------------------------------------ training forward
  def __call__(self, batch: Mapping[str, jax.Array]) -> jax.Array:
    """All K depths teacher-forced -> logits ``[K, B, T, Vd]`` (compute dtype).

    Uses ``input_ids``, ``segment_ids``, ``positions``, ``final_hidden`` (base.py schema).
    """
    return jnp.stack([self.feature_logits(h, k) for k, h in enumerate(self.features(batch))], axis=0)

  def features(self, batch: Mapping[str, jax.Array]) -> list[jax.Array]:
    """The K depths' normed outputs ``h^k [B, T, Ht]`` (see `__call__`)."""
    ids, pos = batch["input_ids"].astype(jnp.int32), batch["positions"].astype(jnp.int32)
    seg = batch["segment_ids"].astype(jnp.int32)
    self._check_hidden(batch["final_hidden"])
    idx = jnp.broadcast_to(jnp.arange(seg.shape[1], dtype=jnp.int32), seg.shape)
    mask = L.segment_causal_mask(seg, seg, idx, idx)
    attend = lambda q, k, v: L.gqa_attention(q, k, v, mask, causal=True, perf=self.perf)
    h = batch["final_hidden"].astype(self.dtype)
    out = []
    for k in range(self.num_heads):
      h, _ = self.module(k)(self._embed(shift_left(ids, k + 1)), h, pos, attend)
      out.append(h)
    return out

  def feature_logits(self, features: jax.Array, k: int) -> jax.Array:
    """Depth k's logits from its normed output ``h`` (the shared frozen head)."""
    del k
    return self._logits(features)

  # ------------------------------------------------------------------ drafting
  def init_cache(self, batch_size: int, max_len: int) -> dict[str, Any]:
    """Empty drafting state.

    ``k``/``v``: per depth ``[B, max_len, Nkv, D]`` keys/values by slot (depth k holds slots
    0..length-k-1, whose tokens are all committed); ``length int32[B]`` committed slots N;
    ``h_last``: per depth ``[B, Ht]``, h^k at slot N-k-1; ``last_pos int32[B]``: RoPE position of slot N-1.
    """
    shape = (batch_size, max_len, self.num_kv_heads, self.head_dim)
    K = self.num_heads
    return {"k": tuple(jnp.zeros(shape, self.dtype) for _ in range(K)),
            "v": tuple(jnp.zeros(shape, self.dtype) for _ in range(K)),
            "length": jnp.zeros((batch_size,), jnp.int32),
            "h_last": tuple(jnp.zeros((batch_size, self.hidden_size), self.dtype) for _ in range(K)),
            "last_pos": jnp.zeros((batch_size,), jnp.int32)}

  def _commit(self, cache: Mapping[str, Any], ctx: Mapping[str, jax.Array]) -> dict[str, Any]:
    """Add the n new committed slots N..N+n-1: depth k processes slots N-k..N-k+n-1 (token x[N+1..N+n])."""
    tokens, pos = ctx["next_tokens"].astype(jnp.int32), ctx["positions"].astype(jnp.int32)
    n = tokens.shape[1]
    if n == 0:
      return dict(cache)
    self._check_hidden(ctx["final_hidden"])
    max_len = cache["k"][0].shape[1]
    L.check_cache_room(cache["length"], n, max_len)
    length = cache["length"]
    valid = L.ctx_num_valid(ctx, tokens.shape[0], n)                              # [B] (right-aligned)
    j = jnp.arange(n, dtype=jnp.int32)[None, :] - (n - valid)[:, None]             # index among committed
    some = valid > 0
    emb = self._embed(tokens)
    new_k, new_v, h_last = list(cache["k"]), list(cache["v"]), list(cache["h_last"])
    h_in = ctx["final_hidden"].astype(self.dtype)
    for k in range(self.num_heads):
      slots = length[:, None] - k + j                                             # [B, n]; < 0: no such slot
      if k > 0:
        shifted = jnp.concatenate([cache["h_last"][k - 1][:, None], h_in[:, : n - 1]], axis=1)
        h_in = jnp.where((j == 0)[:, :, None], cache["h_last"][k - 1][:, None], shifted)
      write_at = jnp.where((slots >= 0) & (j >= 0), slots, max_len)               # max_len: dropped
      mask = jnp.arange(max_len, dtype=jnp.int32)[None, None, :] <= slots[:, :, None]

      def attend(q, kk, vv, k=k, write_at=write_at, mask=mask):
        new_k[k] = L.write_cache(cache["k"][k], kk, write_at)
        new_v[k] = L.write_cache(cache["v"][k], vv, write_at)
        return L.gqa_attention(q, new_k[k], new_v[k], mask)

      h_in, _ = self.module(k)(emb, h_in, pos - k, attend)
      h_last[k] = jnp.where(some[:, None], h_in[:, -1], cache["h_last"][k])
    return {"k": tuple(new_k), "v": tuple(new_v), "length": length + valid, "h_last": tuple(h_last),
            "last_pos": jnp.where(some, pos[:, -1], cache["last_pos"])}

  def propose(self, cache: Mapping[str, Any], ctx: Mapping[str, jax.Array], *, num_tokens: int,
              temperature: float, rng: jax.Array | None,
              forced_tokens: jax.Array | None = None) -> tuple[dict[str, Any], jax.Array, jax.Array]:
    """Commit ``ctx``, then draft token k+1 with depth k (k < num_tokens <= K), exactly (module docstring).

    Args:
      cache: from `init_cache` / a previous call.
      ctx: ``final_hidden [B, n, Ht]``, ``next_tokens int32[B, n]`` (committed x[j+1]),
        ``positions int32[B, n]`` for n >= 0 newly committed positions j (consecutive); optional
        ``num_valid int32[B]``: only row b's last num_valid[b] entries are committed (`lkjax.models.base`).
      num_tokens: 1..K.
      temperature: <= 0 greedy, else sample softmax(logits / T).
      rng: PRNG key (needed when temperature > 0).
      forced_tokens: optional TARGET ids ``[B, num_tokens]`` used instead of the drafted tokens.
    Returns:
      ``(cache, tokens int32[B, num_tokens] target ids, logits f32[B, num_tokens, Vd])``.
    """
    if not 1 <= num_tokens <= self.num_heads:
      raise ValueError(f"num_tokens={num_tokens}: MTP drafts 1..{self.num_heads} tokens (one per depth)")
    cache = self._commit(cache, ctx)
    length, max_len = cache["length"], cache["k"][0].shape[1]
    keys = L.split_keys(rng, num_tokens)
    logit = self._logits(cache["h_last"][0]).astype(jnp.float32)                  # depth 0 at slot N-1
    logits, ids = [logit], [L.sample_tokens(logit, temperature, keys[0])]
    drafted = [forced_tokens[:, 0] if forced_tokens is not None else L.draft_to_target(self.draft_vocab, ids[0])]
    b = length.shape[0]
    spec_h = jnp.zeros((b, 0, self.hidden_size), self.dtype)                     # h^{k-1} at slots N-k+1..N-1
    for k in range(1, num_tokens):
      slots = length[:, None] - k + jnp.arange(k, dtype=jnp.int32)                # [B, k] = N-k .. N-1
      h_in = jnp.concatenate([cache["h_last"][k - 1][:, None], spec_h], axis=1)   # [B, k, Ht]
      tok = jnp.stack(drafted[:k], axis=1)                                        # x[N+1..N+k]
      pos = cache["last_pos"][:, None] - k + 1 + jnp.arange(k, dtype=jnp.int32)
      cached = jnp.arange(max_len, dtype=jnp.int32)[None, None, :] < (length - k)[:, None, None]
      causal = jnp.tril(jnp.ones((k, k), bool))[None] & (slots >= 0)[:, None, :]
      mask = jnp.concatenate([jnp.broadcast_to(cached, (b, k, max_len)), causal], axis=-1)

      def attend(q, kk, vv, k=k, mask=mask):
        kc = jnp.concatenate([cache["k"][k], kk.astype(cache["k"][k].dtype)], axis=1)
        vc = jnp.concatenate([cache["v"][k], vv.astype(cache["v"][k].dtype)], axis=1)
        return L.gqa_attention(q, kc, vc, mask)

      spec_h, _ = self.module(k)(self._embed(tok), h_in, pos, attend)
      logit = self._logits(spec_h[:, -1]).astype(jnp.float32)
      logits.append(logit)
      ids.append(L.sample_tokens(logit, temperature, keys[k]))
      drafted.append(forced_tokens[:, k] if forced_tokens is not None
                     else L.draft_to_target(self.draft_vocab, ids[-1]))
    tokens = (jnp.asarray(forced_tokens, jnp.int32) if forced_tokens is not None
              else L.draft_to_target(self.draft_vocab, jnp.stack(ids, axis=1)))
    return cache, tokens, jnp.stack(logits, axis=1)


def resolve_config(cfg, target: TargetInfo) -> dict[str, Any]:
  """MTP shape: the target's layer (0 / None = inherit; a differing hidden size is an error)."""
  def pick(name, default):
    v = cfg.get(name, 0)
    return default if v in (0, None) else v
  hidden = int(pick("hidden_size", target.hidden_size))
  if hidden != target.hidden_size:
    raise ValueError(f"hidden_size={hidden}: an MTP module is target-architecture (hidden {target.hidden_size}); "
                     f"use 0 to inherit")
  out = dict(
      hidden_size=hidden,
      num_attention_heads=int(pick("num_attention_heads", target.num_attention_heads)),
      num_key_value_heads=int(pick("num_key_value_heads", target.num_key_value_heads)),
      head_dim=int(pick("head_dim", target.head_dim)),
      intermediate_size=int(pick("intermediate_size", target.intermediate_size)),
      rms_norm_eps=float(pick("rms_norm_eps", target.rms_norm_eps)),
      rope_theta=float(pick("rope_theta", target.rope_theta)),
      num_heads=int(pick("num_heads", 7)),
      share_weights=bool(cfg.get("share_weights", True)),
  )
  if out["num_attention_heads"] % out["num_key_value_heads"]:
    raise ValueError(f"num_attention_heads={out['num_attention_heads']} is not a multiple of "
                     f"num_key_value_heads={out['num_key_value_heads']}")
  if min(out["head_dim"], out["intermediate_size"], out["num_heads"]) < 1:
    raise ValueError(f"MTP config: sizes must be >= 1, got {out}")
  return out


def from_config(cfg, target: TargetInfo, *, draft_vocab=None,
                target_weights: Mapping[str, np.ndarray] | None = None, rngs: nnx.Rngs,
                perf: PerfOptions | None = None) -> MTP:
  """Builds an `MTP` from a ConfigDict.

  cfg keys: ``arch`` ('mtp'), ``num_heads`` (K = 7), ``share_weights`` (True), ``draft_vocab_size``
  (0 = V), ``dtype``; target-shape keys (0 = inherit).  ``target_weights``: ``{"embed_tokens": [V, Ht],
  "lm_head": [V, Ht], "norm": [Ht]}`` float32 (``norm``, the target's final-norm multiplier, seeds
  ``shared_head_norm``), or None (random).
  """
  arch = cfg.get("arch", "mtp")
  if arch != "mtp":
    raise ValueError(f"cfg.arch={arch!r}: lkjax.models.mtp builds arch 'mtp'")
  shape = resolve_config(cfg, target)
  ids = L.check_draft_vocab(draft_vocab, target.vocab_size, int(cfg.get("draft_vocab_size", 0) or 0))
  tw = L.check_target_weights(target_weights, target.vocab_size, target.hidden_size,
                              ("embed_tokens", "lm_head", "norm"))
  return MTP(vocab_size=target.vocab_size, draft_vocab=ids, target_weights=tw,
             dtype=L.parse_dtype(cfg.get("dtype", "float32")), rngs=rngs, perf=perf, **shape)
