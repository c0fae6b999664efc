"""bench/compare.py: two reports compared image by image (the GPU results of the adaptive evaluation and
of the new recipe are judged with it)."""
import json
import subprocess
import sys

import pytest


def _report(path, rows, split="test"):
    path.write_text(json.dumps({"split": split, "alpha": 0.0, "model_sha256": "ab" * 32, "results": rows}))
    return str(path)


def _row(per_image):
    return {"accuracy": 100.0 * per_image.count("1") / len(per_image), "n": len(per_image), "per_image": per_image}


@pytest.fixture
def compare(repo_root):
    def run(*args):
        result = subprocess.run([sys.executable, str(repo_root / "bench" / "compare.py"), *map(str, args)],
                                capture_output=True, text=True, timeout=60)
        return result.returncode, result.stdout, result.stderr
    return run


def test_paired_difference_and_its_standard_error(compare, tmp_path):
    # A and B agree on 6 images; A alone is right on two, B alone on one
    a = _report(tmp_path / "a.json", {"apgd-linf": _row("1111001100")})
    b = _report(tmp_path / "b.json", {"apgd-linf": _row("1101101000")})
    status, out, err = compare(a, b)
    assert status == 0, err
    # d = +1 twice, -1 once over 10 images: mean 0.1, sample sd sqrt((3 - 10 * 0.01) / 9)
    se = 100 * ((3 - 0.1) / 9) ** 0.5 / 10 ** 0.5
    assert (f"A:apgd-linf vs B:apgd-linf: 60.00 % against 50.00 % on the same 10 images: +10.00 +- {se:.2f} "
            f"points (paired standard error); correct only in A: 2, only in B: 1") in out
    status, out, _ = compare(a + ":apgd-linf", b + ":apgd-linf", "--first", 4)     # 1111 against 1101
    assert status == 0 and "75.00 % on the same 4 images: +25.00" in out


def test_a_report_without_per_image_records_is_compared_unpaired(compare, tmp_path):
    a = _report(tmp_path / "a.json", {"apgd-linf": _row("1" * 460 + "0" * 540 + "1" * 1000)})
    old = _report(tmp_path / "old.json", {"aa-linf": {"accuracy": 46.2, "n": 1000}})
    status, out, err = compare(a + ":apgd-linf", old + ":aa-linf", "--first", 1000)
    assert status == 0, err
    assert "46.00 % (n=1000) against 46.20 % (n=1000): -0.20 points (not paired" in out
    assert "more than 0.3 points" not in out
    old = _report(tmp_path / "old.json", {"aa-linf": {"accuracy": 46.5, "n": 1000}})
    assert "<- more than 0.3 points apart" in compare(a + ":apgd-linf", old + ":aa-linf", "--first", 1000)[1]


@pytest.mark.parametrize("setup, message", [
    (lambda t: (_report(t / "a.json", {"x": _row("1")}), _report(t / "b.json", {"x": _row("1")}, "val")),
     "on the test split"),
    (lambda t: (_report(t / "a.json", {"x": _row("1")}) + ":y", _report(t / "b.json", {"x": _row("1")}) + ":x"),
     "has no row 'y'; it has x"),
    (lambda t: (_report(t / "a.json", {"x": _row("1")}), _report(t / "b.json", {"y": _row("1")})),
     "no row in common"),
    (lambda t: (str(t / "missing.json"), _report(t / "b.json", {"y": _row("1")})), "cannot read a report"),
    (lambda t: (_report(t / "a.json", {"x": {**_row("10"), "per_image": [True, False]}}),
                _report(t / "b.json", {"x": _row("10")})), "row 'x' has a per_image that is not a string of 0s and 1s"),
    (lambda t: (_report(t / "a.json", {"x": {**_row("10"), "per_image": "1x"}}),
                _report(t / "b.json", {"x": _row("10")})), "not a string of 0s and 1s"),
    (lambda t: (_report(t / "a.json", {"x": {"n": 10}}), _report(t / "b.json", {"x": _row("10")})),
     "has neither a per-image record nor an accuracy"),
    (lambda t: (_report(t / "a.json", {"x": "46.0"}), _report(t / "b.json", {"x": _row("10")})),
     "has neither a per-image record nor an accuracy"),
])
def test_bad_input_is_one_line_and_exit_2(compare, tmp_path, setup, message):
    status, out, err = compare(*setup(tmp_path))
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1, err
