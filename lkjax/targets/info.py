"""What the trainer and the drafts need to know about a target model (torch-free).

A `TargetInfo` travels in every shard directory's ``manifest.json`` under the key ``"target"`` and
is what draft configs are checked against before anything compiles.  Its facts are read from the
transformers model in one place, `lkjax.targets.facts` (docs/design.md#target-families); fields added after
the first manifests have defaults so older shard directories still load.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping


def eagle3_aux_layer_ids(num_layers: int) -> tuple[int, int, int]:
  """vLLM/SGLang EAGLE-3 aux layers ``(2, N//2, N-3)``: id L = residual stream ENTERING layer L.

  In transformers terms id L is ``output_hidden_states[L]`` (index 0 is the embedding output).
  """
  if num_layers < 4:
    raise ValueError(f"num_layers={num_layers}: EAGLE-3 aux layers need a target with at least 4 layers")
  return (2, num_layers // 2, num_layers - 3)


@dataclasses.dataclass(frozen=True)
class TargetInfo:
  """Facts of a target LLM that drafts mirror or must match (read by `lkjax.targets.facts`).

  Conventions (docs/design.md#target-families):
    rope_theta / rope_type   of the target's FULL-attention layers (the drafts' layers are full attention);
                             ``rope_parameters`` is the target's whole record, per layer type where it has one.
    norm_weight_offset       the final RMSNorm multiplies by ``norm_weight_offset + weight`` (0: Llama, 1: Gemma).
    embed_scale              the first decoder layer reads ``embed_scale * embed_tokens[id]`` (1, or sqrt(H) for Gemma).
    sliding_window           window of the target's sliding-attention layers (0: none); ``layer_types`` per layer.
    eos_token_ids            every token that ends a reply (tokenizer eos first, then the generation config's).
    dtype                    the checkpoint's parameter dtype (the precomputed target head is stored in it).
  """

  name: str                      # path or packaged id, e.g. "smollm2-135m-instruct"
  model_type: str                # transformers model_type, e.g. "llama"
  num_layers: int
  hidden_size: int
  vocab_size: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  intermediate_size: int
  rms_norm_eps: float
  rope_theta: float
  max_position_embeddings: int
  hidden_act: str = "silu"
  tie_word_embeddings: bool = False
  aux_layer_ids: tuple[int, ...] = ()
  weights_sha256: str = ""
  rope_type: str = "default"
  rope_parameters: dict = dataclasses.field(default_factory=dict, hash=False)
  norm_weight_offset: float = 0.0
  embed_scale: float = 1.0
  sliding_window: int = 0
  layer_types: tuple[str, ...] = ()
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  chat_template: bool = False
  dtype: str = "float32"

  def __post_init__(self):
    if not self.aux_layer_ids:
      object.__setattr__(self, "aux_layer_ids", eagle3_aux_layer_ids(self.num_layers))
    object.__setattr__(self, "aux_layer_ids", tuple(int(i) for i in self.aux_layer_ids))
    object.__setattr__(self, "layer_types", tuple(str(t) for t in self.layer_types))
    object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))
    object.__setattr__(self, "rope_parameters", dict(self.rope_parameters or {}))

  @property
  def num_aux(self) -> int:
    return len(self.aux_layer_ids)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["aux_layer_ids"] = list(self.aux_layer_ids)
    d["layer_types"] = list(self.layer_types)
    d["eos_token_ids"] = list(self.eos_token_ids)
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], *, source: str = "target info") -> "TargetInfo":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"{source}: unknown target fields {unknown}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in d]
    if missing:
      raise ValueError(f"{source}: missing target fields {missing}")
    return cls(**dict(d))
