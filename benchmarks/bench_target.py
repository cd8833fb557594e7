r"""Target-side throughput: regeneration, precompute and target-only decoding, against the machine's ceiling.

  python benchmarks/bench_target.py                      # packaged SmolLM2-135M-Instruct, writes the JSON
  python benchmarks/bench_target.py --prompts=16 --max_new_tokens=32 --out=/tmp/t.json   # quick look

Rows (same prompts, same sampling settings, same target, one process, measured one after another):
  ceiling            fp32 matmul GFLOP/s at the target's own GEMM shapes (256 rows) -> the tokens/s a forward
                     would reach if every FLOP ran at that rate (2 x matmul parameters per token)
  regenerate/hf      transformers ``model.generate`` at batch 16 (DynamicCache; the generator before
                     `lkjax.targets.decode`)
  regenerate/lkjax   `lkjax.targets.decode.decode` at ``--batch`` (preallocated cache, batch compaction)
  precompute         `lkjax.data.precompute.compute_records` with the stored lse, on prompt + reply sequences
  decode_b1/dynamic  target-only batch-1 decoding through the evaluation verifier on transformers' DynamicCache
  decode_b1/preallocated   the same on the verifier's preallocated cache (its default)

Every row reports tokens/s, the ratio to its baseline where it has one, and the fraction of the ceiling.
Run it on an idle machine (pause background jobs with SIGSTOP): the rows are timed one after another.
"""
from __future__ import annotations

import json
import os
import pathlib
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_TARGET = flags.DEFINE_string("target", "smollm2", "Packaged target name or HF causal-LM directory.")
_PROMPTS = flags.DEFINE_integer("prompts", 64, "ShareGPT prompts (the study's selection rule, seed 0).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256, "New tokens per reply.")
_TEMP = flags.DEFINE_float("temperature", 1.0, "Sampling temperature of regeneration.")
_BATCH = flags.DEFINE_integer("batch", 64, "lkjax decode batch.")
_HF_BATCH = flags.DEFINE_integer("hf_batch", 16, "Batch of the transformers baseline.")
_DECODE_PROMPTS = flags.DEFINE_integer("decode_prompts", 2, "Prompts for the batch-1 decoding row.")
_OUT = flags.DEFINE_string("out", "benchmarks/results/bench_target.json", "Results JSON.")


def _timed(fn):
  t0 = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t0


def gemm_ceiling(hidden: int, widths: list[int], rows: int = 256, reps: int = 10) -> dict:
  """Best fp32 GFLOP/s of ``[rows, hidden] @ [hidden, w]`` over the target's GEMM widths (and bf16 for show)."""
  import torch

  out = {}
  for dtype in (torch.float32, torch.bfloat16):
    best = 0.0
    for w in widths:
      a, b = torch.randn(rows, hidden, dtype=dtype), torch.randn(w, hidden, dtype=dtype)
      f = torch.nn.functional.linear
      for _ in range(2):
        f(a, b)
      n = reps if dtype == torch.float32 else 1
      t0 = time.perf_counter()
      for _ in range(n):
        f(a, b)
      best = max(best, 2 * rows * hidden * w * n / (time.perf_counter() - t0) / 1e9)
    out[str(dtype).removeprefix("torch.")] = best
  return out


def matmul_params(model) -> int:
  """Parameters that a forward multiplies per token: every Linear weight (incl. the LM head), not the embedding."""
  import torch

  return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def main(argv):
  del argv
  import numpy as np
  import torch

  from lkjax import assets
  from lkjax.data import generate, precompute
  from lkjax.eval import speculative
  from lkjax.eval.verifier import Verifier
  from lkjax.targets import decode
  from lkjax.targets.hf import TargetModel

  target = TargetModel.load(_TARGET.value)
  model, info = target.model, target.info
  prompts, _ = generate.select_prompts(assets.fetch("sharegpt"), _PROMPTS.value, overlap=None, seed=0,
                                       max_prompt_chars=800)
  prompts = sorted(prompts, key=lambda p: len(p.text))
  texts = [p.text for p in prompts]
  encoded = [target.encode_prompt(t) for t in texts]
  eos = target.eot_token_id
  rows = {}

  flop_per_token = 2 * matmul_params(model)
  ceil = gemm_ceiling(info.hidden_size, [info.hidden_size, info.intermediate_size, info.vocab_size])
  ceiling_tok_s = ceil["float32"] * 1e9 / flop_per_token
  rows["ceiling"] = dict(gflops_fp32=ceil["float32"], gflops_bf16=ceil["bfloat16"],
                         gflop_per_token=flop_per_token / 1e9, tokens_per_s=ceiling_tok_s)
  print(f"ceiling: fp32 {ceil['float32']:.0f} GFLOP/s, bf16 {ceil['bfloat16']:.1f} GFLOP/s; "
        f"{flop_per_token / 1e9:.3f} GFLOP/token -> {ceiling_tok_s:.0f} tokens/s", flush=True)

  def hf_generate():
    n = 0
    with torch.no_grad():
      for s in range(0, len(texts), _HF_BATCH.value):
        part = encoded[s:s + _HF_BATCH.value]
        width = max(len(e) for e in part)
        ids = torch.full((len(part), width), target.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, e in enumerate(part):
          ids[i, width - len(e):] = torch.tensor(e)
          attn[i, width - len(e):] = 1
        torch.manual_seed(s)
        out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=_MAX_NEW.value,
                             pad_token_id=target.pad_token_id, eos_token_id=eos, do_sample=True,
                             temperature=_TEMP.value, top_k=0, top_p=1.0)
        for row in out[:, width:].tolist():
          n += row.index(eos) + 1 if eos in row else len(row)
    return n

  def lkjax_generate():
    n = 0
    for s in range(0, len(texts), _BATCH.value):
      out = decode.decode(model, encoded[s:s + _BATCH.value], max_new_tokens=_MAX_NEW.value,
                          pad_token_id=target.pad_token_id, stop_token_ids=(eos,), temperature=_TEMP.value,
                          seed=s)
      n += sum(len(d.token_ids) + d.finished for d in out)
    return n

  replies = None
  for name, fn in (("regenerate/hf", hf_generate), ("regenerate/lkjax", lkjax_generate)):
    n, dt = _timed(fn)
    rows[name] = dict(tokens=n, seconds=dt, tokens_per_s=n / dt, batch=_HF_BATCH.value if "hf" in name else _BATCH.value)
    print(f"{name}: {n} tokens in {dt:.1f}s = {n / dt:.1f} tokens/s", flush=True)
  rows["regenerate/lkjax"]["ratio"] = rows["regenerate/lkjax"]["tokens_per_s"] / rows["regenerate/hf"]["tokens_per_s"]

  # Precompute on prompt + a reply of the same length distribution (content does not change the cost).
  replies = decode.decode(model, encoded[:8], max_new_tokens=_MAX_NEW.value, pad_token_id=target.pad_token_id,
                          stop_token_ids=(eos,), temperature=_TEMP.value, seed=0)
  rng = np.random.default_rng(0)
  seqs = []
  for e in encoded:
    r = len(replies[len(seqs) % len(replies)].token_ids) or 1
    ids = np.concatenate([np.asarray(e, np.int32), rng.integers(0, info.vocab_size, r).astype(np.int32)])
    mask = np.zeros(len(ids), np.uint8)
    mask[len(e):] = 1
    seqs.append((ids, mask))
  lm_head = torch.from_numpy(target.head_weights()["lm_head"])
  ntok = int(sum(len(s[0]) for s in seqs))
  _, dt = _timed(lambda: precompute.compute_records(target, seqs, lm_head=lm_head))
  rows["precompute"] = dict(tokens=ntok, seconds=dt, tokens_per_s=ntok / dt)
  print(f"precompute: {ntok} tokens in {dt:.1f}s = {ntok / dt:.1f} tokens/s", flush=True)

  for kind in ("dynamic", "preallocated"):
    verifier = Verifier(model, kv_cache=kind)
    n = 0
    t0 = time.perf_counter()
    for e in encoded[:_DECODE_PROMPTS.value]:
      r = speculative.target_generate(verifier, e, temperature=0.0, max_new_tokens=_MAX_NEW.value,
                                      eos_token_id=eos, seed=0)
      n += r.num_new_tokens
    dt = time.perf_counter() - t0
    verifier.close()
    rows[f"decode_b1/{kind}"] = dict(tokens=n, seconds=dt, tokens_per_s=n / dt)
    print(f"decode_b1/{kind}: {n} tokens in {dt:.1f}s = {n / dt:.1f} tokens/s", flush=True)
  rows["decode_b1/preallocated"]["ratio"] = (rows["decode_b1/preallocated"]["tokens_per_s"]
                                             / rows["decode_b1/dynamic"]["tokens_per_s"])

  for r in rows.values():
    if "tokens_per_s" in r and r is not rows["ceiling"]:
      r["fraction_of_ceiling"] = r["tokens_per_s"] / ceiling_tok_s

  print("\n| row | tokens/s | ratio to baseline | fraction of fp32 ceiling |\n|---|---|---|---|")
  for name, r in rows.items():
    if name == "ceiling":
      print(f"| ceiling (fp32 GEMM {r['gflops_fp32']:.0f} GFLOP/s) | {r['tokens_per_s']:.0f} | | 1.00 |")
      continue
    ratio = f"{r['ratio']:.2f}x" if "ratio" in r else ""
    print(f"| {name} | {r['tokens_per_s']:.1f} | {ratio} | {r['fraction_of_ceiling']:.2f} |")

  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
  flags_line = next((l for l in open("/proc/cpuinfo") if l.startswith("flags")), "") if os.path.exists("/proc/cpuinfo") else ""
  simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags_line.split()]
  out = dict(commit=commit, when=time.strftime("%Y-%m-%d %H:%M"), machine=platform.processor() or platform.machine(),
             simd=simd,
             cpus=os.cpu_count(), torch_threads=torch.get_num_threads(), target=info.name,
             settings=dict(prompts=len(texts), max_new_tokens=_MAX_NEW.value, temperature=_TEMP.value,
                           batch=_BATCH.value, hf_batch=_HF_BATCH.value, decode_prompts=_DECODE_PROMPTS.value),
             rows=rows)
  path = pathlib.Path(_OUT.value)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(out, indent=1))
  tmp.replace(path)
  print(f"results -> {path}")


if __name__ == "__main__":
  app.run(main)
