"""PyTorch float64 goldens for dynamic loss scaling (tests/grad_scaler_golden.rs).

`torch.amp.GradScaler("cpu")` itself, run the way torch's AMP recipe writes it
(https://pytorch.org/docs/stable/notes/amp_examples.html, "Gradient clipping"):

    scaler.scale(loss).backward()
    scaler.unscale_(opt)                       # only with clipping
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    scaler.step(opt)                           # skipped when a gradient is inf/NaN
    scaler.update()

on one float64 parameter tensor w [N] of a least-squares model, loss = mean((X_t w - y_t)^2) / 2
over a batch of 8 rows per step, for T steps. After each backward pass the script overwrites one
scaled gradient element with inf, NaN or -inf at chosen steps (what an f16 overflow leaves), among
them the first step (the optimizer's state must start at the first finite step), a step right
after a growth's count began (the growth tracker must restart) and two steps in a row. Growth
interval 3, so the scale grows several times in 14 steps. On CPU tensors GradScaler runs torch's
own CPU kernels `_amp_foreach_non_finite_check_and_unscale_` and `_amp_update_scale_`.

Outputs (run once where PyTorch is installed; small files, committed):

    python3 scripts/torch_grad_scaler_golden.py --out tests/golden/grad_scaler

  <case>.safetensors  w0 [N] (float64 holding float32 values, so the GPU starts where torch
                      does); per step t = 1..T: grad.<t> [N] the scaled gradient unscale_ saw
                      (after the injection), w.<t> [N] the parameter after the step; and [T]
                      vectors scale_before, scale_after, tracker_after, skipped (0/1),
                      total_norm (clip_grad_norm_'s return, before clipping; inf/NaN on skipped
                      steps) and opt_steps (the optimizer's own step count after the step:
                      Adam's state["step"], for SGD the number of opt.step() calls)
  defaults.safetensors  torch.amp.GradScaler()'s defaults: init_scale, growth_factor,
                      backoff_factor, growth_interval; and "ceiling": the scale and growth tracker
                      after one finite step from 2^127 at growth interval 1 (the grown scale would
                      be inf in float32, so torch keeps 2^127)

The metadata of every file ("config") is the case as JSON; the test reads its case from it.
"""
import argparse
import json
import os

import torch
from safetensors.torch import save_file

N = 37
T = 14
ROWS = 8
# step -> (element, value) overwritten in the scaled gradient after the backward pass
INJECT = {1: (0, "inf"), 6: (N - 1, "nan"), 10: (5, "-inf"), 11: (17, "inf")}
SCALER = dict(init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5, growth_interval=3)

CASES = {
    # SGD with momentum and weight decay, no clipping (no explicit unscale_: step() unscales)
    "sgd_momentum": dict(opt="sgd", lr=0.05, momentum=0.9, dampening=0.0, weight_decay=1e-4, nesterov=False,
                         max_norm=None),
    # Adam with clip_grad_norm_ after unscale_: the unscaled norms are 5-13, so max_norm 8 clips
    # six of the ten finite steps and leaves four (clipping the scaled gradients would clip all)
    "adam_clip": dict(opt="adam", lr=1e-2, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.0, decoupled=False,
                      max_norm=8.0),
    # AdamW (decoupled decay), max_norm 6 (clips seven of ten)
    "adamw_clip": dict(opt="adam", lr=1e-2, betas=[0.9, 0.999], eps=1e-8, weight_decay=1e-2, decoupled=True,
                       max_norm=6.0),
}


def optimizer(c, params):
    if c["opt"] == "sgd":
        return torch.optim.SGD(params, lr=c["lr"], momentum=c["momentum"], dampening=c["dampening"],
                               weight_decay=c["weight_decay"], nesterov=c["nesterov"])
    cls = torch.optim.AdamW if c["decoupled"] else torch.optim.Adam
    return cls(params, lr=c["lr"], betas=tuple(c["betas"]), eps=c["eps"], weight_decay=c["weight_decay"])


def case(name, c, out):
    g = torch.Generator().manual_seed(20261203)
    w0 = (torch.rand(N, generator=g, dtype=torch.float32) * 2 - 1).double()
    w = torch.nn.Parameter(w0.clone())
    opt = optimizer(c, [w])
    scaler = torch.amp.GradScaler("cpu", **SCALER)
    t_ = {"w0": w0}
    rec = {k: [] for k in ("scale_before", "scale_after", "tracker_after", "skipped", "total_norm", "opt_steps")}
    calls = 0
    for t in range(1, T + 1):
        x = torch.randn(ROWS, N, generator=g, dtype=torch.float64)
        y = torch.randn(ROWS, generator=g, dtype=torch.float64)
        opt.zero_grad(set_to_none=True)
        loss = ((x @ w - y) ** 2).mean() / 2
        rec["scale_before"].append(scaler.get_scale())
        scaler.scale(loss).backward()
        if t in INJECT:
            i, v = INJECT[t]
            with torch.no_grad():
                w.grad[i] = float(v)
        t_[f"grad.{t}"] = w.grad.detach().clone()
        norm = float("nan")
        if c["max_norm"] is not None:
            scaler.unscale_(opt)
            norm = float(torch.nn.utils.clip_grad_norm_([w], c["max_norm"]))
        scaler.step(opt)
        # The scaler's record of this step (reset by update()): inf/NaN found while unscaling.
        found = sum(v.item() for v in scaler._per_optimizer_states[id(opt)]["found_inf_per_device"].values())
        stepped = found == 0.0
        calls += int(stepped)
        scaler.update()
        rec["scale_after"].append(scaler.get_scale())
        rec["tracker_after"].append(int(scaler._growth_tracker.item()))
        rec["skipped"].append(0.0 if stepped else 1.0)
        rec["total_norm"].append(norm)
        st = opt.state.get(w, {})
        rec["opt_steps"].append(float(st["step"]) if "step" in st else float(calls))
        t_[f"w.{t}"] = w.detach().clone()
    for k, v in rec.items():
        t_[k] = torch.tensor(v, dtype=torch.float64)
    config = dict(c, scaler=SCALER, n=N, steps=T, inject={str(k): v for k, v in INJECT.items()})
    save_file({k: v.contiguous() for k, v in t_.items()}, os.path.join(out, f"{name}.safetensors"),
              metadata={"config": json.dumps(config)})
    print(name, "scale after each step:", [int(s) for s in rec["scale_after"]],
          "skipped:", [int(s) for s in rec["skipped"]], "opt steps:", rec["opt_steps"][-1],
          "norms:", [round(n, 3) for n in rec["total_norm"]])


def ceiling():
    """One finite step from scale 2^127 with growth interval 1: the grown scale would overflow f32,
    so update() keeps 2^127 (and restarts the tracker). Returns [scale, tracker] after it."""
    w = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = torch.optim.SGD([w], lr=0.0)
    s = torch.amp.GradScaler("cpu", init_scale=2.0**127, growth_interval=1)
    s.scale(w.sum()).backward()
    s.step(opt)
    s.update()
    return [s.get_scale(), float(s._growth_tracker.item())]


def defaults(out):
    s = torch.amp.GradScaler("cpu")
    v = [s.get_scale(), s.get_growth_factor(), s.get_backoff_factor(), float(s.get_growth_interval())]
    save_file({"defaults": torch.tensor(v, dtype=torch.float64),
               "ceiling": torch.tensor(ceiling(), dtype=torch.float64)}, os.path.join(out, "defaults.safetensors"),
              metadata={"config": json.dumps(dict(order=["init_scale", "growth_factor", "backoff_factor",
                                                        "growth_interval"], torch=torch.__version__))})


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/golden/grad_scaler")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    torch.set_num_threads(1)
    for name, c in CASES.items():
        case(name, c, a.out)
    defaults(a.out)


if __name__ == "__main__":
    main()
