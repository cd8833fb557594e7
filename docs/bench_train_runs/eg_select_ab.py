"""One head's chunked LK loss, value and gradient (batch 4 x 512, Vd 8192, bf16 draft logits), timed for
KL and L_lambda with the current lkjax/losses_chunked.py against an older copy, interleaved in one process
with the order rotating.

  git show 9f22e4c38463ced2770436a887f38d234c63e2cc:lkjax/losses_chunked.py > /tmp/lc_old.py
  N=12 python docs/bench_train_runs/eg_select_ab.py /tmp/lc_old.py
"""
import sys, time, os, importlib.util
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import jax, jax.numpy as jnp
from lkjax import losses_chunked as new
spec = importlib.util.spec_from_file_location('lc_old', sys.argv[1]); old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
B, T, V = 4, 512, 8192
k = jax.random.split(jax.random.PRNGKey(0), 3)
z = (jax.random.normal(k[0], (B, T, V)) * 3).astype(jnp.bfloat16)
y = jax.random.normal(k[1], (B, T, V)) * 3
lse = jax.nn.logsumexp(y, -1) + 0.5
probs = new.target_probs(y, lse)
c = jax.random.uniform(k[2], (B, T))
def mk(lc, ga, gk, fwd_only=False):
  def f(z, probs):
    a, kl = lc.token_alpha_kl_probs(z, probs, grad_alpha=ga, grad_kl=gk)
    return jnp.sum(a * c) * (-0.3 if ga else 0) + jnp.sum(kl * c)
  return jax.jit(jax.value_and_grad(f))
fs = {"kl_old": mk(old, False, True), "lk_old": mk(old, True, True), "kl_new": mk(new, False, True), "lk_new": mk(new, True, True)}
outs = {n: jax.block_until_ready(f(z, probs)) for n, f in fs.items()}
print("max diff lk", float(jnp.max(jnp.abs(outs["lk_old"][1].astype(jnp.float32) - outs["lk_new"][1].astype(jnp.float32)))))
N = int(os.environ.get("N", "8"))
ts = {n: [] for n in fs}
names = list(fs)
for r in range(N):
  order = names[r % 4:] + names[:r % 4]
  for n in order:
    f = fs[n]; t = time.perf_counter(); jax.block_until_ready(f(z, probs)); ts[n].append(time.perf_counter() - t)
import statistics as s
for n in fs: print(n, "median ms %.1f" % (1e3 * s.median(ts[n])))
