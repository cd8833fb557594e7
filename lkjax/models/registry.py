"""The architecture registry: one `ArchSpec` per draft (model module, config defaults, exporter, vLLM
method, K, default eta, display title) that training, evaluation, export, the study and the benchmarks
all read; compatibility checks; `build_draft`.

Adding an architecture: its model file ``lkjax/models/<name>.py`` (``from_config(cfg, target, *,
draft_vocab, target_weights, rngs, perf)``), its config ``configs/<name>.py``, its exporter and one
`SPECS` entry.  Sizes derived from the target may
be written as 0 in config files ("inherit"); `check_compatible` resolves them and raises a ValueError
naming the offending key before anything is compiled.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Mapping

import ml_collections
import numpy as np
from flax import nnx

from lkjax.models import eagle3, layers, mtp
from lkjax.perf import PerfOptions
from lkjax.targets.info import TargetInfo

@dataclasses.dataclass(frozen=True)
class ArchSpec:
  """Everything lkjax knows about one draft architecture, in one place.

  ``model_defaults`` are the ``config.model`` keys of ``configs/<name>.py`` (0 = inherit from the target;
  ``dtype`` "" = follow ``config.precision``); ``inherit`` maps the keys a target fills to `TargetInfo`
  fields. ``exporter`` is ``"module:function"`` (`lkjax.export.export_draft`); ``vllm_method`` is vLLM's
  ``speculative_config`` method (None: no stand-alone serving path).
  """
  name: str
  title: str
  num_heads: int
  eta: float
  model_defaults: Mapping[str, Any]
  exporter: str
  vllm_method: str | None
  inherit: Mapping[str, str] = dataclasses.field(default_factory=dict)

  @property
  def module(self) -> str:
    return f"lkjax.models.{self.name}"


_LLAMA_LAYER = {"hidden_size": "hidden_size", "num_attention_heads": "num_attention_heads",
                "num_key_value_heads": "num_key_value_heads", "head_dim": "head_dim",
                "intermediate_size": "intermediate_size", "rms_norm_eps": "rms_norm_eps", "rope_theta": "rope_theta"}

SPECS: dict[str, ArchSpec] = {s.name: s for s in (
    ArchSpec("eagle3", "EAGLE-3", 7, 3.0, dict(
        arch="eagle3", num_heads=7, draft_vocab_size=8192, dtype="", hidden_size=0, num_attention_heads=0,
        num_key_value_heads=0, head_dim=0, intermediate_size=0, num_layers=1, rms_norm_eps=0.0, rope_theta=0.0,
        init_lm_head_from_target=False),
        "lkjax.export.eagle3:export_eagle3", "eagle3", _LLAMA_LAYER),
    ArchSpec("mtp", "MTP", 7, 3.0, dict(arch="mtp", num_heads=7, draft_vocab_size=8192, dtype="", share_weights=True),
             "lkjax.export.mtp:export_mtp", None),
    ArchSpec("medusa", "MEDUSA", 6, 10.0, dict(
        arch="medusa", num_heads=6, draft_vocab_size=8192, dtype="", num_layers=1, fc_bias=True,
        init_head_from_target=True),
        "lkjax.export.medusa:export_medusa", "medusa"),
    ArchSpec("mlp_speculator", "MLP-Speculator", 6, 3.0, dict(
        arch="mlp_speculator", num_heads=6, draft_vocab_size=8192, dtype="", inner_dim=0, emb_dim=0,
        tie_weights=False, scale_input=False),
        "lkjax.export.mlp_speculator:export_mlp_speculator", "mlp_speculator",
        {"inner_dim": "hidden_size", "emb_dim": "hidden_size"}),
)}
ARCHS = tuple(SPECS)


def spec(arch: str) -> ArchSpec:
  """The `ArchSpec` of ``arch``; a ValueError naming the known ones otherwise."""
  if arch not in SPECS:
    raise ValueError(f"arch={arch!r}: expected one of {ARCHS}")
  return SPECS[arch]


def model_config(arch: str) -> ml_collections.ConfigDict:
  """``config.model`` defaults of ``arch`` as the config files use them (target sizes 0 = inherit)."""
  return ml_collections.ConfigDict(dict(spec(arch).model_defaults))


def default_draft_vocab(vocab_size: int) -> int:
  """The draft vocabulary for a target of ``vocab_size``: 32000 for Llama-3-sized (128K+) targets, 8192 for
  ~50K, else the full vocabulary (0)."""
  if vocab_size >= 100_000:
    return 32000
  if vocab_size > 16384:
    return 8192
  return 0


def default_model_config(arch: str, target: TargetInfo) -> ml_collections.ConfigDict:
  """`model_config` of ``arch`` made concrete for ``target``: inherited sizes filled in, the draft
  vocabulary sized for the target's (`default_draft_vocab`), float32 compute."""
  c = model_config(arch)
  c.dtype = "float32"
  c.draft_vocab_size = default_draft_vocab(target.vocab_size)
  for key, field in spec(arch).inherit.items():
    if not c[key]:
      c[key] = getattr(target, field)
  return c


def check_compatible(cfg, target: TargetInfo, draft_vocab=None) -> None:
  """Raise a ValueError if ``cfg`` cannot be built on ``target`` with ``draft_vocab``.

  Checks the architecture name, K, the dtype, the draft vocabulary (ids in [0, V), ascending, length
  = ``draft_vocab_size`` unless that is 0), the target's aux layers (EAGLE-3) and the target-derived
  sizes (0 = inherit; MTP/MEDUSA/MLP-Speculator must keep the target hidden size).
  """
  arch = cfg.get("arch", None)
  if arch not in ARCHS:
    raise ValueError(f"cfg.arch={arch!r}: expected one of {ARCHS}")
  if int(cfg.get("num_heads", 1)) < 1:
    raise ValueError(f"cfg.num_heads={cfg.get('num_heads')}: must be >= 1")
  layers.parse_dtype(cfg.get("dtype", "float32"))
  layers.check_draft_vocab(draft_vocab, target.vocab_size, int(cfg.get("draft_vocab_size", 0) or 0))
  if arch == "eagle3":
    if target.num_aux < 1:
      raise ValueError(f"target {target.name}: EAGLE-3 needs aux hidden layers, aux_layer_ids is empty")
    bad = [i for i in target.aux_layer_ids if not 0 <= i <= target.num_layers]
    if bad:
      raise ValueError(f"target {target.name}: aux_layer_ids {bad} outside [0, {target.num_layers}]")
    n_aux = cfg.get("num_aux_hidden_states", 0)
    if n_aux and int(n_aux) != target.num_aux:
      raise ValueError(f"cfg.num_aux_hidden_states={n_aux} but the target exports {target.num_aux} aux states "
                       f"{target.aux_layer_ids}")
    eagle3.resolve_config(cfg, target)
  elif arch == "mtp":
    mtp.resolve_config(cfg, target)
  else:
    hidden = cfg.get("hidden_size", 0)
    if hidden and int(hidden) != target.hidden_size:
      raise ValueError(f"cfg.hidden_size={hidden}: {arch} reads the target's final hidden state "
                       f"(hidden {target.hidden_size}); use 0 to inherit")
    sizes = ("num_layers",) if arch == "medusa" else ("inner_dim", "emb_dim")
    for key in sizes:
      if key in cfg and cfg[key] is not None and int(cfg[key]) < 0:
        raise ValueError(f"cfg.{key}={cfg[key]}: must be >= 0 (0 = inherit)")


def build_draft(cfg, target: TargetInfo, *, draft_vocab=None,
                target_weights: Mapping[str, np.ndarray] | None = None, rngs: nnx.Rngs,
                perf: PerfOptions | None = None) -> Any:
  """Check ``cfg`` against ``target`` and build the draft model ``cfg.arch`` names.

  Args:
    cfg: ConfigDict (see `default_model_config`).
    target: the target's `TargetInfo`.
    draft_vocab: int ``[Vd]`` ascending target ids, or None (Vd = V).
    target_weights: ``{"embed_tokens": [V, Ht], "lm_head": [V, Ht], "norm": [Ht]}`` float32 numpy, or
      None (random init, for tests).
    rngs: nnx.Rngs with a ``params`` stream.
    perf: how the draft computes (`lkjax.perf.from_config(config)`); None: this backend's default.
  Returns:
    An NNX module following `lkjax.models.base.DraftModel`.
  """
  check_compatible(cfg, target, draft_vocab)
  module = importlib.import_module(spec(cfg.arch).module)
  return module.from_config(cfg, target, draft_vocab=draft_vocab, target_weights=target_weights, rngs=rngs,
                            perf=perf)
