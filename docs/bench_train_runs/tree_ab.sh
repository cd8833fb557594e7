#!/bin/bash
# Two code states side by side (session 13): the train step of REV_A (default HEAD, from `git archive`)
# against REV_B (default: the working tree), each on one device and at each config's 8-device layout (bench_train
# --mesh=config). Alternating processes, the order rotating from round to round; ROUNDS rounds (default 2),
# ARCH (default medusa), BATCH (default 8) x 256; LABELS picks the processes (default "a1 b1 a8 b8"). PROGRAM=grad_only times the strong-scaling bound instead
# (bench_train --program=grad_only, each device's forward + backward alone, data parallel on 8 devices).
# Run with the venv's python on PATH.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/runs/tree_ab}; mkdir -p "$OUT"
# Both trees are copies made at the start, so edits to the working tree during the run change nothing.
A=/tmp/tree_ab_a; B=/tmp/tree_ab_b
rm -rf "$A" "$B"; mkdir -p "$A" "$B"
git archive "${REV_A:-HEAD}" lkjax experiments configs | tar -x -C "$A"
if [ -n "${REV_B:-}" ]; then
  git archive "$REV_B" lkjax experiments configs | tar -x -C "$B"
  echo "A = $(git rev-parse --short "${REV_A:-HEAD}"), B = $(git rev-parse --short "$REV_B")"
else
  cp -r lkjax experiments configs "$B"/
  echo "A = $(git rev-parse --short "${REV_A:-HEAD}"), B = working tree ($(git status --short lkjax experiments configs | wc -l) changed files)"
fi
run() {  # label tree devices mesh
  local label=$1 tree=$2 n=$3 mesh=$4
  (cd "$tree" && XLA_FLAGS="--xla_force_host_platform_device_count=$n" PYTHONPATH=$tree python experiments/bench_train.py \
     --archs=${ARCH:-medusa} --batch=${BATCH:-8} --seq=256 --steps=3 --warmup=2 --mesh=$mesh \
     --program=${PROGRAM:-step} $EXTRA \
     --out=$OUT/${label}_$r.json > $OUT/${label}_$r.log 2>&1)
  python3 -c "
import json;d=json.load(open('$OUT/${label}_$r.json'));w=d['rows'][0]
print('round $r', '${label}'.ljust(6), d['devices'], round(w['tokens_per_s']), 'cpu s/step', round(w['cpu_s_per_step'], 2), 'lk', [round(x,2) for x in w['lk_times']])"
}
MESH8=config; EXTRA=""   # the bound: data parallel, the tables left out of the gradient (as bench_mesh's /grad)
if [ "${PROGRAM:-step}" = grad_only ]; then MESH8=8,1,1; EXTRA=--split_tables=emb,embed_tokens; fi
labels=(${LABELS:-a1 b1 a8 b8})   # LABELS="a8 b8": the 8-device processes only
n=${#labels[@]}
for r in $(seq 0 $(( ${ROUNDS:-2} - 1 ))); do
  for i in $(seq 0 $(( n - 1 ))); do
    l=${labels[$(( (i + r) % n ))]}
    case $l in
      a1) run a1 "$A" 1 1,1,1 ;;
      b1) run b1 "$B" 1 1,1,1 ;;
      a8) run a8 "$A" 8 "$MESH8" ;;
      b8) run b8 "$B" 8 "$MESH8" ;;
    esac
  done
done
