#!/bin/bash
# 8-device EAGLE-3 under three allocators, alternating processes, 2 rounds.
cd "$(dirname "$0")/../.."
for r in 0 1; do
for s in glibc jem jemthp; do
  case $s in
    glibc) E="LKJAX_JEMALLOC=";;
    jem) E="";;
    jemthp) E="MALLOC_CONF=narenas:1,dirty_decay_ms:-1,muzzy_decay_ms:-1,thp:always,metadata_thp:always";;
  esac
  env $E XLA_FLAGS=--xla_force_host_platform_device_count=8 python experiments/bench_train.py --archs=${ARCH:-eagle3} --mesh=8,1,1 --batch=8 --seq=256 --steps=3 --warmup=2 --out=/tmp/runs/alloc_${s}_$r.json > /tmp/runs/alloc_${s}_$r.log 2>&1
  python3 -c "
import json;d=json.load(open('/tmp/runs/alloc_${s}_$r.json'));r=d['rows'][0]
print('$r', '$s', d.get('jemalloc'), d['glibc_tunables'][-20:], round(r['tokens_per_s']), r['page_faults_per_step'], round(r['kernel_s_per_step'],2), [round(x,2) for x in r['lk_times']])"
done; done
