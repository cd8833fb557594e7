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
  speculative/b1     lkjax's exact speculative evaluation, batch 1 (`speculative_generate`, before batching)
  speculative/batched      the same prompts, seeds and settings through `speculative_generate_batch` at
                     ``--spec_batch`` (the evaluation driver's default); rows report prompts per hour, the
                     ratio, and how many prompts gave identical tokens and acceptance records (all, at T = 0)

Every row reports tokens/s, the ratio to its baseline where it has one, and the fraction of the ceiling.
Run it on an idle machine (pause background jobs with SIGSTOP): the rows are timed one after another.
"""
from __future__ import annotations

import json
import os
import pathlib
import platform
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
_SPEC_PROMPTS = flags.DEFINE_integer("spec_prompts", 16, "Prompts for the speculative rows (0: skip them).")
_SPEC_BATCH = flags.DEFINE_integer("spec_batch", 16, "Batch of the batched speculative row.")
_SPEC_NEW = flags.DEFINE_integer("spec_max_new_tokens", 64, "New tokens per prompt in the speculative rows.")
_SPEC_TEMP = flags.DEFINE_float("spec_temperature", 0.0, "Temperature of the speculative rows.")
_SPEC_K = flags.DEFINE_integer("spec_num_draft", 7, "K draft tokens per round.")
_SPEC_DRAFT = flags.DEFINE_string("spec_draft", None, "A training workdir whose draft the speculative rows use "
                                  "(default: an untrained EAGLE-3 at the target's shapes, tau ~ 1: it times the "
                                  "decoding machinery, not a draft).")
_SPEC_ONLY = flags.DEFINE_bool("speculative_only", False, "Only the ceiling and the speculative rows.")
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


def speculative_rows(target, encoded: list, eos: int) -> dict:
  """Exact speculative evaluation of the same prompts, batch 1 then batched (same seeds, K, T, draft)."""
  import numpy as np
  from flax import nnx

  from lkjax.eval import run as run_lib
  from lkjax.eval import speculative
  from lkjax.eval.verifier import BatchedVerifier, Verifier
  from lkjax.models import registry

  info = target.info
  if _SPEC_DRAFT.value:
    from lkjax.train.loop import load_trained_draft

    draft = load_trained_draft(_SPEC_DRAFT.value).model
  else:
    cfg = registry.default_model_config("eagle3", info)
    cfg.num_heads = _SPEC_K.value
    vd = int(cfg.get("draft_vocab_size", 0) or info.vocab_size)   # the study's truncated vocabulary size
    draft = registry.build_draft(cfg, info, draft_vocab=np.arange(vd, dtype=np.int32),
                                 target_weights={"embed_tokens": target.head_weights()["embed_tokens"]},
                                 rngs=nnx.Rngs(params=0))
  runner = run_lib.JittedDraft(draft)
  k, t, new = _SPEC_K.value, _SPEC_TEMP.value, _SPEC_NEW.value
  max_ctx = max(map(len, encoded)) + new + k + 8
  plan = run_lib.batch_plan([len(e) for e in encoded], _SPEC_BATCH.value)
  sizes = sorted({len(c) for c in plan} | {1 << i for i in range(_SPEC_BATCH.value.bit_length())
                                           if 1 << i <= max(len(c) for c in plan)})
  aux_w = info.num_aux * info.hidden_size
  compile_b1 = runner.compile(max_len=max_ctx, aux_width=aux_w, hidden_size=info.hidden_size, num_tokens=k,
                              temperatures=[t])
  compile_bt = runner.compile(max_len=max_ctx, aux_width=aux_w, hidden_size=info.hidden_size, num_tokens=k,
                              temperatures=[t], batch_sizes=sizes)
  seeds = list(range(len(encoded)))
  rows = {}

  verifier = Verifier(target.model, aux_layer_ids=info.aux_layer_ids, max_context=max_ctx)
  bverifier = BatchedVerifier(target.model, aux_layer_ids=info.aux_layer_ids, max_context=max_ctx)
  # first-call costs, outside the clock
  speculative.speculative_generate(verifier, runner, encoded[0], num_draft=k, temperature=t, max_new_tokens=4,
                                   eos_token_id=eos, seed=0)
  speculative.speculative_generate_batch(bverifier, runner, encoded[:2], num_draft=k, temperature=t,
                                         max_new_tokens=4, eos_token_id=eos, seeds=[0, 1])
  b1, bt = [None] * len(encoded), [None] * len(encoded)
  dt1 = dtb = 0.0
  for chunk in plan:   # interleaved batch by batch: both see the same machine load
    t0 = time.perf_counter()
    for i in chunk:
      b1[i] = speculative.speculative_generate(verifier, runner, encoded[i], num_draft=k, temperature=t,
                                               max_new_tokens=new, eos_token_id=eos, seed=seeds[i])
    t1 = time.perf_counter()
    res = speculative.speculative_generate_batch(bverifier, runner, [encoded[i] for i in chunk], num_draft=k,
                                                 temperature=t, max_new_tokens=new, eos_token_id=eos,
                                                 seeds=[seeds[i] for i in chunk])
    t2 = time.perf_counter()
    for i, r in zip(chunk, res):
      bt[i] = r
    dt1, dtb = dt1 + t1 - t0, dtb + t2 - t1
  verifier.close()
  bverifier.close()

  same = sum(a.tokens == b.tokens and a.accept_lengths == b.accept_lengths for a, b in zip(b1, bt))
  for name, res, dt in (("speculative/b1", b1, dt1), ("speculative/batched", bt, dtb)):
    n = sum(r.num_new_tokens for r in res)
    acc, drafted = sum(r.accepted for r in res), sum(r.drafted for r in res)
    rows[name] = dict(prompts=len(res), tokens=n, seconds=dt, tokens_per_s=n / dt,
                      prompts_per_hour=3600 * len(res) / dt, tau=k * acc / drafted + 1 if drafted else None,
                      batch=1 if name.endswith("b1") else _SPEC_BATCH.value)
    print(f"{name}: {len(res)} prompts, {n} tokens in {dt:.1f}s = {3600 * len(res) / dt:.0f} prompts/hour, "
          f"tau {rows[name]['tau']:.3f}", flush=True)
  rows["speculative/batched"]["ratio"] = rows["speculative/batched"]["prompts_per_hour"] / rows["speculative/b1"]["prompts_per_hour"]
  rows["speculative/batched"]["identical_prompts"] = same
  rows["speculative/batched"]["compile_s"] = compile_bt
  rows["speculative/b1"]["compile_s"] = compile_b1
  print(f"speculative: batched / b1 = {rows['speculative/batched']['ratio']:.2f}x; {same} of {len(b1)} prompts "
        "identical (tokens and acceptance)", flush=True)
  return rows


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

  if not _SPEC_ONLY.value:
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

  if _SPEC_PROMPTS.value > 0:
    # Spread over the length-sorted prompts (the shortest alone would flatter batch 1's prompt pass).
    n = min(_SPEC_PROMPTS.value, len(encoded))
    rows.update(speculative_rows(target, [encoded[i * len(encoded) // n] for i in range(n)], eos))

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
  for name, r in rows.items():
    if name.startswith("speculative/"):
      print(f"{name}: {r['prompts_per_hour']:.0f} prompts/hour" + (f" ({r['ratio']:.2f}x)" if "ratio" in r else ""))

  from lkjax.files import git_commit
  commit = git_commit(__file__)
  flags_line = next((l for l in open("/proc/cpuinfo") if l.startswith("flags")), "") if os.path.exists("/proc/cpuinfo") else ""
  simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags_line.split()]
  out = dict(commit=commit, when=time.strftime("%Y-%m-%d %H:%M"), machine=platform.processor() or platform.machine(),
             simd=simd,
             cpus=os.cpu_count(), torch_threads=torch.get_num_threads(), target=info.name,
             settings=dict(prompts=len(texts), max_new_tokens=_MAX_NEW.value, temperature=_TEMP.value,
                           batch=_BATCH.value, hf_batch=_HF_BATCH.value, decode_prompts=_DECODE_PROMPTS.value,
                           spec_prompts=_SPEC_PROMPTS.value, spec_batch=_SPEC_BATCH.value,
                           spec_max_new_tokens=_SPEC_NEW.value, spec_temperature=_SPEC_TEMP.value,
                           spec_num_draft=_SPEC_K.value, spec_draft=_SPEC_DRAFT.value or "untrained eagle3"),
             rows=rows)
  path = pathlib.Path(_OUT.value)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(out, indent=1))
  tmp.replace(path)
  print(f"results -> {path}")


if __name__ == "__main__":
  app.run(main)
