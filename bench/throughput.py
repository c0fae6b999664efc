#!/usr/bin/env python3
"""Images per second of training and evaluation steps of model.py on this machine's device.

Synthetic data (speed does not depend on the pixels), so it needs no dataset:
    python3 bench/throughput.py                       # WRN-28-4, batch 512, on the GPU if there is one
    python3 bench/throughput.py --arch 10-1 --device cpu --iters 2
Prints one row per step kind: clean training, PGD-K training (K = 5 and 10) and PGD-20 evaluation
(float32, MeanSparse mask on, as in ./model.py --eval).
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import model as M  # noqa: E402


def timed(fn, iters, warmup, device):
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / iters


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default=M.DEFAULT_ARCH)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--iters", type=int, default=10, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per row (cudnn autotuning)")
    p.add_argument("--eval-steps", type=int, default=M.EVAL_STEPS)
    args = p.parse_args()
    device = M.pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    channels_last = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch_size, 3, 32, 32, generator=gen).to(device).contiguous(memory_format=channels_last)
    y = torch.randint(0, 10, (args.batch_size,), generator=gen).to(device)
    net = M.build_model(args.arch).to(device).to(memory_format=channels_last)
    noise = torch.Generator(device).manual_seed(0)
    print(f"{net.arch_name}, batch {args.batch_size}, {M.device_name(device)}, torch {torch.__version__}")
    rows = []
    for k in (0, 5, 10):
        cfg = M.TrainConfig(arch=args.arch, attack_steps=k)
        opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, nesterov=True)
        with M.bypassed(net):
            seconds = timed(lambda: M.train_step(net, net, x, y, cfg, opt, noise, device), args.iters,
                            args.warmup, device)
        rows.append((f"train {'clean' if k == 0 else f'PGD-{k}'} ({'bf16' if device.type == 'cuda' else 'fp32'})",
                     args.batch_size / seconds))
    net.eval()
    attack = M.make_pgd("linf", M.EPS_LINF, M.EPS_LINF / 4, args.eval_steps, generator=noise)
    seconds = timed(lambda: attack(net, x, y), args.iters, args.warmup, device)
    rows.append((f"eval PGD-{args.eval_steps} (fp32)", args.batch_size / seconds))
    for name, rate in rows:
        print(f"{name:24s} {rate:10,.0f} img/s")


if __name__ == "__main__":
    main()
