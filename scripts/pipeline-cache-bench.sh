#!/usr/bin/env bash
# First-step time of `senet bench` with our pipeline cache and Mesa's shader cache each cold or
# warm, in one sitting (docs/performance.md). Caches live in a temporary folder, never the user's.
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
first "neither cache" MESA_SHADER_CACHE_DISABLE=true -- --pipeline-cache off
first "both cold" MESA_SHADER_CACHE_DIR=$tmp/mesa -- --pipeline-cache auto
ls -l "$tmp"/ours/senet-wgpu/ | sed 's/^/  /'
first "ours warm, Mesa's off" MESA_SHADER_CACHE_DISABLE=true -- --pipeline-cache auto
first "Mesa's warm, ours off" MESA_SHADER_CACHE_DIR=$tmp/mesa -- --pipeline-cache off
first "both warm" MESA_SHADER_CACHE_DIR=$tmp/mesa -- --pipeline-cache auto
