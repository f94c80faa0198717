"""PyTorch throughput of our models, for side-by-side figures with `senet bench` on the same GPU
(scripts/gpu-bench.sh runs both). Train step = forward + cross-entropy + backward + Adam(lr=1e-3)
in train mode; eval = forward in eval mode under no_grad; random inputs; timed with device
synchronisation after warm-up steps.

Each case is MODEL:WIDTH:BATCH:HW (3 input channels; 10 classes for CIFAR-sized inputs, 1000 at
ImageNet sizes, as `senet bench` takes them from the script). Modes:
  fp32   float32 with TF32 off — the arithmetic our f32 kernels do
  tf32   float32 with TF32 tensor cores on (PyTorch's default for convolutions)
  amp    torch.autocast float16 with a GradScaler, as users run mixed precision
On CUDA each mode is timed in NCHW and channels_last and the faster is reported (which one, too).
One JSON line per case and mode.

    python3 scripts/torch_bench_cuda.py --cases senet:1.0:128:32 se-resnet50:1.0:64:224
    python3 scripts/torch_bench_cuda.py --device cpu --modes fp32 --cases senet:0.25:16:32   # no GPU
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(__file__))
from torch_golden import senet  # noqa: E402
from torch_resnet import resnet  # noqa: E402


def build(name, width, classes):
    if name == "senet":
        return senet(classes, 3, width)
    return resnet(name, classes, 3, width)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev, warmup, steps):
    for _ in range(warmup):
        fn()
    sync(dev)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(dev)
    return (time.perf_counter() - t) / steps


def measure(case, mode, channels_last, dev, warmup, steps):
    name, width, batch, hw = case
    classes = 1000 if hw >= 128 else 10
    # fp32: TF32 off everywhere. tf32: on. amp: PyTorch's defaults (cuDNN convolutions may use
    # TF32 for what autocast leaves in float32), as users run mixed precision.
    torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
    torch.backends.cudnn.allow_tf32 = mode != "fp32"
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build(name, width, classes).to(dev).to(memory_format=fmt)
    x = torch.rand(batch, 3, hw, hw, device=dev).to(memory_format=fmt)
    y = torch.randint(0, classes, (batch,), device=dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    amp = mode == "amp"
    scaler = torch.amp.GradScaler(dev.type, enabled=amp)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.float16, enabled=amp):
            loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    model.train()
    t_train = timed(step, dev, warmup, steps)
    model.eval()

    def ev():
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.float16, enabled=amp):
            model(x)

    t_eval = timed(ev, dev, warmup, steps)
    return batch / t_train, batch / t_eval


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", nargs="+", default=["senet:1.0:128:32", "senet:0.25:128:32"])
    ap.add_argument("--modes", nargs="+", default=["fp32", "tf32", "amp"], choices=["fp32", "tf32", "amp"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        gpu = torch.cuda.get_device_name()
    else:
        torch.set_num_threads(min(os.cpu_count() or 1, 16))
        gpu = "cpu"
    for spec in args.cases:
        name, width, batch, hw = spec.split(":")
        case = (name, float(width), int(batch), int(hw))
        for mode in args.modes:
            if mode == "amp" and dev.type == "cpu":
                continue
            layouts = [False, True] if dev.type == "cuda" else [False]
            best = None
            for cl in layouts:
                try:
                    train, ev = measure(case, mode, cl, dev, args.warmup, args.steps)
                except Exception as e:  # one layout failing (out of memory) must not lose the other
                    print(f"torch_bench_cuda: {spec} {mode} channels_last={cl}: {e}", file=sys.stderr, flush=True)
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                if best is None or train > best[0]:
                    best = (train, ev, cl)
            if best is None:
                continue
            print(json.dumps({
                "framework": f"pytorch-{dev.type}", "torch": torch.__version__, "device": gpu,
                "model": name, "width": case[1], "batch": case[2], "hw": case[3], "mode": mode,
                "channels_last": best[2],
                "train_images_per_s": round(best[0], 1), "eval_images_per_s": round(best[1], 1),
            }), flush=True)


if __name__ == "__main__":
    main()
