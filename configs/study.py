"""The KL-vs-LK study (issue 8): ``python experiments/reproduce.py --root=runs/study --plan=configs/study.py``.

One plan for the paper's Tables 1-2 on the packaged SmolLM2-135M-Instruct target: every run shares the
same regenerated data set, step budget, batch, evaluation prompts and seeds; `lkjax.study.build_runs`
turns this config into the run list:

  * all four architectures (EAGLE-3, MEDUSA, MLP-Speculator, MTP) x {KL, L_alpha, L_lambda} with
    eta = 3 (10 for MEDUSA), seed 0;
  * EAGLE-3 ablation: L_lambda with eta in {0.7, 1, 10}, fixed lambda = 0.5, pure TV (seed 0);
  * EAGLE-3 KL and L_lambda(eta=3) again with seed 1 (init AND data order change; the validation split
    does not), for the seed spread.

19 training runs; each is evaluated at T = 0 and T = 1 on MT-bench (both turns), HumanEval and
GSM-Symbolic with K = 7 (EAGLE-3, MTP) or 6 (MEDUSA, MLP-Speculator), bootstrap 95% CIs over prompts,
and the offline tau_off on the validation shards.

Budget arithmetic for the default (CPU) variant -- 2-core CPU, about 6 hours in all
-------------------------------------------------------------------------------------
Unit costs were measured (``MEASURED`` below; ``python experiments/reproduce.py --measure`` re-measures,
`lkjax.study.time_costs`) on this machine WHILE ~6 other jobs shared its 2 cores (load average ~8):
the measuring process got cpu_share = 0.47 CPU-seconds per second. The study itself is meant to run
alone, so the estimate rescales the measured wall times by 0.47 / 1.7 (1.7 effective cores of 2) =
x0.28. That is fair for the compute-bound parts (training: XLA matmuls; data: batched generation and
the hidden-state forward) and optimistic-to-unknown for evaluation, which is latency-bound (one target
forward per round at batch 1) and suffers more than linearly from oversubscription.

  unit (measured wall, shared machine -> x0.28)     value
  train step, batch 8 x 256 tokens (compile excluded)
      EAGLE-3 32.9 s -> 9.1 s; MEDUSA 18.2 -> 5.0; MLP-Speculator 29.1 -> 8.1; MTP 24.9 -> 6.9
      (916 / 485 / 503 / 782 GFLOP per step; K unrolled heads over an 8192-token draft vocabulary plus the
      target's 49152-way log-sum-exp on every token)
  data, per prompt: generation 20.7 s at <= 96 new tokens (batch 16) + hidden states 2.3 s
  evaluation, one single-turn prompt at one temperature, 64 new tokens, speculative AND target-only
      decoding (`evaluate_draft` always times both): 261 s -> 72 s (of which target-only 87 s -> 24 s);
      per-run compile + warm-up + offline estimate: 230 s -> 64 s. The measuring draft was barely
      trained (tau ~1, a round per token); a trained draft needs fewer rounds, so this is pessimistic.

  stage   plan                                               arithmetic (machine to itself)
  data    320 prompts x 128 new tokens (2x the trainer's     320 x (20.7 x 128/96 + 2.3) x 0.28 = 0.7 h
          default 160 x 128), prompts <= 800 characters
  train   19 runs x 50 steps x batch 8 x 256 tokens          50 x (10 x 9.1 + 3 x 5.0 + 3 x 8.1 + 3 x 6.9)
          (~1.3 epochs of the 304 training sequences)          = 50 x 151 s = 2.1 h
  eval    19 runs x 2 temperatures x 2 prompts per benchmark 19 x (64 + 2 x 8 x 72 x 32/64) = 3.4 h
          (MT-bench 2 questions x 2 turns + 2 HumanEval +
          2 GSM8K = 8 turns), <= 32 new tokens per turn
  total                                                      ~6.2 h  (as measured on the shared
                                                             machine: ~22 h)

Evaluation dominates and is the thinnest part of the plan (2 prompts per benchmark give wide CIs). It
shrinks by a third to a half if `evaluate_draft` can skip the target-only decoding (only needed for
speed-ups, not for tau); then ``limit=3`` or ``limit=4`` fits the same budget. Re-measure on an idle machine (``--measure``), update ``MEASURED``,
and check ``--dry_run`` before launching; ``--max_hours`` bounds any overrun, and the key comparisons
(every arch's KL and L_lambda) run first.

Variants (``--plan=configs/study.py:<args>``):
  (none)    the CPU study sized for ~6 hours on 2 cores (see above)
  gpu       larger data / steps / prompts for a lent GPU (JAX trains on the GPU; the PyTorch
            target -- generation, hidden states, verification -- runs on the machine's 16 CPU cores)
  tiny      a pipeline check in minutes (2 steps, 1 prompt per benchmark, 8 new tokens); its docs go
            under ``<root>/docs`` so it never overwrites the committed ``docs/results.md``
Other args: ``steps=N`` (training steps), ``limit=N`` (prompts per benchmark), ``prompts=N`` (data-set
prompts), ``data_dir=PATH`` (use an existing shard directory instead of preparing one).
"""
from __future__ import annotations

import os

import ml_collections

from lkjax.config_args import parse_arg

_HERE = os.path.dirname(os.path.abspath(__file__))

# Raw wall-clock timings behind the budget (seconds unless named otherwise), from `lkjax.study.time_costs`
# (train, eval) and the data-preparation log (generation, hidden states) on the shared 2-core machine.
MEASURED = dict(
    when="2026-11-22, 2-vCPU AMD EPYC (AVX-512), load average ~8 from other engineers' jobs",
    cpu_share=0.47,                  # CPU-seconds per wall-second the measuring process got (ps, 3 runs)
    gen_s_per_prompt=20.7,           # 32 ShareGPT prompts <= 1500 chars, <= 96 new tokens, batch 16: 662 s
    gen_max_new_tokens=96,
    precompute_s_per_prompt=2.27,    # the same 32 replies: 4890 tokens in 72.7 s
    train_step_s=dict(eagle3=32.85, medusa=18.18, mlp_speculator=29.12, mtp=24.92),
    train_tokens_per_step=8 * 256,
    eval_prompt_s=261.1,             # one HumanEval prompt (170 tokens), mean of T = 0 (235 s) and T = 1 (287 s),
                                     # both modes; a 3-step EAGLE-3 draft (tau ~1: 62 rounds for 64 tokens)
    eval_max_new_tokens=64,
    eval_overhead_s=229.9,           # compile 48 s + warm-up 159 s + offline estimate 23 s, per run
)

def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The study plan; ``arg``: ``gpu`` | ``tiny`` and ``steps=``, ``limit=``, ``prompts=``, ``data_dir=``."""
  a = parse_arg(arg, gpu=False, tiny=False, steps=0, limit=0, prompts=0, data_dir="")
  if a.gpu and a.tiny:
    raise ValueError("plan args gpu and tiny exclude each other")
  variant = "gpu" if a.gpu else "tiny" if a.tiny else "cpu"

  c = ml_collections.ConfigDict()
  c.name = f"study_{variant}"
  c.variant = variant
  c.target = "smollm2"
  c.arch_configs = ml_collections.ConfigDict({
      arch: os.path.join(_HERE, f"{arch}.py") for arch in ("eagle3", "medusa", "mlp_speculator", "mtp")})
  c.archs = ("eagle3", "medusa", "mlp_speculator", "mtp")
  # K draft tokens per round at evaluation (DESIGN §4); checked against each config's model.num_heads.
  c.num_draft = ml_collections.ConfigDict(dict(eagle3=7, medusa=6, mlp_speculator=6, mtp=7))
  # eta of L_lambda in the main table (DESIGN §2: 3, and 10 for MEDUSA).
  c.eta = ml_collections.ConfigDict(dict(eagle3=3.0, medusa=10.0, mlp_speculator=3.0, mtp=3.0))
  c.main_losses = ("kl", "lk_alpha", "lk_hybrid")
  c.ablation = ml_collections.ConfigDict(dict(arch="eagle3", etas=(0.7, 1.0, 10.0), fixed_lambda=0.5, tv=True))
  c.seeds = (0,)                     # every run
  c.extra_seeds = (1,)               # EAGLE-3 KL and L_lambda only
  c.extra_seed_losses = ("kl", "lk_hybrid")

  # The study's own data set: larger than the trainer's embedded default (160 x 128), same recipe.
  c.data = ml_collections.ConfigDict(dict(
      dir=a.data_dir,                # "": <root>/data, prepared by the study
      num_prompts=480, max_new_tokens=128, max_length=256, temperature=0.0, seed=0, gen_batch_size=16,
      max_prompt_chars=800, val_fraction=0.05))

  # Training knobs applied to every run on top of configs/<arch>.py (recipe: lr 4e-4, cosine, clip 0.5).
  c.train = ml_collections.ConfigDict(dict(
      batch_size=8, num_steps=50, warmup_steps=5, eval_every=25, eval_steps=4, log_every=5,
      checkpoint_every=10, precision="bf16"))

  c.eval = ml_collections.ConfigDict(dict(
      benchmarks=("mt_bench", "humaneval", "gsm8k"), temperatures=(0.0, 1.0), limit=2, max_new_tokens=32,
      seed=0, n_boot=2000, offline_max_batches=0, num_threads=0))  # 0: all val batches / all cores

  c.docs = ml_collections.ConfigDict(dict(dir=os.path.join(os.path.dirname(_HERE), "docs"), name="results"))

  if variant == "gpu":
    # Not measured (no GPU was lent while this was written): re-run --measure there first. JAX trains on
    # the GPU; the PyTorch target (generation, hidden states, verification) stays on the 16 CPU cores,
    # so data and evaluation grow less than training.
    c.data.num_prompts = 2000
    c.data.max_new_tokens = 256
    c.data.max_length = 512
    c.data.max_prompt_chars = 1500
    c.train.batch_size = 32
    c.train.num_steps = 600          # ~10 epochs of the ~1900 training sequences, as in the paper
    c.train.warmup_steps = 50
    c.train.eval_every = 150
    c.train.eval_steps = 8
    c.train.log_every = 20
    c.train.checkpoint_every = 100
    c.eval.limit = 20                # 20 MT-bench questions (2 turns), 20 HumanEval, 20 GSM8K-style
    c.eval.max_new_tokens = 128
    c.docs.name = "results_gpu"
  if variant == "tiny":
    c.data.num_prompts = 16
    c.data.max_new_tokens = 32
    c.data.max_length = 128
    c.data.val_fraction = 0.2
    c.train.batch_size = 4
    c.train.num_steps = 2
    c.train.warmup_steps = 1
    c.train.eval_every = 2
    c.train.eval_steps = 1
    c.train.log_every = 1
    c.train.checkpoint_every = 2
    c.eval.limit = 1
    c.eval.max_new_tokens = 8
    c.eval.n_boot = 200
    c.eval.offline_max_batches = 1
    c.docs.dir = ""                  # <root>/docs: a pipeline check never touches the committed docs
  if a.steps:
    c.train.num_steps = a.steps
  if a.limit:
    c.eval.limit = a.limit
  if a.prompts:
    c.data.num_prompts = a.prompts
  c.lock()
  return c
