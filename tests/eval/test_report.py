"""tau bookkeeping on hand-made accept/reject sequences, bootstrap CIs and the report schema."""
from __future__ import annotations

import json
import types

import numpy as np
import pytest

from lkjax.eval import report as rp


def test_tau_and_position_acceptance_hand_example():
  # K = 3, rounds a = 3, 0, 2 (prompt 1) and 1 (prompt 2): 6 accepted of 12 drafted.
  lengths = [[3, 0, 2], [1]]
  flat = [3, 0, 2, 1]
  assert rp.tau(6, 12, 3) == pytest.approx(2.5)
  rates, trials = rp.position_acceptance(flat, 3)
  # position 1: 3 of 4 rounds; position 2: 2 of the 3 that reached it; position 3: 1 of 2.
  np.testing.assert_array_equal(trials, [4, 3, 2])
  np.testing.assert_allclose(rates, [3 / 4, 2 / 3, 1 / 2])
  # tau = 1 + sum_k prod_{i<=k} r_i (telescoping identity)
  assert 1 + np.cumprod(rates).sum() == pytest.approx(2.5)
  assert rp.offline_tau(rates) == pytest.approx(2.5)
  assert rp.offline_tau([0.8, 0.5]) == pytest.approx(1 + 0.8 + 0.4)
  with pytest.raises(ValueError, match="alpha_bar"):
    rp.offline_tau([1.2])
  run = rp.BenchmarkRun("b", 0.0, 3, lengths, spec_tokens=[10, 3], spec_seconds=[1.0, 1.0],
                        target_tokens=[10, 3], target_seconds=[2.0, 2.0])
  s = rp.summarize_run(run, n_boot=200)
  assert (s["accepted"], s["drafted"], s["num_rounds"], s["num_prompts"]) == (6, 12, 4, 2)
  assert s["tau"] == pytest.approx(2.5)
  assert s["spec_tokens_per_s"] == pytest.approx(6.5) and s["target_tokens_per_s"] == pytest.approx(3.25)
  assert s["speedup"] == pytest.approx(2.0)


def test_position_acceptance_unreached_positions_and_bad_input():
  rates, trials = rp.position_acceptance([0, 0], 2)
  np.testing.assert_array_equal(trials, [2, 0])
  assert rates[0] == 0 and np.isnan(rates[1])
  assert np.isnan(rp.tau(0, 0, 4))
  with pytest.raises(ValueError, match="accept_lengths"):
    rp.position_acceptance([0, 4], 3)
  with pytest.raises(ValueError, match="num_draft"):
    rp.position_acceptance([0], 0)


def test_bootstrap_ci():
  rng = np.random.default_rng(0)
  lengths = [list(rng.integers(0, 5, size=rng.integers(1, 8))) for _ in range(40)]
  acc, rounds = sum(map(sum, lengths)), sum(map(len, lengths))
  point = rp.tau(acc, 4 * rounds, 4)
  lo, hi = rp.bootstrap_tau_ci(lengths, 4, n_boot=3000, seed=1)
  assert lo < point < hi and 0.05 < hi - lo < 1.5
  # an independent numpy oracle of the same prompt-level percentile bootstrap
  a = np.array([sum(x) for x in lengths], float)
  r = np.array([len(x) for x in lengths], float)
  idx = np.random.default_rng(1).integers(0, 40, size=(3000, 40))
  np.testing.assert_allclose([lo, hi], np.percentile(a[idx].sum(1) / r[idx].sum(1) + 1, [2.5, 97.5]))
  # more prompts of the same kind -> a narrower interval; identical prompts -> zero width
  lo2, hi2 = rp.bootstrap_tau_ci(lengths * 9, 4, n_boot=3000, seed=1)
  assert hi2 - lo2 < 0.5 * (hi - lo)
  assert rp.bootstrap_tau_ci([[2, 2]] * 5, 4, n_boot=100) == [3.0, 3.0]


def _gen(lengths, k, n_tokens, seconds, truncated=0):
  return types.SimpleNamespace(accept_lengths=lengths, num_draft=k, num_new_tokens=n_tokens,
                               seconds=seconds, truncated_prompt_tokens=truncated)


def _runs():
  rng = np.random.default_rng(2)
  runs = []
  for t in (0.0, 1.0):
    for b in ("MT-bench", "HumanEval", "GSM8K"):
      spec = [_gen(list(rng.integers(0, 8, 5)), 7, 40, 0.5, truncated=int(i == 0 and b == "GSM8K"))
              for i in range(6)]
      tgt = [_gen([], 0, 40, 1.0) for _ in range(6)]
      runs.append(rp.BenchmarkRun.from_results(b, t, spec, tgt, offline_tau=3.0 + t))
  return runs


def test_report_schema_markdown_and_png(tmp_path):
  runs = _runs()
  report = rp.build_report(runs, label="eagle3-lk", n_boot=300, meta=dict(target="tiny"))
  paths = rp.write_report(report, str(tmp_path / "out"))
  loaded = json.loads(open(paths["json"]).read())
  assert set(loaded) == {"label", "meta", "ci_level", "n_boot", "temperatures"}
  assert list(loaded["temperatures"]) == ["0", "1"]
  g = loaded["temperatures"]["1"]
  assert list(g["benchmarks"]) == ["MT-bench", "HumanEval", "GSM8K"]
  s = g["benchmarks"]["HumanEval"]
  assert set(s) == {"benchmark", "temperature", "num_draft", "num_prompts", "num_rounds", "drafted",
                    "accepted", "tau", "tau_ci95", "offline_tau", "position_acceptance",
                    "position_trials", "new_tokens", "spec_seconds", "spec_tokens_per_s",
                    "target_tokens_per_s", "speedup", "truncated_prompts"}
  run = runs[4]
  flat = [a for p in run.accept_lengths for a in p]
  assert s["tau"] == pytest.approx(np.mean(flat) + 1) and 1 <= s["tau"] <= 8
  assert s["tau_ci95"][0] <= s["tau"] <= s["tau_ci95"][1]
  assert len(s["position_acceptance"]) == 7 and s["speedup"] == pytest.approx(2.0)
  m = g["mean"]
  assert m["tau"] == pytest.approx(np.mean([b["tau"] for b in g["benchmarks"].values()]))
  assert m["tau_ci95"][0] <= m["tau"] <= m["tau_ci95"][1]
  assert m["offline_tau"] == pytest.approx(4.0) and m["truncated_prompts"] == 1
  assert g["benchmarks"]["GSM8K"]["truncated_prompts"] == 1
  md = open(paths["md"]).read()
  assert "| Draft | T | MT-bench | HumanEval | GSM8K | Mean |" in md
  row = [ln for ln in md.splitlines() if ln.startswith("| eagle3-lk | 1 |")][0]
  assert f"{s['tau']:.2f} [{s['tau_ci95'][0]:.2f}, {s['tau_ci95'][1]:.2f}]" in row
  assert f"{m['tau']:.2f}" in row.split("|")[-2]
  assert "2.00x" in md and "Per-position acceptance" in md
  with open(paths["png"], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_report_bad_input():
  runs = _runs()
  with pytest.raises(ValueError, match="appears twice"):
    rp.build_report(runs + runs[:1])
  with pytest.raises(ValueError, match="runs"):
    rp.build_report([])
  with pytest.raises(ValueError, match="mixed num_draft"):
    rp.BenchmarkRun.from_results("b", 0, [_gen([1], 3, 4, 1.0), _gen([1], 4, 4, 1.0)])


def test_speedup_below_one_is_explained_next_to_the_number():
  # tau 1.25 at half the target's speed: low acceptance; tau 4.5 at 0.8x: the cost of the round itself.
  low = rp.BenchmarkRun.from_results("MT-bench", 0.0, [_gen([0, 1, 0, 0], 7, 40, 2.0)],
                                     [_gen([], 0, 40, 1.0)])
  high = rp.BenchmarkRun.from_results("GSM8K", 0.0, [_gen([3, 4, 4, 3], 7, 40, 1.25)],
                                      [_gen([], 0, 40, 1.0)])
  md = rp.markdown_table(rp.build_report([low, high], n_boot=50))
  rows = {ln.split("|")[2].strip(): ln for ln in md.splitlines() if ln.startswith("| 0 |") and "x" in ln}
  assert "0.50x (slower: τ 1.25 too low to pay for the draft)" in rows["MT-bench"]
  assert "0.80x (slower: draft + K+1-token verification cost" in rows["GSM8K"]
  assert rp.SLOW_NOTE in md
  fast = rp.markdown_table(rp.build_report(_runs(), n_boot=50))
  assert "slower" not in fast and rp.SLOW_NOTE not in fast
