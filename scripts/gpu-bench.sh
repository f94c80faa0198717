#!/usr/bin/env bash
# The one prepared command for a GPU machine: `senet devices`, `senet bench --json` on four models
# in f32 and in f16 (`--precision f16`: AMP's recipe, tensor cores through cooperative matrices
# where the adapter lists them), PyTorch on the same four (scripts/torch_bench_cuda.py: fp32 with
# TF32 off, TF32, AMP = autocast fp16 + GradScaler; channels_last where faster), then one markdown
# table and one JSON file: our f32 beside PyTorch fp32 and TF32, our f16 beside PyTorch AMP, and
# our f16 / f32 speed-up, with the kernel each of our runs chose per convolution pass.
#
#   scripts/gpu-bench.sh [--quick] [--out DIR] [--precisions "f32 f16"]
#
# It runs binaries built elsewhere (a GPU machine may have no Rust toolchain): SENET (default
# target/release/senet, built with `cargo build --release` on a machine like CI's and carried).
# PYTHON (default python3) needs torch; without it the PyTorch columns say so. The Vulkan loader:
# if the machine has none and .gl/*.deb were carried (libvulkan1 & co. downloaded with apt-get
# download), they are unpacked first; NVIDIA's ICD is used from
# /usr/local/nvidia when no other is registered.
#
# Full run (a GPU): senet w1 b128 and w0.25 b128 at 3x32x32, se-resnet20 b128 at 32x32, se-resnet50
# b64 at 224x224 (1000 classes), each in both precisions, and se-resnet50 once more with each of
# `--fuse off` (fused epilogues off), `--conv-lanes on` (shared conv loads), `--conv-1x1 off`
# (1x1 convolutions through the general GEMM), `--joint-backward off` (a convolution's two
# gradients as two dispatches), `--se-split off` (SE blocks a workgroup per sample), `--bn-split
# on` (training batch norms sliced over workgroups) and `--bn-apply off` (batch norms writing the
# output the workgroup-tile convolutions after them otherwise apply on load) in the first precision, and scripts/pipeline-cache-bench.sh's cold
# and warm first steps; every command under a timeout (devices 20 s, each bench 50 s, each variant
# 18 s, the pipeline cache 25 s) and PyTorch last with what is left of 9.75 minutes (at least 60 s;
# cuDNN's autotuning of SE-ResNet-50 in three modes and two layouts took over 100 s on an H200, and
# our steps there left it about 450 s).
# --quick: the same pipeline with tiny sizes on whatever adapter there is (lavapipe) and PyTorch on
# the CPU, to know it works before a GPU is at hand. Writes DIR/gpu-bench.md and DIR/gpu-bench.json
# (DIR: --out, else $OUT when set, else bench-out).
set -uo pipefail

quick=0
out=${OUT:-bench-out}
precisions="f32 f16"
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1; shift ;;
    --out) out=$2; shift 2 ;;
    --precisions) precisions=$2; shift 2 ;;
    *) echo "gpu-bench.sh: unknown argument $1 (use --quick, --out DIR, --precisions \"f32 f16\")" >&2; exit 2 ;;
  esac
done
# Paths given relative to the caller's folder stay so after the cd to the repository.
mkdir -p "$out" && out=$(realpath "$out")
[ -n "${SENET:-}" ] && SENET=$(realpath "$SENET")
cd "$(dirname "$0")/.."
senet=${SENET:-target/release/senet}
python=${PYTHON:-python3}
[ -x "$senet" ] || { echo "gpu-bench.sh: no $senet (cargo build --release, or set SENET)" >&2; exit 2; }
for p in $precisions; do
  case "$p" in f32|f16) ;; *) echo "gpu-bench.sh: --precisions takes f32 and/or f16, not $p" >&2; exit 2 ;; esac
done
mkdir -p "$out"
start=$(date +%s)

# The Vulkan loader and driver (dpkg -x into / needs root).
if ! grep -q 'libvulkan.so.1' < <(ldconfig -p 2>/dev/null) && ls .gl/*.deb >/dev/null 2>&1; then
  echo "gpu-bench: unpacking the carried Vulkan loader (.gl/*.deb)"
  for f in .gl/*.deb; do dpkg -x "$f" /; done
  ldconfig
fi
nvidia_icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
if [ -z "${VK_DRIVER_FILES:-}" ] && [ -f "$nvidia_icd" ] \
  && ! ls /usr/share/vulkan/icd.d/nvidia*.json /etc/vulkan/icd.d/nvidia*.json >/dev/null 2>&1; then
  export VK_DRIVER_FILES=$nvidia_icd
  export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
fi

if [ $quick = 1 ]; then
  cases="senet:0.25:16:32 senet:0.5:8:32 se-resnet20:1.0:4:32 se-resnet50:0.25:2:64"
  steps=3 torch_args=(--device cpu --modes fp32 --warmup 1 --steps 3) limit=120 torch_limit=150
else
  cases="senet:1.0:128:32 senet:0.25:128:32 se-resnet20:1.0:128:32 se-resnet50:1.0:64:224"
  steps=10 torch_args=(--warmup 5 --steps 20) limit=50 torch_limit=
fi
# The tuner's choices come back with the results (and a rerun on the same machine times nothing).
export SENET_TUNE_CACHE="$out/tune.json"

timeout 20 "$senet" devices > "$out/devices.txt" 2>&1 || { cat "$out/devices.txt"; echo "gpu-bench.sh: senet devices failed" >&2; exit 1; }
cat "$out/devices.txt"
: > "$out/senet.jsonl"
for c in $cases; do
  IFS=: read -r model width batch hw <<< "$c"
  classes=10; [ "$hw" -ge 128 ] && classes=1000
  for prec in $precisions; do
    echo "gpu-bench: senet bench $model width $width batch $batch at ${hw}x${hw} $prec ($(( $(date +%s) - start )) s so far)"
    err="$out/bench-$model-$width-$prec.err"
    if timeout "$limit" "$senet" bench --json --model "$model" --width "$width" --batch-size "$batch" \
      --image-size "$hw" --num-classes "$classes" --steps "$steps" --precision "$prec" > "$out/bench.tmp" 2> "$err"; then
      "$python" -c 'import json,sys; r=json.load(open(sys.argv[1])); r["case"]=sys.argv[2]; print(json.dumps(r))' \
        "$out/bench.tmp" "$c" >> "$out/senet.jsonl" || cat "$out/bench.tmp"
    else
      echo "gpu-bench: senet bench $c $prec failed or ran past ${limit} s:"; tail -5 "$err"
    fi
  done
done
# Seven variants of the last case, in the first precision, beside its default run above (the
# tuning cache makes these runs time nothing): --fuse off (fused epilogues, docs/performance.md),
# --conv-lanes on (shared conv loads: the default on CPU adapters), --conv-1x1 off (its 1x1
# convolutions through the general GEMM), --joint-backward off (each convolution's two gradients
# apart), --se-split off (SE blocks a workgroup per sample, the default on CPU adapters) and
# --bn-split on (batch norms sliced, not yet the default anywhere) and --bn-apply off (batch norms
# write the output the tiles' convolutions otherwise apply as they load); on one H200 the first
# four were within 2 % of the default and --se-split off 0.91x (docs/performance.md).
variant_limit=18; [ $quick = 1 ] && variant_limit=120
IFS=: read -r model width batch hw <<< "${cases##* }"
classes=10; [ "$hw" -ge 128 ] && classes=1000
prec=${precisions%% *}
: > "$out/senet-variants.jsonl"
for variant in "--fuse off" "--conv-lanes on" "--conv-1x1 off" "--joint-backward off" "--se-split off" "--bn-split on" "--bn-apply off"; do
  echo "gpu-bench: senet bench $model width $width batch $batch at ${hw}x${hw} $prec $variant ($(( $(date +%s) - start )) s so far)"
  # shellcheck disable=SC2086
  if timeout "$variant_limit" "$senet" bench --json $variant --model "$model" --width "$width" --batch-size "$batch" \
    --image-size "$hw" --num-classes "$classes" --steps "$steps" --precision "$prec" > "$out/bench.tmp" 2> "$out/bench-variant.err"; then
    "$python" -c 'import json,sys; r=json.load(open(sys.argv[1])); r["case"]=sys.argv[2]; r["variant"]=sys.argv[3]; print(json.dumps(r))' \
      "$out/bench.tmp" "${cases##* }" "$variant" >> "$out/senet-variants.jsonl" || cat "$out/bench.tmp"
  else
    echo "gpu-bench: senet bench $variant failed or ran past ${variant_limit} s:"; tail -5 "$out/bench-variant.err"
  fi
done
rm -f "$out/bench.tmp"

# First-step time with our pipeline cache and the driver's cache each cold or warm.
echo "gpu-bench: pipeline cache ($(( $(date +%s) - start )) s so far)"
# (lavapipe compiles a cold first step for ~40 s: --quick gives it 300.)
cache_limit=25; [ $quick = 1 ] && cache_limit=300
timeout "$cache_limit" bash scripts/pipeline-cache-bench.sh "$senet" > "$out/pipeline-cache.txt" 2>&1 \
  || echo "gpu-bench: pipeline-cache-bench.sh failed or ran past $cache_limit s (see $out/pipeline-cache.txt)"

: > "$out/torch.jsonl"
if "$python" -c 'import torch' 2>/dev/null; then
  if [ -z "$torch_limit" ]; then
    torch_limit=$(( 585 - ($(date +%s) - start) ))
    [ "$torch_limit" -lt 60 ] && torch_limit=60
  fi
  echo "gpu-bench: PyTorch ($(( $(date +%s) - start )) s so far, ${torch_limit} s left to it)"
  # shellcheck disable=SC2086
  timeout "$torch_limit" "$python" scripts/torch_bench_cuda.py --cases $cases "${torch_args[@]}" > "$out/torch.jsonl" \
    2> "$out/torch.err" || { echo "gpu-bench: PyTorch failed or ran past $torch_limit s:"; tail -5 "$out/torch.err"; }
else
  echo "gpu-bench: $python has no torch: PyTorch columns left empty"
fi

"$python" - "$out" "$quick" <<'EOF' || { echo "gpu-bench.sh: writing the report failed" >&2; exit 1; }
import collections, json, os, sys
out, quick = sys.argv[1], sys.argv[2] == "1"
def lines(name):
    path = os.path.join(out, name)
    return [json.loads(l) for l in open(path) if l.strip()] if os.path.exists(path) else []
def norm(c):
    m, w, b, h = c.split(":")
    return f"{m}:{float(w)}:{int(b)}:{int(h)}"
ours = {}  # case -> precision -> senet bench record
for r in lines("senet.jsonl"):
    ours.setdefault(norm(r["case"]), {})[r.get("precision", "f32")] = r
torch = {}  # case -> mode -> PyTorch record
for r in lines("torch.jsonl"):
    torch.setdefault(f'{r["model"]}:{float(r["width"])}:{int(r["batch"])}:{int(r["hw"])}', {})[r["mode"]] = r
devices = open(os.path.join(out, "devices.txt")).read().strip()
selected = [l for l in devices.splitlines() if l.startswith("selected:")]
tdev = next((r["device"] for t in torch.values() for r in t.values()), "no PyTorch")
md = [f"# gpu-bench{' --quick' if quick else ''}", "",
      f"ours: {selected[0][len('selected: '):] if selected else '?'}; PyTorch: {tdev}", "",
      "images/s, train / eval; ratio = ours / PyTorch (train, eval). Our f32 beside PyTorch fp32 (TF32 off: the "
      "arithmetic our f32 kernels do) and TF32; our f16 (--precision f16) beside PyTorch AMP (autocast fp16 + "
      "GradScaler); f16 / f32 = our own speed-up.", "",
      "| model | width | batch | H×W | ours | images/s | PyTorch | images/s | ratio | f16 / f32 |",
      "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
cell = lambda tr, ev: f"{tr:,.0f} / {ev:,.0f}"
pairs = [("f32", "fp32", "fp32 (TF32 off)"), ("f32", "tf32", "TF32"), ("f16", "amp", "AMP fp16")]
rows = []
for key in dict.fromkeys(list(ours) + list(torch)):
    m, w, b, h = key.split(":")
    o, t = ours.get(key, {}), torch.get(key, {})
    for prec, mode, name in pairs:
        mine, theirs = o.get(prec), t.get(mode)
        row = {"case": key, "precision": prec, "torch_mode": mode,
               "ours": mine and {k: mine[k] for k in ("train_images_per_s", "eval_images_per_s", "train_step_gflops",
                                                      "fma_peak_gflops", "gemm_gflops", "first_step_s",
                                                      "peak_memory_bytes", "adapter")},
               "torch": theirs and {k: theirs[k] for k in ("train_images_per_s", "eval_images_per_s", "channels_last")}}
        line = [m, w, b, f"{h}×{h}", prec, cell(mine["train_images_per_s"], mine["eval_images_per_s"]) if mine else "failed"]
        line += [name, cell(theirs["train_images_per_s"], theirs["eval_images_per_s"]) + (" (cl)" if theirs["channels_last"] else "")
                 if theirs else "–"]
        if mine and theirs:
            row["ratio"] = (mine["train_images_per_s"] / theirs["train_images_per_s"],
                            mine["eval_images_per_s"] / theirs["eval_images_per_s"])
            line.append(f"{row['ratio'][0]:.2f} / {row['ratio'][1]:.2f}")
        else:
            line.append("–")
        if prec == "f16" and mine and o.get("f32"):
            row["f16_over_f32"] = (mine["train_images_per_s"] / o["f32"]["train_images_per_s"],
                                   mine["eval_images_per_s"] / o["f32"]["eval_images_per_s"])
            line.append(f"{row['f16_over_f32'][0]:.2f} / {row['f16_over_f32'][1]:.2f}")
        else:
            line.append("")
        md.append("| " + " | ".join(line) + " |")
        rows.append(row)
titles = {"--fuse off": "Fused epilogues", "--conv-lanes on": "Shared conv loads", "--conv-1x1 off": "1x1 plain GEMMs",
          "--joint-backward off": "Joint convolution backward", "--se-split off": "SE blocks split over the GPU",
          "--bn-split on": "Batch norms sliced over the GPU", "--bn-apply off": "Batch norms applied on load"}
for r in lines("senet-variants.jsonl"):
    base = ours.get(norm(r["case"]), {}).get(r.get("precision", "f32"))
    v = r.get("variant", "?")
    line = f"{titles.get(v, v)}: {r['case']} {r.get('precision', 'f32')}: {v} {cell(r['train_images_per_s'], r['eval_images_per_s'])}"
    if base:
        line += (f", default {cell(base['train_images_per_s'], base['eval_images_per_s'])}: default / {v} "
                 f"{base['train_images_per_s'] / r['train_images_per_s']:.2f} / {base['eval_images_per_s'] / r['eval_images_per_s']:.2f}")
    md += ["", line + " images/s (train / eval)."]
md += ["", "(cl) = PyTorch ran faster in channels_last. Per run of ours: step GFLOP/s, the device's FMA peak, "
       "and the kernel each convolution pass ran (the tuner's choice; coop = tensor cores):", ""]
for key, by_prec in ours.items():
    for prec, o in by_prec.items():
        kernels = collections.Counter(f'{r["pass"]} {r["kernel"]}' for r in o.get("conv_layers", []))
        chosen = "; ".join(f"{n}× {k}" for k, n in sorted(kernels.items()))
        md.append(f"- {key} {prec}: step {o['train_step_gflops']:.0f} GFLOP/s, FMA peak {o['fma_peak_gflops']:.0f}, "
                  f"our conv GEMM {o['gemm_gflops']:.0f}, first step {o['first_step_s']:.1f} s, peak memory "
                  f"{o['peak_memory_bytes'] / 2**20:.0f} MiB; convs: {chosen or '?'}")
md += ["", "```", devices, "```"]
open(os.path.join(out, "gpu-bench.md"), "w").write("\n".join(md) + "\n")
json.dump({"quick": quick, "devices": devices, "rows": rows, "senet_variants": lines("senet-variants.jsonl"),
           "senet": [r for p in ours.values() for r in p.values()], "torch": lines("torch.jsonl")},
          open(os.path.join(out, "gpu-bench.json"), "w"), indent=1)
print("\n".join(md))
EOF
echo "gpu-bench: wrote $out/gpu-bench.md and $out/gpu-bench.json in $(( $(date +%s) - start )) s"
