"""Load a senet-wgpu ResNeXt or SENet-154 checkpoint into timm's own classes by name with
`load_state_dict(strict=True)` and evaluate it on an IDX test set (Fashion-MNIST, or the bundled
sample), to show the checkpoint is timm's state dict and computes timm's function.

The timm model is built as scripts/timm_golden.py builds its goldens: timm's ResNet class with its
Bottleneck and SE module (`[se]resnext<D>_<C>x<W>d`) or its legacy SENet class with SEBottleneck
(`legacy_senet154`), narrowed to the run's `--width` (channels and groups alike), with the run's
input channels and classes (from config.json beside the checkpoint).

    python3 scripts/timm_check_checkpoint.py runs/sx50/last.safetensors assets/fashion-mnist-sample

Prints one JSON line; compare with `senet eval --checkpoint … --json` (accuracy, mean loss).
"""
import json
import os
import re
import sys

import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(__file__))
from timm_golden import build_resnext, build_senet154  # noqa: E402
from torch_check_checkpoint import idx  # noqa: E402


def timm_model(config):
    name, width = config["model"], config["width"]
    kw = dict(in_chans=config["in_channels"], classes=config["num_classes"])
    if name in ("senet154", "legacy-senet154", "legacy_senet154"):
        return build_senet154(width, **kw)
    m = re.fullmatch(r"(se-?)?resnext(\d+)[-_](\d+)x(\d+)d", name)
    if not m:
        sys.exit(f"{name}: not a ResNeXt or SENet-154 (scripts/torch_check_checkpoint.py takes the others)")
    se, depth, c, d = bool(m.group(1)), int(m.group(2)), int(m.group(3)), int(m.group(4))
    return build_resnext(depth, c, d, width, se=se, **kw)


def main():
    ckpt, data_dir = sys.argv[1], sys.argv[2]
    config = json.load(open(os.path.join(os.path.dirname(ckpt), "config.json")))["model"]
    model = timm_model(config)
    sd = load_file(ckpt)
    model.load_state_dict(sd, strict=True)
    model.eval()
    x = torch.from_numpy(idx(os.path.join(data_dir, "t10k-images-idx3-ubyte.gz")).copy()).float().div(255).unsqueeze(1)
    if config.get("normalize"):
        mean, std = config["normalize"][0]
        x = (x - mean) / std
    y = torch.from_numpy(idx(os.path.join(data_dir, "t10k-labels-idx1-ubyte.gz")).astype("int64"))
    correct, loss = 0, 0.0
    with torch.no_grad():
        for i in range(0, len(y), 500):
            logits = model(x[i:i + 500])
            correct += (logits.argmax(1) == y[i:i + 500]).sum().item()
            loss += torch.nn.functional.cross_entropy(logits, y[i:i + 500], reduction="sum").item()
    print(json.dumps({"model": config["model"], "timm_class": type(model).__name__, "strict_load": "ok",
                      "tensors": len(sd), "timm_test_accuracy": correct / len(y), "timm_test_loss": loss / len(y),
                      "checkpoint": ckpt}))


if __name__ == "__main__":
    main()
