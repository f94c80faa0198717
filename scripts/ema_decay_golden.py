"""timm's ModelEmaV3 decay per update step, the golden of tests/kernels/ema.rs's
ema_decay_is_timms (run: python3 scripts/ema_decay_golden.py; needs timm and torch)."""
import torch
from timm.utils.model_ema import ModelEmaV3

model = torch.nn.Linear(2, 2)
for warmup in (False, True):
    ema = ModelEmaV3(model, decay=0.9998, use_warmup=warmup)
    print(warmup, [(s, repr(ema.get_decay(s))) for s in (1, 2, 3, 10, 1000, 100000, 10**7)])
