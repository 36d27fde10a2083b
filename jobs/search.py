"""Offline batch retrieval: rank a gallery index for a folder/CSV of queries (or their boxes).

    python jobs/search.py --index ~/reid-platform/index --queries /data/Market-1501 --k 10 \\
        --out results.csv                       # the dataset's query split
    python jobs/search.py --index DIR --queries scenes/ --boxes detections.csv \\
        --label-key class --out results.csv     # one result list per box, with a voted label
    python jobs/search.py --smoke-test          # tiny model, index and queries, seconds

Ray Data embeds the queries (batched, GPUs when present) with the index's checkpoint; each query
gets its top-k (`--where` / `--exclude` filter on metadata). `--boxes` is a CSV
`image,x,y,w,h[,box_id]` (image paths relative to --queries): each box is cropped and searched.
`--label-key` adds the score-weighted vote of the hits' metadata value. A corrupt query image is
skipped and listed. The CSV has one row per (query, rank); the last line printed is the JSON
summary.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

import _cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", help="index directory (jobs/build_index.py --out)")
    parser.add_argument("--queries", help="dataset root, CSV manifest or folder of images")
    parser.add_argument("--boxes", help="CSV image,x,y,w,h[,box_id]: search each box")
    parser.add_argument("--checkpoint", help="model checkpoint (default: the index's)")
    parser.add_argument("--k", type=int, default=10, help="hits per query (default 10)")
    parser.add_argument("--label-key", help="metadata key to vote a label from, e.g. class")
    parser.add_argument("--where", type=json.loads, help="metadata filter, e.g. '{\"camid\": 1}'")
    parser.add_argument("--exclude", type=json.loads, help="metadata filter of hits to drop")
    parser.add_argument("--out", help="results CSV")
    parser.add_argument("--batch-size", type=int, default=None, help="images per forward pass")
    parser.add_argument("--workers", type=int, default=None, help="embedding actors")
    parser.add_argument("--num-gpus", type=float, default=None, help="GPUs per actor")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--smoke-test", action="store_true", help="tiny model and data")
    args = parser.parse_args(argv)
    if not args.smoke_test:
        missing = [f"--{n}" for n in ("index", "queries", "out") if not getattr(args, n)]
        if missing:
            parser.error(f"the following arguments are required: {', '.join(missing)}")
    if args.k < 1:
        parser.error(f"--k must be >= 1, got {args.k}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from reid_platform.retrieval.batch_search import (
        query_samples,
        read_boxes,
        search_queries,
        write_results,
    )
    from reid_platform.retrieval.gallery import DEFAULT_BATCH_SIZE, build_gallery_index
    from reid_platform.runtime import init_ray

    scratch = (
        tempfile.TemporaryDirectory(prefix="search-smoke-")
        if args.smoke_test
        else contextlib.nullcontext()
    )
    with scratch as tmp:
        init_ray()
        if args.smoke_test:
            checkpoint, data = _cli.smoke_checkpoint(Path(tmp))
            args.index = str(Path(tmp) / "index")
            build_gallery_index(checkpoint, data, args.index, num_shards=2, progress=False)
            args.queries, args.out = str(data), args.out or str(Path(tmp) / "results.csv")
        samples = (
            read_boxes(args.boxes, args.queries) if args.boxes else query_samples(args.queries)
        )
        skipped: list[str] = []
        try:
            results = search_queries(
                args.index,
                samples,
                checkpoint=args.checkpoint,
                k=args.k,
                label_key=args.label_key,
                where=args.where,
                exclude=args.exclude,
                batch_size=args.batch_size or DEFAULT_BATCH_SIZE,
                concurrency=args.workers,
                num_gpus=args.num_gpus,
                progress=not args.no_progress,
                skipped=skipped,
            )
            written = write_results(results, args.out, args.label_key)
        except ValueError as err:  # a bad filter or an index without checkpoint
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        for line in skipped[:20]:
            print(f"skipped {line}")
        summary = {
            "out": str(Path(args.out).resolve()) if not args.smoke_test else args.out,
            "queries": len(samples),
            "searched": written,
            "skipped": len(skipped),
            "k": args.k,
        }
    print(f"results: {summary['out']}  {written} queries searched, {len(skipped)} skipped")
    print(json.dumps(summary, sort_keys=True))
    return summary


if __name__ == "__main__":
    _cli.run_main(main)
