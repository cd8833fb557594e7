"""Target facts read from a transformers causal LM, in one place (docs/design.md#target-families).

`read_target_info(model, tokenizer)` returns the `TargetInfo` that precompute writes into the shard
manifest.  Every convention that differs between families is read from the MODEL, not from a config key
whose name varies by family:

  hidden_act          the activation module of the first decoder layer's MLP, named as transformers names it
  rope                ``config.rope_parameters`` (transformers 5 standardises it); a per-layer-type record
                      (``{"full_attention": {...}, "sliding_attention": {...}}``, e.g. Gemma-3) gives the drafts
                      the full-attention layers' parameters
  norm convention     a probe of the final norm: its output divided by the RMS-normalised input is the
                      multiplier, which is ``weight`` (Llama, Qwen, Mistral, Phi-3) or ``1 + weight`` (Gemma)
  embedding scale     a probe forward: the residual stream entering layer 0 divided by the ``embed_tokens``
                      rows (1, or sqrt(H) for Gemma, whether the scale lives in the embedding module or the model)
  tied head           whether the output embedding IS the input embedding (same storage)
  logits              a probe forward: logits must equal ``final_hidden @ lm_head.T`` (what the train step,
                      the stored log-sum-exp and the verifier assume); logit scaling or an LM-head bias are
                      refused, and so is ``final_logit_softcapping`` (tanh capping is invisible on the
                      small logits of a probe, so it is read from the config attribute that switches it on)
  sliding windows     ``layer_types`` and ``sliding_window`` as the attention layers use them
  BOS / EOS           the tokenizer's bos; the tokenizer's eos plus the generation config's eos ids
  dtype               the checkpoint's parameter dtype

Anything the drafts or the train step cannot represent raises `UnsupportedTarget` naming the fact; nothing
falls back to a default silently.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from lkjax.targets.info import TargetInfo, eagle3_aux_layer_ids


class UnsupportedTarget(ValueError):
  """The target has a convention that lkjax's drafts / train step cannot represent (the message names it)."""


def text_config(model):
  """The decoder's config (the text config of a multimodal wrapper)."""
  cfg = model.config
  return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _fail(name: str, fact: str, detail: str) -> UnsupportedTarget:
  return UnsupportedTarget(f"{name}: unsupported target ({fact}): {detail}")


def _layers(model, name: str):
  layers = getattr(model.get_decoder(), "layers", None)
  if layers is None or len(layers) == 0:
    raise _fail(name, "decoder layers", "the decoder has no `layers` list")
  return layers


def activation_name(model, name: str = "target") -> str:
  """transformers' name of the MLP activation of decoder layer 0 (read from the module, not a config key)."""
  from transformers.activations import ACT2CLS

  mlp = getattr(_layers(model, name)[0], "mlp", None)
  act = None
  for attr in ("act_fn", "activation_fn", "act"):
    act = getattr(mlp, attr, None)
    if act is not None:
      break
  if act is None:
    raise _fail(name, "hidden_act", "layer 0 has no `mlp.act_fn` to read the activation from")
  cfg = text_config(model)
  declared = [getattr(cfg, k, None) for k in ("hidden_act", "hidden_activation")]
  matches = []
  for key, entry in ACT2CLS.items():
    cls, kwargs = entry if isinstance(entry, tuple) else (entry, {})
    if type(act) is cls and all(getattr(act, k, v) == v for k, v in kwargs.items()):
      matches.append(key)
  if not matches:
    raise _fail(name, "hidden_act", f"the MLP activation {type(act).__name__} is not one of transformers' "
                                    "named activations")
  for d in declared:   # several names share a class (silu / swish): prefer the one the config spells
    if d in matches:
      return str(d)
  return matches[0]


def rope_facts(cfg, name: str = "target") -> tuple[float, str, dict]:
  """``(theta, rope_type, rope_parameters)`` of the full-attention layers (the drafts' kind)."""
  rp = getattr(cfg, "rope_parameters", None)
  if not isinstance(rp, Mapping) or not rp:
    raise _fail(name, "rope_parameters", "the config has no RoPE parameters (lkjax drafts use RoPE with the "
                                         "target's base)")
  rp = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in rp.items()}
  if all(isinstance(v, Mapping) for v in rp.values()):        # per layer type
    if "full_attention" not in rp:
      raise _fail(name, "rope_parameters", f"per-layer-type RoPE without a 'full_attention' entry: {sorted(rp)}")
    full = rp["full_attention"]
  else:
    full = rp
  if "rope_theta" not in full:
    raise _fail(name, "rope_parameters", f"no rope_theta in {full}")
  return float(full["rope_theta"]), str(full.get("rope_type") or "default"), rp


def sliding_facts(cfg) -> tuple[int, tuple[str, ...]]:
  """``(sliding_window or 0, layer_types)``: the window the target's sliding layers use."""
  types = tuple(str(t) for t in (getattr(cfg, "layer_types", None) or ()))
  sw = getattr(cfg, "sliding_window", None)
  if types:
    active = "sliding_attention" in types
  else:   # families without layer_types (Mistral) slide every layer when a window is set
    active = sw is not None
  return (int(sw) if active and sw else 0), types


@torch.no_grad()
def norm_weight_offset(model, name: str = "target") -> tuple[float, float]:
  """``(offset, eps)`` of the decoder's final norm: it computes ``x / rms(x) * (offset + weight)``.

  Probed on a random input; a norm that is not of that form (a LayerNorm with a mean or a bias) is refused.
  """
  norm = getattr(model.get_decoder(), "norm", None)
  w = getattr(norm, "weight", None)
  if w is None:
    raise _fail(name, "final norm", "the decoder has no final `norm` with a weight")
  if getattr(norm, "bias", None) is not None:
    raise _fail(name, "final norm", f"{type(norm).__name__} has a bias (not an RMSNorm)")
  eps = next((float(getattr(norm, a)) for a in ("variance_epsilon", "eps", "epsilon")
              if isinstance(getattr(norm, a, None), (int, float))), None)
  if eps is None:
    eps = float(getattr(text_config(model), "rms_norm_eps"))
  g = torch.Generator().manual_seed(0)
  x = torch.randn(4, w.shape[0], generator=g, dtype=torch.float32)
  y = norm(x.to(w.dtype)).float()
  xh = x.to(w.dtype).float()
  xh = xh * torch.rsqrt(xh.pow(2).mean(-1, keepdim=True) + eps)
  mult = y / xh
  wf = w.detach().float()
  tol = dict(rtol=2e-2, atol=2e-2) if w.dtype != torch.float32 else dict(rtol=1e-4, atol=1e-5)
  for offset in (0.0, 1.0):
    if torch.allclose(mult, (offset + wf).expand_as(mult), **tol):
      return offset, eps
  raise _fail(name, "final norm", f"{type(norm).__name__} does not compute x / rms(x) * w or x / rms(x) * (1 + w)")


@torch.no_grad()
def probe_forward(model, name: str = "target") -> dict[str, Any]:
  """One short forward: the embedding scale, and a check that logits = final_hidden @ lm_head.T."""
  emb = model.get_input_embeddings()
  head = model.get_output_embeddings()
  if head is None or getattr(head, "weight", None) is None:
    raise _fail(name, "lm_head", "the model has no output embedding (LM head)")
  if getattr(head, "bias", None) is not None:
    raise _fail(name, "lm_head", "the LM head has a bias (lkjax computes logits as final_hidden @ lm_head.T)")
  V = int(emb.weight.shape[0])
  ids = torch.tensor([[min(i, V - 1) for i in (1, 5, V // 3, V // 2, V - 2)]], dtype=torch.long)
  captured = []
  hook = head.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach()))
  try:
    out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
  finally:
    hook.remove()
  if len(captured) != 1:
    raise _fail(name, "lm_head", f"expected one LM-head call per forward, saw {len(captured)}")
  rows = emb.weight[ids[0]].float()
  first = out.hidden_states[0][0].float()
  ok = rows.abs() > 1e-3 * rows.abs().max()
  ratio = (first[ok] / rows[ok])
  scale = float(ratio.median())
  rtol = 1e-4 if emb.weight.dtype == torch.float32 else 2e-2
  if not torch.allclose(first, scale * rows, rtol=rtol, atol=rtol * float(first.abs().max())):
    raise _fail(name, "embedding", "the input of decoder layer 0 is not a multiple of the embed_tokens rows "
                                   "(position embeddings or an embedding norm?)")
  sqrt_h = math.sqrt(rows.shape[-1])
  if abs(scale - sqrt_h) <= rtol * sqrt_h:   # Gemma's normalizer, stored exactly rather than as measured
    scale = sqrt_h
  elif abs(scale - 1.0) <= rtol:
    scale = 1.0
  cap = getattr(text_config(model), "final_logit_softcapping", None)
  if cap:   # tanh soft-capping is invisible on small probe logits: refuse it by the config that switches it on
    raise _fail(name, "logits", f"final_logit_softcapping={cap}: lkjax's train step, stored log-sum-exp and "
                                "drafts' shared heads use plain final_hidden @ lm_head.T")
  final = captured[0].float()
  logits = out.logits.float()
  want = final @ head.weight.float().T
  if not torch.allclose(logits, want, rtol=rtol, atol=rtol * float(want.abs().max()) + 1e-5):
    raise _fail(name, "logits", "logits != final_hidden @ lm_head.T (logit scaling?): lkjax's train step, stored "
                                "log-sum-exp and drafts' shared heads use plain final_hidden @ lm_head.T")
  return {"embed_scale": scale}


def tied_head(model) -> bool:
  """Whether the LM head is the input embedding (same storage), read from the modules."""
  a, b = model.get_input_embeddings().weight, model.get_output_embeddings().weight
  return a is b or (a.shape == b.shape and a.data_ptr() == b.data_ptr())


def checkpoint_dtype(model, declared: Any = None) -> str:
  """The checkpoint's parameter dtype: ``declared`` (config.json's dtype) if given, else the config's, else the
  embedding's."""
  for d in (declared, getattr(text_config(model), "dtype", None), getattr(model.config, "torch_dtype", None)):
    if d is None:
      continue
    d = str(d).removeprefix("torch.")
    if d in ("float32", "bfloat16", "float16"):
      return d
  return str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")


def eos_token_ids(model, tokenizer) -> tuple[int, ...]:
  """Tokens that end a reply: the tokenizer's eos first, then the generation config's eos id(s)."""
  out = []
  if tokenizer.eos_token_id is not None:
    out.append(int(tokenizer.eos_token_id))
  gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
  for t in ([gen] if isinstance(gen, int) else list(gen or ())):
    if int(t) not in out:
      out.append(int(t))
  return tuple(out)


def read_target_info(model, tokenizer, *, name: str, weights_sha256: str = "",
                     dtype: Any = None) -> TargetInfo:
  """The `TargetInfo` of a transformers causal LM (module docstring); raises `UnsupportedTarget`."""
  cfg = text_config(model)
  n = int(cfg.num_hidden_layers)
  heads = int(cfg.num_attention_heads)
  attn = getattr(_layers(model, name)[0], "self_attn", None)
  head_dim = int(getattr(attn, "head_dim", None) or getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
  theta, rope_type, rope_params = rope_facts(cfg, name)
  offset, eps = norm_weight_offset(model, name)
  probe = probe_forward(model, name)
  sw, types = sliding_facts(cfg)
  return TargetInfo(
      name=name, model_type=str(cfg.model_type), num_layers=n, hidden_size=int(cfg.hidden_size),
      vocab_size=int(model.get_output_embeddings().weight.shape[0]), num_attention_heads=heads,
      num_key_value_heads=int(getattr(cfg, "num_key_value_heads", None) or heads), head_dim=head_dim,
      intermediate_size=int(cfg.intermediate_size), rms_norm_eps=eps, rope_theta=theta,
      max_position_embeddings=int(getattr(cfg, "max_position_embeddings", 0) or 0),
      hidden_act=activation_name(model, name), tie_word_embeddings=tied_head(model),
      aux_layer_ids=eagle3_aux_layer_ids(n), weights_sha256=weights_sha256, rope_type=rope_type,
      rope_parameters=rope_params, norm_weight_offset=offset, embed_scale=probe["embed_scale"],
      sliding_window=sw, layer_types=types, bos_token_id=tokenizer.bos_token_id,
      eos_token_ids=eos_token_ids(model, tokenizer), chat_template=bool(getattr(tokenizer, "chat_template", None)),
      dtype=checkpoint_dtype(model, dtype))
