#!/usr/bin/env bash
# Data-parallel scaling on one machine: `senet bench` under 1 rank and under N ranks (default 2),
# each rank bound to one core (mpirun --bind-to core) with one lavapipe thread (LP_NUM_THREADS=1).
# It builds nothing: build first with `cargo build --release --features mpi`, then run it on a
# quiet machine:
#
#   scripts/mpi-scaling.sh target/release/senet            # width 0.25, batch 64 per rank, 2 ranks
#   RANKS=4 scripts/mpi-scaling.sh target/release/senet 0.25 64 30
#
# Arguments: BINARY [WIDTH=0.25] [BATCH_PER_RANK=64] [STEPS=20]. Prints, per rank count: images/s
# of each rank, total, scaling against one rank (a separate 1-rank run, and rank 0 alone measured
# inside the N-rank run), efficiency and the all-reduce's time per step and share. On a GPU
# machine set LP_NUM_THREADS is harmless; rank r opens adapter (local rank mod adapters found).
set -euo pipefail
bin=${1:?usage: $0 PATH/TO/senet [WIDTH] [BATCH_PER_RANK] [STEPS]}
width=${2:-0.25}
batch=${3:-64}
steps=${4:-20}
ranks=${RANKS:-2}
[ -x "$bin" ] || { echo "$bin: not an executable (build with: cargo build --release --features mpi)" >&2; exit 2; }
command -v mpirun >/dev/null || { echo "mpirun not found: apt-get install openmpi-bin libopenmpi-dev" >&2; exit 2; }
command -v python3 >/dev/null || { echo "python3 is needed to read the JSON reports" >&2; exit 2; }

export LP_NUM_THREADS=1
mpi=(mpirun --bind-to core --map-by core -x LP_NUM_THREADS)
# The kernel tuner's choice, timed once by the 1-rank run and read from its cache by all ranks.
[ -n "${SENET_TUNE:-}" ] && mpi+=(-x SENET_TUNE)
[ "$(id -u)" = 0 ] && mpi+=(--allow-run-as-root)
bench=(bench --width "$width" --batch-size "$batch" --steps "$steps" --json)

echo "senet bench --width $width --batch-size $batch (per rank) --steps $steps; LP_NUM_THREADS=1, --bind-to core" >&2
one=$("${mpi[@]}" -np 1 "$bin" "${bench[@]}")
many=$("${mpi[@]}" -np "$ranks" "$bin" "${bench[@]}")

ONE="$one" MANY="$many" python3 - <<'PY'
import json, os
one = json.loads(os.environ["ONE"].strip().splitlines()[-1])
dp = json.loads(os.environ["MANY"].strip().splitlines()[-1])
single = one["train_images_per_s"]
print(f"model: {dp['model']}, batch {dp['batch_per_rank']} per rank; all-reduce of {dp['gradient_floats']} floats per step")
print(f"adapter: {one['adapter']}")
print(f"{'1 rank (its own run)':34}{single:10.1f} images/s")
print(f"{'rank 0 alone (in the ' + str(dp['ranks']) + '-rank run)':34}{dp['alone_images_per_s']:10.1f} images/s")
for r, (rate, ms, share) in enumerate(zip(dp["per_rank_images_per_s"], dp["allreduce_ms_per_step"], dp["allreduce_share"])):
    print(f"  rank {r}: {rate:10.1f} images/s, all-reduce {ms:.2f} ms/step = {100 * share:.1f} % of its time")
total = dp["total_images_per_s"]
print(f"{str(dp['ranks']) + ' ranks total':34}{total:10.1f} images/s")
print(f"scaling vs 1 rank: {total / single:.2f}x (efficiency {100 * total / (dp['ranks'] * single):.1f} %); "
      f"vs rank 0 alone in the same run: {total / dp['alone_images_per_s']:.2f}x (efficiency {100 * dp['efficiency']:.1f} %)")
# The same steps with --sync-bn (SyncBatchNorm), timed after the per-rank ones in the same run.
print(f"--sync-bn: {dp['sync_bn_exchanges_per_step']} batch-norm exchanges per step (host-staged)")
for r, (rate, ms, share) in enumerate(zip(dp["sync_bn_per_rank_images_per_s"], dp["sync_bn_exchange_ms_per_step"], dp["sync_bn_exchange_share"])):
    print(f"  rank {r}: {rate:10.1f} images/s, exchanges {ms:.2f} ms/step = {100 * share:.1f} % of its time")
sync = dp["sync_bn_total_images_per_s"]
print(f"{str(dp['ranks']) + ' ranks total, --sync-bn':34}{sync:10.1f} images/s = {100 * sync / total:.1f} % of per-rank BN's; "
      f"{sync / single:.2f}x 1 rank")
PY
