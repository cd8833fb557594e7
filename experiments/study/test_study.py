"""The study plan, its resumable orchestrator (driven by fakes) and the generated results docs."""
from __future__ import annotations

import itertools
import json
import os

import pytest

import study
from lkjax.config_args import apply_overrides, load_config_module
from lkjax.eval import report as report_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PLAN_FILE = os.path.join(REPO, "experiments", "study", "plan.py")


def load_plan(arg: str | None = None, **overrides):
  module, _ = load_config_module(PLAN_FILE)
  plan = module.get_config(arg)
  return apply_overrides(plan, overrides) if overrides else plan


# ----------------------------------------------------------------------------------------------- plan

EXPECTED_RUNS = {
    # every architecture x {KL, L_alpha, L_lambda(eta 3; 10 for MEDUSA)}, seed 0
    "eagle3.kl.s0", "eagle3.lk_alpha.s0", "eagle3.lk_hybrid_eta3.s0",
    "medusa.kl.s0", "medusa.lk_alpha.s0", "medusa.lk_hybrid_eta10.s0",
    "mlp_speculator.kl.s0", "mlp_speculator.lk_alpha.s0", "mlp_speculator.lk_hybrid_eta3.s0",
    "mtp.kl.s0", "mtp.lk_alpha.s0", "mtp.lk_hybrid_eta3.s0",
    # EAGLE-3 ablation: eta in {0.7, 1, 10}, fixed lambda 0.5, pure TV
    "eagle3.lk_hybrid_eta0.7.s0", "eagle3.lk_hybrid_eta1.s0", "eagle3.lk_hybrid_eta10.s0",
    "eagle3.fixed_lambda_0.5.s0", "eagle3.tv.s0",
    # second seed of the EAGLE-3 KL vs L_lambda comparison
    "eagle3.kl.s1", "eagle3.lk_hybrid_eta3.s1",
    # beyond the paper (plan.chain_arms): the chain objective and reach head weights
    "eagle3.lk_tau.s0", "eagle3.lk_hybrid_eta3_reach.s0",
}


@pytest.mark.parametrize("arg", [None, "gpu", "tiny"])
def test_plan_has_every_required_run(arg):
  runs = study.build_runs(load_plan(arg))
  assert {r.name for r in runs} == EXPECTED_RUNS
  assert len(runs) == len(EXPECTED_RUNS)  # no duplicates
  k = {"eagle3": 7, "mtp": 7, "medusa": 6, "mlp_speculator": 6}
  for r in runs:
    assert r.num_draft == k[r.arch], r.name
    if r.loss == "lk_hybrid" and "main" in r.groups:
      assert r.eta == (10.0 if r.arch == "medusa" else 3.0), r.name
  eagle = {(r.loss, r.eta, r.lam) for r in runs if r.arch == "eagle3" and r.seed == 0}
  assert {e for l, e, _ in eagle if l == "lk_hybrid"} == {0.7, 1.0, 3.0, 10.0}
  assert ("fixed_lambda", None, 0.5) in eagle and ("tv", None, None) in eagle
  seeds = {}
  for r in runs:
    seeds.setdefault((r.arch, r.loss_tag), set()).add(r.seed)
  assert seeds[("eagle3", "kl")] == {0, 1} and seeds[("eagle3", "lk_hybrid_eta3")] == {0, 1}
  assert all(s == {0} for key, s in seeds.items() if key not in {("eagle3", "kl"), ("eagle3", "lk_hybrid_eta3")})
  # The key comparison runs first (partial results are useful).
  assert [r.name for r in runs[:2]] == ["eagle3.kl.s0", "eagle3.lk_hybrid_eta3.s0"]
  groups = {g for r in runs for g in r.groups}
  assert groups == {"main", "ablation", "seeds", "chain"}
  assert sum("main" in r.groups for r in runs) == 12 and sum("seeds" in r.groups for r in runs) == 4
  chain = {r.name: r for r in runs if "chain" in r.groups}
  assert set(chain) == {"eagle3.lk_tau.s0", "eagle3.lk_hybrid_eta3_reach.s0"}
  assert all(r.groups == ("chain",) and r.seed == 0 for r in chain.values())   # in no paper table
  assert chain["eagle3.lk_hybrid_eta3_reach.s0"].weighting == "reach"
  assert all(r.weighting == "gamma" for r in runs if r.name != "eagle3.lk_hybrid_eta3_reach.s0")


def test_every_run_config_shares_data_budget_and_eval(tmp_path):
  plan = load_plan()
  data_dir = study.data_dir_of(plan, str(tmp_path))
  shared = set()
  for r in study.build_runs(plan):
    c = study.run_config(r, plan, data_dir)   # loads configs/<arch>.py; checks K == model.num_heads
    assert c.model.arch == r.arch and c.model.num_heads == r.num_draft
    assert c.loss.kind == r.loss and c.seed == r.seed and c.data.seed == r.seed
    if r.eta is not None:
      assert c.loss.eta == r.eta
    if r.lam is not None:
      assert c.loss.lam == r.lam
    assert c.loss.head_weighting == r.weighting
    assert not c.data.auto_prepare
    shared.add((c.data.dir, c.data.max_length, c.data.val_fraction, c.batch_size, c.num_steps,
                c.optim.warmup_steps, c.optim.lr, c.precision))
  assert shared == {(data_dir, plan.data.max_length, plan.data.val_fraction, plan.train.batch_size,
                     plan.train.num_steps, plan.train.warmup_steps, plan.train.lr, plan.train.precision)}
  eagle = [study.run_config(r, plan, data_dir) for r in study.build_runs(plan) if r.arch == "eagle3"]
  assert eagle and all(c.model.init_lm_head_from_target for c in eagle)   # the plan's arch_overrides


def test_plan_is_larger_than_the_default_data_and_variants():
  base = load_config_module(os.path.join(REPO, "configs", "base.py"))[0].build(
      "eagle3", load_config_module(os.path.join(REPO, "configs", "eagle3.py"))[0].model_config(), None)
  cpu, gpu, tiny = load_plan(), load_plan("gpu"), load_plan("tiny")
  assert cpu.data.num_prompts * cpu.data.max_new_tokens > \
      base.data.prepare.num_prompts * base.data.prepare.max_new_tokens
  assert gpu.data.num_prompts > cpu.data.num_prompts and gpu.train.num_steps > cpu.train.num_steps
  assert tuple(cpu.eval.temperatures) == (0.0, 1.0)
  assert set(cpu.eval.benchmarks) == {"mt_bench", "humaneval", "gsm8k"}
  assert cpu.docs.dir == os.path.join(REPO, "docs") and cpu.docs.name == "results"
  assert tiny.docs.dir == ""          # a pipeline check never writes the committed docs
  assert load_plan("steps=7,limit=3").train.num_steps == 7
  with pytest.raises(ValueError):
    load_plan("gpu,tiny")


def test_select_runs():
  runs = study.build_runs(load_plan())
  assert {r.arch for r in study.select_runs(runs, "medusa")} == {"medusa"}
  assert {r.name for r in study.select_runs(runs, "*.kl.*")} == {"eagle3.kl.s0", "eagle3.kl.s1", "medusa.kl.s0",
                                                                 "mlp_speculator.kl.s0", "mtp.kl.s0"}
  assert [r.name for r in study.select_runs(runs, "eagle3.tv.s0,mtp.kl.s0")] == ["mtp.kl.s0", "eagle3.tv.s0"]
  with pytest.raises(ValueError, match="matches no run"):
    study.select_runs(runs, "eagle3.kl.s0,nope")


# ----------------------------------------------------------------------------------------------- orchestrator


class Killed(BaseException):
  """Stands for SIGKILL / Ctrl-C in the middle of a step (not an Exception: nothing may swallow it)."""


def _tau_for(run) -> float:
  """A deterministic accepted-per-round value for a fake run (LK above KL, TV below)."""
  return {"kl": 1.0, "lk_alpha": 1.1, "lk_hybrid": 1.2, "fixed_lambda": 1.0, "tv": 0.5, "lk_tau": 1.3}[run.loss] + 0.01 * run.seed


class Fakes:
  """Fake prepare / train / eval that record their calls and can be told to 'die' at a given call."""

  def __init__(self, kill_train_at: str | None = None, kill_eval_at: str | None = None):
    self.prepared, self.trained, self.evaluated = 0, [], []
    self.kill_train_at, self.kill_eval_at = kill_train_at, kill_eval_at

  def prepare(self, plan, data_dir):
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, "manifest.json"), "w") as f:
      json.dump({"format": "fake"}, f)
    self.prepared += 1

  def train(self, config, workdir):
    name = config.name.split(".", 1)[1]
    self.trained.append(name)
    os.makedirs(workdir, exist_ok=True)
    if name == self.kill_train_at:
      raise Killed()
    summary = dict(status="finished", step=config.num_steps, total_steps=config.num_steps,
                   val={"loss": 1.0, "tau": 1.5, "alpha/0": 0.5})
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f)
    return summary

  def eval(self, run, config, train_workdir, out_dir, plan):
    assert os.path.exists(os.path.join(train_workdir, "summary.json"))
    self.evaluated.append(run.name)
    if run.name == self.kill_eval_at:
      raise Killed()
    a = _tau_for(run)
    k = run.num_draft
    del config
    runs = []
    for t in plan.eval.temperatures:
      for b in plan.eval.benchmarks:
        # 4 prompts x 2 rounds; mean accepted per round = a (a mix of floor/ceil lengths).
        lo, extra = int(a), int(round((a - int(a)) * 8))
        flat = [lo + (1 if j < extra else 0) for j in range(8)]
        per = [flat[2 * i:2 * i + 2] for i in range(4)]
        runs.append(report_lib.BenchmarkRun(b, float(t), k, per, [8] * 4, [1.0] * 4,
                                            offline_tau=2.0 + a if float(t) == 1.0 else None))
    return report_lib.build_report(runs, label=run.name, n_boot=50,
                                   meta={"offline": {"tau": 2.0 + a, "alpha": [0.5]}, "num_draft": k})


def _run(plan, root, fakes, **kw):
  return study.run_study(plan, str(root), prepare_fn=fakes.prepare, train_fn=fakes.train, eval_fn=fakes.eval,
                         log=lambda s: None, hardware_fn=lambda: {"platform": "test", "cpu_count": 2}, **kw)


def _no_plots(monkeypatch):
  """PNG drawing is checked in the docs test; the orchestrator tests skip it (it dominates their time)."""
  monkeypatch.setattr(study, "plot_results", lambda *a, **k: {})


def test_orchestrator_resumes_after_a_kill_and_skips_finished_steps(tmp_path, monkeypatch):
  _no_plots(monkeypatch)
  plan = load_plan("tiny")
  root = tmp_path / "study"
  names = [r.name for r in study.build_runs(plan)]

  # 1st invocation dies while training the 3rd run.
  f1 = Fakes(kill_train_at=names[2])
  with pytest.raises(Killed):
    _run(plan, root, f1)
  assert f1.prepared == 1 and f1.trained == names[:3] and f1.evaluated == names[:2]
  state = json.load(open(root / study.STATE_FILE))
  assert state["steps"][f"train/{names[2]}"]["status"] == "running"   # left by the kill
  assert state["steps"][f"eval/{names[1]}"]["status"] == "done"
  md = (root / "docs" / "results.md").read_text()                     # docs were regenerated as it went
  assert "2/21 runs evaluated" in md and study.PENDING in md

  # 2nd invocation dies during the 4th run's evaluation.
  f2 = Fakes(kill_eval_at=names[3])
  with pytest.raises(Killed):
    _run(plan, root, f2)
  assert f2.prepared == 0                       # data is prepared once
  assert f2.trained == names[2:4]               # finished runs are not retrained; the killed one is redone
  assert f2.evaluated == names[2:4]

  # 3rd invocation finishes everything and redoes only the unfinished evaluation.
  f3 = Fakes()
  out = _run(plan, root, f3)
  assert f3.trained == names[4:] and f3.evaluated == names[3:]
  assert out["pending"] == [] and out["failed"] == [] and out["stopped"] is None
  state = json.load(open(root / study.STATE_FILE))
  assert all(s["status"] == "done" for s in state["steps"].values())
  assert state["steps"][f"train/{names[2]}"]["attempts"] == 2
  assert len(state["invocations"]) == 3

  # 4th invocation: nothing to do.
  f4 = Fakes()
  _run(plan, root, f4)
  assert f4.prepared == 0 and f4.trained == [] and f4.evaluated == []
  md = (root / "docs" / "results.md").read_text()
  assert "21/21 runs evaluated" in md
  chain = md.split("## Beyond the paper", 1)[1].split("\n## ", 1)[0]   # the chain arms beside KL and L_lambda
  rows = [l for l in chain.splitlines() if l.startswith("| EAGLE-3 |")]
  table = [l for l in chain.splitlines() if l.startswith("|")]
  assert len({l.count("|") for l in table}) == 1 and len(table) == 2 + len(rows)   # header, separator, rows
  assert [l.split(" | ")[1] for l in rows] == ["KL", "L_λ (η=3)", "L_τ", "L_λ (η=3), reach weights"]
  assert all(study.PENDING not in l for l in rows) and "+12.5%" in rows[2]   # fake tau 2.25 vs KL 2.0
  assert os.path.exists(root / "docs" / "results" / "study.json")
  assert len(os.listdir(root / "docs" / "results" / "runs")) == 21


def test_orchestrator_only_max_hours_failures_and_plan_changes(tmp_path, monkeypatch):
  _no_plots(monkeypatch)
  plan = load_plan("tiny")
  root = tmp_path / "study"

  # --only: just those runs; the docs still list the whole plan.
  f = Fakes()
  _run(plan, root, f, only="mtp")
  assert f.trained == ["mtp.kl.s0", "mtp.lk_hybrid_eta3.s0", "mtp.lk_alpha.s0"]
  assert "3/21 runs evaluated" in (root / "docs" / "results.md").read_text()

  # --max_hours: each clock reading advances 1 h, so the budget stops new steps early.
  ticks = itertools.count(0, 3600)
  f = Fakes()
  out = _run(plan, root, f, max_hours=2.5, clock=lambda: float(next(ticks)))
  assert out["stopped"] and "max_hours" in out["stopped"]
  assert 0 < len(f.trained) < 16

  # A failing training run is recorded and the study goes on.
  class Boom(Fakes):
    def train(self, config, workdir):
      if config.name.endswith("eagle3.tv.s0"):
        raise RuntimeError("nan loss")
      return super().train(config, workdir)
  f = Boom()
  out = _run(plan, root, f)
  assert out["failed"] == ["train/eagle3.tv.s0"]
  assert "eagle3.tv.s0" in out["pending"] and len(out["pending"]) == 1
  state = json.load(open(root / study.STATE_FILE))
  assert "nan loss" in state["steps"]["train/eagle3.tv.s0"]["error"]
  assert "failed" in (root / "docs" / "results.md").read_text()

  # Changing a finished run's settings in the same root is refused.
  changed = apply_overrides(plan, {"train.num_steps": 3})
  with pytest.raises(ValueError, match="other settings"):
    _run(changed, root, Fakes())


# ----------------------------------------------------------------------------------------------- docs


def _compact(taus: dict[float, dict[str, float]], offline: float | None) -> dict:
  temps = {}
  for t, per in taus.items():
    benches = {b: {"tau": v, "tau_ci95": [v - 0.1, v + 0.1], "offline_tau": offline if t == 1.0 else None,
                   "num_prompts": 4} for b, v in per.items()}
    mean = sum(per.values()) / len(per)
    temps[f"{t:g}"] = {"benchmarks": benches, "mean": {"tau": mean, "tau_ci95": [mean - 0.05, mean + 0.05],
                                                       "offline_tau": offline if t == 1.0 else None}}
  return {"label": "x", "temperatures": temps, "meta": {"offline": None if offline is None else {"tau": offline}}}


def _write_result(root, name, taus, offline, *, trained=True):
  rdir = os.path.join(root, "runs", name)
  if trained:
    os.makedirs(os.path.join(rdir, "train"), exist_ok=True)
    with open(os.path.join(rdir, "train", "summary.json"), "w") as f:
      json.dump({"status": "finished", "step": 5, "total_steps": 5, "val": {"tau": 1.9}}, f)
  if taus is not None:
    os.makedirs(os.path.join(rdir, "eval"), exist_ok=True)
    with open(os.path.join(rdir, "eval", study.EVAL_MARKER), "w") as f:
      json.dump(_compact(taus, offline), f)


def test_docs_mark_pending_cells_and_compute_relative_change(tmp_path):
  plan = load_plan("tiny")
  root = str(tmp_path / "study")
  b3 = ("mt_bench", "humaneval", "gsm8k")
  # EAGLE-3: KL mean 2.0 / 1.5 (T=0 / T=1), L_lambda mean 2.2 / 1.8  ->  +10.0% / +20.0%.
  _write_result(root, "eagle3.kl.s0", {0.0: dict(zip(b3, (1.9, 2.0, 2.1))), 1.0: dict(zip(b3, (1.5,) * 3))}, 2.5)
  _write_result(root, "eagle3.lk_hybrid_eta3.s0", {0.0: dict(zip(b3, (2.2,) * 3)), 1.0: dict(zip(b3, (1.8,) * 3))},
                2.75)
  # Second seed: KL 2.4 / 1.7, L_lambda 2.6 / 2.0  -> seed means KL 2.2 / 1.6, L_lambda 2.4 / 1.9.
  _write_result(root, "eagle3.kl.s1", {0.0: dict(zip(b3, (2.4,) * 3)), 1.0: dict(zip(b3, (1.7,) * 3))}, 2.5)
  _write_result(root, "eagle3.lk_hybrid_eta3.s1", {0.0: dict(zip(b3, (2.6,) * 3)), 1.0: dict(zip(b3, (2.0,) * 3))},
                2.5)
  # MEDUSA: trained, not evaluated yet; L_alpha of EAGLE-3: nothing at all.
  _write_result(root, "medusa.kl.s0", None, None)

  out = study.regenerate_docs(plan, root)
  md = open(out["markdown"]).read()
  results = study.collect_results(plan, root, study.build_runs(plan))
  by = {r["name"]: r for r in results}
  assert by["eagle3.kl.s0"]["status"] == "evaluated" and by["medusa.kl.s0"]["status"] == "trained"
  assert by["eagle3.lk_alpha.s0"]["status"] == study.PENDING

  lines = md.splitlines()

  def row(prefix):
    hits = [l for l in lines if l.startswith(prefix)]
    assert hits, prefix
    return hits

  # Main table, T = 0: per-benchmark cells with CIs and the mean; missing runs are "pending".
  t0 = lines.index("#### T = 0")
  eagle_kl = [l for l in lines[t0:] if l.startswith("| EAGLE-3 | KL |")][0]
  assert "1.900 [1.80, 2.00]" in eagle_kl and "2.000 [1.95, 2.05]" in eagle_kl
  assert [l for l in lines[t0:] if l.startswith("| EAGLE-3 | L_α |")][0].count("pending") == 4
  assert [l for l in lines[t0:] if l.startswith("| MEDUSA | KL |")][0].count("pending") == 4
  t1 = lines.index("#### T = 1")
  assert [l for l in lines[t1:] if l.startswith("| EAGLE-3 | KL |")][0].rstrip().endswith("| 2.500 |")

  # Relative change LK vs KL per architecture and temperature.
  rel0 = row("| EAGLE-3 | 0 |")[0]
  rel1 = row("| EAGLE-3 | 1 |")[0]
  relo = row("| EAGLE-3 | offline (val, T=1) |")[0]
  assert "+10.0%" in rel0 and "+20.0%" in rel1 and "+10.0%" in relo
  assert rel0.count("pending") == 2               # L_alpha tau and its delta
  assert "pending" in row("| MEDUSA | 0 |")[0]
  assert study.relative_change(2.2, 2.0) == pytest.approx(10.0)
  assert study.relative_change(None, 2.0) is None

  # Seeds: mean ± s.d. over seeds and the relative change of the seed means.
  kl_mean = [l for l in lines if l.startswith("| KL | **mean ± s.d.** |")][0]
  assert "2.200 ± 0.283 (n=2)" in kl_mean and "1.600 ± 0.141 (n=2)" in kl_mean
  delta = [l for l in lines if l.startswith("| Δ L_λ (η=3) vs KL (seed means)")][0]
  assert f"{100 * (2.4 / 2.2 - 1):+.1f}%" in delta and f"{100 * (1.9 / 1.6 - 1):+.1f}%" in delta
  assert study.seed_stats([2.0]) == (2.0, None)

  # Ablation: present rows filled, missing ones pending; paper table is static and Δ computed from it.
  assert row("| TV |")[0].count("pending") >= 3
  assert "+1.6%" in row("| Llama-3.1-8B | EAGLE-3 | 0 |")[0] and "+10.0%" in row("| Llama-3.1-8B | EAGLE-3 | 0 |")[0]
  assert "~+7.8%" in row("| Llama-3.1-8B | MEDUSA | 1 |")[0]
  assert "## Discussion" in md and study.DISCUSSION_START in md

  # The JSON behind the docs, and a plot.
  res_dir = os.path.join(root, "docs", "results")
  saved = json.load(open(os.path.join(res_dir, "runs", "eagle3.kl.s0.json")))
  assert saved["eval"]["temperatures"]["0"]["mean"]["tau"] == pytest.approx(2.0)
  assert not os.path.exists(os.path.join(res_dir, "runs", "eagle3.lk_alpha.s0.json"))
  for png in ("tau_main.png", "eagle3_ablation.png"):
    assert os.path.exists(os.path.join(res_dir, png))
    assert f"](results/{png})" in md

  # The hand-written discussion survives regeneration.
  text = md.replace(study.DISCUSSION_START + "\n", study.DISCUSSION_START + "\nOur own words.\n", 1)
  text = text.replace("_To be written by hand", "_old", 1)
  with open(out["markdown"], "w") as f:
    f.write(text)
  study.regenerate_docs(plan, root)
  md2 = open(out["markdown"]).read()
  assert "Our own words." in md2 and md2.count(study.DISCUSSION_START) == 1


def test_docs_with_no_results_are_all_pending(tmp_path):
  plan = load_plan("tiny")
  state = {"steps": {}, "invocations": []}
  md = study.render_markdown(plan, study.collect_results(plan, str(tmp_path), study.build_runs(plan), state), state)
  assert "0/21 runs evaluated" in md and "No finished evaluation yet." in md
  assert md.count("pending") > 50


def test_estimate_uses_the_measured_unit_costs():
  plan = load_plan()
  runs = study.build_runs(plan)
  assert study.estimate_seconds(plan, runs, {"train_step_s": {}}) is None
  m = dict(gen_s_per_prompt=4.0, gen_max_new_tokens=2 * plan.data.max_new_tokens, precompute_s_per_prompt=1.0,
           train_step_s=dict(eagle3=2.0, medusa=1.0, mlp_speculator=1.0, mtp=1.0),
           train_tokens_per_step=plan.train.batch_size * plan.data.max_length,
           eval_prompt_s=2.0, eval_max_new_tokens=plan.eval.max_new_tokens, eval_overhead_s=5.0, cpu_share=0.5)
  est = study.estimate_seconds(plan, runs, m)
  turns = 2 * plan.eval.limit + plan.eval.limit + plan.eval.limit     # MT-bench has two turns
  assert est["data"] == pytest.approx(plan.data.num_prompts * (4.0 / 2 + 1.0))
  assert est["train"] == pytest.approx(plan.train.num_steps * (12 * 2.0 + 9 * 1.0))
  assert est["eval"] == pytest.approx(21 * (5.0 + 2 * turns * 2.0))
  assert est["total"] == pytest.approx(est["data"] + est["train"] + est["eval"])
  # With the machine to itself (1 core instead of the measured 0.5 share) everything takes half as long.
  fast = study.estimate_seconds(plan, runs, m, effective_cores=1.0)
  assert fast["total"] == pytest.approx(est["total"] / 2)
