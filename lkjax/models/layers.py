"""Llama building blocks shared by the lkjax drafts (EAGLE-3, MTP): RMSNorm, RoPE, GQA, gated MLP.

Layout and naming follow transformers' ``LlamaDecoderLayer`` (``input_layernorm``, ``self_attn.{q,k,v,o}_proj``,
``post_attention_layernorm``, ``mlp.{gate,up,down}_proj``, norm ``weight``) so exports are a rename +
transpose: every projection is an ``nnx.Linear`` whose ``kernel`` is ``[in, out]`` (PyTorch stores
``weight = kernel.T``).

Sharding: every parameter carries logical axis names from ``LOGICAL_AXES`` (``nnx.with_partitioning``).
A mesh + ``nnx.logical_axis_rules`` map them to mesh axes; the rules must name every axis in
``LOGICAL_AXES`` (map an axis to None to replicate it) because flax passes unknown names through as
mesh-axis names.  Flax 0.12 shards annotated variables eagerly at creation, which needs a mesh in
context; `partitioned` shards eagerly only when a mesh is set, so the same code builds an unsharded
model on one device (tests, notebooks, export) and a sharded one under ``jax.set_mesh(mesh)``.
q/k/v/o kernels are 2-D (``[in, heads*head_dim]``) so a tensor-parallel split needs only
``heads*head_dim`` (not the head count, e.g. 9 for SmolLM2) to divide the mesh axis.

Parameters are float32 (``param_dtype``); activations are computed in ``dtype`` (float32 or bfloat16)
with norms, softmax and attention scores in float32.

The small drafting helpers every draft shares (dtype names, draft-vocabulary checks, token sampling,
draft -> target id mapping) live at the end of this module.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lkjax import perf as perf_lib
from lkjax.models.base import Frozen
from lkjax.perf import PerfOptions
from lkjax.sharding import cotangent_like

LOGICAL_AXES = ("embed", "mlp", "heads", "kv", "head_dim", "vocab")

# Finite "minus infinity" for masked scores: -inf would turn fully masked (padding) rows into NaN.
_MASKED = -1e30

Attend = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def partitioned(init, axes: tuple[str | None, ...]):
  """``nnx.with_partitioning(init, axes)`` that shards eagerly only when a mesh is in context."""
  eager = nnx.using_eager_sharding() and not jax.sharding.get_abstract_mesh().empty
  return nnx.with_partitioning(init, axes, eager_sharding=eager)


def partitioned_param(init, axes: tuple[str | None, ...], key: jax.Array, shape: tuple[int, ...]) -> nnx.Param:
  """A float32 ``nnx.Param`` initialised by ``init(key, shape, float32)`` carrying logical axis names.

  Flax 0.12 shards annotated variables eagerly, which needs a mesh in context; sharding is applied
  only when one is set (the trainer builds the model under ``jax.set_mesh`` + logical rules), so the
  same code also builds an unsharded model on a single device (tests, notebooks).
  """
  eager = nnx.using_eager_sharding() and not jax.sharding.get_abstract_mesh().empty
  return nnx.Param(init(key, shape, jnp.float32), out_sharding=axes, eager_sharding=eager)


def frozen(value, axes: tuple[str | None, ...]) -> Frozen:
  """A `Frozen` (non-trainable) float32/int array carrying logical axis names like `partitioned`."""
  eager = nnx.using_eager_sharding() and not jax.sharding.get_abstract_mesh().empty
  return Frozen(jnp.asarray(value), out_sharding=axes, eager_sharding=eager)


def dense(in_features: int, out_features: int, axes: tuple[str | None, str | None], *, dtype: Any,
          param_dtype: Any = jnp.float32, rngs: nnx.Rngs, use_bias: bool = False,
          kernel_init=nnx.initializers.lecun_normal(), perf: PerfOptions | None = None) -> nnx.Linear:
  """A bias-free (by default) ``nnx.Linear`` ``[in, out]`` whose kernel carries logical ``axes``.

  Its matmul is `lkjax.perf.matmul` in the form ``perf.matmul`` names (None: this backend's default).
  """
  return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=partitioned(kernel_init, axes),
                    bias_init=partitioned(nnx.initializers.zeros, (axes[1],)),
                    dot_general=perf_lib.dense_dot_general(perf_lib.or_default(perf)), rngs=rngs)


@jax.custom_vjp
def unstack(x: jax.Array) -> tuple[jax.Array, ...]:
  """``(x[0], ..., x[n-1])``: a stacked per-head parameter split ONCE into its slices.

  Same values as indexing ``x[k]``, but the gradient is one ``stack`` of the slices' cotangents. Indexing
  each slice separately differentiates to n zero-padded full-size arrays added together, which XLA's CPU
  backend fuses into one loop that evaluates all n pads at every element (n times the work, and per device
  on a data-parallel mesh).
  """
  return tuple(x[i] for i in range(x.shape[0]))


def _unstack_fwd(x):
  return unstack(x), x


def _unstack_bwd(x, cts):
  return (cotangent_like(jnp.stack([jnp.asarray(c, x.dtype) for c in cts]), x),)


unstack.defvjp(_unstack_fwd, _unstack_bwd)


def rms_norm(x: jax.Array, weight: jax.Array | None, eps: float, dtype: Any,
             bias: jax.Array | None = None) -> jax.Array:
  """Llama RMSNorm ``x * rsqrt(mean(x**2) + eps) * w (+ b)`` over the last axis, in float32, cast to
  ``dtype`` at the end. ``weight`` None: no scale; ``bias`` (fms-extras' LayerNormParameterized without
  mean-centring, `lkjax.models.mlp_speculator.speculator_norm`) is added after the scale.

  Computed on ``x`` flattened to ``[rows, dim]``: XLA's CPU backend hands the sums of this function and of
  its gradient to YNNPACK reduce fusions, which were about 6x slower on a ``[1, T, dim]`` array (one
  sequence per device, as on an 8-device mesh with a global batch of 8) than on the same values as
  ``[T, dim]``: 4.19 against 0.71 ms for the forward and backward of one ``[1, 256, 576]`` norm, 3.71
  against 3.44 ms at 8 x 256 (``benchmarks/bench_parts.py --groups=norm``; benchmarks/README.md).
  """
  shape = x.shape
  x32 = x.reshape(-1, shape[-1]).astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  if weight is not None:
    y = y * weight.astype(jnp.float32)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(dtype).reshape(shape)


class RMSNorm(nnx.Module):
  """RMSNorm with a learned ``weight [dim]`` (logical axis ``embed``), initialised to ones."""

  def __init__(self, dim: int, *, eps: float = 1e-5, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.eps = float(eps)
    self.dtype = dtype
    self.weight = nnx.Param(partitioned(nnx.initializers.ones, ("embed",))(rngs.params(), (dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    """``[..., dim] -> [..., dim]`` in ``dtype``."""
    return rms_norm(x, self.weight[...], self.eps, self.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, transformers' Llama ("rotate_half", non-interleaved) convention.

  Args:
    x: ``[B, T, N, D]`` queries or keys (D even).
    positions: int ``[B, T]`` absolute positions.
    theta: RoPE base.
  Returns:
    ``[B, T, N, D]`` in x's dtype: ``x * cos + rotate_half(x) * sin`` with angle
    ``pos * theta**(-2i/D)`` for frequency i, repeated over both halves.
  """
  d = x.shape[-1]
  if d % 2:
    raise ValueError(f"head_dim={d}: rotary embedding needs an even head_dim")
  inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))       # [D/2]
  ang = positions.astype(jnp.float32)[..., None] * inv_freq                        # [B, T, D/2]
  ang = jnp.concatenate([ang, ang], axis=-1)[:, :, None, :]                        # [B, T, 1, D]
  x32 = x.astype(jnp.float32)
  rot = jnp.concatenate([-x32[..., d // 2:], x32[..., : d // 2]], axis=-1)
  return (x32 * jnp.cos(ang) + rot * jnp.sin(ang)).astype(x.dtype)


def gqa_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                  self_k: jax.Array | None = None, self_v: jax.Array | None = None,
                  self_mask: jax.Array | None = None, causal: bool = False,
                  perf: PerfOptions | None = None) -> jax.Array:
  """Grouped-query softmax attention with an explicit boolean mask.

  ``o[b,t,n] = sum_s softmax_s(q[b,t,n] . k[b,s,n//G] / sqrt(D))[mask] v[b,s,n//G]`` with G = N / Nkv,
  optionally over extra keys that only their own query position sees (EAGLE-3 test-time-training
  steps 1..i: the keys of position t at earlier speculative steps).

  The gradient is hand-written (`_attention` custom VJP, flash-attention style): the backward pass
  recomputes the scores from q and k instead of keeping ``[B, N, Tq, Tk]`` residuals, and forms
  ``dS = P * (dP - rowsum(dO * O))`` in one elementwise pass; `gqa_attention_reference` is the same
  forward under plain autodiff (the tests compare the two); ``perf.attention_grad`` picks one.

  Args:
    q: ``[B, Tq, N, D]``.
    k, v: ``[B, Tk, Nkv, D]`` shared keys/values.
    mask: bool ``[B, Tq, Tk]``, True = query t may attend to key s.
    self_k, self_v: optional ``[B, Tq, S, Nkv, D]``: S extra keys per query position.
    self_mask: bool ``[B, Tq, S]`` for the extra keys (default all True).
    causal: the caller guarantees that ``mask[b, t, s]`` is False for every key ``s > t`` (``Tq == Tk``,
      queries and keys in the same slot order, e.g. `segment_causal_mask` of a training row).  Then
      query block ``[a, e)`` (blocks of ``perf.causal_block`` rows) attends to keys ``[0, e)`` only:
      the same result up to the float summation order, with 3/4 of the score work at 2 blocks (5/8 at 4).
      Nothing checks the guarantee: a key after its query that the mask allows would be dropped.
    perf: `lkjax.perf.PerfOptions` (None: this backend's default).
  Returns:
    ``[B, Tq, N, D]`` in q's dtype; rows with no visible key (padding) are 0, never NaN.
  """
  sk, sv, smask = _attention_args(q, k, v, mask, self_k, self_v, self_mask)
  tq = q.shape[1]
  if causal and k.shape[1] != tq:
    raise ValueError(f"causal=True needs as many keys as queries; got Tq={tq}, Tk={k.shape[1]}")
  perf = perf_lib.or_default(perf)
  attend = _attention if perf.attention_grad == "custom_vjp" else _attention_autodiff
  block = int(perf.causal_block)
  if not causal or block <= 0 or tq < 2 * block:
    return attend(q, k, v, mask, sk, sv, smask)
  outs = []
  for a in range(0, tq, block):
    e = min(a + block, tq)
    outs.append(attend(q[:, a:e], k[:, :e], v[:, :e], mask[:, a:e, :e], sk[:, a:e], sv[:, a:e], smask[:, a:e]))
  return jnp.concatenate(outs, axis=1)


def _attention_autodiff(q, k, v, mask, sk, sv, smask):
  return _attention_forward(q, k, v, mask, sk, sv, smask)[0]


def gqa_attention_reference(q, k, v, mask, *, self_k=None, self_v=None, self_mask=None) -> jax.Array:
  """`gqa_attention` differentiated by plain autodiff (the reference its custom VJP is tested against)."""
  sk, sv, smask = _attention_args(q, k, v, mask, self_k, self_v, self_mask)
  return _attention_forward(q, k, v, mask, sk, sv, smask)[0]


def _attention_args(q, k, v, mask, self_k, self_v, self_mask):
  """Checks shapes; no extra keys -> zero-size ``[B, Tq, 0, Nkv, D]`` ones (one code path)."""
  b, tq, n, d = q.shape
  nkv = k.shape[2]
  if n % nkv:
    raise ValueError(f"num_heads={n} is not a multiple of num_key_value_heads={nkv}")
  if mask.shape != (b, tq, k.shape[1]):
    raise ValueError(f"mask: expected shape {(b, tq, k.shape[1])}, got {mask.shape}")
  if self_k is None:
    self_k = jnp.zeros((b, tq, 0, nkv, d), k.dtype)
    self_v = jnp.zeros((b, tq, 0, nkv, v.shape[-1]), v.dtype)
  if self_mask is None:
    self_mask = jnp.ones((b, tq, self_k.shape[2]), bool)
  return self_k, self_v, self_mask


def _scores(qg, k, sk, scale):
  """Shared-key and own-position-key scores, f32 ``[B, Nkv, G, Tq, Tk]`` and ``[B, Nkv, G, Tq, S]``."""
  s0 = jnp.einsum("bqhgd,bshd->bhgqs", qg, k, preferred_element_type=jnp.float32) * scale
  s1 = jnp.einsum("bqhgd,bqshd->bhgqs", qg, sk, preferred_element_type=jnp.float32) * scale
  return s0, s1


def _attention_forward(q, k, v, mask, sk, sv, smask):
  """-> ``(out [B, Tq, N, D] q.dtype, o f32 [B, Tq, Nkv, G, D], lse f32 [B, Nkv, G, Tq])``."""
  b, tq, n, d = q.shape
  nkv = k.shape[2]
  qg = q.reshape(b, tq, nkv, n // nkv, d)
  scale = 1.0 / np.sqrt(d)
  # The softmax is taken over the shared keys and the extra keys without concatenating their scores,
  # and normalised after the value product ([B, Tq, N, D] instead of the [B, N, Tq, Tk] probabilities):
  # fewer passes over the big score arrays, which dominate this function's cost on CPU.
  s0, s1 = _scores(qg, k, sk, scale)
  m0, m1 = mask[:, None, None], smask[:, None, None]
  mx = jnp.maximum(s0.max(axis=-1, where=m0, initial=_MASKED), s1.max(axis=-1, where=m1, initial=_MASKED))
  mx = jax.lax.stop_gradient(mx)[..., None]
  # exp of a safe value where masked (no inf * 0 in the gradient), then zeroed.
  e0 = jnp.where(m0, jnp.exp(jnp.where(m0, s0, mx) - mx), 0.0)
  e1 = jnp.where(m1, jnp.exp(jnp.where(m1, s1, mx) - mx), 0.0)
  denom = e0.sum(axis=-1) + e1.sum(axis=-1)                                          # [B, Nkv, G, Tq]
  out = jnp.einsum("bhgqs,bshd->bqhgd", e0.astype(v.dtype), v, preferred_element_type=jnp.float32)
  out = out + jnp.einsum("bhgqs,bqshd->bqhgd", e1.astype(sv.dtype), sv, preferred_element_type=jnp.float32)
  # Rows with no visible key (padding) have denom 0 and out 0: they stay 0.
  denom = jnp.where(denom > 0, denom, 1.0)
  o = out / jnp.transpose(denom, (0, 3, 1, 2))[..., None]                            # [B, Tq, Nkv, G, D]
  lse = mx[..., 0] + jnp.log(denom)
  return o.reshape(b, tq, n, d).astype(q.dtype), o, lse


@jax.custom_vjp
def _attention(q, k, v, mask, sk, sv, smask):
  return _attention_forward(q, k, v, mask, sk, sv, smask)[0]


def _attention_fwd(q, k, v, mask, sk, sv, smask):
  out, o, lse = _attention_forward(q, k, v, mask, sk, sv, smask)
  return out, (q, k, v, mask, sk, sv, smask, o, jax.lax.stop_gradient(lse))


def _attention_bwd(res, g):
  """``dS = P * (dP - delta)`` with P recomputed from q, k and the saved row lse; delta = rowsum(dO * O)."""
  q, k, v, mask, sk, sv, smask, o, lse = res
  b, tq, n, d = q.shape
  nkv = k.shape[2]
  qg = q.reshape(b, tq, nkv, n // nkv, d)
  do = g.reshape(qg.shape)
  scale = 1.0 / np.sqrt(d)
  s0, s1 = _scores(qg, k, sk, scale)
  lse_ = lse[..., None]
  p0 = jnp.where(mask[:, None, None], jnp.exp(s0 - lse_), 0.0)                       # [B, Nkv, G, Tq, Tk]
  p1 = jnp.where(smask[:, None, None], jnp.exp(s1 - lse_), 0.0)                      # [B, Nkv, G, Tq, S]
  delta = jnp.transpose(jnp.sum(do.astype(jnp.float32) * o, axis=-1), (0, 2, 3, 1))[..., None]
  dp0 = jnp.einsum("bqhgd,bshd->bhgqs", do, v, preferred_element_type=jnp.float32)
  dp1 = jnp.einsum("bqhgd,bqshd->bhgqs", do, sv, preferred_element_type=jnp.float32)
  ds0 = (p0 * (dp0 - delta) * scale).astype(q.dtype)
  ds1 = (p1 * (dp1 - delta) * scale).astype(q.dtype)
  f32 = dict(preferred_element_type=jnp.float32)
  dq = (jnp.einsum("bhgqs,bshd->bqhgd", ds0, k, **f32)
        + jnp.einsum("bhgqs,bqshd->bqhgd", ds1, sk, **f32)).reshape(q.shape)
  dk = jnp.einsum("bhgqs,bqhgd->bshd", ds0, qg, **f32)
  dsk = jnp.einsum("bhgqs,bqhgd->bqshd", ds1, qg, **f32)
  dv = jnp.einsum("bhgqs,bqhgd->bshd", p0.astype(v.dtype), do, **f32)
  dsv = jnp.einsum("bhgqs,bqhgd->bqshd", p1.astype(sv.dtype), do, **f32)
  cts = [x.astype(p.dtype) for x, p in zip((dq, dk, dv, dsk, dsv), (q, k, v, sk, sv))]
  dq, dk, dv, dsk, dsv = (cotangent_like(x, p) for x, p in zip(cts, (q, k, v, sk, sv)))
  return dq, dk, dv, None, dsk, dsv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def segment_causal_mask(q_segments: jax.Array, k_segments: jax.Array, q_idx: jax.Array,
                        k_idx: jax.Array) -> jax.Array:
  """``mask[b, t, s] = k_idx[b,s] <= q_idx[b,t]`` and same non-padding segment: bool ``[B, Tq, Tk]``.

  Args:
    q_segments, k_segments: int ``[B, Tq]`` / ``[B, Tk]`` document ids (0 = padding).
    q_idx, k_idx: int ``[B, Tq]`` / ``[B, Tk]`` order of the tokens in the row (slot index, not the
      RoPE position, so packing with restarting positions stays causal).
  """
  same = (q_segments[:, :, None] == k_segments[:, None, :]) & (q_segments[:, :, None] > 0)
  return same & (k_idx[:, None, :] <= q_idx[:, :, None])


class Attention(nnx.Module):
  """Llama grouped-query self-attention (no biases), split so callers can manage KV caches.

  ``project`` gives RoPE'd ``q [B,T,N,D]``, ``k, v [B,T,Nkv,D]``; the caller attends (dense mask,
  cache, TTT keys) and ``output`` maps ``[B,T,N,D] -> [B,T,out]``.  ``__call__`` is the plain
  masked self-attention.
  """

  def __init__(self, in_features: int, out_features: int, *, num_heads: int, num_kv_heads: int,
               head_dim: int, rope_theta: float, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               rngs: nnx.Rngs, perf: PerfOptions | None = None):
    if num_heads % num_kv_heads:
      raise ValueError(f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}")
    self.num_heads, self.num_kv_heads, self.head_dim = int(num_heads), int(num_kv_heads), int(head_dim)
    self.rope_theta = float(rope_theta)
    self.perf = perf_lib.or_default(perf)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, perf=self.perf)
    self.q_proj = dense(in_features, num_heads * head_dim, ("embed", "heads"), **kw)
    self.k_proj = dense(in_features, num_kv_heads * head_dim, ("embed", "kv"), **kw)
    self.v_proj = dense(in_features, num_kv_heads * head_dim, ("embed", "kv"), **kw)
    self.o_proj = dense(num_heads * head_dim, out_features, ("heads", "embed"), **kw)

  def project(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``x [B, T, in]``, positions ``[B, T]`` -> (q ``[B,T,N,D]``, k, v ``[B,T,Nkv,D]``), RoPE on q, k."""
    b, t = x.shape[:2]
    q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    return apply_rope(q, positions, self.rope_theta), apply_rope(k, positions, self.rope_theta), v

  def output(self, o: jax.Array) -> jax.Array:
    """``[B, T, N, D] -> [B, T, out]``."""
    return self.o_proj(o.reshape(o.shape[:2] + (self.num_heads * self.head_dim,)))

  def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked self-attention: ``x [B,T,in]``, positions ``[B,T]``, mask bool ``[B,T,T]`` -> ``[B,T,out]``."""
    q, k, v = self.project(x, positions)
    return self.output(gqa_attention(q, k, v, mask, perf=self.perf))


class GatedMLP(nnx.Module):
  """Llama MLP ``down(silu(gate(x)) * up(x))``: ``[..., H] -> [..., H]`` via ``[..., I]``."""

  def __init__(self, hidden: int, intermediate: int, *, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs, perf: PerfOptions | None = None):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, perf=perf)
    self.gate_proj = dense(hidden, intermediate, ("embed", "mlp"), **kw)
    self.up_proj = dense(hidden, intermediate, ("embed", "mlp"), **kw)
    self.down_proj = dense(intermediate, hidden, ("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):
  """A transformers ``LlamaDecoderLayer``: ``h = r + attn(a)``, ``y = h + mlp(post_attention_layernorm(h))``.

  In the standard layer the attention input is ``a = input_layernorm(x)`` and the residual ``r = x``;
  `block` takes ``a`` and ``r`` separately so variants (EAGLE-3's 2H-wide attention input) reuse it.
  ``attn_in_features`` is the width of ``a`` (default ``hidden``).
  """

  def __init__(self, hidden: int, *, num_heads: int, num_kv_heads: int, head_dim: int, intermediate: int,
               rms_norm_eps: float, rope_theta: float, attn_in_features: int | None = None,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs,
               perf: PerfOptions | None = None):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.hidden = int(hidden)
    self.dtype = dtype
    self.perf = perf_lib.or_default(perf)
    self.input_layernorm = RMSNorm(hidden, eps=rms_norm_eps, **kw)
    self.self_attn = Attention(attn_in_features or hidden, hidden, num_heads=num_heads, num_kv_heads=num_kv_heads,
                               head_dim=head_dim, rope_theta=rope_theta, perf=self.perf, **kw)
    self.post_attention_layernorm = RMSNorm(hidden, eps=rms_norm_eps, **kw)
    self.mlp = GatedMLP(hidden, intermediate, perf=self.perf, **kw)

  def block(self, attn_in: jax.Array, residual: jax.Array, positions: jax.Array,
            attend: Attend) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """The layer body around a caller-supplied attention core.

    Args:
      attn_in: ``[B, T, attn_in_features]`` (already normalised).
      residual: ``[B, T, H]``.
      positions: int ``[B, T]`` RoPE positions.
      attend: ``(q [B,T,N,D], k, v [B,T,Nkv,D]) -> o [B,T,N,D]`` (mask / cache / TTT keys).
    Returns:
      ``(y [B, T, H], (k, v))`` -- this call's RoPE'd keys and values, for a KV cache.
    """
    q, k, v = self.self_attn.project(attn_in, positions)
    h = residual.astype(self.dtype) + self.self_attn.output(attend(q, k, v))
    return h + self.mlp(self.post_attention_layernorm(h)), (k, v)

  def forward(self, x: jax.Array, positions: jax.Array,
              attend: Attend) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Standard pre-norm layer on ``x [B, T, H]`` with a caller-supplied attention core (see `block`)."""
    return self.block(self.input_layernorm(x), x, positions, attend)

  def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
    """Standard layer with dense masked self-attention (mask bool ``[B, T, T]``) -> ``[B, T, H]``."""
    return self.forward(x, positions, lambda q, k, v: gqa_attention(q, k, v, mask, perf=self.perf))[0]


def write_cache(cache: jax.Array, new: jax.Array, slots: jax.Array) -> jax.Array:
  """Write ``new [B, n, ...]`` into ``cache [B, S, ...]`` at per-row slots ``int[B, n]`` (out of range: dropped)."""
  rows = jnp.arange(cache.shape[0], dtype=jnp.int32)[:, None]
  return cache.at[rows, slots].set(new.astype(cache.dtype), mode="drop")


def ctx_num_valid(ctx, batch: int, n: int) -> jax.Array:
  """``int32[B]`` committed entries per row of a drafting ctx of width n (right-aligned; default: all n)."""
  if "num_valid" not in ctx:
    return jnp.full((batch,), n, jnp.int32)
  return jnp.clip(jnp.asarray(ctx["num_valid"], jnp.int32).reshape(batch), 0, n)


def check_cache_room(length: jax.Array, n: int, max_len: int) -> None:
  """Raise if committing n more slots overflows a ``max_len`` cache (only checkable outside jit)."""
  if isinstance(length, jax.core.Tracer):
    return
  need = int(np.max(np.asarray(length))) + n
  if need > max_len:
    raise ValueError(f"cache: committing {n} positions needs {need} slots > max_len={max_len} "
                     f"(build the cache with init_cache(batch_size, max_len) large enough)")


# ---------------------------------------------------------------- shared drafting helpers

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def parse_dtype(name: str) -> Any:
  """'float32' | 'bfloat16' -> jnp dtype (the compute dtype; parameters stay float32)."""
  if name not in _DTYPES:
    raise ValueError(f"dtype={name!r}: expected one of {sorted(_DTYPES)}")
  return _DTYPES[name]


def check_draft_vocab(draft_vocab, vocab_size: int, draft_vocab_size: int = 0) -> np.ndarray | None:
  """Validate a draft vocabulary (target ids, strictly ascending) against V and the configured Vd.

  Args:
    draft_vocab: int ``[Vd]`` target ids in ``[0, V)``, or None (Vd = V).
    vocab_size: target vocabulary size V.
    draft_vocab_size: configured Vd (0 = "V, or len(draft_vocab)").
  Returns:
    ``int32[Vd]`` numpy array, or None for the full vocabulary.
  """
  if draft_vocab is None:
    if draft_vocab_size not in (0, vocab_size):
      raise ValueError(f"draft_vocab_size={draft_vocab_size} but draft_vocab is None: a truncated draft "
                       f"vocabulary needs its token ids (lkjax/data/vocab.py); use 0 for Vd = V = {vocab_size}")
    return None
  ids = np.asarray(draft_vocab)
  if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"draft_vocab: expected a non-empty 1-D int array of target ids, got dtype {ids.dtype} "
                     f"shape {ids.shape}")
  if draft_vocab_size not in (0, ids.size):
    raise ValueError(f"draft_vocab_size={draft_vocab_size} does not match len(draft_vocab)={ids.size}")
  if ids[0] < 0 or ids[-1] >= vocab_size or np.any(np.diff(ids) <= 0):
    raise ValueError(f"draft_vocab: ids must be strictly ascending target ids in [0, {vocab_size})")
  return ids.astype(np.int32)


def _row_keys(rng: jax.Array) -> bool:
  """True for one key per batch row (typed keys ``[B]`` or raw ``uint32[B, 2]``), False for one key."""
  typed = jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
  return rng.ndim == (1 if typed else 2)


def split_keys(rng: jax.Array | None, num: int) -> list:
  """``num`` keys for drafting steps: of one key, or per row of row keys (each step then gets ``[B]`` keys).

  Row keys give every batch row its own stream: row b's draws equal those of a batch-1 call with key
  ``rng[b]`` (batched speculative evaluation, docs/design.md#evaluation).
  """
  if rng is None:
    return [None] * num
  if _row_keys(rng):
    keys = jax.vmap(lambda k: jax.random.split(k, num))(rng)                      # [B, num]
    return [keys[:, i] for i in range(num)]
  return list(jax.random.split(rng, num))


def sample_tokens(logits: jax.Array, temperature: float, rng: jax.Array | None) -> jax.Array:
  """One draft id per row of ``logits [B, Vd]``: argmax at T <= 0, else a sample of softmax(logits / T).

  ``rng``: one key, or one key per row (`split_keys`), which samples row b as a batch-1 call with ``rng[b]``.
  """
  if temperature <= 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if rng is None:
    raise ValueError(f"temperature={temperature} > 0 samples the draft token: pass rng")
  z = logits.astype(jnp.float32) / temperature
  if _row_keys(rng):
    return jax.vmap(lambda k, row: jax.random.categorical(k, row[None], axis=-1)[0])(rng, z).astype(jnp.int32)
  return jax.random.categorical(rng, z, axis=-1).astype(jnp.int32)


def draft_to_target(draft_vocab: Frozen | None, ids: jax.Array) -> jax.Array:
  """Draft ids -> target ids (``draft_vocab[i]``; identity when Vd = V)."""
  if draft_vocab is None:
    return ids.astype(jnp.int32)
  return jnp.take(draft_vocab[...], ids, axis=0).astype(jnp.int32)


def check_target_weights(target_weights, vocab_size: int, hidden_size: int,
                         names: tuple[str, ...]) -> dict[str, np.ndarray] | None:
  """Check ``target_weights`` holds float arrays ``embed_tokens/lm_head [V, Ht]``, ``norm [Ht]`` for ``names``."""
  if target_weights is None:
    return None
  shapes = {"embed_tokens": (vocab_size, hidden_size), "lm_head": (vocab_size, hidden_size),
            "norm": (hidden_size,)}
  out = {}
  for name in names:
    if name not in target_weights:
      raise ValueError(f"target_weights: missing {name!r} (have {sorted(target_weights)})")
    w = np.asarray(target_weights[name], np.float32)
    if w.shape != shapes[name]:
      raise ValueError(f"target_weights[{name!r}]: expected shape {shapes[name]}, got {w.shape}")
    out[name] = w
  return out
