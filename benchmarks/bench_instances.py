"""Objects from densify's probabilities: the network's, the forest's and their blend through the same
instance step, matched against the instance ground truth.

Usage: PYTHONPATH=. .venv/bin/python -m benchmarks.bench_instances [--quick] [--volumes nuclei_tiny ovule]
           [--slices 3,3,2] [--max-time S] [--seeds 0 1] [--results FILE.jsonl] [--cache FOLDER] [--sweep]

Per volume and seed: keep the paper's evenly spread (3,3,2) slices of the dense class truth
(`bench_densify`'s protocol), run densify on them with `--max-time` (default 60 s on nuclei_tiny,
180 s on the ovule, 300 s on em_vnc_q0: about the least densify accepts there on two busy cores),
and turn each of its probability maps — the network alone, the forest alone and the blend densify
writes — into objects with the volume's kind (`unet3d.instances.KINDS`, fixed parameters).
Scores: precision, recall, F1 and AP = TP/(TP+FP+FN) at IoU 0.5 and 0.75, on the voxels the slices
left unannotated. The oracle row puts the dense class truth (one-hot) through the same step: the
ceiling of the method itself.
`--sweep` scores every candidate parameter set of the kind instead of the chosen one (the table
docs/instances.md chose from). `--cache` keeps densify's maps (float16 .npz) so reruns and sweeps
skip training. Rows go to `--results` as JSON lines; a rerun skips rows already there.
Volumes: nuclei_tiny (kind nuclei; instances.tif from ../shared/data or UNET3D_SHARED_DATA), the
ovule (kind cells; ovule.h5:/instances) and em_vnc_q0, the first 20×512×512 quarter of em_vnc (its
mitochondria, class 2, as blobs without a boundary class; the truth's objects are the connected
components of class 2; 300 s).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.bench_size import current_commit
from benchmarks.records import append_row, find_row, load_rows
from harness import IGNORE, volumes
from unet3d.data.sparse import sparsify
from unet3d.evaluation import match_instances
from unet3d.instances import KINDS, InstanceMethod, instances_from_probabilities
from unet3d.workflows.densify import densify


def probability_maps(volume: volumes.Volume, sparse: np.ndarray, max_time: float, seed: int,
                     cache: Path | None) -> tuple[dict[str, np.ndarray], list[int], float]:
    """densify's maps {"network", "forest", "blend"} (K, Z, Y, X), its class values and its seconds."""
    if cache is not None and cache.exists():
        saved = np.load(cache)
        maps = {name: saved[name].astype(np.float32) for name in ("network", "forest", "blend") if name in saved}
        return maps, saved["classes"].tolist(), float(saved["seconds"])
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as folder:
        result = densify(volume.image.astype(np.float32), sparse, IGNORE, Path(folder) / "m.safetensors",
                         max_time=max_time, seed=seed, spacing=volume.spacing, progress=False)
    seconds = time.monotonic() - start
    maps = {**result.component_probabilities, "blend": result.probabilities}
    classes = list(result.info.class_values)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(cache, **{name: p.astype(np.float16) for name, p in maps.items()},
                            classes=np.asarray(classes), seconds=seconds)
    return maps, classes, seconds


# Candidate parameter sets per kind; `--sweep` scores them all (docs/instances.md's choice), else only KINDS'.
CANDIDATES = {
    "nuclei": {f"interior >= {t}, core > {d}": InstanceMethod("interior", t, "core", d, 10, False)
               for t, d in ((0.5, 0), (0.5, 1), (0.5, 2), (0.7, 0), (0.7, 1))},
    "cells": {**{f"boundary < {t}, core > {d}": InstanceMethod("not_boundary", t, "core", d, 50, True)
                 for t, d in ((0.5, 4), (0.3, 4), (0.3, 6), (0.2, 6), (0.3, 8), (0.2, 8))},
              **{f"boundary < {t}, maxima r 8, distance weight 0.5 (PlantSeg)":
                 InstanceMethod("not_boundary", t, "maxima", 8, 1, True, 0.5) for t in (0.5, 0.3)}},
}
VOLUME_KIND = {"nuclei_tiny": "nuclei", "ovule": "cells", "em_vnc_q0": "nuclei"}
# (interior, boundary) class values where they are not (1, 2): em_vnc's mitochondria have no boundary class.
VOLUME_CLASSES = {"em_vnc_q0": (2, None)}


def score(labels: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> dict:
    result = match_instances(labels, truth, mask)
    at = {row["threshold"]: row for row in result["thresholds"]}
    value = lambda x: None if x is None else round(x, 4)  # noqa: E731
    return {"truth_objects": result["truth_objects"], "predicted_objects": result["predicted_objects"],
            **{f"{key}{int(th * 100)}": value(at[th][key]) for th in (0.5, 0.75) for key in ("ap", "f1", "precision", "recall")}}


def one_hot(truth: np.ndarray, classes: list[int]) -> np.ndarray:
    return np.stack([(truth == value).astype(np.float32) for value in classes])


def measure(name: str, slices: tuple[int, ...], seeds: list[int], max_time: float, methods: dict, done: list[dict],
            results: Path | None, cache: Path | None) -> list[dict]:
    """Rows of one volume: the oracle (dense class truth) and each seed's maps through each method."""
    volume, truth = volumes.load(name), volumes.instance_truth(name)
    sparse = sparsify(volume.truth, slices, IGNORE)
    mask = sparse == IGNORE
    classes = sorted(int(v) for v in np.unique(volume.truth))
    runs = [(None, "oracle", lambda: ({"oracle": one_hot(volume.truth, classes)}, classes, 0.0))]
    for seed in seeds:
        path = cache / f"{name}_{','.join(map(str, slices))}_s{seed}_t{max_time:g}.npz" if cache else None
        runs.append((seed, "densify", lambda seed=seed, path=path: probability_maps(volume, sparse, max_time, seed, path)))
    rows, commit = [], current_commit()  # rows are kept per commit: the instance step's rules change with the code
    for seed, _, produce in runs:
        base = {"volume": name, "kind": VOLUME_KIND[name], "slices": ",".join(map(str, slices)), "seed": seed,
                "max_time": None if seed is None else max_time, "commit": commit}
        missing = [(m, label) for m in methods for label in ("oracle", "network", "forest", "blend")
                   if (seed is None) == (label == "oracle") and find_row(done, {**base, "source": label, "method": m}) is None]
        if missing:
            maps, map_classes, seconds = produce()
            for method, source in missing:
                if source not in maps:
                    continue
                started = time.monotonic()
                labels = instances_from_probabilities(maps[source], map_classes, methods[method],
                                                      *VOLUME_CLASSES.get(name, (1, 2)), spacing=volume.spacing)
                row = {**base, "source": source, "method": method, "params": methods[method].as_dict(),
                       "densify_s": round(seconds, 1), "instances_s": round(time.monotonic() - started, 2),
                       **score(labels, truth, mask)}
                append_row(results, row)
                done.append(row)
        rows += [r for r in done if all(r.get(k) == v for k, v in base.items()) and r["method"] in methods]
    return rows


def print_rows(rows: list[dict]) -> None:
    print("| volume | kind | seed | probabilities | objects (truth / found) | AP 0.5 | AP 0.75 | F1 0.5 | F1 0.75 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['volume']} | {r['kind']} | {'–' if r['seed'] is None else r['seed']} | {r['source']} "
              f"| {r['truth_objects']} / {r['predicted_objects']} | {_cell(r['ap50'])} | {_cell(r['ap75'])} "
              f"| {_cell(r['f150'])} | {_cell(r['f175'])} |")


def print_sweep(rows: list[dict]) -> None:
    """Mean AP at 0.5 per method and probability source, over the seeds; the choice: the best mean
    over the network, forest and blend rows of every volume of the kind."""
    print("| kind | method | volume | oracle | network | forest | blend | mean of the three |")
    print("|---|---|---|---|---|---|---|---|")
    for (kind, method, name) in dict.fromkeys((r["kind"], r["method"], r["volume"]) for r in rows):
        mine = [r for r in rows if (r["kind"], r["method"], r["volume"]) == (kind, method, name)]
        mean = {s: _mean([r["ap50"] for r in mine if r["source"] == s]) for s in ("oracle", "network", "forest", "blend")}
        learned = _mean([r["ap50"] for r in mine if r["source"] != "oracle"])
        print(f"| {kind} | {method} | {name} | {_cell(mean['oracle'])} | {_cell(mean['network'])} "
              f"| {_cell(mean['forest'])} | {_cell(mean['blend'])} | {_cell(learned)} |")


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--volumes", nargs="+", default=list(VOLUME_KIND), choices=list(VOLUME_KIND))
    parser.add_argument("--slices", default="3,3,2", help="k slices per axis, (Z, Y, X)")
    parser.add_argument("--max-time", type=float, default=None,
                        help="densify's --max-time (wall seconds; default 60 on nuclei_tiny, 180 on the ovule, 300 on "
                        "em_vnc_q0: about the least it accepts there on two busy cores)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--results", type=Path, help="JSON lines, appended; rows already there are not re-run")
    parser.add_argument("--cache", type=Path, metavar="FOLDER", help="keep densify's probability maps here (float16 .npz)")
    parser.add_argument("--sweep", action="store_true", help="score every candidate parameter set of each kind")
    parser.add_argument("--quick", action="store_true", help="nuclei_tiny, one seed, densify for 10 s: keeps this script working")
    args = parser.parse_args(argv)
    if args.quick:
        args.volumes, args.seeds, args.max_time, args.results, args.cache = ["nuclei_tiny"], [0], 10.0, None, None
    slices = tuple(int(k) for k in args.slices.split(","))
    done = load_rows(args.results)
    rows = []
    for name in args.volumes:
        if not (volumes.shared_data() / name.removesuffix("_q0")).exists():  # the instance truth, nuclei_tiny's too, lives there
            print(f"skipped {name}: {volumes.shared_data() / name} not found (set UNET3D_SHARED_DATA)")
            continue
        kind = VOLUME_KIND[name]
        methods = CANDIDATES[kind] if args.sweep else {_name_of(KINDS[kind]): KINDS[kind]}
        max_time = args.max_time or DEFAULT_MAX_TIME[name]
        rows += measure(name, slices, args.seeds, max_time, methods, done, args.results, args.cache)
    (print_sweep if args.sweep else print_rows)(rows)


DEFAULT_MAX_TIME = {"nuclei_tiny": 60.0, "ovule": 180.0, "em_vnc_q0": 300.0}


def _name_of(method: InstanceMethod) -> str:
    """The candidate's name for the fixed parameters of a kind."""
    return next(name for kind in CANDIDATES.values() for name, m in kind.items() if m == method)


if __name__ == "__main__":
    main()
