"""LK losses: objectives that optimise the speculative-decoding acceptance rate directly.

Samarin et al., "LK Losses: Direct Acceptance Rate Optimization for Speculative Decoding",
arXiv 2602.23881. Pure functions (jit / vmap / grad friendly); see docs/design.md#lk-losses.

Notation, per draft position and token: target logits ``y`` over the full target vocabulary ``V``;
draft logits ``z`` over the draft vocabulary ``Vd``; draft id ``i`` stands for target id
``draft_vocab[i]`` (identity when ``draft_vocab`` is None, which requires ``Vd == V``).

  p_v   = exp(y_v - logsumexp_V(y))          TRUE target probability (not renormalised over Vd)
  p~_v  = exp(y_v - logsumexp_Vd(y))         target renormalised over the draft vocabulary
  q_v   = softmax(z)_v                       draft distribution, zero outside Vd
  alpha = sum_{v in Vd} min(p_v, q_v)        acceptance rate;  TV(p, q) = 1 - alpha exactly
  KL    = sum_{v in Vd} p~_v log(p~_v / q_v) forward KL to the renormalised target ("proxy of a proxy")
  L_alpha = -log(alpha + ALPHA_EPS)          per token (ALPHA_EPS = 1e-12 keeps alpha = 0 finite)

Gradients w.r.t. ``z`` (the test oracles): ``dKL/dz = q - p~``; ``dTV/dz = 0.5 q (s - E_q[s])`` with
``s = sign(q - p)``; ``dL_alpha/dz = dTV/dz / (alpha + ALPHA_EPS)``.  The target is a constant: no
gradient ever flows into ``target_logits`` / ``target_lse`` (they are wrapped in ``stop_gradient``).

Passing ``target_lse`` (logsumexp of the FULL-vocabulary target logits, ``[...]`` or broadcastable)
declares that ``target_logits`` is already restricted to the draft vocabulary (``[..., Vd]``, columns
in ``draft_vocab`` order); then ``p_v = exp(y_v - target_lse)``.  The trainer uses this so that it never
materialises ``[K, B, T, V]`` twice.

Normalisation of `lk_loss` (heads on the leading axis, ``[K, B, T, Vd]`` logits, ``[K, B, T]`` mask):
  * per head ``k`` every per-token quantity is reduced by a masked TOKEN mean over all non-head axes,
    ``mean_k(x) = sum_{b,t} m x / max(1, sum_{b,t} m)`` -- a plain ``jnp`` reduction, so under ``jit``
    with batch-sharded inputs it is the GLOBAL-batch mean (no per-device statistics);
  * a fully masked head has mean 0 for every quantity, hence contributes 0 to the loss (no NaN);
  * heads are combined as ``loss = sum_k w_k L_k``; ``head_weighting="gamma"`` (default):
    ``w = head_weights(K, gamma)``, ``w_k = gamma^k / sum_j gamma^j``; ``head_weighting="reach"``:
    ``w = reach_weights(alpha_bar)``, ``w_k ∝ prod_{j<k} sg(alpha_bar_j)`` (the stop-gradient probability
    that the chain reaches head k); either way the weights sum to 1, so the loss scale does not depend on K.

Objectives (``kind``), per head ``k``, with ``L^KL_k = mean_k(KL)`` and ``L^TV_k = mean_k(1 - alpha)``:
  ``kl``               L^KL_k                                             (lambda metric = 1)
  ``tv``               L^TV_k                                             (lambda metric = 0)
  ``lk_alpha``         mean_k(-log(alpha + ALPHA_EPS))                    (lambda metric = 0)
  ``lk_hybrid``        lambda_k L^KL_k + (1 - lambda_k) L^TV_k,  lambda_k = exp(-eta * sg(mean_k(alpha)))
  ``fixed_lambda``     lam L^KL_k + (1 - lam) L^TV_k                      (lam in [0, 1] required)
  ``lambda_schedule``  as fixed_lambda with lam = schedule(step): ``LambdaSchedule(start, end, steps,
                       shape)`` (or the same as a dict) interpolates from ``start`` at step 0 to ``end`` at
                       ``step >= steps``, linearly or along a half cosine.
``lambda`` is a constant for the gradient (``stop_gradient``); the TV term's gradient flows through alpha.

``lk_tau`` is an objective on the whole draft chain, not per head (docs/design.md#objectives-on-the-draft-chain).
Per ANCHOR position t (where head k predicts token t+k+2 from the same anchor, `lkjax.models.base.head_mask`):
  a_k(t)   = alpha_k(t) if mask_k(t) else 0       a masked head ends the chain there
  tau(t)   = 1 + sum_k prod_{j<=k} a_j(t)          in [1, K + 1]
  loss     = sum_t mask_0(t) (-log tau(t)) / max(1, sum_t mask_0(t))      in [-log(K + 1), 0]
(tau >= 1: no epsilon is needed and alpha = 0 is safe).  Its ``head_loss`` metric is the telescoping split
``mean_t(-log(tau_k(t) / tau_{k-1}(t)))`` with ``tau_k = 1 + sum_{i<=k} prod_{j<=i} a_j`` (summing to the
loss; ``head_weight`` is 1), ``lambda`` is 0, and ``gamma`` / ``head_weighting`` do not apply (the chain's
products already weight each head by its reach).  ``aligned="target"`` declares that row t of head k holds
the prediction of anchor t-k-1 (the per-head trainer's layout, time on the LAST axis); the chain is then
re-aligned by anchor first.

Metrics (all ``float32``, gradient-free): per head ``[K]`` ``alpha``, ``lambda``, ``kl``, ``tv``,
``neg_log_alpha``, ``head_loss``, ``head_weight`` (``loss = sum_k head_weight_k head_loss_k``), ``tokens``
(mask count); scalars ``loss``, the offline expected acceptance length ``tau = 1 + sum_k prod_{j<=k}
alpha_bar_j`` (product of means) and, for every kind, ``tau_chain`` = the anchor mean of the per-token
``tau(t)`` of ``lk_tau`` (mean of products).

Numerics: everything is accumulated in float32 (bf16 inputs are upcast); ``-inf`` target logits, rows
whose target logits are all ``-inf``, ``alpha = 0`` and fully masked heads give finite values and
gradients.  ``chunk_size=<int>`` selects the vocabulary-chunked custom-VJP implementation of
`lkjax.losses_chunked` (same values and gradients, far less memory); ``None`` is this reference.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lkjax import losses_chunked

LOSS_KINDS = ("kl", "tv", "lk_alpha", "lk_hybrid", "fixed_lambda", "lambda_schedule", "lk_tau")
HEAD_WEIGHTINGS = ("gamma", "reach")
ALIGNMENTS = ("anchor", "target")
ALPHA_EPS = 1e-12
SCHEDULE_SHAPES = ("linear", "cosine")


@dataclasses.dataclass(frozen=True)
class LambdaSchedule:
  """lambda(step) from ``start`` (step 0) to ``end`` (step >= ``steps``); both in [0, 1].

  ``shape='linear'``: ``start + (end - start) * f``; ``shape='cosine'``:
  ``start + (end - start) * (1 - cos(pi f)) / 2``, with ``f = clip(step / steps, 0, 1)``.
  """

  start: float
  end: float
  steps: int
  shape: str = "linear"

  def __post_init__(self):
    for name in ("start", "end"):
      v = getattr(self, name)
      if not 0.0 <= float(v) <= 1.0:
        raise ValueError(f"schedule.{name}={v}: lambda must lie in [0, 1]")
    if int(self.steps) <= 0:
      raise ValueError(f"schedule.steps={self.steps}: must be a positive number of steps")
    if self.shape not in SCHEDULE_SHAPES:
      raise ValueError(f"schedule.shape={self.shape!r}: expected one of {SCHEDULE_SHAPES}")

  def __call__(self, step) -> jax.Array:
    """lambda at ``step`` (int or traced scalar) -> float32 scalar."""
    f = jnp.clip(jnp.asarray(step, jnp.float32) / float(self.steps), 0.0, 1.0)
    if self.shape == "cosine":
      f = 0.5 * (1.0 - jnp.cos(jnp.pi * f))
    return jnp.float32(self.start) + jnp.float32(self.end - self.start) * f

  @classmethod
  def from_any(cls, schedule: "LambdaSchedule | Mapping[str, Any]") -> "LambdaSchedule":
    if isinstance(schedule, LambdaSchedule):
      return schedule
    if not isinstance(schedule, Mapping):
      raise ValueError(f"schedule={schedule!r}: expected a LambdaSchedule or a dict(start, end, steps, shape)")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(schedule) - names)
    if unknown:
      raise ValueError(f"schedule: unknown keys {unknown}; expected {sorted(names)}")
    missing = sorted({"start", "end", "steps"} - set(schedule))
    if missing:
      raise ValueError(f"schedule: missing keys {missing}")
    return cls(**dict(schedule))


def head_weights(num_heads: int, gamma: float) -> jax.Array:
  """Normalised head weights ``w_k = gamma^k / sum_{j<K} gamma^j`` -> float32 ``[K]``."""
  if int(num_heads) < 1:
    raise ValueError(f"num_heads={num_heads}: need at least one head")
  _check_positive_float(gamma, "gamma", strict=True)
  w = np.asarray(gamma, np.float64) ** np.arange(int(num_heads))
  return jnp.asarray(w / w.sum(), jnp.float32)


def reach_weights(alpha_bar: jax.Array) -> jax.Array:
  """Reach head weights ``w_k = r_k / sum_i r_i``, ``r_k = prod_{j<k} sg(alpha_bar_j)`` (``r_0 = 1``) -> f32 ``[K]``.

  ``r_k`` is the probability that a chain with per-head acceptance ``alpha_bar`` reaches head k; the
  weights are constants for the gradient.  ``sum_i r_i >= 1``, so no division by zero: a head with
  ``alpha_bar_j = 0`` (or fully masked) gives weight 0 to every later head.
  """
  a = jax.lax.stop_gradient(jnp.asarray(alpha_bar, jnp.float32))
  r = jnp.concatenate([jnp.ones((1,), jnp.float32), jnp.cumprod(a[:-1])])
  return r / jnp.sum(r)


# ----------------------------------------------------------------------------------------------
# Validation


def _concrete(x) -> np.ndarray | None:
  """numpy value of ``x``, or None when it is traced (values cannot be checked under jit)."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def _check_positive_float(x, name: str, *, strict: bool) -> None:
  v = _concrete(x)
  if v is None:
    return
  if v.ndim != 0 or not np.isfinite(v) or (v <= 0 if strict else v < 0):
    raise ValueError(f"{name}={x!r}: must be a finite scalar {'> 0' if strict else '>= 0'}")


def _check_vocab(draft_logits, target_logits, draft_vocab, target_lse) -> None:
  """Shape / vocabulary consistency of the logits arguments (ValueError names the argument)."""
  if draft_logits.ndim < 1 or target_logits.ndim != draft_logits.ndim:
    raise ValueError(f"target_logits shape {target_logits.shape} does not match draft_logits shape "
                     f"{draft_logits.shape}: both are [..., vocab] with the same leading axes")
  if target_logits.shape[:-1] != draft_logits.shape[:-1]:
    raise ValueError(f"target_logits leading shape {target_logits.shape[:-1]} != draft_logits leading "
                     f"shape {draft_logits.shape[:-1]}")
  vd, v = draft_logits.shape[-1], target_logits.shape[-1]
  if draft_vocab is not None:
    dv = jnp.asarray(draft_vocab) if not hasattr(draft_vocab, "shape") else draft_vocab
    if dv.ndim != 1 or dv.shape[0] != vd:
      raise ValueError(f"draft_vocab shape {dv.shape}: expected [{vd}] (one target id per draft logit)")
    if not jnp.issubdtype(dv.dtype, jnp.integer):
      raise ValueError(f"draft_vocab dtype {dv.dtype}: expected integer target ids")
  if target_lse is not None:
    if v != vd:
      raise ValueError(f"target_logits last axis {v} != draft vocabulary {vd}: with target_lse the target "
                       "logits must already be restricted to the draft vocabulary")
    lse_shape = jnp.shape(target_lse)
    try:
      out = np.broadcast_shapes(lse_shape, draft_logits.shape[:-1])
    except ValueError:
      out = None
    if out != draft_logits.shape[:-1]:
      raise ValueError(f"target_lse shape {lse_shape} does not broadcast to {draft_logits.shape[:-1]}")
    return
  if draft_vocab is None:
    if v != vd:
      raise ValueError(f"draft_vocab is None but draft vocabulary {vd} != target vocabulary {v}; "
                       "pass draft_vocab (the target ids of the draft logits)")
    return
  ids = _concrete(draft_vocab)
  if ids is not None and ids.size:
    if ids.min() < 0 or ids.max() >= v:
      raise ValueError(f"draft_vocab ids span [{ids.min()}, {ids.max()}], outside the target vocabulary "
                       f"[0, {v})")
    if np.unique(ids).size != ids.size:
      raise ValueError("draft_vocab has repeated target ids; each target token may appear once")


# ----------------------------------------------------------------------------------------------
# Per-token terms (reference implementation: plain jnp, autodiff gradients)


def _finite_or_zero(x: jax.Array) -> jax.Array:
  # An all -inf row has lse = -inf; y - lse would be NaN.  With lse := 0 every p_v = exp(-inf) = 0.
  return jnp.where(jnp.isfinite(x), x, 0.0)


def _target_log_probs(target_logits, draft_vocab, target_lse) -> tuple[jax.Array, jax.Array]:
  """-> (log p [..., Vd] TRUE log-probs over the draft vocab, log p~ [..., Vd] renormalised), f32."""
  y = jax.lax.stop_gradient(target_logits).astype(jnp.float32)
  if target_lse is not None:
    lse = jnp.broadcast_to(jax.lax.stop_gradient(jnp.asarray(target_lse)).astype(jnp.float32), y.shape[:-1])
    y_d = y
  else:
    lse = jax.nn.logsumexp(y, axis=-1)
    y_d = y if draft_vocab is None else jnp.take(y, jnp.asarray(draft_vocab), axis=-1)
  log_p = y_d - _finite_or_zero(lse)[..., None]
  if target_lse is None and draft_vocab is None:
    return log_p, log_p          # Vd == V: p~ = p
  lse_d = jax.nn.logsumexp(y_d, axis=-1)
  return log_p, y_d - _finite_or_zero(lse_d)[..., None]


def _token_terms(draft_logits, target_logits, draft_vocab, target_lse, *, reverse: bool = False):
  """Reference per-token alpha, KL (and reverse KL) -> dict of f32 ``[...]`` arrays."""
  log_p, log_pt = _target_log_probs(target_logits, draft_vocab, target_lse)
  log_q = jax.nn.log_softmax(draft_logits.astype(jnp.float32), axis=-1)
  q = jnp.exp(log_q)
  pt = jnp.exp(log_pt)
  alpha = jnp.sum(jnp.minimum(jnp.exp(log_p), q), axis=-1)
  # p~ = 0 entries (-inf target logits) contribute 0; the log is taken of a safe value (no NaN grads).
  log_pt_safe = jnp.where(pt > 0, log_pt, 0.0)
  kl = jnp.sum(jnp.where(pt > 0, pt * (log_pt_safe - log_q), 0.0), axis=-1)
  out = {"alpha": alpha, "kl": kl}
  if reverse:
    # Infinite where q puts mass on a token with p~ = 0: that is the true reverse KL.
    out["reverse_kl"] = jnp.sum(q * (log_q - log_pt), axis=-1)
  return out


def acceptance_rate(draft_logits: jax.Array, target_logits: jax.Array, draft_vocab: jax.Array | None = None,
                    *, target_lse: jax.Array | None = None) -> jax.Array:
  """Per-token acceptance rate ``alpha = sum_{v in Vd} min(p_v, q_v)`` -> float32 ``[...]``.

  Args:
    draft_logits: ``[..., Vd]`` draft logits (any float dtype).
    target_logits: ``[..., V]`` target logits, or ``[..., Vd]`` when ``target_lse`` is given.
    draft_vocab: int ``[Vd]`` target ids of the draft logits; None means identity (``Vd == V``).
    target_lse: optional ``[...]`` logsumexp of the full-vocabulary target logits (see module doc).
  """
  _check_vocab(draft_logits, target_logits, draft_vocab, target_lse)
  return _token_terms(draft_logits, target_logits, draft_vocab, target_lse)["alpha"]


def token_divergences(draft_logits: jax.Array, target_logits: jax.Array, draft_vocab: jax.Array | None = None,
                      *, target_lse: jax.Array | None = None) -> dict[str, jax.Array]:
  """Per-token ``alpha``, ``tv = 1 - alpha``, ``kl`` = KL(p~||q), ``reverse_kl`` = KL(q||p~),
  ``neg_log_alpha = -log(alpha + ALPHA_EPS)``; each float32 ``[...]``.  Arguments as `acceptance_rate`."""
  _check_vocab(draft_logits, target_logits, draft_vocab, target_lse)
  t = _token_terms(draft_logits, target_logits, draft_vocab, target_lse, reverse=True)
  return {"alpha": t["alpha"], "tv": 1.0 - t["alpha"], "kl": t["kl"], "reverse_kl": t["reverse_kl"],
          "neg_log_alpha": -jnp.log(t["alpha"] + ALPHA_EPS)}


# ----------------------------------------------------------------------------------------------
# The objective


def lk_loss(draft_logits: jax.Array, target_logits: jax.Array, mask: jax.Array, kind: str, *,
            eta: float = 3.0, lam: float | None = None, gamma: float = 0.8,
            draft_vocab: jax.Array | None = None, step: Any = None,
            target_lse: jax.Array | None = None,
            schedule: LambdaSchedule | Mapping[str, Any] | None = None,
            chunk_size: int | None = None, axis_name: Any = None,
            head_weighting: str = "gamma") -> tuple[jax.Array, dict[str, jax.Array]]:
  """Multi-head LK objective (module docstring has the formulas and the normalisation).

  Args:
    draft_logits: ``[K, B, T, Vd]`` (heads first; any number of axes between head and vocab).
    target_logits: ``[K, B, T, V]``, or ``[K, B, T, Vd]`` when ``target_lse`` is given.
    mask: ``[K, B, T]``; nonzero = trained prediction (see `lkjax.models.base.head_mask`).
    kind: one of `LOSS_KINDS`.
    eta: ``lk_hybrid`` temperature, ``lambda_k = exp(-eta * alpha_bar_k)``; >= 0.
    lam: the fixed lambda in [0, 1] of ``fixed_lambda`` (only that kind takes it).
    gamma: head decay > 0, weights ``gamma^k`` normalised to sum 1.
    draft_vocab: int ``[Vd]`` target ids of the draft logits (None: identity).
    step: training step (int or traced scalar) for ``lambda_schedule``; ignored by other kinds.
    target_lse: ``[K, B, T]`` (or broadcastable) full-vocabulary target logsumexp; see module doc.
    schedule: `LambdaSchedule` or ``dict(start=, end=, steps=, shape=)`` for ``lambda_schedule``.
    chunk_size: None = reference implementation; an int = vocabulary-chunked custom VJP with chunks of
      that many draft columns (`lkjax.losses_chunked`).
    axis_name: inside ``shard_map`` with the batch split over these mesh axes: the token means are
      taken over the whole batch (`lk_objective`).
    head_weighting: ``"gamma"`` (weights ``gamma^k``) or ``"reach"`` (`reach_weights`); not ``lk_tau``.

  Returns:
    ``(loss, metrics)``: float32 scalar and the metrics dict described in the module docstring.
  """
  _check_options(kind, head_weighting, "anchor")
  if draft_logits.ndim < 2:
    raise ValueError(f"draft_logits shape {draft_logits.shape}: expected [K, ..., Vd] with heads first")
  _check_vocab(draft_logits, target_logits, draft_vocab, target_lse)
  if jnp.shape(mask) != draft_logits.shape[:-1]:
    raise ValueError(f"mask shape {jnp.shape(mask)} != draft_logits shape without vocab "
                     f"{draft_logits.shape[:-1]}")
  _check_positive_float(eta, "eta", strict=False)
  head_weights(draft_logits.shape[0], gamma)  # validates gamma before any work (lk_objective applies them)
  if lam is not None and kind != "fixed_lambda":
    raise ValueError(f"lam={lam!r} is only used by kind='fixed_lambda' (kind={kind!r})")
  if schedule is not None and kind != "lambda_schedule":
    raise ValueError(f"schedule is only used by kind='lambda_schedule' (kind={kind!r})")
  if kind == "fixed_lambda":
    if lam is None:
      raise ValueError("lam: kind='fixed_lambda' needs lam in [0, 1]")
    v = _concrete(lam)
    if v is not None and (v.ndim != 0 or not 0.0 <= float(v) <= 1.0):
      raise ValueError(f"lam={lam!r}: must be a scalar in [0, 1]")
  if kind == "lambda_schedule":
    if schedule is None:
      raise ValueError("schedule: kind='lambda_schedule' needs schedule=dict(start, end, steps, shape)")
    if step is None:
      raise ValueError("step: kind='lambda_schedule' needs the training step")
    schedule = LambdaSchedule.from_any(schedule)
  if chunk_size is not None and (int(chunk_size) != chunk_size or int(chunk_size) < 1):
    raise ValueError(f"chunk_size={chunk_size!r}: expected a positive int or None")

  if chunk_size is None:
    t = _token_terms(draft_logits, target_logits, draft_vocab, target_lse)
    alpha, kl = t["alpha"], t["kl"]
  else:
    lse = None
    if target_lse is not None:
      lse = jnp.broadcast_to(jnp.asarray(target_lse), draft_logits.shape[:-1])
    # Only the gradients this objective uses are computed by the custom VJP's backward pass.
    alpha, kl = losses_chunked.token_alpha_kl(
        draft_logits, target_logits, draft_vocab=draft_vocab, target_lse=lse, chunk_size=int(chunk_size),
        **needed_grads(kind))

  return lk_objective(alpha, kl, mask, kind, eta=eta, lam=lam, gamma=gamma, step=step, schedule=schedule,
                      axis_name=axis_name, head_weighting=head_weighting)


def _check_options(kind: str, head_weighting: str, aligned: str) -> None:
  if kind not in LOSS_KINDS:
    raise ValueError(f"kind={kind!r}: expected one of {LOSS_KINDS}")
  if head_weighting not in HEAD_WEIGHTINGS:
    raise ValueError(f"head_weighting={head_weighting!r}: expected one of {HEAD_WEIGHTINGS}")
  if kind == "lk_tau" and head_weighting != "gamma":
    raise ValueError(f"head_weighting={head_weighting!r} does not apply to kind='lk_tau': its loss is one "
                     "objective on the whole chain (the chain's products already weight head k by its reach)")
  if aligned not in ALIGNMENTS:
    raise ValueError(f"aligned={aligned!r}: expected one of {ALIGNMENTS}")


def needed_grads(kind: str) -> dict[str, bool]:
  """Which per-token terms ``kind``'s objective differentiates: ``grad_alpha`` / ``grad_kl`` flags of
  `lkjax.losses_chunked.token_alpha_kl` (KL needs no alpha gradient; TV, L_alpha and L_tau need no KL one)."""
  return dict(grad_alpha=kind != "kl", grad_kl=kind not in ("tv", "lk_alpha", "lk_tau"))


def _shift_left_last(x: jax.Array, n: int, fill) -> jax.Array:
  """``y[..., t] = x[..., t + n]`` along the last axis, ``fill`` past the end."""
  if n == 0:
    return x
  if n >= x.shape[-1]:
    return jnp.full_like(x, fill)
  pad = jnp.full(x.shape[:-1] + (n,), fill, x.dtype)
  return jnp.concatenate([x[..., n:], pad], axis=-1)


def chain_terms(alpha: jax.Array, mask: jax.Array, aligned: str = "anchor") -> tuple[jax.Array, jax.Array]:
  """Per-anchor chain prefix products and the anchor mask of ``lk_tau`` (docs/design.md#objectives-on-the-draft-chain).

  Args:
    alpha: float32 ``[K, ...]`` per-token acceptance rates.
    mask: ``[K, ...]`` trained predictions.
    aligned: ``"anchor"``: ``[k, ..., t]`` is head k's prediction from anchor t (`lk_loss`'s layout);
      ``"target"``: it is the prediction from anchor ``t-k-1`` (time = last axis), re-aligned here.

  Returns:
    ``(prefix [K, ...], anchor [...])``: ``prefix_k(t) = prod_{j<=k} a_j(t)`` with ``a_j = alpha_j`` where
    ``mask_j`` and 0 elsewhere (a masked head ends the chain), and ``anchor = mask_0`` (bool).
    ``tau(t) = 1 + sum_k prefix_k(t)``.
  """
  m = jnp.asarray(mask).astype(bool)
  a = jnp.asarray(alpha, jnp.float32)
  if aligned == "target":
    a = jnp.stack([_shift_left_last(a[k], k + 1, 0.0) for k in range(a.shape[0])])
    m = jnp.stack([_shift_left_last(m[k], k + 1, False) for k in range(m.shape[0])])
  a = jnp.where(m, a, 0.0)
  # A running product (K <= 8 multiplies), not jnp.cumprod: its gradient is plain products, safe at 0.
  prods, run = [], None
  for k in range(a.shape[0]):
    run = a[k] if run is None else run * a[k]
    prods.append(run)
  return jnp.stack(prods), m[0]


def lk_objective(alpha: jax.Array, kl: jax.Array, mask: jax.Array, kind: str, *, eta: float = 3.0,
                 lam: float | None = None, gamma: float = 0.8, step: Any = None,
                 schedule: LambdaSchedule | Mapping[str, Any] | None = None, axis_name: Any = None,
                 head_weighting: str = "gamma", aligned: str = "anchor"
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The multi-head objective from per-token terms: the reduction half of `lk_loss`.

  ``alpha`` and ``kl`` are float32 ``[K, ...]`` per-token acceptance rates and KL(p~||q) (as from
  `token_divergences` or `lkjax.losses_chunked.token_alpha_kl`); ``mask [K, ...]`` selects the trained
  predictions.  Callers that compute the per-token terms head by head (the trainer: no ``[K, B, T, Vd]``
  array) use this directly; arguments are otherwise those of `lk_loss`, already validated there.

  ``axis_name``: inside ``shard_map`` (or a named ``vmap``), where each device holds a slice of the batch,
  the mesh axis or axes that slice it. Every masked sum and token count is then ``psum``-ed over them, so
  the means, lambda and the metrics are those of the whole batch (the same numbers as the unsplit batch),
  and the gradient of each device's loss is its share of the global one.

  ``head_weighting``: ``"gamma"`` or ``"reach"`` (`reach_weights` of the global ``alpha_bar``).
  ``aligned``: the time layout of the ``[K, ..., T]`` inputs, which only the chain (``lk_tau`` and the
  ``tau_chain`` metric) depends on: ``"anchor"`` (as `lk_loss`) or ``"target"`` (row t of head k holds the
  prediction of anchor t-k-1, as `lkjax.train.step.per_head_loss` lines heads up); see `chain_terms`.
  """
  _check_options(kind, head_weighting, aligned)
  num_heads = alpha.shape[0]
  weights = head_weights(num_heads, gamma)
  if kind == "lambda_schedule" and not isinstance(schedule, LambdaSchedule):
    schedule = LambdaSchedule.from_any(schedule)
  m = jnp.asarray(mask).astype(bool)
  axes = tuple(range(1, m.ndim))
  def total(x):
    s = jnp.sum(x, axis=axes)
    return s if axis_name is None else jax.lax.psum(s, axis_name)

  def total_all(x):
    s = jnp.sum(x)
    return s if axis_name is None else jax.lax.psum(s, axis_name)

  tokens = total(m.astype(jnp.float32))
  denom = jnp.maximum(tokens, 1.0)

  def mmean(x):
    # where (not multiply): a masked row's value may be anything; it must not leak into the mean.
    return total(jnp.where(m, x, 0.0)) / denom

  nla = -jnp.log(alpha + ALPHA_EPS)
  alpha_bar, kl_bar, tv_bar, nla_bar = mmean(alpha), mmean(kl), mmean(1.0 - alpha), mmean(nla)
  ones = jnp.ones((num_heads,), jnp.float32)
  if head_weighting == "reach":
    weights = reach_weights(alpha_bar)

  # The chain (every kind reports tau_chain; lk_tau optimises it).  For the other kinds it is a metric
  # only: its inputs are stop-gradient so it adds nothing to the backward pass.
  prefix, anchor = chain_terms(alpha if kind == "lk_tau" else jax.lax.stop_gradient(alpha), m, aligned)
  tau_k = 1.0 + jnp.cumsum(prefix, axis=0)            # [K, ...] chain length through head k; >= 1
  anchors = jnp.maximum(total_all(anchor.astype(jnp.float32)), 1.0)
  amean = lambda x: total_all(jnp.where(anchor, x, 0.0)) / anchors  # noqa: E731
  tau_chain = 1.0 + amean(tau_k[-1] - 1.0)          # 1 (not 0) when no anchor is trained, like tau

  if kind == "kl":
    lam_k, head = ones, kl_bar
  elif kind == "tv":
    lam_k, head = 0.0 * ones, tv_bar
  elif kind == "lk_alpha":
    lam_k, head = 0.0 * ones, nla_bar
  elif kind == "lk_tau":
    lam_k, weights = 0.0 * ones, ones
    log_tau = jnp.log(jax.lax.stop_gradient(tau_k))
    steps = log_tau - jnp.concatenate([jnp.zeros_like(log_tau[:1]), log_tau[:-1]])
    head = jnp.stack([-amean(steps[k]) for k in range(num_heads)])     # metric; sums to the loss
  else:
    if kind == "lk_hybrid":
      lam_k = jnp.exp(-jnp.float32(eta) * jax.lax.stop_gradient(alpha_bar))
    elif kind == "fixed_lambda":
      lam_k = jnp.float32(lam) * ones
    else:
      lam_k = schedule(step) * ones
    lam_k = jax.lax.stop_gradient(lam_k)
    head = lam_k * kl_bar + (1.0 - lam_k) * tv_bar
  if kind == "lk_tau":
    loss = amean(-jnp.log(tau_k[-1]))             # tau >= 1: the log needs no epsilon
  else:
    loss = jnp.sum(weights * head)
  ab = jax.lax.stop_gradient(alpha_bar)
  metrics = {
      "alpha": ab, "lambda": lam_k, "kl": kl_bar, "tv": tv_bar, "neg_log_alpha": nla_bar,
      "head_loss": head, "head_weight": weights, "tokens": tokens, "loss": loss,
      "tau": 1.0 + jnp.sum(jnp.cumprod(ab)), "tau_chain": tau_chain,
  }
  return loss, jax.tree.map(lambda x: jax.lax.stop_gradient(jnp.asarray(x, jnp.float32)), metrics)


__all__ = ["LOSS_KINDS", "HEAD_WEIGHTINGS", "ALIGNMENTS", "ALPHA_EPS", "LambdaSchedule", "head_weights",
           "reach_weights", "acceptance_rate", "token_divergences", "lk_loss", "lk_objective", "chain_terms",
           "needed_grads"]
