"""CPU samples per symbol of two `perf record` files, side by side (session 15).

    perf record -F 299 -o A.data -- python experiments/bench_train.py ...   (one device)
    XLA_FLAGS=--xla_force_host_platform_device_count=8 perf record -F 299 -o B.data -- python ... --mesh=config
    python docs/bench_train_runs/perf_diff.py A.data B.data [--top=25]

Unlike op time from the profiler (`op_kinds.py`), a sample is CPU time: on 8 virtual devices sharing 2 cores an
op's wall time includes the other devices' turns, its samples do not. XLA's generated loops have no symbols;
they are counted together as "[JIT code]". Both runs must time the same number of steps; compilation and
warm-up are in both.
"""
import argparse
import collections
import subprocess


def samples(path: str) -> collections.Counter:
  out = subprocess.run(["perf", "report", "-i", path, "--sort", "sym", "-n", "--stdio"], check=True,
                       capture_output=True, text=True).stdout
  counts = collections.Counter()
  for line in out.splitlines():
    parts = line.split(None, 2)
    if line.startswith("#") or len(parts) < 3 or not parts[1].isdigit():
      continue
    sym = parts[2].strip()
    counts["[JIT code]" if sym.startswith("[.] 0x") else sym] += int(parts[1])
  return counts


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("a")
  ap.add_argument("b")
  ap.add_argument("--top", type=int, default=25)
  args = ap.parse_args()
  a, b = samples(args.a), samples(args.b)
  print(f"samples: A {sum(a.values())}, B {sum(b.values())}")
  print(f"{'A':>7} {'B':>7} {'B - A':>7}  symbol")
  rows = sorted(set(a) | set(b), key=lambda k: b[k] - a[k], reverse=True)
  tail = args.top // 2   # the largest drops, after the largest growths
  if len(rows) > args.top + tail:
    rows = rows[:args.top] + ["..."] + rows[-tail:]
  for k in rows:
    print("    ..." if k == "..." else f"{a[k]:7d} {b[k]:7d} {b[k] - a[k]:+7d}  {k[:110]}")


if __name__ == "__main__":
  main()
