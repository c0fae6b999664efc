"""Training: train() on a WRN-10-1 with a few hundred images; schedule helpers; EMA; resume; failures;
DDP under torchrun."""
import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

import model as M


def _quiet(*args, **kwargs):
    pass


def _net(seed=0):
    torch.manual_seed(seed)
    return M.WideResNet(10, 1)


@pytest.fixture(scope="module")
def small_sets(train_set, val_set):
    return (train_set[0][:512], train_set[1][:512]), (val_set[0][:64], val_set[1][:64])


def _cfg(**kw):
    base = dict(arch="10-1", epochs=2, batch_size=128, lr=0.05, warmup_epochs=0.5, attack_steps=1,
                n_train=256, val_every=100, seed=0)
    base.update(kw)
    return M.TrainConfig(**base)


def _state_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------------------------------
# Schedule helpers and EMA
# ----------------------------------------------------------------------------------------------------
def test_lr_schedule_is_one_cycle():
    cfg = M.TrainConfig(lr=0.2, warmup_epochs=2.0)
    assert M.lr_at(0.0, 10, cfg) == 0.0
    assert M.lr_at(1.0, 10, cfg) == pytest.approx(0.1)
    assert M.lr_at(2.0, 10, cfg) == pytest.approx(0.2)                 # the peak at the end of warm-up
    assert M.lr_at(6.0, 10, cfg) == pytest.approx(0.1)
    assert M.lr_at(10.0, 10, cfg) == 0.0
    # warm-up is at most half the run
    assert M.lr_at(1.0, 2, cfg) == pytest.approx(0.2)
    assert M.lr_at(0.5, 2, cfg) == pytest.approx(0.1)
    # during the first epoch of a time-budget run (length unknown) only the warm-up applies
    assert M.lr_at(0.5, math.inf, cfg) == pytest.approx(0.05)
    short = M.TrainConfig(lr=0.2, warmup_epochs=0.5)      # a warm-up that ends before the length is known
    assert M.lr_at(0.8, math.inf, short) == pytest.approx(0.2)


@pytest.mark.parametrize("budget, epoch, per_epoch, spent, val_seconds", [
    (1.0, 1, 10.0, 10.0, 0.0), (1.0, 1, 4.0, 5.0, 2.0), (2.0, 1, 7.0, 9.0, 1.0), (0.5, 1, 1.0, 3.0, 0.5),
])
def test_budget_epochs_fits_the_whole_schedule_in_the_budget(budget, epoch, per_epoch, spent, val_seconds):
    cfg = M.TrainConfig(time_budget=budget, warmup_epochs=0.5, val_every=5)
    total = M.budget_epochs(cfg, epoch, per_epoch, spent, val_seconds, "cpu", 1)
    per_epoch_all = per_epoch + val_seconds / cfg.val_every
    assert total > epoch
    assert spent + (total - epoch) * per_epoch_all <= budget * 60                 # fits ...
    assert spent + (total + 2 - epoch) * per_epoch_all > 0.97 * budget * 60       # ... and uses it


def test_budget_epochs_never_ends_before_warm_up_and_one_more_epoch():
    cfg = M.TrainConfig(time_budget=0.01, warmup_epochs=2.0)
    assert M.budget_epochs(cfg, 1, 100.0, 100.0, 0.0, "cpu", 1) == 4


def test_ema_update_is_an_exponential_average():
    net = _net()
    ema = M.EMA(net, 0.99)
    assert not ema.model.training and all(not p.requires_grad for p in ema.model.parameters())
    before = [p.detach().clone() for p in net.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
        for mod in net.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.add_(3.0)
    ema.update(net)
    d = min(0.99, 2 / 11)                                    # warmed-up decay of the first update
    for old, new, avg in zip(before, net.parameters(), ema.model.parameters()):
        assert torch.allclose(avg, d * old + (1 - d) * new, atol=1e-6)
    for b, b_ema in zip(net.buffers(), ema.model.buffers()):
        assert torch.equal(b, b_ema)                          # buffers are copied, not averaged
    assert ema.updates == 1


def test_eps_ramp_rises_linearly_then_holds():
    cfg = M.TrainConfig(eps=8 / 255, eps_ramp=0.5)
    assert M.eps_at(0.0, 10, cfg) == 0.0
    assert M.eps_at(2.5, 10, cfg) == pytest.approx(4 / 255)
    assert M.eps_at(5.0, 10, cfg) == pytest.approx(8 / 255) and M.eps_at(9.9, 10, cfg) == pytest.approx(8 / 255)
    assert M.eps_at(0.7, math.inf, cfg) == 0.0                      # length not fixed yet: the ramp waits
    assert M.eps_at(0.0, 10, M.TrainConfig(eps=8 / 255)) == 8 / 255  # no ramp


def test_training_attack_step_scales_with_the_ramped_eps(monkeypatch):
    seen = []
    monkeypatch.setattr(M, "pgd", lambda model, x, y, **kw: seen.append(kw) or x)
    net, x, y = _net(), torch.rand(2, 3, 32, 32), torch.tensor([1, 2])
    cfg = M.TrainConfig(eps=8 / 255, attack_steps=2, attack_step_size=8 / 255)
    M.training_attack(net, x, y, cfg, 4 / 255, None)
    assert seen[-1]["eps"] == 4 / 255 and seen[-1]["step_size"] == pytest.approx(4 / 255) and seen[-1]["steps"] == 2
    M.training_attack(net, x, y, M.TrainConfig(eps=8 / 255, attack_steps=5), 8 / 255, None)
    assert seen[-1]["step_size"] == pytest.approx(2.5 * 8 / 255 / 5)                    # the default 2.5 eps / K
    assert M.training_attack(net, x, y, cfg, 0.0, None) is x and len(seen) == 2       # eps 0: no attack


def test_ema_follows_the_weights_before_it_starts():
    net = _net()
    ema = M.EMA(net, 0.5)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.follow(net)
    _state_equal(ema.model.state_dict(), net.state_dict())
    assert ema.updates == 0                                  # the warm-up of the decay starts with the EMA


def test_awp_moves_each_weight_by_gamma_times_its_norm_along_the_gradient_and_keeps_batchnorm(small_sets):
    (images, labels), _ = small_sets
    net = _net().train()
    x, y = images[:32].float() / 255, labels[:32]
    x_adv = (x + 0.01).clamp(0, 1)
    cfg = M.TrainConfig(awp=0.01, trades=None)
    weights = [m.weight for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(weights) == 10              # WRN-10-1: the stem, 6 block convs, 2 shortcut convs, the fc
    loss, _ = M.training_loss(net, x, x_adv, y, cfg)
    grads = torch.autograd.grad(loss, weights)
    buffers = {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}
    before = [w.detach().clone() for w in weights]
    originals = M.awp_perturb(net, weights, x, x_adv, y, cfg)
    for w, w0, g, orig in zip(weights, before, grads, originals):
        assert torch.equal(orig, w0)                          # the values before, for an exact restore
        step = w.detach() - w0
        assert float(step.norm()) == pytest.approx(0.01 * float(w0.norm()), rel=1e-4)
        assert float(F.cosine_similarity(step.flatten(), g.flatten(), dim=0)) > 0.999
    for k, v in net.state_dict().items():
        if k in buffers:
            assert torch.equal(v, buffers[k]), k               # the extra pass left BatchNorm alone


def test_train_step_with_awp_restores_the_weights_before_the_optimizer_step(small_sets, monkeypatch):
    """The optimizer must see the gradient at the perturbed weights but step from the original ones."""
    (images, labels), _ = small_sets
    x, y = images[:32].float() / 255, labels[:32]
    cfg = M.TrainConfig(awp=0.05, attack_steps=1)
    results = {}
    for awp in (False, True):
        net = _net()
        weights = [m.weight for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        start = [w.detach().clone() for w in weights]
        seen = {}
        optimizer = torch.optim.SGD(net.parameters(), lr=0.0)          # lr 0: the step changes nothing
        real_step = optimizer.step

        def step():
            seen["weights"] = [w.detach().clone() for w in weights]
            seen["grads"] = [w.grad.clone() for w in weights]
            real_step()

        optimizer.step = step
        M.train_step(net, net, x, y, cfg, optimizer, torch.Generator().manual_seed(0), eps=cfg.eps,
                     awp_weights=weights if awp else None)
        assert all(torch.equal(a, b) for a, b in zip(seen["weights"], start))
        results[awp] = seen["grads"]
    assert any(not torch.allclose(a, b) for a, b in zip(results[True], results[False]))


# ----------------------------------------------------------------------------------------------------
# train()
# ----------------------------------------------------------------------------------------------------
def test_training_lowers_the_loss_and_reports(small_sets, tmp_path):
    train_set, val_set = small_sets
    net = _net()
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    lines = []
    cfg = _cfg(epochs=4, n_train=512, lr=0.1, val_every=2)
    ckpt = tmp_path / "m.ckpt"
    out, info = M.train(net, train_set, val_set, cfg, device="cpu", checkpoint_path=str(ckpt), log=lines.append)
    assert out is net and not net.training
    history = info["history"]
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in history)
    assert history[-1]["loss"] < history[0]["loss"] - 0.05
    assert "val_clean" in history[1] and "val_clean" in history[3] and "val_clean" not in history[0]
    assert 0 <= history[-1]["val_pgd10"] <= history[-1]["val_clean"] <= 100
    assert info["epochs"] == 4 and info["train_images"] == 512 and info["world_size"] == 1
    assert info["weights"] == "final" and info["device"].startswith("cpu (")
    assert info["config"]["lr"] == 0.1
    assert not torch.equal(initial["conv1.weight"], net.state_dict()["conv1.weight"])
    assert all(m.mode == "mask" for m in M.meansparse_modules(net))        # bypass undone
    assert M.get_alpha(net) == 0.0
    assert sum(line.startswith("epoch ") for line in lines) == 4
    ckpt_payload = torch.load(ckpt, weights_only=True)
    assert ckpt_payload["epoch"] == 4 and ckpt_payload["total_epochs"] == 4


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(small_sets, tmp_path, monkeypatch):
    """With every option that carries state or depends on the run's progress: TRADES with a 2-step attack
    of step eps, eps ramp, AWP after a warm-up, a late EMA and weights chosen by the APGD check."""
    train_set, val_set = small_sets
    cfg = _cfg(epochs=3, val_every=1, trades=6.0, attack_steps=2, attack_step_size=M.NORMS["linf"].eps, eps_ramp=0.5,
               awp=5e-3, awp_warmup=0.5, ema=0.9, ema_start=0.4, select_from=0.3, select_n=16, select_iters=2,
               n_train=128, batch_size=64)

    reference, ref_info = M.train(_net(0), train_set, val_set, cfg, device="cpu",
                                  checkpoint_path=str(tmp_path / "ref.ckpt"), log=_quiet)
    assert ref_info["selected"]["epoch"] >= 1 and "val_apgd_ema" in ref_info["history"][-1]

    real_save = M.save_checkpoint
    saved = []

    def save_then_interrupt(state, path):
        real_save(state, path)
        saved.append(state["epoch"])
        if state["epoch"] == 2:
            raise KeyboardInterrupt

    ckpt = tmp_path / "run.ckpt"
    monkeypatch.setattr(M, "save_checkpoint", save_then_interrupt)
    interrupted = _net(0)
    with pytest.raises(KeyboardInterrupt):
        M.train(interrupted, train_set, val_set, cfg, device="cpu", checkpoint_path=str(ckpt), log=_quiet)
    assert saved == [1, 2]
    assert all(m.mode == "mask" for m in M.meansparse_modules(interrupted))
    assert torch.load(ckpt, weights_only=True)["best_state"] is not None       # the best so far travels
    monkeypatch.setattr(M, "save_checkpoint", real_save)

    # resume on a differently initialised network: everything must come from the checkpoint
    lines = []
    resumed, info = M.train(_net(123), train_set, val_set, cfg, device="cpu", checkpoint_path=str(ckpt),
                            resume=True, log=lines.append)
    assert any("resuming" in line and "after epoch 2 of 3" in line for line in lines)
    _state_equal(resumed.state_dict(), reference.state_dict())
    timing = ("seconds", "images_per_s", "val_seconds")
    untimed = lambda history: [{k: v for k, v in r.items() if k not in timing} for r in history]
    assert untimed(info["history"]) == untimed(ref_info["history"])      # losses and every validation figure
    assert info["selected"] == ref_info["selected"] and info["weights"] == ref_info["weights"]
    assert info["epochs"] == 3


def test_resume_with_other_settings_or_no_checkpoint_is_a_user_error(small_sets, tmp_path, monkeypatch):
    train_set, val_set = small_sets
    cfg = _cfg(epochs=2)
    with pytest.raises(M.UserError, match="no checkpoint"):
        M.train(_net(), train_set, val_set, cfg, device="cpu", checkpoint_path=str(tmp_path / "none.ckpt"),
                resume=True, log=_quiet)
    real_save = M.save_checkpoint

    def save_then_interrupt(state, path):
        real_save(state, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(M, "save_checkpoint", save_then_interrupt)
    ckpt = tmp_path / "a.ckpt"
    with pytest.raises(KeyboardInterrupt):
        M.train(_net(), train_set, val_set, cfg, device="cpu", checkpoint_path=str(ckpt), log=_quiet)
    monkeypatch.setattr(M, "save_checkpoint", real_save)
    other = _cfg(epochs=2, lr=0.07)
    with pytest.raises(M.UserError) as info:
        M.train(_net(), train_set, val_set, other, device="cpu", checkpoint_path=str(ckpt), resume=True,
                log=_quiet)
    assert "lr" in str(info.value) and str(ckpt) in str(info.value)


def _budget_minutes(small_sets, tmp_path, factor, **kw):
    """`factor` times what two fixed epochs of this configuration, with their final check, take on this
    machine now. A budget run does at least two epochs and checks after the first and the last, so a fixed
    budget of a few seconds fitted a fast CPU only: these tests are about the budget logic, not the speed."""
    train_set, val_set = small_sets
    _, info = M.train(_net(), train_set, val_set, _cfg(epochs=2, **kw), device="cpu",
                      checkpoint_path=str(tmp_path / "probe.ckpt"), log=_quiet)
    return factor * info["wall_seconds"] / 60


def test_time_budget_fixes_the_length_and_is_respected(small_sets, tmp_path):
    train_set, val_set = small_sets
    budget_min = _budget_minutes(small_sets, tmp_path, 2, warmup_epochs=0.5)
    cfg = _cfg(epochs=None, time_budget=budget_min, warmup_epochs=0.5)
    lines = []
    _, info = M.train(_net(), train_set, val_set, cfg, device="cpu", checkpoint_path=str(tmp_path / "m.ckpt"),
                      log=lines.append)
    assert isinstance(info["epochs"], int) and info["epochs"] >= 2
    assert len(info["history"]) == info["epochs"]
    assert any(line.startswith(f"time budget {budget_min:g} min") and f"{info['epochs']} epochs" in line
               for line in lines)
    slowest = max(r["seconds"] for r in info["history"])
    assert info["wall_seconds"] <= budget_min * 60 * 1.25 + slowest, info
    assert info["wall_seconds"] >= budget_min * 60 * 0.3                      # and it did not stop early


def test_time_budget_is_respected_when_epochs_get_dearer(small_sets, tmp_path):
    # An eps ramp leaves the first epoch of a budget run without attack; later epochs run a 6-step attack
    # and cost several times as much. Fixing the length from the first epoch alone overran such a budget.
    train_set, val_set = small_sets
    kw = dict(warmup_epochs=0.5, eps_ramp=0.5, attack_steps=6)
    budget_min = _budget_minutes(small_sets, tmp_path, 2, **kw)
    cfg = _cfg(epochs=None, time_budget=budget_min, **kw)
    lines = []
    _, info = M.train(_net(), train_set, val_set, cfg, device="cpu", checkpoint_path=str(tmp_path / "m.ckpt"),
                      log=lines.append)
    seconds = [r["seconds"] for r in info["history"]]
    assert min(seconds[1:]) > 2 * seconds[0], seconds                        # the case this test is about
    assert any("(was " in line for line in lines), lines                     # the length was corrected
    assert info["wall_seconds"] <= budget_min * 60 * 1.25 + max(seconds), info
    assert len(info["history"]) == info["epochs"]


def test_trades_runs_one_epoch(small_sets, tmp_path):
    train_set, val_set = small_sets
    net = _net()
    initial = net.fc.weight.detach().clone()
    _, info = M.train(net, train_set, val_set, _cfg(epochs=1, trades=6.0), device="cpu",
                      checkpoint_path=str(tmp_path / "m.ckpt"), log=_quiet)
    assert info["config"]["trades"] == 6.0
    assert len(info["history"]) == 1 and math.isfinite(info["history"][0]["loss"])
    assert not torch.equal(net.fc.weight, initial)


def test_an_unfinished_run_without_checks_is_rescued_with_its_last_weights(small_sets, tmp_path, repo_root,
                                                                            run_python, capsys):
    train_set, val_set = small_sets
    net, info = M.train(_net(), train_set, val_set, _cfg(epochs=1), device="cpu",
                        checkpoint_path=str(tmp_path / "m.ckpt"), log=_quiet)
    result = run_python([str(repo_root / "bench" / "rescue.py"), str(tmp_path / "m.ckpt"), str(tmp_path / "r.pth")],
                        cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "the weights of epoch 1 of an unfinished run (1 of 1 epochs)" in result.stdout
    loaded = M.load_model(str(tmp_path / "r.pth"))
    training = loaded.meta["training"]
    assert training["complete"] is False and training["epochs"] == 1 and "selected" not in training
    assert training["history"] == info["history"] and training["config"] == info["config"]
    assert torch.equal(loaded.fc.weight, net.fc.weight.detach().half().float())
    # a file already there is kept as .prev
    first, rescue = (tmp_path / "r.pth").read_bytes(), _rescue_module(repo_root)
    assert rescue.main([str(tmp_path / "m.ckpt"), str(tmp_path / "r.pth")]) == 0
    assert "kept the file this run replaces as" in capsys.readouterr().out
    assert (tmp_path / "r.pth.prev").read_bytes() == first
    # bad input: one line, exit 2, and the file named stays as it was
    committed = repo_root / "models" / "default_model.pth"
    committed_bytes = committed.read_bytes()
    for args, message in [([tmp_path / "nope.ckpt", tmp_path / "x.pth"], "nope.ckpt"),
                          ([tmp_path / "r.pth", tmp_path / "x.pth"], "not a training checkpoint"),
                          ([tmp_path / "m.ckpt", tmp_path / "m.ckpt"], "is the checkpoint itself"),
                          ([tmp_path / "m.ckpt", committed], "is the file Net() loads")]:
        assert rescue.main([str(a) for a in args]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert "delete" not in err           # a model file named by mistake is not to be deleted
    assert committed.read_bytes() == committed_bytes and not (repo_root / "models" / "default_model.pth.prev").exists()
    # not while another run writes the same file
    rescued = (tmp_path / "r.pth").read_bytes()
    with M.write_lock(str(tmp_path / "r.pth")):
        assert rescue.main([str(tmp_path / "m.ckpt"), str(tmp_path / "r.pth")]) == 2
    assert "is being written by another run" in capsys.readouterr().err
    assert (tmp_path / "r.pth").read_bytes() == rescued


def test_ema_run_keeps_the_better_of_final_and_ema(small_sets, tmp_path):
    train_set, val_set = small_sets
    lines = []
    net, info = M.train(_net(), train_set, val_set, _cfg(epochs=2, ema=0.9), device="cpu",
                        checkpoint_path=str(tmp_path / "m.ckpt"), log=lines.append)
    assert info["weights"] in ("ema", "final")
    assert set(info["ema_val"]) == {"clean", "pgd10"}
    final = info["history"][-1]
    ema_key = (info["ema_val"]["pgd10"], info["ema_val"]["clean"])
    assert (info["weights"] == "ema") == (ema_key > (final["val_pgd10"], final["val_clean"]))
    assert lines[-1] == f"keeping the {info['weights']} weights"
    # the kept weights give the recorded validation figures
    val = M.Batches(*val_set, 512, device="cpu")
    kept = info["ema_val"] if info["weights"] == "ema" else {"clean": final["val_clean"]}
    assert M.accuracy(net, val, "natural", M.AttackOptions(), verbose=False) == pytest.approx(kept["clean"])


def _rescue_module(repo_root):
    spec = importlib.util.spec_from_file_location("rescue", repo_root / "bench" / "rescue.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_selection_keeps_the_best_weights_the_apgd_checks_saw(small_sets, tmp_path, monkeypatch, repo_root):
    train_set, val_set = small_sets
    scores = iter([(10.0, 50.0), (30.0, 50.0), (20.0, 60.0), (30.0, 55.0), (25.0, 70.0), (5.0, 70.0)])
    checked = []

    def fake_check(net, batches, cfg):
        checked.append({k: v.clone() for k, v in net.state_dict().items()})
        return next(scores)

    monkeypatch.setattr(M, "apgd_check", fake_check)
    lines = []
    cfg = _cfg(epochs=4, val_every=1, ema=0.9, select_from=0.5)
    net, info = M.train(_net(), train_set, val_set, cfg, device="cpu", checkpoint_path=str(tmp_path / "m.ckpt"),
                        log=lines.append)
    # checks at epochs 2, 3 and 4 (half the run on), live then EMA: the best is (30, 55), the EMA of epoch 3
    assert len(checked) == 6
    assert info["selected"] == {"epoch": 3, "weights": "ema", "apgd": 30.0, "clean": 55.0}
    assert info["weights"] == "ema weights of epoch 3"
    _state_equal(net.state_dict(), checked[3])
    assert [("val_apgd_live" in r, "val_apgd_ema" in r) for r in info["history"]] == \
        [(False, False), (True, True), (True, True), (True, True)]
    assert info["history"][2]["val_apgd_ema"] == 30.0 and info["history"][2]["val_apgd_clean_ema"] == 55.0
    assert "keeping the ema weights of epoch 3 (validation APGD 30.00, clean 55.00, on 64 images)" in lines[-1]
    assert "ema_val" not in info                     # the PGD-10 choice between final and EMA is not made
    # a run cut off after its last check: its checkpoint becomes a model file with the same selected weights
    rescued = _rescue_module(repo_root).rescue(str(tmp_path / "m.ckpt"), str(tmp_path / "r.pth"), log=lines.append)
    assert lines[-1] == f"wrote {tmp_path / 'r.pth'}: the ema weights of epoch 3 of an unfinished run (4 of 4 epochs)"
    loaded = M.load_model(str(tmp_path / "r.pth"))
    assert loaded.meta["training"]["selected"] == info["selected"] and loaded.meta["training"]["complete"] is False
    _state_equal(rescued.state_dict(), checked[3])
    params = {name for name, _ in loaded.named_parameters()}
    for k, v in loaded.state_dict().items():        # the file's float16 weights (float32 buffers) of those
        assert torch.equal(v, checked[3][k].half().float() if k in params else checked[3][k]), k


def test_ddp_two_cpu_ranks_train_identical_weights(repo_root, data_dir, tmp_path, run_python):
    out = tmp_path / "x.pth"
    result = run_python(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                         str(repo_root / "model.py"), "--force-train", "-e", "1", "--arch", "10-1",
                         "--n-train", "256", "--batch-size", "64", "--device", "cpu", "--model-file", str(out),
                         "--data-dir", str(data_dir), "--n-eval", "16", "--n-val", "64",
                         "--trades", "6", "--awp", "5e-3",
                         "--eps-ramp", "0.5", "--ema", "0.9", "--ema-start", "0.5", "--select-from", "0",
                         "--select-n", "16"], cwd=repo_root, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "weights identical across 2 ranks: True" in result.stdout
    assert result.stdout.count("saved ") == 1                  # rank 0 alone writes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.pth"]     # no checkpoint, no temporary left
    loaded = M.load_model(str(out))
    assert loaded.arch["depth"] == 10
    training = loaded.meta["training"]
    assert training["world_size"] == 2 and training["ranks_agree"] is True and training["epochs"] == 1
    assert training["config"]["awp"] == 5e-3 and training["selected"]["epoch"] == 1
