"""Pictures of a pseudo-labelling: cluster sizes, sample images per cluster, agreement with
the true identities, and the curves of self-training rounds. Each function writes one PNG
(headless) and returns its path."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator, ScalarFormatter  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from reid_platform.data.dataset import ImageDecodeError, read_image  # noqa: E402
from reid_platform.data.formats import Sample  # noqa: E402
from reid_platform.evaluation.pictures import save_figure  # noqa: E402

TILE = (48, 96)  # width, height of one image in the sample grid (inside its frame)
FRAME = 3
MAJORITY, OTHER, UNKNOWN = (0, 170, 0), (220, 0, 0), (160, 160, 160)


def plot_cluster_sizes(sizes: np.ndarray, num_outliers: int, path: str | Path,
                       title: str = "") -> Path:
    """Histogram of images per cluster (log-spaced bins), outliers in the title.

    Args:
        sizes: (C,) images per cluster.
        num_outliers: images in no cluster.
    """
    sizes = np.asarray(sizes)
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    if len(sizes):
        edges = np.unique(np.round(np.geomspace(1, sizes.max() + 1, 30)).astype(int))
        ax.hist(sizes, bins=edges if len(edges) > 1 else 1, color="#4477aa", edgecolor="white")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("images per cluster")
    ax.set_ylabel("clusters")
    median = float(np.median(sizes)) if len(sizes) else 0.0
    ax.set_title(
        f"{title + ': ' if title else ''}{len(sizes)} clusters (median {median:g}, "
        f"largest {int(sizes.max()) if len(sizes) else 0}), {num_outliers} outliers",
        fontsize=8,
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def _tile(sample: Sample, frame: tuple[int, int, int]) -> np.ndarray:
    """(H, W, 3) uint8 thumbnail in a coloured frame; an unreadable file is a grey tile."""
    try:
        image = Image.fromarray(read_image(sample.path, sample.box)).resize(
            TILE, Image.Resampling.BILINEAR
        )
    except ImageDecodeError:
        image = Image.new("RGB", TILE, (200, 200, 200))
    return np.asarray(ImageOps.expand(image, border=FRAME, fill=frame))


def plot_cluster_samples(
    members: Sequence[Sequence[Sample]],
    path: str | Path,
    true_pids: Sequence[Sequence[int]] | None = None,
    row_labels: Sequence[str] | None = None,
    per_row: int = 10,
    title: str = "",
) -> Path:
    """A grid: one row per cluster, its first `per_row` images.

    With true labels, a frame is green when the image's identity is its cluster's most common
    one and red otherwise; grey without labels.

    Args:
        members: per cluster drawn, its samples.
        true_pids: per cluster, the true pid of each sample (-1 = unknown), or None.
        row_labels: text left of each row (e.g. the pseudo id and the cluster's size).
    """
    cell_w, cell_h = TILE[0] + 2 * FRAME + 4, TILE[1] + 2 * FRAME + 4
    rows = max(1, len(members))
    margin = 60 if row_labels else 0
    canvas = np.full((rows * cell_h, margin + per_row * cell_w, 3), 255, dtype=np.uint8)
    for r, samples in enumerate(members):
        pids = np.asarray(true_pids[r]) if true_pids is not None else None
        majority = None
        if pids is not None and (pids >= 0).any():
            values, counts = np.unique(pids[pids >= 0], return_counts=True)
            majority = values[np.argmax(counts)]
        for c, sample in enumerate(samples[:per_row]):
            if majority is None or pids[c] < 0:
                frame = UNKNOWN
            else:
                frame = MAJORITY if pids[c] == majority else OTHER
            tile = _tile(sample, frame)
            top, left = r * cell_h + 2, margin + c * cell_w + 2
            canvas[top : top + tile.shape[0], left : left + tile.shape[1]] = tile
    dpi = 100
    fig = plt.figure(figsize=(canvas.shape[1] / dpi, canvas.shape[0] / dpi + 0.4), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, canvas.shape[0] / (canvas.shape[0] + 40)))
    ax.imshow(canvas, interpolation="nearest")
    for r, text in enumerate(row_labels or []):
        ax.text(margin - 6, r * cell_h + cell_h / 2, text, ha="right", va="center", fontsize=7)
    ax.set_axis_off()
    legend = ("green: the cluster's most common true identity, red: another"
              if true_pids is not None else "one row per cluster")
    fig.text(0.5, 0.995, f"{title or 'clusters'} ({legend})", ha="center", va="top", fontsize=7)
    return save_figure(fig, path)


def plot_truth_comparison(scores: Mapping[str, float], num_clusters: int, num_true_ids: int,
                          path: str | Path, title: str = "") -> Path:
    """Bars: ARI / NMI / purity, and the number of clusters against true identities."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(7, 3.2), dpi=100,
                                      gridspec_kw={"width_ratios": [3, 2]})
    names = [k for k in ("ari", "nmi", "purity", "ari_all", "nmi_all") if k in scores]
    values = [scores[k] for k in names]
    bars = left.bar(names, values, color="#4477aa")
    left.bar_label(bars, fmt="%.3f", fontsize=7)
    left.set_ylim(0, 1.05)
    left.set_title("agreement with the true identities", fontsize=8)
    left.tick_params(labelsize=7)
    counts = right.bar(["clusters", "true ids"], [num_clusters, num_true_ids],
                       color=["#4477aa", "#999999"])
    right.bar_label(counts, fontsize=7)
    right.set_title("identities", fontsize=8)
    right.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_rounds(rows: Sequence[Mapping[str, float]], path: str | Path, title: str = "") -> Path:
    """Self-training curves against the round: mAP / rank-1 (left), ARI / NMI (middle),
    clusters and outliers found (right). Missing values are skipped."""
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.3), dpi=100)
    rounds = np.array([r["round"] for r in rows])

    def draw(ax, keys, ylabel):
        for key in keys:
            points = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                x, y = zip(*points)
                ax.plot(x, y, marker="o", label=key)
        ax.set_xticks(rounds)
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)

    draw(axes[0], ("mAP", "rank1"), "labelled evaluation split")
    draw(axes[1], ("ari", "nmi", "purity"), "clustering vs true ids")
    draw(axes[2], ("num_clusters", "num_outliers", "num_true_ids"), "images / identities")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
