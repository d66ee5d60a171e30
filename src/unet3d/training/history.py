"""The training log: JSON lines for machines, a PNG curve for people."""

from __future__ import annotations

import json

import numpy as np

from unet3d.atomic import atomic_path


def write_log(path, history: list[dict]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(entry) + "\n" for entry in history))


def plot_curve(path, history: list[dict]) -> None:
    """Training loss (raw and smoothed) against iterations, validation IoU on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [e for e in history if "loss" in e]
    val = [e for e in history if "val_mean_iou" in e]
    if not train:
        return
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = np.array([e["iteration"] for e in train])
    loss = np.array([e["loss"] for e in train])
    ax.plot(steps, loss, color="tab:blue", alpha=0.3, lw=1)
    window = max(1, len(loss) // 20)
    smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
    ax.plot(steps[window - 1:], smooth, color="tab:blue", lw=2, label="training loss")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    if val:
        ax2 = ax.twinx()
        ax2.plot([e["iteration"] for e in val], [e["val_mean_iou"] for e in val], "o-", color="tab:orange",
                 label="validation mean IoU")
        ax2.set_ylabel("IoU")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="lower right")
    ax.legend(loc="upper right")
    ax.set_title("unet3d training")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
