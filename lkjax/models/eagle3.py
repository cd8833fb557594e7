"""EAGLE-3 draft (Li et al. 2025) with the exact math of vLLM ``llama_eagle3`` / SGLang (docs/design.md#architectures).

One draft step at position t (H = draft hidden, Ht = target hidden, A = number of aux layers):

    g   = fc(concat(aux_t))                     step 0: fc [A*Ht -> H], no bias
        = y^{(i-1)}_t                           step i >= 1: the draft's own PRE-norm output
    x   = concat(input_layernorm(embed(tok)), hidden_norm(g))          [2H], embedding first
    h   = g + o_proj(attn(q/k/v_proj(x)))                              q/k/v take 2H inputs
    y   = h + mlp(post_attention_layernorm(h))                         (standard Llama layer tail)
    logits = lm_head(norm(y))                                          [H -> Vd], the draft's own head

Step i at position t reads token ``x[t+i+1]`` (tokens shifted by i more), RoPE position ``positions[t]+i``,
and predicts ``x[t+i+2]`` = ``logits[i, :, t]`` (base.py alignment).  Training-time test (TTT) attention
at step i: the query at t sees the STEP-0 keys at slots s <= t of its own document and the keys of steps
1..i at position t only (`ttt_attention_mask`).  That is what drafting computes: the KV cache holds the
step-0 keys of committed positions, and speculative steps see their own earlier steps' keys at the
last position.  ``num_layers > 1`` stacks plain Llama layers (H wide) after the EAGLE-3 layer; each
layer attends with the same pattern (serving engines load only ``num_layers = 1``).

The embedding is the target's (a `Frozen` variable); when H != Ht the draft owns a trainable one.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lkjax.models import layers as L
from lkjax.models.base import shift_left
from lkjax.perf import PerfOptions, or_default
from lkjax.targets.info import TargetInfo


def ttt_attention_mask(segment_ids: jax.Array, step: int) -> tuple[jax.Array, jax.Array]:
  """EAGLE-3 test-time-training attention pattern of step ``step`` (pure function).

  Keys at step i are ordered ``[step-0 keys at slots 0..T-1 | step-1 keys | ... | step-i keys]``.  The
  dense ``[B, T, (i+1)*T]`` mask is ``[prefix | diag(own[..., 0]) | ... | diag(own[..., i-1])]``: the
  query at t sees step-0 keys at s <= t of its own (non-padding) document and the key of each step
  1..i at position t only.  Only the compact parts are materialised (the attention never builds the
  ``(i+1)*T``-wide score matrix).

  Args:
    segment_ids: int ``[B, T]`` document ids (0 = padding; equal ids = same packed document).
    step: i >= 0.
  Returns:
    ``(prefix bool[B, T, T], own bool[B, T, i])``: ``prefix[b,t,s]`` = s <= t and seg[s] == seg[t] > 0;
    ``own[b,t,j]`` = seg[t] > 0 (the key of step j+1 at position t).
  """
  if step < 0:
    raise ValueError(f"step={step}: must be >= 0")
  seg = segment_ids.astype(jnp.int32)
  idx = jnp.broadcast_to(jnp.arange(seg.shape[1], dtype=jnp.int32), seg.shape)
  prefix = L.segment_causal_mask(seg, seg, idx, idx)
  own = jnp.broadcast_to((seg > 0)[:, :, None], seg.shape + (step,))
  return prefix, own


class Eagle3DecoderLayer(L.LlamaDecoderLayer):
  """vLLM's ``midlayer``: a Llama layer whose q/k/v read ``concat(input_layernorm(e), hidden_norm(g))``."""

  def __init__(self, hidden: int, *, rms_norm_eps: float, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs, **kw):  # kw: LlamaDecoderLayer's, incl. perf
    super().__init__(hidden, rms_norm_eps=rms_norm_eps, attn_in_features=2 * hidden, dtype=dtype,
                     param_dtype=param_dtype, rngs=rngs, **kw)
    self.hidden_norm = L.RMSNorm(hidden, eps=rms_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def forward_eagle(self, emb: jax.Array, g: jax.Array, positions: jax.Array,
                    attend: L.Attend) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """``emb, g [B, T, H]`` -> ``(y [B, T, H], (k, v))``; residual is g (see `LlamaDecoderLayer.block`)."""
    x = jnp.concatenate([self.input_layernorm(emb), self.hidden_norm(g)], axis=-1)
    return self.block(x, g, positions, attend)


class Eagle3(nnx.Module):
  """EAGLE-3 draft model (see the module docstring for the math).

  Attributes:
    num_heads: K unrolled steps (draft positions).
    draft_vocab_size: Vd.
    embed_tokens: ``[V, H]`` `Frozen` target embedding, or a trainable Param when H != Ht.
    fc: Linear ``[A*Ht, H]`` (no bias).
    midlayer: `Eagle3DecoderLayer`; layers: further `LlamaDecoderLayer`s (num_layers - 1).
    norm: final RMSNorm; lm_head: Linear ``[H, Vd]``.
    draft_vocab: `Frozen` ``int32[Vd]`` target ids, or None (Vd = V).
  """

  def __init__(self, *, target_hidden_size: int, vocab_size: int, num_aux: int, hidden_size: int,
               num_attention_heads: int, num_key_value_heads: int, head_dim: int, intermediate_size: int,
               rms_norm_eps: float, rope_theta: float, num_layers: int = 1, num_heads: int = 7,
               draft_vocab: np.ndarray | None = None, target_embed: np.ndarray | None = None,
               init_lm_head: np.ndarray | None = None, dtype: Any = jnp.float32, rngs: nnx.Rngs,
               perf: PerfOptions | None = None):
    """Builds the model.

    Args:
      target_hidden_size: Ht; vocab_size: V; num_aux: A (aux width A*Ht).
      hidden_size .. rope_theta: the draft decoder layer's shape (H, heads, kv heads, head_dim, I).
      num_layers: decoder layers (>= 1); num_heads: K unrolled steps (>= 1).
      draft_vocab: validated ``int32[Vd]`` target ids or None.
      target_embed: ``[V, Ht]`` target embedding (frozen copy when H == Ht); None = random (tests).
      init_lm_head: optional ``[Vd, H]`` rows to initialise lm_head (PyTorch layout).
      dtype: compute dtype; parameters are float32.
      perf: `lkjax.perf.PerfOptions` (None: this backend's default).
    """
    if num_layers < 1 or num_heads < 1:
      raise ValueError(f"num_layers={num_layers}, num_heads={num_heads}: both must be >= 1")
    self.num_heads = int(num_heads)
    self.vocab_size = int(vocab_size)
    self.draft_vocab_size = int(vocab_size if draft_vocab is None else len(draft_vocab))
    self.hidden_size, self.target_hidden_size, self.num_aux = int(hidden_size), int(target_hidden_size), int(num_aux)
    self.num_kv_heads, self.head_dim = int(num_key_value_heads), int(head_dim)
    self.num_layers = int(num_layers)
    self.dtype = dtype
    self.perf = or_default(perf)
    H, V, Vd = self.hidden_size, self.vocab_size, self.draft_vocab_size
    self.embed_trainable = H != target_hidden_size
    if self.embed_trainable:
      self.embed_tokens = nnx.Param(L.partitioned(nnx.initializers.normal(0.02), ("vocab", "embed"))(
          rngs.params(), (V, H), jnp.float32))
    else:
      emb = (np.asarray(target_embed, np.float32) if target_embed is not None
             else 0.02 * jax.random.normal(rngs.params(), (V, H), jnp.float32))
      self.embed_tokens = L.frozen(emb, ("vocab", "embed"))
    kw = dict(dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    layer_kw = dict(num_heads=num_attention_heads, num_kv_heads=num_key_value_heads, head_dim=head_dim,
                    intermediate=intermediate_size, rms_norm_eps=rms_norm_eps, rope_theta=rope_theta,
                    perf=self.perf, **kw)
    self.fc = L.dense(num_aux * target_hidden_size, H, (None, "embed"), perf=self.perf, **kw)
    self.midlayer = Eagle3DecoderLayer(H, **layer_kw)
    self.layers = nnx.List([L.LlamaDecoderLayer(H, **layer_kw) for _ in range(num_layers - 1)])
    self.norm = L.RMSNorm(H, eps=rms_norm_eps, **kw)
    head_init = nnx.initializers.lecun_normal()
    if init_lm_head is not None:
      rows = np.asarray(init_lm_head, np.float32)
      if rows.shape != (Vd, H):
        raise ValueError(f"init_lm_head: expected shape {(Vd, H)}, got {rows.shape}")
      head_init = lambda key, shape, dt: jnp.asarray(rows.T, dt)
    self.lm_head = L.dense(H, Vd, ("embed", "vocab"), kernel_init=head_init, perf=self.perf, **kw)
    self.draft_vocab = None if draft_vocab is None else L.frozen(np.asarray(draft_vocab, np.int32), ("vocab",))

  # ------------------------------------------------------------------ pieces
  def _embed(self, tokens: jax.Array) -> jax.Array:
    return self.embed_tokens[...][tokens].astype(self.dtype)

  def _first_hidden(self, aux: jax.Array) -> jax.Array:
    """``aux [B, T, A*Ht] -> g [B, T, H]``."""
    if aux.shape[-1] != self.num_aux * self.target_hidden_size:
      raise ValueError(f"aux_hidden: last dim {aux.shape[-1]} != num_aux * target_hidden_size = "
                       f"{self.num_aux} * {self.target_hidden_size}")
    return self.fc(aux.astype(self.dtype))

  def _step(self, tokens: jax.Array, g: jax.Array, positions: jax.Array,
            attends: list[L.Attend]) -> tuple[jax.Array, list[tuple[jax.Array, jax.Array]]]:
    """One draft step through all layers: -> (pre-norm y ``[B,T,H]``, per-layer (k, v))."""
    y, kv = self.midlayer.forward_eagle(self._embed(tokens), g, positions, attends[0])
    kvs = [kv]
    for layer, attend in zip(self.layers, attends[1:]):
      y, kv = layer.forward(y, positions, attend)
      kvs.append(kv)
    return y, kvs

  def _logits(self, y: jax.Array) -> jax.Array:
    return self.lm_head(self.norm(y))

  # ------------------------------------------------------------------ training forward
  def __call__(self, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Teacher-forced TTT unrolling over K steps -> logits ``[K, B, T, Vd]`` (compute dtype).

    Uses ``input_ids``, ``segment_ids``, ``positions``, ``aux_hidden`` of the batch (base.py schema).
    """
    return jnp.stack([self.feature_logits(y, i) for i, y in enumerate(self.features(batch))], axis=0)

  def feature_logits(self, features: jax.Array, k: int) -> jax.Array:
    """Step k's logits from its pre-norm output ``y`` (every step shares ``norm`` and ``lm_head``)."""
    del k
    return self._logits(features)

  def features(self, batch: Mapping[str, jax.Array]) -> list[jax.Array]:
    """The K TTT steps' pre-norm outputs ``y [B, T, H]`` (see `__call__`)."""
    ids, pos = batch["input_ids"].astype(jnp.int32), batch["positions"].astype(jnp.int32)
    prefix, own = ttt_attention_mask(batch["segment_ids"], self.num_heads - 1)
    g = self._first_hidden(batch["aux_hidden"])
    n_layers = self.num_layers
    step0: list[tuple[jax.Array, jax.Array]] = []
    later: list[list[tuple[jax.Array, jax.Array]]] = [[] for _ in range(n_layers)]

    def ttt_attend(layer: int, i: int) -> L.Attend:
      if i == 0:
        return lambda q, k, v: L.gqa_attention(q, k, v, prefix, causal=True, perf=self.perf)
      def attend(q, k, v):
        ks = jnp.stack([kv[0] for kv in later[layer]] + [k], axis=2)    # [B, T, i, Nkv, D]
        vs = jnp.stack([kv[1] for kv in later[layer]] + [v], axis=2)
        k0, v0 = step0[layer]
        return L.gqa_attention(q, k0, v0, prefix, self_k=ks, self_v=vs, self_mask=own[:, :, :i], causal=True,
                               perf=self.perf)
      return attend

    out = []
    for i in range(self.num_heads):
      y, kvs = self._step(shift_left(ids, i + 1), g, pos + i, [ttt_attend(l, i) for l in range(n_layers)])
      for l, kv in enumerate(kvs):
        if i == 0:
          step0.append(kv)
        else:
          later[l].append(kv)
      out.append(y)
      g = y
    return out

  # ------------------------------------------------------------------ drafting
  def init_cache(self, batch_size: int, max_len: int) -> dict[str, Any]:
    """Empty drafting state.

    ``k``/``v``: per layer ``[B, max_len, Nkv, D]`` step-0 keys/values of committed positions (slot =
    commit order); ``length int32[B]`` committed slots; ``last_y [B, H]`` / ``last_pos int32[B]``: the
    step-0 pre-norm output and RoPE position of the last committed position (where drafting starts).
    """
    shape = (batch_size, max_len, self.num_kv_heads, self.head_dim)
    return {"k": tuple(jnp.zeros(shape, self.dtype) for _ in range(self.num_layers)),
            "v": tuple(jnp.zeros(shape, self.dtype) for _ in range(self.num_layers)),
            "length": jnp.zeros((batch_size,), jnp.int32),
            "last_y": jnp.zeros((batch_size, self.hidden_size), self.dtype),
            "last_pos": jnp.zeros((batch_size,), jnp.int32)}

  def _commit(self, cache: Mapping[str, Any], ctx: Mapping[str, jax.Array]) -> dict[str, Any]:
    """Step 0 on the n newly committed positions; their keys go into the cache."""
    tokens, pos = ctx["next_tokens"].astype(jnp.int32), ctx["positions"].astype(jnp.int32)
    b, n = tokens.shape
    if n == 0:
      return dict(cache)
    max_len = cache["k"][0].shape[1]
    L.check_cache_room(cache["length"], n, max_len)
    valid = L.ctx_num_valid(ctx, b, n)                                             # [B] (right-aligned)
    slots = cache["length"][:, None] + jnp.arange(n, dtype=jnp.int32) - (n - valid)[:, None]  # [B, n]
    write_at = jnp.where(slots >= cache["length"][:, None], slots, max_len)       # padding: dropped
    mask = jnp.arange(max_len, dtype=jnp.int32)[None, None, :] <= slots[:, :, None]
    new_k, new_v = list(cache["k"]), list(cache["v"])

    def cached_attend(layer: int) -> L.Attend:
      def attend(q, k, v):
        new_k[layer] = L.write_cache(cache["k"][layer], k, write_at)
        new_v[layer] = L.write_cache(cache["v"][layer], v, write_at)
        return L.gqa_attention(q, new_k[layer], new_v[layer], mask)
      return attend

    y, _ = self._step(tokens, self._first_hidden(ctx["aux_hidden"]), pos,
                      [cached_attend(l) for l in range(self.num_layers)])
    some = valid > 0
    return {"k": tuple(new_k), "v": tuple(new_v), "length": cache["length"] + valid,
            "last_y": jnp.where(some[:, None], y[:, -1], cache["last_y"]),
            "last_pos": jnp.where(some, pos[:, -1], cache["last_pos"])}

  def propose(self, cache: Mapping[str, Any], ctx: Mapping[str, jax.Array], *, num_tokens: int,
              temperature: float, rng: jax.Array | None,
              forced_tokens: jax.Array | None = None) -> tuple[dict[str, Any], jax.Array, jax.Array]:
    """Commit ``ctx`` (step 0, cached), then draft ``num_tokens`` tokens by chaining steps 1, 2, ...

    Args:
      cache: from `init_cache` / a previous call.
      ctx: ``aux_hidden [B, n, A*Ht]``, ``next_tokens int32[B, n]`` (committed x[j+1]),
        ``positions int32[B, n]`` (RoPE position of j) for n >= 0 newly committed positions j; optional
        ``num_valid int32[B]``: only row b's last num_valid[b] entries are committed (`lkjax.models.base`).
      num_tokens: tokens to draft (any number >= 1; the TTT pattern just continues).
      temperature: <= 0 greedy, else sample softmax(logits / T).
      rng: PRNG key (needed when temperature > 0).
      forced_tokens: optional TARGET ids ``[B, num_tokens]`` fed back instead of the drafted tokens.
    Returns:
      ``(cache, tokens int32[B, num_tokens] target ids, logits f32[B, num_tokens, Vd])``.  Step i's
      query (at the last committed position, RoPE position +i) sees the cached step-0 keys and its own
      keys of steps 1..i; those speculative keys are dropped afterwards.
    """
    if num_tokens < 1:
      raise ValueError(f"num_tokens={num_tokens}: must be >= 1")
    cache = self._commit(cache, ctx)
    max_len = cache["k"][0].shape[1]
    mask = (jnp.arange(max_len, dtype=jnp.int32)[None, :] < cache["length"][:, None])[:, None, :]  # [B,1,S]
    keys = L.split_keys(rng, num_tokens)
    spec: list[list[tuple[jax.Array, jax.Array]]] = [[] for _ in range(self.num_layers)]

    def spec_attend(layer: int) -> L.Attend:
      def attend(q, k, v):
        ks = jnp.stack([kv[0] for kv in spec[layer]] + [k], axis=2)              # [B, 1, i, Nkv, D]
        vs = jnp.stack([kv[1] for kv in spec[layer]] + [v], axis=2)
        return L.gqa_attention(q, cache["k"][layer], cache["v"][layer], mask, self_k=ks, self_v=vs)
      return attend

    y = cache["last_y"][:, None]                                                   # [B, 1, H]
    logits, ids = [], []
    for i in range(num_tokens):
      if i > 0:
        prev = forced_tokens[:, i - 1] if forced_tokens is not None else L.draft_to_target(self.draft_vocab, ids[-1])
        y, kvs = self._step(prev[:, None].astype(jnp.int32), y, (cache["last_pos"] + i)[:, None],
                            [spec_attend(l) for l in range(self.num_layers)])
        for l, kv in enumerate(kvs):
          spec[l].append(kv)
      logit = self._logits(y)[:, 0].astype(jnp.float32)                           # [B, Vd]
      logits.append(logit)
      ids.append(L.sample_tokens(logit, temperature, keys[i]))
    tokens = (jnp.asarray(forced_tokens, jnp.int32) if forced_tokens is not None
              else L.draft_to_target(self.draft_vocab, jnp.stack(ids, axis=1)))
    return cache, tokens, jnp.stack(logits, axis=1)


def resolve_config(cfg, target: TargetInfo) -> dict[str, Any]:
  """The EAGLE-3 layer shape with 0 / None ("inherit") resolved from the target."""
  def pick(name, default):
    v = cfg.get(name, 0)
    return default if v in (0, None) else v
  hidden = int(pick("hidden_size", target.hidden_size))
  heads = int(pick("num_attention_heads", target.num_attention_heads))
  same_shape = hidden == target.hidden_size and heads == target.num_attention_heads
  out = dict(
      hidden_size=hidden,
      num_attention_heads=heads,
      num_key_value_heads=int(pick("num_key_value_heads", target.num_key_value_heads)),
      head_dim=int(pick("head_dim", target.head_dim if same_shape else hidden // heads)),
      intermediate_size=int(pick("intermediate_size", target.intermediate_size)),
      rms_norm_eps=float(pick("rms_norm_eps", target.rms_norm_eps)),
      rope_theta=float(pick("rope_theta", target.rope_theta)),
      num_layers=int(pick("num_layers", 1)),
      num_heads=int(pick("num_heads", 7)),
  )
  if out["num_attention_heads"] % out["num_key_value_heads"]:
    raise ValueError(f"num_attention_heads={out['num_attention_heads']} is not a multiple of "
                     f"num_key_value_heads={out['num_key_value_heads']}")
  if min(out["hidden_size"], out["head_dim"], out["intermediate_size"], out["num_layers"], out["num_heads"]) < 1:
    raise ValueError(f"EAGLE-3 config: sizes must be >= 1, got {out}")
  aux = cfg.get("aux_layer_ids", None)
  if aux and tuple(int(a) for a in aux) != target.aux_layer_ids:
    raise ValueError(f"aux_layer_ids={tuple(aux)} differ from the target's {target.aux_layer_ids} "
                     f"(the hidden-state shards hold the target's aux layers)")
  if cfg.get("init_lm_head_from_target", False) and hidden != target.hidden_size:
    raise ValueError(f"init_lm_head_from_target needs hidden_size == target hidden {target.hidden_size}, "
                     f"got {hidden}")
  return out


def from_config(cfg, target: TargetInfo, *, draft_vocab=None,
                target_weights: Mapping[str, np.ndarray] | None = None, rngs: nnx.Rngs,
                perf: PerfOptions | None = None) -> Eagle3:
  """Builds an `Eagle3` from a ConfigDict (see `resolve_config`; 0 = inherit the target's value).

  cfg keys: ``arch`` ('eagle3'), ``num_heads`` (K = 7), ``draft_vocab_size`` (0 = V), ``dtype``,
  ``hidden_size``, ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``, ``intermediate_size``,
  ``num_layers`` (1), ``rms_norm_eps``, ``rope_theta``, optional ``init_lm_head_from_target`` (False).
  ``target_weights``: ``{"embed_tokens": [V, Ht], "lm_head": [V, Ht], ...}`` float32, or None (random).
  """
  arch = cfg.get("arch", "eagle3")
  if arch != "eagle3":
    raise ValueError(f"cfg.arch={arch!r}: lkjax.models.eagle3 builds arch 'eagle3'")
  shape = resolve_config(cfg, target)
  ids = L.check_draft_vocab(draft_vocab, target.vocab_size, int(cfg.get("draft_vocab_size", 0) or 0))
  init_head = bool(cfg.get("init_lm_head_from_target", False))
  names = ("embed_tokens",) + (("lm_head",) if init_head else ())
  tw = L.check_target_weights(target_weights, target.vocab_size, target.hidden_size, names)
  head_rows = None
  if init_head and tw is not None:
    head_rows = tw["lm_head"] if ids is None else tw["lm_head"][ids]
  return Eagle3(target_hidden_size=target.hidden_size, vocab_size=target.vocab_size, num_aux=target.num_aux,
                draft_vocab=ids, target_embed=None if tw is None else tw["embed_tokens"],
                init_lm_head=head_rows, dtype=L.parse_dtype(cfg.get("dtype", "float32")), rngs=rngs, perf=perf,
                **shape)
