#!/usr/bin/env bash
# The quiet A/B on a CPU adapter, in one run: `senet bench` of the base SENet (batch 128, 3×32×32,
# --tune off) at widths 1 and 0.25 with the fused plans (--fuse on) and the unfused ones (--fuse
# off), rounds interleaved, then PyTorch on the CPU beside them (scripts/torch_bench_cuda.py
# --device cpu --modes fp32, the same models, as many threads as the machine has cores). The plan
# that goes first alternates from round to round (fused first in odd rounds, unfused first in even
# ones), so a host that slows down within a pair does not always count against the same plan. One
# JSON line per measurement, after a header line with the date, build and load. Width 0.25 is timed
# over 40 steps (about 20 s on 2 cores), width 1 over the bench's default 10 (about a minute): a
# 10-step width-0.25 window of ~5 s caught this host's bursts, and its pairs moved by +-15 %.
# scripts/ab_summary.py prints the table from the log. Stop every other
# process first: these machines are noisy, and only ratios within one run mean much.
# Usage: scripts/lavapipe-ab.sh [senet binary] [python with torch] [rounds]
set -euo pipefail
bin=${1:-target/debug/senet}
py=${2:-python3}
rounds=${3:-2}
echo "# $(date -u +%FT%TZ) build $(git rev-parse --short HEAD) $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
for round in $(seq "$rounds"); do
  for width in 1 0.25; do
    order="on off"
    if [ $((round % 2)) -eq 0 ]; then order="off on"; fi
    for fuse in $order; do
      printf '{"round":%s,"fuse":"%s",' "$round" "$fuse"
      steps=10
      if [ "$width" = 0.25 ]; then steps=40; fi
      "$bin" --tune off bench --model senet --width "$width" --batch-size 128 --steps "$steps" --fuse "$fuse" --json | cut -c2-
    done
  done
done
"$py" scripts/torch_bench_cuda.py --device cpu --modes fp32 --cases senet:1.0:128:32 senet:0.25:128:32
echo "# done $(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg)"
