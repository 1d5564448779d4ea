"""The reports of a training run: ``metrics.csv`` (one row per epoch) and ``metrics.png`` (the curves)."""

from __future__ import annotations

import csv
import io
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..files import atomic_write, write_text

__all__ = ["CSV_FIELDS", "EMA_FIELDS", "write_metrics_csv", "plot_history"]

CSV_FIELDS = ["epoch", "train_loss", "val_loss", "top1", "top5", "lr", "time"]
EMA_FIELDS = ["raw_val_loss", "raw_top1", "raw_top5"]


def write_metrics_csv(history: List[Dict[str, Any]], path: str, ema: bool = False,
                      fields: Optional[Sequence[str]] = None) -> None:
    """Writes one row per epoch (floats to 6 significant digits), all-or-nothing.

    Args:
        history: The epochs' metrics (``TrainState.history``).
        path: The CSV file.
        ema: Add the columns of the raw (non-EMA) weights' validation.
        fields: The columns (default: :data:`CSV_FIELDS`, classification's).

    Raises:
        metaformer.files.WriteError: when the file cannot be written.
    """
    fields = list(CSV_FIELDS if fields is None else fields) + (EMA_FIELDS if ema else [])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    write_text(path, buf.getvalue())


def plot_history(history: List[Dict[str, Any]], path: str, title: str = "", *, x: str = "epoch",
                 curves: Sequence[Tuple[str, str]] = (("top1", "top-1"), ("top5", "top-5")),
                 ylabel: str = "accuracy (%)") -> bool:
    """Draws the loss and accuracy curves of a run into a PNG, all-or-nothing.

    Args:
        history: The rows of ``TrainState.history``.
        path: The PNG file.
        title: Title of the figure.
        x: The column of the horizontal axis.
        curves: ``(column, label)`` of the validation metrics drawn on the right.
        ylabel: Their axis label.

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
    epochs = [r[x] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    try:
        ax1.plot(epochs, [r["train_loss"] for r in history], marker="o", label="train loss")
        if any(r.get("val_loss") is not None for r in history):
            ax1.plot(epochs, [r.get("val_loss") for r in history], marker="o", label="val loss")
        for key, label in curves:
            if any(r.get(key) is not None for r in history):
                ax2.plot(epochs, [r.get(key) for r in history], marker="o", label=label)
        for ax, axis_label in ((ax1, "loss"), (ax2, ylabel)):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel(x)
            ax.set_ylabel(axis_label)
            ax.legend()
            ax.grid(alpha=0.3)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)
    return True
