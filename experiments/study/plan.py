"""The KL-vs-LK study's plan: ``python experiments/study/run.py --root=runs/study --plan=experiments/study/plan.py``.

One plan for the paper's Tables 1-2 on the packaged SmolLM2-135M-Instruct target: every run shares the
same regenerated data set, step budget, batch, evaluation prompts and seeds; `study.build_runs` (experiments/study/study.py)
turns this config into the run list:

  * all four architectures (EAGLE-3, MEDUSA, MLP-Speculator, MTP) x {KL, L_alpha, L_lambda} with
    eta = 3 (10 for MEDUSA), seed 0;
  * EAGLE-3 ablation: L_lambda with eta in {0.7, 1, 10}, fixed lambda = 0.5, pure TV (seed 0);
  * EAGLE-3 KL and L_lambda(eta=3) again with seed 1 (init AND data order change; the validation split
    does not), for the seed spread.
  * beyond the paper (``chain_arms``, docs/design.md#objectives-on-the-draft-chain): EAGLE-3 with the chain
    objective ``lk_tau``, and EAGLE-3 L_lambda(eta=3) with reach head weights, seed 0, against the main
    table's KL and L_lambda with the same paired analysis (their own table in docs/results.md); they run
    last.

21 training runs; each is evaluated at T = 0 and T = 1 on MT-bench (both turns), HumanEval and
GSM-Symbolic with K = 7 (EAGLE-3, MTP) or 6 (MEDUSA, MLP-Speculator), bootstrap 95% CIs over prompts,
and the offline tau_off on the validation shards.

Budget for the default (CPU) variant -- 2-core CPU, at most ~6 hours in all
------------------------------------------------------------------------------
Unit costs on this 2-core machine (2026-11-22; ``python experiments/study/run.py --measure`` re-measures):
  * data: regenerating the 480 prompts took 24 min and the hidden-state pass ~10 min, both while other
    jobs shared the machine (generation ~1.1 s/prompt alone, batch 16, <= 128 new tokens).
  * evaluation, one turn at one temperature, 32 new tokens, SmolLM2 verifying on CPU: ~5-6 s of
    speculative decoding for a barely trained draft (a round per token; fewer rounds as tau grows) and
    ~2.6 s more when the target-only baseline is also decoded.  The study skips the baseline
    (``eval.baseline = False``): tau does not need it and CPU speed-ups of a 135M target say nothing.
    Per run ~1 min of compile + warm-up + the offline tau_off on the validation split.
  * training: the EAGLE-3 step at batch 8 x 256 is 6-10 s (benchmarks/README.md), the other drafts 4-8 s.

  stage   plan                                                 estimate (machine to itself)
  data    480 prompts x <= 128 new tokens, prompts <= 800 chars ~0.6 h
  train   21 runs x 60 steps x batch 8 x 256 tokens            ~2.4 h
          (~1 epoch of the ~456 training sequences)
  eval    21 runs x 2 temperatures x 3 prompts per benchmark   ~1.3 h
          (MT-bench 3 questions x 2 turns + 3 HumanEval + 3 GSM8K = 12 turns), <= 32 new tokens per turn
  total                                                        ~4.2 h

Budget adaptations (documented in docs/results.md): with ~120k training tokens per run instead of the
paper's hundreds of millions, the recipe's lr 4e-4 barely moves the drafts.  20-step EAGLE-3 pilots on the trainer's default data
(validation first-head alpha): 0.052 at lr 4e-4; with the draft LM head initialised from the target's,
0.064 at 4e-4, 0.084 at 1e-3 and 0.076 at 3e-3.  So the study uses lr ``train.lr`` with a short warmup, and EAGLE-3's
draft LM head starts from the target head's draft-vocabulary rows (MTP shares the target head and
MEDUSA's heads start as it already).  ``--max_hours`` bounds any overrun, and the key comparisons
(every arch's KL and L_lambda) run first.

Variants (``--plan=experiments/study/plan.py:<args>``):
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

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Raw wall-clock timings behind the budget (seconds unless named otherwise) on this 2-core machine,
# 2026-11-22, while the developer's own jobs shared it (so pessimistic; cpu_share = the 1.7 effective
# cores the study gets alone means no rescaling).  Re-measure: ``experiments/study/run.py --measure``.
MEASURED = dict(
    when="2026-11-22, 2-vCPU AMD EPYC (AVX-512), shared with 1-2 other jobs",
    cpu_share=1.7,
    gen_s_per_prompt=3.07,           # the study's 480 prompts, <= 128 new tokens, batch 16: 24.6 min
    gen_max_new_tokens=128,
    precompute_s_per_prompt=1.3,     # the same 480 replies (hidden states + shard writes)
    train_step_s=dict(eagle3=7.6, medusa=4.5, mlp_speculator=6.0, mtp=6.5),  # batch 8 x 256, bf16; EAGLE-3
                                     # from 20-step pilots, the others scaled by benchmarks/results/bench_train.json
    train_tokens_per_step=8 * 256,
    eval_prompt_s=5.9,               # one 32-token turn, speculative only (eval.baseline = False), idle
                                     # machine, a 30-step EAGLE-3 (tau ~1.07); +2.6 s with the baseline
    eval_max_new_tokens=32,
    eval_overhead_s=75.0,            # model + target load, compile 15 s, warm-up 31 s, offline tau ~20 s
)

LR = 1e-3  # the study's learning rate (the recipe's 4e-4 barely moves a draft in 60 steps)


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
      arch: os.path.join(_REPO, "configs", f"{arch}.py") for arch in ("eagle3", "medusa", "mlp_speculator", "mtp")})
  c.archs = ("eagle3", "medusa", "mlp_speculator", "mtp")
  # K draft tokens per round at evaluation (docs/design.md#architectures); checked against each config's model.num_heads.
  c.num_draft = ml_collections.ConfigDict(dict(eagle3=7, medusa=6, mlp_speculator=6, mtp=7))
  # eta of L_lambda in the main table (docs/design.md#lk-losses: 3, and 10 for MEDUSA).
  c.eta = ml_collections.ConfigDict(dict(eagle3=3.0, medusa=10.0, mlp_speculator=3.0, mtp=3.0))
  c.main_losses = ("kl", "lk_alpha", "lk_hybrid")
  c.ablation = ml_collections.ConfigDict(dict(arch="eagle3", etas=(0.7, 1.0, 10.0), fixed_lambda=0.5, tv=True))
  c.seeds = (0,)                     # every run
  c.extra_seeds = (1,)               # EAGLE-3 KL and L_lambda only
  c.extra_seed_losses = ("kl", "lk_hybrid")
  # Beyond the paper: (arch, loss kind, loss.head_weighting) cells, seed 0; lk_hybrid takes the arch's eta above.
  c.chain_arms = (("eagle3", "lk_tau", "gamma"), ("eagle3", "lk_hybrid", "reach"))

  # The study's own data set: larger than the trainer's embedded default (128 x 128), same recipe.
  c.data = ml_collections.ConfigDict(dict(
      dir=a.data_dir,                # "": <root>/data, prepared by the study
      num_prompts=480, max_new_tokens=128, max_length=256, temperature=0.0, seed=0, gen_batch_size=16,
      max_prompt_chars=800, val_fraction=0.05))

  # Training knobs applied to every run on top of configs/<arch>.py (recipe: lr 4e-4, cosine, clip 0.5;
  # lr raised for the tiny token budget, see the docstring).
  c.train = ml_collections.ConfigDict(dict(
      batch_size=8, num_steps=60, warmup_steps=5, lr=LR, eval_every=30, eval_steps=4, log_every=5,
      checkpoint_every=10, precision="bf16"))
  # Per-architecture config overrides (nested = dotted keys of configs/<arch>.py).
  c.arch_overrides = ml_collections.ConfigDict(dict(eagle3=dict(model=dict(init_lm_head_from_target=True))))

  c.eval = ml_collections.ConfigDict(dict(
      benchmarks=("mt_bench", "humaneval", "gsm8k"), temperatures=(0.0, 1.0), limit=3, max_new_tokens=32,
      seed=0, n_boot=2000, offline_max_batches=0, num_threads=0,  # 0: all val batches / all cores
      baseline=False))                                           # tau only: no target-only decoding

  c.docs = ml_collections.ConfigDict(dict(dir=os.path.join(_REPO, "docs"), name="results"))

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
    c.eval.baseline = True           # speed-ups are worth measuring with the draft on an accelerator
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
