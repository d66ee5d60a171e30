"""Faults as a table: what a crash, a lost worker, a damaged output or a full disk leaves behind.

* training killed (SIGKILL) at random moments of its training loop, then `unet3d train --resume`:
  the model must equal the uninterrupted run's bit for bit;
* a Dask worker killed in the middle of `unet3d predict --dask`: the output must equal
  single-process prediction bit for bit;
* an output store with chunks deleted or overwritten: running the command again must name them in
  one line, predict only their blocks, and give the intact output back;
* a full disk (a 1 MiB tmpfs; where mounting is refused, a child process with RLIMIT_FSIZE):
  predict and train must fail in one line naming the file and leave no file, or the previous
  checkpoint untouched.

`--quick` (under a minute) tries each fault once; the full run kills training 20 times and tries
each other fault 3 times. tests/test_faults.py runs the same functions.
`python -m benchmarks.bench_faults [--quick] [--record benchmarks/records/faults.jsonl]`
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import io
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

CLI = [sys.executable, "-m", "unet3d.cli.main"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
TRAIN_STEPS = 10
BLOCK = (16, 32, 32)  # one output tile of the valid network per block


@dataclass
class Row:
    fault: str
    checked: str
    count: int = 0  # trials
    passed: int = 0  # trials with the expected outcome
    notes: list[str] = field(default_factory=list)  # one per trial, what happened
    seconds: float = 0.0  # the whole row's wall time

    def add(self, ok: bool, note: str) -> None:
        self.count += 1
        self.passed += ok
        self.notes.append(("ok: " if ok else "FAILED: ") + note)


# --- training killed, then resumed ---------------------------------------------------------------------

def training_command(folder: Path):
    """model path → the `unet3d train` arguments of a short, seeded, step-bounded run on the bundled
    example, checkpointing every step (so a kill can land while a checkpoint is written)."""
    from unet3d.cli.main import main

    example = resources.files("unet3d.examples") / "nuclei_tiny"
    sparse = folder / "sparse.tif"
    with contextlib.redirect_stdout(io.StringIO()):
        main(["sparsify", str(example / "labels.tif"), "-o", str(sparse), "--slices", "2,2,1", "--ignore-label", "255"])
    return lambda model: CLI + [
        "train", "--images", str(example / "image.tif"), "--labels", str(sparse), "--ignore-label", "255",
        "-o", str(model), "--width", "4", "--levels", "2", "--patch", "20,28,28", "--iterations", str(TRAIN_STEPS),
        "--quiet", "--checkpoint-every", "0", "--forest", "off", "--filter-features", "off", "--seed", "3",
        "--threads", "1"]


def reached(model: Path) -> int:
    from unet3d.training.checkpoint import load_checkpoint, run_files

    checkpoint = run_files(model)["checkpoint"]
    return int(load_checkpoint(checkpoint)["iteration"]) if checkpoint.exists() else 0


def run_then_kill(command: list[str], model: Path, delay: float | None) -> tuple[float, bool]:
    """Start `command`; once its first checkpoint exists, wait `delay` seconds (None: to the end) and
    SIGKILL it. Returns (seconds from the first checkpoint to the kill or the end, whether it was killed)."""
    from unet3d.training.checkpoint import run_files

    proc = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = run_files(model)["checkpoint"]
    while not checkpoint.exists() and proc.poll() is None:
        time.sleep(0.01)
    began = time.monotonic()
    try:
        proc.wait(timeout=delay)
        return time.monotonic() - began, False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return time.monotonic() - began, True


def same_weights(a: Path, b: Path) -> bool:
    from unet3d.model import load_model

    first, second = load_model(a)[0].state_dict(), load_model(b)[0].state_dict()
    return first.keys() == second.keys() and all(np.array_equal(first[k].numpy(), second[k].numpy()) for k in first)


def training_kills(folder: Path, kills: int, rng: np.random.Generator) -> Row:
    row = Row("training killed (SIGKILL), then `--resume`",
              "model after the resume equals the uninterrupted run's, every weight bit for bit")
    command = training_command(folder)
    whole = folder / "whole.safetensors"
    loop, _ = run_then_kill(command(whole), whole, None)
    for trial in range(kills):
        model = folder / f"killed{trial}.safetensors"
        moment = float(rng.uniform(0, 0.9 * loop))
        _, killed = run_then_kill(command(model), model, moment)
        step = reached(model)
        resumed = subprocess.run(command(model) + ["--resume"], env=ENV, capture_output=True, text=True)
        ok = killed and resumed.returncode == 0 and same_weights(whole, model)
        row.add(ok, f"killed {moment:.2f} s into the loop, at step {step} of {TRAIN_STEPS}"
                + ("" if killed else " (finished before the kill)")
                + ("" if resumed.returncode == 0 else f"; resume failed: {resumed.stderr.strip()[-200:]}"))
    return row


# --- prediction on Dask: a worker killed, a damaged output --------------------------------------------

def prediction_inputs(folder: Path) -> tuple[str, str]:
    """A (36, 72, 60) Zarr image of smooth noise and a small valid-padding network for it (valid
    padding: block-wise prediction equals single-process prediction bit for bit)."""
    import torch
    from scipy.ndimage import gaussian_filter

    from unet3d.data.normalization import fit_normalization
    from unet3d.io import write_volume
    from unet3d.model import UNet, UNetConfig, save_model

    image = (gaussian_filter(np.random.default_rng(0).normal(size=(36, 72, 60)), 2) * 400 + 1000).astype(np.uint16)
    write_volume(str(folder / "image.zarr"), image)
    torch.manual_seed(1)
    network = UNet(UNetConfig(in_channels=1, num_classes=3, width=4, levels=3, padding="valid"))
    save_model(folder / "model.safetensors", network, {"class_values": [0, 1, 2],
                                                        "normalization": fit_normalization([image[None]])})
    return str(folder / "model.safetensors"), str(folder / "image.zarr")


def cli(argv: list[str]) -> tuple[int, str, str]:
    """`unet3d ARGV` in this process: (exit code, stdout, stderr)."""
    from unet3d.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def single_process(folder: Path, model: str, image: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels, float16 probabilities) of plain `unet3d predict` with the same tiles."""
    labels, probabilities = folder / "reference.npy", folder / "reference_probabilities.npy"
    cli(["predict", model, image, "-o", str(labels), "--probabilities", str(probabilities), "--quiet",
         "--tile", ",".join(map(str, BLOCK))])
    return np.load(labels), np.load(probabilities)


def stored(store: Path) -> tuple[np.ndarray, np.ndarray]:
    import zarr

    from unet3d.io.ome_zarr import SEGMENTATION

    root = zarr.open_group(str(store), mode="r")
    return root[SEGMENTATION + "/0"][...], root["0"][...]


def equal(store: Path, reference) -> bool:
    return all(np.array_equal(got, want) for got, want in zip(stored(store), reference))


def predict_on(client, model: str, image: str, store: Path) -> tuple[int, str, str]:
    return cli(["predict", model, image, "-o", str(store), "--dask", client.scheduler.address, "--quiet",
                "--tile", ",".join(map(str, BLOCK)), "--block", ",".join(map(str, BLOCK))])


def done_count(store: Path) -> int:
    from unet3d.io.ome_zarr import DONE

    return len(list((store / DONE / "c").rglob("*"))) if (store / DONE / "c").exists() else 0


def kill_a_worker_after(client, store: Path, blocks: int, killed: list) -> None:
    """Kill one worker process (SIGKILL) once `blocks` blocks are marked done."""
    deadline = time.monotonic() + 120
    while done_count(store) < blocks and time.monotonic() < deadline:
        time.sleep(0.002)
    worker = sorted(client.scheduler_info()["workers"])[0]
    os.kill(client.run(os.getpid, workers=[worker])[worker], signal.SIGKILL)
    killed.append(done_count(store))


@dataclass
class Prediction:
    """A model, an image, and what single-process prediction makes of it."""

    folder: Path
    model: str
    image: str
    reference: tuple[np.ndarray, np.ndarray]

    @classmethod
    def make(cls, folder: Path) -> Prediction:
        model, image = prediction_inputs(folder)
        return cls(folder, model, image, single_process(folder, model, image))


def worker_kills(case: Prediction, client, trials: int, rng: np.random.Generator) -> Row:
    row = Row("a Dask worker killed (SIGKILL) mid-run of `predict --dask`",
              "output store equals single-process prediction (labels and probabilities) bit for bit")
    folder, model, image, reference = case.folder, case.model, case.image, case.reference
    for trial in range(trials):
        store, killed = folder / f"killed{trial}.zarr", []
        after = int(rng.integers(1, 9))  # of 18 blocks
        killer = threading.Thread(target=kill_a_worker_after, args=(client, store, after, killed))
        killer.start()
        code, out, err = predict_on(client, model, image, store)
        killer.join()
        mid_run = bool(killed) and killed[0] < 18
        row.add(code == 0 and mid_run and equal(store, reference),
                f"worker killed with {killed[0] if killed else '?'} of 18 blocks done; exit code {code}"
                + (f"; {err.strip()}" if err.strip() else ""))
    return row


def damage(store: Path, rng: np.random.Generator) -> tuple[str, str]:
    """Delete one level-0 chunk and overwrite another with random bytes; their keys."""
    chunks = sorted(p for p in store.rglob("*") if p.is_file() and "/0/c/" in str(p) and "unet3d_done" not in str(p))
    lost, broken = (chunks[i] for i in rng.choice(len(chunks), 2, replace=False))
    lost.unlink()
    broken.write_bytes(rng.bytes(max(broken.stat().st_size, 16)))
    return str(lost.relative_to(store)), str(broken.relative_to(store))


def damaged_stores(case: Prediction, client, trials: int, rng: np.random.Generator) -> Row:
    row = Row("output store with a chunk deleted and one overwritten",
              "the rerun names both in one line, predicts only their blocks, output equal again")
    model, image, reference = case.model, case.image, case.reference
    store = case.folder / "damaged.zarr"
    predict_on(client, model, image, store)
    for _ in range(trials):
        lost, broken = damage(store, rng)
        code, out, err = predict_on(client, model, image, store)
        lines = err.strip().splitlines()
        named = len(lines) == 1 and f"{lost} (missing)" in lines[0] and f"{broken} (corrupt)" in lines[0]
        redone = len({chunk_block(lost), chunk_block(broken)})
        ok = code == 0 and named and f"predicted {redone} of 18 block(s)" in out and equal(store, reference)
        row.add(ok, f"{lost} deleted, {broken} overwritten: {' '.join(lines) or 'nothing said'}; "
                + next((line for line in out.splitlines() if line.startswith("predicted")), out.strip()))
    return row


def chunk_block(key: str) -> tuple[str, ...]:
    """The block a level-0 chunk key belongs to (its last three indices)."""
    return tuple(key.split("/")[-3:])


# --- a full disk --------------------------------------------------------------------------------------

@contextlib.contextmanager
def small_disk(folder: Path, mount: bool = True):
    """(folder on a 1 MiB tmpfs, None), or where mounting is refused or not asked for (folder, file
    size limit in bytes) for commands run in a child process under RLIMIT_FSIZE."""
    disk = folder / "disk"
    disk.mkdir()
    mounted = mount and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(disk)],
                                       capture_output=True).returncode == 0
    try:
        yield disk, None if mounted else 16 << 10
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=True)


def fill(disk: Path, leave: int) -> None:
    """Take all but `leave` bytes of the disk's free space, or all of it where the tmpfs gives less
    than statvfs promised (seen once in a full test run): the command then meets a full disk sooner."""
    stats = os.statvfs(disk)
    try:
        (disk / "filler").write_bytes(b"\0" * max(stats.f_bavail * stats.f_frsize - leave, 0))
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise


def run_limited(argv: list[str], limit: int | None) -> tuple[int, str]:
    """(exit code, stderr) of `unet3d ARGV`: in this process on a real small disk, else in a child
    whose files may not grow beyond `limit` bytes (writes fail with EFBIG instead of ENOSPC)."""
    if limit is None:
        code, _, err = cli(argv)
        return code, err

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = subprocess.run(CLI + argv, env=ENV, capture_output=True, text=True, preexec_fn=limited)
    return done.returncode, done.stderr


def snapshot(disk: Path) -> dict[str, str]:
    return {str(p.relative_to(disk)): hashlib.sha256(p.read_bytes()).hexdigest() for p in disk.rglob("*") if p.is_file()}


def disk_full(folder: Path, mount: bool = True) -> Row:
    from benchmarks.bench_bad_input import image, painting, write

    row = Row("disk full while writing", "one line naming the file; the disk holds what it held before")
    inputs = folder / "inputs"
    inputs.mkdir()
    network, _ = prediction_inputs(inputs)
    volume = write(inputs, "image.tif", image(shape=(32, 64, 64)))
    labels = write(inputs, "labels.tif", painting((32, 64, 64)))
    train = ["train", "--images", volume, "--labels", labels, "--ignore-label", "255", "--forest", "off", "--quiet",
             "--width", "4", "--levels", "2", "--patch", "16,32,32", "--checkpoint-every", "0", "--threads", "1"]
    with small_disk(folder, mount) as (disk, limit):
        how = "1 MiB tmpfs" if limit is None else f"no tmpfs: RLIMIT_FSIZE {limit >> 10} KiB"
        cases = [("predict → TIFF", ["predict", network, volume, "-o", str(disk / "out.tif"), "--quiet"], "out.tif", 20_000),
                 ("predict → Zarr", ["predict", network, volume, "-o", str(disk / "out.zarr"), "--probabilities",
                                    str(disk / "probabilities.zarr"), "--quiet"], "zarr", 20_000),
                 ("train → first checkpoint", train + ["--iterations", "2", "-o", str(disk / "m.safetensors")],
                  "m.checkpoint.pt", 5_000)]
        for what, argv, name, leave in cases:
            row.add(*_full_disk_case(disk, limit, leave, argv, name, f"{what} ({how})"))
        (disk / "filler").unlink(missing_ok=True)
        resumed = train + ["--iterations", "4", "-o", str(disk / "m.safetensors"), "--resume"]
        if run_limited(train + ["--iterations", "2", "-o", str(disk / "m.safetensors")], None)[0] == 0:
            row.add(*_full_disk_case(disk, limit, 5_000, resumed, "m.checkpoint.pt", f"train --resume ({how})"))
    return row


def _full_disk_case(disk: Path, limit: int | None, leave: int, argv: list[str], name: str, what: str):
    if limit is None:
        fill(disk, leave)
    before = snapshot(disk)
    code, err = run_limited(argv, limit)
    lines = err.strip().splitlines()
    one_line = len(lines) == 1 and name in lines[0] and "cannot be written" in lines[0]
    untouched = snapshot(disk) == before
    (disk / "filler").unlink(missing_ok=True)
    return code != 0 and one_line and untouched, f"{what}: exit code {code}, {' / '.join(lines)}" + (
        "" if untouched else "; the disk changed")


# --- the table ----------------------------------------------------------------------------------------

@contextlib.contextmanager
def local_cluster(workers: int = 2):
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, memory_limit="1GiB",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        yield client


def markdown(rows: list[Row]) -> str:
    lines = ["| fault | checked | result | count |", "|---|---|---|---|"]
    lines += [f"| {r.fault} | {r.checked} | {'passed' if r.passed == r.count else 'FAILED'}: {r.passed} of {r.count} | "
              f"{r.count} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one trial of each fault")
    parser.add_argument("--kills", type=int, help="training kills (default 20, 1 with --quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--record", type=Path, help="write the rows as JSON lines here (replacing the file)")
    args = parser.parse_args()
    kills = args.kills or (1 if args.quick else 20)
    trials = 1 if args.quick else 3
    rng = np.random.default_rng(args.seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows.append(timed(training_kills, _fresh(folder, "train"), kills, rng))
        prediction = Prediction.make(_fresh(folder, "predict"))
        with local_cluster() as client:
            rows.append(timed(worker_kills, prediction, client, trials, rng))
            rows.append(timed(damaged_stores, prediction, client, trials, rng))
        rows.append(timed(disk_full, _fresh(folder, "disk")))
    print(markdown(rows))
    for row in rows:
        print(f"\n{row.fault} ({row.seconds:.0f} s):\n" + "\n".join(f"  {note}" for note in row.notes))
    if args.record:
        args.record.write_text("".join(json.dumps(row.__dict__) + "\n" for row in rows))


def timed(fault, *args) -> Row:
    began = time.perf_counter()
    row = fault(*args)
    row.seconds = round(time.perf_counter() - began, 1)
    return row


def _fresh(folder: Path, name: str) -> Path:
    (folder / name).mkdir()
    return folder / name


if __name__ == "__main__":
    main()
