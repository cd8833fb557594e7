"""The target LLM on transformers (PyTorch): prompt formatting, generation and feature capture.

Feature conventions (docs/design.md#target-features-and-the-draft-vocabulary):
  aux hidden   ``concat(hidden_states[L] for L in aux_layer_ids)``  [B, T, A*H], ascending ids, where
               ``hidden_states[L]`` is the residual stream ENTERING decoder layer L (index 0 = embeddings).
  final hidden the base model's ``last_hidden_state``                 [B, T, H], i.e. AFTER the final norm
               (the LM head's input).  In transformers 5 ``hidden_states[N]`` of a Llama is that post-norm
               state too (not the raw output of the last layer); we read ``last_hidden_state`` so the
               convention does not hang on that detail, and aux ids must be < N.

Sequence convention for training data (`encode_conversation`): ``prompt_ids + reply_ids + [eot]`` where
``prompt_ids`` are the tokens of `format_prompt` (the chat template with the generation prompt), reply_ids
the reply text tokenized alone, and eot the stop token that ended generation (one of `stop_token_ids`: the
tokenizer's eos, ``<|im_end|>`` for ChatML, and the generation config's eos ids), appended only when the
reply finished.  This is exactly the token stream the
target sees while serving (prompt, then its generated tokens); the template's text after eot (ChatML's
trailing newline) is never generated, so it is not part of the sequence.  The loss mask is 1 on
reply_ids and eot.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import pathlib
import re
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import torch


PACKAGED = {"smollm2": "smollm2-135m-instruct"}

Messages = Sequence[Mapping[str, str]]


def select_features(hidden_states: Sequence[torch.Tensor], aux_layer_ids: Sequence[int]) -> torch.Tensor:
  """EAGLE-3 aux states from transformers' ``output_hidden_states``.

  Args:
    hidden_states: N+1 tensors ``[B, T, H]`` (index L = input of decoder layer L; index N is post-norm).
    aux_layer_ids: layer ids, each in ``[0, N)``.

  Returns:
    ``[B, T, A*H]``: ``hidden_states[L]`` concatenated along the last axis in ascending id order.
  """
  n_layers = len(hidden_states) - 1
  ids = sorted(int(i) for i in aux_layer_ids)
  bad = [i for i in ids if not 0 <= i < n_layers]
  if bad:
    raise ValueError(f"aux_layer_ids {bad} out of range for a target with {n_layers} layers "
                     f"(got {len(hidden_states)} hidden states)")
  return torch.cat([hidden_states[i] for i in ids], dim=-1)


class Features(NamedTuple):
  aux_hidden: torch.Tensor            # [B, T, A*H]
  final_hidden: torch.Tensor          # [B, T, H] post-norm
  logits: torch.Tensor | None         # [B, T, V] when requested


@dataclasses.dataclass
class Generation:
  """One generated reply: text (control tokens dropped, `TargetModel.reply_text`), new token ids, whether a
  stop token ended it, and which one."""

  text: str
  token_ids: list[int]
  finished: bool
  stop_token_id: int | None = None


def state_dict_sha256(model: torch.nn.Module) -> str:
  """sha256 over the state dict in sorted key order (name, dtype, shape, raw bytes): identifies the weights."""
  h = hashlib.sha256()
  for key, t in sorted(model.state_dict().items()):
    t = t.detach().cpu().contiguous()
    h.update(f"{key}|{t.dtype}|{list(t.shape)}|".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
  return h.hexdigest()


# An added token whose text is markup (``<end_of_turn>``, ``<|im_end|>``, ``[INST]``) is a control token even
# when the tokenizer does not mark it special (decode(skip_special_tokens=True) would keep it as text).
_MARKUP = re.compile(r"^(<[^<>\s]+>|<\|[^\s]*\|>|\[/?[A-Z_]+\])$")


class TargetModel:
  """A transformers causal LM + tokenizer used as the speculative-decoding target.

  Attributes:
    model: the ``AutoModelForCausalLM`` (eval mode).
    tokenizer: its tokenizer.
    info: `TargetInfo` (sizes, aux layer ids, weights sha256, and the family conventions read by
      `lkjax.targets.facts`; a target the drafts cannot represent raises `facts.UnsupportedTarget`).
  """

  def __init__(self, model: torch.nn.Module, tokenizer, *, name: str, weights_sha256: str | None = None,
               dtype: str | None = None):
    """``dtype``: the checkpoint's parameter dtype when the model was loaded in another (`load` passes
    config.json's); the precomputed target head is stored in it."""
    from lkjax.targets import facts

    self.model = model.eval()
    self.tokenizer = tokenizer
    if weights_sha256 is None:
      weights_sha256 = state_dict_sha256(model)
    self.info = facts.read_target_info(model, tokenizer, name=name, weights_sha256=weights_sha256, dtype=dtype)
    if len(tokenizer) > self.info.vocab_size:
      raise ValueError(f"{name}: tokenizer has {len(tokenizer)} tokens but the model vocabulary is "
                       f"{self.info.vocab_size}")

  @classmethod
  def load(cls, name_or_path: str | os.PathLike = "smollm2", *, dtype: torch.dtype = torch.float32,
           cache_dir: str | os.PathLike | None = None) -> "TargetModel":
    """Load a packaged target (``"smollm2"``) or any HF causal-LM directory (float32 by default)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if str(name_or_path) in PACKAGED:
      from lkjax import assets

      path = assets.fetch(str(name_or_path), cache_dir)
      name = PACKAGED[str(name_or_path)]
    else:
      path = pathlib.Path(name_or_path)
      if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: not a Hugging Face model directory (no config.json); packaged targets: "
                                f"{sorted(PACKAGED)}")
      name = str(path)
    import json

    raw = json.loads((path / "config.json").read_text())
    raw = raw.get("text_config") or raw
    declared = raw.get("dtype") or raw.get("torch_dtype")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return cls(model, tokenizer, name=name, dtype=declared)

  # --- sizes -------------------------------------------------------------------------------------------
  @property
  def num_layers(self) -> int:
    return self.info.num_layers

  @property
  def hidden_size(self) -> int:
    return self.info.hidden_size

  @property
  def vocab_size(self) -> int:
    return self.info.vocab_size

  @property
  def has_chat_template(self) -> bool:
    return bool(getattr(self.tokenizer, "chat_template", None))

  @property
  def eot_token_id(self) -> int | None:
    """The end-of-turn token appended to a finished reply that does not record its own stop token: the
    tokenizer's eos (else the generation config's first), or None."""
    return self.info.eos_token_ids[0] if self.info.eos_token_ids else None

  @property
  def stop_token_ids(self) -> tuple[int, ...]:
    """Every token that ends a reply (`TargetInfo.eos_token_ids`: tokenizer eos + generation config eos)."""
    return self.info.eos_token_ids

  @functools.cached_property
  def control_token_ids(self) -> frozenset[int]:
    """Tokens never shown in reply text: the tokenizer's special tokens, the stop tokens, and added tokens
    whose text is markup even when the tokenizer does not mark them special (`_MARKUP`)."""
    ids = set(int(i) for i in self.tokenizer.all_special_ids) | set(self.stop_token_ids)
    for i, tok in getattr(self.tokenizer, "added_tokens_decoder", {}).items():
      if getattr(tok, "special", False) or _MARKUP.match(str(tok)):
        ids.add(int(i))
    return frozenset(ids)

  def reply_text(self, token_ids: Sequence[int]) -> str:
    """Text of generated token ids without control tokens (`control_token_ids`)."""
    return self.tokenizer.decode([int(t) for t in token_ids if int(t) not in self.control_token_ids],
                                 skip_special_tokens=True)

  @property
  def pad_token_id(self) -> int:
    pad = self.tokenizer.pad_token_id
    if pad is None:
      pad = self.tokenizer.eos_token_id
    if pad is None:
      raise ValueError(f"{self.info.name}: tokenizer has neither a pad nor an eos token; cannot batch")
    return int(pad)

  # --- text --------------------------------------------------------------------------------------------
  def format_prompt(self, prompt: str | Messages) -> str:
    """Prompt text the target continues.

    With a chat template: a string is one user message; the template is applied with the generation
    prompt.  Without one (plain completion): a string is used as is, and messages are their contents
    joined by blank lines.
    """
    if isinstance(prompt, str):
      messages = [{"role": "user", "content": prompt}]
    else:
      messages = [dict(m) for m in prompt]
      if not messages:
        raise ValueError("format_prompt: empty message list")
    if self.has_chat_template:
      return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt if isinstance(prompt, str) else "\n\n".join(m["content"] for m in messages)

  def encode_prompt(self, prompt: str | Messages) -> list[int]:
    """Token ids of `format_prompt` (a chat template writes its own special tokens; plain text gets the
    tokenizer's usual ones, e.g. BOS)."""
    text = self.format_prompt(prompt)
    return list(self.tokenizer(text, add_special_tokens=not self.has_chat_template)["input_ids"])

  def encode_conversation(self, prompt: str | Messages, reply: str, *, finished: bool = True,
                          reply_ids: Sequence[int] | None = None,
                          stop_token_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Training sequence of one exchange (convention in the module docstring).

    ``reply_ids``: the reply's token ids as the target generated them (then ``reply`` is not re-tokenized;
    text -> ids is not always the inverse of ids -> text).  ``stop_token_id``: the token that ended the
    reply when the generator recorded it (a target with several stop tokens); else `eot_token_id`.

    Returns:
      ``(input_ids int32[T], loss_mask uint8[T])``; the mask is 1 exactly on the reply tokens and, when
      ``finished``, the end-of-turn token after them.
    """
    prompt_ids = self.encode_prompt(prompt)
    if reply_ids is not None:
      reply_ids = [int(t) for t in reply_ids]
      bad = [t for t in reply_ids if not 0 <= t < self.vocab_size]
      if bad:
        raise ValueError(f"reply_ids: token ids {bad[:5]} outside the target vocabulary [0, {self.vocab_size})")
    else:
      reply_ids = list(self.tokenizer(reply, add_special_tokens=False)["input_ids"]) if reply else []
    if finished and stop_token_id is not None:
      reply_ids.append(int(stop_token_id))
    elif finished and self.eot_token_id is not None:
      reply_ids.append(int(self.eot_token_id))
    ids = np.asarray(prompt_ids + reply_ids, dtype=np.int32)
    mask = np.zeros(len(ids), dtype=np.uint8)
    mask[len(prompt_ids):] = 1
    return ids, mask

  # --- generation --------------------------------------------------------------------------------------
  @torch.no_grad()
  def generate(self, prompts: Sequence[str | Messages], *, max_new_tokens: int, temperature: float = 0.0,
               seed: int = 0, prefill_tokens: int = 4096, on_step=None) -> list[Generation]:
    """Batched generation of replies to ``prompts`` (`lkjax.targets.decode.decode`: left padding, a
    preallocated KV cache, finished rows dropped from the batch).

    ``temperature == 0`` is greedy; otherwise plain sampling from the tempered distribution (no top-k /
    top-p, as for the paper's target-generated data), from a generator seeded with ``seed``.  Generation
    stops at the end-of-turn token, which is not part of ``token_ids``.  ``on_step(tokens)`` is called after
    every decoding step (progress bars).
    """
    from lkjax.targets import decode

    if not prompts:
      return []
    out = decode.decode(self.model, [self.encode_prompt(p) for p in prompts], max_new_tokens=max_new_tokens,
                        pad_token_id=self.pad_token_id, stop_token_ids=self.stop_token_ids,
                        temperature=temperature, seed=seed, prefill_tokens=prefill_tokens, on_step=on_step)
    return [Generation(self.reply_text(d.token_ids), d.token_ids, d.finished, d.stop_token_id) for d in out]

  # --- features ----------------------------------------------------------------------------------------
  @torch.no_grad()
  def features(self, input_ids: torch.Tensor | np.ndarray, attention_mask: torch.Tensor | np.ndarray | None = None,
               return_logits: bool = False) -> Features:
    """One forward: aux hidden ``[B, T, A*H]``, final post-norm hidden ``[B, T, H]``, logits ``[B, T, V]``.

    With ``attention_mask`` (1 = token, 0 = padding; left or right padding) positions count real tokens
    only, so a padded row gives the same features at its real positions as the row alone.
    """
    input_ids = torch.as_tensor(np.asarray(input_ids) if isinstance(input_ids, np.ndarray) else input_ids,
                                dtype=torch.long)
    if input_ids.ndim != 2:
      raise ValueError(f"features: input_ids must be [B, T], got {list(input_ids.shape)}")
    kwargs: dict[str, Any] = {}
    if attention_mask is not None:
      attention_mask = torch.as_tensor(np.asarray(attention_mask) if isinstance(attention_mask, np.ndarray)
                                       else attention_mask, dtype=torch.long)
      kwargs["attention_mask"] = attention_mask
      kwargs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    base = self.model.get_decoder()
    out = base(input_ids=input_ids, output_hidden_states=True, use_cache=False, **kwargs)
    aux = select_features(out.hidden_states, self.info.aux_layer_ids)
    final = out.last_hidden_state
    logits = self.model.get_output_embeddings()(final) if return_logits else None
    return Features(aux, final, logits)

  # --- export ------------------------------------------------------------------------------------------
  def head_weights(self) -> dict[str, np.ndarray]:
    """``{"embed_tokens": [V, H], "lm_head": [V, H], "norm": [H]}`` float32, exactly as `export_head` stores
    them (docs/design.md#target-families):

      embed_tokens  the raw ``embed_tokens`` rows, WITHOUT the target's embedding scale: what vLLM and
                    SGLang feed an EAGLE-3 draft (they share the target's embedding module and call it)
      lm_head       the LM head (= embed_tokens when tied)
      norm          the final norm's MULTIPLIER ``norm_weight_offset + weight`` (lkjax's and DeepSeek's
                    RMSNorm convention), so ``1 + w`` for Gemma
    The embedding and head are rounded to the checkpoint dtype (`TargetInfo.dtype`), the norm is float32.
    """
    from lkjax.data import shards

    emb = self.model.get_input_embeddings().weight
    head = self.model.get_output_embeddings().weight
    norm = self.model.get_decoder().norm.weight
    rows = lambda t: shards.round_to_dtype(t.detach().float().cpu().numpy(), self.info.dtype)
    return {"embed_tokens": rows(emb), "lm_head": rows(head),
            "norm": (self.info.norm_weight_offset + norm.detach().float().cpu()).numpy()}

  def export_head(self, directory: str | os.PathLike) -> pathlib.Path:
    """Write ``target_head.safetensors`` (embedding, LM head in the checkpoint dtype; final norm float32)."""
    from lkjax.data import shards

    return shards.save_target_weights(directory, **self.head_weights(), dtype=self.info.dtype)
