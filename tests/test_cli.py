"""CLI: argument checks (in process, cheap) and a few end-to-end `python model.py ...` runs (subprocess)."""
import hashlib
import importlib.util
import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import model as M
from conftest import subprocess_env


def _sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _stderr_lines(result):
    """stderr without tqdm's carriage-return progress redraws."""
    lines = []
    for line in result.stderr.splitlines():
        line = line.split("\r")[-1].strip()
        if line:
            lines.append(line)
    return lines


# ----------------------------------------------------------------------------------------------------
# parse_args in process
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--bogus"], "unrecognized arguments"),
    (["--eps-linf", "-1"], "must be >= 0"),
    (["--eps-l2", "x"], "not a number"),
    (["--eval", "natural,foo"], "unknown attack foo"),
    (["--eval", ","], "unknown attack"),
    (["--n-eval", "0"], "must be > 0"),
    (["--steps", "-1"], "--steps: must be >= 0"),
    (["-e", "3", "--time-budget", "5"], "not both"),
    (["--time-budget", "0"], "--time-budget: must be > 0"),
    (["--ema", "1.5"], "--ema: must be between 0 and 1, got 1.5"),
    (["--label-smoothing", "1"], "--label-smoothing: must be < 1, got 1"),
    (["--plot", "curves.gif"], "--plot curves.gif: give a file name ending in .png, .pdf, .svg, .jpg, .jpeg"),
    (["--arch", "preact"], "--arch: expected a WideResNet DEPTH-WIDTH such as 28-4, or preact18"),
    (["--arch", "12-1"], "--arch: no CIFAR-10 WideResNet: depth must be 6n+4"),
    (["--calibrate", "--alpha", "0.1"], "drop --alpha"),
    (["--alpha-grid", "0.1,-0.2"], "--alpha-grid: must be >= 0"),
    (["--device", "tpu"], "invalid choice"),
    # nan and inf are refused everywhere a number is read
    (["--eps-linf", "nan"], "--eps-linf: not a finite number: 'nan'"),
    (["--eps-linf", "inf"], "--eps-linf: not a finite number"),
    (["--eps-l2=-inf"], "--eps-l2: not a finite number"),
    (["--alpha", "nan"], "--alpha: not a finite number"),
    (["--alpha-grid", "0,nan"], "--alpha-grid: not a finite number"),
    (["--time-budget", "nan"], "--time-budget: not a finite number"),
    (["--label-smoothing", "nan"], "--label-smoothing: not a finite number"),
    (["--lr", "inf"], "--lr: not a finite number"),
    (["--ema", "nan"], "--ema: not a finite number"),
    (["--awp", "nan"], "--awp: not a finite number"),
    (["--trades", "inf"], "--trades: not a finite number"),
    (["--step-linf", "1/0"], "--step-linf: not a number"),
    # an L-inf radius above 1 is 8 meant as 8/255
    (["--eps-linf", "8"], "--eps-linf: 8 is above 1, the whole [0,1] pixel range: did you mean 8/255?"),
    (["--train-step-size", "2"], "did you mean 2/255?"),
    (["--eps-ramp", "1.5"], "--eps-ramp: must be a fraction of the run between 0 and 1"),
    (["--select-from", "-0.1"], "must be a fraction of the run"),
    (["--ema-start", "0.5"], "--ema-start needs --ema DECAY"),
])
def test_parse_args_rejects_bad_arguments_with_status_2(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        M.parse_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_help_shows_every_default_once_and_eps_as_a_fraction(capsys):
    with pytest.raises(SystemExit) as info:
        M.parse_args(["--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())          # argparse wraps lines
    assert "(default 8/255)" in text and "0.0313" not in text
    assert "(default: " not in text                             # no argparse-generated second default
    options = re.split(r" (?=--[a-z])", text[text.index("--model-file"):])
    for option in options:
        assert option.count("(default") <= 1, option
    for flag in ("--batch-size", "--eval-batch-size", "--seed", "--steps", "--restarts", "--apgd-iters",
                 "--alpha-criterion", "--train-steps", "--lr", "--warmup-epochs", "--val-every", "--select-n"):
        described = next(o for o in options if o.startswith(flag + " "))
        assert "default" in described, described


def test_parse_args_defaults_and_conversions():
    args = M.parse_args([])
    assert args.model_file == "models/default_model.pth" and not args.model_file_given
    assert args.arch is None and M.train_config(args).arch == "28-4" and args.alpha_criterion == "adaptive"
    assert args.eval_batch_size is None and args.apgd_iters == 100
    assert args.eval == ["natural"] and args.split == "test" and args.steps == M.EVAL_STEPS
    assert args.eps_linf == M.NORMS["linf"].eps and args.eps_l2 == M.NORMS["l2"].eps
    assert args.alpha_grid == [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4]
    args = M.parse_args(["--eps-linf", "4/255", "--eval", " natural , bpda-l2", "--alpha-grid", "0.3,0.1,0.1"])
    assert args.eps_linf == pytest.approx(4 / 255)
    assert args.eval == ["natural", "bpda-l2"]
    assert args.alpha_grid == [0.0, 0.1, 0.3]                      # sorted, de-duplicated, 0 added


def test_plot_needs_matplotlib_or_is_accepted(tmp_path, capsys):
    argv = ["--plot", str(tmp_path / "c.png")]
    if importlib.util.find_spec("matplotlib") is None:
        with pytest.raises(SystemExit) as info:
            M.parse_args(argv)
        assert info.value.code == 2 and "--plot needs matplotlib" in capsys.readouterr().err
    else:
        assert M.parse_args(argv).plot == str(tmp_path / "c.png")


def test_train_config_from_args():
    cfg = M.train_config(M.parse_args(["--arch", "10-1", "--n-train", "256", "--lr", "0.1", "--ema", "0.99"]))
    assert cfg.epochs == 30 and cfg.time_budget is None and cfg.arch == "10-1" and cfg.n_train == 256
    assert cfg.lr == 0.1 and cfg.ema == 0.99 and cfg.attack_steps == 5
    cfg = M.train_config(M.parse_args(["--train-steps", "2", "--train-step-size", "8/255", "--trades", "10",
                                       "--awp", "5e-3", "--awp-warmup", "3", "--eps-ramp", "1", "--ema", "0.999",
                                       "--ema-start", "0.75", "--select-from", "0.5", "--select-n", "256",
                                       "--eps-linf", "4/255"]))
    assert (cfg.attack_steps, cfg.attack_step_size, cfg.trades, cfg.awp, cfg.awp_warmup) == \
        (2, pytest.approx(8 / 255), 10.0, 5e-3, 3.0)
    assert (cfg.eps_ramp, cfg.ema, cfg.ema_start, cfg.select_from, cfg.select_n) == (1.0, 0.999, 0.75, 0.5, 256)
    assert cfg.eps == pytest.approx(4 / 255)
    cfg = M.train_config(M.parse_args(["--time-budget", "7"]))
    assert cfg.epochs is None and cfg.time_budget == 7.0
    assert M.train_config(M.parse_args(["-e", "4"])).epochs == 4


def test_train_config_and_flags_share_one_default_per_field(capsys):
    """Every TrainConfig field with a help text is a flag whose help shows the field's default; a flag not
    given leaves the field's default."""
    cfg, args = M.TrainConfig(), M.parse_args([])
    assert M.dataclasses.asdict(M.train_config(args)) == M.dataclasses.asdict(cfg)
    with pytest.raises(SystemExit):
        M.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in (("--lr", "0.2"), ("--batch-size", "512"), ("--warmup-epochs", "2"), ("--train-steps", "5"),
                          ("--val-every", "5"), ("--select-n", "512"), ("--seed", "0")):
        assert f"(default {default})" in text[text.rindex(flag + " "):][:300], flag


def test_attack_settings_follow_the_arguments():
    args = M.parse_args(["--steps", "7", "--restarts", "2", "--eps-l2", "0.25", "--step-linf", "1/255"])
    opts = M.plan(args, []).opts
    settings = {name: M.ATTACKS[name](None, opts).settings for name in M.ATTACKS}
    assert settings["bpda-linf"] == {"norm": "linf", "eps": M.NORMS["linf"].eps, "step_size": pytest.approx(1 / 255),
                                     "steps": 7, "restarts": 2, "bpda": True, "crafted_at_alpha": None}
    assert settings["apgd-linf"] == {"norm": "linf", "eps": M.NORMS["linf"].eps, "iters": 100, "restarts": 1,
                                     "bpda": True}
    assert settings["pgd-l2"]["eps"] == 0.25 and settings["pgd-l2"]["step_size"] == 0.0625
    assert settings["pgd-l2"]["bpda"] is False and settings["transfer-linf"]["crafted_at_alpha"] == 0.0
    assert settings["aa-l2"] == {"norm": "l2", "eps": 0.25, "version": "standard", "bpda": True}
    assert settings["natural"] == {}


def test_checks_fire_when_no_attack_can_move_the_model(tiny_trained, tiny_trained_state, val_set):
    """A model whose every MeanSparse maps everything to the mean has one output for every image: its
    gradient is zero and PGD at eps 1 leaves correct the images of its one class. Both checks must fire."""
    M.set_alpha(tiny_trained, 1e6)
    batches = M.Batches(val_set[0][:32], val_set[1][:32], 32, device="cpu")
    x, y = next(iter(batches))
    with torch.no_grad():
        constant = tiny_trained(x).argmax(1)
    assert bool((constant == constant[0]).all()) and bool((y == constant[0]).any()), "premise: one class, present"
    surrogate = M.WideResNet(10, 1)
    surrogate.load_state_dict(tiny_trained_state)
    seen, figures = M.attack_checks(tiny_trained, batches, M.AttackOptions(steps=1, queries=5), surrogate.eval())
    assert seen["unbounded"] == f"{int((y == constant[0]).sum())} of 32 images correct at eps 1"
    assert len(set(figures["accuracy"])) == 1                        # flat: the attack does nothing
    quick = M.quick_checks(tiny_trained, x[:8], y[:8])
    assert quick["zero-gradients"] == "8 of 8 images" and quick["probabilities"] is None
    lines = []
    M.log_checks({**quick, **seen}, lines.append, True)
    assert any(line.startswith("check unbounded FIRED: ") and "remedy: " in line for line in lines)
    assert lines[-1].startswith("checks passed: train-mode, randomized, probabilities")


# ----------------------------------------------------------------------------------------------------
# Exit statuses and messages: the script itself once, then in process
# ----------------------------------------------------------------------------------------------------
def test_the_script_exits_0_on_help_and_2_on_a_bad_flag(run_cli):
    result = run_cli("--help")
    assert result.returncode == 0
    assert "--model-file" in result.stdout and "--calibrate" in result.stdout and "--force-train" in result.stdout
    result = run_cli("--bogus")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "model.py: error: unrecognized arguments: --bogus (see --help)\n"


def test_an_output_that_cannot_be_written_exits_2(cli):
    status, out, err = cli("--report", "/proc/no-such-dir/r.json")
    assert status == 2 and out == "" and err == ["error: --report /proc/no-such-dir/r.json: cannot write in /proc "
                                                 "(No such file or directory)"]


def test_corrupt_model_file_exits_2_with_one_line(cli, tmp_path):
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(bytes(range(256)) * 40)
    status, out, err = cli("--model-file", bad, "--n-eval", "16")
    assert status == 2 and out == "" and len(err) == 1, err
    assert err[0].startswith("error: ") and str(bad) in err[0]


def test_resume_without_checkpoint_exits_2(cli, tmp_path, tiny_model_file):
    model_file = tmp_path / "m.pth"
    status, _, err = cli("--force-train", "--resume", "-e", "1", "--arch", "10-1", "--n-train", "256",
                         "--batch-size", "128", "--device", "cpu", "--model-file", model_file)
    assert status == 2
    assert err[-1].startswith("error: --resume: no checkpoint") and str(model_file) + ".ckpt" in err[-1]
    assert list(tmp_path.iterdir()) == []
    # without --force-train, --resume continues an evaluation, which needs the report it continues
    status, _, err = cli("--resume", "--model-file", tiny_model_file)
    assert status == 2
    assert err[-1].startswith("error: --resume continues training (with --force-train) or the evaluation in --report")


def test_alpha_without_calibration_exits_2(cli, tiny_model_file):
    status, _, err = cli("--model-file", tiny_model_file, "--alpha", "0.2", "--n-eval", "16")
    assert status == 2 and "run --calibrate first" in err[-1]


# ----------------------------------------------------------------------------------------------------
# Subprocess: end-to-end runs
# ----------------------------------------------------------------------------------------------------
def test_eval_report_on_the_committed_model(run_cli, tmp_path, committed_model_file, data_dir):
    report_path = tmp_path / "r.json"
    attacks = ["natural", "pgd-linf", "bpda-linf", "pgd-l2", "bpda-l2"]
    result = run_cli("--eval", ",".join(attacks), "--n-eval", "16", "--steps", "2", "--restarts", "2",
                     "--report", report_path, "--data-dir", data_dir, threads=2)
    assert result.returncode == 0, result.stderr[-2000:]
    match = re.search(r"^Model natural accuracy \(test\): (\d+\.\d\d)$", result.stdout, re.M)
    assert match, result.stdout
    report = json.loads(report_path.read_text())
    assert {"model_file", "model_sha256", "split", "n", "alpha", "device", "torch", "results"} <= set(report)
    assert report["model_file"] == "models/default_model.pth"
    assert report["model_sha256"] == _sha256(committed_model_file)
    committed_alpha = torch.load(committed_model_file, weights_only=True)["alpha"]
    assert report["split"] == "test" and report["n"] == 16 and report["alpha"] == committed_alpha
    assert report["device"].startswith("cpu (") and report["torch"] == torch.__version__ and report["complete"] is True
    results = report["results"]
    assert list(results) == attacks
    for name in attacks:
        r = results[name]
        assert r["n"] == 16 and r["seconds"] >= 0
        correct = r["accuracy"] * 16 / 100
        assert 0 <= r["accuracy"] <= 100 and correct == pytest.approx(round(correct))
        # which images survived, in split order: the accuracy is its mean, exactly
        assert len(r["per_image"]) == 16 and set(r["per_image"]) <= {"0", "1"}
        assert r["accuracy"] == 100.0 * r["per_image"].count("1") / 16
    # the attacks' images are the clean images each broke or not: none survives that natural got wrong
    for name in attacks[1:]:
        assert all(a <= c for a, c in zip(results[name]["per_image"], results["natural"]["per_image"])), name
    assert float(match.group(1)) == pytest.approx(results["natural"]["accuracy"], abs=0.005)
    assert results["natural"]["accuracy"] >= 60.0
    for name in attacks[1:]:
        r = results[name]
        assert r["steps"] == 2 and r["bpda"] == name.startswith("bpda") and r["restarts"] == 2
        assert r["norm"] == name.split("-")[1]
        assert r["eps"] == pytest.approx(8 / 255 if r["norm"] == "linf" else 0.5)
        assert r["step_size"] == pytest.approx(r["eps"] / 4)
        assert r["accuracy"] <= results["natural"]["accuracy"]
    for name in attacks:
        assert re.search(rf"^{name}\s+\d+\.\d\d %\s+on 16 images", result.stdout, re.M), name


def test_calibrate_a_copy_of_the_committed_model(run_cli, tmp_path, committed_model_file, data_dir):
    copy = tmp_path / "copy.pth"
    shutil.copyfile(committed_model_file, copy)
    original = torch.load(committed_model_file, weights_only=True)
    result = run_cli("--calibrate", "--model-file", copy, "--n-train", "256", "--n-eval", "16", "--steps", "1",
                     "--alpha-grid", "0,0.1,0.2", "--alpha-criterion", "plain", "--data-dir", data_dir, threads=2)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "chosen alpha" in result.stdout and f"saved {copy}" in result.stdout
    payload = torch.load(copy, weights_only=True)
    cal = payload["meta"]["calibration"]
    assert cal["alpha"] in (0.0, 0.1, 0.2)
    assert payload["alpha"] == cal["alpha"]
    assert [row["alpha"] for row in cal["sweep"]] == [0.0, 0.1, 0.2]
    assert cal["n_train"] == 256 and cal["n_val"] == 16 and cal["steps"] == 1 and cal["criterion"] == "plain"
    assert cal["alpha"] == M.choose_alpha(cal["sweep"], "plain")
    assert "rewards gradient masking" in result.stdout
    assert payload["meta"]["training"] == original["meta"]["training"]        # kept
    assert payload["meta"]["evaluation"]["alpha"] == cal["alpha"]
    assert payload["meta"]["evaluation"]["n"] == 16
    # new statistics (256 images, not the full training split), same weights
    state, old = payload["state_dict"], original["state_dict"]
    assert not torch.equal(state["block1.layer.0.sparse1.mean"], old["block1.layer.0.sparse1.mean"])
    assert torch.equal(state["conv1.weight"], old["conv1.weight"])
    loaded = M.load_model(str(copy))
    assert M.get_alpha(loaded) == cal["alpha"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.pth", "copy.pth.prev"]
    assert (tmp_path / "copy.pth.prev").read_bytes() == committed_model_file.read_bytes()   # nothing lost


TRAIN_ARGS = ["--force-train", "-e", "2", "--arch", "10-1", "--n-train", "256", "--batch-size", "128",
              "--train-steps", "1", "--device", "cpu", "--n-eval", "16", "--n-val", "64"]


@pytest.fixture(scope="module")
def cli_trained(run_cli, tmp_path_factory, data_dir):
    """One uninterrupted CLI training run: (folder, model file, report file, CompletedProcess)."""
    folder = tmp_path_factory.mktemp("cli_train")
    model_file, report = folder / "tiny.pth", folder / "r.json"
    result = run_cli(*TRAIN_ARGS, "--model-file", model_file, "--report", report, "--data-dir", data_dir)
    return folder, model_file, report, result


def test_force_train_tiny_model_writes_file_and_removes_checkpoint(cli_trained):
    folder, model_file, report, result = cli_trained
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"^epoch 1/2: loss \d+\.\d+", result.stdout, re.M)
    assert re.search(r"^epoch 2/2: loss \d+\.\d+.*val clean", result.stdout, re.M)
    assert f"saved {model_file}" in result.stdout
    assert sorted(p.name for p in folder.iterdir()) == ["r.json", "tiny.pth"]      # .ckpt removed
    payload = torch.load(model_file, weights_only=True)
    assert payload["arch"]["depth"] == 10 and payload["arch"]["widen_factor"] == 1
    training = payload["meta"]["training"]
    assert training["epochs"] == 2 and training["train_images"] == 256 and training["world_size"] == 1
    assert training["config"]["arch"] == "10-1" and training["config"]["batch_size"] == 128
    assert training["config"]["n_val"] == 64
    assert len(training["history"]) == 2 and all(math.isfinite(r["loss"]) for r in training["history"])
    assert payload["meta"]["evaluation"]["n"] == 16
    rep = json.loads(report.read_text())
    assert rep["model_sha256"] == _sha256(model_file)          # the report names the file as finally written
    assert rep["results"]["natural"]["accuracy"] == payload["meta"]["evaluation"]["results"]["natural"]["accuracy"]
    assert len(rep["results"]["natural"]["per_image"]) == 16         # in the report, not in the model file
    assert "per_image" not in payload["meta"]["evaluation"]["results"]["natural"]


def test_sigterm_keeps_the_checkpoint_and_resume_finishes_the_run(tmp_path, data_dir, repo_root):
    """The CLI's side of an interruption; that a resumed run equals an uninterrupted one bit for bit is
    test_training's in-process test."""
    model_file = tmp_path / "tiny.pth"
    ckpt = tmp_path / "tiny.pth.ckpt"
    argv = [sys.executable, str(repo_root / "model.py"), *TRAIN_ARGS, "--model-file", str(model_file),
            "--data-dir", str(data_dir)]
    proc = subprocess.Popen(argv, cwd=repo_root, env=subprocess_env(data_dir), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ckpt.exists(), "no checkpoint after the first epoch"
    proc.send_signal(signal.SIGTERM)            # during epoch 2 or its validation (several seconds)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-2000:]
    assert f"interrupted; training keeps its last finished epoch in {ckpt}" in err
    assert not model_file.exists() and ckpt.exists()
    assert not (tmp_path / "tiny.pth.lock").exists()           # the lock goes with the run
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1

    resumed = subprocess.run(argv + ["--resume"], cwd=repo_root, env=subprocess_env(data_dir),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming {ckpt} after epoch 1 of 2" in resumed.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.pth"]
    assert [r["epoch"] for r in torch.load(model_file, weights_only=True)["meta"]["training"]["history"]] == [1, 2]


def test_failed_training_leaves_the_model_file_untouched(run_cli, tmp_path, tiny_model_file, data_dir):
    model_file = tmp_path / "m.pth"
    shutil.copyfile(tiny_model_file, model_file)
    before = model_file.read_bytes()
    result = run_cli("--force-train", "-e", "1", "--arch", "10-1", "--n-train", "512", "--batch-size", "128",
                     "--train-steps", "1", "--lr", "1e30", "--device", "cpu", "--model-file", model_file,
                     "--n-eval", "16", "--data-dir", data_dir)
    assert result.returncode == 1
    last = _stderr_lines(result)[-1]
    assert last.startswith("error: loss became nan") or last.startswith("error: loss became inf"), result.stderr
    assert model_file.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pth"]


def test_sanity_on_an_undefended_tiny_model_passes_every_check(run_cli, tmp_path, tiny_model_file, data_dir):
    # a model with no defence and a working attack: no check fires, exit 0 (bpda runs only with MeanSparse on)
    report = tmp_path / "r.json"
    result = run_cli("--model-file", tiny_model_file, "--sanity", "--split", "val", "--n-eval", "32",
                     "--steps", "4", "--surrogate", tiny_model_file, "--square-queries", "50", "--report", report,
                     "--data-dir", data_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FIRED" not in result.stdout
    every = [name for name in M.CHECKS if name != "bpda"]
    assert re.search(rf"^checks passed: {', '.join(every)}$", result.stdout, re.M), result.stdout
    checks = json.loads(report.read_text())["checks"]
    assert checks["fired"] == {} and checks["passed"] == every


def test_autoattack_l2_report_on_a_tiny_model(run_cli, tmp_path, tiny_model_file, data_dir):
    """The report's AutoAttack fields; eps 2 breaks every image in APGD-CE, so the slow attacks that follow
    have nothing left to do (test_attacks measures AutoAttack's strength)."""
    report_path = tmp_path / "aa.json"
    result = run_cli("--model-file", tiny_model_file, "--eval", "natural,aa-l2", "--eps-l2", "2", "--split", "val",
                     "--n-eval", "16", "--report", report_path, "--data-dir", data_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    aa = json.loads(report_path.read_text())["results"]["aa-l2"]
    assert aa["n"] == 16 and aa["norm"] == "l2" and aa["eps"] == pytest.approx(2.0)
    assert aa["version"] == "standard" and aa["bpda"] is True and aa["pyautoattack"]
    natural = json.loads(report_path.read_text())["results"]["natural"]["accuracy"]
    assert natural > 0 and aa["accuracy"] == 0.0
    assert any(line.startswith("robust accuracy after APGD-CE: 0.00%") for line in aa["log"])
    for line in aa["log"]:                                       # shown while it ran
        assert f"  autoattack: {line}" in result.stdout
    assert re.search(r"^aa-l2\s+0\.00 %\s+on 16 images", result.stdout, re.M)


def test_adaptive_calibration_apgd_evaluation_and_plot_on_a_tiny_model(run_cli, tmp_path, tiny_model_file, data_dir):
    """The default criterion through the CLI, the apgd-linf row with its components, and --plot for real
    (matplotlib is a requirement): the figure holds the alpha sweep and the eps curves."""
    model_file, report_path, plot = tmp_path / "m.pth", tmp_path / "r.json", tmp_path / "p.png"
    shutil.copyfile(tiny_model_file, model_file)
    result = run_cli("--calibrate", "--model-file", model_file, "--n-train", "128", "--split", "val",
                     "--n-eval", "16", "--steps", "1", "--alpha-grid", "0,0.2", "--apgd-iters", "2",
                     "--eps-linf", "2/255", "--eval", "natural,apgd-linf", "--report", report_path,
                     "--plot", plot, "--data-dir", data_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    payload = torch.load(model_file, weights_only=True)
    cal = payload["meta"]["calibration"]
    assert cal["criterion"] == "adaptive" and cal["apgd_iters"] == 2
    assert [set(row) >= {"clean", "plain", "bpda", "adaptive", "gain", "gain_se"} for row in cal["sweep"]] == [True] * 2
    assert cal["alpha"] == M.choose_alpha(cal["sweep"])
    report = json.loads(report_path.read_text())
    assert report["calibration"] == cal
    apgd = report["results"]["apgd-linf"]
    assert apgd["iters"] == 2 and apgd["eps"] == pytest.approx(2 / 255)
    expected = ["apgd-ce", "apgd-ce-transfer", "apgd-t"] if cal["alpha"] > 0 else ["apgd-ce", "apgd-t"]
    assert list(apgd["components"]) == expected
    assert apgd["accuracy"] <= min(apgd["components"]["apgd-ce"]["accuracy"], apgd["clean"])
    worst, clean = apgd["per_image"], report["results"]["natural"]["per_image"]
    assert apgd["accuracy"] == 100.0 * worst.count("1") / 16 and all(w <= c for w, c in zip(worst, clean))
    assert re.search(r"^apgd-linf\s+\d+\.\d\d %\s+on 16 images.*\(worst case\)$", result.stdout, re.M)
    assert "curves" in report and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {plot}" in result.stdout


def test_reuse_statistics_chooses_alpha_again_without_training_data(run_cli, tmp_path, committed_model_file, data_dir):
    copy = tmp_path / "copy.pth"
    shutil.copyfile(committed_model_file, copy)
    original = torch.load(committed_model_file, weights_only=True)
    result = run_cli("--calibrate", "--reuse-statistics", "--model-file", copy, "--n-eval", "8", "--steps", "1",
                     "--alpha-grid", "0,0.35", "--alpha-criterion", "bpda", "--split", "val", "--data-dir", data_dir,
                     threads=2)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "the file statistics on 48976 training images" in result.stdout
    payload = torch.load(copy, weights_only=True)
    for name, value in original["state_dict"].items():
        if not name.endswith("alpha"):
            assert torch.equal(payload["state_dict"][name], value), name       # statistics and weights kept
    cal = payload["meta"]["calibration"]
    assert cal["n_train"] == 48976 and cal["n_val"] == 8 and [r["alpha"] for r in cal["sweep"]] == [0.0, 0.35]
