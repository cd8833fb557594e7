"""The train-step and matmul benchmark scripts run end to end at tiny sizes and write their tables."""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, tmp_path):
  env = dict(os.environ, XLA_FLAGS="", PYTHONPATH=REPO)
  res = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  return res


def test_bench_train_small_writes_interleaved_lk_kl_table(tmp_path):
  out = tmp_path / "bench_train.json"
  res = _run(["benchmarks/bench_train.py", "--small", "--archs=eagle3,medusa", "--steps=2", "--ab=no_target_lse",
              f"--profile={tmp_path / 'prof'}", f"--out={out}"], tmp_path)
  table = json.loads(out.read_text())
  assert [r["arch"] for r in table["rows"]] == ["eagle3", "medusa"]
  for r in table["rows"]:
    assert len(r["lk_times"]) == len(r["kl_times"]) == len(r["b_times"]) == 2
    assert len(r["lk_page_faults"]) == len(r["kl_kernel_s"]) == 2 and r["warmup"] == 1
    # CPU time: user + system is counted precisely; the split between them goes by timer ticks.
    assert r["cpu_s_per_step"] > 0 and 0 <= r["user_s_per_step"] <= r["cpu_s_per_step"]
    # ... and the CPU column is the median over the timed steps of user + kernel time, not user time alone.
    assert len(r["lk_user_s"]) == 2
    assert r["cpu_s_per_step"] == pytest.approx(statistics.median(
        u + k for u, k in zip(r["lk_user_s"], r["lk_kernel_s"])))
    assert r["tokens_per_s"] > 0 and r["gflop_per_step"] > 0 and r["lk_over_kl"] > 0 and r["b_over_lk"] > 0
    # Without the precomputed lse the step multiplies the full-vocabulary head: more FLOPs.
    assert r["ab"] == "no_target_lse" and r["b_gflop_per_step"] > r["gflop_per_step"]
  assert "LK/KL" in res.stdout and "B/LK" in res.stdout
  # --profile: each step's trace is summarised into the row (op time per fusion kind, longest ops).
  for r in table["rows"]:
    for kind in ("lk_hybrid", "kl"):
      p = r["profile"][kind]
      assert p["op_ms_total"] > 0 and p["op_ms_by_kind"] and p["longest_ops"][0]["ms"] > 0
      assert not [k for k in p["op_ms_by_kind"] if k.startswith(("end: ", "ThreadpoolListener", "CommonPjRt"))]
      assert sum(p["op_ms_by_kind"].values()) == pytest.approx(p["op_ms_total"])
      rows = p["op_ms_by_kind_shape"]
      assert rows and sum(r["ms"] for r in rows) <= p["op_ms_total"] * (1 + 1e-9)
      assert all(r["shape"] for r in rows if r["kind"].endswith("fusion"))   # every fusion's shape is found


def test_bench_train_config_overrides_reach_the_model_and_bad_keys_fail_early(tmp_path):
  out = tmp_path / "bench_train.json"
  _run(["benchmarks/bench_train.py", "--small", "--archs=medusa", "--steps=1", '--config_overrides={"model.num_layers": 2}',
        f"--out={out}"], tmp_path)
  table = json.loads(out.read_text())
  (row,) = table["rows"]
  assert table["config_overrides"] == {"model.num_layers": 2}
  # --small MEDUSA: K = 6 heads, hidden 64, draft vocabulary 512; a second residual block per head adds
  # 6 x (64 x 64 + 64) parameters to the 6 x (64 x 64 + 64) + 6 x 64 x 512 of one.
  assert row["num_params"] == 6 * 2 * (64 * 64 + 64) + 6 * 64 * 512
  bad = subprocess.run([sys.executable, "benchmarks/bench_train.py", "--small", "--archs=medusa",
                        '--config_overrides={"model.nope": 1}'], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and "unknown key 'nope'" in bad.stderr and "matmul ceiling" not in bad.stdout


def test_bench_train_chain_objective_variants(tmp_path):
  """--ab=lk_tau times the lk_tau step (its loss is -log tau: in [-log(K+1), 0]) and --ab=reach the L_lambda step
  with reach head weights (another loss than the gamma-weighted step on the same batch), beside KL."""
  for ab in ("lk_tau", "reach"):
    out = tmp_path / f"bench_train_{ab}.json"
    res = _run(["benchmarks/bench_train.py", "--small", "--archs=medusa", "--steps=1", f"--ab={ab}", f"--out={out}"],
               tmp_path)
    row = json.loads(out.read_text())["rows"][0]
    assert row["ab"] == ab and row["b_over_kl"] > 0 and len(row["b_times"]) == 1
    assert "B/KL" in res.stdout
    if ab == "lk_tau":
      assert -math.log(6 + 1) <= row["b_loss"] <= 0 < row["loss"]
    else:
      assert row["b_loss"] != row["loss"] and row["b_loss"] > 0


def test_bench_train_full_attention_and_same_ab(tmp_path):
  """--ab=full_attention: with 2 causal query blocks (seq 512) the default CPU step skips score work."""
  out = tmp_path / "bench_train.json"
  _run(["benchmarks/bench_train.py", "--small", "--archs=mtp", "--steps=1", "--seq=512", "--ab=full_attention",
        f"--out={out}"], tmp_path)
  (row,) = json.loads(out.read_text())["rows"]
  assert row["ab"] == "full_attention" and row["b_gflop_per_step"] > row["gflop_per_step"]
  # --ab=same: the A/A control compiles the identical program (same FLOPs, same loss after one step).
  _run(["benchmarks/bench_train.py", "--small", "--archs=mtp", "--steps=1", "--ab=same", f"--out={out}"], tmp_path)
  (row,) = json.loads(out.read_text())["rows"]
  assert row["ab"] == "same" and row["b_gflop_per_step"] == row["gflop_per_step"]
  # --ab=xla_matmul: the B step is built with perf.matmul = "xla", the A step with the CPU default "nn".
  _run(["benchmarks/bench_train.py", "--small", "--archs=mtp", "--steps=1", "--ab=xla_matmul", f"--out={out}"], tmp_path)
  (row,) = json.loads(out.read_text())["rows"]
  assert row["ab"] == "xla_matmul" and row["perf"]["matmul"] == "nn" and row["b_step_s"] > 0


def test_bench_parts_small_times_every_variant(tmp_path):
  out = tmp_path / "bench_parts.json"
  res = _run(["benchmarks/bench_parts.py", "--small", "--rounds=2", f"--out={out}"], tmp_path)
  groups = json.loads(out.read_text())["groups"]
  assert [r["name"] for r in groups["attention"]] == [
      "attention, all keys", "attention, causal blocks of 16", "attention, causal blocks of 8"]
  assert len(groups["head_loss"]) == 3
  assert [r["name"] for r in groups["norm"]] == [
      "rms norm 1x32x64, rows", "rms norm 1x32x64, as given", "rms norm 8x32x64, rows", "rms norm 8x32x64, as given"]
  for rows in groups.values():
    assert all(len(r["times_s"]) == 2 and r["median_ms"] > 0 for r in rows)
  assert "head loss, KL" in res.stdout


def test_bench_matmul_small(tmp_path):
  out = tmp_path / "bench_matmul.json"
  _run(["benchmarks/bench_matmul.py", "--m=64", "--k=32", "--n=128", "--repeats=1", f"--out={out}"], tmp_path)
  rows = json.loads(out.read_text())["rows"]
  assert {r["form"] for r in rows} >= {"fwd NN f32 out", "dX materialised", "dW materialised"}
  assert all(r["gflops"] > 0 for r in rows)


def test_bench_versions_small_times_a_baseline_commit_beside_this_checkout(tmp_path):
  """Both versions run in alternating child processes; HEAD against the checkout is an A/A comparison."""
  out = tmp_path / "bench_versions.json"
  res = _run(["benchmarks/bench_versions.py", "--small", "--before=HEAD", "--archs=medusa", "--rounds=2", "--steps=1",
              "--warmup=1", f"--out={out}"], tmp_path)
  table = json.loads(out.read_text())
  assert [(r["round"], r["version"]) for r in table["runs"]] == [(0, "before"), (0, "after"), (1, "after"),
                                                                 (1, "before")]
  (s,) = table["summary"]
  assert s["arch"] == "medusa" and len(s["ratios"]) == 2 and s["after_over_before"] > 0
  assert s["after_over_before"] == pytest.approx(statistics.median(s["ratios"]))
  assert "after/before" in res.stdout
  # the temporary worktree is gone
  listed = subprocess.run(["git", "worktree", "list"], cwd=REPO, capture_output=True, text=True).stdout
  assert "/before" not in listed


_SETTINGS_ENV = """
import sys
sys.path.insert(0, "benchmarks")
import pytest, bench_malloc
import malloc
base = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=4:glibc.rtld.optional_static_tls=512", "PATH": "/bin"}
default = bench_malloc.setting_env("default", base)
assert malloc.OPT_IN_ENV not in default and default["GLIBC_TUNABLES"] == "glibc.rtld.optional_static_tls=512"
huge = bench_malloc.setting_env("hugepages", base)
assert malloc.OPT_IN_ENV not in huge
assert huge["GLIBC_TUNABLES"] == "glibc.rtld.optional_static_tls=512:glibc.malloc.hugetlb=1"
retained = bench_malloc.setting_env("retained", base)
assert retained[malloc.OPT_IN_ENV] == "1"
want = {"glibc.rtld.optional_static_tls": "512", "glibc.malloc.hugetlb": "1", **dict(malloc.RETAIN_TUNABLES)}
assert malloc._tunables(retained["GLIBC_TUNABLES"]) == want
with pytest.raises(ValueError, match="unknown"):
  bench_malloc.setting_env("jemalloc", base)
print("ok")
"""


def test_bench_malloc_settings_env(tmp_path):
  """Each setting's child environment: ours replaced, the user's other tunables kept (in a subprocess: the
  script defines absl flags)."""
  assert _run(["-c", _SETTINGS_ENV], tmp_path).stdout.strip() == "ok"


def test_bench_target_tiny_writes_every_row(tmp_path):
  """The target-side benchmark on the packaged target at tiny sizes: every row and ratio is recorded."""
  out = tmp_path / "bench_target.json"
  res = _run(["benchmarks/bench_target.py", "--prompts=2", "--max_new_tokens=4", "--batch=2", "--hf_batch=1",
              "--decode_prompts=1", f"--out={out}"], tmp_path)
  table = json.loads(out.read_text())
  rows = table["rows"]
  assert set(rows) == {"ceiling", "regenerate/hf", "regenerate/lkjax", "precompute", "decode_b1/dynamic",
                       "decode_b1/preallocated", "speculative/b1", "speculative/batched"}
  assert rows["ceiling"]["gflops_fp32"] > 0 and rows["ceiling"]["gflop_per_token"] > 0.2   # 135M params
  for name in ("regenerate/hf", "regenerate/lkjax"):
    assert 0 < rows[name]["tokens"] <= 2 * 4 + 2
  assert rows["regenerate/lkjax"]["ratio"] > 0 and rows["decode_b1/preallocated"]["ratio"] > 0
  assert "| regenerate/lkjax |" in res.stdout and table["settings"]["prompts"] == 2
