#!/bin/bash
# One device against each config's 8-device layout (bench_train --mesh=config), and the same 8-device
# process with extra XLA flags (FLAGS_B, default: YNNPACK reduce fusions off). Alternating processes,
# rotating order, ROUNDS rounds (default 3); ARCH (default medusa), BATCH (default 8) x 256.
# Run with the venv's python on PATH.
set -euo pipefail
cd "$(dirname "$0")/../.."
# Runs from a copy made at the start, so edits to the working tree during the run change nothing.
T=/tmp/xla_flags_ab_tree; OUT=${OUT:-/tmp/runs/xla_flags_ab}; mkdir -p "$OUT"
rm -rf "$T"; mkdir -p "$T"; cp -r lkjax experiments configs "$T"/
FLAGS_B=${FLAGS_B:---xla_cpu_experimental_ynn_fusion_type=-reduce}
run() {  # label devices xla_flags mesh
  local label=$1 n=$2 xf=$3 mesh=$4
  (cd "$T" && XLA_FLAGS="--xla_force_host_platform_device_count=$n $xf" PYTHONPATH=$T python experiments/bench_train.py \
     --archs=${ARCH:-medusa} --batch=${BATCH:-8} --seq=256 --steps=3 --warmup=2 --mesh=$mesh \
     --out=$OUT/${label}_$r.json > $OUT/${label}_$r.log 2>&1)
  python3 -c "
import json;d=json.load(open('$OUT/${label}_$r.json'));w=d['rows'][0]
print('round $r', '${label}'.ljust(8), d['devices'], round(w['tokens_per_s']), 'user s/step', round(w['user_s_per_step'], 2), 'lk', [round(x,2) for x in w['lk_times']])"
}
labels=(one cfg8 cfg8_b)
for r in $(seq 0 $(( ${ROUNDS:-3} - 1 ))); do
  for i in 0 1 2; do
    l=${labels[$(( (i + r) % 3 ))]}
    case $l in
      one) run one 1 "" 1,1,1 ;;
      cfg8) run cfg8 8 "" config ;;
      cfg8_b) run cfg8_b 8 "$FLAGS_B" config ;;
    esac
  done
done
