"""Every input a user can get wrong, through the command line as a user runs it: one line on stderr
naming the file (or option) and the problem, a non-zero exit code, no traceback, nothing written.

The cases are benchmarks/bench_bad_input.py's, which also prints them as docs/reliability.md's table.
"""

from pathlib import Path

import pytest

from benchmarks.bench_bad_input import CASES, Case, Outcome, problems, run_case


@pytest.mark.parametrize("case", CASES, ids=[case.input for case in CASES])
def test_bad_input_is_answered_in_one_line_and_nothing_is_written(case, tmp_path):
    _, outcome = run_case(case, tmp_path)
    assert problems(case, tmp_path, outcome) == [], outcome.stderr


@pytest.mark.parametrize("outcome, broken", [
    (Outcome(0, "unet3d train: error: labels.tif: bad\n", 0.0, []), "exit code 0"),
    (Outcome(1, "usage: unet3d train\nunet3d train: error: labels.tif: bad\n", 0.0, []), "2 lines on stderr"),
    (Outcome(2, "unet3d train: error: image.tif: bad\n", 0.0, []), "does not name labels.tif"),
    (Outcome(2, "unet3d train: error: labels.tif: fine\n", 0.0, []), "does not say /bad/"),
    (Outcome(2, "unet3d train: error: labels.tif: bad\n", 0.0, ["out.safetensors"]), "wrote out.safetensors"),
])
def test_each_broken_rule_is_caught(outcome, broken):
    """The checker itself: an answer breaking one rule is reported for exactly that rule."""
    case = Case("example", lambda folder: [], "labels.tif", "bad")
    assert problems(case, Path("."), outcome) == [broken]
