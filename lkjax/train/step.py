"""The compiled train and eval steps.

Train state (a plain pytree, what orbax checkpoints):
  params     pure dict of the draft's ``nnx.Param`` arrays (float32)
  opt_state  optax state of ``params`` only (``Frozen`` variables get none)
  step       int32 scalar, number of optimizer updates done
  rng        uint32 key data (split every step; kept so a resumed run continues the same stream)

Non-trained inputs: ``rest`` (the pure dict of every other model variable, e.g. the ``Frozen`` target
embedding / vocabulary maps, never donated, never updated) and ``target`` (`make_target`):
``{"draft_head": f32[Vd, Ht]}``, the draft-vocabulary rows of the target's LM head, taken once, plus
``"lm_head": f32[V, Ht]`` and ``"draft_ids": int32[Vd]`` (the whole head and the draft vocabulary's target
ids) when batches come without the precomputed lse.

Per batch, once (outside the gradient): ``y = final_hidden @ lm_head.T`` in float32 ``[B, T, V]``,
``lse = logsumexp_V(y)`` ``[B, T]`` and the draft-vocabulary columns ``y[..., draft_ids]`` ``[B, T, Vd]``;
both are shifted per head with `head_targets` (head k compares with the target at t+k+1) so the loss sees
``[K, B, T, Vd]`` target logits plus ``[K, B, T]`` lse and never a ``[K, B, T, V]`` array. The mask is
`head_mask`. When the batch carries the shards' precomputed ``target_lse`` (`lkjax.data.shards`), only the
draft-vocabulary rows of the head are multiplied (``final_hidden @ lm_head[draft_ids].T``, ``[B, T, Vd]``)
and the stored lse is used: the same numbers up to float32 rounding, without the ``[B, T, V]`` matmul.
Those rows are ``target["draft_head"]``, taken from the head once by `make_target`, not on every device in
every step.
The step is one ``jax.jit`` of ``value_and_grad`` with explicit in/out shardings from the logical-axis
rules (`lkjax.sharding`); the partitioner (GSPMD) places the collectives for any mesh layout (data
parallel, FSDP, tensor). Every reduction is a masked mean over the global (sharded) batch array, so
lambda_k of ``lk_hybrid`` is computed from the global batch on any number of devices and hosts.

Mixed precision (``precision="bf16"``): the float32 parameters (and floating ``rest``) are cast to bf16
inside the differentiated function, so the forward/backward run in bf16 while gradients, the optimizer
state and the update stay float32; the loss accumulates in float32.

Gradient accumulation (``grad_accum = A``): the global batch ``[B, ...]`` is viewed as ``[B/A, A, ...]``
and micro-batch ``i`` is column ``i`` (each device keeps its own rows); a ``lax.scan`` averages the A
gradients and metrics, then ONE optimizer update is applied. Each micro-batch's loss is its own masked
mean, so with equal token counts per micro-batch (and ``kind`` not ``lk_hybrid``, whose lambda is then
per micro-batch) this equals the gradient of the whole batch.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from lkjax import losses_chunked
from lkjax.losses import HEAD_WEIGHTINGS, lk_objective, needed_grads
from lkjax.models import layers
from lkjax.models.base import head_mask, head_targets, shift_right

PRECISIONS = {"bf16": jnp.bfloat16, "fp32": jnp.float32}


def compute_dtype(precision: str):
  if precision not in PRECISIONS:
    raise ValueError(f"precision={precision!r}: expected one of {sorted(PRECISIONS)}")
  return PRECISIONS[precision]


def cast_floating(tree: Any, dtype) -> Any:
  """Cast floating leaves of ``tree`` to ``dtype`` (integer / bool leaves untouched)."""
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def precast_rest(rest: Any, precision: str) -> Any:
  """``rest`` (never updated) cast ONCE to the compute dtype, as host numpy arrays.

  The steps cast ``rest`` to the compute dtype on every call; handing them an already-cast copy makes
  that cast a no-op (identical values) instead of, e.g., a ``[V, H]`` f32 -> bf16 conversion of the
  target embedding per step.
  """
  return cast_floating(jax.tree.map(np.asarray, rest), compute_dtype(precision))


def target_logits(final_hidden: jax.Array, lm_head: jax.Array,
                  draft_ids: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """Target logits on the draft vocabulary and the full-vocabulary lse at every position (unshifted).

  Args:
    final_hidden: ``[B, T, Ht]`` target final (post-norm) hidden states.
    lm_head: ``[V, Ht]`` target LM head (torch layout).
    draft_ids: ``int[Vd]`` ascending target ids of the draft vocabulary, or None (Vd = V).

  Returns:
    ``(y_d [B, T, Vd], lse [B, T])`` float32: ``y_d[b, t] = (h[b, t] @ lm_head.T)[draft_ids]``.
  """
  logits = draft_target_logits(final_hidden, lm_head, None)                       # all V columns
  lse = jax.nn.logsumexp(logits, axis=-1)
  sub = logits if draft_ids is None else jnp.take(logits, draft_ids, axis=-1)
  return sub, lse


def draft_target_logits(final_hidden: jax.Array, lm_head: jax.Array, draft_ids: jax.Array | None) -> jax.Array:
  """Only the draft-vocabulary columns of the target logits: ``h @ lm_head[draft_ids].T`` -> f32 ``[B, T, Vd]``.

  Equal to ``target_logits(...)[0]`` (the same float32 products; no ``[B, T, V]`` array).
  """
  w = lm_head if draft_ids is None else jnp.take(lm_head, draft_ids, axis=0)
  return jnp.einsum("bth,vh->btv", final_hidden.astype(jnp.float32), w.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)


def make_target(lm_head: Any, draft_ids: Any = None, *, full_head: bool = True) -> dict[str, np.ndarray]:
  """The steps' ``target`` input from the target's LM head ``[V, Ht]`` and the draft vocabulary's target ids
  (strictly ascending, checked by `layers.check_draft_vocab`; None: Vd = V).

  ``draft_head`` (f32 ``[Vd, Ht]``, the head's draft-vocabulary rows; the whole head when ``draft_ids`` is
  None) is what a batch with the precomputed ``target_lse`` multiplies. It is taken here, once: taken inside
  the step, every device would repeat the take in every step.
  ``full_head``: also keep ``lm_head`` (and ``draft_ids``), which batches without the lse need for the
  full-vocabulary lse (`target_logits`).
  """
  head = np.asarray(lm_head, np.float32)
  if head.ndim != 2:
    raise ValueError(f"make_target: lm_head must be [V, Ht], got shape {head.shape}")
  ids = layers.check_draft_vocab(draft_ids, head.shape[0])
  out = {"draft_head": head if ids is None else head[ids]}
  if full_head:
    out["lm_head"] = head
    if ids is not None:
      out["draft_ids"] = ids
  return out


def batch_target(batch: Mapping[str, jax.Array], target: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """``(y_d [B, T, Vd], lse [B, T])`` float32 for a batch: from the precomputed ``target_lse`` when the
  batch has it (`draft_target_logits` on ``target["draft_head"]``, or on the rows of ``lm_head``), else
  from the full-vocabulary head (`target_logits`)."""
  h = jax.lax.stop_gradient(batch["final_hidden"])
  if "target_lse" in batch:
    lse = jax.lax.stop_gradient(batch["target_lse"]).astype(jnp.float32)
    if "draft_head" in target:
      return draft_target_logits(h, target["draft_head"], None), lse
    return draft_target_logits(h, target["lm_head"], target.get("draft_ids")), lse
  if "lm_head" not in target:
    raise ValueError("batch_target: the batch has no target_lse, so the loss needs the target's whole LM head, "
                     "but the target holds only its draft rows (build it with make_target(..., full_head=True))")
  return target_logits(h, target["lm_head"], target.get("draft_ids"))


def target_distribution(batch: Mapping[str, jax.Array], target: Mapping[str, jax.Array],
                        num_heads: int) -> tuple[jax.Array, jax.Array]:
  """`batch_target` shifted per head, for the reference loss path on ``[K, B, T, Vd]`` logits.

  Returns:
    ``(y_d [K, B, T, Vd], lse [K, B, T])`` float32, ``y_d[k, b, t] = (h[b, t+k+1] @ lm_head.T)[draft_ids]``,
    zero past the end (`head_targets`; the mask is False there).
  """
  sub, lse = batch_target(batch, target)
  return head_targets(sub, num_heads), head_targets(lse, num_heads)


LOSS_IMPLS = ("per_head", "reference")


def loss_kwargs(loss_cfg: ml_collections.ConfigDict, total_steps: int) -> dict[str, Any]:
  """Keyword arguments of `lkjax.losses.lk_loss` for the config's loss section."""
  kw: dict[str, Any] = dict(eta=float(loss_cfg.eta), gamma=float(loss_cfg.gamma),
                            chunk_size=int(loss_cfg.chunk_size) or None)
  if loss_cfg.kind == "fixed_lambda":
    kw["lam"] = float(loss_cfg.lam)
  if loss_cfg.kind == "lambda_schedule":
    s = loss_cfg.schedule
    kw["schedule"] = dict(start=float(s.start), end=float(s.end), steps=int(total_steps), shape=str(s.shape))
  weighting = str(loss_cfg.get("head_weighting", "gamma") or "gamma")   # absent in configs older than the knob
  if weighting not in HEAD_WEIGHTINGS or (weighting == "reach" and loss_cfg.kind == "lk_tau"):
    raise ValueError(f"loss.head_weighting={weighting!r}: expected one of {HEAD_WEIGHTINGS} "
                     "('reach' combines per-head losses, so not with loss.kind='lk_tau')")
  if weighting != "gamma":   # only then, so a caller's loss_fn without the argument keeps working
    kw["head_weighting"] = weighting
  return kw


def loss_impl(loss_cfg: ml_collections.ConfigDict) -> str:
  """The config's ``loss.impl`` (``per_head`` when absent: configs written before the knob existed)."""
  impl = str(loss_cfg.get("impl", "per_head") or "per_head")
  if impl not in LOSS_IMPLS:
    raise ValueError(f"loss.impl={impl!r}: expected one of {LOSS_IMPLS}")
  return impl


def _loss_fn_and_impl(loss_cfg, loss_fn: Callable | None) -> tuple[Callable, str]:
  """``(lk_loss, loss.impl)``, or a caller's ``loss_fn`` on the reference path (it takes stacked logits)."""
  if loss_fn is not None:
    return loss_fn, "reference"
  from lkjax.losses import lk_loss
  return lk_loss, loss_impl(loss_cfg)


def output_layers(model, num_heads: int) -> list[Callable[[jax.Array], jax.Array]]:
  """The model's K output layers ``features -> logits``: ``model.output_layers()`` when it has them (the
  stacked weights split once per forward), else ``model.feature_logits(., k)``."""
  if hasattr(model, "output_layers"):
    return list(model.output_layers())
  return [lambda f, k=k: model.feature_logits(f, k) for k in range(num_heads)]


def per_head_loss(model, batch: Mapping[str, jax.Array], target: Mapping[str, jax.Array], kind: str,
                  kw: Mapping[str, Any]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The LK objective head by head from ``model.features``: no ``[K, B, T, Vd]`` array is built.

  Head k's features are shifted right by k+1 positions (so row t holds the prediction of x[t+1]
  made at t-k-1), which lines every head up with the UNshifted target logits ``[B, T, Vd]``: their
  probabilities (`lkjax.losses_chunked.target_probs`) are computed once and shared by all heads.  Each
  head's logits feed `lkjax.losses_chunked.token_alpha_kl_probs` (hand-written VJP: one fused pass per
  direction, vocabulary chunks of ``chunk_size``, default 8192), and `lkjax.losses.lk_objective` reduces
  the ``[K, B, T]`` per-token terms exactly as `lkjax.losses.lk_loss` does.
  """
  feats = model.features(batch)
  num_heads = len(feats)
  y_d, lse = batch_target(batch, target)
  mask = head_mask(batch["loss_mask"], batch["segment_ids"], num_heads)
  chunk = int(kw.get("chunk_size") or losses_chunked.DEFAULT_CHUNK_SIZE)
  probs = losses_chunked.target_probs(y_d, lse)     # shared by every head: computed once
  alphas, kls, masks = [], [], []
  heads = output_layers(model, num_heads)
  for k, f in enumerate(feats):
    z = heads[k](shift_right(f, k + 1, axis=1))
    a, kl = losses_chunked.token_alpha_kl_probs(z, probs, chunk_size=chunk, **needed_grads(kind))
    alphas.append(a)
    kls.append(kl)
    masks.append(shift_right(mask[k], k + 1, axis=1, fill=False))
  obj_kw = {key: v for key, v in kw.items() if key != "chunk_size"}
  return lk_objective(jnp.stack(alphas), jnp.stack(kls), jnp.stack(masks), kind, aligned="target", **obj_kw)


def _forward_loss(graphdef, loss_fn: Callable, kind: str, kw: Mapping[str, Any], dtype,
                  params, rest, target, batch, step, impl: str = "per_head"):
  """Loss and metrics of one (micro-)batch; differentiable in ``params``."""
  model = nnx.merge(graphdef, cast_floating(params, dtype), cast_floating(rest, dtype))
  if impl == "per_head" and hasattr(model, "features"):
    return per_head_loss(model, batch, target, kind, dict(kw, step=step))
  logits = model(batch)
  num_heads = logits.shape[0]
  mask = head_mask(batch["loss_mask"], batch["segment_ids"], num_heads)
  y_d, lse = target_distribution(batch, target, num_heads)
  return loss_fn(logits, y_d, mask, kind, step=step, target_lse=lse, **kw)


def _split_micro(batch: Mapping[str, jax.Array], accum: int, batch_axes) -> dict[str, jax.Array]:
  """``[B, ...] -> [A, B/A, ...]`` with micro-batch i = rows i, i+A, ... (device-local rows stay local)."""
  out = {}
  for k, x in batch.items():
    b = x.shape[0]
    if b % accum:
      raise ValueError(f"batch[{k!r}] has {b} rows, not divisible by optim.grad_accum={accum}")
    y = jnp.swapaxes(x.reshape((b // accum, accum) + x.shape[1:]), 0, 1)
    if batch_axes is not None:
      y = jax.lax.with_sharding_constraint(y, batch_axes(y.ndim))
    out[k] = y
  return out


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, loss_cfg, *,
                    total_steps: int, precision: str = "fp32", grad_accum: int = 1,
                    shardings: Mapping[str, Any] | None = None, loss_fn: Callable | None = None,
                    donate: bool = True) -> Callable:
  """Build the jitted ``train_step(state, rest, target, batch) -> (state, metrics)``.

  Args:
    graphdef: the draft's graph (from ``nnx.split(model, nnx.Param, ...)``).
    tx: optax transformation for ``state["params"]``.
    loss_cfg: the config's ``loss`` section.
    total_steps: length of training (lambda schedules).
    precision: "bf16" or "fp32" compute (params and optimizer state are always float32).
    grad_accum: micro-batches per step.
    shardings: ``{"state", "rest", "target", "batch", "mesh", "batch_spec"}`` -- explicit in/out shardings
      (None: let jit place everything, single device).
    loss_fn: `lkjax.losses.lk_loss` or a function with its signature.
    donate: donate the input state buffers (the caller must not reuse them).

  Returns metrics: per head ``alpha``, ``lambda``, ``kl``, ``tv`` ``[K]`` (and the other lk_loss metrics),
  scalars ``loss``, ``tau``, ``grad_norm`` (before clipping), ``lr``-free (the loop logs the schedule).
  """
  loss_fn, impl = _loss_fn_and_impl(loss_cfg, loss_fn)
  dtype = compute_dtype(precision)
  kind = loss_cfg.kind
  kw = loss_kwargs(loss_cfg, total_steps)
  accum = int(grad_accum)
  batch_axes = None
  if shardings is not None and accum > 1:
    mesh, bspec = shardings["mesh"], shardings["batch_spec"]
    batch_axes = lambda nd: NamedSharding(mesh, P(None, *bspec(nd - 1)))  # noqa: E731

  def grads_of(params, rest, target, batch, step):
    f = lambda p: _forward_loss(graphdef, loss_fn, kind, kw, dtype, p, rest, target, batch, step, impl)  # noqa: E731
    (_, metrics), grads = jax.value_and_grad(f, has_aux=True)(params)
    return grads, metrics

  def accumulated_grads(params, rest, target, batch, step):
    if accum == 1:
      return grads_of(params, rest, target, batch, step)
    micro = _split_micro(batch, accum, batch_axes)

    def body(carry, mb):
      g, m = grads_of(params, rest, target, mb, step)
      return jax.tree.map(jnp.add, carry, (g, m)), None

    shapes = jax.eval_shape(lambda: grads_of(params, rest, target, jax.tree.map(lambda x: x[0], micro), step))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    (gsum, msum), _ = jax.lax.scan(body, zeros, micro)
    grads = jax.tree.map(lambda g: g / accum, gsum)
    metrics = jax.tree.map(lambda m: m / accum, msum)
    metrics["tokens"] = msum["tokens"]  # counts add up, they are not averaged
    return grads, metrics

  def train_step(state, rest, target, batch):
    params, step = state["params"], state["step"]
    grads, metrics = accumulated_grads(params, rest, target, batch, step)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state["rng"]))[0])
    new_state = dict(params=new_params, opt_state=opt_state, step=step + 1, rng=rng)
    metrics = dict(metrics, grad_norm=grad_norm)
    return new_state, metrics

  donate_argnums = (0,) if donate else ()
  if shardings is None:
    return jax.jit(train_step, donate_argnums=donate_argnums)
  rep = NamedSharding(shardings["mesh"], P())
  return jax.jit(train_step,
                 in_shardings=(shardings["state"], shardings["rest"], shardings["target"], shardings["batch"]),
                 out_shardings=(shardings["state"], rep), donate_argnums=donate_argnums)


def make_eval_step(graphdef: nnx.GraphDef, loss_cfg, *, total_steps: int, precision: str = "fp32",
                   shardings: Mapping[str, Any] | None = None, loss_fn: Callable | None = None) -> Callable:
  """Jitted ``eval_step(params, rest, target, batch, step) -> metrics`` (no gradient, no update)."""
  loss_fn, impl = _loss_fn_and_impl(loss_cfg, loss_fn)
  dtype = compute_dtype(precision)
  kind, kw = loss_cfg.kind, loss_kwargs(loss_cfg, total_steps)

  def eval_step(params, rest, target, batch, step):
    return _forward_loss(graphdef, loss_fn, kind, kw, dtype, params, rest, target, batch, step, impl)[1]

  if shardings is None:
    return jax.jit(eval_step)
  rep = NamedSharding(shardings["mesh"], P())
  return jax.jit(eval_step, in_shardings=(shardings["state"]["params"], shardings["rest"], shardings["target"],
                                          shardings["batch"], rep), out_shardings=rep)


def init_state(params: Any, tx: optax.GradientTransformation, seed: int) -> dict[str, Any]:
  """Fresh train state for pure-dict ``params``."""
  return dict(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32),
              rng=jax.random.key_data(jax.random.key(seed)))


def state_shardings(param_shardings: Any, tx: optax.GradientTransformation, params: Any, mesh) -> dict:
  """Shardings of the train state given the params' shardings (moments follow params)."""
  from lkjax.sharding import opt_state_shardings
  rep = NamedSharding(mesh, P())
  return dict(params=param_shardings, opt_state=opt_state_shardings(tx, params, param_shardings, mesh),
              step=rep, rng=rep)


def aggregate_eval(metrics_list: list[Mapping[str, Any]]) -> dict[str, Any]:
  """Token-weighted mean of per-batch eval metrics; ``tau`` recomputed from the aggregated alpha.

  Per-head quantities (``[K]``) are weighted by each batch's per-head token count, scalars (``loss``) by
  the total count; ``tokens`` are summed.
  """
  import numpy as np
  if not metrics_list:
    raise ValueError("aggregate_eval: no eval batches (is the validation split empty?)")
  ms = [jax.tree.map(lambda x: np.asarray(x, np.float64), dict(m)) for m in metrics_list]
  tok = np.stack([m["tokens"] for m in ms])                      # [N, K]
  out = {"tokens": tok.sum(0)}
  wk = tok / np.maximum(tok.sum(0, keepdims=True), 1.0)
  ws = tok.sum(1) / max(tok.sum(), 1.0)
  for key in ms[0]:
    if key in ("tokens", "tau"):
      continue
    vals = np.stack([m[key] for m in ms])
    out[key] = (vals * wk).sum(0) if vals.ndim == 2 else (vals * ws).sum(0)
  out["tau"] = 1.0 + np.sum(np.cumprod(out["alpha"]))
  return out
