#!/usr/bin/env python3
"""Goldens for src/data/transforms.rs: small images in every mode PIL reads (grey, grey+alpha,
RGB, RGBA, palette, 16-bit grey and RGB PNGs, RGB, grey and CMYK JPEGs) and what PIL and
torchvision make of them:

  convert   Image.open(f).convert("RGB"), as torchvision's ImageFolder loader does
  eval      Resize(floor(size / crop_pct)) + CenterCrop(size) (timm's eval transform)
  rrc       F.resized_crop(img, top, left, h, w, size, BILINEAR, antialias=True): the crop
            RandomResizedCrop takes once its parameters are drawn

Writes tests/golden/transforms/<name>.{png,jpg} and tests/golden/transforms/golden.safetensors
(uint8 HWC arrays, the cases listed in its metadata as JSON, with the torchvision and Pillow
versions). Deterministic from the seed. Pillow 13 runs the vertical pass first when the height
shrinks by more than twice as many pixels as the width (Resample.c); earlier versions always ran
the horizontal pass first, which rounds those cases differently by one level.

    python3 scripts/transforms_golden.py [--out tests/golden/transforms]
"""
import argparse
import json
import math
import os
import struct
import zlib

import numpy as np
import torchvision
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image
from safetensors.numpy import save_file


def photo(rng, h, w):
    """Smooth colour gradients, a few soft blobs and some noise: edges and texture to resample."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w, 3))
    for c in range(3):
        a, b, p = rng.uniform(-1, 1, 3)
        img[..., c] = 128 + 90 * np.sin(a * x / 7 + b * y / 5 + p * 6)
    for _ in range(4):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(3, 12)
        col = rng.uniform(0, 255, 3)
        m = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))[..., None]
        img = img * (1 - m) + col * m
    img += rng.normal(0, 12, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def png16(path, arr):
    """A 16-bit RGB PNG (PIL cannot write one): colour type 2, bit depth 16, filter 0 rows."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[r].astype(">u2").tobytes() for r in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(raw, 9)))
        f.write(chunk(b"IEND", b""))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/golden/transforms")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.default_rng(args.seed)

    files = {}
    rgb = photo(rng, 45, 67)
    Image.fromarray(rgb).save(f"{args.out}/rgb.png")
    files["rgb.png"] = "RGB"
    Image.fromarray(photo(rng, 53, 40)).convert("L").save(f"{args.out}/grey.png")
    files["grey.png"] = "L"
    la = Image.fromarray(photo(rng, 31, 38)).convert("LA")
    la.putalpha(Image.fromarray(rng.integers(0, 256, (31, 38), dtype=np.uint8)))
    la.save(f"{args.out}/grey_alpha.png")
    files["grey_alpha.png"] = "LA"
    rgba = np.dstack([photo(rng, 36, 50), rng.integers(0, 256, (36, 50), dtype=np.uint8)])
    Image.fromarray(rgba, "RGBA").save(f"{args.out}/rgba.png")
    files["rgba.png"] = "RGBA"
    pal = Image.fromarray(photo(rng, 41, 33)).quantize(colors=37, method=Image.Quantize.MEDIANCUT)
    pal.save(f"{args.out}/palette.png")
    files["palette.png"] = "P"
    # 16-bit grey: values on both sides of 255, where PIL's conversion clips.
    g16 = (rng.integers(0, 700, (29, 35)) * np.linspace(0.2, 1.5, 35)[None, :]).astype(np.uint16)
    Image.fromarray(g16).save(f"{args.out}/grey16.png")
    files["grey16.png"] = "I;16"
    png16(f"{args.out}/rgb16.png", photo(rng, 27, 34).astype(np.uint16) * 257 + rng.integers(0, 257, (27, 34, 3)))
    files["rgb16.png"] = "RGB (16-bit)"
    Image.fromarray(photo(rng, 48, 64)).save(f"{args.out}/rgb.jpg", quality=90)
    files["rgb.jpg"] = "RGB JPEG"
    Image.fromarray(photo(rng, 40, 30)).convert("L").save(f"{args.out}/grey.jpg", quality=90)
    files["grey.jpg"] = "L JPEG"
    Image.fromarray(photo(rng, 32, 40)).convert("CMYK").save(f"{args.out}/cmyk.jpg", quality=95)
    files["cmyk.jpg"] = "CMYK JPEG"

    tensors, cases = {}, []

    def add(name, arr, **case):
        tensors[name] = np.ascontiguousarray(np.asarray(arr, dtype=np.uint8))
        cases.append(dict(name=name, **case))

    for f, mode in files.items():
        img = Image.open(f"{args.out}/{f}")
        assert img.mode == mode.split(" ")[0] or mode.endswith("JPEG") or mode.startswith("RGB ("), (f, img.mode)
        rgb_img = img.convert("RGB")
        add(f"{f}/convert", rgb_img, image=f, op="convert", mode=img.mode)
        for size, crop_pct in [(24, 0.875), (16, 1.0), (13, 0.9)]:
            scale = math.floor(size / crop_pct)
            out = T.Compose([T.Resize(scale), T.CenterCrop(size)])(rgb_img)
            add(f"{f}/eval_{size}_{crop_pct}", out, image=f, op="eval", size=[size, size], crop_pct=crop_pct)
        w, h = rgb_img.size
        # Crops that shrink, enlarge and stretch; odd offsets.
        for top, left, ch, cw, oh, ow in [(1, 2, h - 3, w - 5, 20, 20), (3, 5, 9, 13, 31, 31), (0, 0, h, w, 23, 17)]:
            out = F.resized_crop(rgb_img, top, left, ch, cw, [oh, ow], T.InterpolationMode.BILINEAR, antialias=True)
            add(f"{f}/rrc_{top}_{left}_{ch}_{cw}_{oh}_{ow}", out, image=f, op="rrc", box=[top, left, ch, cw], size=[oh, ow])
    # A non-square eval size: timm resizes to exactly floor(h/crop_pct) x floor(w/crop_pct).
    rgb_img = Image.open(f"{args.out}/rgb.png").convert("RGB")
    out = T.Compose([T.Resize((math.floor(20 / 0.9), math.floor(30 / 0.9))), T.CenterCrop((20, 30))])(rgb_img)
    add("rgb.png/eval_20x30_0.9", out, image="rgb.png", op="eval", size=[20, 30], crop_pct=0.9)

    meta = {"cases": json.dumps(cases), "torchvision": torchvision.__version__, "pillow": Image.__version__}
    save_file(tensors, f"{args.out}/golden.safetensors", metadata=meta)
    print(f"{len(cases)} cases, {len(files)} images in {args.out}")


if __name__ == "__main__":
    main()
