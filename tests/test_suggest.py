"""Which slice to annotate next: the ranking on probabilities made for the purpose, and `unet3d
suggest` on the bundled nuclei volume (trained now, or judged by a saved model)."""

import json

import numpy as np
import pytest
import tifffile

from unet3d.cli.main import main
from unet3d.data.sparse import sparsify
from unet3d.errors import UserError
from unet3d.interactive.session import Session
from unet3d.interactive.suggest import STRATEGIES, rank_slices

SHAPE = (6, 8, 10)


def confident(shape=SHAPE, classes=2) -> np.ndarray:
    """Probabilities sure of class 0 everywhere."""
    p = np.full((classes,) + shape, 0.0)
    p[0] = 1.0
    return p


def doubt(p: np.ndarray, where, amount=0.5) -> np.ndarray:
    p = p.copy()
    p[(0,) + where], p[(1,) + where] = 1 - amount, amount
    return p


def test_errors_ranks_the_slice_with_most_expected_mistakes_and_skips_annotated_ones():
    p = doubt(confident(), (2, slice(None), slice(None)))  # z-slice 2: every voxel a coin flip
    annotated = np.zeros(SHAPE, bool)
    annotated[:, 0, :] = True  # a painted y-plane crosses every z-slice: they stay candidates
    best = rank_slices(p, annotated, count=3)
    assert (best[0].axis, best[0].index) == (0, 2)
    assert best[0].score == pytest.approx(0.5 * 7 * 10)  # unannotated voxels only
    assert len(best) == 3 and best[0].score >= best[1].score >= best[2].score
    annotated[2] = True  # painted now: never suggested again
    assert all((s.axis, s.index) != (0, 2) for s in rank_slices(p, annotated))
    assert all((s.axis, s.index) != (1, 0) for s in rank_slices(p, annotated))


def test_axes_restrict_the_candidates():
    p = doubt(confident(), (2, slice(None), slice(None)))
    annotated = np.zeros(SHAPE, bool)
    annotated[0, 0, 0] = True
    assert {s.axis for s in rank_slices(p, annotated, axes=(1, 2))} == {1, 2}


def test_spread_waits_beside_an_annotated_slice_and_uncertainty_is_a_mean():
    p = doubt(confident(), (slice(None), slice(None), slice(4, 6)), 0.4)  # x = 4, 5 uncertain
    p = doubt(p, (slice(None), slice(None), slice(8, 9)), 0.3)  # x = 8 a little less
    annotated = np.zeros(SHAPE, bool)
    annotated[:, :, 3] = True
    assert rank_slices(p, annotated, strategy="errors", axes=(2,))[0].index in (4, 5)
    assert rank_slices(p, annotated, strategy="spread", axes=(2,))[0].index == 8
    assert rank_slices(p, annotated, strategy="uncertainty", axes=(2,))[0].score <= 1


def test_balanced_weighs_mistakes_on_a_rare_class_more():
    p = confident()
    p[:, :, :, 9] = [[[0.0]], [[1.0]]]  # x = 9 predicted as the rare class 1
    p = doubt(p, (slice(None), slice(None), slice(9, 10)), 0.7)  # ... with doubt 0.3
    p = doubt(p, (slice(None), slice(None), slice(2, 3)), 0.35)  # x = 2 background, doubt 0.35
    annotated = np.zeros(SHAPE, bool)
    annotated[0, 0, 0] = True
    assert rank_slices(p, annotated, strategy="errors", axes=(2,))[0].index == 2
    assert rank_slices(p, annotated, strategy="balanced", axes=(2,))[0].index == 9


def test_sampled_draws_distinct_slices_reproducibly():
    p = doubt(confident(), (slice(None), slice(None), slice(None)), 0.2)
    annotated = np.zeros(SHAPE, bool)
    annotated[0, 0, 0] = True
    first = rank_slices(p, annotated, strategy="sampled", count=5, rng=np.random.default_rng(3))
    again = rank_slices(p, annotated, strategy="sampled", count=5, rng=np.random.default_rng(3))
    assert first == again and len({(s.axis, s.index) for s in first}) == 5


def test_refusals_are_one_line():
    p = confident()
    with pytest.raises(UserError, match="no voxel is annotated"):
        rank_slices(p, np.zeros(SHAPE, bool))
    with pytest.raises(UserError, match="every slice"):
        rank_slices(p, np.ones(SHAPE, bool))
    with pytest.raises(UserError, match="unknown strategy"):
        rank_slices(p, np.ones(SHAPE, bool), strategy="magic")
    assert set(STRATEGIES) >= {"errors", "uncertainty"}


@pytest.fixture
def files(nuclei, tmp_path):
    image, truth = nuclei
    sparse = sparsify(truth.astype(np.int64), (1, 1, 1), 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "image.tif", image)
    tifffile.imwrite(tmp_path / "sparse.tif", sparse)
    return tmp_path, sparse


def test_cli_trains_ranks_and_draws_the_best_slice(files, capsys):
    folder, sparse = files
    code = main([
        "suggest", str(folder / "image.tif"), str(folder / "sparse.tif"), "--ignore-label", "255",
        "--max-time", "4", "--count", "3", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["suggestions"]) == 3 and "trained" in result["network"]
    scores = [s["score"] for s in result["suggestions"]]
    assert scores == sorted(scores, reverse=True)
    for s in result["suggestions"]:  # never a slice that is already annotated
        plane = np.take(sparse, s["index"], axis="zyx".index(s["axis"]))
        assert (plane != 255).mean() < 0.5
    assert (folder / "sparse.suggest.png").stat().st_size > 1000


def test_cli_judges_with_a_saved_model_and_refuses_one_that_does_not_fit(files, nuclei, capsys):
    folder, sparse = files
    image, truth = nuclei
    session = Session(image)
    session.train_round(np.where(sparse != 255, sparse + 1, 0).astype(np.uint8), 1e9, iterations=2)
    session.save(folder / "model.safetensors")  # classes 1, 2, 3 (napari's painted values)
    args = ["suggest", str(folder / "image.tif"), str(folder / "sparse.tif"), "--model", str(folder / "model.safetensors"),
            "--figure", str(folder / "best.png")]
    assert main(args + ["--ignore-label", "0"]) == 2  # values 0..2 of SPARSE: 255 annotated, 0 ignored
    out = capsys.readouterr()
    assert "255" in out.err and "not classes" in out.err  # refused: 255 is no class of the model
    shifted = np.where(sparse != 255, sparse + 1, 0).astype(np.uint8)
    tifffile.imwrite(folder / "sparse.tif", shifted)
    assert main(args + ["--ignore-label", "0", "--axes", "y,x"]) == 0
    out = capsys.readouterr().out
    assert "judged by the model" in out and "| z |" not in out and (folder / "best.png").exists()
    tifffile.imwrite(folder / "image.tif", np.stack([image, image], axis=1))  # (Z, C, Y, X): two channels
    assert main(args + ["--ignore-label", "0", "--channel-axis", "1"]) == 2
    assert "reads 1 channel(s), the image has 2" in capsys.readouterr().err


def test_cli_refuses_volumes_with_nothing_or_everything_annotated(files, capsys):
    folder, sparse = files
    base = ["suggest", str(folder / "image.tif"), str(folder / "sparse.tif"), "--max-time", "1"]
    assert main(base + ["--ignore-label", "7"]) == 2  # no voxel holds 7: every slice is annotated
    assert "every slice" in capsys.readouterr().err
    tifffile.imwrite(folder / "sparse.tif", np.full_like(sparse, 255))
    assert main(base + ["--ignore-label", "255"]) == 2
    assert "no voxel is annotated" in capsys.readouterr().err
