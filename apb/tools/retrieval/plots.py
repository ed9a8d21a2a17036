"""The learning-curve figure (docs/results/training-curve.png) from a saved ``training_log.json``."""

from __future__ import annotations

import json
from pathlib import Path

from apb.tools import tasks


def plot_curve(log_path: Path, png: Path) -> None:
    """Answer loss and held-out accuracy per task against step, stage lengths marked."""
    import matplotlib  # here, not at the top: matplotlib is optional (the bench/test extras)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional, as above; after use("Agg")

    curve = json.loads(Path(log_path).read_text())["curve"]
    loss = [(r["step"], r["loss"]) for r in curve if "loss" in r]
    acc = [r for r in curve if "accuracy" in r]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    ax1.plot(*zip(*loss), lw=1)
    ax1.set_ylabel("answer loss (nats)")
    ax1.set_yscale("log")
    for task in tasks.TASKS:
        ax2.plot([r["step"] for r in acc], [r["accuracy"][task] for r in acc], marker="o", ms=3, label=task)
    ax2.set_ylabel("held-out accuracy (teacher forced)")
    ax2.set_xlabel("step")
    ax2.legend()
    starts = {}
    for r in curve:
        starts.setdefault(r["length"], r["step"])
    for length, step in starts.items():
        for ax in (ax1, ax2):
            ax.axvline(step, color="grey", lw=0.5, ls=":")
        ax2.text(step, 0.02, f" {length}", fontsize=7, color="grey")
    fig.suptitle("apb-retrieval training (stage lengths in tokens)")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
