"""lkjax.models.layers against float64 numpy references and transformers' LlamaDecoderLayer."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lkjax.models import layers as L
from lkjax.perf import PerfOptions
from lkjax.models.base import Frozen


def _np_attention(q, k, v, mask):
  """float64 GQA reference: q [B,Tq,N,D], k/v [B,Tk,Nkv,D], mask [B,Tq,Tk]; empty rows -> 0."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, tq, n, d = q.shape
  g = n // k.shape[2]
  out = np.zeros((b, tq, n, d))
  for bi in range(b):
    for h in range(n):
      s = q[bi, :, h] @ k[bi, :, h // g].T / np.sqrt(d)
      s = np.where(mask[bi], s, -np.inf)
      for t in range(tq):
        if mask[bi, t].any():
          p = np.exp(s[t] - s[t].max())
          out[bi, t, h] = (p / p.sum()) @ v[bi, :, h // g]
  return out


def test_rms_norm_matches_numpy():
  x = np.random.default_rng(0).normal(size=(3, 5, 8)).astype(np.float32)
  w = np.linspace(0.5, 1.5, 8).astype(np.float32)
  x64 = x.astype(np.float64)
  want = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-6) * w
  np.testing.assert_allclose(L.rms_norm(jnp.asarray(x), jnp.asarray(w), 1e-6, jnp.float32), want, atol=1e-6)


def test_rms_norm_on_rows_keeps_shape_and_gradient():
  # rms_norm flattens to [rows, dim] (YNNPACK's slow [1, T, dim] sums); shape, values and both
  # gradients must be those of the norm taken over the array as given.
  def as_given(x, w):
    y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
    return y * w
  rng = np.random.default_rng(3)
  w = jnp.asarray(np.linspace(0.5, 1.5, 8), jnp.float32)
  for shape in [(8,), (1, 5, 8), (3, 5, 8), (2, 3, 4, 8)]:
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    c = jnp.asarray(rng.normal(size=shape), jnp.float32)
    got = L.rms_norm(x, w, 1e-6, jnp.float32)
    assert got.shape == shape
    np.testing.assert_allclose(got, as_given(x, w), atol=1e-6)
    g_got = jax.grad(lambda x, w: jnp.sum(L.rms_norm(x, w, 1e-6, jnp.float32) * c), argnums=(0, 1))(x, w)
    g_want = jax.grad(lambda x, w: jnp.sum(as_given(x, w) * c), argnums=(0, 1))(x, w)
    for a, b in zip(g_got, g_want):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # No scale, and scale plus bias (the MLP-Speculator's speculator_norm): the same on rows.
  x = jnp.asarray(rng.normal(size=(1, 5, 8)), jnp.float32)
  b = jnp.asarray(np.linspace(-0.3, 0.3, 8), jnp.float32)
  np.testing.assert_allclose(L.rms_norm(x, None, 1e-6, jnp.float32), as_given(x, 1.0), atol=1e-6)
  np.testing.assert_allclose(L.rms_norm(x, w, 1e-6, jnp.float32, bias=b), as_given(x, w) + b, atol=1e-6)


def test_rope_rotates_pairs_and_is_relative():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 4, 3, 8)).astype(np.float32)
  pos = rng.integers(0, 100, size=(2, 4)).astype(np.int32)
  got = np.asarray(L.apply_rope(jnp.asarray(x), jnp.asarray(pos), 500.0))
  # Pair (i, i + D/2) rotated by angle pos * 500^(-2i/D).
  want = np.empty_like(x, dtype=np.float64)
  for i in range(4):
    a = pos[..., None] * 500.0 ** (-2 * i / 8)
    x1, x2 = x[..., i].astype(np.float64), x[..., i + 4].astype(np.float64)
    want[..., i] = x1 * np.cos(a) - x2 * np.sin(a)
    want[..., i + 4] = x2 * np.cos(a) + x1 * np.sin(a)
  np.testing.assert_allclose(got, want, atol=1e-5)
  # q(p) . k(s) depends on p - s only.
  q, k = x[:1, :1], x[1:, :1]
  d1 = np.sum(L.apply_rope(q, jnp.array([[7]]), 500.0) * L.apply_rope(k, jnp.array([[3]]), 500.0))
  d2 = np.sum(L.apply_rope(q, jnp.array([[57]]), 500.0) * L.apply_rope(k, jnp.array([[53]]), 500.0))
  np.testing.assert_allclose(d1, d2, rtol=1e-5)


def test_gqa_attention_dense_and_own_position_keys():
  rng = np.random.default_rng(2)
  b, t, n, nkv, d, s = 2, 5, 4, 2, 8, 3
  q = rng.normal(size=(b, t, n, d)).astype(np.float32)
  k = rng.normal(size=(b, t, nkv, d)).astype(np.float32)
  v = rng.normal(size=(b, t, nkv, d)).astype(np.float32)
  mask = rng.random((b, t, t)) < 0.6
  mask[0, 2] = False                       # a fully masked (padding) row must give 0, not NaN
  got = np.asarray(L.gqa_attention(q, k, v, jnp.asarray(mask)))
  np.testing.assert_allclose(got, _np_attention(q, k, v, mask), atol=1e-5)
  assert np.all(got[0, 2] == 0)

  # Own-position keys == dense attention over [k | own keys of every position] with a block-diagonal mask.
  sk = rng.normal(size=(b, t, s, nkv, d)).astype(np.float32)
  sv = rng.normal(size=(b, t, s, nkv, d)).astype(np.float32)
  smask = rng.random((b, t, s)) < 0.7
  got = np.asarray(L.gqa_attention(q, k, v, jnp.asarray(mask), self_k=sk, self_v=sv, self_mask=jnp.asarray(smask)))
  k_all = np.concatenate([k, sk.reshape(b, t * s, nkv, d)], axis=1)
  v_all = np.concatenate([v, sv.reshape(b, t * s, nkv, d)], axis=1)
  own = np.zeros((b, t, t * s), bool)
  for ti in range(t):
    own[:, ti, ti * s:(ti + 1) * s] = smask[:, ti]
  want = _np_attention(q, k_all, v_all, np.concatenate([mask, own], axis=-1))
  np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("with_self", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_gqa_attention_custom_vjp_equals_autodiff(with_self, dtype):
  """The hand-written backward (scores recomputed, dS = P (dP - delta)) against autodiff of the same forward."""
  rng = np.random.default_rng(5)
  b, t, n, nkv, d, s = 2, 7, 6, 2, 8, 3
  cast = lambda x: jnp.asarray(x.astype(np.float32)).astype(dtype)
  q, k, v = (cast(rng.normal(size=sh)) for sh in [(b, t, n, d), (b, t, nkv, d), (b, t, nkv, d)])
  mask = np.tril(np.ones((t, t), bool))[None].repeat(b, 0) & (rng.random((b, t, t)) < 0.8)
  mask[1, 3] = False                       # a fully masked row (padding): zero output, zero gradient
  kw = {}
  if with_self:
    smask = rng.random((b, t, s)) < 0.7
    smask[1, 3] = False
    kw = dict(self_k=cast(rng.normal(size=(b, t, s, nkv, d))), self_v=cast(rng.normal(size=(b, t, s, nkv, d))),
              self_mask=jnp.asarray(smask))
  w = jnp.asarray(rng.normal(size=(b, t, n, d)).astype(np.float32))

  def loss(fn, q, k, v, sk=None, sv=None):
    extra = dict(kw, self_k=sk, self_v=sv) if with_self else {}
    return jnp.sum(fn(q, k, v, jnp.asarray(mask), **extra).astype(jnp.float32) * w)

  args = (q, k, v) + ((kw["self_k"], kw["self_v"]) if with_self else ())
  argnums = tuple(range(len(args)))
  got = jax.grad(lambda *a: loss(L.gqa_attention, *a), argnums)(*args)
  want = jax.grad(lambda *a: loss(L.gqa_attention_reference, *a), argnums)(*args)
  np.testing.assert_array_equal(np.asarray(L.gqa_attention(q, k, v, jnp.asarray(mask), **kw), np.float32),
                                np.asarray(L.gqa_attention_reference(q, k, v, jnp.asarray(mask), **kw), np.float32))
  tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=0.05, atol=0.05)
  for g, r in zip(got, want):
    assert g.dtype == r.dtype
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), **tol)
  assert np.all(np.asarray(got[0], np.float32)[1, 3] == 0)   # the padding row's query gets no gradient


@pytest.mark.parametrize("impl", ["custom_vjp", "autodiff"])
@pytest.mark.parametrize("block", [3, 4])
def test_gqa_attention_causal_blocks_equal_full(impl, block):
  """causal=True (query blocks attend to their key prefix only) against the full attention: packed
  segments, padding, own-position keys, a length that the block does not divide; values and gradients."""
  perf = PerfOptions(attention_grad=impl, causal_block=block)
  rng = np.random.default_rng(11)
  b, t, n, nkv, d, s = 2, 11, 4, 2, 8, 2
  q, k, v = (jnp.asarray(rng.normal(size=sh).astype(np.float32)) for sh in [(b, t, n, d), (b, t, nkv, d),
                                                                            (b, t, nkv, d)])
  sk, sv = (jnp.asarray(rng.normal(size=(b, t, s, nkv, d)).astype(np.float32)) for _ in range(2))
  seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 2, 3, 0, 0], [1] * 11])
  idx = jnp.broadcast_to(jnp.arange(t), (b, t))
  mask = L.segment_causal_mask(seg, seg, idx, idx)
  smask = jnp.asarray(rng.random((b, t, s)) < 0.7)
  w = jnp.asarray(rng.normal(size=(b, t, n, d)).astype(np.float32))

  def loss(causal, *a):
    out = L.gqa_attention(*a[:3], mask, self_k=a[3], self_v=a[4], self_mask=smask, causal=causal, perf=perf)
    return jnp.sum(out * w), out

  args = (q, k, v, sk, sv)
  (_, got), g_got = jax.value_and_grad(lambda *a: loss(True, *a), range(5), has_aux=True)(*args)
  (_, want), g_want = jax.value_and_grad(lambda *a: loss(False, *a), range(5), has_aux=True)(*args)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
  for x, y in zip(g_got, g_want):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5)
  # The blocking really happened: a key after its query (which causal=True promises away) is ignored.
  leaky = mask.at[:, 0, t - 1].set(True)
  full = L.gqa_attention(q, k, v, leaky, perf=perf)
  blocked = L.gqa_attention(q, k, v, leaky, causal=True, perf=perf)
  assert not np.allclose(np.asarray(full)[:, 0], np.asarray(blocked)[:, 0])
  # causal_block = 0: causal=True attends to all keys (no blocking), the same as the full attention.
  unblocked = L.gqa_attention(q, k, v, leaky, causal=True, perf=PerfOptions(attention_grad=impl, causal_block=0))
  np.testing.assert_array_equal(np.asarray(unblocked), np.asarray(full))
  with pytest.raises(ValueError, match="causal=True needs as many keys"):
    L.gqa_attention(q, k[:, :5], v[:, :5], mask[:, :, :5], causal=True, perf=perf)


def test_segment_causal_mask_hand_example():
  seg = jnp.array([[1, 1, 2, 2, 0]])
  idx = jnp.arange(5)[None]
  want = np.array([[1, 0, 0, 0, 0],
                   [1, 1, 0, 0, 0],
                   [0, 0, 1, 0, 0],
                   [0, 0, 1, 1, 0],
                   [0, 0, 0, 0, 0]], bool)
  np.testing.assert_array_equal(L.segment_causal_mask(seg, seg, idx, idx)[0], want)


def test_decoder_layer_matches_transformers_llama():
  torch = pytest.importorskip("torch")
  from transformers import LlamaConfig
  from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

  hidden, heads, kv, hd, inter, theta, eps = 16, 4, 2, 4, 24, 1000.0, 1e-5
  layer = L.LlamaDecoderLayer(hidden, num_heads=heads, num_kv_heads=kv, head_dim=hd, intermediate=inter,
                              rms_norm_eps=eps, rope_theta=theta, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(3)
  for norm in (layer.input_layernorm, layer.post_attention_layernorm):
    norm.weight[...] = jnp.asarray(rng.uniform(0.5, 1.5, hidden), jnp.float32)
  cfg = LlamaConfig(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd,
                    intermediate_size=inter, rms_norm_eps=eps, rope_parameters={"rope_type": "default",
                    "rope_theta": theta}, attention_bias=False, mlp_bias=False)
  cfg._attn_implementation = "eager"
  ref = LlamaDecoderLayer(cfg, layer_idx=0).double()
  sd = {
      "input_layernorm.weight": layer.input_layernorm.weight[...],
      "post_attention_layernorm.weight": layer.post_attention_layernorm.weight[...],
      **{f"self_attn.{p}.weight": getattr(layer.self_attn, p).kernel[...].T for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
      **{f"mlp.{p}.weight": getattr(layer.mlp, p).kernel[...].T for p in ("gate_proj", "up_proj", "down_proj")},
  }
  ref.load_state_dict({k: torch.tensor(np.asarray(v, np.float64)) for k, v in sd.items()})

  # A packed row: two documents, positions restart at the boundary.
  x = rng.normal(size=(1, 7, hidden)).astype(np.float32)
  seg = np.array([[1, 1, 1, 1, 2, 2, 2]])
  pos = np.array([[0, 1, 2, 3, 0, 1, 2]])
  idx = np.arange(7)[None]
  mask = np.asarray(L.segment_causal_mask(jnp.asarray(seg), jnp.asarray(seg), jnp.asarray(idx), jnp.asarray(idx)))
  got = np.asarray(layer(jnp.asarray(x), jnp.asarray(pos), jnp.asarray(mask)))

  pos_t = torch.tensor(pos)
  xt = torch.tensor(x.astype(np.float64))
  cos, sin = LlamaRotaryEmbedding(cfg)(xt, pos_t)
  add_mask = torch.tensor(np.where(mask, 0.0, -1e9)[:, None])
  with torch.no_grad():
    want = ref(xt, attention_mask=add_mask, position_ids=pos_t, position_embeddings=(cos.double(), sin.double()))
  want = want[0] if isinstance(want, tuple) else want
  np.testing.assert_allclose(got, want.numpy(), atol=1e-5)


def test_parameters_carry_logical_axes_and_float32():
  layer = L.LlamaDecoderLayer(16, num_heads=4, num_kv_heads=2, head_dim=4, intermediate=24, rms_norm_eps=1e-5,
                              rope_theta=1e4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert layer.self_attn.q_proj.kernel.get_metadata()["out_sharding"] == ("embed", "heads")
  assert layer.self_attn.k_proj.kernel.get_metadata()["out_sharding"] == ("embed", "kv")
  assert layer.mlp.down_proj.kernel.get_metadata()["out_sharding"] == ("mlp", "embed")
  params = nnx.state(layer, nnx.Param)
  for path, var in nnx.to_flat_state(params):
    axes = var.get_metadata()["out_sharding"]
    assert set(axes) <= set(L.LOGICAL_AXES) | {None}, path
    assert var[...].dtype == jnp.float32, path
  y = layer(jnp.ones((1, 3, 16)), jnp.arange(3)[None], jnp.tril(jnp.ones((1, 3, 3), bool)))
  assert y.dtype == jnp.bfloat16


def test_cache_helpers():
  cache = jnp.zeros((2, 4, 1))
  new = jnp.array([[[1.0], [2.0]], [[3.0], [4.0]]])
  out = L.write_cache(cache, new, jnp.array([[1, 2], [3, 4]]))    # slot 4 is out of range: dropped
  np.testing.assert_array_equal(out[..., 0], [[0, 1, 2, 0], [0, 0, 0, 3]])
  L.check_cache_room(jnp.array([1, 2]), 2, 4)
  with pytest.raises(ValueError, match="max_len=4"):
    L.check_cache_room(jnp.array([1, 3]), 2, 4)


def test_draft_vocab_checks_and_mapping():
  assert L.check_draft_vocab(None, 10) is None
  np.testing.assert_array_equal(L.check_draft_vocab([1, 4, 7], 10, 3), [1, 4, 7])
  for bad, size in (([4, 1], 0), ([1, 10], 0), ([1.0, 2.0], 0), ([1, 2], 3)):
    with pytest.raises(ValueError, match="draft_vocab"):
      L.check_draft_vocab(np.asarray(bad), 10, size)
  with pytest.raises(ValueError, match="draft_vocab_size=5"):
    L.check_draft_vocab(None, 10, 5)
  dv = Frozen(jnp.array([2, 5, 9], jnp.int32))
  np.testing.assert_array_equal(L.draft_to_target(dv, jnp.array([[0, 2, 1]])), [[2, 9, 5]])
  with pytest.raises(ValueError, match="dtype"):
    L.parse_dtype("float16")
  with pytest.raises(ValueError, match="lm_head"):
    L.check_target_weights({"lm_head": np.zeros((3, 4))}, 10, 4, ("lm_head",))


def test_sample_tokens_greedy_and_tempered_frequencies():
  logits = jnp.array([[0.0, 1.0, 2.0, -1.0], [3.0, 0.0, 0.0, 0.0]])
  np.testing.assert_array_equal(L.sample_tokens(logits, 0.0, None), [2, 0])
  n = 4000
  rows = jnp.broadcast_to(logits[:1], (n, 4))
  draws = np.asarray(L.sample_tokens(rows, 2.0, jax.random.key(0)))
  freq = np.bincount(draws, minlength=4) / n
  p = np.exp(np.array([0.0, 1.0, 2.0, -1.0]) / 2.0)
  np.testing.assert_allclose(freq, p / p.sum(), atol=0.03)
  with pytest.raises(ValueError, match="rng"):
    L.sample_tokens(logits, 1.0, None)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_unstack_equals_indexing_in_value_and_gradient(dtype):
  """`unstack` (one stack in the backward) against ``x[k]`` per slice: slice 1 used twice, slice 3 unused."""
  r = np.random.default_rng(0)
  x = jnp.asarray(r.standard_normal((4, 3, 5)), dtype)
  w = jnp.asarray(r.standard_normal((3, 3, 5)), dtype)

  def loss(x, split):
    parts = split(x)
    return jnp.sum(parts[0] * w[0]) + jnp.sum(jnp.sin(parts[1]) * w[1]) + jnp.sum(parts[1] * parts[2] * w[2])

  by_index = lambda x: [x[k] for k in range(x.shape[0])]  # noqa: E731
  for a, b in zip(L.unstack(x), by_index(x)):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  g = jax.jit(jax.grad(lambda x: loss(x, L.unstack)))(x)
  g_ref = jax.jit(jax.grad(lambda x: loss(x, by_index)))(x)
  assert g.dtype == x.dtype and g.shape == x.shape
  np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(g_ref, np.float32))
  assert not np.asarray(g[3], np.float32).any()
