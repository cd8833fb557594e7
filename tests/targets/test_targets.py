"""TargetModel on a tiny random Llama (no download): feature capture, prompt/mask convention, generation, export."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lkjax.data import shards
from lkjax.targets.hf import TargetModel, select_features

torch.set_num_threads(1)

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
WORDS = ("the a cat dog sat on mat and ran fast slow big small red blue green house tree sky sun moon star "
         "what is why how who when where write code python list sort reverse number one two three four five "
         "hello world yes no please thanks story about tell me").split()
SPECIALS = ["<unk>", "<pad>", "<s>", "<|im_end|>", "<|im_start|>", "user", "assistant", "system"]


def make_tokenizer(chat_template: bool = True):
  """Word-level tokenizer (whitespace split) over `WORDS` with ChatML specials; optional chat template."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                 eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
  if chat_template:
    fast.chat_template = CHATML
  return fast


def make_model(num_layers: int = 8, vocab_size: int = 64, seed: int = 0):
  from transformers import LlamaConfig, LlamaForCausalLM

  cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    tie_word_embeddings=True, bos_token_id=2, eos_token_id=3, pad_token_id=1)
  torch.manual_seed(seed)
  model = LlamaForCausalLM(cfg)
  with torch.no_grad():  # random init leaves norm weights at exactly 1: perturb so the norm matters
    for p in model.parameters():
      p.add_(0.02 * torch.randn_like(p))
  return model.eval()


def make_target(chat_template: bool = True, num_layers: int = 8, seed: int = 0) -> TargetModel:
  return TargetModel(make_model(num_layers, seed=seed), make_tokenizer(chat_template), name="tiny")


@pytest.fixture(scope="module")
def target():
  return make_target()


def _manual_states(model, ids):
  """Inputs of every decoder layer and the final norm output, captured with forward hooks (independent of
  output_hidden_states)."""
  inputs, last_out = [], []
  hooks = [layer.register_forward_pre_hook(lambda m, args, kwargs: inputs.append(
      (args[0] if args else kwargs["hidden_states"]).clone()), with_kwargs=True) for layer in model.model.layers]
  hooks.append(model.model.layers[-1].register_forward_hook(
      lambda m, a, out: last_out.append((out[0] if isinstance(out, tuple) else out).clone())))
  with torch.no_grad():
    model(torch.as_tensor(ids))
  for h in hooks:
    h.remove()
  return inputs, last_out[0], model.model.norm(last_out[0])


def test_info_sizes_and_aux_ids(target):
  info = target.info
  assert (info.num_layers, info.hidden_size, info.vocab_size) == (8, 32, 64)
  assert info.aux_layer_ids == (2, 4, 5)
  assert info.tie_word_embeddings and info.head_dim == 8 and info.num_key_value_heads == 2
  assert len(info.weights_sha256) == 64


def test_features_equal_hooked_layer_inputs_and_post_norm(target):
  ids = np.random.default_rng(0).integers(8, 64, size=(2, 11))
  feats = target.features(ids, return_logits=True)
  inputs, raw_last, final = _manual_states(target.model, ids)
  want_aux = torch.cat([inputs[i] for i in (2, 4, 5)], dim=-1)
  torch.testing.assert_close(feats.aux_hidden, want_aux, rtol=0, atol=0)
  torch.testing.assert_close(feats.final_hidden, final, rtol=1e-6, atol=1e-6)
  # transformers' own output_hidden_states at the stated ids
  with torch.no_grad():
    hs = target.model(torch.as_tensor(ids), output_hidden_states=True).hidden_states
  for k, i in enumerate((2, 4, 5)):
    torch.testing.assert_close(feats.aux_hidden[..., 32 * k:32 * (k + 1)], hs[i], rtol=0, atol=0)
  # the final hidden is post-norm: the raw last-layer output differs from it
  assert (feats.final_hidden - raw_last).abs().max() > 0.1
  with torch.no_grad():
    logits = target.model(torch.as_tensor(ids)).logits
  torch.testing.assert_close(feats.logits, logits, rtol=1e-5, atol=1e-5)
  torch.testing.assert_close(feats.logits, final @ target.model.model.embed_tokens.weight.T, rtol=1e-5, atol=1e-5)


def test_select_features_order_and_range():
  hs = [torch.full((1, 2, 3), float(i)) for i in range(7)]  # 6 layers
  out = select_features(hs, (4, 2, 5))
  assert out[0, 0].tolist() == [2.0] * 3 + [4.0] * 3 + [5.0] * 3
  with pytest.raises(ValueError, match="out of range"):
    select_features(hs, (2, 6))


@pytest.mark.parametrize("side", ["right", "left"])
def test_features_padding_invariant(target, side):
  rng = np.random.default_rng(1)
  a, b = rng.integers(8, 64, size=9), rng.integers(8, 64, size=5)
  ids = np.full((2, 9), 1)
  attn = np.zeros((2, 9), dtype=np.int64)
  ids[0], attn[0] = a, 1
  sl = slice(0, 5) if side == "right" else slice(4, 9)
  ids[1, sl], attn[1, sl] = b, 1
  batched = target.features(ids, attn)
  alone = target.features(b[None])
  torch.testing.assert_close(batched.aux_hidden[1, sl], alone.aux_hidden[0], rtol=1e-5, atol=1e-5)
  torch.testing.assert_close(batched.final_hidden[1, sl], alone.final_hidden[0], rtol=1e-5, atol=1e-5)


def test_loss_mask_covers_exactly_the_reply_with_template(target):
  prompt, reply = "tell me a story about the cat", "the cat sat on the mat"
  ids, mask = target.encode_conversation(prompt, reply)
  tok = target.tokenizer
  msgs = [{"role": "user", "content": prompt}]
  # oracle: the template's own rendering of the finished conversation (its trailing newline has no token)
  full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": reply}], tokenize=True,
                                 return_dict=False)
  head = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)
  assert ids.dtype == np.int32 and mask.dtype == np.uint8
  assert ids.tolist() == list(full)
  assert mask.tolist() == [0] * len(head) + [1] * (len(full) - len(head))
  assert tok.decode(ids[mask == 1].tolist()) == reply + " <|im_end|>"
  # an unfinished reply (cut at max_new_tokens) gets no end-of-turn token
  ids2, mask2 = target.encode_conversation(prompt, reply, finished=False)
  assert ids2.tolist() == list(full)[:-1] and mask2.sum() == len(reply.split())


def test_plain_completion_without_template():
  t = make_target(chat_template=False)
  assert not t.has_chat_template
  assert t.format_prompt("the cat sat") == "the cat sat"
  assert t.format_prompt([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == "a\n\nb"
  ids, mask = t.encode_conversation("the cat", "sat on mat")
  vocab = t.tokenizer.get_vocab()
  assert ids[mask == 1].tolist() == [vocab[w] for w in ["sat", "on", "mat"]] + [vocab["<|im_end|>"]]
  assert ids[mask == 0].tolist() == [vocab["the"], vocab["cat"]]


def test_generate_left_padding_matches_single(target):
  prompts = ["tell me a story about the big red dog and the small cat", "hello"]
  batched = target.generate(prompts, max_new_tokens=6)
  for p, g in zip(prompts, batched):
    single = target.generate([p], max_new_tokens=6)[0]
    assert g.token_ids == single.token_ids
    assert g.text == target.tokenizer.decode(g.token_ids, skip_special_tokens=True)
    assert g.finished == (len(g.token_ids) < 6)
  # sampling is seeded
  s1 = target.generate(prompts, max_new_tokens=6, temperature=1.0, seed=3)
  s2 = target.generate(prompts, max_new_tokens=6, temperature=1.0, seed=3)
  assert [g.token_ids for g in s1] == [g.token_ids for g in s2]


def test_export_head_and_reload(target, tmp_path):
  path = target.export_head(tmp_path)
  assert path.name == shards.TARGET_WEIGHTS_FILE
  w = shards.load_target_weights(tmp_path)
  emb = target.model.model.embed_tokens.weight.detach().numpy()
  np.testing.assert_array_equal(w["embed_tokens"], emb)
  np.testing.assert_array_equal(w["lm_head"], emb)  # tied
  np.testing.assert_array_equal(w["norm"], target.model.model.norm.weight.detach().numpy())
  # save as an HF directory and load by path: same weights hash, same features
  target.model.save_pretrained(tmp_path / "hf")
  target.tokenizer.save_pretrained(tmp_path / "hf")
  again = TargetModel.load(tmp_path / "hf")
  assert again.info.weights_sha256 == target.info.weights_sha256
  assert again.info.name == str(tmp_path / "hf")
  ids = np.arange(8, 20)[None]
  torch.testing.assert_close(again.features(ids).aux_hidden, target.features(ids).aux_hidden)
  with pytest.raises(FileNotFoundError, match="config.json"):
    TargetModel.load(tmp_path / "nope")
