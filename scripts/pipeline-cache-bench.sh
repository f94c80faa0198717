#!/usr/bin/env bash
# First-step time of `senet bench` with our pipeline cache and the driver's shader cache (Mesa's;
# NVIDIA's through the same rows) each cold or warm, in one sitting (docs/performance.md). Caches live in a temporary folder, never the user's.
# Usage: scripts/pipeline-cache-bench.sh [senet binary] [bench arguments…]
set -euo pipefail
bin=${1:-target/debug/senet}
shift || true
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--model se-resnet20 --batch-size 8 --steps 1)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
first() { # label, env…, then -- and senet flags
  local label=$1; shift
  local envs=(); while [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
  local s
  s=$(env "${envs[@]}" "$bin" --tune off "$@" bench "${args[@]}" | awk '/^first step/ {print $3}')
  printf '%-40s %8s s\n' "$label" "$s"
}
export XDG_CACHE_HOME=$tmp/ours
# Our pipeline cache lives beside the tuning cache: a SENET_TUNE_CACHE set by the caller
# (scripts/gpu-bench.sh sets one) would hand every row below that folder's warm cache.
unset SENET_TUNE_CACHE
# The driver's own cache: Mesa's, or (the same rows) NVIDIA's, moved or turned off alike.
off=(MESA_SHADER_CACHE_DISABLE=true __GL_SHADER_DISK_CACHE=0)
on=(MESA_SHADER_CACHE_DIR=$tmp/mesa __GL_SHADER_DISK_CACHE_PATH=$tmp/mesa)
first "neither cache" "${off[@]}" -- --pipeline-cache off
first "both cold" "${on[@]}" -- --pipeline-cache auto
{ ls -l "$tmp"/ours/senet-wgpu/ || true; } | sed 's/^/  /'
first "ours warm, Mesa's off" "${off[@]}" -- --pipeline-cache auto
first "Mesa's warm, ours off" "${on[@]}" -- --pipeline-cache off
first "both warm" "${on[@]}" -- --pipeline-cache auto
