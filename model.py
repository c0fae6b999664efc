#!/usr/bin/env python3
"""Adversarially robust CIFAR-10: a WideResNet with MeanSparse, PGD training and honest evaluation.

One file, read top to bottom: config -> data -> model -> attacks -> training -> MeanSparse calibration
-> evaluation -> CLI. Nothing runs on import.

Examples
    ./model.py                                     # natural accuracy of models/default_model.pth (test)
    ./model.py --eval natural,pgd-linf,bpda-linf --n-eval 1000 --report r.json
    ./model.py --eval apgd-linf,apgd-l2            # the adaptive evaluation (APGD worst case): a GPU job
    ./model.py --calibrate --model-file copy.pth   # MeanSparse statistics + alpha chosen on validation
    ./model.py --force-train --time-budget 7 --calibrate --eval natural,pgd-linf,bpda-linf
    ./model.py --force-train --time-budget 8.5 --trades 6 --awp 5e-3 --train-steps 2 --train-step-size 8/255 \
        --eps-ramp 1 --ema 0.995 --ema-start 0.75 --select-from 0.5 --model-file new.pth
    torchrun --nproc_per_node=2 model.py --force-train -e 30

The grading platform imports this file, builds `Net()`, calls `net.load_for_testing(project_dir)` and
feeds [0,1] images (normalisation happens inside the model).
"""
import argparse
import base64
import contextlib
import copy
import dataclasses
import hashlib
import importlib.util
import json
import logging
import math
import os
import pickle
import shutil
import signal
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

# ----------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)     # training-set channel mean of [0,1] pixels
CIFAR10_STD = (0.2470, 0.2435, 0.2616)      # training-set channel std of [0,1] pixels
NUM_CLASSES = 10
NUM_VAL = 1024                              # training images 0..1023: validation, never trained on
CROP_PAD = 4                                # pixels of zero padding for the random crop
DEFAULT_DATA_DIR = "./data"
DEFAULT_ARCH = "28-4"                       # depth-widen factor of Net()
FILE_FORMAT = "wrn-meansparse/1"            # tag stored in every model file

EPS_LINF = 8 / 255                          # L-inf radius in [0,1] pixel units
EPS_L2 = 0.5                                # L2 radius in [0,1] pixel units
EVAL_STEPS = 20                             # PGD steps of an evaluation attack
VAL_PGD_STEPS = 10                          # PGD steps of the validation check during training
ALPHA_GRID = "0,0.05,0.1,0.15,0.2,0.25,0.3,0.35,0.4"
CLEAN_DROP_LIMIT = 0.5                      # points of clean accuracy an alpha may cost (calibration)
SIGNIFICANCE = 2.0                          # standard errors by which an alpha > 0 must beat alpha 0 (adaptive)
PLOT_EPS = {"linf": [e / 255 for e in (0, 2, 4, 6, 8, 10, 12, 16)],
            "l2": [0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]}
SANITY_EPS_LINF = [e / 255 for e in (0, 4, 8, 16, 32, 64)]   # the last one must break every image
SANITY_STEPS_FACTOR = 5
STEADY_STEP = 5                             # training steps before timing (cudnn autotuning, compilation)
SELECT_IMAGES = 512                         # validation images of each weight-selection APGD check
SELECT_ITERS = 50                           # APGD iterations of each of its two attacks
APGD_ITERS = 100                            # APGD iterations of the adaptive evaluation (AutoAttack's)
APGD_CPU_SECONDS = {"linf": 8.5, "l2": 10.0}  # per image and APGD worst case (100 iterations) on a 2-core
                                            # CPU, measured over the first 1,000 test images at alpha 0:
                                            # results/apgd_{linf,l2}_test1000_alpha0_cpu.json (8,546 s, 9,955 s)
CPU_BATCH = 64                              # images per forward pass on the CPU in eval mode: beyond ~64
                                            # a WRN-28-4's activations outgrow malloc's heap (page faults)
GPU_EVAL_BATCH = 512                        # default evaluation batch on CUDA


class UserError(Exception):
    """A problem the user can fix (a flag, a file, the data): reported as one line, exit status 2."""


class TrainingError(Exception):
    """Training cannot go on (a NaN loss, say): reported as one line, exit status 1."""


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------
def resolve_data_dir(data_dir=None):
    """--data-dir, else $CIFAR10_DIR, else ./data."""
    return data_dir or os.environ.get("CIFAR10_DIR") or DEFAULT_DATA_DIR


def _read_batches(folder, names):
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
    "val" (training images 0..1023) or "test" (the 10,000 test images), in the official order."""
    if split not in ("train", "val", "test"):
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
    """

    def __init__(self, images, labels, batch_size, *, device, train=False, generator=None,
                 rank=0, world_size=1, channels_last=False):
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.batch_size, self.train, self.generator = batch_size, train, generator
        self.rank, self.world_size, self.channels_last = rank, world_size, channels_last

    def __len__(self):
        if self.train:
            return (len(self.labels) // self.world_size) // self.batch_size
        return math.ceil(len(self.labels) / self.batch_size)

    def after(self, k):
        """The same batches of the images after the first k (an interrupted evaluation continues there)."""
        return Batches(self.images[k:], self.labels[k:], self.batch_size, device=self.images.device,
                       channels_last=self.channels_last)

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


def meansparse_modules(model):
    return [m for m in model.modules() if isinstance(m, MeanSparse)]


@contextlib.contextmanager
def _meansparse_mode(model, mode):
    modules = meansparse_modules(model)
    before = [m.mode for m in modules]
    for m in modules:
        m.mode = mode
    try:
        yield model
    finally:
        for m, b in zip(modules, before):
            m.mode = b


def bpda(model):
    """Straight-through (BPDA) gradients through every MeanSparse of `model` inside the block: the mask
    in the forward pass, the identity in the backward pass."""
    return _meansparse_mode(model, "bpda")


def bypassed(model):
    """Every MeanSparse of `model` is the identity inside the block. Training uses it: before calibration
    alpha is 0 anyway, and skipping the masks' elementwise passes makes each step faster."""
    return _meansparse_mode(model, "off")


def get_alpha(model):
    modules = meansparse_modules(model)
    return round(float(modules[0].alpha), 6) if modules else 0.0    # float32 buffer: 0.35 reads 0.3499999


def set_alpha(model, alpha):
    for m in meansparse_modules(model):
        m.alpha.fill_(alpha)


@contextlib.contextmanager
def alpha_set_to(model, alpha):
    """MeanSparse threshold `alpha` on every module inside the block, the old values after it."""
    modules = meansparse_modules(model)
    before = [m.alpha.clone() for m in modules]
    set_alpha(model, alpha)
    try:
        yield model
    finally:
        for m, b in zip(modules, before):
            m.alpha.copy_(b)


class BasicBlock(nn.Module):
    """Pre-activation block: BN -> MeanSparse -> ReLU -> conv, twice, plus the shortcut."""

    def __init__(self, in_planes, out_planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.sparse1 = MeanSparse(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.sparse2 = MeanSparse(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equal_in_out = in_planes == out_planes and stride == 1
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, 0,
                                                                     bias=False)

    def forward(self, x):
        o = self.relu1(self.sparse1(self.bn1(x)))
        shortcut = x if self.equal_in_out else self.convShortcut(o)
        out = self.conv2(self.relu2(self.sparse2(self.bn2(self.conv1(o)))))
        return out + shortcut


class NetworkBlock(nn.Module):
    def __init__(self, num_layers, in_planes, out_planes, stride):
        super().__init__()
        self.layer = nn.Sequential(*[BasicBlock(in_planes if i == 0 else out_planes, out_planes,
                                                stride if i == 0 else 1) for i in range(num_layers)])

    def forward(self, x):
        return self.layer(x)


def parse_arch(text):
    """"28-4" -> (28, 4); depth must be 6n + 4."""
    try:
        depth, width = (int(v) for v in str(text).split("-"))
    except ValueError:
        raise UserError(f"--arch {text!r}: expected DEPTH-WIDTH such as 28-4") from None
    if depth < 10 or (depth - 4) % 6 or width < 1:
        raise UserError(f"--arch {text!r}: depth must be 6n+4 (10, 16, 22, 28, 34, ...) and width >= 1")
    return depth, width


class InputLayout(torch.autograd.Function):
    """The input in the layout of the model's weights (channels_last is faster on CPUs and GPUs); its
    gradient goes back in the input's own layout, contiguous. Without it a channels_last model hands an NCHW
    caller a channels_last-strided gradient, and the textbook L2 step `grad.view(n, -1)` fails on it."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.layout = torch.channels_last if x.dim() == 4 and not x.is_contiguous() and \
            x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        layout = torch.channels_last if weight.is_contiguous(memory_format=torch.channels_last) and \
            not weight.is_contiguous() else torch.contiguous_format
        return x.contiguous(memory_format=layout).view_as(x) if x.dim() == 4 else x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous(memory_format=ctx.layout), None


class WideResNet(nn.Module):
    """WideResNet (RobustBench names) with a MeanSparse before every ReLU; takes [0,1] images."""

    def __init__(self, depth, widen_factor, num_classes=NUM_CLASSES):
        super().__init__()
        n = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.arch = {"depth": depth, "widen_factor": widen_factor, "num_classes": num_classes}
        self.meta = {}
        self.register_buffer("input_mean", torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(CIFAR10_STD).view(1, 3, 1, 1), persistent=False)
        self.conv1 = nn.Conv2d(3, channels[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.sparse = MeanSparse(channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(channels[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = InputLayout.apply(x, self.conv1.weight)
        if x.device.type == "cpu" and not self.training and len(x) > CPU_BATCH:
            # In eval mode every image is independent of the others, so splitting changes nothing but the
            # speed: on the CPU small batches are much faster (bench/cpu_eval.py)
            return torch.cat([self._forward(chunk) for chunk in x.split(CPU_BATCH)])
        return self._forward(x)

    def _forward(self, x):
        out = self.conv1((x - self.input_mean) / self.input_std)
        out = self.block3(self.block2(self.block1(out)))
        out = self.relu(self.sparse(self.bn1(out)))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))

    @property
    def arch_name(self):
        return f"WRN-{self.arch['depth']}-{self.arch['widen_factor']}"

    def save(self, path, meta=None):
        """Write weights (float16) and buffers (float32) with metadata, atomically."""
        if meta is not None:
            self.meta = dict(meta)
        params = {name for name, _ in self.named_parameters()}
        state = {k: (v.detach().half() if k in params else v.detach().float() if v.is_floating_point()
                     else v.detach()).cpu().contiguous()
                 for k, v in self.state_dict().items()}
        atomic_save({"format": FILE_FORMAT, "arch": dict(self.arch), "alpha": get_alpha(self),
                     "meta": self.meta, "state_dict": state}, path)

    def load(self, path, payload=None):
        """Load a file written by `save` (or a plain state dict) onto this net's device, as float32.
        `payload`: the file as read_model_file already returned it (saves reading it twice)."""
        payload = read_model_file(path) if payload is None else payload
        arch = payload.get("arch")
        if arch is not None and dict(arch) != self.arch:
            raise UserError(f"{path}: holds a WRN-{arch['depth']}-{arch['widen_factor']}, this network is a "
                            f"{self.arch_name}; pass the file as --model-file (which rebuilds its "
                            f"architecture) or retrain with --force-train")
        state = {k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
        try:
            result = self.load_state_dict(state, strict=False)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[-1].strip()
            raise UserError(f"{path}: weights do not fit a {self.arch_name} ({first}); "
                            f"use the file's own architecture or retrain with --force-train") from None
        if result.missing_keys or result.unexpected_keys:
            bad = (result.missing_keys or result.unexpected_keys)[:3]
            raise UserError(f"{path}: not a {self.arch_name} with MeanSparse ({len(result.missing_keys)} "
                            f"missing, {len(result.unexpected_keys)} unexpected entries, e.g. {bad}); "
                            f"retrain with --force-train")
        self.meta = dict(payload.get("meta") or {})
        return self


class Net(WideResNet):
    """The graded model: WRN-28-4 with MeanSparse. `Net()` takes no arguments."""
    model_file = "models/default_model.pth"

    def __init__(self):
        super().__init__(*parse_arch(DEFAULT_ARCH))

    def load_for_testing(self, project_dir="./"):
        """Load the committed weights and leave the model in eval mode (the platform's entry point), in
        the channels_last layout, the faster one on CPUs and GPUs; inputs may be in either layout."""
        self.load(os.path.join(project_dir, Net.model_file))
        self.to(memory_format=torch.channels_last)
        self.eval()
        return self


def build_model(arch=DEFAULT_ARCH):
    depth, width = parse_arch(arch) if isinstance(arch, str) else (arch["depth"], arch["widen_factor"])
    return Net() if (depth, width) == parse_arch(DEFAULT_ARCH) else WideResNet(depth, width)


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


def _torch_load(path, what):
    """torch.load(weights_only=True) of a model file or checkpoint; any failure is one line naming the file
    and what is wrong with it."""
    if os.path.isdir(path):
        raise UserError(f"{path}: is a directory, not a {what}")
    try:
        with warnings.catch_warnings():     # torch warns about pickle protocols before failing: one line only
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:          # a damaged file can make the unpickler raise almost anything
        with open(path, "rb") as f:
            head = f.read(2)
        if head == b"PK":               # torch.save's zip archive
            reason = f"a damaged or truncated torch.save archive ({e.__class__.__name__})"
        elif head[:1] == b"\x80" and "Weights only load failed" in str(e):
            reason = "it holds Python objects besides tensors, which this tool does not unpickle"
        elif head[:1] == b"\x80":        # a pickle (torch's legacy format)
            reason = f"a damaged pickle ({e.__class__.__name__})"
        else:
            reason = "not written by torch.save (a text file, or another format)"
        raise UserError(f"{path}: not a readable {what}: {reason}") from None


def _model_file_problem(payload):
    """What is wrong with the structure of a loaded model file (None if nothing), checked before any
    tensor is used."""
    if not isinstance(payload, dict) or not payload:
        return f"holds a {type(payload).__name__}, not a dict with a state_dict"
    state = payload.get("state_dict", payload)
    if not isinstance(state, dict) or not state:
        return "its state_dict is not a non-empty dict"
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            return (f"state_dict entry {key!r} is of type {type(value).__name__}, not a tensor" if "state_dict" in
                    payload else "holds neither a state_dict entry nor only tensors")
    arch = payload.get("arch")
    if arch is not None:
        if (not isinstance(arch, dict) or not all(isinstance(arch.get(k), int) and not isinstance(arch.get(k), bool)
                                                  for k in ("depth", "widen_factor", "num_classes"))):
            return f"its arch {arch!r} is not a dict of integers depth, widen_factor, num_classes"
        if arch["num_classes"] != NUM_CLASSES or arch["depth"] < 10 or (arch["depth"] - 4) % 6 \
                or arch["widen_factor"] < 1:
            return f"its arch {arch} is no CIFAR-10 WideResNet (depth 6n+4, width >= 1, 10 classes)"
    if not isinstance(payload.get("meta") or {}, dict):
        return f"its meta is a {type(payload['meta']).__name__}, not a dict"
    return None


def read_model_file(path):
    """The payload of a model file as a dict with "state_dict" (a plain state dict is wrapped), its
    structure checked."""
    if not os.path.exists(path):
        raise UserError(f"{path}: no such model file; check the path, or train one with "
                        f"./model.py --force-train --model-file {path}")
    payload = _torch_load(path, "model file")
    problem = _model_file_problem(payload)
    if problem:
        raise UserError(f"{path}: not a model file of this tool: {problem}; restore it or retrain with "
                        f"--force-train")
    return payload if "state_dict" in payload else {"state_dict": payload}


def load_model(path, device="cpu"):
    """Build the architecture recorded in `path` (WRN-28-4 for a plain state dict) and load it."""
    payload = read_model_file(path)
    model = build_model(payload.get("arch") or DEFAULT_ARCH).to(device)
    return model.load(path, payload).eval()


def read_json(path):
    """The JSON value in `path`, or None where it cannot be read or parsed."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ----------------------------------------------------------------------------------------------------
# Attacks
# ----------------------------------------------------------------------------------------------------
def _per_example_norm(t):
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def _random_start(x, norm, eps, generator):
    if norm == "linf":
        return torch.empty_like(x).uniform_(-eps, eps, generator=generator)
    direction = torch.empty_like(x).normal_(generator=generator)
    radius = torch.empty(len(x), device=x.device).uniform_(0, 1, generator=generator)
    radius = eps * radius.pow(1 / x[0].numel()).view(-1, *([1] * (x.dim() - 1)))   # uniform in the ball
    return direction / _per_example_norm(direction) * radius


def _ascent_direction(grad, norm):
    return grad.sign() if norm == "linf" else grad / _per_example_norm(grad)


def _project(delta, norm, eps):
    if norm == "linf":
        return delta.clamp(-eps, eps)
    return delta * (eps / _per_example_norm(delta)).clamp(max=1.0)


def cross_entropy_sum(logits, y):
    return F.cross_entropy(logits.float(), y, reduction="sum")


def pgd(model, x, y, *, norm, eps, step_size, steps, restarts=1, random_start=True, generator=None,
        loss_fn=cross_entropy_sum):
    """Projected gradient ascent of loss_fn(model(x_adv), y) in the `norm` ball of radius `eps` around x.

    Returns detached x_adv in the ball and in [0,1]. With restarts, keeps per example the worst case
    (misclassified beats correct, then higher loss). The model's mode and its weights' .grad are left as
    found; `generator` (on x's device) drives the random start.
    """
    if norm not in ("linf", "l2"):
        raise ValueError(f"unknown norm {norm!r}: use linf or l2")
    if eps < 0 or step_size < 0 or steps < 0 or restarts < 1:
        raise ValueError("pgd needs eps >= 0, step_size >= 0, steps >= 0 and restarts >= 1")
    x = x.detach()
    best = x.clone()
    best_loss = torch.full((len(x),), -math.inf, device=x.device)
    best_wrong = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for _ in range(restarts):
        delta = _random_start(x, norm, eps, generator) if random_start and eps > 0 else torch.zeros_like(x)
        delta = (x + delta).clamp(0, 1) - x
        for _ in range(steps):
            delta.requires_grad_(True)
            grad, = torch.autograd.grad(loss_fn(model(x + delta), y), delta)
            delta = _project(delta.detach() + step_size * _ascent_direction(grad, norm), norm, eps)
            delta = (x + delta).clamp(0, 1) - x
        if restarts == 1:
            return (x + delta).detach()
        with torch.no_grad():
            logits = model(x + delta).float()
            loss = F.cross_entropy(logits, y, reduction="none")
            wrong = logits.argmax(1) != y
            better = (wrong & ~best_wrong) | ((wrong == best_wrong) & (loss > best_loss))
            best[better] = (x + delta)[better]
            best_loss = torch.where(better, loss, best_loss)
            best_wrong |= wrong
    return best.detach()


def import_pyautoattack():
    try:
        import pyautoattack
        import pyautoattack.autopgd_base
    except ImportError:
        raise UserError("APGD and AutoAttack need the official code: pip install pyautoattack") from None
    return pyautoattack


def apgd(model, x, y, *, loss, norm, eps, iters, seed, crafted_at_alpha=None):
    """x_adv of one run of the official APGD (pyautoattack, one restart): loss "ce" or "dlr" untargeted, or
    "targeted" (DLR against each of the nine most likely wrong classes in turn). Every MeanSparse is under
    BPDA, at threshold `crafted_at_alpha` if given (a transfer attack). The global RNG, which APGD seeds,
    is left as found."""
    pyautoattack = import_pyautoattack()
    norm_name = {"linf": "Linf", "l2": "L2"}[norm]
    common = dict(n_iter=iters, norm=norm_name, n_restarts=1, eps=eps, seed=seed, device=x.device)
    if loss == "targeted":
        attack = pyautoattack.autopgd_base.APGDAttack_targeted(model, n_target_classes=NUM_CLASSES - 1, **common)
    else:
        attack = pyautoattack.autopgd_base.APGDAttack(model, loss=loss, **common)
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []), bpda(model), \
            alpha_set_to(model, crafted_at_alpha) if crafted_at_alpha is not None else contextlib.nullcontext():
        return attack.perturb(x, y).detach()


# name -> (APGD loss, alpha it is crafted at: None for the model's own)
APGD_COMPONENTS = {"apgd-ce": ("ce", None), "apgd-dlr": ("dlr", None), "apgd-ce-transfer": ("ce", 0.0),
                   "apgd-t": ("targeted", None)}
ADAPTIVE = ("apgd-ce", "apgd-ce-transfer", "apgd-t")      # the adaptive evaluation: an image must survive all
CASCADED = ("apgd-t",)      # nine runs in one: attacks only the images the components before it left correct


def percent(correct):
    """Accuracy (%) from per-image outcomes (bool tensor), exact: integer count over images."""
    return 100.0 * int(correct.sum()) / max(len(correct), 1)


def apgd_robust(model, batches, components, *, norm, eps, iters, seed, verbose=True, done=None, on_batch=None):
    """Per image of `batches`: is it still classified correctly after every one of `components` (APGD
    attacks, see APGD_COMPONENTS)? The worst case per image, judged by the model's own forward pass (the
    mask, not BPDA). Returns (robust bool tensor, stats): stats holds the clean accuracy, each component's
    own accuracy, and for a cascaded component (APGD-T, like AutoAttack's) the images it attacked and broke;
    it cannot change the worst case on the images others broke, and would cost up to twice as much there.
    Its progress (per-image record and counts of the batches finished) goes to `on_batch` after every
    batch; `done=` that progress continues it, `batches` then holding the images after those."""
    progress = copy.deepcopy(done) if done else {
        "per_image": "", "clean": 0,
        "components": {name: {"correct": 0, "seconds": 0.0, "attacked": 0, "broke": 0} for name in components}}
    for x, y in tqdm(batches, desc=f"APGD {norm}", leave=False, disable=not verbose):
        with torch.no_grad():
            alive = model(x).argmax(1) == y
        clean, counts = int(alive.sum()), {}
        for name in components:
            t0 = time.perf_counter()
            loss, alpha = APGD_COMPONENTS[name]
            idx = (alive if name in CASCADED else torch.ones_like(alive)).nonzero().flatten()
            correct = torch.zeros_like(alive)
            if len(idx):
                x_adv = apgd(model, x[idx], y[idx], loss=loss, norm=norm, eps=eps, iters=iters, seed=seed,
                             crafted_at_alpha=alpha)
                with torch.no_grad():
                    correct[idx] = model(x_adv).argmax(1) == y[idx]
            counts[name] = {"correct": int(correct.sum()), "attacked": len(idx),
                            "broke": int((alive & ~correct).sum()), "seconds": time.perf_counter() - t0}
            alive &= correct
        # a batch counts once it is finished: an interrupted run continues after the last one on_batch saw
        progress["clean"] += clean
        for name, batch_counts in counts.items():
            for key, value in batch_counts.items():
                progress["components"][name][key] += value
        progress["per_image"] += per_image_string(alive.cpu())
        if on_batch:
            on_batch(copy.deepcopy(progress))   # a snapshot: the next batch goes on changing `progress`
    robust = per_image_bools(progress["per_image"])
    n = max(len(robust), 1)
    stats = {"clean": 100.0 * progress["clean"] / n,
             **{name: {"accuracy": None if name in CASCADED else 100.0 * c["correct"] / n,
                       "seconds": round(c["seconds"], 2), "attacked": c["attacked"], "broke": c["broke"]}
                for name, c in progress["components"].items()}}
    return robust, stats


SELECT_ATTACKS = ("apgd-ce", "apgd-dlr")    # the weight-selection check: cheaper than ADAPTIVE's APGD-T


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainConfig:
    arch: str = DEFAULT_ARCH
    epochs: int = None              # fixed length; None: set by time_budget
    time_budget: float = None       # minutes for the whole schedule (validation and checkpoints included)
    batch_size: int = 512           # global batch (split across DDP ranks)
    lr: float = 0.2                 # peak of the one-cycle schedule
    warmup_epochs: float = 2.0      # linear warm-up, then linear decay to 0
    momentum: float = 0.9
    weight_decay: float = 5e-4      # not on BatchNorm weights or biases
    label_smoothing: float = 0.0
    eps: float = EPS_LINF           # L-inf radius of the training attack
    attack_steps: int = 5           # K
    attack_step_size: float = None  # at the full eps (scaled with it during the ramp); None: 2.5 * eps / K
    eps_ramp: float = 0.0           # eps rises linearly from 0 over this fraction of the run; 0: no ramp
    trades: float = None            # TRADES beta; None: plain PGD-AT (cross-entropy on adversarial batch)
    awp: float = None               # AWP gamma (weight perturbation relative to each layer's norm); None: off
    awp_warmup: float = 0.0         # epochs without AWP at the start
    ema: float = None               # EMA decay; None: no EMA
    ema_start: float = 0.0          # fraction of the run before which the EMA just copies the weights
    select_from: float = None       # fraction of the run from which validation APGD picks the weights kept;
                                    # None: the better of final and EMA weights by validation PGD-10
    select_n: int = SELECT_IMAGES   # validation images of each APGD check
    select_iters: int = SELECT_ITERS
    val_every: int = 5              # epochs between validation checks
    n_train: int = None             # first N training images (smoke runs)
    seed: int = 0
    compile: bool = False


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
    if "RANK" not in os.environ:
        return 0, 1, 0
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))


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


def validate(model, val_batches, eps=EPS_LINF, steps=VAL_PGD_STEPS, seed=0):
    """(clean %, PGD-`steps` L-inf %) on the validation batches, float32, eval mode."""
    model.eval()
    gen = torch.Generator(val_batches.images.device).manual_seed(seed)
    clean = evaluate(model, val_batches, desc="val clean")
    robust = evaluate(model, val_batches, make_pgd("linf", eps, eps / 4, steps, generator=gen),
                      desc=f"val PGD-{steps}")
    return clean, robust


def apgd_check(model, batches, cfg):
    """(robust %, clean %) of `model` under the weight-selection check: APGD-CE and untargeted APGD-DLR,
    cfg.select_iters iterations each, the per-image worst case."""
    model.eval()
    robust, stats = apgd_robust(model, batches, SELECT_ATTACKS, norm="linf", eps=cfg.eps,
                                iters=cfg.select_iters, seed=cfg.seed, verbose=False)
    return percent(robust), stats["clean"]


def budget_epochs(cfg, epoch, per_epoch, spent, val_seconds, device, world_size):
    """Total epochs such that the whole schedule ends within cfg.time_budget minutes, given the seconds
    one epoch takes once warmed up, the seconds spent so far and the cost of one validation check (the
    final EMA validation included when there is one)."""
    per_epoch += val_seconds / cfg.val_every
    remaining = cfg.time_budget * 60 - spent - (val_seconds if cfg.ema and cfg.select_from is None else 0)
    fit = epoch + int(0.97 * remaining / per_epoch)
    total = max(fit, epoch + 1, math.ceil(2 * cfg.warmup_epochs))
    if world_size > 1:      # every rank must run the same schedule: rank 0 decides
        t = torch.tensor([total], device=device)
        torch.distributed.broadcast(t, 0)
        total = int(t.item())
    return total


def unfinished_run(checkpoint_path):
    """Why a run that starts over must not write `checkpoint_path`, or None: starting over would overwrite an
    unfinished run's checkpoint after one epoch, maybe hours of training lost to a forgotten --resume."""
    if not os.path.isfile(checkpoint_path):
        return None
    written = time.strftime("%Y-%m-%d %H:%M", time.localtime(os.path.getmtime(checkpoint_path)))
    return (f"{checkpoint_path} holds an unfinished training run (written {written}): add --resume to continue "
            f"it, or delete it to start over")


def save_checkpoint(state, path):
    atomic_save(state, path)


def _rng_states(data_gen, noise_gen):
    return {"data": data_gen.get_state(), "noise": noise_gen.get_state(), "torch": torch.get_rng_state()}


@dataclasses.dataclass
class _Run:
    """What a training run carries from epoch to epoch (its checkpoint adds the model, optimizer, EMA and
    random states). `best` describes the best weights the APGD checks have seen, `best_state` holds them."""
    total_epochs: int = None
    epoch: int = 0
    history: list = dataclasses.field(default_factory=list)
    elapsed: float = 0.0
    best: dict = None
    best_state: dict = None


CHECKPOINT_KEYS = ("epoch", "total_epochs", "config", "model", "optimizer", "ema", "ema_updates", "rng",
                   "history", "elapsed", "best", "best_state")


def train(model, train_set, val_set, cfg, *, device, checkpoint_path, resume=False, log=print):
    """Adversarial training of `model` (in place) on train_set = (images, labels).

    Writes `checkpoint_path` atomically after every epoch; resume=True continues from it and gives the
    same result as an uninterrupted run; without it, an existing checkpoint is a UserError, never replaced.
    Returns (model to keep, info dict). Under torchrun every rank calls this; rank 0 alone logs, validates
    and writes. MeanSparse is bypassed (alpha is 0 until calibration anyway).
    """
    with bypassed(model):
        return _train(model, train_set, val_set, cfg, device=device, checkpoint_path=checkpoint_path,
                      resume=resume, log=log)


def _train(model, train_set, val_set, cfg, *, device, checkpoint_path, resume, log):
    rank, world_size, _ = distributed_context()
    master = rank == 0
    device = torch.device(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    channels_last = device.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.batch_size % world_size:
        raise UserError(f"--batch-size {cfg.batch_size} must be divisible by the {world_size} processes")
    data_gen = torch.Generator().manual_seed(cfg.seed)
    noise_gen = torch.Generator(device).manual_seed(cfg.seed + 1 + rank)
    batches, val_batches, select_batches = _training_batches(train_set, val_set, cfg, device, data_gen, rank,
                                                             world_size, channels_last)
    optimizer = _sgd(model, cfg)
    ema = EMA(model, cfg.ema) if cfg.ema else None
    run = _Run(total_epochs=cfg.epochs)
    if resume:
        _restore(checkpoint_path, cfg, model, optimizer, ema, data_gen, noise_gen, run)
        if master:
            log(f"resuming {checkpoint_path} after epoch {run.epoch} of {run.total_epochs}")
    elif problem := unfinished_run(checkpoint_path):
        raise UserError(problem)

    ddp_model = model
    if world_size > 1:
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    core = model
    if cfg.compile:
        ddp_model, core = torch.compile(ddp_model), torch.compile(model)
    awp_weights = ([m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
                   if cfg.awp else None)
    step_objects = dict(net=model, model=ddp_model, core=core, optimizer=optimizer, ema=ema, noise_gen=noise_gen,
                        awp_weights=awp_weights, world_size=world_size)
    t_start = time.perf_counter() - run.elapsed
    first = True
    while run.total_epochs is None or run.epoch < run.total_epochs:
        record, per_epoch = _train_epoch(run, batches, cfg, master=master, first=first, log=log, **step_objects)
        first = False
        run.epoch += 1
        if master and (run.total_epochs is None or run.epoch % cfg.val_every == 0
                       or run.epoch == run.total_epochs):
            tv = time.perf_counter()
            record.update(_validate(run, model, ema, val_batches, select_batches, cfg, log))
            record["val_seconds"] = round(time.perf_counter() - tv, 2)
        run.history.append(record)
        if cfg.time_budget is not None and (run.total_epochs is None or run.epoch < run.total_epochs):
            _fit_length(run, cfg, per_epoch, time.perf_counter() - t_start, device, world_size, master, log)
        if master:
            _log_epoch(run, record, log)
            run.elapsed = time.perf_counter() - t_start
            save_checkpoint(_checkpoint(run, cfg, model, optimizer, ema, data_gen, noise_gen), checkpoint_path)
    return _finish(run, model, ema, val_batches, cfg, batches, device, world_size, master,
                   time.perf_counter() - t_start, log)


def _fit_length(run, cfg, per_epoch, spent, device, world_size, master, log):
    """Set (after the first epoch) or correct (after every later one) the length of a time-budget run
    from the cost of the epoch just run. Correcting matters: the first epoch of an eps ramp has no attack
    and AWP starts after its warm-up, so the first epoch can cost half of a later one."""
    check = max((r.get("val_seconds", 0.0) for r in run.history), default=0.0)   # the dearest check so far
    total = budget_epochs(cfg, run.epoch, per_epoch, spent, check, device, world_size)
    if master and total != run.total_epochs:
        log(f"time budget {cfg.time_budget:g} min at {per_epoch:.1f} s per epoch: {total} epochs"
            + (f" (was {run.total_epochs})" if run.total_epochs else ""))
    run.total_epochs = total


def _training_batches(train_set, val_set, cfg, device, data_gen, rank, world_size, channels_last):
    """(this rank's training batches, validation batches, the APGD check's batches); the last two on rank 0
    alone, which validates."""
    images, labels = train_set
    if cfg.n_train is not None:
        images, labels = images[:cfg.n_train], labels[:cfg.n_train]
    batches = Batches(images, labels, cfg.batch_size // world_size, device=device, train=True,
                      generator=data_gen, rank=rank, world_size=world_size, channels_last=channels_last)
    if len(batches) == 0:
        raise UserError(f"{len(labels)} training images make no batch of {cfg.batch_size}; "
                        f"lower --batch-size or raise --n-train")
    if rank != 0:
        return batches, None, None
    return (batches, Batches(*val_set, cfg.batch_size, device=device, channels_last=channels_last),
            Batches(val_set[0][:cfg.select_n], val_set[1][:cfg.select_n], cfg.batch_size, device=device,
                    channels_last=channels_last))


def _sgd(model, cfg):
    """Nesterov SGD, weight decay on conv and linear weights only (not on BatchNorm or biases)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=0.0, momentum=cfg.momentum, nesterov=True)


def read_checkpoint(path):
    """A training checkpoint, checked for the keys this version writes (RNG states stay on the CPU)."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint {path}")
    ckpt = _torch_load(path, "checkpoint")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt] if isinstance(ckpt, dict) else list(CHECKPOINT_KEYS)
    if missing or not isinstance(ckpt["config"], dict):
        raise UserError(f"{path}: not a training checkpoint of this version (missing {', '.join(missing)}); "
                        f"delete it to start over")
    return ckpt


def _restore(path, cfg, model, optimizer, ema, data_gen, noise_gen, run):
    """Load a checkpoint into the run's objects, after checking that it is one and fits these settings."""
    if not os.path.isfile(path):
        raise UserError(f"--resume: no checkpoint {path}; run without --resume to start")
    ckpt = read_checkpoint(path)
    defaults = dataclasses.asdict(TrainConfig())
    changed = {k: (ckpt["config"].get(k, defaults[k]), v) for k, v in dataclasses.asdict(cfg).items()
               if k not in ("compile", "val_every") and ckpt["config"].get(k, defaults[k]) != v}
    if changed:
        raise UserError(f"--resume: {path} was made with other settings "
                        f"({', '.join(f'{k}: {a} there, {b} now' for k, (a, b) in changed.items())}); "
                        f"repeat its command, or delete it to start over")
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ema:
            ema.model.load_state_dict(ckpt["ema"])
            ema.updates = int(ckpt["ema_updates"])
        data_gen.set_state(ckpt["rng"]["data"])
        noise_gen.set_state(ckpt["rng"]["noise"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        run.epoch, run.total_epochs = int(ckpt["epoch"]), ckpt["total_epochs"]
        run.history, run.elapsed = list(ckpt["history"]), float(ckpt["elapsed"])
        run.best, run.best_state = ckpt["best"], ckpt["best_state"]
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{path}: does not fit this run ({e.__class__.__name__}: {first}); "
                        f"delete it to start over") from None


def _checkpoint(run, cfg, model, optimizer, ema, data_gen, noise_gen):
    return {"epoch": run.epoch, "total_epochs": run.total_epochs, "config": dataclasses.asdict(cfg),
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "ema": ema.model.state_dict() if ema else None, "ema_updates": ema.updates if ema else 0,
            "rng": _rng_states(data_gen, noise_gen), "history": run.history, "elapsed": run.elapsed,
            "best": run.best, "best_state": run.best_state}


def rescue_checkpoint(checkpoint_path, model_path, log=print):
    """Write an unfinished run's checkpoint as a model file: the best weights its APGD checks saw (with
    --select-from), else the weights of its last finished epoch. For a run cut off before its end, e.g. at
    a GPU call's deadline, whose checkpoint is too large to bring back; its metadata says how far it got
    (near the end of a one-cycle schedule the weights are close to annealed, earlier they are not). A file
    already at `model_path` is kept as <model_path>.prev."""
    ckpt = read_checkpoint(checkpoint_path)
    model = build_model(ckpt["config"]["arch"])
    best = ckpt["best"]
    try:
        model.load_state_dict(ckpt["best_state"] if best else ckpt["model"])
    except (RuntimeError, TypeError, AttributeError) as e:
        raise UserError(f"{checkpoint_path}: its weights do not fit a WRN-{ckpt['config']['arch']} "
                        f"({e.__class__.__name__})") from None
    weights = f"{best['weights']} weights of epoch {best['epoch']}" if best else f"weights of epoch {ckpt['epoch']}"
    info = {"complete": False, "epochs": ckpt["epoch"], "planned_epochs": ckpt["total_epochs"],
            "config": ckpt["config"], "history": ckpt["history"], "weights": weights,
            "rescued_from": os.path.abspath(checkpoint_path)}
    if best:
        info["selected"] = best
    keep_previous(model_path if os.path.isfile(model_path) else None, log)     # a wrong name loses nothing
    model.eval().save(model_path, {"training": info})
    log(f"wrote {model_path}: the {weights} of an unfinished run ({ckpt['epoch']} of "
        f"{ckpt['total_epochs']} epochs)")
    return model


def _train_epoch(run, batches, cfg, *, net, model, core, optimizer, ema, noise_gen, awp_weights, world_size,
                 master, first, log):
    """One epoch of training steps of `net` (`model`: its DDP wrapper, `core`: it compiled, or itself).
    Returns (record, seconds one epoch takes once warmed up); the first epoch of a process logs an
    estimate of the run's length."""
    device = batches.images.device
    steps = len(batches)
    total = run.total_epochs or math.inf        # until the length is fixed only the warm-up applies
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen, steady = 0, None
    t0 = time.perf_counter()
    bar = tqdm(batches, desc=f"epoch {run.epoch + 1}/{run.total_epochs or '?'}", disable=not master,
               leave=False, dynamic_ncols=True)
    for i, (x, y) in enumerate(bar):
        progress = run.epoch + i / steps
        lr = lr_at(progress, total, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, corr = train_step(model, core, x, y, cfg, optimizer, noise_gen, eps=eps_at(progress, total, cfg),
                                awp_weights=awp_weights if progress >= cfg.awp_warmup else None,
                                world_size=world_size)
        loss_sum += loss
        correct += corr
        seen += len(y)
        if ema:
            (ema.update if (progress + 1 / steps) / total >= cfg.ema_start else ema.follow)(net)
        if i + 1 == min(STEADY_STEP, steps):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if steps > 2 * STEADY_STEP:
                steady = (time.perf_counter(), i + 1)     # after cudnn autotuning / compilation
            if first and master:
                _log_estimate(run, cfg, (time.perf_counter() - t0) / (i + 1) * steps, log)
        if (i + 1) % 20 == 0 or i + 1 == steps:
            mean_loss = loss_sum.item() / seen        # the one host sync, every 20 steps
            if not math.isfinite(mean_loss):
                kept = "; the last good epoch is in the checkpoint (--resume)" if run.epoch > 0 else ""
                raise TrainingError(f"loss became {mean_loss} in epoch {run.epoch + 1}: lower --lr "
                                    f"(now {cfg.lr}){kept}")
            bar.set_postfix(loss=f"{mean_loss:.3f}", adv_acc=f"{100 * correct.item() / seen:.1f}",
                            img_s=f"{seen * world_size / (time.perf_counter() - t0):.0f}", lr=f"{lr:.3f}")
    bar.close()
    epoch_time = time.perf_counter() - t0
    per_epoch = epoch_time      # too few steps to leave out the warm-up: the whole epoch
    if steady is not None:
        per_epoch = (t0 + epoch_time - steady[0]) / (steps - steady[1]) * steps
    record = {"epoch": run.epoch + 1, "loss": loss_sum.item() / seen, "adv_train_acc": 100 * correct.item() / seen,
              "seconds": round(epoch_time, 2), "images_per_s": round(seen * world_size / epoch_time)}
    return record, per_epoch


def _log_estimate(run, cfg, per_epoch, log):
    """After the first steps: how long an epoch and the whole run will take here (before cudnn's tuning
    and compilation end this is an overestimate)."""
    left = (run.total_epochs or 0) - run.epoch
    length = (f"{left} epoch{'s' if left != 1 else ''} to go, about {_duration(per_epoch * left)}" if run.total_epochs
              else f"the time budget of {cfg.time_budget:g} min fixes the length after this epoch")
    log(f"estimate from the first {STEADY_STEP} steps: about {_duration(per_epoch)} per epoch; {length}")


def _duration(seconds):
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _validate(run, model, ema, val_batches, select_batches, cfg, log):
    """The validation check after an epoch: clean and PGD-10 accuracy of the live weights; with
    select_from, the APGD check of the live and EMA weights (from select_from of the run on, and at the
    first check of a time-budget run, whose cost the budget needs), keeping the best weights seen."""
    record = {}
    record["val_clean"], record["val_pgd10"] = validate(model, val_batches, eps=cfg.eps, seed=cfg.seed)
    if cfg.select_from is None:
        return record
    fraction = run.epoch / run.total_epochs if run.total_epochs else None
    selecting = fraction is not None and fraction >= cfg.select_from
    if not selecting and fraction is not None:
        return record
    for name, net in [("live", model)] + ([("ema", ema.model)] if ema else []):
        robust, clean = apgd_check(net, select_batches, cfg)
        record[f"val_apgd_{name}"], record[f"val_apgd_clean_{name}"] = robust, clean
        if selecting and (run.best is None or (robust, clean) > (run.best["apgd"], run.best["clean"])):
            run.best = {"epoch": run.epoch, "weights": name, "apgd": robust, "clean": clean}
            run.best_state = {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}
    return record


def _log_epoch(run, record, log):
    val = ""
    if "val_clean" in record:
        val = f", val clean {record['val_clean']:.2f} PGD-10 {record['val_pgd10']:.2f}"
        for name in ("live", "ema"):
            if f"val_apgd_{name}" in record:
                val += f", APGD {name} {record[f'val_apgd_{name}']:.2f}"
    log(f"epoch {run.epoch}/{run.total_epochs}: loss {record['loss']:.4f}, adv train acc "
        f"{record['adv_train_acc']:.2f}, {record['images_per_s']} img/s, {record['seconds']:.1f} s{val}")


def _finish(run, model, ema, val_batches, cfg, batches, device, world_size, master, elapsed, log):
    """Choose the weights to keep and describe the run: the best APGD check with select_from, else the
    better of the final and EMA weights by validation PGD-10."""
    train_seconds = sum(r["seconds"] for r in run.history)
    model.eval()
    info = {"epochs": run.total_epochs, "train_images": len(batches.labels), "wall_seconds": round(elapsed, 1),
            "train_seconds": round(train_seconds, 1),
            "images_per_s": round(len(batches) * cfg.batch_size * run.total_epochs / max(train_seconds, 1e-9)),
            "world_size": world_size, "device": device_name(device), "config": dataclasses.asdict(cfg),
            "history": run.history, "weights": "final"}
    if world_size > 1:
        checksum = torch.stack([p.detach().double().sum() for p in model.parameters()])   # one per tensor
        gathered = [torch.zeros_like(checksum) for _ in range(world_size)]
        torch.distributed.all_gather(gathered, checksum)
        info["ranks_agree"] = all(torch.equal(g, checksum) for g in gathered)
        if master:
            log(f"weights identical across {world_size} ranks: {info['ranks_agree']}")
    if master and run.best is not None:
        model.load_state_dict(run.best_state)
        info["selected"] = run.best
        info["weights"] = f"{run.best['weights']} weights of epoch {run.best['epoch']}"
        log(f"keeping the {info['weights']} (validation APGD {run.best['apgd']:.2f}, clean "
            f"{run.best['clean']:.2f}, on {min(cfg.select_n, len(val_batches.labels))} images)")
    elif ema and master:
        final = run.history[-1]
        ema_clean, ema_robust = validate(ema.model, val_batches, eps=cfg.eps, seed=cfg.seed)
        info["ema_val"] = {"clean": ema_clean, "pgd10": ema_robust}
        log(f"validation: final weights {final['val_clean']:.2f} / {final['val_pgd10']:.2f}, "
            f"EMA {ema_clean:.2f} / {ema_robust:.2f} (clean / PGD-10)")
        if (ema_robust, ema_clean) > (final["val_pgd10"], final["val_clean"]):
            model.load_state_dict(ema.model.state_dict())
            info["weights"] = "ema"
        log(f"keeping the {info['weights']} weights")
    model.to(memory_format=torch.contiguous_format)
    return model, info


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
        with alpha_set_to(model, 0.0):
            for x, _ in tqdm(batches, desc="MeanSparse statistics", leave=False):
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


def adaptive_components(alpha):
    """The adaptive evaluation's attacks at MeanSparse threshold alpha: at 0 the transfer attack is APGD-CE."""
    return tuple(c for c in ADAPTIVE if alpha > 0 or c != "apgd-ce-transfer")


def weights_fingerprint(model):
    """sha256 of every parameter and buffer of `model` but the MeanSparse thresholds (alpha): the same
    weights and statistics give the same fingerprint, whatever the memory layout."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        if not name.endswith(".alpha"):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def read_sweep_progress(path, key, log):
    """The alphas an interrupted calibration finished, from `path`, if it was made with `key` (the same
    weights, statistics, images and settings); else a fresh record."""
    fresh = {"key": key, "alphas": {}}
    if not path or not os.path.isfile(path):
        return fresh
    saved = read_json(path)
    if not isinstance(saved, dict) or saved.get("key") != key or not isinstance(saved.get("alphas"), dict):
        there = saved.get("key") if isinstance(saved, dict) and isinstance(saved.get("key"), dict) else {}
        differ = ["other weights or statistics" if k == "weights" else f"{k} {there.get(k)} there, {v} here"
                  for k, v in key.items() if there.get(k) != v] if there else ["unreadable"]
        log(f"note: {path} is of another calibration ({'; '.join(differ)}): starting afresh; it may hold hours "
            f"of APGD, so it is kept as {path}.prev (to continue it instead, rename it back and repeat its settings)")
        keep_previous(path, lambda line: None)
        return fresh
    done = [a for a, entry in saved["alphas"].items() if "robust" in entry]
    part = [f"{a} (APGD after {len(entry['apgd']['per_image'])} images)" if "apgd" in entry else f"{a} (PGD row)"
            for a, entry in saved["alphas"].items() if "robust" not in entry]
    log(f"continuing the calibration in {path}: alphas done: {', '.join(done) or 'none'}"
        + (f"; part way: {', '.join(part)}" if part else ""))
    return saved


def _pgd_sweep_row(model, val_batches, alpha, *, steps, eps, seed):
    """One alpha's clean, plain PGD and BPDA PGD accuracy (L-inf) on the validation batches."""
    gen = torch.Generator(val_batches.images.device)
    row = {"alpha": alpha, "clean": evaluate(model, val_batches, desc=f"alpha {alpha:g} clean")}
    attack = make_pgd("linf", eps, eps / 4, steps, generator=gen.manual_seed(seed))
    row["plain"] = evaluate(model, val_batches, attack, desc=f"alpha {alpha:g} PGD")
    attack = make_pgd("linf", eps, eps / 4, steps, generator=gen.manual_seed(seed), use_bpda=True)
    row["bpda"] = evaluate(model, val_batches, attack, desc=f"alpha {alpha:g} BPDA")
    return row


def calibrate(model, train_batches, val_batches, alphas, *, steps, eps=EPS_LINF, criterion="adaptive",
              apgd_iters=APGD_ITERS, seed=0, log=print, progress_path=None):
    """Collect MeanSparse statistics on train_batches (None: keep the model's), sweep alphas (0 always
    among them) on val_batches: clean, plain PGD and BPDA PGD accuracy (L-inf), and with the adaptive
    criterion the APGD worst case with its paired gain over alpha 0. Sets the chosen alpha; returns
    (alpha, sweep rows). `progress_path`: a JSON file that keeps each finished alpha (on a CPU, hours of
    APGD each) and the finished APGD batches of an interrupted one: a later call on the same weights,
    statistics, images and settings takes them over."""
    if train_batches is not None:
        collect_statistics(model, train_batches)
    model.eval()
    key = {"weights": weights_fingerprint(model), "criterion": criterion, "steps": steps, "eps": eps,
           "apgd_iters": apgd_iters, "seed": seed, "n_val": len(val_batches.labels),
           "batch_size": val_batches.batch_size, "device": val_batches.images.device.type}
    progress = read_sweep_progress(progress_path, key, log)

    def save_progress():
        atomic_write(progress_path, lambda f: f.write(json.dumps(progress).encode()))

    sweep, base = [], None
    for alpha in sorted(set(alphas) | {0.0}):
        set_alpha(model, alpha)
        name = f"{alpha:g}"      # its entry in the progress file
        entry = progress["alphas"].get(name, {})
        if "robust" in entry:       # finished by an earlier call
            row, robust = dict(entry["row"]), per_image_bools(entry["robust"])
            base = robust if alpha == 0 else base
            sweep.append(row)
            log(f"  alpha {alpha:5.3f}: kept from {progress_path}")
            continue
        # an earlier call stopped in this alpha's APGD: its PGD row and finished APGD batches are kept
        row = dict(entry["row"]) if entry else _pgd_sweep_row(model, val_batches, alpha, steps=steps, eps=eps,
                                                              seed=seed)
        if progress_path and criterion == "adaptive" and not entry:
            progress["alphas"][name] = {"row": row}     # minutes of PGD on a CPU, kept before the APGD
            save_progress()
        line = (f"  alpha {alpha:5.3f}: clean {row['clean']:6.2f}  PGD-{steps} {row['plain']:6.2f}  "
                f"BPDA PGD-{steps} {row['bpda']:6.2f}")
        robust = None
        if criterion == "adaptive":
            done = entry.get("apgd")
            rest = val_batches
            if done:
                rest = val_batches.after(len(done["per_image"]))
                log(f"  alpha {alpha:5.3f}: PGD row kept from {progress_path}, APGD continues after "
                    f"{len(done['per_image'])} images")
            elif entry:
                log(f"  alpha {alpha:5.3f}: PGD row kept from {progress_path}, APGD starts")

            def keep_batches(apgd_progress):     # after every batch: even a killed run loses one batch at most
                progress["alphas"][name] = {"row": row, "apgd": apgd_progress}
                save_progress()

            robust, _ = apgd_robust(model, rest, adaptive_components(alpha), norm="linf", eps=eps, iters=apgd_iters,
                                    seed=seed, done=done, on_batch=keep_batches if progress_path else None)
            base = robust if alpha == 0 else base
            row["adaptive"] = percent(robust)
            row["gain"], row["gain_se"] = paired_gain(robust, base)
            line += f"  adaptive {row['adaptive']:6.2f}"
            if alpha > 0:
                line += f" ({row['gain']:+.2f} +- {row['gain_se']:.2f} against alpha 0)"
        sweep.append(row)
        log(line)
        if progress_path:
            robust_record = "" if robust is None else per_image_string(robust)
            progress["alphas"][name] = {"row": row, "robust": robust_record}
            save_progress()
    alpha = choose_alpha(sweep, criterion)
    set_alpha(model, alpha)
    if criterion == "adaptive" and alpha == 0 and len(sweep) > 1:
        best = max(sweep[1:], key=lambda row: (row["adaptive"], -row["alpha"]))
        log(f"chosen alpha 0: MeanSparse did not help this model. No alpha beat alpha 0 under the adaptive "
            f"attack by more than {SIGNIFICANCE:g} standard errors of the paired difference with clean accuracy "
            f"within {CLEAN_DROP_LIMIT:g} points (best: alpha {best['alpha']:g}, {best['gain']:+.2f} +- "
            f"{best['gain_se']:.2f})")
    elif len(sweep) == 1:       # nothing was chosen: the caveats of the criteria would mislead
        log(f"alpha {alpha:g}: the only value of the grid")
    else:
        note = {"plain": " (plain PGD sees a masked gradient: this choice rewards gradient masking, not "
                         "robustness)",
                "bpda": " (BPDA PGD-20 has credited MeanSparse with gains that APGD does not find)"}
        log(f"chosen alpha {alpha:g} by {criterion} accuracy{note.get(criterion, '')}")
    return alpha, sweep


# ----------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------
def make_pgd(norm, eps, step_size, steps, *, restarts=1, generator=None, use_bpda=False, craft_alpha=None):
    """An attack callable(model, x, y) -> x_adv: PGD, optionally under BPDA, optionally crafted with the
    MeanSparse threshold set to `craft_alpha` (a transfer attack) and evaluated with the model's own."""
    def attack(model, x, y):
        with bpda(model) if use_bpda else contextlib.nullcontext(), \
                alpha_set_to(model, craft_alpha) if craft_alpha is not None else contextlib.nullcontext():
            return pgd(model, x, y, norm=norm, eps=eps, step_size=step_size, steps=steps, restarts=restarts,
                       generator=generator)
    return attack


def correct_per_image(model, batches, attack=None, desc="natural", verbose=True, after_batch=None):
    """Per image of `batches`, in order: does `model` classify it correctly, after `attack`
    (callable(model, x, y) -> x_adv) if given? A bool tensor on the CPU. `after_batch(correct)` gets each
    batch's outcomes as soon as the batch is done."""
    correct = []
    for x, y in tqdm(batches, desc=desc, leave=False, disable=not verbose):
        if attack is not None:
            x = attack(model, x, y)
        with torch.inference_mode():
            correct.append((model(x).argmax(1) == y).cpu())
        if after_batch:
            after_batch(correct[-1])
    return torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool)


def evaluate(model, batches, attack=None, desc="natural", verbose=True):
    """Accuracy (%) of `model` on `batches`, after `attack` (callable(model, x, y) -> x_adv) if given."""
    return percent(correct_per_image(model, batches, attack, desc=desc, verbose=verbose))


def per_image_bools(record):
    """The bool tensor of a `per_image_string` record."""
    return torch.tensor([c == "1" for c in record], dtype=torch.bool)


def per_image_string(correct):
    """A report's record of which images an attack left correct: "1" (correct) or "0" per image, in the
    split's order from its first image. It lets two reports be compared image by image (bench/compare.py):
    a paired difference has a far smaller standard error than two accuracies side by side."""
    return "".join("1" if c else "0" for c in correct.tolist())


ATTACKS = ("natural", "pgd-linf", "pgd-l2", "bpda-linf", "bpda-l2", "transfer-linf", "apgd-linf", "apgd-l2",
           "aa-linf", "aa-l2")


def attack_settings(name, args):
    """The settings of attack `name` from the CLI arguments (also written into the report)."""
    if name == "natural":
        return {}
    norm = name.rsplit("-", 1)[1]
    eps = args.eps_linf if norm == "linf" else args.eps_l2
    if name.startswith("aa-"):
        return {"norm": norm, "eps": eps, "version": "standard", "bpda": True}
    if name.startswith("apgd-"):
        return {"norm": norm, "eps": eps, "iters": args.apgd_iters, "restarts": 1, "bpda": True}
    step = (args.step_linf if norm == "linf" else args.step_l2) or eps / 4
    return {"norm": norm, "eps": eps, "step_size": step, "steps": args.steps, "restarts": args.restarts,
            "bpda": name.startswith("bpda-"), "crafted_at_alpha": 0.0 if name.startswith("transfer-") else None}


def resumable_row(previous, name, args, device_type):
    """(row, None): row `name` of the report a --resume continues (None if it has none), to be kept whole or,
    stopped between two batches, continued; (None, why) when it must be measured again."""
    old = previous["results"].get(name) if previous else None
    if old is not None and not all(old.get(k) == v for k, v in attack_settings(name, args).items()):
        return None, "the report's row was made with other settings"
    if old is not None and old.get("progress", {}).get("device", device_type) != device_type:
        return None, "the report's row was stopped on another device, whose random starts cannot go on here"
    return old, None


class _AutoAttackLog(logging.Handler):
    """Shows AutoAttack's progress lines (robust accuracy after each attack, its checks' warnings) as they
    come, and keeps them for the report."""

    def __init__(self, log):
        super().__init__(logging.DEBUG)
        self.log, self.lines = log, []

    def emit(self, record):
        self.lines.append(record.getMessage())
        self.log(f"  autoattack: {record.getMessage()}")


def autoattack_accuracy(model, images, labels, *, norm, eps, batch_size, seed, device, log=print):
    """Standard AutoAttack (pyautoattack) under BPDA through MeanSparse: (accuracy %, details). The accuracy
    is the model's own forward pass on AutoAttack's adversarial images; details has the package version and
    AutoAttack's own log lines."""
    pyautoattack = import_pyautoattack()
    x = images.to(device).float().div(255)
    y = labels.to(device)
    adversary = pyautoattack.AutoAttack(model, norm="Linf" if norm == "linf" else "L2", eps=eps,
                                        version="standard", seed=seed, device=device)
    logger, handler = logging.getLogger("auto-attack"), _AutoAttackLog(log)
    level = logger.level
    logger.setLevel(logging.DEBUG)          # its progress lines are DEBUG records
    logger.addHandler(handler)
    try:
        with bpda(model):
            x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    correct = correct_per_image(model, [(x_adv[i:i + batch_size], y[i:i + batch_size])
                                        for i in range(0, len(y), batch_size)], verbose=False)
    details = {"pyautoattack": getattr(pyautoattack, "__version__", "unknown"), "log": handler.lines,
               "per_image": per_image_string(correct)}
    return percent(correct), details


def adaptive_accuracy(model, batches, *, norm, eps, iters, seed, log=print, done=None, on_batch=None):
    """The adaptive evaluation (`apgd-linf`, `apgd-l2`): APGD-CE and APGD-T under BPDA and APGD-CE crafted
    with MeanSparse off, an image robust only if it survives all of them. Returns (worst-case accuracy %,
    details with the clean accuracy and each component's figures). `done`, `on_batch`: see `apgd_robust`."""
    components = adaptive_components(get_alpha(model))
    robust, stats = apgd_robust(model, batches, components, norm=norm, eps=eps, iters=iters, seed=seed,
                                done=done, on_batch=on_batch)
    for name in components:
        c = stats[name]
        own = f"{c['accuracy']:6.2f} %" if c["accuracy"] is not None else \
            f"broke {c['broke']} of the {c['attacked']} images the others left"
        log(f"  {name:17s} {own}  {c['seconds']:8.1f} s")
    pyautoattack = import_pyautoattack()
    return percent(robust), {"components": {k: stats[k] for k in components}, "clean": stats["clean"],
                             "pyautoattack": getattr(pyautoattack, "__version__", "unknown"),
                             "per_image": per_image_string(robust)}


def generator_text(generator):
    """A random generator's state as text (for a report), and back with `generator_from_text`."""
    return base64.b64encode(generator.get_state().numpy().tobytes()).decode()


def generator_from_text(generator, text):
    generator.set_state(torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8))
    return generator


def run_attack(model, name, batches, args, device, done=None, on_batch=None):
    """(accuracy %, settings) of attack `name` on `batches`; settings end with the per-image record
    (`per_image_string`). `on_batch(progress)` after every batch of an apgd-* or PGD row, and `done=` such
    a progress to continue the row (`batches` then holding the images after it): see `apgd_robust`; a PGD
    row's progress holds its random generator's state, so that its random starts go on as if never
    stopped."""
    settings = attack_settings(name, args)
    if name == "natural":
        correct = correct_per_image(model, batches, desc="natural")
        return percent(correct), {**settings, "per_image": per_image_string(correct)}
    if name.startswith("aa-"):
        accuracy, details = autoattack_accuracy(model, batches.images, batches.labels, norm=settings["norm"],
                                                eps=settings["eps"], batch_size=batches.batch_size,
                                                seed=args.seed, device=device)
        return accuracy, {**settings, **details}
    if name.startswith("apgd-"):
        accuracy, details = adaptive_accuracy(model, batches, norm=settings["norm"], eps=settings["eps"],
                                              iters=settings["iters"], seed=args.seed, done=done,
                                              on_batch=on_batch)
        return accuracy, {**settings, **details}
    gen = torch.Generator(device).manual_seed(args.seed)
    per_image = done["per_image"] if done else ""
    if done:
        generator_from_text(gen, done["generator"])
    attack = make_pgd(settings["norm"], settings["eps"], settings["step_size"], settings["steps"],
                      restarts=settings["restarts"], generator=gen, use_bpda=settings["bpda"],
                      craft_alpha=settings["crafted_at_alpha"])

    def keep(correct):
        nonlocal per_image
        per_image += per_image_string(correct)
        if on_batch:
            on_batch({"per_image": per_image, "generator": generator_text(gen), "device": device.type})

    correct_per_image(model, batches, attack, desc=name, after_batch=keep)
    return percent(per_image_bools(per_image)), {**settings, "per_image": per_image}


def robustness_curves(model, batches, args, device):
    """Accuracy against eps for both norms, plain and BPDA PGD."""
    curves = {}
    for norm, grid in PLOT_EPS.items():
        for use_bpda in (False, True):
            accs = []
            for eps in grid:
                gen = torch.Generator(device).manual_seed(args.seed)
                attack = make_pgd(norm, eps, eps / 4, args.steps, generator=gen, use_bpda=use_bpda)
                shown = f"{eps * 255:g}/255" if norm == "linf" else f"{eps:g}"
                accs.append(evaluate(model, batches, attack,
                                     desc=f"{'BPDA' if use_bpda else 'PGD'} {norm} eps {shown}"))
            curves[f"{'bpda' if use_bpda else 'pgd'}-{norm}"] = {"eps": grid, "accuracy": accs}
    return curves


def plot_report(report, path, title):
    """One figure, a panel per part of `report` this run produced: training curves (loss; adversarial
    training and validation accuracies per epoch), the MeanSparse alpha sweep, accuracy against eps."""
    import matplotlib      # parse_args has checked that it is installed
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = []
    if "training" in report:
        panels += [_plot_training_loss, _plot_training_accuracy]
    if "calibration" in report:
        panels.append(_plot_sweep)
    panels += [lambda ax, r: _plot_curves(ax, r, "linf"), lambda ax, r: _plot_curves(ax, r, "l2")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        panel(ax, report)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    extension = os.path.splitext(path)[1][1:] or "png"
    atomic_write(path, lambda f: fig.savefig(f, format=extension, dpi=120))
    plt.close(fig)


def _plot_training_loss(ax, report):
    history = report["training"]["history"]
    ax.plot([r["epoch"] for r in history], [r["loss"] for r in history], "-")
    ax.set(xlabel="epoch", ylabel="training loss", title="training loss")


def _plot_training_accuracy(ax, report):
    history = report["training"]["history"]
    for key, label in (("adv_train_acc", "adversarial, training batches"), ("val_clean", "val clean"),
                       ("val_pgd10", "val PGD-10"), ("val_apgd_live", "val APGD (live)"),
                       ("val_apgd_ema", "val APGD (EMA)")):
        points = [(r["epoch"], r[key]) for r in history if key in r]
        if points:
            ax.plot(*zip(*points), "-" if key == "adv_train_acc" else "-o", markersize=3, label=label)
    ax.set(xlabel="epoch", ylabel="accuracy (%)", title="training")


def _plot_sweep(ax, report):
    sweep = report["calibration"]["sweep"]
    for key, label in (("clean", "clean"), ("plain", "plain PGD"), ("bpda", "BPDA PGD"),
                       ("adaptive", "APGD worst case")):
        if key in sweep[0]:
            ax.plot([r["alpha"] for r in sweep], [r[key] for r in sweep], "-o", markersize=3, label=label)
    ax.axvline(report["calibration"]["alpha"], color="grey", linestyle=":", label="chosen")
    ax.set(xlabel="MeanSparse alpha", ylabel="accuracy (%)", title="alpha sweep (validation)")


def _plot_curves(ax, report, norm):
    for kind, style in (("pgd", "-o"), ("bpda", "--s")):
        c = report["curves"][f"{kind}-{norm}"]
        xs = [e * 255 for e in c["eps"]] if norm == "linf" else c["eps"]
        ax.plot(xs, c["accuracy"], style, markersize=3, label="plain PGD" if kind == "pgd" else "BPDA PGD")
    ax.set(xlabel="eps (x/255)" if norm == "linf" else "eps (L2)", ylabel="accuracy (%)",
           title=f"accuracy against eps, {'L-inf' if norm == 'linf' else 'L2'}")


def sanity_checks(model, batches, args, device, log=print):
    """Checks that the attack is working on this model; returns (all passed, details)."""
    n = len(batches.labels)

    def noise(acc):    # two standard errors of a binomial accuracy, at least one image
        return max(100.0 / n, 2 * 100 * math.sqrt(max(acc / 100 * (1 - acc / 100), 1e-12) / n))

    def run(eps, steps, use_bpda=False):
        gen = torch.Generator(device).manual_seed(args.seed)
        return evaluate(model, batches, make_pgd("linf", eps, eps / 4, steps, generator=gen,
                                                 use_bpda=use_bpda), desc=f"sanity eps {eps * 255:.0f}/255")

    accs = [run(eps, args.steps) for eps in SANITY_EPS_LINF]
    more = run(EPS_LINF, SANITY_STEPS_FACTOR * args.steps)
    base = accs[SANITY_EPS_LINF.index(EPS_LINF)]
    bpda_acc = run(EPS_LINF, args.steps, use_bpda=True)
    checks = {
        "accuracy never rises with eps": all(b <= a + noise(a) for a, b in zip(accs, accs[1:])),
        f"about 0 at eps {SANITY_EPS_LINF[-1] * 255:.0f}/255": accs[-1] <= noise(0.0) + 1.0,
        f"{SANITY_STEPS_FACTOR}x steps do not raise accuracy": more <= base + noise(base),
        "BPDA not weaker than plain PGD": bpda_acc <= base + noise(base),
    }
    details = {"eps": SANITY_EPS_LINF, "accuracy": accs, f"pgd{SANITY_STEPS_FACTOR * args.steps}": more,
               "bpda": bpda_acc, "checks": checks}
    log("sanity (L-inf, eps " + ", ".join(f"{e * 255:.0f}" for e in SANITY_EPS_LINF) + " /255: "
        + ", ".join(f"{a:.1f}" for a in accs) + f"; PGD-{SANITY_STEPS_FACTOR * args.steps} at 8/255 "
        f"{more:.1f}; BPDA {bpda_acc:.1f})")
    for name, ok in checks.items():
        log(f"  {'PASS' if ok else 'FAIL'}  {name}")
    return all(checks.values()), details


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------
def _number(text):
    """A finite float, or a fraction such as 8/255."""
    try:
        if "/" in text:
            num, den = text.split("/")
            value = float(num) / float(den)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (use e.g. 0.031 or 8/255)") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def _int(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _checked(parse, ok, rule):
    """An argparse type: parse(text), then `rule` (the error's words) must hold of the value."""
    def convert(text):
        value = parse(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{rule}, got {text}")
        return value
    return convert


_non_negative = _checked(_number, lambda v: v >= 0, "must be >= 0")
_positive = _checked(_number, lambda v: v > 0, "must be > 0")
_unit_fraction = _checked(_number, lambda v: 0 <= v <= 1, "must be a fraction of the run between 0 and 1")
_positive_int = _checked(_int, lambda v: v > 0, "must be > 0")
_non_negative_int = _checked(_int, lambda v: v >= 0, "must be >= 0")


def _linf_radius(text):
    """An L-inf radius or step in [0,1] pixel units: above 1 is almost surely 8 meant as 8/255."""
    value = _non_negative(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text} is above 1, the whole [0,1] pixel range: did you mean {text}/255?")
    return value


def _attack_list(text):
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in ATTACKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown attack {', '.join(unknown) or '(none)'}; "
                                         f"choose from {', '.join(ATTACKS)}")
    return names


def _alpha_list(text):
    values = [_non_negative(t) for t in text.split(",") if t.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"not a list of alphas: {text!r}")
    return sorted(set(values) | {0.0})      # alpha = 0 is the reference of the clean-accuracy rule


class _Parser(argparse.ArgumentParser):
    def error(self, message):     # one line, not the whole usage block
        message = message.replace("argument ", "", 1) if message.startswith("argument ") else message
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv=None):
    p = _Parser(description="Train and honestly evaluate a robust CIFAR-10 WideResNet with MeanSparse.")
    p.add_argument("--model-file", help=f"model file to test, train or calibrate (default {Net.model_file}, "
                                        f"the committed model that Net() loads)")
    p.add_argument("-f", "--force-train", action="store_true", help="train even if the model file exists")
    p.add_argument("-e", "--num-epochs", type=_positive_int,
                   help="training epochs (default 30, or as many as --time-budget allows)")
    g = p.add_argument_group("data and device")
    g.add_argument("--data-dir", help=f"folder holding cifar-10-batches-py/ (default $CIFAR10_DIR, else "
                                      f"{DEFAULT_DATA_DIR}; downloaded there if missing)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="default auto: cuda if there is one")
    g.add_argument("--batch-size", type=_positive_int, default=512,
                   help="training batch, over all processes (default 512)")
    g.add_argument("--eval-batch-size", type=_positive_int,
                   help=f"evaluation and calibration batch (default {GPU_EVAL_BATCH} on CUDA, {CPU_BATCH} on "
                        f"the CPU, where small batches are fastest)")
    g.add_argument("--split", choices=("val", "test"), default="test", help="evaluation split (default test)")
    g.add_argument("--n-eval", type=_positive_int, help="the first N images of the split (default all)")
    g.add_argument("--seed", type=_int, default=0,
                   help="initial weights, data order, attack random starts (default 0)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval", type=_attack_list, default=["natural"], metavar="LIST",
                   help=f"comma-separated attacks from {', '.join(ATTACKS)} (default natural)")
    g.add_argument("--eps-linf", type=_linf_radius, default=EPS_LINF, metavar="EPS",
                   help="L-inf radius of evaluation and training, fractions accepted (default 8/255)")
    g.add_argument("--eps-l2", type=_non_negative, default=EPS_L2, metavar="EPS",
                   help=f"L2 radius (default {EPS_L2:g})")
    g.add_argument("--steps", type=_non_negative_int, default=EVAL_STEPS,
                   help=f"PGD steps of evaluation and calibration (default {EVAL_STEPS})")
    g.add_argument("--step-linf", type=_linf_radius, metavar="SIZE", help="L-inf PGD step (default eps/4)")
    g.add_argument("--step-l2", type=_non_negative, metavar="SIZE", help="L2 PGD step (default eps/4)")
    g.add_argument("--restarts", type=_positive_int, default=1,
                   help="PGD random restarts, worst case kept per image (default 1)")
    g.add_argument("--apgd-iters", type=_positive_int, default=APGD_ITERS,
                   help=f"iterations of each APGD run of apgd-* and the adaptive calibration (default {APGD_ITERS})")
    g.add_argument("--alpha", type=_non_negative,
                   help="MeanSparse alpha for this evaluation only; 0 turns MeanSparse off (default the file's)")
    g.add_argument("--report", metavar="FILE.json", help="write the results as JSON")
    g.add_argument("--plot", metavar="FILE.png", help="plot accuracy against eps, and the alpha sweep and "
                                                      "training curves of this run (matplotlib)")
    g.add_argument("--sanity", action="store_true", help="check that the attack works (PASS/FAIL, exit 1 on FAIL)")
    g = p.add_argument_group("MeanSparse calibration")
    g.add_argument("--calibrate", action="store_true",
                   help="collect statistics on the training split, choose alpha on validation, save")
    g.add_argument("--n-train", type=_positive_int,
                   help="the first N training images, for statistics and training: a smoke run (default all)")
    g.add_argument("--reuse-statistics", action="store_true",
                   help="keep the file's MeanSparse statistics and only choose alpha again (needs no training data)")
    g.add_argument("--alpha-grid", type=_alpha_list, default=_alpha_list(ALPHA_GRID), metavar="LIST",
                   help=f"alphas to try, 0 always among them (default {ALPHA_GRID})")
    g.add_argument("--alpha-criterion", choices=("adaptive", "bpda", "plain"), default="adaptive",
                   help="what picks alpha: the APGD worst case (default), BPDA PGD, or plain PGD, which "
                        "rewards gradient masking (see README)")
    g = p.add_argument_group("training")
    g.add_argument("--arch", help=f"WideResNet DEPTH-WIDTH to train (default {DEFAULT_ARCH}, what Net() builds)")
    g.add_argument("--time-budget", type=_positive, metavar="MINUTES",
                   help="fix the number of epochs so that the whole schedule ends within this time")
    g.add_argument("--train-steps", type=_non_negative_int, default=5,
                   help="PGD steps K of the training attack (default 5; 0: no attack)")
    g.add_argument("--train-step-size", type=_linf_radius, metavar="SIZE",
                   help="step of the training attack at the full eps (default 2.5 eps/K)")
    g.add_argument("--eps-ramp", type=_unit_fraction, default=0.0, metavar="F",
                   help="the training eps rises linearly from 0 over this fraction of the run (default 0: none)")
    g.add_argument("--trades", type=_non_negative, metavar="BETA", help="TRADES instead of PGD-AT (default off)")
    g.add_argument("--awp", type=_non_negative, metavar="GAMMA",
                   help="adversarial weight perturbation of relative size GAMMA, e.g. 5e-3 (default off)")
    g.add_argument("--awp-warmup", type=_non_negative, default=0.0, metavar="EPOCHS",
                   help="epochs without AWP at the start (default 0)")
    g.add_argument("--lr", type=_non_negative, default=0.2, help="peak learning rate (default 0.2)")
    g.add_argument("--warmup-epochs", type=_non_negative, default=2.0, metavar="EPOCHS",
                   help="linear learning-rate warm-up (default 2)")
    g.add_argument("--label-smoothing", type=_non_negative, default=0.0, metavar="S", help="(default 0)")
    g.add_argument("--ema", type=_number, metavar="DECAY", help="EMA of the weights with this decay (default off)")
    g.add_argument("--ema-start", type=_unit_fraction, default=0.0, metavar="F",
                   help="the EMA starts at this fraction of the run, copying the weights before (default 0)")
    g.add_argument("--select-from", type=_unit_fraction, metavar="F",
                   help="from this fraction of the run on, keep the weights (live or EMA) with the best "
                        "validation APGD check (default off: the better of final and EMA by PGD-10)")
    g.add_argument("--select-n", type=_positive_int, default=SELECT_IMAGES, metavar="N",
                   help=f"validation images of each APGD check (default {SELECT_IMAGES})")
    g.add_argument("--val-every", type=_positive_int, default=5, metavar="EPOCHS",
                   help="epochs between validation checks (default 5)")
    g.add_argument("--resume", action="store_true",
                   help="with --force-train: continue training from <model-file>.ckpt; else continue the "
                        "interrupted evaluation in --report (its finished rows kept, an APGD or PGD row continued)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    args = p.parse_args(argv)
    args.model_file_given = args.model_file is not None
    args.model_file = args.model_file or Net.model_file
    args.arch_given = args.arch is not None
    args.arch = args.arch or DEFAULT_ARCH
    args.resume_report = None       # check_run reads it for an evaluation's --resume
    args.saved = None               # "trained", then "calibrated": what this run has saved (interrupt hints)
    args.interrupt_hint = None      # what an interrupted evaluation kept, and how to continue it
    if args.num_epochs and args.time_budget:
        p.error("give -e/--num-epochs or --time-budget, not both")
    if args.ema is not None and not 0 < args.ema < 1:
        p.error("--ema must be between 0 and 1")
    if args.ema_start and args.ema is None:
        p.error("--ema-start needs --ema DECAY")
    if args.label_smoothing >= 1:
        p.error("--label-smoothing must be < 1")
    if args.calibrate and args.alpha is not None:
        p.error("--calibrate chooses alpha itself; drop --alpha")
    if args.reuse_statistics and (not args.calibrate or args.force_train):
        p.error("--reuse-statistics chooses alpha again for an existing model: use it with --calibrate alone")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        p.error("--plot needs matplotlib: pip install matplotlib (or drop --plot; --report keeps the numbers)")
    return args


def pick_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device here; use --device cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def device_name(device):
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def train_config(args):
    return TrainConfig(arch=args.arch, epochs=args.num_epochs if args.num_epochs or args.time_budget else 30,
                       time_budget=args.time_budget, batch_size=args.batch_size, lr=args.lr,
                       warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing,
                       eps=args.eps_linf, attack_steps=args.train_steps, attack_step_size=args.train_step_size,
                       eps_ramp=args.eps_ramp, trades=args.trades, awp=args.awp, awp_warmup=args.awp_warmup,
                       ema=args.ema, ema_start=args.ema_start, select_from=args.select_from,
                       select_n=args.select_n, val_every=args.val_every, n_train=args.n_train, seed=args.seed,
                       compile=args.compile)


def warn(message):
    print(f"warning: {message}", file=sys.stderr)


def _same_file(a, b):
    return os.path.realpath(a) == os.path.realpath(b)


def is_committed_model(path):
    """Is `path` the file Net() loads (relative to here or to this script)?"""
    return any(_same_file(path, p) for p in
               (Net.model_file, os.path.join(os.path.dirname(os.path.abspath(__file__)), Net.model_file)))


def _check_writable(flag, path):
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


def images_of(split, n_eval=None):
    """How many images an evaluation of `split` with --n-eval `n_eval` (None: all) attacks."""
    size = NUM_VAL if split == "val" else 10_000
    return min(n_eval or size, size)


def sweep_progress_file(model_file):
    """Where a calibration of `model_file` keeps its finished alphas until it saves (see `calibrate`)."""
    return model_file + ".calibration.json"


def check_run(args, train_now, world_size):
    """Every check that needs no data and no model, before any work: a bad combination, an output path
    that cannot be written or would overwrite an input or another output, the committed model at risk.
    Raises UserError; returns warnings for what is odd but allowed."""
    odd = []
    writes_model = train_now or args.calibrate
    if world_size > 1 and not args.force_train:
        raise UserError("torchrun is for training: add --force-train (evaluation runs in one process)")
    if args.resume and train_now and not args.force_train:
        raise UserError(f"--resume: {args.model_file} does not exist; to continue training add --force-train")
    checkpoint = args.model_file + ".ckpt"
    if args.resume and args.force_train and not os.path.isfile(checkpoint):
        raise UserError(f"--resume: no checkpoint {checkpoint}; run without --resume to start")
    if args.resume and not train_now:
        args.resume_report = resumable_report(args)
        if args.eval_batch_size is None:        # the same batches give the same APGD random starts
            args.eval_batch_size = args.resume_report.get("eval_batch_size")
        elif args.eval_batch_size != args.resume_report.get("eval_batch_size"):
            odd.append(f"--eval-batch-size {args.eval_batch_size}: {args.report} was made with batches of "
                       f"{args.resume_report.get('eval_batch_size')}, so a continued APGD row starts its random "
                       f"starts from other batches than an uninterrupted run would (as strong, not the same bits)")
    if train_now and not args.resume and (problem := unfinished_run(checkpoint)):
        raise UserError(problem)        # train() would say so too, but only after loading the data
    if not (args.resume and not train_now) and (problem := unfinished_report(args.report)):
        raise UserError(problem)
    if train_now and args.alpha and not args.calibrate:
        raise UserError("--alpha needs MeanSparse statistics, which a newly trained model gets only with "
                        "--calibrate")
    needs_apgd = (any(a.startswith(("apgd-", "aa-")) for a in args.eval)
                  or (args.calibrate and args.alpha_criterion == "adaptive")
                  or (train_now and args.select_from is not None))
    if needs_apgd:
        import_pyautoattack()       # before the work that would end in needing it
    if args.reuse_statistics and train_now:
        raise UserError(f"--reuse-statistics: {args.model_file} does not exist, so it has no statistics to reuse")
    if writes_model and args.n_train and not args.model_file_given:
        raise UserError(f"--n-train makes a smoke run: name its output with --model-file (the default, "
                        f"{args.model_file}, is the committed model)")
    if train_now and is_committed_model(args.model_file) and parse_arch(args.arch) != parse_arch(DEFAULT_ARCH):
        raise UserError(f"--arch {args.arch}: {args.model_file} is the file Net() loads (a WRN-{DEFAULT_ARCH}), "
                        f"which the grader and test_project.py need; pass --model-file for another architecture")
    outputs = [("--model-file", args.model_file)] if writes_model else []
    outputs += [("checkpoint", checkpoint)] if train_now else []
    outputs += [("calibration progress", sweep_progress_file(args.model_file))] if args.calibrate else []
    outputs += [("backup", args.model_file + ".prev")] if writes_model and os.path.exists(args.model_file) else []
    outputs += [(flag, path) for flag, path in (("--report", args.report), ("--plot", args.plot)) if path]
    outputs += [("backup", args.report + ".prev")] if args.report and os.path.exists(args.report) else []
    for i, (flag, path) in enumerate(outputs):
        _check_writable(flag, path)
        for other_flag, other in outputs[:i] + ([] if writes_model else [("--model-file", args.model_file)]):
            if _same_file(path, other):
                raise UserError(f"{flag} {path} is the same file as {other_flag} {other}; writing it would "
                                f"destroy that one: give another name")
    if args.steps == 0 and (args.calibrate or args.sanity or args.plot or
                            any(a.split("-")[0] in ("pgd", "bpda", "transfer") for a in args.eval)):
        odd.append("--steps 0: PGD makes no step, so the PGD rows measure the random start only")
    if args.n_eval and args.n_eval > images_of(args.split):
        odd.append(f"--n-eval {args.n_eval}: the {args.split} split has {images_of(args.split):,} images; using "
                   f"all of them")
    if args.arch_given and not train_now:
        odd.append(f"--arch {args.arch} is ignored: this run does not train, and {args.model_file} brings its "
                   f"own architecture")
    if train_now and not args.force_train:
        odd.append(f"{args.model_file} does not exist, so this run TRAINS a new model from scratch, as if "
                   f"--force-train were given (an estimate of its length follows after the first steps); "
                   f"Ctrl-C now if the path is misspelt")
    return odd


def unfinished_report(path):
    """Why a run must not start over the report at `path`, or None: it holds an interrupted evaluation,
    maybe hours of APGD, which only --resume continues (a run that starts over would keep it as .prev only
    until the next one)."""
    report = read_json(path) if path and os.path.isfile(path) else None
    # no report, one of another tool (replaced, and kept as .prev), or a complete one: nothing to lose
    if not (isinstance(report, dict) and report.get("complete") is False and isinstance(report.get("results"), dict)):
        return None
    rows = [f"{name} ({row['n_done']} of {row['n']} images)" if row.get("complete") is False else name
            for name, row in report["results"].items() if isinstance(row, dict)]
    return (f"--report {path} holds an unfinished evaluation (finished: {', '.join(rows) or 'nothing yet'}): "
            f"continue it with --resume (the evaluation's flags alone, without --force-train or --calibrate), "
            f"or delete it or give another --report to start over")


def resumable_report(args):
    """The report an evaluation's --resume continues: readable, and made of the same model file, split,
    images and seed as this run (its rows' own settings are compared row by row when they are reused)."""
    if args.calibrate:
        raise UserError("--resume continues training (with --force-train) or an evaluation (with --report); an "
                        "interrupted calibration continues by itself: drop --resume")
    if not args.report:
        raise UserError("--resume without --force-train continues an interrupted evaluation: give its --report")
    if not os.path.isfile(args.report):
        raise UserError(f"--resume: no report {args.report}; run without --resume to start")
    try:
        with open(args.report) as f:
            report = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"--resume: cannot read {args.report} ({e})") from None
    if not isinstance(report, dict) or not isinstance(report.get("results"), dict):
        raise UserError(f"--resume: {args.report} is not a report of model.py")
    expected = {"model file (sha256)": ("model_sha256", file_sha256(args.model_file)),
                "--split": ("split", args.split), "number of images": ("n", images_of(args.split, args.n_eval)),
                "--seed": ("seed", args.seed)}
    for what, (key, value) in expected.items():
        if report.get(key) != value:
            there = report.get(key, "not recorded")
            raise UserError(f"--resume: {args.report} was made with another {what} ({there} there, {value} here); "
                            f"repeat its own command (in the report) with --resume, or run without --resume")
    return report


@contextlib.contextmanager
def write_lock(target, flag="--model-file"):
    """Holds <target>.lock (an fcntl lock) while this run may write `target` (the model file, --report): a
    second run that would write it stops at once, naming the first. No-op where fcntl does not exist
    (Windows)."""
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
            holder = f.read().strip() or "another process"
            raise UserError(f"{target} is being written by another run ({holder}); wait for it to end "
                            f"or give this one another {flag}") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                f"{' '.join(['./model.py'] + sys.argv[1:])}")
        f.flush()
        try:
            yield
        finally:
            os.unlink(path)     # before the lock is released, so that no one locks a file about to vanish


def apgd_cost_note(args):
    """A note before APGD work (apgd-*, aa-* rows, the adaptive calibration) that would take a CPU more than
    ten minutes: a GPU job, and the flags that make it smaller. None when it is short."""
    work, seconds = 0, 0.0
    for name in args.eval:
        if name.startswith(("apgd-", "aa-")):
            images = images_of(args.split, args.n_eval)
            # a --resume keeps the report's finished rows and continues a stopped one: only the rest counts
            old, _ = resumable_row(args.resume_report, name, args, "cpu")
            if old is not None:
                images = 0 if old.get("complete", True) else images - old["n_done"]
            work += images
            seconds += APGD_CPU_SECONDS[name.split("-")[1]] * images
    kept = ""
    if args.calibrate and args.alpha_criterion == "adaptive":
        alphas = {f"{a:g}" for a in set(args.alpha_grid) | {0.0}}
        # an interrupted calibration's finished alphas are taken over (if its settings match): not counted
        progress = read_json(sweep_progress_file(args.model_file))
        entries = progress.get("alphas") if isinstance(progress, dict) else None
        finished = sorted(a for a, e in entries.items() if a in alphas and isinstance(e, dict) and "robust" in e
                          ) if isinstance(entries, dict) else []
        swept = (len(alphas) - len(finished)) * images_of("val", args.n_eval)
        work += swept
        seconds += swept * APGD_CPU_SECONDS["linf"]       # the calibration's criterion is apgd-linf
        if finished:
            kept = (f"; not counted: alpha {', '.join(finished)}, finished in {sweep_progress_file(args.model_file)} "
                    f"(taken over if made with the same weights and settings)")
    seconds *= args.apgd_iters / APGD_ITERS
    if seconds <= 600:
        return None
    return (f"note: this run attacks {work:,} images with APGD (each alpha of the adaptive calibration, each "
            f"apgd-*/aa-* row): about {_duration(seconds)} on a 2-core CPU, a GPU job; --n-eval, --alpha-grid "
            f"and --apgd-iters make it smaller{kept}")


def keep_previous(path, log):
    """Copy `path` (None: nothing to keep) to <path>.prev before a run first replaces it: a retraining that
    turns out worse, or a --model-file or --report that named the wrong file, loses nothing. One generation
    is kept. Returns None, so that the run's later saves keep nothing more."""
    if path is not None:
        with open(path, "rb") as src:
            atomic_write(path + ".prev", lambda f: shutil.copyfileobj(src, f))
        log(f"kept the file this run replaces as {path}.prev")
    return None


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def run(args):
    rank, world_size, local_rank = distributed_context()
    device = pick_device(args.device)
    train_now = args.force_train or not os.path.exists(args.model_file)
    for message in check_run(args, train_now, world_size):
        if rank == 0:
            warn(message)
    if world_size > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    args.eval_batch_size = args.eval_batch_size or (GPU_EVAL_BATCH if device.type == "cuda" else CPU_BATCH)
    with contextlib.ExitStack() as locks:
        if (train_now or args.calibrate) and rank == 0:
            locks.enter_context(write_lock(args.model_file))
        if args.report and rank == 0:       # two runs rewriting one report after every batch would mix them
            locks.enter_context(write_lock(args.report, "--report"))
        return _run(args, device, train_now, rank, world_size)


def _run(args, device, train_now, rank, world_size):
    data_dir = resolve_data_dir(args.data_dir)
    log = tqdm.write if rank == 0 else (lambda *a, **k: None)     # tqdm.write: lines between progress bars
    if device.type == "cpu" and (note := apgd_cost_note(args)):
        log(note)
    checkpoint_path = args.model_file + ".ckpt"
    train_split = (load_cifar10(data_dir, "train") if train_now or (args.calibrate and not args.reuse_statistics)
                   else None)
    # the file as it was before this run, kept as <model-file>.prev when the run first replaces it
    previous = args.model_file if rank == 0 and os.path.isfile(args.model_file) else None
    if train_now:
        cfg = train_config(args)
        if device.type == "cpu" and args.n_train is None and rank == 0:
            log("note: training on the CPU takes days; use a GPU, or --n-train/--arch for a smoke run")
        torch.manual_seed(args.seed)        # the initial weights: the same command gives the same model
        model = build_model(cfg.arch).to(device)
        model, info = train(model, train_split, load_cifar10(data_dir, "val"), cfg,
                            device=device, checkpoint_path=checkpoint_path, resume=args.resume, log=log)
        meta = {"training": info}
        if world_size > 1:
            torch.distributed.destroy_process_group()
            if rank != 0:
                return 0
        # saved before calibration and evaluation: an interruption from here on keeps the trained weights
        previous = keep_previous(previous, log)
        model.save(args.model_file, meta)
        args.saved = "trained"
        if os.path.exists(checkpoint_path):
            os.unlink(checkpoint_path)      # the model file now holds everything the checkpoint did
        log(f"saved {args.model_file}")
    else:
        model = load_model(args.model_file, device)
        meta = dict(model.meta)
    model.eval().to(memory_format=torch.channels_last)     # faster convolutions on GPUs and CPUs alike
    if args.calibrate:
        meta["calibration"] = _calibrate_cli(model, args, train_split, data_dir, device, log)
        previous = keep_previous(previous, log)
        model.save(args.model_file, meta)
        args.saved = "calibrated"
        if os.path.exists(sweep_progress_file(args.model_file)):
            os.unlink(sweep_progress_file(args.model_file))     # the model file now holds the sweep
        log(f"saved {args.model_file} (calibrated)")
    if args.alpha is not None:
        calibrated = meta.get("calibration", {}).get("sweep")
        if args.alpha > 0 and not calibrated:
            raise UserError(f"{args.model_file}: has no MeanSparse statistics; run --calibrate first")
        largest = max((row["alpha"] for row in calibrated or []), default=0.0)
        if args.alpha > largest:
            warn(f"--alpha {args.alpha:g} is above the largest calibrated value ({largest:g}): MeanSparse will "
                 f"replace most activations by their channel means")
        set_alpha(model, args.alpha)
    report = _evaluate_cli(model, args, data_dir, device, log)
    if train_now or args.calibrate:
        for part in ("training", "calibration"):
            if part in meta:
                report[part] = meta[part]
        if args.alpha is None:
            results = {name: {k: v for k, v in row.items() if k != "per_image"}     # the report keeps those
                       for name, row in report["results"].items()}
            meta["evaluation"] = {"split": report["split"], "n": report["n"], "alpha": report["alpha"],
                                  "results": results}
            model.save(args.model_file, meta)       # record the measured figures with the weights
    if args.plot:
        plot_report(report, args.plot, f"{model.arch_name}, alpha {report['alpha']:g}, n={report['n']}")
        log(f"wrote {args.plot}")
    if args.report:
        write_report(report, args)
        log(f"wrote {args.report}")
    return 0 if report.get("sanity", {}).get("passed", True) else 1


def _calibrate_cli(model, args, train_split, data_dir, device, log):
    val_set = load_cifar10(data_dir, "val")
    if args.n_eval:
        val_set = tuple(t[:args.n_eval] for t in val_set)
    if args.reuse_statistics:
        previous = model.meta.get("calibration")
        if not previous:
            raise UserError(f"--reuse-statistics: {args.model_file} has no MeanSparse statistics yet; drop the flag")
        n_train, stats_batches = previous.get("n_train"), None
        log(f"calibrating MeanSparse: the file's statistics ({n_train} training images), alpha sweep on "
            f"{len(val_set[1])} validation images")
    else:
        stats_set = tuple(t[:args.n_train] for t in train_split) if args.n_train else train_split
        n_train, stats_batches = len(stats_set[1]), Batches(*stats_set, args.eval_batch_size, device=device)
        log(f"calibrating MeanSparse: statistics on {n_train} training images, alpha sweep on "
            f"{len(val_set[1])} validation images")
    alpha, sweep = calibrate(model, stats_batches, Batches(*val_set, args.eval_batch_size, device=device),
                             args.alpha_grid, steps=args.steps, eps=args.eps_linf, criterion=args.alpha_criterion,
                             apgd_iters=args.apgd_iters, seed=args.seed, log=log,
                             progress_path=sweep_progress_file(args.model_file))
    return {"alpha": alpha, "criterion": args.alpha_criterion, "steps": args.steps, "eps": args.eps_linf,
            "apgd_iters": args.apgd_iters if args.alpha_criterion == "adaptive" else None,
            "n_train": n_train, "n_val": len(val_set[1]), "sweep": sweep}


def _evaluate_cli(model, args, data_dir, device, log):
    """Every attack of --eval, then --sanity and --plot's curves; returns the report. Interrupted, it writes
    the rows finished so far into --report, marked incomplete, and re-raises. With --resume it takes over
    the rows of that report (`args.resume_report`, checked by `check_run`) made with the same settings, and
    continues an interrupted apgd-* or PGD row after its last finished batch."""
    images, labels = load_cifar10(data_dir, args.split)
    if args.n_eval:
        images, labels = images[:args.n_eval], labels[:args.n_eval]
    batches = Batches(images, labels, args.eval_batch_size, device=device)
    alpha = get_alpha(model)
    report = {"model_file": args.model_file, "split": args.split, "n": len(labels), "alpha": alpha,
              "seed": args.seed, "eval_batch_size": args.eval_batch_size, "device": device_name(device),
              "torch": torch.__version__, "command": " ".join(["./model.py"] + sys.argv[1:]), "complete": False,
              "results": {}}
    previous = args.resume_report
    if previous:
        if previous.get("alpha") != alpha:
            raise UserError(f"--resume: {args.report} was made at alpha {previous.get('alpha')}, this run evaluates "
                            f"at alpha {alpha:g}; give the same --alpha, or run without --resume")
        report["resumed"] = previous.get("resumed", []) + [{"command": previous.get("command"),
                                                            "eval_batch_size": previous.get("eval_batch_size")}]
    # the report it replaces is kept once, now; from here on the report is rewritten (marked incomplete)
    # after every row and every batch of an APGD or PGD row, so that even a killed run (kill -9, a lost
    # machine) keeps them
    keep_previous(args.report if args.report and os.path.isfile(args.report) else None, log)
    save = (lambda: write_report(report, args)) if args.report else (lambda: None)
    name = None
    try:
        for name in args.eval:
            t0, before, done, rest = time.perf_counter(), 0.0, None, batches
            old, stale = resumable_row(previous, name, args, device.type)
            if stale:
                log(f"{name}: {stale}; measuring it again")
            if old is not None and old.get("complete", True):
                report["results"][name] = old
                log(f"{name:14s} {old['accuracy']:6.2f} %  on {old['n']} images  (kept from {args.report})")
                continue
            if old is not None:         # an apgd-* or PGD row interrupted between two batches
                done, before = {"per_image": old["per_image"], **old["progress"]}, old["seconds"]
                rest = batches.after(old["n_done"])
                report["results"][name] = old       # until its next batch is done
                log(f"{name}: continuing after the first {old['n_done']} of {len(labels)} images")

            def keep_batches(progress):
                n_done = len(progress["per_image"])
                report["results"][name] = {"complete": False, "n_done": n_done,
                                           "accuracy_so_far": 100.0 * progress["per_image"].count("1") / n_done,
                                           "n": len(labels), "seconds": round(before + time.perf_counter() - t0, 2),
                                           **attack_settings(name, args), "per_image": progress["per_image"],
                                           "progress": {k: v for k, v in progress.items() if k != "per_image"}}
                save()

            accuracy, settings = run_attack(model, name, rest, args, device, done=done, on_batch=keep_batches)
            report["results"][name] = {"accuracy": accuracy, "n": len(labels),
                                       "seconds": round(before + time.perf_counter() - t0, 2), **settings}
            save()
            notes = []
            if name.startswith("apgd-"):
                notes.append("worst case")
            if name.startswith(("aa-", "apgd-")) and alpha > 0:
                notes.append("under BPDA")
            log(f"{name:14s} {accuracy:6.2f} %  on {len(labels)} images  "
                f"{report['results'][name]['seconds']:8.1f} s" + (f" ({', '.join(notes)})" if notes else ""))
        if "natural" in report["results"]:
            print(f"Model natural accuracy ({args.split}): {report['results']['natural']['accuracy']:.2f}")
        if args.sanity:
            passed, report["sanity"] = sanity_checks(model, batches, args, device, log=log)
            report["sanity"]["passed"] = passed
            log(f"sanity: {'PASS' if passed else 'FAIL'}")
        if args.plot:
            report["curves"] = robustness_curves(model, batches, args, device)
    except KeyboardInterrupt:
        row = report["results"].get(name, {})
        if row.get("complete") is False:        # an APGD or PGD row stopped part way: its finished batches
            log(f"\n{name:14s} {row['accuracy_so_far']:6.2f} %  on the first {row['n_done']} of {len(labels)} "
                f"images (interrupted)")
        if args.report:
            save()
            again = ("continue them with --resume and the evaluation's flags alone (without --force-train or "
                     "--calibrate)" if args.saved else "repeat the command with --resume to continue")
            args.interrupt_hint = f": the rows finished so far are in {args.report}, marked incomplete; {again}"
        raise
    report["complete"] = True
    return report


def write_report(report, args):
    """Write --report atomically, with the sha256 of the model file it measured."""
    report = {**report, "model_sha256": file_sha256(args.model_file)}
    atomic_write(args.report, lambda f: f.write(json.dumps(report, indent=2).encode()))


def main(argv=None):
    signal.signal(signal.SIGTERM, _raise_interrupt)    # SIGTERM stops as cleanly as Ctrl-C
    args = None
    try:
        args = parse_args(argv)
        return run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        checkpoint = args.model_file + ".ckpt" if args else None
        hint = (f"; training keeps its last finished epoch in {checkpoint}: repeat the command with --resume "
                f"(or make a model file of it now: python3 bench/rescue.py {checkpoint} OUT.pth)"
                if checkpoint and os.path.exists(checkpoint) else "")
        sweep = sweep_progress_file(args.model_file) if args and args.calibrate else None
        if args and args.interrupt_hint:    # it names the report and the command that continues it
            hint = args.interrupt_hint
        elif not hint and sweep and os.path.exists(sweep):
            again = (f"run the calibration again without --force-train ({args.model_file} holds the trained model)"
                     if args.force_train else "run the same command again")
            hint = f"; the calibration keeps what it finished in {sweep}: {again} to continue"
        elif not hint and args and args.saved:      # the same command again would redo what is saved
            then = ("run the calibration again without --force-train" if args.saved == "trained" and args.calibrate
                    else "evaluate it without --force-train" if args.saved == "trained"
                    else "evaluate it without --force-train or --calibrate")
            hint = f"; {args.model_file} holds the {args.saved} model: {then} to continue"
        print(f"\ninterrupted{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
