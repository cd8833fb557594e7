"""Run real vLLM on a job file and write what it did: ``.venv-vllm/bin/python serving/vllm_worker.py JOB OUT``.

Runs in the vLLM environment (serving/build_env.sh), never in lkjax's: it imports only vLLM and the
standard library.  lkjax drives it (`lkjax.export.vllm_engine`) and compares its output with its own
evaluation.  The job (JSON):

  target            HF directory of the target (lkjax's packaged SmolLM2 cache)
  speculative       vLLM ``speculative_config`` dict, or null for target-only decoding
  prompts           list of token-id lists
  max_tokens        new tokens per prompt;  ignore_eos  bool;  eos_token_id  extra stop token (optional)
  temperature       0 = greedy;  seed  int
  batch_sizes       e.g. [1] or [1, 8]: each runs all prompts, ``b`` requests at a time
  max_model_len, dtype ("float32"), max_num_seqs (default: largest batch size), enforce_eager,
  kv_cache_memory_bytes (default 512 MiB: a 135M target needs little, and a busy host has little to spare),
  model_loader_extra_config (vLLM's, e.g. {"enable_weights_track": false})

The output (JSON): ``load`` (checkpoint tensor names the draft loader read, the parameter names it
reported loaded, the draft model class), and per batch size: per-request outputs (token ids) and, for
batch size 1, the spec-decode counters of each request (deltas of vLLM's own
``vllm:spec_decode_num_{drafts,draft_tokens,accepted_tokens}`` and ``..._accepted_tokens_per_pos``), plus
the wall clock of the whole pass.

The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so the draft loader can be observed;
the entry point is guarded all the same, since vLLM may spawn helpers.  VLLM_CACHE_ROOT defaults to a
folder beside OUT, so nothing is written to the home directory.
"""
from __future__ import annotations

import json
import os
import sys
import time


def _setup_env(out_path: str) -> None:
  os.environ.setdefault("VLLM_CACHE_ROOT", os.path.join(os.path.dirname(os.path.abspath(out_path)), "vllm_cache"))
  # The job's kv_cache_memory_bytes sizes the KV cache; this legacy variable would override it.
  os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
  os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
  os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _observe_draft_loading(record: dict) -> None:
  """Record the tensor names the DRAFT's loader reads and the names its ``load_weights`` reports.

  vLLM already refuses a draft with missing weights (``track_weights_loading``); recording both sets lets
  the caller also prove that no checkpoint tensor went unused.
  """
  from vllm.model_executor.model_loader import default_loader

  cls = default_loader.DefaultModelLoader
  original = cls.load_weights

  def load_weights(self, model, model_config):
    names: list[str] = []
    get_all = self.get_all_weights

    def tracked(mc, m):
      for name, tensor in get_all(mc, m):
        names.append(name)
        yield name, tensor

    self.get_all_weights = tracked
    inner = model.load_weights

    def model_load(weights):
      loaded = inner(weights)
      entry = dict(model_class=type(model).__name__, model=str(model_config.model), read=sorted(names),
                   loaded=sorted(loaded) if loaded is not None else None,
                   parameters=sorted(n for n, _ in model.named_parameters()))
      record.setdefault("models", []).append(entry)
      return loaded

    model.load_weights = model_load
    try:
      return original(self, model, model_config)
    finally:
      del self.get_all_weights
      del model.load_weights

  cls.load_weights = load_weights


def _spec_counters(llm) -> dict:
  out = dict(num_drafts=0, num_draft_tokens=0, num_accepted_tokens=0, accepted_per_pos=[])
  for m in llm.get_metrics():
    if m.name == "vllm:spec_decode_num_drafts":
      out["num_drafts"] = int(m.value)
    elif m.name == "vllm:spec_decode_num_draft_tokens":
      out["num_draft_tokens"] = int(m.value)
    elif m.name == "vllm:spec_decode_num_accepted_tokens":
      out["num_accepted_tokens"] = int(m.value)
    elif m.name == "vllm:spec_decode_num_accepted_tokens_per_pos":
      out["accepted_per_pos"] = [int(v) for v in m.values]
  return out


def _delta(after: dict, before: dict) -> dict:
  d = {k: after[k] - before[k] for k in ("num_drafts", "num_draft_tokens", "num_accepted_tokens")}
  b = before["accepted_per_pos"] or [0] * len(after["accepted_per_pos"])
  d["accepted_per_pos"] = [x - y for x, y in zip(after["accepted_per_pos"], b)]
  return d


def run(job: dict, out_path: str) -> dict:
  _setup_env(out_path)
  record: dict = {}
  _observe_draft_loading(record)
  from vllm import LLM, SamplingParams
  from vllm.inputs import TokensPrompt

  prompts = [[int(t) for t in p] for p in job["prompts"]]
  batch_sizes = [int(b) for b in job.get("batch_sizes", [1])]
  kwargs = dict(model=job["target"], dtype=job.get("dtype", "float32"), seed=int(job.get("seed", 0)),
                max_model_len=int(job["max_model_len"]), max_num_seqs=int(job.get("max_num_seqs") or max(batch_sizes)),
                disable_log_stats=False, enforce_eager=bool(job.get("enforce_eager", False)),
                kv_cache_memory_bytes=int(job.get("kv_cache_memory_bytes", 512 << 20)))
  if job.get("speculative"):
    kwargs["speculative_config"] = dict(job["speculative"])
  if job.get("model_loader_extra_config"):
    kwargs["model_loader_extra_config"] = dict(job["model_loader_extra_config"])
  t0 = time.perf_counter()
  llm = LLM(**kwargs)
  startup = time.perf_counter() - t0
  params = SamplingParams(temperature=float(job.get("temperature", 0.0)), max_tokens=int(job["max_tokens"]),
                          ignore_eos=bool(job.get("ignore_eos", False)), seed=int(job.get("seed", 0)),
                          stop_token_ids=[int(job["eos_token_id"])] if job.get("eos_token_id") is not None else None)
  # Warm-up: one short request so first-call costs stay out of the timed passes.
  llm.generate([TokensPrompt(prompt_token_ids=prompts[0])],
               SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
  passes = []
  for b in batch_sizes:
    outputs, counters = [], []
    t1 = time.perf_counter()
    for start in range(0, len(prompts), b):
      chunk = prompts[start:start + b]
      before = _spec_counters(llm) if b == 1 else None
      res = llm.generate([TokensPrompt(prompt_token_ids=p) for p in chunk], params, use_tqdm=False)
      if b == 1:
        counters.append(_delta(_spec_counters(llm), before))
      for r in res:
        c = r.outputs[0]
        outputs.append(dict(token_ids=[int(t) for t in c.token_ids], finish_reason=c.finish_reason))
    seconds = time.perf_counter() - t1
    passes.append(dict(batch_size=b, seconds=seconds, outputs=outputs, counters=counters or None,
                       new_tokens=sum(len(o["token_ids"]) for o in outputs)))
  import vllm
  import torch
  result = dict(vllm_version=vllm.__version__, torch_version=torch.__version__, startup_s=startup,
                load=record, passes=passes, totals=_spec_counters(llm), job={k: v for k, v in job.items()
                                                                          if k != "prompts"})
  return result


def main(argv: list[str]) -> int:
  import faulthandler
  import signal

  faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` prints where a slow engine start is
  if len(argv) != 3:
    print(__doc__.splitlines()[0], file=sys.stderr)
    return 2
  with open(argv[1]) as f:
    job = json.load(f)
  result = run(job, argv[2])
  tmp = argv[2] + ".tmp"
  with open(tmp, "w") as f:
    json.dump(result, f)
  os.replace(tmp, argv[2])
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
