"""Training on the bundled nuclei example with only a few orthogonal slices annotated."""

import dataclasses
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from unet3d.augmentation import AugmentationConfig
from unet3d.data.sparse import sparsify
from unet3d.errors import UserError
from unet3d.evaluation import evaluate_volumes
from unet3d.inference import predict_array
from unet3d.model import UNet, UNetConfig, load_model
from unet3d.training import TrainConfig, train
from unet3d.training.checkpoint import load_checkpoint, run_files
from unet3d.training.dataset import PatchBatches, prepare_training_set
from unet3d.training.trainer import patch_geometry

IGNORE = 255


def tiny_config(**overrides) -> TrainConfig:
    values = dict(
        network=UNetConfig(in_channels=1, num_classes=3, width=4, levels=2, padding="valid"),
        patch_shape=(28, 36, 36), iterations=8, learning_rate=3e-3, checkpoint_every=0.0, log_every=1,
        augmentation=AugmentationConfig(elastic_sigma=0.0),
    )
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture
def sparse_nuclei(nuclei):
    image, labels = nuclei
    sparse = sparsify(labels, (3, 3, 2), IGNORE)
    return image[None].astype(np.float32), labels, sparse


def unannotated_iou(model, data, labels, sparse) -> dict:
    probabilities = predict_array(model, data.images[0].numpy())
    return evaluate_volumes(probabilities.argmax(0), labels, exclude=sparse, ignore_label=IGNORE)


def test_short_training_learns_from_a_few_slices(sparse_nuclei, tmp_path):
    image, labels, sparse = sparse_nuclei
    data = prepare_training_set([image], [sparse], IGNORE)
    config = tiny_config(network=UNetConfig(in_channels=1, num_classes=3, width=8, levels=2, padding="valid"),
                         patch_shape=(28, 44, 44), batch_size=2, iterations=120, checkpoint_every=1e9,
                         log_every=10, augmentation=AugmentationConfig(enabled=False))
    untrained = UNet(config.network).eval()
    before = unannotated_iou(untrained, data, labels, sparse)
    result = train(config, data, tmp_path / "m.safetensors", progress=False)
    after = unannotated_iou(result.model, data, labels, sparse)
    interior = next(c for c in after["classes"] if c["value"] == 1)
    assert after["mean_iou_foreground"] > before["mean_iou_foreground"] + 0.2
    assert interior["iou"] > 0.5  # measured 0.70; an untrained net or chance stays far lower
    files = run_files(tmp_path / "m.safetensors")
    assert all(files[k].exists() for k in ("model", "checkpoint", "log", "curve"))
    loaded, info = load_model(files["model"])
    assert info.class_values == [0, 1, 2] and info.ignore_label == IGNORE
    assert info.normalization["method"] == "zscore"


def test_resume_equals_an_uninterrupted_run(sparse_nuclei, tmp_path):
    image, _, sparse = sparse_nuclei
    data = prepare_training_set([image], [sparse], IGNORE)
    whole = train(tiny_config(iterations=6), data, tmp_path / "a.safetensors", progress=False)
    train(tiny_config(iterations=3), data, tmp_path / "b.safetensors", progress=False)
    resumed = train(tiny_config(iterations=6), data, tmp_path / "b.safetensors", resume=True, progress=False)
    assert resumed.iterations == 6
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    assert [e["loss"] for e in whole.history] == [e["loss"] for e in resumed.history]


def test_training_continues_from_a_given_network(sparse_nuclei, tmp_path):
    image, _, sparse = sparse_nuclei
    data = prepare_training_set([image], [sparse], IGNORE)
    first = train(tiny_config(iterations=3), data, tmp_path / "a.safetensors", progress=False)
    start = {k: v.clone() for k, v in first.model.state_dict().items()}
    fresh = train(tiny_config(iterations=3), data, tmp_path / "b.safetensors", progress=False)
    continued = train(tiny_config(iterations=3), data, tmp_path / "c.safetensors", progress=False, network=first.model)
    assert continued.model is first.model
    weight = "encoders.0.0.weight"
    assert not torch.equal(continued.model.state_dict()[weight], start[weight])  # it trained on
    assert not torch.equal(continued.model.state_dict()[weight], fresh.model.state_dict()[weight])  # from there
    other = UNet(UNetConfig(in_channels=1, num_classes=3, width=8, levels=2, padding="valid"))
    with pytest.raises(UserError, match="configuration"):
        train(tiny_config(), data, tmp_path / "d.safetensors", progress=False, network=other)


def test_batches_depend_only_on_seed_and_iteration(sparse_nuclei):
    image, _, sparse = sparse_nuclei
    data = prepare_training_set([image], [sparse], IGNORE)
    input_shape, output_shape = patch_geometry(tiny_config())
    batches = PatchBatches(data, input_shape, output_shape, 2, AugmentationConfig(), seed=5)
    x3, y3 = batches[3]
    assert torch.equal(x3, batches[3][0]) and torch.equal(y3, batches[3][1])
    assert not torch.equal(x3, batches[4][0])
    assert x3.shape == (2, 1, *input_shape) and y3.shape == (2, *output_shape)
    assert all((y >= 0).any() for y in y3)  # every target patch holds annotated voxels


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(sparse_nuclei, tmp_path, monkeypatch):
    import unet3d.training.trainer as trainer

    image, _, sparse = sparse_nuclei
    data = prepare_training_set([image], [sparse], IGNORE)
    real = trainer.make_loss

    def failing_loss(name, weights):
        loss, calls = real(name, weights), []

        def wrapped(logits, target):
            calls.append(1)
            return loss(logits, target) * (float("nan") if len(calls) == 3 else 1.0)
        return wrapped

    monkeypatch.setattr(trainer, "make_loss", failing_loss)
    with pytest.raises(UserError, match="loss became nan at iteration 3"):
        train(tiny_config(iterations=6), data, tmp_path / "m.safetensors", progress=False)
    checkpoint = load_checkpoint(run_files(tmp_path / "m.safetensors")["checkpoint"])
    assert checkpoint["iteration"] == 2
    load_model(tmp_path / "m.safetensors")


def sparse_example(folder):
    """The example's labels on 2, 2 and 1 slices (`unet3d sparsify --slices 2,2,1`), written in-process
    for the training subprocesses to read."""
    import tifffile

    from conftest import EXAMPLE

    path = folder / "sparse.tif"
    tifffile.imwrite(path, sparsify(tifffile.imread(EXAMPLE / "labels.tif"), (2, 2, 1), IGNORE))
    return path


def test_sigkill_leaves_loadable_files(tmp_path):
    """Kill a training process while it checkpoints every step: what is on disk must load."""
    from conftest import EXAMPLE

    sparse_path = sparse_example(tmp_path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cli = [sys.executable, "-m", "unet3d.cli.main"]
    model = tmp_path / "m.safetensors"
    proc = subprocess.Popen(cli + ["train", "--images", str(EXAMPLE / "image.tif"), "--labels", str(sparse_path),
                                   "--ignore-label", "255", "-o", str(model), "--width", "4", "--levels", "2",
                                   "--patch", "28,36,36", "--iterations", "100000", "--quiet",
                                   "--checkpoint-every", "0"],
                            env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    files = run_files(model)
    deadline = time.monotonic() + 120
    while not files["checkpoint"].exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert load_checkpoint(files["checkpoint"])["iteration"] >= 1
    load_model(files["model"])


def test_a_run_killed_at_a_random_step_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL at a random step, then `--resume`: the same weights, bit for bit, as a run never
    interrupted (one process, fixed seed, a step budget)."""
    from conftest import EXAMPLE

    sparse_path = sparse_example(tmp_path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cli = [sys.executable, "-m", "unet3d.cli.main"]

    def train_command(model):
        return cli + ["train", "--images", str(EXAMPLE / "image.tif"), "--labels", str(sparse_path),
                      "--ignore-label", "255", "-o", str(model), "--width", "4", "--levels", "2",
                      "--patch", "28,36,36", "--iterations", "14", "--quiet", "--checkpoint-every", "0",
                      "--forest", "off", "--seed", "3"]

    subprocess.run(train_command(tmp_path / "whole.safetensors"), check=True, env=env, capture_output=True)
    killed = tmp_path / "killed.safetensors"
    step = int(np.random.default_rng().integers(2, 12))  # a different step on every run of the suite
    proc = subprocess.Popen(train_command(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint, deadline = run_files(killed)["checkpoint"], time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if checkpoint.exists() and load_checkpoint(checkpoint)["iteration"] >= step:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    reached = load_checkpoint(checkpoint)["iteration"]
    assert reached < 14, f"the run finished before the kill at step {step}"
    subprocess.run(train_command(killed) + ["--resume"], check=True, env=env, capture_output=True)
    whole, resumed = load_model(tmp_path / "whole.safetensors")[0], load_model(killed)[0]
    for key, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), f"{key} differs after a kill at step {reached}"


@pytest.mark.parametrize("problem, make, message", [
    ("shape", lambda img, sp: ([img], [sp[:-1]]), "image shape .* and label shape .* differ"),
    ("empty", lambda img, sp: ([img], [np.full_like(sp, IGNORE)]), "no annotated voxel"),
    ("channels", lambda img, sp: ([img, np.concatenate([img, img])], [sp, sp]), "2 channel"),
])
def test_bad_training_data_is_refused(sparse_nuclei, problem, make, message):
    image, _, sparse = sparse_nuclei
    images, labels = make(image, sparse)
    with pytest.raises(UserError, match=message):
        prepare_training_set(images, labels, IGNORE)


def test_ignore_label_colliding_with_a_declared_class(sparse_nuclei):
    image, _, sparse = sparse_nuclei
    with pytest.raises(UserError, match="ignore label 2 is also one of the declared classes"):
        prepare_training_set([image], [sparse], 2, class_values=[0, 1, 2])


def test_volume_smaller_than_the_patch_is_padded(sparse_nuclei, tmp_path):
    image, _, sparse = sparse_nuclei
    data = prepare_training_set([image[:, :10, :12, :14]], [sparse[:10, :12, :14]], IGNORE,
                                class_values=[0, 1, 2])
    result = train(tiny_config(iterations=2), data, tmp_path / "m.safetensors", progress=False)
    assert result.iterations == 2


def test_validation_logs_iou_and_keeps_the_best_model(sparse_nuclei, tmp_path):
    image, labels, sparse = sparse_nuclei
    data = prepare_training_set([image], [sparse], IGNORE)
    held_out = np.where(sparse == IGNORE, labels, IGNORE).astype(np.uint8)  # the voxels not trained on
    validation = prepare_training_set([image], [held_out], IGNORE, class_values=data.class_values,
                                      normalization=data.normalization)
    result = train(tiny_config(iterations=4, validate_every=2), data, tmp_path / "m.safetensors",
                   validation=validation, progress=False)
    scores = [e for e in result.history if "val_mean_iou" in e]
    assert [e["iteration"] for e in scores] == [2, 4]
    assert all(0 <= e["val_mean_iou"] <= 1 and len(e["val_iou"]) == 3 for e in scores)
    assert run_files(tmp_path / "m.safetensors")["best"].exists()


def test_per_volume_normalization_and_densifys_recipe_from_the_train_command(sparse_nuclei, tmp_path, capsys):
    import tifffile

    from unet3d.cli import main
    from unet3d.workflows.densify import default_config

    image, _, sparse = sparse_nuclei
    brighter = image * 9.0 + 500.0
    data = prepare_training_set([image, brighter], [sparse, sparse], IGNORE, per_volume=True)
    assert data.normalization == {"method": "zscore", "channels": 1, "per_volume": True}
    np.testing.assert_allclose(data.images[0].numpy(), data.images[1].numpy(), atol=1e-4)
    shared = prepare_training_set([image, brighter], [sparse, sparse], IGNORE)
    assert not np.allclose(shared.images[0].numpy(), shared.images[1].numpy(), atol=0.1)
    tifffile.imwrite(tmp_path / "a.tif", image[0])
    tifffile.imwrite(tmp_path / "b.tif", brighter[0])
    tifffile.imwrite(tmp_path / "s.tif", sparse)
    # No option but the data, the ignore label and a step count: the plan chooses per-volume
    # normalization (spreads differ 9×) and densify's recipe, prints why and stores it.
    assert main.main(["train", "--images", str(tmp_path / "a.tif"), str(tmp_path / "b.tif"), "--labels",
                      str(tmp_path / "s.tif"), str(tmp_path / "s.tif"), "--ignore-label", str(IGNORE), "-o",
                      str(tmp_path / "m.safetensors"), "--iterations", "1", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "normalization  z-score per volume  (intensity spreads differ up to 9.0×" in printed
    assert "network        width 8, 3 levels, same padding" in printed
    _, info = load_model(tmp_path / "m.safetensors")
    assert info.normalization["per_volume"] is True
    recipe = TrainConfig.from_dict(info.training["config"])
    assert [c["part"] for c in recipe.plan["choices"]][:4] == ["normalization", "inputs", "validation", "budget"]
    # densify's recipe, ready for `densify --init`.
    data = prepare_training_set([image], [sparse], IGNORE)
    assert dataclasses.replace(recipe, plan=None) == dataclasses.replace(
        default_config(data, iterations=1, max_time=None), checkpoint_every=60.0)
