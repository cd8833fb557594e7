"""MTP export with DeepSeek naming: a float64 numpy forward read from the files reproduces lkjax; exact round trip."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from lkjax.export import mtp as ex
from lkjax.export.eagle3 import export_eagle3
from lkjax.models import eagle3, mtp
from lkjax.targets.info import TargetInfo

TARGET = TargetInfo(name="tiny-target", model_type="llama", num_layers=6, hidden_size=16, vocab_size=48,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=4, intermediate_size=24,
                    rms_norm_eps=1e-5, rope_theta=300.0, max_position_embeddings=64)
IDS = np.sort(np.random.default_rng(5).choice(48, 20, replace=False)).astype(np.int32)


def _model(share=True, ids=IDS, seed=0):
  rng = np.random.default_rng(seed)
  tw = {"embed_tokens": rng.standard_normal((48, 16)).astype(np.float32),
        "lm_head": rng.standard_normal((48, 16)).astype(np.float32),
        "norm": (1 + 0.2 * rng.standard_normal(16)).astype(np.float32)}
  cfg = ml_collections.ConfigDict(dict(arch="mtp", num_heads=3, share_weights=share,
                                       draft_vocab_size=0 if ids is None else len(ids), dtype="float32"))
  m = mtp.from_config(cfg, TARGET, draft_vocab=ids, target_weights=tw, rngs=nnx.Rngs(seed))

  def draw(path, x):
    scale = 0.3 if "weight" in jax.tree_util.keystr(path) else 0.4
    base = 1.0 if "weight" in jax.tree_util.keystr(path) else 0.0
    return jnp.asarray(base + scale * rng.standard_normal(x.shape), jnp.float32)
  nnx.update(m, jax.tree_util.tree_map_with_path(draw, nnx.state(m, nnx.Param)))
  return m, tw


def _numpy_mtp(path, ids, final_hidden, positions):
  """MTP (docs/design.md#architectures) from the exported tensors, float64, one unpacked row: -> logits [K, T, Vd]."""
  c = json.loads((path / "config.json").read_text())
  w = {k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in load_file(str(path / "model.safetensors")).items()}
  N, eps, theta = c["num_hidden_layers"], c["rms_norm_eps"], c["rope_theta"]
  n, nkv, D = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
  draft_ids = np.arange(c["draft_vocab_size"]) + w["d2t"]
  rms = lambda x, g: x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g
  inv = theta ** (-np.arange(0, D, 2) / D)
  ang = positions[:, None] * inv
  cos, sin = np.cos(np.concatenate([ang, ang], -1))[:, None], np.sin(np.concatenate([ang, ang], -1))[:, None]
  rope = lambda x: x * cos + np.concatenate([-x[..., D // 2:], x[..., :D // 2]], -1) * sin
  silu = lambda x: x / (1 + np.exp(-x))
  T = len(ids)
  emb_table = w[f"model.layers.{N}.embed_tokens.weight"]
  h, out = final_hidden.astype(np.float64), []
  for k in range(c["lkjax"]["num_heads"]):
    p = f"model.layers.{N + k % c['num_nextn_predict_layers']}."
    lin = lambda x, name: x @ w[f"{p}{name}.weight"].T
    tok = np.concatenate([ids[k + 1:], np.zeros(k + 1, ids.dtype)])          # x[t+k+1]
    u = lin(np.concatenate([rms(emb_table[tok], w[p + "enorm.weight"]), rms(h, w[p + "hnorm.weight"])], -1), "eh_proj")
    a = rms(u, w[p + "input_layernorm.weight"])
    q = rope(lin(a, "self_attn.q_proj").reshape(T, n, D))
    kk = np.repeat(rope(lin(a, "self_attn.k_proj").reshape(T, nkv, D)), n // nkv, axis=1)
    vv = np.repeat(lin(a, "self_attn.v_proj").reshape(T, nkv, D), n // nkv, axis=1)
    s = np.einsum("qhd,khd->hqk", q, kk) / np.sqrt(D) + np.where(np.tri(T, dtype=bool), 0.0, -np.inf)
    pr = np.exp(s - s.max(-1, keepdims=True))
    pr /= pr.sum(-1, keepdims=True)
    hh = u + lin(np.einsum("hqk,khd->qhd", pr, vv).reshape(T, n * D), "self_attn.o_proj")
    m = rms(hh, w[p + "post_attention_layernorm.weight"])
    y = hh + lin(silu(lin(m, "mlp.gate_proj")) * lin(m, "mlp.up_proj"), "mlp.down_proj")
    h = rms(y, w[p + "shared_head.norm.weight"])                               # post-norm is recycled
    head = w[p + "shared_head.head.weight"]
    logits = h @ head.T
    out.append(logits[:, draft_ids] if head.shape[0] == c["vocab_size"] else logits)
  return np.stack(out)


def _batch(seed=0, T=9):
  rng = np.random.default_rng(seed)
  return dict(input_ids=rng.integers(0, 48, (1, T)).astype(np.int32), segment_ids=np.ones((1, T), np.int32),
              positions=np.arange(T, dtype=np.int32)[None],
              final_hidden=rng.standard_normal((1, T, 16)).astype(np.float32))


@pytest.mark.parametrize("share,ids,full_head", [(True, IDS, False), (False, None, False), (False, IDS, True)])
def test_numpy_forward_from_exported_tensors_matches_lkjax(tmp_path, share, ids, full_head):
  model, tw = _model(share, ids)
  out = ex.export_mtp(model, tmp_path / "mtp", TARGET, full_lm_head=tw["lm_head"] if full_head else None)
  b = _batch()
  ref = _numpy_mtp(out, b["input_ids"][0], b["final_hidden"][0], b["positions"][0].astype(np.float64))
  lk = np.asarray(model(b))[:, 0]
  np.testing.assert_allclose(lk, ref, atol=1e-4, rtol=1e-4)


def test_layout_and_exact_roundtrip(tmp_path):
  for share, ids in ((True, IDS), (False, None)):
    model, tw = _model(share, ids, seed=1)
    out = ex.export_mtp(model, tmp_path / f"m{share}", TARGET)
    config, t = ex.load_mtp(out)
    N = TARGET.num_layers
    assert config["num_nextn_predict_layers"] == (1 if share else 3) and config["num_hidden_layers"] == N
    assert config["draft_vocab_size"] == (20 if ids is not None else 48)
    assert t[f"model.layers.{N}.eh_proj.weight"].shape == (16, 32)
    assert t[f"model.layers.{N}.shared_head.head.weight"].shape == (config["draft_vocab_size"], 16)
    assert t[f"model.layers.{N}.self_attn.q_proj.weight"].shape == (16, 16)
    assert t[f"model.layers.{N}.self_attn.k_proj.weight"].shape == (8, 16)
    assert f"model.layers.{N + 1}.embed_tokens.weight" not in t      # one shared embedding
    assert {f"model.layers.{N}.{n}.weight" for n in ("enorm", "hnorm", "shared_head.norm", "input_layernorm",
                                                     "post_attention_layernorm", "mlp.down_proj")} <= set(t)
    back, info = ex.import_mtp(out)
    assert info == TARGET
    pa = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
    pb = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(back)))
    assert jax.tree.structure(pa) == jax.tree.structure(pb)
    jax.tree.map(np.testing.assert_array_equal, pa, pb)
    b = _batch(2)
    np.testing.assert_array_equal(np.asarray(model(b)), np.asarray(back(b)))


def test_bad_inputs(tmp_path):
  model, tw = _model()
  with pytest.raises(ValueError, match="does not match target"):
    ex.export_mtp(model, tmp_path / "a", TargetInfo(**{**TARGET.to_dict(), "hidden_size": 8}))
  with pytest.raises(ValueError, match="full_lm_head"):
    ex.export_mtp(model, tmp_path / "b", TARGET, full_lm_head=tw["lm_head"] + 1)
  e3 = eagle3.from_config(ml_collections.ConfigDict(dict(arch="eagle3", num_heads=1)), TARGET, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="not an MTP draft"):
    ex.export_mtp(e3, tmp_path / "c", TARGET)
  with pytest.raises(ValueError, match="not an lkjax MTP export"):
    ex.load_mtp(export_eagle3(e3, tmp_path / "e3", TARGET))
  out = ex.export_mtp(model, tmp_path / "ok", TARGET)
  with pytest.raises(ValueError, match="do not match target"):
    ex.import_mtp(out, TargetInfo(**{**TARGET.to_dict(), "num_layers": 8}))
  t = load_file(str(out / "model.safetensors"))
  t[f"model.layers.{TARGET.num_layers}.eh_proj.weight"] = np.zeros((16, 16), np.float32)
  save_file(t, str(out / "model.safetensors"))
  with pytest.raises(ValueError, match="eh_proj.weight"):
    ex.load_mtp(out)
