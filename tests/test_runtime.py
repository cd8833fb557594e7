"""lkjax.runtime: the entry scripts' restart with huge-page malloc, and what it buys (fewer page faults)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lkjax import runtime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_REEXEC = """
import json, os, sys
sys.path.insert(0, {repo!r})
from lkjax import runtime
print("start", os.getpid(), flush=True)
runtime.reexec_with_hugepage_malloc()
print(json.dumps(dict(pid=os.getpid(), argv=sys.argv[1:], tunables=os.environ.get("GLIBC_TUNABLES", ""),
                      active=runtime.hugepage_malloc_active())))
"""

# A jitted function whose temporary buffer (~256 MB) is far above glibc's mmap threshold; the second call's
# minor page faults show whether that buffer is faulted in 4 KiB or 2 MiB at a time.
_FAULTS = """
import resource, jax, jax.numpy as jnp
x = jnp.ones((4096, 4096), jnp.float32)
f = jax.jit(lambda a: jnp.sum(jnp.exp(a) * jnp.sin(a) + jnp.cos(a) * a, axis=0) + jnp.sum(jnp.tanh(a) @ a, axis=0))
f(x).block_until_ready()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
f(x).block_until_ready()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
"""


def _python(code, env, *args):
  res = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-2000:]
  return res.stdout


def _clean_env(**extra):
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", runtime.OPT_OUT_ENV)}
  env.update(extra)
  return env


@pytest.mark.skipif(not runtime.hugepage_malloc_supported(), reason="needs glibc >= 2.35 and transparent huge pages on madvise")
def test_reexec_sets_the_tunable_once_keeps_argv_and_other_tunables():
  out = _python(_REEXEC.format(repo=REPO), _clean_env(GLIBC_TUNABLES="glibc.malloc.arena_max=4"), "--x=1", "y")
  lines = out.strip().splitlines()
  assert [line.split()[0] for line in lines[:2]] == ["start", "start"]   # restarted exactly once
  info = json.loads(lines[-1])
  assert info["active"] and info["argv"] == ["--x=1", "y"]
  assert info["tunables"] == "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1"


def test_opt_out_and_already_active_do_not_restart():
  for env in (_clean_env(**{runtime.OPT_OUT_ENV: "1"}), _clean_env(GLIBC_TUNABLES="glibc.malloc.hugetlb=1")):
    lines = _python(_REEXEC.format(repo=REPO), env).strip().splitlines()
    assert [line.split()[0] for line in lines].count("start") == 1


def test_thp_mode_parsing(tmp_path):
  p = tmp_path / "enabled"
  p.write_text("always [madvise] never\n")
  assert runtime._thp_mode(str(p)) == "madvise"
  p.write_text("[always] madvise never\n")
  assert runtime._thp_mode(str(p)) == "always"
  assert runtime._thp_mode(str(tmp_path / "missing")) is None


@pytest.mark.skipif(not runtime.hugepage_malloc_supported(), reason="needs glibc >= 2.35 and transparent huge pages on madvise")
def test_hugepage_malloc_cuts_page_faults_of_xla_temp_buffers():
  off = int(_python(_FAULTS, _clean_env(**{runtime.OPT_OUT_ENV: "1"})).strip())
  on = int(_python(_FAULTS, _clean_env(GLIBC_TUNABLES="glibc.malloc.hugetlb=1")).strip())
  assert off > 20_000, off          # the ~256 MB buffers faulted in 4 KiB pages
  assert on < off / 5, (on, off)
