"""--project: grading platform-shaped projects made in temporary folders, with the attack-failure checks.

The projects are copies of this repository's model.py that build a WRN-10-1 (the tiny test model in
models/default_model.pth), each with one flaw appended as a subclass of its Net, and two that never load.
"""
import json
import math
import re
import shutil

import pytest
import torch
import torch.nn as nn

import model as M

FLAWS = {
    "plain": "",
    "quantised": '''
class Net(Net):     # input quantisation: a gradient of zero almost everywhere
    def forward(self, x):
        return super().forward(torch.round(x * 8) / 8)
''',
    "probabilities": '''
class Net(Net):
    def forward(self, x):
        return torch.softmax(super().forward(x), 1)
''',
    "randomised": '''
class Net(Net):
    def forward(self, x):
        return super().forward((x + 0.05 * torch.randn_like(x)).clamp(0, 1))
''',
    "train-mode": '''
class Net(Net):
    def load_for_testing(self, project_dir="./"):
        return super().load_for_testing(project_dir).train()
''',
}


@pytest.fixture(scope="module")
def stats_model_file(tiny_trained_state, train_set, val_set, tmp_path_factory):
    """The tiny trained WRN-10-1 with MeanSparse statistics, so that an alpha > 0 changes its outputs."""
    net = M.WideResNet(10, 1)
    net.load_state_dict(tiny_trained_state)
    stats = M.Batches(train_set[0][:256], train_set[1][:256], 128, device="cpu")
    val = M.Batches(val_set[0][:16], val_set[1][:16], 16, device="cpu")
    _, sweep = M.calibrate(net, stats, val, [0.3], M.AttackOptions(steps=1).at("linf", 1 / 255),
                               criterion="bpda", log=lambda line: None)
    M.set_alpha(net, 0.0)           # the projects run at alpha 0 unless a test asks for more
    path = tmp_path_factory.mktemp("stats") / "tiny.pth"
    net.save(str(path), {"note": "tiny test model with statistics", "calibration": {"alpha": 0.0, "sweep": sweep}})
    return path


@pytest.fixture(scope="module")
def projects(repo_root, stats_model_file, tmp_path_factory):
    """{name: folder} of the projects of FLAWS, and of "broken" (its import raises) and "hangs"."""
    root, folders = tmp_path_factory.mktemp("projects"), {}
    source = (repo_root / "model.py").read_text()
    tiny = source.replace('DEFAULT_ARCH = "28-4"', 'DEFAULT_ARCH = "10-1"')
    assert tiny != source, "premise: model.py names its architecture in DEFAULT_ARCH"
    for name, flaw in FLAWS.items():
        folder = folders[name] = root / name
        (folder / "models").mkdir(parents=True)
        (folder / "model.py").write_text(tiny + flaw)
        shutil.copyfile(stats_model_file, folder / "models" / "default_model.pth")
    for name, code in (("broken", "raise RuntimeError('broken on purpose')\n"), ("hangs", "import time\ntime.sleep(600)\n")):
        folders[name] = root / name
        folders[name].mkdir()
        (folders[name] / "model.py").write_text(code)
    return folders


def _per_image(report):
    return {name: row["per_image"] for name, row in json.loads(report.read_text())["results"].items()}


def test_one_command_grades_several_projects_and_each_flaw_trips_its_check(run_cli, projects, tmp_path,
                                                                           tiny_model_file):
    names = ["plain", "quantised", "probabilities", "randomised", "train-mode", "broken"]
    report, figure = tmp_path / "r.json", tmp_path / "cmp.png"
    argv = [arg for name in names for arg in ("--project", projects[name])]
    result = run_cli(*argv, "--eval", "natural,pgd-linf", "--split", "val", "--n-eval", "32", "--steps", "4",
                     "--sanity", "--surrogate", tiny_model_file, "--square-queries", "50", "--report", report,
                     "--plot", figure, timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]        # one project failed, and checks fired
    saved = json.loads(report.read_text())
    parts = {name: saved["projects"][str(projects[name])] for name in names}
    fired = {name: set(part.get("checks", {}).get("fired", {})) for name, part in parts.items()}
    assert fired["plain"] == set(), parts["plain"]["checks"]    # no defence: no false alarm
    assert "zero-gradients" in fired["quantised"] and "gradient-free" in fired["quantised"]
    assert "probabilities" in fired["probabilities"]
    assert "randomized" in fired["randomised"]
    assert "train-mode" in fired["train-mode"]
    assert parts["broken"] == {"error": "RuntimeError: broken on purpose"}
    for name in names[:-1]:         # the failure left every other project's rows whole
        part = parts[name]
        assert "error" not in part and part["complete"] is True and part["precision"] == "float32"
        assert [len(part["results"][row]["per_image"]) for row in ("natural", "pgd-linf")] == [32, 32]
    line = re.search(r"^check zero-gradients FIRED: (\d+) of 16 images; remedy: .*--eval square-linf", result.stdout,
                     re.M)
    assert line and int(line.group(1)) > 0, result.stdout
    assert re.search(rf"^{re.escape(str(projects['broken']))}\s+-\s+-\s+-  error: RuntimeError: broken on purpose$",
                     result.stdout, re.M), result.stdout
    table = saved["table"]
    assert list(table) == [str(projects[n]) for n in names] and table[str(projects["plain"])]["checks_fired"] == []
    assert "diff" in table[str(projects["quantised"])]["rows"]["natural"]      # paired with the first project
    assert figure.read_bytes().startswith(b"\x89PNG")


def test_a_project_that_hangs_is_stopped_and_one_that_fails_to_import_says_why(run_cli, projects, tmp_path):
    result = run_cli("--project", projects["hangs"], "--project", projects["broken"], "--eval", "natural",
                     "--n-eval", "8", "--project-timeout", "10", timeout=120)
    assert result.returncode == 1
    assert f"{projects['hangs']}: error: still running after --project-timeout 10 s: stopped" in result.stdout
    assert f"{projects['broken']}: error: RuntimeError: broken on purpose" in result.stdout


@pytest.mark.parametrize("alpha", ["0", "0.3"])
def test_a_project_made_with_this_tool_equals_its_model_file_image_for_image(run_cli, projects, stats_model_file,
                                                                            tmp_path, alpha):
    # its MeanSparse gets BPDA as a --model-file's does, so every row, the adaptive one included, agrees
    common = ["--eval", "natural,pgd-linf,apgd-linf", "--split", "val", "--n-eval", "16", "--steps", "2",
              "--apgd-iters", "3", "--eps-linf", "1/255", "--alpha", alpha]
    by_file, by_project = tmp_path / "file.json", tmp_path / "project.json"
    result = run_cli("--model-file", stats_model_file, *common, "--report", by_file)
    assert result.returncode == 0, result.stderr[-2000:]
    result = run_cli("--project", projects["plain"], *common, "--report", by_project)
    assert result.returncode == 0, result.stderr[-2000:]
    part = json.loads(by_project.read_text())["projects"][str(projects["plain"])]
    expected = _per_image(by_file)
    assert {name: row["per_image"] for name, row in part["results"].items()} == expected
    assert len(set(expected.values())) > 1, "premise: 1/255 leaves the rows different, so that they say something"
    assert part["alpha"] == float(alpha) and part["precision"] == "float32"
    # the same command again continues the comparison: every row kept, nothing measured anew
    again = run_cli("--project", projects["plain"], *common, "--report", by_project)
    assert again.returncode == 0 and "natural: kept from the earlier report" in again.stdout
    assert "apgd-linf: kept from the earlier report" in again.stdout


def test_this_repository_as_a_project_equals_the_committed_model_file(run_cli, repo_root, committed_model_file,
                                                                      tmp_path):
    common = ["--eval", "natural,pgd-linf", "--split", "val", "--n-eval", "8", "--steps", "2"]
    by_file, by_project = tmp_path / "file.json", tmp_path / "project.json"
    assert run_cli("--model-file", committed_model_file, *common, "--report", by_file, threads=2).returncode == 0
    result = run_cli("--project", repo_root, *common, "--report", by_project, threads=2)
    assert result.returncode == 0, result.stderr[-2000:]
    part = next(iter(json.loads(by_project.read_text())["projects"].values()))
    assert {name: row["per_image"] for name, row in part["results"].items()} == _per_image(by_file)
    assert "FIRED" not in result.stdout


@pytest.mark.parametrize("argv, message", [
    (["--model-file", "m.pth"], "--project evaluates a project as it is: drop --model-file"),
    (["--calibrate"], "--project evaluates a project as it is: drop --calibrate"),
    (["--project", "no-such-folder"], "--project no-such-folder: no such folder"),
])
def test_project_flags_that_cannot_work_exit_2_with_one_line(cli, projects, argv, message):
    status, out, err = cli("--project", projects["plain"], *argv)
    assert status == 2 and err == [f"error: {message}"]


def test_the_same_folder_twice_is_refused(cli, projects):
    status, out, err = cli("--project", projects["plain"], "--project", projects["plain"])
    assert status == 2 and err == [f"error: --project {projects['plain']} is given twice"]


# ----------------------------------------------------------------------------------------------------
# The checks that attack, each tripped by a model built to have its flaw
# ----------------------------------------------------------------------------------------------------
EPS, GREY = M.NORMS["linf"].eps, 128                 # Batches hold uint8 images: 128 is 128/255


class Band(nn.Module):
    """A model that is wrong exactly where an image's pixel sum, moved from the grey image's, lies in
    [lo, hi] (in units of eps, summed over pixels), and whose input gradient is `slope` per pixel whatever
    its output (slope -1: it leads away from the wrong band). PGD-k at radius r from its random start moves
    the grey image's sum by about -0.23 r, -0.44 r and -0.75 r per pixel after 1, 2 and 4 steps (towards
    the band for slope 1), with a spread of under 0.6 r per pixel: across 3,072 pixels the sum lands within
    a few tens of eps of its mean, far from every band edge below."""

    def __init__(self, lo, hi, slope=1.0):
        super().__init__()
        self.lo, self.hi, self.slope = lo, hi, slope

    def forward(self, x):
        d = (x.flatten(1).sum(1) - GREY / 255 * x[0].numel()) / EPS
        first = torch.where((d >= self.lo) & (d <= self.hi), -10.0, 10.0) + self.slope * (d - d.detach())
        return nn.functional.pad(first[:, None], (0, 9))        # ten logits, the label's the first


def _attack_checks(model, surrogate=None):
    x, y = torch.full((16, 3, 32, 32), GREY, dtype=torch.uint8), torch.zeros(16, dtype=torch.long)
    seen, figures = M.attack_checks(model, M.Batches(x, y, 16, device="cpu"), M.AttackOptions(steps=2, queries=5),
                                    surrogate or model)
    return {name for name, saw in seen.items() if saw}, figures


def test_the_convergence_check_fires_where_twice_the_steps_break_what_pgd_left():
    fired, figures = _attack_checks(Band(-math.inf, -1800))      # PGD-2 reaches about -1344, PGD-4 -2304
    assert (figures["accuracy"][2], figures["pgd4"]) == (100.0, 0.0), f"premise: {figures}"
    assert fired == {"convergence"}


def test_the_monotone_check_fires_where_a_larger_eps_leaves_more_images_correct():
    fired, figures = _attack_checks(Band(-2000, -1000))          # eps/2, eps, 2 eps: about -672, -1344, -2688
    assert figures["accuracy"] == [100.0, 100.0, 0.0, 100.0, 100.0], f"premise: {figures}"
    assert fired == {"monotone", "unbounded"}


def test_the_transfer_check_fires_where_the_model_s_own_gradient_leads_away():
    fired, figures = _attack_checks(Band(-math.inf, -1000, slope=-1.0), surrogate=Band(-math.inf, -1000))
    assert (figures["accuracy"][2], figures["transfer"]) == (100.0, 0.0), f"premise: {figures}"
    assert {"transfer", "unbounded"} <= fired and not fired & {"convergence", "monotone"}


# ----------------------------------------------------------------------------------------------------
# The pieces: EOT, true float32
# ----------------------------------------------------------------------------------------------------
class Noisy(nn.Module):
    """A linear model whose input gradient is w + v on even passes and w - v on odd ones: |v| > |w| in
    every pixel, so one pass's gradient sign is v's, and only the mean of an even number of passes points
    along w. v sums to zero, so on a uniform image both passes give the same logits and the same loss
    weight, and the mean is exactly w. Counts its forward passes."""

    def __init__(self):
        super().__init__()
        self.w, self.calls = torch.randn(3 * 4 * 4), 0
        self.v = 3 * self.w.abs().max() * torch.tensor([1.0, -1.0]).repeat(24)

    def forward(self, x):
        direction = self.w + self.v * (1 - 2 * (self.calls % 2))
        self.calls += 1
        logit = (x.flatten(1) @ direction).unsqueeze(1)
        return torch.cat([logit, -logit], 1)


def test_eot_averages_each_step_over_that_many_passes():
    x, y = torch.full((4, 3, 4, 4), 0.5), torch.zeros(4, dtype=torch.long)
    model = Noisy()
    M.pgd(model, x, y, norm="linf", eps=0.1, step_size=0.1, steps=3, random_start=False, eot=4)
    assert model.calls == 12
    # one step away from class 0: along the sign of the mean gradient, w, with EOT; along v's without
    for eot, direction in ((4, lambda m: m.w), (1, lambda m: m.w + m.v)):
        model = Noisy()
        x_adv = M.pgd(model, x, y, norm="linf", eps=0.1, step_size=0.1, steps=1, random_start=False, eot=eot)
        assert torch.allclose((x_adv - x).flatten(1), -0.1 * direction(model).sign().expand(4, -1)), eot
    assert not torch.equal(model.w.sign(), (model.w + model.v).sign()), "premise: v turns some signs"


def test_evaluation_runs_in_true_float32_and_leaves_the_flags_as_found(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert M.precision("cuda") == "tf32" and M.precision("cpu") == "float32"
    with M.true_float32():
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert M.precision("cuda") == "float32"
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    with pytest.raises(KeyboardInterrupt), M.true_float32():
        raise KeyboardInterrupt
    assert torch.backends.cudnn.allow_tf32
