#!/usr/bin/env python3
"""Draw docs/meansparse.png from the committed reports.

    python3 bench/figures.py                        # writes docs/meansparse.png
    python3 bench/figures.py --out /tmp/m.png

Left: accuracy against MeanSparse's α on the validation split, from the committed model's calibration
(plain PGD-20, BPDA PGD-20 and the APGD worst case; clean accuracy dotted, on its own axis;
`results/adaptive_calibrate_val1024.json`).
Right: accuracy against ε under PGD-20 L∞ (the sweep of `--sanity` on 200 validation images,
`results/sanity_val200_alpha0.json`; its ε = 1 point, the unbounded check, is named in the legend).
"""
import argparse
import json
import os
import sys

REPO = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, REPO)
import model as M  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(REPO, "docs", "meansparse.png"))
    args = p.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(os.path.join(REPO, "results", "adaptive_calibrate_val1024.json")) as f:
        calibration = json.load(f)["calibration"]
    with open(os.path.join(REPO, "results", "sanity_val200_alpha0.json")) as f:
        checks = json.load(f)["checks"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.5, 3.6))
    robust = {**calibration, "sweep": [{k: v for k, v in row.items() if k != "clean"} for row in calibration["sweep"]]}
    M.plot_sweep(left, robust)
    clean = left.twinx()        # clean accuracy on its own scale, so that the robust lines keep theirs
    clean.plot([r["alpha"] for r in calibration["sweep"]], [r["clean"] for r in calibration["sweep"]], ":",
               color="grey", marker="o", markersize=3)
    clean.set_ylim(80, 90)
    clean.set_ylabel("clean accuracy (%), dotted", color="grey")
    left.set_title("MeanSparse alpha: 1,024 validation images")
    points = [(eps * 255, acc) for eps, acc in zip(checks["eps"], checks["accuracy"]) if eps < 1]
    right.plot(*zip(*points), "-o", markersize=3, label=f"PGD-20 L-inf (at eps 1: {checks['accuracy'][-1]:g} %)")
    right.set(xlabel="eps (x/255)", ylabel="accuracy (%)", title="committed model (alpha 0): 200 val. images")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out} ({os.path.getsize(args.out) // 1024} KB)")


if __name__ == "__main__":
    main()
