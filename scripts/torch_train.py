"""The seed recipe in PyTorch, for side-by-side runs with `senet train` (scripts/compare_runs.sh).

Base SENet (the module of scripts/torch_golden.py, same state-dict names as ours) on an IDX
dataset (Fashion-MNIST/MNIST, gzipped or raw): pixels / 255 and nothing else, Adam (lr 1e-3 by
default), a fresh seeded shuffle every epoch, the last partial batch trained, every test image
evaluated, batch norm in eval mode for testing — what `senet train` does by default.

    python3 scripts/torch_train.py --data-dir assets/fashion-mnist-sample --width 0.25 --epochs 5 --seed 0

Prints one CSV line per epoch (epoch, train_loss, train_acc, test_loss, test_acc, seconds) and, last,
a JSON line {"final_test_acc": ..., "best_test_acc": ..., "seconds": ...}. `--save FILE` writes the final
state dict (safetensors, the same names as ours) for `senet eval --checkpoint FILE`.
"""
import argparse
import gzip
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(__file__))
from torch_golden import senet  # noqa: E402


def idx(path):
    """An IDX file (gzipped or raw) as a numpy array of its declared shape."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def find(d, stem):
    for name in (stem + ".gz", stem):
        if os.path.exists(os.path.join(d, name)):
            return os.path.join(d, name)
    sys.exit(f"{d}: no {stem}[.gz]")


def split(d, prefix, limit):
    x = idx(find(d, f"{prefix}-images-idx3-ubyte"))
    y = idx(find(d, f"{prefix}-labels-idx1-ubyte"))
    if limit:
        x, y = x[:limit], y[:limit]
    x = torch.from_numpy(x.copy()).float().unsqueeze(1) / 255.0
    return x, torch.from_numpy(y.astype(np.int64))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit-train", type=int, default=0)
    ap.add_argument("--limit-test", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save", default="", help="write the final state dict here (safetensors, our names)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    xtr, ytr = split(args.data_dir, "train", args.limit_train)
    xte, yte = split(args.data_dir, "t10k", args.limit_test)
    model = senet(num_classes=10, in_channels=1, width=args.width)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(args.seed)
    best, start = 0.0, time.time()
    print("epoch,train_loss,train_acc,test_loss,test_acc,seconds")
    for epoch in range(1, args.epochs + 1):
        t0 = time.time()
        model.train()
        perm = torch.randperm(len(ytr), generator=g)
        loss_sum, correct = 0.0, 0
        for i in range(0, len(ytr), args.batch_size):
            b = perm[i : i + args.batch_size]
            logits = model(xtr[b])
            loss = nn.functional.cross_entropy(logits, ytr[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(b)
            correct += (logits.argmax(1) == ytr[b]).sum().item()
        model.eval()
        tl, tc = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(yte), 1000):
                logits = model(xte[i : i + 1000])
                tl += nn.functional.cross_entropy(logits, yte[i : i + 1000], reduction="sum").item()
                tc += (logits.argmax(1) == yte[i : i + 1000]).sum().item()
        acc = tc / len(yte)
        best = max(best, acc)
        print(f"{epoch},{loss_sum / len(ytr):.6f},{correct / len(ytr):.6f},{tl / len(yte):.6f},{acc:.6f},{time.time() - t0:.1f}")
    if args.save:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, args.save)
    print(json.dumps({"final_test_acc": acc, "best_test_acc": best, "seconds": round(time.time() - start, 1)}))


if __name__ == "__main__":
    main()
