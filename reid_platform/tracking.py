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
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
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
    dataset: Any = None,
) -> str:
    """Create a run with the flattened config as params and standard tags; returns its id.

    Args:
        dataset: the `ReidDataset` the run trains on, recorded as its MLflow dataset input
            (`log_dataset`).
    """
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
    if dataset is not None:
        log_dataset(uri, run.info.run_id, dataset)
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


# ---- datasets, models and the registry --------------------------------------------------
#
# A training run records its dataset as an MLflow dataset input and logs an MLflow Model (a
# pyfunc from code, `reid_platform/mlflow_model.py`, with the slim checkpoint inside as the
# artifact `artifacts/model.pt`), registered as a new version of `tracking.registered_model`.
# Model URIs (`models:/NAME@alias`, `models:/NAME/3`, `runs:/RUN/path`) are resolved here and
# downloaded by `reid_platform.checkpoint`, which reads the checkpoint with the safe loader.

MODEL_ARTIFACT = "model"  # the MLflow Model's name in its run: runs:/RUN/model
MODEL_CHECKPOINT_PATH = "artifacts/model.pt"  # the checkpoint inside the MLflow Model
MODEL_CODE = Path(__file__).resolve().parent / "mlflow_model.py"
# Version tags that hold numbers (`promote --best-by` reads them).
SCORE_TAGS = ("score", "mAP", "rank1", "mINP")
SWEEP_PARENT_TAG = "sweep_parent_run_id"
# What `mlflow.pyfunc.load_model` needs besides the code shipped in the model.
PYFUNC_PACKAGES = ("torch", "timm", "albumentations", "opencv-python-headless", "numpy",
                   "pyyaml", "mlflow")


class RegistryError(ValueError):
    """A registered model, version, alias or run is missing or unusable; the message names it."""


@contextlib.contextmanager
def using_store(uri: str) -> Iterator[None]:
    """Make `uri` MLflow's process-wide tracking (and so registry) URI for the block.

    Parts of MLflow ignore the URI given to a client or call and use the process-wide one:
    `Model.log`, the SQLite registry's check of a logged model, and downloads of `models:/`
    artifacts. A driver may talk to several stores, so the setting is restored afterwards,
    and so is $MLFLOW_TRACKING_URI, which MLflow sets (and on restoring "unset", deletes).
    """
    from mlflow.tracking._tracking_service import utils

    saved, saved_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved)
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


def default_tracking_uri(workspace: str = "") -> str:
    """$MLFLOW_TRACKING_URI, else the SQLite store of the workspace (absolute URI)."""
    from reid_platform.config import resolve_workspace

    return os.environ.get("MLFLOW_TRACKING_URI", "") or (
        f"sqlite:///{resolve_workspace(workspace) / 'mlflow.db'}"
    )


def registered_model_name(config: Config) -> str:
    """`tracking.registered_model`, or the config's name."""
    return config.tracking.registered_model or config.name


def check_store(uri: str) -> None:
    """Refuse a local SQLite store that does not exist (MLflow would create an empty one,
    which takes a while and then has no models), naming the file."""
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise RegistryError(
            f"no MLflow store at {uri} (set MLFLOW_TRACKING_URI to the tracking server that "
            "holds the model)"
        )


# ---- datasets -------------------------------------------------------------------------------


def dataset_digest(dataset: Any) -> str:
    """A fingerprint of what a run trained and evaluated on: every sample's split, id (path
    relative to its root), pid, camid, box and file size. Equal for the same data on any
    machine or mount point; changes when an image is added, removed, relabelled or replaced
    by one of another size.

    Args:
        dataset: a `reid_platform.data.formats.ReidDataset`.

    Returns:
        16 hex digits.
    """
    digest = hashlib.sha256()
    roots = {"train": dataset.root, "query": dataset.eval_root or dataset.root,
             "gallery": dataset.eval_root or dataset.root}
    for split, root in roots.items():
        rows = []
        for sample in getattr(dataset, split):
            name = sample.item_id or _relative(sample.path, root)
            try:
                size = os.stat(sample.path).st_size
            except OSError:
                size = -1
            rows.append(f"{split}\t{name}\t{sample.pid}\t{sample.camid}\t{sample.box}\t{size}")
        digest.update("\n".join(sorted(rows)).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _relative(path: str, root: Path | None) -> str:
    try:
        return str(Path(path).relative_to(root)) if root is not None else path
    except ValueError:
        return path


def dataset_profile(dataset: Any) -> dict[str, int]:
    """Image and identity counts per split (the dataset input's profile)."""
    profile = {}
    for split in ("train", "query", "gallery"):
        samples = getattr(dataset, split)
        profile[f"{split}_images"] = len(samples)
        profile[f"{split}_ids"] = len({s.pid for s in samples})
    return profile


SAMPLE_SCHEMA = {"mlflow_colspec": [
    {"type": "string", "name": "path", "required": True},
    {"type": "long", "name": "pid", "required": True},
    {"type": "long", "name": "camid", "required": True},
    {"type": "string", "name": "split", "required": True},
]}


def log_dataset(uri: str, run_id: str, dataset: Any) -> dict[str, str]:
    """Record the run's dataset as MLflow dataset inputs: the training data (context `train`)
    and, for a cross-domain evaluation, the evaluation data (context `eval`).

    Args:
        dataset: a `ReidDataset`.

    Returns:
        {"name", "digest", "source"} of the training input.
    """
    from mlflow.entities import Dataset, DatasetInput, InputTag

    digest = dataset_digest(dataset)
    profile = json.dumps(dataset_profile(dataset))
    schema = json.dumps(SAMPLE_SCHEMA)
    inputs = [(dataset.name, dataset.root, "train")]
    if dataset.eval_root is not None:
        inputs.append((dataset.eval_name or Path(dataset.eval_root).name, dataset.eval_root,
                       "eval"))
    entities = [
        DatasetInput(
            Dataset(name=name, digest=digest, source_type="local",
                    source=json.dumps({"uri": str(root)}), schema=schema, profile=profile),
            tags=[InputTag("mlflow.data.context", context)],
        )
        for name, root, context in inputs
    ]
    MlflowClient(uri).log_inputs(run_id, datasets=entities)
    return {"name": dataset.name, "digest": digest, "source": str(dataset.root)}


# ---- the MLflow Model ---------------------------------------------------------------------------


def model_signature(height: int, width: int, dim: int) -> Any:
    """Signature of the pyfunc: (N, H, W, 3) uint8 images in (any size; H x W is what the
    model resizes to), (N, dim) float32 embeddings out."""
    import numpy as np
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    del height, width  # any input size is accepted: resized to the model's
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3), "images")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, dim), "embeddings")]),
    )


def _pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for package in PYFUNC_PACKAGES:
        try:
            out.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            out.append(package)
    return out


def log_reid_model(uri: str, run_id: str, checkpoint: str | Path) -> Any:
    """Log a checkpoint as the run's MLflow Model `model` (pyfunc from code, with its signature,
    input size and the slim checkpoint inside).

    Args:
        checkpoint: a checkpoint directory or `model.pt` (its training state is dropped).

    Returns:
        MLflow's ModelInfo (`model_uri` models:/m-..., `model_id`, `metadata`).
    """
    import tempfile

    import mlflow.pyfunc
    from mlflow.models import Model

    from reid_platform.checkpoint import CHECKPOINT_FILE, FORMAT, load_model, slim_copy

    with tempfile.TemporaryDirectory() as tmp:
        slim = slim_copy(checkpoint, tmp) / CHECKPOINT_FILE
        model, config = load_model(slim)
        height, width, dim = config.data.height, config.data.width, int(model.embedding_dim)
        del model
        from reid_platform.checkpoint import read_checkpoint

        payload = read_checkpoint(slim)
        metadata = {"reid_platform": {
            "format": FORMAT,
            "input_size": [height, width],
            "embedding_dim": dim,
            "backbone": config.model.backbone,
            "num_classes": int(payload["num_classes"]),
            "epoch": int(payload["epoch"]),
            "checkpoint": MODEL_CHECKPOINT_PATH,
            "metrics": {k: float(v) for k, v in payload["metrics"].items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)},
        }}
        # The logged model goes in the run's experiment (Model.log alone would put it in the
        # process's active experiment, i.e. "Default" with artifacts under ./mlruns).
        client = MlflowClient(uri)
        experiment_id = client.get_run(run_id).info.experiment_id
        logged = client.create_logged_model(experiment_id, name=MODEL_ARTIFACT,
                                            source_run_id=run_id)
        with using_store(uri), warnings.catch_warnings():
            # the signature describes the input; an example would run the model at logging
            warnings.filterwarnings("ignore", message=".*input example was not provided")
            info = Model.log(
                artifact_path=None,
                name=MODEL_ARTIFACT,
                flavor=mlflow.pyfunc,
                run_id=run_id,
                model_id=logged.model_id,
                python_model=str(MODEL_CODE),  # models from code: nothing is pickled
                artifacts={"checkpoint": str(slim)},
                code_paths=[str(MODEL_CODE.parent)],  # the package, for load_model anywhere
                signature=model_signature(height, width, dim),
                pip_requirements=_pip_requirements(),
                metadata=metadata,
            )
        client.finalize_logged_model(logged.model_id, "READY")
        return info


def register_model_version(
    uri: str, name: str, model_info: Any, run_id: str, tags: Mapping[str, str],
    description: str = "",
) -> Any:
    """A new version of registered model `name` (created if needed) for a logged model.

    Returns:
        The ModelVersion (its `version` is a string, e.g. "3").
    """
    client = MlflowClient(uri, registry_uri=uri)
    try:
        client.create_registered_model(
            name, description="Image-embedding model trained by reid-platform: a pyfunc from "
            "(N, H, W, 3) uint8 images to (N, D) L2-normalised embeddings."
        )
    except mlflow.exceptions.MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    with using_store(uri):
        return client.create_model_version(
            name, source=model_info.model_uri, run_id=run_id, tags=dict(tags),
            description=description or None, model_id=model_info.model_id,
        )


def version_tags(
    config: Config, run_id: str, metrics: Mapping[str, Any],
    dataset: Mapping[str, str] | None = None, sweep_parent_run_id: str | None = None,
) -> dict[str, str]:
    """Tags of a model version: run id, dataset, score/mAP/rank-1/mINP, input size, sweep."""
    tags = {"run_id": run_id, "config_name": config.name,
            "input_size": f"{config.data.height}x{config.data.width}",
            "backbone": config.model.backbone}
    if dataset:
        tags.update({"dataset": dataset["name"], "dataset_digest": dataset["digest"],
                     "dataset_source": dataset["source"]})
    for key in SCORE_TAGS:
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            tags[key] = f"{float(value):.6f}"
    if "epoch" in metrics:
        tags["epoch"] = str(int(metrics["epoch"]))
    if sweep_parent_run_id:
        tags[SWEEP_PARENT_TAG] = sweep_parent_run_id
    return tags


def record_model(
    config: Config,
    uri: str,
    run_id: str,
    checkpoint: str | Path,
    dataset: Any = None,
    sweep_parent_run_id: str | None = None,
) -> Any:
    """After training: log the final checkpoint as the run's MLflow Model and, unless
    `tracking.register` is false, register it as a new version of the config's registered
    model, tagged with the run, dataset, scores and (for a sweep's best trial) the sweep.

    Args:
        checkpoint: the final checkpoint (directory or model.pt).
        dataset: the `ReidDataset` trained on, logged as the run's dataset input if the run
            has none yet (a sweep trial); None: the run's own dataset input, if any.
        sweep_parent_run_id: the sweep's parent run when this is a sweep's best trial.

    Returns:
        The ModelVersion, or None when registration is off.
    """
    from reid_platform.checkpoint import read_checkpoint

    client = MlflowClient(uri)
    dataset_info = run_dataset(uri, run_id)
    if dataset_info is None and dataset is not None:
        dataset_info = log_dataset(uri, run_id, dataset)
    info = log_reid_model(uri, run_id, checkpoint)
    if not config.tracking.register:
        print(f"[train] MLflow Model logged ({info.model_uri}); not registered "
              "(tracking.register=false)", flush=True)
        return None
    name = registered_model_name(config)
    metrics = read_checkpoint(checkpoint)["metrics"]
    tags = version_tags(config, run_id, metrics, dataset_info, sweep_parent_run_id)
    run_name = client.get_run(run_id).info.run_name
    version = register_model_version(
        uri, name, info, run_id, tags,
        description=f"{config.model.backbone} from run {run_name} ({run_id})"
        + (f", best trial of sweep run {sweep_parent_run_id}" if sweep_parent_run_id else ""),
    )
    client.set_tag(run_id, "registered_model_version", f"{name}/{version.version}")
    score = tags.get("score", "n/a")
    print(f"[train] registered models:/{name}/{version.version} (score {score})", flush=True)
    return version


def run_dataset(uri: str, run_id: str) -> dict[str, str] | None:
    """{"name", "digest", "source"} of a run's training dataset input, or None."""
    run = MlflowClient(uri).get_run(run_id)
    for dataset_input in (run.inputs.dataset_inputs if run.inputs else []):
        context = {t.key: t.value for t in dataset_input.tags}.get("mlflow.data.context")
        if context == "train":
            ds = dataset_input.dataset
            return {"name": ds.name, "digest": ds.digest,
                    "source": json.loads(ds.source).get("uri", ds.source)}
    return None


# ---- model URIs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedModel:
    """What a model URI points at: a registered version, or a path in a run's artifacts."""

    uri: str  # as given
    kind: str  # "models" or "runs"
    run_id: str
    name: str = ""  # registered model (models:/)
    version: str = ""  # its version number (models:/), resolved from an alias if needed
    alias: str = ""  # the alias asked for, if any
    path: str = ""  # artifact path inside the run (runs:/)
    model_id: str = ""  # the logged model (models:/)

    @property
    def pinned_uri(self) -> str:
        """The URI of exactly this model: an alias replaced by the version it points at now."""
        if self.kind == "models":
            return f"models:/{self.name}/{self.version}"
        return self.uri


def is_model_uri(value: str | os.PathLike) -> bool:
    """Whether a `--checkpoint` value is an MLflow URI rather than a path."""
    return isinstance(value, str) and value.startswith(("models:/", "runs:/"))


def parse_model_uri(uri: str) -> tuple[str, str, str]:
    """Split a model URI without contacting any store.

    Returns:
        ("runs", run_id, path) or ("models", name, "@alias" | "version" | "latest").

    Raises:
        RegistryError: not one of the accepted forms; the message names the URI.
    """
    if uri.startswith("runs:/"):
        run_id, _, path = uri.removeprefix("runs:/").partition("/")
        if not run_id:
            raise RegistryError(f"{uri}: expected runs:/RUN_ID/PATH (e.g. runs:/<id>/model)")
        return "runs", run_id, path.strip("/") or MODEL_ARTIFACT
    if not uri.startswith("models:/"):
        raise RegistryError(f"{uri}: not a model URI (models:/NAME@ALIAS, models:/NAME/VERSION "
                            "or runs:/RUN_ID/PATH)")
    rest = uri.removeprefix("models:/").strip("/")
    if "@" in rest:
        name, _, alias = rest.partition("@")
        ref = f"@{alias}" if alias and "/" not in alias else ""
    else:
        name, _, ref = rest.partition("/")
        ref = "" if "/" in ref else ref
    if not name or not ref:
        raise RegistryError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    if not (ref.startswith("@") or ref.isdigit() or ref == "latest"):
        raise RegistryError(
            f"{uri}: {ref!r} is not a version number; stages are deprecated, use an alias: "
            f"models:/{name}@{ref.lower()}"
        )
    return "models", name, ref


def resolve_model_uri(uri: str, tracking_uri: str | None = None) -> ResolvedModel:
    """Resolve `models:/NAME@ALIAS`, `models:/NAME/VERSION`, `models:/NAME/latest` or
    `runs:/RUN_ID/PATH` against the registry / tracking store.

    Raises:
        RegistryError: malformed URI, unknown model, version, alias or run; the message names
            it, the store, and what exists instead.
    """
    kind, key, ref = parse_model_uri(uri)
    tracking_uri = tracking_uri or default_tracking_uri()
    check_store(tracking_uri)
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    if kind == "runs":
        try:
            client.get_run(key)
        except mlflow.exceptions.MlflowException:
            raise RegistryError(f"{uri}: no run {key!r} in {tracking_uri}") from None
        return ResolvedModel(uri, "runs", key, path=ref)
    name = key
    try:
        registered = client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        known = sorted(m.name for m in client.search_registered_models(max_results=50))
        raise RegistryError(
            f"{uri}: no registered model {name!r} in {tracking_uri}"
            + (f" (registered models: {', '.join(known)})" if known else " (it has none)")
        ) from None
    numbers = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    alias = ref[1:] if ref.startswith("@") else ""
    if alias:
        aliases = dict(registered.aliases or {})
        if alias not in aliases:
            listed = ", ".join(f"{a} -> {v}" for a, v in sorted(aliases.items())) or "none"
            raise RegistryError(
                f"{uri}: model {name!r} has no alias {alias!r} (its aliases: {listed}); set one "
                f"with `python jobs/promote.py --model {name} --version V --alias {alias}`"
            )
        version = str(aliases[alias])
    elif ref == "latest":
        if not numbers:
            raise RegistryError(f"{uri}: model {name!r} has no versions")
        version = str(numbers[-1])
    else:
        version = ref
        if int(version) not in numbers:
            have = f"{numbers[0]}..{numbers[-1]}" if numbers else "none"
            raise RegistryError(
                f"{uri}: model {name!r} has no version {version} (versions: {have})"
            )
    mv = client.get_model_version(name, version)
    model_id = getattr(mv, "model_id", "") or ""
    if not model_id and str(mv.source).startswith("models:/m-"):
        model_id = str(mv.source).removeprefix("models:/")
    return ResolvedModel(uri, "models", mv.run_id or "", name=name, version=str(mv.version),
                         alias=alias, model_id=model_id)


def download_model_checkpoint(resolved: ResolvedModel, tracking_uri: str, dst: Path) -> Path:
    """Download the reid-platform checkpoint a resolved URI points at into `dst`.

    A registered version and `runs:/RUN/model` hold an MLflow Model (the checkpoint at
    `artifacts/model.pt`); `runs:/RUN/checkpoints/final` a checkpoint folder (`model.pt`);
    a path ending in `.pt` the file itself.

    Returns:
        The downloaded `model.pt`.

    Raises:
        RegistryError: none of those is there.
    """
    from mlflow.artifacts import download_artifacts

    if resolved.kind == "models":
        base = f"models:/{resolved.name}/{resolved.version}"
        candidates = [MODEL_CHECKPOINT_PATH, "model.pt"]
    else:
        base = f"runs:/{resolved.run_id}/{resolved.path}"
        candidates = [""] if resolved.path.endswith(".pt") else [MODEL_CHECKPOINT_PATH,
                                                                   "model.pt"]
    tried = []
    for candidate in candidates:
        artifact = f"{base}/{candidate}" if candidate else base
        tried.append(artifact)
        try:
            with using_store(tracking_uri):
                path = download_artifacts(artifact_uri=artifact, dst_path=str(dst),
                                          tracking_uri=tracking_uri, registry_uri=tracking_uri)
        except (mlflow.exceptions.MlflowException, OSError):
            continue
        if Path(path).is_file():
            return Path(path)
    raise RegistryError(
        f"{resolved.uri}: no reid-platform checkpoint there (tried {', '.join(tried)}); expected "
        "a model logged by a training run or a checkpoint folder such as checkpoints/final"
    )


# ---- promotion --------------------------------------------------------------------------------


def promote(
    uri: str, name: str, alias: str, version: str | None = None, best_by: str | None = None
) -> Any:
    """Point `alias` of registered model `name` at a version: the one given, or the one with
    the highest `best_by` tag (score, mAP, rank1, mINP).

    Returns:
        The ModelVersion the alias now points at.

    Raises:
        RegistryError: unknown model or version, no version with that tag, a bad alias.
    """
    if (version is None) == (best_by is None):
        raise RegistryError("give exactly one of a version or a metric to pick the best by")
    if not alias or alias.isdigit() or alias.lower() == "latest" or "/" in alias:
        raise RegistryError(f"alias {alias!r}: an alias is a name such as production (not a "
                            "number, not 'latest')")
    check_store(uri)
    client = MlflowClient(uri, registry_uri=uri)
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        raise RegistryError(f"no registered model {name!r} in {uri}") from None
    versions = client.search_model_versions(f"name = '{name}'")
    if version is not None:
        chosen = next((v for v in versions if str(v.version) == str(version)), None)
        if chosen is None:
            numbers = sorted(int(v.version) for v in versions)
            raise RegistryError(f"model {name!r} has no version {version} (versions: "
                                f"{', '.join(map(str, numbers)) or 'none'})")
    else:
        if best_by not in SCORE_TAGS:
            raise RegistryError(f"--best-by {best_by!r}: choose one of {list(SCORE_TAGS)}")
        scored = [v for v in versions if _float_tag(v.tags, best_by) is not None]
        if not scored:
            raise RegistryError(f"no version of {name!r} has a {best_by!r} tag")
        # ties go to the newer version
        chosen = max(scored, key=lambda v: (_float_tag(v.tags, best_by), int(v.version)))
    client.set_registered_model_alias(name, alias, str(chosen.version))
    return client.get_model_version(name, str(chosen.version))


def _float_tag(tags: Mapping[str, str], key: str) -> float | None:
    try:
        value = float(tags[key])
    except (KeyError, TypeError, ValueError):
        return None
    return None if value != value else value  # NaN is no score


def record_sweep_best(
    config: Config, uri: str, run_id: str, checkpoint_path: str | None, parent_run_id: str
) -> Any:
    """Register the best trial of a sweep: its final reported checkpoint as an MLflow Model in
    its own (child) run, the sweep's dataset as that run's dataset input, and a registry
    version tagged with the sweep's parent run (`record_model`).

    Args:
        config: the best trial's config (the sweep's with the best trial's values).
        run_id: the best trial's MLflow child run.
        checkpoint_path: its last reported Ray Train checkpoint (a local path or a URI of the
            sweep's storage, e.g. s3://...); None: nothing to register (said so).

    Returns:
        The ModelVersion, or None.
    """
    import tempfile

    from reid_platform.data.root import load_config_dataset

    if not run_id or not checkpoint_path:
        print("[tune] the best trial left no MLflow run or checkpoint: nothing registered",
              flush=True)
        return None
    registered = MlflowClient(uri).get_run(run_id).data.tags.get("registered_model_version")
    if registered:  # a finished sweep summarised again
        print(f"[tune] best trial already registered as models:/{registered}", flush=True)
        name, _, version = registered.rpartition("/")
        return MlflowClient(uri, registry_uri=uri).get_model_version(name, version)
    dataset = load_config_dataset(config, report=False)
    if "://" not in checkpoint_path:
        return record_model(config, uri, run_id, checkpoint_path, dataset, parent_run_id)
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:  # a checkpoint in object storage
        local = ray.train.Checkpoint(checkpoint_path).to_directory(tmp)
        return record_model(config, uri, run_id, local, dataset, parent_run_id)


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
