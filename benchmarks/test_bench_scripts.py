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
  """--ab=full_attention: with 2 causal query blocks (seq 512) the default step skips score work."""
  out = tmp_path / "bench_train.json"
  _run(["benchmarks/bench_train.py", "--small", "--archs=mtp", "--steps=1", "--seq=512", "--ab=full_attention",
        f"--out={out}"], tmp_path)
  (row,) = json.loads(out.read_text())["rows"]
  assert row["ab"] == "full_attention" and row["b_gflop_per_step"] > row["gflop_per_step"]
  # --ab=same: the A/A control compiles the identical program (same FLOPs, same loss after one step).
  _run(["benchmarks/bench_train.py", "--small", "--archs=mtp", "--steps=1", "--ab=same", f"--out={out}"], tmp_path)
  (row,) = json.loads(out.read_text())["rows"]
  assert row["ab"] == "same" and row["b_gflop_per_step"] == row["gflop_per_step"]


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


def test_bench_mesh_small_compares_meshes_in_alternating_processes(tmp_path):
  out = tmp_path / "bench_mesh.json"
  # "/compiler": that mesh's step leaves the gradient collectives to the partitioner; "config:2": the
  # config's layout on 2 devices (the MLP-Speculator's: FSDP in the per-device program, its embedding
  # tables kept split). --batch_per_shard: one row per batch shard (weak scaling).
  two, cfg = "2x1x1/compiler", "config:2"
  # Through launch.py (malloc tuning on), so that each child's own malloc decision is checked too.
  res = _run(["benchmarks/launch.py", "benchmarks/bench_mesh.py", "--small", "--archs=mlp_speculator",
              f"--meshes=1x1x1,{two},{cfg}",
              "--batch=1", "--batch_per_shard", "--seq=16", "--rounds=2", "--steps=1", f"--out={out}"], tmp_path)
  table = json.loads(out.read_text())
  assert [(r["round"], r["mesh"]) for r in table["runs"]] == [(0, "1x1x1"), (0, two), (0, cfg),
                                                              (1, two), (1, cfg), (1, "1x1x1")]
  assert {r["mesh"]: (r["devices"], r["batch"]) for r in table["runs"]} == {"1x1x1": (1, 1), two: (2, 2), cfg: (2, 2)}
  assert {r["mesh"]: tuple(r["mesh_shape"]) for r in table["runs"]} == {
      "1x1x1": (1, 1, 1), two: (2, 1, 1), cfg: (1, 2, 1)}
  assert {r["mesh"]: r["explicit_grad_reduce"] for r in table["runs"]} == {"1x1x1": True, two: False, cfg: True}
  assert {r["mesh"]: (r["gather_split_params"], tuple(r["split_tables"])) for r in table["runs"]} == {
      "1x1x1": (False, ()), two: (False, ()), cfg: (True, ("emb",))}
  # Each child decides its own malloc tunables: the retained heap only with one CPU device.
  import malloc
  assert {r["mesh"]: r["retained_heap"] for r in table["runs"]} == {"1x1x1": malloc.retained_heap_supported({}),
                                                                    two: False, cfg: False}
  # Collective bytes per step: none on one device; the FSDP program gathers and reduce-scatters.
  by_mesh = {r["mesh"]: r for r in table["runs"]}
  assert by_mesh["1x1x1"]["all_gather_mb"] == by_mesh["1x1x1"]["reduce_scatter_mb"] == 0
  assert by_mesh[cfg]["all_gather_mb"] > 0 and by_mesh[cfg]["reduce_scatter_mb"] > 0
  # A tiny step's user time alone can read 0 (the kernel splits user/system by timer ticks); their sum cannot.
  assert all(r["cpu_s_per_step"] > 0 and 0 <= r["user_s_per_step"] <= r["cpu_s_per_step"] for r in table["runs"])
  ref, *others = table["summary"]
  assert ref["efficiency"] == 1.0 and len(others) == 2
  assert all(o["efficiency"] > 0 and len(o["efficiency_per_round"]) == 2 for o in others)
  assert "vs ref" in res.stdout
  bad = subprocess.run([sys.executable, "benchmarks/bench_mesh.py", "--meshes=1x1x1,3x1x1", "--batch=8"], cwd=REPO,
                       env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True, timeout=120)
  assert bad.returncode != 0 and "not divisible" in bad.stderr


def test_bench_mesh_grad_meshes_are_compared_with_the_first_grad_mesh(tmp_path):
  out = tmp_path / "bench_mesh.json"
  res = _run(["benchmarks/bench_mesh.py", "--small", "--archs=medusa", "--meshes=1x1x1,1x1x1/grad,2x1x1/grad",
              "--batch=2", "--seq=16", "--rounds=1", "--steps=1", "--warmup=1", f"--out={out}"], tmp_path)
  table = json.loads(out.read_text())
  assert {r["mesh"]: (r["program"], r["devices"]) for r in table["runs"]} == {
      "1x1x1": ("step", 1), "1x1x1/grad": ("grad_only", 1), "2x1x1/grad": ("grad_only", 2)}
  # The bound's programs have no collective; each mesh is measured against the first of its program.
  assert all(r["all_reduce_mb"] == r["all_gather_mb"] == r["reduce_scatter_mb"] == 0 for r in table["runs"])
  summary = {s["mesh"]: s for s in table["summary"]}
  assert {m: s["reference"] for m, s in summary.items()} == {
      "1x1x1": "1x1x1", "1x1x1/grad": "1x1x1/grad", "2x1x1/grad": "1x1x1/grad"}
  by_mesh = {r["mesh"]: r for r in table["runs"]}
  assert summary["2x1x1/grad"]["efficiency"] == pytest.approx(
      by_mesh["2x1x1/grad"]["tokens_per_s"] / by_mesh["1x1x1/grad"]["tokens_per_s"])
  assert summary["1x1x1/grad"]["efficiency"] == 1.0 and "vs ref" in res.stdout


_GRAD_ONLY_CHECK = """
import sys
sys.path.insert(0, "benchmarks")
import jax
import numpy as np
import bench_train
from lkjax import sharding as shd
info = bench_train.target_info(True)
built = bench_train.build_step("medusa", "lk_hybrid", info, small=True, batch=8, seq=8, mesh_shape=None,
                               precision="bf16", program="grad_only")
assert built["mesh_shape"] == (8, 1, 1), built["mesh_shape"]
assert built["all_reduce_mb"] == built["all_gather_mb"] == built["reduce_scatter_mb"] == 0
parts = built["parts"]
m8 = built["compiled"](*parts["inputs"])
loss8, sq8 = np.asarray(m8["loss"]), np.asarray(m8["grad_sq"])
assert loss8.shape == sq8.shape == (8,) and np.ptp(sq8) > 1e-3 * sq8.max(), sq8   # the rows differ
one = bench_train.grad_only_program(parts["graphdef"], parts["loss_cfg"], "bf16", shd.make_mesh((1, 1, 1)))
params, rest, target, batch = jax.tree.map(np.asarray, parts["inputs"])
for i in range(8):
  m1 = one(params, rest, target, {k: v[i:i + 1] for k, v in batch.items()})
  np.testing.assert_allclose(np.asarray(m1["loss"])[0], loss8[i], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(m1["grad_sq"])[0], sq8[i], rtol=1e-4)
print("ok")
"""


def test_grad_only_program_is_each_devices_own_gradient():
  """bench_train's --program=grad_only on 8 devices: device i's loss and gradient are those of row i alone
  (the batch is split, and no gradient is summed over the devices), with no collective in the program.
  (In a child process: bench_train's absl flags clash with bench_mesh's in one process.)"""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=REPO)
  res = subprocess.run([sys.executable, "-c", _GRAD_ONLY_CHECK], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
  assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def test_bench_mesh_parses_layout_suffixes_and_config_meshes():
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  import bench_mesh
  from absl import app
  tables = bench_mesh.parse_mesh("1x8x1/tables")
  assert tables["devices"] == 8 and tables["split_batch"] == 8
  assert "--mesh=1,8,1" in tables["args"] and "--split_tables=emb,embed_tokens" in tables["args"]
  assert tables["expect"] == dict(explicit_grad_reduce=True, gather_split_params=True,
                                  split_tables=["emb", "embed_tokens"], program="step")
  assert bench_mesh.parse_mesh("2x2x2/compiler")["expect"]["explicit_grad_reduce"] is False
  assert bench_mesh.parse_mesh("2x2x2")["split_batch"] == 4
  cfg = bench_mesh.parse_mesh("config:8")
  assert cfg == dict(devices=8, args=["--mesh=config"], expect=dict(mesh="config", program="step"), split_batch=8,
                     program="step")
  grad = bench_mesh.parse_mesh("8x1x1/grad")
  assert grad["devices"] == grad["split_batch"] == 8 and grad["program"] == "grad_only"
  assert "--program=grad_only" in grad["args"] and "--mesh=8,1,1" in grad["args"]
  assert grad["expect"] == dict(program="grad_only")
  for bad in ("8x1", "config:", "config:x", "8x1x1/other", "2x2x1/grad", "x1x1/grad", "config:8/grad"):
    with pytest.raises(app.UsageError):
      bench_mesh.parse_mesh(bad)


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
                       "decode_b1/preallocated"}
  assert rows["ceiling"]["gflops_fp32"] > 0 and rows["ceiling"]["gflop_per_token"] > 0.2   # 135M params
  for name in ("regenerate/hf", "regenerate/lkjax"):
    assert 0 < rows[name]["tokens"] <= 2 * 4 + 2
  assert rows["regenerate/lkjax"]["ratio"] > 0 and rows["decode_b1/preallocated"]["ratio"] > 0
  assert "| regenerate/lkjax |" in res.stdout and table["settings"]["prompts"] == 2
