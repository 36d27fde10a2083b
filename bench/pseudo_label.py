"""Time and peak memory of the clustering step of pseudo-labelling, per method and size.

    python bench/pseudo_label.py                          # 10k, 100k, 1M embeddings, 256-d
    python bench/pseudo_label.py --sizes 10000 100000 --dim 512
    python bench/pseudo_label.py --smoke-test

The embeddings are synthetic: `size / 10` identities (about 10 images each, Poisson), each a
random direction on the sphere, its images that direction plus Gaussian noise (`--noise`, the
norm of the noise vector), L2-normalised. Each configuration runs in a fresh process, so its
peak RSS above the loaded features is its own:

- `jaccard` / `cosine`: building the sparse distance graph (FAISS neighbours, exact up to 50k
  images, IVF above, or as `--index` says), then `dbscan` (eps from the data) and `link`
  (threshold 0.5 on Jaccard, 0.3 on cosine) on that graph;
- `kmeans`: FAISS spherical k-means with greedy k-means++ seeds into
  min(`size / 10`, `--kmeans-clusters`) clusters (1000 by default, the notes' example: exact
  k-means costs N x clusters x D per iteration, so it is for a fixed, moderate number of
  groups; its ARI is then against more true identities than clusters).

The baseline, measured in the same run at `--baseline-size` (default 10k): the dense path, i.e.
the reference re-ranking `k_reciprocal_rerank` of the same points (its (N, N) matrices) for
Jaccard, and the dense (N, N) cosine matrix + scikit-learn DBSCAN for cosine. Larger sizes
compare with the baseline extrapolated as N^2 (marked `baseline_extrapolated`). One JSON line per
configuration: seconds (graph, clustering, total), peak MB above the features, clusters, ARI.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def synthetic_embeddings(size: int, dim: int, noise: float, seed: int = 0):
    """(size, dim) float32 unit rows and (size,) true ids, written in chunks (no big temps)."""
    rng = np.random.default_rng(seed)
    num_ids = max(2, size // 10)
    pids = np.sort(rng.integers(0, num_ids, size))
    centres = rng.normal(size=(num_ids, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    feats = np.empty((size, dim), dtype=np.float32)
    for start in range(0, size, 65536):
        stop = min(start + 65536, size)
        block = centres[pids[start:stop]] + rng.normal(
            scale=noise / np.sqrt(dim), size=(stop - start, dim)
        ).astype(np.float32)
        feats[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return feats, pids, num_ids


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def _run(job: dict, queue) -> None:
    """One configuration in a fresh process; puts a list of result dicts on the queue."""
    import faiss
    import sklearn.cluster  # noqa: F401  (imported before the clock and the memory baseline)
    import sklearn.metrics  # noqa: F401

    from reid_platform.pseudo.clustering import (
        auto_eps,
        dbscan,
        relabel_by_size,
        score_clustering,
        spherical_kmeans,
        threshold_link,
    )
    from reid_platform.pseudo.distances import distance_graph

    faiss.omp_set_num_threads(job["threads"])
    feats, pids, num_ids = synthetic_embeddings(job["size"], job["dim"], job["noise"])
    base = _peak_mb()
    out = []

    def record(method, distance, graph_s, cluster_s, labels, extra):
        labels = relabel_by_size(labels, 2)
        scores = score_clustering(labels, pids)
        out.append({
            "n": job["size"], "dim": job["dim"], "method": method, "distance": distance,
            "graph_s": round(graph_s, 2), "cluster_s": round(cluster_s, 2),
            "total_s": round(graph_s + cluster_s, 2),
            "peak_mb": round(_peak_mb() - base, 1), "features_mb": round(feats.nbytes / 2**20, 1),
            "num_clusters": int(labels.max() + 1), "num_true_ids": int(num_ids),
            "num_outliers": int((labels < 0).sum()), "ari": round(scores["ari_all"], 4), **extra,
        })

    if job["kind"] == "kmeans":
        start = time.perf_counter()
        clusters = min(num_ids, job["kmeans_clusters"])
        labels = spherical_kmeans(feats, clusters, restarts=1)
        record("kmeans", "cosine", 0.0, time.perf_counter() - start, labels,
               {"clusters_asked": clusters})
    elif job["kind"] in ("jaccard", "cosine"):
        start = time.perf_counter()
        graph = distance_graph(feats, job["kind"], index=job["index"])
        graph_s = time.perf_counter() - start
        from reid_platform.pseudo.distances import EXACT_MAX

        used = job["index"] if job["index"] != "auto" else (
            "flat" if len(feats) <= EXACT_MAX else "ivf")
        extra = {"pairs_per_image": round(graph.nnz / len(feats), 1), "index": used}
        start = time.perf_counter()
        eps = auto_eps(graph)
        labels = dbscan(graph, eps, 4)
        record("dbscan", job["kind"], graph_s, time.perf_counter() - start, labels,
               {**extra, "eps": round(eps, 4)})
        threshold = 0.5 if job["kind"] == "jaccard" else 0.3
        start = time.perf_counter()
        labels = threshold_link(graph, threshold)
        record("link", job["kind"], graph_s, time.perf_counter() - start, labels,
               {**extra, "threshold": threshold})
    else:  # the dense baselines
        from sklearn.cluster import DBSCAN

        if job["kind"] == "dense_jaccard":
            from reid_platform.evaluation.rerank import k_reciprocal_rerank

            half = len(feats) // 2
            dist = 1.0 - feats @ feats.T  # (N, N): the reference takes the three blocks
            start = time.perf_counter()
            k_reciprocal_rerank(dist[:half, half:], dist[:half, :half], dist[half:, half:],
                                lambda_value=0.0)
            out.append({"kind": job["kind"], "s": time.perf_counter() - start,
                        "peak_mb": _peak_mb() - base})
        else:
            start = time.perf_counter()
            dist = np.maximum(1.0 - feats @ feats.T, 0.0)  # (N, N) float32
            DBSCAN(eps=0.3, min_samples=4, metric="precomputed").fit(dist)
            out.append({"kind": job["kind"], "s": time.perf_counter() - start,
                        "peak_mb": _peak_mb() - base})
    queue.put(out)


def run_isolated(job: dict, timeout: float) -> list[dict] | None:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_run, args=(job, queue))
    proc.start()
    try:
        result = queue.get(timeout=timeout)
    except Exception:  # queue.Empty after the timeout, or the child died (e.g. out of memory)
        result = None
    proc.join(timeout=30)
    if proc.is_alive():
        proc.kill()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--noise", type=float, default=0.6,
                        help="norm of the per-image noise around its identity's direction")
    parser.add_argument("--kinds", nargs="+", default=["jaccard", "cosine", "kmeans"],
                        choices=["jaccard", "cosine", "kmeans"])
    parser.add_argument("--index", default="auto", choices=["auto", "flat", "ivf"],
                        help="neighbour search of the graphs (auto: exact up to 50k images)")
    parser.add_argument("--kmeans-clusters", type=int, default=1000)
    parser.add_argument("--baseline-size", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=2, help="FAISS threads")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
    parser.add_argument("--no-baseline", action="store_true", help="skip the dense baseline")
    parser.add_argument("--smoke-test", action="store_true")
    args = parser.parse_args()
    if args.smoke_test:
        args.sizes, args.baseline_size, args.dim = [2000], 1000, 32

    baseline: dict[str, dict] = {}
    for kind in ("dense_jaccard", "dense_cosine") if not args.no_baseline else ():
        result = run_isolated({"kind": kind, "size": args.baseline_size, "dim": args.dim,
                               "noise": args.noise, "threads": args.threads}, args.timeout)
        if result:
            baseline[kind.removeprefix("dense_")] = result[0]
            print(json.dumps({"baseline": kind, "n": args.baseline_size,
                              "s": round(result[0]["s"], 2),
                              "peak_mb": round(result[0]["peak_mb"], 1)}), flush=True)
    for size in args.sizes:
        for kind in args.kinds:
            job = {"kind": kind, "size": size, "dim": args.dim, "noise": args.noise,
                   "threads": args.threads, "index": args.index,
                   "kmeans_clusters": args.kmeans_clusters}
            rows = run_isolated(job, args.timeout)
            if rows is None:
                print(json.dumps({"n": size, "kind": kind, "error": "did not finish (timeout "
                                  "or out of memory)"}), flush=True)
                continue
            for row in rows:
                ref = baseline.get(row["distance"]) if row["method"] != "kmeans" else None
                if ref is not None:
                    scale = (size / args.baseline_size) ** 2
                    row.update(
                        baseline=f"dense {row['distance']} at n={args.baseline_size}",
                        baseline_extrapolated=size != args.baseline_size,
                        baseline_s=round(ref["s"] * scale, 2),
                        baseline_peak_mb=round(ref["peak_mb"] * scale, 1),
                        time_ratio=round(row["total_s"] / (ref["s"] * scale), 4),
                        memory_ratio=round(row["peak_mb"] / max(ref["peak_mb"] * scale, 1e-9),
                                           4),
                    )
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
