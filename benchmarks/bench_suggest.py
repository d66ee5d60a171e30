"""Which slice to paint next: the suggestion against evenly spaced, random and foreground-aware
random slices, and an oracle, with a simulated annotator.

Usage: .venv/bin/python -m benchmarks.bench_suggest [--quick] [--volumes nuclei_tiny hippocampus_001 ...]
           [--strategies even random foreground oracle errors ...] [--seeds 5] [--network-seeds 1]
           [--steps 60] [--rounds 6] [--results FILE.jsonl]

Per volume, strategy and seed: start from one evenly spaced slice per axis, painted completely from
the dense truth, and add one slice per round (by default up to the 8 slices of the paper's
(x,y,z) = (3,3,2); `--rounds 9` goes on to the 11 of (4,4,3), i.e. (z,y,x) = (3,4,4)). Every round trains densify's network (the napari loop's `Session`: warm
start from the previous round, the same number of steps per round for every strategy, so the
comparison does not depend on how busy the machine is) and predicts the volume; the network's
labels are scored (mean IoU over foreground classes) on the unannotated voxels and on the whole
volume. Strategies:
- even: the paper's evenly spaced slices, grown in the paper's order of slice counts
  (1,1,1) → (2,2,1) → (3,3,2) → (4,4,3) in (x,y,z), one axis at a time in between;
- random: a uniformly drawn slice not yet painted, any axis;
- foreground: a random slice drawn with probability proportional to its foreground voxels in the
  truth (what an annotator who looks for the structure would pick);
- oracle: the slice where the current labels have the most errors (a ceiling, needs the truth);
- with-border: the default ranking with the volume's outermost slices (index 0 and n-1 of each
  axis) competing like any other (`rank_slices(..., border_last=False)`), as before they were put
  last; no-border: with them last, which the default now does (the name of the record made before);
- the suggestion's strategies (`unet3d.interactive.suggest.STRATEGIES`).
Rows go to `--results` as JSON lines, one per run with its curve; a rerun skips runs already there.
The summary gives, per volume, the IoU on the unannotated voxels at each slice count (mean ± sd
over seeds) and the slices each strategy needs to reach the IoU of evenly spaced (3,3,2) slices.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from harness import volumes
from unet3d.data.sparse import slice_positions
from unet3d.evaluation.metrics import confusion_matrix, scores
from unet3d.interactive.session import Session
from unet3d.interactive.suggest import DEFAULT_STRATEGY, STRATEGIES, candidate_slices, rank_slices

# (Z, Y, X) slice counts of the evenly spaced strategy, 3 to 11 slices: the paper's (x,y,z) settings
# (1,1,1), (2,2,1), (3,3,2), (4,4,3) at 3, 5, 8 and 11, adding x, then y, then z in between.
EVEN_GROWTH = [(1, 1, 1), (1, 1, 2), (1, 2, 2), (1, 2, 3), (1, 3, 3), (2, 3, 3), (2, 3, 4), (2, 4, 4), (3, 4, 4)]
REFERENCE_SLICES = 8  # evenly spaced (x,y,z) = (3,3,2)
PEERS = ("even", "random", "foreground", "oracle")
BY_CHOICE = ("with-border", "no-border")  # peers run only when named in --strategies
SEEDED = ("random", "foreground", "sampled")
DEFAULT_VOLUMES = ("nuclei_tiny", "ovule", "hippocampus_001", "hippocampus_003", "hippocampus_004",
                   "hippocampus_006", "hippocampus_007", "em_vnc_q0")


def slab(shape, axis: int, index: int) -> tuple:
    return tuple(index if a == axis else slice(None) for a in range(3))


def even_mask(shape, counts) -> np.ndarray:
    mask = np.zeros(shape, bool)
    for axis, k in enumerate(counts):
        for index in slice_positions(shape[axis], k):
            mask[slab(shape, axis, index)] = True
    return mask


def foreground(volume: volumes.Volume) -> np.ndarray:
    """Voxels of every class but the most frequent one (the background, or the cell interior)."""
    return volume.truth != np.bincount(volume.truth.ravel()).argmax()


def per_slice_counts(voxels: np.ndarray) -> list[np.ndarray]:
    """Per axis, the number of True voxels in each slice."""
    return [voxels.sum(axis=tuple(a for a in range(3) if a != axis)) for axis in range(3)]


def next_slice(strategy: str, volume: volumes.Volume, mask: np.ndarray, probabilities: np.ndarray,
               labels: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
    if strategy in STRATEGIES:
        best = rank_slices(probabilities, mask, strategy=strategy, count=1, rng=rng)[0]
        return best.axis, best.index
    if strategy in BY_CHOICE:  # no-border: as the default now ranks; kept to read the record made before
        best = rank_slices(probabilities, mask, strategy=DEFAULT_STRATEGY, count=1, rng=rng,
                           border_last=strategy == "no-border")[0]
        return best.axis, best.index
    candidates = candidate_slices(mask)
    if strategy == "random":
        return candidates[rng.integers(len(candidates))]
    if strategy == "foreground":
        counts = per_slice_counts(foreground(volume))
        weights = np.array([counts[a][i] for a, i in candidates], float) + 1e-9
        return candidates[rng.choice(len(candidates), p=weights / weights.sum())]
    if strategy == "oracle":
        counts = per_slice_counts((labels != volume.truth) & ~mask)
        return max(candidates, key=lambda c: counts[c[0]][c[1]])
    raise ValueError(f"unknown strategy {strategy}")


def foreground_iou(volume: volumes.Volume, labels: np.ndarray, where: np.ndarray | None) -> float:
    k = volume.num_classes
    confusion = confusion_matrix(labels, volume.truth, k, mask=where)
    return round(scores(confusion, list(range(k)), background=volume.background)["mean_iou_foreground"], 4)


def run(volume: volumes.Volume, strategy: str, seed: int, steps: int, rounds: int) -> list[dict]:
    """The curve of one strategy: per round, slices painted, annotated voxels and IoU."""
    rng = np.random.default_rng([seed, 7])
    shape = volume.truth.shape
    mask = even_mask(shape, EVEN_GROWTH[0])
    session = Session(volume.image, volume.spacing, seed=seed)
    curve = []
    try:
        for slices in range(3, 3 + rounds):
            painted = np.where(mask, volume.truth + 1, 0).astype(np.int32)  # 0 = unpainted
            session.train_round(painted, seconds=1e9, iterations=steps)
            probabilities = session.probabilities()
            labels = np.asarray(session.class_values)[probabilities.argmax(0)] - 1
            curve.append({"slices": slices, "annotated": int(mask.sum()),
                          "iou": foreground_iou(volume, labels, ~mask), "iou_all": foreground_iou(volume, labels, None)})
            print(f"  {volume.name} {strategy} seed {seed}: {slices} slices, IoU {curve[-1]['iou']:.3f}", flush=True)
            if slices == 2 + rounds:
                break
            if strategy == "even":
                mask = even_mask(shape, EVEN_GROWTH[slices - 2])
            else:
                axis, index = next_slice(strategy, volume, mask, _full_probabilities(probabilities, session, volume),
                                         labels, rng)
                mask[slab(shape, axis, index)] = True
                curve[-1]["next"] = [axis, index]  # the slice this round chose
    finally:
        session.close()
    return curve


def _full_probabilities(probabilities: np.ndarray, session: Session, volume: volumes.Volume) -> np.ndarray:
    """The network's probabilities over every class of the truth (a class not painted yet has 0)."""
    if probabilities.shape[0] == volume.num_classes:
        return probabilities
    full = np.zeros((volume.num_classes,) + probabilities.shape[1:], probabilities.dtype)
    full[np.asarray(session.class_values) - 1] = probabilities
    return full


def slices_to_reach(curve: list[dict], target: float) -> float | None:
    """Slices at which the curve first reaches `target`, interpolated between rounds (None: never)."""
    previous = None
    for point in curve:
        if point["iou"] >= target:
            if previous is None or point["iou"] == previous["iou"]:
                return float(point["slices"])
            share = (target - previous["iou"]) / (point["iou"] - previous["iou"])
            return previous["slices"] + share
        previous = point
    return None


def summarize(rows: list[dict]) -> None:
    """Per volume, the curves (mean ± sd over seeds), the mean IoU from 4 to 8 slices and the
    slices needed to reach evenly spaced (3,3,2); then the slices saved, averaged over volumes."""
    volumes = sorted({r["volume"] for r in rows})
    strategies = [s for s in PEERS + STRATEGIES + BY_CHOICE if any(r["strategy"] == s for r in rows)]
    savings = {s: [] for s in strategies}
    for name in volumes:
        runs = {s: [r["curve"] for r in rows if r["volume"] == name and r["strategy"] == s] for s in strategies}
        last = min(c[-1]["slices"] for c in sum(runs.values(), []))  # the counts every run reached
        runs = {s: [[p for p in c if p["slices"] <= last] for c in curves] for s, curves in runs.items()}
        target = _reference(runs.get("even"))
        print(f"\n{name}: IoU on the unannotated voxels (mean ± sd over seeds), by slices painted"
              + (f"; evenly spaced (3,3,2) = {target:.3f}" if target is not None else ""))
        counts = sorted({p["slices"] for c in sum(runs.values(), []) for p in c})
        print("| strategy | seeds | " + " | ".join(str(n) for n in counts) + " | mean 4–8 | slices to reach (3,3,2) |")
        print("|---|---|" + "---|" * len(counts) + "---|---|")
        for strategy, curves in runs.items():
            if not curves:
                continue
            cells = [_spread([p["iou"] for c in curves for p in c if p["slices"] == n]) for n in counts]
            cells.append(_spread([np.mean([p["iou"] for p in c if 4 <= p["slices"] <= REFERENCE_SLICES]) for c in curves]))
            needed = [_needed(c, target) for c in curves] if target is not None else []
            if needed:
                savings[strategy].append(1 - np.mean([n for n, _ in needed]) / REFERENCE_SLICES)
                short = sum(not reached for _, reached in needed)
                cells.append(f"{'≥ ' if short else ''}{np.mean([n for n, _ in needed]):.1f}"
                             + (f" ({short} of {len(needed)} not by {curves[0][-1]['slices']})" if short else ""))
            else:
                cells.append("")
            print(f"| {strategy} | {len(curves)} | " + " | ".join(cells) + " |")
        print("slices chosen (axis=index, per run): " + "; ".join(
            f"{strategy}: " + ", ".join(_chosen(c) for c in curves) for strategy, curves in runs.items() if curves))
    print("\nSlices saved against evenly spaced (3,3,2), averaged over the volumes (a run that never reaches "
          "it counts as one slice beyond its last):")
    for strategy, values in savings.items():
        if values:
            print(f"  {strategy}: {100 * np.mean(values):.0f} % over {len(values)} volume(s)")


def _chosen(curve: list[dict]) -> str:
    """The slices a run added, in order, as 'z=0 y=30'."""
    return " ".join(f"{'zyx'[p['next'][0]]}={p['next'][1]}" for p in curve if "next" in p) or "-"


def _reference(even: list[list[dict]] | None) -> float | None:
    """Evenly spaced (3,3,2)'s IoU, the mean over the seeds of the even strategy."""
    values = [p["iou"] for c in even or [] for p in c if p["slices"] == REFERENCE_SLICES]
    return float(np.mean(values)) if values else None


def _needed(curve: list[dict], target: float) -> tuple[float, bool]:
    """Slices the curve needs to reach `target`, and whether it did (else its last count + 1)."""
    reached = slices_to_reach(curve, target)
    return (reached, True) if reached is not None else (curve[-1]["slices"] + 1.0, False)


def _spread(values: list[float]) -> str:
    if not values:
        return ""
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="nuclei_tiny only, 2 rounds of 5 steps: keeps the code working")
    parser.add_argument("--volumes", nargs="+", default=list(DEFAULT_VOLUMES))
    parser.add_argument("--strategies", nargs="+", default=list(PEERS) + [DEFAULT_STRATEGY],
                        choices=list(PEERS) + list(STRATEGIES) + list(BY_CHOICE))
    parser.add_argument("--seeds", type=int, default=5, help="seeds of random and sampled slices (others: 1)")
    parser.add_argument("--foreground-seeds", type=int, default=3, help="seeds of foreground-aware random slices")
    parser.add_argument("--network-seeds", type=int, default=1,
                        help="seeds of the network's training for the deterministic strategies (even, oracle, suggestion)")
    parser.add_argument("--steps", type=int, default=60, help="training steps per round")
    parser.add_argument("--rounds", type=int, default=6, help="rounds (3 slices + one per round: 6 ends at the 8 "
                        "slices of (3,3,2), 9 at the 11 of (4,4,3))")
    parser.add_argument("--results", type=Path, default=Path("results/suggest.jsonl"))
    args = parser.parse_args(argv)
    if args.quick:
        args.volumes, args.seeds, args.foreground_seeds, args.network_seeds = ["nuclei_tiny"], 1, 1, 1
        args.steps, args.rounds = 5, 2
        args.results = args.results.with_name("suggest-quick.jsonl")
        args.results.unlink(missing_ok=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in args.results.read_text().splitlines()] if args.results.exists() else []
    done = {(r["volume"], r["strategy"], r["seed"], r["steps"]) for r in rows}
    for name in args.volumes:
        volume = volumes.load(name)
        for strategy in args.strategies:
            seeds = (args.foreground_seeds if strategy == "foreground" else args.seeds if strategy in SEEDED
                     else args.network_seeds)
            for seed in range(seeds):
                if (name, strategy, seed, args.steps) in done:
                    continue
                curve = run(volume, strategy, seed, args.steps, args.rounds)
                row = {"volume": name, "strategy": strategy, "seed": seed, "steps": args.steps, "curve": curve}
                with args.results.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                rows.append(row)
    summarize([r for r in rows if r["steps"] == args.steps and r["volume"] in args.volumes])


if __name__ == "__main__":
    main()
