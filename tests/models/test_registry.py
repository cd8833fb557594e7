"""Model registry: defaults per architecture, compatibility checks, dispatch and 0 = inherit resolution."""
from __future__ import annotations

import ml_collections
import numpy as np
import pytest
from flax import nnx

from lkjax.models import eagle3, mtp, registry
from lkjax.targets.info import TargetInfo

from draft_testing import SMOL

TINY = TargetInfo(name="tiny", model_type="llama", num_layers=8, hidden_size=16, vocab_size=64,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=4, intermediate_size=24,
                  rms_norm_eps=1e-6, rope_theta=5e5, max_position_embeddings=64)


def test_default_configs():
  e = registry.default_model_config("eagle3", SMOL)
  assert (e.arch, e.num_heads, e.draft_vocab_size, e.num_layers) == ("eagle3", 7, 8192, 1)
  assert (e.hidden_size, e.num_attention_heads, e.num_key_value_heads, e.head_dim, e.intermediate_size) == (
      576, 9, 3, 64, 1536)
  assert e.rope_theta == 100000.0 and e.rms_norm_eps == 1e-5
  m = registry.default_model_config("mtp", SMOL)
  assert (m.num_heads, m.share_weights, m.draft_vocab_size) == (7, True, 8192)
  md = registry.default_model_config("medusa", SMOL)
  assert (md.num_heads, md.num_layers, md.fc_bias, md.init_head_from_target) == (6, 1, True, True)
  s = registry.default_model_config("mlp_speculator", SMOL)
  assert (s.num_heads, s.inner_dim, s.emb_dim, s.tie_weights, s.scale_input) == (6, 576, 576, False, False)
  assert registry.default_model_config("eagle3", TINY).draft_vocab_size == 0
  assert registry.default_draft_vocab(128_256) == 32000 and registry.default_draft_vocab(49152) == 8192
  with pytest.raises(ValueError, match="arch='hydra'"):
    registry.default_model_config("hydra", SMOL)


def test_one_spec_per_architecture_drives_build_export_and_serving():
  """Every registered architecture's spec names a model module that builds it, an exporter that exists,
  and a vLLM method (or None); the export package dispatches through it."""
  import importlib
  from lkjax import export
  assert export.ARCHS == registry.ARCHS and set(registry.ARCHS) == {"eagle3", "medusa", "mlp_speculator", "mtp"}
  for arch in registry.ARCHS:
    sp = registry.spec(arch)
    model = registry.build_draft(registry.default_model_config(arch, TINY), TINY, rngs=nnx.Rngs(0))
    assert type(model).__module__ == sp.module and model.num_heads == sp.num_heads
    module, name = sp.exporter.split(":")
    assert callable(getattr(importlib.import_module(module), name))
    assert sp.vllm_method in (None, arch) and sp.title


def test_build_dispatches_and_resolves_inherited_sizes():
  cfg = registry.default_model_config("eagle3", TINY)
  cfg.num_heads = 2
  for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
              "rope_theta"):
    cfg[key] = 0
  model = registry.build_draft(cfg, TINY, rngs=nnx.Rngs(0))
  assert isinstance(model, eagle3.Eagle3)
  assert model.hidden_size == 16 and model.midlayer.self_attn.num_heads == 4
  assert model.midlayer.self_attn.rope_theta == 5e5
  assert model.fc.kernel[...].shape == (3 * 16, 16) and model.draft_vocab is None

  cfg = registry.default_model_config("mtp", TINY)
  cfg.num_heads = 2
  model = registry.build_draft(cfg, TINY, draft_vocab=np.arange(10, 20), rngs=nnx.Rngs(0))
  assert isinstance(model, mtp.MTP) and model.draft_vocab_size == 10
  np.testing.assert_array_equal(model.draft_vocab[...], np.arange(10, 20))


def test_build_dispatches_to_medusa():
  cfg = registry.default_model_config("medusa", TINY)
  model = registry.build_draft(cfg, TINY, rngs=nnx.Rngs(0))
  assert type(model).__module__ == "lkjax.models.medusa" and model.num_heads == 6


def _cfg(**kw):
  return ml_collections.ConfigDict(kw)


@pytest.mark.parametrize("cfg,vocab,match", [
    (_cfg(arch="hydra"), None, "cfg.arch='hydra'"),
    (_cfg(arch="mtp", num_heads=0), None, "num_heads=0"),
    (_cfg(arch="mtp", dtype="float16"), None, "dtype='float16'"),
    (_cfg(arch="mtp", draft_vocab_size=8), None, "draft_vocab_size=8"),
    (_cfg(arch="mtp", draft_vocab_size=3), np.array([1, 2]), "draft_vocab_size=3"),
    (_cfg(arch="eagle3"), np.array([5, 64]), r"\[0, 64\)"),
    (_cfg(arch="mtp", hidden_size=32), None, "hidden_size=32"),
    (_cfg(arch="medusa", hidden_size=32), None, "hidden_size=32"),
    (_cfg(arch="eagle3", num_attention_heads=3), None, "num_key_value_heads"),
    (_cfg(arch="eagle3", hidden_size=8, init_lm_head_from_target=True), None, "init_lm_head_from_target"),
    (_cfg(arch="eagle3", aux_layer_ids=[1, 2, 3]), None, "aux_layer_ids"),
    (_cfg(arch="eagle3", num_aux_hidden_states=4), None, "num_aux_hidden_states=4"),
])
def test_check_compatible_rejects(cfg, vocab, match):
  with pytest.raises(ValueError, match=match):
    registry.check_compatible(cfg, TINY, vocab)


def test_check_compatible_accepts_defaults_and_bad_target_aux():
  for arch in registry.ARCHS:
    registry.check_compatible(registry.default_model_config(arch, SMOL), SMOL, np.arange(0, 49152, 6)[:8192])
  bad = TargetInfo(**{**TINY.to_dict(), "aux_layer_ids": (2, 4, 9)})
  with pytest.raises(ValueError, match="aux_layer_ids"):
    registry.check_compatible(registry.default_model_config("eagle3", bad), bad)
