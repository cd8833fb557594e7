"""Checkpointer: sharded state + grain iterator round trip, intervals, forced saves, keep-N."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lkjax import sharding as shd
from lkjax.data import pipeline
from lkjax.train import checkpoint as ckpt_lib

from test_train_loop import make_data  # the tiny synthetic shard directory


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("ckpt_shards")
  make_data(d)
  return d


def _state(mesh):
  r = np.random.default_rng(0)
  shardings = dict(params={"w": NamedSharding(mesh, P("fsdp", "tensor")), "b": NamedSharding(mesh, P())},
                   step=NamedSharding(mesh, P()), rng=NamedSharding(mesh, P()))
  state = dict(params={"w": r.standard_normal((8, 4)).astype(np.float32), "b": np.arange(3.0, dtype=np.float32)},
               step=np.int32(7), rng=np.asarray(jax.random.key_data(jax.random.key(3))))
  return jax.device_put(state, shardings), shardings


def _loader(d):
  return pipeline.make_loader(d, split="train", global_batch_size=4, max_length=16, seed=1, num_epochs=2,
                              val_fraction=0.2, process_index=0, process_count=1)


def test_state_and_iterator_round_trip(data_dir, tmp_path):
  mesh = shd.make_mesh((2, 2, 2))
  state, shardings = _state(mesh)
  it = iter(_loader(data_dir))
  for _ in range(2):
    next(it)
  ck = ckpt_lib.Checkpointer(tmp_path, every=5, keep=3)
  assert ck.save(5, state, data_iter=it, meta={"loss": 1.5})
  expected = [next(it) for _ in range(3)]   # what an uninterrupted run reads next
  ck.close()

  ck = ckpt_lib.Checkpointer(tmp_path, every=5, keep=3)
  assert ck.latest_step() == 5
  fresh = iter(_loader(data_dir))
  zeros = jax.tree.map(jnp.zeros_like, state)
  restored, meta = ck.restore(ckpt_lib.abstract_with_shardings(zeros, shardings), data_iter=fresh)
  assert meta == {"loss": 1.5, "step": 5, "process_count": 1}
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, state)
  assert restored["params"]["w"].sharding == shardings["params"]["w"]
  for want in expected:
    got = next(fresh)
    for k in want:
      np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))
  ck.close()


def test_interval_force_and_keep(tmp_path):
  mesh = shd.make_mesh((8, 1, 1))
  state, _ = _state(mesh)
  ck = ckpt_lib.Checkpointer(tmp_path, every=2, keep=2)
  saved = [s for s in range(1, 8) if ck.save(s, state)]
  assert saved == [2, 4, 6]                        # off-interval steps are skipped ...
  assert ck.save(7, state, force=True)            # ... unless forced (the final save)
  assert not ck.save(7, state, force=True)        # a step is never written twice
  assert ck.all_steps() == [6, 7]                  # keep-N
  with pytest.raises(FileNotFoundError):
    ckpt_lib.Checkpointer(tmp_path / "empty", every=1, keep=1).restore(state)
  with pytest.raises(ValueError, match="checkpoint.keep"):
    ckpt_lib.Checkpointer(tmp_path, every=1, keep=0)
  ck.close()


def test_time_interval_saves_between_step_intervals(tmp_path):
  now = [0.0]
  ckpt = ckpt_lib.Checkpointer(tmp_path, every=100, keep=10, every_minutes=2.0, clock=lambda: now[0])
  state = {"w": jnp.zeros(3), "step": jnp.asarray(0)}
  saved = []
  for step in range(1, 11):
    now[0] += 50.0   # 50 s per step: 120 s pass during steps 3, 6 (counted from the last save) and 9
    if ckpt.save(step, dict(state, step=jnp.asarray(step))):
      saved.append(step)
  assert saved == [3, 6, 9]
  assert not ckpt.save(10, state) and ckpt.save(10, state, force=True)
  ckpt.close()
  with pytest.raises(ValueError, match="every_minutes"):
    ckpt_lib.Checkpointer(tmp_path / "x", every=1, keep=1, every_minutes=-1)
