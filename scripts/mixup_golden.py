"""timm's mixup_target and cutmix_bbox_and_lam on fixed inputs: the golden of tests/data.rs's
mixup_matches_timm (run: python3 scripts/mixup_golden.py; needs timm). The box centre, which timm
draws with np.random.randint, is fixed by replacing that function for the call."""
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
