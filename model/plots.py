"""The learning-curve plot: train and validation loss (and mAP@0.5) per epoch."""

from __future__ import annotations

import io
from pathlib import Path

# The object-oriented Figure API, not pyplot: no global state, so API threads may draw at
# once, and no display backend is needed.
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .run_folder import atomic_write


def plot_losses(records: list[dict], path: Path | None = None) -> bytes:
    """Draw the curves of the epoch ``records`` and return the PNG; also write it to ``path`` if given.

    Args:
        records: epoch records with ``epoch``, ``train_loss`` and optionally ``val_loss``
            and ``val_map50`` (None where not measured).
    """
    epochs = [r["epoch"] for r in records]
    fig = Figure(figsize=(7, 4.2), dpi=100)
    ax = fig.subplots()
    ax.plot(epochs, [r["train_loss"] for r in records], "o-", label="train loss")
    val = [(r["epoch"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if val:
        ax.plot(*zip(*val, strict=True), "s-", label="validation loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    maps = [(r["epoch"], r["val_map50"]) for r in records if r.get("val_map50") is not None]
    if maps:
        ax2 = ax.twinx()
        ax2.plot(*zip(*maps, strict=True), "^--", color="tab:green", label="val mAP@0.5")
        ax2.set_ylabel("mAP@0.5")
        ax2.set_ylim(0, 1)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(handles, labels, loc="upper right")
    ax.set_title("Learning curve")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    png = buffer.getvalue()
    if path is not None:
        atomic_write(Path(path), lambda file: file.write(png))
    return png
