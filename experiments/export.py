"""Export a trained draft for serving: ``python experiments/export.py --workdir=runs/eagle3 --out=exports/eagle3``.

Flags: ``--workdir`` (a training run: its latest checkpoint) or ``--checkpoint`` (``<workdir>/checkpoints/<step>``),
``--out`` (the directory to write), optional ``--config=configs/<arch>.py[:args]`` (used only when the run
has no saved ``config.json``; otherwise the saved config wins and must have the same arch),
``--overwrite``, ``--target_model`` (the target path / hub id printed in the serving commands; default the
target name recorded at training) and ``--num_speculative_tokens`` (default: the draft's K).

The draft is written in its architecture's format (`lkjax.export.export_draft`): EAGLE-3 for vLLM
``llama_eagle3`` / SGLang, MEDUSA for vLLM's MedusaModel, MLP-Speculator for fms-extras / vLLM, MTP with
DeepSeek naming; the script then prints how to serve it.
"""
from __future__ import annotations

import os
import sys

# The repository root, so the entry point works from a plain checkout too (no pip install -e).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Training config (only needed when the run has no config.json).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Training run directory (exports its latest checkpoint).")
flags.DEFINE_string("checkpoint", None, "A checkpoint directory <workdir>/checkpoints/<step> (instead of --workdir).")
flags.DEFINE_string("out", None, "Directory to write the export to.")
flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.")
flags.DEFINE_string("target_model", None, "Target model path / hub id for the printed serving commands.")
flags.DEFINE_integer("num_speculative_tokens", 0, "Draft tokens per step in the printed commands (0: the draft's K).")
flags.mark_flags_as_required(["out"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  from lkjax import cli, distributed
  cli.exactly_one(workdir=FLAGS.workdir, checkpoint=FLAGS.checkpoint)
  if not distributed.main_process_only("export"):  # launched on every host: write the export once
    return
  from lkjax import export
  from lkjax.train import loop

  source = FLAGS.workdir or FLAGS.checkpoint
  workdir = loop.check_run_source(workdir=FLAGS.workdir, checkpoint=FLAGS.checkpoint,
                                  have_config=FLAGS.config is not None)
  if os.path.exists(FLAGS.out) and not FLAGS.overwrite:
    raise FileExistsError(f"--out={FLAGS.out} already exists: pass --overwrite to replace it, or a new --out.")
  config = None
  if not os.path.exists(os.path.join(workdir, loop.CONFIG_FILE)):
    config = FLAGS.config
  trained = loop.load_trained_draft(source, config=config)
  arch = trained.config.model.arch
  if FLAGS.config is not None and FLAGS.config.model.arch != arch:
    raise app.UsageError(f"--config is arch {FLAGS.config.model.arch!r} but the run in {workdir} trained {arch!r}")
  kwargs = {"overwrite": FLAGS.overwrite}
  if arch == "mtp" and trained.model.draft_vocab is not None:
    # Write the target's full shared head (DeepSeek-style loaders expect V rows), not only the draft rows.
    from lkjax.data import shards
    kwargs["full_lm_head"] = shards.load_target_weights(trained.config.data.dir)["lm_head"]
  out = export.export_draft(trained.model, arch, FLAGS.out, trained.target_info, **kwargs)
  print(f"[lkjax] exported {arch} draft (step {trained.step}, {source}) to {out}", flush=True)
  k = FLAGS.num_speculative_tokens or int(trained.model.num_heads)
  cmds = export.serving_commands(arch, out, FLAGS.target_model or trained.target_info.name, k)
  titles = {"vllm_python": "vLLM (Python)", "vllm_serve": "vLLM (server)", "sglang": "SGLang", "note": "Serving"}
  for key, cmd in cmds.items():
    print(f"\n{titles[key]}:\n{cmd}")


if __name__ == "__main__":
  from lkjax import cli
  cli.run(main)
