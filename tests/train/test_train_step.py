"""Train step: sharded == single device, frozen variables, gradient accumulation, target head, optimizer."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from lkjax import sharding as shd
from lkjax.models.base import Frozen
from lkjax.train import optim, step as step_lib

H, V, VD, K, B, T = 16, 64, 32, 3, 8, 6
RULES = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"), ("vocab", "tensor"))


class ToyDraft(nnx.Module):
  """Minimal draft obeying the DraftModel training contract: logits [K, B, T, Vd]."""

  def __init__(self, rngs: nnx.Rngs):
    self.num_heads, self.draft_vocab_size = K, VD
    self.embed = Frozen(jax.random.normal(rngs.params(), (V, H)) * 0.5)
    init = nnx.initializers.lecun_normal()
    self.proj = nnx.Linear(2 * H, H, kernel_init=nnx.with_partitioning(init, ("embed", "mlp")), rngs=rngs)
    self.heads = nnx.Param(nnx.with_partitioning(init, (None, "mlp", "vocab"))(rngs.params(), (K, H, VD)))

  def __call__(self, batch):
    e = self.embed[...][batch["input_ids"]]
    x = jnp.concatenate([batch["final_hidden"].astype(e.dtype), e], axis=-1)
    h = jnp.tanh(self.proj(x))
    return jnp.einsum("bth,khv->kbtv", h, self.heads[...])


def make_model(seed=0):
  with nnx.use_eager_sharding(False):
    return ToyDraft(nnx.Rngs(seed))


def make_batch(seed=0, b=B, full_mask=False):
  r = np.random.default_rng(seed)
  seg = np.ones((b, T), np.int32)
  mask = np.ones((b, T), np.uint8)
  if not full_mask:
    seg[:, -2:] = 0  # padding at the end of every row
    mask = (r.random((b, T)) < 0.7).astype(np.uint8) * (seg > 0)
  return dict(
      input_ids=r.integers(0, V, (b, T)).astype(np.int32), loss_mask=mask, segment_ids=seg,
      positions=np.tile(np.arange(T, dtype=np.int32), (b, 1)),
      aux_hidden=r.standard_normal((b, T, 3 * H)).astype(jnp.bfloat16),
      final_hidden=r.standard_normal((b, T, H)).astype(jnp.bfloat16))


def add_target_lse(batch, target):
  """The shards' ``target_lse`` for a batch (what precompute stores), computed in float64 numpy."""
  full = np.asarray(batch["final_hidden"], np.float64) @ target["lm_head"].astype(np.float64).T
  m = full.max(-1)
  return dict(batch, target_lse=(np.log(np.exp(full - m[..., None]).sum(-1)) + m).astype(np.float32))


def make_target(seed=1):
  r = np.random.default_rng(seed)
  return dict(lm_head=(r.standard_normal((V, H)) * 0.7).astype(np.float32),
              draft_ids=np.sort(r.choice(V, VD, replace=False)).astype(np.int32))


def loss_cfg(kind="lk_hybrid"):
  return ml_collections.ConfigDict(dict(kind=kind, eta=3.0, lam=0.5, gamma=0.8, chunk_size=0,
                                        schedule=dict(start=1.0, end=0.0, shape="linear")))


def optim_cfg(**kw):
  d = dict(lr=1e-2, schedule="cosine", warmup_steps=2, end_lr_factor=0.0, b1=0.9, b2=0.95, eps=1e-8,
           weight_decay=0.01, clip=0.5, grad_accum=1)
  d.update(kw)
  return ml_collections.ConfigDict(d)


def setup(mesh_shape=None, kind="lk_hybrid", accum=1, precision="fp32", with_lse=False):
  model = make_model()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optim.make_optimizer(optim_cfg(grad_accum=accum), total_steps=10)
  pure_params, pure_rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
  state = step_lib.init_state(pure_params, tx, seed=0)
  target = full_target = make_target()
  if with_lse:   # what the train loop hands the step for such batches: the head's draft rows only
    target = step_lib.make_target(target["lm_head"], target["draft_ids"], full_head=False)
    assert set(target) == {"draft_head"}
  sh = None
  if mesh_shape is not None:
    mesh = shd.make_mesh(mesh_shape)
    psh = shd.state_shardings(params, mesh, RULES)
    rep = shd.replicated(mesh)
    sh = dict(mesh=mesh, state=step_lib.state_shardings(psh, tx, pure_params, mesh),
              rest=shd.state_shardings(rest, mesh, RULES), target=jax.tree.map(lambda _: rep, target),
              batch=shd.batch_shardings(add_target_lse(make_batch(), full_target) if with_lse else make_batch(),
                                        mesh, RULES),
              batch_spec=lambda nd: shd.batch_spec(nd, mesh, RULES, B))
    state = jax.device_put(state, sh["state"])
    pure_rest = jax.device_put(pure_rest, sh["rest"])
    target = jax.device_put(target, sh["target"])
  fn = step_lib.make_train_step(graphdef, tx, loss_cfg(kind), total_steps=10, precision=precision,
                                grad_accum=accum, shardings=sh, donate=mesh_shape is not None)
  return fn, state, pure_rest, target, sh, graphdef


def run_steps(mesh_shape, n=2, with_lse=False, **kw):
  fn, state, rest, target, sh, _ = setup(mesh_shape, with_lse=with_lse, **kw)
  out = []
  for i in range(n):
    batch = make_batch(seed=10 + i)
    if with_lse:
      batch = add_target_lse(batch, make_target())
    if sh is not None:
      batch = jax.device_put(batch, sh["batch"])
    state, m = fn(state, rest, target, batch)
    out.append(jax.tree.map(np.asarray, m))
  return jax.tree.map(np.asarray, state), out


def test_target_distribution_matches_numpy():
  batch, target = make_batch(), make_target()
  h = np.asarray(batch["final_hidden"], np.float64)
  full = h @ target["lm_head"].astype(np.float64).T                     # [B, T, V]
  ref_lse = np.log(np.exp(full - full.max(-1, keepdims=True)).sum(-1)) + full.max(-1)
  # Without target_lse the step computes the full head; with it, only the draft rows (taken in the step,
  # or once by make_target).
  with_lse = dict(batch, target_lse=ref_lse.astype(np.float32))
  draft_only = step_lib.make_target(target["lm_head"], target["draft_ids"], full_head=False)
  for b, tgt in ((batch, target), (with_lse, target), (with_lse, draft_only)):
    y_d, lse = step_lib.target_distribution(jax.tree.map(jnp.asarray, b), tgt, K)
    for k in range(K):
      np.testing.assert_allclose(np.asarray(y_d[k, :, : T - k - 1]), full[:, k + 1:, target["draft_ids"]],
                                 rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(np.asarray(lse[k, :, : T - k - 1]), ref_lse[:, k + 1:], rtol=1e-5, atol=1e-5)
      assert np.all(np.asarray(y_d[k, :, T - k - 1:]) == 0)


def test_make_target_rows_and_bad_input():
  target = make_target()
  t = step_lib.make_target(target["lm_head"], target["draft_ids"])
  np.testing.assert_array_equal(t["draft_head"], target["lm_head"][target["draft_ids"]])
  np.testing.assert_array_equal(t["lm_head"], target["lm_head"])
  np.testing.assert_array_equal(t["draft_ids"], target["draft_ids"])
  whole = step_lib.make_target(target["lm_head"], None, full_head=False)   # Vd = V: the head itself
  assert set(whole) == {"draft_head"}
  np.testing.assert_array_equal(whole["draft_head"], target["lm_head"])
  with pytest.raises(ValueError, match="ids must be strictly ascending target ids in"):
    step_lib.make_target(target["lm_head"], np.array([0, V]))
  with pytest.raises(ValueError, match=r"lm_head must be \[V, Ht\]"):
    step_lib.make_target(target["lm_head"][0])
  # A batch without the precomputed lse needs the whole head: a clear error, not a KeyError.
  with pytest.raises(ValueError, match="has no target_lse"):
    step_lib.batch_target(jax.tree.map(jnp.asarray, make_batch()),
                          step_lib.make_target(target["lm_head"], target["draft_ids"], full_head=False))


@pytest.fixture(scope="module")
def reference_run():
  """Two fp32 single-device steps (compiled once, shared by the tests below)."""
  return run_steps(None)


@pytest.mark.parametrize("mesh_shape", [None, (8, 1, 1)])
def test_precomputed_target_lse_gives_the_same_step(mesh_shape, reference_run):
  """Batches carrying the shards' target_lse (draft-vocabulary head only) train exactly like the full head."""
  ref_state, ref_metrics = reference_run
  state, metrics = run_steps(mesh_shape, with_lse=True)
  for m, r in zip(metrics, ref_metrics):
    for key in r:
      np.testing.assert_allclose(m[key], r[key], rtol=1e-5, atol=1e-5, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), state, ref_state)


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (8, 1, 1)])
def test_sharded_step_equals_single_device(mesh_shape, reference_run):
  ref_state, ref_metrics = reference_run
  state, metrics = run_steps(mesh_shape)
  for m, r in zip(metrics, ref_metrics):
    assert set(m) >= {"alpha", "lambda", "kl", "tv", "tau", "loss", "grad_norm"}
    assert m["alpha"].shape == (K,)
    for key in r:
      np.testing.assert_allclose(m[key], r[key], rtol=1e-5, atol=1e-5, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), state, ref_state)
  assert int(state["step"]) == 2
  # lk_hybrid: lambda_k = exp(-eta * alpha_bar_k), with alpha_bar_k the mean over the global batch.
  assert np.all(ref_metrics[0]["lambda"] == pytest.approx(np.exp(-3.0 * ref_metrics[0]["alpha"]), rel=1e-5))


def test_params_move_and_frozen_get_no_optimizer_state():
  fn, state, rest, target, _, graphdef = setup(None)
  assert "embed" not in state["params"] and "embed" in rest
  p0 = jax.tree.map(np.array, state["params"])
  rest0 = jax.tree.map(np.array, rest)
  new_state, _ = fn(state, rest, target, make_batch())
  # Optimizer moments exist for exactly the Param leaves.
  adam = new_state["opt_state"][1][0]
  assert jax.tree.structure(adam.mu) == jax.tree.structure(p0)
  n_opt = sum(x.size for x in jax.tree.leaves(new_state["opt_state"]))
  n_par = sum(x.size for x in jax.tree.leaves(p0))
  assert n_opt == 2 * n_par + 2  # mu, nu + two step counters (adam, schedule); nothing for `embed`
  jax.tree.map(np.testing.assert_array_equal, rest, rest0)
  assert all(np.abs(np.asarray(a) - b).max() > 0 for a, b in zip(jax.tree.leaves(new_state["params"]),
                                                                  jax.tree.leaves(p0)))


@pytest.mark.parametrize("mesh_shape", [None, (4, 1, 2), (4, 1, 1)])
def test_grad_accumulation_equals_double_batch(mesh_shape):
  # Full mask: every micro-batch has the same per-head token count, so mean of means == global mean.
  results = []
  for accum in (1, 2):
    fn, state, rest, target, sh, _ = setup(mesh_shape, kind="kl", accum=accum)
    batch = make_batch(seed=3, full_mask=True)
    if sh is not None:
      batch = jax.device_put(batch, sh["batch"])
    state, m = fn(state, rest, target, batch)
    results.append((jax.tree.map(np.asarray, state), jax.tree.map(np.asarray, m)))
  (s1, m1), (s2, m2) = results
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), s2, s1)
  for key in ("loss", "kl", "tv", "alpha", "grad_norm", "tokens"):
    np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_bf16_step_close_to_fp32(reference_run):
  m32 = reference_run[1]
  _, m16 = run_steps(None, n=1, precision="bf16")
  np.testing.assert_allclose(m16[0]["loss"], m32[0]["loss"], rtol=3e-2)
  assert np.isfinite(m16[0]["grad_norm"])


def test_adamw_first_update_matches_formula():
  cfg = optim_cfg(clip=0.0, warmup_steps=4)
  tx = optim.make_optimizer(cfg, total_steps=20)
  p = {"w": jnp.asarray([1.0, -2.0, 0.5])}
  g = {"w": jnp.asarray([0.3, -0.1, 0.0])}
  upd, _ = tx.update(g, tx.init(p), p)
  lr0 = cfg.lr / 4  # warmup starts at lr / warmup_steps
  gw = np.asarray(g["w"], np.float64)
  # Adam's bias-corrected first step is g / (|g| + eps); decoupled weight decay adds wd * p.
  ref = -lr0 * (gw / (np.abs(gw) + cfg.eps) + cfg.weight_decay * np.asarray(p["w"]))
  np.testing.assert_allclose(np.asarray(upd["w"]), ref, rtol=1e-5, atol=1e-9)
  # With clip 0.5 a gradient of norm 5 enters Adam as g / 10; Adam's first step is scale-free except
  # through eps, so compare the clipped chain with an unclipped one fed g / 10.
  g5 = {"w": jnp.asarray([3.0, 4.0, 0.0])}
  clipped = optim.make_optimizer(optim_cfg(clip=0.5, eps=1e-2), 20)
  plain = optim.make_optimizer(optim_cfg(clip=0.0, eps=1e-2), 20)
  u1, _ = clipped.update(g5, clipped.init(p), p)
  u2, _ = plain.update(jax.tree.map(lambda x: x / 10, g5), plain.init(p), p)
  np.testing.assert_allclose(np.asarray(u1["w"]), np.asarray(u2["w"]), rtol=1e-6)


def test_learning_rate_schedule_values():
  cfg = optim_cfg(lr=4e-4, warmup_steps=100, end_lr_factor=0.0)
  sched = optim.learning_rate_schedule(cfg, total_steps=1000)
  assert float(sched(0)) == pytest.approx(4e-6)
  assert float(sched(99)) == pytest.approx(4e-4)
  for s in (100, 550, 999):
    ref = 4e-4 * 0.5 * (1 + np.cos(np.pi * (s - 100) / 900))
    assert float(sched(s)) == pytest.approx(ref, rel=1e-5, abs=1e-10)
  with pytest.raises(ValueError, match="optim.schedule"):
    optim.learning_rate_schedule(optim_cfg(schedule="step"), 10)
  with pytest.raises(ValueError, match="grad_accum"):
    optim.make_optimizer(optim_cfg(grad_accum=0), 10)


def test_eval_aggregation_is_token_weighted():
  m1 = dict(alpha=np.array([0.5, 0.2]), kl=np.array([1.0, 2.0]), loss=np.float32(1.0),
            tokens=np.array([10.0, 0.0]), tau=np.float32(0))
  m2 = dict(alpha=np.array([0.8, 0.4]), kl=np.array([3.0, 4.0]), loss=np.float32(3.0),
            tokens=np.array([30.0, 20.0]), tau=np.float32(0))
  out = step_lib.aggregate_eval([m1, m2])
  np.testing.assert_allclose(out["alpha"], [(5 + 24) / 40, 0.4])
  np.testing.assert_allclose(out["kl"], [(10 + 90) / 40, 4.0])
  np.testing.assert_allclose(out["loss"], (1 * 10 + 3 * 50) / 60)
  np.testing.assert_allclose(out["tau"], 1 + 29 / 40 + 29 / 40 * 0.4)


# ----------------------------------------------------------------------------------------------------
# The per-head loss path (model.features) equals the reference path (stacked logits + lk_loss autodiff)


def tiny_draft(arch, b, t):
  """A real ``arch`` draft at TINY dims (draft vocabulary 40 of the target's, MLP-Speculator's full) and one
  float32 batch of ``b`` rows x ``t`` tokens, row 0 packing two documents and row 1 ending in padding.

  Returns ``(graphdef, params State, rest State, target, batch)``.
  """
  from draft_testing import TINY
  from lkjax.models import registry
  info = TINY
  r = np.random.default_rng(0)
  vd = 40 if arch != "mlp_speculator" else info.vocab_size
  ids = None if vd == info.vocab_size else np.sort(r.choice(info.vocab_size, vd, replace=False)).astype(np.int32)
  cfg = registry.default_model_config(arch, info)
  cfg.draft_vocab_size = 0 if ids is None else vd
  h = info.hidden_size
  weights = {"embed_tokens": (r.standard_normal((info.vocab_size, h)) * 0.5).astype(np.float32),
             "lm_head": (r.standard_normal((info.vocab_size, h)) * 0.5).astype(np.float32),
             "norm": np.ones(h, np.float32)}
  with nnx.use_eager_sharding(False):
    model = registry.build_draft(cfg, info, draft_vocab=ids, target_weights=weights, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  seg = np.ones((b, t), np.int32)
  seg[0, t - 5:] = 2       # two packed documents in row 0
  seg[1, t - 2:] = 0       # padding at the end of row 1
  batch = dict(input_ids=r.integers(0, info.vocab_size, (b, t)).astype(np.int32),
               loss_mask=((r.random((b, t)) < 0.8) & (seg > 0)).astype(np.uint8), segment_ids=seg,
               positions=np.tile(np.arange(t, dtype=np.int32), (b, 1)),
               aux_hidden=r.standard_normal((b, t, info.num_aux * h)).astype(np.float32),
               final_hidden=r.standard_normal((b, t, h)).astype(np.float32))
  target = {"lm_head": weights["lm_head"]}
  if ids is not None:
    target["draft_ids"] = ids
  return graphdef, params, rest, target, batch


@pytest.mark.parametrize("arch", ["eagle3", "medusa", "mlp_speculator", "mtp"])
@pytest.mark.parametrize("kind", ["kl", "tv", "lk_alpha", "lk_hybrid", "fixed_lambda", "lambda_schedule"])
def test_per_head_loss_equals_reference(arch, kind):
  graphdef, params, rest, target, batch = tiny_draft(arch, 3, 12)
  params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
  lcfg = loss_cfg(kind)
  kw = step_lib.loss_kwargs(lcfg, total_steps=10)
  step = jnp.asarray(3, jnp.int32)
  from lkjax.losses import lk_loss

  def f(impl, b=batch):
    def loss(p):
      return step_lib._forward_loss(graphdef, lk_loss, kind, kw, jnp.float32, p, rest, target, b, step, impl)
    return jax.value_and_grad(loss, has_aux=True)(params)

  (l_ref, m_ref), g_ref = f("reference")
  # The per-head path, with the full-vocabulary head and with the shards' precomputed target_lse.
  for b in (batch, add_target_lse(batch, target)):
    (l_new, m_new), g_new = f("per_head", b)
    np.testing.assert_allclose(l_new, l_ref, rtol=1e-5, atol=1e-6)
    for key in m_ref:
      np.testing.assert_allclose(m_new[key], m_ref[key], rtol=1e-5, atol=1e-6, err_msg=key)
    jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, rtol=2e-4, atol=1e-6), g_new, g_ref)
  assert float(m_ref["tokens"].sum()) > 0
  assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g_ref)) > 0


def test_unknown_loss_impl_is_rejected():
  cfg = loss_cfg("kl")
  cfg.impl = "fast"
  with pytest.raises(ValueError, match="loss.impl"):
    step_lib.loss_impl(cfg)


def test_precast_rest_changes_nothing_but_the_per_step_cast():
  """Handing the bf16 step an already-cast ``rest`` gives bit-identical results (the step's cast is a no-op)."""
  fn, state, rest, target, _, _ = setup(None, precision="bf16")
  cast = step_lib.precast_rest(rest, "bf16")
  assert {str(x.dtype) for x in jax.tree.leaves(cast)} == {"bfloat16"}
  batch = make_batch(seed=3)
  s1, m1 = fn(state, rest, target, batch)
  s2, m2 = fn(state, cast, target, batch)
  jax.tree.map(np.testing.assert_array_equal, m1, m2)
  jax.tree.map(np.testing.assert_array_equal, s1, s2)


# ----------------------------------------------------------------------------------------------
# Every layout is the same step: one jit, the partitioner places the collectives


def test_all_reduce_bytes_counts_every_result_of_every_all_reduce():
  hlo = "\n".join([
      "  %a = (f32[576]{0}, bf16[2,3]{1,0}) all-reduce(%x, %y), channel_id=1, to_apply=%sum",
      "  %b = s32[7]{0} all-reduce-start(%z), channel_id=2, to_apply=%sum",
      "  %c = f32[1000,1000]{1,0} fusion(%all-reduce.1), kind=kLoop",      # a consumer, not an all-reduce
      "  %d = f32[4]{0} add(%p, %q)"])
  assert shd.all_reduce_bytes(hlo) == 576 * 4 + 6 * 2 + 7 * 4
  assert shd.all_reduce_bytes("") == 0
  hlo += "\n  %e = f32[72,8192]{1,0} reduce-scatter(%g), channel_id=3, dimensions={0}, to_apply=%sum"
  assert shd.collective_bytes(hlo, "reduce-scatter") == 72 * 8192 * 4
  assert shd.collective_bytes(hlo, "all-gather") == 0


def _arch_step(arch, mesh_shape):
  """A real draft's fp32 train step (`tiny_draft`, batch 8 x 10) on ``mesh_shape`` (None: single device,
  no shardings) -> (jitted step, its arguments)."""
  graphdef, params, rest, target, batch = tiny_draft(arch, 8, 10)
  tx = optim.make_optimizer(optim_cfg(), total_steps=10)
  batch = add_target_lse(batch, target)
  pure_params, pure_rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
  state = step_lib.init_state(pure_params, tx, seed=0)
  sh = None
  if mesh_shape is not None:
    mesh = shd.make_mesh(mesh_shape)
    rep = shd.replicated(mesh)
    sh = dict(mesh=mesh, state=step_lib.state_shardings(shd.state_shardings(params, mesh, RULES), tx, pure_params, mesh),
              rest=shd.state_shardings(rest, mesh, RULES), target=jax.tree.map(lambda _: rep, target),
              batch=shd.batch_shardings(batch, mesh, RULES), batch_spec=lambda nd: shd.batch_spec(nd, mesh, RULES, 8))
    state, pure_rest = jax.device_put(state, sh["state"]), jax.device_put(pure_rest, sh["rest"])
    target, batch = jax.device_put(target, sh["target"]), jax.device_put(batch, sh["batch"])
  fn = step_lib.make_train_step(graphdef, tx, loss_cfg("lk_hybrid"), total_steps=10, precision="fp32",
                                shardings=sh, donate=False)
  return fn, (state, pure_rest, target, batch)


@pytest.mark.mesh
@pytest.mark.parametrize("arch", ["eagle3", "medusa", "mlp_speculator", "mtp"])
def test_every_layout_gives_the_single_device_step(arch):
  """Data parallel (8x1x1), FSDP (1x8x1: the "embed" dims split, the batch over fsdp) and both (2x4x1):
  the same state and metrics (lambda from the global batch) as one device, the parameters placed as the
  rules say."""
  ref_fn, ref_args = _arch_step(arch, None)
  ref_state, ref_metrics = jax.tree.map(np.asarray, ref_fn(*ref_args))
  for mesh_shape in ((8, 1, 1), (1, 8, 1), (2, 4, 1)):
    fn, args = _arch_step(arch, mesh_shape)
    state, metrics = jax.tree.map(np.asarray, fn(*args))
    for key in ref_metrics:
      np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=2e-5, atol=1e-6, err_msg=f"{mesh_shape} {key}")
    jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, rtol=2e-5, atol=1e-6), state, ref_state)
    split = [x for x in jax.tree.leaves(args[0]["params"]) if any(e is not None for e in tuple(x.sharding.spec))]
    assert bool(split) == (mesh_shape[1] > 1), mesh_shape     # FSDP splits parameters, data parallel does not


@pytest.mark.parametrize("arch", ["eagle3", "medusa", "mlp_speculator", "mtp"])
def test_output_layers_equal_feature_logits(arch):
  """The per-head loss's output layers (stacked weights split once, `layers.unstack`) give every head's
  `feature_logits`, and the training forward is their logits on `features`. EAGLE-3 and MTP have no
  ``output_layers`` (one shared head): for them the first check is the fallback and the second is the test."""
  graphdef, params, rest, _, batch = tiny_draft(arch, 2, 12)
  model = nnx.merge(graphdef, params, rest)
  feats = model.features(batch)
  heads = step_lib.output_layers(model, len(feats))
  assert len(heads) == len(feats) == model.num_heads
  logits = model(batch)
  for k, f in enumerate(feats):
    np.testing.assert_allclose(heads[k](f), model.feature_logits(f, k), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(logits[k], heads[k](f), rtol=1e-6, atol=1e-6)
