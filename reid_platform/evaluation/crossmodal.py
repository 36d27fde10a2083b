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


# ---- jobs/evaluate.py ------------------------------------------------------------------------

SCATTER_FILE = "embedding_modalities.png"
DISTANCES_FILE = "pair_distances.png"
MAX_PAIR_DISTANCES = 200_000  # non-matching pairs drawn (a seeded subset above this)


def _side(samples: Sequence[Sample], camid: int) -> list[Sample]:
    """One side's samples with a camera of its own (nothing across sensors is junk)."""
    import dataclasses

    return [dataclasses.replace(s, camid=camid) for s in samples]


def _pair_distances(query: np.ndarray, gallery: np.ndarray, q_pids: np.ndarray,
                    g_pids: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Cosine distances (1 - cos) of matching and (a subset of) non-matching pairs."""
    dist = 1.0 - query @ gallery.T  # (Nq, Ng); rows are L2-normalised
    same = q_pids[:, None] == g_pids[None, :]
    negative = dist[~same]
    if negative.size > MAX_PAIR_DISTANCES:
        rng = np.random.default_rng(seed)
        negative = negative[rng.choice(negative.size, MAX_PAIR_DISTANCES, replace=False)]
    return dist[same], negative


def run_cross_modal_evaluation(checkpoints, options, out_dir, dataset: ReidDataset,
                               device: str = "auto", scatter: str = "tsne",
                               progress: bool = True, feature: str = "post_bn",
                               max_query: int = 0):
    """`run_evaluation` under `data.protocol: cross_modal`: every variant (post-processing,
    ensembles) scored in both directions; pictures: CMC and ranked lists per direction, the
    t-SNE of both modalities coloured by modality and by identity, and the matching vs
    non-matching distance distribution per direction.

    Args:
        max_query: if > 0, at most this many test identities (smoke tests).

    Returns:
        EvaluationOutcome: `evaluation` = query_modality -> gallery_modality, `reverse` the
        other direction; the report's variants hold both (`reverse_*`) and `score` their mean.

    Raises:
        EvaluationError: a modality side without images (naming it), or what
            `run_evaluation` raises.
    """
    from reid_platform.evaluation.metrics import EvaluationError
    from reid_platform.evaluation.pictures import (
        plot_cmc,
        plot_modality_scatter,
        plot_pair_distances,
    )
    from reid_platform.evaluation.pipeline import (
        PICTURES,
        RANKED_LIST_QUERIES,
        EvalLabels,
        EvaluationOutcome,
        ModelEmbeddings,
        build_report,
        embed_checkpoints,
        evaluate_variants,
        pick_queries,
        write_pictures,
        write_report,
    )

    data = checkpoints[0].config.data
    try:
        split = cross_modal_split(dataset, data.query_modality, data.gallery_modality)
    except ValueError as err:
        raise EvaluationError(str(err)) from None
    a_samples, b_samples = _side(split.query, 0), _side(split.gallery, 1)
    if max_query > 0:  # the first test identities only
        keep = sorted({s.pid for s in a_samples if s.pid > 0})[:max_query]
        a_samples = [s for s in a_samples if s.pid in keep]
        b_samples = [s for s in b_samples if s.pid in keep]
    models, labels, skipped = embed_checkpoints(
        checkpoints, a_samples, b_samples, device, progress, None, feature)
    names = (split.query_modality, split.gallery_modality)
    directions = {}
    for reverse in (False, True):
        q_side, g_side = ("gallery", "query") if reverse else ("query", "gallery")
        q_pids = getattr(labels, f"{q_side[0]}_pids")
        asks = q_pids > 0  # distractors and junk stay in the gallery only
        side_labels = EvalLabels(
            q_pids=q_pids[asks], q_camids=getattr(labels, f"{q_side[0]}_camids")[asks],
            g_pids=getattr(labels, f"{g_side[0]}_pids"),
            g_camids=getattr(labels, f"{g_side[0]}_camids"),
            query_paths=[p for p, k in zip(getattr(labels, f"{q_side}_paths"), asks) if k],
            gallery_paths=getattr(labels, f"{g_side}_paths"),
            query_boxes=[b for b, k in zip(getattr(labels, f"{q_side}_boxes"), asks) if k],
            gallery_boxes=getattr(labels, f"{g_side}_boxes"),
        )
        side_models = [
            ModelEmbeddings(m.name, getattr(m, q_side)[asks], getattr(m, g_side), m.weight,
                            m.checkpoint, m.epoch, m.embed_seconds)
            for m in models
        ]
        picture_queries = pick_queries(len(side_labels.q_pids), RANKED_LIST_QUERIES)
        evaluation = evaluate_variants(side_models, side_labels, options, picture_queries)
        name = f"{names[1]}->{names[0]}" if reverse else f"{names[0]}->{names[1]}"
        directions[name] = (evaluation, side_models, side_labels)
    out_dir.mkdir(parents=True, exist_ok=True)
    (forward, f_models, f_labels), (reverse, r_models, r_labels) = directions.values()
    pictures = {}
    for tag, (evaluation, side_models, side_labels) in zip(("", REVERSE_PREFIX),
                                                             directions.values()):
        sub = out_dir / (tag.rstrip("_") or "forward")
        for kind, file in write_pictures(sub, evaluation, side_models, side_labels, options,
                                         scatter).items():
            pictures[f"{tag}{kind}"] = f"{sub.name}/{file}"
    plot_cmc({f"{n}: {e.best}": next(r.result.cmc for r in e.results if r.name == e.best)
              for n, (e, _, _) in directions.items()}, out_dir / PICTURES["cmc"])
    pictures["cmc"] = PICTURES["cmc"]
    first = models[0]
    feats = np.concatenate([first.query, first.gallery])
    pids = np.concatenate([labels.q_pids, labels.g_pids])
    kinds = [names[0]] * len(labels.q_pids) + [names[1]] * len(labels.g_pids)
    asked = pids > 0
    plot_modality_scatter(feats[asked], pids[asked], [k for k, a in zip(kinds, asked) if a],
                          out_dir / SCATTER_FILE, method=scatter,
                          title=f"{names[0]} and {names[1]} embeddings of {first.name}")
    pictures["embedding_modalities"] = SCATTER_FILE
    plot_pair_distances(
        {n: _pair_distances(m[0].query, m[0].gallery, lab.q_pids, lab.g_pids)
         for n, (_, m, lab) in directions.items()}, out_dir / DISTANCES_FILE)
    pictures["pair_distances"] = DISTANCES_FILE
    dataset_info = {
        "name": dataset.name, "root": str(dataset.root), "format": data.format,
        "protocol": "cross_modal", "query_modality": names[0], "gallery_modality": names[1],
        "feature": feature, "num_query_ids": len(set(f_labels.q_pids.tolist())),
        "num_gallery_ids": len(set(f_labels.g_pids.tolist())), "subset": bool(max_query),
    }
    report = build_report(forward, f_models, f_labels, options, dataset_info, skipped,
                          pictures)
    reverse_report = build_report(reverse, r_models, r_labels, options)
    for name, values in report["variants"].items():
        other = reverse_report["variants"][name]
        values["forward_score"] = values["score"]
        values.update({f"{REVERSE_PREFIX}{k}": v for k, v in other.items()})
        values["score"] = 0.5 * (values["forward_score"] + other["score"])
    report["reverse_queries"] = reverse_report["queries"]
    report["best_variant"] = max(report["variants"], key=lambda n: report["variants"][n]["score"])
    return EvaluationOutcome(report, write_report(report, out_dir), forward, reverse)
