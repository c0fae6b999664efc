"""MeanSparse calibration: collect_statistics, choose_alpha, calibrate."""
import copy
import json

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
    assert M.choose_alpha(ties, "bpda") == 0.1        # ties go to the smaller alpha
    only_zero = _sweep((0.0, 80.0, 40.0, 40.0), (0.4, 70.0, 90.0, 90.0))
    assert M.choose_alpha(only_zero, "bpda") == 0.0


def _adaptive(*rows):
    return [dict(zip(("alpha", "clean", "adaptive", "gain", "gain_se"), r)) for r in rows]


def test_adaptive_criterion_needs_a_gain_beyond_two_paired_standard_errors():
    noise = _adaptive((0.0, 80.0, 46.0, 0.0, 0.0),
                      (0.2, 80.0, 46.6, 0.6, 0.4),   # 1.5 standard errors: noise
                      (0.4, 80.0, 46.3, 0.3, 0.2))
    assert M.choose_alpha(noise) == 0.0               # the default criterion is the adaptive one
    real = _adaptive((0.0, 80.0, 46.0, 0.0, 0.0),
                     (0.2, 80.0, 47.0, 1.0, 0.3),    # 3.3 standard errors
                     (0.4, 80.0, 48.0, 2.0, 0.5),    # 4 standard errors and better still
                     (0.6, 79.0, 50.0, 4.0, 0.5))    # the best, but 1 point of clean accuracy lost
    assert M.choose_alpha(real) == 0.4
    worse = _adaptive((0.0, 80.0, 46.0, 0.0, 0.0), (0.2, 80.0, 44.0, -2.0, 0.3))
    assert M.choose_alpha(worse) == 0.0


def test_paired_gain_is_the_mean_and_standard_error_of_the_per_image_difference():
    base = torch.tensor([True, True, False, False, True, False, True, False])
    robust = torch.tensor([True, False, True, True, True, False, True, True])
    gain, se = M.paired_gain(robust, base)
    d = robust.double() - base.double()                 # 0 -1 1 1 0 0 0 1
    assert gain == pytest.approx(100 * 2 / 8)
    assert se == pytest.approx(100 * float(d.std()) / 8 ** 0.5)
    assert M.paired_gain(base, base) == (0.0, 0.0)


def _opts(**kw):
    return M.AttackOptions(steps=1, apgd_iters=2, **kw).at("linf", 2 / 255)


@pytest.mark.parametrize("criterion", ["bpda", "adaptive"])
def test_calibrate_returns_a_grid_alpha_and_sets_it(tiny_trained, train_set, val_set, criterion):
    net = tiny_trained
    stats = M.Batches(train_set[0][:128], train_set[1][:128], 64, device="cpu")
    val = M.Batches(val_set[0][:32], val_set[1][:32], 32, device="cpu")
    lines = []
    alphas = [0.0, 0.1, 0.5]
    alpha, sweep = M.calibrate(net, stats, val, alphas, _opts(), criterion=criterion, log=lines.append)
    assert alpha in alphas
    assert [row["alpha"] for row in sweep] == alphas
    keys = {"alpha", "clean", "plain", "bpda"} | ({"adaptive", "gain", "gain_se"} if criterion == "adaptive" else set())
    for row in sweep:
        assert set(row) == keys
        assert all(0.0 <= row[k] <= 100.0 for k in ("clean", "plain", "bpda"))
        assert row["plain"] <= row["clean"] and row["bpda"] <= row["clean"]
        if criterion == "adaptive":
            assert row["adaptive"] <= row["clean"]
    assert sweep[0]["plain"] == sweep[0]["bpda"]          # alpha 0: no mask, identical attacks
    assert alpha == M.choose_alpha(sweep, criterion)
    assert M.get_alpha(net) == alpha
    assert all(float(m.alpha) == pytest.approx(alpha) for m in M.meansparse_modules(net))
    assert not net.training
    assert any(float(m.mean.abs().sum()) > 0 for m in M.meansparse_modules(net))      # statistics collected
    assert len(lines) == len(alphas) + 1
    assert (f"chosen alpha {alpha:g}" in lines[-1]) or (alpha == 0 and "MeanSparse did not help" in lines[-1])
    if criterion == "adaptive":
        assert sweep[0]["gain"] == 0.0
        assert sweep[1]["gain"] == pytest.approx(sweep[1]["adaptive"] - sweep[0]["adaptive"])
    # the clean accuracy of alpha 0 is the model's plain accuracy
    with M.meansparse_as(net, alpha=0.0):
        assert sweep[0]["clean"] == M.accuracy(net, val, "natural", _opts(), verbose=False)


@pytest.mark.parametrize("robust_by_alpha, expected", [
    # alpha 0.1 rescues 2 of 64 images and loses 1 elsewhere: within the paired noise
    ({0.0: set(range(20)), 0.1: set(range(1, 20)) | {40, 41}}, 0.0),
    # alpha 0.1 rescues 12 images and loses none: a real gain
    ({0.0: set(range(20)), 0.1: set(range(32))}, 0.1),
])
def test_calibrate_chooses_by_the_paired_adaptive_gain(tiny_trained, train_set, val_set, monkeypatch,
                                                       robust_by_alpha, expected):
    def fake_apgd_batch(model, x, y, components, **kw):
        robust = torch.zeros(len(y), dtype=torch.bool)
        robust[sorted(robust_by_alpha[M.get_alpha(model)])] = True
        return robust, {}

    monkeypatch.setattr(M, "apgd_batch", fake_apgd_batch)
    monkeypatch.setattr(M.Attack, "batch", lambda self, x, y, start: (torch.ones(len(y), dtype=torch.bool), {}))
    stats = M.Batches(train_set[0][:64], train_set[1][:64], 64, device="cpu")
    val = M.Batches(val_set[0][:64], val_set[1][:64], 64, device="cpu")
    lines = []
    alpha, sweep = M.calibrate(tiny_trained, stats, val, [0.1], _opts(), log=lines.append)
    assert [row["clean"] for row in sweep] == [100.0, 100.0]             # equal clean accuracy at both alphas
    assert alpha == expected and M.get_alpha(tiny_trained) == expected
    assert sweep[1]["gain"] == pytest.approx(100 * (len(robust_by_alpha[0.1]) - 20) / 64)
    if expected == 0.0:
        assert "MeanSparse did not help this model" in lines[-1]


class Killed(BaseException):
    """Stands for kill -9 or a lost machine: no handler of model.py sees it."""


def _two_batch_sweep(model, train_set, val_set):
    """(statistics batches, validation batches of two APGD batches per alpha, the uninterrupted
    calibration's result over alphas 0 and 0.1): what the interrupted calibrations below must reproduce."""
    stats = M.Batches(train_set[0][:128], train_set[1][:128], 64, device="cpu")
    val = M.Batches(val_set[0][:32], val_set[1][:32], 16, device="cpu")
    return stats, val, M.calibrate(copy.deepcopy(model), stats, val, [0.1], _opts(), log=lambda line: None)


def test_calibrate_takes_over_what_an_interrupted_call_finished(tiny_trained, train_set, val_set, tmp_path,
                                                               monkeypatch):
    stats, val, expected = _two_batch_sweep(tiny_trained, train_set, val_set)
    progress, real, attacked = tmp_path / "sweep.json", M.apgd_batch, []

    def counting(model, x, y, components, **kw):
        attacked.append(M.get_alpha(model))
        if attacked == [0.0, 0.0, 0.1] and stop:
            raise KeyboardInterrupt
        return real(model, x, y, components, **kw)

    monkeypatch.setattr(M, "apgd_batch", counting)
    stop = True
    with pytest.raises(KeyboardInterrupt):
        M.calibrate(copy.deepcopy(tiny_trained), stats, val, [0.1], _opts(), progress_path=str(progress),
                    log=lambda line: None)
    stop, attacked[:], lines = False, [], []
    again = M.calibrate(copy.deepcopy(tiny_trained), stats, val, [0.1], _opts(), progress_path=str(progress),
                        log=lines.append)
    assert attacked == [0.1, 0.1] and again == expected          # alpha 0 taken over, the gains as before
    assert f"alpha 0 apgd-linf: kept from {progress}" in lines and f"alpha 0.1 natural: kept from {progress}" in lines
    # a calibration of other weights, images or seed takes nothing over, and keeps the other one as .prev
    attacked[:], lines, first = [], [], progress.read_bytes()
    M.calibrate(copy.deepcopy(tiny_trained), stats, val, [0.1], _opts(seed=1), progress_path=str(progress),
                log=lines.append)
    assert attacked == [0.0, 0.0, 0.1, 0.1]
    assert (tmp_path / "sweep.json.prev").read_bytes() == first
    assert lines[0] == (f"note: {progress} was made with other settings (seed 0 there): starting afresh; it may "
                        f"hold hours of work, so it is kept as {progress}.prev (to continue it instead, rename it "
                        f"back and repeat its settings)")
    # other settings of one row (APGD iterations) measure that row again, and keep the others
    lines = []
    M.calibrate(copy.deepcopy(tiny_trained), stats, val, [0.1], M.AttackOptions(steps=1, apgd_iters=3, seed=1).at(
        "linf", 2 / 255), progress_path=str(progress), log=lines.append)
    assert "alpha 0 apgd-linf: the report's row was made with other settings; measuring it again" in lines
    assert f"alpha 0 bpda-linf: kept from {progress}" in lines


def test_calibrate_continues_an_alpha_whose_apgd_was_interrupted(tiny_trained, train_set, val_set, tmp_path,
                                                                 monkeypatch):
    stats, val, expected = _two_batch_sweep(tiny_trained, train_set, val_set)
    progress, real, batches_seen = tmp_path / "sweep.json", M.apgd, []

    def stop_in_second_batch_of_alpha_01(model, x, y, **kw):
        if kw["loss"] == "ce" and kw.get("crafted_at_alpha") is None:
            batches_seen.append(M.get_alpha(model))
            if batches_seen == [0.0, 0.0, 0.1, 0.1]:
                raise Killed
        return real(model, x, y, **kw)

    monkeypatch.setattr(M, "apgd", stop_in_second_batch_of_alpha_01)
    with pytest.raises(Killed):
        M.calibrate(copy.deepcopy(tiny_trained), stats, val, [0.1], _opts(), progress_path=str(progress),
                    log=lambda line: None)
    saved = json.loads(progress.read_text())["results"]
    assert "complete" not in saved["alpha 0 apgd-linf"] and len(saved["alpha 0.1 apgd-linf"]["per_image"]) == 16
    assert saved["alpha 0.1 apgd-linf"]["complete"] is False
    monkeypatch.setattr(M, "pgd", lambda *a, **k: pytest.fail("a kept PGD row was measured again"))
    lines = []
    again = M.calibrate(copy.deepcopy(tiny_trained), stats, val, [0.1], _opts(), progress_path=str(progress),
                        log=lines.append)
    assert batches_seen == [0.0, 0.0, 0.1, 0.1, 0.1]         # only the second batch of alpha 0.1 again
    assert again == expected
    assert "alpha 0.1 apgd-linf: continuing after the first 16 of 32 images" in lines, lines


def test_calibrate_on_a_one_value_grid_says_that_nothing_was_chosen(tiny_trained, train_set, val_set):
    stats = M.Batches(train_set[0][:64], train_set[1][:64], 64, device="cpu")
    val = M.Batches(val_set[0][:16], val_set[1][:16], 16, device="cpu")
    lines = []
    alpha, sweep = M.calibrate(tiny_trained, stats, val, [0.0], _opts(), criterion="bpda", log=lines.append)
    assert alpha == 0.0 and len(sweep) == 1
    assert lines[-1] == "alpha 0: the only value of the grid"
