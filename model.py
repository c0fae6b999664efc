#!/usr/bin/env python3
"""Adversarially robust CIFAR-10: a WideResNet with MeanSparse, PGD training and honest evaluation.

One file, read top to bottom: config -> data -> model -> attacks -> training -> MeanSparse calibration
-> evaluation -> CLI. Nothing runs on import.

Examples
    ./model.py                                     # natural accuracy of models/default_model.pth (test)
    ./model.py --eval natural,pgd-linf,bpda-linf --n-eval 1000 --report r.json
    ./model.py --calibrate --model-file copy.pth   # MeanSparse statistics + alpha chosen on validation
    ./model.py --force-train --time-budget 7 --calibrate --eval natural,pgd-linf,bpda-linf
    torchrun --nproc_per_node=2 model.py --force-train -e 30

The grading platform imports this file, builds `Net()`, calls `net.load_for_testing(project_dir)` and
feeds [0,1] images (normalisation happens inside the model).
"""
import argparse
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
import signal
import sys
import tempfile
import time

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
PLOT_EPS = {"linf": [e / 255 for e in (0, 2, 4, 6, 8, 10, 12, 16)],
            "l2": [0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]}
SANITY_EPS_LINF = [e / 255 for e in (0, 4, 8, 16, 32, 64)]   # the last one must break every image
SANITY_STEPS_FACTOR = 5


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
        if self.mode == "off":
            return x
        mean = self.mean.view(1, -1, 1, 1).to(x.dtype)
        band = (self.alpha * self.std).view(1, -1, 1, 1).to(x.dtype)
        out = torch.where((x - mean).abs() < band, mean, x)
        if self.mode == "bpda":
            return x + (out - x).detach()
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

    def load(self, path):
        """Load a file written by `save` (or a plain state dict) onto this net's device, as float32."""
        payload = read_model_file(path)
        arch = payload.get("arch")
        if arch is not None and dict(arch) != self.arch:
            raise UserError(f"{path}: holds a WRN-{arch.get('depth')}-{arch.get('widen_factor')}, "
                            f"this network is a {self.arch_name}; pass the file as --model-file "
                            f"(which rebuilds its architecture) or retrain with --force-train")
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
        """Load the committed weights and leave the model in eval mode (the platform's entry point)."""
        self.load(os.path.join(project_dir, Net.model_file))
        self.eval()
        return self


def build_model(arch=DEFAULT_ARCH):
    depth, width = parse_arch(arch) if isinstance(arch, str) else (arch["depth"], arch["widen_factor"])
    return Net() if (depth, width) == parse_arch(DEFAULT_ARCH) else WideResNet(depth, width)


def atomic_save(obj, path):
    """torch.save to a temporary file beside `path`, then rename: a crash never leaves a broken file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)       # mkstemp's 0600 would make the saved file private
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_model_file(path):
    """The payload of a model file as a dict with "state_dict" (a plain state dict is wrapped)."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such model file; check the path, or train one with "
                        f"./model.py --force-train --model-file {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: not a readable model file ({e.__class__.__name__}); "
                        f"restore it (git checkout {path}) or retrain with --force-train") from None
    if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        return payload
    if isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
        return {"state_dict": payload}
    raise UserError(f"{path}: holds no state dict; save models with Net.save or torch.save(net.state_dict())")


def load_model(path, device="cpu"):
    """Build the architecture recorded in `path` (WRN-28-4 for a plain state dict) and load it."""
    payload = read_model_file(path)
    model = build_model(payload.get("arch") or DEFAULT_ARCH).to(device)
    return model.load(path).eval()


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
    eps: float = EPS_LINF
    attack_steps: int = 5           # K; step size 2.5 * eps / K
    trades: float = None            # TRADES beta; None: plain PGD-AT (cross-entropy on adversarial batch)
    ema: float = None               # EMA decay; None: no EMA
    val_every: int = 5              # epochs between validation checks
    n_train: int = None             # first N training images (smoke runs)
    seed: int = 0
    compile: bool = False


def lr_at(epoch_progress, total_epochs, cfg):
    """One-cycle: linear warm-up over warmup_epochs (at most half the run), linear decay to 0 at the end."""
    warmup = min(cfg.warmup_epochs, total_epochs / 2)
    if epoch_progress < warmup:
        return cfg.lr * epoch_progress / warmup
    return cfg.lr * max(0.0, (total_epochs - epoch_progress) / max(total_epochs - warmup, 1e-12))


class EMA:
    """Exponential moving average of the weights, decay warmed up as min(decay, (1+n)/(10+n))."""

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


def train_step(model, core, x, y, cfg, optimizer, noise_generator, device):
    """One PGD-AT (or TRADES) step; returns (summed loss, correct count on the adversarial batch)."""
    core.eval()                     # craft with BatchNorm in eval mode: no statistics updates
    with autocast_for(device):
        if cfg.attack_steps == 0:   # plain (non-adversarial) training, e.g. as a speed reference
            x_adv = x
        elif cfg.trades is None:
            x_adv = pgd(core, x, y, norm="linf", eps=cfg.eps, step_size=2.5 * cfg.eps / cfg.attack_steps,
                        steps=cfg.attack_steps, generator=noise_generator)
        else:
            with torch.no_grad():
                p_clean = F.softmax(core(x).float(), 1)
            x_adv = pgd(core, x, p_clean, norm="linf", eps=cfg.eps,
                        step_size=2.5 * cfg.eps / cfg.attack_steps, steps=cfg.attack_steps,
                        generator=noise_generator, loss_fn=kl_sum)
    core.train()
    with autocast_for(device):
        if cfg.trades is None:
            logits = model(x_adv).float()
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        else:
            both = model(torch.cat([x, x_adv])).float()
            clean, logits = both[:len(x)], both[len(x):]
            loss = (F.cross_entropy(clean, y, label_smoothing=cfg.label_smoothing)
                    + cfg.trades * F.kl_div(F.log_softmax(logits, 1), F.softmax(clean, 1),
                                            reduction="batchmean"))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
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


def budget_epochs(cfg, epoch, per_epoch, spent, val_seconds, device, world_size):
    """Total epochs such that the whole schedule ends within cfg.time_budget minutes, given the seconds
    one epoch takes once warmed up, the seconds spent so far and the cost of one validation."""
    per_epoch += val_seconds * (2 if cfg.ema else 1) / cfg.val_every
    remaining = cfg.time_budget * 60 - spent
    fit = epoch + int(0.97 * remaining / per_epoch)
    total = max(fit, epoch + 1, math.ceil(2 * cfg.warmup_epochs))
    if world_size > 1:      # every rank must run the same schedule: rank 0 decides
        t = torch.tensor([total], device=device)
        torch.distributed.broadcast(t, 0)
        total = int(t.item())
    return total


def save_checkpoint(state, path):
    atomic_save(state, path)


def _rng_states(data_gen, noise_gen):
    return {"data": data_gen.get_state(), "noise": noise_gen.get_state(), "torch": torch.get_rng_state()}


def train(model, train_set, val_set, cfg, *, device, checkpoint_path, resume=False, log=print):
    """PGD adversarial training of `model` (in place) on train_set = (images, labels).

    Writes `checkpoint_path` atomically after every epoch; resume=True continues from it and gives the
    same result as an uninterrupted run. Returns (model to keep, info dict). Under torchrun every rank
    calls this; rank 0 alone logs, validates and writes. MeanSparse is bypassed (alpha is 0 until
    calibration anyway).
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
    images, labels = train_set
    if cfg.n_train is not None:
        images, labels = images[:cfg.n_train], labels[:cfg.n_train]
    data_gen = torch.Generator().manual_seed(cfg.seed)
    noise_gen = torch.Generator(device).manual_seed(cfg.seed + 1 + rank)
    batches = Batches(images, labels, cfg.batch_size // world_size, device=device, train=True,
                      generator=data_gen, rank=rank, world_size=world_size, channels_last=channels_last)
    if len(batches) == 0:
        raise UserError(f"{len(labels)} training images make no batch of {cfg.batch_size}; "
                        f"lower --batch-size or raise --n-train")
    val_batches = Batches(*val_set, cfg.batch_size, device=device, channels_last=channels_last) if master else None

    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=0.0, momentum=cfg.momentum, nesterov=True)
    ema = EMA(model, cfg.ema) if cfg.ema else None
    config = dataclasses.asdict(cfg)
    start_epoch, total_epochs, history, elapsed = 0, cfg.epochs, [], 0.0
    if resume:
        if not os.path.isfile(checkpoint_path):
            raise UserError(f"--resume: no checkpoint {checkpoint_path}; run without --resume to start")
        ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=True)   # RNG states stay on the CPU
        changed = {k: (ckpt["config"].get(k), v) for k, v in config.items()
                   if k not in ("compile", "val_every") and ckpt["config"].get(k) != v}
        if changed:
            raise UserError(f"--resume: {checkpoint_path} was made with other settings "
                            f"({', '.join(f'{k}: {a} there, {b} now' for k, (a, b) in changed.items())}); "
                            f"repeat its command, or delete it to start over")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ema:
            ema.model.load_state_dict(ckpt["ema"])
            ema.updates = ckpt["ema_updates"]
        data_gen.set_state(ckpt["rng"]["data"])
        noise_gen.set_state(ckpt["rng"]["noise"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        start_epoch, total_epochs = ckpt["epoch"], ckpt["total_epochs"]
        history, elapsed = list(ckpt["history"]), ckpt["elapsed"]
        if master:
            log(f"resuming {checkpoint_path} after epoch {start_epoch} of {total_epochs}")
    elif master and os.path.isfile(checkpoint_path):
        log(f"note: starting over; {checkpoint_path} (an unfinished run) will be overwritten. Ctrl-C and add "
            f"--resume to continue it instead")

    ddp_model = model
    if world_size > 1:
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    core = model
    if cfg.compile:
        ddp_model, core = torch.compile(ddp_model), torch.compile(model)

    steps_per_epoch = len(batches)
    epoch = start_epoch
    t_start = time.perf_counter() - elapsed
    while total_epochs is None or epoch < total_epochs:
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen, steady = 0, None
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{total_epochs or '?'}", disable=not master,
                   leave=False, dynamic_ncols=True)
        for i, (x, y) in enumerate(bar):
            progress = epoch + i / steps_per_epoch
            # until the length is fixed (time budget, during epoch 1) only the warm-up applies
            lr = lr_at(progress, total_epochs or math.inf, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, corr = train_step(ddp_model, core, x, y, cfg, optimizer, noise_gen, device)
            loss_sum += loss
            correct += corr
            seen += len(y)
            if ema:
                ema.update(model)
            if total_epochs is None and i + 1 == 5 and steps_per_epoch > 10:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                steady = (time.perf_counter(), i + 1)     # after cudnn autotuning / compilation
            if (i + 1) % 20 == 0 or i + 1 == steps_per_epoch:
                mean_loss = loss_sum.item() / seen        # the one host sync, every 20 steps
                if not math.isfinite(mean_loss):
                    kept = f"; the last good epoch is in {checkpoint_path}" if epoch > 0 else ""
                    raise TrainingError(f"loss became {mean_loss} in epoch {epoch + 1}: lower --lr "
                                        f"(now {cfg.lr}){kept}")
                bar.set_postfix(loss=f"{mean_loss:.3f}", adv_acc=f"{100 * correct.item() / seen:.1f}",
                                img_s=f"{seen * world_size / (time.perf_counter() - t0):.0f}", lr=f"{lr:.3f}")
        bar.close()
        epoch += 1
        epoch_time = time.perf_counter() - t0
        record = {"epoch": epoch, "loss": loss_sum.item() / seen, "adv_train_acc": 100 * correct.item() / seen,
                  "seconds": round(epoch_time, 2), "images_per_s": round(seen * world_size / epoch_time)}
        fix_length = total_epochs is None
        val_seconds = 0.0
        if master and (fix_length or epoch % cfg.val_every == 0 or epoch == total_epochs):
            tv = time.perf_counter()
            record["val_clean"], record["val_pgd10"] = validate(model, val_batches, seed=cfg.seed)
            val_seconds = time.perf_counter() - tv
        if fix_length:
            per_epoch = epoch_time      # too few steps to leave out the warm-up: the whole epoch
            if steady is not None:
                per_epoch = (t0 + epoch_time - steady[0]) / (steps_per_epoch - steady[1]) * steps_per_epoch
            total_epochs = budget_epochs(cfg, epoch, per_epoch, time.perf_counter() - t_start, val_seconds,
                                         device, world_size)
            if master:
                log(f"time budget {cfg.time_budget:g} min at {per_epoch:.1f} s per epoch: {total_epochs} epochs")
        history.append(record)
        if master:
            val = (f", val clean {record['val_clean']:.2f} PGD-10 {record['val_pgd10']:.2f}"
                   if "val_clean" in record else "")
            log(f"epoch {epoch}/{total_epochs}: loss {record['loss']:.4f}, adv train acc "
                f"{record['adv_train_acc']:.2f}, {record['images_per_s']} img/s, {epoch_time:.1f} s{val}")
            save_checkpoint({"epoch": epoch, "total_epochs": total_epochs, "config": config,
                             "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "ema": ema.model.state_dict() if ema else None,
                             "ema_updates": ema.updates if ema else 0,
                             "rng": _rng_states(data_gen, noise_gen), "history": history,
                             "elapsed": time.perf_counter() - t_start}, checkpoint_path)
    elapsed = time.perf_counter() - t_start
    train_seconds = sum(r["seconds"] for r in history)
    model.eval()
    info = {"epochs": total_epochs, "train_images": len(labels), "wall_seconds": round(elapsed, 1),
            "train_seconds": round(train_seconds, 1),
            "images_per_s": round(len(batches) * cfg.batch_size * total_epochs / max(train_seconds, 1e-9)),
            "world_size": world_size, "device": device_name(device), "config": config,
            "history": history, "weights": "final"}
    if world_size > 1:
        checksum = torch.stack([p.detach().double().sum() for p in model.parameters()])   # one per tensor
        gathered = [torch.zeros_like(checksum) for _ in range(world_size)]
        torch.distributed.all_gather(gathered, checksum)
        info["ranks_agree"] = all(torch.equal(g, checksum) for g in gathered)
        if master:
            log(f"weights identical across {world_size} ranks: {info['ranks_agree']}")
    if ema and master:
        final = history[-1]
        ema_clean, ema_robust = validate(ema.model, val_batches, seed=cfg.seed)
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


def choose_alpha(sweep, criterion="bpda", max_clean_drop=CLEAN_DROP_LIMIT):
    """The alpha with the highest `criterion` accuracy among those whose clean accuracy is within
    max_clean_drop points of alpha = 0 (ties: the smaller alpha)."""
    base = next(row for row in sweep if row["alpha"] == 0)
    allowed = [row for row in sweep if row["clean"] >= base["clean"] - max_clean_drop]
    return max(allowed, key=lambda row: (row[criterion], -row["alpha"]))["alpha"]


def calibrate(model, train_batches, val_batches, alphas, *, steps, eps=EPS_LINF, criterion="bpda",
              seed=0, log=print):
    """Collect MeanSparse statistics on train_batches, sweep alphas on val_batches (clean, plain PGD,
    BPDA PGD, L-inf), set the chosen alpha. Returns (alpha, sweep rows)."""
    collect_statistics(model, train_batches)
    model.eval()
    sweep = []
    for alpha in alphas:
        set_alpha(model, alpha)
        gen = torch.Generator(val_batches.images.device)
        row = {"alpha": alpha, "clean": evaluate(model, val_batches, desc=f"alpha {alpha:g} clean")}
        attack = make_pgd("linf", eps, eps / 4, steps, generator=gen.manual_seed(seed))
        row["plain"] = evaluate(model, val_batches, attack, desc=f"alpha {alpha:g} PGD")
        attack = make_pgd("linf", eps, eps / 4, steps, generator=gen.manual_seed(seed), use_bpda=True)
        row["bpda"] = evaluate(model, val_batches, attack, desc=f"alpha {alpha:g} BPDA")
        sweep.append(row)
        log(f"  alpha {alpha:5.3f}: clean {row['clean']:6.2f}  PGD-{steps} {row['plain']:6.2f}  "
            f"BPDA PGD-{steps} {row['bpda']:6.2f}")
    alpha = choose_alpha(sweep, criterion)
    set_alpha(model, alpha)
    note = " (plain PGD sees a masked gradient: this choice may overstate robustness)" \
        if criterion == "plain" else ""
    log(f"chosen alpha {alpha:g} by {criterion} accuracy{note}")
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


def evaluate(model, batches, attack=None, desc="natural", verbose=True):
    """Accuracy (%) of `model` on `batches`, after `attack` (callable(model, x, y) -> x_adv) if given."""
    correct, n = 0, 0
    for x, y in tqdm(batches, desc=desc, leave=False, disable=not verbose):
        if attack is not None:
            x = attack(model, x, y)
        with torch.no_grad():
            correct += (model(x).argmax(1) == y).sum().item()
        n += len(y)
    return 100.0 * correct / max(n, 1)


ATTACKS = ("natural", "pgd-linf", "pgd-l2", "bpda-linf", "bpda-l2", "transfer-linf", "aa-linf", "aa-l2")


def attack_settings(name, args):
    """The settings of attack `name` from the CLI arguments (also written into the report)."""
    if name == "natural":
        return {}
    norm = name.rsplit("-", 1)[1]
    eps = args.eps_linf if norm == "linf" else args.eps_l2
    if name.startswith("aa-"):
        return {"norm": norm, "eps": eps, "version": "standard", "bpda": True}
    step = (args.step_linf if norm == "linf" else args.step_l2) or eps / 4
    return {"norm": norm, "eps": eps, "step_size": step, "steps": args.steps, "restarts": args.restarts,
            "bpda": name.startswith("bpda-"), "crafted_at_alpha": 0.0 if name.startswith("transfer-") else None}


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
    """Standard AutoAttack (pyautoattack) under BPDA through MeanSparse: (accuracy %, details), where
    details has the package version and AutoAttack's own log lines."""
    try:
        import pyautoattack
    except ImportError:
        raise UserError("AutoAttack needs the official code: pip install pyautoattack") from None
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
            _, y_adv = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    details = {"pyautoattack": getattr(pyautoattack, "__version__", "unknown"), "log": handler.lines}
    return 100.0 * (y_adv == y).float().mean().item(), details


def run_attack(model, name, batches, args, device):
    """(accuracy %, settings) of attack `name` on `batches`."""
    settings = attack_settings(name, args)
    if name == "natural":
        return evaluate(model, batches, desc="natural"), settings
    if name.startswith("aa-"):
        accuracy, details = autoattack_accuracy(model, batches.images, batches.labels, norm=settings["norm"],
                                                eps=settings["eps"], batch_size=batches.batch_size,
                                                seed=args.seed, device=device)
        return accuracy, {**settings, **details}
    gen = torch.Generator(device).manual_seed(args.seed)
    attack = make_pgd(settings["norm"], settings["eps"], settings["step_size"], settings["steps"],
                      restarts=settings["restarts"], generator=gen, use_bpda=settings["bpda"],
                      craft_alpha=settings["crafted_at_alpha"])
    return evaluate(model, batches, attack, desc=name), settings


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


def plot_curves(curves, path, title):
    import matplotlib      # optional: parse_args has checked that it is installed
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, norm in zip(axes, ("linf", "l2")):
        for kind, style in (("pgd", "-o"), ("bpda", "--s")):
            c = curves[f"{kind}-{norm}"]
            xs = [e * 255 for e in c["eps"]] if norm == "linf" else c["eps"]
            ax.plot(xs, c["accuracy"], style, label="plain PGD" if kind == "pgd" else "BPDA PGD")
        ax.set_xlabel("eps (x/255)" if norm == "linf" else "eps (L2)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{title}, {'L-inf' if norm == 'linf' else 'L2'}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
def _fraction(text):
    """A float, or a fraction such as 8/255."""
    try:
        if "/" in text:
            num, den = text.split("/")
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (use e.g. 0.031 or 8/255)") from None


def _non_negative(text):
    value = _fraction(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _attack_list(text):
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in ATTACKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown attack {', '.join(unknown) or '(none)'}; "
                                         f"choose from {', '.join(ATTACKS)}")
    return names


def _alpha_list(text):
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"alphas must be >= 0: {text!r}")
    return sorted(set(values) | {0.0})      # alpha = 0 is the reference of the clean-accuracy rule


class _Parser(argparse.ArgumentParser):
    def error(self, message):     # one line, not the whole usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv=None):
    p = _Parser(description="Train and honestly evaluate a robust CIFAR-10 WideResNet with MeanSparse.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-file", default=Net.model_file, help="model file to test, train or calibrate")
    p.add_argument("-f", "--force-train", action="store_true", help="train even if the model file exists")
    p.add_argument("-e", "--num-epochs", type=_positive_int, default=None,
                   help="training epochs (default 30, or as many as --time-budget allows)")
    g = p.add_argument_group("data and device")
    g.add_argument("--data-dir", default=None,
                   help=f"folder holding cifar-10-batches-py/ (default $CIFAR10_DIR, else {DEFAULT_DATA_DIR}; "
                        "downloaded there if missing)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument("--batch-size", type=_positive_int, default=512)
    g.add_argument("--split", choices=("val", "test"), default="test", help="evaluation split")
    g.add_argument("--n-eval", type=_positive_int, default=None, help="first N images of the split (default all)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval", type=_attack_list, default=["natural"], metavar="LIST",
                   help="comma-separated: " + ", ".join(ATTACKS))
    g.add_argument("--eps-linf", type=_non_negative, default=EPS_LINF, help="L-inf radius (8/255 accepted)")
    g.add_argument("--eps-l2", type=_non_negative, default=EPS_L2, help="L2 radius")
    g.add_argument("--steps", type=int, default=EVAL_STEPS, help="PGD steps (evaluation and calibration)")
    g.add_argument("--step-linf", type=_non_negative, default=None, help="L-inf step size (default eps/4)")
    g.add_argument("--step-l2", type=_non_negative, default=None, help="L2 step size (default eps/4)")
    g.add_argument("--restarts", type=_positive_int, default=1)
    g.add_argument("--alpha", type=_non_negative, default=None,
                   help="MeanSparse alpha for this evaluation only (0 turns MeanSparse off)")
    g.add_argument("--report", default=None, metavar="FILE.json", help="write the results as JSON")
    g.add_argument("--plot", default=None, metavar="FILE.png", help="plot accuracy against eps (matplotlib)")
    g.add_argument("--sanity", action="store_true", help="check that the attack works (PASS/FAIL, exit 1 on FAIL)")
    g = p.add_argument_group("MeanSparse calibration")
    g.add_argument("--calibrate", action="store_true",
                   help="collect statistics on the training split, choose alpha on validation, save")
    g.add_argument("--n-train", type=_positive_int, default=None,
                   help="first N training images (statistics, and training)")
    g.add_argument("--alpha-grid", type=_alpha_list, default=_alpha_list(ALPHA_GRID))
    g.add_argument("--alpha-criterion", choices=("bpda", "plain"), default="bpda",
                   help="accuracy that picks alpha; plain measures a masked gradient")
    g = p.add_argument_group("training")
    g.add_argument("--arch", default=DEFAULT_ARCH, help="WideResNet DEPTH-WIDTH (Net() is always 28-4)")
    g.add_argument("--time-budget", type=_non_negative, default=None, metavar="MINUTES",
                   help="fix the number of epochs so the whole schedule ends within this time")
    g.add_argument("--train-steps", type=_positive_int, default=5, help="PGD steps K of the training attack")
    g.add_argument("--trades", type=_non_negative, default=None, metavar="BETA", help="TRADES instead of PGD-AT")
    g.add_argument("--lr", type=_non_negative, default=0.2, help="peak learning rate")
    g.add_argument("--warmup-epochs", type=_non_negative, default=2.0)
    g.add_argument("--label-smoothing", type=_non_negative, default=0.0)
    g.add_argument("--ema", type=_non_negative, default=None, metavar="DECAY", help="EMA of the weights")
    g.add_argument("--val-every", type=_positive_int, default=5, help="epochs between validation checks")
    g.add_argument("--resume", action="store_true", help="continue from <model-file>.ckpt")
    g.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    args = p.parse_args(argv)
    if args.steps < 0:
        p.error("--steps must be >= 0")
    if args.num_epochs and args.time_budget:
        p.error("give -e/--num-epochs or --time-budget, not both")
    if args.time_budget is not None and args.time_budget <= 0:
        p.error("--time-budget must be > 0")
    if args.ema is not None and not 0 < args.ema < 1:
        p.error("--ema must be between 0 and 1")
    if args.label_smoothing >= 1:
        p.error("--label-smoothing must be < 1")
    if args.calibrate and args.alpha is not None:
        p.error("--calibrate chooses alpha itself; drop --alpha")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        p.error("--plot needs matplotlib: pip install matplotlib (or drop --plot; --report keeps the numbers)")
    for path in (args.report, args.plot):
        if path and not os.access(os.path.dirname(os.path.abspath(path)), os.W_OK):
            p.error(f"cannot write {path}: its folder does not exist or is not writable")
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
                       attack_steps=args.train_steps, trades=args.trades, ema=args.ema,
                       val_every=args.val_every, n_train=args.n_train, seed=args.seed, compile=args.compile)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def run(args):
    rank, world_size, local_rank = distributed_context()
    device = pick_device(args.device)
    if world_size > 1:
        if not args.force_train:
            raise UserError("torchrun is for training: add --force-train (evaluation runs in one process)")
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    data_dir = resolve_data_dir(args.data_dir)
    log = print if rank == 0 else (lambda *a, **k: None)
    checkpoint_path = args.model_file + ".ckpt"
    train_now = args.force_train or not os.path.exists(args.model_file)
    if train_now and args.alpha and not args.calibrate:
        raise UserError("--alpha needs MeanSparse statistics, which a newly trained model gets only with "
                        "--calibrate")
    meta = {}
    train_split = load_cifar10(data_dir, "train") if train_now or args.calibrate else None
    if train_now:
        if not args.force_train:
            log(f"{args.model_file} does not exist: training it")
        cfg = train_config(args)
        if device.type == "cpu" and args.n_train is None and rank == 0:
            log("note: training on the CPU takes days; use a GPU, or --n-train/--arch for a smoke run")
        torch.manual_seed(args.seed)        # the initial weights: the same command gives the same model
        model = build_model(cfg.arch).to(device)
        model, info = train(model, train_split, load_cifar10(data_dir, "val"), cfg,
                            device=device, checkpoint_path=checkpoint_path, resume=args.resume, log=log)
        meta["training"] = info
        if world_size > 1:
            torch.distributed.destroy_process_group()
            if rank != 0:
                return 0
    else:
        if args.resume:
            raise UserError("--resume continues training: add --force-train")
        model = load_model(args.model_file, device)
        meta = dict(model.meta)
    model.eval()
    channels_last = device.type == "cuda"      # faster convolutions there, same results
    if channels_last:
        model.to(memory_format=torch.channels_last)

    if args.calibrate:
        stats_set = tuple(t[:args.n_train] for t in train_split) if args.n_train else train_split
        val_set = load_cifar10(data_dir, "val")
        if args.n_eval:
            val_set = tuple(t[:args.n_eval] for t in val_set)
        log(f"calibrating MeanSparse: statistics on {len(stats_set[1])} training images, alpha sweep on "
            f"{len(val_set[1])} validation images")
        alpha, sweep = calibrate(model, Batches(*stats_set, args.batch_size, device=device,
                                                channels_last=channels_last),
                                 Batches(*val_set, args.batch_size, device=device, channels_last=channels_last),
                                 args.alpha_grid,
                                 steps=args.steps, eps=args.eps_linf, criterion=args.alpha_criterion,
                                 seed=args.seed, log=log)
        meta["calibration"] = {"alpha": alpha, "criterion": args.alpha_criterion, "steps": args.steps,
                               "eps": args.eps_linf, "n_train": len(stats_set[1]), "n_val": len(val_set[1]),
                               "sweep": sweep}
    if train_now or args.calibrate:
        model.save(args.model_file, meta)
        if os.path.exists(checkpoint_path) and train_now:
            os.unlink(checkpoint_path)      # the model file now holds everything the checkpoint did
        log(f"saved {args.model_file}")

    if args.alpha is not None:
        if args.alpha > 0 and "calibration" not in meta:
            raise UserError(f"{args.model_file}: has no MeanSparse statistics; run --calibrate first")
        set_alpha(model, args.alpha)
    images, labels = load_cifar10(data_dir, args.split)
    if args.n_eval:
        images, labels = images[:args.n_eval], labels[:args.n_eval]
    batches = Batches(images, labels, args.batch_size, device=device, channels_last=channels_last)
    alpha = get_alpha(model)
    results = {}
    for name in args.eval:
        t0 = time.perf_counter()
        accuracy, settings = run_attack(model, name, batches, args, device)
        results[name] = {"accuracy": accuracy, "n": len(labels), "seconds": round(time.perf_counter() - t0, 2),
                         **settings}
        bpda_note = " (under BPDA)" if name.startswith("aa-") and alpha > 0 else ""
        log(f"{name:14s} {accuracy:6.2f} %  on {len(labels)} images  {results[name]['seconds']:8.1f} s{bpda_note}")
    report = {"model_file": args.model_file, "split": args.split, "n": len(labels), "alpha": alpha,
              "device": device_name(device), "torch": torch.__version__,
              "command": " ".join(["./model.py"] + sys.argv[1:]), "results": results}
    ok = True
    if args.sanity:
        ok, report["sanity"] = sanity_checks(model, batches, args, device, log=log)
        log(f"sanity: {'PASS' if ok else 'FAIL'}")
    if args.plot:
        report["curves"] = robustness_curves(model, batches, args, device)
        plot_curves(report["curves"], args.plot, f"{model.arch_name}, alpha {alpha:g}, n={len(labels)}")
        log(f"wrote {args.plot}")
    if "natural" in results:
        print(f"Model natural accuracy ({args.split}): {results['natural']['accuracy']:.2f}")
    if (train_now or args.calibrate) and args.alpha is None:
        meta["evaluation"] = {k: report[k] for k in ("split", "n", "alpha", "results")}
        model.save(args.model_file, meta)       # record the measured figures with the weights
    if args.report:
        report["model_sha256"] = file_sha256(args.model_file)
        with open(args.report, "w") as f:
            json.dump(report, f, indent=2)
        log(f"wrote {args.report}")
    return 0 if ok else 1


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
        hint = (f"; training keeps its last finished epoch in {checkpoint}: repeat the command with --resume"
                if checkpoint and os.path.exists(checkpoint) else "")
        print(f"\ninterrupted{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
