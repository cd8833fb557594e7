"""`train_and_evaluate(config, workdir)`: the training run behind ``experiments/train.py``.

Order of work (everything that can fail on bad input fails before anything compiles):
  1. data: the shard directory must hold a manifest; if not, ``config.data.auto_prepare`` generates the
     small default dataset with the packaged target (`lkjax.data.prepare.ensure_default_dataset`),
     otherwise a FileNotFoundError prints the exact command that prepares it;
  2. draft vocabulary from the manifest's token frequencies, model config resolved against the manifest's
     `TargetInfo` (`lkjax.models.registry.check_compatible`: hidden size, vocabulary, aux layer ids);
  3. mesh (data, fsdp, tensor) and logical-axis shardings from the config; the draft, the optimizer
     state and the target head placed on it; the train step compiled once (its memory analysis printed);
  4. resume from ``<workdir>/checkpoints`` if a checkpoint exists (state + grain iterator position);
  5. the loop: progress bar with ETA, metrics every ``log_every`` steps, validation every
     ``eval_every``, checkpoints every ``checkpoint.every`` steps or ``checkpoint.every_minutes`` minutes
     (whichever comes first) and a forced final one; SIGTERM / SIGINT save a checkpoint after the current
     step and end the run cleanly (status names the signal; rerunning resumes); a non-finite loss or
     gradient stops the run (nothing is saved after it, the last good checkpoint stays) with
     `NonFiniteLossError` naming the step; a corrupted record stops it the same way with a `ShardError`
     naming the shard file and record; a final summary says where the outputs are and what to run next.

Files in the workdir: ``config.json``, ``metrics.jsonl``, ``tensorboard/``, ``checkpoints/<step>/``,
``summary.json`` (final metrics and the lkjax commit, written when the run ends).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import sys
import threading
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from lkjax import perf as perf_lib
from lkjax.files import git_commit, write_json
from lkjax import sharding as shd
from lkjax.train import checkpoint as ckpt_lib
from lkjax.train import metrics as metrics_lib
from lkjax.train import optim
from lkjax.train import step as step_lib

CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
_MODEL_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


class NonFiniteLossError(FloatingPointError):
  """The loss (or gradient norm) became NaN/Inf; ``step`` is the failing step, ``checkpoint_step`` the last
  good checkpoint kept in the workdir (None if none was saved yet)."""

  def __init__(self, step: int, checkpoint_step: int | None, workdir: str):
    self.step, self.checkpoint_step = step, checkpoint_step
    kept = (f"the last good checkpoint (step {checkpoint_step}) is kept in {workdir}/checkpoints"
            if checkpoint_step is not None else "no checkpoint had been saved yet")
    super().__init__(f"non-finite loss at step {step}: training stopped; {kept}. Lower optim.lr or "
                     f"raise optim.clip / use precision=fp32, then rerun to resume from that checkpoint.")


# ----------------------------------------------------------------------------------------------- data


def _prepare_knobs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return dict(max_length=int(config.data.max_length), **config.data.prepare.to_dict())


def prepare_command(config: ml_collections.ConfigDict) -> str:
  """The shell command that builds ``config.data.dir`` with the packaged default target and prompts."""
  knobs = ", ".join(f"{k}={v!r}" for k, v in sorted(_prepare_knobs(config).items()))
  code = (f"from lkjax.data.prepare import ensure_default_dataset; "
          f"ensure_default_dataset({os.path.abspath(config.data.dir)!r}, {knobs})")
  return f"python -c {shlex.quote(code)}"


def ensure_data(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The shard manifest of ``config.data.dir``; prepares the default dataset if allowed, else explains how."""
  from lkjax.data import shards
  path = os.path.join(config.data.dir, shards.MANIFEST_FILE)
  if not os.path.exists(path):
    if jax.process_count() > 1:  # N processes would prepare the same directory at once
      raise FileNotFoundError(
          f"no training data in {os.path.abspath(config.data.dir)} ({shards.MANIFEST_FILE} is missing). A "
          f"multi-process run does not prepare data; prepare it once, on storage every process reads:\n"
          f"  {prepare_command(config)}")
    if not config.data.auto_prepare:
      raise FileNotFoundError(
          f"no training data in {os.path.abspath(config.data.dir)} ({shards.MANIFEST_FILE} is missing). "
          f"Prepare it with:\n  {prepare_command(config)}\nor rerun with --config.data.auto_prepare=True "
          f"(or point --config.data.dir at a directory made by experiments/precompute.py).")
    from lkjax.data.prepare import ensure_default_dataset
    print(f"[lkjax] no data in {config.data.dir}: preparing the default dataset "
          f"({_prepare_knobs(config)}) with the packaged target ...", flush=True)
    ensure_default_dataset(config.data.dir, **_prepare_knobs(config))
  return shards.read_manifest(config.data.dir)


def resolve_model_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config.model`` with ``dtype=""`` resolved from ``config.precision``."""
  step_lib.compute_dtype(config.precision)
  model_cfg = ml_collections.ConfigDict(config.model.to_dict())
  if not model_cfg.get("dtype", ""):
    model_cfg.dtype = _MODEL_DTYPES[config.precision]
  return model_cfg


@dataclasses.dataclass
class DraftSetup:
  """Everything the step needs that does not change during training."""

  model: Any                    # the NNX draft (host arrays)
  model_config: ml_collections.ConfigDict
  target_info: Any              # TargetInfo
  draft_vocab: Any              # DraftVocab or None (Vd = V)
  target_weights: dict[str, np.ndarray]
  target_lse: bool = False      # batches carry the shards' precomputed target lse (`data.target_lse`)


def build_setup(config: ml_collections.ConfigDict, manifest: Mapping[str, Any], *,
                with_weights: bool = True) -> DraftSetup:
  """Draft vocabulary + checked model config + the draft built on the target's frozen weights."""
  from lkjax.data import shards
  from lkjax.data.vocab import build_draft_vocab
  from lkjax.models import registry
  info = shards.target_info(manifest)
  model_cfg = resolve_model_config(config)
  vd = int(model_cfg.get("draft_vocab_size", 0) or 0)
  if vd < 0 or vd > info.vocab_size:
    raise ValueError(f"config.model.draft_vocab_size={vd}: must be in [0, {info.vocab_size}] "
                     f"(the target vocabulary of {config.data.dir})")
  vocab = build_draft_vocab(np.asarray(manifest["token_freqs"]), vd) if 0 < vd < info.vocab_size else None
  ids = None if vocab is None else vocab.token_ids
  registry.check_compatible(model_cfg, info, ids)  # raises before anything is compiled
  weights = shards.load_target_weights(config.data.dir) if with_weights else None
  with nnx.use_eager_sharding(False):  # placed explicitly afterwards, from the config's rules
    model = registry.build_draft(model_cfg, info, draft_vocab=ids, target_weights=weights,
                                 rngs=nnx.Rngs(params=config.seed), perf=perf_lib.from_config(config))
  return DraftSetup(model=model, model_config=model_cfg, target_info=info, draft_vocab=vocab,
                    target_weights=weights, target_lse=use_target_lse(config) and shards.has_target_lse(manifest))


def use_target_lse(config) -> bool:
  """``data.target_lse`` (default True: configs written before the knob existed)."""
  return bool(config.data.get("target_lse", True))


def _total_steps(config, steps_per_epoch: int) -> int:
  if config.num_steps > 0:
    return int(config.num_steps)
  if config.num_epochs < 1:
    raise ValueError(f"num_epochs={config.num_epochs}: set num_epochs >= 1 or num_steps > 0")
  total = steps_per_epoch * int(config.num_epochs)
  if total < 1:
    raise ValueError(f"{config.data.dir}: the train split gives 0 batches of {config.batch_size} rows; "
                     "lower batch_size or prepare more data")
  return total


def _loader(config, split: str, *, num_epochs, shuffle: bool, drop_remainder: bool):
  from lkjax.data.pipeline import make_loader
  return make_loader(config.data.dir, split=split, global_batch_size=config.batch_size,
                     max_length=config.data.max_length, seed=config.data.seed, num_epochs=num_epochs,
                     shuffle=shuffle, packing=config.data.packing, val_fraction=config.data.val_fraction,
                     worker_count=config.data.worker_count if split == "train" else 0,
                     drop_remainder=drop_remainder, target_lse=use_target_lse(config))


def _pad_rows(batch: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
  """Zero rows up to ``rows`` (segment_ids 0 = padding: masked, so metrics ignore them)."""
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    if v.shape[0] < rows:
      v = np.concatenate([v, np.zeros((rows - v.shape[0],) + v.shape[1:], v.dtype)])
    out[k] = v
  return out


# ----------------------------------------------------------------------------------------------- loop


def check_workdir(workdir: str | os.PathLike) -> str:
  """The absolute workdir, created; raises NotADirectoryError / PermissionError naming it (before any work)."""
  workdir = os.path.abspath(os.fspath(workdir))
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise NotADirectoryError(f"--workdir={workdir} is an existing file, not a directory: pass a new directory, "
                             "or an earlier run's workdir to resume it.")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise type(e)(f"--workdir={workdir}: cannot create it ({e.strerror}); pass a writable directory.") from e
  if not os.access(workdir, os.W_OK):
    raise PermissionError(f"--workdir={workdir} is not writable; pass a writable directory.")
  return workdir


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Check config values that would otherwise fail after data preparation or compilation."""
  from lkjax.losses import LOSS_KINDS

  def need(ok: bool, key: str, rule: str) -> None:
    if not ok:
      value = config
      for part in key.split("."):
        value = value[part]
      raise ValueError(f"--config.{key}={value!r}: {rule}.")

  need(config.batch_size >= 1, "batch_size", "must be >= 1")
  need(config.num_steps >= 0, "num_steps", "must be >= 0 (0: run num_epochs)")
  need(config.num_steps > 0 or config.num_epochs >= 1, "num_epochs", "must be >= 1 when num_steps is 0")
  need(config.log_every >= 1, "log_every", "must be >= 1")
  need(config.eval_every >= 0, "eval_every", "must be >= 0 (0: no validation)")
  need(config.data.max_length >= 2, "data.max_length", "must be >= 2")
  need(0 <= config.data.val_fraction < 1, "data.val_fraction", "must be in [0, 1)")
  need(config.precision in _MODEL_DTYPES, "precision", f"must be one of {sorted(_MODEL_DTYPES)}")
  need(config.loss.kind in LOSS_KINDS, "loss.kind", f"must be one of {list(LOSS_KINDS)}")
  need(config.optim.lr > 0, "optim.lr", "must be > 0")
  need(config.optim.grad_accum >= 1, "optim.grad_accum", "must be >= 1")
  need(config.checkpoint.every >= 1, "checkpoint.every", "must be >= 1")
  need(config.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
  need(config.checkpoint.get("every_minutes", 0) >= 0, "checkpoint.every_minutes", "must be >= 0 (0: off)")
  data_dir = os.fspath(config.data.dir)
  need(not (os.path.exists(data_dir) and not os.path.isdir(data_dir)), "data.dir",
       "is a file; pass a shard directory made by experiments/precompute.py")


class _StopSignals:
  """SIGTERM / SIGINT set ``received`` (the loop saves and leaves after the current step); a second one of
  the same kind acts as usual. Only installs in the main thread (signal handlers must live there) of a
  single-process run."""

  def __init__(self):
    self.received: int | None = None
    self._old: dict[int, Any] = {}

  def __enter__(self):
    # Several processes would stop at different steps and block in the save's collectives: one process only.
    if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.received is not None:
      self.__exit__()
      signal.raise_signal(signum)
      return
    self.received = signum
    print(f"\n[lkjax] {signal.Signals(signum).name} received: saving a checkpoint after this step, then "
          "exiting (send it again to stop at once)", file=sys.stderr, flush=True)

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)
    self._old = {}


def _shown(path: str) -> str:
  """``path`` relative to the working directory when it lies below it (shorter commands to copy)."""
  rel = os.path.relpath(path)
  return path if rel.startswith("..") else rel


def next_commands(workdir: str, name: str) -> list[str]:
  """The commands that evaluate and export the run in ``workdir``."""
  w = shlex.quote(_shown(workdir))
  return [f"python experiments/evaluate.py --workdir={w} --limit=5 --max_new_tokens=64   # quick look; "
          "drop the limits for the full benchmarks",
          f"python experiments/export.py --workdir={w} --out={shlex.quote(os.path.join('exports', name or 'draft'))}",
          f"tensorboard --logdir={shlex.quote(_shown(os.path.join(workdir, metrics_lib.TB_DIR)))}"]


def _finite(metrics: Mapping[str, Any]) -> bool:
  return bool(np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"]))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                       stop_after: int | None = None) -> dict[str, Any]:
  """Train ``config`` in ``workdir`` (resuming if it holds a checkpoint); returns the final summary dict.

  ``stop_after``: leave after this step (with a forced checkpoint), as a preempted job would; rerunning
  resumes. The schedule still spans the config's full run.
  """
  from tqdm.auto import tqdm

  from lkjax import distributed
  validate_config(config)
  workdir = check_workdir(workdir)
  distributed.check_same_config(config)  # multi-process: every process runs this config, or all stop here
  is_main = jax.process_index() == 0
  t_start = time.perf_counter()
  commit = git_commit()   # provenance, read before training (the checkout may change under a long run)
  manifest = ensure_data(config)
  setup = build_setup(config, manifest)

  # Mesh and shardings.
  mesh = shd.make_mesh(config.mesh.shape)
  rules = tuple(tuple(r) for r in config.mesh.rules)
  dp = shd.data_parallel_size(mesh, rules)
  if config.batch_size % (dp * config.optim.grad_accum):
    raise ValueError(f"batch_size={config.batch_size} must be divisible by the data-parallel size {dp} "
                     f"times optim.grad_accum={config.optim.grad_accum}")

  from lkjax.data.pipeline import num_batches
  steps_per_epoch = num_batches(config.data.dir, split="train", global_batch_size=config.batch_size,
                                max_length=config.data.max_length, num_epochs=1, packing=config.data.packing,
                                val_fraction=config.data.val_fraction)
  total_steps = _total_steps(config, steps_per_epoch)
  tx = optim.make_optimizer(config.optim, total_steps)
  lr_schedule = optim.learning_rate_schedule(config.optim, total_steps)

  graphdef, params, rest = nnx.split(setup.model, nnx.Param, ...)
  param_sh = shd.state_shardings(params, mesh, rules)
  rest_sh = shd.state_shardings(rest, mesh, rules)
  params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
  rest = step_lib.precast_rest(rest, config.precision)
  state_sh = step_lib.state_shardings(param_sh, tx, params, mesh)
  target = step_lib.make_target(setup.target_weights["lm_head"],
                                None if setup.draft_vocab is None else setup.draft_vocab.token_ids,
                                full_head=not setup.target_lse)
  rep = shd.replicated(mesh)
  target_sh = jax.tree.map(lambda _: rep, target)
  example = _example_batch(config, setup.target_info, target_lse=setup.target_lse)
  batch_sh = shd.batch_shardings(example, mesh, rules)
  shardings = dict(mesh=mesh, state=state_sh, rest=rest_sh, target=target_sh, batch=batch_sh,
                   batch_spec=lambda nd: shd.batch_spec(nd, mesh, rules, config.batch_size))

  state = jax.device_put(step_lib.init_state(params, tx, config.seed), state_sh)
  rest = jax.device_put(rest, rest_sh)
  target = jax.device_put(target, target_sh)
  del params

  # Resume (state + data iterator) or start fresh.
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
      f.write(config.to_json(indent=2))
  ckpt = ckpt_lib.Checkpointer(workdir, every=config.checkpoint.every, keep=config.checkpoint.keep,
                               every_minutes=float(config.checkpoint.get("every_minutes", 0)))
  writer = metrics_lib.MetricWriter(workdir)
  train_num_epochs = None if config.num_steps > 0 else int(config.num_epochs)
  train_iter = iter(_loader(config, "train", num_epochs=train_num_epochs, shuffle=True, drop_remainder=True))
  start = 0
  if ckpt.latest_step() is not None:
    abstract = ckpt_lib.abstract_with_shardings(state, state_sh)
    state, meta = ckpt.restore(abstract, data_iter=train_iter)
    start = int(jax.device_get(state["step"]))
    writer.truncate_after(start)
    print(f"[lkjax] resumed from {ckpt.directory}/{start} (step {start} of {total_steps})", flush=True)

  train_step = step_lib.make_train_step(graphdef, tx, config.loss, total_steps=total_steps,
                                        precision=config.precision, grad_accum=config.optim.grad_accum,
                                        shardings=shardings)
  eval_step = step_lib.make_eval_step(graphdef, config.loss, total_steps=total_steps,
                                      precision=config.precision, shardings=shardings)

  def to_device(local):
    return shd.global_batch_from_local(local, mesh, rules, config.batch_size)

  def evaluate(step: int) -> dict[str, Any]:
    it = iter(_loader(config, "val", num_epochs=1, shuffle=False, drop_remainder=False))
    local_rows = config.batch_size // jax.process_count()
    ms = []
    for i, b in enumerate(it):
      if config.eval_steps and i >= config.eval_steps:
        break
      ms.append(jax.device_get(eval_step(state["params"], rest, target, to_device(_pad_rows(b, local_rows)),
                                         jnp.asarray(step, jnp.int32))))
    agg = step_lib.aggregate_eval(ms)
    writer.write(step, agg, split="val")
    return agg

  step = start
  compiled = None
  last_val: dict[str, Any] = {}
  last_train: dict[str, Any] = {}
  window_tokens, window_time, window_steps = 0, 0.0, 0
  end = total_steps if stop_after is None else min(total_steps, int(stop_after))
  pbar = tqdm(total=total_steps, initial=start, desc=config.get("name", "train"), disable=not is_main,
              dynamic_ncols=True)
  t_prev = time.perf_counter()
  status = "finished"
  stop = _StopSignals()
  try:
    stop.__enter__()
    while step < end:
      try:
        local = next(train_iter)
      except StopIteration:
        status = "data exhausted"
        break
      batch = to_device(local)
      if compiled is None:
        if is_main:
          pbar.write("[lkjax] compiling the train step ...")
        t0 = time.perf_counter()
        compiled = train_step.lower(state, rest, target, batch).compile()
        _print_compile_report(compiled, time.perf_counter() - t0, config, total_steps)
        t_prev = time.perf_counter()
      state, m = compiled(state, rest, target, batch)
      m = jax.device_get(m)
      step += 1
      now = time.perf_counter()
      dt, t_prev = now - t_prev, now
      if not _finite(m):
        writer.write(step, {"loss": m["loss"], "grad_norm": m["grad_norm"]}, split="train")
        raise NonFiniteLossError(step, ckpt.latest_step(), workdir)
      tokens = int((np.asarray(local["segment_ids"]) > 0).sum()) * jax.process_count()
      window_tokens += tokens
      window_time += dt
      window_steps += 1
      pbar.update(1)
      pbar.set_postfix(loss=f"{float(m['loss']):.4f}", tau=f"{float(m['tau']):.3f}", refresh=False)
      if step % config.log_every == 0 or step == total_steps:
        m = dict(m, lr=float(lr_schedule(step - 1)), tokens_per_s=window_tokens / max(window_time, 1e-9),
                 step_time_s=window_time / max(window_steps, 1))
        last_train = writer.write(step, m, split="train")
        window_tokens, window_time, window_steps = 0, 0.0, 0
      if config.eval_every and (step % config.eval_every == 0 or step == total_steps):
        last_val = metrics_lib.flatten(evaluate(step))
        if is_main:
          pbar.write(f"[lkjax] step {step}: val loss {last_val['loss']:.4f} tau {last_val['tau']:.3f}")
        t_prev = time.perf_counter()  # validation time is not step time
      ckpt.save(step, state, data_iter=train_iter, meta={"name": config.get("name", ""), "loss": float(m["loss"])},
                force=step == total_steps)
      if stop.received is not None:
        status = f"stopped by {signal.Signals(stop.received).name} (rerun the same command to resume)"
        break
    if step < total_steps and status == "finished":
      status = f"stopped after step {step} (rerun to resume)"
    ckpt.save(step, state, data_iter=train_iter, meta={"name": config.get("name", "")}, force=True)
  finally:
    stop.__exit__()
    pbar.close()
    writer.close()
    ckpt.close()

  summary = dict(status=status, step=step, total_steps=total_steps, workdir=workdir, commit=commit,
                 checkpoint=os.path.join(ckpt.directory, str(step)),
                 metrics=os.path.join(workdir, metrics_lib.METRICS_FILE),
                 tensorboard=os.path.join(workdir, metrics_lib.TB_DIR), train=last_train, val=last_val,
                 target_lse=setup.target_lse, checkpoints=ckpt.all_steps(),
                 signal=None if stop.received is None else signal.Signals(stop.received).name)
  if is_main:
    write_json(os.path.join(workdir, SUMMARY_FILE), summary)
    split, tau = ("val", last_val["tau"]) if "tau" in last_val else ("train", last_train.get("tau", float("nan")))
    minutes = (time.perf_counter() - t_start) / 60
    lines = [f"[lkjax] {status} at step {step}/{total_steps} in {minutes:.1f} min ({split} tau {tau:.3f})",
             f"  checkpoint  {_shown(summary['checkpoint'])} (kept steps: {summary['checkpoints']})",
             f"  metrics     {_shown(summary['metrics'])}, {_shown(os.path.join(workdir, SUMMARY_FILE))}",
             f"  tensorboard {_shown(summary['tensorboard'])}",
             "next:", *(f"  {c}" for c in next_commands(workdir, config.get("name", "")))]
    print("\n".join(lines), flush=True)
  return summary


def _example_batch(config, info, *, target_lse: bool = False) -> dict[str, np.ndarray]:
  """Zeros with the global batch's shapes and dtypes (`lkjax.models.base` schema)."""
  import ml_dtypes
  b, t, h = config.batch_size, config.data.max_length, info.hidden_size
  i32 = np.int32
  out = dict(input_ids=np.zeros((b, t), i32), loss_mask=np.zeros((b, t), np.uint8),
             segment_ids=np.zeros((b, t), i32), positions=np.zeros((b, t), i32),
             aux_hidden=np.zeros((b, t, info.num_aux * h), ml_dtypes.bfloat16),
             final_hidden=np.zeros((b, t, h), ml_dtypes.bfloat16))
  if target_lse:
    out["target_lse"] = np.zeros((b, t), np.float32)
  return out


def _print_compile_report(compiled, seconds: float, config, total_steps: int) -> None:
  if jax.process_index() != 0:
    return
  mem = compiled.memory_analysis()
  parts = [f"train step compiled in {seconds:.1f}s"]
  if mem is not None:
    gib = 1 / 2**30
    parts.append(f"memory per device: args {mem.argument_size_in_bytes * gib:.3f} GiB, "
                 f"temps {mem.temp_size_in_bytes * gib:.3f} GiB, out {mem.output_size_in_bytes * gib:.3f} GiB")
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
  if cost and "flops" in cost:
    parts.append(f"{cost['flops'] / 1e9:.1f} GFLOP/step")
  from tqdm.auto import tqdm
  tqdm.write(f"[lkjax] {'; '.join(parts)}; {total_steps} steps of {config.batch_size} x {config.data.max_length}")


# ----------------------------------------------------------------------------------------------- reload


def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
  """Finished checkpoint steps under ``<workdir>/checkpoints`` (orbax's temporary directories excluded)."""
  d = os.path.join(os.fspath(workdir), ckpt_lib.CHECKPOINT_DIR)
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d) if n.isdigit() and os.path.isdir(os.path.join(d, n)))


def check_run_source(*, workdir: str | None = None, checkpoint: str | None = None,
                     have_config: bool = False) -> str:
  """Check the ``--workdir`` / ``--checkpoint`` flag of evaluate.py and export.py before anything loads.

  Returns the run's workdir. Raises FileNotFoundError / ValueError naming the flag, the existing
  checkpoint steps, and the ``--config`` flag when the run has no config.json and none was given.
  """
  if checkpoint:
    path = os.path.abspath(checkpoint)
    parent, name = os.path.dirname(path), os.path.basename(path)
    if os.path.basename(parent) != ckpt_lib.CHECKPOINT_DIR or not name.isdigit():
      raise ValueError(f"--checkpoint={checkpoint}: expected <workdir>/{ckpt_lib.CHECKPOINT_DIR}/<step> "
                       "(or pass --workdir=<workdir> for its latest checkpoint)")
    wd = os.path.dirname(parent)
    if not os.path.isdir(path):
      steps = checkpoint_steps(wd)
      there = (f"the existing steps are {steps}: e.g. --checkpoint={os.path.join(os.path.dirname(checkpoint), str(steps[-1]))}, "
               f"or --workdir={_shown(wd)} for the latest" if steps else f"{parent} holds no checkpoints")
      raise FileNotFoundError(f"--checkpoint={checkpoint}: there is no checkpoint of step {name}; {there}.")
  else:
    wd = os.path.abspath(workdir)
    if not os.path.isdir(wd):
      raise FileNotFoundError(f"--workdir={workdir}: no such directory; pass the workdir of a training run "
                              "(experiments/train.py writes runs/<config name> unless given --workdir).")
    if not checkpoint_steps(wd):
      raise FileNotFoundError(f"--workdir={workdir}: holds no checkpoint yet ({os.path.join(wd, ckpt_lib.CHECKPOINT_DIR)} "
                              "is empty or missing); train it first (experiments/train.py --workdir=...).")
  if not have_config and not os.path.exists(os.path.join(wd, CONFIG_FILE)):
    raise ValueError(f"{wd} has no {CONFIG_FILE}: pass the config the run was trained with as the --config "
                     "flag, e.g. --config=configs/eagle3.py.")
  return wd


@dataclasses.dataclass
class TrainedDraft:
  """A draft rebuilt from a workdir: the NNX model with restored params, its config and vocabulary."""

  model: Any
  config: ml_collections.ConfigDict
  target_info: Any
  draft_vocab: Any
  step: int


def load_trained_draft(workdir_or_checkpoint: str | os.PathLike,
                       config: ml_collections.ConfigDict | None = None,
                       compute_dtype: str | None = None) -> TrainedDraft:
  """Rebuild the draft of a training run with its trained parameters (host, single device).

  Args:
    workdir_or_checkpoint: a run's workdir (latest checkpoint) or ``<workdir>/checkpoints/<step>``.
    config: the run's config (default: ``<workdir>/config.json``).
    compute_dtype: ``"float32"`` or ``"bfloat16"`` overrides the run's compute dtype (parameters are float32
      either way), e.g. to draft exactly as an engine that runs the exported draft in float32 does.
  """
  path = os.path.abspath(os.fspath(workdir_or_checkpoint))
  step = None
  if os.path.basename(os.path.dirname(path)) == ckpt_lib.CHECKPOINT_DIR and os.path.basename(path).isdigit():
    step = int(os.path.basename(path))
    workdir = os.path.dirname(os.path.dirname(path))
  else:
    workdir = path
  if config is None:
    cfg_path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(cfg_path):
      raise FileNotFoundError(f"{cfg_path} is missing: point at a training workdir, or pass the run's config "
                              "(--config=configs/<arch>.py on the command line, config= in Python)")
    with open(cfg_path) as f:
      config = ml_collections.ConfigDict(json.load(f))
  if compute_dtype:
    if compute_dtype not in _MODEL_DTYPES.values():
      raise ValueError(f"compute_dtype={compute_dtype!r}: expected one of {sorted(_MODEL_DTYPES.values())}")
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.dtype = compute_dtype
  from lkjax.data import shards
  setup = build_setup(config, shards.read_manifest(config.data.dir))
  _, params, _ = nnx.split(setup.model, nnx.Param, ...)
  pure = nnx.to_pure_dict(params)
  tx = optim.make_optimizer(config.optim, total_steps=1)  # only the state's structure matters here
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.eval_shape(lambda p: step_lib.init_state(p, tx, 0), pure)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), abstract)
  ckpt = ckpt_lib.Checkpointer(workdir, every=1, keep=1 << 30)
  try:
    if (step if step is not None else ckpt.latest_step()) is None:
      raise FileNotFoundError(f"{workdir}: no checkpoint to load")
    if step is not None and step not in ckpt.all_steps():
      raise FileNotFoundError(f"{workdir}: no checkpoint of step {step}; existing steps: {ckpt.all_steps()}")
    state, _ = ckpt.restore(abstract, step=step)
  finally:
    ckpt.close()
  nnx.replace_by_pure_dict(params, state["params"])
  nnx.update(setup.model, params)
  return TrainedDraft(model=setup.model, config=config, target_info=setup.target_info,
                      draft_vocab=setup.draft_vocab, step=int(state["step"]))
