"""MLP-Speculator: SmolLM2 shapes/counts, fms-extras math vs numpy float64, drafting == training, grads, mesh."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from lkjax.models import mlp_speculator as mlps
from lkjax.models.base import Frozen
from lkjax.targets.info import TargetInfo

SMOLLM2 = TargetInfo(name="smollm2-135m-instruct", model_type="llama", num_layers=30, hidden_size=576,
                     vocab_size=49152, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                     intermediate_size=1536, rms_norm_eps=1e-5, rope_theta=100000.0,
                     max_position_embeddings=8192, tie_word_embeddings=True)
TINY = TargetInfo(name="tiny", model_type="llama", num_layers=4, hidden_size=8, vocab_size=32,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=4, intermediate_size=16,
                  rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=64)
MESH_RULES = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"), ("vocab", "tensor"))
_erf = np.vectorize(math.erf)


def _cfg(**kw):
  c = ml_collections.ConfigDict(dict(arch="mlp_speculator", num_heads=3, inner_dim=6, emb_dim=0, tie_weights=False,
                                     scale_input=False, draft_vocab_size=0, dtype="float32"))
  c.update(kw)
  return c


def _param_count(model):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _randomize(model, seed=0):
  """Random weights everywhere, including the norm scale/shift (fms init has them at 1/0)."""
  rng = np.random.default_rng(seed)
  for name in ("emb", "proj0", "proj", "head", "ln_w", "ln_b"):
    var = getattr(model, name)
    if var is not None:
      var[...] = jnp.asarray(rng.normal(0, 0.5, var.shape), jnp.float32)


def _np_weights(m):
  return {n: (None if getattr(m, n) is None else np.float64(getattr(m, n)[...]))
          for n in ("emb", "proj0", "proj", "head", "ln_w", "ln_b")}


def _np_stage(wt, i, state, tok, *, n_predict, inner_dim, tie):
  """float64 fms-extras stage i, written from the fms-extras / docs/design.md formulas."""
  sw = 0.5 ** (0.5 / n_predict)
  ew = math.sqrt(1 - sw * sw)
  e = 0 if tie else i
  z = wt["emb"][e][tok] * ew * math.sqrt(inner_dim / 2)
  proj = wt["proj0"] if i == 0 else wt["proj"][0 if tie else i - 1]
  x = state @ proj * sw + z
  x = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6) * wt["ln_w"][e] + wt["ln_b"][e]
  state = 0.5 * x * (1 + _erf(x / math.sqrt(2)))
  return state, state @ wt["head"][e]


def _np_init_state(h, scale_input):
  h = np.float64(h)
  if scale_input:
    h = h / np.sqrt(np.mean(h * h, -1, keepdims=True) + 1e-6) / math.sqrt(2)
  return h


def test_smollm2_shapes_and_parameter_counts():
  H, V = 576, 49152
  m = nnx.eval_shape(lambda: mlps.from_config(_cfg(num_heads=6, inner_dim=0), SMOLLM2, rngs=nnx.Rngs(0)))
  assert (m.emb.shape, m.proj0.shape, m.proj.shape, m.head.shape) == (
      (6, V, H), (H, H), (5, H, H), (6, H, V))
  assert _param_count(m) == 6 * V * H + 6 * H * H + 6 * H * V + 2 * 6 * H == 341_736_192
  tied = nnx.eval_shape(lambda: mlps.from_config(_cfg(num_heads=6, inner_dim=1024, tie_weights=True,
                                                      scale_input=True), SMOLLM2, rngs=nnx.Rngs(0)))
  D = 1024
  assert tied.proj0.shape == (H, D) and tied.proj.shape == (1, D, D)
  assert _param_count(tied) == V * D + H * D + D * D + D * V + 2 * D
  ids = np.arange(32000) * 1 + 7
  trunc = nnx.eval_shape(lambda: mlps.from_config(_cfg(num_heads=6, inner_dim=0, draft_vocab_size=32000), SMOLLM2,
                                                  draft_vocab=ids, rngs=nnx.Rngs(0)))
  assert trunc.emb.shape == (6, V, H) and trunc.head.shape == (6, H, 32000)   # embeddings stay over V
  assert isinstance(trunc.draft_vocab, Frozen)

  def fwd():
    mm = mlps.from_config(_cfg(num_heads=6, inner_dim=0), SMOLLM2, rngs=nnx.Rngs(0))
    return mm({"final_hidden": jnp.zeros((2, 3, H), jnp.bfloat16), "input_ids": jnp.zeros((2, 3), jnp.int32)})
  assert nnx.eval_shape(fwd).shape == (6, 2, 3, V)


@pytest.mark.parametrize("tie,scale,inner,truncate", [
    (False, False, 6, False), (True, True, 6, True), (False, True, 8, True), (True, False, 10, False)])
def test_forward_matches_numpy_float64(tie, scale, inner, truncate):
  ids = np.array([0, 3, 4, 7, 9, 10, 15, 16, 20, 21, 22, 25, 26, 28, 30, 31]) if truncate else None
  model = mlps.from_config(_cfg(tie_weights=tie, scale_input=scale, inner_dim=inner), TINY, draft_vocab=ids,
                           rngs=nnx.Rngs(1))
  _randomize(model, 1)
  rng = np.random.default_rng(1)
  B, T = 2, 6
  h = rng.normal(size=(B, T, 8)).astype(np.float32) * 3
  x = rng.integers(0, 32, size=(B, T))
  got = np.asarray(model({"final_hidden": jnp.asarray(h), "input_ids": jnp.asarray(x, jnp.int32)}))
  wt = _np_weights(model)
  state = _np_init_state(h, scale)
  xp = np.concatenate([x, np.zeros((B, 4), x.dtype)], axis=1)
  for i in range(3):
    state, want = _np_stage(wt, i, state, xp[:, 1 + i:1 + i + T], n_predict=3, inner_dim=inner, tie=tie)
    np.testing.assert_allclose(got[i], want, rtol=2e-5, atol=2e-5)
  assert got.shape == (3, B, T, 16 if truncate else 32)


def test_fms_default_init():
  m = mlps.from_config(_cfg(inner_dim=16, num_heads=4), TINY, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(np.asarray(m.ln_w[...]), 1.0)
  np.testing.assert_array_equal(np.asarray(m.ln_b[...]), 0.0)
  emb = np.asarray(m.emb[...])
  assert abs(emb.std() - 0.88 / 4) < 0.03          # truncated N(0, 1/sqrt(16)) at +-2 std: std ~= 0.88 sigma
  assert np.abs(emb).max() <= 2 / 4 + 1e-6
  assert m.state_weight == pytest.approx(0.5 ** (0.5 / 4)) and m.emb_weight == pytest.approx(
      math.sqrt(1 - 0.5 ** (1 / 4)))


@pytest.mark.parametrize("tie,truncate", [(False, True), (True, False)])
def test_propose_reproduces_training_forward(tie, truncate):
  ids = np.arange(1, 32, 2) if truncate else None
  model = mlps.from_config(_cfg(tie_weights=tie, scale_input=True), TINY, draft_vocab=ids, rngs=nnx.Rngs(2))
  _randomize(model, 2)
  rng = np.random.default_rng(2)
  B, T = 2, 8
  h = jnp.asarray(rng.normal(size=(B, T, 8)), jnp.float32)
  x = jnp.asarray(rng.integers(0, 32, size=(B, T)), jnp.int32)
  train = np.asarray(model({"final_hidden": h, "input_ids": x}))
  cache = model.init_cache(B, 16)
  start = 0
  for t in (0, 2, 3):
    ctx = {"final_hidden": h[:, start:t + 1], "next_tokens": x[:, start + 1:t + 2]}
    forced = x[:, t + 2:t + 5]
    cache, toks, logits = model.propose(cache, ctx, num_tokens=3, temperature=0.0, rng=None, forced_tokens=forced)
    np.testing.assert_allclose(np.asarray(logits), np.transpose(train[:, :, t], (1, 0, 2)), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(toks), np.asarray(forced))
    start = t + 1


def test_greedy_propose_feeds_its_own_tokens():
  ids = np.arange(1, 32, 2)
  model = mlps.from_config(_cfg(num_heads=4), TINY, draft_vocab=ids, rngs=nnx.Rngs(3))
  _randomize(model, 3)
  rng = np.random.default_rng(3)
  h = rng.normal(size=(3, 2, 8)).astype(np.float32)
  nxt = rng.integers(0, 32, size=(3, 2))
  ctx = {"final_hidden": jnp.asarray(h), "next_tokens": jnp.asarray(nxt, jnp.int32)}
  _, toks, logits = model.propose(model.init_cache(3, 8), ctx, num_tokens=4, temperature=0.0, rng=None)
  wt = _np_weights(model)
  state, tok = _np_init_state(h[:, -1], False), nxt[:, -1]
  for i in range(4):
    state, lg = _np_stage(wt, i, state, tok, n_predict=4, inner_dim=6, tie=False)
    tok = ids[np.argmax(lg, -1)]
    np.testing.assert_allclose(np.asarray(logits[:, i]), lg, rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(np.asarray(toks[:, i]), tok)
  # sampling at T > 0 draws from softmax(logits / T): same key -> same tokens, and they lie in Vd
  _, s1, _ = model.propose(model.init_cache(3, 8), ctx, num_tokens=4, temperature=1.0, rng=jax.random.key(1))
  _, s2, _ = model.propose(model.init_cache(3, 8), ctx, num_tokens=4, temperature=1.0, rng=jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(s1), np.asarray(s2))
  assert np.isin(np.asarray(s1), ids).all()
  with pytest.raises(ValueError, match="num_tokens"):
    model.propose(model.init_cache(3, 8), ctx, num_tokens=5, temperature=0.0, rng=None)


@pytest.mark.parametrize("tie", [False, True])
def test_gradients_reach_only_trainable_params(tie):
  model = mlps.from_config(_cfg(tie_weights=tie), TINY, draft_vocab=np.arange(0, 32, 2), rngs=nnx.Rngs(4))
  rng = np.random.default_rng(4)
  h = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
  x = jnp.asarray(rng.integers(0, 32, size=(2, 5)), jnp.int32)
  g_out = jnp.asarray(rng.normal(size=(3, 2, 5, 16)), jnp.float32)

  def loss(m):
    return jnp.sum(m({"final_hidden": h, "input_ids": x}) * g_out)
  grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.Param))(model)
  flat = dict((str(p[0]), v[...]) for p, v in nnx.to_flat_state(grads))
  assert set(flat) == {"emb", "proj0", "proj", "head", "ln_w", "ln_b"}
  for name, g in flat.items():
    assert np.abs(np.asarray(g)).sum() > 0, name
  # only embedding rows of tokens that were read get gradient
  used = np.zeros(32, bool)
  used[np.asarray(x)[:, 1:].ravel()] = True
  used[0] = True   # positions past the end read the fill token 0
  emb_g = np.abs(np.asarray(flat["emb"])).sum(axis=(0, 2))
  assert np.all(emb_g[~used] == 0)
  # analytic head gradient of the last stage: dL/dW_head = s^T g (s = last state), via a numpy recomputation
  wt = _np_weights(model)
  state = _np_init_state(h, False)
  xp = np.concatenate([np.asarray(x), np.zeros((2, 4), np.int64)], axis=1)
  grads_head = []
  for i in range(3):
    state, _ = _np_stage(wt, i, state, xp[:, 1 + i:6 + i], n_predict=3, inner_dim=6, tie=tie)
    grads_head.append(np.einsum("btd,btv->dv", state, np.float64(g_out[i])))
  want = np.sum(grads_head, axis=0, keepdims=True) if tie else np.stack(grads_head)
  np.testing.assert_allclose(np.asarray(flat["head"]), want, rtol=1e-4, atol=1e-4)
  assert "draft_vocab" in {str(p[0]) for p, _ in nnx.to_flat_state(nnx.state(model, Frozen))}


def test_sharded_forward_equals_single_device():
  model = mlps.from_config(_cfg(scale_input=True), TINY, draft_vocab=np.arange(0, 32, 2), rngs=nnx.Rngs(6))
  _randomize(model, 6)
  rng = np.random.default_rng(6)
  batch = {"final_hidden": jnp.asarray(rng.normal(size=(4, 6, 8)), jnp.float32),
           "input_ids": jnp.asarray(rng.integers(0, 32, size=(4, 6)), jnp.int32)}
  want = np.asarray(model(batch))
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
  with nnx.logical_axis_rules(MESH_RULES):
    gdef, state = nnx.split(model)
    state = jax.device_put(state, nnx.get_named_sharding(state, mesh))
  sharded = nnx.merge(gdef, state)
  P = jax.sharding.PartitionSpec
  assert sharded.emb[...].sharding.spec == P(None, "tensor", "fsdp")
  assert sharded.proj0[...].sharding.spec == P("fsdp", "tensor")
  batch = jax.device_put(batch, jax.sharding.NamedSharding(mesh, P(("data", "fsdp"))))
  got = nnx.jit(lambda m, b: m(b))(sharded, batch)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  # the trainer's path: building under the mesh + rules shards the parameters at creation
  with jax.set_mesh(mesh), nnx.logical_axis_rules(MESH_RULES):
    built = mlps.from_config(_cfg(scale_input=True), TINY, draft_vocab=np.arange(0, 32, 2), rngs=nnx.Rngs(6))
    assert built.head[...].sharding.spec == P(None, "fsdp", "tensor")
  for name in ("emb", "proj0", "proj", "head", "ln_w", "ln_b"):
    var = getattr(built, name)
    var[...] = jax.device_put(getattr(model, name)[...], var[...].sharding)
  np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, b: m(b))(built, batch)), want, rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_close_to_float32():
  m32 = mlps.from_config(_cfg(), TINY, rngs=nnx.Rngs(5))
  m16 = mlps.from_config(_cfg(dtype="bfloat16"), TINY, rngs=nnx.Rngs(5))
  batch = {"final_hidden": jnp.asarray(np.random.default_rng(5).normal(size=(2, 3, 8)), jnp.bfloat16),
           "input_ids": jnp.ones((2, 3), jnp.int32)}
  out16 = m16(batch)
  assert out16.dtype == jnp.bfloat16 and m16.emb[...].dtype == jnp.float32
  np.testing.assert_allclose(np.float32(out16), np.asarray(m32(batch)), rtol=0.05, atol=0.05)


def test_bad_config_errors():
  with pytest.raises(ValueError, match="arch"):
    mlps.from_config(_cfg(arch="medusa"), TINY, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="emb_dim"):
    mlps.from_config(_cfg(emb_dim=16), TINY, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="tie_weights"):
    mlps.from_config(_cfg(num_heads=2, tie_weights=True), TINY, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="draft_vocab"):
    mlps.from_config(_cfg(draft_vocab_size=5), TINY, rngs=nnx.Rngs(0))
  m = mlps.from_config(_cfg(), TINY, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="final_hidden"):
    m({"final_hidden": jnp.zeros((1, 2, 9)), "input_ids": jnp.zeros((1, 2), jnp.int32)})
