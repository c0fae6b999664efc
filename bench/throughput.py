#!/usr/bin/env python3
"""Images per second of training and evaluation steps of model.py on this machine's device.

Synthetic data (speed does not depend on the pixels), so it needs no dataset:
    python3 bench/throughput.py                       # WRN-28-4, batch 512, on the GPU if there is one
    python3 bench/throughput.py --arch 10-1 --device cpu --iters 2
Prints one row per step kind: clean training, PGD-K training (K = 5 and 10), the TRADES + AWP step with a
2-step attack (the ACAT recipe's) and PGD-20 evaluation (float32, MeanSparse mask on, as in ./model.py --eval).
--compile times the training steps under torch.compile (the warm-up steps pay for compiling; raise
--warmup so that they do).
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
    p.add_argument("--compile", action="store_true", help="torch.compile the training steps (warm-up compiles)")
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
    recipes = [("clean", dict(attack_steps=0)), ("PGD-5", dict(attack_steps=5)), ("PGD-10", dict(attack_steps=10)),
               ("TRADES PGD-2 + AWP", dict(attack_steps=2, attack_step_size=8 / 255, trades=6.0, awp=5e-3))]
    for name, kw in recipes:
        cfg = M.TrainConfig(arch=args.arch, **kw)
        opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, nesterov=True)
        core = torch.compile(net) if args.compile else net
        awp_weights = [m.weight for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        with M.bypassed(net):
            seconds = timed(lambda: M.train_step(core, core, x, y, cfg, opt, noise, eps=cfg.eps,
                                                 awp_weights=awp_weights if cfg.awp else None),
                            args.iters, args.warmup, device)
        rows.append((f"train {name} ({'bf16' if device.type == 'cuda' else 'fp32'})", args.batch_size / seconds))
    net.eval()
    attack = M.PGDAttack(net, M.AttackOptions(steps=args.eval_steps), norm="linf")
    with M.true_float32():      # as ./model.py evaluates: TF32 off on CUDA
        seconds = timed(lambda: attack.batch(x, y, 0), args.iters, args.warmup, device)
    rows.append((f"eval PGD-{args.eval_steps} (fp32)", args.batch_size / seconds))
    for name, rate in rows:
        print(f"{name:34s} {rate:10,.0f} img/s")


if __name__ == "__main__":
    main()
