"""The benchmark driver: `lkjax.eval.run.evaluate_draft` / `offline_estimate` and experiments/evaluate.py.

Fast tests use a tiny random Llama target with a word-level ChatML tokenizer and a tiny EAGLE-3 draft.
Oracles: greedy speculative output equals target-only output token for token (same run), tau recomputed
from the per-round records, the second MT-bench turn formatted with the model's own first answer, the
jitted chunked draft against the plain draft, and a float64 numpy acceptance rate for the offline tau.
The slow test is the issue's end-to-end run: a smoke-trained EAGLE-3 on the packaged SmolLM2 target.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx

from lkjax.data import shards
from lkjax.data.benchmarks import EvalPrompt
from lkjax.eval import run as run_lib
from lkjax.models import registry
from lkjax.targets.hf import TargetModel
from lkjax.targets.info import TargetInfo

K = 3
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
WORDS = ("the a cat dog sat on mat and ran fast slow big small red blue green house tree sky sun moon star "
         "what is why how who when where write code python list sort reverse number one two three four five "
         "hello world yes no please thanks story about tell me").split()
SPECIALS = ["<unk>", "<pad>", "<s>", "<|im_end|>", "<|im_start|>", "user", "assistant", "system"]

# Tiny matrices: extra torch threads only contend for the shared CI cores.
THREADS = 1


def make_tokenizer(chat_template: bool = True):
  """Word-level tokenizer over `WORDS` with ChatML specials (decode joins words with spaces)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIALS + WORDS)}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.decoder = decoders.WordPiece(prefix="##")
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                 eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
  if chat_template:
    fast.chat_template = CHATML
  return fast


def make_target(chat_template: bool = True, max_positions: int = 256) -> TargetModel:
  from transformers import LlamaConfig, LlamaForCausalLM

  tok = make_tokenizer(chat_template)
  cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                    tie_word_embeddings=True, bos_token_id=2, eos_token_id=3, pad_token_id=1)
  torch.manual_seed(0)
  model = LlamaForCausalLM(cfg)
  with torch.no_grad():  # peaked logits, so a draft trained on nothing still gets some tokens accepted
    model.lm_head.weight.normal_(0.0, 3.0 / 32 ** 0.5)
  return TargetModel(model.eval(), tok, name="tiny-llama")


def make_draft(info: TargetInfo, embed: np.ndarray, *, vd: int = 40, seed: int = 0, num_heads: int = K):
  cfg = registry.default_model_config("eagle3", info)
  cfg.num_heads = num_heads
  cfg.draft_vocab_size = vd
  ids = np.sort(np.random.default_rng(seed).choice(info.vocab_size, vd, replace=False)).astype(np.int32)
  ids[0] = 3 if 3 not in ids else ids[0]  # keep eos drafted: answers stop early sometimes
  ids = np.unique(ids)
  cfg.draft_vocab_size = len(ids)
  return registry.build_draft(cfg, info, draft_vocab=ids, target_weights={"embed_tokens": embed},
                              rngs=nnx.Rngs(params=seed))


def prompts(long_words: int = 90) -> dict[str, list[EvalPrompt]]:
  long_text = " ".join(WORDS[i % len(WORDS)] for i in range(long_words))
  return {
      "mt_bench": [EvalPrompt("mt_bench", "81", ("tell me a story about a cat", "now write it about a dog")),
                   EvalPrompt("mt_bench", "82", ("what is the sun", "why is the sky blue"))],
      "humaneval": [EvalPrompt("humaneval", "HumanEval/0", ("write python code to sort a list",)),
                    EvalPrompt("humaneval", "HumanEval/1", (long_text,))],
      "gsm8k": [EvalPrompt("gsm8k", "gsm/0", ("one and two is what number",))],
  }


@pytest.fixture(scope="module")
def tiny():
  target = make_target()
  return target, make_draft(target.info, target.head_weights()["embed_tokens"])


@pytest.fixture(scope="module")
def evaluated(tiny, tmp_path_factory):
  target, draft = tiny
  calls = []
  orig = target.encode_prompt

  def spy(messages):
    calls.append([dict(m) for m in messages] if not isinstance(messages, str) else messages)
    return orig(messages)

  target.encode_prompt = spy
  out = tmp_path_factory.mktemp("eval")
  offline = {"tau": 1.5, "alpha": [0.3, 0.4, 0.5], "tokens": [10, 10, 10]}
  try:
    rep = run_lib.evaluate_draft(draft, target, benchmarks=("mt_bench", "humaneval", "gsm8k"),
                                 temperatures=(0.0, 1.0), num_draft=K, max_new_tokens=12, max_context=64,
                                 seed=3, offline=offline, out_dir=out, label="tiny", prompts=prompts(),
                                 num_threads=THREADS, progress=False, n_boot=200, commit_chunk=8)
  finally:
    del target.encode_prompt
  return rep, calls, out


def test_report_schema_and_files(evaluated):
  rep, _, out = evaluated
  assert rep["label"] == "tiny" and set(rep["temperatures"]) == {"0", "1"}
  for f in ("report.json", "report.md", "report.png", "answers.jsonl"):
    assert (out / f).stat().st_size > 0
  on_disk = json.loads((out / "report.json").read_text())
  assert on_disk["temperatures"].keys() == rep["temperatures"].keys() and len(on_disk["prompts"]) == len(rep["prompts"])
  md = (out / "report.md").read_text()
  assert "| tiny | 0 |" in md and "| tiny | 1 |" in md and "mt_bench" in md
  meta = rep["meta"]
  assert meta["num_draft"] == K and meta["max_context"] == 64 and meta["torch_threads"] == THREADS
  assert meta["num_prompts"] == {"mt_bench": 2, "humaneval": 2, "gsm8k": 1}
  assert meta["num_turns"]["mt_bench"] == 4 and meta["timings"]["compile_s"] > 0
  for t, g in rep["temperatures"].items():
    assert set(g["benchmarks"]) == {"mt_bench", "humaneval", "gsm8k"}
    for s in g["benchmarks"].values():
      assert len(s["position_acceptance"]) == K and s["spec_tokens_per_s"] > 0 and s["target_tokens_per_s"] > 0
      assert s["speedup"] > 0
      # the offline estimate (a T = 1 quantity) sits next to the measured tau at T = 1 only
      assert s["offline_tau"] == (1.5 if t == "1" else None)


def test_tau_in_range_and_matches_round_records(evaluated):
  rep, _, _ = evaluated
  for t, g in rep["temperatures"].items():
    for b, s in g["benchmarks"].items():
      recs = [r for r in rep["prompts"] if r["benchmark"] == b and f"{r['temperature']:g}" == t]
      rounds = [a for r in recs for a in r["accept_lengths"]]
      assert rounds and all(0 <= a <= K for a in rounds)
      assert s["tau"] == pytest.approx(1 + np.mean(rounds)) and 1.0 <= s["tau"] <= K + 1
      assert s["num_prompts"] == len({r["id"] for r in recs}) and s["num_rounds"] == len(rounds)
    assert 1.0 <= g["mean"]["tau"] <= K + 1


def test_greedy_speculative_equals_target_only(evaluated):
  _, _, out = evaluated
  rows = [json.loads(x) for x in (out / "answers.jsonl").read_text().splitlines()]
  greedy = [r for r in rows if r["temperature"] == 0.0]
  assert len(greedy) == 4 + 2 + 1
  assert all(r["speculative"] == r["target"] for r in greedy)
  assert any(r["speculative"] for r in greedy)


def test_without_baseline_tau_is_unchanged_and_target_fields_are_empty(evaluated, tiny):
  rep, _, _ = evaluated
  target, draft = tiny
  quick = run_lib.evaluate_draft(draft, target, benchmarks=("mt_bench", "humaneval", "gsm8k"),
                                 temperatures=(0.0, 1.0), num_draft=K, max_new_tokens=12, max_context=64,
                                 seed=3, label="tiny", prompts=prompts(), num_threads=THREADS, progress=False,
                                 n_boot=200, commit_chunk=8, baseline=False)
  assert quick["meta"]["baseline"] is False and rep["meta"]["baseline"] is True
  for a, b in zip(quick["prompts"], rep["prompts"]):
    assert a["accept_lengths"] == b["accept_lengths"] and a["new_tokens"] == b["new_tokens"]
    assert a["target_seconds"] is None and a["target_new_tokens"] is None
  for t, g in quick["temperatures"].items():
    for b, s in g["benchmarks"].items():
      assert s["tau"] == rep["temperatures"][t]["benchmarks"][b]["tau"]
      assert s["speedup"] is None and s["target_tokens_per_s"] is None and s["spec_tokens_per_s"] > 0


def test_mt_bench_second_turn_sees_own_first_answer(evaluated, tiny):
  rep, calls, out = evaluated
  target = tiny[0]
  rows = [json.loads(x) for x in (out / "answers.jsonl").read_text().splitlines()]
  second = [c for c in calls if not isinstance(c, str) and len(c) == 3]
  # 2 questions x 2 temperatures x 2 modes (the warm-up asks single turns only)
  assert len(second) == 8
  for t in (0.0, 1.0):
    for qid, (q1, q2) in (("81", prompts()["mt_bench"][0].turns), ("82", prompts()["mt_bench"][1].turns)):
      first = next(r for r in rows if r["id"] == qid and r["turn"] == 0 and r["temperature"] == t)
      for mode in ("speculative", "target"):
        msgs = [{"role": "user", "content": q1}, {"role": "assistant", "content": first[mode]},
                {"role": "user", "content": q2}]
        assert msgs in second, (qid, t, mode)
        # and the tokens the target saw hold the answer between the two questions
        ids = target.encode_prompt(msgs)
        ans = target.tokenizer(first[mode], add_special_tokens=False)["input_ids"]
        head = target.encode_prompt([msgs[0]])
        assert ids[:len(head) - 3] == head[:len(head) - 3]
        assert ans == ids[len(head):len(head) + len(ans)]
  turn2 = [r for r in rep["prompts"] if r["benchmark"] == "mt_bench" and r["turn"] == 1]
  turn1 = {(r["id"], r["temperature"]): r for r in rep["prompts"] if r["benchmark"] == "mt_bench" and r["turn"] == 0}
  assert all(r["prompt_tokens"] > turn1[(r["id"], r["temperature"])]["prompt_tokens"] for r in turn2)


def test_truncated_prompts_are_counted(evaluated):
  rep, _, _ = evaluated
  for t, g in rep["temperatures"].items():
    assert g["benchmarks"]["humaneval"]["truncated_prompts"] == 1
    assert g["benchmarks"]["gsm8k"]["truncated_prompts"] == 0
  long = [r for r in rep["prompts"] if r["id"] == "HumanEval/1"]
  # kept tokens + reserve (max_new_tokens + K + 1) fill the 64-position context exactly
  assert all(r["truncated_prompt_tokens"] > 0 and r["prompt_tokens"] == 64 - (12 + K + 1) for r in long)
  assert rep["meta"]["truncated_turns"] == 2


def test_jitted_draft_matches_plain_draft(tiny):
  target, draft = tiny
  info = target.info
  jd = run_lib.JittedDraft(draft, chunk=4)
  rng = np.random.default_rng(0)

  def ctx(n, start):
    return dict(aux_hidden=jnp.asarray(rng.standard_normal((1, n, info.num_aux * info.hidden_size)), jnp.float32),
                final_hidden=jnp.asarray(rng.standard_normal((1, n, info.hidden_size)), jnp.float32),
                next_tokens=jnp.asarray(rng.integers(0, info.vocab_size, (1, n)), jnp.int32),
                positions=jnp.arange(start, start + n, dtype=jnp.int32)[None])

  c_plain, c_jit = draft.init_cache(1, 32), jd.init_cache(1, 32)
  start = 0
  for n, t in ((11, 0.0), (3, 1.0)):  # 11 = 4 + 4 + 2 + 1 commit chunks, then 2 + 1
    x = ctx(n, start)
    key = jax.random.key(start)
    c_plain, tok_p, z_p = draft.propose(c_plain, x, num_tokens=K, temperature=t, rng=key)
    c_jit, tok_j, z_j = jd.propose(c_jit, x, num_tokens=K, temperature=t, rng=key)
    np.testing.assert_allclose(np.asarray(z_j), np.asarray(z_p), rtol=1e-4, atol=1e-4)
    assert np.array_equal(np.asarray(tok_j), np.asarray(tok_p))
    start += n
  assert run_lib._pow2_chunks(75, 64) == [64, 8, 2, 1] and run_lib._pow2_chunks(0, 8) == []


def test_draft_that_does_not_fit_fails_before_decoding(tiny):
  target, _ = tiny
  info = target.info
  wider = TargetInfo(**{**info.to_dict(), "hidden_size": 48, "aux_layer_ids": tuple(info.aux_layer_ids)})
  bad = make_draft(wider, np.zeros((info.vocab_size, 48), np.float32))
  decoded = []
  orig = target.encode_prompt
  target.encode_prompt = lambda m: decoded.append(m) or orig(m)
  try:
    with pytest.raises(ValueError, match="hidden_size"):
      run_lib.evaluate_draft(bad, target, num_draft=K, max_new_tokens=4, prompts=prompts(), progress=False)
  finally:
    del target.encode_prompt
  assert not decoded
  with pytest.raises(ValueError, match="benchmark"):
    run_lib.evaluate_draft(tiny[1], target, benchmarks=("nope",), num_draft=K, prompts=prompts())


def test_plain_completion_target_without_chat_template(tmp_path):
  target = make_target(chat_template=False)
  draft = make_draft(target.info, target.head_weights()["embed_tokens"], seed=1)
  ps = {"mt_bench": prompts()["mt_bench"][:1]}
  rep = run_lib.evaluate_draft(draft, target, benchmarks=("mt_bench",), temperatures=(0.0,), num_draft=K,
                               max_new_tokens=6, prompts=ps, num_threads=THREADS, progress=False, n_boot=50,
                               warmup=False, jit=False)
  assert rep["meta"]["chat_template"] is False
  s = rep["temperatures"]["0"]["benchmarks"]["mt_bench"]
  assert 1.0 <= s["tau"] <= K + 1 and s["num_prompts"] == 1 and rep["meta"]["num_turns"]["mt_bench"] == 2


# ---------------------------------------------------------------------------------------------- offline


def _write_shards(directory, info: TargetInfo, emb: np.ndarray, head: np.ndarray, n: int = 10) -> None:
  rng = np.random.default_rng(1)
  bf16 = np.dtype(ml_dtypes.bfloat16)
  recs, freqs, tokens = [], np.zeros(info.vocab_size, np.int64), 0
  for _ in range(n):
    t = int(rng.integers(8, 15))
    ids = rng.integers(0, info.vocab_size, t).astype(np.int32)
    mask = np.ones(t, np.uint8)
    mask[:2] = 0
    recs.append({"input_ids": ids, "loss_mask": mask,
                 "aux_hidden": rng.standard_normal((t, info.num_aux * info.hidden_size)).astype(bf16),
                 "final_hidden": (2 * rng.standard_normal((t, info.hidden_size))).astype(bf16)})
    np.add.at(freqs, ids[mask > 0], 1)
    tokens += t
  name = shards.SHARD_PATTERN.format(0)
  shards.write_shard(directory / name, [shards.encode_record(r) for r in recs])
  shards.write_manifest(directory, {
      "target": info.to_dict(), "max_length": 16, "num_records": n, "num_tokens": tokens,
      "num_loss_tokens": int(freqs.sum()), "shards": [{"file": name, "num_records": n, "num_tokens": tokens}],
      "token_freqs": freqs.tolist()})
  shards.save_target_weights(directory, embed_tokens=emb, lm_head=head, norm=np.ones(info.hidden_size, np.float32))


def test_offline_estimate_matches_numpy_acceptance(tiny, tmp_path):
  from lkjax.config_args import load_config
  from lkjax.data.pipeline import make_loader
  from lkjax.models.base import head_mask

  target, draft = tiny
  info = target.info
  w = target.head_weights()
  _write_shards(tmp_path, info, w["embed_tokens"], w["lm_head"])
  cfg = load_config("configs/eagle3.py:smoke", {"data.dir": str(tmp_path), "data.max_length": 16,
                                                 "data.val_fraction": 0.5, "precision": "fp32", "batch_size": 2})
  off = run_lib.offline_estimate(draft, cfg)
  assert len(off["alpha"]) == K and off["num_batches"] >= 2 and off["temperature"] == 1.0

  # Oracle: float64 numpy alpha = sum_{v in Vd} min(p_v, q_v), p from the shard's final hidden at t+k+1.
  ids = np.asarray(draft.draft_vocab[...])
  num, den = np.zeros(K), np.zeros(K)
  for b in make_loader(tmp_path, split="val", global_batch_size=2, max_length=16, shuffle=False,
                       val_fraction=0.5, drop_remainder=False, process_index=0, process_count=1):
    z = np.asarray(draft({k: jnp.asarray(v) for k, v in b.items()}), np.float64)          # [K, B, T, Vd]
    m = np.asarray(head_mask(jnp.asarray(b["loss_mask"]), jnp.asarray(b["segment_ids"]), K))
    h = np.asarray(b["final_hidden"], np.float64)
    y = h @ w["lm_head"].astype(np.float64).T
    p = np.exp(y - y.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    q = np.exp(z - z.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    for k in range(K):
      pk = np.zeros_like(p)
      pk[:, :p.shape[1] - (k + 1)] = p[:, k + 1:]
      alpha = np.minimum(pk[..., ids], q[k]).sum(-1)
      num[k] += (alpha * m[k]).sum()
      den[k] += m[k].sum()
  ref = num / den
  np.testing.assert_allclose(off["alpha"], ref, rtol=2e-4, atol=2e-5)
  assert off["tau"] == pytest.approx(1 + np.cumsum(np.cumprod(ref))[-1], rel=1e-4)
  assert off["tokens"] == [int(d) for d in den]


# ---------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_end_to_end_smoke_trained_eagle3_on_smollm2(tmp_path_factory):
  """The issue's run: smoke-train EAGLE-3 on SmolLM2, then a couple of prompts per benchmark at T=0, 1."""
  from absl import flags

  from lkjax.config_args import load_config
  from lkjax.train import loop

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  root = tmp_path_factory.mktemp("e2e")
  # The default smoke data set, prepared by the trainer itself (16 prompts x 32 tokens, 12 steps). One
  # device: the smoke batch (4) does not split over conftest's 8 CPU devices, and a tiny step is faster
  # unsharded on 2 cores.
  cfg = load_config("configs/eagle3.py:smoke", {"data.dir": str(root / "data"), "mesh.shape": (1, 1, 1)})
  summary = loop.train_and_evaluate(cfg, root / "run")
  assert summary["status"] == "finished"

  trained = loop.load_trained_draft(root / "run")
  target = TargetModel.load("smollm2")
  assert trained.target_info.weights_sha256 == target.info.weights_sha256
  k = int(trained.config.model.num_heads)
  assert k == 7
  offline = run_lib.offline_estimate(trained.model, trained.config)
  rep = run_lib.evaluate_draft(trained.model, target, num_draft=k, max_new_tokens=16, limit=2, seed=0,
                               offline=offline, out_dir=root / "eval", label="eagle3_smoke", progress=False,
                               n_boot=200)
  for t in ("0", "1"):
    g = rep["temperatures"][t]
    assert set(g["benchmarks"]) == {"mt_bench", "humaneval", "gsm8k"}
    for s in g["benchmarks"].values():
      assert 1.0 <= s["tau"] <= k + 1 and s["num_prompts"] == 2
    assert 1.0 <= g["mean"]["tau"] <= k + 1
  assert 1.0 <= offline["tau"] <= k + 1
  assert rep["temperatures"]["1"]["mean"]["offline_tau"] == pytest.approx(offline["tau"])
  for f in rep["files"].values():
    assert os.path.getsize(f) > 0
