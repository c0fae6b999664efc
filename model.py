#!/usr/bin/env python3
"""Adversarially robust CIFAR-10: a WideResNet with MeanSparse, adversarial training and honest evaluation.

One file, read top to bottom: config -> data -> model -> attacks -> training -> MeanSparse calibration
-> evaluation -> CLI. Nothing runs on import, and config and model need torch alone.

    ./model.py                                       # natural accuracy of models/default_model.pth (test)
    ./model.py --eval natural,pgd-linf,bpda-linf --n-eval 1000 --report r.json
    ./model.py --eval apgd-linf,apgd-l2              # the adaptive evaluation (APGD worst case): a GPU job
    ./model.py --calibrate --model-file copy.pth     # MeanSparse statistics + alpha chosen on validation
    ./model.py --force-train --time-budget 7 --calibrate --eval natural,pgd-linf,bpda-linf
    torchrun --nproc_per_node=2 model.py --force-train -e 30

The grading platform imports this file, builds `Net()`, calls `net.load_for_testing(project_dir)` and feeds
[0,1] images (normalisation happens inside the model).
"""
import argparse
import contextlib
import copy
import dataclasses
import functools
import hashlib
import importlib.util
import json
import logging
import math
import multiprocessing
import os
import pickle
import platform
import shutil
import signal
import sys
import tempfile
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)     # training-set channel mean of [0,1] pixels
CIFAR10_STD = (0.2470, 0.2435, 0.2616)      # training-set channel std of [0,1] pixels
NUM_CLASSES = 10
NUM_VAL = 1024                              # training images 0..1023: validation, never trained on
SPLIT_SIZES = {"train": 50_000 - NUM_VAL, "val": NUM_VAL, "test": 10_000}
CROP_PAD = 4                                # pixels of zero padding for the random crop
DEFAULT_DATA_DIR = "./data"
DEFAULT_ARCH = "28-4"                       # what Net() builds: a WRN-28-4
FILE_FORMAT = "wrn-meansparse/1"            # tag stored in every model file

EVAL_STEPS = 20                             # PGD steps of an evaluation attack
VAL_PGD_STEPS = 10                          # PGD steps of the validation check during training
APGD_ITERS = 100                            # APGD iterations of the adaptive evaluation (AutoAttack's)
ALPHA_GRID = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4)
CLEAN_DROP_LIMIT = 0.5                      # points of clean accuracy an alpha may cost (calibration)
SIGNIFICANCE = 2.0                          # standard errors by which an alpha > 0 must beat alpha 0 (adaptive)
SQUARE_QUERIES = 1000                       # queries of the square-* rows and the gradient-free check
QUICK_CHECK_IMAGES = 16                     # images of the checks that attack nothing (first evaluation batch)
PROJECT_TIMEOUT = 3600                      # seconds a --project may run before it is stopped
STEADY_STEP = 5                             # training steps before timing (cudnn autotuning, compilation)
SELECT_IMAGES = 512                         # validation images of each weight-selection APGD check
SELECT_ITERS = 50                           # APGD iterations of each of its two attacks
CPU_BATCH = 64                              # images per forward pass on the CPU in eval mode: beyond ~64 a
                                            # WRN-28-4's activations outgrow malloc's heap (page faults)
GPU_EVAL_BATCH = 512                        # default evaluation batch on CUDA
LONG_CPU_WORK = 600                         # seconds of APGD on a CPU beyond which a run says so first
PLOT_FORMATS = {"png": b"\x89PNG", "pdf": b"%PDF", "svg": b"<", "jpg": b"\xff\xd8", "jpeg": b"\xff\xd8"}


class UserError(Exception):
    """A problem the user can fix (a flag, a file, the data): reported as one line, exit status 2."""


class TrainingError(Exception):
    """Training cannot go on (a NaN loss, say): reported as one line, exit status 1."""


def number(text):
    """A finite float from a flag, or a fraction such as 8/255."""
    try:
        num, _, den = str(text).partition("/")
        value = float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (use e.g. 0.031 or 8/255)") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def integer(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def checked(parse, ok, rule):
    """A flag's type: parse(text), then `rule` (the error's words) must hold of the value."""
    def convert(text):
        value = parse(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{rule}, got {text}")
        return value
    return convert


non_negative = checked(number, lambda v: v >= 0, "must be >= 0")
positive = checked(number, lambda v: v > 0, "must be > 0")
run_fraction = checked(number, lambda v: 0 <= v <= 1, "must be a fraction of the run between 0 and 1")
decay = checked(number, lambda v: 0 < v < 1, "must be between 0 and 1")
below_one = checked(non_negative, lambda v: v < 1, "must be < 1")
positive_int = checked(integer, lambda v: v > 0, "must be > 0")
non_negative_int = checked(integer, lambda v: v >= 0, "must be >= 0")


def linf_radius(text):
    """An L-inf radius or step: above 1, the whole [0,1] pixel range, is almost surely 8 meant as 8/255."""
    value = non_negative(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text} is above 1, the whole [0,1] pixel range: did you mean {text}/255?")
    return value


# ----------------------------------------------------------------------------------------------------
# Data and device
# ----------------------------------------------------------------------------------------------------
def resolve_data_dir(data_dir=None):
    """--data-dir, else $CIFAR10_DIR, else ./data."""
    return data_dir or os.environ.get("CIFAR10_DIR") or DEFAULT_DATA_DIR


def _read_batches(folder, names):
    import numpy as np      # the pickles hold numpy arrays
    images, labels = [], []
    for name in names:
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
        except Exception as e:      # unpickling a damaged file can raise almost anything
            raise UserError(f"{path}: not a readable CIFAR-10 batch ({e.__class__.__name__}: {e}); "
                            f"delete the folder to download it again") from None
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def load_cifar10(data_dir, split):
    """(images uint8 N x 3 x 32 x 32, labels int64) of "train" (training images 1024..49999),
    "val" (training images 0..1023) or "test" (the 10,000 test images), in the official order; downloaded
    into `data_dir` with torchvision when it has none."""
    if split not in SPLIT_SIZES:
        raise ValueError(f"unknown split {split!r}: use train, val or test")
    folder = os.path.join(data_dir, "cifar-10-batches-py")
    if not os.path.isdir(folder):
        try:
            import torchvision
            torchvision.datasets.CIFAR10(data_dir, train=True, download=True)
        except Exception as e:
            raise UserError(f"no CIFAR-10 in {folder} and downloading it failed ({e.__class__.__name__}); "
                            f"pass --data-dir (or set CIFAR10_DIR) to a folder holding "
                            f"cifar-10-batches-py/, or run once with network access") from None
    if split == "test":
        return _read_batches(folder, ["test_batch"])
    if split == "val":   # the first file holds training images 0..9999: no need to read the rest
        images, labels = _read_batches(folder, ["data_batch_1"])
        return images[:NUM_VAL].clone(), labels[:NUM_VAL].clone()
    images, labels = _read_batches(folder, [f"data_batch_{i}" for i in range(1, 6)])
    return images[NUM_VAL:].clone(), labels[NUM_VAL:].clone()


def augment(images, generator=None):
    """Random crop (zero padding CROP_PAD) and horizontal flip of a whole uint8 batch, on its device.
    The random numbers come from `generator` (a CPU generator) so runs repeat exactly."""
    b, c, h, w = images.shape
    shifts = torch.randint(0, 2 * CROP_PAD + 1, (b, 2), generator=generator).to(images.device)
    flips = (torch.rand(b, generator=generator) < 0.5).to(images.device)
    padded = F.pad(images, (CROP_PAD,) * 4)
    rows = shifts[:, :1] + torch.arange(h, device=images.device)           # b x h
    cols = shifts[:, 1:] + torch.arange(w, device=images.device)           # b x w
    cropped = padded[torch.arange(b, device=images.device)[:, None, None, None],
                     torch.arange(c, device=images.device)[None, :, None, None],
                     rows[:, None, :, None], cols[:, None, None, :]]
    return torch.where(flips[:, None, None, None], cropped.flip(3), cropped)


class Batches:
    """One split held on `device` as uint8; yields float [0,1] (x, y) batches.

    train=True reshuffles every epoch, augments on the device and drops the last partial batch; with
    world_size > 1 each rank takes its shard of the same permutation (same generator seed on all ranks).
    `offset` is the index of the first image in the split: an attack seeds each batch by it.
    """

    def __init__(self, images, labels, batch_size, *, device, train=False, generator=None,
                 rank=0, world_size=1, channels_last=False, offset=0):
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.batch_size, self.train, self.generator = batch_size, train, generator
        self.rank, self.world_size, self.channels_last, self.offset = rank, world_size, channels_last, offset

    def __len__(self):
        if self.train:
            return (len(self.labels) // self.world_size) // self.batch_size
        return math.ceil(len(self.labels) / self.batch_size)

    def after(self, k):
        """The same batches of the images after the first k (an interrupted evaluation continues there)."""
        return Batches(self.images[k:], self.labels[k:], self.batch_size, device=self.images.device,
                       channels_last=self.channels_last, offset=self.offset + k)

    def _to_float(self, images):
        x = images.float().div_(255)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def __iter__(self):
        if not self.train:
            for i in range(0, len(self.labels), self.batch_size):
                yield self._to_float(self.images[i:i + self.batch_size]), self.labels[i:i + self.batch_size]
            return
        order = torch.randperm(len(self.labels), generator=self.generator)
        per_rank = len(self.labels) // self.world_size
        order = order[self.rank * per_rank:(self.rank + 1) * per_rank].to(self.images.device)
        for k in range(len(self)):
            idx = order[k * self.batch_size:(k + 1) * self.batch_size]
            yield self._to_float(augment(self.images[idx], self.generator)), self.labels[idx]


def pick_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device here; use --device cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def device_name(device):
    """The machine as a report records it: the GPU's name, or "cpu" with the CPU's model, the vector
    instructions torch uses on it (AVX2, AVX512: they change the last bits of a result) and the threads."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_model()}, {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)"


@contextlib.contextmanager
def true_float32():
    """TF32 off for CUDA's matrix products and convolutions inside the block (torch allows it in convolutions
    by default), as it was after it: evaluation, calibration and MeanSparse statistics are float32 on every
    device, so that a GPU report and a CPU report of the same images can be paired. Training keeps TF32."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def precision(device):
    """The arithmetic of float32 work on `device` now: what a report records."""
    tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32
    return "tf32" if torch.device(device).type == "cuda" and tf32 else "float32"


def progress(iterable, desc, disable=False):
    """A progress bar over `iterable` (tqdm, imported here: the model itself needs torch alone)."""
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True, disable=disable)


# ----------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------
class MeanSparse(nn.Module):
    """Replaces an activation within alpha * std of its channel mean by that mean (MeanSparse).

    alpha = 0 is exactly the identity. The mask has zero gradient inside the band: plain PGD through it
    sees a masked gradient, so every robustness figure is also measured under `bpda`.
    """

    def __init__(self, num_channels):
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_channels))
        self.register_buffer("std", torch.ones(num_channels))
        self.register_buffer("alpha", torch.tensor(0.0))
        self.mode = "mask"      # "bpda": same forward, identity gradient; "off": identity (see bypassed)

    def forward(self, x):
        # alpha 0 is the identity: on the CPU (where the grader runs the committed model, at alpha 0) skipping
        # the mask's four elementwise passes saves time (bench/cpu_eval.py, row "Net, mask always"). Not on a
        # GPU: reading alpha there would wait for the device at every module.
        if self.mode == "off" or (x.device.type == "cpu" and not self.alpha):
            return x
        return self.masked(x)

    def masked(self, x):
        """The mask (under BPDA in mode "bpda"), computed whatever alpha is."""
        mean = self.mean.view(1, -1, 1, 1).to(x.dtype)
        band = (self.alpha * self.std).view(1, -1, 1, 1).to(x.dtype)
        with torch.no_grad():                       # the mask has no gradient
            inside = (x - mean).abs_()
            torch.lt(inside, band, out=inside)      # 1.0 where |x - mean| < band, else 0.0
        # lerp with weight 1 is exactly the mean and with weight 0 exactly x: the same values as
        # torch.where(inside, mean, x), which is several times slower on the CPU; gradient 1 - inside
        out = torch.lerp(x, mean, inside)
        if self.mode == "bpda":     # x - x.detach() is exactly 0: the forward stays bit-identical
            return out.detach() + (x - x.detach())
        return out


def is_meansparse(module):
    """This tool's MeanSparse, also as another copy of this file defines it (a --project made with this tool):
    such a model gets BPDA exactly as one loaded from its model file."""
    return isinstance(module, MeanSparse) or type(module).__name__ == "MeanSparse" and all(
        hasattr(module, a) for a in ("mode", "alpha", "mean", "std", "masked"))


def meansparse_modules(model):
    return [m for m in model.modules() if is_meansparse(m)]


@contextlib.contextmanager
def meansparse_as(model, mode=None, alpha=None):
    """Every MeanSparse of `model` in `mode` ("mask", "bpda" or "off") and at threshold `alpha` inside the
    block (None: as they are), as they were after it."""
    modules = meansparse_modules(model)
    before = [(m.mode, m.alpha.clone()) for m in modules]
    for m in modules:
        m.mode = mode or m.mode
        m.alpha.fill_(m.alpha if alpha is None else alpha)
    try:
        yield model
    finally:
        for m, (old_mode, old_alpha) in zip(modules, before):
            m.mode = old_mode
            m.alpha.copy_(old_alpha)


def bpda(model):
    """Straight-through (BPDA) gradients through every MeanSparse inside the block: the mask in the forward
    pass, the identity in the backward pass."""
    return meansparse_as(model, "bpda")


def bypassed(model):
    """Every MeanSparse is the identity inside the block. Training uses it: before calibration alpha is 0
    anyway, and skipping the masks' elementwise passes makes each step faster."""
    return meansparse_as(model, "off")


def get_alpha(model):
    modules = meansparse_modules(model)
    return round(float(modules[0].alpha), 6) if modules else 0.0    # float32 buffer: 0.35 reads 0.3499999


def set_alpha(model, alpha):
    for m in meansparse_modules(model):
        m.alpha.fill_(alpha)


def _layout(t):
    channels_last = t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


class InputLayout(torch.autograd.Function):
    """The input in the layout of the model's weights (channels_last is faster on CPUs and GPUs); its
    gradient goes back in the input's own layout, contiguous. Without it a channels_last model hands an NCHW
    caller a channels_last-strided gradient, and the textbook L2 step `grad.view(n, -1)` fails on it."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.layout = _layout(x)
        return x.contiguous(memory_format=_layout(weight)).view_as(x) if x.dim() == 4 else x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous(memory_format=ctx.layout), None


class RobustNet(nn.Module):
    """What every architecture shares: [0,1] images normalised inside, the input's layout kept for its
    gradient, eval batches split on the CPU, save/load with the architecture's description (`arch`: its
    name in ARCHITECTURES and the arguments ARGS that build it). A subclass builds its layers (the first
    convolution named conv1), maps normalised images to `logits`, and reads --arch text (`from_text`)."""
    ARGS = ("num_classes",)

    def __init__(self, name, **args):
        super().__init__()
        self.arch, self.meta = {"name": name, **args}, {}
        self.register_buffer("input_mean", torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(CIFAR10_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        x = InputLayout.apply(x, self.conv1.weight)
        if x.device.type == "cpu" and not self.training and len(x) > CPU_BATCH:
            # In eval mode every image is independent of the others, so splitting changes nothing but the
            # speed: on the CPU small batches are much faster (bench/cpu_eval.py)
            return torch.cat([self.logits((c - self.input_mean) / self.input_std) for c in x.split(CPU_BATCH)])
        return self.logits((x - self.input_mean) / self.input_std)

    @staticmethod
    def check(arch):
        """What is wrong with a saved description whose arguments are integers (None if nothing)."""
        return None if arch["num_classes"] == NUM_CLASSES else "not of 10 classes"

    @property
    def arch_name(self):
        return arch_label(self.arch)

    def save(self, path, meta=None):
        """Write weights (float16) and buffers (float32) with metadata, atomically."""
        self.meta = self.meta if meta is None else dict(meta)
        params = {name for name, _ in self.named_parameters()}
        state = {k: (v.detach().half() if k in params else v.detach().float() if v.is_floating_point()
                     else v.detach()).cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_save({"format": FILE_FORMAT, "arch": dict(self.arch), "alpha": get_alpha(self), "meta": self.meta,
                     "state_dict": state}, path)

    def load(self, path, payload=None):
        """Load a file written by `save` (or a plain state dict) onto this net's device, as float32.
        `payload`: the file as read_model_file already returned it (saves reading it twice)."""
        payload = read_model_file(path) if payload is None else payload
        if payload.get("arch") is not None and normalise_arch(payload["arch"]) != self.arch:
            raise UserError(f"{path}: holds a {arch_label(payload['arch'])}, this network is a {self.arch_name}; "
                            f"pass the file as --model-file (which rebuilds its architecture) or retrain")
        state = {k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
        try:
            result = self.load_state_dict(state, strict=False)
        except RuntimeError as e:
            last = str(e).strip().splitlines()[-1].strip()
            raise UserError(f"{path}: weights do not fit a {self.arch_name} ({last}); use the file's own "
                            f"architecture or retrain with --force-train") from None
        if result.missing_keys or result.unexpected_keys:
            raise UserError(f"{path}: not a {self.arch_name} with MeanSparse ({len(result.missing_keys)} missing, "
                            f"{len(result.unexpected_keys)} unexpected entries, e.g. "
                            f"{(result.missing_keys or result.unexpected_keys)[:3]}); retrain with --force-train")
        self.meta = dict(payload.get("meta") or {})
        return self


class Block(nn.Module):
    """Pre-activation residual block: BN -> MeanSparse -> ReLU -> conv, twice; where the shape changes the
    shortcut is a 1x1 convolution of the activated input (RobustBench's WideResNet names)."""

    def __init__(self, in_planes, out_planes, stride):
        super().__init__()
        self.bn1, self.sparse1 = nn.BatchNorm2d(in_planes), MeanSparse(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2, self.sparse2 = nn.BatchNorm2d(out_planes), MeanSparse(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.convShortcut = None if in_planes == out_planes and stride == 1 else \
            nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x):
        o = F.relu(self.sparse1(self.bn1(x)), inplace=True)
        shortcut = x if self.convShortcut is None else self.convShortcut(o)
        return self.conv2(F.relu(self.sparse2(self.bn2(self.conv1(o))), inplace=True)) + shortcut


class NetworkBlock(nn.Module):
    def __init__(self, num_layers, in_planes, out_planes, stride):
        super().__init__()
        self.layer = nn.Sequential(*[Block(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
                                     for i in range(num_layers)])

    def forward(self, x):
        return self.layer(x)


class ResNet(RobustNet):
    """What both architectures are: a 3x3 stem convolution of `stem` channels, groups block1, block2, ... of
    (blocks, width, stride), then BN -> MeanSparse -> ReLU, average pooling and the linear classifier."""

    def __init__(self, name, stem, groups, num_classes, **args):
        super().__init__(name, **args, num_classes=num_classes)
        self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
        widths = [stem] + [width for _, width, _ in groups]
        self.blocks = [f"block{i}" for i in range(1, len(groups) + 1)]
        for name, (n, width, stride), in_planes in zip(self.blocks, groups, widths):
            self.add_module(name, NetworkBlock(n, in_planes, width, stride))
        width = widths[-1]
        self.bn1, self.sparse, self.fc = nn.BatchNorm2d(width), MeanSparse(width), nn.Linear(width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def logits(self, x):
        out = self.conv1(x)
        for name in self.blocks:
            out = getattr(self, name)(out)
        out = F.relu(self.sparse(self.bn1(out)), inplace=True)
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class WideResNet(ResNet):
    """WideResNet (RobustBench names) with a MeanSparse before every ReLU: --arch DEPTH-WIDTH."""
    ARGS = ("depth", "widen_factor", "num_classes")

    def __init__(self, depth, widen_factor, num_classes=NUM_CLASSES):
        n, w = (depth - 4) // 6, widen_factor
        super().__init__("wrn", 16, [(n, 16 * w, 1), (n, 32 * w, 2), (n, 64 * w, 2)], num_classes, depth=depth,
                         widen_factor=widen_factor)

    @staticmethod
    def from_text(text):
        depth, _, width = text.partition("-")
        return {"depth": int(depth), "widen_factor": int(width), "num_classes": NUM_CLASSES} \
            if depth.isdigit() and width.isdigit() else None

    @staticmethod
    def check(arch):
        if arch["num_classes"] != NUM_CLASSES or arch["depth"] < 10 or (arch["depth"] - 4) % 6 \
                or arch["widen_factor"] < 1:
            return "no CIFAR-10 WideResNet: depth must be 6n+4 (10, 16, 22, 28, 34, ...) and width >= 1"
        return None

    @staticmethod
    def label(arch):
        return f"WRN-{arch['depth']}-{arch['widen_factor']}"


class PreActResNet18(ResNet):
    """The PreAct ResNet-18 of the fast-adversarial-training literature: --arch preact18."""

    def __init__(self, num_classes=NUM_CLASSES):
        super().__init__("preact18", 64, [(2, 64, 1), (2, 128, 2), (2, 256, 2), (2, 512, 2)], num_classes)

    @staticmethod
    def from_text(text):
        return {"num_classes": NUM_CLASSES} if text == "preact18" else None

    @staticmethod
    def label(arch):
        return "PreAct ResNet-18"


ARCHITECTURES = {"wrn": WideResNet, "preact18": PreActResNet18}       # the name in a model file -> the class


def normalise_arch(arch):
    """A saved description with its name: files written before PreAct ResNet-18 hold a WideResNet's without."""
    return {"name": "wrn", **arch}


def arch_problem(arch):
    """What is wrong with a model file's description of its architecture (None if nothing)."""
    cls = ARCHITECTURES.get(normalise_arch(arch).get("name")) if isinstance(arch, dict) else None
    if cls is None or set(normalise_arch(arch)) != {"name", *cls.ARGS} or \
            not all(type(arch[k]) is int for k in cls.ARGS):
        return f"its arch {arch!r} is none of {', '.join(ARCHITECTURES)} with its integer arguments"
    problem = cls.check(arch)
    return problem and f"its arch {arch} is {problem}"


def arch_label(arch):
    arch = normalise_arch(arch)
    return ARCHITECTURES[arch["name"]].label(arch)


def parse_arch(text):
    """The description of --arch: "DEPTH-WIDTH" for a WideResNet, or "preact18"."""
    for name, cls in ARCHITECTURES.items():
        args = cls.from_text(str(text))
        if args is not None:
            if problem := cls.check(args):
                raise UserError(f"--arch {text!r}: {problem}")
            return {"name": name, **args}
    raise UserError(f"--arch {text!r}: expected a WideResNet DEPTH-WIDTH such as 28-4, or preact18")


class Net(WideResNet):
    """The graded model: WRN-28-4 with MeanSparse. `Net()` takes no arguments."""
    model_file = "models/default_model.pth"

    def __init__(self):
        super().__init__(*(parse_arch(DEFAULT_ARCH)[k] for k in ("depth", "widen_factor")))

    def load_for_testing(self, project_dir="./"):
        """Load the committed weights and leave the model in eval mode (the platform's entry point), in the
        channels_last layout, faster on CPUs and GPUs; inputs may come in either layout (see InputLayout)."""
        self.load(os.path.join(project_dir, Net.model_file))
        self.to(memory_format=torch.channels_last)
        return self.eval()


def build_model(arch=DEFAULT_ARCH):
    """The network of `arch` (--arch text or a saved description): Net for Net's own architecture."""
    arch = parse_arch(arch) if isinstance(arch, str) else normalise_arch(arch)
    if arch == parse_arch(DEFAULT_ARCH):
        return Net()
    cls = ARCHITECTURES[arch["name"]]
    return cls(**{k: arch[k] for k in cls.ARGS})


def atomic_write(path, write):
    """write(f) into a temporary binary file beside `path`, then rename: a crash or Ctrl-C never leaves a
    broken or half-written file, and the old one stays until the new one is complete."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)       # mkstemp's 0600 would make the saved file private
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def keep_previous(path, log):
    """Copy `path` to <path>.prev before a run first replaces it: a retraining that turns out worse, or a
    --model-file or --report that named the wrong file, loses nothing. One generation is kept."""
    with open(path, "rb") as src:
        atomic_write(path + ".prev", lambda f: shutil.copyfileobj(src, f))
    log(f"kept the file this run replaces as {path}.prev")


def torch_load(path, what):
    """torch.load(weights_only=True) of a model file or checkpoint; a failure is one line naming the file."""
    if os.path.isdir(path):
        raise UserError(f"{path}: is a directory, not a {what}")
    try:
        with warnings.catch_warnings():     # torch warns about pickle protocols before failing: one line only
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:          # a damaged file can make the unpickler raise almost anything
        with open(path, "rb") as f:
            head = f.read(2)
        reason = ("a damaged or truncated torch.save archive" if head == b"PK" else
                  "it holds Python objects besides tensors" if "Weights only load failed" in str(e) else
                  "a damaged pickle" if head[:1] == b"\x80" else "not written by torch.save (a text file, or another "
                                                                 "format)")
        raise UserError(f"{path}: not a readable {what}: {reason} ({e.__class__.__name__})") from None


def read_model_file(path):
    """The payload of a model file as a dict with "state_dict" (a plain state dict is wrapped), its
    structure checked before any tensor is used."""
    if not os.path.exists(path):
        raise UserError(f"{path}: no such model file; check the path, or train one with "
                        f"./model.py --force-train --model-file {path}")
    payload = torch_load(path, "model file")
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else None
    problem = (f"holds a {type(payload).__name__}, not a dict" if state is None else
               "it has no state_dict of named tensors" if not state or not isinstance(state, dict) or not all(
                   isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()) else
               "its meta is not a dict" if not isinstance(payload.get("meta") or {}, dict) else
               payload.get("arch") is not None and arch_problem(payload["arch"]))
    if problem:
        raise UserError(f"{path}: not a model file of this tool: {problem}; restore it or retrain with --force-train")
    return payload if "state_dict" in payload else {"state_dict": payload}


def load_model(path, device="cpu"):
    """Build the architecture recorded in `path` (WRN-28-4 for a plain state dict) and load it, in eval mode."""
    payload = read_model_file(path)
    return build_model(payload.get("arch") or DEFAULT_ARCH).to(device).load(path, payload).eval()


def read_json(path):
    """The JSON value in `path`, or None where there is no such file or it cannot be read or parsed."""
    if not path or not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def weights_fingerprint(model):
    """sha256 of every parameter and buffer of `model` but the MeanSparse thresholds (alpha): the same
    weights and statistics give the same fingerprint, whatever the memory layout."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        if not name.endswith(".alpha") and isinstance(t, torch.Tensor):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_project(directory, device):
    """(model, fingerprint) of a project folder, loaded the grading platform's way: the folder first on
    sys.path, its model.py imported by path as `model`, Net() moved to `device`, then
    load_for_testing(project_dir=the folder). No eval() and no layout change: it is measured as the platform
    finds it. This runs the project's own code, as the platform does. The fingerprint (sha256 of model.py
    and of the weights but MeanSparse's alpha) is what a report of the project is continued by."""
    path = os.path.join(directory, "model.py")
    if not os.path.isfile(path):
        raise UserError(f"{directory}: no model.py there")
    sys.path.insert(0, os.path.abspath(directory))
    spec = importlib.util.spec_from_file_location("model", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["model"] = module        # the name the platform imports it under
    spec.loader.exec_module(module)
    if not isinstance(getattr(module, "Net", None), type):
        raise UserError(f"{path}: defines no class Net")
    net = module.Net().to(device)
    net.load_for_testing(project_dir=os.path.join(directory, ""))   # the platform keeps the net it built
    fingerprint = hashlib.sha256((file_sha256(path) + weights_fingerprint(net)).encode()).hexdigest()
    with torch.no_grad():
        shape = tuple(net(torch.zeros(2, 3, 32, 32, device=device)).shape)
    if shape != (2, NUM_CLASSES):
        raise UserError(f"{path}: Net maps 2 images to an output of shape {shape}, not (2, {NUM_CLASSES})")
    return net, fingerprint


# ----------------------------------------------------------------------------------------------------
# Attacks
# ----------------------------------------------------------------------------------------------------
def _per_example_norm(t):
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def _l2_start(x, eps, generator):
    direction = torch.empty_like(x).normal_(generator=generator)
    radius = torch.empty(len(x), device=x.device).uniform_(0, 1, generator=generator)
    radius = eps * radius.pow(1 / x[0].numel()).view(-1, *([1] * (x.dim() - 1)))   # uniform in the ball
    return direction / _per_example_norm(direction) * radius


@dataclasses.dataclass(frozen=True)
class Norm:
    """One threat model: its default radius, the three steps of PGD that depend on it, and its other names."""
    eps: float                  # default radius, in [0,1] pixel units
    random_start: object        # (x, eps, generator) -> a random point of the ball around 0
    ascent: object              # gradient -> the step's direction, of size 1 in this norm
    project: object             # (delta, eps) -> delta projected onto the ball
    parse: object               # the type of its --eps-* and --step-* flags
    autoattack: str             # the norm's name in pyautoattack
    show: object                # radius -> text
    plot_eps: tuple             # radii of --plot's accuracy-against-eps panel
    cpu_seconds: float          # the APGD worst case (100 iterations) per image on a 2-core CPU, measured on the
                                # first 1,000 test images: results/apgd_{linf,l2}_test1000_alpha0_cpu.json


NORMS = {
    "linf": Norm(eps=8 / 255, random_start=lambda x, eps, g: torch.empty_like(x).uniform_(-eps, eps, generator=g),
                 ascent=torch.sign, project=lambda delta, eps: delta.clamp(-eps, eps), parse=linf_radius,
                 autoattack="Linf", show=lambda eps: f"{eps * 255:g}/255",
                 plot_eps=tuple(e / 255 for e in (0, 2, 4, 6, 8, 10, 12, 16)), cpu_seconds=8.5),
    "l2": Norm(eps=0.5, random_start=_l2_start, ascent=lambda g: g / _per_example_norm(g),
               project=lambda delta, eps: delta * (eps / _per_example_norm(delta)).clamp(max=1.0),
               parse=non_negative, autoattack="L2", show="{:g}".format, plot_eps=(0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5),
               cpu_seconds=10.0),
}


def cross_entropy_sum(logits, y):
    return F.cross_entropy(logits.float(), y, reduction="sum")


def _keep_worst(model, x, y, delta, best):
    """Per example, the worse for the model of the restarts so far and this one: misclassified beats
    correct, then the higher loss. `best` = [x_adv, loss, wrong], updated in place."""
    with torch.no_grad():
        logits = model(x + delta).float()
        loss = F.cross_entropy(logits, y, reduction="none")
        wrong = logits.argmax(1) != y
        better = (wrong & ~best[2]) | ((wrong == best[2]) & (loss > best[1]))
        best[0][better] = (x + delta)[better]
        best[1:] = torch.where(better, loss, best[1]), best[2] | wrong


def pgd(model, x, y, *, norm, eps, step_size, steps, restarts=1, random_start=True, generator=None,
        loss_fn=cross_entropy_sum, eot=1):
    """Projected gradient ascent of loss_fn(model(x_adv), y) in the `norm` ball of radius `eps` around x.

    Returns detached x_adv in the ball and in [0,1]. With restarts, keeps per example the worst case
    (misclassified beats correct, then higher loss). The model's mode and its weights' .grad are left as
    found; `generator` (on x's device) drives the random start. `eot`: each step's gradient is the mean
    over that many forward passes (expectation over transformation, for a randomised model).
    """
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}: use one of {', '.join(NORMS)}")
    if eps < 0 or step_size < 0 or steps < 0 or restarts < 1:
        raise ValueError("pgd needs eps >= 0, step_size >= 0, steps >= 0 and restarts >= 1")
    ball, x = NORMS[norm], x.detach()
    best = [x.clone(), torch.full((len(x),), -math.inf, device=x.device),
            torch.zeros(len(x), dtype=torch.bool, device=x.device)]
    for _ in range(restarts):
        delta = ball.random_start(x, eps, generator) if random_start and eps > 0 else torch.zeros_like(x)
        delta = (x + delta).clamp(0, 1) - x
        for _ in range(steps):
            delta.requires_grad_(True)
            grad = sum(torch.autograd.grad(loss_fn(model(x + delta), y), delta)[0] for _ in range(eot)) / eot
            delta = ball.project(delta.detach() + step_size * ball.ascent(grad), eps)
            delta = (x + delta).clamp(0, 1) - x
        if restarts == 1:
            return (x + delta).detach()
        _keep_worst(model, x, y, delta, best)
    return best[0].detach()


def import_pyautoattack():
    try:
        import pyautoattack
        import pyautoattack.autopgd_base
        import pyautoattack.checks
        import pyautoattack.square
    except ImportError:
        raise UserError("APGD and AutoAttack need the official code: pip install pyautoattack") from None
    return pyautoattack


def apgd(model, x, y, *, loss, norm, eps, iters, seed, crafted_at_alpha=None, eot=1):
    """The images to judge after one run of the official APGD (pyautoattack, one restart, gradients averaged
    over `eot` passes): loss "ce" or "dlr" untargeted, or "targeted" (DLR against each of the nine most likely
    wrong classes in turn). Every MeanSparse is under BPDA, at threshold `crafted_at_alpha` if given: then a
    transfer attack, whose highest-loss iterate is judged too (an image that did not fool the model it was
    crafted on may fool the one judged). The global RNG, which APGD seeds, is left as found."""
    pyautoattack = import_pyautoattack()
    common = dict(n_iter=iters, norm=NORMS[norm].autoattack, n_restarts=1, eps=eps, seed=seed, device=x.device,
                  eot_iter=eot)
    if loss == "targeted":
        attack = pyautoattack.autopgd_base.APGDAttack_targeted(model, n_target_classes=NUM_CLASSES - 1, **common)
    else:
        attack = pyautoattack.autopgd_base.APGDAttack(model, loss=loss, **common)
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []), \
            meansparse_as(model, "bpda", crafted_at_alpha):
        if crafted_at_alpha is None:
            return [attack.perturb(x, y).detach()]
        attack.init_hyperparam(x)       # what perturb does before its one run, which keeps only x_best_adv
        torch.manual_seed(seed)
        x_best, _, _, x_best_adv = attack.attack_single_run(x.detach().float(), y)
        return [x_best_adv.detach(), x_best.detach()]


# name -> (APGD loss, alpha it is crafted at: None for the model's own)
APGD_COMPONENTS = {"apgd-ce": ("ce", None), "apgd-dlr": ("dlr", None), "apgd-ce-transfer": ("ce", 0.0),
                   "apgd-t": ("targeted", None)}
ADAPTIVE = ("apgd-ce", "apgd-ce-transfer", "apgd-t")      # the adaptive evaluation: an image must survive all
CASCADED = ("apgd-t",)      # nine runs in one: attacks only the images the components before it left correct
SELECT_ATTACKS = ("apgd-ce", "apgd-dlr")    # the training's weight-selection check: cheaper than APGD-T


def correct(model, x, y):
    """Per image: does the model's own forward pass (the mask, not BPDA) classify it correctly?"""
    with torch.inference_mode():
        return model(x).argmax(1) == y


def percent(outcomes):
    """Accuracy (%) from per-image outcomes (bool tensor), exact: integer count over images."""
    return 100.0 * int(outcomes.sum()) / max(len(outcomes), 1)


def per_image_string(outcomes):
    """A report's record of which images an attack left correct: "1" (correct) or "0" per image, in the
    split's order. Two reports are compared image by image with it (bench/compare.py): a paired
    difference has a far smaller standard error than two accuracies side by side."""
    return "".join("1" if c else "0" for c in outcomes.tolist())


def per_image_bools(record):
    return torch.tensor([c == "1" for c in record], dtype=torch.bool)


def apgd_batch(model, x, y, components, *, norm, eps, iters, seed, eot=1):
    """Per image of a batch: is it still correct after every one of `components` (APGD_COMPONENTS)? Returns
    (bools, counts): the clean count, and per component the images it left correct, attacked and broke,
    and its seconds. A cascaded component (APGD-T, as in AutoAttack) attacks only the images the others left:
    it cannot change the worst case elsewhere, where it would cost up to twice as much."""
    alive = correct(model, x, y)
    counts = {"clean": int(alive.sum()), "components": {}}
    for name in components:
        t0, (loss, alpha) = time.perf_counter(), APGD_COMPONENTS[name]
        idx = (alive if name in CASCADED else torch.ones_like(alive)).nonzero().flatten()
        survived = torch.zeros_like(alive)
        if len(idx):
            judged = apgd(model, x[idx], y[idx], loss=loss, norm=norm, eps=eps, iters=iters, seed=seed,
                          crafted_at_alpha=alpha, eot=eot)
            survived[idx] = torch.stack([correct(model, x_adv, y[idx]) for x_adv in judged]).all(0)
        counts["components"][name] = {"correct": int(survived.sum()), "attacked": len(idx),
                                      "broke": int((alive & ~survived).sum()), "seconds": time.perf_counter() - t0}
        alive = alive & survived
    return alive, counts


@dataclasses.dataclass(frozen=True)
class AttackOptions:
    """What the attacks read: radius and PGD step per norm (no step: eps / 4), PGD steps and restarts, APGD
    iterations, the forward passes each gradient averages (EOT), Square's queries, the seed of the random
    starts, and where AutoAttack's progress lines go."""
    eps: dict = dataclasses.field(default_factory=lambda: {name: norm.eps for name, norm in NORMS.items()})
    step: dict = dataclasses.field(default_factory=dict)
    steps: int = EVAL_STEPS
    restarts: int = 1
    apgd_iters: int = APGD_ITERS
    eot: int = 1
    queries: int = SQUARE_QUERIES
    seed: int = 0
    log: object = print

    def at(self, norm, eps, **changes):
        """The same options with radius `eps` for `norm`, its step eps / 4."""
        return dataclasses.replace(self, eps={**self.eps, norm: eps}, step={**self.step, norm: None}, **changes)


class Attack:
    """A row of --eval: its settings (kept in the report, compared by --resume), and `batch`, which measures
    one batch: per-image correctness and counts that add up over batches, turned into figures by `details`.
    This base is the natural accuracy."""

    def __init__(self, model, opts):
        self.model, self.opts, self.settings = model, opts, {}

    def batch(self, x, y, start):
        return correct(self.model, x, y), {}

    def details(self, counts, n):
        return {}

    def cpu_seconds(self):
        """Seconds per image on a 2-core CPU, where they matter (the note before long work)."""
        return 0.0


def eot_setting(opts):
    """A row's EOT setting: none at 1 pass, so that rows measured before --eot existed are continued."""
    return {"eot": opts.eot} if opts.eot > 1 else {}


class PGDAttack(Attack):
    """PGD of `norm`, optionally under BPDA, optionally crafted at MeanSparse threshold `craft_alpha` and
    judged at the model's own (a transfer attack), or crafted on another model and judged by `judge`. A
    batch's random starts come from a generator seeded by the seed and the batch's first image: a row
    continued after an interruption draws what an uninterrupted one would."""

    def __init__(self, model, opts, *, norm, use_bpda=False, craft_alpha=None, judge=None):
        super().__init__(model, opts)
        eps, self.judge = opts.eps[norm], judge or model
        self.settings = {"norm": norm, "eps": eps, "step_size": opts.step.get(norm) or eps / 4, "steps": opts.steps,
                         "restarts": opts.restarts, "bpda": use_bpda, "crafted_at_alpha": craft_alpha,
                         **eot_setting(opts)}

    def batch(self, x, y, start):
        s, craft = self.settings, self.settings["crafted_at_alpha"]
        generator = torch.Generator(x.device).manual_seed(self.opts.seed * 1_000_003 + start)
        with meansparse_as(self.model, "bpda" if s["bpda"] else None, craft):
            x_adv = pgd(self.model, x, y, norm=s["norm"], eps=s["eps"], step_size=s["step_size"], steps=s["steps"],
                        restarts=s["restarts"], generator=generator, eot=self.opts.eot)
        return correct(self.judge, x_adv, y), {}


class AdaptiveAttack(Attack):
    """The adaptive evaluation (apgd-*): APGD-CE and APGD-T under BPDA, and APGD-CE crafted with MeanSparse
    off (at alpha > 0); an image counts as robust only if it survives all of them. The training's weight
    selection runs other `components`, with fewer `iters`."""

    def __init__(self, model, opts, *, norm, components=None, iters=None):
        super().__init__(model, opts)
        self.version, self.components = getattr(import_pyautoattack(), "__version__", "unknown"), components
        self.settings = {"norm": norm, "eps": opts.eps[norm], "iters": iters or opts.apgd_iters, "restarts": 1,
                         "bpda": True, **eot_setting(opts)}

    def batch(self, x, y, start):
        # at alpha 0 MeanSparse is off anyway: the transfer attack would be APGD-CE once more
        components = self.components or tuple(c for c in ADAPTIVE if get_alpha(self.model) or c != "apgd-ce-transfer")
        return apgd_batch(self.model, x, y, components, norm=self.settings["norm"], eps=self.settings["eps"],
                          iters=self.settings["iters"], seed=self.opts.seed, eot=self.opts.eot)

    def details(self, counts, n):
        components = {name: {"accuracy": None if name in CASCADED else 100.0 * c["correct"] / n,
                             "seconds": round(c["seconds"], 2), "attacked": c["attacked"], "broke": c["broke"]}
                      for name, c in counts.get("components", {}).items()}
        return {"clean": 100.0 * counts.get("clean", 0) / n, "components": components, "pyautoattack": self.version}

    def cpu_seconds(self):
        return NORMS[self.settings["norm"]].cpu_seconds * self.settings["iters"] / APGD_ITERS


class _LogLines(logging.Handler):
    """Shows AutoAttack's progress lines as they come, and keeps them for the report."""

    def __init__(self, log):
        super().__init__(logging.DEBUG)
        self.log, self.lines = log, []

    def emit(self, record):
        self.lines.append(record.getMessage())
        self.log(f"  autoattack: {record.getMessage()}")


class AutoAttack(Attack):
    """Standard AutoAttack (aa-*: APGD-CE, APGD-T, FAB-T and Square of the official pyautoattack) under BPDA,
    judged by the model's own forward pass; its progress lines are shown as they come and kept."""

    def __init__(self, model, opts, *, norm):
        super().__init__(model, opts)
        self.version = getattr(import_pyautoattack(), "__version__", "unknown")
        self.settings = {"norm": norm, "eps": opts.eps[norm], "version": "standard", "bpda": True}

    def batch(self, x, y, start):
        adversary = import_pyautoattack().AutoAttack(self.model, norm=NORMS[self.settings["norm"]].autoattack,
                                                     eps=self.settings["eps"], version="standard",
                                                     seed=self.opts.seed, device=x.device)
        logger, handler = logging.getLogger("auto-attack"), _LogLines(self.opts.log)
        level = logger.level
        logger.setLevel(logging.DEBUG)          # its progress lines are DEBUG records
        logger.addHandler(handler)
        try:
            with bpda(self.model):
                x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=len(y))
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
        return correct(self.model, x_adv, y), {"log": handler.lines}

    def details(self, counts, n):
        return {"pyautoattack": self.version, "log": counts.get("log", [])}

    def cpu_seconds(self):
        return NORMS[self.settings["norm"]].cpu_seconds


class SquareAttack(Attack):
    """Square (square-*: the official pyautoattack code, opts.queries queries, one restart): random search that
    needs no gradient, so no masked or obfuscated gradient can stop it."""

    def __init__(self, model, opts, *, norm):
        super().__init__(model, opts)
        self.settings = {"norm": norm, "eps": opts.eps[norm], "queries": opts.queries}
        import_pyautoattack()

    def batch(self, x, y, start):
        s = self.settings
        attack = import_pyautoattack().square.SquareAttack(self.model, norm=NORMS[s["norm"]].autoattack,
                                                            n_queries=s["queries"], eps=s["eps"], seed=self.opts.seed,
                                                            device=x.device)
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []), torch.no_grad():
            return correct(self.model, attack.perturb(x, y), y), {}


# The rows of --eval: name -> the attack that measures it. A norm added to NORMS gets its rows here.
ROW_KINDS = {"pgd": (PGDAttack, {}), "bpda": (PGDAttack, {"use_bpda": True}),
             "transfer": (PGDAttack, {"craft_alpha": 0.0}), "apgd": (AdaptiveAttack, {}), "aa": (AutoAttack, {}),
             "square": (SquareAttack, {})}
ATTACKS = {"natural": Attack, **{f"{kind}-{norm}": functools.partial(cls, norm=norm, **kw)
                                 for kind, (cls, kw) in ROW_KINDS.items() for norm in NORMS}}


def add_counts(total, counts):
    """One batch's counts added into a row's: numbers add up, lists extend, dicts add key by key."""
    for key, value in counts.items():
        if isinstance(value, dict):
            add_counts(total.setdefault(key, {}), value)
        else:
            total[key] = total.get(key, [] if isinstance(value, list) else 0) + value


def measure(attack, batches, *, desc, done=None, save=None, verbose=True):
    """The row of `attack` on `batches`: accuracy, images, seconds, settings, the per-image record and the
    attack's details. `done`: an unfinished row of the same attack, continued after its last batch;
    `save(row)` gets the unfinished row after every batch, so that a killed run loses one batch at most."""
    n = len(batches.labels)
    row = copy.deepcopy(done) if done else {"complete": False, "n": n, **attack.settings, "n_done": 0,
                                            "per_image": "", "counts": {}, "seconds": 0.0,
                                            "device": batches.images.device.type}
    rest, t0 = batches.after(row["n_done"]), time.perf_counter() - row["seconds"]
    for i, (x, y) in enumerate(progress(rest, desc, disable=not verbose)):
        outcomes, counts = attack.batch(x, y, rest.offset + i * rest.batch_size)
        row["per_image"] += per_image_string(outcomes.cpu())
        add_counts(row["counts"], counts)
        row.update(n_done=len(row["per_image"]), seconds=round(time.perf_counter() - t0, 2),
                   accuracy_so_far=100.0 * row["per_image"].count("1") / len(row["per_image"]))
        if save:
            save(row)
    kept = {k: v for k, v in row.items() if k not in ("complete", "n_done", "accuracy_so_far", "counts", "device")}
    return {"accuracy": percent(per_image_bools(row["per_image"])), **kept, **attack.details(row["counts"], n)}


def accuracy(model, batches, name, opts, desc=None, verbose=True):
    """Accuracy (%) of `model` on `batches` under the row `name` of ATTACKS."""
    return measure(ATTACKS[name](model, opts), batches, desc=desc or name, verbose=verbose)["accuracy"]


class Report:
    """Rows measured on one set of images, kept in a JSON file (if `path`) that is rewritten atomically
    after every batch, with the sha256 of the model file measured: an interrupted or killed run keeps its
    finished rows and batches, and the next run of the same settings continues them (`open`, `row`).
    Evaluation and calibration keep theirs so."""

    def __init__(self, path, header, rows=None, model_file=None, sink=None):
        self.path, self.model_file, self.sink, self.finished = path, model_file, sink, False
        self.data = {**header, "complete": False, "results": dict(rows or {})}
        self.rows = self.data["results"]

    @classmethod
    def open(cls, path, header, key, log, *, required=False, model_file=None, saved=None, sink=None):
        """The report at `path` (or `saved`, its data), continued if it was made with the same `key` fields of
        `header` (the same model, images and seed), else new: a file of other settings is kept as .prev.
        `required` (--resume): there must be one to continue. `sink(data)`: where the report goes after every
        batch besides `path` (a --project's process sends it to the comparison, which writes the file)."""
        saved = read_json(path) if saved is None else saved
        differ = [k for k in key if not isinstance(saved, dict) or saved.get(k) != header[k]]
        if not differ and isinstance(saved.get("results"), dict):
            log(f"continuing {path or 'the earlier report'}: {', '.join(saved['results']) or 'nothing finished yet'}")
            return cls(path, {**header, "resumed": saved.get("resumed", []) + [saved.get("command")]},
                       saved["results"], model_file, sink)
        there = f"{', '.join(f'{k} {saved.get(k)}' for k in differ)} there" if isinstance(saved, dict) else "unreadable"
        if required:
            raise UserError(f"--resume: no report {path} to continue" if saved is None else f"--resume: {path} "
                            f"was made with other settings ({there}); repeat its own command, or drop --resume")
        if path and os.path.isfile(path):
            log(f"note: {path} was made with other settings ({there}): starting afresh; it may hold hours of "
                f"work, so it is kept as {path}.prev (to continue it instead, rename it back and repeat its settings)")
            keep_previous(path, lambda line: None)
        return cls(path, header, {}, model_file, sink)

    def row(self, name, attack, batches, log=print, verbose=True):
        """Row `name` of `attack`: kept if this report has it finished with the same settings, continued if
        it has it unfinished (same settings and kind of device), else measured."""
        old, why = self.reusable(name, attack, len(batches.labels), batches.images.device.type)
        if why:
            log(f"{name}: {why}; measuring it again")
        elif old is not None and old.get("complete", True):
            log(f"{name}: kept from {self.path or 'the earlier report'}")
            return old
        elif old is not None:
            log(f"{name}: continuing after the first {old['n_done']} of {old['n']} images")
        self.save(name, measure(attack, batches, desc=name, done=old, save=functools.partial(self.save, name),
                                verbose=verbose))
        return self.rows[name]

    def reusable(self, name, attack, n, device_type):
        """(the row `name` to keep or continue, None), or (None, why it cannot be; None if there is none)."""
        old = self.rows.get(name)
        if old is None:
            return None, None
        if not isinstance(old, dict) or old.get("n") != n or any(old.get(k) != v for k, v in attack.settings.items()):
            return None, "the report's row was made with other settings"
        record, complete = old.get("per_image"), old.get("complete", True)
        if not isinstance(record, str) or set(record) - {"0", "1"} or len(record) > n or complete and len(record) < n:
            return None, "the report's row has no readable per-image record"
        if not complete and (old.get("device") != device_type or not isinstance(old.get("counts"), dict)):
            return None, "the report's row was stopped on another kind of device, whose random starts differ"
        return (old if complete else {**old, "n_done": len(record), "seconds": float(old.get("seconds", 0))}), None

    def save(self, name=None, row=None, finished=False):
        """Write the file, with `row` as row `name`; `finished`: this run has measured all it will."""
        if name is not None:
            self.rows[name] = row
        self.finished = self.finished or finished
        self.data["complete"] = self.finished and all(r.get("complete", True) for r in self.rows.values())
        data = {**self.data, "model_sha256": file_sha256(self.model_file)} if self.model_file else self.data
        if self.path:
            atomic_write(self.path, lambda f: f.write(json.dumps(data, indent=2).encode()))
        if self.sink:
            self.sink(data)


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------
def arch_flag(text):
    """--arch's type: the text, once parse_arch accepts it."""
    try:
        parse_arch(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None
    return text


def option(default, help, *, type=None, flag=None, group="train", shown=None, metavar=None):
    """A TrainConfig field that is also a flag: its one default, its help and how to parse it (the CLI
    builds the flag from this; `shown` replaces the default in the help)."""
    return dataclasses.field(default=default, metadata={"help": help, "type": type, "flag": flag, "group": group,
                                                        "shown": shown, "metavar": metavar})


@dataclasses.dataclass
class TrainConfig:
    """A training run's settings. The fields with a help text are flags of the CLI, with these defaults."""
    arch: str = option(DEFAULT_ARCH, "architecture to train: WideResNet DEPTH-WIDTH or preact18 (Net() is 28-4)",
                       type=arch_flag)
    epochs: int = option(30, "training epochs", type=positive_int, flag=("-e", "--num-epochs"),
                         shown="30, or as many as --time-budget allows")
    time_budget: float = option(None, "fix the number of epochs so that the whole schedule ends within this time",
                                type=positive, shown="none", metavar="MINUTES")
    batch_size: int = option(512, "training batch, over all processes", type=positive_int)
    lr: float = option(0.2, "peak learning rate of the one-cycle schedule", type=non_negative)
    warmup_epochs: float = option(2.0, "linear learning-rate warm-up, then linear decay to 0", type=non_negative,
                                  metavar="EPOCHS")
    momentum: float = 0.9
    weight_decay: float = 5e-4      # not on BatchNorm weights or biases
    label_smoothing: float = option(0.0, "label smoothing of the training loss", type=below_one, metavar="S")
    eps: float = NORMS["linf"].eps  # L-inf radius of the training attack (--eps-linf)
    attack_steps: int = option(5, "PGD steps K of the training attack (0: no attack)", type=non_negative_int,
                               flag=("--train-steps",), metavar="K")
    attack_step_size: float = option(None, "step of the training attack at the full eps", type=linf_radius,
                                     flag=("--train-step-size",), shown="2.5 eps/K", metavar="SIZE")
    eps_ramp: float = option(0.0, "the training eps rises linearly from 0 over this fraction of the run",
                             type=run_fraction, shown="0: none", metavar="F")
    trades: float = option(None, "TRADES with this beta instead of PGD-AT", type=non_negative, shown="off",
                           metavar="BETA")
    awp: float = option(None, "adversarial weight perturbation of relative size GAMMA, e.g. 5e-3",
                        type=non_negative, shown="off", metavar="GAMMA")
    awp_warmup: float = option(0.0, "epochs without AWP at the start", type=non_negative, metavar="EPOCHS")
    ema: float = option(None, "EMA of the weights with this decay", type=decay, shown="off", metavar="DECAY")
    ema_start: float = option(0.0, "the EMA starts at this fraction of the run, copying the weights before",
                              type=run_fraction, metavar="F")
    select_from: float = option(None, "from this fraction of the run on, keep the weights (live or EMA) with the "
                                "best validation APGD check", type=run_fraction, metavar="F",
                                shown="off: the better of final and EMA weights by PGD-10")
    select_n: int = option(SELECT_IMAGES, "validation images of each APGD check", type=positive_int, metavar="N")
    select_iters: int = SELECT_ITERS
    val_every: int = option(5, "epochs between validation checks", type=positive_int, metavar="EPOCHS")
    n_train: int = option(None, "the first N training images, for training and statistics: a smoke run",
                          type=positive_int, group="data", shown="all", metavar="N")
    n_val: int = option(None, "the first N validation images for the checks during training: a smoke run",
                        type=positive_int, group="data", shown="all", metavar="N")
    seed: int = option(0, "initial weights, data order, attack random starts", type=integer, group="data")
    compile: bool = option(False, "torch.compile the model for training", type=bool)


def lr_at(epoch_progress, total_epochs, cfg):
    """One-cycle: linear warm-up over warmup_epochs (at most half the run), linear decay to 0 at the end."""
    warmup = min(cfg.warmup_epochs, total_epochs / 2)
    if epoch_progress < warmup:
        return cfg.lr * epoch_progress / warmup
    if math.isinf(total_epochs):    # a time-budget run before its length is fixed: hold the peak
        return cfg.lr
    return cfg.lr * max(0.0, (total_epochs - epoch_progress) / max(total_epochs - warmup, 1e-12))


def eps_at(epoch_progress, total_epochs, cfg):
    """Training eps: linear from 0 to cfg.eps over the first eps_ramp of the run (0 while the length is
    still unknown, in the first epoch of a time-budget run), then cfg.eps."""
    if not cfg.eps_ramp:
        return cfg.eps
    return cfg.eps * min(1.0, epoch_progress / (cfg.eps_ramp * total_epochs))


class EMA:
    """Exponential moving average of the weights, decay warmed up as min(decay, (1+n)/(10+n)) over the n
    updates since it started; before its start it follows the weights."""

    def __init__(self, model, decay):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, model):
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(list(self.model.parameters()), list(model.parameters()), 1 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)

    @torch.no_grad()
    def follow(self, model):
        for t_ema, t in zip(self.model.state_dict().values(), model.state_dict().values()):
            t_ema.copy_(t)


def kl_sum(logits, p_clean):
    """TRADES inner loss: KL(p_clean || softmax(logits)), summed over the batch."""
    return F.kl_div(F.log_softmax(logits.float(), 1), p_clean, reduction="sum")


def distributed_context():
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) for a plain run."""
    env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if env["RANK"] is None and env["WORLD_SIZE"] is None:
        return 0, 1, 0
    try:
        rank, world_size, local_rank = int(env["RANK"] or 0), int(env["WORLD_SIZE"] or 1), int(env["LOCAL_RANK"] or 0)
    except ValueError:
        raise UserError(f"RANK={env['RANK']}, WORLD_SIZE={env['WORLD_SIZE']}: not integers; start several "
                        f"training processes with torchrun --nproc_per_node=N model.py --force-train ...") from None
    if world_size > 1 and "MASTER_ADDR" not in os.environ or not 0 <= rank < max(world_size, 1):
        raise UserError(f"RANK={rank}, WORLD_SIZE={world_size} without torchrun's other settings (MASTER_ADDR): "
                        f"start several processes with torchrun --nproc_per_node=N, or unset them")
    return rank, world_size, local_rank


def autocast_for(device):
    """bf16 autocast on CUDA for training (evaluation attacks stay float32); nothing on the CPU."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def training_attack(core, x, y, cfg, eps, noise_generator):
    """The training attack at radius `eps` (PGD on cross-entropy, or on TRADES's KL), crafted with
    BatchNorm in eval mode so that it updates no statistics."""
    if cfg.attack_steps == 0 or eps == 0:   # plain training (a speed reference), or the start of the ramp
        return x
    step_size = (cfg.attack_step_size or 2.5 * cfg.eps / cfg.attack_steps) * eps / cfg.eps
    core.eval()
    if cfg.trades is None:
        target, loss_fn = y, cross_entropy_sum
    else:
        with torch.no_grad():
            target, loss_fn = F.softmax(core(x).float(), 1), kl_sum
    return pgd(core, x, target, norm="linf", eps=eps, step_size=step_size, steps=cfg.attack_steps,
               generator=noise_generator, loss_fn=loss_fn)


def training_loss(model, x, x_adv, y, cfg):
    """(mean training loss, logits on x_adv): cross-entropy on x_adv, or the TRADES loss on (x, x_adv)."""
    if cfg.trades is None:
        logits = model(x_adv).float()
        return F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing), logits
    both = model(torch.cat([x, x_adv])).float()
    clean, logits = both[:len(x)], both[len(x):]
    loss = (F.cross_entropy(clean, y, label_smoothing=cfg.label_smoothing)
            + cfg.trades * F.kl_div(F.log_softmax(logits, 1), F.softmax(clean, 1), reduction="batchmean"))
    return loss, logits


def awp_perturb(core, weights, x, x_adv, y, cfg, world_size=1):
    """Adversarial weight perturbation (Wu et al. 2020): moves every tensor w of `weights` (the conv and
    linear weights) by cfg.awp * ||w|| along the ascent direction of the training loss on this batch, and
    returns their values from before. The extra pass runs like the step itself (BatchNorm in train mode);
    the running statistics it updates are put back."""
    buffers = [b.clone() for b in core.buffers()]
    loss, _ = training_loss(core, x, x_adv, y, cfg)
    grads = torch.autograd.grad(loss, weights)
    with torch.no_grad():
        for b, saved in zip(core.buffers(), buffers):
            b.copy_(saved)
        if world_size > 1:      # every rank takes the direction of the whole batch: ranks stay identical
            for g in grads:
                torch.distributed.all_reduce(g)
        originals = [w.clone() for w in weights]
        for w, g in zip(weights, grads):
            w.add_(g * (cfg.awp * w.norm() / (g.norm() + 1e-12)))     # no host sync: stays on the device
    return originals


def train_step(model, core, x, y, cfg, optimizer, noise_generator, *, eps, awp_weights=None, world_size=1):
    """One training step: PGD-AT or TRADES at radius `eps`, with AWP on `awp_weights` if given (the gradient
    is taken at the perturbed weights, which are then restored exactly before the optimizer steps).
    `model` may be the DDP wrapper of `core`. Returns (summed loss, correct count on the adversarial batch)."""
    with autocast_for(x.device):
        x_adv = training_attack(core, x, y, cfg, eps, noise_generator)
    core.train()
    with autocast_for(x.device):
        originals = awp_perturb(core, awp_weights, x, x_adv, y, cfg, world_size) if awp_weights else None
        loss, logits = training_loss(model, x, x_adv, y, cfg)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if originals is not None:
        with torch.no_grad():
            torch._foreach_copy_(awp_weights, originals)
    optimizer.step()
    return loss.detach() * len(y), (logits.argmax(1) == y).sum()


def validate(model, val_batches, cfg):
    """(clean %, PGD-10 L-inf %) of `model` on the validation batches."""
    model.eval()
    opts = AttackOptions(eps={"linf": cfg.eps}, steps=VAL_PGD_STEPS, seed=cfg.seed)
    return (accuracy(model, val_batches, "natural", opts, desc="val clean"),
            accuracy(model, val_batches, "pgd-linf", opts, desc=f"val PGD-{VAL_PGD_STEPS}"))


def apgd_check(model, batches, cfg):
    """(robust %, clean %) of `model` under the weight-selection check: APGD-CE and untargeted APGD-DLR,
    cfg.select_iters iterations each, the per-image worst case."""
    model.eval()
    attack = AdaptiveAttack(model, AttackOptions(eps={"linf": cfg.eps}, seed=cfg.seed), norm="linf",
                            components=SELECT_ATTACKS, iters=cfg.select_iters)
    row = measure(attack, batches, desc="APGD check", verbose=False)
    return row["accuracy"], row["clean"]


def budget_epochs(cfg, epoch, per_epoch, spent, val_seconds, device, world_size):
    """Total epochs such that the whole schedule ends within cfg.time_budget minutes, from the seconds an
    epoch takes once warmed up, the seconds spent and the cost of a validation check (the final EMA
    validation included when there is one)."""
    per_epoch += val_seconds / cfg.val_every
    remaining = cfg.time_budget * 60 - spent - (val_seconds if cfg.ema and cfg.select_from is None else 0)
    fit = epoch + int(0.97 * remaining / per_epoch)
    total = max(fit, epoch + 1, math.ceil(2 * cfg.warmup_epochs))
    if world_size > 1:      # every rank must run the same schedule: rank 0 decides
        t = torch.tensor([total], device=device)
        torch.distributed.broadcast(t, 0)
        total = int(t.item())
    return total


@dataclasses.dataclass
class TrainState:
    """What a training run carries from epoch to epoch; its checkpoint adds the model, optimizer, EMA and
    random states. `best` describes the best weights the APGD checks have seen, `best_state` holds them."""
    total_epochs: int = None
    epoch: int = 0
    history: list = dataclasses.field(default_factory=list)
    elapsed: float = 0.0
    best: dict = None
    best_state: dict = None


CHECKPOINT_KEYS = ("config", "model", "optimizer", "ema", "ema_updates", "rng",
                   *(f.name for f in dataclasses.fields(TrainState)))


def save_checkpoint(checkpoint, path):
    atomic_save(checkpoint, path)


def read_checkpoint(path):
    """A training checkpoint (a plain dict), checked for the keys this version writes."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint {path}")
    ckpt = torch_load(path, "checkpoint")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt] if isinstance(ckpt, dict) else list(CHECKPOINT_KEYS)
    if missing or not isinstance(ckpt["config"], dict):
        raise UserError(f"{path}: not a training checkpoint of this tool (missing {', '.join(missing)})")
    return ckpt


def _sgd(model, cfg):
    """Nesterov SGD, weight decay on conv and linear weights only (not on BatchNorm or biases)."""
    decay_params = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.SGD([{"params": decay_params, "weight_decay": cfg.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=0.0, momentum=cfg.momentum, nesterov=True)


def _duration(seconds):
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Trainer:
    """One adversarial training run of `model` (in place): its objects, its loop, its checkpoint. Under
    torchrun every rank has one; rank 0 alone logs, validates, selects and writes the checkpoint."""

    def __init__(self, model, train_set, val_set, cfg, *, device, checkpoint_path, log):
        self.rank, self.world_size, _ = distributed_context()
        self.model, self.cfg, self.checkpoint_path, self.device = model, cfg, checkpoint_path, torch.device(device)
        self.master = self.rank == 0
        self.log = log if self.master else (lambda *a, **k: None)
        channels_last = self.device.type == "cuda"
        if channels_last:
            torch.backends.cudnn.benchmark = True
            model.to(memory_format=torch.channels_last)
        self.data_gen = torch.Generator().manual_seed(cfg.seed)
        self.noise_gen = torch.Generator(self.device).manual_seed(cfg.seed + 1 + self.rank)
        images, labels = (t[:cfg.n_train] for t in train_set)
        self.batches = Batches(images, labels, cfg.batch_size // self.world_size, device=self.device, train=True,
                               generator=self.data_gen, rank=self.rank, world_size=self.world_size,
                               channels_last=channels_last)
        val_set = tuple(t[:cfg.n_val] for t in val_set)
        if self.master:     # rank 0 alone validates: the validation split and the APGD check's first images
            self.val_batches = Batches(*val_set, cfg.batch_size, device=self.device, channels_last=channels_last)
            self.select_batches = Batches(*(t[:cfg.select_n] for t in val_set), cfg.batch_size, device=self.device,
                                          channels_last=channels_last)
        self.optimizer = _sgd(model, cfg)
        self.ema = EMA(model, cfg.ema) if cfg.ema else None
        self.awp_weights = ([m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
                            if cfg.awp else None)
        self.state = TrainState(total_epochs=None if cfg.time_budget else cfg.epochs)

    def checkpoint(self):
        return {**vars(self.state), "config": dataclasses.asdict(self.cfg), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "ema": self.ema.model.state_dict() if self.ema else None,
                "ema_updates": self.ema.updates if self.ema else 0,
                "rng": {"data": self.data_gen.get_state(), "noise": self.noise_gen.get_state(),
                        "torch": torch.get_rng_state()}}

    def restore(self):
        """Continue from the checkpoint, after checking that it was made with these settings."""
        path, ckpt = self.checkpoint_path, read_checkpoint(self.checkpoint_path)
        defaults = dataclasses.asdict(TrainConfig())
        changed = [f"{k}: {ckpt['config'].get(k, defaults[k])} there, {v} now" for k, v in
                   dataclasses.asdict(self.cfg).items() if k not in ("compile", "val_every")
                   and ckpt["config"].get(k, defaults[k]) != v]
        if changed:
            raise UserError(f"--resume: {path} was made with other settings ({', '.join(changed)}); "
                            f"repeat its command, or delete it to start over")
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if self.ema:
                self.ema.model.load_state_dict(ckpt["ema"])
                self.ema.updates = int(ckpt["ema_updates"])
            for generator, key in ((self.data_gen, "data"), (self.noise_gen, "noise")):
                generator.set_state(ckpt["rng"][key])
            torch.set_rng_state(ckpt["rng"]["torch"])
            self.state = TrainState(**{f.name: ckpt[f.name] for f in dataclasses.fields(TrainState)})
            self.state.epoch, self.state.elapsed = int(self.state.epoch), float(self.state.elapsed)
        except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as e:
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise UserError(f"{path}: does not fit this run ({e.__class__.__name__}: {first}); "
                            f"delete it to start over") from None
        self.log(f"resuming {path} after epoch {self.state.epoch} of {self.state.total_epochs}")

    def run(self):
        """Epochs until the end of the schedule, each followed by its checks and the checkpoint; returns
        (model kept, info)."""
        model = core = self.model
        if self.world_size > 1:
            model = nn.parallel.DistributedDataParallel(self.model, device_ids=[self.device.index]
                                                        if self.device.type == "cuda" else None)
        if self.cfg.compile:
            model, core = torch.compile(model), torch.compile(self.model)
        s, t_start, first = self.state, time.perf_counter() - self.state.elapsed, True
        while s.total_epochs is None or s.epoch < s.total_epochs:
            record, per_epoch = self.epoch(model, core, first)
            first, s.epoch = False, s.epoch + 1
            if self.master and (s.total_epochs is None or s.epoch % self.cfg.val_every == 0
                                or s.epoch == s.total_epochs):
                record.update(self.check())
            s.history.append(record)
            if self.cfg.time_budget is not None and (s.total_epochs is None or s.epoch < s.total_epochs):
                self.fit_length(per_epoch, time.perf_counter() - t_start)
            if self.master:
                val = "".join(f", {label} {record[key]:.2f}" for key, label in (
                    ("val_clean", "val clean"), ("val_pgd10", "PGD-10"), ("val_apgd_live", "APGD live"),
                    ("val_apgd_ema", "APGD ema")) if key in record)
                self.log(f"epoch {s.epoch}/{s.total_epochs}: loss {record['loss']:.4f}, adv train acc "
                         f"{record['adv_train_acc']:.2f}, {record['images_per_s']} img/s, "
                         f"{record['seconds']:.1f} s{val}")
                s.elapsed = time.perf_counter() - t_start
                save_checkpoint(self.checkpoint(), self.checkpoint_path)
        return self.finish(time.perf_counter() - t_start)

    def epoch(self, model, core, first):
        """One epoch of training steps (`model`: the DDP wrapper or compiled net, `core`: the net, compiled
        or not). Returns (record, seconds an epoch takes once warmed up); the first epoch of a process logs
        an estimate of the run's length after its first steps."""
        s, steps = self.state, len(self.batches)
        sums, seen, steady, t0 = torch.zeros(2, device=self.device), 0, None, time.perf_counter()
        bar = progress(self.batches, f"epoch {s.epoch + 1}/{s.total_epochs or '?'}", disable=not self.master)
        for i, (x, y) in enumerate(bar):
            lr = self.step(model, core, x, y, s.epoch + i / steps, sums)
            seen += len(y)
            if i + 1 == min(STEADY_STEP, steps):
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                steady = (time.perf_counter(), i + 1) if steps > 2 * STEADY_STEP else None   # after autotuning
                if first:
                    per_epoch, left = (time.perf_counter() - t0) / (i + 1) * steps, (s.total_epochs or 0) - s.epoch
                    self.log(f"estimate from the first {STEADY_STEP} steps: about {_duration(per_epoch)} per epoch; "
                             + (f"{left} epoch(s) to go, about {_duration(per_epoch * left)}" if s.total_epochs else
                                f"the time budget of {self.cfg.time_budget:g} min fixes the length after this epoch"))
            if (i + 1) % 20 == 0 or i + 1 == steps:     # the one host sync, every 20 steps
                self.show(bar, sums, seen, time.perf_counter() - t0, lr)
        bar.close()
        epoch_time = time.perf_counter() - t0
        per_epoch = epoch_time if steady is None else (t0 + epoch_time - steady[0]) / (steps - steady[1]) * steps
        record = {"epoch": s.epoch + 1, "loss": sums[0].item() / seen, "adv_train_acc": 100 * sums[1].item() / seen,
                  "seconds": round(epoch_time, 2), "images_per_s": round(seen * self.world_size / epoch_time)}
        return record, per_epoch

    def step(self, model, core, x, y, epoch_progress, sums):
        """One training step at this point of the schedule; adds its loss and correct count to `sums`."""
        cfg, total = self.cfg, self.state.total_epochs or math.inf   # until the length is fixed: the warm-up
        lr = lr_at(epoch_progress, total, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        awp = self.awp_weights if epoch_progress >= cfg.awp_warmup else None
        loss, hits = train_step(model, core, x, y, cfg, self.optimizer, self.noise_gen,
                                eps=eps_at(epoch_progress, total, cfg), awp_weights=awp, world_size=self.world_size)
        sums += torch.stack([loss.float(), hits.float()])
        if self.ema:
            after = epoch_progress + 1 / len(self.batches)
            (self.ema.update if after / total >= cfg.ema_start else self.ema.follow)(self.model)
        return lr

    def show(self, bar, sums, seen, seconds, lr):
        """The progress bar's figures; a NaN loss stops the run."""
        mean_loss = sums[0].item() / seen
        if not math.isfinite(mean_loss):
            kept = "; the last good epoch is in the checkpoint (--resume)" if self.state.epoch > 0 else ""
            raise TrainingError(f"loss became {mean_loss} in epoch {self.state.epoch + 1}: lower --lr "
                                f"(now {self.cfg.lr}){kept}")
        bar.set_postfix(loss=f"{mean_loss:.3f}", adv_acc=f"{100 * sums[1].item() / seen:.1f}",
                        img_s=f"{seen * self.world_size / seconds:.0f}", lr=f"{lr:.3f}")

    def fit_length(self, per_epoch, spent):
        """Set (after the first epoch) or correct (after every later one) the length of a time-budget run
        from the cost of the epoch just run. Correcting matters: the first epoch of an eps ramp has no attack
        and AWP starts after its warm-up, so the first epoch can cost half of a later one."""
        s = self.state
        check = max((r.get("val_seconds", 0.0) for r in s.history), default=0.0)   # the dearest check so far
        total = budget_epochs(self.cfg, s.epoch, per_epoch, spent, check, self.device, self.world_size)
        if total != s.total_epochs:
            self.log(f"time budget {self.cfg.time_budget:g} min at {per_epoch:.1f} s per epoch: {total} epochs"
                     + (f" (was {s.total_epochs})" if s.total_epochs else ""))
        s.total_epochs = total

    def check(self):
        """The validation check after an epoch: clean and PGD-10 accuracy of the live weights; with
        select_from, the APGD check of the live and EMA weights (from select_from of the run on, and at the
        first check of a time-budget run, whose cost the budget needs), keeping the best weights seen."""
        s, cfg, t0 = self.state, self.cfg, time.perf_counter()
        record = dict(zip(("val_clean", "val_pgd10"), validate(self.model, self.val_batches, cfg)))
        fraction = s.epoch / s.total_epochs if s.total_epochs else None
        selecting = fraction is not None and cfg.select_from is not None and fraction >= cfg.select_from
        if cfg.select_from is not None and (selecting or fraction is None):
            for name, net in [("live", self.model)] + ([("ema", self.ema.model)] if self.ema else []):
                robust, clean = apgd_check(net, self.select_batches, cfg)
                record[f"val_apgd_{name}"], record[f"val_apgd_clean_{name}"] = robust, clean
                if selecting and (s.best is None or (robust, clean) > (s.best["apgd"], s.best["clean"])):
                    s.best = {"epoch": s.epoch, "weights": name, "apgd": robust, "clean": clean}
                    s.best_state = {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}
        return {**record, "val_seconds": round(time.perf_counter() - t0, 2)}

    def finish(self, elapsed):
        """Choose the weights to keep and describe the run: the best APGD check with select_from, else the
        better of the final and EMA weights by validation PGD-10."""
        s, cfg = self.state, self.cfg
        train_seconds = sum(r["seconds"] for r in s.history)
        self.model.eval()
        info = {"epochs": s.total_epochs, "train_images": len(self.batches.labels), "wall_seconds": round(elapsed, 1),
                "train_seconds": round(train_seconds, 1), "images_per_s": round(
                    len(self.batches) * cfg.batch_size * s.total_epochs / max(train_seconds, 1e-9)),
                "world_size": self.world_size, "device": device_name(self.device),
                "config": dataclasses.asdict(cfg), "history": s.history, "weights": "final"}
        if self.world_size > 1:     # a checksum per tensor, gathered: do all ranks end with the same weights?
            checksum = torch.stack([p.detach().double().sum() for p in self.model.parameters()])
            gathered = [torch.zeros_like(checksum) for _ in range(self.world_size)]
            torch.distributed.all_gather(gathered, checksum)
            info["ranks_agree"] = all(torch.equal(g, checksum) for g in gathered)
            self.log(f"weights identical across {self.world_size} ranks: {info['ranks_agree']}")
        if self.master and s.best is not None:
            self.model.load_state_dict(s.best_state)
            info.update(selected=s.best, weights=f"{s.best['weights']} weights of epoch {s.best['epoch']}")
            self.log(f"keeping the {info['weights']} (validation APGD {s.best['apgd']:.2f}, clean "
                     f"{s.best['clean']:.2f}, on {len(self.select_batches.labels)} images)")
        elif self.ema and self.master:
            final = s.history[-1]
            ema_clean, ema_robust = validate(self.ema.model, self.val_batches, cfg)
            self.log(f"validation: final weights {final['val_clean']:.2f} / {final['val_pgd10']:.2f}, "
                     f"EMA {ema_clean:.2f} / {ema_robust:.2f} (clean / PGD-10)")
            info["ema_val"] = {"clean": ema_clean, "pgd10": ema_robust}
            if (ema_robust, ema_clean) > (final["val_pgd10"], final["val_clean"]):
                self.model.load_state_dict(self.ema.model.state_dict())
                info["weights"] = "ema"
            self.log(f"keeping the {info['weights']} weights")
        self.model.to(memory_format=torch.contiguous_format)
        return self.model, info


def train(model, train_set, val_set, cfg, *, device, checkpoint_path, resume=False, log=print):
    """Adversarial training of `model` (in place) on train_set = (images, labels).

    Writes `checkpoint_path` atomically after every epoch; resume=True continues from it and gives the
    same result as an uninterrupted run. Returns (model to keep, info dict). Under torchrun every rank
    calls this. MeanSparse is bypassed (alpha is 0 until calibration anyway).
    """
    with bypassed(model):
        trainer = Trainer(model, train_set, val_set, cfg, device=device, checkpoint_path=checkpoint_path, log=log)
        if resume:
            trainer.restore()
        return trainer.run()


# ----------------------------------------------------------------------------------------------------
# MeanSparse calibration
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def collect_statistics(model, batches):
    """Exact per-channel mean and std of every MeanSparse input over `batches` (clean images, eval mode,
    every alpha 0), pooled over images and positions in float64; written into the modules."""
    modules = meansparse_modules(model)
    sums = [torch.zeros(len(m.mean), dtype=torch.float64, device=m.mean.device) for m in modules]
    squares = [torch.zeros_like(s) for s in sums]
    counts = [0] * len(modules)

    def hook(k):
        def record(module, inputs):
            x = inputs[0].detach().double()
            sums[k] += x.sum(dim=(0, 2, 3))
            squares[k] += x.square().sum(dim=(0, 2, 3))
            counts[k] += x.numel() // x.shape[1]
        return record

    handles = [m.register_forward_pre_hook(hook(k)) for k, m in enumerate(modules)]
    was_training = model.training
    model.eval()
    try:
        with meansparse_as(model, alpha=0.0):
            for x, _ in progress(batches, "MeanSparse statistics"):
                model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for m, s, q, n in zip(modules, sums, squares, counts):
        mean = s / n
        m.mean.copy_(mean.float())
        m.std.copy_((q / n - mean.square()).clamp_min(0).sqrt().float())


def paired_gain(robust, base):
    """(mean, standard error) in points of the per-image difference robust - base (bool tensors over the
    same images): the paired comparison of two alphas."""
    d = robust.double() - base.double()
    se = float(d.std()) / math.sqrt(len(d)) if len(d) > 1 else math.inf
    return 100.0 * float(d.mean()), 100.0 * se


def choose_alpha(sweep, criterion="adaptive", max_clean_drop=CLEAN_DROP_LIMIT):
    """The alpha with the highest `criterion` accuracy among those whose clean accuracy is within
    max_clean_drop points of alpha = 0 (ties: the smaller alpha). With "adaptive" an alpha > 0 must also
    beat alpha 0 by more than SIGNIFICANCE standard errors of the paired per-image difference."""
    base = next(row for row in sweep if row["alpha"] == 0)
    allowed = [row for row in sweep if row["clean"] >= base["clean"] - max_clean_drop
               and (criterion != "adaptive" or row["alpha"] == 0 or row["gain"] > SIGNIFICANCE * row["gain_se"])]
    return max(allowed, key=lambda row: (row[criterion], -row["alpha"]))["alpha"]


# sweep column -> the row of ATTACKS that measures it on the validation split (adaptive: that criterion only)
SWEEP = {"clean": "natural", "plain": "pgd-linf", "bpda": "bpda-linf", "adaptive": "apgd-linf"}


def _sweep_row(alpha, rows, base):
    """One alpha's line of the sweep from its measured rows; the adaptive gain is paired with alpha 0's."""
    row = {"alpha": alpha, **{key: r["accuracy"] for key, r in rows.items()}}
    if "adaptive" in rows:
        robust = per_image_bools(rows["adaptive"]["per_image"])
        row["gain"], row["gain_se"] = paired_gain(robust, robust if base is None else base)
    return row


def _sweep_line(row, steps):
    line = (f"  alpha {row['alpha']:5.3f}: clean {row['clean']:6.2f}  PGD-{steps} {row['plain']:6.2f}  "
            f"BPDA PGD-{steps} {row['bpda']:6.2f}")
    if "adaptive" in row:
        line += f"  adaptive {row['adaptive']:6.2f}"
        line += f" ({row['gain']:+.2f} +- {row['gain_se']:.2f} against alpha 0)" if row["alpha"] > 0 else ""
    return line


def _choice_line(alpha, sweep, criterion):
    if len(sweep) == 1:         # nothing was chosen: the caveats of the criteria would mislead
        return f"alpha {alpha:g}: the only value of the grid"
    if criterion == "adaptive" and alpha == 0:
        best = max(sweep[1:], key=lambda row: (row["adaptive"], -row["alpha"]))
        return (f"chosen alpha 0: MeanSparse did not help this model. No alpha beat alpha 0 under the adaptive "
                f"attack by more than {SIGNIFICANCE:g} standard errors of the paired difference with clean "
                f"accuracy within {CLEAN_DROP_LIMIT:g} points (best: alpha {best['alpha']:g}, {best['gain']:+.2f} "
                f"+- {best['gain_se']:.2f})")
    note = {"plain": " (plain PGD sees a masked gradient: this choice rewards gradient masking, not robustness)",
            "bpda": " (BPDA PGD-20 has credited MeanSparse with gains that APGD does not find)"}
    return f"chosen alpha {alpha:g} by {criterion} accuracy{note.get(criterion, '')}"


def calibrate(model, stats_batches, val_batches, alphas, opts, *, criterion="adaptive", log=print,
              progress_path=None):
    """Collect MeanSparse statistics on stats_batches (None: keep the model's), then sweep the alphas (0
    always among them) on val_batches: clean, plain PGD and BPDA PGD accuracy (L-inf), and with the adaptive
    criterion the APGD worst case with its paired gain over alpha 0. Sets the chosen alpha; returns (alpha,
    sweep). Every row goes into a Report at `progress_path`, rewritten after every batch: a calibration
    interrupted (hours of APGD on a CPU) and called again on the same weights, statistics, images and seed
    continues where it stopped."""
    if stats_batches is not None:
        collect_statistics(model, stats_batches)
    model.eval()
    key = {"weights": weights_fingerprint(model), "n_val": len(val_batches.labels),
           "batch_size": val_batches.batch_size, "seed": opts.seed}
    record = Report.open(progress_path, key, list(key), log)
    columns = {k: name for k, name in SWEEP.items() if k != "adaptive" or criterion == "adaptive"}
    sweep, base = [], None
    for alpha in sorted(set(alphas) | {0.0}):
        with meansparse_as(model, alpha=alpha):
            rows = {k: record.row(f"alpha {alpha:g} {name}", ATTACKS[name](model, opts), val_batches, log)
                    for k, name in columns.items()}
        sweep.append(_sweep_row(alpha, rows, base))
        base = per_image_bools(rows["adaptive"]["per_image"]) if alpha == 0 and "adaptive" in rows else base
        log(_sweep_line(sweep[-1], opts.steps))
    alpha = choose_alpha(sweep, criterion)
    set_alpha(model, alpha)
    log(_choice_line(alpha, sweep, criterion))
    return alpha, sweep


# ----------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------
def log_row(name, row, alpha, log):
    """The printed line of a row (and its components' lines for the adaptive evaluation)."""
    notes = (["worst case"] if "components" in row else []) + (["under BPDA"] if row.get("bpda") and alpha > 0 else [])
    log(f"{name:14s} {row['accuracy']:6.2f} %  on {row['n']} images  {row['seconds']:8.1f} s"
        + (f" ({', '.join(notes)})" if notes else ""))
    for component, c in row.get("components", {}).items():
        own = (f"{c['accuracy']:6.2f} %" if c["accuracy"] is not None else
               f"broke {c['broke']} of the {c['attacked']} images the others left")
        log(f"  {component:17s} {own}  {c['seconds']:8.1f} s")


def evaluate_rows(model, rows, report, batches, opts, log):
    """Every row of `rows` (names of ATTACKS) into `report`: kept, continued or measured (see Report.row)."""
    for name in rows:
        try:
            row = report.row(name, ATTACKS[name](model, opts), batches, log)
        except KeyboardInterrupt:
            cut = report.rows.get(name, {})
            if cut.get("complete") is False:    # stopped part way: its finished batches are in the report
                log(f"\n{name:14s} {cut['accuracy_so_far']:6.2f} %  on the first {cut['n_done']} of "
                    f"{cut['n']} images (interrupted)")
            raise
        log_row(name, row, get_alpha(model), log)


@dataclasses.dataclass(frozen=True)
class Check:
    """A symptom of an attack that failed (AutoAttack's checks; Pintor et al., Indicators of Attack Failure,
    2022): what it means when it fires, and what to do instead."""
    means: str
    remedy: str


CHECKS = {
    "train-mode": Check("the model is in train mode: BatchNorm normalises by each batch, Dropout is random",
                        "end load_for_testing with self.eval(): the platform measures the model as it is left"),
    "randomized": Check("the same images give other logits from one pass to the next",
                        "average each gradient over several passes: --eot 20"),
    "probabilities": Check("the outputs are probabilities, not logits: cross-entropy's gradient vanishes on them",
                           "make Net return logits; meanwhile --eval apgd-linf, whose targeted DLR loss reads margins"),
    "zero-gradients": Check("images have an all-zero input gradient: gradient attacks cannot move them",
                            "BPDA through the layer that stops the gradient, or a gradient-free attack: --eval square-linf"),
    "unbounded": Check("PGD at eps 1, where any image is reachable, leaves images correct",
                       "the gradient leads nowhere: --eval square-linf, and BPDA through a non-differentiable layer"),
    "monotone": Check("accuracy rises with eps: the attack is not optimising", "more --steps and --restarts"),
    "convergence": Check("twice the PGD steps lower the accuracy by more than two paired standard errors",
                         "more --steps, or --eval apgd-linf, whose step size adapts"),
    "transfer": Check("PGD crafted on a surrogate breaks images the white-box attack left correct",
                      "the model's own gradient misleads: --eval apgd-linf,square-linf, or BPDA"),
    "gradient-free": Check("Square, which needs no gradient, breaks images the gradient attack left correct",
                           "the gradient is masked: --eval square-linf,apgd-linf, and BPDA through such a layer"),
    "bpda": Check("BPDA PGD is weaker than plain PGD through MeanSparse", "a fault of this tool's BPDA: report it"),
}


def autoattack_says(check, *args, **kwargs):
    """Does one of AutoAttack's own checks (pyautoattack.checks, which warn) warn?"""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check(*args, **kwargs)
    return bool(caught)


def quick_checks(model, x, y):
    """The checks that attack nothing, on a few clean images: {name: what it saw, or None where it did not
    fire}. AutoAttack's own functions judge; the figures are for the message."""
    checks, n = import_pyautoattack().checks, len(x)
    training = [m for m in model.modules() if m.training]
    with torch.no_grad():
        first, second = model(x).float(), model(x).float()
    x_grad = x.clone().requires_grad_(True)
    out = model(x_grad)
    grad = torch.autograd.grad(cross_entropy_sum(out, y), x_grad)[0] if out.requires_grad else torch.zeros_like(x)
    zero = int((grad.flatten(1).abs().sum(1) == 0).sum())
    seen = {"train-mode": training and f"{len(training)} of {len(list(model.modules()))} modules in train mode",
            "randomized": autoattack_says(checks.check_randomized, model, x, y, n=2) and f"two passes over the same "
            f"{n} images differ by up to {float((first - second).abs().max()):.3g} in a logit",
            "probabilities": autoattack_says(checks.check_range_output, model, x) and f"outputs in "
            f"[{float(first.min()):.3g}, {float(first.max()):.3g}], each image's summing to 1",
            "zero-gradients": autoattack_says(checks.check_zero_gradients, grad) and f"{zero} of {n} images"}
    return {name: saw or None for name, saw in seen.items()}


def broke_more(base, after, what, steps):
    """What a check saw where `after` (per-image bools) leaves fewer images correct than `base`, PGD's, by more
    than SIGNIFICANCE paired standard errors; None otherwise."""
    gain, se = paired_gain(after, base)
    broke = int((base & ~after).sum())
    if broke and -gain > SIGNIFICANCE * se:
        return (f"{what} broke {broke} of the {int(base.sum())} images PGD-{steps} left correct ({gain:+.2f} +- "
                f"{se:.2f} points)")
    return None


def attack_checks(model, batches, opts, surrogate):
    """The checks that attack (--sanity), at the L-inf eps of `opts`: ({name: what it saw or None}, the
    accuracies behind them). `surrogate`: the model on which the transfer check crafts PGD (under BPDA)."""
    eps, steps, n, show = opts.eps["linf"], opts.steps, len(batches.labels), NORMS["linf"].show

    def run(attack, desc):
        return per_image_bools(measure(attack, batches, desc=f"check: {desc}")["per_image"])

    def noise(k):       # two binomial standard errors of a count of k images correct, at least one image
        return max(1.0, 2 * math.sqrt(k * (n - k) / n))

    radii = sorted({0.0, eps / 2, eps, 2 * eps, 1.0})
    sweep = [run(PGDAttack(model, opts.at("linf", r), norm="linf") if r else Attack(model, opts), f"eps {show(r)}")
             for r in radii]
    counts, base = [int(s.sum()) for s in sweep], sweep[radii.index(eps)]
    doubled = run(PGDAttack(model, opts.at("linf", eps, steps=2 * steps), norm="linf"), f"PGD-{2 * steps}")
    transfer = base & run(PGDAttack(surrogate, opts.at("linf", eps), norm="linf", use_bpda=True, judge=model),
                          "transfer")
    square = base & run(SquareAttack(model, opts.at("linf", eps), norm="linf"), "Square")
    rises = [f"{counts[i + 1]} at eps {show(radii[i + 1])} against {counts[i]} at {show(radii[i])}"
             for i in range(len(radii) - 1) if counts[i + 1] > counts[i] + noise(counts[i])]
    gain, se = paired_gain(square, base)
    fractions = {"clean": counts[0] / n, "pgd": float(base.double().mean()), "square": float(square.double().mean())}
    seen = {"unbounded": counts[-1] and f"{counts[-1]} of {n} images correct at eps 1",
            "monotone": rises and f"images correct: {'; '.join(rises)}",
            "convergence": broke_more(base, doubled, f"PGD-{2 * steps}", steps),
            "transfer": broke_more(base, transfer, "PGD crafted on the surrogate", steps),
            "gradient-free": autoattack_says(import_pyautoattack().checks.check_square_sr, fractions,
                                             alpha=SIGNIFICANCE * se / 100)
            and broke_more(base, square, f"Square ({opts.queries} queries)", steps)}
    figures = {"eps": radii, "accuracy": [percent(s) for s in sweep], f"pgd{2 * steps}": percent(doubled),
               "transfer": percent(transfer), "square": percent(square)}
    if get_alpha(model) > 0:
        figures["bpda"] = percent(bpda := run(PGDAttack(model, opts.at("linf", eps), norm="linf", use_bpda=True),
                                              "BPDA"))
        seen["bpda"] = int(bpda.sum()) > counts[radii.index(eps)] + noise(counts[radii.index(eps)]) and \
            f"BPDA PGD-{steps} left {int(bpda.sum())} images correct, plain PGD {counts[radii.index(eps)]}"
    return {name: saw or None for name, saw in seen.items()}, figures


def log_checks(seen, log, everything):
    """A line per check that fired (its name, what it saw, the remedy), then one naming those that passed."""
    for name, saw in seen.items():
        if saw:
            log(f"check {name} FIRED: {saw}; remedy: {CHECKS[name].remedy}")
    passed = [name for name, saw in seen.items() if not saw]
    log(f"checks passed: {', '.join(passed) or 'none'}" + ("" if everything else " (--sanity runs every check)"))


def robustness_curves(model, batches, opts):
    """Accuracy against eps for every norm, plain and BPDA PGD."""
    curves = {}
    for norm, ball in NORMS.items():
        for kind in ("pgd", "bpda"):
            curves[f"{kind}-{norm}"] = {"eps": list(ball.plot_eps), "accuracy": [
                accuracy(model, batches, f"{kind}-{norm}", opts.at(norm, eps),
                         desc=f"{kind} {norm} eps {ball.show(eps)}")
                for eps in ball.plot_eps]}
    return curves


def _plot_training_loss(ax, report):
    history = report["training"]["history"]
    ax.plot([r["epoch"] for r in history], [r["loss"] for r in history], "-")
    ax.set(xlabel="epoch", ylabel="training loss", title="training loss")


def _plot_training_accuracy(ax, report):
    for key, label in (("adv_train_acc", "adversarial, training batches"), ("val_clean", "val clean"),
                       ("val_pgd10", "val PGD-10"), ("val_apgd_live", "val APGD (live)"),
                       ("val_apgd_ema", "val APGD (EMA)")):
        points = [(r["epoch"], r[key]) for r in report["training"]["history"] if key in r]
        if points:
            ax.plot(*zip(*points), "-" if key == "adv_train_acc" else "-o", markersize=3, label=label)
    ax.set(xlabel="epoch", ylabel="accuracy (%)", title="training")


def plot_sweep(ax, calibration):
    """MeanSparse's alpha sweep: clean, plain PGD, BPDA PGD and the APGD worst case against alpha."""
    sweep = calibration["sweep"]
    for key, label in (("clean", "clean"), ("plain", "plain PGD"), ("bpda", "BPDA PGD"),
                       ("adaptive", "APGD worst case")):
        if key in sweep[0]:
            ax.plot([r["alpha"] for r in sweep], [r[key] for r in sweep], "-o", markersize=3, label=label)
    ax.axvline(calibration["alpha"], color="grey", linestyle=":", label="chosen")
    ax.set(xlabel="MeanSparse alpha", ylabel="accuracy (%)", title="alpha sweep (validation)")


def plot_curves(ax, curves, norm):
    """Accuracy against eps of one norm, plain and BPDA PGD, the radii written as the norm writes them."""
    for kind, style, label in (("pgd", "-o", "plain PGD"), ("bpda", "--s", "BPDA PGD")):
        ax.plot(curves[f"{kind}-{norm}"]["eps"], curves[f"{kind}-{norm}"]["accuracy"], style, markersize=3, label=label)
    eps = curves[f"pgd-{norm}"]["eps"]
    ax.set_xticks(eps, [NORMS[norm].show(e) for e in eps], fontsize=7)
    ax.set(xlabel=f"eps ({norm})", ylabel="accuracy (%)", title=f"accuracy against eps, {norm}")


def plot_report(report, path, title):
    """One figure, a panel per part of `report` this run produced: training curves (loss; adversarial
    training and validation accuracies per epoch), the MeanSparse alpha sweep, accuracy against eps."""
    import matplotlib      # checked by parse_args
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [_plot_training_loss, _plot_training_accuracy] if "training" in report else []
    panels += [lambda ax, r: plot_sweep(ax, r["calibration"])] if "calibration" in report else []
    panels += [functools.partial(lambda ax, r, norm: plot_curves(ax, r["curves"], norm), norm=n) for n in NORMS]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        panel(ax, report)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    extension = os.path.splitext(path)[1][1:].lower()
    atomic_write(path, lambda f: fig.savefig(f, format=extension, dpi=120))
    plt.close(fig)


def plot_comparison(table, rows, path):
    """The comparison of projects as a figure: per row a group of bars, one per project measured, each with
    two standard errors, hatched where a check fired; the projects that failed are named in the title."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    measured = [label for label, entry in table.items() if entry["rows"]]
    failed = [label for label in table if label not in measured]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(rows) * max(len(measured), 1) + 2), 4))
    width = 0.8 / max(len(measured), 1)
    for k, label in enumerate(measured):
        cells = [table[label]["rows"].get(name) for name in rows]
        fired = table[label]["checks_fired"]
        ax.bar([i + k * width for i in range(len(rows))], [c["accuracy"] if c else 0 for c in cells], width,
               yerr=[2 * c["se"] if c else 0 for c in cells], capsize=3, hatch="//" if fired else None,
               label=label + (f" (checks fired: {', '.join(fired)})" if fired else ""))
    ax.set_xticks([i + width * (len(measured) - 1) / 2 for i in range(len(rows))], rows)
    ax.set(ylabel="accuracy (%)", ylim=(0, 100), title="projects compared" + (
        f" (failed: {', '.join(failed)})" if failed else ""))
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format=os.path.splitext(path)[1][1:].lower(), dpi=120))
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------
def _attack_list(text):
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in ATTACKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown attack {', '.join(unknown) or '(none)'}; "
                                         f"choose from {', '.join(ATTACKS)}")
    return names


def _alpha_list(text):
    values = [non_negative(t) for t in text.split(",") if t.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"not a list of alphas: {text!r}")
    return sorted(set(values) | {0.0})      # alpha = 0 is the reference of the clean-accuracy rule


class _Parser(argparse.ArgumentParser):
    def error(self, message):     # one line, not the whole usage block
        self.exit(2, f"{self.prog}: error: {message.removeprefix('argument ')} (see --help)\n")


EXAMPLES = """examples:
  ./model.py                                          # natural accuracy of the committed model (test split)
  ./model.py --eval natural,pgd-linf,bpda-linf --n-eval 1000 --report r.json    # run again to continue it
  ./model.py --eval apgd-linf,apgd-l2 --report r.json # the adaptive evaluation: a GPU job
  ./model.py --calibrate --model-file copy.pth        # MeanSparse statistics, alpha chosen on validation
  ./model.py --force-train --time-budget 7 --model-file new.pth --eval natural,pgd-linf
  ./model.py --project . --project ../student --eval natural,pgd-linf --sanity --report grades.json
"""


def _add_evaluation_flags(g):
    g.add_argument("--eval", type=_attack_list, default=["natural"], metavar="LIST",
                   help=f"comma-separated rows from {', '.join(ATTACKS)} (default natural)")
    for name, norm in NORMS.items():
        g.add_argument(f"--eps-{name}", type=norm.parse, default=norm.eps, metavar="EPS",
                       help=f"{name} radius{' of evaluation and training' if name == 'linf' else ''}, fractions "
                            f"accepted (default {norm.show(norm.eps)})")
        g.add_argument(f"--step-{name}", type=norm.parse, metavar="SIZE", help=f"{name} PGD step (default eps/4)")
    g.add_argument("--steps", type=non_negative_int, default=EVAL_STEPS,
                   help=f"PGD steps of evaluation and calibration (default {EVAL_STEPS})")
    g.add_argument("--restarts", type=positive_int, default=1,
                   help="PGD random restarts, worst case kept per image (default 1)")
    g.add_argument("--apgd-iters", type=positive_int, default=APGD_ITERS,
                   help=f"iterations of each APGD run of apgd-* and the adaptive calibration (default {APGD_ITERS})")
    g.add_argument("--alpha", type=non_negative,
                   help="MeanSparse alpha for this evaluation only; 0 turns MeanSparse off (default the file's)")
    g.add_argument("--report", metavar="FILE.json", help="write the results as JSON after every batch; a run of "
                                                         "the same model, images and seed continues it")
    g.add_argument("--plot", metavar="FILE.png", help="plot accuracy against eps, and the alpha sweep and "
                                                      "training curves of this run (matplotlib)")
    g.add_argument("--eot", type=positive_int, default=1, metavar="N", help="average each PGD and APGD gradient "
                   "over N forward passes, for a randomised model (default 1)")
    g.add_argument("--square-queries", type=positive_int, default=SQUARE_QUERIES, metavar="N",
                   help=f"queries of the square-* rows and the gradient-free check (default {SQUARE_QUERIES})")
    g.add_argument("--sanity", action="store_true", help="run every attack-failure check (docs/grading.md); exit 1 "
                   "when one fires")
    g.add_argument("--surrogate", metavar="FILE", help="model file on which the transfer check crafts PGD "
                                                        f"(default {Net.model_file} beside this script)")


def _add_project_flags(g):
    g.add_argument("--project", action="append", metavar="DIR", help="evaluate the project in DIR (a model.py with "
                   "Net and load_for_testing) as the grading platform loads it; give it again to compare several. "
                   "This RUNS THE PROJECT'S OWN CODE: grade untrusted submissions in a container")
    g.add_argument("--project-timeout", type=positive, default=PROJECT_TIMEOUT, metavar="SECONDS",
                   help=f"a project still running after this long is stopped (default {PROJECT_TIMEOUT})")


def _add_other_flags(calibration, data):
    calibration.add_argument("--calibrate", action="store_true",
                             help="collect statistics on the training split, choose alpha on validation, save")
    calibration.add_argument("--reuse-statistics", action="store_true", help="keep the file's MeanSparse "
                             "statistics and only choose alpha again (needs no training data)")
    calibration.add_argument("--alpha-grid", type=_alpha_list, default=list(ALPHA_GRID), metavar="LIST",
                             help=f"alphas to try, 0 always among them (default {','.join(map(str, ALPHA_GRID))})")
    calibration.add_argument("--alpha-criterion", choices=("adaptive", "bpda", "plain"), default="adaptive",
                             help="what picks alpha: the APGD worst case (default), BPDA PGD, or plain PGD, which "
                                  "rewards gradient masking (see docs/meansparse.md)")
    data.add_argument("--data-dir", help=f"folder holding cifar-10-batches-py/ (default $CIFAR10_DIR, else "
                                         f"{DEFAULT_DATA_DIR}; downloaded there if missing)")
    data.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                      help="default auto: cuda if there is one")
    data.add_argument("--eval-batch-size", type=positive_int, help=f"evaluation and calibration batch (default "
                      f"{GPU_EVAL_BATCH} on CUDA, {CPU_BATCH} on the CPU, where small batches are fastest)")
    data.add_argument("--split", choices=("val", "test"), default="test", help="evaluation split (default test)")
    data.add_argument("--n-eval", type=positive_int, help="the first N images of the split (default all)")


def _add_config_flags(groups):
    """A flag for every TrainConfig field with a help text, its default taken from the field."""
    for field in dataclasses.fields(TrainConfig):
        meta = field.metadata
        if "help" not in meta:
            continue
        flags, group = meta["flag"] or ("--" + field.name.replace("_", "-"),), groups[meta["group"]]
        if meta["type"] is bool:
            group.add_argument(*flags, dest=field.name, action="store_true", default=None, help=meta["help"])
        else:
            shown = meta["shown"] or (f"{field.default:g}" if isinstance(field.default, float) else field.default)
            group.add_argument(*flags, dest=field.name, type=meta["type"], metavar=meta["metavar"],
                               help=f"{meta['help']} (default {shown})")


def parse_args(argv=None):
    seconds = " and ".join(f"{n.cpu_seconds:g} s ({name})" for name, n in NORMS.items())
    hours = " and ".join(f"{n.cpu_seconds * 1000 / 3600:.1f}" for n in NORMS.values())
    p = _Parser(description="Train and honestly evaluate robust CIFAR-10 networks with MeanSparse.",
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES + (
                    f"apgd-* and aa-* rows cost about {seconds} per image on a 2-core CPU: {hours} hours per "
                    f"1,000 images, a GPU job."))
    p.add_argument("--model-file", help=f"model file to test, train or calibrate (default {Net.model_file}, "
                                        f"the committed model that Net() loads)")
    p.add_argument("-f", "--force-train", action="store_true", help="train even if the model file exists")
    groups = {"eval": p.add_argument_group("evaluate"), "projects": p.add_argument_group("grade projects"),
              "calibrate": p.add_argument_group("calibrate MeanSparse"),
              "train": p.add_argument_group("train"), "data": p.add_argument_group("data and device")}
    _add_evaluation_flags(groups["eval"])
    _add_project_flags(groups["projects"])
    _add_other_flags(groups["calibrate"], groups["data"])
    _add_config_flags(groups)
    groups["train"].add_argument("--resume", action="store_true", help="continue training from <model-file>.ckpt "
                                 "(with --force-train), or insist on continuing --report")
    args = p.parse_args(argv)
    args.model_file_given, args.model_file = args.model_file is not None, args.model_file or Net.model_file
    extension = os.path.splitext(args.plot or "")[1][1:].lower()
    for bad, message in [
            (args.epochs and args.time_budget, "give -e/--num-epochs or --time-budget, not both"),
            (args.ema_start and args.ema is None, "--ema-start needs --ema DECAY"),
            (args.calibrate and args.alpha is not None, "--calibrate chooses alpha itself; drop --alpha"),
            (args.reuse_statistics and (not args.calibrate or args.force_train),
             "--reuse-statistics chooses alpha again for an existing model: use it with --calibrate alone"),
            (args.plot and extension not in PLOT_FORMATS, f"--plot {args.plot}: give a file name ending in "
                                                          f".{', .'.join(PLOT_FORMATS)}")]:
        if bad:
            p.error(message)
    return args


def train_config(args):
    """The TrainConfig of the flags: the fields of the flags given, the defaults of the others."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if "help" in f.metadata and getattr(args, f.name) is not None}
    return TrainConfig(**given, eps=args.eps_linf, **({"epochs": None} if args.time_budget else {}))


def warn(message):
    print(f"warning: {message}", file=sys.stderr)


def images_of(split, n_eval=None):
    """How many images an evaluation of `split` with --n-eval `n_eval` (None: all) attacks."""
    return min(n_eval or SPLIT_SIZES[split], SPLIT_SIZES[split])


def progress_file(model_file):
    """Where a calibration of `model_file` keeps its rows until it saves (see `calibrate`)."""
    return model_file + ".calibration.json"


@dataclasses.dataclass
class RunState:
    """What this run does and how far it got: set from the flags before any work, read by its checks, its
    steps and the message an interruption prints (stage, and what it has saved)."""
    cfg: TrainConfig
    opts: AttackOptions
    device: torch.device
    train: bool                     # --force-train, or the model file is missing
    calibrate: bool
    command: str
    rank: int = 0
    world_size: int = 1
    stage: str = "starting"         # then training, calibrating, evaluating
    saved: str = None               # "trained", then "calibrated": what this run wrote into the model file

    @property
    def writes_model(self):
        return self.train or self.calibrate


def plan(args, argv):
    """The run's state from the flags, the device and torchrun's environment; the flags' own errors and
    warnings come here, before any file is touched."""
    rank, world_size, local_rank = distributed_context()
    device = pick_device(args.device)
    if world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    cfg = train_config(args)
    opts = AttackOptions(eps={n: getattr(args, f"eps_{n}") for n in NORMS}, steps=args.steps, seed=cfg.seed,
                         step={n: getattr(args, f"step_{n}") for n in NORMS}, restarts=args.restarts,
                         apgd_iters=args.apgd_iters, eot=args.eot, queries=args.square_queries)
    state = RunState(cfg, opts, device, train=not args.project and (args.force_train or
                                                                    not os.path.exists(args.model_file)),
                     calibrate=args.calibrate, command=" ".join(["./model.py", *(sys.argv[1:] if argv is None
                                                                                 else argv)]),
                     rank=rank, world_size=world_size)
    check_flags(args, state)
    check_project_flags(args)
    for message in flag_warnings(args, state) if rank == 0 else []:
        warn(message)
    return state


def check_flags(args, state):
    """Combinations of flags that cannot work, as a UserError before any file is read."""
    cfg, n_train = state.cfg, images_of("train", state.cfg.n_train)
    for bad, message in [
            (state.world_size > 1 and not args.force_train,
             "torchrun is for training: add --force-train (evaluation runs in one process)"),
            (args.resume and state.train and not args.force_train,
             f"--resume: {args.model_file} does not exist; to continue training add --force-train"),
            (args.resume and not state.train and (args.calibrate or not args.report), "--resume continues "
             "training (with --force-train) or the evaluation in --report (an interrupted calibration or "
             "evaluation also continues when its command is run again)"),
            (state.train and args.alpha and not args.calibrate,
             "--alpha needs MeanSparse statistics, which a newly trained model gets only with --calibrate"),
            (args.reuse_statistics and state.train,
             f"--reuse-statistics: {args.model_file} does not exist, so it has no statistics to reuse"),
            (state.train and cfg.batch_size % state.world_size,
             f"--batch-size {cfg.batch_size} must be divisible by the {state.world_size} processes"),
            (state.train and n_train < cfg.batch_size,
             f"{n_train} training images make no batch of {cfg.batch_size}; lower --batch-size or raise --n-train")]:
        if bad:
            raise UserError(message)
    for name in args.eval + (["apgd-linf"] if args.calibrate and args.alpha_criterion == "adaptive" else []):
        ATTACKS[name](None, state.opts)         # an attack that needs pyautoattack says so now
    if state.train and cfg.select_from is not None:
        import_pyautoattack()
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise UserError("--plot needs matplotlib: pip install matplotlib (or drop --plot; --report keeps the numbers)")


def check_project_flags(args):
    """--project's folders, and the flags that cannot go with it (it evaluates a project as it is); the
    surrogate of --sanity's transfer check."""
    for flag, given in (("--model-file", args.model_file_given), ("--force-train", args.force_train),
                        ("--calibrate", args.calibrate), ("--resume", args.resume)):
        if args.project and given:
            raise UserError(f"--project evaluates a project as it is: drop {flag}")
    for directory in args.project or []:
        if not os.path.isdir(directory):
            raise UserError(f"--project {directory}: no such folder")
    duplicates = {d for d in args.project or [] if (args.project or []).count(d) > 1}
    if duplicates:
        raise UserError(f"--project {sorted(duplicates)[0]} is given twice")
    surrogate = args.surrogate or default_surrogate()
    if args.sanity and not os.path.isfile(surrogate):
        raise UserError(f"--surrogate {surrogate}: no such model file (the transfer check of --sanity crafts on it)")


def flag_warnings(args, state):
    """What is odd but allowed: settings that do nothing, or something else than they seem to."""
    cfg, rows = state.cfg, [ATTACKS[name](None, state.opts) for name in args.eval]
    odd = [(args.steps == 0 and (args.calibrate or args.sanity or args.plot or
                                 any(isinstance(r, PGDAttack) for r in rows)),
            "--steps 0: PGD makes no step, so the PGD rows measure the random start only"),
           (args.n_eval and args.n_eval > SPLIT_SIZES[args.split], f"--n-eval {args.n_eval}: the {args.split} "
            f"split has {SPLIT_SIZES[args.split]:,} images; using all of them"),
           (args.arch is not None and not state.train, f"--arch {args.arch} is ignored: this run does not train, "
            f"and {args.model_file} brings its own architecture"),
           (args.n_val is not None and not state.train, "--n-val is ignored: this run does not train (--n-eval "
            "chooses the images of calibration and evaluation)"),
           (state.train and not args.force_train, f"{args.model_file} does not exist, so this run TRAINS a new model "
            f"from scratch, as if --force-train were given (an estimate of its length follows after the first "
            f"steps); Ctrl-C now if the path is misspelt"),
           (state.train and args.awp_warmup and cfg.awp is None, "--awp-warmup does nothing without --awp"),
           (state.train and cfg.ema and cfg.ema_start == 1,
            "--ema-start 1: the EMA starts at the end of the run and equals the final weights"),
           (state.train and cfg.attack_steps == 0 and cfg.trades is not None,
            "--train-steps 0 with --trades: without an attack TRADES's KL term is 0, so this is natural training"),
           (args.project_timeout != PROJECT_TIMEOUT and not args.project,
            "--project-timeout does nothing without --project"),
           (args.surrogate and not args.sanity, "--surrogate does nothing without --sanity (its transfer check)"),
           (args.eot > 1 and not args.sanity and not any(isinstance(r, (PGDAttack, AdaptiveAttack)) for r in rows),
            "--eot does nothing without a pgd-*, bpda-*, transfer-* or apgd-* row or --sanity"),
           (args.square_queries != SQUARE_QUERIES and not args.sanity and
            not any(isinstance(r, SquareAttack) for r in rows),
            "--square-queries does nothing without a square-* row or --sanity")]
    odd += [(eps == 0 and (any(r.settings.get("norm") == norm for r in rows) or norm == "linf" and state.train),
             f"--eps-{norm} 0: the {norm} rows{' and the training attack' if norm == 'linf' else ''} perturb nothing")
            for norm, eps in state.opts.eps.items()]
    return [message for bad, message in odd if bad]


def _same_file(a, b):
    return os.path.realpath(a) == os.path.realpath(b)


def is_committed_model(path):
    """Is `path` the file Net() loads (relative to here or to this script)?"""
    return any(_same_file(path, p) for p in
               (Net.model_file, os.path.join(os.path.dirname(os.path.abspath(__file__)), Net.model_file)))


def check_writable(flag, path):
    """`path` can be written (by atomic_write, which creates missing folders): one line otherwise."""
    if os.path.isdir(path):
        raise UserError(f"{flag} {path}: is a directory; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise UserError(f"{flag} {path}: {folder} is a file, not a folder")
    try:        # os.access says yes to root on read-only mounts and in /proc: try for real
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write in {folder} ({e.strerror})") from None


@contextlib.contextmanager
def write_lock(target, flag="--model-file"):
    """Holds <target>.lock (an fcntl lock) while this run may write `target` (the model file, --report): a
    second run that would write it stops at once, naming the first. No-op without fcntl (Windows)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = target + ".lock"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not os.path.exists(path) or os.stat(path).st_ino != os.fstat(f.fileno()).st_ino:
                raise BlockingIOError       # its holder finished and removed it just now: a race, not ours
        except BlockingIOError:
            f.seek(0)
            raise UserError(f"{target} is being written by another run ({f.read().strip() or 'another process'}); "
                            f"wait for it to end or give this one another {flag}") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)}")
        f.flush()
        try:
            yield
        finally:
            os.unlink(path)     # before the lock is released, so that no one locks a file about to vanish


def _check_committed_model(args, state):
    """The file Net() loads is written only by a full-size run of Net's architecture, or when named."""
    smoke = [flag for flag, given in (("--n-train", state.cfg.n_train is not None),
                                      ("--n-val", state.train and state.cfg.n_val is not None),
                                      ("--n-eval", args.calibrate and args.n_eval is not None),
                                      ("--steps", args.calibrate and args.steps < EVAL_STEPS),
                                      ("--apgd-iters", args.calibrate and args.apgd_iters < APGD_ITERS)) if given]
    if smoke and not args.model_file_given:
        raise UserError(f"{smoke[0]} makes a smoke run: name its output with --model-file (the default, "
                        f"{args.model_file}, is the committed model)")
    if state.train and parse_arch(state.cfg.arch) != parse_arch(DEFAULT_ARCH):
        raise UserError(f"--arch {state.cfg.arch}: {args.model_file} is the file Net() loads (a WRN-{DEFAULT_ARCH}), "
                        f"which the grader and test_project.py need; pass --model-file for another architecture")


def prepare_outputs(args, state, locks):
    """Every check of what this run writes, once, before any work: each output can be written and is no
    other output, nor the model read, nor a file of another kind; the committed model is safe; then the
    locks (held in the ExitStack `locks` until the run ends); then training's checkpoint, which only
    --resume continues."""
    checkpoint, writes = args.model_file + ".ckpt", state.writes_model
    outputs = ([("--model-file", args.model_file), ("backup", args.model_file + ".prev")] if writes else []) \
        + ([("checkpoint", checkpoint)] if state.train else []) \
        + ([("calibration progress", progress_file(args.model_file))] if args.calibrate else []) \
        + [(flag, path) for flag, path in (("--report", args.report), ("--plot", args.plot)) if path] \
        + ([("backup", args.report + ".prev")] if args.report else [])
    for i, (flag, path) in enumerate(outputs):
        check_writable(flag, path)
        for other_flag, other in outputs[:i] + ([] if writes else [("--model-file", args.model_file)]):
            if _same_file(path, other):
                raise UserError(f"{flag} {path} is the same file as {other_flag} {other}; writing it would "
                                f"destroy that one: give another name")
    report = read_json(args.report) if args.report and os.path.exists(args.report) else {"results": {}}
    if not (isinstance(report, dict) and any(isinstance(report.get(k), dict) for k in ("results", "projects"))):
        raise UserError(f"--report {args.report}: exists and is not a report of model.py; give another name")
    if args.plot and os.path.isfile(args.plot):
        with open(args.plot, "rb") as f:
            if not f.read(8).startswith(PLOT_FORMATS[os.path.splitext(args.plot)[1][1:].lower()]):
                raise UserError(f"--plot {args.plot}: exists and is not such an image; give another name")
    if writes and is_committed_model(args.model_file):
        _check_committed_model(args, state)
    for target, flag in ((args.model_file, "--model-file") if writes else (None, None), (args.report, "--report")):
        if target and state.rank == 0:  # two runs rewriting one file (a report after every batch) would mix them
            locks.enter_context(write_lock(target, flag))
    if state.train and args.resume and not os.path.isfile(checkpoint):
        raise UserError(f"--resume: no checkpoint {checkpoint}; run without --resume to start")
    if state.train and not args.resume and os.path.isfile(checkpoint):
        written = time.strftime("%Y-%m-%d %H:%M", time.localtime(os.path.getmtime(checkpoint)))
        raise UserError(f"{checkpoint} holds an unfinished training run (written {written}): add --resume to "
                        f"continue it, or delete it to start over")


def apgd_cost_note(args, state, reports):
    """A note before APGD work (apgd-* and aa-* rows of each of `reports`, one per model or project, the
    adaptive calibration) that would take a CPU more than LONG_CPU_WORK seconds: a GPU job, and the flags
    that make it smaller. What the reports or the calibration's progress have finished is not counted."""
    n, seconds, images = images_of(args.split, args.n_eval), 0.0, 0
    for report, name in ((report, name) for report in reports for name in args.eval):
        attack = ATTACKS[name](None, state.opts)
        old, _ = report.reusable(name, attack, n, "cpu")
        left = n if old is None else 0 if old.get("complete", True) else n - old["n_done"]
        seconds, images = seconds + attack.cpu_seconds() * left, images + (left if attack.cpu_seconds() else 0)
    if args.calibrate and args.alpha_criterion == "adaptive":
        rows = (read_json(progress_file(args.model_file)) or {}).get("results") or {}
        done = {name for name, row in rows.items() if isinstance(row, dict) and row.get("complete", True)}
        swept = sum(f"alpha {a:g} apgd-linf" not in done for a in args.alpha_grid) * images_of("val", args.n_eval)
        seconds, images = seconds + ATTACKS["apgd-linf"](None, state.opts).cpu_seconds() * swept, images + swept
    if seconds <= LONG_CPU_WORK:
        return None
    return (f"note: this run attacks {images:,} images with APGD (each alpha of the adaptive calibration, each "
            f"apgd-*/aa-* row): about {_duration(seconds)} on a 2-core CPU, a GPU job; --n-eval, --alpha-grid "
            f"and --apgd-iters make it smaller")


def save_model(model, args, state, meta, log, what):
    """Write the model file (the one from before this run kept once as .prev); `what` this run has saved."""
    if state.saved is None and os.path.isfile(args.model_file):
        keep_previous(args.model_file, log)
    model.save(args.model_file, meta)
    state.saved = what
    log(f"saved {args.model_file}" + (" (calibrated)" if what == "calibrated" else ""))


def train_model(args, state, data, log):
    """Train, save the model file, and return the model as the file holds it (float16 weights): what is
    calibrated and evaluated next is what was saved. None on a rank other than 0."""
    cfg, checkpoint = state.cfg, args.model_file + ".ckpt"
    if state.device.type == "cpu" and cfg.n_train is None:
        log("note: training on the CPU takes days; use a GPU, or --n-train/--arch for a smoke run")
    if state.world_size > 1:
        torch.distributed.init_process_group("nccl" if state.device.type == "cuda" else "gloo")
    train_set, val_set = data("train"), data("val")
    state.stage = "training"
    torch.manual_seed(cfg.seed)        # the initial weights: the same command gives the same model
    model, info = train(build_model(cfg.arch).to(state.device), train_set, val_set, cfg, device=state.device,
                        checkpoint_path=checkpoint, resume=args.resume, log=log)
    if state.world_size > 1:
        torch.distributed.destroy_process_group()
        if state.rank != 0:
            return None
    # saved before calibration and evaluation: an interruption from here on keeps the trained weights
    save_model(model, args, state, {"training": info}, log, "trained")
    if os.path.exists(checkpoint):
        os.unlink(checkpoint)      # the model file now holds everything the checkpoint did
    return load_model(args.model_file, state.device)


def calibrate_model(model, args, state, data, batch_size, log):
    """MeanSparse statistics (or the file's) and the alpha chosen on the validation split, saved."""
    val = tuple(t[:args.n_eval] for t in data("val"))
    if args.reuse_statistics and "calibration" not in model.meta:
        raise UserError(f"--reuse-statistics: {args.model_file} has no MeanSparse statistics yet; drop the flag")
    stats_set = None if args.reuse_statistics else tuple(t[:state.cfg.n_train] for t in data("train"))
    n_train = model.meta["calibration"].get("n_train") if stats_set is None else len(stats_set[1])
    log(f"calibrating MeanSparse: {'the file' if stats_set is None else 'new'} statistics on {n_train} training "
        f"images, alpha sweep on {len(val[1])} validation images")
    state.stage = "calibrating"
    stats = None if stats_set is None else Batches(*stats_set, batch_size, device=state.device)
    alpha, sweep = calibrate(model, stats, Batches(*val, batch_size, device=state.device), args.alpha_grid, state.opts,
                             criterion=args.alpha_criterion, log=log, progress_path=progress_file(args.model_file))
    calibration = {"alpha": alpha, "criterion": args.alpha_criterion, "steps": args.steps, "eps": args.eps_linf,
                   "apgd_iters": args.apgd_iters if args.alpha_criterion == "adaptive" else None,
                   "n_train": n_train, "n_val": len(val[1]), "sweep": sweep}
    save_model(model, args, state, {**model.meta, "calibration": calibration}, log, "calibrated")
    if os.path.exists(progress_file(args.model_file)):
        os.unlink(progress_file(args.model_file))     # the model file now holds the sweep


def apply_alpha(model, args, name):
    """--alpha: MeanSparse's threshold for this run only (`name`: the model file or project, for messages)."""
    calibrated = getattr(model, "meta", {}).get("calibration", {}).get("sweep")
    if args.alpha > 0 and not calibrated:
        raise UserError(f"{name}: has no MeanSparse statistics of this tool; run --calibrate first")
    largest = max((row["alpha"] for row in calibrated or []), default=0.0)
    if args.alpha > largest:
        warn(f"--alpha {args.alpha:g} is above the largest calibrated value ({largest:g}): MeanSparse will "
             f"replace most activations by their channel means")
    set_alpha(model, args.alpha)


def default_surrogate():
    """The committed model beside this script: the transfer check's surrogate unless --surrogate names one."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), Net.model_file)


def failure_checks(model, args, state, batches, log):
    """The attack-failure checks of an evaluation, logged: those that attack nothing after every robustness
    evaluation, all of them with --sanity. Returns the report's record of them."""
    x, y = next(iter(batches))
    seen, figures = quick_checks(model, x[:QUICK_CHECK_IMAGES], y[:QUICK_CHECK_IMAGES]), {}
    if args.sanity:
        more, figures = attack_checks(model, batches, state.opts,
                                      load_model(args.surrogate or default_surrogate(), state.device))
        seen.update(more)
    log_checks(seen, log, args.sanity)
    return {"fired": {k: v for k, v in seen.items() if v}, "passed": [k for k, v in seen.items() if not v],
            **figures}


def evaluate_model(model, args, state, data, report, log):
    """Every row of --eval, then --sanity and --plot's curves, into the report; a run that trained or
    calibrated also records the figures in the model file."""
    images, labels = (t[:args.n_eval] for t in data(args.split))
    batches = Batches(images, labels, report.data["eval_batch_size"], device=state.device)
    state.stage = "evaluating"
    evaluate_rows(model, args.eval, report, batches, state.opts, log)
    if "natural" in report.rows:
        print(f"Model natural accuracy ({args.split}): {report.rows['natural']['accuracy']:.2f}")
    if args.sanity or set(args.eval) - {"natural"}:
        report.data["checks"] = failure_checks(model, args, state, batches, log)
    if args.plot:
        report.data["curves"] = robustness_curves(model, batches, state.opts)
    if state.saved:
        report.data.update({part: model.meta[part] for part in ("training", "calibration") if part in model.meta})
        if args.alpha is None:      # the figures of the file as saved, without the per-image records
            results = {name: {k: v for k, v in row.items() if k != "per_image"} for name, row in report.rows.items()}
            model.save(args.model_file, {**model.meta, "evaluation": {
                "split": args.split, "n": len(labels), "alpha": get_alpha(model), "results": results}})
    report.save(finished=True)
    if args.plot:
        name = report.data.get("project") or model.arch_name
        plot_report(report.data, args.plot, f"{name}, alpha {get_alpha(model):g}, n={len(labels)}")
        log(f"wrote {args.plot}")
    if args.report:
        log(f"wrote {args.report}")
    return not (args.sanity and report.data["checks"]["fired"])


def open_report(args, state, model, log, source, path, saved=None, sink=None):
    """The evaluation's report of the model from `source` ({"model_file": path, "model_sha256": ...} or
    {"project": folder, "project_sha256": ...}), continued from the file at `path` (or `saved`, a project's
    part of a comparison) when that was made with the same model, split, images, seed and alpha (then with
    its batch size, unless --eval-batch-size says otherwise). `sink`: see Report.open."""
    saved = read_json(path) if path else saved
    batch_size = args.eval_batch_size or isinstance(saved, dict) and saved.get("eval_batch_size") or (
        GPU_EVAL_BATCH if state.device.type == "cuda" else CPU_BATCH)
    header = {**source, "split": args.split, "n": images_of(args.split, args.n_eval), "alpha": get_alpha(model),
              "seed": state.cfg.seed, "eval_batch_size": batch_size, "device": device_name(state.device),
              "precision": precision(state.device), "torch": torch.__version__, "command": state.command}
    fingerprint = next(k for k in source if k.endswith("sha256"))
    return Report.open(path, header, (fingerprint, "split", "n", "seed", "alpha"), log, saved=saved, sink=sink,
                       required=args.resume and not state.train, model_file=source.get("model_file"))


def project_worker(conn, directory, args, state, saved, threads):
    """One --project in a process of its own: load it, evaluate it as a --model-file is evaluated, and send
    its report after every batch ("report", data), then ("done", checks passed) or ("error", one line)."""
    from tqdm import tqdm
    torch.set_num_threads(threads)     # the parent's: the same arithmetic as a --model-file run there
    log = tqdm.write
    state.opts = dataclasses.replace(state.opts, log=log)
    try:
        with true_float32():
            model, fingerprint = load_project(directory, state.device)
            if any(m.training for m in model.modules()):
                log(f"note: {directory} leaves its model in train mode; it is measured so, as the platform would")
            if args.alpha is not None:
                apply_alpha(model, args, directory)
            data = functools.lru_cache(maxsize=None)(functools.partial(load_cifar10, resolve_data_dir(args.data_dir)))
            report = open_report(args, state, model, log, {"project": directory, "project_sha256": fingerprint},
                                 None, saved, sink=lambda part: conn.send(("report", part)))
            passed = evaluate_model(model, args, state, data, report, log)
        sys.stdout.flush()
        conn.send(("done", passed))
    except KeyboardInterrupt:
        pass
    except BaseException as e:      # the project's own code may raise anything, SystemExit included
        first = (str(e).strip().splitlines() or [""])[0][:300]
        conn.send(("error", first if isinstance(e, UserError) else f"{e.__class__.__name__}: {first}"))


def run_project(directory, args, state, saved, send):
    """Run one project's worker within --project-timeout seconds; `send(data)` gets its report as it comes.
    Returns (checks passed, None) or (False, what went wrong)."""
    context = multiprocessing.get_context("spawn")     # a fresh interpreter: nothing of this one leaks in
    receive, conn = context.Pipe(duplex=False)
    worker = context.Process(target=project_worker, daemon=True,
                             args=(conn, directory, args, state, saved, torch.get_num_threads()))
    worker.start()
    conn.close()
    deadline = time.monotonic() + args.project_timeout
    try:
        while (left := deadline - time.monotonic()) > 0:
            if not receive.poll(min(left, 1.0)):
                continue
            try:
                kind, value = receive.recv()
            except EOFError:
                worker.join(10)
                return False, f"its process ended (exit status {worker.exitcode}) before it finished"
            if kind == "report":
                send(value)
            else:
                worker.join(30)
                return (value, None) if kind == "done" else (False, value)
        return False, f"still running after --project-timeout {args.project_timeout:g} s: stopped"
    finally:
        if worker.is_alive():
            worker.kill()
        worker.join()


def comparison_table(projects, rows):
    """Per project and row of `rows`: the accuracy with its standard error and, after the first project
    measured, the paired difference from it on the same images; or the project's error."""
    table, first = {}, None
    for label, part in projects.items():
        results, cells = part.get("results") or {}, {}
        for name in rows:
            row = results.get(name)
            if not isinstance(row, dict) or not row.get("complete", True):
                continue
            outcomes = per_image_bools(row["per_image"])
            p = float(outcomes.double().mean())
            cells[name] = {"accuracy": row["accuracy"], "se": 100 * math.sqrt(p * (1 - p) / len(outcomes))}
            if first and name in first and len(first[name]) == len(outcomes):
                cells[name]["diff"], cells[name]["diff_se"] = paired_gain(outcomes, first[name])
        if first is None and cells:
            first = {name: per_image_bools(results[name]["per_image"]) for name in cells}
        table[label] = {"rows": cells, "error": part.get("error"),
                        "checks_fired": sorted(((part.get("checks") or {}).get("fired") or {}))}
    return table


def log_table(table, rows, log):
    """The comparison as text: a line per project, a column per row, then the checks that fired."""
    width = max(len("project"), *(len(label) for label in table))
    log(f"{'project':{width}s}  " + "".join(f"{name:34s}" for name in rows) + "checks fired")
    for label, entry in table.items():
        cells = [entry["rows"].get(name) for name in rows]
        text = ["-" if c is None else f"{c['accuracy']:6.2f} +- {c['se']:4.2f}" + (
            f" ({c['diff']:+6.2f} +- {c['diff_se']:4.2f})" if "diff" in c else "") for c in cells]
        log(f"{label:{width}s}  " + "".join(f"{t:34s}" for t in text) + (", ".join(entry["checks_fired"])
            or ("-" if entry["error"] else "none")) + (f"  error: {entry['error']}" if entry["error"] else ""))
    log("(accuracy % +- its standard error; in brackets the paired difference from the first project)")


def compare_projects(args, state, log):
    """Every --project in a process of its own, one after the other, into one report (--report, rewritten as
    each sends its part; the same command continues it), then the table of projects against rows and
    --plot's figure of it. Exit status 0 when every project was measured (and, with --sanity, passed)."""
    saved = read_json(args.report) or {}
    old = saved.get("projects") if isinstance(saved.get("projects"), dict) else {}
    if args.report and os.path.isfile(args.report) and not old:
        keep_previous(args.report, log)     # another kind of report: kept, not overwritten
    if state.device.type == "cpu" and (note := apgd_cost_note(
            args, state, [Report(None, {}, (old.get(d) or {}).get("results")) for d in args.project])):
        log(note)
    load_cifar10(resolve_data_dir(args.data_dir), args.split)      # missing data stops all projects: say so once
    data = {"command": state.command, "complete": False, "projects": {}}

    def write():
        if args.report:
            atomic_write(args.report, lambda f: f.write(json.dumps(data, indent=2).encode()))

    child = argparse.Namespace(**{**vars(args), "report": None, "plot": args.plot if len(args.project) == 1 else None})
    state.stage, measured = "evaluating", True
    for i, directory in enumerate(args.project):
        log(f"project {i + 1} of {len(args.project)}: {directory}")
        passed, error = run_project(directory, child, dataclasses.replace(state, opts=dataclasses.replace(
            state.opts, log=print)), old.get(directory), lambda part: data["projects"].update({directory: part})
            or write())
        if error:
            data["projects"][directory] = {**data["projects"].get(directory, {}), "error": error}
            log(f"{directory}: error: {error}")
        measured = measured and error is None and passed
        write()
    data["table"] = comparison_table(data["projects"], args.eval)
    data["complete"] = all(part.get("complete") and not part.get("error") for part in data["projects"].values())
    write()
    log_table(data["table"], args.eval, log)
    if args.plot and len(args.project) > 1:
        plot_comparison(data["table"], args.eval, args.plot)
        log(f"wrote {args.plot}")
    return 0 if measured else 1


def execute(args, state):
    """The run, step by step: train or load, calibrate, set --alpha, evaluate. Returns the exit status."""
    log = lambda *a, **k: None      # noqa: E731 -- a rank other than 0 says nothing
    if state.rank == 0:
        from tqdm import tqdm
        log = tqdm.write            # lines between the progress bars
    state.opts = dataclasses.replace(state.opts, log=log)
    data = functools.lru_cache(maxsize=None)(functools.partial(load_cifar10, resolve_data_dir(args.data_dir)))
    batch_size = args.eval_batch_size or (GPU_EVAL_BATCH if state.device.type == "cuda" else CPU_BATCH)
    if args.project:
        return compare_projects(args, state, log)
    rows = (read_json(args.report) or {}).get("results")
    if state.device.type == "cpu" and (note := apgd_cost_note(args, state, [Report(None, {}, rows)])):
        log(note)
    model = train_model(args, state, data, log) if state.train else load_model(args.model_file, state.device)
    if model is None:
        return 0
    model.eval().to(memory_format=torch.channels_last)     # faster convolutions on GPUs and CPUs alike
    with true_float32():
        if args.calibrate:
            calibrate_model(model, args, state, data, batch_size, log)
        if args.alpha is not None:
            apply_alpha(model, args, args.model_file)
        source = {"model_file": args.model_file, "model_sha256": file_sha256(args.model_file)}
        report = open_report(args, state, model, log, source, args.report)
        return 0 if evaluate_model(model, args, state, data, report, log) else 1


def interrupt_message(args, state):
    """What an interrupted run kept, and the command that continues it without redoing what is saved."""
    if args is None or state is None:
        return "interrupted"
    checkpoint, progress = args.model_file + ".ckpt", progress_file(args.model_file)
    if state.stage == "training":
        return (f"interrupted; training keeps its last finished epoch in {checkpoint}: repeat the command with "
                f"--resume (or make a model file of it now: python3 bench/rescue.py {checkpoint} OUT.pth)"
                if os.path.exists(checkpoint) else
                "interrupted in the first epoch, before any checkpoint: nothing was kept, the same command starts over")
    rerun = ("the same command" if not state.saved else "the command without --force-train" if
             state.saved == "trained" else "the command without --force-train or --calibrate")
    if state.stage == "calibrating" and os.path.exists(progress):
        return f"interrupted; the calibration keeps what it finished in {progress}: run {rerun} to continue"
    if state.stage == "evaluating" and args.report:
        return f"interrupted: the rows finished so far are in {args.report}, marked incomplete; run {rerun} to continue"
    if state.saved:
        return f"interrupted; {args.model_file} holds the {state.saved} model: run {rerun} to continue"
    return "interrupted"


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    signal.signal(signal.SIGTERM, _raise_interrupt)    # SIGTERM stops as cleanly as Ctrl-C
    args = state = None
    try:
        args = parse_args(argv)
        state = plan(args, argv)
        with contextlib.ExitStack() as locks:
            prepare_outputs(args, state, locks)
            return execute(args, state)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{interrupt_message(args, state)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
