#!/usr/bin/env python3
"""Images per second of natural and PGD-5 evaluation of the committed model on the CPU, by memory layout
and batch size, against the loop that ran before (NCHW float32, batch 512, torch.where MeanSparse) in the
same run.

    python3 bench/cpu_eval.py                           # 1,000 test images natural, 100 PGD-5
    python3 bench/cpu_eval.py --n-natural 200 --n-pgd 20 --repeats 1 --report r.json

Rows (each the best of --repeats runs, to damp the noise of a shared machine):
  before            the loop of the previous version: NCHW, batch 512 (PGD: 100), MeanSparse by torch.where,
                    no splitting of batches inside forward
  NCHW / CL, B      this version's MeanSparse, weights and inputs NCHW or channels_last, batches of B,
                    forward called on exactly B images
  Net (platform)    Net().load_for_testing() called as the grading platform does: plain NCHW batches of
                    512 (PGD: 100) from ToTensor-like [0,1] images; forward splits them on the CPU
  Net, mask always  the platform's row with every MeanSparse computing its mask even at alpha 0 (the
                    shortcut that skips it there is what the row before measures)
  ./model.py        evaluate() on Batches of --eval-batch-size's CPU default, as ./model.py runs it
It also checks that every row predicts the same classes as `before` on every image (natural) and prints
the number of disagreements, which float32 rounding of near ties can make non-zero.
"""
import argparse
import contextlib
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import model as M  # noqa: E402


def where_forward(self, x):
    """MeanSparse's forward of the previous version (the reference of the `before` row)."""
    if self.mode == "off":
        return x
    mean = self.mean.view(1, -1, 1, 1).to(x.dtype)
    band = (self.alpha * self.std).view(1, -1, 1, 1).to(x.dtype)
    out = torch.where((x - mean).abs() < band, mean, x)
    return x + (out - x).detach() if self.mode == "bpda" else out


@contextlib.contextmanager
def previous_version():
    """The previous version's forward: torch.where in MeanSparse and no splitting of CPU batches."""
    forward, chunk = M.MeanSparse.forward, M.CPU_BATCH
    M.MeanSparse.forward, M.CPU_BATCH = where_forward, 10 ** 9
    try:
        yield
    finally:
        M.MeanSparse.forward, M.CPU_BATCH = forward, chunk


@contextlib.contextmanager
def mask_always():
    forward, M.MeanSparse.forward = M.MeanSparse.forward, M.MeanSparse.masked
    try:
        yield
    finally:
        M.MeanSparse.forward = forward


@contextlib.contextmanager
def no_split():
    chunk, M.CPU_BATCH = M.CPU_BATCH, 10 ** 9
    try:
        yield
    finally:
        M.CPU_BATCH = chunk


def natural(net, x, y, batch, layout, no_grad=torch.no_grad):
    preds = []
    with no_grad():
        for i in range(0, len(y), batch):
            preds.append(net(x[i:i + batch].contiguous(memory_format=layout)).argmax(1))
    return torch.cat(preds)


def pgd5(net, x, y, batch, layout):
    correct = 0
    for i in range(0, len(y), batch):
        xb, yb = x[i:i + batch].contiguous(memory_format=layout), y[i:i + batch]
        x_adv = M.pgd(net, xb, yb, norm="linf", eps=8 / 255, step_size=2 / 255, steps=5,
                      generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            correct += (net(x_adv).argmax(1) == yb).sum().item()
    return correct


def best_of(repeats, fn):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None, help="default $CIFAR10_DIR, else ./data")
    p.add_argument("--n-natural", type=int, default=1000)
    p.add_argument("--n-pgd", type=int, default=100)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batches", default="512,128,64,32", help="batch sizes of the NCHW / CL rows")
    p.add_argument("--report", help="write the rows as JSON")
    args = p.parse_args()
    repo = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    images, labels = M.load_cifar10(M.resolve_data_dir(args.data_dir), "test")
    x, y = images[:args.n_natural].float() / 255, labels[:args.n_natural]
    xp, yp = x[:args.n_pgd], y[:args.n_pgd]
    net = M.Net().load_for_testing(repo)
    nchw, cl = torch.contiguous_format, torch.channels_last
    print(f"committed model (alpha {M.get_alpha(net):g}), {torch.get_num_threads()} threads, torch {torch.__version__}; natural on "
          f"{len(y)} test images, PGD-5 L-inf on {len(yp)}; best of {args.repeats}")
    rows = []

    def row(name, kind, seconds, n, extra=""):
        rows.append({"row": name, "kind": kind, "seconds": round(seconds, 2), "images_per_s": round(n / seconds, 1)})
        base = next(r for r in rows if r["kind"] == kind and r["row"] == "before")
        rows[-1]["speedup"] = round(base["seconds"] / seconds, 2)
        print(f"{kind:8s} {name:22s} {seconds:7.2f} s {n / seconds:8.1f} img/s  x{rows[-1]['speedup']:.2f} {extra}",
              flush=True)

    with previous_version():
        net.to(memory_format=nchw)
        t, reference = best_of(args.repeats, lambda: natural(net, x, y, 512, nchw))
        row("before", "natural", t, len(y), f"(accuracy {100 * (reference == y).float().mean():.2f} %)")
        t, before_pgd = best_of(args.repeats, lambda: pgd5(net, xp, yp, 100, nchw))
        row("before", "pgd-5", t, len(yp), f"(accuracy {100 * before_pgd / len(yp):.2f} %)")

    def agreement(preds):
        return f"({int((preds != reference).sum())} of {len(y)} predictions differ from before)"

    with no_split():
        for layout, name in ((nchw, "NCHW"), (cl, "CL")):
            net.to(memory_format=layout)
            for batch in (int(b) for b in args.batches.split(",")):
                t, preds = best_of(args.repeats, lambda: natural(net, x, y, batch, layout, torch.inference_mode))
                row(f"{name}, batch {batch}", "natural", t, len(y), agreement(preds))
            for batch in (100, 64, 32):
                t, correct = best_of(args.repeats, lambda: pgd5(net, xp, yp, batch, layout))
                row(f"{name}, batch {batch}", "pgd-5", t, len(yp), f"(accuracy {100 * correct / len(yp):.2f} %)")

    platform = M.Net().load_for_testing(repo)
    t, preds = best_of(args.repeats, lambda: natural(platform, x, y, 512, nchw))
    row("Net (platform)", "natural", t, len(y), agreement(preds))
    t, correct = best_of(args.repeats, lambda: pgd5(platform, xp, yp, 100, nchw))
    row("Net (platform)", "pgd-5", t, len(yp), f"(accuracy {100 * correct / len(yp):.2f} %)")
    with mask_always():
        t, preds = best_of(args.repeats, lambda: natural(platform, x, y, 512, nchw))
        row("Net, mask always", "natural", t, len(y), agreement(preds))
        t, correct = best_of(args.repeats, lambda: pgd5(platform, xp, yp, 100, nchw))
        row("Net, mask always", "pgd-5", t, len(yp), f"(accuracy {100 * correct / len(yp):.2f} %)")
    batches = M.Batches(images[:args.n_natural], labels[:args.n_natural], M.CPU_BATCH, device="cpu")
    t, accuracy = best_of(args.repeats, lambda: M.accuracy(platform, batches, "natural", M.AttackOptions(),
                                                           verbose=False))
    row("./model.py", "natural", t, len(y), f"(accuracy {accuracy:.2f} %)")
    if args.report:
        with open(args.report, "w") as f:
            json.dump({"command": " ".join(["python3"] + sys.argv), "model_file": M.Net.model_file,
                       "model_sha256": M.file_sha256(os.path.join(repo, M.Net.model_file)), "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "cpu": M.device_name("cpu"), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
