"""orbax checkpoints of the train state together with the grain data iterator.

Layout: ``<workdir>/checkpoints/<step>/{state, data, meta}``
  state  the train state pytree (params, opt_state, step, rng) -- `lkjax.train.step`
  data   the grain iterator position (grain's orbax handler; one JSON file per process)
  meta   JSON: step, process_count, config name, last metrics (what `load_trained_draft` and resumption read)

Multi-process runs: every process calls `save` / `restore` (orbax writes each array's shards from the
process that holds them; the workdir must be on storage all processes share). The state restores with any
process count (evaluation and export read it in one process); the data iterator positions are per process,
so resuming training needs the process count that saved them (`restore` says so otherwise).

Saving the iterator with the state is what makes a resumed run see exactly the batches an uninterrupted
run would have seen. Saves at multiples of ``every``, whenever ``every_minutes`` have passed since the last
save (or since the Checkpointer was made), plus forced saves (final step, a stop signal); only the newest
``keep`` are kept. Restoring uses an
abstract target carrying concrete `NamedSharding`s, so arrays land directly on the current mesh.
"""
from __future__ import annotations

import os
import time
from typing import Any, Mapping

import grain
import jax
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"


def abstract_with_shardings(state: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of ``state`` (arrays or abstract) placed with ``shardings`` (same tree)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


class Checkpointer:
  """Periodic / forced saves and restores of ``(state, data iterator, meta)`` under a workdir."""

  def __init__(self, workdir: str | os.PathLike, *, every: int, keep: int, every_minutes: float = 0.0,
               clock=time.monotonic):
    if every < 1:
      raise ValueError(f"checkpoint.every={every}: must be >= 1")
    if keep < 1:
      raise ValueError(f"checkpoint.keep={keep}: must be >= 1")
    if every_minutes < 0:
      raise ValueError(f"checkpoint.every_minutes={every_minutes}: must be >= 0 (0: off)")
    self.every_seconds = 60.0 * float(every_minutes)
    self._clock = clock
    self._last_save = clock()
    self.directory = os.path.abspath(os.path.join(os.fspath(workdir), CHECKPOINT_DIR))
    self.every = int(every)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, *, data_iter: Any = None, meta: Mapping[str, Any] | None = None,
           force: bool = False) -> bool:
    """Save at ``step`` if it is on the step or time interval (or ``force``); returns whether a save happened."""
    # The intervals are ours (orbax would also save the first step of every run).
    timed = self.every_seconds > 0 and self._clock() - self._last_save >= self.every_seconds
    if step in self.manager.all_steps() or not (force or timed or step % self.every == 0):
      return False
    meta = dict(meta or {}, step=int(step), process_count=jax.process_count())
    items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    saved = self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    self.manager.wait_until_finished()
    self._last_save = self._clock()
    return bool(saved)

  def restore(self, abstract_state: Any, *, data_iter: Any = None, step: int | None = None
              ) -> tuple[Any, dict[str, Any]]:
    """Restore (state, meta) of ``step`` (default: latest) onto ``abstract_state``; ``data_iter`` in place."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
    items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    if data_iter is not None:
      saved_by = self.restore_meta(step).get("process_count")  # absent in checkpoints older than the key
      if saved_by is not None and int(saved_by) != jax.process_count():
        raise ValueError(
            f"{self.directory}/{step} was saved by {saved_by} processes and this run has {jax.process_count()}: "
            f"each process's data position is its own share of the records, so training resumes only with "
            f"{saved_by} processes (evaluation and export load the parameters with any process count).")
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    return out["state"], dict(out["meta"])

  def restore_meta(self, step: int | None = None) -> dict[str, Any]:
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{self.directory}: no checkpoint")
    return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
