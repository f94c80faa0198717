#!/usr/bin/env bash
# N seeds of `senet train` beside N seeds of the same recipe in PyTorch (scripts/torch_train.py),
# then means, spread and the difference of means with its standard error: is a gap between us and
# PyTorch more than seed noise?
#
#   scripts/compare_runs.sh [--dataset sample|fashion-mnist] [--seeds 5] [--first-seed 0] [--epochs 5] [--width 0.25]
#                           [--batch-size 128] [--limit-train N] [--limit-test N] [--out docs/runs/x.md]
#
# Environment: SENET (default target/release/senet), PYTHON (default python3, needs torch + numpy).
# Base SENet, the seed recipe (Adam 1e-3, pixels/255, no augmentation), on the same images both
# sides; initial weights and shuffles differ by seed on each side (that is the noise measured).
set -euo pipefail
cd "$(dirname "$0")/.."

dataset=sample first_seed=0 seeds=5 epochs=5 width=0.25 batch=128 limit_train=0 limit_test=0 out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dataset) dataset=$2; shift 2 ;;
    --seeds) seeds=$2; shift 2 ;;
    --first-seed) first_seed=$2; shift 2 ;;
    --epochs) epochs=$2; shift 2 ;;
    --width) width=$2; shift 2 ;;
    --batch-size) batch=$2; shift 2 ;;
    --limit-train) limit_train=$2; shift 2 ;;
    --limit-test) limit_test=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "compare_runs.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
senet=${SENET:-target/release/senet}
python=${PYTHON:-python3}
case "$dataset" in
  sample) data_dir=assets/fashion-mnist-sample ;;
  fashion-mnist) data_dir=/usr/share/datasets/fashion-mnist ;;
  *) echo "compare_runs.sh: --dataset sample|fashion-mnist" >&2; exit 2 ;;
esac
[ -x "$senet" ] || { echo "compare_runs.sh: $senet not built (cargo build --release)" >&2; exit 2; }
"$python" -c 'import torch' 2>/dev/null || { echo "compare_runs.sh: $python has no torch" >&2; exit 2; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
limits=()
[ "$limit_train" != 0 ] && limits+=(--limit-train "$limit_train")
[ "$limit_test" != 0 ] && limits+=(--limit-test "$limit_test")
results="$work/results.csv"
echo "side,seed,final,best,seconds" > "$results"
for seed in $(seq "$first_seed" $((first_seed + seeds - 1))); do
  # Alternate the two sides so a change in machine load touches both alike.
  t0=$(date +%s.%N)
  "$senet" train --dataset "$dataset" --data-dir "$data_dir" --width "$width" --epochs "$epochs" \
    --batch-size "$batch" --seed "$seed" "${limits[@]}" --out "$work/ours-$seed" > "$work/ours-$seed.log" 2>&1
  t1=$(date +%s.%N)
  "$python" - "$work/ours-$seed/metrics.csv" "$seed" "$(echo "$t1 - $t0" | bc)" >> "$results" <<'EOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
accs = [float(r["test_acc"]) for r in rows]
print(f"ours,{sys.argv[2]},{accs[-1]},{max(accs)},{float(sys.argv[3]):.1f}")
EOF
  "$python" scripts/torch_train.py --data-dir "$data_dir" --width "$width" --epochs "$epochs" \
    --batch-size "$batch" --seed "$seed" "${limits[@]}" > "$work/torch-$seed.log"
  t2=$(date +%s.%N)
  "$python" - "$work/torch-$seed.log" "$seed" "$(echo "$t2 - $t1" | bc)" >> "$results" <<'EOF'
import json, sys
r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
print(f"pytorch,{sys.argv[2]},{r['final_test_acc']},{r['best_test_acc']},{float(sys.argv[3]):.1f}")
EOF
  tail -2 "$results" | sed 's/^/compare_runs: /' >&2
done

"$python" - "$results" "$dataset" "$seeds" "$epochs" "$width" "$batch" "$limit_train" "$limit_test" <<'EOF' | tee "${out:-/dev/null}"
import csv, math, sys
path, dataset, seeds, epochs, width, batch, lt, lte = sys.argv[1:]
rows = list(csv.DictReader(open(path)))
def stats(side, key):
    v = [float(r[key]) for r in rows if r["side"] == side]
    m = sum(v) / len(v)
    s = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else float("nan")
    return v, m, s
print(f"# ours vs PyTorch: base SENet width {width}, {dataset}"
      f"{' (first ' + lt + ' train' if lt != '0' else ''}{', first ' + lte + ' test)' if lte != '0' else (')' if lt != '0' else '')}, "
      f"{epochs} epochs, batch {batch}, Adam 1e-3, no augmentation, {seeds} seeds each\n")
print("| side | seed | final test acc | best test acc | seconds |")
print("| --- | --- | --- | --- | --- |")
for r in rows:
    print(f"| {r['side']} | {r['seed']} | {float(r['final']):.4f} | {float(r['best']):.4f} | {r['seconds']} |")
print()
print("| | ours mean ± sd | PyTorch mean ± sd | difference ± s.e. | difference / s.e. |")
print("| --- | --- | --- | --- | --- |")
for key, label in (("final", "final test acc"), ("best", "best test acc")):
    a, ma, sa = stats("ours", key)
    b, mb, sb = stats("pytorch", key)
    se = math.sqrt(sa * sa / len(a) + sb * sb / len(b))
    print(f"| {label} | {ma:.4f} ± {sa:.4f} | {mb:.4f} ± {sb:.4f} | {ma - mb:+.4f} ± {se:.4f} | {(ma - mb) / se if se > 0 else float('nan'):+.2f} |")
print(f"\nwall seconds per run (process start to exit, data loading included): ours {stats('ours', 'seconds')[1]:.0f}, "
      f"PyTorch {stats('pytorch', 'seconds')[1]:.0f} (means)")
EOF
