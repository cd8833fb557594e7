"""Entry scripts fail fast on bad input: one paragraph naming the argument and the fix, before any work."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lkjax import cli
from lkjax.config_args import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(script, *args, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", script), *args],
                        capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


def _short_error(res, *needles):
  """Exit status 1, one 'lkjax: error:' paragraph on stderr that holds every needle, no traceback."""
  assert res.returncode == 1, (res.returncode, res.stderr[-2000:])
  assert "Traceback" not in res.stderr and "\\n" not in res.stderr, res.stderr[-2000:]
  assert res.stderr.startswith("lkjax: error: "), res.stderr[-2000:]
  assert len(res.stderr.strip().splitlines()) <= 3, res.stderr
  for n in needles:
    assert n in res.stderr, (n, res.stderr)


def test_unknown_config_key_lists_close_matches():
  res = _run("train.py", "--config=configs/eagle3.py", "--config.optim.lrr=1e-3")
  _short_error(res, "--config.optim.lrr=1e-3", "config.optim has no key 'lrr'", "Did you mean: lr?")


def test_missing_config_file_lists_the_available_ones():
  res = _run("train.py", "--config=configs/eagle4.py")
  _short_error(res, "configs/eagle4.py does not exist", "configs/eagle3.py", "configs/medusa.py",
               "configs/mlp_speculator.py", "configs/mtp.py")


def test_bad_config_arg_and_value_type():
  _short_error(_run("train.py", "--config=configs/eagle3.py:smok"), "unknown key 'smok'", "Did you mean: smoke?")
  _short_error(_run("train.py", "--config=configs/eagle3.py", "--config.batch_size=abc"),
               "config.batch_size is an int", "'abc' is not")
  _short_error(_run("train.py", "--config=configs/eagle3.py", "--config.optim.lr=-1"), "--config.optim.lr", "> 0")


def test_workdir_that_is_a_file_fails_before_data_preparation(tmp_path):
  afile = tmp_path / "afile"
  afile.write_text("x")
  nodata = tmp_path / "nodata"   # auto_prepare is on: reaching data preparation would create it
  res = _run("train.py", "--config=configs/eagle3.py", f"--workdir={afile}", f"--config.data.dir={nodata}")
  _short_error(res, f"--workdir={afile} is an existing file")
  assert not nodata.exists()


def test_verbosity_shows_the_traceback(tmp_path):
  afile = tmp_path / "afile"
  afile.write_text("x")
  res = _run("train.py", "--config=configs/eagle3.py", f"--workdir={afile}", "--verbosity=1")
  assert res.returncode != 0 and "Traceback" in res.stderr and "NotADirectoryError" in res.stderr


def _fake_run(workdir, steps=(3, 6), config=True):
  for s in steps:
    (workdir / "checkpoints" / str(s)).mkdir(parents=True)
  if config:
    (workdir / "config.json").write_text(json.dumps({"name": "x"}))
  return workdir


def test_evaluate_missing_checkpoint_step_lists_the_existing_ones(tmp_path):
  run = _fake_run(tmp_path / "run")
  res = _run("evaluate.py", f"--checkpoint={run / 'checkpoints' / '57'}")
  _short_error(res, "no checkpoint of step 57", "the existing steps are [3, 6]",
               f"--checkpoint={run / 'checkpoints' / '6'}", f"--workdir={run}")


def test_evaluate_workdir_errors_name_the_flags(tmp_path):
  _short_error(_run("evaluate.py", "--workdir=runs/nonexistent"), "--workdir=runs/nonexistent: no such directory")
  empty = tmp_path / "empty"
  empty.mkdir()
  _short_error(_run("evaluate.py", f"--workdir={empty}"), "holds no checkpoint yet")
  noconfig = _fake_run(tmp_path / "noconfig", config=False)
  res = _run("evaluate.py", f"--workdir={noconfig}")
  _short_error(res, "has no config.json", "as the --config flag", "--config=configs/eagle3.py")
  assert "config=" not in res.stderr.replace("--config=", "")


def test_evaluate_target_and_benchmark_flags(tmp_path):
  run = _fake_run(tmp_path / "run")
  _short_error(_run("evaluate.py", f"--workdir={run}", "--target=smollm3"), "--target=smollm3", "smollm2")
  res = _run("evaluate.py", f"--workdir={run}", "--benchmarks=mtbench")
  assert res.returncode == 1 and "unknown ['mtbench']" in res.stderr and "--helpshort" in res.stderr
  assert "flags:" not in res.stderr   # not absl's full usage text


def test_data_scripts_check_their_paths(tmp_path):
  _short_error(_run("precompute.py", f"--replies={tmp_path / 'none.jsonl'}", f"--out_dir={tmp_path / 'o'}"),
               "--replies=", "no such file")
  (tmp_path / "r.jsonl").write_text("")
  (tmp_path / "f").write_text("")
  _short_error(_run("precompute.py", f"--replies={tmp_path / 'r.jsonl'}", f"--out_dir={tmp_path / 'f'}"),
               "--out_dir=", "is an existing file")
  _short_error(_run("generate_data.py", f"--out={tmp_path}"), "--out=", "is a directory")
  _short_error(_run("generate_data.py", f"--out={tmp_path / 'x.jsonl'}", "--target=/nowhere"), "--target=/nowhere")


def test_sweep_checks_its_overrides():
  _short_error(_run("sweep.py", "--config=configs/eagle3.py:smoke", "--set", "optim.lrr=1", "--dry_run"),
               "config.optim has no key 'lrr'", "Did you mean: lr?")


def test_check_override_unit():
  config = load_config("configs/eagle3.py")
  cli.check_override(config, "optim.lr", "1e-3", flag="f")
  with pytest.raises(cli.InputError, match="config.optim has no key 'lrr'. Did you mean: lr?"):
    cli.check_override(config, "optim.lrr", "1", flag="f")
  with pytest.raises(cli.InputError, match="config has no key 'optm'. Did you mean: optim?"):
    cli.check_override(config, "optm.lr", "1", flag="f")
  with pytest.raises(cli.InputError, match="is a bool"):
    cli.check_override(config, "data.packing", "maybe", flag="f")
  assert cli.verbosity(["x", "--verbosity=1"]) == 1 and cli.verbosity(["x", "-v", "2"]) == 2
  assert cli.verbosity(["x"]) is None


def test_exactly_one_names_every_flag():
  from absl import app
  assert cli.exactly_one(workdir="", checkpoint="runs/x/checkpoints/3", init=None) == "checkpoint"
  with pytest.raises(app.UsageError, match="exactly one of --workdir, --checkpoint and --init$"):
    cli.exactly_one(workdir="", checkpoint=None, init=None)
  with pytest.raises(app.UsageError, match=r"\(got --workdir, --init\)"):
    cli.exactly_one(workdir="runs/x", checkpoint=None, init="medusa")
