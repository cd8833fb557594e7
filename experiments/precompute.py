r"""Run the target over prompt + reply and write hidden-state shards + manifest + target head.

  python experiments/precompute.py --replies=data/replies.jsonl --out_dir=data/shards --max_length=2048

Resumable at shard granularity (rerun the same command); prints tokens/s and where the shards went.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_TARGET = flags.DEFINE_string("target", "smollm2", "Packaged target name or HF causal-LM directory.")
_REPLIES = flags.DEFINE_string("replies", None, "Replies JSONL from experiments/generate_data.py.")
_OUT = flags.DEFINE_string("out_dir", None, "Shard directory.")
_MAX_LEN = flags.DEFINE_integer("max_length", 2048, "Longest sequence kept (longer: truncated, counted).")
_SHARD = flags.DEFINE_integer("shard_size", 256, "Replies per shard.")
_BATCH_TOKENS = flags.DEFINE_integer("batch_tokens", 4096, "Padded tokens per target forward.")
_MAX_SHARDS = flags.DEFINE_integer("max_shards", None, "Stop after this many shards (resume later).")
_TARGET_LSE = flags.DEFINE_boolean("target_lse", True, "Store each position's full-vocabulary target "
                                   "logsumexp (the train step then skips the full-vocabulary head).")
_THREADS = flags.DEFINE_integer("threads", None, "torch CPU threads (default: all cores).")
flags.mark_flags_as_required(["replies", "out_dir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  from lkjax import cli
  cli.check_target(_TARGET.value)
  cli.check_input_file(_REPLIES.value, "--replies", "the replies JSONL written by experiments/generate_data.py")
  cli.check_output_path(_OUT.value, "--out_dir", directory=True)
  cli.check_positive(max_length=_MAX_LEN.value, shard_size=_SHARD.value, batch_tokens=_BATCH_TOKENS.value)
  import torch

  from lkjax.data import precompute
  from lkjax.targets.hf import TargetModel

  if _THREADS.value:
    torch.set_num_threads(_THREADS.value)
  target = TargetModel.load(_TARGET.value)
  precompute.precompute(target, _REPLIES.value, _OUT.value, max_length=_MAX_LEN.value, shard_size=_SHARD.value,
                        batch_tokens=_BATCH_TOKENS.value, max_shards=_MAX_SHARDS.value, target_lse=_TARGET_LSE.value)


if __name__ == "__main__":
  from lkjax import cli
  cli.run(main, config_flag=None)
