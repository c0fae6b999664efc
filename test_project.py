#!/usr/bin/env python3
"""Load the project the way the grading platform does and measure its natural accuracy.

    ./test_project.py                      # the project in this script's folder
    ../test_project.py ../ --data-dir ../data

It imports <project>/model.py, builds `Net()`, moves it to the device, calls
`load_for_testing(project_dir=<project>)`, checks that the model is in eval mode and holds exactly the
weights of the committed file, takes one textbook L2 PGD step on a few images (the input gradient
flattened with `.view`, as most graders do), then classifies all 1,024 validation images (training images
0..1023, as [0,1] tensors, no normalisation outside the model) and prints `Model nat accuracy (test): XX.XX`.
Exit status 0 when every check passes, 1 otherwise.
"""
import argparse
import importlib.util
import os
import pickle
import sys

import numpy as np
import torch

NUM_VAL = 1024


class CheckFailed(Exception):
    pass


def load_project(project_dir):
    path = os.path.join(project_dir, "model.py")
    if not os.path.isfile(path):
        raise CheckFailed(f"no model.py in {os.path.abspath(project_dir)}")
    spec = importlib.util.spec_from_file_location("project_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "Net"):
        raise CheckFailed(f"{path} defines no Net class")
    if not callable(getattr(module.Net, "load_for_testing", None)):
        raise CheckFailed(f"{path}: Net has no load_for_testing method")
    return module


def validation_images(data_dir):
    """Training images 0..1023 as float [0,1] N x 3 x 32 x 32 (what transforms.ToTensor() gives)."""
    folder = os.path.join(data_dir, "cifar-10-batches-py")
    if not os.path.isdir(folder):
        try:
            import torchvision
            torchvision.datasets.CIFAR10(data_dir, train=True, download=True)
        except Exception as e:
            raise CheckFailed(f"no CIFAR-10 in {folder} and downloading it failed ({e.__class__.__name__}); "
                              f"pass --data-dir or set CIFAR10_DIR") from None
    path = os.path.join(folder, "data_batch_1")
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        images = np.asarray(batch[b"data"][:NUM_VAL], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[b"labels"][:NUM_VAL], dtype=np.int64)
    except Exception as e:      # missing, truncated or not a CIFAR-10 pickle: unpickling raises almost anything
        raise CheckFailed(f"{path}: not a readable CIFAR-10 batch ({e.__class__.__name__}: {e})") from None
    if len(labels) != NUM_VAL:
        raise CheckFailed(f"{path}: holds {len(labels)} images, fewer than the {NUM_VAL} validation images")
    return torch.from_numpy(images).float() / 255, torch.from_numpy(labels)


def check_weights(net, weights_path):
    """The net must hold exactly the file's tensors: float16 weights read back as float32 are exact, so
    compare in float32 (rounding the net's values to float16 would hide small changes)."""
    payload = torch.load(weights_path, map_location="cpu", weights_only=True)
    stored = payload["state_dict"] if isinstance(payload, dict) and "state_dict" in payload else payload
    current = net.state_dict()
    for name, value in stored.items():
        if name not in current:
            raise CheckFailed(f"{weights_path}: entry {name} is not in the loaded model")
        loaded = current[name].detach().cpu()
        same = (torch.equal(loaded.float(), value.float()) if value.is_floating_point()
                else torch.equal(loaded, value))
        if not same:
            raise CheckFailed(f"loaded weights differ from {weights_path} at {name}")


def check_l2_step(net, images, labels, eps=0.5, step=0.125):
    """One PGD-L2 step as graders write it: the input gradient must come back in the input's (NCHW) layout,
    or `grad.view(n, -1)` fails."""
    n = len(labels)
    x = images.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(net(x), labels)
    grad, = torch.autograd.grad(loss, x)
    try:
        norms = grad.view(n, -1).norm(p=2, dim=1) + 1e-10
    except RuntimeError:
        raise CheckFailed(f"the input gradient has strides {grad.stride()}, not those of the NCHW input "
                          f"{images.stride()}: a grader's L2 attack (grad.view(n, -1)) fails on it") from None
    delta = step * grad / norms.view(n, 1, 1, 1)
    x_adv = (images + delta * (eps / delta.view(n, -1).norm(dim=1)).clamp(max=1).view(n, 1, 1, 1)).clamp(0, 1)
    with torch.no_grad():
        net(x_adv)


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):     # one line naming the flag, not the whole usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    p = OneLineParser(description="Check the project the way the grading platform loads it.")
    p.add_argument("project_dir", nargs="?", default=here, help="folder holding model.py (default: this script's)")
    p.add_argument("--data-dir", default=os.environ.get("CIFAR10_DIR", "./data"),
                   help="folder holding cifar-10-batches-py/ (default $CIFAR10_DIR, else ./data)")
    p.add_argument("--batch-size", type=positive_int, default=256, help="images per forward pass (default 256)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    try:
        module = load_project(args.project_dir)
        weights_path = os.path.join(args.project_dir, module.Net.model_file)
        if not os.path.isfile(weights_path):
            raise CheckFailed(f"no weights at {weights_path}")
        net = module.Net().to(args.device)
        net.load_for_testing(project_dir=args.project_dir)
        if net.training:
            raise CheckFailed("load_for_testing left the model in train mode; call self.eval()")
        check_weights(net, weights_path)
        images, labels = validation_images(args.data_dir)
        check_l2_step(net, images[:8].to(args.device), labels[:8].to(args.device))
        correct = 0
        with torch.no_grad():
            for i in range(0, len(labels), args.batch_size):
                x = images[i:i + args.batch_size].to(args.device)
                correct += (net(x).argmax(1).cpu() == labels[i:i + args.batch_size]).sum().item()
    except CheckFailed as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    except Exception as e:      # the platform would fail here too: say so in one line
        print(f"FAILED: {e.__class__.__name__}: {e}", file=sys.stderr)
        return 1
    print(f"Model nat accuracy (test): {100.0 * correct / len(labels):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
