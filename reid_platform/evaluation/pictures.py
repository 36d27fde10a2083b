"""Pictures people look at: CMC curves, ranked lists, a 2-D scatter of embeddings and
activation maps (where the model looks).

Every `plot_*` function writes one PNG (headless, Agg backend) and returns its path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from PIL import Image  # noqa: E402

from reid_platform.data.dataset import ImageDecodeError, read_image  # noqa: E402

Box = tuple[int, int, int, int]

# Frame colours of the ranked lists (RGB 0-255).
TRUE_MATCH = (0, 170, 0)
FALSE_MATCH = (220, 0, 0)
JUNK = (150, 150, 150)
QUERY_FRAME = (30, 30, 30)

TILE_HEIGHT, TILE_WIDTH, BORDER, GAP, LABEL_HEIGHT = 128, 64, 5, 8, 22


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write `fig` to `path` (its folder created) and close it; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path

def cmc_axis_floor(curves: Mapping[str, np.ndarray], max_rank: int = 20) -> float:
    """Lower end of the CMC y-axis, in %: 5 below the lowest rank-1, on a multiple of 5.

    Starting the axis at 0 squeezes curves that differ by a few points into a line.
    """
    lowest = min(float(np.asarray(cmc)[:max_rank].min()) for cmc in curves.values())
    return float(max(0.0, 5.0 * np.floor((100.0 * lowest - 5.0) / 5.0)))


def plot_cmc(curves: Mapping[str, np.ndarray], path: str | Path, max_rank: int = 20) -> Path:
    """Save CMC curves (rank-k accuracy against k) of one or more variants as a PNG.

    The y-axis starts just below the lowest curve (`cmc_axis_floor`), not at 0.

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
        ax.plot(
            np.arange(1, len(cmc) + 1),
            100 * cmc,
            marker="o",
            markersize=3,
            label=f"{name} (R1 {100 * cmc[0]:.1f})",
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate (%)")
    ax.set_ylim(cmc_axis_floor(curves, max_rank), 100.5)  # 100.5: markers at 100 stay whole
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("CMC")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ---- ranked lists -------------------------------------------------------------------------


def _tile(path: str, box: Box | None, frame: tuple[int, int, int]) -> np.ndarray:
    """The image resized to the tile size inside a coloured frame; (H, W, 3) uint8.

    An unreadable image becomes a grey tile: a picture must not fail on one bad file.
    """
    inner = (TILE_HEIGHT - 2 * BORDER, TILE_WIDTH - 2 * BORDER)
    try:
        image = Image.fromarray(read_image(path, box)).resize(
            (inner[1], inner[0]), Image.Resampling.BILINEAR
        )
        pixels = np.asarray(image)
    except ImageDecodeError:
        pixels = np.full((*inner, 3), 200, dtype=np.uint8)
    tile = np.empty((TILE_HEIGHT, TILE_WIDTH, 3), dtype=np.uint8)
    tile[:] = frame
    tile[BORDER:-BORDER, BORDER:-BORDER] = pixels
    return tile


def match_kinds(q_pid: int, q_camid: int, g_pids: np.ndarray, g_camids: np.ndarray) -> np.ndarray:
    """Market-1501 kind of each gallery item for one query: "true", "false" or "junk".

    Junk: gallery pid -1, or the query's pid seen by the query's own camera.

    Returns:
        (len(g_pids),) array of str.
    """
    g_pids, g_camids = np.asarray(g_pids), np.asarray(g_camids)
    same_pid = g_pids == q_pid
    junk = (g_pids == -1) | (same_pid & (g_camids == q_camid))
    return np.where(junk, "junk", np.where(same_pid, "true", "false"))


FRAMES = {"true": TRUE_MATCH, "false": FALSE_MATCH, "junk": JUNK}


def pick_queries(num_query: int, num_queries: int) -> np.ndarray:
    """Evenly spaced query indices (deterministic, covers the whole list)."""
    count = min(num_queries, num_query)
    return np.unique(np.linspace(0, num_query - 1, count).round().astype(np.int64))


def plot_ranked_lists(
    query_paths: Sequence[str],
    gallery_paths: Sequence[str],
    distmat: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    path: str | Path,
    num_queries: int = 8,
    topk: int = 10,
    query_boxes: Sequence[Box | None] | None = None,
    gallery_boxes: Sequence[Box | None] | None = None,
    title: str = "",
    similarity: bool = False,
    value_name: str = "",
    query_ids: Sequence[int] | None = None,
) -> Path:
    """Save a grid: each row a query, then its top-k gallery images by distance.

    Frames follow the Market-1501 protocol: green = true match, red = false match, grey = junk
    (same pid and same camera as the query, or gallery pid -1), which the metrics ignore. The
    number over each image is its distance, or with `similarity` its cosine similarity
    1 - distance (what the retrieval service returns); the legend says which.

    Args:
        query_paths: (num_query,) image files of the queries.
        gallery_paths: (num_gallery,) image files of the gallery.
        distmat: (num_query, num_gallery) distances, smaller is closer.
        q_pids, q_camids: (num_query,) query identities and cameras.
        g_pids, g_camids: (num_gallery,) gallery identities and cameras.
        path: output PNG path.
        num_queries: rows drawn, evenly spaced over the queries.
        topk: gallery images per row.
        query_boxes, gallery_boxes: optional (x, y, w, h) crops, one per image (or None).
        title: drawn above the grid.
        similarity: distmat is 1 - cosine similarity; show the similarity.
        value_name: what the numbers are, for the legend (default: "cosine similarity" or
            "distance").
        query_ids: the number shown for each query row ("q12"; default: its row index), e.g.
            when distmat holds only some rows of a larger matrix.

    Raises:
        ValueError: the shapes of distmat, paths and labels disagree.
    """
    distmat = np.asarray(distmat)
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)
    if distmat.ndim != 2:
        raise ValueError(f"distmat must be 2-D (num_query, num_gallery), got {distmat.shape}")
    num_query, num_gallery = distmat.shape
    if len(query_paths) != num_query or q_pids.shape != (num_query,) or len(q_camids) != num_query:
        raise ValueError(
            f"distmat has shape {distmat.shape} but there are {len(query_paths)} query paths, "
            f"q_pids of shape {q_pids.shape} and q_camids of shape {q_camids.shape}"
        )
    if (
        len(gallery_paths) != num_gallery
        or g_pids.shape != (num_gallery,)
        or len(g_camids) != num_gallery
    ):
        raise ValueError(
            f"distmat has shape {distmat.shape} but there are {len(gallery_paths)} gallery "
            f"paths, g_pids of shape {g_pids.shape} and g_camids of shape {g_camids.shape}"
        )
    query_boxes = query_boxes or [None] * num_query
    gallery_boxes = gallery_boxes or [None] * num_gallery
    query_ids = list(range(num_query)) if query_ids is None else list(query_ids)
    if len(query_ids) != num_query:
        raise ValueError(f"{len(query_ids)} query_ids for distmat of shape {distmat.shape}")
    rows = pick_queries(num_query, num_queries)
    topk = max(1, min(topk, num_gallery))

    cell_w, cell_h = TILE_WIDTH + GAP, TILE_HEIGHT + LABEL_HEIGHT
    canvas = np.full((len(rows) * cell_h, (topk + 1) * cell_w + GAP, 3), 255, dtype=np.uint8)
    labels: list[tuple[float, float, str, tuple[int, int, int]]] = []
    for r, q in enumerate(rows):
        order = np.argsort(distmat[q], kind="stable")[:topk]  # (topk,)
        top = r * cell_h + LABEL_HEIGHT
        canvas[top : top + TILE_HEIGHT, :TILE_WIDTH] = _tile(
            query_paths[q], query_boxes[q], QUERY_FRAME
        )
        query_label = f"q{query_ids[q]} id{q_pids[q]} c{q_camids[q]}"
        labels.append((TILE_WIDTH / 2, top - 3, query_label, (0, 0, 0)))
        kinds = match_kinds(q_pids[q], q_camids[q], g_pids[order], g_camids[order])
        for c, (g, kind) in enumerate(zip(order, kinds), start=1):
            frame = FRAMES[str(kind)]
            left = c * cell_w + GAP
            canvas[top : top + TILE_HEIGHT, left : left + TILE_WIDTH] = _tile(
                gallery_paths[g], gallery_boxes[g], frame
            )
            value = 1.0 - distmat[q, g] if similarity else distmat[q, g]
            labels.append((left + TILE_WIDTH / 2, top - 3, f"{c}: {value:.3f}", frame))

    dpi = 100
    header = 40  # pixels for the title and legend
    fig = plt.figure(figsize=(canvas.shape[1] / dpi, (canvas.shape[0] + header) / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, canvas.shape[0] / (canvas.shape[0] + header)))
    ax.imshow(canvas, interpolation="nearest")
    for x, y, text, color in labels:
        ax.text(
            x, y, text, ha="center", va="bottom", fontsize=6, color=tuple(v / 255 for v in color)
        )
    ax.set_axis_off()
    value_name = value_name or ("cosine similarity" if similarity else "distance")
    legend = (
        "green: true match   red: false match   grey: junk (ignored by the metrics)   "
        f"numbers: rank: {value_name}"
    )
    fig.text(
        0.5,
        1 - 12 / (canvas.shape[0] + header),
        title or "ranked lists",
        ha="center",
        va="top",
        fontsize=9,
    )
    fig.text(0.5, 1 - 27 / (canvas.shape[0] + header), legend, ha="center", va="top", fontsize=7)
    return save_figure(fig, path)


# ---- embedding scatter --------------------------------------------------------------------

MIN_POINTS_FOR_TSNE = 10
MAX_POINTS_EXACT_TSNE = 500


def _largest_identities(pids: np.ndarray, max_ids: int) -> np.ndarray:
    """The max_ids identities with the most samples (ties: smaller pid first)."""
    unique, counts = np.unique(pids, return_counts=True)
    order = np.lexsort((unique, -counts))
    return unique[order[:max_ids]]


def _pca_2d(feats: np.ndarray) -> np.ndarray:
    """(n, D) -> (n, 2) projection on the two main directions (zeros where they do not exist)."""
    centred = feats - feats.mean(axis=0)
    out = np.zeros((len(feats), 2), dtype=np.float64)
    if len(feats) < 2:
        return out
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    projected = centred @ vt[:2].T  # (n, <=2)
    out[:, : projected.shape[1]] = projected
    return out


def scatter_caption(
    method: str, shown_ids: int, total_ids: int, shown_points: int, total_points: int
) -> str:
    """What an embedding scatter shows, e.g. `t-SNE of 20 of 52 identities (most images
    first), 400 of 1040 images`."""
    ids = f"{shown_ids} of {total_ids} identities (most images first)"
    if shown_ids == total_ids:
        ids = f"all {total_ids} identities"
    points = f"{shown_points} of {total_points} images" if shown_points < total_points else (
        f"all {total_points} images"
    )
    return f"{method} of {ids}, {points}"


def plot_embedding_scatter(
    feats: np.ndarray,
    pids: np.ndarray,
    path: str | Path,
    method: str = "tsne",
    max_ids: int = 20,
    seed: int = 0,
    title: str = "",
    max_points: int = 400,
) -> Path:
    """Save a 2-D scatter of embeddings (t-SNE or PCA), one colour per identity.

    Args:
        feats: (N, D) embeddings.
        pids: (N,) identities; the `max_ids` identities with the most samples are drawn.
        path: output PNG path.
        method: "tsne" (sklearn; falls back to PCA below 10 points) or "pca".
        max_ids: most identities drawn (colours stay distinguishable up to ~20).
        seed: t-SNE random state.
        title: drawn above the scatter; a second line says the method and how many of the
            identities and points are drawn (`scatter_caption`).
        max_points: a random subset (seeded) of at most this many points is drawn, which keeps
            t-SNE to seconds.

    Raises:
        ValueError: unknown method, or feats and pids whose shapes disagree.
    """
    if method not in ("tsne", "pca"):
        raise ValueError(f"method must be 'tsne' or 'pca', got {method!r}")
    feats, pids = np.asarray(feats, dtype=np.float64), np.asarray(pids)
    if feats.ndim != 2 or pids.shape != (len(feats),) or len(feats) == 0:
        raise ValueError(
            f"feats must be (N, D) and pids (N,) with N >= 1, got shapes {feats.shape} "
            f"and {pids.shape}"
        )
    total_ids, total_points = len(np.unique(pids)), len(pids)
    keep = np.isin(pids, _largest_identities(pids, max_ids))
    feats, pids = feats[keep], pids[keep]
    if len(feats) > max_points:
        subset = np.sort(np.random.default_rng(seed).choice(len(feats), max_points, replace=False))
        feats, pids = feats[subset], pids[subset]
    points, used = _project_2d(feats, method, seed)
    note = "" if used == "t-SNE" or method == "pca" else " (too few points for t-SNE)"

    fig, ax = plt.subplots(figsize=(6, 5), dpi=100)
    identities = np.unique(pids)
    cmap = plt.get_cmap("tab20" if len(identities) <= 20 else "hsv")
    for n, pid in enumerate(identities):
        mask = pids == pid
        color = cmap(n % 20 if len(identities) <= 20 else n / len(identities))
        ax.scatter(points[mask, 0], points[mask, 1], s=14, color=color, label=str(pid))
    if len(identities) <= 20:
        ax.legend(
            title="pid", fontsize=6, title_fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5)
        )
    ax.set_xticks([])
    ax.set_yticks([])
    caption = scatter_caption(used, len(identities), total_ids, len(pids), total_points) + note
    ax.set_title(f"{title}\n{caption}" if title else caption, fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


# ---- activation maps ----------------------------------------------------------------------

ACTIVATION_COLUMNS = 8  # queries per row pair (image above its map)
MIN_PICTURE_WIDTH = 520  # pixels, so that a few narrow images leave room for the title


def overlay_heatmap(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The image blended with a jet-coloured heat map.

    Args:
        image: (H, W, 3) uint8.
        heat: (H, W) float in [0, 1], 1 = strongest.
        alpha: weight of the heat map.

    Returns:
        (H, W, 3) uint8.
    """
    colours = plt.get_cmap("jet")(np.clip(heat, 0.0, 1.0))[..., :3] * 255.0  # (H, W, 3)
    return ((1.0 - alpha) * image + alpha * colours).round().astype(np.uint8)


def plot_activation_maps(
    images: np.ndarray,
    maps: np.ndarray,
    path: str | Path,
    labels: Sequence[str] = (),
    title: str = "",
    alpha: float = 0.5,
) -> Path:
    """Save a grid of query images, each above its activation map blended over it.

    Args:
        images: (N, H, W, 3) uint8 images as the model saw them (resized).
        maps: (N, H, W) float in [0, 1], e.g. from `embed.activation_maps`.
        path: output PNG path.
        labels: N captions drawn above the images (e.g. "q12 id5 c2").
        title: drawn above the grid.
        alpha: weight of the heat map in the blend.

    Raises:
        ValueError: images and maps whose shapes disagree, or no image.
    """
    images, maps = np.asarray(images), np.asarray(maps)
    if images.ndim != 4 or images.shape[-1] != 3 or maps.shape != images.shape[:3] or not len(
        images
    ):
        raise ValueError(
            f"images must be (N, H, W, 3) and maps (N, H, W) with N >= 1, got shapes "
            f"{images.shape} and {maps.shape}"
        )
    if labels and len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    count = len(images)
    # Drawn at the ranked lists' tile height whatever the input size, aspect kept.
    height = TILE_HEIGHT
    width = max(1, round(TILE_HEIGHT * images.shape[2] / images.shape[1]))
    columns = min(count, ACTIVATION_COLUMNS)
    row_pairs = -(-count // columns)
    cell_w, cell_h = width + GAP, 2 * height + GAP + LABEL_HEIGHT
    grid_w = columns * cell_w + GAP
    canvas_w = max(grid_w, MIN_PICTURE_WIDTH)  # room for the title and the legend
    offset = (canvas_w - grid_w) // 2
    canvas = np.full((row_pairs * cell_h, canvas_w, 3), 255, dtype=np.uint8)
    texts = []
    for n in range(count):
        image = np.asarray(
            Image.fromarray(images[n]).resize((width, height), Image.Resampling.BILINEAR)
        )
        heat = np.asarray(
            Image.fromarray(maps[n].astype(np.float32)).resize(
                (width, height), Image.Resampling.BILINEAR
            )
        )
        top = (n // columns) * cell_h + LABEL_HEIGHT
        left = offset + (n % columns) * cell_w + GAP
        canvas[top : top + height, left : left + width] = image
        below = top + height + GAP
        canvas[below : below + height, left : left + width] = overlay_heatmap(image, heat, alpha)
        if labels:
            texts.append((left + width / 2, top - 3, labels[n]))

    dpi, header = 100, 40
    fig = plt.figure(figsize=(canvas.shape[1] / dpi, (canvas.shape[0] + header) / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, canvas.shape[0] / (canvas.shape[0] + header)))
    ax.imshow(canvas, interpolation="nearest")
    for x, y, text in texts:
        ax.text(x, y, text, ha="center", va="bottom", fontsize=6)
    ax.set_axis_off()
    fig.text(
        0.5, 1 - 12 / (canvas.shape[0] + header), title or "activation maps",
        ha="center", va="top", fontsize=9,
    )  # fmt: skip
    fig.text(
        0.5, 1 - 27 / (canvas.shape[0] + header),
        "below each query: where its backbone feature map is strongest (red) and weakest (blue)",
        ha="center", va="top", fontsize=7,
    )  # fmt: skip
    return save_figure(fig, path)


# ---- cross-modal pictures -------------------------------------------------------------------


def _project_2d(feats: np.ndarray, method: str, seed: int) -> tuple[np.ndarray, str]:
    """(N, 2) points of a t-SNE (PCA below MIN_POINTS_FOR_TSNE points) or PCA projection."""
    if method == "tsne" and len(feats) >= MIN_POINTS_FOR_TSNE:
        from sklearn.manifold import TSNE

        perplexity = min(30.0, (len(feats) - 1) / 3.0)
        # Exact gradients are fast for a few hundred points and single-threaded; Barnes-Hut's
        # OpenMP threads cost seconds even on tiny inputs when the cores are busy.
        method_ = "exact" if len(feats) <= MAX_POINTS_EXACT_TSNE else "barnes_hut"
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
                    method=method_).fit_transform(feats), "t-SNE"
    return _pca_2d(feats), "PCA"


def plot_modality_scatter(
    feats: np.ndarray,
    pids: np.ndarray,
    modalities: Sequence[str],
    path: str | Path,
    method: str = "tsne",
    max_ids: int = 20,
    max_points: int = 400,
    seed: int = 0,
    title: str = "",
) -> Path:
    """Cross-modal embeddings in 2-D, twice on the same projection: coloured by modality
    (are the sensors apart or mixed?) and by identity, marker shape = modality.

    Args:
        feats: (N, D) embeddings of both modalities' images.
        pids: (N,) identities; the `max_ids` identities with the most images are drawn.
        modalities: (N,) modality name of each row.
        path: output PNG path.
        method: "tsne" or "pca"; max_points: a seeded random subset at most this large.

    Raises:
        ValueError: shapes that disagree, or an unknown method.
    """
    if method not in ("tsne", "pca"):
        raise ValueError(f"method must be 'tsne' or 'pca', got {method!r}")
    feats, pids = np.asarray(feats, dtype=np.float64), np.asarray(pids)
    names = np.asarray(list(modalities))
    if feats.ndim != 2 or pids.shape != (len(feats),) or names.shape != (len(feats),) or (
            len(feats) == 0):
        raise ValueError(
            f"feats must be (N, D), pids and modalities (N,) with N >= 1, got shapes "
            f"{feats.shape}, {pids.shape} and {names.shape}"
        )
    total_ids, total_points = len(np.unique(pids)), len(pids)
    keep = np.isin(pids, _largest_identities(pids, max_ids))
    feats, pids, names = feats[keep], pids[keep], names[keep]
    if len(feats) > max_points:
        subset = np.sort(np.random.default_rng(seed).choice(len(feats), max_points,
                                                            replace=False))
        feats, pids, names = feats[subset], pids[subset], names[subset]
    points, used = _project_2d(feats, method, seed)
    kinds = list(dict.fromkeys(names.tolist()))
    markers = "o^sDvP*X"
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 5), dpi=100)
    palette = plt.get_cmap("Set1")
    for n, kind in enumerate(kinds):
        mask = names == kind
        left.scatter(points[mask, 0], points[mask, 1], s=14, color=palette(n % 9),
                     marker=markers[n % len(markers)], label=kind)
    left.legend(title="modality", fontsize=7, title_fontsize=7)
    left.set_title("coloured by modality", fontsize=9)
    identities = np.unique(pids)
    cmap = plt.get_cmap("tab20" if len(identities) <= 20 else "hsv")
    for n, pid in enumerate(identities):
        color = cmap(n % 20 if len(identities) <= 20 else n / len(identities))
        for m, kind in enumerate(kinds):
            mask = (pids == pid) & (names == kind)
            right.scatter(points[mask, 0], points[mask, 1], s=16, color=color,
                          marker=markers[m % len(markers)],
                          label=str(pid) if m == 0 else None)
    if len(identities) <= 20:
        right.legend(title="pid", fontsize=6, title_fontsize=7, loc="center left",
                     bbox_to_anchor=(1.0, 0.5))
    right.set_title("coloured by identity (marker = modality)", fontsize=9)
    for ax in (left, right):
        ax.set_xticks([])
        ax.set_yticks([])
    caption = scatter_caption(used, len(identities), total_ids, len(pids), total_points)
    fig.suptitle(f"{title}\n{caption}" if title else caption, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_pair_distances(
    directions: Mapping[str, tuple[np.ndarray, np.ndarray]],
    path: str | Path,
    bins: int = 40,
    distance_name: str = "cosine distance",
) -> Path:
    """Histograms of the query-gallery distances of matching and non-matching pairs, one
    panel per direction (e.g. "optical->sar"): how far apart the two distributions are is
    what ranking can use.

    Args:
        directions: name -> (distances of matching pairs, of non-matching pairs), 1-D each.
        path: output PNG path.

    Raises:
        ValueError: no direction, or a direction without any pair.
    """
    if not directions:
        raise ValueError("no direction to draw")
    fig, axes = plt.subplots(1, len(directions), figsize=(5 * len(directions), 3.6), dpi=100,
                             squeeze=False)
    for ax, (name, (positive, negative)) in zip(axes[0], directions.items()):
        positive, negative = np.ravel(positive), np.ravel(negative)
        if positive.size == 0 and negative.size == 0:
            raise ValueError(f"direction {name!r} has no pairs")
        both = np.concatenate([positive, negative])
        edges = np.linspace(float(both.min()), float(both.max()) + 1e-9, bins + 1)
        for values, label, color in ((negative, "non-matching", "tab:red"),
                                     (positive, "matching", "tab:green")):
            if values.size:
                ax.hist(values, bins=edges, density=True, alpha=0.55, color=color,
                        label=f"{label} ({values.size}, mean {values.mean():.3f})")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(distance_name, fontsize=8)
        ax.set_ylabel("density", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)
