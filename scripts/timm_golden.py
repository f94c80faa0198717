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

The ResNeXt and SENet-154 cases (same weights recipe, same files):

  seresnext50_32x4d_w00625  timm's seresnext50_32x4d definition (its ResNet class, Bottleneck with
      cardinality and base_width, SE module) at a sixteenth of the width as `senet --width 0.0625`
      builds it: planes 4..32 and the cardinality scaled alike (32 -> 2 groups), each group keeping
      the full network's channels (4 in layer1: base_width 64 at these planes). ~0.8 MB.
  legacy_senet154_w00625    timm's legacy SENet class with its SEBottleneck (`legacy_senet154`:
      three-conv stem, pool0 with ceil_mode, 3x3 projection shortcuts, se_module with biases,
      last_linear) at a sixteenth of the width: every channel count and the 64 groups scaled by
      1/16 (4 groups of 2 -> 4 channels in layer1, as the full network's 64), layers rebuilt with
      timm's own `_make_layer`. At 64x64 the stem leaves 32x32, which pool0 rounds up to 16x16
      (floor mode: 15x15). ~2.9 MB (its grouped 3x3s shrink with the width, not its square).

The full-size networks (110 and 460 MB of weights) are too large to commit; these narrow ones are
the same classes and code paths, with grouped 3x3s of 2 and 4 groups instead of 32 and 64.

Run: python3 scripts/timm_golden.py [--out tests/golden/timm] [--only CASE]
"""
import argparse
import os

import timm
import torch
from safetensors.torch import save_file
from timm.models.resnet import BasicBlock, Bottleneck, ResNet, make_blocks
from timm.models.senet import SEBottleneck, SENet

CASES = {
    # name: the model, built after torch.manual_seed(0)
    "seresnet18_w0125": lambda: build(BasicBlock, (2, 2, 2, 2)),
    "seresnet50_w0125": lambda: build(Bottleneck, (3, 4, 6, 3)),
    "seresnext50_32x4d_w00625": lambda: build_resnext(50, 32, 4, 0.0625),
    "legacy_senet154_w00625": lambda: build_senet154(),
}
WIDTH = 0.125
CLASSES = 10
INPUT = (2, 3, 64, 64)


def build(block, layers, width=WIDTH, cardinality=1, base_width=64, in_chans=3, classes=CLASSES, se=True):
    channels = tuple(int(c * width) for c in (64, 128, 256, 512))
    attn = dict(attn_layer="se") if se else {}
    model = ResNet(block=block, layers=layers, num_classes=classes, channels=channels, cardinality=cardinality,
                   base_width=base_width, block_args=attn)
    # timm's plain stem always has 64 channels: narrow it, and rebuild the stages on it with
    # timm's own make_blocks (the call ResNet.__init__ makes, with inplanes = the stem's width).
    stem = int(64 * width)
    model.conv1 = torch.nn.Conv2d(in_chans, stem, kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = torch.nn.BatchNorm2d(stem)
    stages, _ = make_blocks((block,) * 4, channels, layers, stem, cardinality=cardinality, base_width=base_width,
                            **attn)
    for name, stage in stages:
        setattr(model, name, stage)
    return model


RESNEXT_LAYERS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def build_resnext(depth=50, cardinality=32, base_width=4, width=0.0625, se=True, in_chans=3, classes=CLASSES):
    # timm's [se]resnext<depth>_<C>x<D>d. At width w the groups are int(C w) and each keeps its
    # channels: floor(planes * base_width / 64) at the narrowed planes needs base_width D / w
    # (seresnext50_32x4d at w = 1/16: 2 groups, base_width 64, 4 channels per group in layer1).
    return build(Bottleneck, RESNEXT_LAYERS[depth], width=width, cardinality=int(cardinality * width),
                 base_width=int(base_width / width), in_chans=in_chans, classes=classes, se=se)


def build_senet154(width=0.0625, in_chans=3, classes=CLASSES):
    # legacy_senet154's arguments, every channel count and the groups at width w.
    w = width
    c = lambda n: int(n * w)
    model = SENet(block=SEBottleneck, layers=[3, 8, 36, 3], groups=c(64), reduction=16, downsample_kernel_size=3,
                  downsample_padding=1, inplanes=c(128), input_3x3=True, num_classes=classes)
    # SENet's stem and stage planes are fixed numbers: narrow the stem's convolutions and rebuild
    # the stages with timm's own _make_layer, as SENet.__init__ calls it.
    l0 = model.layer0
    l0.conv1 = torch.nn.Conv2d(in_chans, c(64), 3, stride=2, padding=1, bias=False)
    l0.bn1 = torch.nn.BatchNorm2d(c(64))
    l0.conv2 = torch.nn.Conv2d(c(64), c(64), 3, stride=1, padding=1, bias=False)
    l0.bn2 = torch.nn.BatchNorm2d(c(64))
    l0.conv3 = torch.nn.Conv2d(c(64), c(128), 3, stride=1, padding=1, bias=False)
    l0.bn3 = torch.nn.BatchNorm2d(c(128))
    model.inplanes = c(128)
    for i, planes in enumerate((64, 128, 256, 512)):
        first = i == 0
        stage = model._make_layer(SEBottleneck, planes=c(planes), blocks=[3, 8, 36, 3][i], groups=c(64), reduction=16,
                                  stride=1 if first else 2, downsample_kernel_size=1 if first else 3,
                                  downsample_padding=0 if first else 1)
        setattr(model, f"layer{i + 1}", stage)
    model.last_linear = torch.nn.Linear(c(2048), classes)
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
    ap.add_argument("--only", choices=list(CASES), help="write this case only")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for name, make in CASES.items():
        if args.only and name != args.only:
            continue
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(0)
        model = make()
        randomise(model, gen)
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        x = torch.randn(*INPUT, generator=gen)
        with torch.no_grad():
            logits = model.double()(x.double())
        save_file(sd, os.path.join(args.out, f"{name}.safetensors"))
        save_file({"input": x, "logits": logits}, os.path.join(args.out, f"{name}.io.safetensors"))
        se = [(k, tuple(v.shape)) for k, v in sd.items() if k.endswith(("se.fc1.weight", "se_module.fc1.weight"))]
        widths = sorted({(s[1], s[0]) for _, s in se})
        print(f"{name}: timm {timm.__version__}, {sum(v.numel() for v in sd.values())} values, "
              f"SE (channels, hidden) {widths}, logits[0][:3] {logits[0, :3].tolist()}")


if __name__ == "__main__":
    main()
