#!/usr/bin/env bash
# Train every model senet-wgpu builds for one short run on the same data, recipe and seed, and
# print a Markdown table of parameters, the last epoch's train loss and accuracy (running, in
# training mode), the best test accuracy (eval mode, BN running statistics) and wall time.
#
#   scripts/train_all_models.sh OUT_ROOT [extra `senet train` flags…]
#
# SENET (default: target/release/senet) picks the binary; MODELS overrides the model list.
# Example (what docs/runs/all-models-sample.md records, on lavapipe):
#   scripts/train_all_models.sh runs/all --dataset sample --limit-train 1000 --epochs 2 --batch-size 32
set -euo pipefail
out=${1:?usage: $0 OUT_ROOT [senet train flags...]}
shift
senet=${SENET:-target/release/senet}
models=${MODELS:-"senet resnet20 se-resnet20 resnet32 se-resnet32 resnet44 se-resnet44 resnet56 se-resnet56 \
resnet110 se-resnet110 resnet18 se-resnet18 resnet34 se-resnet34 resnet50 se-resnet50 resnet101 se-resnet101 \
resnet152 se-resnet152"}
mkdir -p "$out"
table="$out/results.md"
echo "| model | parameters | train loss | train accuracy | best test accuracy | wall s |" >"$table"
echo "|---|---:|---:|---:|---:|---:|" >>"$table"
for m in $models; do
    start=$(date +%s.%N)
    "$senet" train --model "$m" --out "$out/$m" "$@" >"$out/$m.log" 2>&1 || {
        echo "| $m | failed: see $out/$m.log | | | | |" >>"$table"
        continue
    }
    secs=$(echo "$(date +%s.%N) - $start" | bc)
    # Last line of metrics.csv: epoch,train_loss,train_acc,test_loss,test_acc,...
    IFS=, read -r _ loss train_acc _ _ _ < <(tail -n 1 "$out/$m/metrics.csv")
    acc=$(tail -n +2 "$out/$m/metrics.csv" | cut -d, -f5 | sort -g | tail -n 1)
    # The run's first line: "<model> width … on <data>: <N> params | …"
    params=$(grep -m1 -o '[0-9]* params' "$out/$m.log" | cut -d' ' -f1)
    printf "| %s | %s | %.4f | %.4f | %.4f | %.0f |\n" "$m" "$params" "$loss" "$train_acc" "$acc" "$secs" >>"$table"
done
cat "$table"
