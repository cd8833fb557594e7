"""``experiments/export.py`` on a tiny trained EAGLE-3 run: the export holds the checkpoint's parameters."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from lkjax import export
from lkjax.config_args import load_config
from lkjax.data import shards
from lkjax.targets.info import TargetInfo
from lkjax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
H, V, N = 16, 64, 24
BF16 = np.dtype(ml_dtypes.bfloat16)
INFO = TargetInfo(name="tiny-target", model_type="llama", num_layers=8, hidden_size=H, vocab_size=V,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=8, intermediate_size=32,
                  rms_norm_eps=1e-5, rope_theta=1e4, max_position_embeddings=64, tie_word_embeddings=True)


def _make_data(directory) -> None:
  rng = np.random.default_rng(0)
  emb = rng.standard_normal((V, H)).astype(np.float32)
  recs, freqs, tokens = [], np.zeros(V, np.int64), 0
  for _ in range(N):
    n = int(rng.integers(10, 17))
    ids = rng.integers(0, V, n).astype(np.int32)
    mask = np.ones(n, np.uint8)
    recs.append({"input_ids": ids, "loss_mask": mask,
                 "aux_hidden": rng.standard_normal((n, 3 * H)).astype(BF16),
                 "final_hidden": rng.standard_normal((n, H)).astype(BF16)})
    np.add.at(freqs, ids, 1)
    tokens += n
  name = shards.SHARD_PATTERN.format(0)
  shards.write_shard(directory / name, [shards.encode_record(r) for r in recs])
  shards.write_manifest(directory, {
      "target": INFO.to_dict(), "max_length": 16, "num_records": N, "num_tokens": tokens,
      "num_loss_tokens": int(freqs.sum()), "shards": [{"file": name, "num_records": N, "num_tokens": tokens}],
      "token_freqs": freqs.tolist()})
  shards.save_target_weights(directory, embed_tokens=emb, lm_head=emb, norm=np.ones(H, np.float32))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 2-step EAGLE-3 training run (draft vocabulary 32 of 64)."""
  base = tmp_path_factory.mktemp("cli")
  data = base / "data"
  data.mkdir()
  _make_data(data)
  cfg = load_config("configs/eagle3.py:smoke", {
      "data.dir": str(data), "data.max_length": 16, "data.val_fraction": 0.2, "data.auto_prepare": False,
      "batch_size": 8, "num_steps": 2, "model.num_heads": 2, "model.draft_vocab_size": 32, "eval_every": 100,
      "eval_steps": 1, "log_every": 1, "checkpoint.every": 2, "precision": "fp32", "optim.warmup_steps": 1})
  loop.train_and_evaluate(cfg, base / "run")
  return base / "run", data


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "export.py"), *args],
                        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def test_cli_exports_the_trained_draft_and_prints_serving_commands(run, tmp_path):
  workdir, data = run
  out = tmp_path / "eagle3"
  res = _cli(f"--workdir={workdir}", f"--out={out}", "--target_model=HuggingFaceTB/SmolLM2-135M-Instruct")
  assert res.returncode == 0, res.stderr[-3000:]
  assert "exported eagle3 draft (step 2" in res.stdout
  spec = {"method": "eagle3", "model": str(out), "num_speculative_tokens": 2}
  assert f"speculative_config={json.dumps(spec)}" in res.stdout
  assert "vllm serve HuggingFaceTB/SmolLM2-135M-Instruct --speculative-config" in res.stdout
  assert "--speculative-algorithm EAGLE3" in res.stdout
  config = json.loads((out / "config.json").read_text())
  assert config["draft_vocab_size"] == 32 and config["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5]

  # The exported weights are the checkpoint's: import them back and compare with the trainer's reload.
  trained = loop.load_trained_draft(workdir)
  emb = shards.load_target_weights(data)["embed_tokens"]
  back, info = export.import_eagle3(out, target_embed=emb)
  assert info == trained.target_info
  a = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(trained.model)))
  b = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(back)))
  jax.tree.map(np.testing.assert_array_equal, a, b)

  # --checkpoint points at one step; an existing --out needs --overwrite.
  res = _cli(f"--checkpoint={workdir / 'checkpoints' / '2'}", f"--out={out}")
  assert res.returncode != 0 and "already exists" in res.stderr
  res = _cli(f"--checkpoint={workdir / 'checkpoints' / '2'}", f"--out={out}", "--overwrite")
  assert res.returncode == 0, res.stderr[-3000:]


def test_cli_rejects_bad_flags(tmp_path):
  res = _cli(f"--out={tmp_path / 'x'}")
  assert res.returncode != 0 and "exactly one of --workdir and --checkpoint" in res.stderr
  res = _cli(f"--workdir={tmp_path}", f"--out={tmp_path / 'x'}")
  assert res.returncode != 0 and "holds no checkpoint yet" in res.stderr
  (tmp_path / "checkpoints" / "1").mkdir(parents=True)
  res = _cli(f"--workdir={tmp_path}", f"--out={tmp_path / 'x'}")
  assert res.returncode != 0 and "as the --config flag" in res.stderr and "Traceback" not in res.stderr


def test_serving_commands_for_every_format(tmp_path):
  for arch, method in (("medusa", "medusa"), ("mlp_speculator", "mlp_speculator")):
    cmds = export.serving_commands(arch, tmp_path, "meta-llama/Llama-3.1-8B-Instruct", 6)
    assert f'"method": "{method}"' in cmds["vllm_serve"] and "sglang" not in cmds
    assert "vLLM 0.32" in cmds["note"]
  assert "note" not in export.serving_commands("eagle3", tmp_path, "t", 7)
  assert "no MTP serving path" in export.serving_commands("mtp", tmp_path, "t", 7)["note"]
  with pytest.raises(ValueError, match="arch="):
    export.serving_commands("eagle", tmp_path, "t", 7)
  with pytest.raises(ValueError, match="arch="):
    export.export_draft(None, "eagle", tmp_path / "x", INFO)
