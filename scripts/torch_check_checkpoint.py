"""Load a senet-wgpu checkpoint into the equivalent PyTorch module by name (strict) — the base
SENet, a CIFAR or an ImageNet (SE-)ResNet — and evaluate it on an IDX test set (Fashion-MNIST, or the bundled
sample), to show our checkpoints are PyTorch state dicts.

    python3 scripts/torch_check_checkpoint.py runs/latest/best.safetensors /usr/share/datasets/fashion-mnist
    python3 scripts/torch_check_checkpoint.py runs/se20/best.safetensors assets/fashion-mnist-sample
"""
import gzip
import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(__file__))
from torch_golden import senet  # noqa: E402
from torch_resnet import resnet  # noqa: E402


def idx(path):
    with gzip.open(path) as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def main():
    ckpt, data_dir = sys.argv[1], sys.argv[2]
    config = json.load(open(os.path.join(os.path.dirname(ckpt), "config.json")))["model"]
    name = config["model"]
    if name == "senet":
        model = senet(config["num_classes"], config["in_channels"], config["width"])
    else:
        model = resnet(name, config["num_classes"], config["in_channels"], config["width"], config["reduction"],
                       config.get("se_bias", False))
    model.load_state_dict(load_file(ckpt), strict=True)
    model.eval()
    x = torch.from_numpy(idx(os.path.join(data_dir, "t10k-images-idx3-ubyte.gz")).copy()).float().div(255).unsqueeze(1)
    if config.get("normalize"):
        mean, std = config["normalize"][0]
        x = (x - mean) / std
    y = torch.from_numpy(idx(os.path.join(data_dir, "t10k-labels-idx1-ubyte.gz")).astype(np.int64))
    correct, loss = 0, 0.0
    with torch.no_grad():
        for i in range(0, len(y), 500):
            logits = model(x[i:i + 500])
            correct += (logits.argmax(1) == y[i:i + 500]).sum().item()
            loss += torch.nn.functional.cross_entropy(logits, y[i:i + 500], reduction="sum").item()
    # Compare with `senet eval --json`: its "accuracy" and mean "loss" over the same test set.
    print(json.dumps({"pytorch_test_accuracy": correct / len(y), "pytorch_test_loss": loss / len(y),
                      "checkpoint": ckpt}))


if __name__ == "__main__":
    main()
