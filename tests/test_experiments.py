"""The paper's experiment runner: protocols, methods, resumable records, and the quick run end to end."""

import json

import numpy as np
import pytest
import tifffile
from conftest import shared_volume

from experiments.paper import protocols, report, run
from experiments.paper.methods import segment
from harness import IGNORE, volumes
from unet3d.data.sparse import positions_for
from unet3d.model.serialization import load_model


@pytest.mark.slow
def test_quick_run_records_every_run_writes_report_and_resumes(tmp_path):
    assert run.main(["--quick", "--out", str(tmp_path), "--steps", "3"]) == 0
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [r.id for r in run.quick_plan()]
    for record in records:
        assert 0.0 <= record["mean_iou"] <= 1.0 and record["scores"][0]["voxels"] > 0
        dense = record["method"] == "unet3d_dense"
        assert (record["labeled_fraction"] == 1.0) == dense and 0.0 < record["labeled_fraction"] <= 1.0
    sparse_scored = records[0]["scores"][0]["voxels"]
    assert sparse_scored == round((1 - records[0]["labeled_fraction"]) * 31 * 61 * 57)  # only unannotated voxels
    report = (tmp_path / "report.md").read_text()
    assert "## 1. Number of annotated slices" in report and "## 2. Semi-automatic" in report
    assert "| 3,3,2 |" in report and "random forest" in report and "4 of 4 planned finished" in report
    figures = sorted(p.name for p in (tmp_path / "figures").glob("*.png"))
    assert "iou_vs_labeled.png" in figures and len(figures) == 1 + len(records)

    assert run.main(["--quick", "--out", str(tmp_path), "--steps", "3"]) == 0  # resumes: nothing left to run
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == len(records)


def test_crossval_subsets_partition_the_annotated_slices(nuclei):
    _, truth = nuclei
    subsets = protocols.crossval_subsets(truth.shape)
    assert [sum(len(axis) for axis in subset) for subset in subsets] == [4, 4, 3]
    assert all(all(subset) for subset in subsets)  # every subset holds slices of all three orientations
    for axis, positions in enumerate(positions_for(truth.shape, protocols.CROSSVAL_SLICES)):
        assert sorted(p for subset in subsets for p in subset[axis]) == positions


@pytest.mark.parametrize("fold", range(3))
def test_crossval_scores_only_held_out_voxels_no_training_slice_covers(nuclei, fold):
    _, truth = nuclei
    sparse, scored = protocols.crossval_split(truth, fold)
    annotated = sparse != IGNORE
    np.testing.assert_array_equal(sparse[annotated], truth[annotated])
    assert scored.any() and not (scored & annotated).any()
    held_out = protocols.crossval_subsets(truth.shape)[fold]
    on_held_out = np.zeros(truth.shape, bool)
    for axis, positions in enumerate(held_out):
        on_held_out[(slice(None),) * axis + (positions,)] = True
    np.testing.assert_array_equal(scored, on_held_out & ~annotated)


def test_every_planned_run_names_loadable_volumes():
    names = {name for r in run.full_plan() for name in (*r.train, *r.test)}
    assert all(n in ("nuclei_tiny", "ovule") or n.startswith(("em_vnc_q", "hippocampus_")) for n in names)
    assert {f"hippocampus_{c}" for c in volumes.HIPPOCAMPUS_TEST} <= names


@pytest.mark.parametrize("method", ["unet2d", "unet3d_nobn", "forest"])
def test_methods_train_on_some_volumes_and_segment_another(nuclei, method, tmp_path):
    image, truth = nuclei
    halves = [volumes.Volume(f"part{i}", image[None, :, :, 28 * i:28 * i + 28], truth[:, :, 28 * i:28 * i + 28].astype(np.int64),
                          None, 0) for i in range(2)]
    held_out = volumes.Volume("held_out", image[None, :, 30:], truth[:, 30:].astype(np.int64), None, 0)
    sparse = [protocols.sparsify(v.truth, (2, 2, 1), ignore_label=IGNORE) for v in halves]
    result = segment(method, halves, sparse, [held_out], seconds=None, steps=3, seed=0, workdir=tmp_path)
    assert result.class_values == [0, 1, 2]
    assert result.labels[0].shape == held_out.truth.shape
    assert set(np.unique(result.labels[0])) <= {0, 1, 2}
    if method != "forest":  # trained as `unet3d train --forest off` with the variant's option
        info = load_model(tmp_path / "model.safetensors")[1]
        network = info.training["config"]["network"]
        assert (network["dims"], network["norm"]) == {"unet2d": (2, "batch"), "unet3d_nobn": (3, "none")}[method]
        assert info.forest is None


def test_em_vnc_quarters_tile_the_stack():
    image = tifffile.imread(shared_volume("em_vnc", "image.tif"))
    quarters = [volumes.em_vnc_quarter(i) for i in range(4)]
    assert all(q.image.shape == (1, 20, 512, 512) and q.truth.shape == (20, 512, 512) for q in quarters)
    top = np.concatenate([quarters[0].image[0], quarters[1].image[0]], axis=2)
    bottom = np.concatenate([quarters[2].image[0], quarters[3].image[0]], axis=2)
    np.testing.assert_array_equal(np.concatenate([top, bottom], axis=1), image)
    assert quarters[0].background is None and quarters[0].spacing == volumes.EM_VNC_SPACING


def test_hippocampus_cases_exist_and_the_split_is_disjoint():
    for case in {*volumes.HIPPOCAMPUS_CASES, *volumes.HIPPOCAMPUS_TRAIN, *volumes.HIPPOCAMPUS_TEST}:
        shared_volume("hippocampus", "images", f"hippocampus_{case}.nii.gz")
    assert not set(volumes.HIPPOCAMPUS_TRAIN) & set(volumes.HIPPOCAMPUS_TEST)
    volume = volumes.load(f"hippocampus_{volumes.HIPPOCAMPUS_CASES[0]}")
    assert volume.image.shape[1:] == volume.truth.shape and set(np.unique(volume.truth)) == {0, 1, 2}


def test_records_resume_last_wins_and_cut_lines_are_skipped(tmp_path):
    path = tmp_path / "results.jsonl"
    run.append_record(path, {"id": "a", "budget": "5 steps", "method": "unet3d", "mean_iou": 0.1})
    run.append_record(path, {"id": "b", "budget": "5 steps", "method": "unet3d", "mean_iou": 0.2})
    run.append_record(path, {"id": "a", "budget": "9 steps", "method": "unet3d", "mean_iou": 0.3})
    run.append_record(path, {"id": "f", "budget": "5 steps", "method": "forest", "mean_iou": 0.4})
    with open(path, "a") as f:
        f.write('{"id": "c", "budg')  # interrupted mid-line
    records = run.load_records(path)
    assert [(r["id"], r["mean_iou"]) for r in records] == [("b", 0.2), ("a", 0.3), ("f", 0.4)]
    assert run.finished(records, protocols.Budget(steps=9)) == {"a", "f"}  # a forest has no training budget
    assert run.finished(records, protocols.Budget(seconds=9.0)) == {"f"}


def test_unknown_dataset_is_refused(capsys):
    with pytest.raises(SystemExit):
        run.parse_args(["--datasets", "ovule,kidney"])
    assert "unknown kidney" in capsys.readouterr().err


def test_pretraining_sets_leave_out_every_scored_volume():
    from experiments.ablation.pretrained import pretraining_names

    shared_volume("hippocampus", "images", "hippocampus_001.nii.gz")
    names = pretraining_names("hippocampus")
    scored = {f"hippocampus_{case}" for case in (*volumes.HIPPOCAMPUS_CASES, *volumes.HIPPOCAMPUS_TEST)}
    assert len(names) == 250 and not scored & set(names)
    assert pretraining_names("em_vnc") == ["em_vnc_q1", "em_vnc_q2", "em_vnc_q3"]  # the scored quarter is q0


def test_synthetic_walls_are_labelled_by_the_ovule_rule():
    """Walls are the voxels with an in-plane neighbour in another cell, on both sides; a wall
    parallel to the slices is not one (as in the ovule's labels)."""
    from experiments.ablation.synthetic_walls import synthetic_volume, wall_labels

    ids = np.ones((4, 6, 6), np.int64)
    ids[:, :, 3:] = 2  # a wall across X
    ids[2:] += 10  # a wall parallel to the slices
    ids[:, 0, 0] = 0  # outside the tissue
    labels = wall_labels(ids)
    assert (labels[:, 1:, 2:4] == 2).all() and (labels[:, 1:, [1, 4]] == 1).all()
    assert labels[1, 3, 1] == 1 and labels[2, 3, 1] == 1
    assert (labels[:, 0, 1] == 2).all() and (labels[:, 1, 0] == 2).all()  # beside the outside voxel

    image, labels = synthetic_volume(0, shape=(16, 40, 40))
    assert image.shape == (1, 16, 40, 40) and image.dtype == np.float32 and set(np.unique(labels)) <= {0, 1, 2}
    assert 0.02 < (labels == 2).mean() < 0.4
    assert np.array_equal(synthetic_volume(0, shape=(16, 40, 40))[0], image)  # reproducible by seed


def test_slice_settings_are_the_papers_x_y_z():
    """(x,y,z) = (4,4,3): 4 slices across x, 4 across y, 3 across z (the paper's notation)."""
    assert protocols.zyx("4,4,3") == (3, 4, 4) == protocols.CROSSVAL_SLICES
    truth = np.zeros((30, 40, 50), np.int64)
    run_ = protocols.Run("slices", "g", "2,2,1", "unet3d", ("v",), ("v",))
    volume = volumes.Volume("v", truth[None].astype(np.float32), truth, None, 0)
    (sparse,), _ = protocols._annotation(run_, [volume])
    annotated = sparse != IGNORE
    assert annotated.all(axis=(1, 2)).sum() == 1  # one whole xy-slice (across z)
    assert annotated.all(axis=(0, 2)).sum() == 2 and annotated.all(axis=(0, 1)).sum() == 2


def test_seeds_are_separate_runs_and_the_report_gives_their_spread(tmp_path):
    runs = protocols.slice_runs({"g": ["v"]}, ("unet3d",), ("1,1,1",), seeds=(0, 1))
    assert len({r.id for r in runs}) == 2 and [r.seed for r in runs] == [0, 1]
    records = [{"experiment": "slices", "group": "g", "setting": "1,1,1", "method": "unet3d", "seed": seed,
                "labeled_fraction": 0.1, "seconds": 1.0, "scores": [{"mean_iou": iou, "iou": {"1": iou}}]}
               for seed, iou in ((0, 0.5), (1, 0.7))]
    cell = report.summarize(records, "slices")["g"][("1,1,1", "unet3d")]
    assert cell["mean_iou"] == pytest.approx(0.6) and cell["sd"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert "± 0.141" in report._cell(cell) and cell["seeds"] == 2

