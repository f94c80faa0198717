"""timm's SE-ResNets, as a user downloads them, for tests/timm.rs: writes tests/golden/timm/.

For each case, a state dict exactly as timm writes it (`model.state_dict()`, float32, int64
`num_batches_tracked`) and an input batch with timm's eval-mode logits computed in float64 from
the same (float32) weights:

  <case>.safetensors       the state dict, nothing else: what `senet eval --checkpoint` reads
  <case>.io.safetensors    input [2, 3, 64, 64] (float32), logits [2, 10] (float64)

The networks are timm's own ResNet class with its SE block (`block_args=dict(attn_layer='se')`,
timm's seresnet18 / seresnet50 definitions) at an eighth of the width (channels 8..64, and the stem narrowed to 8 with the
stages rebuilt on it by timm's own `make_blocks`: `--width 0.125`) and 10 classes, so the files stay small (~0.7 and ~1.6 MB). That keeps what the
full-size models have: SE hidden widths rounded as timm's `make_divisible(C / 16, 8)` (here 8 for
every C up to 128 and 16 for 256: reductions 1 to 16 in one network) and bottlenecks that stride
in their 3x3 convolution (ResNet "v1.5").

Weights: timm's initialisation, then every batch norm's scale and shift drawn at random (timm
zero-initialises each block's last BN scale, which would switch the residual branches and their
SE blocks off), and running statistics measured on random batches (momentum None: the cumulative
average) so eval-mode activations stay of order 1 through the network. Seed 0.

Run: python3 scripts/timm_golden.py [--out tests/golden/timm]
"""
import argparse
import os

import timm
import torch
from safetensors.torch import save_file
from timm.models.resnet import BasicBlock, Bottleneck, ResNet, make_blocks

CASES = {
    # name: (block, blocks per stage)
    "seresnet18_w0125": (BasicBlock, (2, 2, 2, 2)),
    "seresnet50_w0125": (Bottleneck, (3, 4, 6, 3)),
}
WIDTH = 0.125
CLASSES = 10
INPUT = (2, 3, 64, 64)


def build(block, layers):
    channels = tuple(int(c * WIDTH) for c in (64, 128, 256, 512))
    model = ResNet(block=block, layers=layers, num_classes=CLASSES, channels=channels, block_args=dict(attn_layer="se"))
    # timm's plain stem always has 64 channels: narrow it, and rebuild the stages on it with
    # timm's own make_blocks (the call ResNet.__init__ makes, with inplanes = the stem's width).
    stem = int(64 * WIDTH)
    model.conv1 = torch.nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = torch.nn.BatchNorm2d(stem)
    stages, _ = make_blocks((block,) * 4, channels, layers, stem, attn_layer="se")
    for name, stage in stages:
        setattr(model, name, stage)
    return model


def randomise(model, gen):
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=gen) * 0.4 - 0.2)
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(8, *INPUT[1:], generator=gen))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.1
    model.eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/golden/timm")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for name, (block, layers) in CASES.items():
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(0)
        model = build(block, layers)
        randomise(model, gen)
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        x = torch.randn(*INPUT, generator=gen)
        with torch.no_grad():
            logits = model.double()(x.double())
        save_file(sd, os.path.join(args.out, f"{name}.safetensors"))
        save_file({"input": x, "logits": logits}, os.path.join(args.out, f"{name}.io.safetensors"))
        se = [(k, tuple(v.shape)) for k, v in sd.items() if k.endswith("se.fc1.weight")]
        widths = sorted({(s[1], s[0]) for _, s in se})
        print(f"{name}: timm {timm.__version__}, {sum(v.numel() for v in sd.values())} values, "
              f"SE (channels, hidden) {widths}, logits[0][:3] {logits[0, :3].tolist()}")


if __name__ == "__main__":
    main()
