"""The default training data set, built on demand: packaged target -> regenerated replies -> shards.

`ensure_default_dataset` is what the trainer's embedded default calls.  Layout of ``data_dir``:
  replies.jsonl (+ .summary.json)   target-regenerated replies (`lkjax.data.generate`)
  shard-*.array_record, manifest.json, target_head.safetensors   (`lkjax.data.precompute`)

Defaults: 64 ShareGPT prompts (first human turn, at most 800 characters) x 96 new tokens, greedy
(temperature 0), max_length 512.  Measured (SmolLM2-135M fp32 on this project's 2-core CPU machine while
~7 other jobs shared it, load average ~9): 32 prompts x 96 tokens took 750 s wall / ~400 s CPU in all
(load ~60 s, generation ~660 s, precompute 4890 tokens in 73 s); generation dominates at roughly 9-10
CPU-seconds per prompt, so the 64-prompt default needs ~10 CPU-minutes: an estimated 5-10 minutes of wall
time on an idle 2-core machine (not measured idle), longer on a shared one.  The paper regenerates at the target's serving
temperature; greedy keeps the small default deterministic and matches the T=0 acceptance benchmark.
Pass ``temperature=1.0`` for the T=1 recipe.  Every step resumes where a killed run stopped.
"""
from __future__ import annotations

import os
import pathlib
import time

from lkjax.data import shards

REPLIES_FILE = "replies.jsonl"


def ensure_default_dataset(data_dir: str | os.PathLike, *, target: str = "smollm2", num_prompts: int = 64,
                           max_new_tokens: int = 96, max_length: int = 512, temperature: float = 0.0,
                           seed: int = 0, batch_size: int = 16, max_prompt_chars: int | None = 800,
                           shard_size: int = 64, cache_dir: str | os.PathLike | None = None,
                           progress: bool = True) -> pathlib.Path:
  """Build (or resume building) the default shard directory unless ``data_dir/manifest.json`` exists.

  Args:
    data_dir: output directory.
    target: packaged target name or HF model directory (`lkjax.targets.hf.TargetModel.load`).
    num_prompts: ShareGPT prompts to regenerate (eval-overlapping ones are excluded before counting).
    max_new_tokens, temperature, seed, batch_size: generation settings.
    max_length: longest precomputed sequence (longer ones are truncated and counted).
    max_prompt_chars: skip longer ShareGPT prompts (keeps CPU generation short); None keeps all.
    shard_size: replies per shard.
    cache_dir: asset cache (default ``$LKJAX_CACHE``).

  Returns:
    ``data_dir`` (a complete shard directory: `shards.read_manifest` succeeds on it).
  """
  data_dir = pathlib.Path(data_dir)
  if (data_dir / shards.MANIFEST_FILE).exists():
    shards.read_manifest(data_dir)
    return data_dir
  import torch

  from lkjax import assets
  from lkjax.data import generate, precompute
  from lkjax.targets.hf import TargetModel

  torch.set_num_threads(max(1, min(os.cpu_count() or 1, 8)))
  t0 = time.perf_counter()
  tm = TargetModel.load(target, cache_dir=cache_dir)
  prompts, counts = generate.select_prompts(
      assets.fetch("sharegpt", cache_dir), num_prompts, seed=seed, max_prompt_chars=max_prompt_chars,
      overlap=generate.default_eval_overlap(cache_dir))
  print(f"prepare: {len(prompts)} prompts selected ({counts['eval_overlap']} excluded as MT-bench/HumanEval "
        f"overlaps, {counts['scanned']} scanned)")
  replies = data_dir / REPLIES_FILE
  summary = generate.generate_replies(tm, prompts, replies, max_new_tokens=max_new_tokens,
                                      temperature=temperature, seed=seed, batch_size=batch_size,
                                      extra_summary={"selection": counts}, progress=progress)
  if not summary["complete"]:
    raise RuntimeError(f"{replies}: generation incomplete ({summary['num_written']}/{summary['num_prompts']})")
  t1 = time.perf_counter()
  print(f"prepare: {summary['num_written']} replies ({summary['num_empty']} empty) -> {replies} "
        f"[load + select + generate {t1 - t0:.0f}s]")
  precompute.precompute(tm, replies, data_dir, max_length=max_length, shard_size=shard_size, progress=progress)
  print(f"prepare: dataset ready in {data_dir} [precompute {time.perf_counter() - t1:.0f}s, "
        f"total {time.perf_counter() - t0:.0f}s]")
  return data_dir
