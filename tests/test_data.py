"""Data: load_cifar10 splits, resolve_data_dir, augment, Batches."""
import os
import pickle
import random
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import model as M


def _raw_batch(data_dir, name):
    with open(os.path.join(data_dir, "cifar-10-batches-py", name), "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    images = torch.from_numpy(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
    return images, torch.tensor(batch[b"labels"], dtype=torch.int64)


# ----------------------------------------------------------------------------------------------------
# load_cifar10
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def full_splits(data_dir, val_set, test_set):
    """The whole training split (five files) is read only by this module's tests."""
    return {"train": M.load_cifar10(str(data_dir), "train"), "val": val_set, "test": test_set}


@pytest.mark.parametrize("split, n", [("train", 48_976), ("val", 1_024), ("test", 10_000)])
def test_split_sizes_shapes_and_dtypes(full_splits, split, n):
    images, labels = full_splits[split]
    assert images.shape == (n, 3, 32, 32)
    assert images.dtype == torch.uint8
    assert labels.shape == (n,)
    assert labels.dtype == torch.int64
    assert int(labels.min()) == 0 and int(labels.max()) == 9
    assert images.is_contiguous()


def test_first_labels(val_set, test_set):
    assert val_set[1][:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert test_set[1][:5].tolist() == [3, 8, 8, 0, 6]


def test_val_and_train_are_the_official_training_images_in_order(full_splits, data_dir):
    raw1, lab1 = _raw_batch(data_dir, "data_batch_1")
    val_images, val_labels = full_splits["val"]
    train_images, train_labels = full_splits["train"]
    assert torch.equal(val_images, raw1[:1024]) and torch.equal(val_labels, lab1[:1024])
    # the train split starts at training image 1024 ...
    assert torch.equal(train_images[:10_000 - 1024], raw1[1024:])
    assert torch.equal(train_labels[:10_000 - 1024], lab1[1024:])
    # ... and ends with the last image of data_batch_5
    raw5, lab5 = _raw_batch(data_dir, "data_batch_5")
    assert torch.equal(train_images[-10_000:], raw5) and torch.equal(train_labels[-10_000:], lab5)
    # and the test split is test_batch
    raw_t, lab_t = _raw_batch(data_dir, "test_batch")
    assert torch.equal(full_splits["test"][0], raw_t) and torch.equal(full_splits["test"][1], lab_t)


def test_val_is_a_copy_not_a_view_of_a_larger_tensor(val_set):
    images, labels = val_set
    assert images.untyped_storage().nbytes() == images.numel()      # no 10,000-image storage kept alive
    assert labels.untyped_storage().nbytes() == labels.numel() * 8


@pytest.mark.parametrize("split", ["validation", "Train", "", None])
def test_unknown_split_raises_value_error(data_dir, split):
    with pytest.raises(ValueError, match="split"):
        M.load_cifar10(str(data_dir), split)


def test_missing_folder_without_network_is_a_user_error(tmp_path, monkeypatch):
    calls = []

    def no_network(root, train=True, download=False, **kw):
        calls.append((root, train, download))
        raise OSError("network unreachable")

    fake = types.ModuleType("torchvision")
    fake.datasets = types.SimpleNamespace(CIFAR10=no_network)
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    missing = tmp_path / "nowhere"
    with pytest.raises(M.UserError) as info:
        M.load_cifar10(str(missing), "val")
    message = str(info.value)
    assert os.path.join(str(missing), "cifar-10-batches-py") in message
    assert "OSError" in message
    assert calls == [(str(missing), True, True)]          # a download was attempted into data_dir


@pytest.mark.parametrize("content", [
    pytest.param(random.Random(0).randbytes(3000), id="random-bytes"),
    pytest.param(pickle.dumps({b"data": [1, 2, 3], b"labels": [0]}), id="wrong-shape"),
    pytest.param(pickle.dumps({b"labels": [0]}), id="no-data-key"),
    pytest.param(b"", id="empty"),
    # BUG (model.py _read_batches): these escape as OverflowError / TypeError instead of UserError
    pytest.param(b"\x80\x04\x95" + b"\xff" * 8 + b"data", id="pickle-frame-overflow"),
    pytest.param(pickle.dumps([1, 2, 3]), id="pickle-of-a-list"),
])
def test_corrupt_batch_file_is_a_user_error(tmp_path, content):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(content)
    try:
        M.load_cifar10(str(tmp_path), "test")
    except M.UserError as e:
        assert str(folder / "test_batch") in str(e)
    except Exception as e:          # noqa: BLE001 -- the bug this test documents
        pytest.fail(f"a corrupt batch file raised {e.__class__.__name__}: {e} instead of model.UserError "
                    f"(CLI: a traceback and exit 1 instead of one line and exit 2)")
    else:
        pytest.fail("a corrupt batch file loaded without an error")


def test_truncated_batch_file_is_a_user_error(tmp_path, data_dir):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(data_dir / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        (folder / "data_batch_1").write_bytes(f.read(1_000_000))
    with pytest.raises(M.UserError) as info:
        M.load_cifar10(str(tmp_path), "val")
    assert str(folder / "data_batch_1") in str(info.value)


def test_the_tests_find_the_data_in_dot_data_without_an_environment_variable(repo_root, data_dir, tmp_path,
                                                                              run_python):
    """A newcomer who ran ./model.py (which downloads into ./data) runs the test command with no variable set."""
    (tmp_path / "data").symlink_to(data_dir)
    code = (f"import sys; sys.path[:0] = [{str(repo_root / 'tests')!r}, {str(repo_root)!r}]\n"
            "import os; os.environ.pop('CIFAR10_DIR', None)\n"
            "import conftest; print(conftest.resolve_data_dir())\n")
    result = run_python(["-c", code], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == str((tmp_path / "data").resolve())


def test_resolve_data_dir_precedence(monkeypatch):
    monkeypatch.setenv("CIFAR10_DIR", "/from/env")
    assert M.resolve_data_dir("/explicit") == "/explicit"
    assert M.resolve_data_dir() == "/from/env"
    monkeypatch.delenv("CIFAR10_DIR")
    assert M.resolve_data_dir() == M.DEFAULT_DATA_DIR == "./data"


# ----------------------------------------------------------------------------------------------------
# augment
# ----------------------------------------------------------------------------------------------------
def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_augment_keeps_shape_dtype_and_values(val_set):
    images = val_set[0][:64]
    out = M.augment(images, _gen(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    # every output pixel is an input pixel of the same image and channel, or padding (0)
    for i in range(0, 64, 8):
        for c in range(3):
            allowed = set(images[i, c].unique().tolist()) | {0}
            assert set(out[i, c].unique().tolist()) <= allowed
    assert not torch.equal(out, images)       # 64 images all drawn as (no shift, no flip): impossible


def test_augment_repeats_with_equal_seeds_and_differs_with_others(val_set):
    images = val_set[0][:64]
    a = M.augment(images, _gen(3))
    b = M.augment(images, _gen(3))
    c = M.augment(images, _gen(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(images, val_set[0][:64])      # the input is not modified


def test_augment_is_a_crop_of_the_zero_padded_image_possibly_flipped():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (64, 3, 32, 32), generator=g, dtype=torch.uint8)   # no zeros
    out = M.augment(images, _gen(11))
    padded = F.pad(images, (4, 4, 4, 4))
    found_flips, found_shifts = set(), set()
    for i in range(len(images)):
        matches = [(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (False, True)
                   if torch.equal(out[i], (lambda w: w.flip(2) if flip else w)(padded[i, :, dy:dy + 32, dx:dx + 32]))]
        assert len(matches) == 1, f"image {i} is not a unique crop/flip of its padded original"
        dy, dx, flip = matches[0]
        found_flips.add(flip)
        found_shifts.add((dy, dx))
        # zeros (padding) only in border rows/columns: at most 4 of them on the shifted side
        zero_rows = (out[i] == 0).all(dim=(0, 2)).nonzero().flatten().tolist()
        assert zero_rows == (list(range(4 - dy)) if dy < 4 else list(range(32 - (dy - 4), 32)))
        assert int((out[i] == 0).sum()) == 3 * (32 * 32 - (32 - abs(dy - 4)) * (32 - abs(dx - 4)))
    assert found_flips == {False, True}
    assert len(found_shifts) > 20             # 81 possible shifts, 64 draws


# ----------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------
def _id_images(n):
    """Image k is constant k + 1 (so padding zeros never hide it); label k identifies it."""
    images = (torch.arange(n, dtype=torch.uint8) + 1).view(n, 1, 1, 1).expand(n, 3, 32, 32).contiguous()
    return images, torch.arange(n, dtype=torch.int64)


def test_batches_eval_yields_everything_in_order_as_float(val_set):
    images, labels = val_set[0][:100], val_set[1][:100]
    batches = M.Batches(images, labels, 32, device="cpu")
    out = list(batches)
    assert len(batches) == 4 == len(out)
    assert [len(y) for _, y in out] == [32, 32, 32, 4]
    x = torch.cat([b[0] for b in out])
    y = torch.cat([b[1] for b in out])
    assert x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert torch.equal(x, images.float() / 255)
    assert torch.equal(y, labels)
    assert torch.equal(torch.cat([b[0] for b in batches]), x)     # a second pass gives the same


def test_batches_train_drops_last_partial_batch_and_reshuffles():
    images, labels = _id_images(100)
    batches = M.Batches(images, labels, 32, device="cpu", train=True, generator=_gen(0))
    assert len(batches) == 3
    epochs = []
    for _ in range(2):
        got = list(batches)
        assert [len(y) for _, y in got] == [32, 32, 32]
        ids = torch.cat([y for _, y in got])
        assert len(set(ids.tolist())) == 96                   # no image twice in an epoch
        for x, y in got:
            assert x.dtype == torch.float32 and float(x.min()) >= 0 and float(x.max()) <= 1
            # each image still carries its own value (crop padding may add zeros)
            assert torch.equal(torch.round(x.amax(dim=(1, 2, 3)) * 255).long(), y + 1)
        epochs.append(ids)
    assert not torch.equal(epochs[0], epochs[1])               # reshuffled
    # the same seed repeats the same epochs
    again = M.Batches(images, labels, 32, device="cpu", train=True, generator=_gen(0))
    assert torch.equal(torch.cat([y for _, y in again]), epochs[0])


def test_batches_two_ranks_take_disjoint_shards_of_one_permutation():
    images, labels = _id_images(100)
    shards = []
    for rank in range(2):
        b = M.Batches(images, labels, 16, device="cpu", train=True, generator=_gen(7), rank=rank, world_size=2)
        assert len(b) == 3                                     # 50 images per rank, 3 batches of 16
        shards.append(torch.cat([y for _, y in b]))
    a, b = set(shards[0].tolist()), set(shards[1].tolist())
    assert len(a) == 48 and len(b) == 48
    assert not a & b
    # together they are the single-process permutation's first two halves
    order = torch.randperm(100, generator=_gen(7))
    assert shards[0].tolist() == order[:48].tolist()
    assert shards[1].tolist() == order[50:98].tolist()
