"""Print where an index's model came from: sweep run -> training run -> model version -> index.

    python jobs/lineage.py --index ~/reid-platform/index
    python jobs/lineage.py --index DIR --json          # the chain as one JSON object

The links are read from the index manifest, its checkpoint (the MLflow run that wrote it; for a
checkpoint fetched by model URI, the registered version) and the MLflow store
(`--tracking-uri`, else what the records name, else $MLFLOW_TRACKING_URI or the workspace's
SQLite file). A link that cannot be followed is reported in a `note:` line.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path

import _cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    parser.add_argument("--index", help="index directory (with manifest.json)")
    parser.add_argument("--tracking-uri", default="", help="MLflow store to look runs up in")
    parser.add_argument("--json", action="store_true", help="print the chain as JSON")
    parser.add_argument("--smoke-test", action="store_true",
                        help="a throw-away store, model and empty index: print their lineage")
    _cli.add_verbose_arg(parser)
    args = parser.parse_args(argv)
    if not args.index and not args.smoke_test:
        parser.error("the following arguments are required: --index")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    _cli.configure_console(args.verbose)
    from reid_platform.lineage import format_lineage, index_lineage, lineage_json

    with contextlib.ExitStack() as stack:
        if args.smoke_test:
            args.index, args.tracking_uri = smoke_index(
                Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lineage-smoke-")))
            )
        chain = index_lineage(args.index, args.tracking_uri or None)
    print(lineage_json(chain) if args.json else format_lineage(chain))
    return chain


def smoke_index(directory: Path) -> tuple[str, str]:
    """An empty index built "from" models:/smoke@production of a throw-away store."""
    from reid_platform.checkpoint import cached_model_checkpoint
    from reid_platform.retrieval.index import ShardedIndex
    from reid_platform.tracking import promote

    uri, name = _cli.smoke_registry(directory)
    promote(uri, name, "production", best_by="score")
    checkpoint = cached_model_checkpoint(f"models:/{name}@production", uri)
    index_dir = directory / "index"
    ShardedIndex.create(index_dir, dim=8, num_shards=2, extra={"checkpoint": str(checkpoint)})
    return str(index_dir), uri


if __name__ == "__main__":
    _cli.run_main(main)
