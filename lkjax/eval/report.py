"""Acceptance-length (tau) bookkeeping and the evaluation report (JSON, markdown, PNG).

Definitions (docs/design.md#evaluation).  A round drafts K tokens and accepts ``a in [0, K]`` of them.

  tau = K * accepted / drafted + 1 = 1 + mean_rounds(a)       over all rounds of a benchmark
  position acceptance r_i = #{a >= i} / #{a >= i-1}            i = 1..K ("accepted given i-1 accepted")
  so tau = 1 + sum_k prod_{i<=k} r_i exactly (the measured analogue of the offline tau_off).

Confidence intervals: percentile bootstrap over PROMPTS (rounds within a prompt are correlated), each
replicate recomputing the ratio estimator; the mean over benchmarks resamples each benchmark
independently.  Throughput: tokens/s = new tokens / wall seconds summed over prompts; the speed-up is
speculative tokens/s over target-only tokens/s measured in the same run.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from lkjax.files import write_json


def _check_lengths(accept_lengths: Iterable[int], num_draft: int) -> np.ndarray:
  a = np.asarray(list(accept_lengths), dtype=np.int64).reshape(-1)
  if num_draft < 1:
    raise ValueError(f"num_draft={num_draft}: must be >= 1")
  if a.size and (a.min() < 0 or a.max() > num_draft):
    raise ValueError(f"accept_lengths: values must lie in [0, {num_draft}], got [{a.min()}, {a.max()}]")
  return a


def tau(accepted: int, drafted: int, num_draft: int) -> float:
  """``K * accepted / drafted + 1`` (nan when nothing was drafted)."""
  return num_draft * accepted / drafted + 1.0 if drafted else float("nan")


def offline_tau(alpha_bar: Sequence[float]) -> float:
  """``tau_off = 1 + sum_k prod_{j<=k} alpha_bar_j`` from per-position acceptance rates (docs/design.md#lk-losses).

  With the measured conditional rates of `position_acceptance` this reproduces the measured tau.
  """
  a = np.asarray(alpha_bar, np.float64).reshape(-1)
  if a.size and (np.any(~np.isfinite(a)) or a.min() < 0 or a.max() > 1):
    raise ValueError(f"alpha_bar: rates must lie in [0, 1], got {a.tolist()}")
  return float(1.0 + np.cumprod(a).sum())


def position_acceptance(accept_lengths: Iterable[int], num_draft: int) -> tuple[np.ndarray, np.ndarray]:
  """Per-position acceptance over rounds -> ``(rates f64[K], trials int[K])``.

  ``trials[i-1] = #{a >= i-1}`` rounds reached position i; ``rates[i-1] = #{a >= i} / trials[i-1]``
  (nan where no round reached the position).
  """
  a = _check_lengths(accept_lengths, num_draft)
  reach = np.array([(a >= i).sum() for i in range(num_draft + 1)], np.int64)
  trials, accepts = reach[:-1], reach[1:]
  with np.errstate(invalid="ignore", divide="ignore"):
    rates = np.where(trials > 0, accepts / np.maximum(trials, 1), np.nan)
  return rates, trials


def _per_prompt(accept_lengths: Sequence[Sequence[int]], num_draft: int) -> tuple[np.ndarray, np.ndarray]:
  """Per-prompt (accepted, rounds) sums."""
  acc = np.array([_check_lengths(a, num_draft).sum() for a in accept_lengths], np.float64)
  rounds = np.array([len(a) for a in accept_lengths], np.float64)
  return acc, rounds


def _bootstrap_taus(accept_lengths: Sequence[Sequence[int]], num_draft: int, n_boot: int,
                    rng: np.random.Generator) -> np.ndarray:
  """``[n_boot]`` tau of prompt-resampled replicates (nan where a replicate drafted nothing)."""
  acc, rounds = _per_prompt(accept_lengths, num_draft)
  if acc.size == 0:
    return np.full(n_boot, np.nan)
  idx = rng.integers(0, acc.size, size=(n_boot, acc.size))
  a, r = acc[idx].sum(1), rounds[idx].sum(1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(r > 0, a / np.maximum(r, 1) + 1.0, np.nan)  # K * a / (K r) + 1


def _ci(samples: np.ndarray, level: float) -> list[float]:
  s = samples[np.isfinite(samples)]
  if s.size == 0:
    return [float("nan"), float("nan")]
  lo, hi = np.percentile(s, [50 * (1 - level), 50 * (1 + level)])
  return [float(lo), float(hi)]


def bootstrap_tau_ci(accept_lengths: Sequence[Sequence[int]], num_draft: int, *, n_boot: int = 2000,
                     seed: int = 0, level: float = 0.95) -> list[float]:
  """Percentile bootstrap CI of tau, resampling prompts: ``[lo, hi]``."""
  return _ci(_bootstrap_taus(accept_lengths, num_draft, n_boot, np.random.default_rng(seed)), level)


@dataclasses.dataclass
class BenchmarkRun:
  """Everything measured for one (benchmark, temperature): per-prompt lists, one entry per prompt."""

  benchmark: str
  temperature: float
  num_draft: int
  accept_lengths: list[list[int]]            # per prompt, per round
  spec_tokens: list[int]                     # new tokens per prompt (speculative)
  spec_seconds: list[float]
  target_tokens: list[int] | None = None     # target-only decoding of the same prompts
  target_seconds: list[float] | None = None
  truncated_prompts: int = 0                 # prompts cut to fit the context
  offline_tau: float | None = None           # tau_off from validation shards, for comparison

  @classmethod
  def from_results(cls, benchmark: str, temperature: float, spec_results: Sequence[Any],
                   target_results: Sequence[Any] | None = None,
                   offline_tau: float | None = None) -> "BenchmarkRun":
    """From `lkjax.eval.speculative.GenerationResult`-like objects (duck-typed)."""
    if not spec_results:
      raise ValueError(f"spec_results: no results for benchmark {benchmark!r}")
    ks = {int(r.num_draft) for r in spec_results}
    if len(ks) != 1:
      raise ValueError(f"spec_results: mixed num_draft {sorted(ks)} in benchmark {benchmark!r}")
    return cls(
        benchmark=benchmark, temperature=float(temperature), num_draft=ks.pop(),
        accept_lengths=[list(r.accept_lengths) for r in spec_results],
        spec_tokens=[r.num_new_tokens for r in spec_results],
        spec_seconds=[float(r.seconds) for r in spec_results],
        target_tokens=None if target_results is None else [r.num_new_tokens for r in target_results],
        target_seconds=None if target_results is None else [float(r.seconds) for r in target_results],
        truncated_prompts=sum(int(r.truncated_prompt_tokens > 0) for r in spec_results),
        offline_tau=offline_tau)


def _rate(tokens: Sequence[int] | None, seconds: Sequence[float] | None) -> float | None:
  if tokens is None or seconds is None or sum(seconds) <= 0:
    return None
  return float(sum(tokens) / sum(seconds))


def _json_float(x: float | None) -> float | None:
  return None if x is None or not math.isfinite(x) else float(x)


def summarize_run(run: BenchmarkRun, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
  """JSON-able summary of one benchmark run (keys documented in `build_report`)."""
  rounds = [a for p in run.accept_lengths for a in p]
  rates, trials = position_acceptance(rounds, run.num_draft)
  accepted, drafted = int(sum(rounds)), run.num_draft * len(rounds)
  spec_rate, tgt_rate = _rate(run.spec_tokens, run.spec_seconds), _rate(run.target_tokens, run.target_seconds)
  return dict(
      benchmark=run.benchmark, temperature=run.temperature, num_draft=run.num_draft,
      num_prompts=len(run.accept_lengths), num_rounds=len(rounds), drafted=drafted, accepted=accepted,
      tau=_json_float(tau(accepted, drafted, run.num_draft)),
      tau_ci95=[_json_float(x) for x in bootstrap_tau_ci(run.accept_lengths, run.num_draft, n_boot=n_boot,
                                                        seed=seed, level=level)],
      offline_tau=_json_float(run.offline_tau),
      position_acceptance=[_json_float(r) for r in rates], position_trials=[int(t) for t in trials],
      new_tokens=int(sum(run.spec_tokens)), spec_seconds=float(sum(run.spec_seconds)),
      spec_tokens_per_s=spec_rate, target_tokens_per_s=tgt_rate,
      speedup=None if spec_rate is None or not tgt_rate else spec_rate / tgt_rate,
      truncated_prompts=int(run.truncated_prompts))


def _temp_key(t: float) -> str:
  return f"{float(t):g}"


def build_report(runs: Sequence[BenchmarkRun], *, label: str = "draft", n_boot: int = 2000, seed: int = 0,
                 level: float = 0.95, meta: Mapping[str, Any] | None = None) -> dict:
  """The report dict (JSON-able).

  Schema::

    {"label": str, "meta": {...}, "ci_level": 0.95, "n_boot": int,
     "temperatures": {"0": {"benchmarks": {name: summary}, "mean": mean}, "1": {...}}}

  ``summary`` keys: benchmark, temperature, num_draft, num_prompts, num_rounds, drafted, accepted, tau,
  tau_ci95 [lo, hi], offline_tau, position_acceptance [K], position_trials [K], new_tokens,
  spec_seconds, spec_tokens_per_s, target_tokens_per_s, speedup, truncated_prompts.
  ``mean`` keys: tau (mean of benchmark taus), tau_ci95, offline_tau (mean where all given),
  spec_tokens_per_s / target_tokens_per_s (pooled over benchmarks), speedup, truncated_prompts.
  """
  if not runs:
    raise ValueError("runs: nothing to report")
  temps: dict[str, dict] = {}
  seen = set()
  for run in runs:
    key = (run.benchmark, _temp_key(run.temperature))
    if key in seen:
      raise ValueError(f"runs: benchmark {run.benchmark!r} appears twice at T={key[1]}")
    seen.add(key)
  rng = np.random.default_rng(seed)
  for t in dict.fromkeys(_temp_key(r.temperature) for r in runs):
    group = [r for r in runs if _temp_key(r.temperature) == t]
    benches = {r.benchmark: summarize_run(r, n_boot=n_boot, seed=seed, level=level) for r in group}
    boot = np.mean([_bootstrap_taus(r.accept_lengths, r.num_draft, n_boot, rng) for r in group], axis=0)
    taus = [s["tau"] for s in benches.values()]
    offl = [s["offline_tau"] for s in benches.values()]
    spec_rate = _rate([n for r in group for n in r.spec_tokens], [s for r in group for s in r.spec_seconds])
    tgt = all(r.target_tokens is not None for r in group)
    tgt_rate = _rate([n for r in group for n in r.target_tokens], [s for r in group for s in r.target_seconds]) \
        if tgt else None
    mean = dict(
        tau=None if any(x is None for x in taus) else float(np.mean(taus)),
        tau_ci95=[_json_float(x) for x in _ci(boot, level)],
        offline_tau=None if any(x is None for x in offl) else float(np.mean(offl)),
        spec_tokens_per_s=spec_rate, target_tokens_per_s=tgt_rate,
        speedup=None if spec_rate is None or not tgt_rate else spec_rate / tgt_rate,
        truncated_prompts=int(sum(r.truncated_prompts for r in group)))
    temps[t] = dict(benchmarks=benches, mean=mean)
  return dict(label=label, meta=dict(meta or {}), ci_level=level, n_boot=n_boot, temperatures=temps)


def _fmt(x: float | None, nd: int = 2) -> str:
  return "–" if x is None else f"{x:.{nd}f}"


def _fmt_tau(s: Mapping[str, Any]) -> str:
  lo, hi = s["tau_ci95"]
  ci = "" if lo is None else f" [{lo:.2f}, {hi:.2f}]"
  return _fmt(s["tau"]) + ci


SLOW_NOTE = ("Speed-ups below 1 mean speculative decoding was slower than the target alone in this run. A round "
             "costs K draft steps plus one target pass over K+1 tokens and yields τ tokens; it pays only when τ is "
             "high and the target's pass over K+1 tokens costs about as much as over one (memory-bound decoding on "
             "an accelerator). A small target timed at batch 1 on CPU gives neither: the draft steps are not cheap "
             "next to the target and verifying K+1 tokens costs several single-token passes, so a briefly trained "
             "draft (τ near 1) cannot pay for itself. τ, not this wall-clock ratio, is what the LK losses improve.")


def speedup_cell(s: Mapping[str, Any]) -> str:
  """``"2.00x"``, or for a speed-up below 1 the number with its likely reason next to it."""
  sp = s.get("speedup")
  if sp is None or sp >= 1:
    return f"{_fmt(sp)}x"
  tau_ = s.get("tau")
  if tau_ is not None and tau_ < 2:
    return f"{sp:.2f}x (slower: τ {tau_:.2f} too low to pay for the draft)"
  return f"{sp:.2f}x (slower: draft + K+1-token verification cost more than τ saves at this batch/device)"


def markdown_table(report: Mapping[str, Any]) -> str:
  """Paper-style markdown: tau per benchmark and mean at each T, then speed and per-position tables."""
  temps = report["temperatures"]
  benches = list(dict.fromkeys(b for t in temps.values() for b in t["benchmarks"]))
  lines = [f"### τ (acceptance length), {report['label']} — mean [{int(100 * report['ci_level'])}% CI]", "",
           "| Draft | T | " + " | ".join(benches) + " | Mean |",
           "|---|---|" + "---|" * (len(benches) + 1)]
  for t, g in temps.items():
    cells = [_fmt_tau(g["benchmarks"][b]) if b in g["benchmarks"] else "–" for b in benches]
    lines.append(f"| {report['label']} | {t} | " + " | ".join(cells) + f" | {_fmt_tau(g['mean'])} |")
  lines += ["", "### Speed (wall clock, same run) and offline τ", "",
            "| T | Benchmark | τ | offline τ | target tok/s | speculative tok/s | speed-up | prompts | truncated |",
            "|---|---|---|---|---|---|---|---|---|"]
  slow = False
  for t, g in temps.items():
    for b, s in g["benchmarks"].items():
      lines.append(f"| {t} | {b} | {_fmt(s['tau'])} | {_fmt(s['offline_tau'])} | "
                   f"{_fmt(s['target_tokens_per_s'], 1)} | {_fmt(s['spec_tokens_per_s'], 1)} | "
                   f"{speedup_cell(s)} | {s['num_prompts']} | {s['truncated_prompts']} |")
    m = g["mean"]
    lines.append(f"| {t} | **Mean** | {_fmt(m['tau'])} | {_fmt(m['offline_tau'])} | "
                 f"{_fmt(m['target_tokens_per_s'], 1)} | {_fmt(m['spec_tokens_per_s'], 1)} | "
                 f"{speedup_cell(m)} | | {m['truncated_prompts']} |")
    slow = slow or any(x.get("speedup") is not None and x["speedup"] < 1 for x in [m, *g["benchmarks"].values()])
  if slow:
    lines += ["", SLOW_NOTE]
  k = max(len(s["position_acceptance"]) for g in temps.values() for s in g["benchmarks"].values())
  lines += ["", "### Per-position acceptance (position i accepted given i-1 accepted)", "",
            "| T | Benchmark | " + " | ".join(f"{i + 1}" for i in range(k)) + " |",
            "|---|---|" + "---|" * k]
  for t, g in temps.items():
    for b, s in g["benchmarks"].items():
      rates = list(s["position_acceptance"]) + [None] * (k - len(s["position_acceptance"]))
      lines.append(f"| {t} | {b} | " + " | ".join(_fmt(r, 3) for r in rates) + " |")
  return "\n".join(lines) + "\n"


def plot_report(report: Mapping[str, Any], path: str) -> str:
  """PNG: tau per benchmark (+ mean) with CI bars per T, and per-position acceptance curves."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  temps = report["temperatures"]
  benches = list(dict.fromkeys(b for t in temps.values() for b in t["benchmarks"])) + ["Mean"]
  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
  width = 0.8 / max(len(temps), 1)
  for j, (t, g) in enumerate(temps.items()):
    summ = [g["mean"] if b == "Mean" else g["benchmarks"].get(b) for b in benches]
    x = np.arange(len(benches)) + (j - (len(temps) - 1) / 2) * width
    val = np.array([np.nan if s is None or s["tau"] is None else s["tau"] for s in summ])
    lo = np.array([np.nan if s is None or s["tau_ci95"][0] is None else s["tau_ci95"][0] for s in summ])
    hi = np.array([np.nan if s is None or s["tau_ci95"][1] is None else s["tau_ci95"][1] for s in summ])
    err = np.nan_to_num(np.stack([val - lo, hi - val]), nan=0.0)
    ax0.bar(x, np.nan_to_num(val), width, yerr=err, capsize=3, label=f"T={t}")
    for b, s in g["benchmarks"].items():
      r = np.array([np.nan if v is None else v for v in s["position_acceptance"]], float)
      ax1.plot(np.arange(1, len(r) + 1), r, marker="o", label=f"{b}, T={t}")
  ax0.set_xticks(np.arange(len(benches)), benches)
  ax0.set_ylabel("τ (acceptance length)")
  ax0.set_title(f"τ per benchmark — {report['label']}")
  ax0.legend()
  ax1.set_xlabel("draft position i")
  ax1.set_ylabel("P(accept i | i-1 accepted)")
  ax1.set_ylim(0, 1.02)
  ax1.set_title("per-position acceptance")
  ax1.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def write_report(report: Mapping[str, Any], out_dir: str, *, stem: str = "report") -> dict[str, str]:
  """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` under ``out_dir`` -> their paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {k: os.path.join(out_dir, f"{stem}.{k}") for k in ("json", "md", "png")}
  write_json(paths["json"], report, allow_nan=False)
  with open(paths["md"], "w") as f:
    f.write(markdown_table(report))
  plot_report(report, paths["png"])
  return paths
