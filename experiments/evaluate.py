"""Measure tau of a draft: ``python experiments/evaluate.py --config=configs/eagle3.py --workdir=runs/eagle3``.

Runs MT-bench (both turns, the second after the model's own first answer), HumanEval and GSM8K-style
(GSM-Symbolic, fixed seed) prompts with exact chain speculative decoding at each temperature, and the same
prompts with target-only decoding for the wall-clock speed-up (`lkjax.eval.run.evaluate_draft`).

The draft: ``--workdir`` (latest checkpoint of a training run), ``--checkpoint=<workdir>/checkpoints/<step>``,
or ``--import_eagle3=<HF dir>`` (a public EAGLE-3 draft, evaluated on ``--target``).  The target is the one
the draft's training data was made with (from the shard manifest; its weights are checked by sha256),
``--target`` overrides it.  K defaults to the config's ``model.num_heads`` (7 EAGLE-3/MTP, 6 MEDUSA/MLP-Speculator).

Quick look: ``--limit=5 --max_new_tokens=64``.  Outputs (default ``<workdir>/eval``): report.json, report.md,
report.png, answers.jsonl.

``--engine=vllm`` measures the same draft INSIDE real vLLM instead (`lkjax.export.vllm_engine.evaluate_in_vllm`;
the vLLM CPU environment is built first if needed, serving/build_env.sh): the draft is exported, and vLLM
decodes the first turn of each benchmark prompt with it and with the target alone, at batch 1 and at
``--vllm_batch``, giving tau, per-position acceptance and the wall-clock speed-up; at T = 0 lkjax's own
decoding of the same prompts runs too and the per-request counters are compared.  vLLM drafts greedily at
every temperature, so its T > 0 tau is not lkjax's exact-rejection tau.  Outputs beside lkjax's report:
vllm_report.json, vllm_report.md (EAGLE-3 and MEDUSA; vLLM 0.32 serves no MLP-Speculator or Llama MTP).
"""
from __future__ import annotations

import os
import sys

# The repository root, so the entry point works from a plain checkout too (no pip install -e).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Config file (configs/<arch>.py[:args]); used when the workdir "
                                "has no config.json, and for K with --import_eagle3.", lock_config=False)
flags.DEFINE_string("workdir", None, "Training run directory (its latest checkpoint is evaluated).")
flags.DEFINE_string("checkpoint", None, "A checkpoint directory <workdir>/checkpoints/<step>.")
flags.DEFINE_string("import_eagle3", None, "Evaluate a public EAGLE-3 draft (HF / SpecForge / speculators dir).")
flags.DEFINE_string("target", None, "Target override: packaged name (smollm2) or HF directory "
                    "(default: the training data's target; smollm2 with --import_eagle3).")
flags.DEFINE_list("benchmarks", ["mt_bench", "humaneval", "gsm8k"], "Benchmarks to run.")
flags.DEFINE_list("temperatures", ["0", "1"], "Decoding temperatures.")
flags.DEFINE_integer("limit", None, "First N prompts of each benchmark (default: all).")
flags.DEFINE_integer("max_new_tokens", 256, "New tokens per turn.")
flags.DEFINE_integer("num_draft", None, "K draft tokens per round (default: the config's model.num_heads).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_integer("max_context", None, "Positions available (default: the target's); longer prompts are "
                     "truncated and counted.")
flags.DEFINE_integer("threads", None, "torch threads for the target (default: all cores).")
flags.DEFINE_integer("batch_size", 16, "Prompts decoded at once (per-prompt random streams: the same answers "
                     "and tau as 1 = batch-1 decoding, in less time).")
flags.DEFINE_bool("offline", True, "Also report the offline tau from the run's validation shards.")
flags.DEFINE_string("out", None, "Output directory (default: <workdir>/eval).")
flags.DEFINE_string("label", None, "Name of the draft in the tables (default: the config's name).")
flags.DEFINE_enum("engine", "lkjax", ["lkjax", "vllm"], "lkjax: exact speculative decoding here; vllm: inside real "
                  "vLLM (its own environment, serving/build_env.sh).")
flags.DEFINE_integer("vllm_batch", 8, "--engine=vllm: the batched setting (requests decoded at once).")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  from lkjax import cli
  cli.exactly_one(workdir=FLAGS.workdir, checkpoint=FLAGS.checkpoint, import_eagle3=FLAGS.import_eagle3)
  if FLAGS.limit is not None and FLAGS.limit < 1:
    raise app.UsageError(f"--limit={FLAGS.limit}: must be >= 1 (leave it out for every prompt)")
  if FLAGS.batch_size < 1:
    raise app.UsageError(f"--batch_size={FLAGS.batch_size}: must be >= 1 (1 = batch-1 decoding)")
  if FLAGS.max_new_tokens < 1:
    raise app.UsageError(f"--max_new_tokens={FLAGS.max_new_tokens}: must be >= 1")
  from lkjax.data.benchmarks import BENCHMARKS
  unknown = [b for b in FLAGS.benchmarks if b not in BENCHMARKS]
  if unknown:
    raise app.UsageError(f"--benchmarks: unknown {unknown}; known: {', '.join(BENCHMARKS)}")
  try:
    temperatures = [float(t) for t in FLAGS.temperatures]
  except ValueError:
    raise app.UsageError(f"--temperatures={','.join(FLAGS.temperatures)}: expected numbers, e.g. 0,1") from None
  from lkjax import cli, distributed
  if not distributed.main_process_only("evaluation"):  # launched on every host: evaluate (and write) once
    return
  if FLAGS.target:
    cli.check_target(FLAGS.target, "--target")
  if FLAGS.import_eagle3 and not os.path.isdir(FLAGS.import_eagle3):
    raise FileNotFoundError(f"--import_eagle3={FLAGS.import_eagle3}: no such directory (an EAGLE-3 draft in "
                            "Hugging Face format: config.json + model.safetensors)")
  if not FLAGS.import_eagle3:
    from lkjax.train import loop
    loop.check_run_source(workdir=FLAGS.workdir, checkpoint=FLAGS.checkpoint, have_config=FLAGS.config is not None)
  if FLAGS.engine == "vllm":
    return _evaluate_in_vllm(temperatures)
  from lkjax.eval import report, run

  common = dict(benchmarks=FLAGS.benchmarks, temperatures=temperatures,
                max_new_tokens=FLAGS.max_new_tokens, limit=FLAGS.limit, seed=FLAGS.seed,
                max_context=FLAGS.max_context, num_threads=FLAGS.threads, out_dir=FLAGS.out, label=FLAGS.label,
                batch_size=FLAGS.batch_size)
  if FLAGS.import_eagle3:
    k = FLAGS.num_draft or (int(FLAGS.config.model.num_heads) if FLAGS.config else 7)
    rep = run.evaluate_eagle3_import(FLAGS.import_eagle3, target=FLAGS.target or "smollm2", num_draft=k, **common)
  else:
    path = FLAGS.workdir or FLAGS.checkpoint
    config = None
    workdir = os.path.dirname(os.path.dirname(os.path.abspath(path))) if FLAGS.checkpoint else path
    if not os.path.exists(os.path.join(workdir, "config.json")):
      config = FLAGS.config  # the run's own config.json is what its checkpoint was trained with
    rep = run.evaluate_checkpoint(path, config=config, target=FLAGS.target, num_draft=FLAGS.num_draft,
                                  offline=FLAGS.offline, **common)
  print(report.markdown_table(rep))
  for kind, p in rep["files"].items():
    print(f"[lkjax] {kind}: {p}")


def _evaluate_in_vllm(temperatures):

  from lkjax.data.benchmarks import load_benchmark
  from lkjax.eval.run import load_target_for
  from lkjax.export import export_draft, vllm_engine
  from lkjax.train import loop

  if FLAGS.import_eagle3:
    raise app.UsageError("--engine=vllm evaluates a training run (--workdir or --checkpoint)")
  if FLAGS.vllm_batch < 2:
    raise app.UsageError(f"--vllm_batch={FLAGS.vllm_batch}: the batched setting needs >= 2")
  python = vllm_engine.build_env()
  path = FLAGS.workdir or FLAGS.checkpoint
  workdir = os.path.dirname(os.path.dirname(os.path.abspath(path))) if FLAGS.checkpoint else path
  config = None if os.path.exists(os.path.join(workdir, "config.json")) else FLAGS.config
  trained = loop.load_trained_draft(path, config, compute_dtype=vllm_engine.DTYPE)
  arch = trained.config.model.arch
  target = load_target_for(trained.target_info, FLAGS.target)
  k = FLAGS.num_draft or int(trained.config.model.num_heads)
  out = FLAGS.out or os.path.join(workdir, "eval")
  work = os.path.join(out, "vllm")
  draft_dir = export_draft(trained.model, arch, os.path.join(work, "draft"), target.info, overwrite=True)
  prompts = {b: [target.encode_prompt(p.turns[0]) for p in load_benchmark(b, limit=FLAGS.limit)]
             for b in FLAGS.benchmarks}
  rep = vllm_engine.evaluate_in_vllm(arch, draft_dir, target, prompts, num_draft=k,
                                     max_new_tokens=FLAGS.max_new_tokens, batch_size=FLAGS.vllm_batch,
                                     temperatures=temperatures, work_dir=work, python=python,
                                     draft=trained.model, seed=FLAGS.seed)
  rep.update(checkpoint=os.path.abspath(path), step=trained.step, label=FLAGS.label or str(trained.config.get("name", arch)))
  from lkjax import files
  files.write_json(os.path.join(out, "vllm_report.json"), rep)
  md = vllm_engine.markdown_report(rep)
  with open(os.path.join(out, "vllm_report.md"), "w") as f:
    f.write(md)
  print(md)
  print(f"[lkjax] vLLM report: {os.path.join(out, 'vllm_report.json')}, {os.path.join(out, 'vllm_report.md')}")


if __name__ == "__main__":
  from lkjax import cli
  cli.run(main)
