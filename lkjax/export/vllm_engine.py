"""Check an lkjax export against real vLLM: run the engine in its own environment and compare counters.

vLLM lives in a separate environment (``serving/build_env.sh`` -> ``.venv-vllm/``; its pins differ from
lkjax's), so lkjax never imports it: `run_engine` writes a job file, runs ``serving/vllm_worker.py``
with that environment's python, and reads back the worker's JSON (outputs, per-request spec-decode
counters, the draft loader's tensor names).  The functions here are pure and testable without vLLM:

  counters_of(accept_lengths, K)           lkjax rounds -> vLLM's counter layout for one request
  compare_counters(lkjax, vllm)            per-request equality report
  unused_draft_tensors(arch, load_entry)   checkpoint tensors the draft loader read but did not use

Counting (why lkjax's rounds and vLLM's drafts are the same events).  At T = 0 both engines draft K
tokens after each target step that emits a token, verify them in one target pass, accept the longest
prefix equal to the target's argmax and emit one more target token.  vLLM counts a round as
``num_drafts += 1; num_draft_tokens += K; accepted_per_pos[i] += (a > i)``.  lkjax records ``a`` per round
(`lkjax.eval.speculative.GenerationResult.accept_lengths`).  The two stop differently at the end of a
request: vLLM stops drafting when fewer than one token is left and trims the last round to the tokens
still allowed (``max_tokens``), lkjax runs every round in full; so comparisons use ``ignore_eos`` and
count only rounds that END before ``max_tokens - K - 1`` new tokens, where neither engine cuts
(`comparable_prefix`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "serving" / "vllm_worker.py"
BUILD_SCRIPT = REPO / "serving" / "build_env.sh"
DEFAULT_VENV = REPO / ".venv-vllm"


def vllm_python(venv: str | os.PathLike | None = None) -> Path:
  """The vLLM environment's python: ``$LKJAX_VLLM_VENV`` or ``<repo>/.venv-vllm`` (may not exist yet)."""
  root = Path(venv or os.environ.get("LKJAX_VLLM_VENV") or DEFAULT_VENV)
  return root / "bin" / "python"


def build_env(venv: str | os.PathLike | None = None, *, timeout: float = 1800) -> Path:
  """Run ``serving/build_env.sh`` (idempotent) and return the environment's python.

  Raises RuntimeError with the script's output when the build fails (no network, no wheel for this
  platform, ...).
  """
  env = dict(os.environ)
  if venv is not None:
    env["LKJAX_VLLM_VENV"] = os.fspath(venv)
  proc = subprocess.run(["bash", os.fspath(BUILD_SCRIPT)], env=env, capture_output=True, text=True,
                        timeout=timeout)
  if proc.returncode != 0:
    raise RuntimeError(f"{BUILD_SCRIPT} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
  return vllm_python(venv)


def run_engine(job: Mapping[str, Any], work_dir: str | os.PathLike, *, name: str = "engine",
               python: str | os.PathLike | None = None, timeout: float = 3600) -> dict[str, Any]:
  """Run ``serving/vllm_worker.py`` on ``job`` in the vLLM environment; return its result dict.

  ``work_dir/<name>.job.json``, ``<name>.json`` and ``<name>.log`` are written; vLLM's cache goes to
  ``work_dir/vllm_cache`` (``VLLM_CACHE_ROOT``).  Raises RuntimeError naming the log on failure.
  """
  work = Path(work_dir).absolute()
  work.mkdir(parents=True, exist_ok=True)
  py = Path(python) if python else vllm_python()
  if not py.exists():
    raise FileNotFoundError(f"{py}: no vLLM environment; build it with: bash {BUILD_SCRIPT}")
  job_path, out_path, log_path = work / f"{name}.job.json", work / f"{name}.json", work / f"{name}.log"
  job_path.write_text(json.dumps(dict(job)))
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  env.update(VLLM_CACHE_ROOT=os.fspath(work / "vllm_cache"), VLLM_CPU_KVCACHE_SPACE=env.get("VLLM_CPU_KVCACHE_SPACE", "1"))
  env.pop("PYTHONPATH", None)
  with open(log_path, "w") as log:
    proc = subprocess.run([os.fspath(py), os.fspath(WORKER), os.fspath(job_path), os.fspath(out_path)],
                          stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout, cwd=work)
  if proc.returncode != 0:
    tail = log_path.read_text()[-4000:]
    raise RuntimeError(f"vLLM worker failed (exit {proc.returncode}); log {log_path}:\n{tail}")
  return json.loads(out_path.read_text())


# ----------------------------------------------------------------------------------------------------
# Counters


def counters_of(accept_lengths: Sequence[int], num_draft: int) -> dict[str, Any]:
  """lkjax rounds (accepted a per round) -> vLLM's counters for one request (full rounds of K drafts)."""
  a = [int(x) for x in accept_lengths]
  if any(not 0 <= x <= num_draft for x in a):
    raise ValueError(f"accept_lengths {a}: each must lie in [0, {num_draft}]")
  return dict(num_drafts=len(a), num_draft_tokens=num_draft * len(a), num_accepted_tokens=sum(a),
              accepted_per_pos=[sum(x > i for x in a) for i in range(num_draft)])


def comparable_rounds(accept_lengths: Sequence[int], num_draft: int, max_new_tokens: int) -> int:
  """How many leading rounds end before the last ``num_draft + 1`` allowed tokens (neither engine cuts them).

  Round r emits ``a_r + 1`` tokens after the prefill token; a round whose emitted tokens all lie at or
  before new-token index ``max_new_tokens - num_draft - 1`` was drafted in full by vLLM too.
  """
  emitted, n = 1, 0
  for a in accept_lengths:
    if emitted + num_draft + 1 > max_new_tokens - 1:
      break
    emitted += int(a) + 1
    n += 1
  return n


def compare_counters(lkjax_counts: Sequence[Mapping[str, Any]], vllm_counts: Sequence[Mapping[str, Any]]
                     ) -> dict[str, Any]:
  """Per-request equality of counter dicts -> ``{"equal": bool, "mismatches": [...], "lkjax", "vllm"}``."""
  if len(lkjax_counts) != len(vllm_counts):
    raise ValueError(f"{len(lkjax_counts)} lkjax requests vs {len(vllm_counts)} vLLM requests")
  keys = ("num_drafts", "num_draft_tokens", "num_accepted_tokens", "accepted_per_pos")
  mism = []
  for i, (a, b) in enumerate(zip(lkjax_counts, vllm_counts)):
    diff = {k: (a[k], b[k]) for k in keys if list(a[k]) != list(b[k]) if isinstance(a[k], list)} | \
           {k: (a[k], b[k]) for k in keys if not isinstance(a[k], list) and int(a[k]) != int(b[k])}
    if diff:
      mism.append(dict(request=i, **{k: dict(lkjax=v[0], vllm=v[1]) for k, v in diff.items()}))
  total = lambda cs: counters_sum(cs)  # noqa: E731
  return dict(equal=not mism, mismatches=mism, lkjax=total(lkjax_counts), vllm=total(vllm_counts))


def counters_sum(counts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Sum per-request counters (vLLM's own totals are these sums)."""
  k = max((len(c["accepted_per_pos"]) for c in counts), default=0)
  out = dict(num_drafts=0, num_draft_tokens=0, num_accepted_tokens=0, accepted_per_pos=[0] * k)
  for c in counts:
    for key in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
      out[key] += int(c[key])
    for i, v in enumerate(c["accepted_per_pos"]):
      out["accepted_per_pos"][i] += int(v)
  return out


def tau_of(counts: Mapping[str, Any]) -> float | None:
  """tau = 1 + accepted / drafts (= K * accepted / drafted + 1 with full rounds)."""
  return 1.0 + counts["num_accepted_tokens"] / counts["num_drafts"] if counts["num_drafts"] else None


# ----------------------------------------------------------------------------------------------------
# Draft loading


def unused_draft_tensors(arch: str, entry: Mapping[str, Any]) -> list[str]:
  """Checkpoint tensors vLLM's draft loader READ but that reached no parameter (should be empty).

  ``entry`` is one ``load.models`` record of the worker (``read``, ``loaded``).  vLLM itself raises
  when a draft PARAMETER is left uninitialised (missing weights); this is the converse.  Per arch:
    medusa  the loader stores names as read; ``token_map`` is consumed as the vocabulary map.
    eagle3  vLLM's ``llama_eagle3`` loader renames ``midlayer.*`` into its one decoder layer, fuses
            q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``, maps ``d2t`` onto
            ``draft_id_to_target_id`` and skips ``t2d`` by design (it is implied by d2t).
  """
  read, loaded = list(entry["read"]), set(entry.get("loaded") or ())
  if arch == "medusa":
    return sorted(n for n in read if n != "token_map" and n not in loaded)
  if arch == "eagle3":
    fused = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
             "up_proj": "gate_up_proj"}
    out = []
    for n in read:
      if n == "t2d":
        continue
      if n == "d2t":
        ok = any(x.endswith("draft_id_to_target_id") for x in loaded)
      else:
        parts = n.split(".")
        parts = [fused.get(p, p) for p in parts]
        tail = ".".join(parts[1:]) if parts[0] == "midlayer" else ".".join(parts)
        ok = any(x.endswith("." + tail) or x == tail for x in loaded)
      if not ok:
        out.append(n)
    return sorted(out)
  raise ValueError(f"arch={arch!r}: no vLLM loader rule (eagle3, medusa)")


def draft_load_entry(result: Mapping[str, Any], draft_dir: str | os.PathLike) -> dict[str, Any]:
  """The worker's load record of the model read from ``draft_dir``."""
  want = os.path.realpath(os.fspath(draft_dir))
  for e in result["load"].get("models", []):
    if os.path.realpath(e["model"]) == want:
      return e
  raise ValueError(f"the vLLM run loaded no model from {want}: {[e['model'] for e in result['load'].get('models', [])]}")


def main_python() -> str:
  """The python running lkjax (the worker must NOT be this one)."""
  return sys.executable


# ----------------------------------------------------------------------------------------------------
# The serving check: lkjax's own T = 0 decoding vs the engine, on the same prompts


def lkjax_greedy(draft: Any, target: Any, prompts: Sequence[Sequence[int]], *, num_draft: int,
                 max_new_tokens: int, jit: bool = True) -> list[dict[str, Any]]:
  """lkjax's T = 0 chain speculative decoding of each prompt (no EOS stop, like vLLM's ``ignore_eos``).

  Returns one ``{"tokens", "accept_lengths", "counters"}`` per prompt (`counters_of`).
  """
  from lkjax.eval.run import JittedDraft
  from lkjax.eval.speculative import speculative_generate
  from lkjax.eval.verifier import Verifier

  runner = JittedDraft(draft) if jit else draft
  verifier = Verifier(target.model, aux_layer_ids=target.info.aux_layer_ids)
  out = []
  try:
    for ids in prompts:
      r = speculative_generate(verifier, runner, list(ids), num_draft=num_draft, temperature=0.0,
                               max_new_tokens=max_new_tokens, eos_token_id=None, seed=0)
      out.append(dict(tokens=list(r.tokens), accept_lengths=list(r.accept_lengths),
                      counters=counters_of(r.accept_lengths, num_draft)))
  finally:
    verifier.close()
  return out


def target_directory(target: Any) -> str:
  """The HF directory vLLM loads for an lkjax `TargetModel` (packaged: its asset cache)."""
  from lkjax import assets
  from lkjax.targets.hf import PACKAGED

  packaged = {v: k for k, v in PACKAGED.items()}
  if target.info.name in packaged:
    return os.fspath(assets.fetch(packaged[target.info.name]))
  if os.path.isdir(target.info.name):
    return os.path.abspath(target.info.name)
  raise ValueError(f"target {target.info.name!r}: neither packaged nor a directory vLLM can load")


def speculative_config(arch: str, draft_dir: str | os.PathLike, num_draft: int) -> dict[str, Any]:
  """vLLM's ``speculative_config`` for an lkjax export (`lkjax.export.VLLM_METHODS`)."""
  from lkjax.export import VLLM_METHODS

  if arch not in VLLM_METHODS:
    raise ValueError(f"arch={arch!r}: vLLM serves lkjax exports of {sorted(VLLM_METHODS)} only")
  return dict(method=VLLM_METHODS[arch], model=os.path.abspath(os.fspath(draft_dir)),
              num_speculative_tokens=int(num_draft))


def check_export(arch: str, draft_dir: str | os.PathLike, draft: Any, target: Any,
                 prompts: Sequence[Sequence[int]], *, num_draft: int, max_new_tokens: int,
                 work_dir: str | os.PathLike, python: str | os.PathLike | None = None) -> dict[str, Any]:
  """Serve ``target`` with the export at ``draft_dir`` in real vLLM and compare with lkjax (T = 0).

  Checks, each recorded under ``checks`` (all must be true for ``ok``):
    loads            vLLM built the draft (its own loader refuses missing weights) and every checkpoint
                     tensor it read reached a parameter (`unused_draft_tensors` is empty)
    identity         greedy outputs with speculation equal vLLM's target-only outputs, token for token
    counters         per request, vLLM's drafts / draft tokens / accepted tokens / accepted per position
                     equal lkjax's own T = 0 decoding of the same draft on the same prompts
  ``lkjax_matches_vllm_target`` (not a check: two float32 implementations of the target may break a
  near-tie differently) says whether lkjax's greedy tokens equal vLLM's.
  """
  prompts = [[int(t) for t in p] for p in prompts]
  longest = max(len(p) for p in prompts)
  job = dict(target=target_directory(target), prompts=prompts, max_tokens=int(max_new_tokens), ignore_eos=True,
             temperature=0.0, max_model_len=int(2 ** (longest + max_new_tokens + 2 * num_draft + 2).bit_length()),
             batch_sizes=[1])
  spec = run_engine(dict(job, speculative=speculative_config(arch, draft_dir, num_draft)), work_dir,
                    name="vllm_speculative", python=python)
  plain = run_engine(job, work_dir, name="vllm_target", python=python)
  ref = lkjax_greedy(draft, target, prompts, num_draft=num_draft, max_new_tokens=max_new_tokens)
  entry = draft_load_entry(spec, draft_dir)
  unused = unused_draft_tensors(arch, entry)
  s_out = [o["token_ids"] for o in spec["passes"][0]["outputs"]]
  t_out = [o["token_ids"] for o in plain["passes"][0]["outputs"]]
  counters = compare_counters([r["counters"] for r in ref], spec["passes"][0]["counters"])
  identity = [i for i, (a, b) in enumerate(zip(s_out, t_out)) if a != b]
  lk_vs_vllm = [i for i, (r, b) in enumerate(zip(ref, t_out)) if r["tokens"] != b]
  checks = dict(loads=not unused, identity=not identity, counters=counters["equal"])
  return dict(
      ok=all(checks.values()), checks=checks, arch=arch, draft_dir=os.path.abspath(os.fspath(draft_dir)),
      num_draft=int(num_draft), max_new_tokens=int(max_new_tokens), num_prompts=len(prompts),
      vllm_version=spec["vllm_version"], torch_version=spec["torch_version"],
      draft_model_class=entry["model_class"], draft_tensors_read=len(entry["read"]), unused_tensors=unused,
      identity_mismatches=identity, counters=counters,
      tau=dict(lkjax=tau_of(counters["lkjax"]), vllm=tau_of(counters["vllm"])),
      lkjax_matches_vllm_target=not lk_vs_vllm, lkjax_vs_vllm_target_mismatches=lk_vs_vllm,
      per_request=[dict(prompt_tokens=len(p), lkjax_accept_lengths=r["accept_lengths"], vllm=c)
                   for p, r, c in zip(prompts, ref, spec["passes"][0]["counters"])])


def untrained_draft(arch: str, target: Any, *, draft_vocab_size: int = 8192, seed: int = 0) -> Any:
  """A seeded untrained draft of ``arch`` for ``target`` (load / identity / counter checks without training).

  The draft vocabulary (``draft_vocab_size`` > 0) is every id below ``Vd // 2`` (byte-level BPE puts
  frequent tokens there) plus ``Vd - Vd // 2`` seeded random ids above, so draft id -> target id is not
  the identity and the token map is exercised.  MEDUSA's default init (zero residual blocks, heads from
  the target's LM head) drafts the target's next-token guess at every position.
  """
  import numpy as np
  from flax import nnx

  from lkjax.models import registry

  info = target.info
  cfg = registry.default_model_config(arch, info)
  vocab = None
  if draft_vocab_size:
    half = draft_vocab_size // 2
    rng = np.random.default_rng(seed)
    vocab = np.sort(np.concatenate([np.arange(half), half + rng.choice(info.vocab_size - half,
                                                                        draft_vocab_size - half, replace=False)]))
  cfg.draft_vocab_size = int(draft_vocab_size)
  if arch == "medusa":
    cfg.init_head_from_target = True
  return registry.build_draft(cfg, info, draft_vocab=vocab, target_weights=target.head_weights(),
                              rngs=nnx.Rngs(params=seed))


def git_commit() -> str | None:
  """The repository's HEAD commit (results record what produced them), or None outside a checkout."""
  try:
    return subprocess.run(["git", "-C", os.fspath(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None
