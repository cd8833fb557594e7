"""Configs: paper defaults, big_vision-style args, overrides, unknown keys, sweep grids."""
from __future__ import annotations

import importlib.util
import os

import pytest
from absl import flags
from ml_collections import config_flags

from lkjax.config_args import apply_overrides, load_config, parse_arg

from lkjax.models import registry

# The paper's K and eta per architecture, written out here so that the registry is checked against them.
ARCHS = {"eagle3": (7, 3.0), "medusa": (6, 10.0), "mlp_speculator": (6, 3.0), "mtp": (7, 3.0)}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_paper_recipe_defaults(arch):
  c = load_config(os.path.join(ROOT, f"configs/{arch}.py"))
  k, eta = ARCHS[arch]
  assert c.model.arch == arch and c.model.num_heads == k and c.loss.eta == eta
  assert registry.spec(arch).num_heads == k and c.model.to_dict() == dict(registry.spec(arch).model_defaults)
  assert (c.optim.lr, c.optim.b1, c.optim.b2, c.optim.clip, c.optim.schedule) == (4e-4, 0.9, 0.95, 0.5, "cosine")
  assert c.loss.gamma == 0.8 and c.loss.kind == "lk_hybrid"
  assert c.data.auto_prepare
  # The MLP-Speculator (170 M parameters of stage embeddings): FSDP on several devices; the others data parallel.
  assert c.mesh.shape == ((1, -1, 1) if arch == "mlp_speculator" else (-1, 1, 1))
  # perf options: auto (this backend's forms) unless a config says otherwise
  assert (c.perf.matmul, c.perf.attention_grad, c.perf.causal_block) == ("auto", "custom_vjp", -1)
  p = load_config(os.path.join(ROOT, f"configs/{arch}.py:paper"))
  assert (p.batch_size, p.num_epochs, p.optim.warmup_steps) == (64, 10, 100)
  s = load_config(os.path.join(ROOT, f"configs/{arch}.py:smoke"))
  assert s.num_steps <= 20 and s.data.max_length <= 128 and s.name == f"{arch}_smoke"
  with pytest.raises(AttributeError):  # locked: a typo cannot add a knob
    c.optim.learning_rate = 1.0


def test_parse_arg_types_and_errors():
  a = parse_arg("loss=kl,eta=10,smoke,steps=5", loss="lk_hybrid", eta=3.0, smoke=False, steps=0, name="x")
  assert (a.loss, a.eta, a.smoke, a.steps, a.name) == ("kl", 10.0, True, 5, "x")
  assert isinstance(a.eta, float) and isinstance(a.steps, int)
  assert parse_arg("smoke=false", smoke=True).smoke is False
  assert parse_arg(None, eta=3.0).eta == 3.0
  with pytest.raises(ValueError, match="unknown key 'etaa'"):
    parse_arg("etaa=1", eta=3.0)
  with pytest.raises(ValueError, match="'steps'.*not a int"):
    parse_arg("steps=1.5", steps=0)
  with pytest.raises(ValueError, match="given twice"):
    parse_arg("eta=1,eta=2", eta=3.0)
  with pytest.raises(ValueError, match="needs a value"):
    parse_arg("eta", eta=3.0)
  with pytest.raises(ValueError, match="loss='nope'"):
    load_config(os.path.join(ROOT, "configs/eagle3.py:loss=nope"))


def test_arg_string_sets_the_loss():
  c = load_config(os.path.join(ROOT, "configs/eagle3.py:loss=fixed_lambda,lam=0.25,batch=16,steps=7"))
  assert (c.loss.kind, c.loss.lam, c.batch_size, c.num_steps) == ("fixed_lambda", 0.25, 16, 7)
  c = load_config(os.path.join(ROOT, "configs/mtp.py:loss=lambda_schedule,schedule=cosine"))
  assert c.loss.schedule.shape == "cosine"


def test_dotted_overrides_and_unknown_keys():
  c = load_config(os.path.join(ROOT, "configs/medusa.py"), {"loss.eta": 1, "mesh.shape": [2, 2, 2]})
  assert c.loss.eta == 1.0 and isinstance(c.loss.eta, float) and c.mesh.shape == (2, 2, 2)
  with pytest.raises(ValueError, match="unknown key 'etta'"):
    apply_overrides(c, {"loss.etta": 1.0})
  with pytest.raises(ValueError, match="not a config section"):
    apply_overrides(c, {"nothing.eta": 1.0})
  with pytest.raises(ValueError, match="expected int"):
    apply_overrides(c, {"batch_size": "big"})


def test_command_line_overrides_via_config_flags():
  path = os.path.join(ROOT, "configs/eagle3.py")
  argv = ["prog", f"--config={path}:smoke,loss=kl", "--config.loss.eta=10", "--config.optim.grad_accum=2"]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
  fv(argv)
  assert (fv.config.loss.kind, fv.config.loss.eta, fv.config.optim.grad_accum) == ("kl", 10.0, 2)
  argv = ["prog", f"--config={path}", "--config.optim.lrr=1"]
  fv2 = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv2, lock_config=True, sys_argv=argv)
  with pytest.raises(Exception, match="lrr"):
    fv2(argv)


def _sweep_module():
  import sys
  if "lkjax_sweep" in sys.modules:  # its absl flags may be defined only once
    return sys.modules["lkjax_sweep"]
  spec = importlib.util.spec_from_file_location("lkjax_sweep", os.path.join(ROOT, "experiments/sweep.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  sys.modules["lkjax_sweep"] = module
  return module


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_sweep_grid(arch):
  sweep = _sweep_module()
  path = os.path.join(ROOT, f"configs/{arch}.py")
  runs = sweep.grid(path)
  kinds = [r["loss.kind"] for r in runs]
  assert {"kl", "tv", "lk_alpha", "lk_hybrid", "fixed_lambda", "lambda_schedule"} == set(kinds)
  assert sorted(r["loss.eta"] for r in runs if r["loss.kind"] == "lk_hybrid") == [0.7, 1.0, 3.0, 10.0]
  assert [r["loss.lam"] for r in runs if r["loss.kind"] == "fixed_lambda"] == [0.5]
  assert sorted(r["loss.schedule.shape"] for r in runs if r["loss.kind"] == "lambda_schedule") == ["cosine", "linear"]
  names = [sweep.run_name(r) for r in runs]
  assert len(set(names)) == len(names) == 10
  for r in runs:  # every run of the grid is a valid config
    c = load_config(path, r)
    assert all(c[k.split(".")[0]] is not None for k in r)
  assert sweep.parse_set(["num_steps=20", "loss.kind=kl"]) == {"num_steps": 20, "loss.kind": "kl"}


def test_sweep_table(tmp_path):
  import json
  sweep = _sweep_module()
  for name, tau in (("a", 1.5), ("b", 2.0)):
    (tmp_path / name).mkdir()
    (tmp_path / name / "summary.json").write_text(json.dumps(
        {"status": "finished", "step": 3, "val": {"loss": 0.5, "tau": tau, "alpha/0": 0.4, "alpha/1": 0.2}}))
  rows = [sweep.summary_row(n, str(tmp_path / n)) for n in ("a", "b")]
  _, md = sweep.write_table(rows, str(tmp_path))
  lines = open(md).read().splitlines()
  assert lines[2].startswith("| b | finished | 3 | val | 0.5000 | 2.0000 | 0.400 0.200 |")
  assert lines[3].startswith("| a |")
