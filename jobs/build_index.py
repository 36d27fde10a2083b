"""Embed a gallery with Ray Data and write a sharded FAISS index for the retrieval service.

    python jobs/build_index.py --checkpoint CKPT --gallery /data/Market-1501 --shards 4 \\
        --index-type Flat --out ~/reid-platform/index
    python jobs/build_index.py ... --index-type IVF1024,PQ32     # any FAISS factory string
    python jobs/build_index.py ... --augment flip    # also index each image's mirror view
    python jobs/build_index.py --smoke-test                       # tiny model + synthetic data

The gallery is any dataset the platform reads (a Market-1501 tree or CSV manifest: its gallery
split; format detected, or `--format`) or a plain folder of images. Item ids are paths relative
to the dataset root unless the manifest has an `id` column. Re-running with the same arguments
is safe: items are upserted by id. The last line printed is the JSON summary.
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
    from reid_platform.retrieval.gallery import DEFAULT_BATCH_SIZE, GALLERY_FORMATS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint",
        help="checkpoint directory, model.pt, or model URI (models:/NAME@ALIAS, runs:/RUN/model)",
    )
    parser.add_argument("--gallery", help="dataset root, CSV manifest or folder of images")
    parser.add_argument(
        "--format",
        default="auto",
        choices=GALLERY_FORMATS,
        help="gallery format (default: detected from the path)",
    )
    parser.add_argument("--shards", type=int, default=1, help="index shards (default 1)")
    parser.add_argument(
        "--index-type",
        default="Flat",
        help="Flat, or a FAISS factory string such as IVF1024,PQ32 or HNSW32",
    )
    parser.add_argument("--out", help="index directory")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help=f"images per forward pass (default {DEFAULT_BATCH_SIZE})",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="embedding actors (default: one per GPU, else CPUs/2, 1..4)",
    )
    parser.add_argument(
        "--num-gpus",
        type=float,
        default=None,
        help="GPUs per actor (default: 1 when the cluster has GPUs, else 0)",
    )
    parser.add_argument(
        "--tta",
        choices=("none", "flip"),
        default="none",
        help="flip: average each image's embedding with its mirror image's (the service and "
        "jobs/search.py then embed queries the same way)",
    )
    parser.add_argument(
        "--augment",
        choices=("none", "flip"),
        default="none",
        help="flip: also index each gallery image's mirror image as a second view of the item "
        "(results stay one hit per item, its best view; the service's gallery writes add both)",
    )
    parser.add_argument(
        "--runtime",
        choices=("torch", "onnx"),
        default="torch",
        help="onnx: embed with the checkpoint's ONNX export under ONNX Runtime (exported "
        "beside the checkpoint first when there is none)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--smoke-test",
        action="store_true",
        help="tiny model and synthetic gallery in a temporary folder",
    )
    args = parser.parse_args(argv)
    if not args.smoke_test:
        missing = [f"--{n}" for n in ("checkpoint", "gallery", "out") if not getattr(args, n)]
        if missing:
            parser.error(f"the following arguments are required: {', '.join(missing)}")
    if args.shards < 1:
        parser.error(f"--shards must be >= 1, got {args.shards}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from reid_platform.retrieval.gallery import IndexBuildError, build_gallery_index
    from reid_platform.runtime import init_ray

    scratch = (
        tempfile.TemporaryDirectory(prefix="build-index-smoke-")
        if args.smoke_test
        else contextlib.nullcontext()
    )
    with scratch as tmp:
        if args.smoke_test:
            args.checkpoint, args.gallery = _cli.smoke_checkpoint(Path(tmp))
            args.out = args.out or str(Path(tmp) / "index")
            args.shards = max(args.shards, 2)
        init_ray()
        try:
            summary = build_gallery_index(
                args.checkpoint,
                args.gallery,
                args.out,
                num_shards=args.shards,
                index_type=args.index_type,
                fmt=args.format,
                batch_size=args.batch_size,
                concurrency=args.workers,
                num_gpus=args.num_gpus,
                progress=not args.no_progress,
                tta=args.tta,
                augment=args.augment,
                runtime=args.runtime,
            )
        except IndexBuildError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
    print(
        f"index: {summary['out']}  {summary['count']} items in {len(summary['counts'])} "
        f"shards {summary['counts']}, {summary['skipped']} images skipped"
    )
    print(json.dumps(summary, sort_keys=True))
    return summary


if __name__ == "__main__":
    _cli.run_main(main)
