"""Vocabulary-chunked per-token acceptance rate and KL with a hand-written VJP (memory-efficient).

Same quantities as the reference in `lkjax.losses` (see its docstring for notation), per token:
``alpha = sum_v min(p_v, q_v)`` and ``KL = sum_v p~_v (log p~_v - log q_v)``, but the vocabulary axis
is walked in chunks of ``chunk_size`` columns so that no ``[..., V]`` float32 probability array is
ever materialised: every pass holds one ``[..., chunk_size]`` slice per operand.

Forward (per row ``[...]``):
  pass 1  online logsumexp over draft chunks of ``z`` (-> lse_q) and of the draft columns of ``y``
          (-> lse~, the renormaliser of p~); with a truncated vocabulary and no ``target_lse`` a second
          online pass over the FULL target vocabulary gives ``lse`` (the true normaliser of p).
  pass 2  alpha += sum min(p, q);  KL += sum p~ (log p~ - log q);  E_q[g] += sum q g, where
          ``g_v = 1[q_v < p_v] + 0.5 * 1[q_v == p_v]`` = d min(p_v, q_v) / d q_v (jnp.minimum's tie rule).
Residuals are the inputs themselves plus four ``[...]`` row statistics (lse_q, lse~, lse, E_q[g]).

Backward (one more pass over draft chunks, writing each chunk of the cotangent in place):
  dz = c_kl (q - p~) + c_alpha q (g - E_q[g])
from ``dKL/dz = q - p~`` and ``dalpha/dz_j = sum_v g_v q_v (delta_vj - q_j) = q_j (g_j - E_q[g])``.
The target is a constant (no cotangent).  ``grad_alpha=False`` / ``grad_kl=False`` drop a term from the
backward pass: the caller promises that output's gradient is not needed (it is treated as zero).

The last chunk of a vocabulary that ``chunk_size`` does not divide is taken as the final ``chunk_size``
columns (overlapping its predecessor); the overlap is masked out of every sum and rewritten with the
same values in the backward pass, so no padded copy of the logits is ever made.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lkjax.sharding import cotangent_like

DEFAULT_CHUNK_SIZE = 8192


class _Static(NamedTuple):
  chunk: int        # columns per chunk (<= Vd)
  # "identity" (Vd == V), "gather" (draft_vocab into [..., V]), "restricted" (target_lse),
  # "probs" (a precomputed `TargetProbs`: y is (log p~, p~), the lse argument is the p / p~ ratio)
  mode: str
  grad_alpha: bool
  grad_kl: bool


def _num_chunks(n: int, cs: int) -> int:
  return -(-n // cs)


def _chunk_loop(n: int, body, init):
  """``fori_loop(0, n, body, init)``; a single chunk is traced inline instead (no while loop), which
  lets XLA fuse the chunk's elementwise work with its producers (e.g. the cast of the logits)."""
  if n == 1:
    return body(jnp.int32(0), init)
  return jax.lax.fori_loop(0, n, body, init)


def _window(i, n: int, cs: int):
  """Start of chunk ``i`` (clamped so the window fits) and which of its columns are new."""
  start = jnp.minimum(i * cs, n - cs)
  valid = (start + jnp.arange(cs)) >= i * cs
  return start, valid


def _cols(x, start, cs: int):
  return jax.lax.dynamic_slice_in_dim(x, start, cs, axis=x.ndim - 1)


def _target_cols(y, dv, start, cs: int, mode: str):
  """Target logits of draft columns ``[start, start+cs)`` -> ``[..., cs]`` (native dtype); in "probs" mode
  the ``(log p~, p~)`` columns."""
  if mode == "probs":
    return tuple(_cols(a, start, cs) for a in y)
  if mode == "gather":
    ids = jax.lax.dynamic_slice_in_dim(dv, start, cs)
    return jnp.take(y, ids, axis=-1, mode="clip")
  return _cols(y, start, cs)


def _lse_update(m, s, x):
  """Online logsumexp: fold chunk ``x [..., c]`` (invalid columns = -inf) into running (max, sum)."""
  m_new = jnp.maximum(m, jnp.max(x, axis=-1))
  shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)   # all -inf so far: any finite shift works
  s = s * jnp.exp(m - shift) + jnp.sum(jnp.exp(x - shift[..., None]), axis=-1)
  return m_new, s


def _lse_finish(m, s):
  # An empty (all -inf) row gets lse 0 so that y - lse stays -inf (p = 0), never NaN.
  return jnp.where(s > 0, jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(jnp.where(s > 0, s, 1.0)), 0.0)


def _online_lse(x, n: int, cs: int, get):
  """logsumexp over ``n`` columns fetched by ``get(start) -> [..., cs]`` (f32) -> ``[...]``."""
  lead = x.shape[:-1]

  def body(i, carry):
    start, valid = _window(i, n, cs)
    return _lse_update(*carry, jnp.where(valid, get(start), -jnp.inf))

  init = (jnp.full(lead, -jnp.inf, jnp.float32), jnp.zeros(lead, jnp.float32))
  return _lse_finish(*_chunk_loop(_num_chunks(n, cs), body, init))


def _chunk_probs(zc, yc, lse_q, lse_t, lse_p, mode):
  """Per-chunk f32 (log q, q, log p~, p~, p) from raw logits chunks.

  ``p = p~ * exp(lse~ - lse)`` (a per-row factor <= 1: the draft columns are a subset of the target
  vocabulary), which saves one exponential per element over ``exp(y - lse)``.
  """
  log_q = zc.astype(jnp.float32) - lse_q[..., None]
  if mode == "probs":   # precomputed target side; lse_p holds the p / p~ ratio
    log_pt, pt = yc
    return log_q, jnp.exp(log_q), log_pt, pt, pt * lse_p[..., None]
  yc = yc.astype(jnp.float32)
  log_pt = yc - lse_t[..., None]
  pt = jnp.exp(log_pt)
  p = pt if mode == "identity" else pt * jnp.exp(jnp.minimum(lse_t - lse_p, 0.0))[..., None]
  return log_q, jnp.exp(log_q), log_pt, pt, p


def _row_sums(*xs):
  """Sums over the last axis of same-shape f32 arrays as ONE variadic reduce: a single pass that computes
  its inputs on the fly.  (XLA's CPU backend hands single-operand sums to YNNPACK reduce fusions, which
  first write each input out: three ``[..., chunk]`` arrays written and read again per chunk.)"""
  zero = jnp.zeros((), jnp.float32)
  return jax.lax.reduce(xs, (zero,) * len(xs), lambda a, b: tuple(u + v for u, v in zip(a, b)), (xs[0].ndim - 1,))


def _min_grad(q, p):
  """``g = d min(p, q) / dq`` = 1, 1/2, 0 for q < p, q == p, q > p (jnp.minimum's tie rule)."""
  return jnp.where(q < p, 1.0, jnp.where(q == p, 0.5, 0.0))


def _forward(st: _Static, z, y, dv, lse_given):
  vd, cs = z.shape[-1], st.chunk
  lead = z.shape[:-1]
  f32 = jnp.float32

  def pass1(i, carry):
    mz, sz, mt, s_t = carry
    start, valid = _window(i, vd, cs)
    zc = jnp.where(valid, _cols(z, start, cs).astype(f32), -jnp.inf)
    if st.mode == "probs":   # the target side is precomputed: only the draft's lse
      return _lse_update(mz, sz, zc) + (mt, s_t)
    yc = jnp.where(valid, _target_cols(y, dv, start, cs, st.mode).astype(f32), -jnp.inf)
    return _lse_update(mz, sz, zc) + _lse_update(mt, s_t, yc)

  neg = jnp.full(lead, -jnp.inf, f32)
  zero = jnp.zeros(lead, f32)
  mz, sz, mt, s_t = _chunk_loop(_num_chunks(vd, cs), pass1, (neg, zero, neg, zero))
  lse_q, lse_t = _lse_finish(mz, sz), _lse_finish(mt, s_t)
  if st.mode == "probs":
    lse_p = lse_given.astype(f32)
  elif st.mode == "identity":
    lse_p = lse_t
  elif st.mode == "restricted":
    lse_p = jnp.where(jnp.isfinite(lse_given), lse_given.astype(f32), 0.0)
  else:
    v = y.shape[-1]
    cv = min(cs, v)
    lse_p = _online_lse(y, v, cv, lambda start: _cols(y, start, cv).astype(f32))

  def pass2(i, carry):
    alpha, kl, eg = carry
    start, valid = _window(i, vd, cs)
    log_q, q, log_pt, pt, p = _chunk_probs(_cols(z, start, cs), _target_cols(y, dv, start, cs, st.mode),
                                           lse_q, lse_t, lse_p, st.mode)
    keep = valid & (pt > 0)    # p~ = 0 columns (-inf target logits) contribute 0 to KL
    # q g is written as a select of q (the same bits as q * _min_grad(q, p)): with the backward's
    # _min_grad expression, XLA shared g between this reduce and the backward and wrote it out as a
    # float32 [..., chunk] array per head.
    d_alpha, d_kl, d_eg = _row_sums(jnp.where(valid, jnp.minimum(p, q), 0.0),
                                    jnp.where(keep, pt * (jnp.where(keep, log_pt, 0.0) - log_q), 0.0),
                                    jnp.where(valid & (q <= p), jnp.where(q < p, q, 0.5 * q), 0.0))
    return alpha + d_alpha, kl + d_kl, eg + d_eg

  alpha, kl, eg = _chunk_loop(_num_chunks(vd, cs), pass2, (zero, zero, zero))
  return (alpha, kl), (lse_q, lse_t, lse_p, eg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _alpha_kl(st: _Static, z, y, dv, lse_given):
  return _forward(st, z, y, dv, lse_given)[0]


def _alpha_kl_fwd(st, z, y, dv, lse_given):
  out, stats = _forward(st, z, y, dv, lse_given)
  return out, (z, y, dv, stats)


def _alpha_kl_bwd(st, res, cts):
  z, y, dv, (lse_q, lse_t, lse_p, eg) = res
  c_alpha, c_kl = (c.astype(jnp.float32) for c in cts)
  vd, cs = z.shape[-1], st.chunk

  def body(i, dz):
    start, _ = _window(i, vd, cs)
    _, q, _, pt, p = _chunk_probs(_cols(z, start, cs), _target_cols(y, dv, start, cs, st.mode),
                                  lse_q, lse_t, lse_p, st.mode)
    d = jnp.zeros_like(q)
    if st.grad_kl:
      d = d + c_kl[..., None] * (q - pt)
    if st.grad_alpha:
      d = d + c_alpha[..., None] * q * (_min_grad(q, p) - eg[..., None])
    # Overlapping columns of the last chunk are rewritten with identical values.
    return jax.lax.dynamic_update_slice_in_dim(dz, d.astype(z.dtype), start, axis=z.ndim - 1)

  dz = _chunk_loop(_num_chunks(vd, cs), body, jnp.zeros_like(z))
  return cotangent_like(dz, z), None, None, None


_alpha_kl.defvjp(_alpha_kl_fwd, _alpha_kl_bwd)


def token_alpha_kl(draft_logits: jax.Array, target_logits: jax.Array, *, draft_vocab: jax.Array | None = None,
                   target_lse: jax.Array | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                   grad_alpha: bool = True, grad_kl: bool = True) -> tuple[jax.Array, jax.Array]:
  """Per-token ``(alpha, kl)``, each float32 ``[...]``, computed chunk by chunk over the vocabulary.

  Args:
    draft_logits: ``[..., Vd]`` (any float dtype; the cotangent has the same dtype).
    target_logits: ``[..., V]``; or ``[..., Vd]`` (draft-vocabulary columns) when ``target_lse`` is given.
    draft_vocab: int ``[Vd]`` target ids of the draft columns, None = identity (``Vd == V``).
    target_lse: ``[...]`` logsumexp of the full-vocabulary target logits (already broadcast).
    chunk_size: draft columns per chunk (clamped to Vd).
    grad_alpha, grad_kl: whether the backward pass computes that output's gradient (else it is zero).

  Argument checking is the caller's (`lkjax.losses.lk_loss`); only shapes are asserted here.
  """
  vd = draft_logits.shape[-1]
  if target_logits.shape[:-1] != draft_logits.shape[:-1]:
    raise ValueError(f"target_logits shape {target_logits.shape} does not match draft_logits {draft_logits.shape}")
  if target_lse is not None:
    mode = "restricted"
    if target_logits.shape[-1] != vd or target_lse.shape != draft_logits.shape[:-1]:
      raise ValueError(f"target_lse shape {target_lse.shape} / target_logits {target_logits.shape}: expected "
                       f"{draft_logits.shape[:-1]} and [..., {vd}]")
    draft_vocab = None
  elif draft_vocab is None:
    mode = "identity"
    if target_logits.shape[-1] != vd:
      raise ValueError(f"draft_vocab is None but target vocabulary {target_logits.shape[-1]} != {vd}")
  else:
    mode = "gather"
    draft_vocab = jnp.asarray(draft_vocab, jnp.int32)
    if draft_vocab.shape != (vd,):
      raise ValueError(f"draft_vocab shape {draft_vocab.shape}: expected [{vd}]")
  if int(chunk_size) < 1:
    raise ValueError(f"chunk_size={chunk_size}: must be >= 1")
  st = _Static(min(int(chunk_size), vd), mode, bool(grad_alpha), bool(grad_kl))
  y = jax.lax.stop_gradient(target_logits)
  lse = None if target_lse is None else jax.lax.stop_gradient(target_lse)
  return _alpha_kl(st, draft_logits, y, draft_vocab, lse)


class TargetProbs(NamedTuple):
  """The target side of the per-token terms, computed once and shared by every draft head (`target_probs`).

  ``log_pt`` / ``pt``: float32 ``[..., Vd]`` log p~ and p~ (the target renormalised over the draft
  vocabulary; -inf / 0 where the target logit is -inf); ``ratio``: float32 ``[...]`` p / p~ =
  exp(min(lse~ - lse, 0)) <= 1, so the TRUE target probability is ``p = pt * ratio``.
  """

  log_pt: jax.Array
  pt: jax.Array
  ratio: jax.Array


def target_probs(target_logits: jax.Array, target_lse: jax.Array) -> TargetProbs:
  """`TargetProbs` from draft-vocabulary target logits ``[..., Vd]`` and the full-vocabulary lse ``[...]``.

  Heads that compare with the same target positions (`lkjax.train.step.per_head_loss`) then skip the
  target's logsumexp and one exponential per element in every pass of `token_alpha_kl_probs`; the values
  are those `token_alpha_kl` computes from ``(target_logits, target_lse)`` with one vocabulary chunk.
  """
  if target_lse.shape != target_logits.shape[:-1]:
    raise ValueError(f"target_lse shape {target_lse.shape} != target_logits leading shape {target_logits.shape[:-1]}")
  f32 = jnp.float32
  y = jax.lax.stop_gradient(target_logits).astype(f32)
  lead = y.shape[:-1]
  lse_t = _lse_finish(*_lse_update(jnp.full(lead, -jnp.inf, f32), jnp.zeros(lead, f32), y))
  lse_given = jax.lax.stop_gradient(target_lse)
  lse_p = jnp.where(jnp.isfinite(lse_given), lse_given.astype(f32), 0.0)
  log_pt = y - lse_t[..., None]
  return TargetProbs(log_pt, jnp.exp(log_pt), jnp.exp(jnp.minimum(lse_t - lse_p, 0.0)))


def token_alpha_kl_probs(draft_logits: jax.Array, probs: TargetProbs, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                         grad_alpha: bool = True, grad_kl: bool = True) -> tuple[jax.Array, jax.Array]:
  """`token_alpha_kl` against a precomputed `TargetProbs` (arguments otherwise as there)."""
  vd = draft_logits.shape[-1]
  if probs.log_pt.shape != draft_logits.shape or probs.pt.shape != draft_logits.shape:
    raise ValueError(f"TargetProbs shapes {probs.log_pt.shape} / {probs.pt.shape} != draft_logits {draft_logits.shape}")
  if probs.ratio.shape != draft_logits.shape[:-1]:
    raise ValueError(f"TargetProbs.ratio shape {probs.ratio.shape}: expected {draft_logits.shape[:-1]}")
  if int(chunk_size) < 1:
    raise ValueError(f"chunk_size={chunk_size}: must be >= 1")
  st = _Static(min(int(chunk_size), vd), "probs", bool(grad_alpha), bool(grad_kl))
  y = (jax.lax.stop_gradient(probs.log_pt), jax.lax.stop_gradient(probs.pt))
  return _alpha_kl(st, draft_logits, y, None, jax.lax.stop_gradient(probs.ratio))
