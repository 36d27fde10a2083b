"""Lineage: which sweep produced which training run, which run which registered model version,
and which model built which index.

    sweep run (parent) -> training run (or trial) -> model version -> index

The links are what each step records: an index manifest names its checkpoint (and, when built
from a model URI, the model and version); a checkpoint carries `mlflow_run` (the run that wrote
it); a checkpoint from the model cache has `source.json` (the URI and version it came from); a
training run records its dataset input and, for a sweep trial, its parent run; a registered
version is tagged with its run and sweep. `index_lineage(dir)` follows them; `jobs/lineage.py`
prints the result.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from reid_platform.checkpoint import CheckpointError, model_source, read_checkpoint
from reid_platform.retrieval.index import read_manifest
from reid_platform.tracking import SCORE_TAGS, SWEEP_PARENT_TAG, default_tracking_uri, run_dataset

# Manifest `extra` keys that name the model directly (written by index builds from a model URI).
MANIFEST_MODEL_KEYS = ("model_uri", "model_version", "model_name", "run_id", "tracking_uri")


def model_record(checkpoint: str | Path) -> dict[str, str]:
    """What an index manifest records about the model it is built with (`MANIFEST_MODEL_KEYS`):
    for a checkpoint fetched from a model URI (its `source.json` in the model cache) the URI
    asked, the registered name and version, the run and the store; for any checkpoint the
    training run it carries (`mlflow_run`). Keys that are unknown are left out.

    Args:
        checkpoint: a checkpoint directory or `model.pt` (local).
    """
    source = model_source(checkpoint) or {}
    try:
        recorded = read_checkpoint(checkpoint).get("mlflow_run") or {}
    except CheckpointError:
        recorded = {}
    record = {
        "model_uri": source.get("uri", ""),
        "model_name": source.get("name", ""),
        "model_version": str(source.get("version") or ""),
        "run_id": source.get("run_id") or recorded.get("run_id", ""),
        "tracking_uri": source.get("tracking_uri") or recorded.get("tracking_uri", ""),
    }
    return {k: v for k, v in record.items() if v}


def index_lineage(index_dir: str | Path, tracking_uri: str | None = None) -> dict[str, Any]:
    """Follow the records from an index back to the sweep that produced its model.

    Args:
        index_dir: an index directory (its `manifest.json`).
        tracking_uri: the MLflow store; None: what the records name, else the default store.

    Returns:
        {"index": {...}, "model": {...} | None, "training_run": {...} | None,
         "sweep_run": {...} | None, "notes": [str]}; a missing link is None and a note
        says why.
    """
    from mlflow.tracking import MlflowClient

    index_dir = Path(index_dir).expanduser().resolve()
    manifest = read_manifest(index_dir)
    extra = manifest.get("extra", {}) or {}
    notes: list[str] = []
    chain: dict[str, Any] = {
        "index": {
            "dir": str(index_dir),
            "index_type": manifest.get("index_type"),
            "num_shards": manifest.get("num_shards"),
            "count": sum(manifest.get("counts", []) or []),
            "dim": manifest.get("dim"),
            "checkpoint": extra.get("checkpoint", ""),
            "generation": extra.get("generation", manifest.get("generation")),
            **{k: extra[k] for k in MANIFEST_MODEL_KEYS if k in extra},
        },
        "model": None,
        "training_run": None,
        "sweep_run": None,
        "notes": notes,
    }
    source = model_source(extra["checkpoint"]) if extra.get("checkpoint") else None
    run_id = extra.get("run_id") or (source or {}).get("run_id") or ""
    uri = tracking_uri or extra.get("tracking_uri") or (source or {}).get("tracking_uri") or ""
    if extra.get("checkpoint"):
        try:
            payload = read_checkpoint(extra["checkpoint"])
        except CheckpointError as err:
            notes.append(f"checkpoint not readable here: {err}")
        else:
            recorded = payload.get("mlflow_run") or {}
            run_id = run_id or recorded.get("run_id", "")
            uri = uri or recorded.get("tracking_uri", "")
    else:
        notes.append("the manifest names no checkpoint")
    uri = uri or default_tracking_uri()
    if not run_id:
        notes.append("no MLflow run recorded for the index's model")
        return chain
    client = MlflowClient(uri, registry_uri=uri)
    try:
        run = client.get_run(run_id)
    except Exception as err:  # noqa: BLE001 - MLflow raises its own type; report, do not crash
        notes.append(f"run {run_id} not found in {uri} ({str(err).splitlines()[0][:200]})")
        return chain
    tags = run.data.tags
    chain["training_run"] = {
        "run_id": run_id,
        "run_name": run.info.run_name,
        "experiment_id": run.info.experiment_id,
        "status": run.info.status,
        "tracking_uri": uri,
        "dataset": run_dataset(uri, run_id) or ({"name": tags["dataset"]} if "dataset" in tags
                                                 else None),
        "metrics": {k: run.data.metrics[k] for k in SCORE_TAGS if k in run.data.metrics},
        "git_commit": tags.get("git_commit", ""),
    }
    chain["model"] = _model_version(client, run_id, extra, source, notes)
    parent_id = tags.get("mlflow.parentRunId") or ((chain["model"] or {}).get("tags", {})
                                                   .get(SWEEP_PARENT_TAG))
    if parent_id:
        try:
            parent = client.get_run(parent_id)
            chain["sweep_run"] = {
                "run_id": parent_id,
                "run_name": parent.info.run_name,
                "sweep": parent.data.tags.get("tune_sweep", ""),
                "best_run_id": parent.data.tags.get("best_run_id", ""),
                "is_best_trial": parent.data.tags.get("best_run_id", "") == run_id,
            }
        except Exception:  # noqa: BLE001
            notes.append(f"sweep run {parent_id} not found in {uri}")
    return chain


def _model_version(client: Any, run_id: str, extra: dict[str, Any],
                   source: dict[str, str] | None, notes: list[str]) -> dict[str, Any] | None:
    """The registered version the index was built from: the one its records name, else the
    only version registered from its run."""
    name = extra.get("model_name") or (source or {}).get("name", "")
    version = str(extra.get("model_version") or (source or {}).get("version", ""))
    candidates = client.search_model_versions(f"run_id = '{run_id}'")
    if name and version:
        chosen = [v for v in candidates if v.name == name and str(v.version) == version]
        if not chosen:
            try:
                chosen = [client.get_model_version(name, version)]
            except Exception:  # noqa: BLE001
                notes.append(f"model version {name}/{version} not found")
                return None
    else:
        chosen = candidates
        if len(candidates) > 1:
            notes.append(
                f"{len(candidates)} versions were registered from run {run_id} and the index "
                "does not say which one it was built from: showing the newest"
            )
    if not chosen:
        notes.append(f"no registered model version from run {run_id}")
        return None
    mv = max(chosen, key=lambda v: int(v.version))
    aliases = sorted(a for a, v in (client.get_registered_model(mv.name).aliases or {}).items()
                     if str(v) == str(mv.version))
    return {
        "name": mv.name,
        "version": str(mv.version),
        "uri": f"models:/{mv.name}/{mv.version}",
        "aliases": aliases,
        "tags": dict(mv.tags),
        "source_uri": (source or {}).get("uri", "") or extra.get("model_uri", ""),
    }


def format_lineage(chain: dict[str, Any]) -> str:
    """The chain as a few lines of text, oldest link first."""
    lines = []
    sweep, run, model, index = (chain.get(k) for k in ("sweep_run", "training_run", "model",
                                                        "index"))
    if sweep:
        best = " (the best trial)" if sweep["is_best_trial"] else ""
        lines.append(f"sweep run     {sweep['run_name']} ({sweep['run_id']}), sweep "
                     f"{sweep['sweep'] or '-'}{best}")
    if run:
        dataset = run.get("dataset") or {}
        scores = ", ".join(f"{k} {v:.4f}" for k, v in run["metrics"].items())
        data = (f"dataset {dataset.get('name', '-')}"
                + (f" (digest {dataset['digest']})" if dataset.get("digest") else ""))
        lines.append(f"training run  {run['run_name']} ({run['run_id']}), {run['status']}, "
                     f"{data}" + (f", {scores}" if scores else ""))
    if model:
        aliases = f" @{', @'.join(model['aliases'])}" if model["aliases"] else ""
        asked = f", asked as {model['source_uri']}" if model.get("source_uri") else ""
        lines.append(f"model version {model['uri']}{aliases}{asked}")
    generation = f", generation {index['generation']}" if index.get("generation") else ""
    lines.append(f"index         {index['dir']} ({index['index_type']}, {index['num_shards']} "
                 f"shard(s), {index['count']} items{generation}), checkpoint "
                 f"{index['checkpoint'] or '-'}")
    lines += [f"note: {note}" for note in chain.get("notes", [])]
    return "\n".join(lines)


def lineage_json(chain: dict[str, Any]) -> str:
    return json.dumps(chain, sort_keys=True, default=str)
