#!/usr/bin/env python3
"""Goldens for src/data/augment.rs: timm's RandAugment ops and RandomErasing on small images.

  op        timm.data.auto_augment.NAME_TO_OP[name](img, *LEVEL_TO_ARG[name](m)) at fixed magnitudes
            and both signs of the ops whose level is randomly negated, with the fill colour and
            resampling timm's transforms_imagenet_train passes (img_mean of ImageNet's mean,
            bilinear: our RandomResizedCrop is bilinear, as timm's with interpolation='bilinear')
  rand      rand_augment_transform(config)(img) with Python's `random` and numpy's choice replaced
            by a recorder: the draws it made (kind, value) are stored beside the output, so the Rust
            side replays the same draw sequence and must reach the same pixels
  erase     RandomErasing(p, mode='const', max_count)(ones) with the draws recorded, and each box
            painted with its number (k + 1): the geometry of every box

Writes tests/golden/augment/{a,b}.png and tests/golden/augment/golden.safetensors (uint8 HWC
images, uint8 masks; the cases as JSON in its metadata with the timm and Pillow versions).

    python3 scripts/augment_golden.py [--out tests/golden/augment]
"""
import argparse
import json
import os
import random

import numpy as np
import PIL
import timm
import torch
import timm.data.auto_augment as aa
import timm.data.random_erasing as re_mod
from PIL import Image
from safetensors.numpy import save_file

FILL = (124, 116, 104)  # timm: round(255 * IMAGENET_DEFAULT_MEAN)
BILINEAR = Image.Resampling.BILINEAR
HPARAMS = dict(translate_const=100, img_mean=FILL, interpolation=BILINEAR)


def photo(rng, h, w):
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w, 3))
    for c in range(3):
        a, b, p = rng.uniform(-1, 1, 3)
        img[..., c] = 128 + 100 * np.sin(a * x / 3 + b * y / 2 + p * 6)
    img += rng.normal(0, 20, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


class Recorder:
    """Stands in for random.random/gauss/uniform/randint and np.random.choice, drawing from a numpy
    generator and logging what each call returned."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.log = []

    def random(self):
        v = float(self.rng.random())
        self.log.append(["random", v])
        return v

    def gauss(self, mu=0.0, sigma=1.0):
        v = float(mu + sigma * self.rng.standard_normal())
        self.log.append(["gauss", v])
        return v

    def uniform(self, a, b):
        v = float(a + (b - a) * self.rng.random())
        self.log.append(["uniform", v])
        return v

    def randint(self, a, b):
        v = int(self.rng.integers(a, b + 1))
        self.log.append(["randint", v])
        return v

    def choice(self, ops, n, replace=True, p=None):
        assert replace and p is None
        idx = [int(i) for i in self.rng.integers(0, len(ops), n)]
        for i in idx:
            self.log.append(["index", i])
        return [ops[i] for i in idx]


def patched(rec):
    saved = (random.random, random.gauss, random.uniform, random.randint, np.random.choice)
    random.random, random.gauss, random.uniform, random.randint = rec.random, rec.gauss, rec.uniform, rec.randint
    np.random.choice = rec.choice
    return saved


def restore(saved):
    random.random, random.gauss, random.uniform, random.randint, np.random.choice = saved


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/golden/augment")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.default_rng(0)
    a = photo(rng, 13, 17)
    # A narrow-range image: autocontrast and equalize have work to do.
    b = (60 + photo(rng, 9, 12).astype(np.int32) // 3).astype(np.uint8)
    Image.fromarray(a).save(f"{args.out}/a.png")
    Image.fromarray(b).save(f"{args.out}/b.png")
    images = {"a.png": Image.open(f"{args.out}/a.png"), "b.png": Image.open(f"{args.out}/b.png")}

    tensors, cases = {}, []

    def add(name, arr, **case):
        tensors[name] = np.ascontiguousarray(arr)
        cases.append(dict(name=name, **case))

    names = sorted(set(aa._RAND_TRANSFORMS) | set(aa._RAND_INCREASING_TRANSFORMS))
    signed = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "ColorIncreasing",
              "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"}
    skipped = []
    for name in names:
        for m in [0.0, 4.3, 9.0, 10.0]:
            for sign in ([1, -1] if name in signed else [1]):
                for img_name in (["a.png", "b.png"] if m == 9.0 else ["a.png"]):
                    level_fn = aa.LEVEL_TO_ARG[name]
                    saved = aa._randomly_negate
                    aa._randomly_negate = lambda v: -v if sign < 0 else v
                    try:
                        level = level_fn(m, HPARAMS) if level_fn else ()
                    finally:
                        aa._randomly_negate = saved
                    try:
                        out = aa.NAME_TO_OP[name](images[img_name], *level, fillcolor=FILL, resample=BILINEAR)
                    except ValueError as e:  # Pillow 13's posterize refuses 0 bits
                        skipped.append(f"{name} m={m}: {e}")
                        continue
                    add(f"op/{name}/{m}/{sign}/{img_name}", np.asarray(out.convert("RGB"), dtype=np.uint8),
                        kind="op", op=name, magnitude=m, sign=sign, image=img_name, arg=list(level))

    configs = ["rand-m9-mstd0.5", "rand-m9-n3-mstd0.5-inc1", "rand-m5-n4-p1.0", "rand-m7-mstd101",
               "rand-m12-mmax15-n3-p0.9", "rand-m10-n6-mstd2-inc1"]
    seed = 0
    for config in configs:
        made = 0
        while made < 6:
            seed += 1
            rec = Recorder(seed)
            tf = aa.rand_augment_transform(config, dict(HPARAMS))
            img_name = "a.png" if seed % 3 else "b.png"
            saved = patched(rec)
            try:
                out = tf(images[img_name])
            except ValueError:  # Pillow 13's posterize refuses 0 bits (PosterizeIncreasing at m >= 10)
                continue
            finally:
                restore(saved)
            add(f"rand/{config}/{seed}", np.asarray(out, dtype=np.uint8), kind="rand", config=config,
                image=img_name, draws=rec.log)
            made += 1

    for k, (prob, count, h, w) in enumerate([(1.0, 1, 24, 32), (1.0, 3, 17, 9), (0.6, 2, 40, 40),
                                            (1.0, 4, 6, 7), (0.9, 1, 3, 50)] * 4):
        rec = Recorder(1000 + k)
        calls = []

        def fake_pixels(per_pixel, rand_color, patch_size, dtype=torch.float32, device="cpu"):
            calls.append(patch_size)
            return torch.full(patch_size, float(len(calls)), dtype=dtype)

        saved_px = re_mod._get_pixels
        re_mod._get_pixels = fake_pixels
        saved = patched(rec)
        try:
            img = torch.zeros(1, h, w)
            re_mod.RandomErasing(prob, mode="const", max_count=count, device="cpu")(img)
        finally:
            restore(saved)
            re_mod._get_pixels = saved_px
        add(f"erase/{k}", img[0].numpy().astype(np.uint8), kind="erase", prob=prob, count=count, h=h, w=w,
            draws=rec.log)

    meta = {"cases": json.dumps(cases), "timm": timm.__version__, "pillow": PIL.__version__,
            "skipped": json.dumps(skipped)}
    save_file(tensors, f"{args.out}/golden.safetensors", metadata=meta)
    print(f"{len(cases)} cases in {args.out}; not made (Pillow refuses): {skipped}")


if __name__ == "__main__":
    main()
