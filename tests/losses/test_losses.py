"""lkjax.losses against independent oracles: float64 numpy, the analytic gradients of docs/design.md#lk-losses, hand examples."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lkjax import losses

RNG = np.random.default_rng(1234)


# ---------------------------------------------------------------------------------------------- oracles


def np_lse(x):
  m = np.max(x, axis=-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  with np.errstate(divide="ignore"):
    return (m + np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True)))[..., 0]


def np_terms(z, y, dv=None, lse=None):
  """float64 per-token values and analytic gradients (docs/design.md#lk-losses) w.r.t. the draft logits."""
  z = np.asarray(z, np.float64)
  y = np.asarray(y, np.float64)
  lq = z - np_lse(z)[..., None]
  q = np.exp(lq)
  if lse is None:
    lse = np_lse(y)
    y = y if dv is None else y[..., np.asarray(dv)]
  p = np.exp(y - np.asarray(lse, np.float64)[..., None])
  pt = p / p.sum(-1, keepdims=True)
  alpha = np.minimum(p, q).sum(-1)
  with np.errstate(divide="ignore", invalid="ignore"):
    kl = np.where(pt > 0, pt * (np.log(pt) - lq), 0.0).sum(-1)
    rkl = (q * (lq - np.log(pt))).sum(-1)
  s = np.sign(q - p)
  g_tv = 0.5 * q * (s - (q * s).sum(-1, keepdims=True))
  return dict(alpha=alpha, kl=kl, tv=1 - alpha, reverse_kl=rkl, neg_log_alpha=-np.log(alpha),
              g_kl=q - pt, g_tv=g_tv, g_alpha=g_tv / alpha[..., None])


def rand_case(shape, vd, v=None, scale=2.0):
  """Random draft / target logits; with v, a sorted random draft vocabulary of vd target ids."""
  z = RNG.normal(size=(*shape, vd)) * scale
  if v is None:
    return z.astype(np.float32), (RNG.normal(size=(*shape, vd)) * scale).astype(np.float32), None
  y = RNG.normal(size=(*shape, v)) * scale
  dv = np.sort(RNG.choice(v, vd, replace=False)).astype(np.int32)
  return z.astype(np.float32), y.astype(np.float32), dv


def loss_grad(z, y, mask, kind, **kw):
  f = lambda z_: losses.lk_loss(z_, y, mask, kind, **kw)
  (loss, metrics), g = jax.jit(jax.value_and_grad(f, has_aux=True))(jnp.asarray(z))
  return float(loss), jax.tree.map(np.asarray, metrics), np.asarray(g)


def run_kinds(z, y, mask, kinds, per_kind=None, **kw):
  """{kind: (loss, metrics, grad)} for several kinds compiled as ONE program (compiles dominate CPU time)."""
  per_kind = per_kind or {}

  def all_kinds(z_):
    return {k: jax.value_and_grad(lambda a, k=k: losses.lk_loss(a, y, mask, k, **kw, **per_kind.get(k, {})),
                                  has_aux=True)(z_) for k in kinds}

  out = jax.jit(all_kinds)(jnp.asarray(z))
  return {k: (float(l), jax.tree.map(np.asarray, m), np.asarray(g)) for k, ((l, m), g) in out.items()}


def expected(z, y, mask, kind, dv=None, gamma=0.8, eta=3.0, lam=None):
  """numpy oracle of lk_loss: per-head masked token means, normalised gamma^k weights, held lambda."""
  t = np_terms(z, y, dv)
  m = np.asarray(mask, bool)
  k_heads = z.shape[0]
  w = gamma ** np.arange(k_heads)
  w = w / w.sum()
  cnt = np.maximum(m.reshape(k_heads, -1).sum(1), 1)
  mean = lambda x: np.where(m, x, 0).reshape(k_heads, -1).sum(1) / cnt
  a_bar = mean(t["alpha"])
  if kind == "lk_hybrid":
    lam_k = np.exp(-eta * a_bar)
  else:
    lam_k = np.full(k_heads, {"kl": 1.0, "tv": 0.0, "lk_alpha": 0.0}.get(kind, lam))
  if kind == "lk_alpha":
    head = mean(t["neg_log_alpha"])
    g = t["g_alpha"]
  else:
    head = lam_k * mean(t["kl"]) + (1 - lam_k) * mean(t["tv"])
    g = lam_k[:, None, None, None] * t["g_kl"] + (1 - lam_k)[:, None, None, None] * t["g_tv"]
  scale = np.where(m, 1.0, 0.0) * (w / cnt)[:, None, None]
  return dict(loss=float((w * head).sum()), grad=g * scale[..., None], alpha=a_bar, lam=lam_k,
              kl=mean(t["kl"]), tv=mean(t["tv"]), head=head, tau=1 + np.cumprod(a_bar).sum())


# ---------------------------------------------------------------------------------------------- per token


@pytest.mark.parametrize("truncated", [False, True])
def test_token_divergences_match_float64(truncated):
  z, y, dv = rand_case((3, 5), 40, 97 if truncated else None)
  got = losses.token_divergences(z, y, dv)
  want = np_terms(z, y, dv)
  for key in ("alpha", "tv", "kl", "reverse_kl", "neg_log_alpha"):
    np.testing.assert_allclose(np.asarray(got[key]), want[key], rtol=2e-5, atol=2e-6, err_msg=key)
  np.testing.assert_allclose(np.asarray(losses.acceptance_rate(z, y, dv)), want["alpha"], rtol=2e-5)
  # Truncated: alpha uses the TRUE p (mass outside Vd is lost), so it is below the renormalised one.
  if truncated:
    assert np.all(want["alpha"] < np_terms(z, y[..., dv])["alpha"])   # p <= p~ elementwise


def test_target_lse_path_equals_draft_vocab_path():
  z, y, dv = rand_case((2, 3, 4), 30, 80)
  y[1] = y[0]                                    # same target for both heads: lse may broadcast
  lse = jax.nn.logsumexp(y, axis=-1)
  y_d = y[..., dv]
  a = losses.token_divergences(z, y, dv)
  b = losses.token_divergences(z, y_d, target_lse=lse)
  for key in a:
    np.testing.assert_allclose(np.asarray(a[key]), np.asarray(b[key]), rtol=1e-6, err_msg=key)
  mask = RNG.random((2, 3, 4)) > 0.3
  la, ma, ga = loss_grad(z, y, mask, "lk_hybrid", draft_vocab=dv)
  for lse_arg, chunk in ((lse, None), (lse[:1], 8)):     # [K, B, T] and broadcast [1, B, T]
    lb, mb, gb = loss_grad(z, y_d, mask, "lk_hybrid", target_lse=lse_arg, chunk_size=chunk)
    np.testing.assert_allclose(lb, la, rtol=1e-6)
    np.testing.assert_allclose(gb, ga, rtol=1e-5, atol=1e-9)


# ---------------------------------------------------------------------------------------------- gradients


def check_against_oracle(loss, m, g, want, mask):
  np.testing.assert_allclose(loss, want["loss"], rtol=1e-5)
  np.testing.assert_allclose(g, want["grad"], rtol=1e-4, atol=1e-8)
  np.testing.assert_allclose(m["alpha"], want["alpha"], rtol=1e-5)
  np.testing.assert_allclose(m["lambda"], want["lam"], rtol=1e-5)
  np.testing.assert_allclose(m["kl"], want["kl"], rtol=1e-5)
  np.testing.assert_allclose(m["tv"], want["tv"], rtol=1e-5)
  np.testing.assert_allclose(m["head_loss"], want["head"], rtol=1e-5)
  np.testing.assert_allclose(m["tau"], want["tau"], rtol=1e-6)
  np.testing.assert_allclose(m["loss"], want["loss"], rtol=1e-5)
  np.testing.assert_array_equal(m["tokens"], mask.reshape(mask.shape[0], -1).sum(1))


@pytest.mark.parametrize("truncated", [False, True])
def test_loss_and_gradient_equal_analytic(truncated):
  z, y, dv = rand_case((2, 3, 5), 24, 61 if truncated else None)
  mask = RNG.random((2, 3, 5)) > 0.25
  kinds = ["kl", "tv", "lk_alpha", "lk_hybrid"]
  for kind, (loss, m, g) in run_kinds(z, y, mask, kinds, draft_vocab=dv).items():
    check_against_oracle(loss, m, g, expected(z, y, mask, kind, dv), mask)


def test_hybrid_lambda_gets_no_gradient():
  """The lk_hybrid gradient is lambda*grad KL + (1-lambda)*grad TV with lambda held fixed: it equals the
  fixed_lambda gradient at lam = the hybrid's lambda, and differs from differentiating through lambda."""
  z, y, _ = rand_case((1, 4, 6), 16)
  mask = np.ones((1, 4, 6), bool)
  loss_h, m_h, g_h = loss_grad(z, y, mask, "lk_hybrid", eta=3.0)
  lam = float(m_h["lambda"][0])
  loss_f, _, g_f = loss_grad(z, y, mask, "fixed_lambda", lam=lam)
  np.testing.assert_allclose(loss_h, loss_f, rtol=1e-6)
  np.testing.assert_allclose(g_h, g_f, rtol=1e-5, atol=1e-9)

  def through_lambda(z_):  # what a missing stop_gradient would compute
    t = losses.token_divergences(z_, y)
    lam_ = jnp.exp(-3.0 * t["alpha"].mean())
    return lam_ * t["kl"].mean() + (1 - lam_) * t["tv"].mean()

  assert np.abs(np.asarray(jax.grad(through_lambda)(jnp.asarray(z))) - g_h).max() > 1e-3 * np.abs(g_h).max()


def test_fixed_lambda_and_schedule():
  z, y, _ = rand_case((2, 2, 3), 12)
  mask = np.ones((2, 2, 3), bool)
  loss, m, g = loss_grad(z, y, mask, "fixed_lambda", lam=0.5)
  want = expected(z, y, mask, "fixed_lambda", lam=0.5)
  np.testing.assert_allclose(loss, want["loss"], rtol=1e-5)
  np.testing.assert_allclose(g, want["grad"], rtol=1e-4, atol=1e-8)
  # lambda_schedule: linear 1 -> 0 over 10 steps is 0.7 at step 3; cosine is 0.5 + 0.5 cos(0.3 pi).
  for shape, step, lam in [("linear", 3, 0.7), ("cosine", 3, 0.5 + 0.5 * math.cos(0.3 * math.pi)),
                           ("linear", 25, 0.0), ("cosine", 0, 1.0)]:
    sched = dict(start=1.0, end=0.0, steps=10, shape=shape)
    f = jax.jit(lambda z_, s: losses.lk_loss(z_, y, mask, "lambda_schedule", schedule=sched, step=s))
    loss_s, m_s = f(jnp.asarray(z), jnp.int32(step))   # traced step
    np.testing.assert_allclose(np.asarray(m_s["lambda"]), [lam, lam], rtol=1e-6, atol=1e-7)
    want = expected(z, y, mask, "fixed_lambda", lam=lam)
    np.testing.assert_allclose(float(loss_s), want["loss"], rtol=1e-5)
  s = losses.LambdaSchedule(start=0.2, end=0.6, steps=4)
  np.testing.assert_allclose([float(s(i)) for i in range(6)], [0.2, 0.3, 0.4, 0.5, 0.6, 0.6], rtol=1e-6)


def test_head_weights_and_kinds():
  np.testing.assert_allclose(np.asarray(losses.head_weights(3, 0.5)), np.array([4, 2, 1]) / 7, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(losses.head_weights(1, 0.8)), [1.0])
  assert losses.LOSS_KINDS == ("kl", "tv", "lk_alpha", "lk_hybrid", "fixed_lambda", "lambda_schedule", "lk_tau")


# ---------------------------------------------------------------------------------------------- hand examples


def test_one_hot_target_lk_alpha_is_nll():
  z = RNG.normal(size=(2, 3, 4, 50)).astype(np.float32)
  x = RNG.integers(0, 50, size=(2, 3, 4))
  y = np.full((2, 3, 4, 50), -np.inf, np.float32)
  np.put_along_axis(y, x[..., None], 0.0, axis=-1)
  y[0, 0, 0] = -1e30          # a finite "one-hot" row too
  y[0, 0, 0, x[0, 0, 0]] = 0.0
  mask = np.ones((2, 3, 4), bool)
  loss, m, g = loss_grad(z, y, mask, "lk_alpha", gamma=1.0)
  logq = z - np_lse(z.astype(np.float64))[..., None]
  nll = -np.take_along_axis(logq, x[..., None], -1)[..., 0]
  np.testing.assert_allclose(loss, nll.mean(), rtol=1e-5)
  np.testing.assert_allclose(m["neg_log_alpha"], nll.reshape(2, -1).mean(1), rtol=1e-5)
  # ... and its gradient is the cross-entropy gradient (q - onehot) / N.
  onehot = np.zeros_like(logq)
  np.put_along_axis(onehot, x[..., None], 1.0, axis=-1)
  np.testing.assert_allclose(g, (np.exp(logq) - onehot) / 12 / 2, rtol=1e-4, atol=1e-8)
  # With a one-hot target KL is the same NLL (p~ = p, entropy 0).
  np.testing.assert_allclose(loss_grad(z, y, mask, "kl", gamma=1.0)[0], nll.mean(), rtol=1e-5)


def test_kl_prefers_a_draft_with_lower_acceptance():
  """p = (.6, .39, .01).  q_A = (.55, .40, .05): KL = .0262, alpha = .95.  q_B = (.5999, .4, .0001):
  KL = .0363, alpha = .99.  KL prefers A; every acceptance-driven objective prefers B."""
  p = np.array([0.6, 0.39, 0.01])
  qa = np.array([0.55, 0.40, 0.05])
  qb = np.array([0.5999, 0.4, 0.0001])
  y = np.log(p).astype(np.float32).reshape(1, 1, 1, 3)
  mask = np.ones((1, 1, 1), bool)
  val = {}
  for name, q in (("A", qa), ("B", qb)):
    z = np.log(q).astype(np.float32).reshape(1, 1, 1, 3)
    val[name] = {kind: float(losses.lk_loss(z, y, mask, kind)[0]) for kind in ("kl", "tv", "lk_alpha", "lk_hybrid")}
    val[name]["alpha"] = float(losses.acceptance_rate(z, y)[0, 0, 0])
  np.testing.assert_allclose([val["A"]["alpha"], val["B"]["alpha"]], [0.95, 0.99], rtol=1e-5)
  np.testing.assert_allclose(val["A"]["kl"], 0.6 * math.log(.6 / .55) + .39 * math.log(.39 / .4) + .01 * math.log(.2),
                             rtol=1e-4)
  np.testing.assert_allclose(val["B"]["kl"], 0.6 * math.log(.6 / .5999) + .39 * math.log(.39 / .4) + .01 * math.log(100),
                             rtol=1e-4)
  assert val["A"]["kl"] < val["B"]["kl"]
  for kind in ("tv", "lk_alpha", "lk_hybrid"):
    assert val["B"][kind] < val["A"][kind], kind


# ---------------------------------------------------------------------------------------------- scaling


@pytest.mark.parametrize("v", [1024, 32768, 131072])
def test_gradient_norm_scaling_at_init(v):
  """Uniform q (init), p uniform on k tokens.  Closed forms: |grad KL| = sqrt(1/k - 1/V) ~ 1/sqrt(k);
  |grad TV| = sqrt(k (V-k)) / V^1.5 ~ sqrt(k)/V;  |grad L_alpha| = sqrt((V-k)/(V k)) ~ 1/sqrt(k)."""
  ks = [1, 4, 16]
  z = np.zeros((1, 1, len(ks), v), np.float32)
  y = np.full((1, 1, len(ks), v), -np.inf, np.float32)
  for i, k in enumerate(ks):
    y[0, 0, i, RNG.choice(v, k, replace=False)] = 0.0
  got = {}
  mask = np.ones((1, 1, len(ks)), bool)
  for kind, (_, _, g) in run_kinds(z, y, mask, ("kl", "tv", "lk_alpha")).items():
    g = g[0, 0] * len(ks)   # rows are independent: x N tokens = the per-token gradient
    for i, k in enumerate(ks):
      got[kind, k] = np.linalg.norm(g[i])
  for k in ks:
    np.testing.assert_allclose(got["kl", k], math.sqrt(1 / k - 1 / v), rtol=1e-4)
    np.testing.assert_allclose(got["tv", k], math.sqrt(k * (v - k)) / v ** 1.5, rtol=1e-4)
    np.testing.assert_allclose(got["lk_alpha", k], math.sqrt((v - k) / (v * k)), rtol=1e-4)
  # The point of the paper: TV's signal vanishes with V, L_alpha's does not.
  assert got["tv", 1] * v < 1.01 and got["lk_alpha", 1] > 0.99


# ---------------------------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("chunk_size", [None, 7])
def test_no_nan_with_bf16_neg_inf_masked_heads_and_zero_alpha(chunk_size):
  k, b, t, v = 3, 2, 4, 32
  z = RNG.normal(size=(k, b, t, v)).astype(np.float32)
  y = RNG.normal(size=(k, b, t, v)).astype(np.float32)
  y[..., ::3] = -np.inf                       # -inf target logits
  y[0, 0, 0] = -np.inf                        # a row with no target mass at all
  z[0, 1, 0] = -200.0                         # alpha = 0 exactly: q is one-hot where p = 0
  z[0, 1, 0, 0] = 0.0
  y[0, 1, 0, 0] = -np.inf
  mask = np.ones((k, b, t), bool)
  mask[2] = False                             # a fully masked head
  mask[0, 0, 0] = False
  per_kind = dict(fixed_lambda=dict(lam=0.4),
                  lambda_schedule=dict(schedule=losses.LambdaSchedule(0.9, 0.1, 100, "cosine"), step=7))
  for dtype in (jnp.float32, jnp.bfloat16):
    res = run_kinds(jnp.asarray(z, dtype), jnp.asarray(y, dtype), mask, losses.LOSS_KINDS, per_kind,
                    chunk_size=chunk_size)
    for kind, (loss, m, g) in res.items():
      assert g.dtype == dtype
      assert np.isfinite(loss), (kind, dtype)
      assert all(np.all(np.isfinite(x)) for x in m.values()), (kind, dtype, m)
      assert np.all(np.isfinite(g.astype(np.float32))), (kind, dtype)
      assert m["head_loss"][2] == 0 and m["alpha"][2] == 0 and m["tokens"][2] == 0
      assert np.all(g[2] == 0)
      if kind in ("tv", "lk_alpha"):   # alpha = 0 exactly: d alpha/dz = q (g - E_q g) = 0 there
        assert np.all(g[0, 1, 0] == 0), kind
  t_ = losses.token_divergences(z, y)
  assert float(t_["alpha"][0, 1, 0]) == 0.0
  np.testing.assert_allclose(float(t_["neg_log_alpha"][0, 1, 0]), -math.log(losses.ALPHA_EPS), rtol=1e-6)
  # bf16 inputs are accumulated in f32: same result as f32 logits rounded to bf16.
  zb, yb = jnp.asarray(z, jnp.bfloat16), jnp.asarray(y, jnp.bfloat16)
  l16 = losses.lk_loss(zb, yb, mask, "lk_hybrid", chunk_size=chunk_size)[0]
  l32 = losses.lk_loss(zb.astype(jnp.float32), yb.astype(jnp.float32), mask, "lk_hybrid")[0]
  assert l16.dtype == jnp.float32
  np.testing.assert_allclose(float(l16), float(l32), rtol=1e-6)


def test_fully_masked_head_contributes_zero():
  z, y, _ = rand_case((2, 3, 4), 10)
  mask = np.ones((2, 3, 4), bool)
  mask[1] = False
  loss, m, _ = loss_grad(z, y, mask, "lk_alpha", gamma=0.5)
  # weights (2/3, 1/3); head 1 contributes nothing and is not renormalised away.
  np.testing.assert_allclose(loss, 2 / 3 * np_terms(z[0], y[0])["neg_log_alpha"].mean(), rtol=1e-5)
  np.testing.assert_allclose(m["tau"], 1 + m["alpha"][0], rtol=1e-6)


# ---------------------------------------------------------------------------------------------- errors


def test_bad_input_raises_value_error_naming_the_argument():
  z, y, dv = rand_case((1, 2, 3), 8, 20)
  mask = np.ones((1, 2, 3), bool)
  cases = [
      (dict(draft_logits=z, target_logits=y[:, :1]), "target_logits"),
      (dict(draft_logits=z, target_logits=y), "draft_vocab"),                    # Vd != V, no draft_vocab
      (dict(draft_logits=z, target_logits=y, draft_vocab=dv[:5]), "draft_vocab"),
      (dict(draft_logits=z, target_logits=y, draft_vocab=dv + 20), "draft_vocab"),
      (dict(draft_logits=z, target_logits=y, draft_vocab=np.zeros(8, np.int32)), "draft_vocab"),
      (dict(draft_logits=z, target_logits=y, draft_vocab=dv, mask=mask[:, :1]), "mask"),
      (dict(draft_logits=z, target_logits=y, draft_vocab=dv, kind="kld"), "kind"),
      (dict(draft_logits=z, target_logits=y, draft_vocab=dv, eta=-1.0), "eta"),
      (dict(draft_logits=z, target_logits=y, draft_vocab=dv, gamma=0.0), "gamma"),
      (dict(draft_logits=z, target_logits=y, draft_vocab=dv, kind="fixed_lambda"), "lam"),
      (dict(draft_logits=z, target_logits=y, draft_vocab=dv, kind="fixed_lambda", lam=1.5), "lam"),
      (dict(draft_logits=z, target_logits=y, draft_vocab=dv, lam=0.5), "lam"),
      (dict(draft_logits=z, target_logits=y, draft_vocab=dv, kind="lambda_schedule", step=1), "schedule"),
      (dict(draft_logits=z, target_logits=y, draft_vocab=dv, kind="lambda_schedule",
            schedule=dict(start=1, end=0, steps=10, shape="exp"), step=1), "schedule.shape"),
      (dict(draft_logits=z, target_logits=y, draft_vocab=dv, kind="lambda_schedule",
            schedule=dict(start=1, end=0)), "schedule"),
      (dict(draft_logits=z, target_logits=y, draft_vocab=dv, kind="lambda_schedule",
            schedule=dict(start=1, end=0, steps=10)), "step"),
      (dict(draft_logits=z, target_logits=y[..., :8], target_lse=np.zeros((5,))), "target_lse"),
      (dict(draft_logits=z, target_logits=y, target_lse=np.zeros((1, 2, 3))), "target_logits"),
      (dict(draft_logits=z, target_logits=y, draft_vocab=dv, chunk_size=0), "chunk_size"),
  ]
  for kw, name in cases:
    kw = dict(mask=mask, kind="lk_hybrid") | kw
    with pytest.raises(ValueError, match=name):
      losses.lk_loss(kw.pop("draft_logits"), kw.pop("target_logits"), kw.pop("mask"), kw.pop("kind"), **kw)
  with pytest.raises(ValueError, match="draft_vocab"):
    losses.acceptance_rate(z, y)
  with pytest.raises(ValueError, match="gamma"):
    losses.head_weights(3, -0.1)


# ---------------------------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("chunk_size", [None, 16])
def test_sharded_equals_single_device_and_lambda_is_global(chunk_size):
  """Batch split over the 8 CPU devices: loss, metrics and gradients equal the unsharded result, and
  lambda = exp(-eta * GLOBAL masked mean alpha) although the shards' alphas differ wildly."""
  assert jax.device_count() == 8
  k, b, t, v = 2, 8, 6, 40
  z, y, _ = rand_case((k, b, t), v)
  # First half of the batch: q close to p (alpha ~ 0.97; not q = p exactly, where TV has a kink and
  # float32 rounding decides sign(q - p)); the other half alpha ~ 0.5.
  z[:, :4] = y[:, :4] + 0.05 * RNG.normal(size=(k, 4, t, v))
  mask = RNG.random((k, b, t)) > 0.2
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  sh = NamedSharding(mesh, P(None, "data"))
  f = jax.jit(jax.value_and_grad(
      lambda z_, y_, m_: losses.lk_loss(z_, y_, m_, "lk_hybrid", eta=3.0, chunk_size=chunk_size), has_aux=True))
  (l1, m1), g1 = f(jnp.asarray(z), jnp.asarray(y), jnp.asarray(mask))
  zs, ys, ms = (jax.device_put(jnp.asarray(a), sh) for a in (z, y, mask))
  (l8, m8), g8 = f(zs, ys, ms)
  assert len(g8.sharding.device_set) == 8
  np.testing.assert_allclose(float(l8), float(l1), rtol=1e-6)
  for key in m1:
    np.testing.assert_allclose(np.asarray(m8[key]), np.asarray(m1[key]), rtol=1e-6, err_msg=key)
  np.testing.assert_allclose(np.asarray(g8), np.asarray(g1), rtol=1e-5, atol=1e-10)
  want = expected(z, y, mask, "lk_hybrid")
  np.testing.assert_allclose(np.asarray(m8["lambda"]), want["lam"], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(g8), want["grad"], rtol=1e-4, atol=1e-8)
  # A per-device mean would have given a very different lambda on each shard.
  alpha = np_terms(z, y)["alpha"]
  local = [np.exp(-3 * alpha[0, i][mask[0, i]].mean()) for i in (0, 7) if mask[0, i].any()]
  assert all(abs(lam - want["lam"][0]) > 0.05 for lam in local)
