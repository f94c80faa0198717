"""The table of a scripts/lavapipe-ab.sh log: per width and plan, each round's train / eval images/s,
the step's GFLOP/s over its own bench's FMA peak (the higher of the bench's two probes) and over the
run's highest probe, the fused plan's speed over the unfused one's in each round, and PyTorch's
lines. With several runs appended to one log (each starts with a "# <date> build" header line),
the last run is summarised, or the one whose header holds --build.

    python3 scripts/ab_summary.py docs/runs/lavapipe-ab/senet-b128.jsonl
"""
import argparse
import json
import math
import re
import sys


def runs(path):
    """The log's runs: lists of (header, [records])."""
    out = []
    for line in open(path):
        line = line.strip()
        if re.match(r"# \d{4}-\d\d-\d\dT\S+ build ", line):
            out.append((line, []))
        elif line.startswith("{") and out:
            out[-1][1].append(json.loads(line))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log")
    ap.add_argument("--build", help="summarise the run of this build (default: the last run)")
    a = ap.parse_args()
    found = [r for r in runs(a.log) if a.build is None or f" build {a.build} " in r[0]]
    if not found:
        sys.exit(f"{a.log}: no run{' of build ' + a.build if a.build else ''} (a '# <date> build <hash>' line)")
    header, recs = found[-1]
    benches = [r for r in recs if "round" in r]
    torch = {r["width"]: r for r in recs if r.get("framework") == "pytorch-cpu"}
    if not benches:
        sys.exit(f"{a.log}: the run '{header}' holds no bench lines")
    top = max(max(r["fma_probes_gflops"]) for r in benches)
    print(header)
    print(f"FMA probes within the run: {min(min(r['fma_probes_gflops']) for r in benches):.1f}-{top:.1f} GFLOP/s")
    print("| width | `--fuse` | train / eval images/s per round | step GFLOP/s | of its bench's peak | of the run's highest probe | PyTorch CPU train / eval |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    widths = sorted({float(re.search(r"width ([\d.]+)", r["model"]).group(1)) for r in benches}, reverse=True)
    for w in widths:
        rows = {f: [r for r in benches if f"width {w:g} " in r["model"] and r["fuse"] == f] for f in ("on", "off")}
        for f in ("on", "off"):
            rs = sorted(rows[f], key=lambda r: r["round"])
            if not rs:
                continue
            speeds = " · ".join(f"{r['train_images_per_s']:.2f} / {r['eval_images_per_s']:.1f}" for r in rs)
            gf = " · ".join(f"{r['train_step_gflops']:.1f}" for r in rs)
            own = " · ".join(f"{100 * r['train_step_gflops'] / r['fma_peak_gflops']:.1f} %" for r in rs)
            run = " · ".join(f"{100 * r['train_step_gflops'] / top:.1f} %" for r in rs)
            t = torch.get(w) if f == "on" else None
            tc = f"{t['train_images_per_s']:.1f} / {t['eval_images_per_s']:.1f}" if t else ""
            print(f"| {w:g} | {f} | {speeds} | {gf} | {own} | {run} | {tc} |")
        # Each round's fused bench over its unfused one (in log order where a round repeats).
        pairs = [
            a["train_images_per_s"] / b["train_images_per_s"]
            for rnd in sorted({r["round"] for r in rows["on"]})
            for a, b in zip(
                [r for r in rows["on"] if r["round"] == rnd], [r for r in rows["off"] if r["round"] == rnd]
            )
        ]
        if pairs:
            geo = math.exp(sum(math.log(x) for x in pairs) / len(pairs))
            each = ", ".join(f"{x:.3f}" for x in pairs)
            print(f"width {w:g}: fused train speed over unfused, per round: {each} (geometric mean {geo:.3f})")
        t = torch.get(w)
        if t:
            ours = [r["train_images_per_s"] / t["train_images_per_s"] for r in rows["on"]]
            print(f"width {w:g}: fused train over PyTorch's: " + ", ".join(f"{x:.3f}" for x in ours))


if __name__ == "__main__":
    main()
