"""benchmarks/malloc.py: the opt-in restart with glibc malloc tunables (retained heap, huge pages) or jemalloc,
what it buys (fewer page faults), and benchmarks/launch.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import malloc as runtime

HERE = os.path.dirname(os.path.abspath(__file__))

_REEXEC = """
import json, os, sys
sys.path.insert(0, {repo!r})
import malloc as runtime
print("start", os.getpid(), flush=True)
runtime.reexec_with_malloc_tunables()
print(json.dumps(dict(pid=os.getpid(), argv=sys.argv[1:], tunables=os.environ.get("GLIBC_TUNABLES", ""),
                      added=os.environ.get(runtime.ADDED_ENV, ""),
                      hugepages=runtime.hugepage_malloc_active(), retained=runtime.retained_heap_active(),
                      preload=os.environ.get("LD_PRELOAD", ""), conf=os.environ.get("MALLOC_CONF", ""),
                      preload_added=os.environ.get(runtime.PRELOAD_ADDED_ENV, ""),
                      jemalloc=runtime.jemalloc_active())))
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
  """This environment without any malloc setting, opted in (``LKJAX_MALLOC_TUNING=1``) unless ``extra`` says."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", runtime.OPT_IN_ENV, runtime.ADDED_ENV, "XLA_FLAGS", "JAX_NUM_CPU_DEVICES",
                      "LD_PRELOAD", "MALLOC_CONF", runtime.PRELOAD_ADDED_ENV, runtime.JEMALLOC_ENV)}
  env[runtime.OPT_IN_ENV] = "1"
  env.update(extra)
  return env


@pytest.mark.skipif(not runtime.retained_heap_supported({}), reason="needs Linux with glibc >= 2.26")
def test_reexec_adds_the_tunables_once_keeps_argv_and_other_tunables():
  out = _python(_REEXEC.format(repo=HERE), _clean_env(GLIBC_TUNABLES="glibc.rtld.optional_static_tls=512"), "--x=1", "y")
  lines = out.strip().splitlines()
  assert [line.split()[0] for line in lines[:2]] == ["start", "start"]   # restarted exactly once
  assert len(lines) == 3
  info = json.loads(lines[-1])
  assert info["argv"] == ["--x=1", "y"] and info["retained"]
  assert info["hugepages"] == runtime.hugepage_malloc_supported()
  want = ":".join(f"{k}={v}" for k, v in runtime.wanted_tunables({}).items())
  assert info["tunables"] == "glibc.rtld.optional_static_tls=512:" + want


@pytest.mark.skipif(not runtime.retained_heap_supported({}), reason="needs Linux with glibc >= 2.26")
def test_a_users_own_malloc_tunable_wins():
  out = _python(_REEXEC.format(repo=HERE), _clean_env(GLIBC_TUNABLES="glibc.malloc.arena_max=4"))
  info = json.loads(out.strip().splitlines()[-1])
  assert info["tunables"].startswith("glibc.malloc.arena_max=4:") and info["tunables"].count("arena_max") == 1
  assert not info["retained"]      # arena_max=4 is not the retained heap's value
  assert "glibc.malloc.mmap_max=0" in info["tunables"]


def test_not_opted_in_and_already_set_do_not_restart():
  every = ":".join(f"{k}={v}" for k, v in dict(runtime.RETAIN_TUNABLES, **{runtime.HUGETLB_TUNABLE: "1"}).items())
  for env in (_clean_env(**{runtime.OPT_IN_ENV: ""}), _clean_env(GLIBC_TUNABLES=every)):
    lines = _python(_REEXEC.format(repo=HERE), env).strip().splitlines()
    assert [line.split()[0] for line in lines].count("start") == 1
  info = json.loads(lines[-1])
  assert info["retained"] and info["hugepages"]


@pytest.mark.skipif(not runtime.retained_heap_supported({}), reason="needs Linux with glibc >= 2.26")
def test_several_cpu_devices_get_no_retained_heap():
  out = _python(_REEXEC.format(repo=HERE), _clean_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"))
  info = json.loads(out.strip().splitlines()[-1])
  assert not info["retained"] and "arena_max" not in info["tunables"]
  assert info["hugepages"] == runtime.hugepage_malloc_supported()


@pytest.mark.skipif(not runtime.retained_heap_supported({}), reason="needs Linux with glibc >= 2.26")
def test_added_tunables_are_decided_again_in_a_child():
  """A single-device parent restarted with the retained heap; its children inherit GLIBC_TUNABLES. One with
  8 CPU devices drops the retained heap, an opted-out one drops everything added; the user's own tunable
  stays in both, and a child like the parent does not restart."""
  user = "glibc.rtld.optional_static_tls=512"
  parent = json.loads(_python(_REEXEC.format(repo=HERE), _clean_env(GLIBC_TUNABLES=user)).strip().splitlines()[-1])
  assert parent["retained"] and set(parent["added"].split(",")) == set(runtime.wanted_tunables({}))
  inherited = {"GLIBC_TUNABLES": parent["tunables"], runtime.ADDED_ENV: parent["added"]}
  huge = ":glibc.malloc.hugetlb=1" if runtime.hugepage_malloc_supported() else ""
  for extra, want in (({"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}, user + huge),
                      ({runtime.OPT_IN_ENV: ""}, user)):
    lines = _python(_REEXEC.format(repo=HERE), _clean_env(**inherited, **extra)).strip().splitlines()
    assert [line.split()[0] for line in lines].count("start") == 2, lines
    child = json.loads(lines[-1])
    assert child["tunables"] == want and not child["retained"]
  lines = _python(_REEXEC.format(repo=HERE), _clean_env(**inherited)).strip().splitlines()
  assert [line.split()[0] for line in lines].count("start") == 1
  assert json.loads(lines[-1])["tunables"] == parent["tunables"]


def test_find_jemalloc_honours_the_override(tmp_path):
  lib = tmp_path / "libjemalloc.so.2"
  lib.write_bytes(b"")
  assert runtime.find_jemalloc({runtime.JEMALLOC_ENV: str(lib)}) == str(lib)
  assert runtime.find_jemalloc({runtime.JEMALLOC_ENV: ""}) is None
  assert runtime.find_jemalloc({runtime.JEMALLOC_ENV: str(tmp_path / "missing.so")}) is None
  eight = {runtime.JEMALLOC_ENV: str(lib), "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  assert runtime.wanted_preload(eight) == (str(lib) if sys.platform.startswith("linux") else None)
  assert runtime.wanted_preload({runtime.JEMALLOC_ENV: str(lib)}) is None     # one device: glibc's heap


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")
def test_planned_malloc_says_what_a_child_will_run_with(tmp_path):
  lib = tmp_path / "libjemalloc.so.2"
  lib.write_bytes(b"")
  eight = {runtime.JEMALLOC_ENV: str(lib), "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           runtime.OPT_IN_ENV: "1"}
  assert runtime.planned_malloc(eight) == dict(retained_heap=False, jemalloc=True)
  assert runtime.planned_malloc({**eight, runtime.OPT_IN_ENV: ""}) == dict(retained_heap=False, jemalloc=False)
  one = {runtime.JEMALLOC_ENV: str(lib), runtime.OPT_IN_ENV: "1"}
  assert runtime.planned_malloc(one) == dict(retained_heap=runtime.retained_heap_supported(one), jemalloc=False)
  # The user's own jemalloc preload stays whatever the device count; the one lkjax added is decided again.
  assert runtime.planned_malloc({**one, "LD_PRELOAD": "/opt/libjemalloc.so.2"})["jemalloc"]
  assert not runtime.planned_malloc({**one, "LD_PRELOAD": str(lib), runtime.PRELOAD_ADDED_ENV: str(lib)})["jemalloc"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")
def test_several_cpu_devices_preload_jemalloc_and_a_single_device_child_drops_it(tmp_path):
  """The preload's bookkeeping, with a stand-in file (the loader warns about it and goes on): an 8-device
  process restarts once with it first in LD_PRELOAD and MALLOC_CONF set; a single-device child of it
  drops both and keeps the user's own preload; a user's own MALLOC_CONF is kept."""
  lib = str(tmp_path / "libjemalloc.so.2")
  open(lib, "wb").close()
  user_lib = str(tmp_path / "libuser.so")
  open(user_lib, "wb").close()
  eight = dict(XLA_FLAGS="--xla_force_host_platform_device_count=8", LD_PRELOAD=user_lib)
  eight[runtime.JEMALLOC_ENV] = lib
  lines = _python(_REEXEC.format(repo=HERE), _clean_env(**eight)).strip().splitlines()
  assert [line.split()[0] for line in lines].count("start") == 2
  parent = json.loads(lines[-1])
  assert parent["preload"] == f"{lib} {user_lib}" and parent["preload_added"] == lib
  assert parent["conf"] == runtime.JEMALLOC_CONF
  inherited = {k: v for k, v in eight.items() if k != "XLA_FLAGS"}
  inherited.update({"LD_PRELOAD": parent["preload"], "MALLOC_CONF": parent["conf"],
                    runtime.PRELOAD_ADDED_ENV: parent["preload_added"], "GLIBC_TUNABLES": parent["tunables"],
                    runtime.ADDED_ENV: parent["added"]})
  lines = _python(_REEXEC.format(repo=HERE), _clean_env(**inherited)).strip().splitlines()
  assert [line.split()[0] for line in lines].count("start") == 2
  child = json.loads(lines[-1])
  assert child["preload"] == user_lib and child["conf"] == "" and child["preload_added"] == ""
  own = json.loads(_python(_REEXEC.format(repo=HERE), _clean_env(**eight, MALLOC_CONF="narenas:2")).strip()
                   .splitlines()[-1])
  assert own["conf"] == "narenas:2" and own["preload"].startswith(lib)
  opted = _python(_REEXEC.format(repo=HERE), _clean_env(**eight, **{runtime.OPT_IN_ENV: ""})).strip().splitlines()
  assert [line.split()[0] for line in opted].count("start") == 1 and json.loads(opted[-1])["preload"] == user_lib


@pytest.mark.skipif(runtime.find_jemalloc({}) is None or not sys.platform.startswith("linux"),
                    reason="needs libjemalloc2 installed")
def test_an_8_device_process_runs_on_jemalloc():
  out = _python(_REEXEC.format(repo=HERE), _clean_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"))
  info = json.loads(out.strip().splitlines()[-1])
  assert info["jemalloc"] and info["conf"] == runtime.JEMALLOC_CONF and not info["retained"]
  single = json.loads(_python(_REEXEC.format(repo=HERE), _clean_env()).strip().splitlines()[-1])
  assert not single["jemalloc"] and single["retained"]


# malloc's 256 MiB, touched; the minor page faults show whether it came in 4 KiB or 2 MiB pages.
_BLOCK_FAULTS = """
import ctypes, resource, sys
sys.path.insert(0, {repo!r})
import malloc as runtime
runtime.reexec_with_malloc_tunables()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
n = 1 << 28
p = libc.malloc(ctypes.c_size_t(n))
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
ctypes.memset(p, 1, n)
print(runtime.jemalloc_active(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
"""


@pytest.mark.skipif(runtime.find_jemalloc({}) is None or runtime._thp_mode() != "madvise",
                    reason="needs libjemalloc2 and transparent huge pages on madvise")
def test_an_8_device_process_gets_huge_pages_from_jemalloc():
  """JEMALLOC_CONF's thp:always: a 256 MiB block is faulted in 2 MiB at a time (about 130 faults on these
  machines), where jemalloc's default takes 65,537. The bound allows for half the block on 4 KiB pages (a
  kernel short of free huge pages); the control stays above it."""
  eight = _clean_env(XLA_FLAGS="--xla_force_host_platform_device_count=8")
  jem, faults = _python(_BLOCK_FAULTS.format(repo=HERE), eight).split()
  assert jem == "True" and int(faults) < 32768, faults
  plain = _clean_env(XLA_FLAGS="--xla_force_host_platform_device_count=8", MALLOC_CONF="narenas:1")
  jem, faults = _python(_BLOCK_FAULTS.format(repo=HERE), plain).split()
  assert jem == "True" and int(faults) > 60000, faults   # the control: without the advice, 4 KiB pages


def test_strip_malloc_tunables():
  text = "glibc.malloc.arena_max=1:glibc.rtld.optional_static_tls=512:glibc.malloc.hugetlb=1"
  assert runtime.strip_malloc_tunables(text) == "glibc.rtld.optional_static_tls=512"
  assert runtime.strip_malloc_tunables(text, ["glibc.malloc.hugetlb"]) == text.rsplit(":", 1)[0]
  assert runtime.strip_malloc_tunables("") == ""


def test_cpu_devices_requested():
  assert runtime.cpu_devices_requested({}) == 1
  assert runtime.cpu_devices_requested({"XLA_FLAGS": "--xla_cpu_foo=1 --xla_force_host_platform_device_count=8"}) == 8
  assert runtime.cpu_devices_requested({"JAX_NUM_CPU_DEVICES": "4"}) == 4
  assert not runtime.retained_heap_supported({"JAX_NUM_CPU_DEVICES": "4"})


def test_tunables_parsing():
  assert runtime._tunables("a.b=1:c.d=x::e") == {"a.b": "1", "c.d": "x", "e": ""}
  assert runtime._tunables("") == {}


def test_thp_mode_parsing(tmp_path):
  p = tmp_path / "enabled"
  p.write_text("always [madvise] never\n")
  assert runtime._thp_mode(str(p)) == "madvise"
  p.write_text("[always] madvise never\n")
  assert runtime._thp_mode(str(p)) == "always"
  assert runtime._thp_mode(str(tmp_path / "missing")) is None


@pytest.mark.skipif(not runtime.hugepage_malloc_supported(), reason="needs glibc >= 2.35 and transparent huge pages on madvise")
def test_hugepage_malloc_and_retained_heap_cut_page_faults_of_xla_temp_buffers():
  off = int(_python(_FAULTS, _clean_env(**{runtime.OPT_IN_ENV: ""})).strip())
  huge = int(_python(_FAULTS, _clean_env(GLIBC_TUNABLES="glibc.malloc.hugetlb=1")).strip())
  retained = int(_python(_FAULTS, _clean_env(GLIBC_TUNABLES=":".join(f"{k}={v}" for k, v in runtime.RETAIN_TUNABLES))).strip())
  assert off > 20_000, off          # the ~256 MB buffers faulted in 4 KiB pages
  assert huge < off / 5, (huge, off)
  assert retained < off / 50, (retained, off)   # the freed buffers stay mapped for the second call


def test_not_opted_in_changes_nothing_and_drops_what_was_added():
  """The default (no LKJAX_MALLOC_TUNING): no restart; inherited tunables it had added are dropped."""
  for off in ("", "0"):
    lines = _python(_REEXEC.format(repo=HERE), _clean_env(**{runtime.OPT_IN_ENV: off})).strip().splitlines()
    assert [line.split()[0] for line in lines].count("start") == 1
    assert json.loads(lines[-1])["tunables"] == ""
  assert not runtime.opted_in({}) and runtime.opted_in({runtime.OPT_IN_ENV: "1"})


@pytest.mark.skipif(not runtime.retained_heap_supported({}), reason="needs Linux with glibc >= 2.26")
def test_launch_runs_the_command_with_the_tunables():
  env = {k: v for k, v in _clean_env().items() if k != runtime.OPT_IN_ENV}
  res = subprocess.run([sys.executable, os.path.join(HERE, "launch.py"), "-c", _REEXEC.format(repo=HERE), "a"],
                       env=env, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-2000:]
  lines = res.stdout.strip().splitlines()
  assert [line.split()[0] for line in lines].count("start") == 1     # launch.py restarted into it once
  info = json.loads(lines[-1])
  assert info["argv"] == ["a"] and info["retained"]
