"""`unet3d train` plans itself from the data: normalization, inputs, validation split, budget."""

from __future__ import annotations

import numpy as np
import pytest

from unet3d.errors import UserError
from unet3d.workflows.plan import Fingerprint, plan_table, plan_training

IGNORE = 255


def volumes(count: int, scales=None, annotated_planes: int = 1, shape=(8, 32, 32)):
    rng = np.random.default_rng(0)
    scales = scales or [1.0] * count
    images = [(rng.normal(size=(1, *shape)) * s + 10 * s).astype(np.float32) for s in scales]
    labels = []
    for _ in range(count):
        sparse = np.full(shape, IGNORE, np.uint8)
        sparse[:annotated_planes] = rng.integers(0, 2, (annotated_planes, *shape[1:]))
        labels.append(sparse)
    return images, labels


def plan_of(images, labels, **options):
    fingerprint = Fingerprint.of(images, labels, IGNORE, None)
    return plan_training(fingerprint, **{"max_time": 60.0, "iterations": None, "validation_given": False,
                                         "seed": 0, **options})


def test_per_volume_normalization_when_intensity_scales_differ():
    assert plan_of(*volumes(2, [1.0, 1.5])).per_volume is False
    plan = plan_of(*volumes(2, [1.0, 10.0]))
    assert plan.per_volume is True and "differ up to 10" in plan.choices[0].why
    assert plan_of(*volumes(1, [7.0])).per_volume is False  # one volume: nothing to compare


def test_the_filter_bank_is_read_from_fifty_thousand_annotated_voxels_per_volume():
    few = plan_of(*volumes(2, annotated_planes=1))  # 1,024 voxels per volume
    assert few.input_features is None and "1,024 annotated voxels per volume" in few.choices[1].why
    # Many volumes of a few thousand each: the image alone, as measured on small crops.
    assert plan_of(*volumes(40, annotated_planes=4, shape=(8, 40, 40))).input_features is None
    many = plan_of(*volumes(2, annotated_planes=16, shape=(16, 64, 64)))  # 65,536 per volume
    assert many.input_features is not None and many.input_features["bank"] == "ilastik"


def test_a_seeded_validation_split_from_four_volumes_unless_validation_is_given():
    assert plan_of(*volumes(3)).validation_volumes == []
    five = plan_of(*volumes(5))
    assert len(five.validation_volumes) == 1 and five.validation_volumes == plan_of(*volumes(5)).validation_volumes
    assert len(plan_of(*volumes(10)).validation_volumes) == 2
    assert plan_of(*volumes(10), validation_given=True).validation_volumes == []


def test_the_budget_sets_the_steps_and_a_bad_budget_is_one_line():
    assert plan_of(*volumes(1)).iterations == 100_000  # the clock stops it; the schedule anneals over time
    assert plan_of(*volumes(1), max_time=None).iterations == 2000
    assert plan_of(*volumes(1), max_time=None, iterations=50).iterations == 50
    with pytest.raises(UserError, match=r"^--max-time 0: the budget must be positive$"):
        plan_of(*volumes(1), max_time=0.0)


def test_images_of_different_channel_counts_are_refused_before_planning():
    images, labels = volumes(2)
    images[1] = np.concatenate([images[1], images[1]])
    with pytest.raises(UserError, match=r"^b\.tif: 2 channel\(s\), but a\.tif has 1$"):
        Fingerprint.of(images, labels, IGNORE, None, ["a.tif", "b.tif"])


def test_the_plan_prints_one_line_per_choice_with_its_reason():
    plan = plan_of(*volumes(5, [1, 1, 1, 1, 20]))
    table = plan_table(plan.choices)
    assert len(table.splitlines()) == len(plan.choices) == 4
    assert all("(" in line and line.endswith(")") for line in table.splitlines())


def test_options_that_replace_a_planned_choice_say_so_in_the_printed_plan(tmp_path, capsys):
    from conftest import EXAMPLE
    from unet3d.cli.main import main

    assert main(["train", "--images", str(EXAMPLE / "image.tif"), "--labels", str(EXAMPLE / "labels.tif"),
                 "--ignore-label", "255", "-o", str(tmp_path / "m.safetensors"), "--iterations", "1", "--quiet",
                 "--patch", "8,16,16", "--width", "4", "--filter-features", "off", "--forest", "off"]) == 0
    printed = {line.split("  ")[1].strip(): line for line in capsys.readouterr().out.splitlines()
               if line.startswith("  ")}
    assert "given as an option" in printed["patch, batch"] and "8×16×16" in printed["patch, batch"]
    assert "given as an option" in printed["network"] and "width 4" in printed["network"]
    assert "--filter-features off" in printed["inputs"] and "given as an option" not in printed["loss"]


def test_the_planned_hold_out_trains_on_the_others_and_keeps_the_best_model(tmp_path, capsys):
    import tifffile
    from conftest import EXAMPLE
    from unet3d.cli.main import main

    image, labels = tifffile.imread(EXAMPLE / "image.tif"), tifffile.imread(EXAMPLE / "labels.tif")
    paths = []
    for i in range(4):  # four crops of the example, with their annotation
        crop = (slice(None), slice(14 * i, 14 * i + 24))
        np.save(tmp_path / f"image{i}.npy", image[crop])
        np.save(tmp_path / f"labels{i}.npy", labels[crop])
        paths.append((str(tmp_path / f"image{i}.npy"), str(tmp_path / f"labels{i}.npy")))
    model = tmp_path / "m.safetensors"
    assert main(["train", "--images", *[p[0] for p in paths], "--labels", *[p[1] for p in paths],
                 "--ignore-label", "255", "-o", str(model), "--iterations", "2", "--validate-every", "1",
                 "--quiet", "--patch", "8,16,16", "--width", "4", "--forest", "off"]) == 0
    printed = capsys.readouterr().out
    assert "1 of 4 volumes held out" in printed
    assert model.with_name("m.best.safetensors").exists()
    from unet3d.model.serialization import load_model

    sources = load_model(model)[1].training["sources"]
    assert len(sources) == 3 and all(s in [p[0] for p in paths] for s in sources)
