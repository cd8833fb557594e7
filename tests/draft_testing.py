"""Shared test helpers: tiny and SmolLM2-sized targets, and drafting along the ground-truth tokens."""
from __future__ import annotations

import numpy as np
from flax import nnx

from lkjax.targets.info import TargetInfo

# A tiny Llama-shaped target (EAGLE-3 / MTP tests) and the packaged SmolLM2-135M-Instruct dims.
TINY = TargetInfo(name="tiny", model_type="llama", num_layers=4, hidden_size=16, vocab_size=64,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=4, intermediate_size=24,
                  rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=64)
SMOL = TargetInfo(name="smollm2-135m", model_type="llama", num_layers=30, hidden_size=576, vocab_size=49152,
                  num_attention_heads=9, num_key_value_heads=3, head_dim=64, intermediate_size=1536,
                  rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True)


def draft_along_truth(model, batch, num_tokens, *, chunks=(2, 1, 3), ctx_keys=("aux_hidden", "final_hidden"),
                      cache_len=16):
  """Commit each document chunk by chunk; after each chunk ending at t, draft along x[t+2..] (forced).

  The ctx of a chunk holds ``ctx_keys`` of the batch, the committed next tokens and the positions.
  Returns ``{(b, t, doc_end): logits [num_tokens, Vd]}`` and checks the forced tokens come back.
  """
  ids, seg = batch["input_ids"], batch["segment_ids"]
  T = ids.shape[1]
  at = lambda b, j: ids[b, j] if j < T else 0  # noqa: E731
  propose = nnx.jit(lambda m, cache, ctx, forced: m.propose(cache, ctx, num_tokens=num_tokens, temperature=0.0,
                                                            rng=None, forced_tokens=forced))
  out = {}
  for b in range(ids.shape[0]):
    for doc in sorted(set(seg[b]) - {0}):
      where = np.nonzero(seg[b] == doc)[0]
      start, end = where[0], where[-1] + 1
      cache = model.init_cache(1, cache_len)
      a, i = start, 0
      while a < end:
        c = min(end, a + chunks[i % len(chunks)])
        i += 1
        ctx = {k: batch[k][b:b + 1, a:c] for k in ctx_keys}
        ctx.update(next_tokens=np.array([[at(b, j + 1) for j in range(a, c)]], np.int32),
                   positions=batch["positions"][b:b + 1, a:c])
        forced = np.array([[at(b, c - 1 + k + 2) for k in range(num_tokens)]], np.int32)
        cache, tokens, logits = propose(model, cache, ctx, forced)
        np.testing.assert_array_equal(tokens, forced)
        out[(b, c - 1, end)] = np.asarray(logits[0])
        a = c
  return out
