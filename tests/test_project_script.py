"""test_project.py: the grading platform's loader, on the real project and on broken copies of it."""
import re
import shutil

import pytest
import torch

# A project whose model.py is the real one with Net.load_for_testing (or forward) changed after the real
# method: the broken projects a student might hand in, made without editing the real source.
WRAPPER = """import importlib.util
import torch
_spec = importlib.util.spec_from_file_location("real_model", {real!r})
real = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(real)


class Net(real.Net):
    def load_for_testing(self, project_dir="./"):
        super().load_for_testing(project_dir)
{after}
        return self
{extra}"""


def _fake_project(root, repo_root, *, after="", extra="", weights=True):
    """A project in `root` whose Net runs `after` at the end of load_for_testing (and has `extra` methods)
    and, when `weights`, a copy of the committed weights."""
    root.mkdir()
    (root / "model.py").write_text(WRAPPER.format(real=str(repo_root / "model.py"), after=after or "        pass",
                                                  extra=extra))
    if weights:
        (root / "models").mkdir()
        shutil.copyfile(repo_root / "models" / "default_model.pth", root / "models" / "default_model.pth")
    return root


@pytest.fixture(scope="module")
def run_checker(repo_root, data_dir, run_python):
    def run(project_dir, cwd, data=data_dir, threads=1):
        return run_python([repo_root / "test_project.py", project_dir, "--data-dir", data], cwd=cwd, threads=threads)
    return run


def test_real_project_passes_with_the_expected_accuracy(run_checker, repo_root, tmp_path, committed_model_file):
    result = run_checker(repo_root, tmp_path, threads=2)          # a WRN-28-4: both cores help
    assert result.returncode == 0, result.stderr[-2000:]
    match = re.search(r"^Model nat accuracy \(test\): (\d+\.\d\d)$", result.stdout, re.M)
    assert match, result.stdout
    assert list(tmp_path.iterdir()) == []                          # it writes nothing where it runs
    # the figure model.py measured on the same 1,024 validation images when it calibrated the file (alpha 0),
    # on another machine: within one image, since the closest image lies 0.004 logits from the decision boundary
    calibration = torch.load(committed_model_file, weights_only=True)["meta"]["calibration"]
    clean = next(row["clean"] for row in calibration["sweep"] if row["alpha"] == 0)
    assert calibration["n_val"] == 1024 and round(clean, 2) == 84.96
    assert abs(float(match.group(1)) - clean) <= 100 / 1024 + 1e-9, match.group(1)


def test_project_without_model_py_fails(run_checker, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_checker(empty, tmp_path)
    assert result.returncode == 1
    assert "FAILED: no model.py in" in result.stderr and str(empty) in result.stderr
    assert "Model nat accuracy" not in result.stdout


def test_project_without_weights_fails(run_checker, repo_root, tmp_path):
    project = _fake_project(tmp_path / "noweights", repo_root, weights=False)
    result = run_checker(project, tmp_path)
    assert result.returncode == 1
    assert "FAILED: no weights at" in result.stderr and "default_model.pth" in result.stderr
    assert "Model nat accuracy" not in result.stdout


def test_load_for_testing_without_eval_fails(run_checker, repo_root, tmp_path):
    project = _fake_project(tmp_path / "noeval", repo_root, after="        self.train()")
    result = run_checker(project, tmp_path)
    assert result.returncode == 1
    assert "FAILED: load_for_testing left the model in train mode" in result.stderr
    assert "Model nat accuracy" not in result.stdout


def test_weights_that_differ_from_the_file_fail(run_checker, repo_root, tmp_path):
    project = _fake_project(tmp_path / "noisy", repo_root, after="        with torch.no_grad():\n"
                                                                 "            self.fc.weight.add_(1e-3)")
    result = run_checker(project, tmp_path)
    assert result.returncode == 1
    assert "FAILED: loaded weights differ from" in result.stderr and "at fc.weight" in result.stderr
    assert "Model nat accuracy" not in result.stdout


def test_fake_project_copy_itself_passes_the_checks_before_evaluation(run_checker, repo_root, tmp_path):
    """Control for the failure cases above: the wrapper that changes nothing gets past every check (a broken
    data folder then stops it, so the 1,024-image evaluation is not paid twice)."""
    project = _fake_project(tmp_path / "control", repo_root)
    empty_data = tmp_path / "nodata"
    (empty_data / "cifar-10-batches-py").mkdir(parents=True)
    result = run_checker(project, tmp_path, data=empty_data)
    assert result.returncode == 1
    assert "FAILED: " in result.stderr and "data_batch_1: not a readable CIFAR-10 batch" in result.stderr, result.stderr


def test_weights_that_differ_below_float16_resolution_fail(run_checker, repo_root, tmp_path):
    """BUG (test_project.py check_weights): the loaded float32 weights are cast *down* to the file's float16
    before comparing, so any difference smaller than float16's rounding (here every weight scaled by
    1 + 1e-5) passes as "exactly the weights of the committed file". An empty data folder stops the run
    right after the checks, so the 1,024-image evaluation is not paid."""
    project = _fake_project(tmp_path / "tiny_noise", repo_root, after="        with torch.no_grad():\n"
                                                                      "            for p in self.parameters():\n"
                                                                      "                p.mul_(1 + 1e-5)")
    empty_data = tmp_path / "nodata"
    (empty_data / "cifar-10-batches-py").mkdir(parents=True)
    result = run_checker(project, tmp_path, data=empty_data)
    assert result.returncode == 1
    assert "FAILED: loaded weights differ from" in result.stderr, (
        "test_project.py accepted weights that differ from the file (every parameter scaled by 1 + 1e-5); "
        f"it stopped only at the data: {result.stderr.strip()[-300:]}")


def test_a_gradient_in_another_layout_than_the_input_fails(run_checker, repo_root, tmp_path):
    """A channels_last model whose forward does not hand the input gradient back in the input's layout: a
    grader's L2 step (grad.view(n, -1)) would crash on it, and test_project.py says so before the grader does."""
    project = _fake_project(tmp_path / "layout", repo_root, extra="""
    def forward(self, x):
        return self.logits((x - self.input_mean) / self.input_std)
""")
    result = run_checker(project, tmp_path)
    assert result.returncode == 1
    assert "FAILED: the input gradient has strides (3072, 1, 96, 3), not those of the NCHW input" in result.stderr


@pytest.mark.parametrize("value, message", [("-5", "must be > 0, got -5"), ("0", "must be > 0, got 0"),
                                            ("x", "not an integer: 'x'")])
def test_bad_batch_size_is_one_line_naming_the_flag(run_python, repo_root, tmp_path, value, message):
    result = run_python([repo_root / "test_project.py", repo_root, "--batch-size", value], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"test_project.py: error: argument --batch-size: {message} "
                                                  f"(see --help)"]
    assert result.stdout == ""


def test_truncated_data_is_one_line_naming_the_file(run_checker, repo_root, data_dir, tmp_path):
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "data_batch_1").write_bytes((data_dir / "cifar-10-batches-py" / "data_batch_1").read_bytes()[:5000])
    result = run_checker(repo_root, tmp_path, data=tmp_path / "data")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"FAILED: {folder / 'data_batch_1'}: not a readable CIFAR-10 batch")
