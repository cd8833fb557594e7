"""What the trainer and the drafts need to know about a target model (torch-free).

A `TargetInfo` travels in every shard directory's ``manifest.json`` under the key ``"target"`` and
is what draft configs are checked against before anything compiles.
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
  """Shape facts of a target LLM (Llama-style decoder) that drafts mirror or must match."""

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

  def __post_init__(self):
    if not self.aux_layer_ids:
      object.__setattr__(self, "aux_layer_ids", eagle3_aux_layer_ids(self.num_layers))
    object.__setattr__(self, "aux_layer_ids", tuple(int(i) for i in self.aux_layer_ids))

  @property
  def num_aux(self) -> int:
    return len(self.aux_layer_ids)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["aux_layer_ids"] = list(self.aux_layer_ids)
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
