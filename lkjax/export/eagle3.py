"""EAGLE-3 drafts <-> the Hugging Face directory vLLM (``llama_eagle3``) and SGLang load (docs/design.md#export-formats).

Layout written by `export_eagle3` (float32, PyTorch ``[out, in]``; H = draft hidden, Ht = target
hidden, V = target vocabulary, Vd = draft vocabulary, N/Nkv heads, D = head_dim, I = intermediate):

  config.json        architectures ["LlamaForCausalLMEagle3"], model_type "llama", hidden_size H,
                     intermediate_size, num_attention_heads, num_key_value_heads, head_dim,
                     num_hidden_layers (1), rms_norm_eps, hidden_act, vocab_size V (the TARGET's),
                     draft_vocab_size Vd, target_hidden_size Ht, norm_before_residual false,
                     tie_word_embeddings false, eagle_aux_hidden_state_layer_ids (also under
                     eagle_config), num_aux_hidden_states (3), rope_theta (top level AND in
                     rope_parameters), max_position_embeddings, torch_dtype, and an ``lkjax`` block
                     (K, the full target info) that only lkjax reads.
  model.safetensors  fc.weight [H, 3*Ht]
                     midlayer.self_attn.q_proj.weight [N*D, 2H], k_proj/v_proj [Nkv*D, 2H],
                     o_proj [H, N*D]; midlayer.mlp.gate_proj/up_proj [I, H], down_proj [H, I];
                     midlayer.{input_layernorm, hidden_norm, post_attention_layernorm}.weight [H]
                     norm.weight [H], lm_head.weight [Vd, H], d2t int64 [Vd], t2d bool [V]
                     embed_tokens.weight [V, H] only when H != Ht (otherwise the engines share the
                     target's embedding, which lkjax's draft uses frozen too).

How the engines read it (checked against their sources): vLLM renames ``midlayer.`` to ``layers.0.``,
loads ``d2t`` as ``draft_id_to_target_id`` and scatters the Vd logits to ``arange(Vd) + d2t`` in a
V-wide row of -inf (so q is zero outside the draft vocabulary, as in lkjax), ignores ``t2d``, sizes
``fc`` as ``3 * target_hidden_size`` and reads ``eagle_aux_hidden_state_layer_ids`` at the top level;
SGLang reads ``d2t`` as ``hot_token_id = d2t + arange(Vd)`` and uses the embedding as LM head when
``tie_word_embeddings`` is true -- hence it is written false explicitly.  Drafts with more than one
decoder layer write the extra layers as ``layers.{i}.*`` (vLLM's naming); SGLang loads only one.

`import_eagle3` reads this layout (also SpecForge's and the original EAGLE-3 checkpoints, which use the
same names, including ``pytorch_model.bin``) and the ``speculators`` layout (``speculators_model_type:
"eagle3"``, the layer shape under ``transformer_layer_config``, tensors ``layers.0.*``) into an lkjax
`Eagle3`, e.g. to evaluate a public draft or fine-tune it.  Only ``norm_before_residual = false`` (the
residual is the un-normalised g) exists in lkjax; a checkpoint trained with true is rejected.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from lkjax.export.hf_dir import CONFIG_FILE, WEIGHTS_FILE, require_tensor, write_hf_directory
from lkjax.models import layers as L
from lkjax.models.eagle3 import Eagle3
from lkjax.targets.info import TargetInfo

ARCHITECTURE = "LlamaForCausalLMEagle3"
# Names the engines register for the same layout (vLLM maps the first to the second).
EAGLE3_ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM", "Eagle3Speculator",
                        "Eagle3DraftModel")
NUM_AUX = 3           # vLLM and SGLang size fc as 3 * target_hidden_size
TORCH_WEIGHTS_FILE = "pytorch_model.bin"

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")
# Tensors some public checkpoints carry that the draft forward does not use.
_IGNORED = ("t2d", "verifier_norm.weight", "verifier_lm_head.weight")


# ---------------------------------------------------------------------------------- shared helpers


def _sub(module: Any, dotted: str) -> Any:
  return functools.reduce(getattr, dotted.split("."), module)


def layer_tensors(layer: L.LlamaDecoderLayer, prefix: str, norms: tuple[str, ...] = LAYER_NORMS
                  ) -> dict[str, np.ndarray]:
  """A Llama decoder layer's tensors in transformers naming and PyTorch ``[out, in]`` layout."""
  out = {f"{prefix}{name}.weight": np.asarray(_sub(layer, name).kernel[...], np.float32).T for name in LINEARS}
  for name in norms:
    out[f"{prefix}{name}.weight"] = np.asarray(_sub(layer, name).weight[...], np.float32)
  return out


def assign(var: nnx.Variable, tensors: Mapping[str, np.ndarray], name: str, source: str, *,
           transpose: bool = False) -> None:
  """``var[...] = tensors[name]`` (transposed for a Linear kernel), raising ValueError on a missing
  tensor or a shape mismatch, naming ``source`` and the tensor."""
  shape = tuple(var.shape)
  want = shape[::-1] if transpose else shape
  require_tensor(tensors, name, want, source)
  w = np.asarray(tensors[name], np.float32)
  var[...] = jnp.asarray(w.T if transpose else w, var[...].dtype)


def set_layer(layer: L.LlamaDecoderLayer, tensors: Mapping[str, np.ndarray], prefix: str, source: str,
              norms: tuple[str, ...] = LAYER_NORMS) -> None:
  """Load a Llama decoder layer from `layer_tensors`-named tensors (shapes checked)."""
  for name in LINEARS:
    assign(_sub(layer, name).kernel, tensors, f"{prefix}{name}.weight", source, transpose=True)
  for name in norms:
    assign(_sub(layer, name).weight, tensors, f"{prefix}{name}.weight", source)


def read_weights(path: Path) -> dict[str, np.ndarray]:
  """Tensors of a checkpoint directory: ``model.safetensors``, else ``pytorch_model.bin`` (original
  EAGLE-3 releases), as float32 / int64 / bool numpy."""
  if (path / WEIGHTS_FILE).is_file():
    return dict(load_file(str(path / WEIGHTS_FILE)))
  if (path / TORCH_WEIGHTS_FILE).is_file():
    import torch  # only needed for the legacy pickle format
    sd = torch.load(str(path / TORCH_WEIGHTS_FILE), map_location="cpu", weights_only=True)
    return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in sd.items()}
  raise ValueError(f"{path}: neither {WEIGHTS_FILE} nor {TORCH_WEIGHTS_FILE} found")


def read_config(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
  d = Path(path)
  cfg_path = d / CONFIG_FILE
  if not cfg_path.is_file():
    raise ValueError(f"{cfg_path}: missing (not a Hugging Face draft directory)")
  try:
    return d, json.loads(cfg_path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{cfg_path}: not valid JSON ({e})") from e


def draft_vocab_maps(model_vocab: Any, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
  """``(d2t int64[Vd], t2d bool[V])`` of a draft's ``draft_vocab`` (None = full vocabulary)."""
  ids = (np.arange(vocab_size, dtype=np.int64) if model_vocab is None
         else np.asarray(model_vocab[...], np.int64))
  t2d = np.zeros(vocab_size, bool)
  t2d[ids] = True
  return ids - np.arange(ids.size, dtype=np.int64), t2d


def rope_theta_of(config: Mapping[str, Any], source: str, *, ignore_rope_scaling: bool = False) -> float:
  """RoPE base from ``rope_parameters`` (transformers 5) or ``rope_theta``; only default RoPE is exact."""
  params = config.get("rope_parameters") or {}
  scaling = config.get("rope_scaling") or {}
  kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
  if kind not in ("default", None) and not ignore_rope_scaling:
    raise ValueError(f"{source}: rope type {kind!r} is not implemented by lkjax (default RoPE only); pass "
                     f"ignore_rope_scaling=True to import it with plain RoPE (logits will differ)")
  theta = params.get("rope_theta", config.get("rope_theta"))
  return 10000.0 if theta is None else float(theta)


# ------------------------------------------------------------------------------------------- export


def eagle3_config(model: Eagle3, target: TargetInfo) -> dict[str, Any]:
  """The ``config.json`` of `export_eagle3` (see the module docstring)."""
  attn = model.midlayer.self_attn
  theta = float(attn.rope_theta)
  aux = [int(i) for i in target.aux_layer_ids]
  return {
      "architectures": [ARCHITECTURE], "model_type": "llama",
      "hidden_size": model.hidden_size,
      "intermediate_size": int(model.midlayer.mlp.gate_proj.kernel.shape[1]),
      "num_attention_heads": attn.num_heads, "num_key_value_heads": attn.num_kv_heads, "head_dim": attn.head_dim,
      "num_hidden_layers": model.num_layers, "rms_norm_eps": float(model.norm.eps), "hidden_act": "silu",
      "attention_bias": False, "mlp_bias": False,
      "vocab_size": model.vocab_size, "draft_vocab_size": model.draft_vocab_size,
      "target_hidden_size": model.target_hidden_size,
      # Explicit: speculators-format readers default this to true, vLLM's HF path to false.
      "norm_before_residual": False,
      # Explicit: SGLang ties lm_head to the embedding when true (and SmolLM2-like targets are tied).
      "tie_word_embeddings": False,
      "eagle_aux_hidden_state_layer_ids": aux, "num_aux_hidden_states": len(aux),
      "eagle_config": {"eagle_aux_hidden_state_layer_ids": aux, "use_aux_hidden_state": True},
      # Both spellings: code reading only the top-level key otherwise falls back to 10000.
      "rope_theta": theta, "rope_parameters": {"rope_type": "default", "rope_theta": theta},
      "max_position_embeddings": int(target.max_position_embeddings),
      "torch_dtype": "float32",
      "lkjax": {"arch": "eagle3", "num_heads": model.num_heads, "target": target.to_dict()},
  }


def eagle3_tensors(model: Eagle3, *, include_embedding: bool | None = None) -> dict[str, np.ndarray]:
  """The ``model.safetensors`` tensors of `export_eagle3` (PyTorch layout, float32)."""
  t = {"fc.weight": np.asarray(model.fc.kernel[...], np.float32).T}
  t.update(layer_tensors(model.midlayer, "midlayer.", LAYER_NORMS + ("hidden_norm",)))
  for i, layer in enumerate(model.layers, start=1):
    t.update(layer_tensors(layer, f"layers.{i}."))
  t["norm.weight"] = np.asarray(model.norm.weight[...], np.float32)
  t["lm_head.weight"] = np.asarray(model.lm_head.kernel[...], np.float32).T
  t["d2t"], t["t2d"] = draft_vocab_maps(model.draft_vocab, model.vocab_size)
  if include_embedding is None:
    include_embedding = model.hidden_size != model.target_hidden_size
  if include_embedding:
    t["embed_tokens.weight"] = np.asarray(model.embed_tokens[...], np.float32)
  return t


def export_eagle3(model: Eagle3, out_dir: str | os.PathLike, target: TargetInfo, *,
                  include_embedding: bool | None = None, overwrite: bool = False) -> Path:
  """Write ``model`` as a vLLM / SGLang EAGLE-3 directory (atomically); returns its path.

  Args:
    model: a trained `Eagle3`.
    out_dir: the directory to create (replaced only with ``overwrite=True``).
    target: the `TargetInfo` the draft was trained on (its aux layers and context length are recorded).
    include_embedding: write ``embed_tokens.weight``; default only when H != Ht (the engines then
      share the target's embedding, exactly what lkjax's frozen copy is).
  Raises:
    ValueError: another architecture, a draft built for a different target, or a target whose aux
      layer count is not 3 (the engines' fc is 3*Ht wide).
  """
  if not isinstance(model, Eagle3):
    raise ValueError(f"export_eagle3: model is a {type(model).__name__}, not an EAGLE-3 draft "
                     f"(use the exporter of its architecture)")
  if (model.target_hidden_size, model.vocab_size, model.num_aux) != (target.hidden_size, target.vocab_size,
                                                                     target.num_aux):
    raise ValueError(f"export_eagle3: model (target hidden {model.target_hidden_size}, vocab {model.vocab_size}, "
                     f"{model.num_aux} aux states) does not match target {target.name} (hidden "
                     f"{target.hidden_size}, vocab {target.vocab_size}, aux layers {target.aux_layer_ids})")
  if target.num_aux != NUM_AUX:
    raise ValueError(f"export_eagle3: target {target.name} has {target.num_aux} aux layers "
                     f"{target.aux_layer_ids}; vLLM and SGLang read exactly {NUM_AUX}")
  return write_hf_directory(out_dir, eagle3_config(model, target),
                            eagle3_tensors(model, include_embedding=include_embedding), overwrite=overwrite)


# ------------------------------------------------------------------------------------------- import


def _normalise(config: Mapping[str, Any], source: str) -> dict[str, Any]:
  """Flatten an HF/SpecForge or speculators EAGLE-3 config into one dict (plus ``layout``)."""
  if "speculators_model_type" in config:
    kind = config["speculators_model_type"]
    if kind != "eagle3":
      raise ValueError(f"{source}: speculators_model_type={kind!r}, not an EAGLE-3 checkpoint")
    layer = config.get("transformer_layer_config")
    if not isinstance(layer, Mapping):
      raise ValueError(f"{source}: speculators config without a transformer_layer_config dict")
    flat = dict(layer)
    for key in ("draft_vocab_size", "target_hidden_size", "eagle_aux_hidden_state_layer_ids", "lkjax"):
      if config.get(key) is not None:
        flat[key] = config[key]
    # speculators (and vLLM reading its format) default to norm_before_residual = true.
    flat["norm_before_residual"] = config.get("norm_before_residual", True)
    methods = (config.get("speculators_config") or {}).get("proposal_methods") or [{}]
    flat["_speculative_tokens"] = methods[0].get("speculative_tokens")
    flat["layout"] = "speculators"
    return flat
  archs = list(config.get("architectures") or [])
  if not any(a in EAGLE3_ARCHITECTURES for a in archs):
    raise ValueError(f"{source}: architectures={archs} (model_type={config.get('model_type')!r}) is not an "
                     f"EAGLE-3 draft; expected one of {EAGLE3_ARCHITECTURES} or a speculators eagle3 config")
  flat = dict(config)
  flat.setdefault("norm_before_residual", False)   # vLLM's default for this layout
  flat["layout"] = "hf"
  return flat


def _target_from_config(c: Mapping[str, Any], source: str) -> TargetInfo:
  """A `TargetInfo` for a checkpoint imported without ``target=``: lkjax's own record if present, else
  what an EAGLE-3 config tells about its target (hidden, vocab, aux layers); the target's layer shape
  (heads, intermediate, eps, theta), which no EAGLE-3 config records, is filled with the draft's."""
  if isinstance(c.get("lkjax"), Mapping) and "target" in c["lkjax"]:
    return TargetInfo.from_dict(c["lkjax"]["target"], source=f"{source} (lkjax.target)")
  aux = c.get("eagle_aux_hidden_state_layer_ids") or (c.get("eagle_config") or {}).get(
      "eagle_aux_hidden_state_layer_ids")
  if not aux:
    raise ValueError(f"{source}: no eagle_aux_hidden_state_layer_ids, so the target's depth is unknown; "
                     f"pass target= (its TargetInfo)")
  aux = tuple(int(a) for a in aux)
  hidden = int(c.get("target_hidden_size") or c["hidden_size"])
  return TargetInfo(name=str(c.get("_name_or_path", "") or "unknown-target"), model_type="llama",
                    num_layers=aux[-1] + 3, hidden_size=hidden, vocab_size=int(c["vocab_size"]),
                    num_attention_heads=int(c["num_attention_heads"]),
                    num_key_value_heads=int(c.get("num_key_value_heads") or c["num_attention_heads"]),
                    head_dim=int(c.get("head_dim") or hidden // int(c["num_attention_heads"])),
                    intermediate_size=int(c["intermediate_size"]), rms_norm_eps=float(c["rms_norm_eps"]),
                    rope_theta=rope_theta_of(c, source, ignore_rope_scaling=True),
                    max_position_embeddings=int(c.get("max_position_embeddings", 2048)), aux_layer_ids=aux)


def import_eagle3(path: str | os.PathLike, target: TargetInfo | None = None, *,
                  target_embed: np.ndarray | None = None, num_heads: int | None = None,
                  dtype: str = "float32", ignore_rope_scaling: bool = False) -> tuple[Eagle3, TargetInfo]:
  """Load an EAGLE-3 directory (HF/SpecForge/vLLM or speculators layout) into an lkjax `Eagle3`.

  Args:
    path: the checkpoint directory (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``).
    target: the target's `TargetInfo`; checked against the checkpoint (hidden size, vocabulary, aux
      layers).  Default: the ``lkjax`` record of an lkjax export, else derived from the config.
    target_embed: ``[V, H]`` target embedding, required when the checkpoint has no ``embed_tokens``
      (it shares the target's, e.g. ``lkjax.data.shards.load_target_weights(dir)["embed_tokens"]``).
    num_heads: K unrolled steps of the returned model (default: the checkpoint's record, else 7).
    dtype: compute dtype of the returned model ('float32' | 'bfloat16'); parameters are float32.
    ignore_rope_scaling: import a checkpoint with a RoPE scaling type lkjax lacks, using plain RoPE.
  Returns:
    ``(model, target_info)``.
  Raises:
    ValueError: another architecture, ``norm_before_residual`` true, a missing ``d2t`` with Vd < V,
      a missing embedding, unknown tensors, or sizes that disagree (naming the file and tensor).
  """
  d, raw = read_config(path)
  source = str(d / CONFIG_FILE)
  c = _normalise(raw, source)
  if c.get("norm_before_residual"):
    raise ValueError(f"{source}: norm_before_residual=true (residual = hidden_norm(g)); lkjax implements "
                     f"the EAGLE-3 layer with norm_before_residual=false only")
  if c.get("hidden_act", "silu") != "silu" or c.get("attention_bias") or c.get("mlp_bias"):
    raise ValueError(f"{source}: hidden_act={c.get('hidden_act')!r}, attention_bias={c.get('attention_bias')}, "
                     f"mlp_bias={c.get('mlp_bias')}: lkjax's Llama layer is silu without biases")
  for key in ("hidden_size", "intermediate_size", "num_attention_heads", "rms_norm_eps", "vocab_size"):
    if c.get(key) is None:
      raise ValueError(f"{source}: missing {key!r}")
  H, V = int(c["hidden_size"]), int(c["vocab_size"])
  heads = int(c["num_attention_heads"])
  kv_heads = int(c.get("num_key_value_heads") or heads)
  head_dim = int(c.get("head_dim") or H // heads)
  Vd = int(c.get("draft_vocab_size") or V)
  Ht = int(c.get("target_hidden_size") or H)
  n_layers = int(c.get("num_hidden_layers", 1) or 1)
  theta = rope_theta_of(c, source, ignore_rope_scaling=ignore_rope_scaling)
  info = target if target is not None else _target_from_config(c, source)
  aux = c.get("eagle_aux_hidden_state_layer_ids") or (c.get("eagle_config") or {}).get(
      "eagle_aux_hidden_state_layer_ids")
  if (Ht, V) != (info.hidden_size, info.vocab_size):
    raise ValueError(f"{source}: target_hidden_size={Ht}, vocab_size={V} do not match target {info.name} "
                     f"(hidden {info.hidden_size}, vocab {info.vocab_size})")
  if aux and tuple(int(a) for a in aux) != info.aux_layer_ids:
    raise ValueError(f"{source}: eagle_aux_hidden_state_layer_ids={list(aux)} differ from target {info.name}'s "
                     f"aux layers {list(info.aux_layer_ids)}")
  if Vd > V:
    raise ValueError(f"{source}: draft_vocab_size={Vd} > vocab_size={V}")

  tensors = read_weights(d)
  if c["layout"] == "speculators":   # speculators names the EAGLE-3 layer layers.0 (vLLM's own naming)
    tensors = {("midlayer." + k[len("layers.0."):] if k.startswith("layers.0.") else k): v
               for k, v in tensors.items()}
  wsrc = str(d)
  draft_vocab = None
  if "d2t" in tensors:
    d2t = np.asarray(tensors["d2t"]).astype(np.int64)
    if d2t.shape != (Vd,):
      raise ValueError(f"{wsrc}: tensor 'd2t' has shape {d2t.shape}, expected ({Vd},) (draft_vocab_size)")
    ids = np.arange(Vd, dtype=np.int64) + d2t
    if Vd < V or np.any(d2t != 0):
      draft_vocab = L.check_draft_vocab(ids, V, Vd)
    if "t2d" in tensors:
      t2d = np.asarray(tensors["t2d"]).astype(bool)
      if t2d.shape != (V,) or int(t2d.sum()) != Vd or not t2d[ids].all():
        raise ValueError(f"{wsrc}: tensor 't2d' (shape {t2d.shape}) is not the membership mask of d2t's ids")
  elif Vd < V:
    raise ValueError(f"{wsrc}: draft_vocab_size={Vd} < vocab_size={V} but tensor 'd2t' is missing "
                     f"(the draft -> target token map)")
  emb = tensors.get("embed_tokens.weight")
  if emb is None:
    if target_embed is None:
      raise ValueError(f"{wsrc}: no 'embed_tokens.weight' (the draft shares the target's embedding); pass "
                       f"target_embed=[{V}, {H}], e.g. lkjax.data.shards.load_target_weights(dir)['embed_tokens']")
    emb = np.asarray(target_embed, np.float32)
    if emb.shape != (V, H):
      raise ValueError(f"target_embed: expected shape ({V}, {H}), got {emb.shape}")
  fc = tensors.get("fc.weight")
  if fc is None or fc.ndim != 2 or fc.shape[1] % Ht:
    raise ValueError(f"{wsrc}: tensor 'fc.weight' missing or not [{H}, A*{Ht}] "
                     f"(got {None if fc is None else fc.shape})")
  num_aux = fc.shape[1] // Ht
  if num_aux != info.num_aux:
    raise ValueError(f"{wsrc}: fc.weight reads {num_aux} aux states, target {info.name} has {info.num_aux}")
  k = num_heads or (c.get("lkjax") or {}).get("num_heads") or c.get("_speculative_tokens") or 7
  model = Eagle3(target_hidden_size=Ht, vocab_size=V, num_aux=num_aux, hidden_size=H, num_attention_heads=heads,
                 num_key_value_heads=kv_heads, head_dim=head_dim, intermediate_size=int(c["intermediate_size"]),
                 rms_norm_eps=float(c["rms_norm_eps"]), rope_theta=theta, num_layers=n_layers, num_heads=int(k),
                 draft_vocab=draft_vocab, target_embed=emb if H == Ht else None,
                 dtype=L.parse_dtype(dtype), rngs=nnx.Rngs(0))
  assign(model.embed_tokens, {"embed_tokens.weight": emb}, "embed_tokens.weight", wsrc)
  assign(model.fc.kernel, tensors, "fc.weight", wsrc, transpose=True)
  set_layer(model.midlayer, tensors, "midlayer.", wsrc, LAYER_NORMS + ("hidden_norm",))
  for i, layer in enumerate(model.layers, start=1):
    set_layer(layer, tensors, f"layers.{i}.", wsrc)
  assign(model.norm.weight, tensors, "norm.weight", wsrc)
  assign(model.lm_head.kernel, tensors, "lm_head.weight", wsrc, transpose=True)
  used = {"fc.weight", "norm.weight", "lm_head.weight", "d2t", "embed_tokens.weight", *_IGNORED}
  used |= {f"midlayer.{n}.weight" for n in LINEARS + LAYER_NORMS + ("hidden_norm",)}
  used |= {f"layers.{i}.{n}.weight" for i in range(1, n_layers) for n in LINEARS + LAYER_NORMS}
  unknown = sorted(n for n in tensors if n not in used and not n.endswith("rotary_emb.inv_freq"))
  if unknown:
    raise ValueError(f"{wsrc}: tensors {unknown[:8]} are not part of an EAGLE-3 draft lkjax can load "
                     f"(biases, extra layers or another architecture)")
  return model, info
