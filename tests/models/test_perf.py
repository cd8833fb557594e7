"""lkjax.perf: the options resolve per backend and are validated; the NN-form matmul equals ``x @ w`` in value
and gradient."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lkjax import perf as M


def test_auto_options_follow_the_backend_and_configs_override_them():
  assert M.resolve(backend="cpu") == M.PerfOptions(matmul="nn", attention_grad="custom_vjp", causal_block=256)
  assert M.resolve(backend="gpu") == M.PerfOptions(matmul="xla", attention_grad="custom_vjp", causal_block=0)
  assert M.resolve(backend="tpu", causal_block=128).causal_block == 128
  assert M.from_config({}) == M.resolve()          # no perf section: this backend's auto options
  got = M.from_config({"perf": {"matmul": "xla", "attention_grad": "autodiff", "causal_block": 0}})
  assert got == M.PerfOptions(matmul="xla", attention_grad="autodiff", causal_block=0)
  assert M.or_default(None) == M.resolve() and M.or_default(got) is got


@pytest.mark.parametrize("perf,match", [({"matmul": "fast"}, "perf.matmul"), ({"attention_grad": "x"}, "attention_grad"),
                                        ({"causal_block": -2}, "causal_block"), ({"nope": 1}, "unknown keys")])
def test_bad_options_name_the_key(perf, match):
  with pytest.raises(ValueError, match=match):
    M.from_config({"perf": perf})


def test_models_keep_their_options_and_build_the_step_they_name():
  """The options reach every layer as a static attribute: two drafts built alike have equal graphs, and
  an option changes the graph (another compiled program), never a global switch."""
  from flax import nnx
  from lkjax.models.layers import LlamaDecoderLayer
  kw = dict(num_heads=2, num_kv_heads=1, head_dim=8, intermediate=32, rms_norm_eps=1e-5, rope_theta=1e4)
  cpu = M.PerfOptions(matmul="nn", causal_block=4)
  a = LlamaDecoderLayer(16, rngs=nnx.Rngs(0), perf=cpu, **kw)
  b = LlamaDecoderLayer(16, rngs=nnx.Rngs(0), perf=cpu, **kw)
  c = LlamaDecoderLayer(16, rngs=nnx.Rngs(0), perf=M.PerfOptions(), **kw)
  assert nnx.graphdef(a) == nnx.graphdef(b) and nnx.graphdef(a) != nnx.graphdef(c)
  assert a.self_attn.perf is cpu and a.mlp.gate_proj.dot_general is M.dense_dot_general(cpu)
  x = jax.random.normal(jax.random.key(0), (1, 6, 16))
  pos = jnp.arange(6)[None]
  mask = jnp.tril(jnp.ones((1, 6, 6), bool))
  nnx.update(c, nnx.state(a))
  np.testing.assert_allclose(a(x, pos, mask), c(x, pos, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(6, 8), (2, 6, 8), (7, 9)])
def test_physical_transpose_is_transpose(shape):
  a = jnp.arange(np.prod(shape[-2:]), dtype=jnp.float32).reshape(shape[-2:])
  np.testing.assert_array_equal(M.physical_transpose(a), a.T)


# The first three take dx = g @ w.T, the last two (few rows) dx = (w @ g.T).T (`transposes_cotangent`).
MATMUL_SHAPES = [((12, 8), (8, 6)), ((3, 4, 8), (8, 10)), ((5, 7), (7, 9)), ((4, 16), (16, 32)),
                 ((2, 3, 24), (24, 40))]


def test_transposes_cotangent_for_few_rows_only():
  rows = lambda xs: int(np.prod(xs[:-1]))  # noqa: E731
  assert [M.transposes_cotangent(rows(xs), *ws) for xs, ws in MATMUL_SHAPES] == [False] * 3 + [True] * 2
  # An LM head [576, 8192]: one 256-token sequence per device copies g and the product, 512 rows the weight.
  assert M.transposes_cotangent(128, 576, 8192) and M.transposes_cotangent(256, 576, 8192)
  assert not M.transposes_cotangent(512, 576, 8192) and not M.transposes_cotangent(2048, 576, 8192)
  assert M.transposes_cotangent(128, 576, 576) and not M.transposes_cotangent(256, 576, 576)


@pytest.mark.parametrize("xshape,wshape", MATMUL_SHAPES)
def test_matmul_value_and_grads_equal_dot_fp32(xshape, wshape):
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, xshape, jnp.float32)
  w = jax.random.normal(kw, wshape, jnp.float32)
  g = jax.random.normal(kg, xshape[:-1] + wshape[-1:], jnp.float32)
  ref = lambda x, w: jnp.sum(jnp.matmul(x, w, precision="highest") * g)  # noqa: E731
  got = lambda x, w: jnp.sum(M.matmul(x, w, True) * g)  # noqa: E731
  np.testing.assert_allclose(M.matmul(x, w, True), jnp.matmul(x, w, precision="highest"), rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.jit(jax.grad(got, (0, 1)))(x, w), jax.grad(ref, (0, 1))(x, w)):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_matmul_bf16_accumulates_in_fp32():
  # 4096 products of 1 + 2^-8: a bf16 accumulator would stall near 256 (spacing 2 there); f32 does not.
  k = 4096
  x = jnp.full((2, k), 1.0 + 2.0 ** -7, jnp.bfloat16)
  w = jnp.full((k, 3), 1.0, jnp.bfloat16)
  y = M.matmul(x, w, True)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32), k * (1 + 2.0 ** -7), rtol=2 ** -7)
  gx, gw = jax.grad(lambda x, w: jnp.sum(M.matmul(x, w, True).astype(jnp.float32)), (0, 1))(x, w)
  assert gx.dtype == gw.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(gw, np.float32), 2 * (1 + 2.0 ** -7), rtol=2 ** -7)


def test_nn_and_xla_paths_agree_in_a_linear_layer():
  from flax import nnx
  from lkjax.models.layers import dense
  layer = dense(16, 12, ("embed", "mlp"), dtype=jnp.float32, rngs=nnx.Rngs(0), perf=M.PerfOptions(matmul="nn"))
  xla = dense(16, 12, ("embed", "mlp"), dtype=jnp.float32, rngs=nnx.Rngs(0), perf=M.PerfOptions(matmul="xla"))
  x = jax.random.normal(jax.random.key(1), (2, 5, 16))
  y_nn = layer(x)
  y_xla = xla(x)
  np.testing.assert_allclose(y_nn, y_xla, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(y_nn, x @ layer.kernel[...], rtol=1e-5, atol=1e-5)


def test_dense_dot_general_falls_back_for_other_contractions():
  a = jax.random.normal(jax.random.key(0), (4, 3))
  b = jax.random.normal(jax.random.key(1), (5, 3))
  out = M.dense_dot_general(M.PerfOptions(matmul="nn"))(a, b, (((1,), (1,)), ((), ())))
  np.testing.assert_allclose(out, a @ b.T, rtol=1e-5, atol=1e-5)


def test_bad_arguments():
  with pytest.raises(ValueError, match="do not contract"):
    M.matmul(jnp.ones((2, 3)), jnp.ones((4, 5)), True)


# Many rows: the weight's gradient as (x.T @ g).T with 10 output columns, as g.T @ x with 4.
@pytest.mark.parametrize("rows,cols", [(1, 10), (3, 10), (M.MIN_ROWS_TO_TRANSPOSE + 5, 10),
                                       (M.MIN_ROWS_TO_TRANSPOSE + 5, 4)])
def test_matmul_t_equals_dot_with_transpose_for_few_and_many_rows(rows, cols):
  kx, kw, kg = jax.random.split(jax.random.key(2), 3)
  x = jax.random.normal(kx, (rows, 8), jnp.float32)
  w_rows = jax.random.normal(kw, (cols, 8), jnp.float32)
  g = jax.random.normal(kg, (rows, cols), jnp.float32)
  np.testing.assert_allclose(M.matmul_t(x, w_rows, True), jnp.matmul(x, w_rows.T, precision="highest"),
                             rtol=1e-5, atol=1e-5)
  got = jax.grad(lambda x, w: jnp.sum(M.matmul_t(x, w, True) * g), (0, 1))(x, w_rows)
  ref = jax.grad(lambda x, w: jnp.sum(jnp.matmul(x, w.T, precision="highest") * g), (0, 1))(x, w_rows)
  for a, b in zip(got, ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
  with pytest.raises(ValueError, match="do not contract"):
    M.matmul_t(x, jnp.ones((10, 9)), True)


def test_matmul_t_backward_copies_no_weight():
  """dx takes the stored rows as they are at every row count, and the weight's gradient copies the
  smaller side (`grad_rows_from_cotangent`)."""
  assert not M.grad_rows_from_cotangent(M.MIN_ROWS_TO_TRANSPOSE + 5, 8, 10)
  assert M.grad_rows_from_cotangent(M.MIN_ROWS_TO_TRANSPOSE + 5, 8, 4)
  assert not M.grad_rows_from_cotangent(2048, 576, 8192) and M.grad_rows_from_cotangent(256, 576, 300)
  dx = jax.jit(jax.grad(lambda x, w: jnp.sum(M.matmul_t(x, w, True).astype(jnp.float32))))
  hlo = dx.lower(jnp.ones((256, 576), jnp.bfloat16), jnp.ones((8192, 576), jnp.bfloat16)).compile().as_text()
  # One sequence against a [8192, 576] head: dx is one dot on the rows as stored (contracting their dim 0),
  # with no transposed copy of the cotangent (bf16[8192,256]) or of the weight (bf16[576,8192]).
  assert re.search(r"f32\[256,576\]\S* dot\(.*rhs_contracting_dims=\{0\}", hlo), hlo
  assert "[8192,256]" not in hlo and "[576,8192]" not in hlo, hlo
