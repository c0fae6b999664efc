"""Model: MeanSparse, bpda/bypassed, the WideResNet, save/load and their errors."""
import os
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import model as M


def _sparse(channels=4, alpha=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = M.MeanSparse(channels)
    m.mean.copy_(torch.randn(channels, generator=g))
    m.std.copy_(torch.rand(channels, generator=g) + 0.5)
    m.alpha.fill_(alpha)
    return m


def _formula(m, x):
    mean = m.mean.view(1, -1, 1, 1)
    band = (m.alpha * m.std).view(1, -1, 1, 1)
    return torch.where((x - mean).abs() < band, mean.expand_as(x), x)


def _x(shape=(8, 4, 5, 5), seed=1, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return (2 * torch.randn(*shape, generator=g)).requires_grad_(requires_grad)


def _randomise_buffers(net, seed=0):
    """Non-trivial BatchNorm running statistics and MeanSparse statistics."""
    g = torch.Generator().manual_seed(seed)
    for mod in net.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.copy_(0.1 * torch.randn(mod.running_mean.shape, generator=g))
            mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) + 0.5)
            mod.num_batches_tracked.fill_(17)
        elif isinstance(mod, M.MeanSparse):
            mod.mean.copy_(0.1 * torch.randn(mod.mean.shape, generator=g))
            mod.std.copy_(torch.rand(mod.std.shape, generator=g) + 0.5)
    return net


# ----------------------------------------------------------------------------------------------------
# MeanSparse
# ----------------------------------------------------------------------------------------------------
def test_meansparse_forward_is_the_formula_per_channel():
    m = _sparse(alpha=0.5)
    x = _x()
    out = m(x)
    expected = _formula(m, x)
    assert torch.equal(out, expected)
    replaced = out != x
    assert 0 < int(replaced.sum()) < x.numel()              # the band catches some values, not all
    # the replaced values are exactly their channel's mean
    means = m.mean.view(1, -1, 1, 1).expand_as(x)
    assert torch.equal(out[replaced], means[replaced])


def test_meansparse_band_is_strict():
    """|x - mean| < alpha * std is replaced; a value exactly on the band's edge is kept."""
    m = M.MeanSparse(2)
    m.mean.copy_(torch.tensor([0.0, 1.0]))
    m.std.copy_(torch.tensor([1.0, 2.0]))
    m.alpha.fill_(0.5)                              # bands: [-0.5, 0.5] and [0, 2], edges exact in binary
    x = torch.tensor([[-0.5, 0.5, 0.25, -0.75], [0.0, 2.0, 1.5, 2.5]]).view(1, 2, 1, 4)
    expected = torch.tensor([[-0.5, 0.5, 0.0, -0.75], [0.0, 2.0, 1.0, 2.5]]).view(1, 2, 1, 4)
    assert torch.equal(m(x), expected)


def test_meansparse_alpha_zero_is_exactly_the_identity():
    m = _sparse(alpha=0.0)
    x = _x()
    x[:, :, 0, 0] = m.mean.view(1, -1)                     # even values equal to the mean stay
    assert torch.equal(m(x), x)
    assert torch.equal(M.MeanSparse(4)(x), x)              # a fresh module is alpha 0


def test_meansparse_at_alpha_zero_skips_the_mask_on_the_cpu_with_the_same_result(monkeypatch):
    """The shortcut gives what the mask gives at alpha 0 (x, bit for bit, gradient 1) without computing it."""
    m = _sparse(alpha=0.0)
    x = _x(requires_grad=True)
    x.data[:, :, 0, 0] = m.mean.view(1, -1)                 # values on the mean too
    for mode in ("mask", "bpda"):
        m.mode = mode
        masked = m.masked(x)
        assert torch.equal(masked, x)
        assert torch.equal(torch.autograd.grad(masked.sum(), x)[0], torch.ones_like(x))

    def no_mask(self, x):
        raise AssertionError("the mask was computed at alpha 0")
    monkeypatch.setattr(M.MeanSparse, "masked", no_mask)
    for mode in ("mask", "bpda"):
        m.mode = mode
        out = m(x)
        assert torch.equal(out, x)
        assert torch.equal(torch.autograd.grad(out.sum(), x)[0], torch.ones_like(x))
    m.alpha.fill_(0.1)
    with pytest.raises(AssertionError, match="mask was computed"):     # any other alpha masks
        m(x)


def test_meansparse_gradient_is_masked_inside_the_band():
    m = _sparse(alpha=0.5)
    x = _x(requires_grad=True)
    m(x).sum().backward()
    inside = ((x.detach() - m.mean.view(1, -1, 1, 1)).abs() < (m.alpha * m.std).view(1, -1, 1, 1))
    assert inside.any() and (~inside).any()
    assert torch.equal(x.grad, (~inside).float())


def test_bpda_keeps_the_forward_gives_identity_gradient_and_restores_mode():
    m = _sparse(alpha=0.5)
    x = _x(requires_grad=True)
    plain = m(x).detach()
    with M.bpda(m):
        assert m.mode == "bpda"
        out = m(x)
        out.sum().backward()
    assert torch.equal(out.detach(), plain)                 # bit-identical forward: no mask flips downstream
    assert torch.equal(x.grad, torch.ones_like(x))
    assert m.mode == "mask"
    # masked again after the block
    x.grad = None
    m(x).sum().backward()
    assert not torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_meansparse_equals_torch_where_bit_for_bit_in_both_layouts(layout):
    """The forward uses lerp (several times faster on the CPU): the values must be exactly those of
    torch.where, the formula, for large activations too."""
    m = _sparse(channels=16, alpha=0.35)
    x = (_x((4, 16, 9, 9)) * 50).contiguous(memory_format=layout)
    x[0, :, 0, 0] = m.mean + m.alpha * m.std                # exactly on the band's edge: kept
    out = m(x)
    assert torch.equal(out, _formula(m, x))
    with M.bpda(m):
        assert torch.equal(m(x), _formula(m, x))
    assert out.is_contiguous(memory_format=layout)


def test_bpda_logits_of_a_network_equal_its_own():
    torch.manual_seed(0)
    net = _randomise_buffers(M.WideResNet(10, 1)).eval()
    M.set_alpha(net, 0.3)
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        own = net(x)
        with M.bpda(net):
            through = net(x)
    assert torch.equal(own, through)


def test_modes_are_restored_after_an_exception_and_when_nested():
    net = M.WideResNet(10, 1)
    modules = M.meansparse_modules(net)
    assert len(modules) == 7
    with pytest.raises(RuntimeError):
        with M.bpda(net):
            assert all(m.mode == "bpda" for m in modules)
            raise RuntimeError("boom")
    assert all(m.mode == "mask" for m in modules)
    with M.bypassed(net):
        with M.bpda(net):
            assert all(m.mode == "bpda" for m in modules)
        assert all(m.mode == "off" for m in modules)
    assert all(m.mode == "mask" for m in modules)


def test_bypassed_makes_meansparse_the_identity():
    m = _sparse(alpha=100.0)                               # every value inside the band
    x = _x()
    assert torch.equal(m(x), m.mean.view(1, -1, 1, 1).expand_as(x))
    with M.bypassed(m):
        assert m(x) is x
    assert m.mode == "mask"

    torch.manual_seed(0)
    net = _randomise_buffers(M.WideResNet(10, 1)).eval()
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = net(x)                                 # alpha 0
        M.set_alpha(net, 0.5)
        masked = net(x)
        with M.bypassed(net):
            bypass = net(x)
    assert not torch.equal(masked, reference)
    assert torch.equal(bypass, reference)


def test_set_get_alpha_and_meansparse_as():
    net = M.WideResNet(10, 1)
    assert M.get_alpha(net) == 0.0
    M.set_alpha(net, 0.35)
    assert M.get_alpha(net) == 0.35                         # the float32 buffer reads back rounded
    assert all(float(m.alpha) == pytest.approx(0.35) for m in M.meansparse_modules(net))
    with M.meansparse_as(net, alpha=0.0):
        assert M.get_alpha(net) == 0.0
    assert M.get_alpha(net) == 0.35
    assert M.get_alpha(nn.Linear(2, 2)) == 0.0


# ----------------------------------------------------------------------------------------------------
# Architecture
# ----------------------------------------------------------------------------------------------------
def test_net_is_wrn_28_4_with_25_meansparse_called_once_each():
    torch.manual_seed(0)
    net = M.Net().eval()
    assert net.arch == {"name": "wrn", "depth": 28, "widen_factor": 4, "num_classes": 10}
    assert net.arch_name == "WRN-28-4"
    modules = M.meansparse_modules(net)
    assert len(modules) == 25
    n_params = sum(p.numel() for p in net.parameters())
    assert abs(n_params - 5_848_000) / 5_848_000 < 0.01, n_params
    calls = []
    handles = [m.register_forward_hook(lambda mod, i, o: calls.append(mod)) for m in modules]
    with torch.no_grad():
        out = net(torch.rand(2, 3, 32, 32))
    for h in handles:
        h.remove()
    assert out.shape == (2, 10)
    assert len(calls) == 25 and len({id(c) for c in calls}) == 25


def test_wrn_10_1_shape_and_input_normalisation():
    torch.manual_seed(0)
    net = M.WideResNet(10, 1).eval()
    assert net.arch_name == "WRN-10-1"
    assert len(M.meansparse_modules(net)) == 7
    assert "input_mean" not in net.state_dict() and "input_std" not in net.state_dict()
    # normalisation happens inside: feeding [0,1] images is the same as a plain conv on normalised input
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    seen = []
    h = net.block1.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0]))
    with torch.no_grad():
        net(x)
    h.remove()
    mean = torch.tensor(M.CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(M.CIFAR10_STD).view(1, 3, 1, 1)
    assert torch.allclose(seen[0], net.conv1((x - mean) / std), atol=1e-6)


@pytest.mark.parametrize("text", ["28", "28-x", "12-1", "8-1", "10-0", "abc"])
def test_parse_arch_rejects_bad_architectures(text):
    with pytest.raises(M.UserError):
        M.parse_arch(text)


def test_build_model_picks_net_for_the_default_arch():
    assert M.parse_arch("16-2") == {"name": "wrn", "depth": 16, "widen_factor": 2, "num_classes": 10}
    assert M.parse_arch("preact18") == {"name": "preact18", "num_classes": 10}
    small = M.build_model("10-1")
    assert type(small) is M.WideResNet and small.arch["depth"] == 10
    # a description without a name (files written before PreAct ResNet-18) is a WideResNet's
    assert type(M.build_model({"depth": 10, "widen_factor": 2, "num_classes": 10})) is M.WideResNet
    assert type(M.build_model("28-4")) is M.Net
    assert type(M.build_model({"depth": 28, "widen_factor": 4, "num_classes": 10})) is M.Net
    assert type(M.build_model("preact18")) is M.PreActResNet18


def test_preact_resnet18_has_a_meansparse_before_every_relu_and_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    net = _randomise_buffers(M.PreActResNet18()).eval()
    assert net.arch_name == "PreAct ResNet-18" and len(M.meansparse_modules(net)) == 17
    assert 11.1e6 < sum(p.numel() for p in net.parameters()) < 11.2e6          # the literature's 11.2 M
    relu_inputs, sparse_outputs = [], []
    hooks = [m.register_forward_hook(lambda mod, i, o: sparse_outputs.append(o)) for m in M.meansparse_modules(net)]
    real_relu = F.relu
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(F, "relu", lambda t, *a, **k: relu_inputs.append(t) or real_relu(t, *a, **k))
        x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            reference = net(x)
    for h in hooks:
        h.remove()
    assert reference.shape == (2, 10)
    assert len(relu_inputs) == 17 and all(r is s for r, s in zip(relu_inputs, sparse_outputs))
    M.set_alpha(net, 0.25)
    net.save(str(tmp_path / "p.pth"), {"note": 1})
    loaded = M.load_model(str(tmp_path / "p.pth"))
    assert type(loaded) is M.PreActResNet18 and loaded.meta == {"note": 1} and M.get_alpha(loaded) == 0.25
    with pytest.raises(M.UserError, match="holds a PreAct ResNet-18, this network is a WRN-10-1"):
        M.WideResNet(10, 1).load(str(tmp_path / "p.pth"))


def test_cpu_forward_splits_big_eval_batches_with_the_same_logits_and_gradients(monkeypatch):
    torch.manual_seed(0)
    net = _randomise_buffers(M.WideResNet(10, 1)).eval()
    M.set_alpha(net, 0.3)
    x = torch.rand(20, 3, 32, 32, generator=torch.Generator().manual_seed(3), requires_grad=True)
    sizes = []
    h = net.conv1.register_forward_pre_hook(lambda mod, inp: sizes.append(len(inp[0])))
    whole = net(x)
    grad_whole, = torch.autograd.grad(whole.logsumexp(1).sum(), x)
    monkeypatch.setattr(M, "CPU_BATCH", 8)
    sizes.clear()
    split = net(x)
    grad_split, = torch.autograd.grad(split.logsumexp(1).sum(), x)
    assert sizes == [8, 8, 4]
    assert torch.allclose(split, whole, atol=1e-5) and torch.equal(split.argmax(1), whole.argmax(1))
    assert torch.allclose(grad_split, grad_whole, atol=1e-6) and float(grad_split.abs().sum()) > 0
    net.train()                                         # BatchNorm in train mode sees the whole batch
    sizes.clear()
    net(x)
    assert sizes == [20]
    h.remove()


def test_load_for_testing_leaves_the_fast_layout_and_takes_either_input(repo_root, val_set):
    net = M.Net().load_for_testing(str(repo_root))
    assert net.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    reference = M.Net().load(str(repo_root / M.Net.model_file)).eval()        # plain NCHW
    x = val_set[0][:128].float() / 255
    y = val_set[1][:128]
    with torch.no_grad():
        fast, fast_cl, plain = net(x), net(x.contiguous(memory_format=torch.channels_last)), reference(x)
    assert torch.equal(fast, fast_cl)
    # other convolution kernels round differently, and a rounding can flip a MeanSparse mask: logits agree
    # to float32 rounding amplified by such flips, predictions exactly
    assert torch.allclose(fast, plain, atol=0.2) and torch.equal(fast.argmax(1), plain.argmax(1))
    assert (fast.argmax(1) == y).float().mean() > 0.75
    xg = x[:4].clone().requires_grad_(True)
    grad, = torch.autograd.grad(M.cross_entropy_sum(net(xg), y[:4]), xg)
    xr = x[:4].clone().requires_grad_(True)
    grad_ref, = torch.autograd.grad(M.cross_entropy_sum(reference(xr), y[:4]), xr)
    assert grad.shape == x[:4].shape and float(grad.abs().sum()) > 0
    cosine = F.cosine_similarity(grad.flatten(1), grad_ref.flatten(1))
    assert bool((cosine > 0.99).all()), cosine


# ----------------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------------
@pytest.fixture
def saved_tiny(tmp_path):
    torch.manual_seed(0)
    net = _randomise_buffers(M.WideResNet(10, 1))
    M.set_alpha(net, 0.2)
    path = tmp_path / "tiny.pth"
    meta = {"calibration": {"alpha": 0.2}, "note": "x", "numbers": [1, 2.5]}
    net.save(str(path), meta)
    return net, path, meta


def test_save_stores_float16_weights_and_float32_buffers(saved_tiny):
    net, path, meta = saved_tiny
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == M.FILE_FORMAT
    assert payload["arch"] == {"name": "wrn", "depth": 10, "widen_factor": 1, "num_classes": 10}
    assert payload["alpha"] == 0.2
    assert payload["meta"] == meta
    state = payload["state_dict"]
    params = dict(net.named_parameters())
    assert set(state) == set(net.state_dict())
    for name, value in state.items():
        if name in params:
            assert value.dtype == torch.float16, name
        elif name.endswith("num_batches_tracked"):
            assert value.dtype == torch.int64, name
        else:                        # BN running stats and MeanSparse mean/std/alpha
            assert value.dtype == torch.float32, name
    assert any(k.endswith("sparse1.mean") for k in state) and any(k.endswith("running_var") for k in state)


def test_load_round_trip_gives_float16_rounded_weights_and_exact_buffers(saved_tiny):
    net, path, meta = saved_tiny
    fresh = M.WideResNet(10, 1)
    assert fresh.load(str(path)) is fresh
    params = dict(net.named_parameters())
    loaded = fresh.state_dict()
    for name, value in net.state_dict().items():
        got = loaded[name]
        if name in params:
            assert got.dtype == torch.float32
            assert torch.equal(got, value.half().float()), name
        else:
            assert torch.equal(got, value), name
    assert fresh.meta == meta
    assert M.get_alpha(fresh) == 0.2


def test_load_accepts_a_plain_state_dict(tmp_path):
    torch.manual_seed(0)
    net = _randomise_buffers(M.WideResNet(10, 1))
    path = tmp_path / "plain.pth"
    torch.save(net.state_dict(), path)
    fresh = M.WideResNet(10, 1).load(str(path))
    for name, value in net.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name     # float32 in, float32 out: exact
    assert fresh.meta == {}


def test_load_model_rebuilds_the_recorded_architecture(saved_tiny):
    net, path, _ = saved_tiny
    loaded = M.load_model(str(path))
    assert type(loaded) is M.WideResNet and not isinstance(loaded, M.Net)
    assert loaded.arch["depth"] == 10 and loaded.arch["widen_factor"] == 1
    assert not loaded.training
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reference = M.WideResNet(10, 1).load(str(path)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), reference(x))


def test_failing_save_leaves_the_old_file_and_no_temporary(saved_tiny, monkeypatch):
    net, path, _ = saved_tiny
    before = path.read_bytes()
    real_save = torch.save

    def broken_save(obj, f, *a, **k):
        f.write(b"partial bytes of a model file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    M.set_alpha(net, 0.4)
    with pytest.raises(OSError):
        net.save(str(path), {"new": True})
    assert path.read_bytes() == before
    assert sorted(os.listdir(path.parent)) == [path.name]

    def interrupted_save(obj, f, *a, **k):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        net.save(str(path))
    assert path.read_bytes() == before
    assert sorted(os.listdir(path.parent)) == [path.name]
    monkeypatch.setattr(torch, "save", real_save)
    net.save(str(path))                                 # and a working save replaces it
    assert path.read_bytes() != before
    assert sorted(os.listdir(path.parent)) == [path.name]


def test_saved_file_honours_the_umask_and_folders_are_created(tmp_path):
    old = os.umask(0o022)
    try:
        path = tmp_path / "new" / "deeper" / "m.pth"
        M.WideResNet(10, 1).save(str(path))
    finally:
        os.umask(old)
    assert path.is_file()
    assert path.stat().st_mode & 0o777 == 0o644


def test_missing_file_is_a_user_error_naming_it(tmp_path):
    path = tmp_path / "absent.pth"
    with pytest.raises(M.UserError, match="absent.pth") as info:
        M.WideResNet(10, 1).load(str(path))
    assert str(path) in str(info.value)
    with pytest.raises(M.UserError):
        M.load_model(str(path))


def test_corrupt_file_is_a_user_error_naming_it(tmp_path):
    path = tmp_path / "corrupt.pth"
    path.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(M.UserError) as info:
        M.WideResNet(10, 1).load(str(path))
    assert str(path) in str(info.value)
    with pytest.raises(M.UserError) as info:
        M.load_model(str(path))
    assert str(path) in str(info.value)


def _write(path, content):
    if content == "directory":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        torch.save(content, path)


@pytest.mark.parametrize("content, reason", [
    ({"epoch": 3, "note": "not a model"}, "it has no state_dict of named tensors"),
    ({"state_dict": {"a": 1}}, "it has no state_dict of named tensors"),
    ({"state_dict": []}, "it has no state_dict of named tensors"),
    ({"arch": {"depth": 28}, "state_dict": {"w": torch.zeros(1)}}, "is none of wrn, preact18 with its integer"),
    ({"arch": {"name": "vit", "num_classes": 10}, "state_dict": {"w": torch.zeros(1)}}, "is none of wrn, preact18"),
    ({"arch": {"depth": 12, "widen_factor": 1, "num_classes": 10}, "state_dict": {"w": torch.zeros(1)}},
     "no CIFAR-10 WideResNet"),
    ({"arch": {"depth": 10, "widen_factor": 1, "num_classes": 10}, "meta": [1], "state_dict": {"w": torch.zeros(1)}},
     "its meta is not a dict"),
    ([1, 2], "holds a list"),
    ("a text file\n", "not written by torch.save"),
    ("directory", "is a directory, not a model file"),
    (b"PK\x03\x04" + bytes(100), "a damaged or truncated torch.save archive"),
])
def test_malformed_model_files_are_one_line_user_errors(tmp_path, content, reason):
    path = tmp_path / "bad.pth"
    _write(path, content)
    for load in (lambda: M.WideResNet(10, 1).load(str(path)), lambda: M.load_model(str(path))):
        with pytest.raises(M.UserError) as info:
            load()
        message = str(info.value)
        assert message.startswith(str(path)) and reason in message and "\n" not in message, message


def test_truncated_model_file_is_a_user_error(tmp_path, committed_model_file):
    path = tmp_path / "half.pth"
    data = committed_model_file.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(M.UserError, match="damaged or truncated"):
        M.load_model(str(path))


def test_wrong_architecture_is_a_user_error_naming_the_file(saved_tiny, tmp_path):
    _, path, _ = saved_tiny
    with pytest.raises(M.UserError) as info:
        M.Net().load(str(path))
    assert str(path) in str(info.value) and "WRN-10-1" in str(info.value)
    # a plain state dict of another architecture (no arch recorded) fails just as clearly
    plain = tmp_path / "plain_10_1.pth"
    torch.save(M.WideResNet(10, 1).state_dict(), plain)
    with pytest.raises(M.UserError) as info:
        M.Net().load(str(plain))
    assert str(plain) in str(info.value)
    with pytest.raises(M.UserError) as info:
        M.WideResNet(10, 2).load(str(plain))
    assert str(plain) in str(info.value)
    # and a state dict without the MeanSparse buffers is not silently accepted
    net = M.WideResNet(10, 1)
    no_sparse = tmp_path / "no_sparse.pth"
    torch.save({k: v for k, v in net.state_dict().items() if "sparse" not in k}, no_sparse)
    with pytest.raises(M.UserError) as info:
        M.WideResNet(10, 1).load(str(no_sparse))
    assert str(no_sparse) in str(info.value)


def test_load_for_testing_loads_the_committed_file_in_eval_mode(repo_root, committed_model_file):
    net = M.Net()
    assert net.training
    assert net.load_for_testing(project_dir=str(repo_root)) is net
    assert not net.training and not any(m.training for m in net.modules())
    payload = torch.load(committed_model_file, weights_only=True)
    stored = payload["state_dict"]
    current = net.state_dict()
    assert set(stored) == set(current)
    for name, value in stored.items():
        assert current[name].dtype == (torch.int64 if value.dtype == torch.int64 else torch.float32)
        assert torch.equal(current[name].to(value.dtype), value), name
    # its alpha, in every MeanSparse buffer (compared above) and in its metadata, is the one the adaptive
    # criterion chose on the validation split
    calibration = net.meta["calibration"]
    assert M.get_alpha(net) == payload["alpha"] == calibration["alpha"]
    assert calibration["criterion"] == "adaptive" and calibration["n_val"] == 1024
    assert M.choose_alpha(calibration["sweep"], "adaptive") == calibration["alpha"]


def test_the_platform_part_needs_torch_alone(repo_root, run_python, tmp_path):
    """Net().load_for_testing() and a forward pass with tqdm, numpy, matplotlib and pyautoattack unimportable."""
    code = ("import sys\n"
            "for name in ('tqdm', 'numpy', 'matplotlib', 'pyautoattack', 'torchvision'):\n"
            "    sys.modules[name] = None\n"
            f"sys.path.insert(0, {str(repo_root)!r})\n"
            "import torch, model\n"
            f"net = model.Net().load_for_testing({str(repo_root)!r})\n"
            "print(tuple(net(torch.rand(2, 3, 32, 32)).shape), net.training)\n")
    result = run_python(["-W", "ignore", "-c", code], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "(2, 10) False"
