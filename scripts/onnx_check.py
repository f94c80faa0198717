"""Check a model written by `senet export` outside Rust: onnx.checker, onnxruntime, PyTorch.

    python3 scripts/onnx_check.py model.onnx [--checkpoint runs/x/best.safetensors] [--batch 3]

1. onnx.checker.check_model(full_check=True): the file is valid ONNX, shapes infer.
2. onnxruntime runs it on random inputs at batch 1 and --batch (the batch dimension is dynamic;
   sample 0 must give the same logits both ways).
3. PyTorch, where the model has a definition in scripts/ (the base SENet of torch_golden.py,
   the (SE-)ResNets of torch_resnet.py, paper SE block): the module is loaded *from the ONNX
   initializers by name* (they are the state-dict names; only num_batches_tracked is absent),
   run in eval mode on the same inputs, and compared with onnxruntime to --tol.
With --checkpoint, every initializer is also compared with the checkpoint's tensor of the same name.

Each step runs where its package is installed and says so where it is not. Exit status 1 when a
check fails.
"""
import argparse
import json
import os
import sys

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--checkpoint", help="the safetensors file it was exported from")
    ap.add_argument("--batch", type=int, default=3)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    failed = False

    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        sys.exit("onnx is not installed (pip install onnx onnxruntime); nothing to check")

    m = onnx.load(args.model)
    onnx.checker.check_model(m, full_check=True)
    meta = {p.key: p.value for p in m.metadata_props}
    config = json.loads(meta["model_config"])
    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    print(f"onnx.checker: ok ({args.model}: IR {m.ir_version}, opset {opset}, {len(m.graph.node)} nodes, "
          f"{len(m.graph.initializer)} initializers, producer {m.producer_name} {m.producer_version})")

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    print(f"  input {m.graph.input[0].name} {dims(m.graph.input[0])} -> output {m.graph.output[0].name} "
          f"{dims(m.graph.output[0])}")
    print(f"  model {config['model']} width {config['width']} reduction {config['reduction']} se {config.get('se')} "
          f"se_bias {config.get('se_bias')}; classes {json.loads(meta['classes'])}")
    weights = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}

    if args.checkpoint:
        from safetensors.numpy import load_file
        sd = load_file(args.checkpoint)
        missing = sorted(k for k in sd if k not in weights and not k.endswith("num_batches_tracked"))
        extra = sorted(k for k in weights if k not in sd)
        differ = sorted(k for k in weights if k in sd and not np.array_equal(weights[k], sd[k]))
        ok = not (missing or extra or differ)
        failed |= not ok
        print(f"checkpoint: {'ok' if ok else 'MISMATCH'}: {len(weights)} initializers equal the tensors of the same "
              f"name in {args.checkpoint}" + (f"; missing {missing} extra {extra} different {differ}" if not ok else ""))

    c = config["in_channels"]
    h, w = config["input_hw"]
    rng = np.random.default_rng(args.seed)
    x = rng.uniform(-1, 1, size=(args.batch, c, h, w)).astype(np.float32)

    try:
        import onnxruntime as ort
    except ImportError:
        print("onnxruntime: not installed, skipped")
        return 1 if failed else 0
    runner = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    logits = runner.run(["logits"], {"input": x})[0]
    one = runner.run(["logits"], {"input": x[:1]})[0]
    d_batch = float(np.abs(one - logits[:1]).max())
    print(f"onnxruntime {ort.__version__}: logits {list(logits.shape)} at batch {args.batch}, {list(one.shape)} at "
          f"batch 1; sample 0 batch 1 vs batch {args.batch} max |diff| {d_batch:.2e}")
    failed |= d_batch > args.tol

    try:
        import torch
    except ImportError:
        print("PyTorch: not installed, skipped")
        return 1 if failed else 0
    module, why = torch_module(config)
    if module is None:
        print(f"PyTorch: skipped ({why})")
        return 1 if failed else 0
    state = {k: torch.from_numpy(v.copy()) for k, v in weights.items()}
    result = module.load_state_dict(state, strict=False)
    stray = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if stray or result.unexpected_keys:
        print(f"PyTorch: FAILED to load the initializers by name: missing {stray}, unexpected {result.unexpected_keys}")
        return 1
    module.eval()
    with torch.no_grad():
        ref = module.double()(torch.from_numpy(x).double()).numpy()
    d = float(np.abs(ref - logits).max())
    ok = d <= args.tol
    failed |= not ok
    print(f"PyTorch {torch.__version__} (float64, eval mode, weights loaded from the initializers by name): "
          f"max |onnxruntime - torch| {d:.2e} over {logits.size} logits (max |logit| {np.abs(ref).max():.2f}) "
          f"-> {'ok' if ok else 'FAILED'} at tol {args.tol}")
    return 1 if failed else 0


def torch_module(config):
    """The PyTorch module of scripts/ for this configuration, or (None, why not)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    se = config.get("se") or {}
    paper_se = (se.get("squeeze", "avg"), se.get("excitation", "sigmoid"), se.get("placement", "standard"),
                se.get("stages", [])) == ("avg", "sigmoid", "standard", [])
    name, k, c = config["model"], config["num_classes"], config["in_channels"]
    if name == "senet":
        if not paper_se or config.get("se_bias") or config["reduction"] != 16:
            return None, "scripts/torch_golden.py's SENet has only the paper's SE block, reduction 16, no FC biases"
        from torch_golden import senet
        return senet(k, c, config["width"]), None
    if not paper_se:
        return None, f"SE ablation {se} has no PyTorch definition in scripts/torch_resnet.py"
    from torch_resnet import resnet
    return resnet(name, k, c, config["width"], config["reduction"], config.get("se_bias", False)), None


if __name__ == "__main__":
    sys.exit(main())
