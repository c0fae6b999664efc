"""MeanSparse calibration: collect_statistics, choose_alpha, calibrate."""
import copy

import pytest
import torch

import model as M


def _direct_statistics(net, images):
    """Per-channel mean and population std of every MeanSparse input, alpha 0, eval mode, float64."""
    net = copy.deepcopy(net).eval()
    M.set_alpha(net, 0.0)
    modules = M.meansparse_modules(net)
    seen = [[] for _ in modules]
    handles = [m.register_forward_pre_hook(lambda mod, inp, k=k: seen[k].append(inp[0].detach().double().clone()))
               for k, m in enumerate(modules)]
    with torch.no_grad():
        net(images.float() / 255)
    for h in handles:
        h.remove()
    stats = []
    for chunks in seen:
        x = torch.cat(chunks).transpose(0, 1).flatten(1)                 # channels x (images * positions)
        stats.append((x.mean(dim=1), x.std(dim=1, unbiased=False)))
    return stats


def test_collect_statistics_matches_a_direct_computation(tiny_trained, train_set):
    images, labels = train_set[0][:200], train_set[1][:200]
    net = tiny_trained
    M.set_alpha(net, 0.3)                   # statistics must be taken with every mask off (alpha 0) ...
    for m in M.meansparse_modules(net):     # ... whatever the old statistics were
        m.mean.fill_(0.7)
        m.std.fill_(0.1)
    net.train()
    bn_before = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    expected = _direct_statistics(net, images)
    M.collect_statistics(net, M.Batches(images, labels, 64, device="cpu"))    # 64, 64, 64, 8: uneven
    modules = M.meansparse_modules(net)
    assert len(modules) == len(expected) == 7
    for m, (mean, std) in zip(modules, expected):
        assert m.mean.dtype == torch.float32 and m.std.dtype == torch.float32
        assert torch.allclose(m.mean.double(), mean, rtol=1e-5, atol=1e-5)
        assert torch.allclose(m.std.double(), std, rtol=1e-5, atol=1e-5)
        assert float(std.min()) > 0                                     # real statistics, not the defaults
    # the model is left as found: training mode, alpha 0.3, BatchNorm statistics untouched
    assert net.training
    assert M.get_alpha(net) == 0.3
    for k, v in net.state_dict().items():
        if "running" in k:
            assert torch.equal(v, bn_before[k]), k


def _sweep(*rows):
    return [dict(zip(("alpha", "clean", "plain", "bpda"), r)) for r in rows]


def test_choose_alpha_respects_the_clean_accuracy_limit():
    sweep = _sweep((0.0, 80.0, 40.0, 40.0),
                   (0.1, 79.6, 43.0, 42.0),          # drop 0.4: allowed
                   (0.2, 79.4, 50.0, 48.0),          # drop 0.6: not allowed, although best
                   (0.3, 70.0, 60.0, 55.0))
    assert M.choose_alpha(sweep) == 0.1
    assert M.choose_alpha(sweep, "bpda") == 0.1
    assert M.choose_alpha(sweep, "bpda", max_clean_drop=1.0) == 0.2
    assert M.choose_alpha(sweep, "bpda", max_clean_drop=100.0) == 0.3


def test_choose_alpha_plain_criterion_boundary_and_ties():
    sweep = _sweep((0.0, 80.0, 40.0, 40.0),
                   (0.1, 79.5, 41.0, 45.0),          # drop exactly 0.5: allowed; best by bpda
                   (0.2, 80.5, 47.0, 44.0))          # better clean is fine; best by plain
    assert M.choose_alpha(sweep, "plain") == 0.2
    assert M.choose_alpha(sweep, "bpda") == 0.1
    ties = _sweep((0.0, 80.0, 40.0, 40.0), (0.3, 80.0, 45.0, 45.0), (0.1, 80.0, 45.0, 45.0))
    assert M.choose_alpha(ties) == 0.1                # ties go to the smaller alpha
    only_zero = _sweep((0.0, 80.0, 40.0, 40.0), (0.4, 70.0, 90.0, 90.0))
    assert M.choose_alpha(only_zero) == 0.0


def test_calibrate_returns_a_grid_alpha_and_sets_it(tiny_trained, train_set, val_set):
    net = tiny_trained
    stats = M.Batches(train_set[0][:128], train_set[1][:128], 64, device="cpu")
    val = M.Batches(val_set[0][:32], val_set[1][:32], 32, device="cpu")
    lines = []
    alphas = [0.0, 0.1, 0.5]
    alpha, sweep = M.calibrate(net, stats, val, alphas, steps=1, log=lines.append)
    assert alpha in alphas
    assert [row["alpha"] for row in sweep] == alphas
    for row in sweep:
        assert set(row) == {"alpha", "clean", "plain", "bpda"}
        assert all(0.0 <= row[k] <= 100.0 for k in ("clean", "plain", "bpda"))
        assert row["plain"] <= row["clean"] and row["bpda"] <= row["clean"]
    assert sweep[0]["plain"] == sweep[0]["bpda"]          # alpha 0: no mask, identical attacks
    assert alpha == M.choose_alpha(sweep)
    assert M.get_alpha(net) == alpha
    assert all(float(m.alpha) == pytest.approx(alpha) for m in M.meansparse_modules(net))
    assert not net.training
    assert any(float(m.mean.abs().sum()) > 0 for m in M.meansparse_modules(net))      # statistics collected
    assert len(lines) == len(alphas) + 1 and f"chosen alpha {alpha:g}" in lines[-1]
    # the clean accuracy of alpha 0 is the model's plain accuracy
    with M.alpha_set_to(net, 0.0):
        assert sweep[0]["clean"] == M.evaluate(net, val, verbose=False)
