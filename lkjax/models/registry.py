"""Draft-model registry: default configs per architecture, compatibility checks, and `build_draft`.

``cfg.arch`` picks the module (``eagle3``, ``mtp``, ``medusa``, ``mlp_speculator``); each exposes
``from_config(cfg, target, *, draft_vocab, target_weights, rngs)``.  Sizes derived from the target may
be written as 0 in config files ("inherit"); `check_compatible` resolves them and raises a ValueError
naming the offending key before anything is compiled.
"""
from __future__ import annotations

import importlib
from typing import Any, Mapping

import ml_collections
import numpy as np
from flax import nnx

from lkjax.models import eagle3, layers, mtp
from lkjax.targets.info import TargetInfo

ARCHS = ("eagle3", "mtp", "medusa", "mlp_speculator")


def _default_eagle3_vocab(vocab_size: int) -> int:
  """EAGLE-3's truncated vocabulary: 32000 for Llama-3-sized (128K) targets, 8192 for ~50K, else full."""
  if vocab_size >= 100_000:
    return 32000
  if vocab_size > 16384:
    return 8192
  return 0


def default_model_config(arch: str, target: TargetInfo) -> ml_collections.ConfigDict:
  """The default draft config for ``arch`` on ``target`` (EAGLE-3 mirrors the target's layer shape).

  Common keys: ``arch``, ``num_heads`` (K: 7 for EAGLE-3/MTP, 6 for MEDUSA/MLP-Speculator),
  ``draft_vocab_size`` (0 = full V), ``dtype``.
  """
  if arch not in ARCHS:
    raise ValueError(f"arch={arch!r}: expected one of {ARCHS}")
  c = ml_collections.ConfigDict()
  c.arch = arch
  c.dtype = "float32"
  if arch == "eagle3":
    c.num_heads = 7
    c.draft_vocab_size = _default_eagle3_vocab(target.vocab_size)
    c.hidden_size = target.hidden_size
    c.num_attention_heads = target.num_attention_heads
    c.num_key_value_heads = target.num_key_value_heads
    c.head_dim = target.head_dim
    c.intermediate_size = target.intermediate_size
    c.num_layers = 1
    c.rms_norm_eps = target.rms_norm_eps
    c.rope_theta = target.rope_theta
    c.init_lm_head_from_target = False
  elif arch == "mtp":
    c.num_heads = 7
    c.draft_vocab_size = 0
    c.share_weights = True
  elif arch == "medusa":
    c.num_heads = 6
    c.draft_vocab_size = 0
    c.num_layers = 1
    c.fc_bias = True
    c.init_head_from_target = True
  else:
    c.num_heads = 6
    c.draft_vocab_size = 0
    c.inner_dim = target.hidden_size
    c.emb_dim = target.hidden_size
    c.tie_weights = False
    c.scale_input = False
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
                target_weights: Mapping[str, np.ndarray] | None = None, rngs: nnx.Rngs) -> Any:
  """Check ``cfg`` against ``target`` and build the draft model ``cfg.arch`` names.

  Args:
    cfg: ConfigDict (see `default_model_config`).
    target: the target's `TargetInfo`.
    draft_vocab: int ``[Vd]`` ascending target ids, or None (Vd = V).
    target_weights: ``{"embed_tokens": [V, Ht], "lm_head": [V, Ht], "norm": [Ht]}`` float32 numpy, or
      None (random init, for tests).
    rngs: nnx.Rngs with a ``params`` stream.
  Returns:
    An NNX module following `lkjax.models.base.DraftModel`.
  """
  check_compatible(cfg, target, draft_vocab)
  module = {"eagle3": eagle3, "mtp": mtp}.get(cfg.arch)
  if module is None:   # imported lazily: these modules are optional for EAGLE-3/MTP users
    module = importlib.import_module(f"lkjax.models.{cfg.arch}")
  return module.from_config(cfg, target, draft_vocab=draft_vocab, target_weights=target_weights, rngs=rngs)
