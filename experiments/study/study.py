"""The KL-vs-LK study: run list, resumable orchestration, result collection, docs.

A *plan* is the ConfigDict of ``experiments/study/plan.py`` (data size, steps, batch, seeds, evaluation limits).
`build_runs` turns it into `RunSpec`s; `run_study` executes, in order,

  data                  prepare the study's shard directory once (`lkjax.data.prepare.ensure_default_dataset`)
  train/<run>, eval/<run>   for every run: train (`lkjax.train.loop.train_and_evaluate`, resumes from its
                        checkpoints), then measure tau at every temperature on every benchmark
                        (`lkjax.eval.run.evaluate_draft`, bootstrap CIs) with the offline tau_off next to it
                        (`lkjax.eval.run.offline_estimate`)

and after every step collects what is finished and regenerates the docs (``results.md`` + the JSON files
and PNGs behind it), marking missing cells "pending".

Layout under ``root``::

  study_state.json              steps (status, seconds, attempts, errors), invocations (argv, hardware)
  data/                         the shard directory (unless the plan names an existing one)
  runs/<run>/train/             the run's train workdir (config.json, metrics.jsonl, checkpoints/, summary.json)
  runs/<run>/eval/              report.{json,md,png}, answers.jsonl, study_eval.json (the finished marker)

Resumability: a step is done when its output says so (``summary.json`` status "finished", the eval
marker file), so killing the process at any moment loses at most the unfinished step's work past its last
checkpoint; rerunning the same command skips what is done. Each run's settings are recorded in the state;
a rerun whose plan changed a finished run's settings is refused (use a new root). ``max_hours`` stops
launching new steps once that much wall-clock time has passed in this invocation.

The training, evaluation and data functions are arguments (``train_fn``, ``eval_fn``, ``prepare_fn``) so
the tests drive the orchestrator with fakes; the real ones are the defaults.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import platform
import re
import sys
import time
import traceback
from typing import Any, Callable, Mapping, Sequence

import ml_collections
import numpy as np

from lkjax import files
from lkjax.models import registry

STATE_FILE = "study_state.json"
EVAL_MARKER = "study_eval.json"
BENCH_TITLES = {"mt_bench": "MT-bench", "humaneval": "HumanEval", "gsm8k": "GSM8K"}
ARCH_TITLES = {name: spec.title for name, spec in registry.SPECS.items()}
PENDING = "pending"
DISCUSSION_START = "<!-- discussion:start (hand-written; kept when this file is regenerated) -->"
DISCUSSION_END = "<!-- discussion:end -->"

# The paper's reported tau (docs/design.md#purpose) (mean of MT-bench / HumanEval / GSM8K), KL -> L_lambda.
# (target, draft, T, tau KL, tau L_lambda, reported relative change in % where only that is given)
PAPER_RESULTS = (
    ("Llama-3.1-8B", "eagle3", 0, 4.36, 4.43, None),
    ("Llama-3.1-8B", "eagle3", 1, 3.86, 4.01, None),
    ("Qwen3-235B", "eagle3", 1, 3.77, 4.08, None),
    ("Llama-3.1-8B", "medusa", 1, None, None, 7.8),
    ("Llama-3.1-8B", "mlp_speculator", 1, None, None, 8.3),
)
PAPER_NOTES = ("pure TV trains far below KL", "fixed lambda = 0.5 is about equal to KL")


# ----------------------------------------------------------------------------------------------- plan


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One training run of the study and how it is evaluated.

  Attributes:
    name: directory-safe id, ``<arch>.<loss tag>.s<seed>`` (e.g. ``eagle3.lk_hybrid_eta3.s0``).
    arch: eagle3 | medusa | mlp_speculator | mtp.
    loss: loss kind (`lkjax.losses.LOSS_KINDS`): kl | tv | lk_alpha | lk_hybrid | fixed_lambda.
    eta: eta of lk_hybrid (None otherwise).
    lam: the fixed lambda of fixed_lambda (None otherwise).
    seed: init and data-order seed (the validation split does not depend on it).
    num_draft: K draft tokens per round at evaluation.
    groups: tables the run belongs to: ``main`` (arch x {KL, L_alpha, L_lambda}), ``ablation``
      (EAGLE-3 eta / lambda), ``seeds`` (EAGLE-3 KL vs L_lambda over seeds), ``chain`` (the plan's
      ``chain_arms``: objectives on the draft chain, beyond the paper).
    weighting: ``loss.head_weighting``: ``gamma`` (the paper's) or ``reach`` (docs/design.md#objectives-on-the-draft-chain).
  """

  name: str
  arch: str
  loss: str
  eta: float | None
  lam: float | None
  seed: int
  num_draft: int
  groups: tuple[str, ...]
  weighting: str = "gamma"

  @property
  def loss_tag(self) -> str:
    return loss_tag(self.loss, self.eta, self.lam, self.weighting)

  @property
  def label(self) -> str:
    return loss_label(self.loss, self.eta, self.lam, self.weighting)


def loss_tag(loss: str, eta: float | None = None, lam: float | None = None, weighting: str = "gamma") -> str:
  """Directory-safe loss id: ``kl``, ``lk_alpha``, ``lk_hybrid_eta3``, ``fixed_lambda_0.5``, ``tv``, ``lk_tau``;
  ``_reach`` is appended for reach head weights (``lk_hybrid_eta3_reach``)."""
  tag = f"lk_hybrid_eta{eta:g}" if loss == "lk_hybrid" else f"fixed_lambda_{lam:g}" if loss == "fixed_lambda" \
      else loss
  return tag + ("" if weighting == "gamma" else f"_{weighting}")


def loss_label(loss: str, eta: float | None = None, lam: float | None = None, weighting: str = "gamma") -> str:
  """Table label: KL, TV, L_α, L_τ, L_λ (η=3), λ=0.5 (fixed); ``, reach`` for reach head weights."""
  label = {"kl": "KL", "tv": "TV", "lk_alpha": "L_α", "lk_tau": "L_τ"}.get(loss) or (
      f"L_λ (η={eta:g})" if loss == "lk_hybrid" else f"λ={lam:g} (fixed)" if loss == "fixed_lambda" else loss)
  return label if weighting == "gamma" else f"{label}, {weighting} weights"


def build_runs(plan: ml_collections.ConfigDict) -> list[RunSpec]:
  """Every run of the plan, in execution order (the key comparisons first, so partial results matter).

  Order: per arch KL and L_lambda (seed 0) -> per arch L_alpha -> extra seeds of the EAGLE-3 KL /
  L_lambda pair -> the rest of the EAGLE-3 ablation (other etas, fixed lambda, TV) -> the chain arms
  (``plan.chain_arms``: (arch, loss, head weighting), seed 0; L_lambda takes the arch's eta).
  """
  runs: dict[str, RunSpec] = {}
  abl = plan.ablation
  seeds0 = tuple(int(s) for s in plan.seeds)

  def add(arch: str, loss: str, seed: int, eta: float | None = None, lam: float | None = None,
          weighting: str = "gamma") -> None:
    eta = float(eta) if loss == "lk_hybrid" else None
    lam = float(lam) if loss == "fixed_lambda" else None
    name = f"{arch}.{loss_tag(loss, eta, lam, weighting)}.s{seed}"
    groups = []
    default_eta = float(plan.eta[arch])
    paper = weighting == "gamma" and loss != "lk_tau"
    if paper and seed in seeds0 and loss in plan.main_losses and (loss != "lk_hybrid" or eta == default_eta):
      groups.append("main")
    if paper and arch == abl.arch and seed in seeds0:
      groups.append("ablation")
    if (paper and arch == abl.arch and loss in plan.extra_seed_losses
        and (loss != "lk_hybrid" or eta == default_eta)):
      groups.append("seeds")
    if not paper:
      groups.append("chain")
    spec = RunSpec(name=name, arch=arch, loss=loss, eta=eta, lam=lam, seed=int(seed),
                   num_draft=int(plan.num_draft[arch]), groups=tuple(groups), weighting=weighting)
    runs.setdefault(name, spec)

  first = [l for l in ("kl", "lk_hybrid") if l in plan.main_losses]
  rest = [l for l in plan.main_losses if l not in first]
  for seed in seeds0:
    for losses in (first, rest):
      for arch in plan.archs:
        for loss in losses:
          add(arch, loss, seed, eta=plan.eta[arch])
  if abl.arch in plan.archs:
    for seed in plan.extra_seeds:
      for loss in plan.extra_seed_losses:
        add(abl.arch, loss, int(seed), eta=plan.eta[abl.arch])
    for seed in seeds0:
      for eta in abl.etas:
        add(abl.arch, "lk_hybrid", seed, eta=eta)
      if abl.fixed_lambda is not None:
        add(abl.arch, "fixed_lambda", seed, lam=abl.fixed_lambda)
      if abl.tv:
        add(abl.arch, "tv", seed)
  for arch, loss, weighting in plan.get("chain_arms", ()):
    if arch not in plan.archs:
      raise ValueError(f"plan.chain_arms: arch {arch!r} is not in plan.archs {tuple(plan.archs)}")
    if loss == "lk_tau" and weighting != "gamma":
      raise ValueError(f"plan.chain_arms: ({arch}, lk_tau, {weighting}): lk_tau is one chain objective, "
                       "it takes no head weighting (use gamma)")
    add(arch, loss, seeds0[0], eta=plan.eta[arch], lam=plan.ablation.fixed_lambda, weighting=weighting)
  return list(runs.values())


def select_runs(runs: Sequence[RunSpec], only: str | Sequence[str] | None) -> list[RunSpec]:
  """Runs matching any of the comma-separated ``only`` patterns (fnmatch on the name, or an arch name).

  ``eagle3`` -> every EAGLE-3 run; ``*.kl.*`` -> every KL run; ``medusa.lk_hybrid_eta10.s0`` -> that run.
  Raises ValueError for a pattern that matches nothing (a typo never silently runs nothing).
  """
  if not only:
    return list(runs)
  pats = [p.strip() for p in (only.split(",") if isinstance(only, str) else only) if p.strip()]
  out, unused = [], []
  for p in pats:
    hit = [r for r in runs if r.arch == p or fnmatch.fnmatchcase(r.name, p)]
    if not hit:
      unused.append(p)
    out += hit
  if unused:
    raise ValueError(f"--only {unused}: matches no run of the plan; runs: {[r.name for r in runs]}")
  chosen = {r.name for r in out}
  return [r for r in runs if r.name in chosen]


def data_dir_of(plan: ml_collections.ConfigDict, root: str) -> str:
  return os.path.abspath(plan.data.dir) if plan.data.dir else os.path.join(os.path.abspath(root), "data")


def run_overrides(run: RunSpec, plan: ml_collections.ConfigDict, data_dir: str) -> dict[str, Any]:
  """Dotted overrides of ``configs/<arch>.py`` for ``run``: the loss, the seed and the study's shared knobs."""
  t, d = plan.train, plan.data
  o: dict[str, Any] = {"loss.kind": run.loss, "seed": run.seed, "data.seed": run.seed}
  if run.eta is not None:
    o["loss.eta"] = run.eta
  if run.lam is not None:
    o["loss.lam"] = run.lam
  o["loss.head_weighting"] = run.weighting
  o.update({
      "name": f"{plan.name}.{run.name}",
      "data.dir": data_dir, "data.auto_prepare": False, "data.max_length": int(d.max_length),
      "data.val_fraction": float(d.val_fraction),
      "data.prepare.num_prompts": int(d.num_prompts), "data.prepare.max_new_tokens": int(d.max_new_tokens),
      "batch_size": int(t.batch_size), "num_steps": int(t.num_steps), "optim.warmup_steps": int(t.warmup_steps),
      "eval_every": int(t.eval_every), "eval_steps": int(t.eval_steps), "log_every": int(t.log_every),
      "checkpoint.every": int(t.checkpoint_every), "precision": str(t.precision)})
  if t.get("lr", 0):
    o["optim.lr"] = float(t.lr)
  o.update(_dotted(plan.get("arch_overrides", {}).get(run.arch, {})))
  return o


def _dotted(tree: Any, prefix: str = "") -> dict[str, Any]:
  """Nested mapping / ConfigDict -> flat ``{"a.b.c": value}`` overrides."""
  items = tree.items() if hasattr(tree, "items") else []
  out: dict[str, Any] = {}
  for k, v in items:
    key = f"{prefix}{k}"
    if hasattr(v, "items"):
      out.update(_dotted(v, key + "."))
    else:
      out[key] = v
  return out


def run_config(run: RunSpec, plan: ml_collections.ConfigDict, data_dir: str) -> ml_collections.ConfigDict:
  """The locked training config of ``run`` (``configs/<arch>.py`` + `run_overrides`); checks K."""
  from lkjax.config_args import load_config
  config = load_config(plan.arch_configs[run.arch], run_overrides(run, plan, data_dir))
  if int(config.model.num_heads) != run.num_draft:
    raise ValueError(f"{run.name}: the plan evaluates K={run.num_draft} draft tokens but "
                     f"{plan.arch_configs[run.arch]} trains {config.model.num_heads} heads")
  return config


def eval_settings(plan: ml_collections.ConfigDict) -> dict[str, Any]:
  e = plan.eval
  return dict(benchmarks=list(e.benchmarks), temperatures=[float(t) for t in e.temperatures],
              limit=int(e.limit) or None, max_new_tokens=int(e.max_new_tokens), seed=int(e.seed),
              n_boot=int(e.n_boot), offline_max_batches=int(e.offline_max_batches) or None,
              baseline=bool(e.get("baseline", True)))


def data_settings(plan: ml_collections.ConfigDict) -> dict[str, Any]:
  d = plan.data
  return dict(target=plan.target, num_prompts=int(d.num_prompts), max_new_tokens=int(d.max_new_tokens),
              max_length=int(d.max_length), temperature=float(d.temperature), seed=int(d.seed),
              max_prompt_chars=int(d.max_prompt_chars) or None)


def _jsonable(x: Any) -> Any:
  return json.loads(json.dumps(x, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


# ----------------------------------------------------------------------------------------------- state


def _now() -> str:
  return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def write_json(path: str, obj: Any) -> None:
  """`lkjax.files.write_json` of ``obj`` made strict JSON (`_jsonable`: no NaN)."""
  files.write_json(path, _jsonable(obj), allow_nan=False)


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


class StudyState:
  """``<root>/study_state.json``: per-step status and timings, per-run settings, invocations.

  ``steps[key] = {status: running|done|failed, seconds (summed over attempts), attempts, started,
  finished, error}``; a step left "running" by a killed process is simply redone (and resumes).
  """

  def __init__(self, root: str):
    self.root = os.path.abspath(root)
    self.path = os.path.join(self.root, STATE_FILE)
    if os.path.exists(self.path):
      self.data = read_json(self.path)
    else:
      self.data = dict(version=1, created=_now(), plan=None, data=None, runs={}, steps={}, invocations=[])

  def save(self) -> None:
    write_json(self.path, self.data)

  def step(self, key: str) -> dict[str, Any]:
    return self.data["steps"].get(key, {})

  def start(self, key: str) -> float:
    s = self.data["steps"].setdefault(key, dict(status="pending", seconds=0.0, attempts=0))
    s.update(status="running", started=_now(), attempts=int(s.get("attempts", 0)) + 1)
    s.pop("error", None)
    self.save()
    return time.perf_counter()

  def finish(self, key: str, t0: float, *, status: str = "done", error: str | None = None,
             **extra: Any) -> None:
    s = self.data["steps"][key]
    s.update(status=status, finished=_now(), seconds=float(s.get("seconds", 0.0)) + time.perf_counter() - t0,
             **extra)
    if error:
      s["error"] = error
    self.save()

  def check_settings(self, kind: str, key: str, settings: Mapping[str, Any], *, done: bool) -> None:
    """Record ``settings`` of ``key``; refuse when a finished step was made with different ones."""
    table = self.data.setdefault(kind, {}) if kind == "runs" else None
    old = table.get(key) if table is not None else self.data.get(kind)
    new = _jsonable(dict(settings))
    if old is not None and old != new and done:
      diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
      raise ValueError(f"{self.root}: {key} was finished with other settings ({diff}: "
                       f"{ {k: old.get(k) for k in diff} } -> { {k: new.get(k) for k in diff} }). "
                       f"Use a new --root for a changed plan, or delete {key}'s outputs to redo it.")
    if table is not None:
      table[key] = new
    else:
      self.data[kind] = new


# ----------------------------------------------------------------------------------------------- real work


def hardware_info() -> dict[str, Any]:
  """Where the study ran: platform, CPU count, load, JAX backend and devices, torch threads."""
  info: dict[str, Any] = dict(platform=platform.platform(), machine=platform.machine(),
                              processor=platform.processor() or None, python=platform.python_version(),
                              cpu_count=os.cpu_count())
  try:
    info["load_average"] = [round(x, 2) for x in os.getloadavg()]
  except OSError:
    pass
  try:
    import jax
    info["jax_version"] = jax.__version__
    info["jax_backend"] = jax.default_backend()
    info["jax_devices"] = [str(d) for d in jax.devices()]
    kinds = {getattr(d, "device_kind", "") for d in jax.devices()}
    info["jax_device_kind"] = sorted(k for k in kinds if k)
  except Exception as e:  # noqa: BLE001 -- hardware info must never stop a study
    info["jax_error"] = repr(e)
  if "torch" in sys.modules:
    info["torch_threads"] = sys.modules["torch"].get_num_threads()
  return info


def default_prepare(plan: ml_collections.ConfigDict, data_dir: str) -> None:
  """Regenerate the study's data with the packaged target (resumes a partial build)."""
  from lkjax.data.prepare import ensure_default_dataset
  d = plan.data
  ensure_default_dataset(data_dir, target=plan.target, num_prompts=int(d.num_prompts),
                         max_new_tokens=int(d.max_new_tokens), max_length=int(d.max_length),
                         temperature=float(d.temperature), seed=int(d.seed), batch_size=int(d.gen_batch_size),
                         max_prompt_chars=int(d.max_prompt_chars) or None)


def default_train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  from lkjax.train.loop import train_and_evaluate
  return train_and_evaluate(config, workdir)


_TARGETS: dict[str, Any] = {}


def _target(name: str):
  if name not in _TARGETS:
    from lkjax.targets.hf import TargetModel
    _TARGETS[name] = TargetModel.load(name)
  return _TARGETS[name]


def default_eval(run: RunSpec, config: ml_collections.ConfigDict, train_workdir: str, out_dir: str,
                 plan: ml_collections.ConfigDict) -> dict[str, Any]:
  """tau of the trained draft at every temperature and benchmark, with the offline tau_off (T = 1)."""
  from lkjax.eval.run import evaluate_draft, offline_estimate
  from lkjax.train.loop import load_trained_draft
  e = eval_settings(plan)
  trained = load_trained_draft(train_workdir)
  offline = offline_estimate(trained.model, trained.config, max_batches=e["offline_max_batches"])
  return evaluate_draft(trained.model, _target(plan.target), benchmarks=e["benchmarks"],
                        temperatures=e["temperatures"], num_draft=run.num_draft,
                        max_new_tokens=e["max_new_tokens"], limit=e["limit"], seed=e["seed"], offline=offline,
                        out_dir=out_dir, label=f"{ARCH_TITLES[run.arch]} {run.label} s{run.seed}",
                        num_threads=int(plan.eval.num_threads) or None, n_boot=e["n_boot"], progress=True,
                        meta=dict(run=run.name, train_step=trained.step), baseline=e["baseline"])


# ----------------------------------------------------------------------------------------------- orchestration


def run_dir(root: str, run: RunSpec) -> str:
  return os.path.join(os.path.abspath(root), "runs", run.name)


def _train_finished(workdir: str) -> dict[str, Any] | None:
  path = os.path.join(workdir, "summary.json")
  if not os.path.exists(path):
    return None
  s = read_json(path)
  return s if s.get("status") == "finished" else None


def _manifest_exists(data_dir: str) -> bool:
  return os.path.exists(os.path.join(data_dir, "manifest.json"))


def docs_paths(plan: ml_collections.ConfigDict, root: str, docs_dir: str | None = None) -> tuple[str, str]:
  """(markdown path, results directory) of the plan's docs: ``<dir>/<name>.md`` and ``<dir>/<name>/``."""
  d = docs_dir or plan.docs.dir or os.path.join(os.path.abspath(root), "docs")
  return os.path.join(d, f"{plan.docs.name}.md"), os.path.join(d, plan.docs.name)


def run_study(plan: ml_collections.ConfigDict, root: str, *, only: str | Sequence[str] | None = None,
              max_hours: float | None = None, docs_dir: str | None = None,
              prepare_fn: Callable[..., Any] | None = None, train_fn: Callable[..., Any] | None = None,
              eval_fn: Callable[..., Any] | None = None, argv: Sequence[str] | None = None,
              clock: Callable[[], float] = time.monotonic, log: Callable[[str], None] = print,
              hardware_fn: Callable[[], dict] = hardware_info) -> dict[str, Any]:
  """Run (or resume) the study; returns ``{"done", "failed", "pending", "stopped", "docs"}``.

  Args:
    plan: ``experiments/study/plan.py`` ConfigDict.
    root: the study directory (state, data, runs).
    only: run-name patterns (`select_runs`); the docs still cover the whole plan.
    max_hours: launch no new step after this many hours of this invocation (a step already running
      finishes).
    docs_dir: where ``<name>.md`` and ``<name>/`` go (default: the plan's ``docs.dir``).
    prepare_fn: ``prepare_fn(plan, data_dir)`` builds the shard directory (default `default_prepare`).
    train_fn: ``train_fn(config, workdir) -> summary`` (default `lkjax.train.loop.train_and_evaluate`);
      a run is finished when the summary's status is "finished".
    eval_fn: ``eval_fn(run, config, train_workdir, out_dir, plan) -> report`` in the
      `lkjax.eval.report.build_report` schema (default `default_eval`).
    argv: the command line, recorded in the state and the docs.
    clock, log, hardware_fn: injectable for tests.
  """
  prepare_fn = prepare_fn or default_prepare
  train_fn = train_fn or default_train
  eval_fn = eval_fn or default_eval
  root = os.path.abspath(root)
  os.makedirs(root, exist_ok=True)
  all_runs = build_runs(plan)
  runs = select_runs(all_runs, only)
  data_dir = data_dir_of(plan, root)
  md_path, results_dir = docs_paths(plan, root, docs_dir)
  state = StudyState(root)
  state.data["plan"] = _jsonable(plan.to_dict())
  t_start = clock()
  deadline = None if not max_hours else t_start + 3600.0 * float(max_hours)
  invocation = dict(argv=list(argv) if argv is not None else None, started=_now(), hardware=hardware_fn(),
                    only=only if isinstance(only, (str, type(None))) else list(only), max_hours=max_hours)
  state.data["invocations"].append(invocation)
  state.save()
  out = dict(done=[], failed=[], skipped=[], stopped=None, docs=md_path)

  def out_of_time(what: str) -> bool:
    if deadline is not None and clock() >= deadline:
      out["stopped"] = f"--max_hours={max_hours} reached before {what}"
      log(f"[study] {out['stopped']}; rerun the same command to continue")
      return True
    return False

  def regenerate(plots: bool = False):
    results = collect_results(plan, root, all_runs, state)
    write_docs(plan, results, state.data, md_path, results_dir, plots=plots)

  try:
    # (a) data, once.
    state.check_settings("data", "data", data_settings(plan), done=_manifest_exists(data_dir))
    state.save()
    data_ready = _manifest_exists(data_dir)
    if not data_ready and not out_of_time("data"):
      log(f"[study] data: preparing {data_settings(plan)} -> {data_dir}")
      t0 = state.start("data")
      try:
        prepare_fn(plan, data_dir)
      except Exception as e:
        state.finish("data", t0, status="failed", error=f"{type(e).__name__}: {e}")
        raise
      if not _manifest_exists(data_dir):
        state.finish("data", t0, status="failed", error="prepare_fn returned without a manifest.json")
        raise RuntimeError(f"{data_dir}: prepare_fn wrote no manifest.json")
      state.finish("data", t0)
      data_ready = True
    elif data_ready and state.step("data").get("status") != "done":
      state.data["steps"]["data"] = dict(state.step("data"), status="done", note="found on disk")
      state.save()

    # (b, c) train and evaluate every run.
    for i, run in enumerate(runs if data_ready else []):
      config = run_config(run, plan, data_dir)
      rdir = run_dir(root, run)
      workdir, eval_dir = os.path.join(rdir, "train"), os.path.join(rdir, "eval")
      tkey, ekey = f"train/{run.name}", f"eval/{run.name}"
      finished = _train_finished(workdir)
      state.check_settings("runs", run.name, dict(overrides=run_overrides(run, plan, data_dir),
                                                  eval=eval_settings(plan)),
                           done=finished is not None or os.path.isdir(os.path.join(workdir, "checkpoints"))
                           or os.path.exists(os.path.join(eval_dir, EVAL_MARKER)))
      state.save()
      head = f"[study] {i + 1}/{len(runs)} {run.name}"
      if finished is None:
        if out_of_time(tkey):
          break
        log(f"{head}: training -> {workdir}")
        t0 = state.start(tkey)
        try:
          summary = train_fn(config, workdir)
        except Exception as e:  # a failed run must not stop the study; it is retried on the next invocation
          state.finish(tkey, t0, status="failed", error=f"{type(e).__name__}: {e}",
                       traceback=traceback.format_exc(limit=8))
          log(f"{head}: training FAILED: {type(e).__name__}: {e}")
          out["failed"].append(tkey)
          regenerate()
          continue
        ok = (summary or {}).get("status") == "finished"
        if ok and not os.path.exists(os.path.join(workdir, "summary.json")):
          write_json(os.path.join(workdir, "summary.json"), summary)
        state.finish(tkey, t0, status="done" if ok else "incomplete",
                     train_status=(summary or {}).get("status"))
        if not ok:
          log(f"{head}: training ended '{(summary or {}).get('status')}'; rerun to resume")
          out["failed"].append(tkey)
          regenerate()
          continue
        out["done"].append(tkey)
      else:
        out["skipped"].append(tkey)
        if state.step(tkey).get("status") != "done":
          state.data["steps"][tkey] = dict(state.step(tkey), status="done", note="found on disk")
          state.save()
      regenerate()

      if os.path.exists(os.path.join(eval_dir, EVAL_MARKER)):
        out["skipped"].append(ekey)
        continue
      if out_of_time(ekey):
        break
      log(f"{head}: evaluating -> {eval_dir}")
      os.makedirs(eval_dir, exist_ok=True)
      t0 = state.start(ekey)
      try:
        report = eval_fn(run, config, workdir, eval_dir, plan)
      except Exception as e:
        state.finish(ekey, t0, status="failed", error=f"{type(e).__name__}: {e}",
                     traceback=traceback.format_exc(limit=8))
        log(f"{head}: evaluation FAILED: {type(e).__name__}: {e}")
        out["failed"].append(ekey)
        regenerate()
        continue
      state.finish(ekey, t0)
      write_json(os.path.join(eval_dir, EVAL_MARKER), compact_report(report))
      out["done"].append(ekey)
      regenerate(plots=True)
  finally:
    invocation.update(finished=_now(), hours=(clock() - t_start) / 3600.0, stopped=out["stopped"])
    state.save()
    try:
      regenerate(plots=True)
    except Exception as e:  # noqa: BLE001 -- never mask the step's own exception; the docs can be redone
      log(f"[study] could not regenerate the docs ({type(e).__name__}: {e}); run --docs_only later")
  pending = [r.name for r in all_runs
             if not os.path.exists(os.path.join(run_dir(root, r), "eval", EVAL_MARKER))]
  out["pending"] = pending
  log(f"[study] {len(all_runs) - len(pending)}/{len(all_runs)} runs evaluated; docs: {md_path}"
      + (f"; pending: {', '.join(pending)}" if pending else ""))
  return out


# ----------------------------------------------------------------------------------------------- results


def compact_report(report: Mapping[str, Any]) -> dict[str, Any]:
  """The numbers the docs use from a `build_report` dict (no per-prompt records)."""
  temps = {}
  for t, g in report["temperatures"].items():
    benches = {b: {k: s.get(k) for k in ("tau", "tau_ci95", "offline_tau", "num_prompts", "num_rounds",
                                         "position_acceptance", "speedup", "truncated_prompts")}
               for b, s in g["benchmarks"].items()}
    temps[t] = dict(benchmarks=benches, mean={k: g["mean"].get(k) for k in ("tau", "tau_ci95", "offline_tau",
                                                                            "speedup")})
  meta = report.get("meta") or {}
  keep = ("num_draft", "max_new_tokens", "limit", "seed", "num_prompts", "num_turns", "truncated_turns",
          "offline", "timings", "gsm_symbolic_seed", "train_step")
  return dict(label=report.get("label"), ci_level=report.get("ci_level"), n_boot=report.get("n_boot"),
              temperatures=temps, meta={k: meta[k] for k in keep if k in meta})


def collect_results(plan: ml_collections.ConfigDict, root: str, runs: Sequence[RunSpec],
                    state: StudyState | Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
  """One result dict per run of the plan (finished or not) from the files under ``root``.

  Keys: name, arch, loss, eta, lam, seed, num_draft, label, groups, train (None or {status, step,
  total_steps, seconds, val}), eval (None or `compact_report`, plus seconds), status
  (pending | trained | evaluated | failed).
  """
  steps = (state.data if isinstance(state, StudyState) else state or {}).get("steps", {})
  out = []
  for run in runs:
    rdir = run_dir(root, run)
    r = dict(dataclasses.asdict(run), label=run.label, train=None, eval=None, status=PENDING)
    r["groups"] = list(run.groups)
    summ = _train_finished(os.path.join(rdir, "train"))
    if summ is not None:
      val = summ.get("val") or {}
      r["train"] = dict(status=summ.get("status"), step=summ.get("step"), total_steps=summ.get("total_steps"),
                        seconds=steps.get(f"train/{run.name}", {}).get("seconds"),
                        val={k: v for k, v in val.items() if k in ("loss", "tau") or k.startswith("alpha/")})
      r["status"] = "trained"
    marker = os.path.join(rdir, "eval", EVAL_MARKER)
    if os.path.exists(marker):
      r["eval"] = dict(read_json(marker), seconds=steps.get(f"eval/{run.name}", {}).get("seconds"))
      r["status"] = "evaluated"
    failed = [k for k in (f"train/{run.name}", f"eval/{run.name}") if steps.get(k, {}).get("status") == "failed"]
    if failed and r["status"] != "evaluated":
      r["status"] = "failed"
      r["error"] = "; ".join(f"{k}: {steps[k].get('error')}" for k in failed)
    out.append(r)
  return out


def _temp_key(t: float) -> str:
  return f"{float(t):g}"


def tau_of(result: Mapping[str, Any] | None, temperature: float | str, bench: str = "mean"
           ) -> tuple[float, list[float] | None] | None:
  """(tau, [lo, hi]) of a result at ``temperature`` for a benchmark or ``"mean"``; None if missing.

  ``temperature="offline"`` gives the offline tau_off (validation shards, T = 1), without a CI.
  """
  if not result or not result.get("eval"):
    return None
  temps = result["eval"]["temperatures"]
  if temperature == "offline":
    off = (result["eval"].get("meta") or {}).get("offline") or {}
    if off.get("tau") is not None:
      return float(off["tau"]), None
    for g in temps.values():
      if g["mean"].get("offline_tau") is not None:
        return float(g["mean"]["offline_tau"]), None
    return None
  g = temps.get(_temp_key(float(temperature)))
  if g is None:
    return None
  s = g["mean"] if bench == "mean" else g["benchmarks"].get(bench)
  if s is None or s.get("tau") is None:
    return None
  ci = s.get("tau_ci95")
  return float(s["tau"]), (None if not ci or ci[0] is None else [float(ci[0]), float(ci[1])])


def relative_change(lk: float | None, kl: float | None) -> float | None:
  """``100 * (lk - kl) / kl`` in percent (None if either is missing)."""
  if lk is None or kl is None or not kl:
    return None
  return 100.0 * (lk - kl) / kl


# ----------------------------------------------------------------------------------------------- docs


def _cell(v: tuple[float, list[float] | None] | None, missing: str = PENDING) -> str:
  if v is None:
    return missing
  tau, ci = v
  return f"{tau:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def _pct(x: float | None, missing: str = PENDING) -> str:
  return missing if x is None else f"{x:+.1f}%"


def _val(v) -> float | None:
  return None if v is None else v[0]


def _missing(r: Mapping[str, Any] | None) -> str:
  if r is None:
    return "not in plan"
  return "failed" if r.get("status") == "failed" else PENDING


def _find(results: Sequence[Mapping[str, Any]], arch: str, loss: str, *, eta=None, lam=None,
          seed: int | None = None, weighting: str = "gamma") -> Mapping[str, Any] | None:
  for r in results:
    if r["arch"] == arch and r["loss"] == loss and (seed is None or r["seed"] == seed) and \
        (eta is None or r.get("eta") == eta) and (lam is None or r.get("lam") == lam) and \
        r.get("weighting", "gamma") == weighting:
      return r
  return None


def _main_run(results, plan, arch, loss) -> Mapping[str, Any] | None:
  return _find(results, arch, loss, eta=float(plan.eta[arch]) if loss == "lk_hybrid" else None,
               seed=int(plan.seeds[0]))


def _benchmarks(plan) -> list[str]:
  return list(plan.eval.benchmarks)


def _temps(plan) -> list[float]:
  return [float(t) for t in plan.eval.temperatures]


def main_table(plan, results) -> list[str]:
  """Paper Table 1 format: per temperature, architecture x loss rows, tau per benchmark and mean [CI]."""
  benches = _benchmarks(plan)
  lines = []
  for t in _temps(plan):
    off = t == 1.0
    lines += [f"#### T = {t:g}", "",
              "| Architecture | Loss | " + " | ".join(BENCH_TITLES.get(b, b) for b in benches) + " | Mean |"
              + (" offline τ |" if off else ""),
              "|---|---|" + "---|" * (len(benches) + 1) + ("---|" if off else "")]
    for arch in plan.archs:
      for loss in plan.main_losses:
        r = _main_run(results, plan, arch, loss)
        miss = _missing(r)
        label = loss_label(loss, float(plan.eta[arch]), None)
        cells = [_cell(tau_of(r, t, b), miss) for b in benches] + [_cell(tau_of(r, t), miss)]
        row = f"| {ARCH_TITLES[arch]} | {label} | " + " | ".join(cells) + " |"
        if off:
          row += f" {_cell(tau_of(r, 'offline'), miss)} |"
        lines.append(row)
    lines.append("")
  return lines


def relative_table(plan, results) -> list[str]:
  """Relative change of mean tau, LK vs KL, per architecture and temperature (and offline tau_off)."""
  lk = [l for l in plan.main_losses if l != "kl"]
  lines = ["| Architecture | T | KL τ | " + " | ".join(f"{loss_label(l, 0, None).split(' ')[0]} τ | Δ vs KL"
                                                     for l in lk) + " |",
           "|---|---|---|" + "---|---|" * len(lk)]
  for arch in plan.archs:
    kl_r = _main_run(results, plan, arch, "kl")
    for t in _temps(plan) + ["offline"]:
      kl = _val(tau_of(kl_r, t))
      cells = [_cell(None if kl is None else (kl, None), _missing(kl_r))]
      for l in lk:
        r = _main_run(results, plan, arch, l)
        v = _val(tau_of(r, t))
        cells += [_cell(None if v is None else (v, None), _missing(r)), _pct(relative_change(v, kl))]
      tl = "offline (val, T=1)" if t == "offline" else f"{t:g}"
      lines.append(f"| {ARCH_TITLES[arch]} | {tl} | " + " | ".join(cells) + " |")
  return lines


def ablation_runs(plan, results) -> list[tuple[str, Mapping[str, Any] | None]]:
  """(label, result) of the EAGLE-3 ablation rows: KL, TV, fixed lambda, L_alpha, L_lambda for each eta."""
  arch, abl = plan.ablation.arch, plan.ablation
  seed = int(plan.seeds[0])
  rows = [("KL", _find(results, arch, "kl", seed=seed))]
  if abl.tv:
    rows.append(("TV", _find(results, arch, "tv", seed=seed)))
  if abl.fixed_lambda is not None:
    rows.append((loss_label("fixed_lambda", lam=abl.fixed_lambda),
                 _find(results, arch, "fixed_lambda", lam=float(abl.fixed_lambda), seed=seed)))
  if "lk_alpha" in plan.main_losses:
    rows.append(("L_α", _find(results, arch, "lk_alpha", seed=seed)))
  for eta in sorted(set(float(e) for e in abl.etas) | {float(plan.eta[arch])}):
    rows.append((loss_label("lk_hybrid", eta=eta), _find(results, arch, "lk_hybrid", eta=eta, seed=seed)))
  return rows


def _vs_kl_header(temps, first: str = "| Loss |") -> list[str]:
  """Header of a table of mean τ, offline τ and Δ vs KL per temperature (`_vs_kl_cells`)."""
  return [first + " " + " | ".join(f"mean τ, T={t:g}" for t in temps) + " | offline τ | "
          + " | ".join(f"Δ vs KL, T={t:g}" for t in temps) + " |",
          "|" + "---|" * (first.count("|") - 1 + 2 * len(temps) + 1)]


def _vs_kl_cells(r, kl_r, temps, *, is_kl: bool) -> list[str]:
  """Mean τ per temperature, offline τ, and the relative change against ``kl_r`` ("—" on the KL row)."""
  m = _missing(r)
  cells = [_cell(tau_of(r, t), m) for t in temps] + [_cell(tau_of(r, "offline"), m)]
  return cells + ["—" if is_kl else _pct(relative_change(_val(tau_of(r, t)), _val(tau_of(kl_r, t))), m)
                  for t in temps]


def ablation_table(plan, results) -> list[str]:
  temps = _temps(plan)
  rows = ablation_runs(plan, results)
  kl_r = rows[0][1]
  return _vs_kl_header(temps) + [f"| {label} | " + " | ".join(_vs_kl_cells(r, kl_r, temps, is_kl=label == "KL"))
                                 + " |" for label, r in rows]


def chain_table(plan, results) -> list[str]:
  """The chain runs (group ``chain``) beside their architecture's KL and L_lambda of the main table."""
  temps = _temps(plan)
  lines = _vs_kl_header(temps, "| Architecture | Loss |")
  chain = [r for r in results if "chain" in r["groups"]]
  for arch in dict.fromkeys(r["arch"] for r in chain):
    kl_r = _main_run(results, plan, arch, "kl")
    rows = [("KL", kl_r), (loss_label("lk_hybrid", eta=float(plan.eta[arch])), _main_run(results, plan, arch, "lk_hybrid"))]
    rows += [(r["label"], r) for r in chain if r["arch"] == arch]
    lines += [f"| {ARCH_TITLES[arch]} | {label} | " + " | ".join(_vs_kl_cells(r, kl_r, temps, is_kl=label == "KL"))
              + " |" for label, r in rows]
  return lines


def seed_stats(values: Sequence[float]) -> tuple[float, float | None]:
  """(mean, sample standard deviation; None for a single value)."""
  a = np.asarray(values, np.float64)
  return float(a.mean()), (float(a.std(ddof=1)) if a.size > 1 else None)


def seeds_table(plan, results) -> list[str]:
  """EAGLE-3 KL vs L_lambda per seed and mean ± s.d. over the seeds that finished."""
  arch = plan.ablation.arch
  seeds = sorted({int(s) for s in plan.seeds} | {int(s) for s in plan.extra_seeds})
  temps = _temps(plan) + ["offline"]
  tl = [f"T={t:g}" if t != "offline" else "offline" for t in temps]
  lines = ["| Loss | Seed | " + " | ".join(f"mean τ, {x}" for x in tl) + " |", "|---|---|" + "---|" * len(temps)]
  means: dict[str, list[float | None]] = {}
  for loss in plan.extra_seed_losses:
    eta = float(plan.eta[arch]) if loss == "lk_hybrid" else None
    label = loss_label(loss, eta)
    per_t: list[list[float]] = [[] for _ in temps]
    for s in seeds:
      r = _find(results, arch, loss, eta=eta, seed=s)
      vals = [tau_of(r, t) for t in temps]
      for j, v in enumerate(vals):
        if v is not None:
          per_t[j].append(v[0])
      lines.append(f"| {label} | {s} | " + " | ".join(_cell(v, _missing(r)) for v in vals) + " |")
    cells, ms = [], []
    for vals in per_t:
      if not vals:
        cells.append(PENDING)
        ms.append(None)
        continue
      mu, sd = seed_stats(vals)
      ms.append(mu)
      cells.append(f"{mu:.3f} ± {sd:.3f} (n={len(vals)})" if sd is not None else f"{mu:.3f} (n=1)")
    means[loss] = ms
    lines.append(f"| {label} | **mean ± s.d.** | " + " | ".join(cells) + " |")
  if "kl" in means:
    for loss, ms in means.items():
      if loss == "kl":
        continue
      lines.append(f"| Δ {loss_label(loss, float(plan.eta[arch]))} vs KL (seed means) | | "
                   + " | ".join(_pct(relative_change(a, b)) for a, b in zip(ms, means["kl"])) + " |")
  return lines


def paper_table(plan, results) -> list[str]:
  """The paper's numbers (static) next to this study's relative change for the same draft and T."""
  lines = ["| Paper target | Draft | T | paper KL τ | paper L_λ τ | paper Δ | this study Δ (SmolLM2-135M, mean τ) |",
           "|---|---|---|---|---|---|---|"]
  for target, arch, t, kl, lk, rel in PAPER_RESULTS:
    d = rel if rel is not None else relative_change(lk, kl)
    approx = "~" if rel is not None else ""
    ours = None
    if arch in plan.archs:
      ours = relative_change(_val(tau_of(_main_run(results, plan, arch, "lk_hybrid"), t)),
                             _val(tau_of(_main_run(results, plan, arch, "kl"), t)))
    f = lambda x: "—" if x is None else f"{x:.2f}"  # noqa: E731
    lines.append(f"| {target} | {ARCH_TITLES[arch]} | {t} | {f(kl)} | {f(lk)} | {approx}{d:+.1f}% | "
                 f"{_pct(ours)} |")
  return lines


def _fmt_hours(s: float | None) -> str:
  return "—" if s is None else f"{s / 3600:.2f} h ({s:.0f} s)"


def wallclock_lines(state_data: Mapping[str, Any]) -> list[str]:
  steps = state_data.get("steps", {})
  tot = {k: sum(float(v.get("seconds") or 0) for n, v in steps.items() if n.split("/")[0] == k)
         for k in ("data", "train", "eval")}
  inv = state_data.get("invocations", [])
  lines = ["| Stage | Steps done | Wall-clock |", "|---|---|---|"]
  for k in ("data", "train", "eval"):
    n = sum(1 for name, v in steps.items() if name.split("/")[0] == k and v.get("status") == "done")
    lines.append(f"| {k} | {n} | {_fmt_hours(tot[k])} |")
  lines.append(f"| **total** | | {_fmt_hours(sum(tot.values()))} |")
  per = ", ".join(f"`{n}` {float(v.get('seconds') or 0):.0f}" for n, v in sorted(steps.items()) if n != "data")
  lines += ["", "Per step (seconds): " + (per or "none yet")]
  lines += ["", f"Invocations: {len(inv)}; invocation wall-clock in all: "
            f"{sum(float(i.get('hours') or 0) for i in inv):.2f} h."]
  return lines


def hardware_lines(state_data: Mapping[str, Any]) -> list[str]:
  inv = state_data.get("invocations", [])
  seen, lines = set(), []
  for i in inv:
    h = i.get("hardware") or {}
    key = json.dumps({k: h.get(k) for k in ("platform", "cpu_count", "jax_devices")}, sort_keys=True)
    if key in seen:
      continue
    seen.add(key)
    devs = h.get("jax_devices") or []
    lines.append(f"- `{h.get('platform')}` ({h.get('machine')}, {h.get('processor') or 'cpu n/a'}), "
                 f"{h.get('cpu_count')} CPUs (os.cpu_count), JAX {h.get('jax_version')} backend "
                 f"`{h.get('jax_backend')}` with {len(devs)} device(s) {', '.join(sorted(set(devs)))[:200]}; "
                 f"load average at start {h.get('load_average')}")
  return lines or ["- not recorded yet"]


def command_lines(plan, state_data: Mapping[str, Any]) -> list[str]:
  arg = {"cpu": "", "gpu": ":gpu", "tiny": ":tiny"}.get(plan.variant, "")
  root = {"cpu": "runs/study"}.get(plan.variant, f"runs/{plan.name}")
  lines = ["```bash",
           f"python experiments/study/run.py --root={root} --plan=experiments/study/plan.py{arg}"
           f"   # launch, or resume after a kill", "```", "",
           "Recorded invocations:", ""]
  for i in state_data.get("invocations", []):
    argv = i.get("argv")
    cmd = " ".join(["python"] + list(argv)) if argv else "(called from Python)"
    h = i.get("hours")
    lines.append(f"- `{cmd}` — started {i.get('started')}, "
                 + (f"{h:.2f} h" if h is not None else "still running or killed")
                 + (f", stopped: {i['stopped']}" if i.get("stopped") else ""))
  if not state_data.get("invocations"):
    lines.append("- none yet")
  return lines


def plan_lines(plan) -> list[str]:
  d, t, e = plan.data, plan.train, plan.eval
  lim = f"the first {e.limit} prompts of each benchmark" if e.limit else "every prompt of each benchmark"
  return [
      f"- Target: packaged **SmolLM2-135M-Instruct** (`{plan.target}`); draft vocabulary from the configs.",
      f"- Data (shared by every run): {d.num_prompts} ShareGPT prompts (≤ {d.max_prompt_chars} characters, "
      f"MT-bench / HumanEval overlaps excluded) answered by the target with ≤ {d.max_new_tokens} new tokens "
      f"at temperature {d.temperature:g}, sequences ≤ {d.max_length} tokens, {100 * d.val_fraction:g}% held out "
      "for validation / offline τ. Sizes are scaled to the compute budget (`experiments/study/plan.py` docstring).",
      f"- Training (every run): {t.num_steps} steps of batch {t.batch_size} × {d.max_length} tokens, "
      f"warm-up {t.warmup_steps}, the recipe of `configs/base.py` (AdamW, cosine, clip 0.5, γ = 0.8) at "
      f"lr {float(t.get('lr', 0) or 4e-4):g}"
      + ("" if not t.get("lr", 0) else " (the recipe's 4e-4 raised for the small budget)")
      + "".join(f"; {ARCH_TITLES.get(a, a)}: " + ", ".join(f"`{k} = {v}`" for k, v in _dotted(o).items())
                for a, o in (plan.get("arch_overrides", {}) or {}).items())
      + f"; {t.precision}; seeds {list(plan.seeds)} (+{list(plan.extra_seeds)} for EAGLE-3 "
      f"{', '.join(loss_label(l, float(plan.eta[plan.ablation.arch])) for l in plan.extra_seed_losses)}).",
      f"- Evaluation: {lim} ({', '.join(BENCH_TITLES.get(b, b) for b in e.benchmarks)}; MT-bench with both "
      f"turns), ≤ {e.max_new_tokens} new tokens per turn, T ∈ {{{', '.join(f'{x:g}' for x in e.temperatures)}}}, "
      f"exact rejection sampling at T > 0, K = "
      + ", ".join(f"{plan.num_draft[a]} ({ARCH_TITLES[a]})" for a in plan.archs)
      + f"; 95% percentile-bootstrap CIs over prompts ({e.n_boot} replicates). "
      "Offline τ = 1 + Σ_k Π_{j≤k} ᾱ_j on the validation split (TV acceptance at T = 1).",
      "- η of L_λ: " + ", ".join(f"{plan.eta[a]:g} ({ARCH_TITLES[a]})" for a in plan.archs) + "."]


def render_markdown(plan, results: Sequence[Mapping[str, Any]], state_data: Mapping[str, Any],
                    *, plots: Mapping[str, str] | None = None, discussion: str | None = None) -> str:
  """``results.md``: every number comes from ``results`` (missing cells say "pending")."""
  n_done = sum(1 for r in results if r.get("eval"))
  failed = [r["name"] for r in results if r.get("status") == "failed"]
  title = {"cpu": "", "gpu": " (GPU variant)", "tiny": " (tiny pipeline check — not a result)"}[plan.variant]
  L = [f"# KL vs LK losses on SmolLM2-135M-Instruct{title}", "",
       "<!-- Generated by experiments/study/study.py (experiments/study/run.py); edit only the discussion section. -->", "",
       f"Status: **{n_done}/{len(results)} runs evaluated**"
       + (f"; failed: {', '.join(failed)}" if failed else "")
       + ". Cells marked *pending* are not finished yet; rerunning the command below fills them in.", "",
       "## Setup", ""] + plan_lines(plan) + [
       "", "## τ per architecture and loss (paper Table 1 format)", "",
       "τ = mean accepted draft tokens per round + 1, [95% bootstrap CI]; Mean = mean over benchmarks.", ""]
  L += main_table(plan, results)
  L += ["## Relative change of mean τ, LK vs KL", ""] + relative_table(plan, results) + [""]
  if plan.ablation.arch in plan.archs:
    L += [f"## {ARCH_TITLES[plan.ablation.arch]} ablation: η and λ", "",
          f"Seed {plan.seeds[0]}; mean τ over benchmarks [95% CI].", ""] + ablation_table(plan, results) + [""]
    L += [f"## Seeds: {ARCH_TITLES[plan.ablation.arch]} KL vs L_λ", "",
          "Each seed changes the draft's initialisation and the data order (same data, same validation "
          "split); spread = sample standard deviation over seeds.", ""] + seeds_table(plan, results) + [""]
  if any("chain" in r["groups"] for r in results):
    L += ["## Beyond the paper: objectives on the draft chain", "",
          "L_τ optimises the expected acceptance length of the whole chain; reach weights put head k's weight "
          "on the probability that the chain reaches it (docs/design.md#objectives-on-the-draft-chain). Seed "
          f"{plan.seeds[0]}; mean τ over benchmarks [95% CI].", ""] + chain_table(plan, results) + [""]
  L += ["## Plots", ""]
  if plots:
    L += [f"![{k}]({v})" for k, v in plots.items()] + [""]
  else:
    L += ["No finished evaluation yet.", ""]
  L += ["## The paper's numbers (static) next to this study", ""] + paper_table(plan, results)
  L += ["", "Paper, qualitatively: " + "; ".join(PAPER_NOTES) + ". The paper trains 10 epochs on 660K "
        "Infinity-Instruct prompts (8K context, batch 64) with 8B-685B targets; this study is scaled to the "
        "budget above.", ""]
  L += ["## Commands", ""] + command_lines(plan, state_data) + [""]
  L += ["## Wall-clock and hardware", ""] + wallclock_lines(state_data) + ["", "Hardware:", ""] \
      + hardware_lines(state_data) + [""]
  L += ["## Files", "",
        f"The JSON behind every table: `{plan.docs.name}/study.json` (plan, state, all results) and "
        f"`{plan.docs.name}/runs/<run>.json` (one per run); per-prompt records stay in each run's "
        "`<root>/runs/<run>/eval/report.json`.", ""]
  L += ["## Discussion", "", DISCUSSION_START,
        discussion if discussion is not None else
        "_To be written by hand after the study (target scale, data size, budget vs the paper). "
        "This section is not generated and is kept when the file is regenerated._",
        DISCUSSION_END, ""]
  return "\n".join(L)


def read_discussion(md_path: str) -> str | None:
  """The hand-written text between the discussion markers of an existing file (None if absent)."""
  if not os.path.exists(md_path):
    return None
  with open(md_path) as f:
    text = f.read()
  m = re.search(re.escape(DISCUSSION_START) + r"\n(.*?)\n?" + re.escape(DISCUSSION_END), text, re.S)
  return m.group(1) if m else None


def plot_results(plan, results, results_dir: str) -> dict[str, str]:
  """PNGs (absolute paths by name): mean tau per architecture x loss, and the EAGLE-3 eta ablation."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.makedirs(results_dir, exist_ok=True)
  paths = {}
  temps = _temps(plan)
  if any(r.get("eval") for r in results):
    fig, axes = plt.subplots(1, len(temps), figsize=(5.5 * len(temps), 4), squeeze=False)
    losses = list(plan.main_losses)
    w = 0.8 / len(losses)
    for ax, t in zip(axes[0], temps):
      for j, loss in enumerate(losses):
        vals = [tau_of(_main_run(results, plan, a, loss), t) for a in plan.archs]
        x = np.arange(len(plan.archs)) + (j - (len(losses) - 1) / 2) * w
        y = np.array([np.nan if v is None else v[0] for v in vals])
        err = np.array([[0, 0] if v is None or v[1] is None else [v[0] - v[1][0], v[1][1] - v[0]] for v in vals]).T
        ax.bar(x, np.nan_to_num(y), w, yerr=err, capsize=3,
               label=loss_label(loss, eta=float(plan.eta[plan.archs[0]])).split(" ")[0])
      ax.set_xticks(np.arange(len(plan.archs)), [ARCH_TITLES[a] for a in plan.archs])
      ax.set_ylabel("mean τ (95% CI)")
      ax.set_title(f"T = {t:g}")
      ax.legend()
    fig.suptitle("τ per architecture and loss (missing bars: pending)")
    fig.tight_layout()
    paths["tau_main"] = os.path.join(results_dir, "tau_main.png")
    fig.savefig(paths["tau_main"], dpi=110)
    plt.close(fig)

    arch = plan.ablation.arch
    rows = [(lab, r) for lab, r in ablation_runs(plan, results) if r is not None and r.get("eval")]
    if rows:
      fig, ax = plt.subplots(figsize=(6.5, 4))
      for k, t in enumerate(temps):
        color = f"C{k}"
        pts = sorted((r["eta"], tau_of(r, t)) for _, r in rows if r["loss"] == "lk_hybrid" and tau_of(r, t))
        if pts:
          ax.errorbar([p[0] for p in pts], [p[1][0] for p in pts],
                      yerr=np.array([[p[1][0] - p[1][1][0], p[1][1][1] - p[1][0]] if p[1][1] else [0, 0]
                                     for p in pts]).T, marker="o", color=color, capsize=3, label=f"L_λ(η), T={t:g}")
        for (lab, r), ls in zip([(l, r) for l, r in rows if r["loss"] != "lk_hybrid"], ("--", ":", "-.", (0, (1, 3)))):
          v = tau_of(r, t)
          if v is not None:
            ax.axhline(v[0], color=color, ls=ls, lw=1, label=f"{lab}, T={t:g}")
      ax.set_xscale("log")
      ax.set_xlabel("η")
      ax.set_ylabel("mean τ")
      ax.set_title(f"{ARCH_TITLES[arch]}: L_λ over η vs baselines")
      ax.legend(fontsize=7)
      fig.tight_layout()
      paths["ablation"] = os.path.join(results_dir, f"{arch}_ablation.png")
      fig.savefig(paths["ablation"], dpi=110)
      plt.close(fig)
  return paths


def write_docs(plan, results: Sequence[Mapping[str, Any]], state_data: Mapping[str, Any], md_path: str,
               results_dir: str, *, plots: bool = True) -> dict[str, Any]:
  """Write ``results_dir/{study.json, runs/<run>.json, *.png}`` and ``md_path`` (keeping the discussion).

  ``plots=False`` keeps the PNGs already there (the orchestrator redraws them only when a new
  evaluation finished).
  """
  os.makedirs(os.path.join(results_dir, "runs"), exist_ok=True)
  for r in results:
    path = os.path.join(results_dir, "runs", f"{r['name']}.json")
    if r.get("train") or r.get("eval") or os.path.exists(path):
      write_json(path, r)
  write_json(os.path.join(results_dir, "study.json"),
             dict(plan=_jsonable(plan.to_dict()), state=state_data, results=list(results)))
  if plots:
    plots = plot_results(plan, results, results_dir)
  else:
    plots = {k: os.path.join(results_dir, f) for k, f in
             (("tau_main", "tau_main.png"), ("ablation", f"{plan.ablation.arch}_ablation.png"))
             if os.path.exists(os.path.join(results_dir, f))}
  rel = {k: os.path.relpath(v, os.path.dirname(os.path.abspath(md_path))) for k, v in plots.items()}
  text = render_markdown(plan, results, state_data, plots=rel, discussion=read_discussion(md_path))
  tmp = f"{md_path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, md_path)
  return dict(markdown=md_path, plots=plots)


def regenerate_docs(plan, root: str, docs_dir: str | None = None) -> dict[str, Any]:
  """Rebuild the docs from the files under ``root`` (no training or evaluation)."""
  state = StudyState(root)
  md_path, results_dir = docs_paths(plan, root, docs_dir)
  return write_docs(plan, collect_results(plan, root, build_runs(plan), state), state.data, md_path, results_dir)


# ----------------------------------------------------------------------------------------------- budget


def estimate_seconds(plan, runs: Sequence[RunSpec], measured: Mapping[str, Any], *,
                     effective_cores: float | None = None) -> dict[str, float] | None:
  """The budget arithmetic of ``experiments/study/plan.py`` from measured unit costs (None if not measured).

  ``measured`` (wall seconds as measured, see ``experiments/study/plan.py``): ``gen_s_per_prompt`` at
  ``gen_max_new_tokens``, ``precompute_s_per_prompt``, ``train_step_s`` {arch} at ``train_tokens_per_step``
  (batch x length), ``eval_prompt_s`` (one single-turn prompt, both decoding modes, one temperature)
  at ``eval_max_new_tokens``, ``eval_overhead_s`` per run (compile, warm-up, offline estimate), and
  ``cpu_share`` (CPU-seconds per wall-second the measuring process got).

  Costs scale linearly with new tokens (generation, evaluation) and tokens per step (training).
  With ``effective_cores`` the measured times are rescaled by ``cpu_share / effective_cores``: the
  study's expected time when it has that many cores to itself instead of the measurement's share.

  Returns:
    seconds per stage: ``data``, ``train``, ``eval``, ``total``.
  """
  keys = ("gen_s_per_prompt", "precompute_s_per_prompt", "eval_prompt_s", "eval_overhead_s")
  if any(measured.get(k) is None for k in keys) or any(
      (measured.get("train_step_s") or {}).get(r.arch) is None for r in runs):
    return None
  d, t, e = plan.data, plan.train, plan.eval
  scale = 1.0 if not effective_cores else float(measured["cpu_share"]) / float(effective_cores)
  data = d.num_prompts * (measured["gen_s_per_prompt"] * d.max_new_tokens / measured["gen_max_new_tokens"]
                          + measured["precompute_s_per_prompt"])
  tok = t.batch_size * d.max_length / measured["train_tokens_per_step"]
  train = sum(t.num_steps * measured["train_step_s"][r.arch] * tok for r in runs)
  limit = e.limit or 100
  turns = sum({"mt_bench": 2}.get(b, 1) * limit for b in e.benchmarks)
  per_prompt = measured["eval_prompt_s"] * e.max_new_tokens / measured["eval_max_new_tokens"]
  evals = len(runs) * (measured["eval_overhead_s"] + len(e.temperatures) * turns * per_prompt)
  out = dict(data=data * scale, train=train * scale, eval=evals * scale)
  out["total"] = sum(out.values())
  return out


def time_costs(plan, root: str, *, archs: Sequence[str] | None = None, steps: int = 3,
               log: Callable[[str], None] = print) -> dict[str, Any]:
  """Measure the unit costs behind the budget on this machine (writes ``<root>/measure/costs.json``).

  Per architecture: ``steps`` KL training steps at the plan's batch x length (the steady-state
  ``step_time_s`` of the last one; compilation excluded and reported separately). On the first
  architecture's draft: the offline estimate and one HumanEval prompt (single turn) at each of the
  plan's temperatures and ``max_new_tokens``, both decoding modes (as `evaluate_draft` always does).
  Needs the plan's data (``data_dir=`` plan arg, or a finished data step under ``root``).
  """
  import resource
  import shutil

  from lkjax.config_args import apply_overrides
  from lkjax.eval.run import evaluate_draft, offline_estimate
  from lkjax.train.loop import load_trained_draft, train_and_evaluate

  data_dir = data_dir_of(plan, root)
  if not _manifest_exists(data_dir):
    raise FileNotFoundError(f"{data_dir}: no data; pass the plan arg data_dir=<shard dir> or prepare it first")
  mdir = os.path.join(os.path.abspath(root), "measure")
  archs = list(archs or plan.archs)
  runs = {r.arch: r for r in build_runs(plan) if r.loss == "kl" and r.seed == int(plan.seeds[0])}
  out: dict[str, Any] = dict(hardware=hardware_info(), plan=dict(batch_size=int(plan.train.batch_size),
                                                                 max_length=int(plan.data.max_length),
                                                                 max_new_tokens=int(plan.eval.max_new_tokens)),
                             train_step_s={}, train_compile_and_setup_s={})
  def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

  cpu0, wall0 = cpu_seconds(), time.perf_counter()
  for arch in archs:
    workdir = os.path.join(mdir, arch)
    shutil.rmtree(workdir, ignore_errors=True)
    config = apply_overrides(run_config(runs[arch], plan, data_dir),
                             {"num_steps": steps, "log_every": 1, "eval_every": 0, "checkpoint.every": steps,
                              "optim.warmup_steps": 1})
    t0 = time.perf_counter()
    train_and_evaluate(config, workdir)
    total = time.perf_counter() - t0
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      recs = [json.loads(l) for l in f if l.strip()]
    st = [r["step_time_s"] for r in recs if r.get("split") == "train" and "step_time_s" in r]
    out["train_step_s"][arch] = float(st[-1])
    out["train_compile_and_setup_s"][arch] = total - float(sum(st))
    log(f"[measure] {arch}: {st[-1]:.2f} s/step (batch {plan.train.batch_size} x {plan.data.max_length}); "
        f"setup + compile {total - sum(st):.0f} s")
  e = eval_settings(plan)
  t0 = time.perf_counter()
  trained = load_trained_draft(os.path.join(mdir, archs[0]))
  offline = offline_estimate(trained.model, trained.config, max_batches=e["offline_max_batches"])
  t_off = time.perf_counter() - t0
  t0 = time.perf_counter()
  target = _target(plan.target)
  t_load = time.perf_counter() - t0
  rep = evaluate_draft(trained.model, target, benchmarks=("humaneval",), temperatures=e["temperatures"],
                       num_draft=runs[archs[0]].num_draft, max_new_tokens=e["max_new_tokens"], limit=1,
                       seed=e["seed"], offline=offline, out_dir=os.path.join(mdir, "eval"), n_boot=50,
                       num_threads=int(plan.eval.num_threads) or None)
  per_t = [r["seconds"] + r["target_seconds"] for r in rep["prompts"]]
  timings = rep["meta"]["timings"]
  out["eval_prompt_s"] = float(np.mean(per_t))
  out["eval_prompt_tokens"] = [dict(spec=r["new_tokens"], target=r["target_new_tokens"]) for r in rep["prompts"]]
  out["eval_overhead_s"] = float(t_off + timings.get("compile_s", 0.0) + timings.get("warmup_s", 0.0))
  out["eval_detail_s"] = dict(offline=t_off, target_load=t_load, **timings)
  out["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
  # CPU seconds per wall second this process got (2.0 = both cores of a 2-core machine to itself); the
  # budget scales the measured wall times by cpu_share / effective cores to undo other jobs' load.
  out["cpu_share"] = (cpu_seconds() - cpu0) / (time.perf_counter() - wall0)
  write_json(os.path.join(mdir, "costs.json"), out)
  log(f"[measure] eval: {out['eval_prompt_s']:.1f} s per prompt and temperature (both modes, "
      f"{e['max_new_tokens']} new tokens); per-run overhead {out['eval_overhead_s']:.0f} s; "
      f"-> {os.path.join(mdir, 'costs.json')}")
  return out
