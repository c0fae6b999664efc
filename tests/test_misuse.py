"""Misuse: every way a new user was seen to lose a model, hours of work or a correct figure ends in one
clear line and the right exit status, with nothing lost (the committed model byte-identical after each).

In process (M.main) for speed: these runs stop before any real work, or do very little."""
import hashlib
import json
import shutil
import signal
import sys

import pytest
import torch

import model as M

TINY_TRAIN = ["--force-train", "--arch", "10-1", "--n-train", "256", "--batch-size", "64", "--device", "cpu",
              "-e", "1", "--train-steps", "1"]


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def cli(committed_model_file, data_dir, monkeypatch, capsys):
    """cli(*argv) -> (exit status, stdout, stderr lines without progress bars); checks after each call that
    the committed model is byte-identical."""
    monkeypatch.setenv("CIFAR10_DIR", str(data_dir))
    monkeypatch.setattr(sys, "argv", ["model.py"])
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


@pytest.fixture
def tiny_copy(tiny_model_file, tmp_path):
    path = tmp_path / "m.pth"
    shutil.copyfile(tiny_model_file, path)
    return path


def _one_error(status, err, fragment, code=2):
    assert status == code, err
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and fragment in errors[0], err
    assert all(line.startswith(("error: ", "warning: ")) for line in err), err      # no traceback


# ----------------------------------------------------------------------------------------------------
# Write targets, checked before any work
# ----------------------------------------------------------------------------------------------------
def test_report_onto_the_model_file_is_refused(cli, tiny_copy):
    before = tiny_copy.read_bytes()
    status, out, err = cli("--model-file", tiny_copy, "--report", tiny_copy, "--n-eval", "8")
    _one_error(status, err, f"--report {tiny_copy} is the same file as --model-file {tiny_copy}")
    assert tiny_copy.read_bytes() == before and out == ""


def test_outputs_that_are_the_same_file_are_refused(cli, tiny_copy, tmp_path):
    status, _, err = cli("--model-file", tiny_copy, "--report", tmp_path / "r.json", "--plot", tmp_path / "r.json")
    _one_error(status, err, "--plot")
    status, _, err = cli(*TINY_TRAIN, "--model-file", tmp_path / "new.pth", "--report", tmp_path / "new.pth.ckpt")
    _one_error(status, err, "is the same file as checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pth"]


@pytest.mark.parametrize("flag", ["--model-file", "--report", "--plot"])
def test_unwritable_or_directory_targets_are_refused_before_any_work(cli, tmp_path, flag, monkeypatch):
    monkeypatch.setattr(M, "load_cifar10", lambda *a: pytest.fail("work started before the check"))
    folder = tmp_path / "a-folder"
    folder.mkdir()
    args = TINY_TRAIN + ["--model-file", tmp_path / "new.pth"] if flag == "--model-file" else ["--n-eval", "8"]
    for target, fragment in ((folder, "is a directory"), ("/proc/m.out", "cannot write in /proc")):
        status, _, err = cli(*args, flag, target)
        _one_error(status, err, f"{flag} {target}: {fragment}")


def test_a_smoke_run_cannot_replace_the_committed_model(cli, monkeypatch):
    monkeypatch.setattr(M, "load_cifar10", lambda *a: pytest.fail("work started before the check"))
    status, _, err = cli(*TINY_TRAIN)
    _one_error(status, err, "--n-train makes a smoke run: name its output with --model-file")
    status, _, err = cli(*TINY_TRAIN[:-4], "--model-file", M.Net.model_file)      # --arch 10-1, explicit file
    _one_error(status, err, "--arch 10-1: models/default_model.pth is the file Net() loads")
    status, _, err = cli("--calibrate", "--n-train", "256")
    _one_error(status, err, "--n-train makes a smoke run")


def test_a_second_run_writing_the_same_model_file_stops_at_once(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(M, "load_cifar10", lambda *a: pytest.fail("work started before the check"))
    target = tmp_path / "x.pth"
    with M.write_lock(str(target)):
        holder = (tmp_path / "x.pth.lock").read_text()
        status, _, err = cli(*TINY_TRAIN, "--model-file", target)
        _one_error(status, err, f"{target} is being written by another run (pid ")
        assert holder.split(":")[0] in err[-1]
    assert not (tmp_path / "x.pth.lock").exists()
    with M.write_lock(str(target)):                       # and it can be taken again afterwards
        pass


def test_a_second_run_writing_the_same_report_stops_at_once(cli, tiny_copy, tmp_path, monkeypatch):
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
# Numbers and odd settings
# ----------------------------------------------------------------------------------------------------
def test_odd_but_valid_settings_warn_and_run(cli, tiny_copy):
    status, out, err = cli("--model-file", tiny_copy, "--split", "val", "--n-eval", "5000", "--steps", "0",
                           "--eval", "natural,pgd-linf", "--arch", "16-2", "--eval-batch-size", "512")
    assert status == 0, err
    assert "warning: --steps 0: PGD makes no step, so the PGD rows measure the random start only" in err
    assert "warning: --n-eval 5000: the val split has 1,024 images; using all of them" in err
    assert any(line.startswith("warning: --arch 16-2 is ignored") for line in err)
    assert "pgd-linf" in out and "on 1024 images" in out


def test_alpha_above_the_calibrated_range_warns(cli, tmp_path, tiny_model_file, train_set, val_set):
    calibrated = M.load_model(str(tiny_model_file))
    M.calibrate(calibrated, M.Batches(*[t[:64] for t in train_set], 64, device="cpu"),
                M.Batches(*[t[:8] for t in val_set], 8, device="cpu"), [0.1, 0.2], steps=1, criterion="bpda",
                log=lambda *a: None)
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
    status, _, err = cli("--model-file", tmp_path / "mispelt.pth", "--n-train", "256", "--arch", "10-1")
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


def test_apgd_work_that_would_take_a_cpu_hours_says_so_first(cli, tiny_copy, monkeypatch):
    def stop(*a):
        raise M.UserError("stopped by the test")

    monkeypatch.setattr(M, "load_cifar10", stop)
    status, out, err = cli("--model-file", tiny_copy, "--eval", "natural,apgd-linf", "--device", "cpu")
    assert status == 2
    assert out.startswith("note: this run attacks 10,000 images with APGD (each alpha of the adaptive calibration, "
                          "each apgd-*/aa-* row): about 23.6 h on a 2-core CPU, a GPU job; --n-eval"), out
    # the adaptive calibration: each alpha on the validation split; smaller runs go without a note
    assert "attacks 3,072 images" in M.apgd_cost_note(M.parse_args(["--calibrate", "--alpha-grid", "0.1,0.2"]))
    assert M.apgd_cost_note(M.parse_args(["--calibrate", "--alpha-criterion", "bpda"])) is None
    assert M.apgd_cost_note(M.parse_args(["--eval", "aa-linf", "--n-eval", "64"])) is None
    assert M.apgd_cost_note(M.parse_args(["--eval", "apgd-l2", "--n-eval", "1000", "--apgd-iters", "5"])) is None
    # each row at its norm's measured cost: L2 about 10 s per image, L-inf 8.5
    assert "about 2.8 h on a 2-core CPU" in M.apgd_cost_note(M.parse_args(["--eval", "apgd-l2", "--n-eval", "1000"]))
    assert "about 5.1 h on a 2-core CPU" in M.apgd_cost_note(M.parse_args(["--eval", "aa-linf,aa-l2",
                                                                            "--n-eval", "1000"]))


def test_the_cost_note_leaves_out_the_alphas_an_interrupted_calibration_finished(tmp_path):
    model_file = tmp_path / "m.pth"
    args = M.parse_args(["--calibrate", "--alpha-grid", "0.2,0.35", "--model-file", str(model_file)])
    assert "attacks 3,072 images" in M.apgd_cost_note(args) and "not counted" not in M.apgd_cost_note(args)
    progress = {"key": {}, "alphas": {"0": {"row": {}, "robust": "01"}, "0.2": {"row": {}, "apgd": {}},
                                      "0.5": {"row": {}, "robust": "1"}}}    # 0.2 part way, 0.5 not in the grid
    (tmp_path / "m.pth.calibration.json").write_text(json.dumps(progress))
    note = M.apgd_cost_note(args)
    assert "attacks 2,048 images" in note
    assert note.endswith(f"; not counted: alpha 0, finished in {model_file}.calibration.json (taken over if made "
                         "with the same weights and settings)"), note
    (tmp_path / "m.pth.calibration.json").write_text("{not json")
    assert "attacks 3,072 images" in M.apgd_cost_note(args)


def test_the_cost_note_counts_only_what_a_resumed_report_has_left():
    args = M.parse_args(["--eval", "natural,apgd-linf,apgd-l2", "--n-eval", "1000", "--split", "test"])
    settings = {name: M.attack_settings(name, args) for name in ("apgd-linf", "apgd-l2")}
    args.resume_report = {"results": {      # L-inf finished, L2 stopped after 512 of 1,000
        "apgd-linf": {"accuracy": 46.1, "n": 1000, **settings["apgd-linf"]},
        "apgd-l2": {"complete": False, "n_done": 512, "n": 1000, **settings["apgd-l2"], "progress": {"device": "cpu"}}}}
    assert "attacks 488 images" in M.apgd_cost_note(args)
    # a row made with other settings, or stopped on another device, is measured again: it counts whole
    args.resume_report["results"]["apgd-linf"]["iters"] = 50
    args.resume_report["results"]["apgd-l2"]["progress"]["device"] = "cuda"
    assert "attacks 2,000 images" in M.apgd_cost_note(args)


# ----------------------------------------------------------------------------------------------------
# Broken inputs
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content, fragment", [
    ("text", "not written by torch.save"),
    ({"state_dict": {"a": 1}}, "state_dict entry 'a' is of type int"),
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
    _one_error(status, err, "not a training checkpoint of this version")
    assert "weights_only" not in " ".join(err)


def test_missing_pyautoattack_is_one_line_before_any_work(cli, tiny_copy, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyautoattack", None)
    monkeypatch.setattr(M, "load_cifar10", lambda *a: pytest.fail("work started before the check"))
    for argv in (["--eval", "apgd-linf"], ["--eval", "aa-l2"], ["--calibrate"]):
        status, _, err = cli("--model-file", tiny_copy, *argv)
        _one_error(status, err, "APGD and AutoAttack need the official code: pip install pyautoattack")


# ----------------------------------------------------------------------------------------------------
# Interrupted evaluation
# ----------------------------------------------------------------------------------------------------
def test_ctrl_c_during_evaluation_keeps_the_finished_rows(cli, tiny_copy, tmp_path, monkeypatch):
    real = M.run_attack

    def interrupt_second(model, name, batches, args, device, **kw):
        if name == "pgd-linf":
            raise KeyboardInterrupt
        return real(model, name, batches, args, device, **kw)

    monkeypatch.setattr(M, "run_attack", interrupt_second)
    report = tmp_path / "r.json"
    status, out, err = cli("--model-file", tiny_copy, "--eval", "natural,pgd-linf,pgd-l2", "--n-eval", "8",
                           "--report", report)
    assert status == 1
    assert (f"interrupted: the rows finished so far are in {report}, marked incomplete; repeat the command with "
            f"--resume to continue") in err
    saved = json.loads(report.read_text())
    assert saved["complete"] is False and list(saved["results"]) == ["natural"]
    assert saved["model_sha256"] == _sha256(tiny_copy)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pth", "r.json"]


def test_a_replaced_report_is_kept_as_prev(cli, tiny_copy, tmp_path, monkeypatch):
    # an eval run repeated with the same --report, and interrupted at that, must not cost the complete one
    report = tmp_path / "r.json"
    assert cli("--model-file", tiny_copy, "--eval", "natural", "--n-eval", "8", "--report", report)[0] == 0
    complete = report.read_bytes()
    monkeypatch.setattr(M, "run_attack", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    status, out, err = cli("--model-file", tiny_copy, "--eval", "natural", "--n-eval", "8", "--report", report)
    assert status == 1 and f"kept the file this run replaces as {report}.prev" in out, out
    assert (tmp_path / "r.json.prev").read_bytes() == complete
    assert json.loads(report.read_text())["complete"] is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pth", "r.json", "r.json.prev"]
    # the same command once more, without --resume, would push the complete one out of .prev and start the
    # unfinished one over: refused, both files as they were
    partial = report.read_bytes()
    status, out, err = cli("--model-file", tiny_copy, "--eval", "natural", "--n-eval", "8", "--report", report)
    _one_error(status, err, f"--report {report} holds an unfinished evaluation (finished: nothing yet): continue "
                            f"it with --resume")
    assert report.read_bytes() == partial and (tmp_path / "r.json.prev").read_bytes() == complete


def _no_attack_then_raise_in_batch_2(monkeypatch, exception):
    """Replaces APGD by no attack at all, raising `exception` in the second batch; returns the batch sizes seen."""
    calls = []

    def fake_apgd(model, x, y, *, loss, crafted_at_alpha=None, **kw):
        if loss == "ce" and crafted_at_alpha is None:       # the first component of each batch
            calls.append(len(y))
            if len(calls) == 2:
                raise exception
        return x.clone()

    monkeypatch.setattr(M, "apgd", fake_apgd)
    return calls


def test_an_interrupted_apgd_row_keeps_its_finished_batches(cli, tiny_copy, tmp_path, monkeypatch):
    # a GPU run stopped at its deadline keeps the worst case of the images it finished
    first = tmp_path / "first4.json"
    assert cli("--model-file", tiny_copy, "--eval", "natural", "--n-eval", "4", "--report", first)[0] == 0
    calls = _no_attack_then_raise_in_batch_2(monkeypatch, KeyboardInterrupt)
    report = tmp_path / "r.json"
    status, out, err = cli("--model-file", tiny_copy, "--eval", "apgd-linf", "--n-eval", "8",
                           "--eval-batch-size", "4", "--report", report)
    assert status == 1 and calls == [4, 4]
    row = json.loads(report.read_text())["results"]["apgd-linf"]
    assert row["complete"] is False and row["n_done"] == 4 and row["n"] == 8
    assert row["accuracy_so_far"] == json.loads(first.read_text())["results"]["natural"]["accuracy"]
    assert row["per_image"] == json.loads(first.read_text())["results"]["natural"]["per_image"]
    assert "on the first 4 of 8 images (interrupted)" in out, out


def _without_seconds(row):
    return {k: _without_seconds(v) if isinstance(v, dict) else v for k, v in row.items() if k != "seconds"}


def test_resume_continues_an_interrupted_apgd_row_as_if_never_stopped(cli, tiny_copy, tmp_path, monkeypatch):
    # hours of CPU APGD, or a GPU run cut at its deadline, continue from the last finished batch
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
    assert status == 1 and "repeat the command with --resume to continue" in err[-1], err
    partial = report.read_text()
    assert json.loads(partial)["results"]["apgd-linf"]["n_done"] == 4
    monkeypatch.setattr(M, "apgd", real)
    # without --resume (a training run too) it would start over: refused, naming what it holds
    for extra in ([], ["--force-train", "--n-train", "64", "-e", "1", "--batch-size", "32"]):
        status, out, err = cli(*argv, "--report", report, *extra)
        _one_error(status, err, "finished: natural, apgd-linf (4 of 8 images)")
        assert report.read_text() == partial
    status, out, err = cli(*argv, "--report", report, "--resume")     # the report's batches of 4, not 64
    assert status == 0, err
    assert f"(kept from {report})" in out and "continuing after the first 4 of 8" in out
    resumed, uninterrupted = json.loads(report.read_text()), json.loads(full.read_text())
    assert resumed["complete"] is True and (tmp_path / "r.json.prev").read_text() == partial
    assert resumed["eval_batch_size"] == 4
    for row in ("natural", "apgd-linf"):
        assert _without_seconds(resumed["results"][row]) == _without_seconds(uninterrupted["results"][row])
    assert [r["command"] for r in resumed["resumed"]] == [json.loads(partial)["command"]]


def test_resume_continues_an_interrupted_pgd_row_with_its_random_starts(cli, tiny_copy, tmp_path, monkeypatch):
    # a PGD row over 10,000 images is most of an hour on a CPU: it continues batch by batch too, its random
    # generator restored from the report, so that the random starts are those of an uninterrupted run
    argv = ["--model-file", tiny_copy, "--eval", "natural,pgd-linf,bpda-l2", "--n-eval", "12", "--steps", "2",
            "--eval-batch-size", "4"]
    real, states, stop = M.pgd, [], [False]

    def recording(model, x, y, *, generator=None, **kw):
        states.append(generator.get_state().clone())
        if stop[0] and len(states) == 2:
            raise KeyboardInterrupt
        return real(model, x, y, generator=generator, **kw)

    monkeypatch.setattr(M, "pgd", recording)
    full, report = tmp_path / "full.json", tmp_path / "r.json"
    assert cli(*argv, "--report", full)[0] == 0
    uninterrupted, states[:] = list(states), []
    stop[0] = True
    status, out, err = cli(*argv, "--report", report)
    assert status == 1 and "pgd-linf" in out and "on the first 4 of 12 images (interrupted)" in out, out
    partial = json.loads(report.read_text())
    cut = partial["results"]["pgd-linf"]
    assert cut["n_done"] == 4 and cut["progress"]["device"] == "cpu" and "generator" in cut["progress"]
    stop[0], states[:] = False, []
    status, out, err = cli(*argv, "--report", report, "--resume")
    assert status == 0 and "pgd-linf: continuing after the first 4 of 12 images" in out, err
    # batch 2 of pgd-linf started from the generator state an uninterrupted run had there, and so did the rest
    assert len(states) == len(uninterrupted) - 1
    assert all(torch.equal(a, b) for a, b in zip(states, uninterrupted[1:]))
    resumed, expected = json.loads(report.read_text()), json.loads(full.read_text())
    for row in ("natural", "pgd-linf", "bpda-l2"):
        assert _without_seconds(resumed["results"][row]) == _without_seconds(expected["results"][row])
    # a row stopped on another device (whose generator differs) is measured again, from its first image
    cut["progress"]["device"] = "cuda"
    report.write_text(json.dumps(partial))
    states[:] = []
    status, out, err = cli(*argv, "--report", report, "--resume")
    assert status == 0 and "pgd-linf: the report's row was stopped on another device" in out, err
    assert len(states) == len(uninterrupted) and torch.equal(states[0], uninterrupted[0])
    assert _without_seconds(json.loads(report.read_text())["results"]["pgd-linf"]) == \
        _without_seconds(expected["results"]["pgd-linf"])


class Killed(BaseException):
    """Stands for kill -9 or a lost machine: no handler of model.py sees it."""


def test_a_killed_evaluation_leaves_its_finished_rows_and_apgd_batches(cli, tiny_copy, tmp_path, monkeypatch):
    # the report is rewritten after every row and every APGD batch, not only when Ctrl-C can be handled
    _no_attack_then_raise_in_batch_2(monkeypatch, Killed)
    report = tmp_path / "r.json"
    with pytest.raises(Killed):
        cli("--model-file", tiny_copy, "--eval", "natural,apgd-linf", "--n-eval", "8", "--eval-batch-size", "4",
            "--report", report)
    saved = json.loads(report.read_text())
    assert saved["complete"] is False and saved["model_sha256"] == _sha256(tiny_copy)
    assert saved["results"]["natural"]["n"] == 8
    row = saved["results"]["apgd-linf"]
    assert row["complete"] is False and row["n_done"] == 4 and row["per_image"] == saved["results"]["natural"][
        "per_image"][:4]


def test_resume_measures_again_a_row_made_with_other_settings(cli, tiny_copy, tmp_path):
    report = tmp_path / "r.json"
    base = ["--model-file", tiny_copy, "--eval", "natural,pgd-linf", "--n-eval", "8", "--report", report]
    assert cli(*base, "--steps", "1")[0] == 0
    status, out, err = cli(*base, "--steps", "2", "--resume")
    assert status == 0 and "pgd-linf: the report's row was made with other settings; measuring it again" in out
    assert json.loads(report.read_text())["results"]["pgd-linf"]["steps"] == 2


def test_resume_of_an_evaluation_refuses_what_it_cannot_continue(cli, tiny_copy, tmp_path):
    report = tmp_path / "r.json"
    assert cli("--model-file", tiny_copy, "--eval", "natural", "--n-eval", "8", "--report", report)[0] == 0
    made = report.read_bytes()
    other = tmp_path / "other.pth"
    M.WideResNet(10, 1).save(str(other))
    cases = [
        (["--model-file", tiny_copy, "--resume"], "give its --report"),
        (["--model-file", tiny_copy, "--resume", "--report", tmp_path / "none.json"], "no report"),
        (["--model-file", other, "--resume", "--report", report], "was made with another model file (sha256)"),
        (["--model-file", tiny_copy, "--resume", "--report", report, "--n-eval", "16"],
         "was made with another number of images (8 there, 16 here)"),
        (["--model-file", tiny_copy, "--resume", "--report", report, "--n-eval", "8", "--split", "val"],
         "another --split"),
        (["--model-file", tiny_copy, "--resume", "--report", report, "--n-eval", "8", "--calibrate"],
         "an interrupted calibration continues by itself"),
        (["--model-file", tmp_path / "missing.pth", "--resume", "--report", report], "does not exist"),
    ]
    for argv, fragment in cases:
        _one_error(*cli(*argv)[::2], fragment)
    (tmp_path / "bad.json").write_text("{not json")
    _one_error(*cli("--model-file", tiny_copy, "--resume", "--report", tmp_path / "bad.json")[::2], "cannot read")
    other_alpha = tmp_path / "alpha.json"
    other_alpha.write_text(json.dumps({**json.loads(made), "alpha": 0.35}))
    _one_error(*cli("--model-file", tiny_copy, "--resume", "--report", other_alpha, "--n-eval", "8")[::2],
               f"--resume: {other_alpha} was made at alpha 0.35, this run evaluates at alpha 0")
    assert report.read_bytes() == made
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alpha.json", "bad.json", "m.pth", "other.pth", "r.json"]


def test_an_interrupted_calibration_continues_from_its_finished_alphas(cli, tiny_copy, tmp_path, monkeypatch):
    argv = ["--model-file", tiny_copy, "--calibrate", "--alpha-grid", "0,0.1", "--alpha-criterion", "bpda",
            "--steps", "1", "--n-train", "128", "--n-eval", "16"]
    before, progress = _sha256(tiny_copy), tmp_path / "m.pth.calibration.json"
    real_evaluate, measured, stop = M.evaluate, [], [True]

    def stop_at_alpha_01(model, batches, attack=None, desc="natural", verbose=True):
        measured.append(desc)
        if desc.startswith("alpha 0.1") and stop[0]:
            raise KeyboardInterrupt
        return real_evaluate(model, batches, attack, desc=desc, verbose=verbose)

    monkeypatch.setattr(M, "evaluate", stop_at_alpha_01)
    status, out, err = cli(*argv)
    assert status == 1 and _sha256(tiny_copy) == before
    assert err[-1] == (f"interrupted; the calibration keeps what it finished in {progress}: run the same command "
                       f"again to continue"), err
    assert list(json.loads(progress.read_text())["alphas"]) == ["0"]
    measured.clear()
    stop[0] = False
    status, out, err = cli(*argv)
    assert status == 0, err
    assert f"alpha 0.000: kept from {progress}" in out
    assert not any(desc.startswith("alpha 0 ") for desc in measured) and "alpha 0.1 clean" in measured
    assert not progress.exists()
    sweep = M.load_model(str(tiny_copy)).meta["calibration"]["sweep"]
    assert [row["alpha"] for row in sweep] == [0.0, 0.1]


def test_a_calibration_interrupted_after_training_says_to_rerun_it_without_force_train(cli, tmp_path, monkeypatch):
    real_evaluate = M.evaluate

    def stop_at_alpha_01(model, batches, attack=None, desc="natural", verbose=True):
        if desc.startswith("alpha 0.1"):
            raise KeyboardInterrupt
        return real_evaluate(model, batches, attack, desc=desc, verbose=verbose)

    monkeypatch.setattr(M, "evaluate", stop_at_alpha_01)
    model_file = tmp_path / "new.pth"
    status, out, err = cli(*TINY_TRAIN, "--model-file", model_file, "--calibrate", "--alpha-grid", "0,0.1",
                           "--alpha-criterion", "bpda", "--steps", "1", "--n-eval", "8")
    assert status == 1 and err[-1] == (f"interrupted; the calibration keeps what it finished in {model_file}"
                                       f".calibration.json: run the calibration again without --force-train "
                                       f"({model_file} holds the trained model) to continue"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.pth", "new.pth.calibration.json"]


def test_ctrl_c_after_training_keeps_the_trained_model(cli, tmp_path, monkeypatch):
    # the trained weights are saved before calibration: a GPU call cut there still brings them back
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(M, "calibrate", interrupt)
    model_file = tmp_path / "new.pth"
    status, out, err = cli(*TINY_TRAIN, "--model-file", model_file, "--calibrate", "--n-eval", "8")
    assert status == 1 and err[-1] == (f"interrupted; {model_file} holds the trained model: run the calibration "
                                       f"again without --force-train to continue"), err   # not train it again
    assert f"saved {model_file}" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.pth"]      # the checkpoint's job is done
    meta = M.load_model(str(model_file)).meta
    assert meta["training"]["epochs"] == 1 and "calibration" not in meta


def test_an_evaluation_interrupted_after_calibrating_says_to_resume_it_without_calibrate(cli, tiny_copy, tmp_path,
                                                                                       monkeypatch):
    # repeating the whole command would calibrate again (hours of APGD on a CPU), and --resume with
    # --calibrate is refused: the hints name the command that continues
    report = tmp_path / "r.json"
    evaluation = ["--model-file", tiny_copy, "--eval", "natural,pgd-linf", "--n-eval", "8", "--steps", "1",
                  "--report", report]
    real = M.run_attack
    monkeypatch.setattr(M, "run_attack", lambda model, name, *a, **k: (_ for _ in ()).throw(KeyboardInterrupt)
                        if name == "pgd-linf" else real(model, name, *a, **k))
    status, out, err = cli(*evaluation, "--calibrate", "--alpha-grid", "0,0.1", "--alpha-criterion", "bpda",
                           "--n-train", "128")
    assert status == 1 and f"saved {tiny_copy} (calibrated)" in out
    assert err[-1] == (f"interrupted: the rows finished so far are in {report}, marked incomplete; continue them with "
                       f"--resume and the evaluation's flags alone (without --force-train or --calibrate)"), err
    assert sum(line.startswith("interrupted") for line in err) == 1, err
    monkeypatch.setattr(M, "run_attack", real)
    status, out, err = cli(*evaluation, "--resume")
    assert status == 0 and f"(kept from {report})" in out, err
    resumed = json.loads(report.read_text())
    assert resumed["complete"] is True and list(resumed["results"]) == ["natural", "pgd-linf"]
