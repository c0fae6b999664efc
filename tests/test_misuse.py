"""Misuse: every way a new user was seen to lose a model, hours of work or a correct figure ends in one
clear line and the right exit status, with nothing lost (the committed model byte-identical after each).

In process (M.main) for speed: these runs stop before any real work, or do very little."""
import hashlib
import json
import shutil
import sys

import pytest
import torch

import model as M

TINY_TRAIN = ["--force-train", "--arch", "10-1", "--n-train", "256", "--n-val", "64", "--batch-size", "64",
              "--device", "cpu", "-e", "1", "--train-steps", "1"]


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def tiny_copy(tiny_model_file, tmp_path):
    path = tmp_path / "m.pth"
    shutil.copyfile(tiny_model_file, path)
    return path


@pytest.fixture
def no_work(monkeypatch):
    """Loading data stops the run with an error of its own: a check that should have come first did not."""
    def stop(*a):
        raise M.UserError("work started before the check")
    monkeypatch.setattr(M, "load_cifar10", stop)


def _one_error(status, err, fragment, code=2):
    assert status == code, err
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and fragment in errors[0], err
    assert all(line.startswith(("error: ", "warning: ")) for line in err), err      # no traceback


def _rows(path):
    return json.loads(path.read_text())["results"]


def _without_seconds(row):
    return {k: _without_seconds(v) if isinstance(v, dict) else v for k, v in row.items() if k != "seconds"}


# ----------------------------------------------------------------------------------------------------
# Write targets, checked before any work
# ----------------------------------------------------------------------------------------------------
def test_report_onto_the_model_file_is_refused(cli, tiny_copy):
    before = tiny_copy.read_bytes()
    status, out, err = cli("--model-file", tiny_copy, "--report", tiny_copy, "--n-eval", "8")
    _one_error(status, err, f"--report {tiny_copy} is the same file as --model-file {tiny_copy}")
    assert tiny_copy.read_bytes() == before and out == ""


def test_outputs_that_are_the_same_file_are_refused(cli, tiny_copy, tmp_path):
    status, _, err = cli("--model-file", tiny_copy, "--report", tmp_path / "r.png", "--plot", tmp_path / "r.png")
    _one_error(status, err, "--plot")
    status, _, err = cli(*TINY_TRAIN, "--model-file", tmp_path / "new.pth", "--report", tmp_path / "new.pth.ckpt")
    _one_error(status, err, "is the same file as checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pth"]


@pytest.mark.parametrize("flag", ["--model-file", "--report", "--plot"])
def test_unwritable_or_directory_targets_are_refused_before_any_work(cli, tmp_path, flag, no_work):
    folder = tmp_path / "a-folder.png"
    folder.mkdir()
    args = TINY_TRAIN + ["--model-file", tmp_path / "new.pth"] if flag == "--model-file" else ["--n-eval", "8"]
    for target, fragment in ((folder, "is a directory"), ("/proc/m.png", "cannot write in /proc")):
        status, _, err = cli(*args, flag, target)
        _one_error(status, err, f"{flag} {target}: {fragment}")


def test_a_file_of_another_kind_is_never_overwritten_by_a_report_or_a_plot(cli, tiny_copy, tmp_path, repo_root,
                                                                          no_work):
    checkpoint = tmp_path / "x.pth.ckpt"
    checkpoint.write_bytes(b"an unfinished run")
    for target in (repo_root / "models" / "default_model.pth", repo_root / "model.py", checkpoint):
        before = target.read_bytes()
        status, _, err = cli("--model-file", tiny_copy, "--report", target)
        _one_error(status, err, f"--report {target}: exists and is not a report of model.py; give another name")
        assert target.read_bytes() == before
    (tmp_path / "notes.png").write_text("my notes")
    status, _, err = cli("--model-file", tiny_copy, "--plot", tmp_path / "notes.png")
    _one_error(status, err, "exists and is not such an image")
    assert (tmp_path / "notes.png").read_text() == "my notes"


def test_a_smoke_run_cannot_replace_the_committed_model(cli, no_work):
    status, _, err = cli(*TINY_TRAIN)
    _one_error(status, err, "--n-train makes a smoke run: name its output with --model-file")
    status, _, err = cli(*TINY_TRAIN[:-4], "--model-file", M.Net.model_file)      # --arch 10-1, explicit file
    _one_error(status, err, "--arch 10-1: models/default_model.pth is the file Net() loads")
    for argv, flag in ((["--calibrate", "--n-train", "256"], "--n-train"),
                       (["--force-train", "--n-val", "64"], "--n-val"),
                       (["--calibrate", "--reuse-statistics", "--n-eval", "4", "--steps", "1"], "--n-eval"),
                       (["--calibrate", "--reuse-statistics", "--steps", "1"], "--steps"),
                       (["--calibrate", "--reuse-statistics", "--apgd-iters", "5"], "--apgd-iters")):
        _one_error(*cli(*argv)[::2], f"{flag} makes a smoke run: name its output with --model-file")


def test_a_second_run_writing_the_same_model_file_stops_at_once(cli, tmp_path, no_work):
    target = tmp_path / "x.pth"
    with M.write_lock(str(target)):
        holder = (tmp_path / "x.pth.lock").read_text()
        status, _, err = cli(*TINY_TRAIN, "--model-file", target)
        _one_error(status, err, f"{target} is being written by another run (pid ")
        assert holder.split(":")[0] in err[-1]
    assert not (tmp_path / "x.pth.lock").exists()
    with M.write_lock(str(target)):                       # and it can be taken again afterwards
        pass


def test_a_second_run_writing_the_same_report_stops_at_once(cli, tiny_copy, tmp_path):
    # two evaluations rewriting one report after every batch would leave a mix of both
    report = tmp_path / "r.json"
    with M.write_lock(str(report), "--report"):
        status, _, err = cli("--model-file", tiny_copy, "--eval", "natural", "--n-eval", "8", "--report", report)
        _one_error(status, err, f"{report} is being written by another run (pid ")
        assert "give this one another --report" in err[-1]
        assert not report.exists()
    assert cli("--model-file", tiny_copy, "--eval", "natural", "--n-eval", "8", "--report", report)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pth", "r.json"]       # no lock left behind


# ----------------------------------------------------------------------------------------------------
# Numbers, odd settings, the environment
# ----------------------------------------------------------------------------------------------------
def test_odd_but_valid_settings_warn_and_run(cli, tiny_copy):
    status, out, err = cli("--model-file", tiny_copy, "--split", "val", "--n-eval", "5000", "--steps", "0",
                           "--eval", "natural,pgd-linf", "--arch", "16-2", "--eval-batch-size", "512")
    assert status == 0, err
    assert "warning: --steps 0: PGD makes no step, so the PGD rows measure the random start only" in err
    assert "warning: --n-eval 5000: the val split has 1,024 images; using all of them" in err
    assert any(line.startswith("warning: --arch 16-2 is ignored") for line in err)
    assert "pgd-linf" in out and "on 1024 images" in out


def test_settings_that_do_nothing_warn(cli, tmp_path, no_work):
    def warnings(*argv):
        return [line for line in cli(*argv)[2] if line.startswith("warning: ")]

    train = [*TINY_TRAIN, "--model-file", tmp_path / "x.pth"]
    assert "warning: --awp-warmup does nothing without --awp" in warnings(*train, "--awp-warmup", "2")
    assert any("--ema-start 1: the EMA starts at the end" in w for w in warnings(*train, "--ema", "0.9",
                                                                                  "--ema-start", "1"))
    assert any("--train-steps 0 with --trades" in w for w in warnings(*train[:-4], "--train-steps", "0",
                                                                       "--trades", "6"))
    assert any(w.startswith("warning: --eps-l2 0: the l2 rows perturb nothing") for w in warnings(
        "--model-file", tmp_path / "x.pth", "--eval", "pgd-l2", "--eps-l2", "0"))
    assert warnings("--model-file", M.Net.model_file, "--eval", "pgd-linf", "--eps-l2", "0") == []
    assert "warning: --n-val is ignored: this run does not train (--n-eval chooses the images of calibration " \
           "and evaluation)" in warnings("--model-file", M.Net.model_file, "--n-val", "64")


def test_a_training_batch_that_cannot_be_filled_is_refused_before_anything_is_written(cli, tmp_path, monkeypatch,
                                                                                      no_work):
    target = tmp_path / "new" / "x.pth"
    _one_error(*cli(*TINY_TRAIN, "--n-train", "32", "--model-file", target)[::2],
               "32 training images make no batch of 64; lower --batch-size or raise --n-train")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    _one_error(*cli(*TINY_TRAIN, "--batch-size", "63", "--model-file", target)[::2],
               "--batch-size 63 must be divisible by the 2 processes")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("env, fragment", [({"WORLD_SIZE": "abc"}, "WORLD_SIZE=abc: not integers"),
                                           ({"WORLD_SIZE": "2", "RANK": "1"}, "without torchrun's other settings")])
def test_a_torchrun_environment_without_torchrun_is_one_line(cli, tiny_copy, monkeypatch, env, fragment, no_work):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    _one_error(*cli("--model-file", tiny_copy)[::2], fragment)


def test_alpha_above_the_calibrated_range_warns(cli, tmp_path, tiny_model_file, train_set, val_set):
    calibrated = M.load_model(str(tiny_model_file))
    M.calibrate(calibrated, M.Batches(*[t[:64] for t in train_set], 64, device="cpu"),
                M.Batches(*[t[:8] for t in val_set], 8, device="cpu"), [0.1, 0.2], M.AttackOptions(steps=1),
                criterion="bpda", log=lambda *a: None)
    path = tmp_path / "calibrated.pth"
    calibrated.save(str(path), {"calibration": {"alpha": 0.2, "sweep": [{"alpha": 0.0}, {"alpha": 0.2}]}})
    status, _, err = cli("--model-file", path, "--alpha", "5", "--n-eval", "8")
    assert status == 0
    assert any(line.startswith("warning: --alpha 5 is above the largest calibrated value (0.2)") for line in err)


def test_reuse_statistics_needs_a_model_that_has_them(cli, tmp_path, tiny_copy):
    status, _, err = cli("--calibrate", "--reuse-statistics", "--model-file", tiny_copy, "--n-eval", "8",
                         "--alpha-criterion", "bpda")
    _one_error(status, err, f"--reuse-statistics: {tiny_copy} has no MeanSparse statistics yet")
    status, _, err = cli("--calibrate", "--reuse-statistics", "--model-file", tmp_path / "absent.pth")
    _one_error(status, err, "does not exist, so it has no statistics to reuse")


def test_a_missing_model_file_trains_only_after_a_loud_warning(cli, tmp_path, monkeypatch):
    def stop(*a):
        raise M.UserError("stopped by the test")

    monkeypatch.setattr(M, "load_cifar10", stop)
    status, _, err = cli("--model-file", tmp_path / "mispelt.pth", "--n-train", "256", "--batch-size", "64",
                         "--arch", "10-1")
    assert status == 2
    assert err[0].startswith(f"warning: {tmp_path / 'mispelt.pth'} does not exist, so this run TRAINS a new model")


def test_an_unfinished_run_is_not_overwritten_without_resume(cli, tmp_path):
    # starting over would replace the checkpoint after one epoch: hours of training lost to a forgotten flag
    model_file, ckpt = tmp_path / "m.pth", tmp_path / "m.pth.ckpt"
    ckpt.write_bytes(b"an unfinished run")
    status, out, err = cli(*TINY_TRAIN, "--model-file", model_file)
    _one_error(status, err, f"{ckpt} holds an unfinished training run (written ")
    assert "add --resume to continue it, or delete it to start over" in err[-1]
    assert ckpt.read_bytes() == b"an unfinished run" and not model_file.exists()


def test_a_replaced_model_file_is_kept_as_prev(cli, tiny_copy, tmp_path):
    # a retraining that turns out worse, or a --model-file naming the wrong file, loses no model
    before = tiny_copy.read_bytes()
    status, out, err = cli(*TINY_TRAIN, "--model-file", tiny_copy, "--calibrate", "--alpha-criterion", "bpda",
                           "--alpha-grid", "0,0.1", "--steps", "1", "--n-eval", "8")
    assert status == 0, err
    assert out.count(f"kept the file this run replaces as {tiny_copy}.prev") == 1, out
    assert (tmp_path / "m.pth.prev").read_bytes() == before          # the file before the run, not after training
    assert tiny_copy.read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pth", "m.pth.prev"]
    trained = tiny_copy.read_bytes()                                  # one generation: the next run keeps this one
    assert cli("--model-file", tiny_copy, "--calibrate", "--reuse-statistics", "--alpha-criterion", "bpda",
               "--alpha-grid", "0", "--steps", "1", "--n-eval", "8", "--split", "val")[0] == 0
    assert (tmp_path / "m.pth.prev").read_bytes() == trained


def test_a_new_model_file_leaves_no_prev(cli, tmp_path):
    status, out, err = cli(*TINY_TRAIN, "--model-file", tmp_path / "new.pth", "--n-eval", "8")
    assert status == 0, err
    assert "kept the file" not in out and sorted(p.name for p in tmp_path.iterdir()) == ["new.pth"]


def _note(*argv, rows=None):
    args = M.parse_args([str(a) for a in argv])
    return M.apgd_cost_note(args, M.plan(args, []), [M.Report(None, {}, rows)])


def test_apgd_work_that_would_take_a_cpu_hours_says_so_first(cli, tiny_copy, monkeypatch):
    def stop(*a):
        raise M.UserError("stopped by the test")

    monkeypatch.setattr(M, "load_cifar10", stop)
    status, out, err = cli("--model-file", tiny_copy, "--eval", "natural,apgd-linf", "--device", "cpu")
    assert status == 2
    assert out.startswith("note: this run attacks 10,000 images with APGD (each alpha of the adaptive calibration, "
                          "each apgd-*/aa-* row): about 23.6 h on a 2-core CPU, a GPU job; --n-eval"), out
    # the adaptive calibration: each alpha on the validation split; smaller runs go without a note
    assert "attacks 3,072 images" in _note("--calibrate", "--alpha-grid", "0.1,0.2")
    assert _note("--calibrate", "--alpha-criterion", "bpda") is None
    assert _note("--eval", "aa-linf", "--n-eval", "64") is None
    assert _note("--eval", "apgd-l2", "--n-eval", "1000", "--apgd-iters", "5") is None
    # each row at its norm's measured cost: L2 about 10 s per image, L-inf 8.5
    assert "about 2.8 h on a 2-core CPU" in _note("--eval", "apgd-l2", "--n-eval", "1000")
    assert "about 5.1 h on a 2-core CPU" in _note("--eval", "aa-linf,aa-l2", "--n-eval", "1000")


def test_the_cost_note_leaves_out_what_is_finished(tmp_path):
    model_file = tmp_path / "m.pth"
    argv = ["--calibrate", "--alpha-grid", "0.2,0.35", "--model-file", model_file]
    assert "attacks 3,072 images" in _note(*argv)
    progress = {"alpha 0 apgd-linf": {"per_image": "01"}, "alpha 0.2 apgd-linf": {"complete": False},
                "alpha 0.5 apgd-linf": {"per_image": "1"}}      # 0.2 part way, 0.5 not in the grid
    (tmp_path / "m.pth.calibration.json").write_text(json.dumps({"results": progress}))
    assert "attacks 2,048 images" in _note(*argv)
    # a report being continued: L-inf finished, L2 stopped after 512 of 1,000
    argv = ["--eval", "natural,apgd-linf,apgd-l2", "--n-eval", "1000"]
    settings = {name: M.ATTACKS[name](None, M.AttackOptions()).settings for name in ("apgd-linf", "apgd-l2")}
    rows = {"apgd-linf": {"n": 1000, "per_image": "1" * 1000, **settings["apgd-linf"]},
            "apgd-l2": {"complete": False, "n": 1000, "per_image": "1" * 512, "counts": {}, "device": "cpu",
                        **settings["apgd-l2"]}}
    assert "attacks 488 images" in _note(*argv, rows=rows)
    rows["apgd-linf"]["iters"] = 50         # made with other settings: measured again, it counts whole
    assert "attacks 1,488 images" in _note(*argv, rows=rows)


# ----------------------------------------------------------------------------------------------------
# Broken inputs
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content, fragment", [
    ("text", "not written by torch.save"),
    ({"state_dict": {"a": 1}}, "it has no state_dict of named tensors"),
    ({"arch": {"depth": 28}, "state_dict": {"w": torch.zeros(1)}}, "its arch"),
    ("directory", "is a directory, not a model file"),
])
def test_malformed_model_files_exit_2_with_one_line(cli, tmp_path, content, fragment):
    path = tmp_path / "bad.pth"
    if content == "directory":
        path.mkdir()
    elif content == "text":
        path.write_text("hello\n")
    else:
        torch.save(content, path)
    status, out, err = cli("--model-file", path, "--n-eval", "8")
    _one_error(status, err, f"{path}: ")
    assert fragment in err[0] and out == ""


def test_a_corrupt_checkpoint_with_resume_is_one_line(cli, tmp_path):
    model_file = tmp_path / "m.pth"
    (tmp_path / "m.pth.ckpt").write_bytes(b"PK\x03\x04 not really a checkpoint")
    status, _, err = cli(*TINY_TRAIN, "--model-file", model_file, "--resume")
    _one_error(status, err, f"{model_file}.ckpt: not a readable checkpoint: a damaged or truncated")
    torch.save({"epoch": 1}, tmp_path / "m.pth.ckpt")
    status, _, err = cli(*TINY_TRAIN, "--model-file", model_file, "--resume")
    _one_error(status, err, "not a training checkpoint of this tool")
    assert "weights_only" not in " ".join(err)


def test_missing_pyautoattack_is_one_line_before_any_work(cli, tiny_copy, monkeypatch, no_work):
    monkeypatch.setitem(sys.modules, "pyautoattack", None)
    for argv in (["--eval", "apgd-linf"], ["--eval", "aa-l2"], ["--calibrate"]):
        status, _, err = cli("--model-file", tiny_copy, *argv)
        _one_error(status, err, "APGD and AutoAttack need the official code: pip install pyautoattack")


# ----------------------------------------------------------------------------------------------------
# Interrupted evaluation: the report keeps every finished row and batch, and the same command continues
# ----------------------------------------------------------------------------------------------------
def _interrupt_row(monkeypatch, row_name, exception=KeyboardInterrupt):
    real = M.Report.row

    def interrupting(self, name, *a, **k):
        if name == row_name:
            raise exception
        return real(self, name, *a, **k)

    monkeypatch.setattr(M.Report, "row", interrupting)
    return real


def test_ctrl_c_during_evaluation_keeps_the_finished_rows_and_the_command_continues(cli, tiny_copy, tmp_path,
                                                                                  monkeypatch):
    real = _interrupt_row(monkeypatch, "pgd-linf")
    report = tmp_path / "r.json"
    argv = ["--model-file", tiny_copy, "--eval", "natural,pgd-linf,pgd-l2", "--n-eval", "8", "--report", report]
    status, out, err = cli(*argv)
    assert status == 1
    assert (f"interrupted: the rows finished so far are in {report}, marked incomplete; run the same command to "
            f"continue") in err
    saved = json.loads(report.read_text())
    assert saved["complete"] is False and list(saved["results"]) == ["natural"]
    assert saved["model_sha256"] == _sha256(tiny_copy)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pth", "r.json"]
    monkeypatch.setattr(M.Report, "row", real)
    status, out, err = cli(*argv)
    assert status == 0 and f"continuing {report}: natural" in out and f"natural: kept from {report}" in out
    assert json.loads(report.read_text())["complete"] is True and list(_rows(report)) == ["natural", "pgd-linf",
                                                                                          "pgd-l2"]


def _no_attack_then_raise_in_batch_2(monkeypatch, exception):
    """Replaces APGD by no attack at all, raising `exception` in the second batch; returns the batch sizes seen."""
    calls = []

    def fake_apgd(model, x, y, *, loss, crafted_at_alpha=None, **kw):
        if loss == "ce" and crafted_at_alpha is None:       # the first component of each batch
            calls.append(len(y))
            if len(calls) == 2:
                raise exception
        return [x.clone()]

    monkeypatch.setattr(M, "apgd", fake_apgd)
    return calls


def test_an_interrupted_apgd_row_keeps_its_finished_batches(cli, tiny_copy, tmp_path, monkeypatch):
    # a GPU run stopped by its time limit keeps the worst case of the images it finished
    first = tmp_path / "first4.json"
    assert cli("--model-file", tiny_copy, "--eval", "natural", "--n-eval", "4", "--report", first)[0] == 0
    calls = _no_attack_then_raise_in_batch_2(monkeypatch, KeyboardInterrupt)
    report = tmp_path / "r.json"
    status, out, err = cli("--model-file", tiny_copy, "--eval", "apgd-linf", "--n-eval", "8",
                           "--eval-batch-size", "4", "--report", report)
    assert status == 1 and calls == [4, 4]
    row = _rows(report)["apgd-linf"]
    assert row["complete"] is False and row["n_done"] == 4 and row["n"] == 8
    assert row["accuracy_so_far"] == _rows(first)["natural"]["accuracy"]
    assert row["per_image"] == _rows(first)["natural"]["per_image"]
    assert "on the first 4 of 8 images (interrupted)" in out, out


def test_an_interrupted_apgd_row_continues_as_if_never_stopped(cli, tiny_copy, tmp_path, monkeypatch):
    # hours of CPU APGD, or a GPU run stopped by its time limit, continue from the last finished batch
    argv = ["--model-file", tiny_copy, "--eval", "natural,apgd-linf", "--n-eval", "8", "--apgd-iters", "3"]
    full, report = tmp_path / "full.json", tmp_path / "r.json"
    assert cli(*argv, "--eval-batch-size", "4", "--report", full)[0] == 0
    real, calls = M.apgd, []

    def stop_in_second_batch(model, x, y, **kw):
        if kw["loss"] == "ce" and kw.get("crafted_at_alpha") is None:     # the first attack of each batch
            calls.append(len(y))
            if len(calls) == 2:
                raise KeyboardInterrupt
        return real(model, x, y, **kw)

    monkeypatch.setattr(M, "apgd", stop_in_second_batch)
    status, out, err = cli(*argv, "--eval-batch-size", "4", "--report", report)
    assert status == 1 and "run the same command to continue" in err[-1], err
    partial = report.read_text()
    assert json.loads(partial)["results"]["apgd-linf"]["n_done"] == 4
    monkeypatch.setattr(M, "apgd", real)
    status, out, err = cli(*argv, "--report", report, "--resume")     # the report's batches of 4, not 64
    assert status == 0, err
    assert f"natural: kept from {report}" in out and "apgd-linf: continuing after the first 4 of 8" in out
    resumed, uninterrupted = json.loads(report.read_text()), json.loads(full.read_text())
    assert resumed["complete"] is True and resumed["eval_batch_size"] == 4
    for row in ("natural", "apgd-linf"):
        assert _without_seconds(resumed["results"][row]) == _without_seconds(uninterrupted["results"][row])
    assert resumed["resumed"] == [json.loads(partial)["command"]]


def test_an_interrupted_pgd_row_continues_with_the_random_starts_of_an_uninterrupted_one(cli, tiny_copy,
                                                                                         tmp_path, monkeypatch):
    argv = ["--model-file", tiny_copy, "--eval", "natural,pgd-linf,bpda-l2", "--n-eval", "12", "--steps", "2",
            "--eval-batch-size", "4"]
    full, report = tmp_path / "full.json", tmp_path / "r.json"
    assert cli(*argv, "--report", full)[0] == 0
    real, calls = M.pgd, []

    def stop_in_second_batch(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(M, "pgd", stop_in_second_batch)
    status, out, err = cli(*argv, "--report", report)
    assert status == 1 and "on the first 4 of 12 images (interrupted)" in out, out
    cut = _rows(report)["pgd-linf"]
    assert cut["n_done"] == 4 and cut["device"] == "cpu"       # a row keeps the kind of device it continues on
    monkeypatch.setattr(M, "pgd", real)
    status, out, err = cli(*argv, "--report", report)
    assert status == 0 and "pgd-linf: continuing after the first 4 of 12 images" in out, err
    for row in ("natural", "pgd-linf", "bpda-l2"):
        assert _without_seconds(_rows(report)[row]) == _without_seconds(_rows(full)[row])


def test_a_killed_evaluation_leaves_its_finished_rows_and_apgd_batches(cli, tiny_copy, tmp_path, monkeypatch):
    # the report is rewritten after every row and every batch, not only when Ctrl-C can be handled
    class Killed(BaseException):
        """Stands for kill -9 or a lost machine: no handler of model.py sees it."""

    _no_attack_then_raise_in_batch_2(monkeypatch, Killed)
    report = tmp_path / "r.json"
    with pytest.raises(Killed):
        cli("--model-file", tiny_copy, "--eval", "natural,apgd-linf", "--n-eval", "8", "--eval-batch-size", "4",
            "--report", report)
    saved = json.loads(report.read_text())
    assert saved["complete"] is False and saved["model_sha256"] == _sha256(tiny_copy)
    assert saved["results"]["natural"]["n"] == 8
    row = saved["results"]["apgd-linf"]
    assert row["complete"] is False and row["n_done"] == 4
    assert row["per_image"] == saved["results"]["natural"]["per_image"][:4]
    # a row without its n_done (the record of its images is what counts) continues just the same
    del row["n_done"]
    report.write_text(json.dumps(saved))
    monkeypatch.setattr(M, "apgd", lambda model, x, y, **kw: [x.clone()])
    status, out, err = cli("--model-file", tiny_copy, "--eval", "natural,apgd-linf", "--n-eval", "8", "--report",
                           report)
    assert status == 0 and "apgd-linf: continuing after the first 4 of 8 images" in out, err


def test_a_row_made_with_other_settings_is_measured_again_and_rows_not_asked_for_stay(cli, tiny_copy, tmp_path):
    report = tmp_path / "r.json"
    base = ["--model-file", tiny_copy, "--n-eval", "8", "--report", report]
    assert cli(*base, "--eval", "natural,pgd-linf,pgd-l2", "--steps", "1")[0] == 0
    first = _rows(report)
    status, out, err = cli(*base, "--eval", "pgd-linf", "--steps", "2", "--resume")
    assert status == 0 and "pgd-linf: the report's row was made with other settings; measuring it again" in out
    rows = _rows(report)
    assert rows["pgd-linf"]["steps"] == 2 and rows["natural"] == first["natural"] and rows["pgd-l2"] == first["pgd-l2"]


def test_a_report_of_other_settings_is_kept_and_resume_insists_on_continuing(cli, tiny_copy, tmp_path):
    report = tmp_path / "r.json"
    assert cli("--model-file", tiny_copy, "--eval", "natural", "--n-eval", "8", "--report", report)[0] == 0
    made = report.read_bytes()
    other = tmp_path / "other.pth"
    M.WideResNet(10, 1).save(str(other))
    cases = [(["--model-file", tiny_copy, "--resume"], "--resume continues training (with --force-train) or"),
             (["--model-file", tiny_copy, "--resume", "--report", tmp_path / "none.json"],
              f"--resume: no report {tmp_path / 'none.json'} to continue"),
             (["--model-file", other, "--resume", "--report", report], "was made with other settings (model_sha256"),
             (["--model-file", tiny_copy, "--resume", "--report", report, "--n-eval", "16"], "(n 8 there)"),
             (["--model-file", tiny_copy, "--resume", "--report", report, "--n-eval", "8", "--calibrate"],
              "an interrupted calibration or evaluation also continues when its command is run again")]
    for argv, fragment in cases:
        _one_error(*cli(*argv)[::2], fragment)
    assert report.read_bytes() == made
    # without --resume, a report of other settings (another --n-eval, say) is kept as .prev: nothing is lost
    status, out, err = cli("--model-file", tiny_copy, "--eval", "natural", "--n-eval", "4", "--report", report)
    assert status == 0 and f"note: {report} was made with other settings (n 8 there)" in out, out
    assert (tmp_path / "r.json.prev").read_bytes() == made and json.loads(report.read_text())["n"] == 4


def test_an_interrupted_calibration_continues_from_its_finished_rows(cli, tiny_copy, tmp_path, monkeypatch):
    argv = ["--model-file", tiny_copy, "--calibrate", "--alpha-grid", "0,0.1", "--alpha-criterion", "bpda",
            "--steps", "1", "--n-train", "128", "--n-eval", "16"]
    before, progress = _sha256(tiny_copy), tmp_path / "m.pth.calibration.json"
    real = _interrupt_row(monkeypatch, "alpha 0.1 natural")
    status, out, err = cli(*argv)
    assert status == 1 and _sha256(tiny_copy) == before
    assert err[-1] == f"interrupted; the calibration keeps what it finished in {progress}: run the same command " \
                      f"to continue", err
    assert list(_rows(progress)) == ["alpha 0 natural", "alpha 0 pgd-linf", "alpha 0 bpda-linf"]
    monkeypatch.setattr(M.Report, "row", real)
    status, out, err = cli(*argv)
    assert status == 0, err
    assert f"alpha 0 pgd-linf: kept from {progress}" in out and "alpha 0.1 natural: kept" not in out
    assert not progress.exists()
    assert [row["alpha"] for row in M.load_model(str(tiny_copy)).meta["calibration"]["sweep"]] == [0.0, 0.1]


def test_interruptions_after_training_or_calibrating_name_the_command_that_continues(cli, tmp_path, monkeypatch):
    model_file = tmp_path / "new.pth"
    real = _interrupt_row(monkeypatch, "alpha 0.1 natural")
    status, out, err = cli(*TINY_TRAIN, "--model-file", model_file, "--calibrate", "--alpha-grid", "0,0.1",
                           "--alpha-criterion", "bpda", "--steps", "1", "--n-eval", "8")
    assert status == 1 and err[-1] == (f"interrupted; the calibration keeps what it finished in {model_file}"
                                       f".calibration.json: run the command without --force-train to continue"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.pth", "new.pth.calibration.json"]
    assert M.load_model(str(model_file)).meta["training"]["epochs"] == 1    # the trained model was saved
    monkeypatch.setattr(M.Report, "row", real)
    monkeypatch.setattr(M, "calibrate", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    status, out, err = cli(*TINY_TRAIN, "--model-file", tmp_path / "b.pth", "--calibrate", "--n-eval", "8")
    assert status == 1 and err[-1] == (f"interrupted; {tmp_path / 'b.pth'} holds the trained model: run the command "
                                       f"without --force-train to continue"), err


def test_an_evaluation_interrupted_after_calibrating_says_to_continue_it_without_calibrate(cli, tiny_copy, tmp_path,
                                                                                          monkeypatch):
    report = tmp_path / "r.json"
    evaluation = ["--model-file", tiny_copy, "--eval", "natural,pgd-linf", "--n-eval", "8", "--steps", "1",
                  "--report", report]
    real = _interrupt_row(monkeypatch, "pgd-linf")
    status, out, err = cli(*evaluation, "--calibrate", "--alpha-grid", "0,0.1", "--alpha-criterion", "bpda",
                           "--n-train", "128")
    assert status == 1 and f"saved {tiny_copy} (calibrated)" in out
    assert err[-1] == (f"interrupted: the rows finished so far are in {report}, marked incomplete; run the command "
                       f"without --force-train or --calibrate to continue"), err
    monkeypatch.setattr(M.Report, "row", real)
    status, out, err = cli(*evaluation)
    assert status == 0 and f"natural: kept from {report}" in out, err
    assert json.loads(report.read_text())["complete"] is True


def test_an_interruption_in_the_first_epoch_says_that_nothing_was_kept(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(M, "train_step", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    status, out, err = cli(*TINY_TRAIN, "--model-file", tmp_path / "x.pth")
    assert status == 1 and err[-1] == ("interrupted in the first epoch, before any checkpoint: nothing was kept, "
                                       "the same command starts over"), err


def test_what_a_run_reports_is_what_its_model_file_gives(cli, tmp_path):
    """After --force-train --calibrate the evaluation runs on the model as saved (float16 weights): a fresh
    evaluation of the file gives the same figures, image by image."""
    model_file, first, again = tmp_path / "x.pth", tmp_path / "first.json", tmp_path / "again.json"
    rows = ["--eval", "natural,pgd-linf", "--n-eval", "32", "--split", "val", "--steps", "2"]
    assert cli(*TINY_TRAIN, "--model-file", model_file, "--calibrate", "--alpha-grid", "0,0.2", "--alpha-criterion",
               "bpda", *rows, "--report", first)[0] == 0
    assert cli("--model-file", model_file, *rows, "--report", again)[0] == 0
    for name in ("natural", "pgd-linf"):
        assert _rows(first)[name]["per_image"] == _rows(again)[name]["per_image"]
