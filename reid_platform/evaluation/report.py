"""Pictures people look at: the CMC curve (more in later additions)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_cmc(curves: Mapping[str, np.ndarray], path: str | Path, max_rank: int = 20) -> Path:
    """Save CMC curves (rank-k accuracy against k) of one or more variants as a PNG.

    Args:
        curves: variant name -> CMC array (length >= 1, values in [0, 1]).
        path: output PNG path.
        max_rank: last rank drawn.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    for name, cmc in curves.items():
        cmc = np.asarray(cmc)[:max_rank]
        ax.plot(np.arange(1, len(cmc) + 1), 100 * cmc, marker="o", markersize=3,
                label=f"{name} (R1 {100 * cmc[0]:.1f})")
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("CMC")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
