#!/usr/bin/env python3
"""Compare two model.py reports image by image.

    python3 bench/compare.py A.json B.json                        # every row both reports have
    python3 bench/compare.py A.json:apgd-linf B.json:aa-linf --first 1000

Two accuracies measured on the same images are compared through the per-image difference (A correct,
B not; B correct, A not): its standard error is far smaller than that of either accuracy (a 1,000-image
accuracy alone has one of about 1.6 points), so this is the test of "is the new model better" or "does the
adaptive evaluation find what AutoAttack found". Rows are matched by name unless given; `--first N` uses
the first N images of both. A report written before rows kept `per_image` gives its aggregate only, which
is compared as is (on its own images, without a standard error).

Each report must be of the same split; the images are the first min(n_A, n_B, N) of it.
Exit status: 0, or 2 for bad input.
"""
import argparse
import json
import math
import sys

FLAG = 0.3      # points: a difference worth a sentence in the results


def read(spec):
    path, _, row = spec.partition(":")
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {path}: cannot read a report ({e.__class__.__name__}: {e})")
    if not isinstance(report, dict) or not isinstance(report.get("results"), dict):
        raise SystemExit(f"error: {path}: not a model.py report (no results)")
    if row and row not in report["results"]:
        raise SystemExit(f"error: {path} has no row {row!r}; it has {', '.join(report['results'])}")
    return path, report, row


def check_row(path, name, row):
    """A row this script can read: a per-image record of 0s and 1s, or an accuracy over n images."""
    record = row.get("per_image") if isinstance(row, dict) else None
    if record is not None and (not isinstance(record, str) or set(record) - {"0", "1"}):
        raise SystemExit(f"error: {path}: row {name!r} has a per_image that is not a string of 0s and 1s")
    if record is None and not (isinstance(row, dict) and all(isinstance(row.get(k), (int, float)) for k in (
            ("accuracy", "n") if "accuracy" in row else ("accuracy_so_far", "n_done")))):
        raise SystemExit(f"error: {path}: row {name!r} has neither a per-image record nor an accuracy over n images")


def outcomes(row, first):
    """The per-image record (bools) of the first `first` images, or None for a report without one."""
    record = row.get("per_image")
    return None if record is None else [c == "1" for c in record[:first]]


def aggregate(row, first):
    """(accuracy %, images) of a row: from its per-image record when it has one."""
    record = outcomes(row, first)
    if record is not None:
        return 100.0 * sum(record) / max(len(record), 1), len(record)
    if "accuracy" in row:
        return row["accuracy"], row["n"]
    return row["accuracy_so_far"], row["n_done"]        # an interrupted row


def compare(label, row_a, row_b, first):
    a, b = outcomes(row_a, first), outcomes(row_b, first)
    if a is None or b is None:
        (acc_a, n_a), (acc_b, n_b) = aggregate(row_a, first), aggregate(row_b, first)
        flag = "  <- more than 0.3 points apart" if abs(acc_a - acc_b) > FLAG else ""
        print(f"{label}: {acc_a:.2f} % (n={n_a}) against {acc_b:.2f} % (n={n_b}): {acc_a - acc_b:+.2f} points "
              f"(not paired: a report without a per-image record){flag}")
        return
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    d = [int(x) - int(y) for x, y in zip(a, b)]
    mean = sum(d) / n
    se = math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1) / n) if n > 1 else math.inf
    flag = "  <- more than 0.3 points apart" if abs(100 * mean) > FLAG else ""
    print(f"{label}: {100 * sum(a) / n:.2f} % against {100 * sum(b) / n:.2f} % on the same {n} images: "
          f"{100 * mean:+.2f} +- {100 * se:.2f} points (paired standard error); correct only in A: "
          f"{d.count(1)}, only in B: {d.count(-1)}{flag}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", metavar="A.json[:ROW]")
    p.add_argument("b", metavar="B.json[:ROW]")
    p.add_argument("--first", type=int, default=None, metavar="N", help="the first N images only")
    args = p.parse_args(argv)
    if args.first is not None and args.first < 1:
        p.error("--first must be at least 1")
    first = args.first or sys.maxsize
    (path_a, rep_a, row_a), (path_b, rep_b, row_b) = read(args.a), read(args.b)
    if rep_a.get("split") != rep_b.get("split"):
        raise SystemExit(f"error: {path_a} is on the {rep_a.get('split')} split, {path_b} on the "
                         f"{rep_b.get('split')} split: no images in common")
    if bool(row_a) != bool(row_b):
        raise SystemExit("error: name a row in both reports (A.json:ROW B.json:ROW) or in neither")
    pairs = [(row_a, row_b)] if row_a else [(r, r) for r in rep_a["results"] if r in rep_b["results"]]
    if not pairs:
        raise SystemExit(f"error: {path_a} and {path_b} have no row in common; name them (A.json:ROW B.json:ROW)")
    print(f"A: {path_a} (alpha {rep_a.get('alpha')}, sha256 {str(rep_a.get('model_sha256'))[:12]})")
    print(f"B: {path_b} (alpha {rep_b.get('alpha')}, sha256 {str(rep_b.get('model_sha256'))[:12]})")
    for ra, rb in pairs:
        check_row(path_a, ra, rep_a["results"][ra])
        check_row(path_b, rb, rep_b["results"][rb])
        compare(f"A:{ra} vs B:{rb}", rep_a["results"][ra], rep_b["results"][rb], first)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SystemExit as e:         # error messages exit 2, as model.py's bad input does
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            sys.exit(2)
        raise
