"""A matrix of target families, end to end on tiny random-weight models built from transformers config classes.

Per family (docs/design.md#target-families): the facts `lkjax.targets.facts` reads (activation, RoPE, norm
convention, embedding scale, tied head, sliding window, EOS ids, checkpoint dtype) against what the family is
known to do; generate -> precompute with the stored aux / final hidden states and log-sum-exp checked against
transformers' own ``output_hidden_states`` / logits; a few training steps of EAGLE-3 and MEDUSA (MTP and the
MLP-Speculator on some families); speculative decoding at T = 0 whose output equals transformers'
``generate(do_sample=False)``; export.  No download: every model is built here (8 layers, hidden 64,
vocabulary 128) and saved with a word-level tokenizer.
"""
from __future__ import annotations

import json
import math

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open

from lkjax.data import generate, precompute, shards
from lkjax.targets import facts
from lkjax.targets.hf import TargetModel

torch.set_num_threads(1)

V, H, N_LAYERS = 128, 64, 8
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<unk>", "<pad>", "<s>", "<|im_end|>", "<|im_start|>"]
MARKUP = "<end_of_turn>"      # an added token the tokenizer does NOT mark special (as Gemma's base tokenizer)
WORDS = ("the a cat dog sat on mat and ran fast slow big small red blue green house tree sky sun moon star "
         "what is why how who when where write code python list sort reverse number one two three four five "
         "hello world yes no please thanks story about tell me user assistant system").split()
PROMPTS = ["tell me a story about the big red dog", "why is the sky blue", "write code to sort a list",
           "what is one and two", "hello world", "who sat on the mat and ran fast", "how big is the sun",
           "tell me about the green tree house"]
COMMON = dict(vocab_size=V, hidden_size=H, intermediate_size=128, num_hidden_layers=N_LAYERS, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=2, eos_token_id=3, pad_token_id=1)
GEMMA3_TYPES = ["sliding_attention", "sliding_attention", "full_attention"] * 2 + ["sliding_attention", "full_attention"]

# family -> (config class, model class, config kwargs, chat template, checkpoint dtype, expected facts)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 5e5}),
              True, "float32",
              dict(hidden_act="silu", norm_weight_offset=0.0, embed_scale=1.0, tie_word_embeddings=False,
                   rope_theta=5e5, sliding_window=0)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
              True, "float32",
              dict(hidden_act="silu", norm_weight_offset=0.0, embed_scale=1.0, tie_word_embeddings=True,
                   rope_theta=1e6, sliding_window=0)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",
              dict(tie_word_embeddings=True, head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
              True, "bfloat16",
              dict(hidden_act="silu", norm_weight_offset=0.0, embed_scale=1.0, tie_word_embeddings=True,
                   rope_theta=1e6, sliding_window=0, head_dim=16)),
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(tie_word_embeddings=False, head_dim=16, sliding_window=8,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
                True, "float32",
                dict(hidden_act="silu", norm_weight_offset=0.0, embed_scale=1.0, tie_word_embeddings=False,
                     rope_theta=1e4, sliding_window=8)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM",
             dict(tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
             True, "float32",
             dict(hidden_act="silu", norm_weight_offset=0.0, embed_scale=1.0, tie_word_embeddings=False,
                  rope_theta=1e4, sliding_window=0)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM",
              dict(head_dim=16, hidden_act="gelu_pytorch_tanh",
                   rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
              True, "float32",
              dict(hidden_act="gelu_pytorch_tanh", norm_weight_offset=1.0, embed_scale=math.sqrt(H),
                   tie_word_embeddings=True, rope_theta=1e4, sliding_window=0)),
    # Per-layer-type RoPE, sliding windows, scaled embedding inside the embedding module, (1 + w) norms, and a
    # base model: no chat template.
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8, layer_types=GEMMA3_TYPES,
                    rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
               False, "float32",
               dict(hidden_act="gelu_pytorch_tanh", norm_weight_offset=1.0, embed_scale=math.sqrt(H),
                    tie_word_embeddings=True, rope_theta=1e6, sliding_window=8,
                    layer_types=tuple(GEMMA3_TYPES))),
}
# Families that also train the MTP and MLP-Speculator drafts (every family trains EAGLE-3 and MEDUSA).
ALL_ARCHS = {"llama", "gemma3"}


def make_tokenizer(chat_template: bool):
  """Word-level tokenizer of exactly V tokens (ChatML specials, a non-special markup token, words, fillers)."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  toks = SPECIALS + [MARKUP] + WORDS
  toks += [f"w{i}" for i in range(V - len(toks))]
  tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(toks)}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.decoder = decoders.WordPiece(prefix="##")
  tok.add_tokens([AddedToken(MARKUP, special=False, normalized=False)])
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                 eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
  if chat_template:
    fast.chat_template = CHATML
  assert len(fast) == V
  return fast


def build_model(family: str, seed: int = 0):
  import transformers

  cfg_name, model_name, kw, *_ = FAMILIES[family]
  cfg = getattr(transformers, cfg_name)(**{**COMMON, **kw})
  torch.manual_seed(seed)
  model = getattr(transformers, model_name)(cfg)
  with torch.no_grad():   # random init leaves norms at exactly 1 (or 0): perturb so every weight matters
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model.eval()


def save_target(family: str, directory) -> TargetModel:
  """Build, save (model in the family's checkpoint dtype + tokenizer) and load back through `TargetModel.load`."""
  _, _, _, chat, dtype, _ = FAMILIES[family]
  model = build_model(family)
  if family == "gemma":    # a second stop token from the generation config (Gemma's <end_of_turn>)
    model.generation_config.eos_token_id = [3, 5]
  model.to(getattr(torch, dtype)).save_pretrained(directory)
  make_tokenizer(chat).save_pretrained(directory)
  return TargetModel.load(directory)


@torch.no_grad()
def transformers_states(model, ids):
  """transformers' own output: hidden_states, the LM head's input (final hidden) and logits of one sequence."""
  captured = []
  hook = model.get_output_embeddings().register_forward_pre_hook(lambda m, a: captured.append(a[0]))
  try:
    out = model(torch.as_tensor(np.asarray(ids, np.int64))[None], output_hidden_states=True)
  finally:
    hook.remove()
  return out.hidden_states, captured[0][0], out.logits[0]


# ------------------------------------------------------------------------------------------ facts only


def test_facts_refuse_what_drafts_cannot_represent():
  """Gemma-2 soft-caps its logits: refused by name (the train step and stored lse use plain logits)."""
  import transformers

  cfg = transformers.Gemma2Config(**COMMON, head_dim=16, query_pre_attn_scalar=16)
  model = transformers.Gemma2ForCausalLM(cfg).eval()
  with pytest.raises(facts.UnsupportedTarget, match="final_logit_softcapping=30.0"):
    TargetModel(model, make_tokenizer(True), name="gemma2")
  cfg.final_logit_softcapping = None
  info = TargetModel(transformers.Gemma2ForCausalLM(cfg).eval(), make_tokenizer(True), name="gemma2").info
  assert (info.norm_weight_offset, info.embed_scale, info.hidden_act) == (1.0, math.sqrt(H), "gelu_pytorch_tanh")
  assert info.sliding_window == 4096 and info.layer_types[:2] == ("sliding_attention", "full_attention")
  # no RoPE record -> an error naming it, never theta = 10000
  with pytest.raises(facts.UnsupportedTarget, match="rope_parameters"):
    facts.rope_facts(type("Cfg", (), {"rope_parameters": None})(), "x")


def test_reply_text_drops_markup_tokens_not_marked_special(tmp_path):
  """A base model (no chat template) whose tokenizer does not mark ``<end_of_turn>`` special: generated
  control tokens stay in ``token_ids`` (the training data) but never in the reply text."""
  target = TargetModel(build_model("llama"), make_tokenizer(False), name="base")
  markup = target.tokenizer.convert_tokens_to_ids(MARKUP)
  calls = [0]

  def force_markup_first(module, args, out):   # the prefill step emits <end_of_turn>, later steps are the model's
    calls[0] += 1
    if calls[0] == 1:
      out = out.clone()
      out[..., markup] += 1e4
    return out

  hook = target.model.get_output_embeddings().register_forward_hook(force_markup_first)
  try:
    gen = target.generate(["the cat sat"], max_new_tokens=6)[0]
  finally:
    hook.remove()
  assert gen.token_ids[0] == markup
  leaked = target.tokenizer.decode(gen.token_ids, skip_special_tokens=True)
  assert MARKUP in leaked                                     # what the plain decode showed
  assert MARKUP not in gen.text
  assert gen.text == target.tokenizer.decode([t for t in gen.token_ids if t != markup], skip_special_tokens=True)
  assert markup in target.control_token_ids and target.tokenizer.convert_tokens_to_ids("cat") not in \
      target.control_token_ids


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pipeline(request, tmp_path_factory):
  """generate -> precompute for one family (shared by the family's assertions)."""
  family = request.param
  root = tmp_path_factory.mktemp(family)
  target = save_target(family, root / "target")
  prompts = [generate.Prompt(f"p{i}", t) for i, t in enumerate(PROMPTS)]
  summary = generate.generate_replies(target, prompts, root / "replies.jsonl", max_new_tokens=20, batch_size=4,
                                      progress=False)
  assert summary["complete"]
  manifest = precompute.precompute(target, root / "replies.jsonl", root / "data", max_length=64, shard_size=8,
                                   progress=False)
  return family, root, target, manifest


def test_facts_recorded_in_manifest(pipeline):
  family, root, target, manifest = pipeline
  info = target.info
  _, _, _, chat, dtype, want = FAMILIES[family]
  for k, v in want.items():
    assert getattr(info, k) == pytest.approx(v) if isinstance(v, float) else getattr(info, k) == v, (k, family)
  assert info.model_type == target.model.config.model_type and info.dtype == dtype
  assert info.chat_template == chat and info.bos_token_id == 2
  assert info.eos_token_ids == ((3, 5) if family == "gemma" else (3,))
  assert info.rope_type == "default" and info.rope_parameters
  assert manifest["target"] == json.loads(json.dumps(info.to_dict()))
  assert shards.target_info(manifest) == info


def test_head_file_in_checkpoint_dtype_and_conventions(pipeline):
  family, root, target, manifest = pipeline
  path = root / "data" / shards.TARGET_WEIGHTS_FILE
  with safe_open(str(path), "np") as f:
    stored = {k: f.get_slice(k).get_dtype() for k in f.keys()}
  want = {"float32": "F32", "bfloat16": "BF16"}[target.info.dtype]
  assert stored["embed_tokens.weight"] == want and stored["lm_head.weight"] == want and stored["norm.weight"] == "F32"
  w = shards.load_target_weights(root / "data")
  m = target.model
  np.testing.assert_array_equal(w["embed_tokens"], m.get_input_embeddings().weight.detach().float().numpy())
  np.testing.assert_array_equal(w["lm_head"], m.get_output_embeddings().weight.detach().float().numpy())
  # the final norm as a multiplier: for a (1 + w) family, 1 + w; the norm module is the oracle
  x = torch.randn(3, H)
  with torch.no_grad():
    y = m.get_decoder().norm(x).numpy()
  eps = target.info.rms_norm_eps
  xh = x.numpy() / np.sqrt((x.numpy() ** 2).mean(-1, keepdims=True) + eps)
  np.testing.assert_allclose(xh * w["norm"], y, rtol=1e-4, atol=1e-5)


def test_decode_equals_transformers_generate(pipeline):
  """lkjax's decoder (preallocated cache, sliding layers included) gives transformers' greedy output, with
  sequences longer than the sliding windows (8) of Mistral and Gemma-3."""
  family, root, target, manifest = pipeline
  for text in PROMPTS[:3]:
    prompt = target.encode_prompt(text)
    with torch.no_grad():
      ref = target.model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=20,
                                  attention_mask=torch.ones(1, len(prompt), dtype=torch.long))[0, len(prompt):]
    ref = ref.tolist()
    stop = next((i for i, t in enumerate(ref) if t in target.stop_token_ids), None)
    gen = target.generate([text], max_new_tokens=20)[0]
    assert gen.token_ids == (ref if stop is None else ref[:stop]), family
    assert gen.finished == (stop is not None) and gen.stop_token_id == (None if stop is None else ref[stop])
    assert len(prompt) + len(ref) > 8


def test_stored_states_and_lse_match_transformers(pipeline):
  family, root, target, manifest = pipeline
  lines = generate.read_replies(root / "replies.jsonl")[0]    # shard records follow the file's line order
  assert manifest["num_records"] == len(PROMPTS) and manifest["target_lse"]
  recs = [r for s in manifest["shards"] for r in shards.read_shard(root / "data" / s["file"])]
  aux_ids = target.info.aux_layer_ids
  assert len(recs) == len(lines)
  for rec, line in zip(recs, lines):
    prompt_ids = target.encode_prompt(line["prompt"])
    tail = line["reply_ids"] + ([line.get("stop_token_id", 3)] if line["finished"] else [])
    assert rec["input_ids"].tolist() == prompt_ids + tail
    hs, final, logits = transformers_states(target.model, rec["input_ids"])
    aux = torch.cat([hs[i] for i in aux_ids], -1)[0].numpy()
    np.testing.assert_allclose(rec["aux_hidden"].astype(np.float32), aux, rtol=1e-2, atol=1e-2 * np.abs(aux).max())
    np.testing.assert_allclose(rec["final_hidden"].astype(np.float32), final.numpy(), rtol=1e-2, atol=1e-2)
    lse = torch.logsumexp(logits.double(), -1).numpy()
    np.testing.assert_allclose(rec["target_lse"], lse, rtol=0, atol=2e-2)
    # the target's own greedy choices come back from the stored final state and the stored head
    head = shards.load_target_weights(root / "data")["lm_head"]
    got = (rec["final_hidden"].astype(np.float32) @ head.T).argmax(-1)
    agree = (got == logits.numpy().argmax(-1)).mean()
    assert agree >= 0.9, (family, agree)


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  """A persistent XLA cache for this module: every family's draft has the same shapes and static settings
  (`DRAFT`), so each architecture's train step compiles once for the whole matrix."""
  import jax

  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
          "jax_persistent_cache_min_entry_size_bytes")
  old = {k: getattr(jax.config, k) for k in keys}
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  yield
  for k, v in old.items():
    jax.config.update(k, v)
  from jax._src import compilation_cache   # drop the initialised cache so later modules do not write to it

  compilation_cache.reset_cache()


# Draft settings shared by every family (the EAGLE-3 layer's RoPE base and eps would otherwise follow the
# target's and make each family's step a new program); that the defaults DO follow the target is checked
# in `test_train_evaluate_export` without training.
DRAFT = {"eagle3": {"model.draft_vocab_size": 64, "model.rope_theta": 1e4, "model.rms_norm_eps": 1e-6},
         "medusa": {"model.draft_vocab_size": 0}, "mtp": {"model.draft_vocab_size": 0},
         "mlp_speculator": {"model.draft_vocab_size": 0}}


def _train(arch, data_dir, workdir):
  from absl import flags

  from lkjax.config_args import load_config
  from lkjax.train import loop

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  cfg = load_config(f"configs/{arch}.py:smoke", {
      "data.dir": str(data_dir), "data.max_length": 64, "data.val_fraction": 0.0, "data.auto_prepare": False,
      "batch_size": 2, "num_steps": 2, "model.num_heads": 2, "eval_every": 0, "log_every": 1,
      "checkpoint.every": 2, "precision": "fp32", "optim.warmup_steps": 1, "mesh.shape": (1, 1, 1),
      **DRAFT[arch]})
  summary = loop.train_and_evaluate(cfg, workdir)
  assert summary["status"] == "finished"
  return loop.load_trained_draft(workdir)


def test_train_evaluate_export(pipeline, compile_cache):
  """A few steps of each draft, speculative decoding at T = 0 equal to transformers' greedy output, export."""
  from lkjax import export
  from lkjax.eval.speculative import speculative_generate
  from lkjax.eval.verifier import Verifier

  family, root, target, manifest = pipeline
  info = target.info
  archs = ["eagle3", "medusa"] + (["mtp", "mlp_speculator"] if family in ALL_ARCHS else [])
  verifier = Verifier(target.model)
  prompt = target.encode_prompt(PROMPTS[0])
  with torch.no_grad():
    ref = target.model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=16,
                                attention_mask=torch.ones(1, len(prompt), dtype=torch.long))[0, len(prompt):]
  ref = ref.tolist()
  stop = next((i for i, t in enumerate(ref) if t in info.eos_token_ids), None)
  ref = ref if stop is None else ref[:stop + 1]
  weights = shards.load_target_weights(root / "data")
  from lkjax.models import registry

  default = registry.default_model_config("eagle3", info)
  assert (default.rope_theta, default.rms_norm_eps, default.head_dim) == (info.rope_theta, info.rms_norm_eps,
                                                                          info.head_dim)
  for arch in archs:
    trained = _train(arch, root / "data", root / f"run_{arch}")
    assert trained.target_info == info
    res = speculative_generate(verifier, trained.model, prompt, num_draft=2, temperature=0.0, max_new_tokens=16,
                               eos_token_id=info.eos_token_ids)
    assert res.tokens == ref, (family, arch)
    out = export.export_draft(trained.model, arch, root / f"export_{arch}", info)
    assert (out / "config.json").is_file()
    if arch == "eagle3":
      c = json.loads((out / "config.json").read_text())
      assert c["rope_theta"] == DRAFT["eagle3"]["model.rope_theta"] == c["rope_parameters"]["rope_theta"]
      assert c["target_hidden_size"] == H and c["vocab_size"] == V and c["draft_vocab_size"] == 64
      assert c["eagle_aux_hidden_state_layer_ids"] == list(info.aux_layer_ids)
      # the draft's embedding input is the raw embed_tokens rows (what vLLM feeds the draft), not scaled
      np.testing.assert_array_equal(np.asarray(trained.model.embed_tokens[...]), weights["embed_tokens"])
    if arch == "mtp":   # the head norm starts from the target's final-norm multiplier (1 + w for Gemma)
      from flax import nnx

      fresh = registry.build_draft(registry.default_model_config("mtp", info), info, target_weights=weights,
                                   rngs=nnx.Rngs(0))
      np.testing.assert_allclose(np.asarray(fresh.mtp[0].shared_head_norm.weight[...]), weights["norm"])
  verifier.close()


# ------------------------------------------------------------------------------------------ vocabulary scale

BIG_V, BIG_H, BIG_T, BIG_B = 262_144, 16, 64, 2


def _big_vocab_data(directory):
  """Random shards of a 256k-vocabulary target (hidden 16) with target lse, its head stored in bf16."""
  from lkjax.targets.info import TargetInfo

  rng = np.random.default_rng(0)
  bf16 = np.dtype(ml_dtypes.bfloat16)
  info = TargetInfo(name="big-vocab", model_type="gemma3_text", num_layers=8, hidden_size=BIG_H, vocab_size=BIG_V,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=8, intermediate_size=32,
                    rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=128, tie_word_embeddings=True,
                    dtype="bfloat16")
  emb = (0.5 * rng.standard_normal((BIG_V, BIG_H))).astype(np.float32)
  shards.save_target_weights(directory, embed_tokens=emb, lm_head=emb, norm=np.ones(BIG_H, np.float32),
                             dtype="bfloat16")
  head = torch.from_numpy(shards.load_target_weights(directory)["lm_head"])
  recs, freqs, tokens = [], np.zeros(BIG_V, np.int64), 0
  for _ in range(8):
    ids = rng.integers(0, BIG_V, BIG_T).astype(np.int32)
    final = rng.standard_normal((BIG_T, BIG_H)).astype(bf16)
    recs.append({"input_ids": ids, "loss_mask": np.ones(BIG_T, np.uint8),
                 "aux_hidden": rng.standard_normal((BIG_T, 3 * BIG_H)).astype(bf16), "final_hidden": final,
                 "target_lse": precompute.lse_from_stored(final, head)})
    np.add.at(freqs, ids, 1)
    tokens += BIG_T
  name = shards.SHARD_PATTERN.format(0)
  shards.write_shard(directory / name, [shards.encode_record(r) for r in recs])
  shards.write_manifest(directory, {
      "target": info.to_dict(), "max_length": BIG_T, "num_records": len(recs), "num_tokens": tokens,
      "num_loss_tokens": tokens, "shards": [{"file": name, "num_records": len(recs), "num_tokens": tokens}],
      "token_freqs": freqs.tolist(), "target_lse": True})
  return info


@pytest.fixture(scope="module")
def big_vocab(tmp_path_factory):
  d = tmp_path_factory.mktemp("big_vocab")
  return d, _big_vocab_data(d)


def test_big_vocab_head_file_is_bf16(big_vocab):
  d, info = big_vocab
  assert (d / shards.TARGET_WEIGHTS_FILE).stat().st_size < BIG_V * BIG_H * 2 * 2 * 1.01 + 4096   # two bf16 tables


FULL_VOCAB_XFAIL = pytest.mark.xfail(
    strict=True, reason="with a full 256k draft vocabulary the train step (lkjax/train/step.py) keeps several "
                        "[B, T, V] float32-sized temporaries; remove this mark when the step chunks them")


@pytest.mark.slow   # three compiles of a 256k-vocabulary step (about a minute each on 2 cores)
@pytest.mark.parametrize("arch,draft_vocab", [("eagle3", 32000),
                                              pytest.param("eagle3", 0, marks=FULL_VOCAB_XFAIL),
                                              pytest.param("medusa", 0, marks=FULL_VOCAB_XFAIL)])
def test_big_vocab_step_memory(big_vocab, tmp_path, monkeypatch, arch, draft_vocab):
  """The compiled train step on a 256k vocabulary (precomputed target lse): its temporaries must stay below
  one [B, T, V] float32 array, i.e. no full-vocabulary float32 logits are materialised."""
  from absl import flags

  from lkjax.config_args import load_config
  from lkjax.train import loop

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  d, info = big_vocab
  seen = {}
  real = loop._print_compile_report

  def record(compiled, *a, **k):
    seen["mem"] = compiled.memory_analysis()
    return real(compiled, *a, **k)

  monkeypatch.setattr(loop, "_print_compile_report", record)
  cfg = load_config(f"configs/{arch}.py:smoke", {
      "data.dir": str(d), "data.max_length": BIG_T, "data.val_fraction": 0.0, "data.auto_prepare": False,
      "batch_size": BIG_B, "num_steps": 1, "model.num_heads": 2, "model.draft_vocab_size": draft_vocab,
      "eval_every": 0, "log_every": 1, "checkpoint.every": 1, "precision": "bf16", "optim.warmup_steps": 1,
      "mesh.shape": (1, 1, 1)})
  loop.train_and_evaluate(cfg, tmp_path / "run")
  one_btv = BIG_B * BIG_T * BIG_V * 4
  temps = seen["mem"].temp_size_in_bytes
  print(f"\n{arch} Vd={draft_vocab or BIG_V}: temps {temps / 2**20:.1f} MiB; one [B, T, V] f32 = "
        f"{one_btv / 2**20:.1f} MiB")
  assert temps < one_btv, (arch, draft_vocab, temps)
