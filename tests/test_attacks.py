"""Attacks: pgd (both norms), projection, restarts, side effects, strength, BPDA, the rows of ATTACKS
(PGD, the adaptive evaluation, AutoAttack), measure and the norm table."""
import math
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import model as M

EPS_LINF = 8 / 255


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _linear_model(seed=0, shape=(3, 8, 8), classes=10):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), classes)).eval()


def _inputs(n=32, shape=(3, 8, 8), seed=0):
    g = _gen(seed)
    x = torch.rand(n, *shape, generator=g)
    x[:, 0, 0, 0] = 0.0          # pixels on the box's faces: the clamp must hold them
    x[:, 0, 0, 1] = 1.0
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


@pytest.fixture
def wrn():
    torch.manual_seed(0)
    return M.WideResNet(10, 1).eval()


# ----------------------------------------------------------------------------------------------------
# Constraints and projection
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm, eps", [("linf", EPS_LINF), ("l2", 0.5)])
def test_pgd_stays_in_the_eps_ball_and_in_the_unit_box(wrn, norm, eps):
    x, y = _inputs(16, (3, 32, 32))
    x_adv = M.pgd(wrn, x, y, norm=norm, eps=eps, step_size=eps / 2, steps=4, generator=_gen(0))
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    delta = x_adv - x
    if norm == "linf":
        assert float(delta.abs().max()) <= eps + 1e-6
        assert float(delta.abs().max()) >= eps - 1e-6            # the attack does use the budget
    else:
        norms = delta.flatten(1).norm(dim=1)
        assert bool((norms <= eps + 1e-5).all())
        assert float(norms.max()) >= 0.9 * eps


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_start_alone_is_in_the_ball(norm):
    x, y = _inputs(64)
    eps = EPS_LINF if norm == "linf" else 0.5
    x_adv = M.pgd(_linear_model(), x, y, norm=norm, eps=eps, step_size=0.1, steps=0, generator=_gen(0))
    delta = x_adv - x
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    if norm == "linf":
        assert float(delta.abs().max()) <= eps + 1e-6
    else:
        assert float(delta.flatten(1).norm(dim=1).max()) <= eps + 1e-5
    assert float(delta.abs().max()) > 0                               # it did move


def test_l2_projection_matches_the_closed_form():
    g = _gen(0)
    delta = torch.randn(20, 3, 4, 4, generator=g) * torch.linspace(0.01, 2.0, 20).view(-1, 1, 1, 1)
    eps = 0.5
    norms = delta.flatten(1).norm(dim=1)
    assert (norms < eps).any() and (norms > eps).any()
    expected = delta * torch.clamp(eps / norms, max=1.0).view(-1, 1, 1, 1)
    got = M.NORMS["l2"].project(delta, eps)
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-7)
    inside = norms < eps
    assert torch.equal(got[inside], delta[inside])                    # inside the ball: untouched
    assert torch.allclose(got[~inside].flatten(1).norm(dim=1), torch.full(((~inside).sum(),), eps), atol=1e-6)
    # L-inf projection is the clamp
    assert torch.equal(M.NORMS["linf"].project(delta, 0.3), delta.clamp(-0.3, 0.3))


def test_eps_zero_returns_the_input():
    x, y = _inputs()
    for norm in ("linf", "l2"):
        x_adv = M.pgd(_linear_model(), x, y, norm=norm, eps=0.0, step_size=0.1, steps=3, generator=_gen(0))
        assert torch.equal(x_adv, x)


# ----------------------------------------------------------------------------------------------------
# Side effects and repeatability
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("training", [False, True])
def test_pgd_leaves_mode_and_grads_alone(wrn, training):
    wrn.train(training)
    x, y = _inputs(8, (3, 32, 32))
    M.pgd(wrn, x, y, norm="linf", eps=EPS_LINF, step_size=EPS_LINF / 4, steps=2, restarts=2, generator=_gen(0))
    assert all(m.training == training for m in wrn.modules())
    assert all(p.grad is None for p in wrn.parameters())
    # an existing .grad is left exactly as it was
    for p in wrn.parameters():
        p.grad = torch.full_like(p, 0.25)
    M.pgd(wrn, x, y, norm="l2", eps=0.5, step_size=0.1, steps=2, generator=_gen(0))
    assert all(torch.equal(p.grad, torch.full_like(p, 0.25)) for p in wrn.parameters())
    assert all(m.training == training for m in wrn.modules())


def test_pgd_does_not_modify_its_input_and_detaches():
    model = _linear_model()
    x, y = _inputs()
    x_req = x.clone().requires_grad_(True)
    out = M.pgd(model, x_req, y, norm="linf", eps=0.1, step_size=0.05, steps=2, generator=_gen(0))
    assert torch.equal(x_req.detach(), x) and x_req.grad is None
    assert out.grad_fn is None and not out.requires_grad


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_generator_makes_pgd_repeatable(wrn, norm):
    x, y = _inputs(8, (3, 32, 32))
    kw = dict(norm=norm, eps=EPS_LINF if norm == "linf" else 0.5, step_size=0.01, steps=2)
    a = M.pgd(wrn, x, y, generator=_gen(5), **kw)
    b = M.pgd(wrn, x, y, generator=_gen(5), **kw)
    c = M.pgd(wrn, x, y, generator=_gen(6), **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    d = M.pgd(wrn, x, y, random_start=False, **kw)
    e = M.pgd(wrn, x, y, random_start=False, generator=_gen(99), **kw)
    assert torch.equal(d, e)                                          # no random start: no randomness


@pytest.mark.parametrize("kwargs", [
    dict(eps=-0.1), dict(norm="l1"), dict(norm="Linf"), dict(steps=-1), dict(step_size=-0.01), dict(restarts=0),
])
def test_invalid_arguments_raise_value_error(kwargs):
    x, y = _inputs(4)
    args = dict(norm="linf", eps=0.1, step_size=0.01, steps=1)
    args.update(kwargs)
    with pytest.raises(ValueError):
        M.pgd(_linear_model(), x, y, **args)


# ----------------------------------------------------------------------------------------------------
# Restarts keep the worst case
# ----------------------------------------------------------------------------------------------------
class ScriptedModel(nn.Module):
    """Returns pre-set logits on its k-th call and records what it was given."""

    def __init__(self, logits_per_call):
        super().__init__()
        self.logits_per_call = logits_per_call
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.logits_per_call[len(self.inputs) - 1].clone()


def test_restarts_keep_misclassified_first_then_highest_loss():
    # 3 classes, true class 0 for every example. Losses: [0.1,0,0.05] 1.05 correct; [0.5,0.6,-5] 0.74 wrong;
    # [3,0,0] 0.10 correct; [1,0,0] 0.55 correct; [2,0,0] 0.24 correct; [0,1,0] 1.55, [0,2,0] 2.13,
    # [0,3,0] 3.10 wrong.
    C1, W1, C2, C3, C4 = [0.1, 0, 0.05], [0.5, 0.6, -5], [3, 0, 0], [1, 0, 0], [2, 0, 0]
    Wa, Wb, Wc = [0, 1, 0], [0, 2, 0], [0, 3, 0]
    table = [   # restart -> logits of examples 0..3
        [C1, C2, Wa, W1],
        [W1, C3, Wc, C1],
        [C2, C4, Wb, C3],
    ]
    expected = [1, 1, 1, 0]      # wrong beats a correct with a higher loss; then the highest loss; ties: first
    model = ScriptedModel([torch.tensor(t, dtype=torch.float32) for t in table])
    x = torch.rand(4, 3, 4, 4, generator=_gen(0))
    y = torch.zeros(4, dtype=torch.long)
    losses = [F.cross_entropy(torch.tensor(t, dtype=torch.float32), y, reduction="none") for t in table]
    assert losses[0][0] > losses[1][0]                   # the wrong one of example 0 has the lower loss
    x_adv = M.pgd(model, x, y, norm="linf", eps=0.1, step_size=0.0, steps=0, restarts=3, generator=_gen(1))
    assert len(model.inputs) == 3
    candidates = model.inputs
    assert not torch.equal(candidates[0], candidates[1])
    for i, k in enumerate(expected):
        assert torch.equal(x_adv[i], candidates[k][i]), f"example {i}: expected restart {k}"


def test_restarts_return_the_worst_of_the_single_runs():
    """With a real gradient: restarts=R gives, per example, the worst of R single runs drawn from the same
    generator stream."""
    model = _linear_model(seed=3)
    x, y = _inputs(64, seed=3)
    kw = dict(norm="linf", eps=0.05, step_size=0.01, steps=2)
    g = _gen(42)
    singles = [M.pgd(model, x, y, generator=g, **kw) for _ in range(4)]
    best = M.pgd(model, x, y, restarts=4, generator=_gen(42), **kw)
    with torch.no_grad():
        scores = []
        for s in singles:
            logits = model(s)
            scores.append((logits.argmax(1) != y, F.cross_entropy(logits, y, reduction="none")))
        best_logits = model(best)
        best_wrong = best_logits.argmax(1) != y
        best_loss = F.cross_entropy(best_logits, y, reduction="none")
    chosen = []
    for i in range(len(y)):
        match = [k for k, s in enumerate(singles) if torch.equal(best[i], s[i])]
        assert match, f"example {i} is none of the single runs"
        top = max((bool(w[i]), float(l[i])) for w, l in scores)
        assert (bool(best_wrong[i]), float(best_loss[i])) == pytest.approx(top)
        chosen.append(match[0])
    assert len(set(chosen)) > 1                       # the selection is observable: not always restart 0
    assert bool((best_loss >= scores[0][1] - 1e-6).all())


# ----------------------------------------------------------------------------------------------------
# Strength
# ----------------------------------------------------------------------------------------------------
def _accuracy_and_loss(model, x, y):
    with torch.no_grad():
        logits = model(x)
    return 100.0 * (logits.argmax(1) == y).float().mean().item(), F.cross_entropy(logits, y).item()


def test_pgd_breaks_a_non_robust_model_and_beats_one_fgsm_step(tiny_trained, val_set):
    x = val_set[0][:192].float() / 255
    y = val_set[1][:192]
    nat, nat_loss = _accuracy_and_loss(tiny_trained, x, y)
    assert nat >= 20.0, f"premise: the tiny model well above chance (10 %), not {nat:.1f} %"
    fgsm = M.pgd(tiny_trained, x, y, norm="linf", eps=EPS_LINF, step_size=EPS_LINF, steps=1, random_start=False)
    pgd = M.pgd(tiny_trained, x, y, norm="linf", eps=EPS_LINF, step_size=EPS_LINF / 4, steps=10,
                generator=_gen(0))
    fgsm_acc, fgsm_loss = _accuracy_and_loss(tiny_trained, fgsm, y)
    pgd_acc, pgd_loss = _accuracy_and_loss(tiny_trained, pgd, y)
    assert fgsm_acc < nat and fgsm_loss > nat_loss
    assert pgd_acc <= nat / 2                       # 2 % of 26 % here: a wide margin
    assert pgd_acc <= fgsm_acc and pgd_loss >= fgsm_loss
    l2 = M.pgd(tiny_trained, x, y, norm="l2", eps=0.5, step_size=0.125, steps=10, generator=_gen(0))
    l2_acc, l2_loss = _accuracy_and_loss(tiny_trained, l2, y)
    assert l2_acc <= nat * 2 / 3 and l2_loss > nat_loss      # 11 % of 26 % here


def test_committed_model_is_robust_but_not_invulnerable(committed_model_file, val_set):
    net = M.Net().load_for_testing(str(committed_model_file.parent.parent))
    x = val_set[0][:24].float() / 255
    y = val_set[1][:24]
    nat, _ = _accuracy_and_loss(net, x, y)
    big = 32 / 255
    adv = M.pgd(net, x, y, norm="linf", eps=big, step_size=big / 3, steps=3, generator=_gen(0))
    adv_acc, _ = _accuracy_and_loss(net, adv, y)
    assert nat >= 70.0
    assert adv_acc <= nat - 40.0                                        # a large eps must break it
    assert not net.training and all(m.mode == "mask" for m in M.meansparse_modules(net))


# ----------------------------------------------------------------------------------------------------
# BPDA through a masked gradient
# ----------------------------------------------------------------------------------------------------
def _masked_model():
    torch.manual_seed(0)
    sparse = M.MeanSparse(3)
    sparse.mean.fill_(0.5)
    sparse.alpha.fill_(1e6)                     # every input inside the band: output constant, grad 0
    return nn.Sequential(sparse, nn.Flatten(), nn.Linear(3 * 8 * 8, 10)).eval()


def test_bpda_gives_a_gradient_where_the_plain_one_is_zero():
    model = _masked_model()
    x, y = _inputs(8)
    x.requires_grad_(True)
    grad, = torch.autograd.grad(M.cross_entropy_sum(model(x), y), x)
    assert float(grad.abs().max()) == 0.0
    with M.bpda(model):
        grad, = torch.autograd.grad(M.cross_entropy_sum(model(x), y), x)
    assert float(grad.abs().max()) > 0.0
    x = x.detach()
    plain = M.pgd(model, x, y, norm="linf", eps=0.1, step_size=0.05, steps=3, random_start=False)
    assert torch.equal(plain, x)                                # nothing to follow
    with M.bpda(model):
        through = M.pgd(model, x, y, norm="linf", eps=0.1, step_size=0.05, steps=3, random_start=False)
    assert float((through - x).abs().max()) == pytest.approx(0.1, abs=1e-6)
    assert model[0].mode == "mask"


# ----------------------------------------------------------------------------------------------------
# The rows of ATTACKS and measure
# ----------------------------------------------------------------------------------------------------
def test_a_transfer_row_crafts_at_alpha_zero_under_no_bpda_and_restores_the_model(wrn, val_set):
    M.set_alpha(wrn, 0.3)
    seen = []
    h = wrn.sparse.register_forward_pre_hook(lambda m, i: seen.append((float(m.alpha), m.mode)))
    batches = M.Batches(val_set[0][:4], val_set[1][:4], 4, device="cpu")
    row = M.measure(M.ATTACKS["transfer-linf"](wrn, M.AttackOptions(steps=2)), batches, desc="t", verbose=False)
    h.remove()
    assert seen[:2] == [(0.0, "mask")] * 2 and seen[-1] == (pytest.approx(0.3), "mask")   # crafted, then judged
    assert row["crafted_at_alpha"] == 0.0 and row["bpda"] is False and row["steps"] == 2
    assert M.get_alpha(wrn) == 0.3 and wrn.sparse.mode == "mask"
    with_bpda = M.ATTACKS["bpda-l2"](wrn, M.AttackOptions(steps=1))
    seen.clear()
    h = wrn.sparse.register_forward_pre_hook(lambda m, i: seen.append(m.mode))
    with_bpda.batch(*next(iter(batches)), 0)
    h.remove()
    assert seen == ["bpda", "mask"] and with_bpda.settings["step_size"] == 0.125


def test_measure_counts_correct_predictions_and_records_them_per_image():
    model = ScriptedModel([torch.eye(10)[[1, 2, 3]], torch.eye(10)[[4, 5]]])
    batches = M.Batches(torch.zeros(5, 3, 32, 32, dtype=torch.uint8), torch.tensor([1, 0, 3, 4, 5]), 3, device="cpu")
    row = M.measure(M.Attack(model, M.AttackOptions()), batches, desc="natural", verbose=False)
    assert row["accuracy"] == pytest.approx(80.0) and row["per_image"] == "10111" and row["n"] == 5
    assert set(row) == {"accuracy", "n", "seconds", "per_image"}
    saved = []
    model = ScriptedModel([torch.eye(10)[[1, 2, 3]], torch.eye(10)[[4, 5]]])
    M.measure(M.Attack(model, M.AttackOptions()), batches, desc="natural", save=saved.append, verbose=False)
    assert [r["per_image"] for r in saved] == ["10111"] * 2 and saved[-1]["n_done"] == 5   # the same row, updated
    # continued after its first batch: only the second is measured, and the result is the same
    model = ScriptedModel([torch.eye(10)[[4, 5]]])
    done = {"complete": False, "n": 5, "n_done": 3, "per_image": "101", "counts": {}, "seconds": 1.0, "device": "cpu"}
    again = M.measure(M.Attack(model, M.AttackOptions()), batches, desc="natural", done=done, verbose=False)
    assert again["per_image"] == "10111" and again["accuracy"] == pytest.approx(80.0) and again["seconds"] >= 1.0
    assert len(model.inputs) == 1 and done["per_image"] == "101"        # the row given is not changed


def test_a_pgd_row_seeds_each_batch_by_its_first_image(wrn, val_set, monkeypatch):
    starts = []
    real = M.pgd
    monkeypatch.setattr(M, "pgd", lambda *a, generator=None, **k: starts.append(generator.initial_seed())
                        or real(*a, generator=generator, **k))
    batches = M.Batches(val_set[0][:10], val_set[1][:10], 4, device="cpu")
    attack = M.ATTACKS["pgd-linf"](wrn, M.AttackOptions(steps=1, seed=3))
    whole = M.measure(attack, batches, desc="pgd", verbose=False)
    assert starts == [3 * 1_000_003 + i for i in (0, 4, 8)]
    starts.clear()
    rest = M.measure(attack, batches.after(4), desc="pgd", verbose=False)
    assert starts == [3 * 1_000_003 + i for i in (4, 8)] and rest["per_image"] == whole["per_image"][4:]


def test_a_norm_added_to_the_table_and_its_rows_to_the_registry_works_everywhere(wrn, val_set, monkeypatch):
    """Adding a norm touches NORMS and ATTACKS only: PGD, the rows, their flags and defaults follow."""
    toy = M.dataclasses.replace(M.NORMS["l2"], eps=0.25, autoattack="L1", cpu_seconds=12.0)
    monkeypatch.setitem(M.NORMS, "toy", toy)
    monkeypatch.setitem(M.ATTACKS, "pgd-toy", M.functools.partial(M.PGDAttack, norm="toy"))
    monkeypatch.setitem(M.ATTACKS, "apgd-toy", M.functools.partial(M.AdaptiveAttack, norm="toy"))
    args = M.parse_args(["--eval", "natural,pgd-toy", "--eps-toy", "0.2", "--step-toy", "0.1"])
    opts = M.plan(args, []).opts
    assert opts.eps["toy"] == 0.2 and opts.step["toy"] == 0.1 and M.AttackOptions().eps["toy"] == 0.25
    batches = M.Batches(val_set[0][:6], val_set[1][:6], 6, device="cpu")
    row = M.measure(M.ATTACKS["pgd-toy"](wrn, opts), batches, desc="toy", verbose=False)
    assert row["norm"] == "toy" and row["eps"] == 0.2 and row["step_size"] == 0.1 and len(row["per_image"]) == 6
    assert M.ATTACKS["apgd-toy"](None, opts).cpu_seconds() == 12.0


# ----------------------------------------------------------------------------------------------------
# AutoAttack: the official pyautoattack code (a requirement), run under BPDA
# ----------------------------------------------------------------------------------------------------
def test_autoattack_runs_under_bpda_and_is_at_least_as_strong_as_pgd(tiny_trained, train_set, val_set):
    net = tiny_trained
    M.collect_statistics(net, M.Batches(train_set[0][:256], train_set[1][:256], 128, device="cpu"))
    M.set_alpha(net, 0.2)
    batches = M.Batches(val_set[0][:8], val_set[1][:8], 8, device="cpu")     # Square's queries cost the most
    # a non-robust model at 6/255: AutoAttack's first attack, APGD-CE, breaks what it can, and the slow attacks
    # after it (APGD-T, FAB-T, Square) have little or nothing left to do
    eps = 6 / 255
    modes, shown = [], []
    hook = M.meansparse_modules(net)[0].register_forward_pre_hook(lambda m, i: modes.append(m.mode))
    opts = M.AttackOptions(log=shown.append).at("linf", eps)
    row = M.measure(M.ATTACKS["aa-linf"](net, opts), batches, desc="aa", verbose=False)
    hook.remove()
    # every forward pass of AutoAttack (its checks included) under BPDA, then the model's own on its images
    first_own = modes.index("mask")
    assert set(modes[:first_own]) == {"bpda"} and set(modes[first_own:]) == {"mask"}
    assert all(m.mode == "mask" for m in M.meansparse_modules(net))   # and restored afterwards
    natural = M.accuracy(net, batches, "natural", opts, verbose=False)
    pgd = M.accuracy(net, batches, "bpda-linf", opts, verbose=False)
    print(f"natural {natural:.2f}  BPDA PGD-20 {pgd:.2f}  AutoAttack {row['accuracy']:.2f}")
    assert natural > 0, "premise: the tiny model classifies one of the eight images correctly"
    assert row["accuracy"] <= pgd + 100 / 8         # within one image of PGD, or stronger
    assert len(row["per_image"]) == 8 and row["accuracy"] == 100.0 * row["per_image"].count("1") / 8
    # AutoAttack only ever breaks images: each it counts robust is one the model classifies correctly
    clean = M.measure(M.Attack(net, opts), batches, desc="natural", verbose=False)["per_image"]
    assert all(c == "1" for a, c in zip(row["per_image"], clean) if a == "1")
    assert row["accuracy"] < natural and row["version"] == "standard" and row["bpda"] is True
    # its progress lines were shown as they came and are kept for the report
    assert row["pyautoattack"] and row["log"] and shown == [f"  autoattack: {s}" for s in row["log"]]
    assert any(s.startswith("robust accuracy after APGD-CE") for s in row["log"])
    assert f"robust accuracy: {row['accuracy']:.2f}%" in row["log"][-1]     # AutoAttack's figure is ours


# ----------------------------------------------------------------------------------------------------
# APGD: the adaptive evaluation's per-image worst case
# ----------------------------------------------------------------------------------------------------
class FlagModel(nn.Module):
    """Predicts the label written into pixel (0, 0, 0) of an image, or the next class when pixel (0, 0, 1)
    is set: an attack "breaks" an image by setting that pixel."""

    def forward(self, x):
        label = (x[:, 0, 0, 0] * 10).round().long()
        return F.one_hot(torch.where(x[:, 0, 0, 1] > 0.5, (label + 1) % 10, label), 10).float()


def test_apgd_worst_case_counts_an_image_broken_by_any_one_component(monkeypatch):
    n = 10
    y = torch.arange(n) % 10
    x = torch.zeros(n, 3, 4, 4)
    x[:, 0, 0, 0] = y / 10
    x[:, 0, 0, 2] = torch.arange(n) / 100            # the image's id, for the fake attacks
    x[4, 0, 0, 1] = 1.0                              # image 4 is misclassified to begin with
    breaks = {("ce", None): {0}, ("ce", 0.0): {1}, ("targeted", None): {2, 5}}
    calls = {}

    def fake_apgd(model, xb, yb, *, loss, norm, eps, iters, seed, crafted_at_alpha=None, eot=1):
        ids = (xb[:, 0, 0, 2] * 100).round().long().tolist()
        calls.setdefault((loss, crafted_at_alpha), []).extend(ids)
        out = xb.clone()
        for k, i in enumerate(ids):
            if i in breaks[(loss, crafted_at_alpha)]:
                out[k, 0, 0, 1] = 1.0
        return [out]

    monkeypatch.setattr(M, "apgd", fake_apgd)
    outcomes, counts = [], {}
    for xb, yb in ((x[:6], y[:6]), (x[6:], y[6:])):
        robust, batch_counts = M.apgd_batch(FlagModel(), xb, yb, M.ADAPTIVE, norm="linf", eps=0.1, iters=1, seed=0)
        outcomes.append(robust)
        M.add_counts(counts, batch_counts)
    assert torch.cat(outcomes).tolist() == [i not in (0, 1, 2, 4, 5) for i in range(n)]
    stats = M.AdaptiveAttack(None, M.AttackOptions(), norm="linf").details(counts, n)
    assert stats["clean"] == 90.0
    c = stats["components"]
    assert c["apgd-ce"]["accuracy"] == 80.0 and c["apgd-ce"]["broke"] == 1
    assert c["apgd-ce-transfer"]["accuracy"] == 80.0 and c["apgd-ce-transfer"]["broke"] == 1
    # the targeted attack (nine runs in one) only sees the images both APGD-CE runs left correct
    assert sorted(calls[("targeted", None)]) == [2, 3, 5, 6, 7, 8, 9]
    assert c["apgd-t"] == {"accuracy": None, "attacked": 7, "broke": 2, "seconds": c["apgd-t"]["seconds"]}
    assert sorted(calls[("ce", None)]) == list(range(n)) and sorted(calls[("ce", 0.0)]) == list(range(n))


def test_the_adaptive_row_leaves_out_the_transfer_attack_at_alpha_zero(wrn, monkeypatch):
    seen = []
    monkeypatch.setattr(M, "apgd_batch", lambda model, x, y, components, **kw: seen.append(components) or (y, {}))
    attack = M.ATTACKS["apgd-l2"](wrn, M.AttackOptions())
    attack.batch(torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.long), 0)
    M.set_alpha(wrn, 0.35)
    attack.batch(torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.long), 0)
    assert seen == [("apgd-ce", "apgd-t"), ("apgd-ce", "apgd-ce-transfer", "apgd-t")]
    assert attack.settings == {"norm": "l2", "eps": 0.5, "iters": 100, "restarts": 1, "bpda": True}


def test_apgd_crafts_under_bpda_at_the_transfer_alpha_and_restores_everything(tiny_trained, train_set, val_set):
    net = tiny_trained
    M.collect_statistics(net, M.Batches(train_set[0][:128], train_set[1][:128], 128, device="cpu"))
    M.set_alpha(net, 0.3)
    seen = []
    h = net.sparse.register_forward_pre_hook(lambda m, i: seen.append((round(float(m.alpha), 6), m.mode)))
    x, y = val_set[0][:8].float() / 255, val_set[1][:8]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    judged = M.apgd(net, x, y, loss="ce", norm="l2", eps=0.5, iters=3, seed=0, crafted_at_alpha=0.0)
    h.remove()
    assert set(seen) == {(0.0, "bpda")}
    assert M.get_alpha(net) == 0.3 and net.sparse.mode == "mask"
    assert torch.equal(torch.get_rng_state(), state)                   # APGD seeds the global RNG: undone
    # a transfer attack hands over both its adversarial images and its highest-loss iterate, both in the ball
    assert len(judged) == 2
    for x_adv in judged:
        assert float((x_adv - x).flatten(1).norm(dim=1).max()) <= 0.5 + 1e-4
        assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1


def test_apgd_on_the_committed_model_is_at_least_as_strong_as_bpda_pgd(committed_model_file, val_set):
    """Eight validation images, five APGD iterations (100 in a real evaluation): within one image of BPDA
    PGD-20 or stronger."""
    net = M.Net().load_for_testing(str(committed_model_file.parent.parent))
    batches = M.Batches(val_set[0][:8], val_set[1][:8], 8, device="cpu")
    opts = M.AttackOptions(apgd_iters=5)
    row = M.measure(M.ATTACKS["apgd-linf"](net, opts), batches, desc="apgd", verbose=False)
    pgd = M.accuracy(net, batches, "bpda-linf", opts, verbose=False)
    print(f"clean {row['clean']:.1f}  BPDA PGD-20 {pgd:.1f}  APGD worst case {row['accuracy']:.1f}")
    assert row["accuracy"] <= pgd + 100 / 8
    assert row["accuracy"] <= row["components"]["apgd-ce"]["accuracy"]     # APGD-T attacks only the survivors
    assert row["clean"] >= 50


def test_autoattack_without_the_package_is_a_user_error(monkeypatch, wrn):
    monkeypatch.setitem(sys.modules, "pyautoattack", None)             # makes `import pyautoattack` fail
    x, y = _inputs(2, (3, 32, 32))
    for name in ("aa-linf", "apgd-l2"):
        with pytest.raises(M.UserError, match="pip install pyautoattack"):
            M.ATTACKS[name](wrn, M.AttackOptions())
    with pytest.raises(M.UserError, match="pip install pyautoattack"):
        M.apgd(wrn, x, y, loss="ce", norm="linf", eps=EPS_LINF, iters=2, seed=0)
