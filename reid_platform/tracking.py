"""MLflow: where runs go, logging that works from the driver and from Ray workers, and the
evaluation job's runs.

The driver resolves the tracking URI, creates the experiment (Ray workers must not race to
create it) and the run; rank 0 of the training workers logs metrics and artifacts into that run
by id. The default store is SQLite under the workspace with artifacts beside it; a cluster sets
MLFLOW_TRACKING_URI to a tracking server.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from reid_platform.config import Config

MAX_PARAM_LENGTH = 6000


def resolve_tracking_uri(config: Config) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else an absolute SQLite URI in the workspace."""
    uri = config.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        return uri
    return f"sqlite:///{config.workspace_dir / 'mlflow.db'}"


def artifact_root(config: Config, uri: str) -> str | None:
    """Explicit artifact location for local stores; a server decides its own."""
    if uri.startswith(("sqlite:", "file:")) or uri.startswith("/"):
        return (config.workspace_dir / "mlflow-artifacts").as_uri()
    return None


def ensure_experiment(config: Config, uri: str) -> str:
    """Create the config's experiment if needed (in the driver); returns its id."""
    client = MlflowClient(uri)
    name = config.experiment_name
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    root = artifact_root(config, uri)
    location = f"{root}/{name}" if root else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:
        # another process created it first
        return client.get_experiment_by_name(name).experiment_id


def git_commit() -> str:
    """The commit of the working tree, or "unknown" (e.g. inside a `ray job` copy)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def code_digest() -> str:
    """SHA-256 of the package's source files: identifies the code where git cannot (a `ray job`
    runs in a copy of the working dir without `.git`)."""
    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def start_run(
    config: Config,
    uri: str,
    run_name: str = "",
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
) -> str:
    """Create a run with the flattened config as params and standard tags; returns its id."""
    client = MlflowClient(uri)
    experiment_id = ensure_experiment(config, uri)
    all_tags = {"git_commit": git_commit(), "code_digest": code_digest(),
                "config_name": config.name}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    all_tags.update(tags or {})
    run = client.create_run(
        experiment_id,
        run_name=run_name or config.tracking.run_name or None,
        tags=all_tags,
    )
    log_params(client, run.info.run_id, config.flat())
    return run.info.run_id


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow accepts 100 params per batch
        client.log_batch(run_id, params=items[start : start + 100])


class RunLogger:
    """Log metrics and artifacts into an existing run (picklable: only strings inside).

    Args:
        uri: tracking URI.
        run_id: the run created by the driver; None makes every call a no-op (ranks > 0).
    """

    def __init__(self, uri: str, run_id: str | None):
        self.uri = uri
        self.run_id = run_id

    @property
    def active(self) -> bool:
        return self.run_id is not None

    def _client(self) -> MlflowClient:
        return MlflowClient(self.uri)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.active:
            return
        now = int(time.time() * 1000)
        items = [
            Metric(key, float(value), now, step)
            for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        ]
        for start in range(0, len(items), 1000):
            self._client().log_batch(self.run_id, metrics=items[start : start + 1000])

    def log_metrics_once(self, metrics: Mapping[str, float], step: int,
                         marker: str = "epoch") -> bool:
        """`log_metrics` unless this step was logged already (its `marker` metric exists).

        A training attempt that failed after logging an epoch, then re-ran it, must not log
        that epoch twice. The metrics of one call go in one `log_batch`, so the marker's
        presence means the whole step is there.

        Returns:
            True if logged.
        """
        if not self.active:
            return False
        if marker in metrics:
            history = self._client().get_metric_history(self.run_id, marker)
            if any(m.step == step for m in history):
                return False
        self.log_metrics(metrics, step)
        return True

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.active:
            return
        path = Path(path)
        if path.is_dir():
            self._client().log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self._client().log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if not self.active:
            return
        self._client().log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def end(self, status: str = "FINISHED") -> None:
        if self.active:
            self._client().set_terminated(self.run_id, status)

    @contextlib.contextmanager
    def ending_on_exit(self) -> Iterator[RunLogger]:
        """End the run on every way out of the block: FINISHED when it completes, KILLED on
        Ctrl+C / SIGTERM (KeyboardInterrupt, SystemExit), FAILED on any other error."""
        try:
            yield self
        except (KeyboardInterrupt, SystemExit):
            self.end("KILLED")
            raise
        except BaseException:
            self.end("FAILED")
            raise
        self.end("FINISHED")


# ---- evaluation runs ------------------------------------------------------------------------

_UNSAFE_NAME = re.compile(r"[^\w\-. :/]")


def evaluation_metric_name(variant: str, metric: str) -> str:
    """`eval/<variant>/<metric>`, characters MLflow rejects (e.g. `+`) replaced by `_`."""
    return f"eval/{_UNSAFE_NAME.sub('_', variant.replace('/', '_'))}/{metric}"


def evaluation_metrics(report: Mapping[str, Any], metric_names: Sequence[str]) -> dict[str, float]:
    """The MLflow metrics of an evaluation report: every variant's metrics and the counts.

    Args:
        report: as `reid_platform.evaluation.pipeline.build_report` writes it.
        metric_names: the per-variant metrics to log (rank1, mAP, ...).
    """
    metrics = {
        evaluation_metric_name(name, key): values[key]
        for name, values in report["variants"].items()
        for key in metric_names
    }
    queries = report["queries"]
    metrics["eval/valid_queries"] = queries["valid"]
    metrics["eval/skipped_queries"] = queries["skipped"]
    metrics["eval/skipped_queries_absent_from_gallery"] = queries["skipped_absent_from_gallery"]
    metrics["eval/skipped_queries_same_camera_only"] = queries["skipped_same_camera_only"]
    metrics["eval/skipped_images"] = len(report["skipped_images"])
    return metrics


def require_run(config: Config, run_id: str) -> str:
    """The tracking URI (of the config) in which `run_id` exists.

    Raises:
        LookupError: no such run there; the message names the run and the store.
    """
    uri = resolve_tracking_uri(config)
    try:
        MlflowClient(uri).get_run(run_id)
    except mlflow.exceptions.MlflowException as err:
        raise LookupError(f"no MLflow run {run_id} at {uri} ({err})") from None
    return uri


def log_evaluation(
    report: dict[str, Any],
    report_path: Path,
    config: Config,
    metric_names: Sequence[str],
    run_id: str | None = None,
) -> tuple[str, str]:
    """Log an evaluation report to MLflow: metrics, tags, and its folder as `evaluation/`.

    The run is recorded in the report (`report["mlflow"]`) and report_path rewritten before
    the folder is uploaded.

    Args:
        report: the evaluation report (checkpoints, options, variants, queries...).
        report_path: its JSON file; the folder holding it (pictures too) is the artifact.
        config: names the experiment and the tracking URI.
        metric_names: the per-variant metrics to log.
        run_id: an existing (e.g. training) run to log into; None creates a run.

    Returns:
        (tracking URI, run id).
    """
    uri = resolve_tracking_uri(config)
    out_dir = report_path.parent
    tags = {
        "eval.checkpoints": ", ".join(c["path"] for c in report["checkpoints"]),
        "eval.best_variant": report["best_variant"],
        "eval.output_dir": str(out_dir),
        **{f"eval.{k}": str(v) for k, v in report["options"].items()},
    }
    created = run_id is None
    if created:
        run_id = start_run(
            config,
            uri,
            run_name=f"eval-{out_dir.name}",
            tags={"job": "evaluate", "dataset": report["dataset"].get("name", "")},
        )
    logger = RunLogger(uri, run_id)
    # A run created here ends with the logging (FAILED / KILLED if it does not complete); a
    # given run (e.g. the training's) stays as it is.
    with logger.ending_on_exit() if created else contextlib.nullcontext():
        report["mlflow"] = {"tracking_uri": uri, "run_id": run_id}
        report_path.write_text(json.dumps(report, indent=2) + "\n")
        logger.set_tags(tags)
        step = report["checkpoints"][0].get("epoch") or 0
        logger.log_metrics(evaluation_metrics(report, metric_names), step=int(step))
        logger.log_artifact(out_dir, "evaluation")
    return uri, run_id
