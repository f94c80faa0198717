#!/usr/bin/env python3
"""PyTorch's side of `senet bench --data-only`: torchvision's ImageFolder through a DataLoader
with the same transforms (training: RandomResizedCrop + RandomHorizontalFlip + ToTensor +
Normalize; evaluation: Resize(floor(size / crop_pct)) + CenterCrop + ToTensor + Normalize), timed
over the same number of batches. Prints one JSON line with the keys senet's report uses.

    python3 scripts/pytorch_loader_bench.py DIR [--image-size 224] [--batch-size 128]
        [--steps 10] [--workers 2]

Compare, on a quiet machine, with:
    senet bench --data-only --dataset folder --data-dir DIR --image-size 224 --batch-size 128 \
        --steps 10 --workers 2 --json
"""
import argparse
import json
import math
import os
import time

import torch
import torchvision.transforms as T
from torchvision.datasets import ImageFolder

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def timed(ds, batch, steps, workers, shuffle):
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=shuffle, num_workers=workers)
    t = time.perf_counter()
    n = 0
    for k, (x, _) in enumerate(loader):
        n += x.shape[0]
        if k + 1 == steps:
            break
    return n, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--crop-pct", type=float, default=0.875)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    s = args.image_size
    train_tf = T.Compose([T.RandomResizedCrop(s), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    eval_tf = T.Compose(
        [T.Resize(math.floor(s / args.crop_pct)), T.CenterCrop(s), T.ToTensor(), T.Normalize(MEAN, STD)]
    )
    evaldir = os.path.join(args.dir, "val" if os.path.isdir(os.path.join(args.dir, "val")) else "test")
    nt, tt = timed(ImageFolder(os.path.join(args.dir, "train"), train_tf), args.batch_size, args.steps, args.workers, True)
    ne, te = timed(ImageFolder(evaldir, eval_tf), args.batch_size, args.steps, args.workers, False)
    print(
        json.dumps(
            {
                "loader": f"torch {torch.__version__} DataLoader(ImageFolder), num_workers={args.workers}",
                "workers": args.workers,
                "batch": args.batch_size,
                "train_images": nt,
                "train_images_per_s": nt / tt,
                "eval_images": ne,
                "eval_images_per_s": ne / te,
            }
        )
    )


if __name__ == "__main__":
    main()
