import argparse
import json

import numpy as np
import pytest
import tifffile

from conftest import EXAMPLE
from unet3d.data.sparse import (
    grid_fraction,
    labeled_fraction,
    positions_for,
    random_positions,
    slice_positions,
    slices_for_fraction,
    sparsify,
)
from unet3d.errors import UserError

PAPER_SLICES = [(1, 1, 1), (1, 2, 2), (2, 3, 3), (3, 4, 4)]  # the paper's (x, y, z) counts in Z, Y, X order


@pytest.mark.parametrize(
    "n, k, expected",
    [(64, 3, [16, 32, 48]), (31, 2, [10, 21]), (31, 1, [16]), (61, 1, [31]), (57, 1, [29]), (10, 0, []), (5, 4, [1, 2, 3, 4])],
)
def test_slice_positions_follow_the_rule_with_halves_rounded_up(n, k, expected):
    assert slice_positions(n, k) == expected


def test_slice_positions_are_distinct_and_inside_for_every_k_below_n():
    for n in range(1, 60):
        for k in range(n):
            positions = slice_positions(n, k)
            assert len(set(positions)) == k and all(0 <= p < n for p in positions)


def test_too_many_slices_are_refused():
    with pytest.raises(ValueError, match=r"cannot spread 3 slices evenly along an axis of 3 voxels \(0 to 2 possible\)"):
        slice_positions(3, 3)
    with pytest.raises(ValueError, match="not distinct positions in 0..30"):
        sparsify(np.zeros((31, 4, 4), dtype=np.uint8), ignore_label=1, positions=[[3, 3], [], []])


def test_sparsify_keeps_exactly_the_chosen_slices(nuclei):
    _, truth = nuclei
    sparse = sparsify(truth, (1, 2, 1), ignore_label=255)
    assert sparse.dtype == np.uint8 and sparse.shape == truth.shape
    kept = np.zeros(truth.shape, dtype=bool)
    kept[16], kept[:, [20, 41]], kept[:, :, 29] = True, True, True
    assert np.array_equal(sparse != 255, kept)
    assert np.array_equal(sparse[kept], truth[kept])


def test_labeled_fraction_of_one_slice_per_axis_on_the_example_by_hand(nuclei):
    _, truth = nuclei  # 31 × 61 × 57
    labeled = 61 * 57 + 31 * 57 + 31 * 61 - (57 + 61 + 31) + 1  # three planes, minus their lines, plus the point
    assert labeled_fraction(sparsify(truth, (1, 1, 1), 255), 255) == pytest.approx(labeled / (31 * 61 * 57))


@pytest.mark.parametrize("slices", PAPER_SLICES)
def test_labeled_fraction_of_the_papers_slice_counts(nuclei, slices):
    _, truth = nuclei
    sparse = sparsify(truth, slices, ignore_label=3)
    assert labeled_fraction(sparse, 3) == pytest.approx(grid_fraction(truth.shape, slices), abs=1e-12)
    rng = np.random.default_rng(1)
    random_sparse = sparsify(truth, slices, 3, positions=positions_for(truth.shape, slices, rng))
    assert labeled_fraction(random_sparse, 3) == pytest.approx(labeled_fraction(sparse, 3), abs=1e-12)


def test_the_ignore_label_must_not_be_a_value_of_the_truth(nuclei):
    _, truth = nuclei
    with pytest.raises(UserError, match=r"^labels\.tif: the ignore label 2 is a value of the ground truth"):
        sparsify(truth, (1, 1, 1), ignore_label=2, source="labels.tif")


def test_sparse_dtype_widens_only_when_the_ignore_label_needs_it(nuclei):
    _, truth = nuclei
    assert sparsify(truth.astype(np.int64), (1, 1, 1), 3).dtype == np.uint8
    assert sparsify(truth, (1, 1, 1), 300).dtype == np.uint16
    assert sparsify(truth, (1, 1, 1), -1).dtype == np.int16


@pytest.mark.parametrize("shape", [(31, 61, 57), (64, 200, 200), (20, 1024, 1024)])
@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.3])
def test_slices_for_fraction_come_close_to_the_target(shape, fraction):
    slices = slices_for_fraction(shape, fraction)
    achieved = grid_fraction(shape, slices)
    one_more = max(1 / n for n in shape)  # the step a single slice can make
    assert abs(achieved - fraction) <= one_more
    assert all(k >= 1 for k in slices)


def test_slices_for_fraction_spread_slices_in_proportion_to_axis_length():
    z, y, x = slices_for_fraction((20, 200, 200), 0.1)
    assert z == 1 and abs(y - x) <= 1  # one z-slice is already 5% of the voxels: y and x make up the rest
    assert grid_fraction((20, 200, 200), (z, y, x)) == pytest.approx(0.1, abs=0.005)
    # share p = 1 - 0.8^(1/3) ≈ 0.0717 → k ≈ 4.3, 8.6, 17.2; 1 - (56/60)(111/120)(222/240) ≈ 0.2014 is closest
    assert slices_for_fraction((60, 120, 240), 0.2) == (4, 9, 18)
    assert slices_for_fraction((31, 61, 57), 0.001) == (1, 1, 1)  # at least one slice per axis
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        slices_for_fraction((31, 61, 57), 1.0)


def test_random_positions_are_distinct_sorted_and_reproducible():
    a = random_positions(61, 5, np.random.default_rng(7))
    assert a == sorted(set(a)) and len(a) == 5 and all(0 <= p < 61 for p in a)
    assert a == random_positions(61, 5, np.random.default_rng(7))
    assert a != random_positions(61, 5, np.random.default_rng(8))
    with pytest.raises(ValueError, match="cannot choose 62 distinct slices"):
        random_positions(61, 62, np.random.default_rng(0))


# --- command line -----------------------------------------------------------------------------

def run_command(module_name: str, argv: list[str]) -> int:
    """Parse and run one subcommand the way `unet3d` does."""
    import importlib

    parser = argparse.ArgumentParser()
    module = importlib.import_module(f"unet3d.cli.{module_name}")
    module.register(parser.add_subparsers())
    args = parser.parse_args([module_name, *argv])
    return args.run(args)


@pytest.fixture
def example_truth():
    return str(EXAMPLE / "labels.tif")


def test_sparsify_command_round_trip_on_the_example(tmp_path, example_truth, capsys):
    output = tmp_path / "sparse.tif"
    assert run_command("sparsify", [example_truth, "-o", str(output), "--slices", "1,2,1", "--ignore-label", "255"]) == 0
    text = capsys.readouterr().out
    assert "Z (31 voxels): 1 slice at 16" in text and "Y (61 voxels): 2 slices at 20, 41" in text
    assert f"({grid_fraction((31, 61, 57), (1, 2, 1)):.2%})" in text
    truth = tifffile.imread(example_truth)
    assert np.array_equal(tifffile.imread(output), sparsify(truth, (1, 2, 1), 255))


def test_sparsify_command_with_a_fraction_and_random_positions(tmp_path, example_truth, capsys):
    outputs = [tmp_path / f"sparse{i}.npy" for i in range(3)]
    for output, seed in zip(outputs, ["3", "3", "4"]):
        run_command("sparsify", [example_truth, "-o", str(output), "--fraction", "0.2", "--random", "--seed", seed, "--ignore-label", "7"])
    text = capsys.readouterr().out
    first, second, other = (np.load(o) for o in outputs)
    assert np.array_equal(first, second) and not np.array_equal(first, other)
    slices = slices_for_fraction((31, 61, 57), 0.2)
    assert labeled_fraction(first, 7) == pytest.approx(grid_fraction((31, 61, 57), slices))
    assert "asked for 20.00%" in text


def test_sparsify_command_refuses_an_ignore_label_used_by_the_truth(tmp_path, example_truth):
    with pytest.raises(UserError, match="labels.tif: the ignore label 1 is a value of the ground truth"):
        run_command("sparsify", [example_truth, "-o", str(tmp_path / "s.tif"), "--slices", "1,1,1", "--ignore-label", "1"])
    assert not (tmp_path / "s.tif").exists()


def test_sparsify_command_refuses_to_keep_nothing(tmp_path, example_truth):
    with pytest.raises(UserError, match="keeps no voxel"):
        run_command("sparsify", [example_truth, "-o", str(tmp_path / "s.tif"), "--slices", "0,0,0", "--ignore-label", "9"])
    with pytest.raises(UserError, match="--seed only applies to random slice positions"):
        run_command("sparsify", [example_truth, "-o", str(tmp_path / "s.tif"), "--slices", "1,1,1", "--seed", "2", "--ignore-label", "9"])


def test_evaluate_command_against_hand_computed_scores(tmp_path, capsys):
    truth = np.array([0, 0, 1, 1, 2, 2]).reshape(1, 2, 3).astype(np.uint8)
    prediction = np.array([0, 1, 1, 1, 0, 0]).reshape(1, 2, 3).astype(np.uint8)
    sparse = np.array([0, 9, 9, 1, 9, 2]).reshape(1, 2, 3).astype(np.uint8)
    for name, array in {"t.npy": truth, "p.npy": prediction, "s.npy": sparse}.items():
        np.save(tmp_path / name, array)
    paths = [str(tmp_path / n) for n in ("p.npy", "t.npy")]
    run_command("evaluate", [*paths, "--json"])
    result = json.loads(capsys.readouterr().out)
    assert [c["iou"] for c in result["classes"]] == pytest.approx([1 / 4, 2 / 3, 0])
    assert result["mean_iou_foreground"] == pytest.approx(1 / 3)
    run_command("evaluate", [*paths, "--exclude", str(tmp_path / "s.npy"), "--ignore-label", "9", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert [c["iou"] for c in result["classes"]] == pytest.approx([0, 1 / 2, 0]) and result["voxels"] == 3


def test_evaluate_command_table_on_the_example_with_exclusion(tmp_path, example_truth, capsys):
    sparse = tmp_path / "sparse.tif"
    run_command("sparsify", [example_truth, "-o", str(sparse), "--slices", "1,1,1", "--ignore-label", "3"])
    prediction = tmp_path / "prediction.tif"
    tifffile.imwrite(prediction, np.roll(tifffile.imread(example_truth), 1, axis=2))
    capsys.readouterr()
    run_command("evaluate", [str(prediction), example_truth, "--exclude", str(sparse), "--ignore-label", "3"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["class", "IoU", "Dice", "truth", "voxels", "predicted", "voxels"]
    assert [line.split()[0] for line in lines[1:4]] == ["0", "1", "2"]
    assert lines[4].startswith("mean IoU, all classes (0, 1, 2): 0.")
    assert lines[5].startswith("mean IoU, foreground classes (1, 2): 0.")
    assert lines[-1] == f"evaluated voxels: {31 * 61 * 57 - 6987:,}, those holding the ignore label 3 in {sparse}"


def test_evaluate_command_on_identical_volumes_gives_one(example_truth, capsys):
    run_command("evaluate", [example_truth, example_truth, "--json", "--background", "none"])
    output = capsys.readouterr().out
    result = json.loads(output)  # exactly one JSON object
    assert result["mean_iou"] == result["mean_iou_foreground"] == 1.0 and result["background"] is None


def test_evaluate_command_reports_a_shape_mismatch_naming_both_files(tmp_path, example_truth):
    np.save(tmp_path / "small.npy", np.zeros((31, 61, 56), dtype=np.uint8))
    with pytest.raises(UserError, match=rf"small\.npy: shape 31×61×56 differs from {example_truth}: shape 31×61×57"):
        run_command("evaluate", [str(tmp_path / "small.npy"), example_truth])


def test_evaluate_command_needs_the_ignore_label_with_exclude(example_truth):
    with pytest.raises(UserError, match="--exclude and --ignore-label go together"):
        run_command("evaluate", [example_truth, example_truth, "--exclude", example_truth])
