"""Learning curves of a fine-tuning run as a PNG (matplotlib, Agg backend)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

__all__ = ["plot_curves"]


def plot_curves(history: Sequence[dict[str, Any]], path: str | os.PathLike[str], *, title: str = "") -> Path:
    """Write train / validation loss (left) and accuracy (right) per epoch to ``path`` (PNG).

    history : :attr:`~featurebank.finetune.train.TrainResult.history` (epoch 0, the starting
        weights, has validation figures only). Written to a temporary file then renamed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    for key, label, ax in (("train_loss", "train", ax_loss), ("val_loss", "validation", ax_loss),
                           ("train_accuracy", "train", ax_acc), ("val_accuracy", "validation", ax_acc)):
        points = [(h["epoch"], h[key]) for h in history if h.get(key) is not None]
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()
    return path
