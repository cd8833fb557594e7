#!/bin/bash
# Run 96: one device, 8 devices on jemalloc without huge pages (jem: the MALLOC_CONF of lkjax/runtime.py
# before session 16), 8 devices on jemalloc with thp:always (jemthp: the one after), alternating processes,
# each config's layout, batch 8 x 256. ARCH, ROUNDS (3), SIDES ("one jem jemthp"), OUT (/tmp/runs).
# Prints one line per process: arch, round, side, jemalloc loaded, tokens/s, page faults / step,
# kernel s / step, L_lambda step times, and the peak of /proc/meminfo's AnonHugePages while it ran.
cd "$(dirname "$0")/../.."
A=${ARCH:-eagle3}; O=${OUT:-/tmp/runs}; mkdir -p "$O"
CONF=narenas:1,dirty_decay_ms:-1,muzzy_decay_ms:-1
for r in $(seq 0 $((${ROUNDS:-3}-1))); do
for s in ${SIDES:-one jem jemthp}; do
  case $s in
    one) E=""; X=""; M="";;
    jem) E="MALLOC_CONF=$CONF"; X="--xla_force_host_platform_device_count=8"; M="--mesh=config";;
    jemthp) E="MALLOC_CONF=$CONF,thp:always,metadata_thp:always"; X="--xla_force_host_platform_device_count=8"; M="--mesh=config";;
  esac
  f=$O/thp_${A}_${s}_$r
  ( peak=0; while sleep 2; do v=$(awk '/AnonHugePages/{print $2}' /proc/meminfo); [ "$v" -gt "$peak" ] && peak=$v && echo $peak > $f.peak; done ) & SP=$!
  env $E XLA_FLAGS=$X python experiments/bench_train.py --archs=$A $M --batch=8 --seq=256 --steps=3 --warmup=2 --out=$f.json > $f.log 2>&1
  kill $SP
  python3 -c "
import json;d=json.load(open('$f.json'));r=d['rows'][0]
print('$A', '$r', '$s', d.get('jemalloc'), round(r['tokens_per_s']), r['page_faults_per_step'], round(r['kernel_s_per_step'],2), [round(x,2) for x in r['lk_times']], 'AnonHugePages peak kB', open('$f.peak').read().strip())"
done; done
