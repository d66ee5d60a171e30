"""Re-run the 3D U-Net paper's experiments on the public volumes and write a Markdown report.

Usage: .venv/bin/python -m experiments.paper.run [--quick] [--out FOLDER] [--steps N | --seconds S]
           [--seeds 0 1 2] [--only slices,crossval,automatic] [--datasets nuclei_tiny,ovule,hippocampus,em_vnc]
           [--methods unet3d,unet3d_nobn,unet2d,forest,unet3d_dense] [--slices 1,1,1 4,4,3]

Every finished run is appended to OUT/results.jsonl, so an interrupted run resumes by skipping
the runs recorded there with the same budget; OUT/report.md and OUT/figures/ are rebuilt after
each run. The budget is a number of training steps per network run, so a run does the same
work on a busy machine as on an idle one and the experiments can run in parts, beside other
work (--seconds: a wall-clock budget instead). Slice settings are the paper's (x,y,z).
--quick uses only the bundled nuclei_tiny example and a few steps per training run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path


from tqdm import tqdm

from experiments.paper import protocols, report
from harness import volumes
from experiments.paper.methods import METHODS
from experiments.paper.protocols import EXPERIMENTS, SEEDS, SLICE_SETTINGS, Budget, Run

PER_VOLUME = {"nuclei_tiny": ["nuclei_tiny"], "ovule": ["ovule"], "em_vnc": ["em_vnc_q0"],
              "hippocampus": [f"hippocampus_{c}" for c in volumes.HIPPOCAMPUS_CASES]}
VOXELS = {"nuclei_tiny": 31 * 61 * 57, "ovule": 64 * 200 * 200, "em_vnc": 20 * 512 * 512, "hippocampus": 36 * 50 * 35}
PREDICT_SECONDS_PER_VOXEL = 2e-5  # small U-Net on 2 CPU cores, measured roughly; for the estimate only
FOREST_SECONDS_PER_VOXEL = 4e-5
# The records behind docs/results.md, kept with the code (the overlay figures are not).
RECORDS = Path(__file__).resolve().parent / "records"
SECONDS_PER_STEP = 0.35  # the planned network's step (batch 4 of 16×40×40) on 2 cores: 0.11-0.35 s as hosts differ
# Training steps per network run: the budget at which dense labels clearly beat sparse ones on the
# volumes of the tables (docs/results.md says how it was found).
DEFAULT_STEPS = 1000
# Without --datasets, the volumes each experiment runs on: what 3 seeds of every run at
# DEFAULT_STEPS fit in about 7 hours of a 2-core CPU (the ovule and the EM stack need more per run
# than that leaves: --datasets adds them, with every hippocampus case).
DEFAULT_VOLUMES = {"slices": {"nuclei_tiny": ["nuclei_tiny"], "hippocampus": ["hippocampus_001"]},
                   "crossval": {"nuclei_tiny": ["nuclei_tiny"]}, "automatic": ("hippocampus",)}


def full_plan(methods=METHODS, datasets=None, settings=SLICE_SETTINGS, only=EXPERIMENTS, seeds=SEEDS) -> list[Run]:
    """The runs of `only`: on DEFAULT_VOLUMES, or on every volume of `datasets`."""
    chosen = lambda experiment: (DEFAULT_VOLUMES[experiment] if datasets is None else  # noqa: E731
                                 {g: v for g, v in PER_VOLUME.items() if g in datasets})
    keep = lambda wanted: [m for m in wanted if m in methods]  # noqa: E731
    runs = []
    if "slices" in only:
        runs += protocols.slice_runs(chosen("slices"), keep(("unet3d", "forest", "unet3d_dense")), settings, seeds)
    if "crossval" in only:
        runs += protocols.crossval_runs(chosen("crossval"), keep(("unet3d", "unet3d_nobn", "unet2d", "forest")),
                                        seeds=seeds)
    if "automatic" in only:
        hippocampus = lambda cases: tuple(f"hippocampus_{c}" for c in cases)  # noqa: E731
        splits = {"em_vnc": protocols.em_vnc_splits(),
                  "hippocampus": [(hippocampus(volumes.HIPPOCAMPUS_TRAIN), hippocampus(volumes.HIPPOCAMPUS_TEST))]}
        groups = DEFAULT_VOLUMES["automatic"] if datasets is None else datasets
        runs += protocols.automatic_runs({g: s for g, s in splits.items() if g in groups}, keep(METHODS), seeds)
    return runs


def quick_plan() -> list[Run]:
    """nuclei_tiny only: one slice setting with the peers, and one cross-validation subset."""
    volumes = {"nuclei_tiny": ["nuclei_tiny"]}
    return (protocols.slice_runs(volumes, ("unet3d", "forest", "unet3d_dense"), ("3,3,2",), seeds=(0,))
            + protocols.crossval_runs(volumes, ("unet3d",), folds=[0], seeds=(0,)))


def estimate_seconds(run: Run, budget: Budget) -> float:
    """Rough duration of a run on idle cores: training plus prediction, or the forest's features and fit."""
    voxels = VOXELS[run.group] * len(run.test)
    if run.method == "forest":
        return FOREST_SECONDS_PER_VOXEL * (VOXELS[run.group] * len(run.train) + voxels)
    return (budget.seconds or SECONDS_PER_STEP * budget.steps) + PREDICT_SECONDS_PER_VOXEL * voxels + 3


def load_records(path: Path) -> list[dict]:
    """Records in order, the last one per run id winning; a line cut short by an interruption is skipped."""
    records = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            records.pop(record["id"], None)
            records[record["id"]] = record
    return list(records.values())


def finished(records: list[dict], budget: Budget) -> set[str]:
    """Ids of the runs done with this training budget, and of every forest (it has no training budget)."""
    return {r["id"] for r in records if r["budget"] == str(budget) or r["method"] == "forest"}


def append_record(path: Path, record: dict) -> None:
    """One JSON line, flushed to disk before the next run starts."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def source_version() -> str:
    """The commit the code came from, marked dirty when src/ has uncommitted changes (recipes may differ)."""
    import subprocess

    repo = Path(__file__).resolve().parents[2]
    git = lambda *a: subprocess.run(["git", "-C", str(repo), *a], capture_output=True, text=True).stdout.strip()  # noqa: E731
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("-dirty" if git("status", "--porcelain", "src") else "")


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    import torch

    return f"{model}, {os.cpu_count()} CPU cores, torch {torch.__version__} on CPU ({torch.get_num_threads()} threads)"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="bundled nuclei_tiny only, a few seconds per run (CI)")
    parser.add_argument("--out", type=Path, default=RECORDS, help="results folder (the records docs/results.md reports)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help=f"training steps per network run (default {DEFAULT_STEPS}, quick 10)")
    budget.add_argument("--seconds", type=float, help="wall seconds of training per network run instead of steps")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="seeds of every run (quick: 0)")
    parser.add_argument("--only", help=f"comma-separated experiments: {','.join(EXPERIMENTS)}")
    parser.add_argument("--datasets", help="comma-separated: nuclei_tiny,ovule,hippocampus,em_vnc")
    parser.add_argument("--methods", help=f"comma-separated: {','.join(METHODS)}")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from the records, run nothing")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's; 1 on a crowded machine)")
    parser.add_argument("--slices", nargs="+", help=f"slice settings of the slices experiment (default {' '.join(SLICE_SETTINGS)})")
    args = parser.parse_args(argv)
    args.budget = (Budget(seconds=args.seconds) if args.seconds else
                   Budget(steps=args.steps or (10 if args.quick else DEFAULT_STEPS)))
    for name, allowed in (("only", EXPERIMENTS), ("datasets", tuple(PER_VOLUME)), ("methods", METHODS)):
        value = getattr(args, name)
        if value is not None:
            chosen = value.split(",")
            unknown = [c for c in chosen if c not in allowed]
            if unknown:
                parser.error(f"--{name}: unknown {', '.join(unknown)} (choose from {', '.join(allowed)})")
            setattr(args, name, chosen)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.quick:
        runs = quick_plan()
    else:
        runs = full_plan(args.methods or METHODS, args.datasets, tuple(args.slices or SLICE_SETTINGS),
                         args.only or EXPERIMENTS, tuple(args.seeds))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    done = finished(load_records(results), args.budget)
    todo = [] if args.report_only else [r for r in runs if r.id not in done]
    expected = sum(estimate_seconds(r, args.budget) for r in todo)
    print(f"{len(runs)} runs planned, {len(done & {r.id for r in runs})} already in {results}; {len(todo)} to run, "
          f"about {expected / 3600:.1f} h ({expected / 60:.0f} min) on idle cores at {args.budget} of training each",
          flush=True)
    command = "python -m experiments.paper.run " + shlex.join(sys.argv[1:] if argv is None else argv)
    started, version = time.perf_counter(), source_version()
    for run in tqdm(todo, unit="run", dynamic_ncols=True):
        tqdm.write(f"{run.id} …")
        record = protocols.execute(run, args.budget, args.out / "figures") | {"source": version}
        append_record(results, record)
        tqdm.write(f"{run.id}: mean IoU {record['mean_iou']:.3f} in {record['seconds']:.0f} s")
        _write_report(args, results, command, runs, time.perf_counter() - started)
    path = _write_report(args, results, command, runs, time.perf_counter() - started)
    print(f"wrote {path}")
    return 0


def _write_report(args, results: Path, command: str, runs: list[Run], seconds: float) -> Path:
    current = finished(load_records(results), args.budget)  # the report never mixes training budgets
    records = [r for r in load_records(results) if r["id"] in current]
    planned = {r.id for r in runs}
    header = [f"- command: `{command}`", f"- training budget per network run: {args.budget}",
              f"- machine: {machine()}",
              f"- runs: {sum(r['id'] in planned for r in records)} of {len(runs)} planned finished; "
              f"{sum(r['seconds'] for r in records) / 60:.1f} min of run time recorded, "
              f"{seconds / 60:.1f} min in this invocation"]
    return report.write_report(records, args.out, header)


if __name__ == "__main__":
    sys.exit(main())
