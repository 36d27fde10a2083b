"""Time and peak memory of evaluation at Market-1501 and MSMT17 sizes: the blocked paths
against the full-matrix paths, in the same run.

Measured, each in a fresh process on the same synthetic features (`_measure.reid_problem`:
one centre per identity, per-image noise, cameras; Market-1501 also has distractors and junk):

  evaluate_features     `evaluate_features(query, gallery, ...)`: distances and ranking in query
                        blocks, no (N, M) matrix
  full_matrix           `evaluate_rank(compute_distmat(query, gallery), ...)`: the baseline,
                        at every size whose matrix fits in memory
  evaluate_rank         `evaluate_rank(distmat, ...)` alone on the precomputed matrix, on the
                        model-like distances and on uniformly random ones (the worst case:
                        every item sits between the matches), against `argsort_rank`, the
                        stable argsort of every whole row (the previous implementation)
  rerank_blocks         `evaluate_blocks(rerank_blocks(query, gallery), ...)`: k-reciprocal
                        re-ranking scored block by block, no (N, M) matrix
  rerank_features       `evaluate_rank(rerank_features(query, gallery), ...)`: the same with the
                        re-ranked (N, M) matrix held (--rerank-features-at sizes)
  dense_rerank          `k_reciprocal_rerank` of the three dense distance matrices, the classic
                        reference, at the largest fraction of Market-1501 that fits; the features
                        version runs at that size too, for the ratio and the largest difference

Peak memory is the resident set size sampled while the method runs, minus the size before it
(so the features themselves, 0.37 GiB at MSMT17 size and dim 512, are not counted).

    python bench/evaluate_scale.py                   # Market-1501 and MSMT17, dim 512
    python bench/evaluate_scale.py --sizes market    # only Market-1501
    python bench/evaluate_scale.py --smoke-test      # tiny sizes, seconds

Prints one JSON line per measurement, then one summary line with the ratios
(full-matrix / blocked, dense / features) and whether the results were identical.
"""

from __future__ import annotations

import argparse
import json
import time

from _measure import PeakRss, available_mb, reid_problem, run_worker

# (num_query, num_gallery, test identities, cameras, distractor share, junk share)
SIZES = {
    "market": (3368, 19732, 750, 6, 0.19, 0.14),
    "msmt": (11659, 82161, 3060, 15, 0.0, 0.0),
}
SMOKE_SIZES = {"market": (120, 700, 30, 6, 0.19, 0.14), "msmt": (300, 2000, 80, 15, 0.0, 0.0)}
DENSE_BYTES_PER_ENTRY = 40  # k_reciprocal_rerank holds a few (N+M)^2 float32/int64 arrays
DENSE_FRACTIONS = (0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05)


def argsort_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50, block_size=256):
    """The baseline: mAP and CMC from a stable argsort of every whole row, block by block."""
    import numpy as np

    all_ap, first_hit = np.full(len(q_pids), np.nan), np.full(len(q_pids), -1)
    for start in range(0, len(q_pids), block_size):
        stop = min(start + block_size, len(q_pids))
        order = np.argsort(distmat[start:stop], axis=1, kind="stable")  # (b, G)
        same_pid = g_pids[order] == q_pids[start:stop, None]
        junk = (same_pid & (g_camids[order] == q_camids[start:stop, None])) | (g_pids[order] == -1)
        hits = same_pid & ~junk
        position = np.cumsum(~junk, axis=1) - 1  # rank among kept items
        num_rel = hits.sum(axis=1)
        precision = np.where(hits, np.cumsum(hits, axis=1) / (position + 1.0), 0.0)
        valid = num_rel > 0
        all_ap[start:stop] = np.where(valid, precision.sum(axis=1) / np.maximum(num_rel, 1), np.nan)
        first = position[np.arange(stop - start), np.argmax(hits, axis=1)]
        first_hit[start:stop] = np.where(valid, first, -1)
    cmc = (first_hit[first_hit >= 0, None] <= np.arange(max_rank)).mean(axis=0)
    return all_ap, cmc


def rank_worker(problem) -> dict:
    """evaluate_rank against the whole-row argsort, on model-like and on random distances."""
    import numpy as np

    from reid_platform.evaluation.metrics import compute_distmat, evaluate_rank

    out = {}
    random = np.random.default_rng(1).random((len(problem.q_pids), len(problem.g_pids)))
    for name, distmat in (("model", compute_distmat(problem.query, problem.gallery)),
                          ("uniform", random.astype(np.float32))):  # fmt: skip
        start = time.perf_counter()
        result = evaluate_rank(distmat, *problem.labels)
        out[f"{name}_seconds"] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        all_ap, cmc = argsort_rank(distmat, *problem.labels)
        out[f"{name}_argsort_seconds"] = round(time.perf_counter() - start, 2)
        out[f"{name}_speedup"] = round(out[f"{name}_argsort_seconds"] / out[f"{name}_seconds"], 1)
        out[f"{name}_same_as_argsort"] = bool(
            np.array_equal(result.cmc, cmc) and np.allclose(result.all_AP, all_ap, equal_nan=True,
                                                            rtol=0, atol=1e-12)
        )  # fmt: skip
        out[f"{name}_mAP"] = round(result.mAP, 4)
    return out


def worker(args: argparse.Namespace) -> None:
    """Build the problem, run one method under PeakRss, print one JSON line."""
    import numpy as np

    from reid_platform.evaluation.metrics import (
        compute_distmat,
        evaluate_blocks,
        evaluate_features,
        evaluate_rank,
    )
    from reid_platform.evaluation.rerank import k_reciprocal_rerank, rerank_blocks, rerank_features

    problem = reid_problem(
        args.num_query, args.num_gallery, args.dim, args.num_ids, args.num_cameras,
        args.noise, args.distractors, args.junk, seed=args.seed,
    )  # fmt: skip
    q, g, labels = problem.query, problem.gallery, problem.labels
    if args.worker == "evaluate_rank":
        print(json.dumps(rank_worker(problem)))
        return
    start = time.perf_counter()
    with PeakRss() as memory:
        if args.worker == "evaluate_features":
            result = evaluate_features(q, g, *labels)
        elif args.worker == "full_matrix":
            result = evaluate_rank(compute_distmat(q, g), *labels)
        elif args.worker == "rerank_blocks":
            result = evaluate_blocks(rerank_blocks(q, g), *labels)
        elif args.worker == "rerank_features":
            result = evaluate_rank(rerank_features(q, g), *labels)
        else:  # dense_rerank: the three matrices are part of the classic pipeline
            reranked = k_reciprocal_rerank(1.0 - q @ g.T, 1.0 - q @ q.T, 1.0 - g @ g.T)
            result = evaluate_rank(reranked, *labels)
    seconds = time.perf_counter() - start
    if args.save:
        np.save(args.save, np.concatenate([result.all_AP, result.all_INP, result.cmc]))
    print(
        json.dumps(
            {
                "seconds": round(seconds, 2),
                "peak_increment_mb": round(memory.increment_mb, 1),
                "rss_before_mb": round(memory.before_mb, 1),
                "rank1": round(result.rank(1), 4),
                "mAP": round(result.mAP, 4),
                "mINP": round(result.mINP, 4),
            }
        )
    )


def measure(method: str, size: tuple, args: argparse.Namespace, save: str = "") -> dict:
    num_query, num_gallery, num_ids, num_cameras, distractors, junk = size
    command = [
        "--worker", method, "--num-query", str(num_query), "--num-gallery", str(num_gallery),
        "--num-ids", str(num_ids), "--num-cameras", str(num_cameras),
        "--distractors", str(distractors), "--junk", str(junk), "--dim", str(args.dim),
        "--noise", str(args.noise), "--seed", str(args.seed),
    ]  # fmt: skip
    return run_worker(__file__, command + (["--save", save] if save else []))


def scaled(size: tuple, fraction: float) -> tuple:
    num_query, num_gallery, num_ids, *rest = size
    return (
        max(2, round(num_query * fraction)),
        max(2, round(num_gallery * fraction)),
        max(2, round(num_ids * fraction)),
        *rest,
    )


def same_result(path_a: str, path_b: str) -> bool:
    import numpy as np

    return bool(np.array_equal(np.load(path_a), np.load(path_b), equal_nan=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--noise", type=float, default=2.0, help="per-image noise (harder: more)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--rerank-features-at", nargs="*", choices=list(SIZES), default=["market"],
        help="sizes at which rerank_features (the re-ranked matrix held) is also measured",
    )  # fmt: skip
    parser.add_argument("--no-rerank", action="store_true", help="skip every re-ranking")
    parser.add_argument("--smoke-test", action="store_true", help="tiny sizes, seconds")
    # Internal: one measurement in this (fresh) process.
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    for name, kind in (("num-query", int), ("num-gallery", int), ("num-ids", int),
                       ("num-cameras", int), ("distractors", float), ("junk", float)):  # fmt: skip
        parser.add_argument(f"--{name}", type=kind, help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    sizes = SMOKE_SIZES if args.smoke_test else SIZES
    if args.smoke_test:
        args.dim = min(args.dim, 64)
        args.noise = min(args.noise, 0.8)

    import tempfile

    summary: dict = {"bench": "evaluate_scale", "dim": args.dim, "noise": args.noise}
    with tempfile.TemporaryDirectory() as tmp:

        def record(method: str, name: str, size: tuple, save: bool = False) -> dict:
            path = f"{tmp}/{method}-{name}.npy" if save else ""
            out = measure(method, size, args, path)
            line = {
                "bench": "evaluate_scale", "method": method, "size": name,
                "num_query": size[0], "num_gallery": size[1], "dim": args.dim, **out,
            }  # fmt: skip
            print(json.dumps(line), flush=True)
            return out

        for name in args.sizes:
            size = sizes[name]
            if name == "market":
                ranking = record("evaluate_rank", name, size)
                summary["market_evaluate_rank_seconds"] = ranking["model_seconds"]
                summary["market_evaluate_rank_speedup"] = ranking["model_speedup"]
                summary["market_evaluate_rank_uniform_seconds"] = ranking["uniform_seconds"]
            blocked = record("evaluate_features", name, size, save=True)
            # The full matrix (float32) and the ranking's blocks must fit with room to spare.
            full_mb = size[0] * size[1] * 4 / 2**20
            if full_mb * 1.5 < 0.6 * available_mb():
                full = record("full_matrix", name, size, save=True)
                summary[f"{name}_full_over_blocked_memory"] = round(
                    full["peak_increment_mb"] / max(blocked["peak_increment_mb"], 1.0), 1
                )
                summary[f"{name}_full_over_blocked_time"] = round(
                    full["seconds"] / blocked["seconds"], 2
                )
                summary[f"{name}_identical"] = same_result(
                    f"{tmp}/evaluate_features-{name}.npy", f"{tmp}/full_matrix-{name}.npy"
                )
            else:
                summary[f"{name}_full_matrix"] = f"skipped: {full_mb:.0f} MiB does not fit"
            if args.no_rerank:
                continue
            reranked = record("rerank_blocks", name, size, save=True)
            summary[f"{name}_rerank_blocks_peak_mb"] = reranked["peak_increment_mb"]
            if name in args.rerank_features_at:
                held = record("rerank_features", name, size, save=True)
                summary[f"{name}_rerank_identical"] = same_result(
                    f"{tmp}/rerank_blocks-{name}.npy", f"{tmp}/rerank_features-{name}.npy"
                )
                summary[f"{name}_rerank_features_over_blocks_memory"] = round(
                    held["peak_increment_mb"] / max(reranked["peak_increment_mb"], 1.0), 1
                )

        if not args.no_rerank:
            # The dense reference at the largest fraction of Market-1501 that fits.
            budget_mb = min(6 * 1024, 0.5 * available_mb())
            for fraction in DENSE_FRACTIONS:
                small = scaled(sizes["market"], fraction)
                if (small[0] + small[1]) ** 2 * DENSE_BYTES_PER_ENTRY / 2**20 < budget_mb:
                    break
            dense = record("dense_rerank", f"market*{fraction}", small)
            features = record("rerank_blocks", f"market*{fraction}", small)
            summary["dense_size"] = {"num_query": small[0], "num_gallery": small[1]}
            summary["dense_over_features_memory"] = round(
                dense["peak_increment_mb"] / max(features["peak_increment_mb"], 1.0), 1
            )
            summary["dense_over_features_time"] = round(dense["seconds"] / features["seconds"], 2)
            summary["dense_minus_features_mAP"] = round(dense["mAP"] - features["mAP"], 6)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
