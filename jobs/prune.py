"""Free disk: delete the resumable checkpoints of old training runs (MLflow keeps their models).

    python jobs/prune.py                      # list what would go (the 5 newest runs stay)
    python jobs/prune.py --keep-last 2 --older-than 7 --yes

A run's resumable checkpoint (weights + optimizer state) lives in
`<workspace>/ray_results/<run>/`; its final and best models stay in MLflow
(`checkpoints/final`, `checkpoints/best`). Runs MLflow shows as RUNNING are never pruned.
"""

from __future__ import annotations

import argparse

import _cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep-last", type=int, default=5, metavar="N",
                        help="keep the N most recent runs (default 5)")
    parser.add_argument("--older-than", type=float, default=0.0, metavar="DAYS",
                        help="only runs untouched for DAYS days (default: any age)")
    parser.add_argument("--yes", action="store_true", help="delete (default: only list)")
    parser.add_argument("--workspace", help="default: $REID_PLATFORM_HOME or ~/reid-platform")
    args = parser.parse_args()
    _cli.configure_console(False)

    from mlflow.tracking import MlflowClient

    from reid_platform.config import ConfigError, resolve_workspace
    from reid_platform.tracking import resolve_tracking_uri
    from reid_platform.training.prune import prune_runs

    if args.keep_last < 0 or args.older_than < 0:
        raise ConfigError("--keep-last and --older-than must be >= 0")
    workspace = resolve_workspace(args.workspace or "")
    config = _cli.Config(workspace=str(workspace))
    client = MlflowClient(resolve_tracking_uri(config))
    busy = {run.info.run_name for experiment in client.search_experiments()
            for run in client.search_runs([experiment.experiment_id],
                                          filter_string="attributes.status = 'RUNNING'")}
    pruned = prune_runs(workspace, args.keep_last, args.older_than, args.yes, busy)
    total = sum(r.size_bytes for r in pruned)
    for run in pruned:
        print(f"{'deleted' if args.yes else 'would delete'} {run.size_bytes / 2**20:8.1f} MiB "
              f"{run.path}")
    verb = "freed" if args.yes else "would free (add --yes to delete)"
    print(f"{len(pruned)} run(s), {verb} {total / 2**20:.1f} MiB")


if __name__ == "__main__":
    _cli.run_main(main)
