"""Run a script with the benchmarks' malloc tuning on (opt-in; see `malloc.py`).

  python benchmarks/launch.py benchmarks/bench_train.py --archs=eagle3
  python benchmarks/launch.py experiments/train.py --config=configs/eagle3.py

Sets ``LKJAX_MALLOC_TUNING=1`` and the tunables (or the jemalloc preload) for the command's CPU device count,
then replaces this process with ``python SCRIPT ARGS...``. Results do not change, only where memory comes from.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import malloc  # noqa: E402


def main(argv: list[str]) -> None:
  if len(argv) < 2 or argv[1] in ("-h", "--help"):
    print(__doc__.strip())
    raise SystemExit(0 if len(argv) >= 2 else 2)
  os.environ[malloc.OPT_IN_ENV] = "1"
  # reexec_with_malloc_tunables restarts sys.orig_argv; point it at the command to run instead.
  sys.orig_argv = [sys.executable, *argv[1:]]
  malloc.reexec_with_malloc_tunables()
  # Nothing to add on this machine (or the user set it all): run the command as it is.
  os.execv(sys.executable, [sys.executable, *argv[1:]])


if __name__ == "__main__":
  main(sys.argv)
