"""Op time per op kind of two profiled steps side by side (session 12).

    python docs/bench_train_runs/op_kinds.py DIR_A DIR_B [--min_ms=5] [--shapes=KIND,KIND]

(with the project's environment). DIR_A and DIR_B each hold one ``bench_train.py --profile=DIR`` trace
(``DIR/NAME/.../perfetto_trace.json.gz``; pass ``DIR/NAME``), e.g. one device against 8 virtual devices.
Prints, per op kind (the op name without its ``.N`` suffix), the summed op time and op count in each and
their difference, largest difference first. On N virtual devices sharing the cores, every op's wall time
includes the time the other devices' threads hold the cores, so compare kinds with each other (how much
more a kind grew than the dots, ``ynn_fusion``), not with one device's absolute times. ``--shapes``: for
those kinds, B's ops by result shape, from B's optimized HLO (``DIR/NAME.hlo.txt`` next to the trace dir).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "experiments"))
import bench_train  # noqa: E402  (its trace reader)


def by_kind(d: str):
  ms, n = collections.Counter(), collections.Counter()
  for t, name in bench_train.trace_ops(d):
    kind = re.sub(r"\.\d+$", "", name)
    ms[kind] += t
    n[kind] += 1
  return ms, n


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("a")
  ap.add_argument("b")
  ap.add_argument("--min_ms", type=float, default=5.0)
  ap.add_argument("--shapes", default="")
  args = ap.parse_args()
  a, an = by_kind(args.a)
  b, bn = by_kind(args.b)
  print(f"{'kind':40s} {'A ms':>9s} {'n':>5s} {'B ms':>9s} {'n':>5s} {'B - A':>9s}")
  for kind in sorted(set(a) | set(b), key=lambda k: -(b[k] - a[k])):
    if max(a[kind], b[kind]) >= args.min_ms:
      print(f"{kind[:40]:40s} {a[kind]:9.1f} {an[kind]:5d} {b[kind]:9.1f} {bn[kind]:5d} {b[kind] - a[kind]:9.1f}")
  print(f"{'all ops':40s} {sum(a.values()):9.1f} {'':5s} {sum(b.values()):9.1f}")
  kinds = [k for k in args.shapes.split(",") if k]
  if kinds:
    hlo = open(args.b.rstrip("/") + ".hlo.txt").read()
    acc = collections.defaultdict(lambda: [0.0, 0])
    for t, name in bench_train.trace_ops(args.b):
      if re.sub(r"\.\d+$", "", name) in kinds:
        m = re.search(r"\n\s*(?:ROOT )?%" + re.escape(name) + r" = (\S+) ", hlo)
        key = (re.sub(r"\.\d+$", "", name), m.group(1) if m else "?")
        acc[key][0] += t
        acc[key][1] += 1
    print("\nB by result shape:")
    for (kind, shape), (t, n) in sorted(acc.items(), key=lambda kv: -kv[1][0]):
      print(f"{kind[:32]:32s} {shape:32s} {t:9.1f} ms {n:5d} ops")


if __name__ == "__main__":
  main()
