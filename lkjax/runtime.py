"""Process setup for the entry scripts: XLA's large CPU buffers on transparent huge pages.

XLA's CPU runtime allocates each compiled step's temporary buffer with ``posix_memalign`` (about 1.2 GB
for the MEDUSA train step and 2 GB for EAGLE-3 at batch 4 x 512) and frees it when the step ends. glibc
serves blocks that large with a fresh ``mmap`` and returns them with ``munmap``, so every step faults in
the whole buffer again, 4 KiB at a time: about 520,000 minor page faults and 2.2 s of kernel CPU time per
EAGLE-3 step on the 2-core machines (`experiments/bench_malloc.py`, ``docs/bench_malloc.json``).

glibc >= 2.35 can ``madvise(MADV_HUGEPAGE)`` the blocks it maps (tunable ``glibc.malloc.hugetlb=1``):
the same buffer then faults in 2 MiB at a time, about 1,600 faults per EAGLE-3 step; the step took 1.18x
less time in that benchmark (MEDUSA 1.23x, MLP-Speculator 1.17x, MTP 1.00x).  The kernel still zeroes
(and may compact) the huge pages, so kernel time falls less than the fault count.  glibc reads tunables
once, at process start, so `reexec_with_hugepage_malloc` restarts the interpreter with the tunable set
(same executable, same command line) when it is missing. Nothing changes in the numbers a program
computes, only where the kernel puts its memory. ``LKJAX_NO_HUGEPAGE_MALLOC=1`` opts out.
"""
from __future__ import annotations

import os
import sys

HUGETLB_TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT_ENV = "LKJAX_NO_HUGEPAGE_MALLOC"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


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


def hugepage_malloc_supported() -> bool:
  """Linux, glibc >= 2.35 (the tunable exists) and transparent huge pages on ``madvise``: the mode in
  which glibc's advice is what decides (on ``always`` the kernel already backs large mappings with huge
  pages, on ``never`` it does not at all, so a restart would change nothing)."""
  version = _glibc_version()
  return (sys.platform.startswith("linux") and version is not None and version >= (2, 35)
          and _thp_mode() == "madvise")


def hugepage_malloc_active() -> bool:
  """Whether this process was started with ``glibc.malloc.hugetlb`` in ``GLIBC_TUNABLES``."""
  return HUGETLB_TUNABLE in os.environ.get("GLIBC_TUNABLES", "")


def reexec_with_hugepage_malloc() -> None:
  """Restart this process with ``GLIBC_TUNABLES=...:glibc.malloc.hugetlb=1`` unless it already has it, the
  machine cannot use it (`hugepage_malloc_supported`) or ``LKJAX_NO_HUGEPAGE_MALLOC`` is set.

  Call it first thing in an entry script's ``__main__`` block: it does not return when it restarts.
  Child processes inherit the variable, so they start with huge pages directly.
  """
  if hugepage_malloc_active() or os.environ.get(OPT_OUT_ENV) or not hugepage_malloc_supported():
    return
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  os.environ["GLIBC_TUNABLES"] = f"{tunables}:{HUGETLB_TUNABLE}=1" if tunables else f"{HUGETLB_TUNABLE}=1"
  for stream in (sys.stdout, sys.stderr):
    stream.flush()
  argv = list(getattr(sys, "orig_argv", None) or [sys.executable] + sys.argv)
  os.execv(sys.executable, argv)
