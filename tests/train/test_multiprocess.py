"""Multi-host training, proven with real multi-process runs on one machine (``pytest -m multiprocess``).

``experiments/train.py`` runs unchanged as 2 local processes x 4 CPU devices (`lkjax.distributed.launch_local`:
a local coordinator, gloo collectives) and is compared with the same run in 1 process x 8 devices (this
pytest process, tests/conftest.py): same per-step metrics and final parameters, every record read once per
epoch (from the loaders' own per-epoch digests saved in the checkpoints), checkpoints that resume in 2
processes and load in 1, a killed process that stops the others, a relaunch that resumes, mismatched
configs rejected by key, and evaluation / export done by process 0 only.

Each launched run costs about half a minute on 2 cores (two interpreters, one compile each), so the runs
are module fixtures shared by several tests.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from flax import nnx

from lkjax import distributed
from lkjax.config_args import load_config
from lkjax.data import pipeline, shards
from lkjax.train import loop, metrics as metrics_lib

from test_train_loop import make_data  # 40 synthetic records, V = 64, H = 16, an 8-layer target

pytestmark = pytest.mark.multiprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEARTBEAT_S = 30  # 10 s once ended both processes during compilation on the loaded 2-core machine
TIMINGS = ("tokens_per_s", "step_time_s", "split")
ETA = {"eagle3": 3.0, "medusa": 10.0}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("mp_shards")
  make_data(d)
  return d


def _overrides(data_dir, **over):
  """6 steps of a global batch of 8 on 32 training records: 1.5 epochs, checkpoints at 3 and 6."""
  base = {"data.dir": str(data_dir), "data.max_length": 16, "data.val_fraction": 0.2, "data.auto_prepare": False,
          "batch_size": 8, "num_steps": 6, "model.num_heads": 2, "model.draft_vocab_size": 32, "eval_every": 3,
          "eval_steps": 1, "log_every": 1, "checkpoint.every": 3, "checkpoint.keep": 10,
          "checkpoint.every_minutes": 0.0, "precision": "fp32", "optim.warmup_steps": 2, "optim.lr": 0.01}
  base.update(over)
  return base


def _train_cmd(arch, workdir, overrides):
  return [sys.executable, os.path.join(ROOT, "experiments", "train.py"), f"--config=configs/{arch}.py:smoke",
          f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in overrides.items())]


def _launch(cmd, base, name, *, num_processes=2, on_start=None):
  """Launch ``cmd`` as local processes x 4 CPU devices; returns (LaunchResult, launcher output, [process logs]);
  the logs stay in ``<base>/<name>_logs``."""
  out = io.StringIO()
  res = distributed.launch_local(cmd, num_processes=num_processes, devices_per_process=8 // num_processes,
                                 heartbeat_timeout_s=HEARTBEAT_S, log_dir=base / f"{name}_logs", out=out, cwd=ROOT,
                                 on_start=on_start)
  (base / f"{name}_logs" / "launcher.log").write_text(out.getvalue())   # kept for debugging a failure
  logs = [(base / f"{name}_logs" / f"process_{i}.log").read_text() for i in range(num_processes)]
  return res, out.getvalue(), logs


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
  """``runs(arch)`` -> (1-process workdir, 2-process workdir, the 2 processes' logs), each run made once."""
  cache = {}

  def get(arch):
    if arch not in cache:
      base = tmp_path_factory.mktemp(f"mp_{arch}")
      over = _overrides(data_dir)
      one = loop.train_and_evaluate(load_config(f"configs/{arch}.py:smoke", over), base / "one")
      assert one["status"] == "finished"
      res, out, logs = _launch(_train_cmd(arch, base / "two", over), base, "two")
      assert res.returncode == 0, out[-6000:]
      cache[arch] = (base / "one", base / "two", logs)
    return cache[arch]

  return get


def _records(workdir, split):
  return {r["step"]: r for r in metrics_lib.read_metrics(workdir, split)}


def _assert_same_metrics(a_dir, b_dir, *, rel, abs, steps=None):
  for split in ("train", "val"):
    a, b = _records(a_dir, split), _records(b_dir, split)
    assert sorted(a) == sorted(b) and a
    for st in steps or a:
      if st not in a:
        continue
      assert set(a[st]) == set(b[st]), (split, st)
      for key in a[st]:
        if key not in TIMINGS:
          assert b[st][key] == pytest.approx(a[st][key], rel=rel, abs=abs), (split, st, key)


def _loader_states(workdir, step):
  """The grain iterator state each process saved at ``step`` (the loaders' own counters), by process."""
  d = os.path.join(workdir, "checkpoints", str(step), "data")
  files = sorted(f for f in os.listdir(d) if f.startswith("process_"))
  return [json.loads(open(os.path.join(d, f)).read()) for f in files]


def _epoch_digests(states):
  epochs = sorted({int(e) for s in states for e in s["epoch_records"]})
  return {e: pipeline.combine_digests([s["epoch_records"][str(e)] for s in states if str(e) in s["epoch_records"]])
          for e in epochs}


def _params(workdir):
  trained = loop.load_trained_draft(workdir)  # one process, one device: restores any process count's save
  return trained, jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(trained.model, nnx.Param)))


def _files(workdir):
  """Every file of a workdir (relative) outside orbax's array storage (``checkpoints/<step>/state``, where
  each process writes the shards it holds), with the per-process iterator files and TensorBoard's event file
  names reduced to a pattern."""
  out = set()
  for root, _, names in os.walk(workdir):
    for n in names:
      rel = os.path.relpath(os.path.join(root, n), workdir)
      parts = rel.split(os.sep)
      if len(parts) > 3 and parts[0] == "checkpoints" and parts[2] == "state":
        continue
      if n.startswith("process_") and n.endswith(".json"):
        rel = os.path.join(os.path.dirname(rel), "process_*.json")
      elif rel.startswith(metrics_lib.TB_DIR):
        rel = os.path.join(metrics_lib.TB_DIR, "events")
      out.add(rel)
  return out


# ----------------------------------------------------------------------------------------------- equality


@pytest.mark.parametrize("arch", ["eagle3", "medusa"])
def test_two_processes_train_exactly_like_one(runs, arch):
  one, two, logs = runs(arch)
  # The same config ran: config.json written by process 0 of the 2-process run equals the in-process one.
  assert json.loads((two / loop.CONFIG_FILE).read_text()) == json.loads((one / loop.CONFIG_FILE).read_text())

  # Per-step loss, per-head alpha / lambda / kl / tv, tau and lr; validation too. The global batch holds the
  # same rows in another order (each process contributes its half), so sums differ in the last bits only.
  _assert_same_metrics(one, two, rel=2e-5, abs=1e-6)
  train = _records(two, "train")
  assert sorted(train) == [1, 2, 3, 4, 5, 6]
  for rec in train.values():
    # lambda_k = exp(-eta * alpha_k) with alpha_k the masked mean over the GLOBAL batch (the logged alpha).
    for k in range(2):
      assert rec[f"lambda/{k}"] == pytest.approx(np.exp(-ETA[arch] * rec[f"alpha/{k}"]), rel=1e-5)

  # The same final parameters (restored in one process from both runs' checkpoints) and they moved.
  _, p1 = _params(one)
  trained, p2 = _params(two)
  assert trained.step == 6
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=2e-4, atol=2e-6), p1, p2)

  # Every training record read exactly once per epoch across the processes (their loaders' digests).
  states = _loader_states(two, 6)
  assert len(states) == 2 and len(_loader_states(one, 6)) == 1
  train_ids = pipeline.split_indices(40, "train", 0.2)
  digests = _epoch_digests(states)
  assert digests[0] == pipeline.records_digest(train_ids)             # epoch 0: all 32 records, once each
  assert digests[1]["records"] == 16 and sorted(digests) == [0, 1]    # 2 more steps of 8 rows in epoch 1
  assert [s["epoch_records"]["0"]["records"] for s in states] == [16, 16]
  # ... and the same records as the 1-process run in each epoch (also in the unfinished one).
  assert digests == _epoch_digests(_loader_states(one, 6))
  assert sum(s["stats"]["docs"] for s in states) == 48

  # Outputs written once, by process 0: the same files as the 1-process run (one data file per process).
  assert _files(two) == _files(one)
  assert len(os.listdir(two / metrics_lib.TB_DIR)) == 1
  keys = [(r["step"], r["split"]) for r in metrics_lib.read_metrics(two)]
  assert len(keys) == len(set(keys))
  assert "finished at step 6/6" in logs[0] and "[lkjax] finished" not in logs[1]
  assert "compiled in" in logs[0] and "compiled in" not in logs[1]


def test_four_processes_train_exactly_like_one(runs, data_dir, tmp_path):
  """4 processes x 2 devices (MEDUSA): the same per-step metrics as one process, each process reading a
  quarter of every epoch's records and together each record once."""
  one, _, _ = runs("medusa")
  res, out, logs = _launch(_train_cmd("medusa", tmp_path / "four", _overrides(data_dir)), tmp_path, "four",
                           num_processes=4)
  assert res.returncode == 0, out[-6000:]
  _assert_same_metrics(one, tmp_path / "four", rel=2e-5, abs=1e-6)
  states = _loader_states(tmp_path / "four", 6)
  assert len(states) == 4 and [s["epoch_records"]["0"]["records"] for s in states] == [8, 8, 8, 8]
  assert _epoch_digests(states) == _epoch_digests(_loader_states(one, 6))
  assert _epoch_digests(states)[0] == pipeline.records_digest(pipeline.split_indices(40, "train", 0.2))
  assert "finished at step 6/6" in logs[0] and not any("[lkjax] finished" in log for log in logs[1:])


# ----------------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_of_two_processes_needs_two_to_resume_and_loads_in_one(runs, data_dir, tmp_path):
  _, two, _ = runs("medusa")
  # Loading the parameters (evaluation / export) works in one process: `_params` above; here the data
  # positions, which are per process, refuse a resume with another process count -- naming both counts.
  copy = shutil.copytree(two, tmp_path / "copy")
  cfg = load_config("configs/medusa.py:smoke", _overrides(data_dir))
  with pytest.raises(ValueError, match="saved by 2 processes and this run has 1"):
    loop.train_and_evaluate(cfg, copy)


def test_export_and_evaluation_run_on_process_zero_only(runs, tmp_path):
  _, two, _ = runs("medusa")
  out = tmp_path / "export"
  cmd = [sys.executable, os.path.join(ROOT, "experiments", "export.py"), f"--workdir={two}", f"--out={out}"]
  res, text, logs = _launch(cmd, tmp_path, "export")
  assert res.returncode == 0, text[-4000:]
  assert "exported medusa draft (step 6" in logs[0]
  assert "export runs on process 0 only; process 1 has nothing to do" in logs[1] and "exported" not in logs[1]
  assert (out / "config.json").exists() and not os.path.exists(f"{out}.tmp")
  # evaluate.py: process 1 of a cluster leaves the evaluation (and its files) to process 0, before any work.
  env = distributed.local_process_env(1, 2, distributed.free_port(), devices_per_process=4)
  res = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "evaluate.py"), f"--workdir={two}",
                        "--limit=1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "evaluation runs on process 0 only; process 1 has nothing to do" in res.stdout
  assert not (two / "eval").exists()


# ----------------------------------------------------------------------------------------------- faults


def test_killed_process_stops_the_others_and_relaunch_resumes(runs, data_dir, tmp_path):
  """SIGKILL process 1 once a checkpoint exists: process 0 stops by itself within the heartbeat timeout;
  relaunching the same command resumes from the last checkpoint and ends like the uninterrupted run."""
  _, uninterrupted, _ = runs("medusa")
  workdir = tmp_path / "run"
  cmd = _train_cmd("medusa", workdir, _overrides(data_dir, **{"checkpoint.every": 1}))
  seen = {}

  def kill_after_first_checkpoint(procs):
    def watch():
      deadline = time.monotonic() + 400
      while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        steps = loop.checkpoint_steps(workdir)
        if steps:
          seen["steps"] = steps
          procs[1].kill()
          return
        time.sleep(0.02)
    threading.Thread(target=watch, daemon=True).start()

  res, text, logs = _launch(cmd, tmp_path, "killed", on_start=kill_after_first_checkpoint)
  assert seen and max(seen["steps"]) < 6, text[-4000:]
  p0, p1 = res.exits
  assert res.first_failure.process_id == 1 and p1.returncode == -9
  # Process 0 ended on its own (not stopped by the launcher), with jax's error, within the heartbeat timeout.
  assert not p0.stopped_by_launcher and p0.returncode != 0
  assert p0.seconds - p1.seconds < HEARTBEAT_S + 20, text[-4000:]
  # Either jax's coordination service saw process 1's heartbeats stop (process 0 blocked elsewhere), or
  # process 0's next cross-process transfer failed at once (gloo: connection reset) and lkjax ended it.
  assert ("JAX distributed service detected fatal errors" in logs[0]
          or ("Gloo" in logs[0] and "Connection reset by peer" in logs[0] and "ending it now" in logs[0])), logs[0][-3000:]
  assert "process 1 failed first" in text and "killed by SIGKILL" in text

  # Relaunch: both processes resume from the newest checkpoint (no checkpointed step is lost) ...
  last = max(loop.checkpoint_steps(workdir))
  assert last >= max(seen["steps"])
  res, text, logs = _launch(cmd, tmp_path, "resumed")
  assert res.returncode == 0, text[-4000:]
  for log in logs:
    assert f"resumed from {workdir}/checkpoints/{last} (step {last} of 6)" in log
  # ... and the steps after it read the same batches and log the same metrics as the uninterrupted run.
  _assert_same_metrics(uninterrupted, workdir, rel=1e-6, abs=1e-7)
  assert _loader_states(workdir, 6) == _loader_states(uninterrupted, 6)


def _records_of_batch(data_dir, batch):
  """Global indices of the records in the rows of an unpacked batch (matched by their tokens)."""
  (path,) = shards.shard_paths(data_dir)
  recs = shards.read_shard(path)
  out = set()
  for ids, seg in zip(batch["input_ids"], batch["segment_ids"]):
    row = ids[seg > 0]
    out |= {i for i, r in enumerate(recs) if len(r["input_ids"]) == len(row) and (r["input_ids"] == row).all()}
  return out


def test_error_in_one_process_stops_the_others(data_dir, tmp_path):
  """A corrupted record in process 1's share: process 1 stops with the ShardError naming it and exits at
  once (not in jax's shutdown barrier, where it would wait 300 s for process 0, itself waiting for process 1
  in the next collective); process 0 then stops within the heartbeat timeout."""
  from test_train_loop import _flip_a_record
  bad = shutil.copytree(data_dir, tmp_path / "bad")
  it = iter(pipeline.make_loader(bad, split="train", global_batch_size=8, max_length=16, seed=0, num_epochs=1,
                                 val_fraction=0.2, process_index=1, process_count=2))
  next(it)
  (shard,) = shards.shard_paths(bad)
  rec = _flip_a_record(shard, _records_of_batch(bad, next(it)))   # in process 1's second batch
  cmd = _train_cmd("medusa", tmp_path / "run", _overrides(bad, **{"num_steps": 3, "eval_every": 0}))
  res, text, logs = _launch(cmd, tmp_path, "error")
  p0, p1 = res.exits
  assert res.first_failure.process_id == 1 and p1.returncode == 1, text[-4000:]
  assert f"{shard.name} record {rec} is corrupted" in logs[1] and "ending it now" in logs[1]
  assert not p0.stopped_by_launcher and p0.returncode != 0
  assert p0.seconds - p1.seconds < HEARTBEAT_S + 20, text[-4000:]


def test_mismatched_configs_are_rejected_naming_the_key(data_dir, tmp_path):
  port = distributed.free_port()
  procs = []
  for pid, lr in ((0, 0.01), (1, 0.02)):
    cmd = _train_cmd("medusa", tmp_path / "run", _overrides(data_dir, **{"optim.lr": lr}))
    env = distributed.local_process_env(pid, 2, port, devices_per_process=4, heartbeat_timeout_s=HEARTBEAT_S)
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True))
  for p in procs:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 1, err[-3000:]
    assert "different configs: config.optim.lr (process 0: 0.01, process 1: 0.02)" in err, err[-3000:]
    assert "Traceback" not in err
  assert not (tmp_path / "run" / "checkpoints").exists()


# ----------------------------------------------------------------------------------------------- units


def test_cluster_variables():
  assert distributed.cluster_from_env({}) is None
  spec = distributed.cluster_from_env({"JAX_COORDINATOR_ADDRESS": "h:1234", "JAX_NUM_PROCESSES": "2",
                                       "JAX_PROCESS_ID": "1", "LKJAX_HEARTBEAT_TIMEOUT_S": "7"})
  assert (spec.num_processes, spec.process_id, spec.heartbeat_timeout_s, spec.init_timeout_s) == (2, 1, 7, 300)
  with pytest.raises(ValueError, match="JAX_PROCESS_ID not"):
    distributed.cluster_from_env({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"})
  with pytest.raises(ValueError, match="JAX_PROCESS_ID=2: must be < JAX_NUM_PROCESSES=2"):
    distributed.cluster_from_env({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"})
  with pytest.raises(ValueError, match="host:port"):
    distributed.cluster_from_env({"JAX_COORDINATOR_ADDRESS": "h", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"})
  assert distributed.process_id_from_env({"SLURM_NTASKS": "4", "SLURM_PROCID": "3"}) == 3
  assert distributed.in_cluster({"OMPI_COMM_WORLD_SIZE": "2"}) and not distributed.in_cluster({})
  env = distributed.local_process_env(1, 2, 999, devices_per_process=4,
                                      base={"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --x=1"})
  assert env["XLA_FLAGS"] == "--x=1 --xla_force_host_platform_device_count=4" and env["JAX_PROCESS_ID"] == "1"


def test_config_difference_names_keys():
  a = load_config("configs/medusa.py:smoke")
  b = load_config("configs/medusa.py:smoke", {"loss.eta": 3.0, "mesh.shape": (2, 2, 2)})
  assert distributed.config_fingerprint(a) == distributed.config_fingerprint(load_config("configs/medusa.py:smoke"))
  assert distributed.config_fingerprint(a) != distributed.config_fingerprint(b)
  flats = {0: distributed.flat_config(a), 1: distributed.flat_config(b)}
  assert distributed.differing_keys(flats) == ["loss.eta", "mesh.shape"]
  msg = str(distributed.ConfigMismatchError(["loss.eta"], flats))
  assert "config.loss.eta (process 0: 10.0, process 1: 3.0)" in msg


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_loader_digests_cover_each_epoch_once_across_processes(data_dir, packing):
  """Two process shares over two epochs: together each epoch's records, once each; the digest survives a
  state round trip."""
  kw = dict(split="train", global_batch_size=4, max_length=16, seed=3, num_epochs=2, val_fraction=0.2,
            packing=packing, process_count=2)
  iters = [iter(pipeline.make_loader(data_dir, process_index=i, **kw)) for i in range(2)]
  for it in iters:
    for _ in it:
      pass
  want = pipeline.records_digest(pipeline.split_indices(40, "train", 0.2))
  got = [it.epoch_records for it in iters]
  assert sorted(got[0]) == sorted(got[1]) == [0, 1]
  for e in (0, 1):
    assert pipeline.combine_digests([g[e] for g in got]) == want
    assert got[0][e] != got[1][e]
  # A doubled record and a missing one change the digest.
  ids = pipeline.split_indices(40, "train", 0.2)
  assert pipeline.records_digest(np.r_[ids[1:], ids[1]]) != want
  fresh = iter(pipeline.make_loader(data_dir, process_index=0, **kw))
  fresh.set_state(iters[0].get_state())
  assert fresh.epoch_records == got[0]
