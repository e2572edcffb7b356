"""The loss-curve PNG: training loss per logged step and validation loss per evaluation."""
from __future__ import annotations

from typing import Iterable, Optional


def plot_losses(records: Iterable[dict], path: str) -> Optional[str]:
    """Write the plot to ``path``; None when matplotlib (the [logging] extra) is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = list(records)
    train = [(r["iter"], r["loss"]) for r in records if r.get("loss") is not None]
    val = [(r["iter"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.0, alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss", linewidth=1.5, markersize=3)
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
