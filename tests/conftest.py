"""Shared fixtures for the model.py test suite.

Everything here is deterministic (fixed seeds) and cheap: logic tests use WRN-10-1 models and a few
hundred images; only a few end-to-end tests touch the committed WRN-28-4.
"""
import fcntl
import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.dont_write_bytecode = True          # importing model.py must not write __pycache__ into the repo
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import model as M  # noqa: E402

# One intra-op thread is several times faster than two for the small models here; the two cores of a
# CI machine are used by two pytest workers instead (`-n 2`, pytest-xdist).
torch.set_num_threads(1)

COMMITTED = REPO / "models" / "default_model.pth"


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def resolve_data_dir():
    """The data folder the way model.py finds it: $CIFAR10_DIR, else ./data (relative to where pytest runs),
    the dataset downloaded there with torchvision when it is missing."""
    folder = Path(M.resolve_data_dir()).resolve()
    if not (folder / "cifar-10-batches-py").is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / ".download-lock", "w") as lock:     # two pytest workers: one downloads, one waits
            fcntl.flock(lock, fcntl.LOCK_EX)
            M.load_cifar10(str(folder), "test")
    return folder


@pytest.fixture(scope="session")
def repo_root():
    return REPO


@pytest.fixture(scope="session")
def committed_model_file():
    return COMMITTED


@pytest.fixture(scope="session", autouse=True)
def committed_model_untouched():
    """Guard: no test may change the committed weights."""
    before = _sha256(COMMITTED)
    yield
    assert _sha256(COMMITTED) == before, "the test suite modified models/default_model.pth"


@pytest.fixture(scope="session")
def data_dir():
    return resolve_data_dir()


@pytest.fixture(scope="session")
def val_set(data_dir):
    return M.load_cifar10(str(data_dir), "val")


@pytest.fixture(scope="session")
def test_set(data_dir):
    return M.load_cifar10(str(data_dir), "test")


@pytest.fixture(scope="session")
def train_set(data_dir):
    """The first 8,976 images of the training split (training images 1024..9999): all that the logic tests
    use, read from one file rather than the five of the whole split."""
    images, labels = M._read_batches(str(data_dir / "cifar-10-batches-py"), ["data_batch_1"])
    return images[M.NUM_VAL:].clone(), labels[M.NUM_VAL:].clone()


@pytest.fixture(scope="session")
def tiny_trained_state(train_set, val_set, tmp_path_factory):
    """State dict of a WRN-10-1 trained naturally (no attack) for 8 epochs on 1,024 training images:
    about 30 % accuracy, far above chance, with no robustness at all. Trained once for all pytest workers:
    the first one writes it into their shared temporary folder, the others read it."""
    shared = tmp_path_factory.getbasetemp()
    shared = shared.parent if "PYTEST_XDIST_WORKER" in os.environ else shared     # this test run's workers' folder
    with open(shared / "tiny.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (shared / "tiny_state.pt").exists():
            torch.manual_seed(0)
            cfg = M.TrainConfig(arch="10-1", epochs=8, batch_size=128, lr=0.1, warmup_epochs=1, attack_steps=0,
                                n_train=1024, val_every=100, seed=0)
            net, _ = M.train(M.WideResNet(10, 1), train_set, tuple(t[:64] for t in val_set), cfg, device="cpu",
                             checkpoint_path=str(shared / "tiny.ckpt"), log=lambda *a, **k: None)
            torch.save(net.state_dict(), shared / "tiny_state.pt")
    return torch.load(shared / "tiny_state.pt", weights_only=True)


@pytest.fixture
def tiny_trained(tiny_trained_state):
    """A fresh copy (eval mode) of the tiny trained WRN-10-1 for each test."""
    net = M.WideResNet(10, 1)
    net.load_state_dict(tiny_trained_state)
    return net.eval()


@pytest.fixture(scope="session")
def tiny_model_file(tiny_trained_state, tmp_path_factory):
    """The tiny trained WRN-10-1 written with Net.save (read-only use: copy it before writing)."""
    net = M.WideResNet(10, 1)
    net.load_state_dict(tiny_trained_state)
    path = tmp_path_factory.mktemp("tinyfile") / "tiny.pth"
    net.save(str(path), {"note": "tiny test model"})
    return path


def subprocess_env(data_dir, threads=1):
    env = dict(os.environ)
    env["CIFAR10_DIR"] = str(data_dir)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["OMP_NUM_THREADS"] = str(threads)
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


@pytest.fixture(scope="session")
def run_cli(data_dir):
    """run_cli(*args, timeout=..., threads=1) -> CompletedProcess of `python model.py args` with cwd = repo root
    (one thread suits the tiny models; the committed WRN-28-4 runs faster on two)."""
    def run(*args, timeout=300, cwd=REPO, threads=1):
        return subprocess.run([sys.executable, str(REPO / "model.py"), *map(str, args)], cwd=cwd,
                              env=subprocess_env(data_dir, threads), capture_output=True, text=True, timeout=timeout)
    return run


@pytest.fixture(scope="session")
def run_python(data_dir):
    """run_python(argv, cwd) -> CompletedProcess of `python argv...` (any script), same environment."""
    def run(argv, cwd, timeout=300, threads=1):
        return subprocess.run([sys.executable, *map(str, argv)], cwd=cwd, env=subprocess_env(data_dir, threads),
                              capture_output=True, text=True, timeout=timeout)
    return run


@pytest.fixture
def cli(committed_model_file, data_dir, monkeypatch, capsys):
    """cli(*argv) -> (exit status, stdout, stderr lines without progress bars); checks after each call that
    the committed model is byte-identical."""
    monkeypatch.setenv("CIFAR10_DIR", str(data_dir))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "argv", ["model.py"])
    monkeypatch.setattr(M, "VAL_PGD_STEPS", 1)     # these runs are about files and messages: a cheap validation
    handler = signal.getsignal(signal.SIGTERM)
    before = _sha256(committed_model_file)

    def run(*argv):
        status = M.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        lines = [line.split("\r")[-1].strip() for line in err.splitlines()]
        assert _sha256(committed_model_file) == before
        return status, out, [line for line in lines if line]

    yield run
    signal.signal(signal.SIGTERM, handler)
