"""lkjax.losses_chunked: the vocabulary-chunked custom VJP against float64 oracles and the reference."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lkjax import losses, losses_chunked
from test_losses import np_terms, rand_case

RNG = np.random.default_rng(77)


def _case(mode, shape=(2, 3), vd=24, v=53):
  z, y, dv = rand_case(shape, vd, v if mode == "gather" else None)
  if mode != "restricted":
    return z, y, dv, None, (z, y, dv)
  y_full, dv_full = rand_case(shape, vd, v)[1:]
  lse = np.asarray(jax.nn.logsumexp(y_full, axis=-1))
  return z, y_full[..., dv_full], None, lse, (z, y_full, dv_full)


@pytest.mark.parametrize("mode", ["identity", "gather", "restricted"])
def test_values_and_vjp_match_float64(mode):
  """alpha, KL and the VJP ``c_a dalpha/dz + c_k dKL/dz`` for chunk sizes that divide Vd = 24, do not
  divide it (5, 7: overlapping last chunk), equal 1, and exceed Vd."""
  z, y, dv, lse, oracle_args = _case(mode)
  t = np_terms(*oracle_args)
  c_a = RNG.normal(size=z.shape[:-1])
  c_k = RNG.normal(size=z.shape[:-1])
  sizes = (1, 5, 7, 8, 24, 100)

  def run(z_):
    out = {}
    for cs in sizes:
      f = lambda a, cs=cs: losses_chunked.token_alpha_kl(a, y, draft_vocab=dv, target_lse=lse, chunk_size=cs)
      (alpha, kl), vjp = jax.vjp(f, z_)
      out[cs] = (alpha, kl, vjp((jnp.asarray(c_a, jnp.float32), jnp.asarray(c_k, jnp.float32)))[0])
    return out

  want_g = -c_a[..., None] * t["g_tv"] + c_k[..., None] * t["g_kl"]
  for cs, (alpha, kl, g) in jax.jit(run)(jnp.asarray(z)).items():
    np.testing.assert_allclose(np.asarray(alpha), t["alpha"], rtol=1e-5, err_msg=f"alpha cs={cs}")
    np.testing.assert_allclose(np.asarray(kl), t["kl"], rtol=1e-5, atol=1e-7, err_msg=f"kl cs={cs}")
    np.testing.assert_allclose(np.asarray(g), want_g, rtol=1e-4, atol=1e-7, err_msg=f"vjp cs={cs}")


def test_precomputed_target_probs_match_float64_and_token_alpha_kl():
  """`target_probs` + `token_alpha_kl_probs` (the per-head trainer's path): values and VJP against the
  float64 oracle for several chunk sizes; with one chunk, bit-identical to `token_alpha_kl`; -inf target
  logits (p~ = 0) and an all -inf row stay finite."""
  z, y, _, lse, oracle_args = _case("restricted")
  y = y.copy()
  y[0, 1, :5] = -np.inf                      # tokens the target rules out
  y_full = oracle_args[1].copy()
  y_full[0, 1][oracle_args[2][:5]] = -np.inf
  lse = np.asarray(jax.nn.logsumexp(y_full, axis=-1))
  t = np_terms(z, y_full, oracle_args[2])
  c_a, c_k = (jnp.asarray(RNG.normal(size=z.shape[:-1]), jnp.float32) for _ in range(2))
  want_g = -np.asarray(c_a)[..., None] * t["g_tv"] + np.asarray(c_k)[..., None] * t["g_kl"]

  def run(z_):
    probs = losses_chunked.target_probs(jnp.asarray(y), jnp.asarray(lse))
    out = {}
    for cs in (5, 8, 24):
      (alpha, kl), vjp = jax.vjp(lambda a, cs=cs: losses_chunked.token_alpha_kl_probs(a, probs, chunk_size=cs), z_)
      out[f"probs {cs}"] = (alpha, kl, vjp((c_a, c_k))[0])
    (alpha, kl), vjp = jax.vjp(lambda a: losses_chunked.token_alpha_kl(a, jnp.asarray(y), target_lse=jnp.asarray(lse),
                                                                       chunk_size=24), z_)
    out["logits"] = (alpha, kl, vjp((c_a, c_k))[0])
    return out

  res = jax.jit(run)(jnp.asarray(z))
  for cs, (alpha, kl, g) in res.items():
    np.testing.assert_allclose(np.asarray(alpha), t["alpha"], rtol=1e-5, err_msg=f"alpha cs={cs}")
    np.testing.assert_allclose(np.asarray(kl), t["kl"], rtol=1e-5, atol=1e-7, err_msg=f"kl cs={cs}")
    np.testing.assert_allclose(np.asarray(g), want_g, rtol=1e-4, atol=1e-7, err_msg=f"vjp cs={cs}")
  for a, b in zip(res["probs 24"], res["logits"]):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # An all -inf target row: p = p~ = 0, alpha = 0, KL = 0, finite gradient.
  dead = losses_chunked.target_probs(jnp.full((1, 6), -jnp.inf), jnp.full((1,), -jnp.inf))
  alpha, kl = losses_chunked.token_alpha_kl_probs(jnp.zeros((1, 6)), dead)
  assert float(alpha[0]) == 0.0 and float(kl[0]) == 0.0
  g = jax.grad(lambda a: jnp.sum(jnp.stack(losses_chunked.token_alpha_kl_probs(a, dead))))(jnp.zeros((1, 6)))
  assert np.all(np.isfinite(np.asarray(g)))
  with pytest.raises(ValueError, match="TargetProbs shapes"):
    losses_chunked.token_alpha_kl_probs(jnp.zeros((1, 5)), dead)


def test_grad_flags_drop_only_their_term():
  z, y, _ = rand_case((4,), 30)
  t = np_terms(z, y)

  def grads(z_):
    out = {}
    for ga, gk in ((True, False), (False, True)):
      f = lambda a: jnp.sum(jnp.stack(losses_chunked.token_alpha_kl(a, y, chunk_size=8, grad_alpha=ga, grad_kl=gk)))
      out[ga, gk] = jax.grad(f)(z_)
    return out

  g = jax.jit(grads)(jnp.asarray(z))
  np.testing.assert_allclose(np.asarray(g[True, False]), -t["g_tv"], rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(np.asarray(g[False, True]), t["g_kl"], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("truncated", [False, True])
def test_lk_loss_chunked_equals_reference(truncated):
  """Every objective: loss, metrics and gradients of chunk_size=7 equal the reference within 1e-5 rel."""
  z, y, dv = rand_case((2, 3, 5), 40, 90 if truncated else None, scale=3.0)
  mask = RNG.random((2, 3, 5)) > 0.3
  per_kind = dict(fixed_lambda=dict(lam=0.3), lambda_schedule=dict(schedule=dict(start=0.9, end=0.2, steps=50),
                                                                    step=20))

  def run(z_):
    out = {}
    for kind in losses.LOSS_KINDS:
      for cs in (None, 7):
        f = lambda a, kind=kind, cs=cs: losses.lk_loss(a, y, mask, kind, draft_vocab=dv, chunk_size=cs,
                                                       **per_kind.get(kind, {}))
        out[kind, str(cs)] = jax.value_and_grad(f, has_aux=True)(z_)
    return out

  res = jax.jit(run)(jnp.asarray(z))
  for kind in losses.LOSS_KINDS:
    (l0, m0), g0 = res[kind, "None"]
    (l1, m1), g1 = res[kind, "7"]
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5, err_msg=kind)
    for key in m0:
      np.testing.assert_allclose(np.asarray(m1[key]), np.asarray(m0[key]), rtol=1e-5, atol=1e-7,
                                 err_msg=f"{kind} {key}")
    g0, g1 = np.asarray(g0, np.float64), np.asarray(g1, np.float64)
    assert np.linalg.norm(g1 - g0) <= 1e-5 * np.linalg.norm(g0), kind
    np.testing.assert_allclose(g1, g0, rtol=1e-4, atol=1e-6 * np.abs(g0).max(), err_msg=kind)


def test_bf16_logits_keep_dtype_and_match_reference():
  z, y, _ = rand_case((1, 2, 3), 64)
  zb, yb = jnp.asarray(z, jnp.bfloat16), jnp.asarray(y, jnp.bfloat16)
  mask = np.ones((1, 2, 3), bool)

  def run(z_):
    return [jax.value_and_grad(lambda a, cs=cs: losses.lk_loss(a, yb, mask, "lk_hybrid", chunk_size=cs)[0])(z_)
            for cs in (None, 16)]

  (l0, g0), (l1, g1) = jax.jit(run)(zb)
  assert g1.dtype == jnp.bfloat16 and l1.dtype == jnp.float32
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
  # Both accumulate in f32; only the final cast of the cotangent to bf16 may differ by one ulp.
  np.testing.assert_allclose(np.asarray(g1, np.float32), np.asarray(g0, np.float32), rtol=1e-2, atol=1e-6)


def test_chunked_never_holds_a_full_vocabulary_array():
  """XLA's compiled temp memory: the reference needs several [N, V] f32 buffers, chunked less than one."""
  n, v = 64, 16384
  z = jax.ShapeDtypeStruct((1, 1, n, v), jnp.float32)
  mask = jnp.ones((1, 1, n), bool)
  full = n * v * 4

  def temp(cs):
    f = jax.value_and_grad(lambda a, b: losses.lk_loss(a, b, mask, "lk_hybrid", chunk_size=cs)[0])
    return jax.jit(f).lower(z, z).compile().memory_analysis().temp_size_in_bytes

  t_ref, t_chunk = temp(None), temp(1024)
  assert t_ref >= 2 * full, t_ref
  assert t_chunk < 0.5 * full, t_chunk


@pytest.mark.parametrize("chunk", [5, 24])
def test_ties_follow_jnp_minimum(chunk):
  """q == p in every column (the draft's logits are the target's): jnp.minimum gives each side half of the
  gradient, so d alpha / dz = q (1/2 - E_q[1/2]) = 0. The forward's E_q[g] must count each tie as q/2 for
  the chunked backward to get 0 (counting it as q or 0 gives -q/2 or +q/2), in both the raw-logits path
  and the precomputed-`TargetProbs` path the trainer uses."""
  y = jnp.asarray(RNG.standard_normal((3, 24)) * 2, jnp.float32)
  lse = jax.nn.logsumexp(y, axis=-1)

  def ref(z):
    q = jax.nn.softmax(z, axis=-1)
    return jnp.sum(jnp.minimum(jax.lax.stop_gradient(jax.nn.softmax(y, axis=-1)), q))

  def raw(z):
    return jnp.sum(losses_chunked.token_alpha_kl(z, y, chunk_size=chunk, grad_kl=False)[0])

  def probs(z):
    return jnp.sum(losses_chunked.token_alpha_kl_probs(z, losses_chunked.target_probs(y, lse), chunk_size=chunk,
                                                       grad_kl=False)[0])

  want = jax.grad(ref)(y)
  np.testing.assert_allclose(np.asarray(want), 0.0, atol=1e-7)
  for f in (raw, probs):
    np.testing.assert_allclose(np.asarray(f(y)), 3.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.grad(f)(y)), np.asarray(want), atol=1e-7)
