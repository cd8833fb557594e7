"""Step time of one architecture's train step for several loss kinds, interleaved in one process (order rotating
per round), as medians and median per-round ratios against the first kind. Not an entry script: a diagnostic.

  N=6 python docs/bench_train_runs/kinds_ab.py mtp kl,fixed_lambda,lk_alpha,lk_hybrid

It restarts itself with the malloc tunables of lkjax/runtime.py, as the entry scripts do.
"""
import sys, time, os, importlib.util, statistics
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from lkjax import runtime  # noqa: E402
runtime.reexec_with_malloc_tunables()
spec = importlib.util.spec_from_file_location('bt', os.path.join(ROOT, 'experiments/bench_train.py'))
bt = importlib.util.module_from_spec(spec); spec.loader.exec_module(bt)
info = bt.target_info(False)
arch = sys.argv[1]; kinds = sys.argv[2].split(","); N = int(os.environ.get("N", "6"))
kw = dict(small=False, batch=4, seq=512, mesh_shape=(1, 1, 1), precision='bf16')
steps = {k: bt.build_step(arch, k, info, **kw) for k in kinds}
for _ in range(2):
  for s in steps.values(): s['run']()
times = {k: [] for k in kinds}
for r in range(N):
  order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]
  for k in order:
    times[k].append(steps[k]['run']())
  print(r, {k: round(v[-1], 3) for k, v in times.items()}, flush=True)
base = times[kinds[0]]
for k in kinds:
  ratios = [a / b for a, b in zip(times[k], base)]
  print(f"{k:16s} median {statistics.median(times[k]):.3f}s  ratio vs {kinds[0]} median {statistics.median(ratios):.3f}  faults {steps[k]['last']['minflt'][-1]}")
