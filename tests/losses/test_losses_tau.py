"""The chain objectives of lkjax.losses (docs/design.md#objectives-on-the-draft-chain): ``lk_tau`` and reach
head weights, against float64 numpy oracles, central finite differences, hand examples, the chunked path,
the 8-device mesh and the per-head trainer path."""
from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lkjax import losses
from test_losses import np_terms, rand_case

RNG = np.random.default_rng(2027)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PER_HEAD_KINDS = ("kl", "tv", "lk_alpha", "lk_hybrid", "fixed_lambda")


# ---------------------------------------------------------------------------------------------- oracles


def np_tau_loss(alpha, mask):
  """float64 L_tau from per-token alpha [K, B, T] (anchor layout), written as the definition reads: walk
  each anchor's chain head by head, stopping at its first masked head."""
  k_heads, b, t = alpha.shape
  total, anchors, taus = 0.0, 0, []
  for i in range(b):
    for j in range(t):
      if not mask[0, i, j]:
        continue
      tau, prod = 1.0, 1.0
      for k in range(k_heads):
        if not mask[k, i, j]:
          break
        prod *= alpha[k, i, j]
        tau += prod
      total += -math.log(tau)
      anchors += 1
      taus.append(tau)
  return total / max(anchors, 1), (float(np.mean(taus)) if taus else 1.0)


def np_reach(alpha, mask):
  """float64 reach weights from the per-head masked means of alpha."""
  k_heads = alpha.shape[0]
  m = np.asarray(mask, bool).reshape(k_heads, -1)
  a_bar = np.where(m, alpha.reshape(k_heads, -1), 0).sum(1) / np.maximum(m.sum(1), 1)
  r = np.concatenate([[1.0], np.cumprod(a_bar[:-1])])
  return r / r.sum(), a_bar


def np_head_losses(z, y, mask, kind, lam=0.3, eta=3.0, held_lambda=None):
  """float64 per-head losses [K] and their analytic gradients [K, B, T, V] w.r.t. z (per head, unweighted);
  also returns lambda [K]. ``held_lambda`` replaces lambda (a constant for finite differences)."""
  t = np_terms(z, y)
  m = np.asarray(mask, bool)
  k_heads = z.shape[0]
  cnt = np.maximum(m.reshape(k_heads, -1).sum(1), 1)
  mean = lambda x: np.where(m, x, 0).reshape(k_heads, -1).sum(1) / cnt  # noqa: E731
  a_bar = mean(t["alpha"])
  lam_k = {"kl": np.ones(k_heads), "tv": np.zeros(k_heads), "lk_alpha": np.zeros(k_heads),
           "lk_hybrid": np.exp(-eta * a_bar), "fixed_lambda": np.full(k_heads, lam)}[kind]
  if held_lambda is not None:
    lam_k = held_lambda
  if kind == "lk_alpha":
    head, g = mean(t["neg_log_alpha"]), t["g_alpha"]
  else:
    head = lam_k * mean(t["kl"]) + (1 - lam_k) * mean(t["tv"])
    g = lam_k[:, None, None, None] * t["g_kl"] + (1 - lam_k)[:, None, None, None] * t["g_tv"]
  return head, g * (np.where(m, 1.0, 0.0) / cnt[:, None, None])[..., None], lam_k


def central_diff(f, x, h=1e-6):
  """float64 central finite differences of scalar f at every entry of x."""
  x = np.asarray(x, np.float64)
  g = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    e = np.zeros_like(x)
    e[idx] = h
    g[idx] = (f(x + e) - f(x - e)) / (2 * h)
  return g


def value_grad(z, y, mask, kind, **kw):
  f = lambda a: losses.lk_loss(a, y, mask, kind, **kw)  # noqa: E731
  (loss, m), g = jax.jit(jax.value_and_grad(f, has_aux=True))(jnp.asarray(z))
  return float(loss), jax.tree.map(np.asarray, m), np.asarray(g)


def chain_mask(k, b, t):
  """A realistic [K, B, T] mask: reply spans with ends, so chains get truncated (head k at t trains x[t+k+2])."""
  tok = RNG.random((b, t)) > 0.25
  out = np.zeros((k, b, t), bool)
  for kk in range(k):                                          # False where x[t+k+2] is past the end
    out[kk, :, :max(t - kk - 2, 0)] = tok[:, kk + 2:]
  return out


# ---------------------------------------------------------------------------------------------- lk_tau


def test_hand_example():
  """Two heads, alpha (0.5, 0.4) at one anchor: tau = 1 + 0.5 + 0.2 = 1.7; head 1 masked: tau = 1.5."""
  y = np.log(np.array([0.5, 0.5, 1e-30]))
  # q = (1, 0, 0) against p = (.5, .5, 0): alpha = .5; q = (.4, 0, .6): alpha = .4
  z = np.log(np.array([[[[1.0, 1e-30, 1e-30]]], [[[0.4, 1e-30, 0.6]]]])).astype(np.float32)
  yy = np.broadcast_to(y, z.shape).astype(np.float32)
  mask = np.ones((2, 1, 1), bool)
  loss, m, _ = value_grad(z, yy, mask, "lk_tau")
  np.testing.assert_allclose(m["alpha"], [0.5, 0.4], rtol=1e-5)
  np.testing.assert_allclose(loss, -math.log(1.7), rtol=1e-5)
  np.testing.assert_allclose(m["tau_chain"], 1.7, rtol=1e-5)
  np.testing.assert_allclose(m["head_loss"], [-math.log(1.5), -math.log(1.7 / 1.5)], rtol=1e-5)
  np.testing.assert_allclose(m["head_weight"], [1.0, 1.0])
  np.testing.assert_allclose(m["lambda"], [0.0, 0.0])
  mask[1] = False
  loss, m, g = value_grad(z, yy, mask, "lk_tau")
  np.testing.assert_allclose(loss, -math.log(1.5), rtol=1e-5)
  assert np.all(g[1] == 0)


@pytest.mark.parametrize("truncated", [False, True])
def test_lk_tau_value_and_gradient_equal_float64_finite_differences(truncated):
  """L_tau and its gradient against an independent float64 numpy reading of the definition, the gradient by
  central finite differences of that reading (never through JAX)."""
  k, b, t, vd = 3, 2, 4, 6
  z, y, dv = rand_case((k, b, t), vd, 11 if truncated else None)
  mask = chain_mask(k, b, t)
  assert mask[0].any() and (mask[0] & ~mask[-1]).any()       # some chains are truncated
  # TRUE target log-probabilities over the draft vocabulary (they sum to < 1 when truncated).
  y_np = (y if dv is None else y[..., dv]) - np_lse64(y)[..., None]

  def oracle(z64):
    return np_tau_loss(np_alpha_true(z64, y_np), mask)[0]

  loss, m, g = value_grad(z, y, mask, "lk_tau", draft_vocab=dv)
  want, tau_chain = np_tau_loss(np_alpha_true(z, y_np), mask)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(m["loss"], want, rtol=1e-5)
  np.testing.assert_allclose(m["tau_chain"], tau_chain, rtol=1e-5)
  np.testing.assert_allclose(m["head_loss"].sum(), want, rtol=1e-4)
  fd = central_diff(oracle, z)
  np.testing.assert_allclose(g, fd, rtol=2e-3, atol=2e-6)
  assert np.abs(fd).max() > 1e-3


def np_lse64(x):
  x = np.asarray(x, np.float64)
  mx = x.max(-1, keepdims=True)
  return (mx + np.log(np.exp(x - mx).sum(-1, keepdims=True)))[..., 0]


def np_alpha_true(z, log_p):
  """float64 alpha = sum_v min(p_v, q_v) from the TRUE target log-probabilities ``log_p`` over the draft vocabulary."""
  z = np.asarray(z, np.float64)
  q = np.exp(z - np_lse64(z)[..., None])
  return np.minimum(np.exp(np.asarray(log_p, np.float64)), q).sum(-1)


def test_lk_tau_gradient_is_reach_times_tail_over_tau():
  """docs/design.md: d(-log tau)/dz_j = (R_j T_j / tau) dTV/dz_j per token (all heads unmasked)."""
  k, b, t, v = 4, 2, 3, 9
  z, y, _ = rand_case((k, b, t), v, scale=1.0)
  z[:, 0] = y[:, 0] + 0.3 * RNG.normal(size=(k, t, v))     # high-acceptance rows: long chains matter
  mask = np.ones((k, b, t), bool)
  tt = np_terms(z, y)
  a = tt["alpha"]
  tau = 1 + np.cumprod(a, 0).sum(0)
  coef = np.zeros_like(a)
  for j in range(k):
    reach = np.prod(a[:j], 0)
    tail = 1 + sum(np.prod(a[j + 1:i + 1], 0) for i in range(j + 1, k))
    coef[j] = reach * tail / tau
  want = coef[..., None] * tt["g_tv"] / (b * t)
  _, _, g = value_grad(z, y, mask, "lk_tau")
  np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-9)
  # At K = 1 the loss is -log(1 + alpha): TV's gradient / (1 + alpha) -- TV's scaling at init.
  _, _, g1 = value_grad(z[:1], y[:1], mask[:1], "lk_tau")
  np.testing.assert_allclose(g1, tt["g_tv"][:1] / (1 + a[:1])[..., None] / (b * t), rtol=1e-4, atol=1e-9)


def test_aligned_target_layout_equals_anchor_layout():
  """lk_objective on per-token terms in the per-head trainer's layout (head k shifted right by k+1 along
  time) gives the anchor layout's loss, metrics and gradient."""
  k, b, t = 3, 2, 9
  alpha = jnp.asarray(RNG.random((k, b, t)), jnp.float32)
  kl = jnp.asarray(RNG.random((k, b, t)), jnp.float32)
  mask = chain_mask(k, b, t)

  def shift(x, fill):
    x = np.asarray(x)
    out = np.full_like(x, fill)
    for kk in range(k):
      out[kk, :, kk + 1:] = x[kk, :, :t - kk - 1]
    return out

  def f(a, aligned, m, kind, **kw):
    return losses.lk_objective(a, kl if aligned == "anchor" else jnp.asarray(shift(kl, 0.0)), m, kind,
                               aligned=aligned, **kw)

  for kind, kw in (("lk_tau", {}), ("lk_hybrid", dict(head_weighting="reach"))):
    (l0, m0), g0 = jax.value_and_grad(lambda a: f(a, "anchor", mask, kind, **kw), has_aux=True)(alpha)
    shifted = jnp.asarray(shift(alpha, 0.0))
    (l1, m1), g1 = jax.value_and_grad(lambda a: f(a, "target", shift(mask, False), kind, **kw), has_aux=True)(shifted)
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6, err_msg=kind)
    for key in m0:
      np.testing.assert_allclose(np.asarray(m1[key]), np.asarray(m0[key]), rtol=1e-6, err_msg=f"{kind} {key}")
    np.testing.assert_allclose(shift(np.asarray(g0), 0.0), np.asarray(g1), rtol=1e-6, atol=1e-9, err_msg=kind)
  # Read in the wrong layout the chain is a different one.
  l_wrong = losses.lk_objective(jnp.asarray(shift(alpha, 0.0)), kl, shift(mask, False), "lk_tau")[0]
  assert abs(float(l_wrong) - float(l0)) > 1e-3


# ---------------------------------------------------------------------------------------------- reach weighting


def test_reach_weights_values():
  np.testing.assert_allclose(np.asarray(losses.reach_weights(jnp.array([0.5, 0.4, 0.9]))),
                             np.array([1, 0.5, 0.2]) / 1.7, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(losses.reach_weights(jnp.array([0.0, 0.7]))), [1.0, 0.0])
  np.testing.assert_allclose(np.asarray(losses.reach_weights(jnp.array([0.3]))), [1.0])
  assert jax.grad(lambda a: jnp.sum(losses.reach_weights(a) * jnp.arange(3.0)))(jnp.array([.5, .5, .5])).sum() == 0


@pytest.mark.parametrize("kind", PER_HEAD_KINDS)
def test_reach_weighting_equals_float64_oracle_with_held_weights(kind):
  """Every per-head kind: loss = sum_k w_k L_k with w from float64 alpha_bar; the gradient treats w as a
  constant: it equals (a) the analytic per-head gradients weighted by w and (b) central finite differences of
  the float64 loss with w held at its value -- and differs from differentiating through w."""
  k, b, t, v = 3, 2, 3, 5
  z, y, _ = rand_case((k, b, t), v, scale=1.5)
  mask = chain_mask(k, b, t)
  extra = dict(lam=0.3) if kind == "fixed_lambda" else {}
  loss, m, g = value_grad(z, y, mask, kind, head_weighting="reach", **extra)
  w, a_bar = np_reach(np_terms(z, y)["alpha"], mask)
  head, gh, lam_k = np_head_losses(z, y, mask, kind)
  np.testing.assert_allclose(m["head_weight"], w, rtol=1e-5)
  np.testing.assert_allclose(m["alpha"], a_bar, rtol=1e-5)
  np.testing.assert_allclose(loss, (w * head).sum(), rtol=1e-5)
  np.testing.assert_allclose(g, gh * w[:, None, None, None], rtol=1e-4, atol=1e-8)

  def held(z64, weights):   # lambda (lk_hybrid's is a stop-gradient too) held at its value
    hd = np_head_losses(z64, y, mask, kind, held_lambda=lam_k)[0]
    return float((weights * hd).sum())

  fd = central_diff(lambda z64: held(z64, w), z)
  np.testing.assert_allclose(g, fd, rtol=2e-3, atol=2e-6)
  through = central_diff(lambda z64: held(z64, np_reach(np_terms(z64, y)["alpha"], mask)[0]), z)
  assert np.abs(through - fd).max() > 1e-2 * np.abs(fd).max(), kind


def test_reach_differs_from_gamma_and_follows_acceptance():
  z, y, _ = rand_case((3, 2, 4), 8)
  mask = np.ones((3, 2, 4), bool)
  l_g, m_g, _ = value_grad(z, y, mask, "lk_hybrid")
  l_r, m_r, _ = value_grad(z, y, mask, "lk_hybrid", head_weighting="reach")
  np.testing.assert_allclose(m_g["head_weight"], np.asarray(losses.head_weights(3, 0.8)), rtol=1e-6)
  np.testing.assert_allclose(m_r["head_loss"], m_g["head_loss"], rtol=1e-6)    # same per-head losses
  assert abs(l_g - l_r) > 1e-4
  a = m_r["alpha"]
  np.testing.assert_allclose(m_r["head_weight"], np.array([1, a[0], a[0] * a[1]]) / (1 + a[0] + a[0] * a[1]),
                             rtol=1e-5)


# ---------------------------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("chunk_size", [None, 7])
def test_no_nan_at_zero_alpha_masked_rows_and_bf16(chunk_size):
  """alpha = 0 at the head of a chain (the whole chain 0), -inf target logits, an all -inf target row, a
  fully masked head, masked rows with extreme logits: finite values and gradients, zero gradient on
  masked rows, for lk_tau and reach weighting in f32 and bf16."""
  k, b, t, v = 3, 2, 4, 32
  z = RNG.normal(size=(k, b, t, v)).astype(np.float32)
  y = RNG.normal(size=(k, b, t, v)).astype(np.float32)
  y[..., ::3] = -np.inf
  y[0, 0, 0] = -np.inf                       # no target mass: alpha = 0 at head 0 of anchor (0, 0)
  z[0, 1, 0] = -200.0                        # alpha = 0 exactly: q one-hot where p = 0
  z[0, 1, 0, 0] = 0.0
  y[0, 1, 0, 0] = -np.inf
  z[:, 1, 3] = 3e4                           # a masked row of absurd logits
  z[:, 1, 3, ::2] = -3e4
  mask = np.ones((k, b, t), bool)
  mask[:, 1, 3] = False
  mask[1] = False                            # a fully masked head: every chain ends before it
  cases = [("lk_tau", {})] + [(kd, dict(head_weighting="reach")) for kd in ("kl", "tv", "lk_alpha", "lk_hybrid")]

  def run(z_, y_):
    return {kd: jax.value_and_grad(lambda a, kd=kd, kw=kw: losses.lk_loss(a, y_, mask, kd, chunk_size=chunk_size,
                                                                         **kw), has_aux=True)(z_)
            for kd, kw in cases}

  for dtype in (jnp.float32, jnp.bfloat16):
    res = jax.jit(run)(jnp.asarray(z, dtype), jnp.asarray(y, dtype))
    for kd, ((loss, m), g) in res.items():
      g = np.asarray(g, np.float32)
      assert np.isfinite(float(loss)), (kd, dtype)
      assert all(np.all(np.isfinite(np.asarray(x))) for x in m.values()), (kd, dtype)
      assert np.all(np.isfinite(g)), (kd, dtype)
      # masked rows, the masked head and (no chain / no reach past it) head 2 get no gradient
      assert np.all(g[:, 1, 3] == 0) and np.all(g[1] == 0) and np.all(g[2] == 0), (kd, dtype)
      assert np.any(g[0] != 0), (kd, dtype)
      if kd == "lk_tau":
        # alpha_0 = 0 at anchor (1, 0): d alpha/dz = q (g - E_q g) = 0 there.
        assert np.all(g[:, 1, 0] == 0), dtype
        assert float(m["head_loss"][1]) == 0.0 and float(m["head_loss"][2]) == 0.0
      else:
        assert float(m["head_weight"][2]) == 0.0 and float(m["head_weight"][1]) > 0, (kd, dtype)
  alpha = np.asarray(losses.acceptance_rate(z, y))
  assert alpha[0, 1, 0] == 0.0 and alpha[0, 0, 0] == 0.0


def test_fully_masked_batch_is_zero_not_nan():
  z, y, _ = rand_case((2, 2, 3), 6)
  mask = np.zeros((2, 2, 3), bool)
  for kind, kw in (("lk_tau", {}), ("lk_alpha", dict(head_weighting="reach"))):
    loss, m, g = value_grad(z, y, mask, kind, **kw)
    assert loss == 0.0 and np.all(g == 0), kind
    assert m["tau_chain"] == 1.0 and np.all(np.isfinite(m["head_weight"])), kind


# ---------------------------------------------------------------------------------------------- chunked path


@pytest.mark.parametrize("truncated", [False, True])
def test_chunked_equals_reference(truncated):
  z, y, dv = rand_case((3, 2, 5), 40, 90 if truncated else None, scale=3.0)
  mask = chain_mask(3, 2, 5)
  cases = [("lk_tau", {})] + [(kd, dict(head_weighting="reach")) for kd in ("kl", "lk_alpha", "lk_hybrid")]

  def run(z_):
    return {(kd, str(cs)): jax.value_and_grad(
        lambda a, kd=kd, kw=kw, cs=cs: losses.lk_loss(a, y, mask, kd, draft_vocab=dv, chunk_size=cs, **kw),
        has_aux=True)(z_) for kd, kw in cases for cs in (None, 7)}

  res = jax.jit(run)(jnp.asarray(z))
  for kd, _ in cases:
    (l0, m0), g0 = res[kd, "None"]
    (l1, m1), g1 = res[kd, "7"]
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5, atol=1e-7, err_msg=kd)
    for key in m0:
      np.testing.assert_allclose(np.asarray(m1[key]), np.asarray(m0[key]), rtol=1e-5, atol=1e-7, err_msg=f"{kd} {key}")
    g0, g1 = np.asarray(g0, np.float64), np.asarray(g1, np.float64)
    assert np.linalg.norm(g0) > 0
    assert np.linalg.norm(g1 - g0) <= 1e-5 * np.linalg.norm(g0), kd


def test_chunked_lk_tau_memory_equals_lk_alpha_and_stays_below_one_vocabulary_array():
  """Compiled temp memory: chunked lk_tau needs no more than chunked lk_alpha (the chain works on [K, N]
  per-token terms) and less than half a [K, N, V] f32 array; the reference needs several."""
  k, n, v = 2, 64, 16384
  z = jax.ShapeDtypeStruct((k, 1, n, v), jnp.float32)
  mask = jnp.ones((k, 1, n), bool)
  full = k * n * v * 4

  def temp(kind, cs, **kw):
    f = jax.value_and_grad(lambda a, b: losses.lk_loss(a, b, mask, kind, chunk_size=cs, **kw)[0])
    return jax.jit(f).lower(z, z).compile().memory_analysis().temp_size_in_bytes

  t_tau, t_alpha = temp("lk_tau", 1024), temp("lk_alpha", 1024)
  t_reach = temp("lk_hybrid", 1024, head_weighting="reach")
  assert t_tau < 0.5 * full and t_reach < 0.5 * full, (t_tau, t_reach)
  assert t_tau <= t_alpha + 64 * 1024, (t_tau, t_alpha)
  assert temp("lk_tau", None) >= 2 * full


# ---------------------------------------------------------------------------------------------- global batch


def test_sharded_jit_equals_single_device():
  """Batch split over 8 CPU devices under jit: lk_tau and reach-weighted L_lambda equal the unsplit result,
  and the reach weights are those of the GLOBAL alpha_bar (a shard's own would differ)."""
  assert jax.device_count() == 8
  k, b, t, v = 3, 8, 6, 24
  z, y, _ = rand_case((k, b, t), v)
  z[:, :4] = y[:, :4] + 0.05 * RNG.normal(size=(k, 4, t, v))   # half the batch accepts far more
  mask = chain_mask(k, b, t)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  sh = NamedSharding(mesh, P(None, "data"))
  for kind, kw in (("lk_tau", {}), ("lk_hybrid", dict(head_weighting="reach"))):
    for cs in (None, 8):
      f = jax.jit(jax.value_and_grad(lambda a, b_, m_: losses.lk_loss(a, b_, m_, kind, chunk_size=cs, **kw),
                                     has_aux=True))
      (l1, m1), g1 = f(jnp.asarray(z), jnp.asarray(y), jnp.asarray(mask))
      (l8, m8), g8 = f(*(jax.device_put(jnp.asarray(a), sh) for a in (z, y, mask)))
      assert len(g8.sharding.device_set) == 8
      np.testing.assert_allclose(float(l8), float(l1), rtol=1e-6)
      for key in m1:
        np.testing.assert_allclose(np.asarray(m8[key]), np.asarray(m1[key]), rtol=1e-6, err_msg=f"{kind} {key}")
      np.testing.assert_allclose(np.asarray(g8), np.asarray(g1), rtol=1e-5, atol=1e-10)
  w_global = np_reach(np_terms(z, y)["alpha"], mask)[0]
  w_shard0 = np_reach(np_terms(z[:, :1], y[:, :1])["alpha"], mask[:, :1])[0]
  np.testing.assert_allclose(m8["head_weight"], w_global, rtol=1e-5)
  assert np.abs(w_shard0 - w_global).max() > 0.05


def test_shard_map_axis_name_equals_single_device():
  """A per-device program (lk_objective inside shard_map with axis_name) psums every statistic
  (anchors, alpha_bar -> reach weights); the summed per-device gradients equal the unsplit gradient."""
  k, b, t = 3, 8, 7
  alpha = jnp.asarray(RNG.random((k, b, t)) ** 0.5, jnp.float32)
  alpha = alpha.at[:, :4].set(alpha[:, :4] * 0.2)
  kl = jnp.asarray(RNG.random((k, b, t)), jnp.float32)
  mask = jnp.asarray(chain_mask(k, b, t))
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  for kind, kw in (("lk_tau", {}), ("lk_alpha", dict(head_weighting="reach"))):
    def obj(a, l_, m_, axis_name=None, kind=kind, kw=kw):
      return losses.lk_objective(a, l_, m_, kind, axis_name=axis_name, **kw)

    (l1, m1), g1 = jax.value_and_grad(obj, has_aux=True)(alpha, kl, mask)

    def per_device(a, l_, m_):
      (loss, m), g = jax.value_and_grad(lambda x: obj(x, l_, m_, axis_name="data"), has_aux=True)(a)
      return loss, m, g

    spec = P(None, "data")
    l8, m8, g8 = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(spec, spec, spec),
                                       out_specs=(P(), P(), spec)))(alpha, kl, mask)
    np.testing.assert_allclose(float(l8), float(l1), rtol=1e-6, err_msg=kind)
    for key in m1:
      np.testing.assert_allclose(np.asarray(m8[key]), np.asarray(m1[key]), rtol=1e-6, err_msg=f"{kind} {key}")
    np.testing.assert_allclose(np.asarray(g8), np.asarray(g1), rtol=1e-5, atol=1e-10, err_msg=kind)


# ---------------------------------------------------------------------------------------------- trainer path


@pytest.mark.parametrize("arch", ["eagle3", "medusa", "mlp_speculator", "mtp"])
def test_per_head_trainer_path_equals_reference(arch):
  """lkjax.train.step's per-head path (heads lined up by target position, aligned="target") gives the
  reference path's loss, metrics and gradients for lk_tau and reach weighting, on real drafts with packed
  documents and padding (chains cut at document ends)."""
  from test_train_step import add_target_lse, loss_cfg, tiny_draft
  from flax import nnx
  from lkjax.train import step as step_lib
  graphdef, params, rest, target, batch = tiny_draft(arch, 3, 12)
  params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
  step = jnp.asarray(3, jnp.int32)
  for kind, weighting in (("lk_tau", "gamma"), ("lk_hybrid", "reach")):
    lcfg = loss_cfg(kind)
    lcfg.head_weighting = weighting
    kw = step_lib.loss_kwargs(lcfg, total_steps=10)

    def f(impl, b=batch, kind=kind, kw=kw):
      def loss(p):
        return step_lib._forward_loss(graphdef, losses.lk_loss, kind, kw, jnp.float32, p, rest, target, b, step, impl)
      return jax.value_and_grad(loss, has_aux=True)(params)

    (l_ref, m_ref), g_ref = f("reference")
    for b in (batch, add_target_lse(batch, target)):
      (l_new, m_new), g_new = f("per_head", b)
      np.testing.assert_allclose(l_new, l_ref, rtol=1e-5, atol=1e-6, err_msg=kind)
      for key in m_ref:
        np.testing.assert_allclose(m_new[key], m_ref[key], rtol=1e-5, atol=1e-6, err_msg=f"{kind} {key}")
      jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, rtol=2e-4, atol=1e-6), g_new, g_ref)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g_ref)) > 0
    assert float(m_ref["tau_chain"]) > 1.0


# ---------------------------------------------------------------------------------------------- configs


def test_configs_select_both_and_reject_bad_combinations():
  import ml_collections
  from lkjax.config_args import load_config
  from lkjax.train import step as step_lib
  path = os.path.join(ROOT, "configs/eagle3.py")
  c = load_config(path + ":loss=lk_tau")
  assert c.loss.kind == "lk_tau" and c.loss.head_weighting == "gamma"
  assert "head_weighting" not in step_lib.loss_kwargs(c.loss, 10)
  c = load_config(path + ":weighting=reach", {"loss.kind": "lk_alpha"})
  assert step_lib.loss_kwargs(c.loss, 10)["head_weighting"] == "reach"
  with pytest.raises(ValueError, match="weighting"):
    load_config(path + ":loss=lk_tau,weighting=reach")
  with pytest.raises(ValueError, match="weighting"):
    load_config(path + ":weighting=cumulative")
  for bad in (dict(kind="lk_tau", head_weighting="reach"), dict(kind="kl", head_weighting="gamma^k")):
    cfg = ml_collections.ConfigDict(dict(kind=bad["kind"], eta=3.0, lam=0.5, gamma=0.8, chunk_size=0,
                                         head_weighting=bad["head_weighting"]))
    with pytest.raises(ValueError, match="loss.head_weighting"):
      step_lib.loss_kwargs(cfg, 10)
  z, y, _ = rand_case((2, 1, 3), 5)
  mask = np.ones((2, 1, 3), bool)
  with pytest.raises(ValueError, match="head_weighting"):
    losses.lk_loss(z, y, mask, "lk_tau", head_weighting="reach")
  with pytest.raises(ValueError, match="head_weighting"):
    losses.lk_loss(z, y, mask, "kl", head_weighting="uniform")
  with pytest.raises(ValueError, match="aligned"):
    losses.lk_objective(jnp.ones((2, 1, 3)), jnp.ones((2, 1, 3)), mask, "lk_tau", aligned="source")


@pytest.mark.parametrize("arch", ["eagle3", "medusa", "mlp_speculator", "mtp"])
def test_chain_sweep_entries_are_valid_configs(arch):
  from lkjax.config_args import load_config, load_config_module
  path = os.path.join(ROOT, f"configs/{arch}.py")
  module, _ = load_config_module(path)
  runs = []
  module.sweep(lambda **kw: runs.append(kw), "chain")
  assert {(r["loss.kind"], r.get("loss.head_weighting", "gamma")) for r in runs} == {
      ("lk_tau", "gamma"), ("kl", "reach"), ("lk_alpha", "reach"), ("lk_hybrid", "reach")}
  for r in runs:
    c = load_config(path, r)
    assert c.loss.kind == r["loss.kind"]
    assert c.loss.head_weighting == r.get("loss.head_weighting", "gamma")
    if c.loss.kind == "lk_hybrid":
      assert c.loss.eta == load_config(path).loss.eta    # the arch's own eta (10 for MEDUSA)


def test_study_plan_chain_arms_are_valid_configs():
  """experiments/study/plan.py's beyond-the-paper cells name valid (arch, kind, weighting) configs; the
  paper's cells are unchanged."""
  from lkjax.config_args import load_config, load_config_module
  plan_mod, _ = load_config_module(os.path.join(ROOT, "experiments/study/plan.py"))
  plan = plan_mod.get_config()
  assert {tuple(a) for a in plan.chain_arms} == {("eagle3", "lk_tau", "gamma"), ("eagle3", "lk_hybrid", "reach")}
  assert tuple(plan.main_losses) == ("kl", "lk_alpha", "lk_hybrid")
  for arch, kind, weighting in plan.chain_arms:
    c = load_config(plan.arch_configs[arch], {"loss.kind": kind, "loss.head_weighting": weighting,
                                              "loss.eta": float(plan.eta[arch])})
    assert (c.loss.kind, c.loss.head_weighting) == (kind, weighting)
