"""The cross-modal protocol: the test images of one modality as queries against those of
another as the gallery, and the reverse.

`data.protocol: cross_modal` evaluates both directions on the pooled test images (query and
gallery splits together): query_modality -> gallery_modality gives `rank1`, `mAP`, ...,
gallery_modality -> query_modality gives `reverse_rank1`, `reverse_mAP`, ...; `score` is the
mean of the two directions' scores (what sweeps and best-checkpoint selection read). Every
gallery image of the other modality counts: the Market rule "same identity and camera is
junk" does not apply across sensors, so each side gets a camera of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from reid_platform.data.formats import ReidDataset, Sample
from reid_platform.evaluation.metrics import RankResult, evaluate_features

REVERSE_PREFIX = "reverse_"


@dataclass(frozen=True)
class CrossModalSplit:
    """The two sides of the protocol: every test image of each modality."""

    query_modality: str
    gallery_modality: str
    query: list[Sample]  # the test images of query_modality
    gallery: list[Sample]  # the test images of gallery_modality


def cross_modal_split(dataset: ReidDataset, query_modality: str = "",
                      gallery_modality: str = "") -> CrossModalSplit:
    """The test images (query and gallery splits) of each side.

    Args:
        query_modality, gallery_modality: empty = the data's first and second modality.

    Raises:
        ValueError: the data has fewer than two modalities, both sides are the same, or a
            side has no test images (naming the modality and the ones there are).
    """
    test = dataset.query + dataset.gallery
    present = list(dict.fromkeys(s.modality for s in test if s.modality))
    known = list(dataset.modalities)
    if len(known) < 2:
        raise ValueError(
            f"data.protocol=cross_modal needs data with two or more modalities; "
            f"{dataset.root} has {known or 'none'}"
        )
    query_modality = query_modality or known[0]
    gallery_modality = gallery_modality or next(m for m in known if m != query_modality)
    if query_modality == gallery_modality:
        raise ValueError(
            f"data.query_modality and data.gallery_modality are both {query_modality!r}; "
            "the cross-modal protocol compares two different modalities"
        )
    sides = {}
    for key, modality in (("query", query_modality), ("gallery", gallery_modality)):
        sides[key] = [s for s in test if s.modality == modality]
        if not sides[key]:
            raise ValueError(
                f"data.{key}_modality={modality!r} has no test images in {dataset.root}; "
                f"the test images have modalities {present}"
            )
    return CrossModalSplit(query_modality, gallery_modality, sides["query"], sides["gallery"])


def cross_modal_metrics(feats_a: np.ndarray, pids_a: np.ndarray, feats_b: np.ndarray,
                        pids_b: np.ndarray, metric: str = "cosine"
                        ) -> tuple[dict[str, float], RankResult, RankResult]:
    """Both directions of the protocol from the two sides' embeddings.

    Args:
        feats_a: (Na, D) embeddings of the query modality; pids_a (Na,).
        feats_b: (Nb, D) embeddings of the gallery modality; pids_b (Nb,).
        metric: "cosine" or "euclidean".

    Returns:
        (metrics, forward result, reverse result): metrics holds a -> b under the plain names
        (`rank1`, `mAP`, ...), b -> a under `reverse_*`, and `score` = the mean of both
        directions' scores (`forward_score` keeps a -> b's own).
    """
    pids_a, pids_b = np.asarray(pids_a), np.asarray(pids_b)
    cams_a = np.zeros(len(pids_a), dtype=np.int64)  # a camera per side: nothing is junk
    cams_b = np.ones(len(pids_b), dtype=np.int64)
    # distractors (pid 0) and junk (-1) stay in the gallery, never ask as queries
    qa, qb = pids_a > 0, pids_b > 0
    forward = evaluate_features(feats_a[qa], feats_b, pids_a[qa], pids_b, cams_a[qa], cams_b,
                                metric)
    reverse = evaluate_features(feats_b[qb], feats_a, pids_b[qb], pids_a, cams_b[qb], cams_a,
                                metric)
    metrics = forward.as_metrics()
    metrics.update({f"{REVERSE_PREFIX}{k}": v for k, v in reverse.as_metrics().items()})
    metrics["forward_score"] = metrics["score"]
    metrics["score"] = 0.5 * (metrics["score"] + metrics[f"{REVERSE_PREFIX}score"])
    return metrics, forward, reverse


def evaluate_cross_modal(
    model, split: CrossModalSplit, height: int, width: int,
    modalities: Sequence[str], batch_size: int = 128, device="cpu", amp: bool = False,
    feature: str = "post_bn", metric: str = "cosine",
) -> tuple[dict[str, float], RankResult, RankResult, int]:
    """Embed both sides (each image through its modality's branch) and score both directions.

    Returns:
        (metrics as `cross_modal_metrics`, forward result, reverse result, images that could
        not be decoded and were left out).
    """
    from reid_platform.evaluation.embed import extract_features

    kwargs = dict(height=height, width=width, batch_size=batch_size, device=device, amp=amp,
                  modalities=modalities, feature=feature)
    a = extract_features(model, split.query, desc=split.query_modality, **kwargs)
    b = extract_features(model, split.gallery, desc=split.gallery_modality, **kwargs)
    metrics, forward, reverse = cross_modal_metrics(a.feats, a.pids, b.feats, b.pids, metric)
    return metrics, forward, reverse, len(a.skipped) + len(b.skipped)
