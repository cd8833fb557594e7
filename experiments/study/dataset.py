r"""The study's data set: regenerated once, its token ids committed, its hidden-state shards rebuilt on demand.

  python experiments/study/dataset.py status                  # what is generated / committed / precomputed
  python experiments/study/dataset.py generate                # regenerate (resumes; starts from the committed part)
  python experiments/study/dataset.py snapshot                # commit-ready copy: experiments/study/dataset/replies.jsonl.gz
  python experiments/study/dataset.py precompute              # shards for training (needs the complete replies)

The settings below are the data set's definition (4,000 ShareGPT first turns of at most 800 characters,
SmolLM2-135M-Instruct replies of at most 512 new tokens sampled at T = 1).  Why T = 1: the draft is trained
against the target's full distribution p at every context, so the contexts should be the ones the target
visits when it samples at the temperature it is served at; T = 1 is plain sampling from p (no top-k / top-p),
exactly the contexts of the study's T = 1 evaluation, and without the repetition loops that greedy replies of
a 135M model fall into.  The T = 0 evaluation then measures how well that training transfers to greedy paths.

The work copy lives in ``--dir`` (default ``runs/study/data``, not in git).  ``snapshot`` writes the complete
lines, gzip-compressed with a fixed mtime (same content -> same bytes), and ``manifest.json`` with counts and
sha256 hashes; ``generate`` on a fresh machine first unpacks that snapshot, so regeneration never repeats a
committed prompt.  ``precompute`` checks the work copy against the manifest's hash before spending hours.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pathlib
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from absl import app, flags  # noqa: E402

SETTINGS = dict(target="smollm2", num_prompts=4000, max_new_tokens=512, temperature=1.0, seed=0, batch_size=64,
                max_prompt_chars=800)
PRECOMPUTE = dict(max_length=1024, shard_size=256)
HERE = pathlib.Path(__file__).resolve().parent
SNAPSHOT = HERE / "dataset" / "replies.jsonl.gz"
MANIFEST = HERE / "dataset" / "manifest.json"

_DIR = flags.DEFINE_string("dir", "runs/study/data", "Work directory (replies.jsonl, shards/).")
_MAX_BATCHES = flags.DEFINE_integer("max_batches", None, "generate: stop after this many batches (resume later).")


def _paths():
  d = pathlib.Path(_DIR.value)
  return d, d / "replies.jsonl", d / "shards"


def _complete_lines(path: pathlib.Path) -> bytes:
  raw = path.read_bytes() if path.exists() else b""
  return raw[:raw.rfind(b"\n") + 1]


def _sha256(b: bytes) -> str:
  return hashlib.sha256(b).hexdigest()


def _counts(data: bytes) -> dict:
  lines = [json.loads(l) for l in data.splitlines() if l.strip()]
  return dict(num_replies=len(lines), reply_tokens=sum(len(r.get("reply_ids", [])) + bool(r.get("finished"))
                                                       for r in lines),
              finished=sum(bool(r.get("finished")) for r in lines))


def restore() -> None:
  """Unpack the committed snapshot into the work copy when the work copy has fewer lines."""
  d, replies, _ = _paths()
  if not SNAPSHOT.exists():
    return
  snap = gzip.decompress(SNAPSHOT.read_bytes())
  have = _complete_lines(replies)
  if len(have) >= len(snap):
    if not snap.startswith(have[:len(snap)]) and not have.startswith(snap):
      raise ValueError(f"{replies} and the committed {SNAPSHOT} disagree; move {replies} away to start from "
                       "the snapshot")
    return
  if not snap.startswith(have):
    raise ValueError(f"{replies} is not a prefix of the committed {SNAPSHOT}; move it away to start from the "
                     "snapshot")
  d.mkdir(parents=True, exist_ok=True)
  tmp = replies.with_suffix(".tmp")
  tmp.write_bytes(snap)
  os.replace(tmp, replies)
  print(f"restored {len(snap.splitlines())} committed replies into {replies}")


def _commit() -> str:
  from lkjax.files import git_commit
  return git_commit(HERE)   # the checkout this script runs from (a pinned worktree for long jobs)


def cmd_generate() -> None:
  from lkjax import assets
  from lkjax.data import generate
  from lkjax.targets.hf import TargetModel

  restore()
  d, replies, _ = _paths()
  # Provenance: which commit generated which lines (the snapshot's manifest carries this log).
  log_path = d / "generation_log.json"
  log = json.loads(log_path.read_text()) if log_path.exists() else []
  log.append(dict(commit=_commit(), first_line=len(_complete_lines(replies).splitlines()) + 1))
  log_path.write_text(json.dumps(log, indent=1))
  s = SETTINGS
  target = TargetModel.load(s["target"])
  prompts, counts = generate.select_prompts(assets.fetch("sharegpt"), s["num_prompts"], seed=s["seed"],
                                            max_prompt_chars=s["max_prompt_chars"],
                                            overlap=generate.default_eval_overlap())
  summary = generate.generate_replies(target, prompts, replies, max_new_tokens=s["max_new_tokens"],
                                      temperature=s["temperature"], seed=s["seed"], batch_size=s["batch_size"],
                                      max_batches=_MAX_BATCHES.value, extra_summary={"selection": counts})
  print(f"{summary['num_written']}/{summary['num_prompts']} replies -> {replies}; "
        f"next: python experiments/study/dataset.py snapshot")


def cmd_snapshot() -> None:
  _, replies, _ = _paths()
  data = _complete_lines(replies)
  if not data:
    raise ValueError(f"{replies}: no replies yet; run `python experiments/study/dataset.py generate`")
  buf = io.BytesIO()
  with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=9) as f:
    f.write(data)
  SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
  tmp = SNAPSHOT.with_suffix(".tmp")
  tmp.write_bytes(buf.getvalue())
  os.replace(tmp, SNAPSHOT)
  d = _paths()[0]
  log = json.loads((d / "generation_log.json").read_text()) if (d / "generation_log.json").exists() else []
  counts = _counts(data)
  manifest = dict(settings=SETTINGS, **counts, complete=counts["num_replies"] >= SETTINGS["num_prompts"],
                  replies_sha256=_sha256(data), snapshot_sha256=_sha256(buf.getvalue()),
                  generation_log=log, snapshot_commit=_commit(), precompute=PRECOMPUTE)
  from lkjax import files
  files.write_json(MANIFEST, manifest, indent=1)
  print(f"{manifest['num_replies']} replies, {manifest['reply_tokens']} reply tokens -> {SNAPSHOT} "
        f"({len(buf.getvalue()) / 1e6:.1f} MB)")


def cmd_precompute() -> None:
  from lkjax.data import precompute
  from lkjax.targets.hf import TargetModel

  restore()
  _, replies, shards = _paths()
  manifest = json.loads(MANIFEST.read_text()) if MANIFEST.exists() else None
  data = _complete_lines(replies)
  if manifest is None or not manifest.get("complete"):
    raise ValueError(f"{MANIFEST}: the committed data set is not complete yet; run generate, then snapshot")
  if _sha256(data) != manifest["replies_sha256"]:
    raise ValueError(f"{replies} does not match {MANIFEST} (sha256); move it away and rerun to restore it")
  target = TargetModel.load(SETTINGS["target"])
  precompute.precompute(target, replies, shards, **PRECOMPUTE)
  print(f"shards -> {shards}; train with --config.data.dir={shards}")


def cmd_status() -> None:
  _, replies, shards = _paths()
  data = _complete_lines(replies)
  print(f"work copy   {replies}: {_counts(data)} of {SETTINGS['num_prompts']} prompts")
  if MANIFEST.exists():
    m = json.loads(MANIFEST.read_text())
    print(f"committed   {SNAPSHOT}: {m['num_replies']} replies, {m['reply_tokens']} reply tokens, "
          f"complete={m['complete']}")
  else:
    print(f"committed   nothing yet ({SNAPSHOT})")
  print(f"shards      {shards}: {'ready' if (shards / 'manifest.json').exists() else 'not built'}")


def main(argv):
  commands = dict(status=cmd_status, generate=cmd_generate, snapshot=cmd_snapshot, precompute=cmd_precompute)
  if len(argv) != 2 or argv[1] not in commands:
    raise app.UsageError(f"usage: python experiments/study/dataset.py {{{'|'.join(commands)}}} [--dir=...]")
  commands[argv[1]]()


if __name__ == "__main__":
  from lkjax import cli
  cli.run(main, config_flag=None)
