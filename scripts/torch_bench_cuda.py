"""PyTorch CUDA throughput of the base SENet, for side-by-side figures with `senet bench` on the
same GPU: fp32 with TF32 off (the arithmetic our kernels do), batch 128, 3x32x32, Adam(lr=1e-3)
train step and eval, timed with CUDA synchronisation. One JSON line per width.

    python3 scripts/torch_bench_cuda.py --widths 1.0 0.25
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


def timed(fn, warmup, steps):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", type=float, nargs="+", default=[1.0, 0.25])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    dev = torch.device("cuda")
    for w in args.widths:
        torch.manual_seed(0)
        model = senet(10, 3, w).to(dev)
        x = torch.rand(args.batch, 3, 32, 32, device=dev)
        y = torch.randint(0, 10, (args.batch,), device=dev)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        loss_fn = nn.CrossEntropyLoss()
        model.train()

        def step():
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()

        t_train = timed(step, 5, args.steps)
        model.eval()

        def ev():
            with torch.no_grad():
                model(x)

        t_eval = timed(ev, 5, args.steps)
        print(json.dumps({
            "framework": "pytorch-cuda", "torch": torch.__version__, "gpu": torch.cuda.get_device_name(),
            "width": w, "batch": args.batch, "tf32": False,
            "train_images_per_s": round(args.batch / t_train, 1), "eval_images_per_s": round(args.batch / t_eval, 1),
        }), flush=True)


if __name__ == "__main__":
    main()
