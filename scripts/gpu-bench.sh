#!/usr/bin/env bash
# The one prepared command for a GPU machine: `senet devices`, `senet bench --json` on four models,
# PyTorch on the same four (scripts/torch_bench_cuda.py: fp32 with TF32 off, TF32, AMP fp16;
# channels_last where faster), then one markdown table and one JSON file with our ratio to each.
#
#   scripts/gpu-bench.sh [--quick] [--out DIR]
#
# It runs binaries built elsewhere (a GPU machine may have no Rust toolchain): SENET (default
# target/release/senet, built with `cargo build --release` on a machine like CI's and carried).
# PYTHON (default python3) needs torch; without it the PyTorch columns say so. The Vulkan loader:
# if the machine has none and .gl/*.deb were carried (../.library device notes: libvulkan1 & co.
# downloaded with apt-get download), they are unpacked first; NVIDIA's ICD is used from
# /usr/local/nvidia when no other is registered.
#
# Full run (a GPU): senet w1 b128 and w0.25 b128 at 3x32x32, se-resnet20 b128 at 32x32, se-resnet50
# b64 at 224x224 (1000 classes); every command under a timeout (devices 30 s, each bench 60 s,
# PyTorch 100 s) so the whole stays inside 6 minutes.
# --quick: the same pipeline with tiny sizes on whatever adapter there is (lavapipe) and PyTorch on
# the CPU, to know it works before a GPU is at hand. Writes DIR/gpu-bench.md and DIR/gpu-bench.json
# (DIR: --out, else $OUT when set, else bench-out).
set -uo pipefail

quick=0
out=${OUT:-bench-out}
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1; shift ;;
    --out) out=$2; shift 2 ;;
    *) echo "gpu-bench.sh: unknown argument $1 (use --quick, --out DIR)" >&2; exit 2 ;;
  esac
done
# Paths given relative to the caller's folder stay so after the cd to the repository.
mkdir -p "$out" && out=$(realpath "$out")
[ -n "${SENET:-}" ] && SENET=$(realpath "$SENET")
cd "$(dirname "$0")/.."
senet=${SENET:-target/release/senet}
python=${PYTHON:-python3}
[ -x "$senet" ] || { echo "gpu-bench.sh: no $senet (cargo build --release, or set SENET)" >&2; exit 2; }
mkdir -p "$out"
start=$(date +%s)

# The Vulkan loader and driver (dpkg -x into / needs root, as the device machines run commands).
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
  steps=10 torch_args=(--warmup 5 --steps 20) limit=60 torch_limit=100
fi
# The tuner's choices come back with the results (and a rerun on the same machine times nothing).
export SENET_TUNE_CACHE="$out/tune.json"

timeout 30 "$senet" devices > "$out/devices.txt" 2>&1 || { cat "$out/devices.txt"; echo "gpu-bench.sh: senet devices failed" >&2; exit 1; }
cat "$out/devices.txt"
: > "$out/senet.jsonl"
for c in $cases; do
  IFS=: read -r model width batch hw <<< "$c"
  classes=10; [ "$hw" -ge 128 ] && classes=1000
  echo "gpu-bench: senet bench $model width $width batch $batch at ${hw}x${hw} ($(( $(date +%s) - start )) s so far)"
  if timeout "$limit" "$senet" bench --json --model "$model" --width "$width" --batch-size "$batch" \
    --image-size "$hw" --num-classes "$classes" --steps "$steps" > "$out/bench.tmp" 2> "$out/bench-$model-$width.err"; then
    "$python" -c 'import json,sys; r=json.load(open(sys.argv[1])); r["case"]=sys.argv[2]; print(json.dumps(r))' \
      "$out/bench.tmp" "$c" >> "$out/senet.jsonl" || cat "$out/bench.tmp"
  else
    echo "gpu-bench: senet bench $c failed or ran past ${limit} s:"; tail -5 "$out/bench-$model-$width.err"
  fi
done
rm -f "$out/bench.tmp"

: > "$out/torch.jsonl"
if "$python" -c 'import torch' 2>/dev/null; then
  echo "gpu-bench: PyTorch ($(( $(date +%s) - start )) s so far)"
  # shellcheck disable=SC2086
  timeout "$torch_limit" "$python" scripts/torch_bench_cuda.py --cases $cases "${torch_args[@]}" > "$out/torch.jsonl" \
    2> "$out/torch.err" || { echo "gpu-bench: PyTorch failed or ran past $torch_limit s:"; tail -5 "$out/torch.err"; }
else
  echo "gpu-bench: $python has no torch: PyTorch columns left empty"
fi

"$python" - "$out" "$quick" <<'EOF' || { echo "gpu-bench.sh: writing the report failed" >&2; exit 1; }
import json, os, sys
out, quick = sys.argv[1], sys.argv[2] == "1"
def lines(name):
    path = os.path.join(out, name)
    return [json.loads(l) for l in open(path) if l.strip()] if os.path.exists(path) else []
ours = {r["case"]: r for r in lines("senet.jsonl")}
torch = {}
for r in lines("torch.jsonl"):
    key = f'{r["model"]}:{r["width"]}:{r["batch"]}:{r["hw"]}'
    torch.setdefault(key, {})[r["mode"]] = r
def norm(c):
    m, w, b, h = c.split(":")
    return f"{m}:{float(w)}:{int(b)}:{int(h)}"
devices = open(os.path.join(out, "devices.txt")).read().strip()
selected = [l for l in devices.splitlines() if l.startswith("selected:")]
tdev = next((r["device"] for t in torch.values() for r in t.values()), "no PyTorch")
md = [f"# gpu-bench{' --quick' if quick else ''}", "",
      f"ours: {selected[0][len('selected: '):] if selected else '?'}; PyTorch: {tdev}", "",
      "images/s, train / eval; ratio = ours / PyTorch (train, eval)", "",
      "| model | width | batch | H×W | ours | PyTorch fp32 (TF32 off) | ratio | PyTorch TF32 | ratio | PyTorch AMP fp16 | ratio |",
      "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
rows = []
cases = list(dict.fromkeys(list(ours.keys()) + [k for k in torch]))
seen = set()
for c in cases:
    key = norm(c)
    if key in seen:
        continue
    seen.add(key)
    o = next((v for k, v in ours.items() if norm(k) == key), None)
    t = torch.get(key, {})
    m, w, b, h = key.split(":")
    cell = lambda tr, ev: f"{tr:,.0f} / {ev:,.0f}"
    row = {"case": key, "ours": o and {k: o[k] for k in ("train_images_per_s", "eval_images_per_s", "train_step_gflops",
                                                           "fma_peak_gflops", "gemm_gflops", "first_step_s", "peak_memory_bytes", "adapter")}}
    line = [m, w, b, f"{h}×{h}", cell(o["train_images_per_s"], o["eval_images_per_s"]) if o else "failed"]
    for mode in ("fp32", "tf32", "amp"):
        r = t.get(mode)
        if r:
            line.append(cell(r["train_images_per_s"], r["eval_images_per_s"]) + (" (cl)" if r["channels_last"] else ""))
            if o:
                ratio = (o["train_images_per_s"] / r["train_images_per_s"], o["eval_images_per_s"] / r["eval_images_per_s"])
                line.append(f"{ratio[0]:.2f} / {ratio[1]:.2f}")
                row[f"ratio_{mode}"] = ratio
            else:
                line.append("–")
            row[f"torch_{mode}"] = {k: r[k] for k in ("train_images_per_s", "eval_images_per_s", "channels_last")}
        else:
            line += ["–", "–"]
    md.append("| " + " | ".join(line) + " |")
    rows.append(row)
md += ["", "(cl) = PyTorch ran faster in channels_last. Our step GFLOP/s and the device's FMA peak (senet bench):", ""]
for c, o in ours.items():
    md.append(f"- {c}: step {o['train_step_gflops']:.0f} GFLOP/s, FMA peak {o['fma_peak_gflops']:.0f}, our conv GEMM "
              f"{o['gemm_gflops']:.0f}, first step {o['first_step_s']:.1f} s, peak memory {o['peak_memory_bytes'] / 2**20:.0f} MiB")
md += ["", "```", devices, "```"]
open(os.path.join(out, "gpu-bench.md"), "w").write("\n".join(md) + "\n")
json.dump({"quick": quick, "devices": devices, "rows": rows, "senet": list(ours.values()), "torch": lines("torch.jsonl")},
          open(os.path.join(out, "gpu-bench.json"), "w"), indent=1)
print("\n".join(md))
EOF
echo "gpu-bench: wrote $out/gpu-bench.md and $out/gpu-bench.json in $(( $(date +%s) - start )) s"
