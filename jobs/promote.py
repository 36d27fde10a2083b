"""Point an alias of a registered model at a version (MLflow aliases, not the deprecated stages).

    python jobs/promote.py --model demo --version 3 --alias production
    python jobs/promote.py --model demo --best-by score --alias production   # highest score tag
    python jobs/promote.py --model demo --list                               # versions, aliases

Every job that takes `--checkpoint` (and `train.resume_from`, the service) then accepts
`models:/demo@production`. The store is `--tracking-uri`, else $MLFLOW_TRACKING_URI, else the
workspace's SQLite file. The last line printed is the alias's URI and the version it points at.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import _cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    parser.add_argument("--model", required=True, help="registered model name")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--version", help="the version to point the alias at")
    which.add_argument(
        "--best-by",
        choices=("score", "mAP", "rank1", "mINP"),
        help="the version with the highest value of this tag",
    )
    parser.add_argument("--alias", help="alias to set, e.g. production")
    parser.add_argument("--list", action="store_true", help="list versions and aliases")
    parser.add_argument(
        "--tracking-uri", default="", help="MLflow store (default: $MLFLOW_TRACKING_URI or the "
        "workspace's SQLite file)"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--smoke-test", action="store_true",
                        help="a throw-away store with two versions of a tiny model: list them "
                        "and promote the best by score")
    _cli.add_verbose_arg(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--smoke-test" in argv and "--model" not in argv:
        argv += ["--model", "smoke"]
    args = parser.parse_args(argv)
    if args.smoke_test:  # promote the better of the two throw-away versions
        args.best_by, args.version = args.best_by or "score", None
        args.alias = args.alias or "production"
    if not args.list:
        if not args.alias:
            parser.error("--alias is required (or --list)")
        if args.version is None and args.best_by is None:
            parser.error("give --version V or --best-by METRIC")
    return args


def list_versions(uri: str, name: str) -> list[dict]:
    """One row per version: version, aliases, run, score tags."""
    from mlflow.tracking import MlflowClient

    from reid_platform.tracking import SCORE_TAGS, RegistryError, check_store

    check_store(uri)
    client = MlflowClient(uri, registry_uri=uri)
    try:
        registered = client.get_registered_model(name)
    except Exception:  # noqa: BLE001 - MLflow raises its own exception for a missing name
        raise RegistryError(f"no registered model {name!r} in {uri}") from None
    aliases: dict[str, list[str]] = {}
    for alias, version in (registered.aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for mv in sorted(client.search_model_versions(f"name = '{name}'"),
                     key=lambda v: int(v.version)):
        row = {"version": mv.version, "aliases": sorted(aliases.get(str(mv.version), [])),
               "run_id": mv.run_id, "dataset": mv.tags.get("dataset", "")}
        row.update({k: mv.tags[k] for k in SCORE_TAGS if k in mv.tags})
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    _cli.configure_console(args.verbose)
    if args.smoke_test:
        with tempfile.TemporaryDirectory(prefix="promote-smoke-") as tmp:
            uri, args.model = _cli.smoke_registry(Path(tmp))
            args.tracking_uri = uri
            list_args = argparse.Namespace(**{**vars(args), "list": True})
            run(list_args)
            return run(args)
    return run(args)


def run(args: argparse.Namespace) -> dict:
    from reid_platform.tracking import default_tracking_uri, promote

    uri = args.tracking_uri or default_tracking_uri()
    if args.list:
        rows = list_versions(uri, args.model)
        if args.json:
            print(json.dumps(rows))
        for row in rows:
            scores = " ".join(f"{k} {row[k]}" for k in ("score", "mAP", "rank1") if k in row)
            aliases = f" @{', @'.join(row['aliases'])}" if row["aliases"] else ""
            print(f"{args.model}/{row['version']}{aliases}  run {row['run_id']}  "
                  f"dataset {row['dataset'] or '-'}  {scores}")
        return {"versions": rows}
    mv = promote(uri, args.model, args.alias, version=args.version, best_by=args.best_by)
    result = {"model": args.model, "alias": args.alias, "version": str(mv.version),
              "run_id": mv.run_id, "uri": f"models:/{args.model}@{args.alias}",
              **{k: mv.tags[k] for k in ("score", "mAP", "rank1") if k in mv.tags}}
    if args.json:
        print(json.dumps(result))
    scores = ", ".join(f"{k} {mv.tags[k]}" for k in ("score", "mAP", "rank1") if k in mv.tags)
    print(f"models:/{args.model}@{args.alias} -> version {mv.version} (run {mv.run_id}"
          + (f"; {scores}" if scores else "") + ")")
    return result


if __name__ == "__main__":
    _cli.run_main(main)
