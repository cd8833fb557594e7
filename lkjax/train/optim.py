"""Optimizer: global-norm clip -> AdamW with linear warmup and cosine decay (the paper's recipe).

``optim.impl="fused"`` (the default) computes the same clip + AdamW update in one elementwise expression per
parameter (`fused_adamw`), with optax's state: XLA's CPU backend compiled optax's chain of transformations into
separate passes over every parameter-sized array, 357 ms against 95 ms for the MLP-Speculator's 170 M-entry
stage embeddings on one device (docs/bench_train.md, session 12). ``"optax"`` runs optax's chain itself.

Gradient accumulation is not an optax wrapper here: the train step (`lkjax.train.step`) splits the batch
into ``grad_accum`` micro-batches and averages their gradients in a scan before ONE optimizer update, so
the optimizer, its state and the step count are the same with or without accumulation.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax
from optax._src import numerics

IMPLS = ("fused", "optax")


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """``lr * min(1, (s+1)/warmup)`` during warmup, then cosine to ``lr * end_lr_factor`` at ``total_steps``.

  Step 0 already uses lr/warmup (not 0) so the first update moves the parameters.
  """
  if cfg.lr <= 0:
    raise ValueError(f"optim.lr={cfg.lr}: must be positive")
  if cfg.warmup_steps < 0:
    raise ValueError(f"optim.warmup_steps={cfg.warmup_steps}: must be >= 0")
  if total_steps <= 0:
    raise ValueError(f"total_steps={total_steps}: must be positive")
  warmup = int(cfg.warmup_steps)
  warm = optax.linear_schedule(cfg.lr / max(warmup, 1), cfg.lr, max(warmup - 1, 1)) if warmup > 0 else None
  if cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(cfg.lr, max(total_steps - warmup, 1), alpha=cfg.end_lr_factor)
  elif cfg.schedule == "constant":
    decay = optax.constant_schedule(cfg.lr)
  else:
    raise ValueError(f"optim.schedule={cfg.schedule!r}: expected 'cosine' or 'constant'")
  if warm is None:
    return decay
  return optax.join_schedules([warm, decay], [warmup])


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """``clip_by_global_norm(clip)`` (if clip > 0) then AdamW(b1, b2, eps, weight_decay) on the schedule,
  as optax's chain (``cfg.impl="optax"``) or fused (``"fused"``, the default; `fused_adamw`)."""
  if not 0 <= cfg.b1 < 1 or not 0 <= cfg.b2 < 1:
    raise ValueError(f"optim.b1={cfg.b1}, optim.b2={cfg.b2}: must be in [0, 1)")
  if cfg.grad_accum < 1:
    raise ValueError(f"optim.grad_accum={cfg.grad_accum}: must be >= 1")
  impl = cfg.get("impl", "fused")
  if impl not in IMPLS:
    raise ValueError(f"optim.impl={impl!r}: expected one of {IMPLS}")
  schedule = learning_rate_schedule(cfg, total_steps)
  parts = []
  if cfg.clip > 0:
    parts.append(optax.clip_by_global_norm(cfg.clip))
  parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay))
  chain = optax.chain(*parts)
  if impl == "optax":
    return chain
  return fused_adamw(chain, schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                     clip=cfg.clip)


def fused_adamw(chain: optax.GradientTransformation, schedule: optax.Schedule, *, b1: float, b2: float, eps: float,
                weight_decay: float, clip: float) -> optax.GradientTransformation:
  """``chain`` (optax's ``clip_by_global_norm(clip)`` if clip > 0, then ``adamw(schedule, ...)``) with the
  same state and the same arithmetic, written as one expression per parameter.

  The global norm is one reduction over the gradients; the clip scale, both moments, the bias correction,
  the decoupled weight decay and the learning rate then meet in one elementwise function of
  ``(g, mu, nu, p)``, which XLA compiles into one loop per parameter instead of a pass per transformation.
  Each operation is optax's, in optax's order (the clip as one scalar factor), so the updates agree with the
  chain's to float32 rounding
  (`tests/test_train_step.py::test_fused_adamw_matches_optax_chain`); the state is the chain's own (its
  ``init``), so checkpoints written with either implementation resume with the other.
  """

  def update(grads, state, params=None):
    if params is None:
      raise ValueError("fused AdamW: params are required (decoupled weight decay)")
    adam, decay_state, sched = state[-1]
    scale = None
    if clip > 0:
      # optax.clip_by_global_norm scales by clip / norm above the clip, as (t / norm) * clip per element;
      # one scalar factor instead (a rounding apart): the per-element select and division took a fused
      # update on the MLP-Speculator's embeddings from about 100 to about 300 ms.
      g_norm = optax.global_norm(grads)
      scale = jnp.where(g_norm < clip, 1.0, clip / g_norm)
    count = numerics.safe_increment(adam.count)
    beta1, beta2 = 1 - b1 ** count, 1 - b2 ** count
    step_size = -schedule(sched.count)

    def leaf(g, m, v, p):
      if scale is not None:
        g = g * scale.astype(g.dtype)
      m = (1 - b1) * g + b1 * m
      v = (1 - b2) * (g * g) + b2 * v
      u = (m / beta1.astype(m.dtype)) / (jnp.sqrt(v / beta2.astype(v.dtype)) + eps)
      u = u + weight_decay * p
      return jnp.array(step_size, dtype=u.dtype) * u, m, v

    out = jax.tree.map(leaf, grads, adam.mu, adam.nu, params)
    pick = lambda i: jax.tree.map(lambda _, o: o[i], grads, out)  # noqa: E731
    new_adam = adam._replace(count=count, mu=pick(1), nu=pick(2))
    new_sched = sched._replace(count=numerics.safe_increment(sched.count))
    return pick(0), state[:-1] + ((new_adam, decay_state, new_sched),)

  return optax.GradientTransformation(chain.init, update)
