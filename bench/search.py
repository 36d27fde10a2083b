"""Search speed and recall@10 of the sharded gallery index, against exact search in the same run.

Builds a `ShardedIndex` for each index type (Flat, IVF<nlist>,Flat, HNSW32), single-shard and
sharded, on clustered synthetic unit vectors (about 20 images per identity, like Market-1501),
and searches it with each setting of nprobe / efSearch. The baseline is a plain
faiss.IndexFlatIP over all vectors (exact top-k): its result is the ground truth for recall and
its queries/s the denominator of the `*_vs_exact` ratios.

    python bench/search.py                    # 100k gallery, dim 256, 1000 queries
    python bench/search.py --n 1000000 --types Flat IVF   # larger, skipping the HNSW builds
    python bench/search.py --threads 1        # steadier numbers on a busy machine
    python bench/search.py --smoke-test       # tiny sizes, a few seconds

On a machine with more runnable threads than cores, OpenMP's spinning makes multi-threaded
FAISS searches of one query at a time very slow (HNSW: about 20x at 2 threads on 2 busy cores);
--threads 1 measures the per-core cost, which is also what one Serve replica per core gets.

Prints one JSON line per (index type, shards, search setting) and a summary line. Fields:
  qps          queries/s searching all queries in one batch (best of --repeats)
  qps_single   queries/s searching one query per call (--single-queries of them), the
               shape of an unbatched request
  qps_cpu, qps_single_cpu   the same per CPU-second of this process: with --threads 1 this is
               the uncontended speed even when other jobs share the cores
  exact_*      the same for the exact baseline; *_vs_exact: ratio to it
  recall_at_10 mean |top-10 ∩ exact top-10| / 10
  build_s      create + add (SQLite writes, training, FAISS add) + save, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

from reid_platform.retrieval import ShardedIndex


def clustered_unit_vectors(
    num_points: int, num_ids: int, dim: int, seed: int, centre_seed: int = 0
) -> np.ndarray:
    """(num_points, dim) float32 unit vectors around `num_ids` identity centres; the centres
    depend only on `centre_seed`, so gallery and queries share identities."""
    centres = np.random.default_rng(centre_seed).standard_normal((num_ids, dim), dtype=np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((num_points, dim), dtype=np.float32)
    for start in range(0, num_points, 100_000):  # chunks keep the temporaries small at 1M
        stop = min(start + 100_000, num_points)
        chunk = centres[rng.integers(0, num_ids, stop - start)]
        chunk += 0.8 * rng.standard_normal(chunk.shape, dtype=np.float32)
        out[start:stop] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return out


def best_time(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Fastest of `repeats` runs of `fn`: (wall seconds, CPU seconds of this process)."""
    wall, cpu = [], []
    for _ in range(repeats):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
    return min(wall), min(cpu)


def measure(
    search: Callable[[np.ndarray, int], object], queries: np.ndarray, k: int, args
) -> dict[str, float]:
    """Queries/s in one batch and one query per call, by wall clock and by CPU time."""
    batch_wall, batch_cpu = best_time(lambda: search(queries, k), args.repeats)
    singles = queries[: args.single_queries]
    single_wall, single_cpu = best_time(lambda: [search(q[None], k) for q in singles], 1)
    return {
        "qps": len(queries) / batch_wall,
        "qps_single": len(singles) / single_wall,
        "qps_cpu": len(queries) / batch_cpu,
        "qps_single_cpu": len(singles) / single_cpu,
    }


def recall_at(found: list[list[str]], exact: np.ndarray, k: int) -> float:
    """Mean |found top-k ∩ exact top-k| / k; exact: (Q, k) int64 row numbers of the gallery."""
    hits = [
        len({int(i) for i in row[:k]} & set(ref[:k].tolist())) for row, ref in zip(found, exact)
    ]
    return float(np.mean(hits)) / k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="gallery size")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--types", nargs="+", default=["Flat", "IVF", "HNSW"])
    parser.add_argument("--nlist", type=int, default=1024, help="IVF lists")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--ef-search", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--single-queries", type=int, default=200)
    parser.add_argument(
        "--threads", type=int, default=None, help="FAISS OpenMP threads (default: all cores)"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="where indexes are built")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke-test", action="store_true", help="tiny sizes, a few seconds")
    args = parser.parse_args()
    if args.smoke_test:
        args.n, args.dim, args.queries, args.nlist = 2000, 32, 50, 16
        args.nprobe, args.ef_search, args.repeats, args.single_queries = [4], [32], 1, 20

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    num_ids = max(2, args.n // 20)
    gallery = clustered_unit_vectors(args.n, num_ids, args.dim, seed=args.seed + 1)
    queries = clustered_unit_vectors(args.queries, num_ids, args.dim, seed=args.seed + 2)
    ids = [str(i) for i in range(args.n)]  # row number as id: recall compares row numbers

    exact = faiss.IndexFlatIP(args.dim)
    exact.add(gallery)
    _, exact_top = exact.search(queries, args.k)  # (Q, k) ground truth
    exact_speed = measure(exact.search, queries, args.k, args)
    common = {
        "bench": "search",
        "n": args.n,
        "dim": args.dim,
        "queries": args.queries,
        "k": args.k,
        "threads": faiss.omp_get_max_threads(),
        **{f"exact_{key}": round(value, 1) for key, value in exact_speed.items()},
    }

    settings = {
        "Flat": ("Flat", [{}]),
        "IVF": (f"IVF{args.nlist},Flat", [{"nprobe": p} for p in args.nprobe]),
        "HNSW": ("HNSW32", [{"ef_search": e} for e in args.ef_search]),
    }
    lines = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        for kind in args.types:
            index_type, param_grid = settings[kind]
            for num_shards in args.shards:
                path = Path(workdir) / f"{kind}-{num_shards}"
                start = time.perf_counter()
                index = ShardedIndex.create(path, args.dim, num_shards, index_type)
                index.add(ids, gallery)
                index.save()
                build_s = time.perf_counter() - start
                for params in param_grid:
                    index.set_search_params(**params)
                    _, found = index.search(queries, args.k)
                    speed = measure(index.search, queries, args.k, args)
                    line = {
                        **common,
                        "index_type": index_type,
                        "shards": num_shards,
                        "params": params,
                        "build_s": round(build_s, 2),
                        **{key: round(value, 1) for key, value in speed.items()},
                        **{
                            f"{key}_vs_exact": round(value / exact_speed[key], 3)
                            for key, value in speed.items()
                        },
                        "recall_at_10": round(recall_at(found, exact_top, 10), 4),
                        "loadavg_1m": round(os.getloadavg()[0], 2),  # > cores: numbers are noisy
                    }
                    lines.append(line)
                    print(json.dumps(line), flush=True)
                index.close()
                shutil.rmtree(path)  # at 1M each index is GBs of SQLite on disk

    # Fastest per CPU-second: the ranking that survives other jobs sharing the cores.
    good = [x for x in lines if x["recall_at_10"] >= 0.95]
    fastest = max(good, key=lambda x: x["qps_cpu"]) if good else None
    keys = ("index_type", "shards", "params", "recall_at_10", "qps", "qps_vs_exact")
    summary = {
        "bench": "search",
        "summary": True,
        "n": args.n,
        "dim": args.dim,
        "threads": common["threads"],
        "exact_qps": common["exact_qps"],
        "exact_qps_cpu": common["exact_qps_cpu"],
        "configs": len(lines),
        "fastest_with_recall_0.95": (
            {key: fastest[key] for key in (*keys, "qps_cpu", "qps_cpu_vs_exact")}
            if fastest
            else None
        ),
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
