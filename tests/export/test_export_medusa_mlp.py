"""MEDUSA / MLP-Speculator exports: an independent PyTorch reading of the vLLM forward reproduces lkjax."""
from __future__ import annotations

import json
import math

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from safetensors.numpy import save_file
from safetensors.torch import load_file as torch_load_file

from lkjax.export.medusa import export_medusa, load_medusa
from lkjax.export.mlp_speculator import export_mlp_speculator, load_mlp_speculator
from lkjax.models import medusa, mlp_speculator
from lkjax.targets.info import TargetInfo

TINY = TargetInfo(name="tiny", model_type="llama", num_layers=4, hidden_size=8, vocab_size=32,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=4, intermediate_size=16,
                  rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=64)
OTHER = TargetInfo(name="other", model_type="llama", num_layers=4, hidden_size=16, vocab_size=32,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=8, intermediate_size=16,
                   rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=64)


def _randomize(model, names, seed):
  rng = np.random.default_rng(seed)
  for name in names:
    var = getattr(model, name)
    if var is not None:
      var[...] = jnp.asarray(rng.normal(0, 0.5, var.shape), jnp.float32)


def _medusa(fc_bias=True, ids=None, layers=2, seed=0):
  cfg = ml_collections.ConfigDict(dict(arch="medusa", num_heads=3, num_layers=layers, fc_bias=fc_bias,
                                       draft_vocab_size=0, dtype="float32"))
  m = medusa.from_config(cfg, TINY, draft_vocab=ids, rngs=nnx.Rngs(seed))
  _randomize(m, ("w", "b", "lm_head"), seed)
  return m


def _mlp(tie=False, scale=False, inner=6, ids=None, seed=0):
  cfg = ml_collections.ConfigDict(dict(arch="mlp_speculator", num_heads=3, inner_dim=inner, tie_weights=tie,
                                       scale_input=scale, dtype="float32"))
  m = mlp_speculator.from_config(cfg, TINY, draft_vocab=ids, rngs=nnx.Rngs(seed))
  _randomize(m, ("emb", "proj0", "proj", "head", "ln_w", "ln_b"), seed)
  return m


def _vllm_medusa_logits(path, h):
  """vLLM 0.32 Medusa.forward + compute_logits, read straight from the files: [K, ..., V] with -inf off token_map."""
  cfg = json.loads((path / "config.json").read_text())
  sd = torch_load_file(str(path / "model.safetensors"))
  h = torch.from_numpy(h)
  out = []
  for k in range(cfg["num_heads"]):
    x = h
    for l in range(cfg["num_hidden_layers"]):
      bias = sd[f"blocks.{k}.layers.{l}.bias"] if cfg.get("medusa_fc_bias", False) else None
      x = x + F.silu(F.linear(x, sd[f"blocks.{k}.layers.{l}.weight"], bias))
    logits = F.linear(x, sd[f"lm_heads.{k}.weight"])
    if "token_map" in sd and cfg.get("truncated_vocab_size", cfg["vocab_size"]) < cfg["vocab_size"]:
      logits = logits[..., :cfg["truncated_vocab_size"]]  # vLLM 0.32's LogitsProcessor(V, truncated_vocab_size)
      full = torch.full((*logits.shape[:-1], cfg["vocab_size"]), -torch.inf)
      full[..., sd["token_map"]] = logits
      logits = full
    out.append(logits)
  return torch.stack(out).numpy()


def _vllm_mlp_logits(path, h, tokens):
  """vLLM MLPSpeculator.generate_proposals arithmetic, teacher-forced: stage i at t reads tokens[:, t+1+i]."""
  cfg = json.loads((path / "config.json").read_text())
  sd = {k.removeprefix("speculator."): v for k, v in torch_load_file(str(path / "model.safetensors")).items()}
  n, D = cfg["n_predict"], cfg["inner_dim"] or cfg["emb_dim"]
  state_weight = 0.5 ** (0.5 / n)
  emb_weight = math.sqrt((1 - state_weight ** 2) * (D / 2))

  def ln(x, w=None, b=None):
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    return x if w is None else w * x + b
  state = torch.from_numpy(h)
  if cfg["scale_input"]:
    state = ln(state) / 2 ** 0.5
  T = h.shape[1]
  inds = torch.from_numpy(np.concatenate([tokens, np.zeros((tokens.shape[0], n + 1), tokens.dtype)], 1))
  out = []
  for i in range(n):
    z = F.embedding(inds[:, 1 + i:1 + i + T], sd[f"emb.{i}.weight"])
    s = F.linear(state, sd[f"proj.{i}.weight"])
    s = s + z * (emb_weight / state_weight)
    state = torch.nn.GELU()(ln(s, sd[f"ln.{i}.weight"], sd[f"ln.{i}.bias"]))
    out.append(F.linear(state, sd[f"head.{i}.weight"]))
  return torch.stack(out).numpy()


@pytest.mark.parametrize("fc_bias,truncate", [(True, True), (False, False)])
def test_medusa_export_matches_vllm_reading(tmp_path, fc_bias, truncate):
  ids = np.array([0, 2, 3, 7, 11, 12, 19, 23, 30]) if truncate else None
  model = _medusa(fc_bias=fc_bias, ids=ids)
  out = export_medusa(model, tmp_path / "medusa", TINY)
  cfg = json.loads((out / "config.json").read_text())
  assert cfg["architectures"] == ["MedusaModel"] and cfg["model_type"] == "medusa"
  assert (cfg["hidden_size"], cfg["vocab_size"], cfg["num_heads"], cfg["num_hidden_layers"]) == (8, 32, 3, 2)
  assert cfg["medusa_fc_bias"] is fc_bias
  assert cfg.get("truncated_vocab_size") == (9 if truncate else None)
  h = np.random.default_rng(1).normal(size=(2, 5, 8)).astype(np.float32)
  ours = np.asarray(model({"final_hidden": jnp.asarray(h)}))
  ref = _vllm_medusa_logits(out, h)
  assert ref.shape == (3, 2, 5, 32)
  cols = ids if truncate else np.arange(32)
  np.testing.assert_allclose(ref[..., cols], ours, rtol=1e-4, atol=1e-4)
  if truncate:
    assert np.all(np.isneginf(np.delete(ref, cols, axis=-1)))
  config, tensors = load_medusa(out)
  assert config == cfg
  np.testing.assert_array_equal(tensors["blocks.1.layers.0.weight"], np.asarray(model.w[...][1, 0]).T)
  if truncate:
    assert tensors["token_map"].dtype == np.int64
    np.testing.assert_array_equal(tensors["token_map"], ids)
  else:
    assert "token_map" not in tensors and "blocks.0.layers.0.bias" not in tensors
  assert [p.name for p in tmp_path.iterdir()] == ["medusa"]       # no temp dirs left behind


@pytest.mark.parametrize("tie,scale,inner", [(False, False, 6), (True, True, 10)])
def test_mlp_speculator_export_matches_vllm_reading(tmp_path, tie, scale, inner):
  model = _mlp(tie=tie, scale=scale, inner=inner, seed=2)
  out = export_mlp_speculator(model, tmp_path / "mlp", TINY)
  cfg = json.loads((out / "config.json").read_text())
  assert cfg["architectures"] == ["MLPSpeculatorPreTrainedModel"] and cfg["model_type"] == "mlp_speculator"
  assert (cfg["emb_dim"], cfg["inner_dim"], cfg["n_predict"], cfg["vocab_size"]) == (8, inner, 3, 32)
  assert (cfg["tie_weights"], cfg["scale_input"]) == (tie, scale)
  assert len(cfg["top_k_tokens_per_head"]) == 3
  rng = np.random.default_rng(2)
  h = rng.normal(size=(2, 6, 8)).astype(np.float32) * 2
  x = rng.integers(0, 32, size=(2, 6))
  ours = np.asarray(model({"final_hidden": jnp.asarray(h), "input_ids": jnp.asarray(x, jnp.int32)}))
  ref = _vllm_mlp_logits(out, h, x)
  np.testing.assert_allclose(ref, ours, rtol=1e-4, atol=1e-4)
  config, tensors = load_mlp_speculator(out)
  assert config == cfg
  assert tensors["proj.0.weight"].shape == (inner, 8) and tensors["proj.1.weight"].shape == (inner, inner)
  if tie:
    np.testing.assert_array_equal(tensors["emb.0.weight"], tensors["emb.2.weight"])
    np.testing.assert_array_equal(tensors["proj.1.weight"], tensors["proj.2.weight"])
  # fms-extras' HF class keeps its weights under "speculator."; vLLM and load_mlp_speculator strip it
  out2 = export_mlp_speculator(model, tmp_path / "mlp_prefixed", TINY, prefix="speculator.")
  np.testing.assert_allclose(_vllm_mlp_logits(out2, h, x), ref, rtol=0, atol=0)
  _, tensors2 = load_mlp_speculator(out2)
  assert set(tensors2) == set(tensors)


def test_export_errors(tmp_path):
  med, mlp = _medusa(), _mlp()
  with pytest.raises(ValueError, match="not a MEDUSA"):
    export_medusa(mlp, tmp_path / "a", TINY)
  with pytest.raises(ValueError, match="not an MLP-Speculator"):
    export_mlp_speculator(med, tmp_path / "a", TINY)
  with pytest.raises(ValueError, match="does not match target"):
    export_medusa(med, tmp_path / "a", OTHER)
  with pytest.raises(ValueError, match="does not match target"):
    export_mlp_speculator(mlp, tmp_path / "a", OTHER)
  with pytest.raises(ValueError, match="token map"):
    export_mlp_speculator(_mlp(ids=np.arange(0, 32, 2)), tmp_path / "a", TINY)
  assert not (tmp_path / "a").exists()

  out = export_medusa(med, tmp_path / "m", TINY)
  with pytest.raises(ValueError, match="already exists"):
    export_medusa(med, out, TINY)
  med2 = _medusa(seed=5)
  export_medusa(med2, out, TINY, overwrite=True)
  np.testing.assert_array_equal(load_medusa(out)[1]["lm_heads.0.weight"], np.asarray(med2.lm_head[...][0]).T)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]

  with pytest.raises(ValueError, match="model_type"):
    load_mlp_speculator(out)
  with pytest.raises(ValueError, match="missing"):
    load_medusa(tmp_path / "nowhere")
  # a file with a tensor missing / of the wrong shape names the tensor
  _, tensors = load_medusa(out)
  del tensors["lm_heads.2.weight"]
  save_file(tensors, str(out / "model.safetensors"))
  with pytest.raises(ValueError, match="lm_heads.2.weight"):
    load_medusa(out)
  tensors["lm_heads.2.weight"] = np.zeros((5, 8), np.float32)
  save_file(tensors, str(out / "model.safetensors"))
  with pytest.raises(ValueError, match="shape"):
    load_medusa(out)
