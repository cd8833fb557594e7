"""A tiny synthetic shard directory for tests, notebooks and smoke runs (no target model needed).

`write_synthetic_shards` writes what `experiments/precompute.py` would (one ArrayRecord shard,
``manifest.json``, ``target_head.safetensors``) with the `lkjax.data.shards` APIs, for a made-up Llama-style
target: random token ids, random aux hidden states, and final hidden states that carry the NEXT token
(``final_hidden[t] = emb[input_ids[t + 1]] + noise``, zeros at the last position) with the target's LM head
equal to its embedding ``emb``, so the target's next-token distribution is (nearly) one-hot on the token
that actually follows.

With ``predictable=0`` (the default) the tokens are i.i.d. uniform: a draft, which must guess tokens beyond
the one its inputs carry, can learn only their frequencies. With ``predictable=p > 0`` each token is, with
probability ``p``, the fixed successor of the previous one (a seeded permutation of the vocabulary), so a
draft head ``k`` positions further ahead can reach an acceptance of about ``p ** (k + 1)`` -- later heads
accept less, as with real targets -- and the training traces show acceptance rising within a few dozen steps.
"""
from __future__ import annotations

import os
import pathlib

import ml_dtypes
import numpy as np

from lkjax.data import shards

_BF16 = np.dtype(ml_dtypes.bfloat16)
PROMPT_TOKENS = 3  # leading tokens of each record outside the loss mask (a "prompt")


def synthetic_target_info(*, vocab_size: int, hidden_size: int, num_layers: int, max_len: int,
                          name: str = "synthetic"):
  """The `TargetInfo` of the made-up target (head_dim 8, one kv head, EAGLE-3 aux layers by default)."""
  from lkjax.targets.info import TargetInfo

  head_dim = 8
  return TargetInfo(name=name, model_type="llama", num_layers=num_layers, hidden_size=hidden_size,
                    vocab_size=vocab_size, num_attention_heads=max(1, hidden_size // head_dim),
                    num_key_value_heads=1, head_dim=head_dim, intermediate_size=2 * hidden_size,
                    rms_norm_eps=1e-5, rope_theta=1e4, max_position_embeddings=max(64, 2 * max_len),
                    tie_word_embeddings=True)


def write_synthetic_shards(directory: str | os.PathLike, *, num_records: int = 40, vocab_size: int = 64,
                           hidden_size: int = 16, num_layers: int = 8, min_len: int = 10, max_len: int = 16,
                           seed: int = 0, predictable: float = 0.0, target_lse: bool = False) -> pathlib.Path:
  """Write ``num_records`` random records (lengths ``min_len..max_len`` inclusive) to ``directory``.

  The target has ``num_layers`` layers (>= 4: EAGLE-3's aux layers ``(2, N//2, N-3)``), so ``aux_hidden`` is
  ``[T, 3 * hidden_size]``; the first `PROMPT_TOKENS` tokens of each record are outside the loss mask and
  ``manifest["token_freqs"]`` counts the tokens under it. ``predictable``: the probability that a token is
  its predecessor's fixed successor (see the module docstring; 0 = i.i.d. tokens). ``target_lse``: also
  store each position's full-vocabulary target logsumexp, as precompute does. Deterministic in
  ``seed``. Returns the directory.
  """
  if not 1 <= min_len <= max_len:
    raise ValueError(f"min_len={min_len}, max_len={max_len}: need 1 <= min_len <= max_len")
  if not 0.0 <= predictable <= 1.0:
    raise ValueError(f"predictable={predictable}: must be in [0, 1]")
  if num_records < 1:
    raise ValueError(f"num_records={num_records}: must be >= 1")
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  info = synthetic_target_info(vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers,
                               max_len=max_len)
  h, v = hidden_size, vocab_size
  rng = np.random.default_rng(seed)
  emb = rng.standard_normal((v, h)).astype(np.float32)
  # Only drawn when used, so predictable=0 keeps the random stream (and the bytes) of i.i.d. data.
  successor = rng.permutation(v) if predictable > 0 else None
  recs, freqs, tokens = [], np.zeros(v, np.int64), 0
  for _ in range(num_records):
    n = int(rng.integers(min_len, max_len + 1))
    ids = rng.integers(0, v, n).astype(np.int32)
    if successor is not None:
      follow = rng.random(n) < predictable
      for t in range(1, n):
        if follow[t]:
          ids[t] = successor[ids[t - 1]]
    mask = np.ones(n, np.uint8)
    mask[:min(PROMPT_TOKENS, n - 1)] = 0
    fin = np.concatenate([emb[ids[1:]], np.zeros((1, h), np.float32)]) + 0.1 * rng.standard_normal((n, h))
    recs.append({"input_ids": ids, "loss_mask": mask,
                 "aux_hidden": rng.standard_normal((n, info.num_aux * h)).astype(_BF16),
                 "final_hidden": fin.astype(_BF16)})
    if target_lse:
      logits = recs[-1]["final_hidden"].astype(np.float64) @ emb.astype(np.float64).T
      m = logits.max(-1)
      recs[-1]["target_lse"] = (m + np.log(np.exp(logits - m[:, None]).sum(-1))).astype(np.float32)
    np.add.at(freqs, ids[mask > 0], 1)
    tokens += n
  name = shards.SHARD_PATTERN.format(0)
  shards.write_shard(directory / name, [shards.encode_record(r) for r in recs])
  shards.write_manifest(directory, {
      "target": info.to_dict(), "max_length": max_len, "num_records": num_records, "num_tokens": tokens,
      "num_loss_tokens": int(freqs.sum()),
      "shards": [{"file": name, "num_records": num_records, "num_tokens": tokens}],
      "token_freqs": freqs.tolist(), "target_lse": bool(target_lse)})
  shards.save_target_weights(directory, embed_tokens=emb, lm_head=emb, norm=np.ones(h, np.float32))
  return directory
