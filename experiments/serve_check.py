"""Serve an lkjax export in real vLLM and check it: ``python experiments/serve_check.py --workdir=runs/eagle3``.

Builds the pinned vLLM CPU environment first if needed (``serving/build_env.sh`` -> ``.venv-vllm/``, apart
from lkjax's own), exports the draft, then runs the packaged target in vLLM with and without the draft
(``serving/vllm_worker.py``, in that environment) and lkjax's own T = 0 speculative decoding of the same
draft on the same prompts (`lkjax.export.vllm_engine.check_export`).  It asserts:

  loads     the draft loads with no missing weights (vLLM's own check) and no unused checkpoint tensor
  identity  greedy outputs with speculation equal the target alone, token for token
  counters  per prompt, vLLM's drafts, draft tokens, accepted tokens and accepted-per-position counters
            equal lkjax's (same rounds)

The draft: ``--workdir`` / ``--checkpoint`` (a training run), or ``--init=<arch>`` for an untrained draft
(seeded): ``medusa`` heads start from the target's LM head with identity residual blocks, so they draft
the target's next-token guess at every position and are accepted on repetitive text; ``eagle3`` is
random.  Prompts: the first turn of the first ``--limit`` prompts of each benchmark, plus
``--repeat_prompts`` (requests for repetitive text, where even an untrained draft is accepted).
Results: ``<out>/serve_check.json`` (exit status 1 when a check fails).
"""
from __future__ import annotations

import os
import sys

# The repository root, so the entry point works from a plain checkout too (no pip install -e).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

flags.DEFINE_string("workdir", None, "Training run whose latest checkpoint is checked.")
flags.DEFINE_string("checkpoint", None, "A checkpoint directory <workdir>/checkpoints/<step>.")
flags.DEFINE_enum("init", None, ["eagle3", "medusa"], "Check an untrained draft of this arch instead.")
flags.DEFINE_integer("draft_vocab_size", 8192, "Draft vocabulary of an --init draft (0 = the full vocabulary).")
flags.DEFINE_list("benchmarks", ["mt_bench", "humaneval", "gsm8k"], "Benchmarks whose first turns are prompts.")
flags.DEFINE_integer("limit", 2, "First N prompts of each benchmark.")
flags.DEFINE_integer("repeat_prompts", 2, "Extra prompts asking for repetitive text (0 = none).")
flags.DEFINE_integer("max_new_tokens", 48, "New tokens per prompt (EOS ignored by both engines).")
flags.DEFINE_integer("num_draft", None, "K (default: the draft's number of heads).")
flags.DEFINE_string("out", "runs/serve_check", "Output directory.")
flags.DEFINE_string("vllm_venv", None, "The vLLM environment (default $LKJAX_VLLM_VENV or .venv-vllm).")
flags.DEFINE_integer("seed", 0, "Seed of an --init draft and its draft vocabulary.")
FLAGS = flags.FLAGS

# SmolLM2 answers the first with "****\n****\n..." (repeated tokens, which an untrained MEDUSA drafts right).
REPEAT_PROMPTS = ("Write a long row of stars: **********",
                  "Count from 1 to 40, one number per line.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  from lkjax import cli
  cli.exactly_one(workdir=FLAGS.workdir, checkpoint=FLAGS.checkpoint, init=FLAGS.init)
  if not 0 <= FLAGS.repeat_prompts <= len(REPEAT_PROMPTS):
    raise app.UsageError(f"--repeat_prompts={FLAGS.repeat_prompts}: must be in [0, {len(REPEAT_PROMPTS)}]")

  from lkjax import files
  from lkjax.data.benchmarks import load_benchmark
  from lkjax.export import export_draft, vllm_engine
  from lkjax.targets.hf import TargetModel

  python = vllm_engine.build_env(FLAGS.vllm_venv)
  os.makedirs(FLAGS.out, exist_ok=True)
  if FLAGS.init:
    arch = FLAGS.init
    target = TargetModel.load("smollm2")
    draft = vllm_engine.untrained_draft(arch, target, draft_vocab_size=FLAGS.draft_vocab_size, seed=FLAGS.seed)
  else:
    from lkjax.eval.run import load_target_for
    from lkjax.train import loop

    trained = loop.load_trained_draft(FLAGS.workdir or FLAGS.checkpoint, compute_dtype=vllm_engine.DTYPE)
    arch, draft = trained.config.model.arch, trained.model
    target = load_target_for(trained.target_info)
  k = FLAGS.num_draft or int(draft.num_heads)
  draft_dir = export_draft(draft, arch, os.path.join(FLAGS.out, "draft"), target.info, overwrite=True)
  prompts = [target.encode_prompt(p.turns[0]) for b in FLAGS.benchmarks for p in load_benchmark(b, limit=FLAGS.limit)]
  prompts += [target.encode_prompt(t) for t in REPEAT_PROMPTS[:FLAGS.repeat_prompts]]
  result = vllm_engine.check_export(arch, draft_dir, draft, target, prompts, num_draft=k,
                                    max_new_tokens=FLAGS.max_new_tokens, work_dir=FLAGS.out, python=python)
  result["source"] = os.path.abspath(FLAGS.workdir or FLAGS.checkpoint) if not FLAGS.init else f"init:{arch}"
  result["commit"] = files.git_commit()
  path = os.path.join(FLAGS.out, "serve_check.json")
  files.write_json(path, result)
  c = result["counters"]
  print(f"[lkjax] vLLM {result['vllm_version']} served {arch} ({result['draft_model_class']}): "
        f"checks {result['checks']}; tau lkjax {result['tau']['lkjax']} vLLM {result['tau']['vllm']}; "
        f"accepted per position lkjax {c['lkjax']['accepted_per_pos']} vLLM {c['vllm']['accepted_per_pos']}")
  print(f"[lkjax] results: {path}")
  return 0 if result["ok"] else 1


if __name__ == "__main__":
  from lkjax import cli
  cli.run(main, config_flag=None)
