"""Performance options: HOW the draft's dense layers and training attention are computed, never WHAT.

Every option is a field of `PerfOptions`, set from the config's ``perf`` section (`from_config`) and handed
to the draft's constructor explicitly (`lkjax.models.registry.build_draft`); the modules keep it as a static
attribute, so a step traced with other options is another compiled program and nothing global is flipped.
``"auto"`` picks per backend: the CPU forms below where a side-by-side run on CPU showed they help
(benchmarks/README.md: bench_matmul, bench_parts), the plain XLA forms on GPU/TPU, whose libraries need no
such help.

  matmul          "nn": dense layers as bf16 row-major dots in the forward AND backward pass (below);
                  "xla": XLA's dot with folded transposes.                       auto: nn on CPU, else xla
  attention_grad  "custom_vjp": flash-style backward that recomputes the scores instead of keeping
                  [B, N, Tq, Tk] residuals; "autodiff": plain autodiff of the same forward.   default custom_vjp
  causal_block    query rows per block of causal training attention (a block skips the keys after it;
                  same values up to summation order); 0: all keys.               auto (-1): 256 on CPU, else 0

Why the NN matmul helps on CPU (``benchmarks/bench_matmul.py``, XLA CPU with its YNNPACK dot fusions): a bf16
``[M, K] @ [K, N]`` dot runs at full speed only when both operands are physically row-major with the
contraction on lhs dim 1 / rhs dim 0 ("NN") and the result is float32.  Autodiff of ``x @ W`` gives
``dx = g @ W.T`` and ``dW = x.T @ g``; XLA folds those transposes into the dot ("NT" / "TN"), and such bf16
dots run at about 40% of the NN speed.  A transpose written as split-reshape -> transpose -> reshape is not
folded: XLA materialises it (a cheap copy of one operand) and the dot stays an NN dot.  With few rows the
weight's copy costs more than the dot saves, and ``dx`` is taken as ``(w @ g.T).T`` instead
(`transposes_cotangent`).  A weight stored as rows ``[N, K]`` (`matmul_t`) needs no copy for ``dx``.
The numbers are those of ``x @ w`` either way: float32 accumulation, then a cast to the operand dtype.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from lkjax.sharding import cotangent_like

MATMULS = ("nn", "xla")
ATTENTION_GRADS = ("custom_vjp", "autodiff")
CPU_CAUSAL_BLOCK = 256   # best of {all keys, 256, 128, 64} rows at T = 512 on CPU (bench_parts)


@dataclasses.dataclass(frozen=True)
class PerfOptions:
  """Resolved performance options (no ``"auto"``); hashable, kept as a static module attribute."""
  matmul: str = "xla"
  attention_grad: str = "custom_vjp"
  causal_block: int = 0

  def __post_init__(self):
    if self.matmul not in MATMULS:
      raise ValueError(f"perf.matmul={self.matmul!r}: expected one of {MATMULS} (or 'auto' in a config)")
    if self.attention_grad not in ATTENTION_GRADS:
      raise ValueError(f"perf.attention_grad={self.attention_grad!r}: expected one of {ATTENTION_GRADS}")
    if int(self.causal_block) < 0:
      raise ValueError(f"perf.causal_block={self.causal_block}: must be >= 0 (0: all keys; -1 only as 'auto')")

  @property
  def nn(self) -> bool:
    return self.matmul == "nn"


def resolve(matmul: str = "auto", attention_grad: str = "custom_vjp", causal_block: int = -1,
            backend: str | None = None) -> PerfOptions:
  """`PerfOptions` with ``"auto"`` (and ``causal_block=-1``) decided for ``backend`` (default: JAX's)."""
  cpu = (backend or jax.default_backend()) == "cpu"
  if matmul == "auto":
    matmul = "nn" if cpu else "xla"
  block = int(causal_block)
  if block == -1:
    block = CPU_CAUSAL_BLOCK if cpu else 0
  return PerfOptions(matmul=str(matmul), attention_grad=str(attention_grad), causal_block=block)


def from_config(config: Mapping[str, Any] | None) -> PerfOptions:
  """The config's ``perf`` section (missing keys: auto) -> `PerfOptions` for this backend."""
  perf = (config or {}).get("perf") or {}
  unknown = set(perf) - {"matmul", "attention_grad", "causal_block"}
  if unknown:
    raise ValueError(f"config.perf has unknown keys {sorted(unknown)}: expected matmul, attention_grad, "
                     "causal_block")
  return resolve(str(perf.get("matmul", "auto")), str(perf.get("attention_grad", "custom_vjp")),
                 int(perf.get("causal_block", -1)))


def or_default(perf: PerfOptions | None) -> PerfOptions:
  """``perf``, or the auto options of this backend when None (models built without a config, e.g. tests)."""
  return resolve() if perf is None else perf


def physical_transpose(a: jax.Array) -> jax.Array:
  """``a.T`` for a 2-D array, written so that XLA materialises it instead of folding it into a dot."""
  r, c = a.shape
  if c % 2 == 0:
    return jnp.transpose(a.reshape(r, 2, c // 2), (1, 2, 0)).reshape(c, r)
  if r % 2 == 0:
    return jnp.transpose(a.reshape(2, r // 2, c), (2, 0, 1)).reshape(c, r)
  return a.T  # odd x odd: rare and tiny in practice; XLA's own handling


def _dot_f32(a: jax.Array, b: jax.Array) -> jax.Array:
  return jax.lax.dot(a, b, preferred_element_type=jnp.float32)


def transposes_cotangent(m: int, k: int, n: int) -> bool:
  """Whether the backward pass of an ``[m, k] @ [k, n]`` `matmul` computes ``dx = g @ w.T`` as
  ``(w @ g.T).T`` (NN dots either way): it materialises ``g`` and the ``[k, m]`` product (m * (n + k)
  elements) instead of the ``[n, k]`` weight (k * n), which pays when that is at most half the elements.

  It pays with few rows (e.g. one 256-token sequence against an LM head ``[576, 8192]``: no copy of the
  head per step) and never with many (the weight's copy is then the smaller one).
  """
  return 2 * m * (n + k) < k * n


@jax.custom_vjp
def _nn_matmul(x2: jax.Array, w: jax.Array) -> jax.Array:
  # float32 out: the cast to the operand dtype happens outside (in `matmul`), where XLA fuses it into
  # the consumer's elementwise pass; a cast right after the dot is a separate pass over the result.
  return _dot_f32(x2, w)


def _nn_fwd(x2, w):
  return _nn_matmul(x2, w), (x2, w)


def _nn_bwd(res, g):
  x2, w = res
  # g is the f32 cotangent of the cast in `matmul`, i.e. an exactly representable operand-dtype value:
  # casting it back is lossless.
  g = g.astype(jnp.result_type(x2, w))
  if transposes_cotangent(x2.shape[0], *w.shape):
    dx = physical_transpose(_dot_f32(w, physical_transpose(g)).astype(x2.dtype))
  else:
    dx = _dot_f32(g, physical_transpose(w)).astype(x2.dtype)
  dw = _dot_f32(physical_transpose(x2), g).astype(w.dtype)
  return cotangent_like(dx, x2), cotangent_like(dw, w)


_nn_matmul.defvjp(_nn_fwd, _nn_bwd)


def matmul(x: jax.Array, w: jax.Array, nn: bool) -> jax.Array:
  """``x [..., K] @ w [K, N] -> [..., N]`` in the operands' (common) dtype, float32 accumulation; ``nn``: the
  NN form (module docstring), else XLA's dot."""
  if w.ndim != 2 or x.shape[-1] != w.shape[0]:
    raise ValueError(f"matmul: x {x.shape} and w {w.shape} do not contract (need w 2-D, x[-1] == w[0])")
  if not nn:
    return jnp.matmul(x, w, preferred_element_type=jnp.float32).astype(jnp.result_type(x, w))
  return _on_rows(_nn_matmul, x, w, w.shape[1])


def _on_rows(f, x: jax.Array, w: jax.Array, n: int) -> jax.Array:
  """``f(x2, w)`` (float32 ``[rows, n]``) on ``x [..., K]`` flattened to rows, reshaped back to ``[..., n]``
  and cast to the operands' dtype."""
  y = f(x.reshape(-1, x.shape[-1]), w)
  return y.reshape(*x.shape[:-1], n).astype(jnp.result_type(x, w))


# Below this many rows, `matmul_t` keeps XLA's transposed-operand dot: materialising an [N, K] weight costs
# about as much as ~100 rows of the slower dot (benchmarks/README.md, bench_matmul: 120 vs 278 GFLOP/s at N = 8192,
# K = 576), so drafting (one row per call) should not pay a weight copy per call.
MIN_ROWS_TO_TRANSPOSE = 128


@jax.custom_vjp
def _nn_matmul_t(x2: jax.Array, w_rows: jax.Array) -> jax.Array:
  # x2 @ w_rows.T with the weight's transpose materialised once; float32 out (cast outside, as `_nn_matmul`).
  return _dot_f32(x2, physical_transpose(w_rows))


def _nn_t_fwd(x2, w_rows):
  return _nn_matmul_t(x2, w_rows), (x2, w_rows)


def _nn_t_bwd(res, g):
  x2, w_rows = res
  g = g.astype(jnp.result_type(x2, w_rows))   # lossless, as in `_nn_bwd`
  # dx = g @ w_rows is an NN dot on the stored rows: no copy at any row count. (`matmul`'s
  # `transposes_cotangent` form would copy g and the product in every use of a shared head, as in MTP's
  # K steps, a large share of a few-rows-per-device step.)
  dx = _dot_f32(g, w_rows).astype(x2.dtype)
  if grad_rows_from_cotangent(*x2.shape, w_rows.shape[0]):
    dw = _dot_f32(physical_transpose(g), x2).astype(w_rows.dtype)
  else:
    dw = physical_transpose(_dot_f32(physical_transpose(x2), g).astype(w_rows.dtype))
  return cotangent_like(dx, x2), cotangent_like(dw, w_rows)


def grad_rows_from_cotangent(m: int, k: int, n: int) -> bool:
  """Whether `matmul_t`'s backward pass for ``x [m, k] @ w_rows[n, k].T`` takes the weight's gradient as
  ``g.T @ x`` (copying ``g``, m * n elements) rather than ``(x.T @ g).T`` (copying ``x`` and the result,
  k * (m + n)): whichever copies fewer elements. (A frozen head's gradient is not computed at all.)"""
  return m * n <= k * (m + n)


_nn_matmul_t.defvjp(_nn_t_fwd, _nn_t_bwd)


def matmul_t(x: jax.Array, w_rows: jax.Array, nn: bool) -> jax.Array:
  """``x [..., K] @ w_rows.T`` for a weight stored as rows ``[N, K]`` (PyTorch layout) -> ``[..., N]``.

  Many rows (training): the forward materialises the transpose once and runs an NN dot; the backward's
  ``dx = g @ w_rows`` is an NN dot on the rows as stored (`_nn_t_bwd`).  Few rows (drafting) or ``nn``
  False: XLA's dot with the transposed operand.
  """
  if w_rows.ndim != 2 or x.shape[-1] != w_rows.shape[1]:
    raise ValueError(f"matmul_t: x {x.shape} and w_rows {w_rows.shape} do not contract (need x[-1] == w_rows[1])")
  rows = 1
  for d in x.shape[:-1]:
    rows *= d
  if nn and rows >= MIN_ROWS_TO_TRANSPOSE:
    return _on_rows(_nn_matmul_t, x, w_rows, w_rows.shape[0])
  return jnp.einsum("...k,nk->...n", x, w_rows, preferred_element_type=jnp.float32).astype(
      jnp.result_type(x, w_rows))


def _dot_general(nn: bool, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                 out_sharding=None):
  (lc, rc), (lb, rb) = dimension_numbers
  if tuple(lc) != (lhs.ndim - 1,) or tuple(rc) != (0,) or lb or rb or rhs.ndim != 2:
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, out_sharding=out_sharding)
  y = matmul(lhs, rhs, nn)
  return y if preferred_element_type is None else y.astype(preferred_element_type)


def _dot_general_nn(*args, **kw):
  return _dot_general(True, *args, **kw)


def _dot_general_xla(*args, **kw):
  return _dot_general(False, *args, **kw)


def dense_dot_general(perf: PerfOptions):
  """A ``lax.dot_general`` drop-in for ``nnx.Linear``: its ``x @ kernel`` form goes through `matmul` (one
  module-level function per option, so two drafts built alike have equal graphs)."""
  return _dot_general_nn if perf.nn else _dot_general_xla
