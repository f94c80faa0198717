#!/usr/bin/env python3
"""Goldens for src/data/augment.rs's TrivialAugmentWide (`--aa trivialaugment`): torchvision's ops on
PIL images. timm 1.0.31 has no TrivialAugment, so the definition is torchvision's
`transforms.TrivialAugmentWide` (num_magnitude_bins=31, interpolation NEAREST, fill None = 0).

  magnitudes  each op's 31 magnitudes as TrivialAugmentWide's `_augmentation_space` holds them
              (float32 linspace / the posterize bits), as float(tensor[i].item())
  op          torchvision.transforms.autoaugment._apply_op(img, name, ±magnitude, NEAREST, None) — the
              op TrivialAugmentWide runs, through torchvision's F.* on a PIL image — at several bins
              and both signs of the signed ops, on three images (13×17, 9×12 narrow-range, 10×10 square:
              the square one takes Pillow's transpose path at ±90°)
  wide        whole TrivialAugmentWide()(img) calls with torch.randint replaced by a recorder: the
              draws it made stored beside the output, so the Rust side replays them

Writes tests/golden/trivial_augment/{a,b,c}.png and golden.safetensors (uint8 HWC images; the cases
as JSON in its metadata with the torch, torchvision and Pillow versions).

    python3 scripts/trivial_augment_golden.py [--out tests/golden/trivial_augment]
"""
import argparse
import json
import os

import numpy as np
import PIL
import torch
import torchvision
import torchvision.transforms.autoaugment as taa
from torchvision.transforms import InterpolationMode
from PIL import Image
from safetensors.numpy import save_file

BINS = 31
BIN_CASES = [0, 1, 5, 10, 15, 19, 20, 26, 30]


def photo(rng, h, w):
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w, 3))
    for c in range(3):
        a, b, p = rng.uniform(-1, 1, 3)
        img[..., c] = 128 + 100 * np.sin(a * x / 3 + b * y / 2 + p * 6)
    img += rng.normal(0, 20, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


class RandintRecorder:
    """Stands in for torch.randint in torchvision's autoaugment module: draws from a numpy generator
    and logs each draw as ("index", value)."""

    def __init__(self, seed, real):
        self.rng = np.random.default_rng(seed)
        self.real = real
        self.log = []

    def __call__(self, high, size, dtype=None, **kw):
        assert tuple(size) == (1,)
        v = int(self.rng.integers(0, high))
        self.log.append(["index", v])
        return torch.tensor([v], dtype=dtype or torch.int64)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/golden/trivial_augment")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.default_rng(1)
    a = photo(rng, 13, 17)
    b = (60 + photo(rng, 9, 12).astype(np.int32) // 3).astype(np.uint8)
    c = photo(rng, 10, 10)
    for name, arr in [("a.png", a), ("b.png", b), ("c.png", c)]:
        Image.fromarray(arr).save(f"{args.out}/{name}")
    images = {n: Image.open(f"{args.out}/{n}").convert("RGB") for n in ["a.png", "b.png", "c.png"]}

    tensors, cases = {}, []
    ta = taa.TrivialAugmentWide()
    space = ta._augmentation_space(BINS)
    magnitudes = {}
    for name, (mags, signed) in space.items():
        magnitudes[name] = [float(v) for v in mags.reshape(-1).tolist()] if mags.ndim > 0 else []
    for name, (mags, signed) in space.items():
        bins = BIN_CASES if mags.ndim > 0 else [None]
        for k in bins:
            m = float(mags[k].item()) if k is not None else 0.0
            for sign in ([1, -1] if signed else [1]):
                # Every image at a few bins, the square one (transposes, its own rounding) at all.
                for img_name in (images if k in (None, 5, 20, 30) else ["c.png"]):
                    out = taa._apply_op(images[img_name], name, m * sign, InterpolationMode.NEAREST, None)
                    key = f"op/{name}/{k}/{sign}/{img_name}"
                    tensors[key] = np.ascontiguousarray(np.asarray(out.convert("RGB"), dtype=np.uint8))
                    cases.append(dict(name=key, kind="op", op=name, bin=k, sign=sign, image=img_name,
                                      magnitude=m * sign))

    real = torch.randint
    for seed in range(60):
        img_name = ["a.png", "b.png", "c.png"][seed % 3]
        rec = RandintRecorder(seed, real)
        torch.randint = rec
        try:
            out = taa.TrivialAugmentWide()(images[img_name])
        finally:
            torch.randint = real
        key = f"wide/{seed}"
        tensors[key] = np.ascontiguousarray(np.asarray(out, dtype=np.uint8))
        cases.append(dict(name=key, kind="wide", image=img_name, draws=rec.log))

    meta = {"cases": json.dumps(cases), "magnitudes": json.dumps(magnitudes), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "pillow": PIL.__version__}
    save_file(tensors, f"{args.out}/golden.safetensors", metadata=meta)
    print(f"{len(cases)} cases in {args.out}")


if __name__ == "__main__":
    main()
