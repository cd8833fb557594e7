"""EAGLE-3: TTT mask, SmolLM2-sized shapes, training forward == drafting, gradients, sharded forward."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from lkjax.models import eagle3
from lkjax.models.base import Frozen

from draft_testing import SMOL, TINY, draft_along_truth



def _cfg(**kw):
  c = dict(arch="eagle3", num_heads=4, draft_vocab_size=0, dtype="float32", hidden_size=0, num_attention_heads=0,
           num_key_value_heads=0, head_dim=0, intermediate_size=0, num_layers=1, rms_norm_eps=0.0, rope_theta=0.0)
  c.update(kw)
  return ml_collections.ConfigDict(c)


def _batch(b=2, seed=0):
  """Packed rows: row 0 = docs of 6 and 4 tokens, row 1 = 8 tokens + 2 padding."""
  rng = np.random.default_rng(seed)
  seg = np.array([[1] * 6 + [2] * 4, [1] * 8 + [0] * 2] * (b // 2), np.int32)
  pos = np.array([list(range(6)) + list(range(4)), list(range(8)) + [0, 0]] * (b // 2), np.int32)
  t = seg.shape[1]
  return dict(input_ids=rng.integers(0, TINY.vocab_size, (b, t)).astype(np.int32),
              loss_mask=(seg > 0).astype(np.uint8), segment_ids=seg, positions=pos,
              aux_hidden=rng.normal(size=(b, t, TINY.num_aux * TINY.hidden_size)).astype(np.float32),
              final_hidden=rng.normal(size=(b, t, TINY.hidden_size)).astype(np.float32))


def test_ttt_mask_hand_example():
  # Row: doc 1 = slots 0,1,2; doc 2 = slot 3; slot 4 = padding.  Step 2 keys: [step0 (5) | step1 (5) | step2 (5)].
  seg = jnp.array([[1, 1, 1, 2, 0]])
  prefix, own = eagle3.ttt_attention_mask(seg, 2)
  dense = np.concatenate([np.asarray(prefix[0])] + [np.diag(np.asarray(own[0, :, j])) for j in range(2)], axis=1)
  want = np.array([
      # step-0 keys   step-1 keys    step-2 keys
      [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0],
      [1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0],
      [1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0],
      [0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0],
      [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
  ], bool)
  np.testing.assert_array_equal(dense, want)
  p0, o0 = eagle3.ttt_attention_mask(seg, 0)
  assert o0.shape == (1, 5, 0)
  np.testing.assert_array_equal(p0, prefix)


def test_smollm2_shapes_and_parameter_counts():
  cfg = _cfg(num_heads=7, draft_vocab_size=8192)
  dv = np.arange(0, 49152, 6)[:8192]
  model = nnx.eval_shape(lambda: eagle3.from_config(cfg, SMOL, draft_vocab=dv, rngs=nnx.Rngs(0)))
  H, Ht, V, Vd, I = 576, 576, 49152, 8192, 1536
  q, kv = 9 * 64, 3 * 64
  want_params = (3 * Ht * H                       # fc
                 + 2 * H * (q + 2 * kv) + q * H    # q/k/v over 2H inputs, o_proj
                 + 3 * H * I                       # gate/up/down
                 + 4 * H                           # input_layernorm, hidden_norm, post_attention_layernorm, norm
                 + H * Vd)                         # lm_head
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert n_params == want_params == 9_808_128
  frozen = nnx.state(model, Frozen)
  assert sum(x.size for x in jax.tree.leaves(frozen)) == V * H + Vd
  assert model.embed_tokens.shape == (V, H) and isinstance(model.embed_tokens, Frozen)
  assert model.midlayer.self_attn.q_proj.kernel.shape == (2 * H, q)
  assert model.fc.kernel.shape == (3 * Ht, H)
  assert model.draft_vocab.dtype == jnp.int32 and model.draft_vocab.shape == (Vd,)

  b, t = 2, 16
  batch = dict(input_ids=jax.ShapeDtypeStruct((b, t), jnp.int32), segment_ids=jax.ShapeDtypeStruct((b, t), jnp.int32),
               positions=jax.ShapeDtypeStruct((b, t), jnp.int32),
               aux_hidden=jax.ShapeDtypeStruct((b, t, 3 * Ht), jnp.bfloat16))
  gd, state = nnx.split(model)
  out = jax.eval_shape(lambda s, bt: nnx.merge(gd, s)(bt), state, batch)
  assert out.shape == (7, b, t, Vd)


@pytest.mark.parametrize("num_layers,truncated", [(1, True), (2, False)])
def test_training_forward_equals_drafting(num_layers, truncated):
  K = 4
  dv = np.arange(0, TINY.vocab_size, 2) if truncated else None
  model = eagle3.from_config(_cfg(num_heads=K, num_layers=num_layers), TINY, draft_vocab=dv, rngs=nnx.Rngs(1))
  batch = _batch()
  train = np.asarray(nnx.jit(lambda m, b: m(b))(model, batch))
  assert train.shape == (K, 2, 10, TINY.vocab_size // (2 if truncated else 1))
  drafted = {(b, t): lg for (b, t, _), lg in draft_along_truth(model, batch, K).items()}
  assert len(drafted) >= 6
  for (b, t), logits in drafted.items():
    # Every non-padding position matches: step-k attention never leaves t's document.
    np.testing.assert_allclose(logits, train[:, b, t], atol=1e-5, rtol=0)


def test_greedy_drafting_feeds_back_its_own_tokens():
  K = 3
  dv = np.arange(1, TINY.vocab_size, 3)
  model = eagle3.from_config(_cfg(num_heads=K), TINY, draft_vocab=dv, rngs=nnx.Rngs(2))
  batch = _batch()
  ctx = dict(aux_hidden=batch["aux_hidden"][:, :5], next_tokens=batch["input_ids"][:, 1:6],
             positions=batch["positions"][:, :5])
  cache0 = model.init_cache(2, 8)
  _, tokens, logits = model.propose(cache0, ctx, num_tokens=K, temperature=0.0, rng=None)
  np.testing.assert_array_equal(tokens, dv[np.argmax(np.asarray(logits), -1)])   # target ids
  _, _, again = model.propose(cache0, ctx, num_tokens=K, temperature=0.0, rng=None, forced_tokens=tokens)
  np.testing.assert_allclose(again, logits, atol=1e-6)
  _, sampled, _ = model.propose(cache0, ctx, num_tokens=K, temperature=1.0, rng=jax.random.key(0))
  assert np.isin(np.asarray(sampled), dv).all()
  with pytest.raises(ValueError, match="max_len"):
    model.propose(model.init_cache(2, 4), ctx, num_tokens=1, temperature=0.0, rng=None)


def test_gradients_reach_only_trainable_params():
  model = eagle3.from_config(_cfg(num_heads=3), TINY, rngs=nnx.Rngs(3))
  batch = _batch()
  loss = lambda m: jnp.mean(jax.nn.log_softmax(m(batch)) ** 2)
  grads = nnx.jit(nnx.grad(loss))(model)
  g_paths = {p for p, _ in nnx.to_flat_state(grads)}
  p_paths = {p for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert g_paths == p_paths
  assert ("embed_tokens",) not in g_paths
  for path, g in nnx.to_flat_state(grads):
    assert float(jnp.max(jnp.abs(g[...]))) > 0, path
  # A draft hidden size != target's gets its own trainable embedding, and it is trained.
  model = eagle3.from_config(_cfg(num_heads=2, hidden_size=8, num_attention_heads=2, num_key_value_heads=1,
                                  head_dim=4, intermediate_size=12), TINY, rngs=nnx.Rngs(4))
  assert isinstance(model.embed_tokens, nnx.Param)
  g = nnx.jit(nnx.grad(loss))(model)
  assert float(jnp.max(jnp.abs(g["embed_tokens"][...]))) > 0


def test_sharded_forward_equals_single_device():
  cfg = _cfg(num_heads=3)
  batch = _batch(b=4)
  tw = {"embed_tokens": np.random.default_rng(5).normal(size=(64, 16)).astype(np.float32)}
  ref = nnx.jit(lambda m, b: m(b))(eagle3.from_config(cfg, TINY, target_weights=tw, rngs=nnx.Rngs(6)), batch)
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
  rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"),
           ("kv", "tensor"), ("vocab", "tensor"), ("head_dim", None))
  P = jax.sharding.PartitionSpec
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    model = eagle3.from_config(cfg, TINY, target_weights=tw, rngs=nnx.Rngs(6))
    assert model.lm_head.kernel[...].sharding.spec == P("fsdp", "tensor")
    assert model.embed_tokens[...].sharding.spec == P("tensor", "fsdp")
    sb = {k: jax.device_put(v, jax.sharding.NamedSharding(mesh, P(("data", "fsdp")))) for k, v in batch.items()}
    out = nnx.jit(lambda m, b: m(b))(model, sb)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


def test_config_errors():
  with pytest.raises(ValueError, match="aux_hidden"):
    model = eagle3.from_config(_cfg(num_heads=1), TINY, rngs=nnx.Rngs(0))
    b = _batch()
    b["aux_hidden"] = b["aux_hidden"][..., :-1]
    model(b)
  with pytest.raises(ValueError, match="embed_tokens"):
    eagle3.from_config(_cfg(), TINY, target_weights={"embed_tokens": np.zeros((64, 8), np.float32)},
                       rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="num_key_value_heads"):
    eagle3.from_config(_cfg(num_key_value_heads=3), TINY, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="arch"):
    eagle3.from_config(_cfg(arch="mtp"), TINY, rngs=nnx.Rngs(0))


def test_lm_head_initialised_from_target_rows():
  rng = np.random.default_rng(7)
  tw = {"embed_tokens": rng.normal(size=(64, 16)).astype(np.float32),
        "lm_head": rng.normal(size=(64, 16)).astype(np.float32)}
  dv = np.array([3, 10, 40])
  model = eagle3.from_config(_cfg(init_lm_head_from_target=True), TINY, draft_vocab=dv, target_weights=tw,
                             rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(model.lm_head.kernel[...], tw["lm_head"][dv].T)
  np.testing.assert_array_equal(model.embed_tokens[...], tw["embed_tokens"])
