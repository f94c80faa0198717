"""Full-size timm and torchvision ResNets through senet, as a user downloads them: each model with
random weights (seed 0; batch norms given random scales (0.2-0.6, so logits stay of order 0.1-1 at every depth; scales around 1 make seresnet101 logits ~1000, where f32 rounding alone moves them by ~1), shifts and running statistics) saved as a
bare state dict, read back by `senet export` (the model inferred from the file alone: depth, SE
widths, SE biases, a bottleneck's stride in the 3x3), and the exported network run by onnxruntime
on a 2x3x64x64 batch against PyTorch's eval-mode logits.

The ResNeXts and SENet-154 (timm's resnext50_32x4d, seresnext50/101_32x4d, legacy_senet154) go the
same way: inferred from the file (cardinality and group width, SENet-154's width and groups).

Run: python3 scripts/timm_full_check.py [--senet target/release/senet] [--only resnext]
"""
import argparse
import os
import subprocess
import tempfile

import numpy as np
import onnxruntime as ort
import timm
import torch
import torchvision
from safetensors.torch import save_file

MODELS = {
    "timm seresnet18": lambda: timm.create_model("seresnet18"),
    "timm seresnet34": lambda: timm.create_model("seresnet34"),
    "timm seresnet50": lambda: timm.create_model("seresnet50"),
    "timm seresnet101": lambda: timm.create_model("seresnet101"),
    "torchvision resnet50": lambda: torchvision.models.resnet50(),
    "timm resnext50_32x4d": lambda: timm.create_model("resnext50_32x4d"),
    "timm seresnext50_32x4d": lambda: timm.create_model("seresnext50_32x4d"),
    "timm seresnext101_32x4d": lambda: timm.create_model("seresnext101_32x4d"),
    "timm legacy_senet154": lambda: timm.create_model("legacy_senet154"),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--senet", default="target/release/senet")
    ap.add_argument("--only", help="the models whose name contains this text")
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in MODELS.items():
            if args.only and args.only not in name:
                continue
            m = make()
            for mod in m.modules():
                if isinstance(mod, torch.nn.BatchNorm2d):
                    with torch.no_grad():
                        mod.weight.uniform_(0.2, 0.6)
                        mod.bias.uniform_(-0.2, 0.2)
                        mod.running_mean.uniform_(-0.1, 0.1)
                        mod.running_var.uniform_(0.5, 1.5)
            m.eval()
            st = os.path.join(tmp, "m.safetensors")
            onnx = os.path.join(tmp, "m.onnx")
            save_file({k: v.contiguous() for k, v in m.state_dict().items()}, st)
            out = subprocess.run([args.senet, "export", "--checkpoint", st, "--image-size", "64", "--out", onnx],
                                 capture_output=True, text=True, check=True).stdout.strip()
            x = torch.randn(2, 3, 64, 64)
            with torch.no_grad():
                want = m(x).numpy()
            got = ort.InferenceSession(onnx).run(None, {"input": x.numpy()})[0]
            err = float(np.abs(got - want).max())
            print(f"{name}: {out.split(': ')[-1]}; max |ours - PyTorch| {err:.2e} "
                  f"(max |logit| {float(np.abs(want).max()):.1f})")


if __name__ == "__main__":
    main()
