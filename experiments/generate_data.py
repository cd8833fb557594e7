r"""Regenerate assistant replies with the target for ShareGPT prompts (first human turn), resumably.

  python experiments/generate_data.py --out=data/replies.jsonl --num_prompts=2000 --max_new_tokens=256
  python experiments/generate_data.py --target=/path/to/hf_model --temperature=1.0 --out=...

Rerunning with the same flags resumes (a killed run loses nothing and generates nothing twice).  Prompts
that overlap MT-bench / HumanEval questions are excluded (counted in ``<out>.summary.json``).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_TARGET = flags.DEFINE_string("target", "smollm2", "Packaged target name or HF causal-LM directory.")
_OUT = flags.DEFINE_string("out", None, "Output JSONL (appended to / resumed).")
_SHAREGPT = flags.DEFINE_string("sharegpt", None, "ShareGPT JSON (default: the packaged one).")
_NUM = flags.DEFINE_integer("num_prompts", 128, "Prompts to regenerate.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 96, "New tokens per reply.")
_TEMP = flags.DEFINE_float("temperature", 0.0, "Sampling temperature (0 = greedy).")
_SEED = flags.DEFINE_integer("seed", 0, "Prompt selection + sampling seed.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Prompts per generate call.")
_MAX_CHARS = flags.DEFINE_integer("max_prompt_chars", 800, "Skip longer prompts (0 = keep all).")
_MAX_BATCHES = flags.DEFINE_integer("max_batches", None, "Stop after this many batches (resume later).")
_THREADS = flags.DEFINE_integer("threads", None, "torch CPU threads (default: all cores).")
flags.mark_flags_as_required(["out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  from lkjax import cli
  cli.check_target(_TARGET.value)
  cli.check_input_file(_SHAREGPT.value, "--sharegpt", "a ShareGPT JSON file; leave it out for the packaged one")
  cli.check_output_path(_OUT.value, "--out", directory=False)
  cli.check_positive(num_prompts=_NUM.value, max_new_tokens=_MAX_NEW.value, batch_size=_BATCH.value)
  if _TEMP.value < 0:
    raise app.UsageError(f"--temperature={_TEMP.value}: must be >= 0 (0: greedy)")
  import torch

  from lkjax import assets
  from lkjax.data import generate
  from lkjax.targets.hf import TargetModel

  if _THREADS.value:
    torch.set_num_threads(_THREADS.value)
  target = TargetModel.load(_TARGET.value)
  prompts, counts = generate.select_prompts(
      _SHAREGPT.value or assets.fetch("sharegpt"), _NUM.value, seed=_SEED.value,
      max_prompt_chars=_MAX_CHARS.value or None, overlap=generate.default_eval_overlap())
  print(f"selected {len(prompts)} prompts; excluded {counts['eval_overlap']} overlapping MT-bench/HumanEval "
        f"({counts})")
  summary = generate.generate_replies(target, prompts, _OUT.value, max_new_tokens=_MAX_NEW.value,
                                      temperature=_TEMP.value, seed=_SEED.value, batch_size=_BATCH.value,
                                      max_batches=_MAX_BATCHES.value, extra_summary={"selection": counts})
  state = "complete" if summary["complete"] else "INCOMPLETE (rerun to resume)"
  print(f"{summary['num_written']}/{summary['num_prompts']} replies, {summary['num_empty']} empty, "
        f"{summary['num_unfinished']} cut at max_new_tokens; {state}")
  print(f"replies -> {_OUT.value}\nsummary -> {generate.summary_path(_OUT.value)}")


if __name__ == "__main__":
  from lkjax import cli
  cli.run(main, config_flag=None)
