"""EAGLE-3 export/import: an independent PyTorch reading of vLLM's ``llama_eagle3`` reproduces lkjax.

The oracle below is written from vLLM's ``llama_eagle3.py`` / ``eagle.py`` (not from lkjax): the first
decoder layer normalises the embedding (input_layernorm) and the hidden state (hidden_norm), concatenates
them embedding first (2H wide) into q/k/v, keeps the UN-normalised hidden state as the residual, uses
neox-style RoPE and causal attention over the KV cache; logits = lm_head(norm(y)) scattered into a V-wide
row of -inf at ``arange(Vd) + d2t``; drafting recycles the pre-norm output ``y`` of the last position,
with the drafted token, one position further, attending to every cached key (step-0 keys of the prompt
and the keys of earlier speculative steps).
"""
from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from safetensors.torch import load_file as torch_load_file

from lkjax.export import eagle3 as ex
from lkjax.export.medusa import export_medusa
from lkjax.models import eagle3, medusa
from lkjax.targets.info import TargetInfo

TARGET = TargetInfo(name="tiny-target", model_type="llama", num_layers=8, hidden_size=16, vocab_size=64,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=4, intermediate_size=24,
                    rms_norm_eps=1e-5, rope_theta=500.0, max_position_embeddings=128, tie_word_embeddings=True)
DRAFT_IDS = np.sort(np.random.default_rng(3).choice(64, 24, replace=False)).astype(np.int32)


def _randomize(model, seed):
  """Random values for every parameter (norm weights near 1), so a swapped tensor cannot go unnoticed."""
  rng = np.random.default_rng(seed)
  params = nnx.state(model, nnx.Param)

  def draw(path, x):
    if "weight" in jax.tree_util.keystr(path):   # RMSNorm
      return jnp.asarray(1 + 0.3 * rng.standard_normal(x.shape), jnp.float32)
    return jnp.asarray(0.4 * rng.standard_normal(x.shape), jnp.float32)
  nnx.update(model, jax.tree_util.tree_map_with_path(draw, params))
  return model


def _model(hidden=16, heads=4, kv=2, head_dim=4, ids=DRAFT_IDS, layers=1, seed=0):
  cfg = ml_collections.ConfigDict(dict(arch="eagle3", num_heads=3, draft_vocab_size=0 if ids is None else len(ids),
                                       hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv,
                                       head_dim=head_dim, intermediate_size=20, num_layers=layers,
                                       rms_norm_eps=1e-5, rope_theta=0, dtype="float32"))
  emb = np.random.default_rng(seed + 100).standard_normal((TARGET.vocab_size, TARGET.hidden_size)).astype(np.float32)
  m = eagle3.from_config(cfg, TARGET, draft_vocab=ids, target_weights={"embed_tokens": emb},
                         rngs=nnx.Rngs(seed))
  return _randomize(m, seed), emb


# ------------------------------------------------------------------------------- the vLLM oracle


class VllmEagle3:
  """vLLM ``Eagle3LlamaForCausalLM`` (one sequence, fp32) read straight from the exported files."""

  def __init__(self, path, target_embed=None):
    self.cfg = json.loads((path / "config.json").read_text())
    self.w = torch_load_file(str(path / "model.safetensors"))
    c = self.cfg
    self.eps, self.H = c["rms_norm_eps"], c["hidden_size"]
    self.n, self.nkv = c["num_attention_heads"], c["num_key_value_heads"]
    self.d = c.get("head_dim") or self.H // self.n
    self.theta = c["rope_theta"]
    self.embed = self.w.get("embed_tokens.weight")
    if self.embed is None:            # vLLM shares the target's embedding when the draft has none
      self.embed = torch.from_numpy(target_embed)
    self.k_cache, self.v_cache, self.pos_cache = [], [], []

  def _rms(self, x, name):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.w[name]

  def _rope(self, x, pos):                                   # x [T, heads, D], neox style
    half = self.d // 2
    inv = 1.0 / (self.theta ** (torch.arange(0, self.d, 2, dtype=torch.float64) / self.d))
    ang = pos[:, None].double() * inv
    cos, sin = ang.cos().float()[:, None], ang.sin().float()[:, None]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

  def forward(self, tokens, pos, hidden):
    """``tokens [T]``, ``pos [T]``, ``hidden [T, H]`` (fc output or recycled) -> (normed, prenorm) [T, H].

    Appends this call's keys to the cache; query j sees cached keys plus this call's keys up to j.
    """
    w, p = self.w, "midlayer."
    lin = lambda x, n: x @ w[f"{p}{n}.weight"].T
    emb = self.embed[tokens]
    x = torch.cat([self._rms(emb, p + "input_layernorm.weight"), self._rms(hidden, p + "hidden_norm.weight")], -1)
    T = x.shape[0]
    q = self._rope(lin(x, "self_attn.q_proj").view(T, self.n, self.d), pos)
    k = self._rope(lin(x, "self_attn.k_proj").view(T, self.nkv, self.d), pos)
    v = lin(x, "self_attn.v_proj").view(T, self.nkv, self.d)
    n_old = sum(kk.shape[0] for kk in self.k_cache)
    self.k_cache.append(k)
    self.v_cache.append(v)
    K, V = torch.cat(self.k_cache), torch.cat(self.v_cache)
    rep = self.n // self.nkv
    K, V = K.repeat_interleave(rep, dim=1), V.repeat_interleave(rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, K) / math.sqrt(self.d)
    visible = torch.arange(K.shape[0])[None, :] <= (n_old + torch.arange(T))[:, None]
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    o = torch.einsum("hqk,khd->qhd", probs, V).reshape(T, self.n * self.d)
    h = hidden + lin(o, "self_attn.o_proj")                  # residual = un-normalised hidden
    m = self._rms(h, p + "post_attention_layernorm.weight")
    y = h + lin(torch.nn.functional.silu(lin(m, "mlp.gate_proj")) * lin(m, "mlp.up_proj"), "mlp.down_proj")
    return self._rms(y, "norm.weight"), y

  def compute_logits(self, normed):
    logits = normed @ self.w["lm_head.weight"].T
    c = self.cfg
    full = torch.full((logits.shape[0], c["vocab_size"]), float("-inf"))
    full[:, torch.arange(c["draft_vocab_size"]) + self.w["d2t"]] = logits
    return full

  def draft(self, aux, next_tokens, forced):
    """Prefill ``T`` positions from ``aux [T, 3Ht]`` then chain ``len(forced)`` more steps -> logits."""
    T = aux.shape[0]
    g = aux @ self.w["fc.weight"].T
    normed, pre = self.forward(next_tokens, torch.arange(T), g)
    out = [self.compute_logits(normed)]                      # step 0 at every position [T, V]
    h, last = pre[-1:], T - 1
    for i, tok in enumerate(forced, start=1):
      normed, h = self.forward(torch.tensor([tok]), torch.tensor([last + i]), h)
      out.append(self.compute_logits(normed))
    return out


def _inputs(seed=0, T=6):
  rng = np.random.default_rng(seed)
  aux = rng.standard_normal((1, T, 3 * TARGET.hidden_size)).astype(np.float32)
  tokens = rng.integers(0, TARGET.vocab_size, (1, T + 4)).astype(np.int32)
  return aux, tokens


@pytest.mark.parametrize("hidden,heads,kv,head_dim,ids", [
    (16, 4, 2, 4, DRAFT_IDS),     # H = Ht (target embedding shared), truncated vocabulary, GQA
    (12, 3, 1, 6, None),          # H != Ht (own embedding exported), full vocabulary
])
def test_vllm_reading_of_the_export_matches_lkjax(tmp_path, hidden, heads, kv, head_dim, ids):
  model, emb = _model(hidden, heads, kv, head_dim, ids)
  out = ex.export_eagle3(model, tmp_path / "draft", TARGET)
  aux, tokens = _inputs()
  T = aux.shape[1]
  vllm = VllmEagle3(out, target_embed=emb)
  forced = tokens[0, T:T + 2]
  ref = [r.numpy() for r in vllm.draft(torch.from_numpy(aux[0]), torch.from_numpy(tokens[0, :T]).long(),
                                       [int(t) for t in forced])]
  target_ids = np.arange(TARGET.vocab_size) if ids is None else ids

  # Step 0 at every position = lkjax's training forward (its input x[t+1] is tokens[t] here).
  # lkjax feeds x[t+1] = input_ids[t+1] at position t: shift the committed tokens right by one (the
  # last position has no x[t+1] inside the row; the drafting check below covers it).
  batch = dict(input_ids=np.concatenate([np.zeros((1, 1), np.int32), tokens[:, :T - 1]], 1),
               segment_ids=np.ones((1, T), np.int32), positions=np.arange(T, dtype=np.int32)[None],
               aux_hidden=aux)
  lk = np.asarray(model(batch)[0, 0])                                  # [T, Vd], step 0
  np.testing.assert_allclose(ref[0][:T - 1, target_ids], lk[:T - 1], atol=1e-4, rtol=1e-4)
  off = np.setdiff1d(np.arange(TARGET.vocab_size), target_ids)
  assert np.all(np.isneginf(ref[0][:, off]))                           # q = 0 outside the draft vocab

  # Drafting: step 0 at the last position, then two recycled steps with the forced tokens.
  ctx = dict(aux_hidden=aux, next_tokens=tokens[:, :T], positions=np.arange(T, dtype=np.int32)[None])
  forced_all = np.concatenate([forced, [0]])[None].astype(np.int32)     # the last one is never fed back
  _, _, logits = model.propose(model.init_cache(1, 16), ctx, num_tokens=3, temperature=0.0, rng=None,
                               forced_tokens=forced_all)
  logits = np.asarray(logits[0])
  np.testing.assert_allclose(ref[0][T - 1, target_ids], logits[0], atol=1e-4, rtol=1e-4)
  for i in (1, 2):
    np.testing.assert_allclose(ref[i][0, target_ids], logits[i], atol=1e-4, rtol=1e-4)


def test_config_and_tensor_layout(tmp_path):
  model, _ = _model(12, 3, 1, 6, DRAFT_IDS)
  out = ex.export_eagle3(model, tmp_path / "d", TARGET)
  c = json.loads((out / "config.json").read_text())
  assert c["architectures"] == ["LlamaForCausalLMEagle3"] and c["model_type"] == "llama"
  assert c["norm_before_residual"] is False and c["tie_word_embeddings"] is False
  assert (c["hidden_size"], c["target_hidden_size"], c["vocab_size"], c["draft_vocab_size"]) == (12, 16, 64, 24)
  assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], c["num_hidden_layers"]) == (3, 1, 6, 1)
  assert c["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5] and c["num_aux_hidden_states"] == 3
  assert c["rope_theta"] == 500.0 and c["rope_parameters"]["rope_theta"] == 500.0
  assert c["max_position_embeddings"] == 128 and c["hidden_act"] == "silu"
  t = load_file(str(out / "model.safetensors"))
  assert t["fc.weight"].shape == (12, 48)
  assert t["midlayer.self_attn.q_proj.weight"].shape == (18, 24)
  assert t["midlayer.self_attn.k_proj.weight"].shape == (6, 24)
  assert t["midlayer.self_attn.o_proj.weight"].shape == (12, 18)
  assert t["midlayer.mlp.down_proj.weight"].shape == (12, 20)
  assert t["lm_head.weight"].shape == (24, 12) and t["embed_tokens.weight"].shape == (64, 12)
  assert t["d2t"].dtype == np.int64 and t["t2d"].dtype == np.bool_ and t["t2d"].shape == (64,)
  np.testing.assert_array_equal(np.arange(24) + t["d2t"], DRAFT_IDS)
  np.testing.assert_array_equal(np.flatnonzero(t["t2d"]), DRAFT_IDS)
  same, _ = _model()
  t2 = load_file(str(ex.export_eagle3(same, tmp_path / "e", TARGET) / "model.safetensors"))
  assert "embed_tokens.weight" not in t2                 # H = Ht: the engines use the target's
  with pytest.raises(ValueError, match="already exists"):
    ex.export_eagle3(same, tmp_path / "e", TARGET)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "e"]   # no temp dirs left behind


def _params(model):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))


def _assert_same(a, b):
  pa, pb = _params(a), _params(b)
  assert jax.tree.structure(pa) == jax.tree.structure(pb)
  jax.tree.map(np.testing.assert_array_equal, pa, pb)


def test_export_import_roundtrip_is_exact(tmp_path):
  for ids, hidden, layers in ((DRAFT_IDS, 16, 1), (None, 12, 2)):
    model, emb = _model(hidden, 3 if hidden == 12 else 4, 1, 4, ids, layers=layers)
    out = ex.export_eagle3(model, tmp_path / f"d{hidden}", TARGET)
    back, info = ex.import_eagle3(out, target_embed=emb)
    assert info == TARGET and back.num_heads == 3 and back.num_layers == layers
    _assert_same(model, back)
    aux, tokens = _inputs(1)
    batch = dict(input_ids=tokens[:, :6], segment_ids=np.ones((1, 6), np.int32),
                 positions=np.arange(6, dtype=np.int32)[None], aux_hidden=aux)
    np.testing.assert_array_equal(np.asarray(model(batch)), np.asarray(back(batch)))


def _to_speculators(src, dst, *, norm_before_residual=False, k=5):
  """Rewrite an export in the ``speculators`` layout (config nesting and ``layers.0`` names)."""
  dst.mkdir()
  c = json.loads((src / "config.json").read_text())
  layer_keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "num_hidden_layers", "rms_norm_eps", "hidden_act", "vocab_size", "rope_theta",
                "rope_parameters", "max_position_embeddings", "model_type")
  spec = {"speculators_model_type": "eagle3", "architectures": ["Eagle3Speculator"],
          "speculators_version": "0.3.0",
          "transformer_layer_config": {key: c[key] for key in layer_keys},
          "draft_vocab_size": c["draft_vocab_size"], "target_hidden_size": c["target_hidden_size"],
          "eagle_aux_hidden_state_layer_ids": c["eagle_aux_hidden_state_layer_ids"],
          "speculators_config": {"algorithm": "eagle3", "default_proposal_method": "greedy",
                                 "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": k}],
                                 "verifier": {"name_or_path": "tiny-target", "architectures": ["LlamaForCausalLM"]}}}
  if norm_before_residual is not None:
    spec["norm_before_residual"] = norm_before_residual
  (dst / "config.json").write_text(json.dumps(spec))
  t = load_file(str(src / "model.safetensors"))
  save_file({k.replace("midlayer.", "layers.0."): v for k, v in t.items()}, str(dst / "model.safetensors"))
  return dst


def test_import_speculators_layout(tmp_path):
  model, emb = _model(12, 3, 1, 4, DRAFT_IDS)
  out = ex.export_eagle3(model, tmp_path / "hf", TARGET)
  spec = _to_speculators(out, tmp_path / "spec")
  back, info = ex.import_eagle3(spec, TARGET, target_embed=emb)
  assert back.num_heads == 5 and info == TARGET
  _assert_same(model, back)
  # speculators defaults norm_before_residual to true: a config without it is rejected, not misread.
  with pytest.raises(ValueError, match="norm_before_residual"):
    ex.import_eagle3(_to_speculators(out, tmp_path / "spec2", norm_before_residual=None), TARGET)


def test_import_legacy_pytorch_bin_without_embedding(tmp_path):
  model, emb = _model()
  out = ex.export_eagle3(model, tmp_path / "hf", TARGET)
  legacy = tmp_path / "legacy"
  legacy.mkdir()
  c = json.loads((out / "config.json").read_text())
  del c["lkjax"], c["rope_parameters"], c["eagle_aux_hidden_state_layer_ids"], c["eagle_config"]
  (legacy / "config.json").write_text(json.dumps(c))
  torch.save(torch_load_file(str(out / "model.safetensors")), str(legacy / "pytorch_model.bin"))
  with pytest.raises(ValueError, match="target_embed"):
    ex.import_eagle3(legacy, TARGET)
  with pytest.raises(ValueError, match="eagle_aux_hidden_state_layer_ids"):
    ex.import_eagle3(legacy, target_embed=emb)     # the target's depth is not recorded
  back, _ = ex.import_eagle3(legacy, TARGET, target_embed=emb, num_heads=3)
  _assert_same(model, back)


def test_bad_inputs_raise_clear_errors(tmp_path):
  model, emb = _model()
  out = ex.export_eagle3(model, tmp_path / "ok", TARGET)
  # Another architecture, both ways.
  cfg = ml_collections.ConfigDict(dict(arch="medusa", num_heads=2, num_layers=1, fc_bias=True,
                                       draft_vocab_size=0, dtype="float32"))
  med = medusa.from_config(cfg, TARGET, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="not an EAGLE-3 draft"):
    ex.export_eagle3(med, tmp_path / "x", TARGET)
  with pytest.raises(ValueError, match="not an EAGLE-3 draft"):
    ex.import_eagle3(export_medusa(med, tmp_path / "medusa", TARGET))
  # Mismatched target.
  other = TargetInfo(**{**TARGET.to_dict(), "hidden_size": 8, "aux_layer_ids": (2, 4, 5)})
  with pytest.raises(ValueError, match="does not match target"):
    ex.export_eagle3(model, tmp_path / "y", other)
  with pytest.raises(ValueError, match="do not match target"):
    ex.import_eagle3(out, other, target_embed=emb)
  with pytest.raises(ValueError, match="aux layers"):
    ex.import_eagle3(out, TargetInfo(**{**TARGET.to_dict(), "aux_layer_ids": (1, 4, 5)}), target_embed=emb)
  # Engines read exactly three aux states.
  four = TargetInfo(**{**TARGET.to_dict(), "aux_layer_ids": (1, 2, 4, 5)})
  m4 = eagle3.from_config(ml_collections.ConfigDict(dict(arch="eagle3", num_heads=1)), four, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="exactly 3"):
    ex.export_eagle3(m4, tmp_path / "z", four)

  def tampered(name, edit_tensors=None, edit_config=None):
    d = tmp_path / name
    d.mkdir()
    c = json.loads((out / "config.json").read_text())
    t = load_file(str(out / "model.safetensors"))
    if edit_tensors:
      edit_tensors(t)
    if edit_config:
      edit_config(c)
    (d / "config.json").write_text(json.dumps(c))
    save_file(t, str(d / "model.safetensors"))
    return d

  with pytest.raises(ValueError, match="'d2t' is missing"):
    ex.import_eagle3(tampered("nod2t", lambda t: t.pop("d2t")), target_embed=emb)
  with pytest.raises(ValueError, match="q_proj.weight"):
    ex.import_eagle3(tampered("badq", lambda t: t.update({"midlayer.self_attn.q_proj.weight":
                                                          np.zeros((16, 16), np.float32)})), target_embed=emb)
  with pytest.raises(ValueError, match="bias"):
    ex.import_eagle3(tampered("bias", lambda t: t.update({"midlayer.self_attn.q_proj.bias":
                                                          np.zeros(16, np.float32)})), target_embed=emb)
  with pytest.raises(ValueError, match="norm_before_residual"):
    ex.import_eagle3(tampered("nbr", edit_config=lambda c: c.update(norm_before_residual=True)), target_embed=emb)
  with pytest.raises(ValueError, match="rope type 'llama3'"):
    ex.import_eagle3(tampered("rope", edit_config=lambda c: c.update(
        rope_parameters={"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0})), target_embed=emb)
  with pytest.raises(ValueError, match="config.json: missing"):
    ex.import_eagle3(tmp_path / "nowhere")
