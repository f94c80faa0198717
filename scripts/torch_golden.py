"""PyTorch goldens for senet-wgpu's tests (run once, by hand, where PyTorch is installed).

Builds a small base SENet (width 1/16: 4, 8, 16, 32, 64 channels; SE 64 -> 4 -> 64; 3x16x16
inputs; 5 classes), exactly the module of ../shared/peers/torch/senet.py in float64 (micrograd's
smallest honest oracle), and writes to --out:

  state_dict.safetensors    initial parameters and buffers (float32 values, PyTorch names)
  batch.safetensors         x [4, 3, 16, 16] float32, y [4] int64
  step.safetensors          loss, logits, every parameter gradient, and the state dict after one
                            torch.optim.Adam(lr=1e-3) step, computed in float64

    python3 scripts/torch_golden.py --out tests/golden/senet_tiny
    python3 scripts/torch_golden.py --model se-resnet8 --out tests/golden/se_resnet8

With --model se-resnet8: the CIFAR SE-ResNet-8 of scripts/torch_resnet.py at width 0.5 (8, 16, 32
channels), SE reduction 4 with biases, on 3x8x8 inputs — residual additions, projection
shortcuts and a fork whose gradients add.
"""
import argparse
import os

import sys

import torch
import torch.nn as nn
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))


class SEBlock(nn.Module):
    def __init__(self, c, reduction=16):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, c // reduction, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(c // reduction, c, 1, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        return x * self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))


def senet(num_classes, in_channels, width):
    c1, c2, c3, c4, c5 = (int(c * width) for c in (64, 128, 256, 512, 1024))

    def block(ci, co):
        return [nn.Conv2d(ci, co, 3, padding=1), nn.BatchNorm2d(co), nn.ReLU(inplace=True)]

    features = nn.Sequential(
        *block(in_channels, c1), nn.MaxPool2d(2, 2),
        *block(c1, c2), nn.MaxPool2d(2, 2),
        *block(c2, c3),
        *block(c3, c4), nn.MaxPool2d(2, 2),
        nn.Conv2d(c4, c5, 3, padding=1), SEBlock(c5), nn.BatchNorm2d(c5), nn.ReLU(inplace=True),
        nn.MaxPool2d(2, 2),
    )
    model = nn.Module()
    model.features = features
    model.avg_pool = nn.AdaptiveAvgPool2d(1)
    model.classifier = nn.Sequential(nn.Linear(c5, num_classes))
    model.forward = lambda x: model.classifier(torch.flatten(model.avg_pool(model.features(x)), 1))
    return model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/golden/senet_tiny")
    ap.add_argument("--model", default="senet", choices=["senet", "se-resnet8"])
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    hw = 16
    if args.model == "senet":
        model = senet(num_classes=5, in_channels=3, width=1 / 16)
    else:
        from torch_resnet import CifarResNet
        model = CifarResNet(8, se=True, num_classes=5, in_channels=3, width=0.5, reduction=4, se_bias=True)
        hw = 8
    # Round the initial state to float32 first so the float32 file is exactly what float64 starts from.
    state32 = {k: (v.float() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    save_file({k: v.contiguous() for k, v in state32.items()}, os.path.join(args.out, "state_dict.safetensors"))
    model = model.double()
    x = torch.rand(4, 3, hw, hw).float()
    y = torch.tensor([0, 3, 1, 4])
    save_file({"x": x, "y": y}, os.path.join(args.out, "batch.safetensors"))

    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    logits = model(x.double())
    loss = nn.functional.cross_entropy(logits, y)
    loss.backward()
    out = {"loss": loss.detach().reshape(1), "logits": logits.detach()}
    for name, p in model.named_parameters():
        out["grad." + name] = p.grad.detach().clone()
    opt.step()
    for name, v in model.state_dict().items():
        out["after." + name] = v.detach().clone()
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(args.out, "step.safetensors"))
    n_params = sum(p.numel() for p in senet(10, 3, 1.0).parameters())
    print(f"loss {loss.item():.10f}; wrote {args.out}; SENet width 1 (3 in, 10 classes) has {n_params} parameters")


if __name__ == "__main__":
    main()
