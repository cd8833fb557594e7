"""MTP: SmolLM2-sized shapes, training forward == exact drafting, gradients, sharded forward, numpy oracle."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from lkjax.models import mtp
from lkjax.models.base import Frozen

from draft_testing import SMOL, TINY, draft_along_truth



def _cfg(**kw):
  c = dict(arch="mtp", num_heads=3, draft_vocab_size=0, dtype="float32", share_weights=True)
  c.update(kw)
  return ml_collections.ConfigDict(c)


def _weights(seed=0, target=TINY):
  rng = np.random.default_rng(seed)
  v, h = target.vocab_size, target.hidden_size
  return {"embed_tokens": rng.normal(size=(v, h)).astype(np.float32),
          "lm_head": rng.normal(size=(v, h)).astype(np.float32) * 0.3,
          "norm": rng.uniform(0.5, 1.5, size=(h,)).astype(np.float32)}


def _batch(b=2, seed=0):
  """Packed rows: row 0 = docs of 6 and 4 tokens, row 1 = 8 tokens + 2 padding."""
  rng = np.random.default_rng(seed)
  seg = np.array([[1] * 6 + [2] * 4, [1] * 8 + [0] * 2] * (b // 2), np.int32)
  pos = np.array([list(range(6)) + list(range(4)), list(range(8)) + [0, 0]] * (b // 2), np.int32)
  t = seg.shape[1]
  return dict(input_ids=rng.integers(0, TINY.vocab_size, (b, t)).astype(np.int32),
              loss_mask=(seg > 0).astype(np.uint8), segment_ids=seg, positions=pos,
              final_hidden=rng.normal(size=(b, t, TINY.hidden_size)).astype(np.float32))


@pytest.mark.parametrize("share", [True, False])
def test_smollm2_shapes_and_parameter_counts(share):
  model = nnx.eval_shape(lambda: mtp.from_config(_cfg(num_heads=7, share_weights=share), SMOL, rngs=nnx.Rngs(0)))
  H, V, I = 576, 49152, 1536
  q, kv = 9 * 64, 3 * 64
  per_module = (2 * H                           # enorm, hnorm
                + 2 * H * H                     # eh_proj
                + H * (q + 2 * kv) + q * H      # q/k/v/o
                + 3 * H * I                     # gate/up/down
                + 2 * H                         # input_layernorm, post_attention_layernorm
                + H)                            # shared_head_norm
  assert per_module == 4_205_376
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert n_params == per_module * (1 if share else 7)
  assert sum(x.size for x in jax.tree.leaves(nnx.state(model, Frozen))) == 2 * V * H
  assert model.draft_vocab is None and model.draft_vocab_size == V
  assert isinstance(model.lm_head, Frozen) and model.lm_head.shape == (V, H)
  b, t = 2, 16
  batch = dict(input_ids=jax.ShapeDtypeStruct((b, t), jnp.int32), segment_ids=jax.ShapeDtypeStruct((b, t), jnp.int32),
               positions=jax.ShapeDtypeStruct((b, t), jnp.int32),
               final_hidden=jax.ShapeDtypeStruct((b, t, H), jnp.bfloat16))
  gd, state = nnx.split(model)
  assert jax.eval_shape(lambda s, bt: nnx.merge(gd, s)(bt), state, batch).shape == (7, b, t, V)


def _rms(x, w, eps=1e-5):
  return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * w


def test_depth_zero_matches_numpy_reference():
  """Depth 0 of a single-token document: attention is over itself, so attn = o_proj(v_proj(.))."""
  tw = _weights(1)
  model = mtp.from_config(_cfg(num_heads=1), TINY, target_weights=tw, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(2)
  mod = model.mtp[0]
  for norm in (mod.enorm, mod.hnorm, mod.block.input_layernorm, mod.block.post_attention_layernorm):
    norm.weight[...] = jnp.asarray(rng.uniform(0.5, 1.5, 16), jnp.float32)
  ids = np.array([[5, 9]], np.int32)
  h = rng.normal(size=(1, 2, 16)).astype(np.float32)
  batch = dict(input_ids=ids, segment_ids=np.array([[1, 2]], np.int32), positions=np.zeros((1, 2), np.int32),
               final_hidden=h)
  got = np.asarray(model(batch))[0, 0, 0]
  k = lambda m: np.asarray(m.kernel[...], np.float64)
  w = lambda n: np.asarray(n.weight[...], np.float64)
  blk = mod.block
  u = np.concatenate([_rms(tw["embed_tokens"][9].astype(np.float64), w(mod.enorm)),
                      _rms(h[0, 0].astype(np.float64), w(mod.hnorm))]) @ k(mod.eh_proj)
  a = _rms(u, w(blk.input_layernorm))
  v = (a @ k(blk.self_attn.v_proj)).reshape(2, 4)
  attn = np.repeat(v, 2, axis=0).reshape(-1) @ k(blk.self_attn.o_proj)   # each kv head serves 2 q heads
  hh = u + attn
  m = _rms(hh, w(blk.post_attention_layernorm))
  gate, up = m @ k(blk.mlp.gate_proj), m @ k(blk.mlp.up_proj)
  y = hh + (gate / (1 + np.exp(-gate)) * up) @ k(blk.mlp.down_proj)
  want = _rms(y, tw["norm"].astype(np.float64)) @ tw["lm_head"].T.astype(np.float64)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("share,truncated", [(True, False), (False, True)])
def test_training_forward_equals_drafting(share, truncated):
  K = 4
  dv = np.arange(0, TINY.vocab_size, 2) if truncated else None
  model = mtp.from_config(_cfg(num_heads=K, share_weights=share), TINY, draft_vocab=dv,
                          target_weights=_weights(3), rngs=nnx.Rngs(1))
  batch = _batch()
  train = np.asarray(nnx.jit(lambda m, b: m(b))(model, batch))
  assert train.shape == (K, 2, 10, TINY.vocab_size // (2 if truncated else 1))
  checked = 0
  for (b, t, end), logits in draft_along_truth(model, batch, K, ctx_keys=("final_hidden",)).items():
    for k in range(K):
      # Depth k at t reads x[t+1..t+k+1]; with all of them inside t's document the computations coincide
      # (this covers every position head_mask trains).
      if t + k + 1 < end:
        np.testing.assert_allclose(logits[k], train[k, b, t], atol=1e-5, rtol=0)
        checked += 1
  assert checked >= 15


def test_drafting_greedy_and_limits():
  dv = np.arange(1, TINY.vocab_size, 3)
  model = mtp.from_config(_cfg(num_heads=3), TINY, draft_vocab=dv, rngs=nnx.Rngs(2))
  batch = _batch()
  ctx = dict(final_hidden=batch["final_hidden"][:, :5], next_tokens=batch["input_ids"][:, 1:6],
             positions=batch["positions"][:, :5])
  cache0 = model.init_cache(2, 8)
  _, tokens, logits = model.propose(cache0, ctx, num_tokens=3, temperature=0.0, rng=None)
  np.testing.assert_array_equal(tokens, dv[np.argmax(np.asarray(logits), -1)])
  _, _, again = model.propose(cache0, ctx, num_tokens=3, temperature=0.0, rng=None, forced_tokens=tokens)
  np.testing.assert_allclose(again, logits, atol=1e-6)
  with pytest.raises(ValueError, match="num_tokens=4"):
    model.propose(cache0, ctx, num_tokens=4, temperature=0.0, rng=None)


def test_gradients_reach_only_trainable_params():
  tw = _weights(4)
  model = mtp.from_config(_cfg(num_heads=2, share_weights=False), TINY, target_weights=tw, rngs=nnx.Rngs(3))
  np.testing.assert_array_equal(model.mtp[1].shared_head_norm.weight[...], tw["norm"])
  batch = _batch()
  loss = lambda m: jnp.mean(jax.nn.log_softmax(m(batch)) ** 2)
  grads = nnx.jit(nnx.grad(loss))(model)
  g_paths = {p for p, _ in nnx.to_flat_state(grads)}
  assert g_paths == {p for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert not {("embed_tokens",), ("lm_head",)} & g_paths
  for path, g in nnx.to_flat_state(grads):
    assert float(jnp.max(jnp.abs(g[...]))) > 0, path


def test_sharded_forward_equals_single_device():
  cfg = _cfg(num_heads=2)
  batch = _batch(b=4)
  tw = _weights(5)
  ref = nnx.jit(lambda m, b: m(b))(mtp.from_config(cfg, TINY, target_weights=tw, rngs=nnx.Rngs(6)), batch)
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
  rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"),
           ("kv", "tensor"), ("vocab", "tensor"), ("head_dim", None))
  P = jax.sharding.PartitionSpec
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    model = mtp.from_config(cfg, TINY, target_weights=tw, rngs=nnx.Rngs(6))
    assert model.mtp[0].block.mlp.gate_proj.kernel[...].sharding.spec == P("fsdp", "tensor")
    assert model.lm_head[...].sharding.spec == P("tensor", "fsdp")
    sb = {k: jax.device_put(v, jax.sharding.NamedSharding(mesh, P(("data", "fsdp")))) for k, v in batch.items()}
    out = nnx.jit(lambda m, b: m(b))(model, sb)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


def test_config_errors():
  with pytest.raises(ValueError, match="hidden_size=32"):
    mtp.from_config(_cfg(hidden_size=32), TINY, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="norm"):
    mtp.from_config(_cfg(), TINY, target_weights={"embed_tokens": np.zeros((64, 16)), "lm_head": np.zeros((64, 16))},
                    rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="draft_vocab_size=5"):
    mtp.from_config(_cfg(draft_vocab_size=5), TINY, draft_vocab=np.arange(4), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="final_hidden"):
    b = _batch()
    b["final_hidden"] = b["final_hidden"][..., :8]
    mtp.from_config(_cfg(num_heads=1), TINY, rngs=nnx.Rngs(0))(b)
