"""Whole-run divergence inputs for senet-wgpu's tests (run once, by hand, where PyTorch is installed).

One initial state, one fixed sequence of batches, K Adam steps of the base SENet run twice in
PyTorch (--steps K, --batch, --snap to change them for experiments): in float64 (the truth, as far as a computer has one) and in float32 (what a PyTorch user
gets). tests/divergence.rs runs the same K steps on our GPU (f32) and on our f64 CPU reference and
asks how far each drifts from PyTorch float64 compared with PyTorch float32.

The data are the first POOL training images of the bundled Fashion-MNIST sample
(assets/fashion-mnist-sample, pixels / 255 in float32), read by the test itself; only the batch
indices are stored. Model: base SENet at width 1/16 (4, 8, 16, 32, 64 channels, SE 64 -> 4 -> 64),
1x28x28 inputs pooled 28 -> 14 -> 7 -> 3 -> 1, 10 classes; batch BATCH; Adam lr 1e-3 (the seed
recipe), train mode throughout.

Writes to --out (default tests/golden/divergence):

  init.safetensors        the initial state dict (float32, PyTorch names)
  run.safetensors         batches [K, BATCH] int32 (indices into the pool), x_sum (float64 sum of
                          the pool's pixels, so the test knows it read the same images),
                          loss64 / loss32 [K] (each step's loss), and at every SNAP-th step s:
                          f64.<s>.<name> (float64 state dict) and f32.<s>.<name> (float32)

    python3 scripts/torch_divergence.py
"""
import argparse
import gzip
import os
import sys

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from torch_golden import senet  # noqa: E402

K, BATCH, POOL, SNAP = 300, 16, 1024, 50
SAMPLE = os.path.join(os.path.dirname(__file__), "..", "assets", "fashion-mnist-sample")


def idx(path, header):
    with gzip.open(path, "rb") as f:
        data = f.read()
    return np.frombuffer(data, dtype=np.uint8, offset=header)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/golden/divergence")
    ap.add_argument("--steps", type=int, default=K)
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--snap", type=int, default=SNAP)
    ap.add_argument("--pool", type=int, default=POOL, help="images of the sample to draw batches from")
    ap.add_argument("--width", type=float, default=1 / 16)
    ap.add_argument("--save-final", action="store_true", help="also write final64/final32.safetensors (for eval)")
    args = ap.parse_args()
    steps, batch, snap, pool, width = args.steps, args.batch, args.snap, args.pool, args.width
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)

    images = idx(os.path.join(SAMPLE, "train-images-idx3-ubyte.gz"), 16)[: pool * 784]
    labels = idx(os.path.join(SAMPLE, "train-labels-idx1-ubyte.gz"), 8)[:pool]
    x32 = torch.from_numpy(images.copy()).float().reshape(pool, 1, 28, 28) / 255.0
    y = torch.from_numpy(labels.astype(np.int64))

    # Epochs of seeded permutations, cut into K batches.
    g = torch.Generator().manual_seed(1)
    order = torch.cat([torch.randperm(pool, generator=g) for _ in range(steps * batch // pool + 1)])
    batches = order[: steps * batch].reshape(steps, batch)

    model = senet(num_classes=10, in_channels=1, width=width)
    init = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    save_file(init, os.path.join(args.out, "init.safetensors"))

    out = {"batches": batches.to(torch.int32).contiguous(), "x_sum": x32.double().sum().reshape(1)}
    for dtype, tag in ((torch.float64, "f64"), (torch.float32, "f32")):
        m = senet(num_classes=10, in_channels=1, width=width)
        m.load_state_dict(init)
        m = m.to(dtype).train()
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        x = x32.to(dtype)
        losses = []
        for s in range(1, steps + 1):
            b = batches[s - 1]
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(m(x[b]), y[b])
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if s % snap == 0 or s == steps:
                for k, v in m.state_dict().items():
                    if v.is_floating_point():
                        out[f"{tag}.{s}.{k}"] = v.detach().clone().contiguous()
        out[f"loss{tag[1:]}"] = torch.tensor(losses, dtype=torch.float64)
        if args.save_final:
            final = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in m.state_dict().items()}
            save_file(final, os.path.join(args.out, f"final{tag[1:]}.safetensors"))
        print(f"{tag}: loss {losses[0]:.6f} -> {losses[-1]:.6f}")
    save_file(out, os.path.join(args.out, "run.safetensors"))
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {n} parameters, {steps} steps of batch {batch}, snapshots every {snap}")


if __name__ == "__main__":
    main()
