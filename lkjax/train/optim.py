"""Optimizer: global-norm clip -> AdamW with linear warmup and cosine decay (the paper's recipe).

Gradient accumulation is not an optax wrapper here: the train step (`lkjax.train.step`) splits the batch
into ``grad_accum`` micro-batches and averages their gradients in a scan before ONE optimizer update, so
the optimizer, its state and the step count are the same with or without accumulation.
"""
from __future__ import annotations

import ml_collections
import optax


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
  """``clip_by_global_norm(clip)`` (if clip > 0) then AdamW(b1, b2, eps, weight_decay) on the schedule."""
  if not 0 <= cfg.b1 < 1 or not 0 <= cfg.b2 < 1:
    raise ValueError(f"optim.b1={cfg.b1}, optim.b2={cfg.b2}: must be in [0, 1)")
  if cfg.grad_accum < 1:
    raise ValueError(f"optim.grad_accum={cfg.grad_accum}: must be >= 1")
  parts = []
  if cfg.clip > 0:
    parts.append(optax.clip_by_global_norm(cfg.clip))
  parts.append(optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay))
  return optax.chain(*parts)
