"""Data-parallel training on the CPU: two gloo processes train as one process with the whole batch;
and the other variants of the training loop, passed to train() as arguments.

Run as a script (`torchrun ... tests/test_ddp.py FOLDER`), this file is one training process that
saves what it ended with; the tests start it, and the command line, as real separate processes.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "src" / "unet3d" / "examples" / "nuclei_tiny"
IGNORE = 255


def nuclei_training_set(flipped: bool = False):
    import tifffile

    from unet3d.data.sparse import sparsify

    image, labels = tifffile.imread(EXAMPLE / "image.tif"), tifffile.imread(EXAMPLE / "labels.tif")
    if flipped:
        image, labels = image[:, ::-1].copy(), labels[:, ::-1].copy()
    return image[None].astype(np.float32), sparsify(labels, (3, 3, 2), IGNORE)


def library_run(folder: Path, batch_size: int, processes=None):
    """A few steps of a tiny batch-norm network with Dice + cross-entropy and the paper's augmentation,
    validated on two volumes (one per process)."""
    from unet3d.augmentation import AugmentationConfig
    from unet3d.model import UNetConfig
    from unet3d.training import TrainConfig, train
    from unet3d.training.dataset import prepare_training_set

    image, sparse = nuclei_training_set()
    data = prepare_training_set([image], [sparse], IGNORE)
    held = [nuclei_training_set(flipped=True), (image, sparse)]
    validation = prepare_training_set([h[0] for h in held], [h[1] for h in held], IGNORE,
                                      class_values=data.class_values, normalization=data.normalization)
    config = TrainConfig(network=UNetConfig(in_channels=1, num_classes=3, width=4, levels=2, padding="same"),
                         patch_shape=(16, 24, 24), batch_size=batch_size, iterations=4, optimizer="sgd",
                         learning_rate=0.05, momentum=0.9, loss="dice_ce", augmentation=AugmentationConfig(),
                         checkpoint_every=1e9, log_every=1, validate_every=4, seed=3)
    return train(config, data, folder / "model.safetensors", validation=validation, progress=False,
                 processes=processes)


def worker(folder: Path) -> None:
    """One of the processes torchrun starts: train, then save this process's parameters and history."""
    from unet3d.training.distributed import joined

    with joined("cpu", timeout=60) as processes:
        result = library_run(folder, batch_size=1, processes=processes)
        torch.save({"state": result.model.state_dict(), "history": result.history},
                   folder / f"rank{processes.rank}.pt")


def environment(**extra) -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1", **extra)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_close_states(first: dict, second: dict, tolerance: float) -> None:
    for key, value in first.items():
        if value.is_floating_point():
            assert torch.allclose(value, second[key], atol=tolerance, rtol=tolerance), key
        else:
            assert torch.equal(value, second[key]), key


def test_two_processes_train_as_one_process_with_the_whole_batch(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               __file__, str(tmp_path)]
    done = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key  # DDP keeps the processes in lockstep
    untimed = [[{k: v for k, v in e.items() if k != "seconds"} for e in r["history"]] for r in ranks]
    assert untimed[0] == untimed[1]  # the same losses and validation on every process
    alone = library_run(tmp_path / "alone", batch_size=2)
    assert_close_states(ranks[0]["state"], alone.model.state_dict(), 1e-4)
    losses = [[e.get("loss") for e in r] for r in (ranks[0]["history"], alone.history)]
    assert np.allclose(*[[l for l in ls if l is not None] for ls in losses], rtol=1e-4)
    validated = [next(e for e in h if "val_mean_iou" in e) for h in (ranks[0]["history"], alone.history)]
    assert validated[0]["val_mean_iou"] == pytest.approx(validated[1]["val_mean_iou"], abs=1e-3)


def test_global_loss_of_one_process_is_the_single_process_loss():
    """The all-reduced sums, on one process, give make_loss's value and gradients (empty batches too)."""
    import torch.distributed as dist

    from unet3d.losses import make_loss
    from unet3d.training.distributed import global_loss

    generator = torch.Generator().manual_seed(0)
    target = torch.randint(-1, 3, (2, 5, 6, 7), generator=generator)
    target[0, :, :, :3] = -1
    weights = torch.tensor([0.5, 1.0, 2.0])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        for name in ("ce", "dice_ce"):
            for labels in (target, torch.full_like(target, -1)):
                logits = torch.randn(2, 3, 5, 6, 7, generator=generator, requires_grad=True)
                expected = make_loss(name, weights)(logits, labels)
                (expected_grad,) = torch.autograd.grad(expected, logits)
                value = global_loss(name, weights)(logits, labels)
                (grad,) = torch.autograd.grad(value, logits)
                assert torch.allclose(value, expected, atol=1e-6), name
                assert torch.allclose(grad, expected_grad, atol=1e-7), name
    finally:
        dist.destroy_process_group()


def test_synchronized_view_shares_the_network_and_keeps_its_batch_norm():
    from unet3d.model import UNet, UNetConfig
    from unet3d.training.distributed import CPUSyncBatchNorm, with_synchronized_batch_norm

    model = UNet(UNetConfig(in_channels=1, num_classes=2, width=4, levels=2, padding="same", norm_at_test="batch"))
    view = with_synchronized_batch_norm(model)
    norms = [m for m in view.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, CPUSyncBatchNorm) for m in norms)
    assert not any(isinstance(m, CPUSyncBatchNorm) for m in model.modules())
    assert list(view.state_dict()) == list(model.state_dict())
    assert all(a is b for a, b in zip(view.state_dict(keep_vars=True).values(), model.state_dict(keep_vars=True).values()))
    with torch.no_grad():  # alone (no process group) it is plain batch norm: the same output
        x = torch.randn(2, 1, 8, 12, 12)
        assert torch.allclose(view.train()(x), model.train()(x), atol=1e-6)


def cli_arguments(folder: Path, *extra: str) -> list[str]:
    import tifffile

    image, sparse = nuclei_training_set()
    tifffile.imwrite(folder / "image.tif", image[0])
    tifffile.imwrite(folder / "sparse.tif", sparse)
    return ["train", "--images", str(folder / "image.tif"), "--labels", str(folder / "sparse.tif"),
            "--ignore-label", str(IGNORE), "--width", "4", "--levels", "2", "--patch", "16,24,24",
            "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9", "--iterations", "12", "--seed", "1",
            "--filter-features", "off", "--device", "cpu", "--quiet", *extra]


def start_process(arguments: list[str], rank: int, port: int) -> subprocess.Popen:
    """One process of a two-process run, started as torchrun would start it."""
    env = environment(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return subprocess.Popen([sys.executable, "-m", "unet3d", *arguments], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_a_killed_process_stops_the_other_and_the_run_resumes_exactly(tmp_path):
    from unet3d.cli.main import main
    from unet3d.model import load_model
    from unet3d.training.checkpoint import load_checkpoint

    model = tmp_path / "m.safetensors"
    arguments = cli_arguments(tmp_path, "-o", str(model), "--batch-size", "1", "--checkpoint-every", "0.2",
                              "--timeout", "30")
    port = free_port()
    first, second = (start_process(arguments, rank, port) for rank in range(2))
    checkpoint = tmp_path / "m.checkpoint.pt"
    deadline = time.monotonic() + 90
    while not checkpoint.exists() and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.02)
    second.send_signal(signal.SIGKILL)
    started = time.monotonic()
    _, stderr = first.communicate(timeout=60)
    second.communicate()
    assert first.returncode == 2 and time.monotonic() - started < 30, stderr[-2000:]
    assert stderr.strip().splitlines()[-1].startswith("unet3d train: error: process 0 of 2: another training process")
    assert load_checkpoint(checkpoint)["iteration"] < 12

    resumed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              "-m", "unet3d", *arguments, "--resume"],
                             env=environment(), capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "trained 12 iterations by 2 processes" in resumed.stdout
    alone = tmp_path / "alone.safetensors"
    assert main(cli_arguments(tmp_path, "-o", str(alone), "--batch-size", "2", "--checkpoint-every", "1000")) == 0
    assert_close_states(load_model(model)[0].state_dict(), load_model(alone)[0].state_dict(), 1e-4)


def test_a_process_that_never_joins_is_a_one_line_error(tmp_path):
    arguments = cli_arguments(tmp_path, "-o", str(tmp_path / "m.safetensors"), "--timeout", "3")
    alone = start_process(arguments, 0, free_port())
    _, stderr = alone.communicate(timeout=60)
    assert alone.returncode == 2
    assert stderr.strip().splitlines() == [stderr.strip().splitlines()[-1]]
    assert "did not all join" in stderr and "within 3 s" in stderr


def test_train_takes_its_batch_source_and_step_as_arguments(tmp_path):
    """Variants of the loop are arguments, not patched module globals."""
    from unet3d.augmentation import AugmentationConfig
    from unet3d.model import UNetConfig
    from unet3d.training import TrainConfig, train
    from unet3d.training.dataset import PatchBatches, prepare_training_set
    from unet3d.training.trainer import patch_geometry

    image, sparse = nuclei_training_set()
    data = prepare_training_set([image], [sparse], IGNORE)
    config = TrainConfig(network=UNetConfig(in_channels=1, num_classes=3, width=4, levels=2, padding="same"),
                         patch_shape=(16, 24, 24), iterations=3, checkpoint_every=1e9,
                         augmentation=AugmentationConfig(enabled=False))
    shapes = patch_geometry(config)
    asked, steps = [], []

    class Later(PatchBatches):
        def __getitem__(self, iteration):
            asked.append(iteration)
            return super().__getitem__(iteration + 7)

    def counted(default, images, targets, lr):
        steps.append(images.shape)
        return default(images, targets, lr)

    plain = train(config, data, tmp_path / "plain.safetensors", progress=False).model.state_dict()
    given = train(config, data, tmp_path / "given.safetensors", progress=False, step=counted,
                  batches=PatchBatches(data, *shapes, 1, None, config.seed)).model.state_dict()
    later = train(config, data, tmp_path / "later.safetensors", progress=False,
                  batches=Later(data, *shapes, 1, None, config.seed)).model.state_dict()
    assert all(torch.equal(plain[k], given[k]) for k in plain)  # the defaults, passed in, are the defaults
    assert steps == [(1, 1, *shapes[0])] * 3 and asked == [0, 1, 2]
    assert not torch.equal(plain["head.weight"], later["head.weight"])


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
