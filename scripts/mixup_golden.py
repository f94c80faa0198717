"""timm's mixup_target and cutmix_bbox_and_lam on fixed inputs: the golden of tests/data.rs's
mixup_matches_timm (run: python3 scripts/mixup_golden.py; needs timm). The box centre, which timm
draws with np.random.randint, is fixed by replacing that function for the call. Then timm's Mixup in
modes elem and pair on fixed draws, written to tests/golden/mixup/modes.safetensors (below)."""
import numpy as np
import torch
from timm.data import mixup

t = mixup.mixup_target(torch.tensor([0, 2, 1, 3, 3]), 4, lam=0.3, smoothing=0.1)
print("targets", [round(float(v), 9) for v in t.flatten()])
for lam, h, w, cy, cx in [(0.6, 5, 6, 2, 3), (0.2, 7, 7, 0, 6), (0.95, 28, 28, 13, 27), (0.0, 4, 4, 1, 2)]:
    draws = iter([cy, cx])
    real = np.random.randint
    np.random.randint = lambda lo, hi, size=None: next(draws)
    (yl, yh, xl, xh), lam2 = mixup.cutmix_bbox_and_lam((1, 1, h, w), lam, correct_lam=True)
    np.random.randint = real
    print("box", (lam, h, w, cy, cx), (int(yl), int(yh), int(xl), int(xh)), repr(float(lam2)))

# --mixup-mode elem / pair: timm's Mixup(mode=...)(x, target) with its per-image (per-pair) draws fixed:
# _params_per_elem returns the given float32 λ and CutMix flags, np.random.randint the given box centres
# (rand_bbox draws y then x, for each CutMix image with λ != 1 in image order). Written to
# tests/golden/mixup/modes.safetensors (x, the mixed x and the targets per case; the draws in its metadata),
# the golden of tests/data.rs's mixup_modes_match_timm.
import json
import os

from safetensors.numpy import save_file

CASES = [
    # name, mode, n, c, h, w, λ (float32), CutMix flags, box centres (y, x)
    # Image 5: a float32 λ whose box side is 4 rows in float32 (numpy's arithmetic) and 3 in float64.
    ("elem", "elem", 6, 2, 5, 7, [0.3, 1.0, 0.75, 0.123456, 0.9, 0.36000001430511475], [False, True, True, False, True, True],
     [(2, 3), (0, 6), (4, 0)]),
    ("elem-mixup-only", "elem", 4, 1, 3, 4, [0.61, 0.2, 1.0, 0.999], [False] * 4, []),
    ("pair", "pair", 6, 2, 5, 7, [0.37, 0.6, 1.0], [False, True, False], [(1, 5)]),
    ("pair-cutmix", "pair", 8, 3, 6, 6, [0.2, 0.9, 0.45, 0.7], [True, False, True, True], [(0, 0), (5, 5), (3, 2)]),
]
tensors, meta_cases = {}, []
rng = np.random.default_rng(3)
for name, mode, n, c, h, w, lam, cut, centres in CASES:
    x = torch.tensor(rng.normal(0, 1, (n, c, h, w)), dtype=torch.float32)
    y = torch.tensor(rng.integers(0, 4, n))
    m = mixup.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, mode=mode, label_smoothing=0.1, num_classes=4)
    m._params_per_elem = lambda count, lam=lam, cut=cut: (np.array(lam, dtype=np.float32), np.array(cut))
    draws = iter([v for yx in centres for v in yx])
    real = np.random.randint
    np.random.randint = lambda lo, hi, size=None: next(draws)
    try:
        mixed, target = m(x.clone(), y)
    finally:
        np.random.randint = real
    assert next(draws, None) is None, f"{name}: centres left over"
    tensors[f"{name}/x"] = x.numpy()
    tensors[f"{name}/mixed"] = mixed.numpy()
    tensors[f"{name}/target"] = target.numpy()
    meta_cases.append(dict(name=name, mode=mode, shape=[n, c, h, w], labels=[int(v) for v in y], lam=lam,
                           cutmix=cut, centres=centres, smoothing=0.1, classes=4))
os.makedirs("tests/golden/mixup", exist_ok=True)
import timm
save_file(tensors, "tests/golden/mixup/modes.safetensors",
          metadata={"cases": json.dumps(meta_cases), "timm": timm.__version__, "torch": torch.__version__})
print(f"{len(meta_cases)} mode cases in tests/golden/mixup/modes.safetensors")
