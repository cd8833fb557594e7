"""Opt-in malloc tuning for CPU benchmark processes: glibc tunables (or jemalloc) that keep XLA's large CPU
buffers resident.

Nothing in lkjax or experiments/ uses this module: the library runs on the default allocator. Turn it on for a
benchmark with ``python benchmarks/launch.py benchmarks/bench_train.py ...`` (any script works, e.g.
``experiments/train.py``) or ``LKJAX_MALLOC_TUNING=1`` in the environment of a bench script (they call
`reexec_with_malloc_tunables`, which does nothing without it). The measurements behind it are in
``benchmarks/README.md`` (bench_malloc) and in the ``bench-history`` git tag.

XLA's CPU runtime allocates each compiled step's temporary buffer with ``posix_memalign`` (about 1.2 GB
for the MEDUSA train step and 2 GB for EAGLE-3 at batch 4 x 512) and frees it when the step ends; YNNPACK
does the same with scratch blocks of up to 268 MB inside single fusions. glibc serves blocks that large
with a fresh ``mmap`` and returns them with ``munmap``, so every step faults the whole buffer in again,
4 KiB at a time: about 520,000 minor page faults and 2.2 s of kernel CPU time per EAGLE-3 step on the
2-core machines (`benchmarks/bench_malloc.py`).

Two sets of tunables address this; `reexec_with_malloc_tunables` sets both where they apply:

* **Retained heap** (``RETAIN_TUNABLES``; any glibc with tunables, >= 2.26): one malloc arena
  (``arena_max=1``), no ``mmap`` for large blocks (``mmap_max=0``) and no trimming of the heap's top
  (``trim_threshold`` = 64 TiB). Large blocks then come from the main heap, and a block freed at the end
  of a step is handed out again by the next one with its pages still mapped: no page faults and no kernel
  time in the steady state. (``arena_max=1`` is required: glibc's other arenas fall back to ``mmap``
  whatever ``mmap_max`` says.) The price is that the process never returns freed memory to the system,
  so its resident size stays at its peak. With the EAGLE-3 L_lambda and KL steps run alternately in
  one process it grew from 3.6 to 6.1 GB over two rounds and then stayed there.
  Only for processes with one CPU device: with 8 virtual CPU devices
  (``--xla_force_host_platform_device_count=8``) the single heap kept growing, 10.5 -> 15.5 GB over
  four EAGLE-3 steps, and an 8-device benchmark was killed for memory at 24 GB. Such
  processes get huge pages only.
* **Huge pages** (``glibc.malloc.hugetlb=1``; glibc >= 2.35 with transparent huge pages on ``madvise``):
  glibc advises the memory it maps onto 2 MiB pages, so what does get faulted in (the heap as it grows,
  or every step's buffer without the retained heap) comes 2 MiB at a time.

With several CPU devices the process instead preloads **jemalloc** (Debian/Ubuntu ``libjemalloc2``) when it is
installed, with ``MALLOC_CONF=JEMALLOC_CONF``: one arena, no purging of freed pages (decay times -1), and its
memory advised onto transparent huge pages (``thp:always``, ``metadata_thp:always``), as glibc's ``hugetlb=1``
does for single-device processes. Without that advice, a 256 MiB block took 65,537 page faults to touch
against 129 with it, and the 8-device train steps were faster with it in 13 of 16 alternating pairs of
processes, by 1.0% at the median. Its size-class allocator
reuses the step buffers of 8 device threads without the glibc heap's fragmentation: an 8-device EAGLE-3
process stayed at 5.7 GB over 20 alternating L_lambda / KL steps, none with more than 411 page faults or
0.03 s of kernel time, where glibc with huge pages faulted about 5,000 huge pages (0.2-1 s of kernel time)
per step.
`find_jemalloc` looks in the usual library directories, or at ``LKJAX_JEMALLOC`` (a path; empty turns it
off). Without it, such processes get huge pages only.

glibc reads tunables once, at process start, so the function restarts the interpreter with them set
(same executable, same command line) when any is missing; tunables a user put in ``GLIBC_TUNABLES`` are
kept as given, the ones it added itself are decided again in every process (a child may have another
device count); the same holds for the jemalloc preload (``LD_PRELOAD``, ``MALLOC_CONF``). Nothing changes
in the numbers a program computes, only where its memory comes from. Without ``LKJAX_MALLOC_TUNING`` set (non-empty,
not ``0``) `reexec_with_malloc_tunables` drops whatever it had added and changes nothing else.
"""
from __future__ import annotations

import os
import sys

HUGETLB_TUNABLE = "glibc.malloc.hugetlb"
# One arena, no mmap for large blocks, never trim the heap: freed step buffers stay mapped for the next step.
RETAIN_TUNABLES = (("glibc.malloc.arena_max", "1"), ("glibc.malloc.mmap_max", "0"),
                   ("glibc.malloc.trim_threshold", str(1 << 46)))
MALLOC_TUNABLE_NAMES = (HUGETLB_TUNABLE, *(name for name, _ in RETAIN_TUNABLES))
OPT_IN_ENV = "LKJAX_MALLOC_TUNING"          # set (non-empty, not "0") to turn the tuning on
ADDED_ENV = "LKJAX_MALLOC_TUNABLES_ADDED"   # which tunables `reexec_with_malloc_tunables` added (comma-separated)
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
# jemalloc for multi-device CPU processes: one arena, freed pages never returned (no decay), so the next
# step's buffers are served from memory that is already mapped; that memory advised onto huge pages.
JEMALLOC_CONF = "narenas:1,dirty_decay_ms:-1,muzzy_decay_ms:-1,thp:always,metadata_thp:always"
JEMALLOC_ENV = "LKJAX_JEMALLOC"               # path of libjemalloc.so.2 (overrides the search; empty: off)
PRELOAD_ADDED_ENV = "LKJAX_PRELOAD_ADDED"     # the LD_PRELOAD entry `reexec_with_malloc_tunables` added
JEMALLOC_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                 "/usr/local/lib")


def opted_in(env=None) -> bool:
  """Whether ``LKJAX_MALLOC_TUNING`` turns the tuning on for a process with environment ``env``."""
  env = os.environ if env is None else env
  return env.get(OPT_IN_ENV, "").strip() not in ("", "0")


def _glibc_version() -> tuple[int, int] | None:
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    major, minor = version.split(".")[:2]
    return (int(major), int(minor)) if name == "glibc" else None
  except (AttributeError, ValueError, OSError):
    return None


def _thp_mode(path: str = THP_ENABLED) -> str | None:
  """The selected transparent-huge-page mode (``always``, ``madvise`` or ``never``), None if unknown."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def cpu_devices_requested(env=None) -> int:
  """The CPU device count this process will ask XLA for: ``--xla_force_host_platform_device_count`` in
  ``XLA_FLAGS`` or ``JAX_NUM_CPU_DEVICES`` (the larger if both), 1 if neither."""
  env = os.environ if env is None else env
  counts = [1]
  for flag in env.get("XLA_FLAGS", "").split():
    if flag.startswith("--xla_force_host_platform_device_count="):
      counts.append(int(flag.split("=", 1)[1] or 1))
  if env.get("JAX_NUM_CPU_DEVICES", "").strip():
    counts.append(int(env["JAX_NUM_CPU_DEVICES"]))
  return max(counts)


def retained_heap_supported(env=None) -> bool:
  """Linux with glibc >= 2.26 (the first with ``GLIBC_TUNABLES``), and one CPU device (see the module
  docstring: with several, the shared heap fragments and keeps growing)."""
  version = _glibc_version()
  return (sys.platform.startswith("linux") and version is not None and version >= (2, 26)
          and cpu_devices_requested(env) <= 1)


def hugepage_malloc_supported() -> bool:
  """Linux, glibc >= 2.35 (the tunable exists) and transparent huge pages on ``madvise``: the mode in
  which glibc's advice is what decides (on ``always`` the kernel already backs large mappings with huge
  pages, on ``never`` it does not at all, so the tunable would change nothing)."""
  version = _glibc_version()
  return (sys.platform.startswith("linux") and version is not None and version >= (2, 35)
          and _thp_mode() == "madvise")


def _tunables(value: str | None = None) -> dict[str, str]:
  text = os.environ.get("GLIBC_TUNABLES", "") if value is None else value
  pairs = [item.split("=", 1) for item in text.split(":") if item]
  return {p[0]: p[1] if len(p) > 1 else "" for p in pairs}


def hugepage_malloc_active() -> bool:
  """Whether this process was started with ``glibc.malloc.hugetlb`` in ``GLIBC_TUNABLES``."""
  return _tunables().get(HUGETLB_TUNABLE, "0") not in ("", "0")


def retained_heap_active() -> bool:
  """Whether this process was started with all of ``RETAIN_TUNABLES``, with their values."""
  have = _tunables()
  return all(have.get(name) == value for name, value in RETAIN_TUNABLES)


def wanted_tunables(env=None) -> dict[str, str]:
  """The tunables `reexec_with_malloc_tunables` adds on this machine for a process with environment ``env``
  (default: this one's); empty where none applies."""
  want = dict(RETAIN_TUNABLES) if retained_heap_supported(env) else {}
  if hugepage_malloc_supported():
    want[HUGETLB_TUNABLE] = "1"
  return want


def find_jemalloc(env=None) -> str | None:
  """Path of ``libjemalloc.so.2``: ``LKJAX_JEMALLOC`` when set (None if empty or not a file), else the
  first in `JEMALLOC_DIRS`; None when there is none."""
  env = os.environ if env is None else env
  if JEMALLOC_ENV in env:
    path = env[JEMALLOC_ENV].strip()
    return path if path and os.path.isfile(path) else None
  for d in JEMALLOC_DIRS:
    path = os.path.join(d, "libjemalloc.so.2")
    if os.path.isfile(path):
      return path
  return None


def wanted_preload(env=None) -> str | None:
  """The allocator library `reexec_with_malloc_tunables` preloads for a process with environment ``env``:
  jemalloc on Linux for a process with several CPU devices (where the retained heap is off), if found."""
  env = os.environ if env is None else env
  if not sys.platform.startswith("linux") or cpu_devices_requested(env) <= 1:
    return None
  return find_jemalloc(env)


def jemalloc_active() -> bool:
  """Whether jemalloc is loaded into this process."""
  try:
    with open("/proc/self/maps") as f:
      return "libjemalloc" in f.read()
  except OSError:
    return False


def _user_preload(env) -> list[str]:
  """``LD_PRELOAD``'s entries (spaces or colons) without the one `reexec_with_malloc_tunables` added."""
  added = env.get(PRELOAD_ADDED_ENV, "")
  return [p for p in env.get("LD_PRELOAD", "").replace(":", " ").split() if p and p != added]


def _preloads_jemalloc(preload: list[str]) -> bool:
  return any(os.path.basename(p).startswith("libjemalloc") for p in preload)


def planned_malloc(env=None) -> dict[str, bool]:
  """What a process started with environment ``env`` runs with once `reexec_with_malloc_tunables` has
  decided: ``retained_heap`` and ``jemalloc`` (its own or the user's preload). Benchmarks that start child
  processes check their reports against it."""
  env = os.environ if env is None else env
  on = opted_in(env)
  return dict(retained_heap=on and retained_heap_supported(env),
              jemalloc=_preloads_jemalloc(_user_preload(env)) or (on and wanted_preload(env) is not None))


def strip_malloc_tunables(text: str, names=None) -> str:
  """``text`` (a ``GLIBC_TUNABLES`` value) without the tunables in ``names`` (default: every one this module
  sets), the rest kept in order."""
  names = set(MALLOC_TUNABLE_NAMES if names is None else names)
  return ":".join(t for t in text.split(":") if t and t.split("=", 1)[0] not in names)


def reexec_with_malloc_tunables() -> None:
  """Restart this process with the `wanted_tunables` added to ``GLIBC_TUNABLES`` where it lacks them.

  A tunable a user set keeps its value. The ones this function added itself (named in
  ``LKJAX_MALLOC_TUNABLES_ADDED``, which child processes inherit) are decided again for this process: a
  child with 8 CPU devices started from a single-device parent drops the retained heap, and without
  ``LKJAX_MALLOC_TUNING`` set they are all dropped. A process with several CPU devices also gets
  jemalloc (`wanted_preload`) prepended to ``LD_PRELOAD``, with ``MALLOC_CONF=JEMALLOC_CONF`` unless the
  user set one; that too is decided again in a child (``LKJAX_PRELOAD_ADDED`` names what was added), and a
  user who preloads jemalloc already keeps theirs. The process restarts only when that changes
  ``GLIBC_TUNABLES``, ``LD_PRELOAD`` or ``MALLOC_CONF``.

  Call it first thing in a bench script's ``__main__`` block: it does not return when it restarts.
  """
  env = os.environ
  text = env.get("GLIBC_TUNABLES", "")
  base = strip_malloc_tunables(text, filter(None, env.get(ADDED_ENV, "").split(",")))
  have = _tunables(base)
  opted_out = not opted_in(env)
  want = {} if opted_out else wanted_tunables()
  missing = {k: v for k, v in want.items() if k not in have}
  new = ":".join(filter(None, [base] + [f"{k}={v}" for k, v in missing.items()]))

  # jemalloc (several CPU devices): added to LD_PRELOAD unless the user preloads it already.
  added = env.get(PRELOAD_ADDED_ENV, "")
  preload = env.get("LD_PRELOAD", "").replace(":", " ").split()
  user_preload = _user_preload(env)
  conf = env.get("MALLOC_CONF")
  if added and conf == JEMALLOC_CONF:
    conf = None                  # ours, decided again below
  lib = None if opted_out or _preloads_jemalloc(user_preload) else wanted_preload()
  new_preload = ([lib] if lib else []) + user_preload
  new_conf = JEMALLOC_CONF if lib and conf is None else conf
  before = (text, env.get(ADDED_ENV, ""), preload, added, env.get("MALLOC_CONF"))
  after = (new, ",".join(missing), new_preload, lib or "", new_conf)
  if before == after:
    return
  env["GLIBC_TUNABLES"] = new
  env[ADDED_ENV] = ",".join(missing)
  for name, value in (("LD_PRELOAD", " ".join(new_preload)), (PRELOAD_ADDED_ENV, lib or ""),
                      ("MALLOC_CONF", new_conf)):
    if value:
      env[name] = value
    else:
      env.pop(name, None)
  for stream in (sys.stdout, sys.stderr):
    stream.flush()
  argv = list(getattr(sys, "orig_argv", None) or [sys.executable] + sys.argv)
  os.execv(sys.executable, argv)


def describe() -> str:
  """One line for benchmark headers: which of the tunables this process runs with."""
  return (f"retained heap {'on' if retained_heap_active() else 'off'}, "
          f"huge-page malloc {'on' if hugepage_malloc_active() else 'off'}, "
          f"jemalloc {'on' if jemalloc_active() else 'off'}")
