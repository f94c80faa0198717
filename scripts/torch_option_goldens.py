"""PyTorch float64 goldens for every training option a user can select (tests/option_goldens.rs).

The modules here are written from the papers and from torchvision/timm, not from senet-wgpu's
graph builder (src/model/resnet.rs), so that a misreading of the paper there shows as a
difference here:

  * the SE block (Hu et al., Fig. 3) with the ablations of §7: the squeeze as global average or
    global max pooling (Table 11), the excitation's gate a sigmoid, tanh or ReLU (Table 12);
  * the integration strategies of Fig. 5: standard (SE on the residual branch before the
    addition), SE-PRE (SE on the residual branch before its first convolution; the identity path
    reads the unit's input unchanged), SE-POST (after the addition and its ReLU), SE-Identity (on
    the shortcut, in parallel with the residual branch);
  * a CIFAR ResNet-8 (He et al. §4.2: 3x3 stem, one basic block per stage, projection shortcuts)
    with torchvision's BasicBlock layout and names;
  * an ImageNet SE-ResNet-50 whose bottlenecks are timm's `SEResNetBottleneck`
    (timm/models/senet.py: the Caffe models' stride in the first 1x1 convolution, SE with FC
    biases), its `se_module` renamed `se` to match our state-dict names.

Outputs (run once where PyTorch is installed; small files, committed):

    python3 scripts/torch_option_goldens.py --out tests/golden/options

  arch_<case>.safetensors   one training-mode step of one architecture: the initial state dict
                            ("state.<name>", float32), a batch (x float32 [4,3,H,W], y int64),
                            and in float64 the loss, logits, every gradient ("grad.<name>") and
                            the running statistics after the step ("after.<bn>.running_*")
  opt_<case>.safetensors    3 or 4 steps of the se-resnet8 case "standard" with one optimizer /
                            loss / clipping option: the same state and four batches (x0..x3,
                            y0..y3), and in float64 the loss, learning rate and (with clipping)
                            total gradient norm of each step, and every parameter and running
                            statistic after the last step ("after.<name>")
  recipe_<case>.safetensors timm's train.py recipes on the same network: --grad-accum-steps over
                            one epoch of six batches (x0..x5, y0..y5) with timm's ModelEmaV3, and
                            in float64 each batch's loss, the state after the epoch ("after.<name>")
                            and the EMA's ("ema.<name>"; needs timm)
  bounds.safetensors        small op-level cases where a constant's placement matters: Adam on
                            gradients 0, 1e-10, 1e-8, 1e-6 (eps), batch norm in eval mode on
                            running variances 0 .. 1 (eps), clip_grad_norm_ of gradients whose
                            norm is 1e-5 (its +1e-6)

The metadata of every file ("config") is the case as JSON; tests/option_goldens.rs checks it
against its own case list.
"""
import argparse
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

torch.set_default_dtype(torch.float64)


# ---------------------------------------------------------------------------------------------
# Modules


class SE(nn.Module):
    """Hu et al., Fig. 3: squeeze, FC (C -> C/r), ReLU, FC (C/r -> C), gate, scale."""

    def __init__(self, c, reduction, bias, squeeze, excitation):
        super().__init__()
        self.fc1 = nn.Conv2d(c, c // reduction, 1, bias=bias)
        self.fc2 = nn.Conv2d(c // reduction, c, 1, bias=bias)
        self.squeeze, self.excitation = squeeze, excitation

    def forward(self, x):
        z = F.adaptive_avg_pool2d(x, 1) if self.squeeze == "avg" else F.adaptive_max_pool2d(x, 1)
        a = self.fc2(F.relu(self.fc1(z)))
        gate = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": F.relu}[self.excitation](a)
        return x * gate


class BasicBlock(nn.Module):
    """torchvision's BasicBlock (conv-BN-ReLU-conv-BN, + shortcut, ReLU) with an SE block placed
    as Fig. 5 of the SENet paper draws it."""

    def __init__(self, c_in, c, stride, se, o):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.downsample = None
        if stride != 1 or c_in != c:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c, 1, stride, bias=False), nn.BatchNorm2d(c))
        self.placement = o["placement"] if se else None
        if se:
            # SE-PRE recalibrates the unit's input: c_in channels; every other placement c.
            width = c_in if self.placement == "pre" else c
            self.se = SE(width, o["reduction"], o["se_bias"], o["squeeze"], o["excitation"])

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        if self.placement == "identity":
            shortcut = self.se(shortcut)
        y = self.se(x) if self.placement == "pre" else x
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(y)))))
        if self.placement == "standard":
            y = self.se(y)
        out = F.relu(y + shortcut)
        if self.placement == "post":
            out = self.se(out)
        return out


class CifarResNet8(nn.Module):
    """He et al. §4.2 with n = 1: 3x3 stem, three stages of one block at 16w, 32w, 64w channels
    (the second and third with stride 2), global average pooling, fc."""

    def __init__(self, o):
        super().__init__()
        w = [int(c * o["width"]) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(3, w[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w[0])
        stages = o["stages"] or [1, 2, 3]
        c_in = w[0]
        for s, c in enumerate(w):
            block = BasicBlock(c_in, c, 1 if s == 0 else 2, (s + 1) in stages, o)
            setattr(self, f"layer{s + 1}", nn.Sequential(block))
            c_in = c
        self.fc = nn.Linear(c_in, o["classes"])

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean((2, 3)))


class SEResNet50(nn.Module):
    """He et al. Table 1's 50-layer stages (3, 4, 6, 3 bottlenecks) of timm's SEResNetBottleneck,
    with torchvision's stem and names (conv1, bn1, maxpool 3/2/1, layer1..4, fc)."""

    def __init__(self, o):
        super().__init__()
        from timm.models.senet import SEResNetBottleneck

        w = [int(c * o["width"]) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(3, w[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(w[0])
        c_in = w[0]
        for s, (planes, n) in enumerate(zip(w, (3, 4, 6, 3))):
            blocks = []
            for b in range(n):
                stride = 2 if s > 0 and b == 0 else 1
                down = None
                if stride != 1 or c_in != planes * 4:
                    down = nn.Sequential(nn.Conv2d(c_in, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4))
                blocks.append(SEResNetBottleneck(c_in, planes, 1, o["reduction"], stride, down))
                c_in = planes * 4
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(c_in, o["classes"])

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean((2, 3)))


def our_names(state):
    """timm's `se_module` is our `se`."""
    return {k.replace(".se_module.", ".se."): v for k, v in state.items()}


# ---------------------------------------------------------------------------------------------
# Cases

BASE = dict(model="se-resnet8", width=0.25, reduction=2, se_bias=False, squeeze="avg", excitation="sigmoid",
            placement="standard", stages=[], classes=5, hw=8, batch=4)

ARCH = {
    "standard": {},
    "pre": dict(placement="pre"),
    "post": dict(placement="post"),
    "identity": dict(placement="identity"),
    "max_squeeze": dict(squeeze="max"),
    "tanh": dict(excitation="tanh"),
    "relu_gate": dict(excitation="relu"),
    "stages_2_3": dict(stages=[2, 3]),
    "se_bias": dict(se_bias=True),
    # Bottlenecks: width 1/32 (2, 4, 8, 16 planes, x4 out), SE r 4 with biases (timm's); 48x48
    # inputs leave the last stage 2x2 planes (batch norm over 16 values, not 4).
    "se_resnet50": dict(model="se-resnet50", width=1 / 32, reduction=4, se_bias=True, hw=48),
}

# Optimizer / loss / clipping options on the "standard" se-resnet8. `schedule` "step" over
# 4 epochs of one step: the paper's /10 at 50 % and 75 % of the run = torch's MultiStepLR([2, 3]).
OPT = {
    "sgd_paper": dict(optimizer="sgd", lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-4, nesterov=False,
                      schedule="step", steps=4),
    "sgd_dampening": dict(optimizer="sgd", lr=0.1, momentum=0.9, dampening=0.3, weight_decay=1e-4, nesterov=False),
    "nesterov": dict(optimizer="sgd", lr=0.05, momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=True),
    "adam_l2": dict(optimizer="adam", lr=1e-3, betas=[0.9, 0.999], eps=1e-8, weight_decay=1e-2),
    "adamw": dict(optimizer="adamw", lr=1e-3, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.05),
    "label_smoothing": dict(optimizer="sgd", lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False,
                            label_smoothing=0.1),
    # max_norm a quarter of the first step's norm: every step clips.
    "clip": dict(optimizer="sgd", lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False,
                 clip_fraction=0.25),
}


def build(o):
    torch.manual_seed(0)
    model = SEResNet50(o) if o["model"] == "se-resnet50" else CifarResNet8(o)
    # Batch norm far from its identity start, so that a gamma/beta mix-up or a dropped affine
    # shows: gamma in [0.5, 1.5], beta in [-0.2, 0.2], running statistics away from 0/1.
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.4 * torch.rand(m.bias.shape, generator=g) - 0.2)
                m.running_mean.copy_(0.2 * torch.rand(m.running_mean.shape, generator=g) - 0.1)
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    # Round the initial state to float32 so the float32 file is exactly what float64 starts from.
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.float().double())
    return model


def state_tensors(model):
    return {"state." + k: (v.float() if v.is_floating_point() else v).contiguous()
            for k, v in our_names(model.state_dict()).items()}


def batch(o, k):
    g = torch.Generator().manual_seed(100 + k)
    x = torch.rand(o["batch"], 3, o["hw"], o["hw"], generator=g).float()
    y = torch.randint(0, o["classes"], (o["batch"],), generator=g)
    return x, y


def save(path, tensors, config):
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"config": json.dumps(config)})
    print(f"{path}: {os.path.getsize(path)} bytes")


def arch_case(name, over, out):
    o = {**BASE, **over}
    model = build(o)
    tensors = state_tensors(model)
    x, y = batch(o, 0)
    tensors.update(x=x, y=y)
    model.train()
    logits = model(x.double())
    loss = F.cross_entropy(logits, y)
    loss.backward()
    tensors["loss"] = loss.detach().reshape(1)
    tensors["logits"] = logits.detach()
    for k, p in our_names(dict(model.named_parameters())).items():
        tensors["grad." + k] = p.grad.detach().clone()
    for k, v in our_names(model.state_dict()).items():
        if "running" in k:
            tensors["after." + k] = v.detach().clone()
    save(os.path.join(out, f"arch_{name}.safetensors"), tensors, o)


def optimizer(o, params):
    if o["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=o["lr"], momentum=o["momentum"], dampening=o["dampening"],
                               weight_decay=o["weight_decay"], nesterov=o["nesterov"])
    cls = torch.optim.Adam if o["optimizer"] == "adam" else torch.optim.AdamW
    return cls(params, lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"], weight_decay=o["weight_decay"])


def opt_case(name, over, out):
    o = {**BASE, "steps": 3, "schedule": "constant", "label_smoothing": 0.0, **over}
    model = build(o)
    tensors = state_tensors(model)
    batches = [batch(o, k) for k in range(o["steps"])]
    for k, (x, y) in enumerate(batches):
        tensors[f"x{k}"], tensors[f"y{k}"] = x, y
    if "clip_fraction" in o:
        # The first step's unclipped norm, from a copy of the model.
        probe = build(o)
        probe.train()
        F.cross_entropy(probe(batches[0][0].double()), batches[0][1]).backward()
        norm = torch.sqrt(sum((p.grad ** 2).sum() for p in probe.parameters()))
        o["max_norm"] = float(o["clip_fraction"] * norm)
    opt = optimizer(o, model.parameters())
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [o["steps"] // 2, 3 * o["steps"] // 4], 0.1) \
        if o["schedule"] == "step" else None
    model.train()
    losses, lrs, norms = [], [], []
    for x, y in batches:
        opt.zero_grad()
        lrs.append(opt.param_groups[0]["lr"])
        loss = F.cross_entropy(model(x.double()), y, label_smoothing=o["label_smoothing"])
        loss.backward()
        if "max_norm" in o:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), o["max_norm"])))
        opt.step()
        if sched:
            sched.step()
        losses.append(loss.item())
    tensors["loss"] = torch.tensor(losses)
    tensors["lr"] = torch.tensor(lrs)
    if norms:
        tensors["norm"] = torch.tensor(norms)
    for k, v in our_names(model.state_dict()).items():
        if v.is_floating_point():
            tensors["after." + k] = v.detach().clone()
    save(os.path.join(out, f"opt_{name}.safetensors"), tensors, o)


# timm's --grad-accum-steps and --model-ema, as its train.py runs them: 6 batches of one epoch in
# groups of 4 and 2 (the last group shorter, each loss divided by its group's batch count), one
# optimizer step per group, then ModelEmaV3.update(model, step=num_updates) (warmup, decay 0.9).
RECIPES = {
    "grad_accum_ema": dict(optimizer="sgd", lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-4, nesterov=False,
                           batches=6, accum=4, ema_decay=0.9, ema_warmup=True),
}


def recipe_case(name, over, out):
    from timm.utils.model_ema import ModelEmaV3
    o = {**BASE, **over}
    model = build(o)
    tensors = state_tensors(model)
    batches = [batch(o, k) for k in range(o["batches"])]
    for k, (x, y) in enumerate(batches):
        tensors[f"x{k}"], tensors[f"y{k}"] = x, y
    ema = ModelEmaV3(model, decay=o["ema_decay"], use_warmup=o["ema_warmup"])
    opt = optimizer(o, model.parameters())
    model.train()
    n, accum = len(batches), o["accum"]
    last_accum = n % accum
    last_idx_to_accum = n - last_accum
    num_updates, losses = 0, []
    opt.zero_grad()
    for i, (x, y) in enumerate(batches):
        steps = last_accum if i >= last_idx_to_accum else accum
        loss = F.cross_entropy(model(x.double()), y)
        losses.append(loss.item())
        (loss / steps).backward()
        if (i + 1) % accum == 0 or i == n - 1:
            opt.step()
            opt.zero_grad()
            num_updates += 1
            ema.update(model, step=num_updates)
    tensors["loss"] = torch.tensor(losses)
    for k, v in our_names(model.state_dict()).items():
        if v.is_floating_point():
            tensors["after." + k] = v.detach().clone()
    for k, v in our_names(ema.module.state_dict()).items():
        if v.is_floating_point():
            tensors["ema." + k] = v.detach().clone()
    save(os.path.join(out, f"recipe_{name}.safetensors"), tensors, o)


def bounds(out):
    t = {}
    # Adam on zero state, lr 1, from parameters 0: the update of step 1 is g / (|g| + eps) per
    # element, so eps decides it for |g| <= 1e-6; three steps with the same gradients.
    g = torch.tensor([0.0, 1e-10, -1e-10, 1e-8, -1e-8, 1e-7, 1e-6, -1e-6, 1e-4, 1.0]).float().double()
    p = torch.zeros_like(g, requires_grad=True)
    opt = torch.optim.Adam([p], lr=1.0)
    t["adam.grad"] = g
    for s in range(1, 4):
        p.grad = g.clone()
        opt.step()
        t[f"adam.param{s}"] = p.detach().clone()
    # Batch norm in eval mode: running variances from 0 to 1, where eps (1e-5) inside the square
    # root decides the scale; inputs and statistics float32-exact.
    gen = torch.Generator().manual_seed(3)
    rv = torch.tensor([0.0, 1e-6, 1e-5, 1e-3, 1.0]).float().double()
    c = rv.numel()
    x = (2 * torch.rand(2, c, 3, 3, generator=gen) - 1).float().double()
    rm = (0.2 * torch.rand(c, generator=gen) - 0.1).float().double()
    gamma = (0.5 + torch.rand(c, generator=gen)).float().double()
    beta = (0.4 * torch.rand(c, generator=gen) - 0.2).float().double()
    t.update({"bn.x": x, "bn.running_mean": rm, "bn.running_var": rv, "bn.weight": gamma, "bn.bias": beta})
    t["bn.out"] = F.batch_norm(x, rm, rv, gamma, beta, training=False, eps=1e-5)
    # clip_grad_norm_ of two gradient tensors whose total norm is ~1e-5, max_norm 1e-6: the
    # coefficient max_norm / (norm + 1e-6) is ~0.09, a tenth below what it would be without +1e-6.
    g1 = (2e-6 * torch.rand(7, generator=gen) - 1e-6).float().double()
    g2 = (2e-6 * torch.rand(40, generator=gen) - 1e-6).float().double()
    a = g1.clone().requires_grad_()
    b = g2.clone().requires_grad_()
    a.grad, b.grad = g1.clone(), g2.clone()
    norm = torch.nn.utils.clip_grad_norm_([a, b], 1e-6)
    t.update({"clip.g1": g1, "clip.g2": g2, "clip.norm": norm.reshape(1), "clip.out1": a.grad, "clip.out2": b.grad})
    save(os.path.join(out, "bounds.safetensors"), t, {"adam": {"lr": 1.0}, "bn_eps": 1e-5, "clip_max_norm": 1e-6})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/golden/options")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for name, over in ARCH.items():
        arch_case(name, over, args.out)
    for name, over in OPT.items():
        opt_case(name, over, args.out)
    for name, over in RECIPES.items():
        recipe_case(name, over, args.out)
    bounds(args.out)


if __name__ == "__main__":
    main()
