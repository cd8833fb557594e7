#!/bin/bash
# 8-device gather path (1x8x1/gather) with bf16 blocks gathered as uint16 (this tree) against a copy of
# this tree whose gather_split gathers the bf16 blocks themselves; one device as the reference.
# Alternating processes, rotating order, ROUNDS rounds (default 3). ARCH (default medusa), EXTRA (more
# bench_train flags, e.g. --split_tables=emb for the MLP-Speculator). Run with the venv's python on PATH.
set -euo pipefail
cd "$(dirname "$0")/../.."
# Both sides run from copies made at the start, so edits to the working tree during the run change neither.
A=/tmp/u16_ab_a; B=/tmp/u16_ab_b; OUT=${OUT:-/tmp/runs/u16_ab}; mkdir -p "$OUT"
for t in "$A" "$B"; do rm -rf "$t"; mkdir -p "$t"; cp -r lkjax experiments configs "$t"/; done
python3 - "$B/lkjax/train/step.py" <<'PY'
import sys, re
p = sys.argv[1]; s = open(p).read()
old = "  if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize == 2:\n    x = jax.lax.bitcast_convert_type(x, jnp.uint16)\n"
assert old in s, "gather_split's uint16 bitcast not found"
open(p, "w").write(s.replace(old, ""))
PY
run() {  # tree label devices flags...
  local tree=$1 label=$2 n=$3; shift 3
  (cd "$tree" && XLA_FLAGS=--xla_force_host_platform_device_count=$n PYTHONPATH=$tree python experiments/bench_train.py \
     --archs=${ARCH:-medusa} --batch=8 --seq=256 --steps=3 --warmup=2 "$@" --out=$OUT/${label}_$r.json > $OUT/${label}_$r.log 2>&1)
  python3 -c "
import json;d=json.load(open('$OUT/${label}_$r.json'));w=d['rows'][0]
print('round $r', '${label}'.ljust(6), d['devices'], d.get('jemalloc'), round(w['tokens_per_s']), 'lk', [round(x,2) for x in w['lk_times']], 'kl', [round(x,2) for x in w['kl_times']], 'ag MB', w.get('all_gather_mb'))"
}
labels=(one u16 bf16)
for r in $(seq 0 $(( ${ROUNDS:-3} - 1 ))); do
  for i in 0 1 2; do
    l=${labels[$(( (i + r) % 3 ))]}
    case $l in
      one) run "$A" one 1 --mesh=1,1,1 ;;
      u16) run "$A" u16 8 --mesh=1,8,1 --gather_split_params ${EXTRA:-} ;;
      bf16) run "$B" bf16 8 --mesh=1,8,1 --gather_split_params ${EXTRA:-} ;;
    esac
  done
done
