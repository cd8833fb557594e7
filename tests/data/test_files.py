"""lkjax.files: the one atomic JSON writer and the commit results files record."""
from __future__ import annotations

import json
import math
import re
import subprocess

import numpy as np
import pytest

from lkjax import files


def test_write_json_converts_numpy_creates_parents_and_ends_with_a_newline(tmp_path):
  path = tmp_path / "a" / "b.json"
  files.write_json(path, {"x": np.arange(3), "y": np.float32(0.5), "p": tmp_path}, indent=1)
  text = path.read_text()
  assert text.endswith("\n") and json.loads(text) == {"x": [0, 1, 2], "y": 0.5, "p": str(tmp_path)}
  assert [p.name for p in path.parent.iterdir()] == ["b.json"]          # no temporary file left


def test_write_json_failure_keeps_the_old_file(tmp_path):
  path = tmp_path / "r.json"
  files.write_json(path, {"ok": 1})
  with pytest.raises(TypeError, match="object is not JSON-serialisable"):
    files.write_json(path, {"bad": object()})
  with pytest.raises(ValueError):
    files.write_json(path, {"nan": math.nan}, allow_nan=False)
  assert json.loads(path.read_text()) == {"ok": 1} and len(list(tmp_path.iterdir())) == 1


def test_git_commit_of_this_checkout_and_outside_one(tmp_path):
  head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                        cwd=files.__file__.rsplit("/", 2)[0]).stdout.strip()
  got = files.git_commit()
  assert re.fullmatch(r"[0-9a-f]{7,}(\+dirty)?", got) and got.split("+")[0] == head
  assert files.git_commit(tmp_path) == "unknown"
