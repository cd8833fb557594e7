"""Precompute: run the target over prompt + reply and write hidden-state shards (format: `lkjax.data.shards`).

Input: a replies JSONL from `lkjax.data.generate` (``{"id", "prompt", "reply", "finished"}`` per line, and
``reply_ids`` -- the generated token ids, used as they are instead of re-tokenizing the reply text -- when
the generator recorded them).
Output directory:
  shard-00000.array_record ...    records of `shards.RECORD_SCHEMA` (int32 ids, uint8 mask, bf16 states)
                                  + ``target_lse`` f32[T] (`shards.OPTIONAL_SCHEMA`) unless disabled
  target_head.safetensors         the target's embedding / LM head (checkpoint dtype) / final norm multiplier
                                  (`TargetModel.export_head`); ``target_lse`` is computed from this stored head
  manifest.json                   written last, when every shard is done (`shards.write_manifest`)
  precompute_progress.json        per finished shard: counts and sparse token counts (resume state)

Shard i holds the usable lines ``[i * shard_size, (i + 1) * shard_size)`` of the JSONL, in file order, so a
restarted run recomputes exactly the shards that are not listed as finished.  Per line:
  - an empty (whitespace-only) reply is skipped and counted (``skipped_empty``), with a warning naming it;
  - a sequence longer than ``max_length`` keeps its first ``max_length`` tokens and is counted
    (``truncated``); if no reply token survives, it is skipped and counted (``skipped_no_loss_tokens``).
Every skip is listed by id and reason under ``skipped`` in the manifest.

Sequences are batched by length (right padding, at most ``batch_tokens`` padded tokens per forward); right
padding under a causal mask leaves the real positions' features unchanged.
"""
from __future__ import annotations

import collections
import json
import os
import pathlib
import time
import warnings
from typing import Any, Sequence

import ml_dtypes
import numpy as np
import torch

from lkjax.data import shards
from lkjax.data.generate import read_replies
from lkjax.files import write_json

PROGRESS_FILE = "precompute_progress.json"


def _to_bf16(t: torch.Tensor) -> np.ndarray:
  """torch float tensor -> numpy ``ml_dtypes.bfloat16`` (round to nearest even, as torch's cast)."""
  return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)


def length_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
  """Indices grouped by ascending length so that ``len(group) * max_len(group) <= batch_tokens``
  (a sequence longer than the budget forms its own group)."""
  order = sorted(range(len(lengths)), key=lambda i: lengths[i])
  groups, cur = [], []
  for i in order:
    if cur and (len(cur) + 1) * lengths[i] > batch_tokens:
      groups.append(cur)
      cur = []
    cur.append(i)
  if cur:
    groups.append(cur)
  return groups


def lse_from_stored(final_bf16: np.ndarray, lm_head: torch.Tensor, *, rows: int = 1024) -> np.ndarray:
  """``logsumexp(f32(final_bf16) @ lm_head.T)`` per position -> float32 ``[...]``.

  Computed from the bf16-ROUNDED final hidden state the shard stores, in float32, so that it is the
  normaliser of exactly the logits the train step computes from the same record (`lkjax.train.step`).
  ``rows`` positions at a time bound the ``[rows, V]`` logits.
  """
  lead = final_bf16.shape[:-1]
  h = torch.from_numpy(np.asarray(final_bf16, np.float32).reshape(-1, final_bf16.shape[-1]))
  w = lm_head.to(torch.float32)
  out = torch.empty(h.shape[0], dtype=torch.float32)
  with torch.no_grad():
    for s in range(0, h.shape[0], rows):
      out[s:s + rows] = torch.logsumexp(h[s:s + rows] @ w.T, dim=-1)
  return out.numpy().reshape(lead)


def compute_records(target, seqs: Sequence[tuple[np.ndarray, np.ndarray]], *, batch_tokens: int = 4096,
                    lm_head: torch.Tensor | None = None) -> list[dict[str, np.ndarray]]:
  """Shard records for ``(input_ids int32[T], loss_mask uint8[T])`` pairs, in input order.

  With ``lm_head`` (the target's ``[V, H]`` float32 LM head) every record also gets ``target_lse``
  (`lse_from_stored`).
  """
  out: list[dict[str, np.ndarray] | None] = [None] * len(seqs)
  for group in length_batches([len(s[0]) for s in seqs], batch_tokens):
    width = max(len(seqs[i][0]) for i in group)
    ids = np.full((len(group), width), target.pad_token_id, dtype=np.int64)
    attn = np.zeros((len(group), width), dtype=np.int64)
    for r, i in enumerate(group):
      ids[r, :len(seqs[i][0])] = seqs[i][0]
      attn[r, :len(seqs[i][0])] = 1
    feats = target.features(ids, attn)
    aux, final = _to_bf16(feats.aux_hidden), _to_bf16(feats.final_hidden)
    for r, i in enumerate(group):
      t = len(seqs[i][0])
      out[i] = {"input_ids": np.asarray(seqs[i][0], np.int32), "loss_mask": np.asarray(seqs[i][1], np.uint8),
                "aux_hidden": aux[r, :t].copy(), "final_hidden": final[r, :t].copy()}
      if lm_head is not None:
        out[i]["target_lse"] = lse_from_stored(out[i]["final_hidden"], lm_head)
  return out  # type: ignore[return-value]


def _prepare_lines(target, lines: Sequence[dict], *, max_length: int, first_line: int, source: str):
  """Tokenize lines -> (seqs, ids, stats, skipped list)."""
  seqs, ids, skipped = [], [], []
  stats = collections.Counter()
  for k, rec in enumerate(lines):
    where = f"{source}:{first_line + k + 1} (id {rec['id']!r})"
    if not rec["reply"].strip():
      stats["skipped_empty"] += 1
      skipped.append({"id": rec["id"], "line": first_line + k + 1, "reason": "empty reply"})
      warnings.warn(f"{where}: empty reply, skipped")
      continue
    input_ids, mask = target.encode_conversation(rec["prompt"], rec["reply"], finished=rec.get("finished", True),
                                                 reply_ids=rec.get("reply_ids"),
                                                 stop_token_id=rec.get("stop_token_id"))
    if len(input_ids) > max_length:
      stats["truncated"] += 1
      input_ids, mask = input_ids[:max_length], mask[:max_length]
      if not mask.any():
        stats["skipped_no_loss_tokens"] += 1
        skipped.append({"id": rec["id"], "line": first_line + k + 1,
                        "reason": f"prompt alone fills max_length={max_length}"})
        warnings.warn(f"{where}: no reply token within max_length={max_length}, skipped")
        continue
    seqs.append((input_ids, mask))
    ids.append(rec["id"])
  return seqs, ids, stats, skipped


def precompute(target, replies_path: str | os.PathLike, out_dir: str | os.PathLike, *, max_length: int = 2048,
               shard_size: int = 256, batch_tokens: int = 4096, max_shards: int | None = None,
               progress: bool = True, target_lse: bool = True) -> dict[str, Any] | None:
  """Write (or finish writing) the shard directory for a replies JSONL.

  Args:
    target: a `lkjax.targets.hf.TargetModel`.
    replies_path: the JSONL (must be complete: a partial last line is an error).
    out_dir: output directory (see module docstring).
    max_length: longest sequence kept (tokens).
    shard_size: JSONL lines per shard.
    batch_tokens: padded tokens per target forward.
    max_shards: stop after computing this many shards (a time box; rerun to finish).
    target_lse: also store each position's full-vocabulary target logsumexp (`lse_from_stored`); the
      train step then computes only the draft-vocabulary columns of the target head.

  Returns:
    The manifest dict once all shards are done, else None (``max_shards`` stopped it).
  """
  from tqdm import tqdm

  replies_path, out_dir = pathlib.Path(replies_path), pathlib.Path(out_dir)
  lines, _ = read_replies(replies_path)
  if not lines:
    raise ValueError(f"{replies_path}: no replies to precompute")
  info = target.info
  config = {"replies": str(replies_path.resolve()), "replies_sha256": shards.file_sha256(replies_path),
            "weights_sha256": info.weights_sha256, "max_length": int(max_length), "shard_size": int(shard_size)}
  if target_lse:   # absent (not False) when off: progress files written before the option still resume
    config["target_lse"] = True
  progress_path = out_dir / PROGRESS_FILE
  state = {"config": config, "shards": {}}
  if progress_path.exists():
    try:
      state = json.loads(progress_path.read_text())
    except json.JSONDecodeError as e:
      raise shards.ShardError(f"{progress_path}: not valid JSON ({e}); delete it to start over") from e
    old = state.get("config") or {}
    if target_lse and "target_lse" not in old and dict(config, target_lse=None) == dict(old, target_lse=None):
      # Started by a version without target_lse: finish it the same way (mixed shards would be unusable).
      warnings.warn(f"{progress_path}: this directory was started without target_lse; finishing it without")
      config, target_lse = old, False
    if state.get("config") != config:
      raise ValueError(f"{progress_path}: was written for {state.get('config')}, this run is {config}; "
                       f"use another output directory or delete {out_dir} to start over")
  out_dir.mkdir(parents=True, exist_ok=True)
  write_json(progress_path, state, indent=1)
  target.export_head(out_dir)
  lm_head = torch.from_numpy(target.head_weights()["lm_head"]) if target_lse else None

  num_shards = (len(lines) + shard_size - 1) // shard_size
  todo = [i for i in range(num_shards)
          if not (str(i) in state["shards"] and (state["shards"][str(i)]["file"] is None
                                                  or (out_dir / state["shards"][str(i)]["file"]).exists()))]
  done_tokens, elapsed = 0, 0.0
  initial = sum(s["num_lines"] for k, s in state["shards"].items() if int(k) not in set(todo))
  bar = tqdm(total=len(lines), initial=initial, desc="precompute", unit="seq", disable=not progress)
  for n_done, i in enumerate(todo):
    if max_shards is not None and n_done >= max_shards:
      bar.close()
      print(f"precompute: stopped after {max_shards} shard(s); rerun to finish ({out_dir})")
      return None
    chunk = lines[i * shard_size:(i + 1) * shard_size]
    t0 = time.perf_counter()
    seqs, ids, stats, skipped = _prepare_lines(target, chunk, max_length=max_length, first_line=i * shard_size,
                                               source=str(replies_path))
    records = compute_records(target, seqs, batch_tokens=batch_tokens, lm_head=lm_head)
    fname = shards.SHARD_PATTERN.format(i)
    encoded = []
    counts = collections.Counter()
    for rec, rid in zip(records, ids):
      shards.validate_record(rec, hidden_size=info.hidden_size, num_aux=info.num_aux,
                             where=f"{fname} record {len(encoded)} (id {rid!r})")
      encoded.append(shards.encode_record(rec))
      counts.update(rec["input_ids"][rec["loss_mask"].astype(bool)].tolist())
    if encoded:
      shards.write_shard(out_dir / fname, encoded)
    elapsed += time.perf_counter() - t0
    ntok = int(sum(len(s[0]) for s in seqs))
    done_tokens += ntok
    state["shards"][str(i)] = {
        "file": fname if encoded else None, "num_lines": len(chunk), "num_records": len(encoded),
        "num_tokens": ntok, "num_loss_tokens": int(sum(int(s[1].sum()) for s in seqs)),
        "truncated": stats["truncated"], "skipped_empty": stats["skipped_empty"],
        "skipped_no_loss_tokens": stats["skipped_no_loss_tokens"], "skipped": skipped,
        "token_counts": {str(k): int(v) for k, v in counts.items()}}
    write_json(progress_path, state, indent=1)
    bar.update(len(chunk))
    bar.set_postfix(tok_s=f"{done_tokens / max(elapsed, 1e-9):.0f}")
  bar.close()
  if todo:
    print(f"precompute: {done_tokens} tokens in {elapsed:.1f}s = {done_tokens / max(elapsed, 1e-9):.1f} tokens/s")

  manifest = build_manifest(info, state, max_length=max_length, replies_path=replies_path,
                            target_lse=bool(state["config"].get("target_lse", False)))
  shards.write_manifest(out_dir, manifest)
  print(f"precompute: {manifest['num_records']} records, {manifest['num_tokens']} tokens "
        f"({manifest['truncated']} truncated, {manifest['skipped_empty']} empty skipped, "
        f"{manifest['skipped_no_loss_tokens']} skipped without reply tokens) -> {out_dir}")
  return shards.read_manifest(out_dir)


def build_manifest(info, state: dict, *, max_length: int, replies_path: pathlib.Path,
                   target_lse: bool = False) -> dict[str, Any]:
  """Manifest dict (keys of `shards.MANIFEST_REQUIRED` + counts) from the finished progress state."""
  per = [state["shards"][k] for k in sorted(state["shards"], key=int)]
  freqs = np.zeros(info.vocab_size, dtype=np.int64)
  for s in per:
    for tok, c in s["token_counts"].items():
      t = int(tok)
      if not 0 <= t < info.vocab_size:
        raise shards.ShardError(f"{s['file']}: token id {t} outside the vocabulary of size {info.vocab_size}")
      freqs[t] += c
  return {
      "target": info.to_dict(),
      "max_length": int(max_length),
      "num_records": int(sum(s["num_records"] for s in per)),
      "num_tokens": int(sum(s["num_tokens"] for s in per)),
      "num_loss_tokens": int(sum(s["num_loss_tokens"] for s in per)),
      "shards": [{"file": s["file"], "num_records": s["num_records"], "num_tokens": s["num_tokens"]}
                 for s in per if s["file"] is not None],
      "token_freqs": freqs.tolist(),
      "dtype": "bfloat16",
      "truncated": int(sum(s["truncated"] for s in per)),
      "skipped_empty": int(sum(s["skipped_empty"] for s in per)),
      "skipped_no_loss_tokens": int(sum(s["skipped_no_loss_tokens"] for s in per)),
      "skipped": [x for s in per for x in s["skipped"]],
      "source": {"replies": str(replies_path), "replies_sha256": state["config"]["replies_sha256"]},
      "target_weights_file": shards.TARGET_WEIGHTS_FILE,
      "target_lse": bool(target_lse),
  }
