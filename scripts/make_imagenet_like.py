#!/usr/bin/env python3
"""An ImageNet-like JPEG folder for timing and trying the image-folder pipeline: OUT/train/<class>/
and OUT/val/<class>/, each image a JPEG (quality 90) whose short side is 300-500 px and whose aspect
ratio is 3:4 to 16:9 either way, as ImageNet's photos. The content is random but photo-like:
smooth colour fields, soft shapes, a little texture and sensor noise; each class has its own
palette and shape count, so a network can learn something. Deterministic from --seed.

    python3 scripts/make_imagenet_like.py --out /tmp/imagenet-like [--classes 10]
        [--train-per-class 100] [--val-per-class 20] [--seed 0]
"""
import argparse
import os

import numpy as np
from PIL import Image, ImageFilter


def photo(rng, cls_rng_state, h, w):
    crng = np.random.default_rng(cls_rng_state)
    base = crng.uniform(40, 215, 3)  # the class's palette
    shapes = int(crng.integers(2, 9))
    # A low-resolution random field, upsampled smoothly: sky, walls, grass.
    small = rng.normal(0, 40, (6, 8, 3)) + base
    img = np.asarray(
        Image.fromarray(np.clip(small, 0, 255).astype(np.uint8)).resize((w, h), Image.BICUBIC), dtype=np.float64
    )
    y, x = np.mgrid[0:h, 0:w]
    for _ in range(shapes + int(rng.integers(0, 3))):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(0.05, 0.3) * h, rng.uniform(0.05, 0.3) * w
        col = np.clip(base + crng.normal(0, 60, 3) + rng.normal(0, 20, 3), 0, 255)
        m = (((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1).astype(np.float64)[..., None]
        img = img * (1 - m) + col * m
    # Texture: a little high-frequency structure, then blur the hard edges as a lens would.
    img += rng.normal(0, 6, (h, w, 1)) * np.sin(x / rng.uniform(2, 9))[..., None]
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.2))
    noisy = np.asarray(pil, dtype=np.float64) + rng.normal(0, 4, (h, w, 3))
    return Image.fromarray(np.clip(np.round(noisy), 0, 255).astype(np.uint8))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--train-per-class", type=int, default=100)
    ap.add_argument("--val-per-class", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    n = 0
    for split, per in [("train", args.train_per_class), ("val", args.val_per_class)]:
        for c in range(args.classes):
            d = os.path.join(args.out, split, f"n{c:08d}")
            os.makedirs(d, exist_ok=True)
            for i in range(per):
                short = int(rng.integers(300, 501))
                aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(16 / 9))))
                long = int(round(short * aspect))
                h, w = (short, long) if rng.random() < 0.75 else (long, short)
                photo(rng, args.seed * 1000 + c, h, w).save(os.path.join(d, f"{split}_{c}_{i:05d}.JPEG"), quality=90)
                n += 1
    print(f"{n} JPEGs in {args.out} ({args.classes} classes)")


if __name__ == "__main__":
    main()
