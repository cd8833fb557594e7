"""Op time per op kind of two profiled steps side by side (session 12).

    python docs/bench_train_runs/op_kinds.py DIR_A DIR_B [--min_ms=5] [--shapes=KIND,KIND]

(with the project's environment). DIR_A and DIR_B each hold one ``bench_train.py --profile=DIR`` trace
(``DIR/NAME/.../perfetto_trace.json.gz``; pass ``DIR/NAME``), e.g. one device against 8 virtual devices.
Prints, per op kind (the op name without its ``.N`` suffix), the summed op time and the number of distinct
ops (`fixed_part.by_kind`) in each and their difference, largest difference first. On N virtual devices sharing the cores, every op's wall time
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fixed_part  # noqa: E402  (its trace and HLO readers; it imports bench_train's)


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("a")
  ap.add_argument("b")
  ap.add_argument("--min_ms", type=float, default=5.0)
  ap.add_argument("--shapes", default="")
  args = ap.parse_args()
  ops_b = fixed_part.load_ops(args.b)
  a, b = fixed_part.by_kind(fixed_part.load_ops(args.a)), fixed_part.by_kind(ops_b)   # kind -> [ms, ops]
  zero = [0.0, 0]
  print(f"{'kind':40s} {'A ms':>9s} {'n':>5s} {'B ms':>9s} {'n':>5s} {'B - A':>9s}")
  for kind in sorted(set(a) | set(b), key=lambda k: -(b.get(k, zero)[0] - a.get(k, zero)[0])):
    (ams, an), (bms, bn) = a.get(kind, zero), b.get(kind, zero)
    if max(ams, bms) >= args.min_ms:
      print(f"{kind[:40]:40s} {ams:9.1f} {an:5d} {bms:9.1f} {bn:5d} {bms - ams:9.1f}")
  print(f"{'all ops':40s} {sum(v[0] for v in a.values()):9.1f} {'':5s} {sum(v[0] for v in b.values()):9.1f}")
  kinds = [k for k in args.shapes.split(",") if k]
  if kinds:
    d, name = os.path.split(args.b.rstrip("/"))
    hlo = fixed_part.load_hlo(d, name)
    acc = collections.defaultdict(lambda: [0.0, 0])
    for op, t in ops_b.items():
      kind = re.sub(r"\.\d+$", "", op)
      if kind in kinds:
        m = re.search(r"\n\s*(?:ROOT )?%" + re.escape(op) + r" = (\S+) ", hlo)
        acc[(kind, m.group(1) if m else "?")][0] += t
        acc[(kind, m.group(1) if m else "?")][1] += 1
    print("\nB by result shape:")
    for (kind, shape), (t, n) in sorted(acc.items(), key=lambda kv: -kv[1][0]):
      print(f"{kind[:32]:32s} {shape:32s} {t:9.1f} ms {n:5d} ops")


if __name__ == "__main__":
  main()
