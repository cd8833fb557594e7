"""Split one profiled train step's op time into a part per step and a part per token (session 10).

    python docs/bench_train_runs/fixed_part.py SMALL_DIR LARGE_DIR [--ratio=8] [--name=eagle3_lk_hybrid]

(with the project's environment: it reads traces with ``experiments/bench_train.py``'s `trace_ops`).

SMALL_DIR and LARGE_DIR each hold one single-device profile of the same step at two batch sizes, the
large one ``--ratio`` times the small one: a ``perfetto_trace.json.gz`` (anywhere below the directory)
and the optimized HLO ``NAME.hlo.txt`` or ``NAME.hlo.txt.gz``, as ``bench_train.py --profile=DIR``
writes them (``DIR/NAME/.../perfetto_trace.json.gz``, ``DIR/NAME.hlo.txt``) or as copied into
``55_profiles/``. It prints

* per op kind (the op name without its ``.N`` suffix): op time and count at both sizes, and the part
  per step, ``(ratio * small - large) / (ratio - 1)``: what the op costs once per step whatever the
  batch (a device of a data-parallel mesh pays it once per step, so N devices pay it N times);
* the YNNPACK fusions (``ynn_fusion``) with no dot, i.e. the reductions XLA hands to YNNPACK, grouped by
  result shape, at each size;
* the dots' GFLOP (from the HLO) and their op time lost against ``--ceiling`` GFLOP/s.

Op times are the profiler's per-op wall times on one device, summed; ops that run concurrently count
twice, so the totals exceed the step's wall time.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "experiments"))
import bench_train  # noqa: E402  (its trace reader; the script runs with the project's environment)


def load_ops(d: str) -> dict[str, float]:
  """Op name -> summed duration (ms) of the newest perfetto trace below ``d`` (`bench_train.trace_ops`)."""
  try:
    return _sum_by_name(bench_train.trace_ops(d))
  except FileNotFoundError as e:
    raise SystemExit(str(e)) from None


def _sum_by_name(ops: list[tuple[float, str]]) -> dict[str, float]:
  out: dict[str, float] = collections.defaultdict(float)
  for ms, name in ops:
    out[name] += ms
  return out


def load_hlo(d: str, name: str) -> str:
  for path, opener in ((os.path.join(d, name + ".hlo.txt"), open),
                       (os.path.join(d, name + ".hlo.txt.gz"), gzip.open)):
    if os.path.exists(path):
      with opener(path, "rt") as f:
        return f.read()
  for path in glob.glob(os.path.join(d, "*.hlo.txt*")):
    with (gzip.open if path.endswith(".gz") else open)(path, "rt") as f:
      return f.read()
  raise SystemExit(f"{d}: no {name}.hlo.txt(.gz)")


def _dims(shape: str) -> list[int]:
  m = re.match(r"\w+\[([\d,]*)\]", shape)
  return [int(x) for x in m.group(1).split(",") if x] if m else []


def ynn_fusions(hlo: str, ops: dict[str, float]) -> list[tuple[str, float, str, float]]:
  """(name, ms, result shape, dot GFLOP) of every ``ynn_fusion`` op in the trace."""
  comps = {m.group(1): m.group(2) for m in re.finditer(r"\n%([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.S)}
  out = []
  for name, ms in ops.items():
    if not name.startswith("ynn_fusion"):
      continue
    m = re.search(r"\n\s*(?:ROOT )?%" + re.escape(name) + r" = (\S+) [^\n]*calls=%([\w.\-]+)", hlo)
    if not m:
      continue
    body = comps.get(m.group(2), "")
    shapes = dict(re.findall(r"%([\w.\-]+) = (\w+\[[\d,]*\])", body))
    flops = 0
    for dm in re.finditer(r"= (\S+) dot\(%([\w.\-]+)[^)]*\)([^\n]*)", body):
      lhs = _dims(shapes.get(dm.group(2), ""))
      cd = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", dm.group(3))
      contract = 1
      for i in (cd.group(1).split(",") if cd and lhs else []):
        contract *= lhs[int(i)]
      n = 1
      for x in _dims(dm.group(1)):
        n *= x
      flops += 2 * n * contract
    out.append((name, ms, m.group(1), flops / 1e9))
  return out


def by_kind(ops: dict[str, float]) -> dict[str, list]:
  kinds: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
  for name, ms in ops.items():
    k = kinds[re.sub(r"\.\d+$", "", name)]
    k[0] += ms
    k[1] += 1
  return kinds


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("small")
  ap.add_argument("large")
  ap.add_argument("--ratio", type=float, default=8.0, help="large batch / small batch")
  ap.add_argument("--name", default="eagle3_lk_hybrid", help="program name (trace subdirectory, HLO file)")
  ap.add_argument("--ceiling", type=float, default=280.0, help="GFLOP/s a dot is measured against")
  ap.add_argument("--top", type=int, default=15)
  a = ap.parse_args()
  sub = lambda d: os.path.join(d, a.name) if os.path.isdir(os.path.join(d, a.name)) else d  # noqa: E731
  ops = {s: load_ops(sub(d)) for s, d in (("small", a.small), ("large", a.large))}
  hlo = {s: load_hlo(d, a.name) for s, d in (("small", a.small), ("large", a.large))}
  r = a.ratio
  ks, kl = by_kind(ops["small"]), by_kind(ops["large"])
  rows = []
  for k in set(ks) | set(kl):
    s, l = ks.get(k, [0.0, 0]), kl.get(k, [0.0, 0])
    rows.append(((r * s[0] - l[0]) / (r - 1), k, s, l))
  rows.sort(key=lambda x: -x[0])
  print(f"{'op kind':40s} {'small ms':>9s} {'n':>5s} {'large ms':>9s} {'n':>5s} {'per step ms':>12s}")
  for fixed, k, s, l in rows[:a.top]:
    print(f"{k[:40]:40s} {s[0]:9.1f} {s[1]:5d} {l[0]:9.1f} {l[1]:5d} {fixed:12.1f}")
  ts, tl = sum(v[0] for v in ks.values()), sum(v[0] for v in kl.values())
  print(f"{'all ops':40s} {ts:9.1f} {'':5s} {tl:9.1f} {'':5s} {(r * ts - tl) / (r - 1):12.1f}")
  for s in ("small", "large"):
    fus = ynn_fusions(hlo[s], ops[s])
    red = collections.defaultdict(lambda: [0, 0.0])
    for _, ms, shape, gf in fus:
      if gf == 0:
        red[shape][0] += 1
        red[shape][1] += ms
    dots = [(ms, gf) for _, ms, _, gf in fus if gf > 0]
    lost = sum(ms - gf / a.ceiling * 1e3 for ms, gf in dots)
    print(f"\n{s}: YNNPACK dots {sum(ms for ms, _ in dots):.1f} ms for {sum(gf for _, gf in dots):.1f} GFLOP "
          f"({lost:.1f} ms lost against {a.ceiling:g} GFLOP/s); reductions {sum(v[1] for v in red.values()):.1f} ms:")
    for shape, (n, ms) in sorted(red.items(), key=lambda kv: -kv[1][1]):
      print(f"  {shape:28s} {n:4d} ops {ms:8.1f} ms")


if __name__ == "__main__":
  main()
