"""Time and peak memory of k-reciprocal re-ranking: scalable `rerank_features` against the dense
classic `k_reciprocal_rerank`.

Each measurement runs in a fresh process and samples its resident memory while the method runs
(`_measure.PeakRss`; tracemalloc misses BLAS and FAISS buffers). The dense method is run at
--dense-scale of the Market-1501 size (it holds several (N+M)^2 arrays) and its time and memory
are extrapolated to full size with the (N+M)^2 law; the scalable method also runs at that scale
on the same features, to report how far apart the two are. `bench/evaluate_scale.py` goes on
to MSMT17 size, scoring the re-ranked blocks as they come.

    python bench/rerank.py                      # Market-1501 size, dim 512
    python bench/rerank.py --dim 2048
    python bench/rerank.py --smoke-test         # tiny sizes, a few seconds

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
from _measure import PeakRss, reid_problem, run_worker

MARKET_QUERY, MARKET_GALLERY, MARKET_IDS = 3368, 15913, 750


def market_like_feats(num_query: int, num_gallery: int, dim: int, seed: int):
    """Unit vectors clustered around identity centres, with about as many images per identity
    as the Market-1501 test set; returns (query, gallery)."""
    share = (num_query + num_gallery) / (MARKET_QUERY + MARKET_GALLERY)
    num_ids = max(2, round(MARKET_IDS * share))
    problem = reid_problem(num_query, num_gallery, dim, num_ids, 6, noise=0.8, seed=seed)
    return problem.query, problem.gallery


def worker(args: argparse.Namespace) -> None:
    """Runs one method once and prints a JSON line with its time and memory."""
    from reid_platform.evaluation.rerank import k_reciprocal_rerank, rerank_features

    query, gallery = market_like_feats(args.num_query, args.num_gallery, args.dim, args.seed)
    params = {"k1": args.k1, "k2": args.k2, "lambda_value": args.lambda_value}
    try:  # imported lazily by rerank_features; load it before the baseline is taken
        import faiss  # noqa: F401
    except ImportError:
        pass
    start = time.perf_counter()
    with PeakRss() as memory:
        if args.worker == "features":
            out = rerank_features(
                query, gallery, metric=args.metric, chunk_size=args.chunk_size,
                backend=args.backend, **params,
            )  # fmt: skip
        else:
            # The dense pipeline includes its three distance matrices (1 - q.g, or Euclidean).
            def dist(a, b):
                if args.metric == "cosine":
                    return 1.0 - a @ b.T
                sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
                return np.sqrt(np.maximum(sq, 0.0))

            out = k_reciprocal_rerank(
                dist(query, gallery), dist(query, query), dist(gallery, gallery), **params
            )
    seconds = time.perf_counter() - start
    if args.save:
        np.save(args.save, out)
    record = {"seconds": seconds, "peak_rss_mb": memory.peak_mb,
              "increment_mb": memory.increment_mb}  # fmt: skip
    print(json.dumps(record))


def measure(method: str, num_query: int, num_gallery: int, args, save: str | None) -> dict:
    command = [
        "--worker", method, "--num-query", str(num_query), "--num-gallery", str(num_gallery),
        "--dim", str(args.dim), "--seed", str(args.seed), "--metric", args.metric,
        "--k1", str(args.k1), "--k2", str(args.k2), "--lambda-value", str(args.lambda_value),
        "--chunk-size", str(args.chunk_size), "--backend", args.backend,
    ]  # fmt: skip
    if save:
        command += ["--save", save]
    return {k: round(v, 3) for k, v in run_worker(__file__, command).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of Market-1501 size")
    parser.add_argument("--dense-scale", type=float, default=0.25,
                        help="fraction of Market-1501 size for the dense method")  # fmt: skip
    parser.add_argument("--metric", choices=["cosine", "euclidean"], default="cosine")
    parser.add_argument("--k1", type=int, default=20)
    parser.add_argument("--k2", type=int, default=6)
    parser.add_argument("--lambda-value", type=float, default=0.3)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--backend", choices=["auto", "numpy", "faiss"], default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke-test", action="store_true", help="tiny sizes, a few seconds")
    # Internal: run one measurement in this (fresh) process.
    parser.add_argument("--worker", choices=["features", "dense"], help=argparse.SUPPRESS)
    parser.add_argument("--num-query", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--num-gallery", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.smoke_test:
        args.scale, args.dense_scale, args.dim = 0.02, 0.02, min(args.dim, 64)

    full = (round(MARKET_QUERY * args.scale), round(MARKET_GALLERY * args.scale))
    small = (round(MARKET_QUERY * args.dense_scale), round(MARKET_GALLERY * args.dense_scale))
    growth = (sum(full) / sum(small)) ** 2  # (N+M)^2 law of the dense method

    features_full = measure("features", *full, args, save=None)
    with tempfile.TemporaryDirectory() as tmp:
        dense_path, features_path = os.path.join(tmp, "dense.npy"), os.path.join(tmp, "feat.npy")
        dense_small = measure("dense", *small, args, save=dense_path)
        features_small = measure("features", *small, args, save=features_path)
        max_abs_diff = float(np.abs(np.load(dense_path) - np.load(features_path)).max())

    dense_full_mb = dense_small["increment_mb"] * growth
    dense_full_s = dense_small["seconds"] * growth
    report = {
        "bench": "rerank",
        "metric": args.metric,
        "dim": args.dim,
        "k1": args.k1,
        "k2": args.k2,
        "lambda": args.lambda_value,
        "backend": args.backend,
        "full_size": {"num_query": full[0], "num_gallery": full[1]},
        "features_full": features_full,
        "dense_size": {"num_query": small[0], "num_gallery": small[1]},
        "dense_at_dense_size": dense_small,
        "features_at_dense_size": features_small,
        "max_abs_diff_at_dense_size": max_abs_diff,
        "dense_full_extrapolated": {
            "increment_mb": round(dense_full_mb, 1),
            "seconds_lower_bound": round(dense_full_s, 1),
        },
        "memory_ratio_dense_over_features": round(dense_full_mb / features_full["increment_mb"], 1),
        "time_ratio_dense_over_features": round(dense_full_s / features_full["seconds"], 1),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
