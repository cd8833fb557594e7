"""Train-step benchmark: ``python benchmarks/bench_train.py [--small] [--archs=eagle3,medusa] [--out=...]``.

Per draft architecture at SmolLM2-135M dims (target hidden 576, 30 layers, 3 aux states, V = 49152, draft
vocabulary 8192, EAGLE-3 = one 576-wide layer with 9 heads / 3 kv heads / intermediate 1536; K = 7 for
EAGLE-3/MTP, 6 for MEDUSA/MLP-Speculator; batch 4 x 512 tokens; bf16 compute, fp32 params) it prints
  tokens/s           B*T / median step time (compiled step, data already on device)
  GFLOP/step         XLA's cost analysis of the compiled train step (all devices of the mesh)
  all-reduce MB      (JSON only) what one device's all-reduces produce per step, from the compiled HLO
  utilisation        achieved FLOP/s / a bf16-input, f32-accumulate 2048^2 matmul ceiling, both measured in
                     the same round (a ceiling sample is taken before every timed round: these machines'
                     speed drifts by 2x within minutes), median over the rounds
  LK / KL            median over pairs of the L_lambda step time / the KL step time, the two steps timed
                     alternately so that both see the same machine load (the order within a round rotates)
The batch carries the precomputed full-vocabulary target lse, as batches from shards written by
`experiments/precompute.py` do (``--target_lse=off``: the step computes the full-vocabulary head itself, as
for older shards).  ``--ab=NAME`` also compiles a variant "B" of the L_lambda step and times it in the same
interleaved loop (LK KL B, KL B LK, B LK KL, ...): ``no_target_lse`` (batches without the precomputed lse),
``xla_matmul`` (``perf.matmul = "xla"``: XLA's dot instead of the NN matmul forms), ``autodiff_attention``
(``perf.attention_grad = "autodiff"``), ``full_attention`` (``perf.causal_block = 0``: training attention
over all keys instead of causal query blocks), ``lk_tau`` (the chain objective's step, ``loss.kind =
"lk_tau"``), ``reach`` (the L_lambda step with ``loss.head_weighting = "reach"``) or ``same`` (a second,
separately compiled copy of the L_lambda step: an A/A control for how far two copies of one program
differ); columns "B s", "B/LK" and "B/KL" (medians over the rounds of B's time / the L_lambda step's and /
the KL step's). The perf options of the A steps are the configs' (``auto``: this backend's defaults,
`lkjax/perf.py`), or ``--config_overrides``.
and writes the table as JSON (``--out``, default runs/bench_train.json). ``--small`` shrinks every size
(a check that the script works, seconds on a CPU); full-size runs take minutes per architecture on CPU.
Random weights and inputs: the step's cost does not depend on their values.
"""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

flags.DEFINE_bool("small", False, "Tiny dims (checks the script, not a measurement).")
flags.DEFINE_string("archs", "eagle3,medusa,mlp_speculator,mtp", "Comma-separated architectures.")
flags.DEFINE_integer("steps", 5, "Timed steps per configuration (after the warm-up).")
flags.DEFINE_integer("warmup", 1, "Untimed rounds of every program before the timed ones (the first one also "
                     "compiles). More lets the retained malloc heap (benchmarks/malloc.py) reach its steady size first: "
                     "with two programs alternating it grows over the first two rounds.")
flags.DEFINE_integer("batch", 0, "Global batch rows (0: 4, or 2 with --small).")
flags.DEFINE_integer("seq", 0, "Tokens per row (0: 512, or 64 with --small).")
flags.DEFINE_string("mesh", "-1,1,1", "Mesh shape (data,fsdp,tensor) over the visible devices, or 'config': each "
                    "architecture on its config's mesh.shape.")
flags.DEFINE_string("precision", "bf16", "bf16 | fp32")
flags.DEFINE_string("out", "runs/bench_train.json", "Where the JSON table goes.")
flags.DEFINE_enum("target_lse", "on", ["on", "off"], "Batches carry the precomputed target lse (on) or not.")
flags.DEFINE_enum("ab", "", ["", "no_target_lse", "xla_matmul", "autodiff_attention", "full_attention", "same",
                             "lk_tau", "reach"],
                  "Also time this variant of the L_lambda step, interleaved with the others.")
flags.DEFINE_string("config_overrides", "", "JSON object of dotted config keys set in every architecture's "
                    "config before anything is built (`lkjax.config_args.apply_overrides`; unknown keys are "
                    "rejected), e.g. '{\"model.num_layers\": 2}' or '{\"perf.matmul\": \"xla\"}'. --mesh=config "
                    "takes the overridden layout.")
flags.DEFINE_string("profile", "", "Directory for a perfetto trace + optimized HLO per step (off when empty); "
                    "the JSON row gets a summary of each trace (op time per fusion kind, longest ops).")
FLAGS = flags.FLAGS

# --ab variants that are perf options (config keys set in the B step's config)
AB_OVERRIDES = {"xla_matmul": {"perf.matmul": "xla"}, "autodiff_attention": {"perf.attention_grad": "autodiff"},
                "full_attention": {"perf.causal_block": 0}, "reach": {"loss.head_weighting": "reach"}}


def target_info(small: bool):
  from lkjax.targets.info import TargetInfo
  if small:
    return TargetInfo(name="tiny", model_type="llama", num_layers=8, hidden_size=64, vocab_size=2048,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
                      rms_norm_eps=1e-5, rope_theta=1e5, max_position_embeddings=2048, tie_word_embeddings=True)
  return TargetInfo(name="smollm2-135m-instruct", model_type="llama", num_layers=30, hidden_size=576,
                    vocab_size=49152, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                    intermediate_size=1536, rms_norm_eps=1e-5, rope_theta=1e5, max_position_embeddings=8192,
                    tie_word_embeddings=True)


_CEILING_FN = {}


def matmul_ceiling(small: bool, repeats: int = 5) -> float:
  """GFLOP/s of a square bf16 x bf16 -> f32 matmul (the best of ``repeats``)."""
  import jax
  import jax.numpy as jnp
  n = 512 if small else 2048
  if n not in _CEILING_FN:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    f(a, b).block_until_ready()
    _CEILING_FN[n] = (f, a, b)
  f, a, b = _CEILING_FN[n]
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best / 1e9


def trace_ops(trace_dir: str) -> list[tuple[float, str]]:
  """``(ms, name)`` of every op event in the newest ``perfetto_trace.json.gz`` below ``trace_dir``."""
  import glob
  import gzip
  paths = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  if not paths:
    raise FileNotFoundError(f"{trace_dir}: no perfetto_trace.json.gz")
  with gzip.open(max(paths, key=os.path.getmtime)) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  # Python frames, executor/thread-pool spans and the thunk executor's zero-length "end: <op>" markers are
  # not ops (the markers used to show up as kinds of their own, ~2 ms in a 9 s profile, with no HLO shape).
  skip = ("$", "ThunkExecutor", "SlinkyThreadPool", "ThreadpoolListener", "CommonPjRt", "end: ")
  return [(e["dur"] / 1e3, e["name"]) for e in events
          if e.get("ph") == "X" and not e["name"].startswith(skip)]


def summarise_trace(trace_dir: str, hlo_text: str, top: int = 12) -> dict:
  """Op time of one profiled step from its perfetto trace: summed per fusion kind (the name without its
  ``.N`` suffix), summed per (kind, result shape) (the ``2 * top`` largest, with op counts), and the
  ``top`` longest ops with their result shape and op_name from the optimized HLO.

  Op times add up to more than the step's wall time when independent thunks run concurrently.
  """
  import re
  ops = trace_ops(trace_dir)
  def hlo_line(name: str) -> tuple[str, str]:
    """(result shape, op_name) of the instruction ``name``; fusions often carry no op_name."""
    m = re.search(r"\n\s*(?:ROOT )?%" + re.escape(name) + r" = (\S+) ([^\n]*)", hlo_text)
    if not m:
      return "", ""
    op = re.search(r'op_name="([^"]*)"', m.group(2))
    return m.group(1), op.group(1) if op else ""

  kinds: dict[str, float] = {}
  by_shape: dict[tuple[str, str], list] = {}
  for ms, name in ops:
    kind = re.sub(r"\.\d+$", "", name)
    kinds[kind] = kinds.get(kind, 0.0) + ms
    acc = by_shape.setdefault((kind, hlo_line(name)[0]), [0.0, 0])
    acc[0] += ms
    acc[1] += 1
  longest = []
  for ms, name in sorted(ops, reverse=True)[:top]:
    shape, op_name = hlo_line(name)
    longest.append(dict(name=name, ms=ms, shape=shape, op_name=op_name))
  shapes = [dict(kind=k, shape=sh, ms=v[0], count=v[1])
            for (k, sh), v in sorted(by_shape.items(), key=lambda kv: -kv[1][0])[:2 * top]]
  return dict(op_ms_total=sum(ms for ms, _ in ops),
              op_ms_by_kind=dict(sorted(kinds.items(), key=lambda kv: -kv[1])), op_ms_by_kind_shape=shapes,
              longest_ops=longest)


def build_step(arch: str, kind: str, info, *, small: bool, batch: int, seq: int, mesh_shape,
               precision: str, target_lse: bool = True, config_overrides: dict | None = None) -> dict:
  """Compile one (arch, loss kind) train step -> its cost figures and a ``run()`` that times one step.

  ``config_overrides``: dotted config keys (e.g. ``perf.*``) set in the architecture's config first."""
  import jax
  import ml_collections
  import ml_dtypes
  import numpy as np
  from flax import nnx
  from lkjax import perf as perf_lib
  from lkjax import sharding as shd
  from lkjax.config_args import load_config
  from lkjax.models import registry
  from lkjax.train import optim, step as step_lib

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cfg = load_config(os.path.join(root, f"configs/{arch}.py"), {**(config_overrides or {}), "loss.kind": kind})
  model_cfg = ml_collections.ConfigDict(cfg.model.to_dict())
  model_cfg.dtype = "bfloat16" if precision == "bf16" else "float32"
  vd = 512 if small else int(model_cfg.draft_vocab_size)
  model_cfg.draft_vocab_size = vd
  r = np.random.default_rng(0)
  ids = np.sort(r.choice(info.vocab_size, vd, replace=False)).astype(np.int64)
  h = info.hidden_size
  weights = {"embed_tokens": (r.standard_normal((info.vocab_size, h)) * 0.02).astype(np.float32),
             "norm": np.ones(h, np.float32)}
  weights["lm_head"] = weights["embed_tokens"]
  with nnx.use_eager_sharding(False):
    model = registry.build_draft(model_cfg, info, draft_vocab=ids, target_weights=weights, rngs=nnx.Rngs(0),
                                 perf=perf_lib.from_config(cfg))
  mesh = shd.make_mesh(mesh_shape)
  rules = tuple(tuple(x) for x in cfg.mesh.rules)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  psh, rsh = shd.state_shardings(params, mesh, rules), shd.state_shardings(rest, mesh, rules)
  params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
  rest = step_lib.precast_rest(rest, precision)
  tx = optim.make_optimizer(cfg.optim, total_steps=1000)
  ssh = step_lib.state_shardings(psh, tx, params, mesh)
  rep = shd.replicated(mesh)
  # What the train loop hands the step: the head's draft rows only when the batch carries the lse.
  target = step_lib.make_target(weights["lm_head"], ids, full_head=not target_lse)
  bf16 = ml_dtypes.bfloat16
  seg = np.ones((batch, seq), np.int32)
  host_batch = dict(input_ids=r.integers(0, info.vocab_size, (batch, seq)).astype(np.int32),
                    loss_mask=np.ones((batch, seq), np.uint8), segment_ids=seg,
                    positions=np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
                    aux_hidden=r.standard_normal((batch, seq, info.num_aux * h)).astype(bf16),
                    final_hidden=r.standard_normal((batch, seq, h)).astype(bf16))
  if target_lse:  # what precompute stores: the full-vocabulary lse of the stored (bf16) hidden states
    host_batch["target_lse"] = np.asarray(jax.jit(step_lib.target_logits)(
        host_batch["final_hidden"], weights["lm_head"], ids.astype(np.int32))[1])
  bsh = shd.batch_shardings(host_batch, mesh, rules)
  sh = dict(mesh=mesh, state=ssh, rest=rsh, target=jax.tree.map(lambda _: rep, target), batch=bsh,
            batch_spec=lambda nd: shd.batch_spec(nd, mesh, rules, batch))
  state = jax.device_put(step_lib.init_state(params, tx, 0), ssh)
  rest, target = jax.device_put(rest, rsh), jax.device_put(target, sh["target"])
  dev_batch = jax.device_put(host_batch, bsh)
  fn = step_lib.make_train_step(graphdef, tx, cfg.loss, total_steps=1000, precision=precision, shardings=sh)
  t0 = time.perf_counter()
  compiled = fn.lower(state, rest, target, dev_batch).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
  flops *= mesh.size  # an SPMD-partitioned step reports the cost of one device's program
  box = {"state": state, "minflt": [], "sys_s": [], "user_s": []}

  def run() -> float:
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t = time.perf_counter()
    res = compiled(box["state"], rest, target, dev_batch)
    jax.block_until_ready(res)
    box["state"], m = res
    dt = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    box["minflt"].append(r1.ru_minflt - r0.ru_minflt)     # page faults: see benchmarks/malloc.py
    box["sys_s"].append(r1.ru_stime - r0.ru_stime)
    box["user_s"].append(r1.ru_utime - r0.ru_utime)     # CPU time of all threads: work, not waiting
    box["loss"] = float(np.asarray(m["loss"]))
    return dt

  run()  # warm-up
  hlo = compiled.as_text()
  return dict(arch=arch, kind=kind, target_lse=target_lse, run=run, compiled=compiled, last=box,
              parts=dict(graphdef=graphdef, loss_cfg=cfg.loss, inputs=(state, rest, target, dev_batch)),
              gflop_per_step=flops / 1e9, compile_s=compile_s,
              all_reduce_mb=shd.all_reduce_bytes(hlo) / 1e6,
              all_gather_mb=shd.collective_bytes(hlo, "all-gather") / 1e6,
              reduce_scatter_mb=shd.collective_bytes(hlo, "reduce-scatter") / 1e6, perf=dataclasses.asdict(model.perf),
              mesh_shape=tuple(mesh.devices.shape),
              num_params=int(sum(x.size for x in jax.tree.leaves(params))))


def bench_arch(arch: str, info, *, small: bool, batch: int, seq: int, steps: int, mesh_shape, precision: str,
               profile_dir: str = "", target_lse: bool = True, ab: str = "", warmup: int = 1,
               config_overrides: dict | None = None) -> dict:
  """L_lambda and KL (and B) steps of ``arch``, timed interleaved so all see the same load; the order
  within a round rotates from round to round (LK KL B, KL B LK, B LK KL, ...)."""
  import numpy as np
  overrides = dict(config_overrides or {})
  kw = dict(small=small, batch=batch, seq=seq, mesh_shape=mesh_shape, precision=precision)
  lk, kl = (build_step(arch, kind, info, target_lse=target_lse, config_overrides=overrides, **kw)
            for kind in ("lk_hybrid", "kl"))
  variant = None
  if ab:
    b_overrides = dict(overrides, **AB_OVERRIDES.get(ab, {}))
    variant = build_step(arch, "lk_tau" if ab == "lk_tau" else "lk_hybrid", info,
                         target_lse=target_lse and ab != "no_target_lse", config_overrides=b_overrides, **kw)
  t_lk, t_kl, t_b, ceil = [], [], [], []
  slots = [(lk, t_lk), (kl, t_kl)] + ([(variant, t_b)] if variant is not None else [])

  def rotated(i):   # round i's order
    return slots[i % len(slots):] + slots[:i % len(slots)]

  for i in range(1, warmup):   # build_step ran each program once already
    for s, _ in rotated(i):
      s["run"]()
  timed = slice(len(lk["last"]["minflt"]), len(lk["last"]["minflt"]) + steps)   # the warm-ups' are before
  for i in range(steps):
    ceil.append(matmul_ceiling(small, repeats=3))   # the machine's speed drifts: sample it every round
    # The order rotates every round, so no program always runs in the same slot (with a fixed order,
    # the third program, a copy of the first, ran ~13% slower).
    for s, times in rotated(i):
      times.append(s["run"]())
  if profile_dir:  # one more step each under the profiler (not timed): perfetto traces + optimized HLO
    import jax
    os.makedirs(profile_dir, exist_ok=True)
    profiles = {}
    for s in (lk, kl):
      name = f"{arch}_{s['kind']}"
      hlo = s["compiled"].as_text()
      with open(os.path.join(profile_dir, name + ".hlo.txt"), "w") as f:
        f.write(hlo)  # fusion names match the trace's events
      with jax.profiler.trace(os.path.join(profile_dir, name), create_perfetto_trace=True):
        wall_s = s["run"]()
      profiles[s["kind"]] = dict(wall_ms=wall_s * 1e3, **summarise_trace(os.path.join(profile_dir, name), hlo))
  step_s, kl_s = float(np.median(t_lk)), float(np.median(t_kl))
  ratios = [a / b for a, b in zip(t_lk, t_kl)]
  extra = {}
  if variant is not None:
    extra = dict(ab=ab, b_step_s=float(np.median(t_b)), b_times=t_b, b_gflop_per_step=variant["gflop_per_step"],
                 b_all_reduce_mb=variant["all_reduce_mb"],
                 b_over_lk=float(np.median([a / b for a, b in zip(t_b, t_lk)])),
                 b_over_kl=float(np.median([a / b for a, b in zip(t_b, t_kl)])), b_loss=variant["last"]["loss"])
  if profile_dir:
    extra["profile"] = profiles
  util = [lk["gflop_per_step"] / t / c for t, c in zip(t_lk, ceil)]
  extra.update(ceiling_samples=ceil, utilisation=float(np.median(util)),
               page_faults_per_step=float(np.median(lk["last"]["minflt"][timed])),
               kernel_s_per_step=float(np.median(lk["last"]["sys_s"][timed])),
               user_s_per_step=float(np.median(lk["last"]["user_s"][timed])),
               # user + system: Linux splits a thread's CPU time between the two by timer-tick samples, so a
               # step of a few ms can read 0 s of user time; their sum is the precisely counted runtime.
               cpu_s_per_step=float(np.median(np.add(lk["last"]["user_s"], lk["last"]["sys_s"])[timed])),
               warmup=warmup,
               lk_page_faults=lk["last"]["minflt"][timed], lk_kernel_s=lk["last"]["sys_s"][timed],
               lk_user_s=lk["last"]["user_s"][timed],
               kl_page_faults=kl["last"]["minflt"][timed], kl_kernel_s=kl["last"]["sys_s"][timed])
  return dict(arch=arch, kind="lk_hybrid", target_lse=target_lse, step_s=step_s, tokens_per_s=batch * seq / step_s,
              gflop_per_step=lk["gflop_per_step"], gflops=lk["gflop_per_step"] / step_s,
              compile_s=lk["compile_s"], loss=lk["last"]["loss"], num_params=lk["num_params"],
              all_reduce_mb=lk["all_reduce_mb"], kl_all_reduce_mb=kl["all_reduce_mb"],
              all_gather_mb=lk["all_gather_mb"], reduce_scatter_mb=lk["reduce_scatter_mb"],
              perf=lk["perf"], mesh_shape=list(lk["mesh_shape"]), kl_step_s=kl_s, kl_gflop_per_step=kl["gflop_per_step"], lk_over_kl=float(np.median(ratios)),
              lk_times=t_lk, kl_times=t_kl, **extra)


def config_mesh(arch: str, config_overrides: dict | None = None) -> tuple[int, ...]:
  """``arch``'s mesh shape from ``configs/<arch>.py`` (with ``config_overrides``)."""
  from lkjax.config_args import load_config
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return tuple(load_config(os.path.join(root, f"configs/{arch}.py"), config_overrides).mesh.shape)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  import jax
  small = FLAGS.small
  batch = FLAGS.batch or (2 if small else 4)
  seq = FLAGS.seq or (64 if small else 512)
  if FLAGS.mesh != "config":
    try:
      mesh_shape = tuple(int(x) for x in FLAGS.mesh.split(","))
    except ValueError:
      raise app.UsageError(f"--mesh={FLAGS.mesh!r}: expected DATA,FSDP,TENSOR (e.g. -1,1,1) or config") from None
  if FLAGS.warmup < 1 or FLAGS.steps < 1:
    raise app.UsageError(f"--warmup={FLAGS.warmup} and --steps={FLAGS.steps} must both be >= 1")
  info = target_info(small)
  archs = [a for a in FLAGS.archs.split(",") if a]
  from lkjax.files import git_commit
  from lkjax.models import registry
  unknown = sorted(set(archs) - set(registry.ARCHS))
  if unknown:
    raise app.UsageError(f"--archs: unknown {unknown}; expected {sorted(registry.ARCHS)}")
  try:
    overrides = json.loads(FLAGS.config_overrides) if FLAGS.config_overrides else {}
  except json.JSONDecodeError as e:
    raise app.UsageError(f"--config_overrides={FLAGS.config_overrides!r}: not JSON ({e})") from None
  if not isinstance(overrides, dict):
    raise app.UsageError(f"--config_overrides={FLAGS.config_overrides!r}: expected a JSON object of dotted keys")
  try:   # loads every config with the overrides: a bad key fails here, before anything compiles
    config_meshes = {arch: config_mesh(arch, overrides) for arch in archs}
  except ValueError as e:
    raise app.UsageError(f"--config_overrides: {e}") from None
  import malloc
  print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}; batch {batch} x {seq}; "
        f"precision {FLAGS.precision}; {malloc.describe()}; "
        f"bf16 matmul ceiling at start {matmul_ceiling(small):.1f} GFLOP/s", flush=True)
  rows = []
  for arch in archs:
    row = bench_arch(arch, info, small=small, batch=batch, seq=seq, steps=FLAGS.steps,
                     precision=FLAGS.precision, profile_dir=FLAGS.profile, target_lse=FLAGS.target_lse == "on",
                     ab=FLAGS.ab, warmup=FLAGS.warmup, config_overrides=overrides,
                     mesh_shape=config_meshes[arch] if FLAGS.mesh == "config" else mesh_shape)
    rows.append(row)
    print(f"  {arch}: {row['tokens_per_s']:.0f} tok/s", flush=True)
  both = bool(FLAGS.ab)
  header = f"{'arch':<16}{'params':>10}{'tok/s':>10}{'GFLOP/step':>12}{'GFLOP/s':>10}{'util':>8}{'LK s':>9}{'KL s':>9}{'LK/KL':>8}"
  print(header + (f"{'B s':>9}{'B/LK':>7}{'B/KL':>7}" if both else "") + (f"   (B = {FLAGS.ab})" if both else ""))
  for r in rows:
    print(f"{r['arch']:<16}{r['num_params']:>10}{r['tokens_per_s']:>10.0f}{r['gflop_per_step']:>12.2f}"
          f"{r['gflops']:>10.1f}{r['utilisation']:>8.1%}{r['step_s']:>9.3f}{r['kl_step_s']:>9.3f}{r['lk_over_kl']:>8.3f}"
          + (f"{r['b_step_s']:>9.3f}{r['b_over_lk']:>7.3f}{r['b_over_kl']:>7.3f}" if both else ""))
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  with open(FLAGS.out, "w") as f:
    json.dump(dict(small=small, batch=batch, seq=seq, devices=jax.device_count(), mesh=FLAGS.mesh,
                   precision=FLAGS.precision,
                   target_lse=FLAGS.target_lse == "on", ab=FLAGS.ab, warmup=FLAGS.warmup,
                   config_overrides=overrides, commit=git_commit(__file__),
                   hugepage_malloc=malloc.hugepage_malloc_active(), retained_heap=malloc.retained_heap_active(),
                   jemalloc=malloc.jemalloc_active(),
                   glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""), rows=rows), f, indent=2)
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  import malloc
  malloc.reexec_with_malloc_tunables()   # opt-in (LKJAX_MALLOC_TUNING=1 or launch.py); see malloc.py
  app.run(main)
