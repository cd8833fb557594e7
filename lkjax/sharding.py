"""Device mesh (data, fsdp, tensor) and logical-axis sharding of parameters, optimizer state and batches.

Models annotate parameters with logical axis names (``nnx.with_partitioning(init, ("embed", "mlp"))``,
stored in the variable's ``out_sharding`` metadata); the config's rules map each logical name to a mesh
axis, a tuple of mesh axes, or None (replicated), e.g. ``(("batch", ("data", "fsdp")), ("embed", "fsdp"),
("mlp", "tensor"))``. A dimension whose size the mapped axes do not divide is replicated (so the same
config runs on 1, 2 or 8 devices with any model size), and a mesh axis is used at most once per array.
"""
from __future__ import annotations

import math
import re
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Replace one -1 in ``shape`` by the remaining device count; the product must equal ``num_devices``."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh.shape={shape}: needs {len(MESH_AXES)} entries for axes {MESH_AXES}")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh.shape={shape}: entries must be positive, with at most one -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh.shape={shape}: {num_devices} devices are not divisible by {known}")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh.shape={shape} needs {math.prod(shape)} devices, {num_devices} are available")
  return shape


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh with Auto axis types (GSPMD propagation from our explicit shardings).

  A shape without -1 that needs fewer devices than there are uses the first ones, so e.g. ``(1, 1, 1)``
  runs on one device of a bigger host (debugging, tiny models); multi-process runs must use every device.
  """
  devices = list(devices) if devices is not None else jax.devices()
  fixed = tuple(int(s) for s in shape)
  if -1 not in fixed and 0 < math.prod(fixed) < len(devices) and jax.process_count() == 1:
    devices = devices[:math.prod(fixed)]
  shape = resolve_mesh_shape(shape, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def _rules_dict(rules: Iterable[Sequence[Any]]) -> dict[str, tuple[str, ...]]:
  out = {}
  for rule in rules:
    if len(rule) != 2:
      raise ValueError(f"mesh.rules: each rule is (logical_name, mesh_axes), got {rule!r}")
    name, axes = rule
    if axes is None:
      axes = ()
    elif isinstance(axes, str):
      axes = (axes,)
    axes = tuple(axes)
    for a in axes:
      if a not in MESH_AXES:
        raise ValueError(f"mesh.rules: {name!r} maps to unknown mesh axis {a!r} (axes: {MESH_AXES})")
    out.setdefault(name, axes)  # first rule wins, as in flax's logical_axis_rules
  return out


def logical_spec(names: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                 rules: Iterable[Sequence[Any]]) -> P:
  """PartitionSpec of an array with logical axis ``names`` under ``rules`` (non-divisible dims replicated)."""
  if not names:
    return P()
  if len(names) != len(shape):
    raise ValueError(f"logical axes {tuple(names)} do not match an array of shape {tuple(shape)}")
  table = _rules_dict(rules)
  used: set[str] = set()
  spec = []
  for name, size in zip(names, shape):
    axes = tuple(a for a in table.get(name, ()) if a not in used and mesh.shape[a] > 1) if name else ()
    if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
      used.update(axes)
      spec.append(axes[0] if len(axes) == 1 else axes)
    else:
      spec.append(None)
  return P(*spec)


def _var_names(v: nnx.Variable):
  meta = v.get_metadata()
  return meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")


def state_shardings(state: nnx.State, mesh: Mesh, rules) -> dict:
  """Pure-dict tree of NamedSharding for an nnx.State (concrete or abstract) from its logical axes."""
  def f(v):
    return v.replace(NamedSharding(mesh, logical_spec(_var_names(v), v.shape, mesh, rules)))
  shard_state = jax.tree.map(f, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(shard_state)


def opt_state_shardings(tx: optax.GradientTransformation, params: Any, param_shardings: Any,
                        mesh: Mesh) -> Any:
  """Shardings of ``tx.init(params)``: moments follow their parameter, counters are replicated."""
  abstract = jax.eval_shape(tx.init, params)
  return optax.tree_map_params(tx, lambda _, s: s, abstract, param_shardings,
                               transform_non_params=lambda _: NamedSharding(mesh, P()),
                               is_leaf=lambda x: isinstance(x, NamedSharding))


def batch_spec(ndim: int, mesh: Mesh, rules, batch_size: int) -> P:
  """Leading (batch) dim over the mesh axes of the ``batch`` rule, the rest replicated."""
  return logical_spec(("batch",) + (None,) * (ndim - 1), (batch_size,) + (1,) * (ndim - 1), mesh, rules)


def batch_shardings(batch: Mapping[str, Any], mesh: Mesh, rules) -> dict[str, NamedSharding]:
  """NamedSharding per batch key (global shapes)."""
  return {k: NamedSharding(mesh, batch_spec(np.ndim(v), mesh, rules, np.shape(v)[0])) for k, v in batch.items()}


def varying_axes(x) -> frozenset:
  """The manual mesh axes along which ``x`` (a value inside ``shard_map``) may differ between devices."""
  mat = getattr(jax.typeof(x), "manual_axis_type", None)
  return frozenset(mat.varying) if mat is not None else frozenset()


def cotangent_like(ct: jax.Array, primal: jax.Array) -> jax.Array:
  """A hand-written VJP's cotangent ``ct`` for ``primal``, summed over the manual mesh axes along which
  ``ct`` varies and ``primal`` does not.

  Inside ``shard_map`` an input that is the same on every device (a replicated constant, an empty
  array) but is combined with per-device data gets per-device cotangents; its true cotangent is their
  sum, and JAX requires the bwd rule to return that type. Outside ``shard_map`` this returns ``ct``.
  """
  extra = varying_axes(ct) - varying_axes(primal)
  return jax.lax.psum(ct, tuple(sorted(extra))) if extra else ct


_HLO_BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
              "s8": 1, "u8": 1, "pred": 1}


def collective_bytes(hlo_text: str, op: str) -> int:
  """Bytes one device's ``op`` collectives (``"all-reduce"``, ``"reduce-scatter"``, ``"all-gather"``)
  produce per execution, from compiled HLO text (``compiled.as_text()``): the summed sizes of the results
  of every ``op`` / ``op-start`` (tuples counted whole)."""
  total = 0
  for line in hlo_text.splitlines():
    if f" {op}(" not in line and f" {op}-start(" not in line:
      continue
    result = line.split("=", 1)[1].split(op, 1)[0]
    for dt, dims in re.findall(r"\b(" + "|".join(_HLO_BYTES) + r")\[([\d,]*)\]", result):
      total += _HLO_BYTES[dt] * math.prod(int(d) for d in dims.split(",") if d)
  return total


def all_reduce_bytes(hlo_text: str) -> int:
  """`collective_bytes` of the all-reduces."""
  return collective_bytes(hlo_text, "all-reduce")


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh, rules) -> int:
  """How many ways the batch is split (product of the mesh axes of the ``batch`` rule)."""
  return math.prod(mesh.shape[a] for a in _rules_dict(rules).get("batch", ()))


def global_batch_from_local(local: Mapping[str, np.ndarray], mesh: Mesh, rules,
                            global_batch_size: int) -> dict[str, jax.Array]:
  """Assemble this process's rows (``[B / num_processes, ...]``) into global sharded jax arrays."""
  out = {}
  for k, v in local.items():
    v = np.asarray(v)
    gshape = (global_batch_size,) + v.shape[1:]
    sharding = NamedSharding(mesh, batch_spec(v.ndim, mesh, rules, global_batch_size))
    out[k] = jax.make_array_from_process_local_data(sharding, v, gshape)
  return out
