"""The reports of a training run: ``metrics.csv`` (one row per epoch) and ``metrics.png`` (the curves)."""

from __future__ import annotations

import csv
import io
from typing import Any, Dict, List

from ..files import atomic_write, write_text

__all__ = ["CSV_FIELDS", "EMA_FIELDS", "write_metrics_csv", "plot_history"]

CSV_FIELDS = ["epoch", "train_loss", "val_loss", "top1", "top5", "lr", "time"]
EMA_FIELDS = ["raw_val_loss", "raw_top1", "raw_top5"]


def write_metrics_csv(history: List[Dict[str, Any]], path: str, ema: bool = False) -> None:
    """Writes one row per epoch (floats to 6 significant digits), all-or-nothing.

    Args:
        history: The epochs' metrics (``TrainState.history``).
        path: The CSV file.
        ema: Add the columns of the raw (non-EMA) weights' validation.

    Raises:
        metaformer.files.WriteError: when the file cannot be written.
    """
    fields = CSV_FIELDS + (EMA_FIELDS if ema else [])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    write_text(path, buf.getvalue())


def plot_history(history: List[Dict[str, Any]], path: str, title: str = "") -> bool:
    """Draws the loss and accuracy curves of a run into a PNG, all-or-nothing.

    Returns:
        False when matplotlib is not installed (nothing is written), else True.

    Raises:
        metaformer.files.WriteError: when the file cannot be written.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return False
    epochs = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    try:
        ax1.plot(epochs, [r["train_loss"] for r in history], marker="o", label="train loss")
        if any(r.get("val_loss") is not None for r in history):
            ax1.plot(epochs, [r.get("val_loss") for r in history], marker="o", label="val loss")
            ax2.plot(epochs, [r.get("top1") for r in history], marker="o", label="top-1")
            ax2.plot(epochs, [r.get("top5") for r in history], marker="o", label="top-5")
        for ax, ylabel in ((ax1, "loss"), (ax2, "accuracy (%)")):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("epoch")
            ax.set_ylabel(ylabel)
            ax.legend()
            ax.grid(alpha=0.3)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)
    return True
