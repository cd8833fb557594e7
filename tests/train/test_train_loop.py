"""The training loop on a tiny synthetic shard directory: kill-and-resume, non-finite loss, bad input, reload."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lkjax import files
from lkjax.config_args import load_config
from lkjax.data import shards
from lkjax.data.synthetic import write_synthetic_shards
from lkjax.train import loop, metrics as metrics_lib


def make_data(directory) -> None:
  """40 records, V = 64, H = 16, an 8-layer target; final hidden states carry the next token (learnable)."""
  write_synthetic_shards(directory, num_records=40, vocab_size=64, hidden_size=16, num_layers=8,
                         min_len=10, max_len=16, seed=0)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("shards")
  make_data(d)
  return d


def tiny_config(data_dir, config="configs/medusa.py", **overrides):
  base = {"data.dir": str(data_dir), "data.max_length": 16, "data.val_fraction": 0.2,
          "data.auto_prepare": False, "batch_size": 8, "num_steps": 6, "model.num_heads": 2,
          "model.draft_vocab_size": 32, "eval_every": 3, "eval_steps": 1, "log_every": 1,
          "checkpoint.every": 3, "checkpoint.keep": 5, "mesh.shape": (2, 2, 2), "precision": "fp32",
          "optim.warmup_steps": 2, "optim.lr": 1e-2}
  base.update(overrides)
  return load_config(f"{config}:smoke", base)


def _records(workdir, split):
  return {r["step"]: r for r in metrics_lib.read_metrics(workdir, split)}


def _assert_same_metrics(workdir_a, workdir_b, rel=1e-4, abs=1e-6):
  """Two runs logged the same steps with the same metrics (timings aside), train and val."""
  for split in ("train", "val"):
    a, b = _records(workdir_a, split), _records(workdir_b, split)
    assert sorted(a) == sorted(b)
    for st in a:
      for key in a[st]:
        if key not in ("tokens_per_s", "step_time_s", "split"):
          assert b[st][key] == pytest.approx(a[st][key], rel=rel, abs=abs), (split, st, key)


@pytest.mark.parametrize("mesh", [dict(), {"mesh.shape": (1, 8, 1)}], ids=["2x2x2", "fsdp"])
def test_kill_and_resume_reproduces_uninterrupted_run(data_dir, tmp_path, mesh):
  cfg = tiny_config(data_dir, **mesh)
  full = loop.train_and_evaluate(cfg, tmp_path / "full")
  assert full["status"] == "finished" and full["step"] == 6
  part = loop.train_and_evaluate(cfg, tmp_path / "part", stop_after=3)
  assert part["step"] == 3 and "stopped" in part["status"]
  resumed = loop.train_and_evaluate(cfg, tmp_path / "part")
  assert resumed["step"] == 6
  _assert_same_metrics(tmp_path / "full", tmp_path / "part", rel=1e-6, abs=1e-7)
  assert max(_records(tmp_path / "full", "train")) == max(_records(tmp_path / "full", "val")) == 6
  rec = _records(tmp_path / "full", "train")[6]
  assert {"alpha/0", "alpha/1", "lambda/1", "kl/0", "tv/1", "loss", "tau", "lr", "tokens_per_s"} <= set(rec)
  # tau is the offline acceptance length of the logged per-head alphas.
  alphas = list(metrics_lib.iter_heads(rec, "alpha"))
  assert rec["tau"] == pytest.approx(1 + alphas[0] + alphas[0] * alphas[1], rel=1e-5)
  # Learning happened: the training loss went down from step 1.
  train = _records(tmp_path / "full", "train")
  assert train[6]["loss"] < train[1]["loss"]
  summary = json.loads((tmp_path / "full" / loop.SUMMARY_FILE).read_text())
  assert summary["checkpoint"].endswith(os.path.join("checkpoints", "6"))
  assert summary["commit"] == files.git_commit()   # the lkjax commit that trained it
  assert os.listdir(tmp_path / "full" / "tensorboard")

  # Reload for evaluation/export: restored params equal the checkpoint's and the model runs.
  trained = loop.load_trained_draft(tmp_path / "full")
  assert trained.step == 6 and trained.draft_vocab.token_ids.shape == (32,)
  again = loop.load_trained_draft(tmp_path / "part" / "checkpoints" / "6")
  p1 = nnx.to_pure_dict(nnx.state(trained.model, nnx.Param))
  p2 = nnx.to_pure_dict(nnx.state(again.model, nnx.Param))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6), p1, p2)
  # The same parameters computing in another dtype (float32 is how lkjax drafts like vLLM's float32 engine).
  assert trained.model.dtype == jnp.float32                 # this run trained with precision fp32
  bf = loop.load_trained_draft(tmp_path / "full", compute_dtype="bfloat16")
  assert bf.config.model.dtype == "bfloat16" and bf.model.dtype == jnp.bfloat16
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               nnx.to_pure_dict(nnx.state(bf.model, nnx.Param)), p1)
  with pytest.raises(ValueError, match="compute_dtype='fp16'"):
    loop.load_trained_draft(tmp_path / "full", compute_dtype="fp16")
  fresh = loop.build_setup(cfg, shards.read_manifest(data_dir)).model
  p0 = nnx.to_pure_dict(nnx.state(fresh, nnx.Param))
  assert any(np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4
             for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)))


def test_shards_with_target_lse_train_like_shards_without(data_dir, tmp_path):
  """The same records plus precomputed target_lse (draft-vocabulary head only in the step) give the same run."""
  lse_dir = tmp_path / "lse_shards"
  write_synthetic_shards(lse_dir, num_records=40, vocab_size=64, hidden_size=16, num_layers=8,
                         min_len=10, max_len=16, seed=0, target_lse=True)
  assert shards.read_manifest(lse_dir)["target_lse"]
  over = {"num_steps": 3, "checkpoint.every": 3}
  ref = loop.train_and_evaluate(tiny_config(data_dir, **over), tmp_path / "ref")
  got = loop.train_and_evaluate(tiny_config(lse_dir, **over), tmp_path / "lse")
  assert ref["step"] == got["step"] == 3
  assert got["target_lse"] and not ref["target_lse"]   # the second run took the draft-vocabulary-only path
  _assert_same_metrics(tmp_path / "ref", tmp_path / "lse")


def test_mlp_speculator_config_layout_trains_like_one_device(data_dir, tmp_path):
  """The MLP-Speculator's own multi-device layout (FSDP) on the 8 test devices gives the run of one device."""
  cfg = "configs/mlp_speculator.py"
  layout = load_config(f"{cfg}:smoke").mesh
  assert tuple(layout.shape) == (1, -1, 1)
  over = {"num_steps": 3, "checkpoint.every": 3, "model.draft_vocab_size": 0}
  ref = loop.train_and_evaluate(tiny_config(data_dir, cfg, **over, **{"mesh.shape": (1, 1, 1)}), tmp_path / "one")
  got = loop.train_and_evaluate(tiny_config(data_dir, cfg, **over, **{"mesh.shape": tuple(layout.shape)}),
                                tmp_path / "mesh")
  assert ref["step"] == got["step"] == 3
  _assert_same_metrics(tmp_path / "one", tmp_path / "mesh")


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path):
  # An absurd learning rate: step 1 is finite, its update overflows the parameters, step 2's loss is not.
  cfg = tiny_config(data_dir, **{"optim.lr": 1e38, "optim.clip": 0.0, "optim.warmup_steps": 0,
                                 "optim.schedule": "constant", "checkpoint.every": 1, "eval_every": 0})
  with pytest.raises(loop.NonFiniteLossError, match=r"non-finite loss at step 2.*checkpoint \(step 1\)") as e:
    loop.train_and_evaluate(cfg, tmp_path)
  assert e.value.step == 2 and e.value.checkpoint_step == 1
  assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()) == [1]
  assert _records(tmp_path, "train")[2]["loss"] in ("nan", "inf", "-inf")


def test_missing_data_prints_the_prepare_command(tmp_path):
  cfg = tiny_config(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="ensure_default_dataset") as e:
    loop.train_and_evaluate(cfg, tmp_path / "run")
  assert str(tmp_path / "nowhere") in str(e.value) and "auto_prepare" in str(e.value)


def test_config_vs_manifest_mismatch_fails_before_compiling(data_dir, tmp_path):
  with pytest.raises(ValueError, match="draft_vocab_size=100"):
    loop.train_and_evaluate(tiny_config(data_dir, **{"model.draft_vocab_size": 100}), tmp_path)
  with pytest.raises(ValueError, match="hidden_size"):
    cfg = load_config("configs/eagle3.py:smoke", {"data.dir": str(data_dir), "model.hidden_size": 24,
                                                  "model.init_lm_head_from_target": True,
                                                  "model.draft_vocab_size": 32,
                                                  "data.auto_prepare": False})
    loop.train_and_evaluate(cfg, tmp_path)
  assert not (tmp_path / "checkpoints").exists()


# ----------------------------------------------------------------------------------------------- corruption


def _flip_a_record(path, wanted) -> int:
  """Flip one byte inside the data of a record whose index is in ``wanted``; returns that record's index."""
  from array_record.python.array_record_module import ArrayRecordReader
  original = path.read_bytes()
  n = ArrayRecordReader(str(path)).num_records()
  for pos in range(100, len(original), 97):
    b = bytearray(original)
    b[pos] ^= 0xFF
    path.write_bytes(bytes(b))
    bad = []
    for i in range(n):
      reader = ArrayRecordReader(str(path))
      try:
        reader.read([i])
      except Exception:
        bad.append(i)
      finally:
        try:
          reader.close()
        except Exception:
          pass
    if len(bad) == 1 and bad[0] in wanted:
      return bad[0]
  raise AssertionError("no byte position corrupts exactly one wanted record")


def _split(split, n=40, val_fraction=0.2):
  from lkjax.data.pipeline import split_indices
  return set(int(i) for i in split_indices(n, split, val_fraction))


def test_corrupted_record_stops_training_and_evaluation_naming_file_and_record(data_dir, tmp_path):
  from lkjax.eval import run as eval_run
  (shard,) = shards.shard_paths(data_dir)
  good = loop.train_and_evaluate(tiny_config(data_dir, **{"num_steps": 2, "eval_every": 0}), tmp_path / "good")
  trained = loop.load_trained_draft(good["workdir"])

  # Training: a train-split record is flipped; checkpoints up to the step before it stay, nothing after.
  bad_train = shutil.copytree(data_dir, tmp_path / "bad_train")
  rec = _flip_a_record(bad_train / shard.name, _split("train"))
  cfg = tiny_config(bad_train, **{"num_steps": 20, "eval_every": 0, "checkpoint.every": 1})
  with pytest.raises(shards.ShardError, match=rf"{shard.name} record {rec} is corrupted.*re-run the precompute"):
    loop.train_and_evaluate(cfg, tmp_path / "run")
  steps = loop.checkpoint_steps(tmp_path / "run")
  assert steps == sorted(steps) and len(steps) <= 5 and max(steps, default=0) < 20
  assert not (tmp_path / "run" / loop.SUMMARY_FILE).exists()

  # Evaluation (offline tau reads the validation split): a val-split record is flipped.
  bad_val = shutil.copytree(data_dir, tmp_path / "bad_val")
  rec = _flip_a_record(bad_val / shard.name, _split("val"))
  with pytest.raises(shards.ShardError, match=rf"{shard.name} record {rec} is corrupted"):
    eval_run.offline_estimate(trained.model, trained.config, bad_val)

  # A truncated shard is refused when the trainer or the evaluation opens it, before any step.
  cut = shutil.copytree(data_dir, tmp_path / "cut")
  (cut / shard.name).write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
  with pytest.raises(shards.ShardError, match=rf"{shard.name}.*re-run precompute"):
    loop.train_and_evaluate(tiny_config(cut), tmp_path / "cut_run")
  assert not loop.checkpoint_steps(tmp_path / "cut_run")
  with pytest.raises(shards.ShardError, match=rf"{shard.name}.*re-run precompute"):
    eval_run.offline_estimate(trained.model, trained.config, cut)


# ----------------------------------------------------------------------------------------------- signals


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _train_cmd(data_dir, workdir, num_steps):
  flags = {"data.dir": data_dir, "data.max_length": 16, "data.val_fraction": 0.2, "data.auto_prepare": False,
           "batch_size": 8, "num_steps": num_steps, "model.num_heads": 2, "model.draft_vocab_size": 32,
           "eval_every": 0, "log_every": 1, "checkpoint.every": 1000, "checkpoint.every_minutes": 0.0,
           "precision": "fp32", "optim.warmup_steps": 2, "mesh.shape": "(1,1,1)"}
  return [sys.executable, os.path.join(ROOT, "experiments", "train.py"), "--config=configs/medusa.py:smoke",
          f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in flags.items())]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_a_checkpoint_exits_cleanly_and_resumes(data_dir, tmp_path, sig):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  workdir = tmp_path / "run"
  proc = subprocess.Popen(_train_cmd(data_dir, workdir, 100000), cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  metrics = workdir / metrics_lib.METRICS_FILE
  deadline = time.monotonic() + 240
  while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
    assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
    time.sleep(0.2)
  proc.send_signal(sig)
  out, err = proc.communicate(timeout=240)
  assert proc.returncode == 128 + sig, err[-3000:]
  assert "Traceback" not in err and f"{sig.name} received" in err
  summary = json.loads((workdir / loop.SUMMARY_FILE).read_text())
  assert summary["status"].startswith(f"stopped by {sig.name}") and summary["signal"] == sig.name
  stopped = summary["step"]
  assert 2 <= stopped < 100000 and loop.checkpoint_steps(workdir) == [stopped]
  assert "rerun the same command to resume" in out

  # The same command resumes from that checkpoint (here with a reachable end).
  res = subprocess.run(_train_cmd(data_dir, workdir, stopped + 2), cwd=ROOT, env=env, text=True,
                       capture_output=True, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "resumed from" in res.stdout and f"finished at step {stopped + 2}/" in res.stdout
  # A run that explains itself: no third-party INFO lines; the summary names the outputs and what to run next.
  assert "Unable to initialize backend" not in res.stderr and "checkpoint_manager.py" not in res.stderr
  assert f"checkpoint  {workdir}/checkpoints/{stopped + 2}" in res.stdout
  assert f"python experiments/evaluate.py --workdir={workdir}" in res.stdout
  assert f"python experiments/export.py --workdir={workdir} --out=exports/medusa_smoke" in res.stdout
