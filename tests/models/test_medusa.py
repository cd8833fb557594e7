"""MEDUSA heads: shapes/counts at SmolLM2 dims, numpy float64 oracle, drafting == training, grads, mesh."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from lkjax.models import medusa
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


def _cfg(**kw):
  c = ml_collections.ConfigDict(dict(arch="medusa", num_heads=3, num_layers=2, fc_bias=True, draft_vocab_size=0,
                                     init_head_from_target=True, dtype="float32"))
  c.update(kw)
  return c


def _param_count(model):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _randomize(model, seed=0):
  """Random (non-zero) weights so every formula term is exercised."""
  rng = np.random.default_rng(seed)
  model.w[...] = jnp.asarray(rng.normal(0, 0.4, model.w[...].shape), jnp.float32)
  if model.b is not None:
    model.b[...] = jnp.asarray(rng.normal(0, 0.5, model.b[...].shape), jnp.float32)
  model.lm_head[...] = jnp.asarray(rng.normal(0, 0.5, model.lm_head[...].shape), jnp.float32)


def _numpy_medusa(h, w, b, head):
  """float64 reference: x <- x + silu(x W + b) per layer, logits = x U, for every head."""
  h = np.asarray(h, np.float64)
  out = []
  for k in range(w.shape[0]):
    x = h
    for l in range(w.shape[1]):
      y = x @ np.float64(w[k, l]) + (0.0 if b is None else np.float64(b[k, l]))
      x = x + y / (1.0 + np.exp(-y))
    out.append(x @ np.float64(head[k]))
  return np.stack(out)


def test_smollm2_shapes_and_parameter_counts():
  H, V = 576, 49152
  full = nnx.eval_shape(lambda: medusa.from_config(_cfg(num_heads=6, num_layers=1), SMOLLM2,
                                                   rngs=nnx.Rngs(0)))
  assert full.draft_vocab_size == V and full.draft_vocab is None
  assert full.lm_head.shape == (6, H, V)
  assert _param_count(full) == 6 * (H * H + H + H * V)          # 171,863,424
  assert _param_count(full) == 171_863_424

  ids = np.arange(32000) + 1000
  trunc = nnx.eval_shape(lambda: medusa.from_config(
      _cfg(num_heads=6, num_layers=2, fc_bias=False, draft_vocab_size=32000), SMOLLM2, draft_vocab=ids,
      rngs=nnx.Rngs(0)))
  assert trunc.b is None and trunc.draft_vocab_size == 32000
  assert _param_count(trunc) == 6 * (2 * H * H + H * 32000)
  assert isinstance(trunc.draft_vocab, Frozen) and trunc.draft_vocab.shape == (32000,)

  def fwd():
    m = medusa.from_config(_cfg(num_heads=6, num_layers=1), SMOLLM2, rngs=nnx.Rngs(0))
    return m({"final_hidden": jnp.zeros((2, 3, H), jnp.bfloat16)})
  assert nnx.eval_shape(fwd).shape == (6, 2, 3, V)


@pytest.mark.parametrize("fc_bias,truncate", [(True, True), (False, False)])
def test_forward_matches_numpy_float64(fc_bias, truncate):
  ids = np.array([0, 3, 4, 7, 9, 10, 15, 16, 20, 21, 22, 25, 26, 28, 30, 31]) if truncate else None
  model = medusa.from_config(_cfg(fc_bias=fc_bias), TINY, draft_vocab=ids, rngs=nnx.Rngs(1))
  _randomize(model)
  h = np.random.default_rng(1).normal(size=(2, 5, 8)).astype(np.float32)
  got = np.asarray(model({"final_hidden": jnp.asarray(h)}))
  want = _numpy_medusa(h, np.asarray(model.w[...]), None if not fc_bias else np.asarray(model.b[...]),
                       np.asarray(model.lm_head[...]))
  assert got.shape == (3, 2, 5, 16 if truncate else 32)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_head_initialised_from_target_rows():
  rng = np.random.default_rng(2)
  tw = {"lm_head": rng.normal(size=(32, 8)).astype(np.float32),
        "embed_tokens": rng.normal(size=(32, 8)).astype(np.float32), "norm": np.ones(8, np.float32)}
  ids = np.array([1, 2, 5, 8, 13, 21, 30])
  model = medusa.from_config(_cfg(draft_vocab_size=7), TINY, draft_vocab=ids, target_weights=tw,
                             rngs=nnx.Rngs(0))
  for k in range(3):
    np.testing.assert_array_equal(np.asarray(model.lm_head[...][k]), tw["lm_head"][ids].T)
  # zero-initialised residual blocks: every head starts as the target's head on the draft vocabulary.
  h = rng.normal(size=(1, 4, 8)).astype(np.float32)
  got = np.asarray(model({"final_hidden": jnp.asarray(h)}))
  np.testing.assert_allclose(got, np.broadcast_to(h @ tw["lm_head"][ids].T, got.shape), rtol=1e-5, atol=1e-5)
  random_head = medusa.from_config(_cfg(init_head_from_target=False), TINY, target_weights=tw, rngs=nnx.Rngs(0))
  assert not np.allclose(np.asarray(random_head.lm_head[...][0]), tw["lm_head"].T)
  with pytest.raises(ValueError, match="lm_head"):
    medusa.from_config(_cfg(), TINY, target_weights={"lm_head": np.zeros((31, 8), np.float32)}, rngs=nnx.Rngs(0))


def test_propose_reproduces_training_forward():
  ids = np.arange(1, 32, 2)
  model = medusa.from_config(_cfg(), TINY, draft_vocab=ids, rngs=nnx.Rngs(3))
  _randomize(model, 3)
  rng = np.random.default_rng(3)
  B, T = 2, 7
  h = jnp.asarray(rng.normal(size=(B, T, 8)), jnp.float32)
  x = jnp.asarray(rng.integers(0, 32, size=(B, T)), jnp.int32)
  train = np.asarray(model({"final_hidden": h, "input_ids": x}))
  cache = model.init_cache(B, 16)
  start = 0
  for t in (1, 2, 4):   # commit positions start..t, then draft from position t
    ctx = {"final_hidden": h[:, start:t + 1], "next_tokens": x[:, start + 1:t + 2],
           "aux_hidden": jnp.zeros((B, t + 1 - start, 24)), "positions": jnp.arange(start, t + 1)[None]}
    cache, toks, logits = model.propose(cache, ctx, num_tokens=3, temperature=0.0, rng=None)
    np.testing.assert_allclose(np.asarray(logits), np.transpose(train[:, :, t], (1, 0, 2)), atol=1e-5, rtol=0)
    assert logits.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(toks), ids[np.argmax(train[:, :, t], -1).T])
    start = t + 1
  # an empty ctx keeps the committed state
  empty = {"final_hidden": h[:, :0], "next_tokens": x[:, :0]}
  _, toks2, logits2 = model.propose(cache, empty, num_tokens=2, temperature=0.0, rng=None,
                                    forced_tokens=jnp.ones((B, 2), jnp.int32))
  np.testing.assert_allclose(np.asarray(logits2), np.transpose(train[:2, :, 4], (1, 0, 2)), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(toks2), 1)
  with pytest.raises(ValueError, match="num_tokens"):
    model.propose(cache, empty, num_tokens=4, temperature=0.0, rng=None)


def test_sample_tokens_greedy_and_distribution():
  logits = jnp.log(jnp.asarray([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]]))
  np.testing.assert_array_equal(np.asarray(medusa.sample_tokens(logits, 0.0, None)), [1, 0])
  keys = jax.random.split(jax.random.key(0), 4000)
  draws = np.asarray(jax.vmap(lambda k: medusa.sample_tokens(logits, 1.0, k))(keys))   # [4000, 2]
  for row, p in enumerate(([0.1, 0.6, 0.3], [0.5, 0.2, 0.3])):
    freq = np.bincount(draws[:, row], minlength=3) / len(draws)
    np.testing.assert_allclose(freq, p, atol=0.03)
  # temperature 0.5 sharpens: p^2 renormalised
  draws = np.asarray(jax.vmap(lambda k: medusa.sample_tokens(logits, 0.5, k))(keys))[:, 0]
  p2 = np.array([0.01, 0.36, 0.09]) / 0.46
  np.testing.assert_allclose(np.bincount(draws, minlength=3) / len(draws), p2, atol=0.03)
  with pytest.raises(ValueError, match="rng"):
    medusa.sample_tokens(logits, 1.0, None)


def test_gradients_reach_only_trainable_params():
  ids = np.arange(0, 32, 2)
  model = medusa.from_config(_cfg(), TINY, draft_vocab=ids, rngs=nnx.Rngs(4))   # zero blocks at init
  rng = np.random.default_rng(4)
  h = jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.float32)
  g_out = jnp.asarray(rng.normal(size=(3, 2, 3, 16)), jnp.float32)

  def loss(m):
    return jnp.sum(m({"final_hidden": h}) * g_out)
  grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.Param))(model)
  names = {str(p[0]) for p, _ in nnx.to_flat_state(grads)}
  assert names == {"w", "b", "lm_head"}
  assert "draft_vocab" in {str(p[0]) for p, _ in nnx.to_flat_state(nnx.state(model, Frozen))}
  # analytic: with zero blocks x_L = h, so dL/dU_k = sum_{b,t} h^T g_k; dL/db_{k,L-1} = silu'(0) U_k g_k = 0.5 U_k g
  h64, g64 = np.float64(h), np.float64(g_out)
  want_u = np.einsum("bth,kbtv->khv", h64, g64)
  np.testing.assert_allclose(np.asarray(grads["lm_head"][...]), want_u, rtol=1e-5, atol=1e-5)
  U = np.float64(model.lm_head[...])
  want_b_last = 0.5 * np.einsum("kbtv,khv->kh", g64, U)
  np.testing.assert_allclose(np.asarray(grads["b"][...][:, -1]), want_b_last, rtol=1e-5, atol=1e-5)
  assert np.all(np.abs(np.asarray(grads["w"][...])) .sum(axis=(2, 3)) > 0)


def test_bfloat16_compute_close_to_float32():
  m32 = medusa.from_config(_cfg(), TINY, rngs=nnx.Rngs(5))
  _randomize(m32, 5)
  m16 = medusa.from_config(_cfg(dtype="bfloat16"), TINY, rngs=nnx.Rngs(5))
  nnx.update(m16, nnx.state(m32, nnx.Param))
  h = jnp.asarray(np.random.default_rng(5).normal(size=(2, 3, 8)), jnp.bfloat16)
  out16 = m16({"final_hidden": h})
  assert out16.dtype == jnp.bfloat16 and m16.lm_head[...].dtype == jnp.float32
  np.testing.assert_allclose(np.float32(out16), np.asarray(m32({"final_hidden": h})), rtol=0.05, atol=0.1)


def test_sharded_forward_equals_single_device():
  ids = np.arange(0, 32, 2)
  model = medusa.from_config(_cfg(), TINY, draft_vocab=ids, rngs=nnx.Rngs(6))
  _randomize(model, 6)
  h = jnp.asarray(np.random.default_rng(6).normal(size=(4, 6, 8)), jnp.float32)
  want = np.asarray(model({"final_hidden": h}))
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
  with nnx.logical_axis_rules(MESH_RULES):
    gdef, state = nnx.split(model)
    state = jax.device_put(state, nnx.get_named_sharding(state, mesh))
  sharded = nnx.merge(gdef, state)
  assert sharded.lm_head[...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert sharded.w[...].sharding.spec == jax.sharding.PartitionSpec(None, None, "fsdp", "tensor")
  hb = jax.device_put(h, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"))))
  got = nnx.jit(lambda m, x: m({"final_hidden": x}))(sharded, hb)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_bad_config_errors():
  with pytest.raises(ValueError, match="arch"):
    medusa.from_config(_cfg(arch="eagle3"), TINY, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="draft_vocab"):
    medusa.from_config(_cfg(draft_vocab_size=8), TINY, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="ascending"):
    medusa.from_config(_cfg(), TINY, draft_vocab=np.array([3, 2, 5]), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="ascending"):
    medusa.from_config(_cfg(), TINY, draft_vocab=np.array([3, 40]), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="len"):
    medusa.from_config(_cfg(draft_vocab_size=4), TINY, draft_vocab=np.array([1, 2, 3]), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="dtype"):
    medusa.from_config(_cfg(dtype="float16"), TINY, rngs=nnx.Rngs(0))
  m = medusa.from_config(_cfg(), TINY, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="final_hidden"):
    m({"final_hidden": jnp.zeros((1, 2, 9))})
