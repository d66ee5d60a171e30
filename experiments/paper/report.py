"""The Markdown report and the figure, rebuilt from the JSON-lines records after every run."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from unet3d.atomic import atomic_path

# The paper's numbers (/work/shared/PAPER.md): 3D U-Net with BN on three Xenopus kidney volumes.
PAPER_SLICES = {  # slices per axis: (labeled %, IoU of samples 1..3)
    "1,1,1": (2.5, (0.331, 0.483, 0.475)),
    "2,2,1": (3.3, (0.676, 0.579, 0.738)),
    "3,3,2": (5.7, (0.761, 0.808, 0.835)),
    "4,4,3": (8.1, (0.856, 0.849, 0.872)),
}
PAPER_CROSSVAL = {"unet3d_nobn": (0.822, 0.857, 0.846), "unet3d": (0.855, 0.871, 0.863), "unet2d": (0.785, 0.820, 0.782)}
PAPER_AUTOMATIC = {"unet3d_nobn": (0.655, 0.734, 0.779), "unet3d": (0.761, 0.798, 0.554), "unet2d": (0.619, 0.698, 0.325)}
METHOD_NAMES = {"unet3d": "3D U-Net (BN)", "unet3d_nobn": "3D U-Net w/o BN", "unet2d": "2D U-Net (BN)",
                "forest": "random forest", "unet3d_dense": "3D U-Net, dense labels"}
ORDER = ("unet3d", "unet3d_nobn", "unet2d", "forest", "unet3d_dense")


def summarize(records: list[dict], experiment: str) -> dict:
    """{group: {(setting, method): {mean_iou, sd, seeds, iou per class, labeled, volumes, seconds}}}:
    averaged over volumes, then mean and standard deviation over seeds."""
    cells = defaultdict(lambda: defaultdict(list))
    for record in records:
        if record["experiment"] == experiment:
            cells[record["group"]][(record["setting"], record["method"])].append(record)
    return {group: {key: _mean_cell(runs) for key, runs in table.items()} for group, table in cells.items()}


def _mean_cell(runs: list[dict]) -> dict:
    scores = [s for r in runs for s in r["scores"]]
    classes = sorted({c for s in scores for c in s["iou"]}, key=int)
    per_class = {c: _mean([s["iou"].get(c) for s in scores]) for c in classes}
    by_seed = defaultdict(list)
    for run in runs:
        by_seed[run.get("seed", 0)] += [s["mean_iou"] for s in run["scores"]]
    seed_means = [m for m in (_mean(v) for v in by_seed.values()) if m is not None]
    return {"mean_iou": _mean(seed_means), "sd": float(np.std(seed_means, ddof=1)) if len(seed_means) > 1 else None,
            "seeds": len(by_seed), "iou": per_class, "volumes": len(scores) // len(by_seed),
            "labeled": float(np.mean([r["labeled_fraction"] for r in runs])), "seconds": sum(r["seconds"] for r in runs)}


def _mean(values) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _cell(cell: dict | None) -> str:
    if cell is None:
        return "not run"
    classes = " / ".join("–" if v is None else f"{v:.2f}" for v in cell["iou"].values())
    spread = f" ± {cell['sd']:.3f}" if cell["sd"] is not None else ""
    return f"**{_fmt(cell['mean_iou'])}**{spread} ({classes})"


def _methods(table: dict) -> list[str]:
    present = {method for _, method in table}
    return [m for m in ORDER if m in present]


def _volumes_note(table: dict) -> str:
    volumes, seeds = (max(cell[key] for cell in table.values()) for key in ("volumes", "seeds"))
    fewest = min(cell["seeds"] for cell in table.values())
    counted = f"{seeds} seeds" if fewest == seeds else f"{fewest}–{seeds} seeds per cell, one where no ± is shown"
    parts = ([f"{volumes} volumes averaged"] if volumes > 1 else []) + ([counted] if seeds > 1 else [])
    return f" ({', '.join(parts)})" if parts else ""


def slices_section(summary: dict) -> list[str]:
    lines = ["## 1. Number of annotated slices (semi-automatic, the paper's slice table)", "",
             "IoU on the voxels nobody annotated: **mean over foreground classes** (em_vnc: over all four "
             "classes, its class 0 is membrane) and, in brackets, per class 0 / 1 / …. The dense row trains on "
             "every voxel and is scored on every voxel (fit within the same budget: an upper bound). "
             "± is the standard deviation over seeds (each seed's value a mean over the volumes). "
             "Slices per axis as the paper writes them, (x,y,z): 4,4,3 is 4 yz-, 4 xz- and 3 xy-slices. "
             "Paper: 3D U-Net with BN, mean of its three samples.", ""]
    for group, table in summary.items():
        methods = [m for m in _methods(table) if m != "unet3d_dense"]
        lines += [f"### {group}{_volumes_note(table)}", "",
                  "| slices (x,y,z) | labeled % | " + " | ".join(METHOD_NAMES[m] for m in methods) + " | paper labeled % | paper IoU |",
                  "|---" * (len(methods) + 4) + "|"]
        for setting in sorted({s for s, _ in table if s != "dense"}):
            labeled = next(table[(setting, m)]["labeled"] for m in methods if (setting, m) in table)
            paper = PAPER_SLICES.get(setting)
            paper_cells = f"{paper[0]} | {np.mean(paper[1]):.3f}" if paper else "– | –"
            lines.append(f"| {setting} | {100 * labeled:.1f} | " + " | ".join(_cell(table.get((setting, m))) for m in methods)
                         + f" | {paper_cells} |")
        if ("dense", "unet3d_dense") in table:
            blanks = " | ".join(["–"] * (len(methods) + 1))
            lines.append(f"| all (dense: {METHOD_NAMES['unet3d_dense']}) | 100 | {_cell(table[('dense', 'unet3d_dense')])} | {blanks} |")
        lines.append("")
    return lines


def comparison_section(title: str, summary: dict, paper: dict, note: str) -> list[str]:
    lines = [title, "", note, ""]
    for group, table in summary.items():
        methods = _methods(table)
        settings = sorted({s for s, _ in table})
        lines += [f"### {group}{_volumes_note(table)}", "",
                  "| test | " + " | ".join(METHOD_NAMES[m] for m in methods) + " |", "|---" * (len(methods) + 1) + "|"]
        for setting in settings:
            lines.append(f"| {setting} | " + " | ".join(_cell(table.get((setting, m))) for m in methods) + " |")
        averages = [_mean([table[(s, m)]["mean_iou"] for s in settings if (s, m) in table]) for m in methods]
        lines += ["| **average** | " + " | ".join(_fmt(a) for a in averages) + " |", ""]
    lines += ["Paper (Xenopus kidney, 3 volumes):", "", "| test | " + " | ".join(METHOD_NAMES[m] for m in paper) + " |",
              "|---" * (len(paper) + 1) + "|"]
    for index in range(3):
        lines.append(f"| {index + 1} | " + " | ".join(f"{paper[m][index]:.3f}" for m in paper) + " |")
    lines += ["| **average** | " + " | ".join(f"{np.mean(paper[m]):.3f}" for m in paper) + " |", ""]
    return lines


def plot_slices(summary: dict, path: Path) -> None:
    """Mean IoU against labeled fraction, one panel per data set, one curve per method, the paper's in grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(1, len(summary)), figsize=(4.2 * max(1, len(summary)), 3.8), squeeze=False)
    paper = sorted(PAPER_SLICES.values())
    for ax, (group, table) in zip(axes[0], summary.items()):
        ax.plot([p[0] for p in paper], [np.mean(p[1]) for p in paper], "--", color="grey", marker="s", label="paper (3D, BN)")
        for method in _methods(table):
            points = sorted((100 * c["labeled"], c["mean_iou"]) for (s, m), c in table.items()
                            if m == method and s != "dense" and c["mean_iou"] is not None)
            if points:
                ax.plot(*zip(*points), marker="o", label=METHOD_NAMES[method])
            elif ("dense", method) in table:
                ax.axhline(table[("dense", method)]["mean_iou"], color="black", lw=0.8, label=METHOD_NAMES[method])
        ax.set_title(group)
        ax.set_xlabel("labeled voxels (%)")
        ax.set_ylabel("IoU on unlabeled voxels")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def write_report(records: list[dict], out: Path, header: list[str]) -> Path:
    """report.md (and figures/iou_vs_labeled.png) in `out` from every record so far."""
    lines = ["# The 3D U-Net paper's experiments on public volumes", "", *header, ""]
    slices = summarize(records, "slices")
    if slices:
        plot_slices(slices, out / "figures" / "iou_vs_labeled.png")
        lines += slices_section(slices) + ["![IoU against labeled fraction](figures/iou_vs_labeled.png)", ""]
    crossval = summarize(records, "crossval")
    if crossval:
        lines += comparison_section(
            "## 2. Semi-automatic 3-fold cross-validation (the paper's Table 1)", crossval, PAPER_CROSSVAL,
            "The (x,y,z) = (4,4,3) annotated slices of a volume dealt into three subsets (4, 4 and 3 slices, each with "
            "slices of several axes); train on two, IoU on the third subset's voxels that no training slice covers.")
    automatic = summarize(records, "automatic")
    if automatic:
        lines += comparison_section(
            "## 3. Fully automatic (the paper's Table 3)", automatic, PAPER_AUTOMATIC,
            "Train on (x,y,z) = (4,4,3) slices of each training volume (dense method: every voxel), segment unseen "
            "volumes, IoU on all their voxels. em_vnc: four 20×512×512 quarters, each held out once.")
    lines += ["## Runs", "", "| run | budget | labeled % | mean IoU | iterations | seconds (train / predict / total) |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['id']} | {r['budget']} | {100 * r['labeled_fraction']:.1f} | {_fmt(r['mean_iou'])} | {r['iterations'] or '–'} | "
              f"{r['seconds_train']} / {r['seconds_predict']} / {r['seconds']} |" for r in records]
    path = out / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path
