"""Self-training rounds: what `jobs/self_train.py` runs.

    round 0   train on the labelled data (Ray Train DDP, `run_training`), or start from a
              given checkpoint (evaluated on the labelled evaluation split)
    round r   pseudo-label `data.unlabelled` with the latest model (`labels.pseudo_label`)
              -> train again on labelled + pseudo-labelled images (`data.extra_train`, ids kept
              apart), the backbone initialised from the latest model, a new classifier for the
              new identity count (the pseudo ids change every round)

MLflow: one parent run `<name>-self-train-<time>` (the base config as params) and one child run
per trained round (tags `mlflow.parentRunId`, `self_train_round`; the round's pseudo-label
numbers as `pseudo_*` metrics, its report and pictures as artifacts). The parent gets the
per-round curves with the round as step (`mAP`, `rank1`, `score` on the labelled evaluation
split; `num_clusters`, `num_outliers`, `ari`, `nmi`, `purity` when the unlabelled images have
true labels), `rounds.csv`, `rounds.json` and `self_train_curves.png`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow.tracking import MlflowClient

from reid_platform.checkpoint import CheckpointError, checkpoint_file, read_checkpoint
from reid_platform.config import Config, ConfigError, save_config
from reid_platform.data.formats import DatasetError
from reid_platform.data.root import load_config_dataset, resolve_data_root
from reid_platform.models import build_model
from reid_platform.pseudo import pictures
from reid_platform.pseudo.clustering import ClusteringError
from reid_platform.pseudo.labels import embed_samples, pseudo_label, unlabelled_samples
from reid_platform.runtime import init_ray
from reid_platform.tracking import RunLogger, ensure_experiment, resolve_tracking_uri, start_run
from reid_platform.training.trainer import run_training

ROUND_TAG = "self_train_round"
CURVE_KEYS = ("mAP", "rank1", "score", "num_clusters", "num_outliers", "ari", "nmi", "purity",
              "ari_all", "nmi_all", "num_true_ids")


@dataclass
class SelfTrainResult:
    """What a finished self-training left behind."""

    parent_run_id: str
    tracking_uri: str
    checkpoint: Path  # the last round's model
    rounds: list[dict[str, Any]]  # one row per round (round 0 = labelled only / the start)
    out_dir: Path


# ---- checks -------------------------------------------------------------------------------


def check_self_train_config(config: Config) -> None:
    """Settings errors before anything runs, naming the key."""
    st = config.self_train
    if not config.data.unlabelled:
        raise ConfigError(
            "data.unlabelled is empty: self-training needs unlabelled images "
            "(--set data.unlabelled=PATH: a folder, a CSV manifest or a Market-1501 tree)"
        )
    if st.rounds < 1:
        raise ConfigError(f"self_train.rounds={st.rounds} must be >= 1")
    if st.epochs < 0:
        raise ConfigError(f"self_train.epochs={st.epochs} must be >= 0 (0 = train.epochs)")
    if st.method == "kmeans" and st.clusters < 2:
        raise ConfigError(
            "self_train.method=kmeans needs self_train.clusters >= 2 (the pseudo identities)"
        )
    if st.batch_size < 1:
        raise ConfigError(f"self_train.batch_size={st.batch_size} must be >= 1")


def check_start_checkpoint(checkpoint: str | Path, config: Config) -> Path:
    """The start checkpoint's model must be the config's (its backbone carries over).

    Raises:
        CheckpointError: another embedding dimension or backbone, naming both and what to set.
    """
    ckpt = checkpoint_file(checkpoint).parent.resolve()
    theirs = Config.from_dict(read_checkpoint(ckpt)["config"]).model
    ours = config.model
    # Random-init builds, only for the dimensions (weights files are not needed for that).
    their_dim = build_model(dataclasses.replace(theirs, pretrained=""), 1)
    our_dim = build_model(dataclasses.replace(ours, pretrained=""), 1)
    if (their_dim.embedding_dim, theirs.backbone, theirs.arch) != (
        our_dim.embedding_dim, ours.backbone, ours.arch
    ):
        raise CheckpointError(
            f"--checkpoint {ckpt}: its model gives {their_dim.embedding_dim}-d embeddings "
            f"(model.arch={theirs.arch}, model.backbone={theirs.backbone}, "
            f"model.embedding_dim={theirs.embedding_dim}), the config's model gives "
            f"{our_dim.embedding_dim}-d (model.arch={ours.arch}, model.backbone={ours.backbone}, "
            f"model.embedding_dim={ours.embedding_dim}); self-training continues the config's "
            f"model from the checkpoint: give a checkpoint of that model, or --set "
            f"model.backbone={theirs.backbone} model.embedding_dim={theirs.embedding_dim}"
        )
    return ckpt


def export_backbone(checkpoint: str | Path, path: str | Path, config: Config) -> Path:
    """Write the backbone weights of `checkpoint` as a state dict `model.pretrained` loads,
    and check that a model built from it carries exactly those weights.

    The next round has another number of identities, so it cannot resume the checkpoint: it
    builds the config's model with this file as its backbone weights and a new classifier.

    Raises:
        CheckpointError: the weights do not carry over (another backbone or architecture).
    """
    payload = read_checkpoint(checkpoint)
    prefix = "backbone."
    state = {k[len(prefix):]: v for k, v in payload["model_state"].items()
             if k.startswith(prefix)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    try:
        built = build_model(config.replace(**{"model.pretrained": str(path)}).model, 1)
        loaded = built.backbone.state_dict()
        differ = sorted(set(loaded) ^ set(state)) or [
            k for k in state if not torch.equal(loaded[k], state[k])
        ]
    except (RuntimeError, ValueError) as err:  # shapes that do not fit
        differ = [str(err).splitlines()[0][:200]]
    if not state or differ:
        raise CheckpointError(
            f"{checkpoint}: its backbone weights do not carry over to model.arch="
            f"{config.model.arch} model.backbone={config.model.backbone} (e.g. {differ[:3]}); "
            "self-training needs the same backbone in every round"
        )
    return path


# ---- one step at a time -------------------------------------------------------------------


def evaluate_checkpoint(checkpoint: Path, config: Config, batch_size: int) -> dict[str, float]:
    """rank1 / mAP / ... of a checkpoint on the config's query and gallery, embedded with the
    Ray Data actor pool (GPUs when present)."""
    from reid_platform.evaluation.metrics import compute_distmat, evaluate_rank

    dataset = load_config_dataset(config)
    # One pass of the actor pool over both splits; the prefix keeps their ids apart.
    samples = [dataclasses.replace(x, item_id=f"{x.split}:{x.item_id}")
               for x in (*dataset.query, *dataset.gallery)]
    embedded = embed_samples(samples, checkpoint, batch_size, progress=False)
    is_query = np.array([x.split == "query" for x in embedded.samples])
    pids = np.array([x.pid for x in embedded.samples])
    camids = np.array([x.camid for x in embedded.samples])
    result = evaluate_rank(
        compute_distmat(embedded.features[is_query], embedded.features[~is_query], "cosine"),
        pids[is_query], pids[~is_query], camids[is_query], camids[~is_query],
    )
    return result.as_metrics()


def _adopt_child(uri: str, config: Config, run_name: str, parent_id: str, round_: int,
                 run_id: str | None = None) -> str | None:
    """Put a round's training run under the parent (run_training creates it on its own)."""
    client = MlflowClient(uri)
    if run_id is None:  # the round failed before returning its run: find it by name
        runs = client.search_runs(
            [ensure_experiment(config, uri)],
            filter_string=f"tags.`mlflow.runName` = '{run_name}'", max_results=1,
        )
        if not runs:
            return None
        run_id = runs[0].info.run_id
    client.set_tag(run_id, "mlflow.parentRunId", parent_id)
    client.set_tag(run_id, ROUND_TAG, str(round_))
    return run_id


def _train_round(config: Config, uri: str, parent_id: str, round_: int,
                 progress: bool) -> tuple[Path, dict[str, Any], str]:
    run_name = config.tracking.run_name
    try:
        result = run_training(config, progress=progress)
    except BaseException:
        _adopt_child(uri, config, run_name, parent_id, round_)
        raise
    _adopt_child(uri, config, run_name, parent_id, round_, result.run_id)
    return result.checkpoint, dict(result.metrics), result.run_id


def _eval_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(metrics[k]) for k in ("mAP", "rank1", "mINP", "score") if k in metrics}


# ---- the rounds ---------------------------------------------------------------------------


def run_self_training(
    config: Config, checkpoint: str | Path | None = None, progress: bool = True
) -> SelfTrainResult:
    """Round 0 (train on the labelled data, or start from `checkpoint`), then
    `self_train.rounds` rounds of pseudo-labelling `data.unlabelled` and training.

    Raises:
        ConfigError / DatasetError / CheckpointError / ClusteringError: bad input, before
        training where it can be known then (the unlabelled images are read first).
    """
    check_self_train_config(config)
    config = resolve_data_root(config, progress)
    st = config.self_train
    unlabelled_samples(config.data.unlabelled)  # a bad folder fails now, not after round 0
    start = check_start_checkpoint(checkpoint, config) if checkpoint else None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = Path(st.out).expanduser().resolve() if st.out else (
        config.workspace_dir / "self_train" / f"{config.name}-{stamp}")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise DatasetError(
            f"self_train.out={out_dir} is not empty: nothing is overwritten; choose another "
            "folder (or leave self_train.out empty for a new one)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, out_dir / "config.yaml")

    uri = resolve_tracking_uri(config)
    parent_name = config.tracking.run_name or f"{config.name}-self-train-{stamp}"
    parent_id = start_run(config, uri, run_name=parent_name,
                          tags={"self_train_role": "parent", "unlabelled": config.data.unlabelled})
    parent = RunLogger(uri, parent_id)
    parent.log_artifact(out_dir / "config.yaml")
    epochs = st.epochs or config.train.epochs
    needed = config.train.num_workers * config.train.cpus_per_worker
    rows: list[dict[str, Any]] = []
    with parent.ending_on_exit():
        init_ray(num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)))
        if start is None:
            latest, metrics, run_id = _train_round(
                config.replace(**{"tracking.run_name": f"{parent_name}-round-0"}), uri,
                parent_id, 0, progress,
            )
        else:
            latest, run_id = start, None
            metrics = evaluate_checkpoint(start, config, st.batch_size)
        rows.append({"round": 0, "run_id": run_id, "checkpoint": str(latest),
                     **_eval_metrics(metrics)})
        _log_round(parent, rows[-1])
        print(_round_line(rows[-1]), flush=True)

        for round_ in range(1, st.rounds + 1):
            row = _self_train_round(config, latest, out_dir / f"round-{round_}", round_, epochs,
                                    uri, parent_id, parent_name, progress)
            latest = Path(row["checkpoint"])
            rows.append(row)
            _log_round(parent, row)
            print(_round_line(row), flush=True)

        _write_summary(out_dir, rows, parent, f"{parent_name} ({st.method} on "
                       f"{'cosine' if st.method == 'kmeans' else st.distance})")
        parent.set_tags({"final_checkpoint": str(latest), "rounds": str(st.rounds)})
    return SelfTrainResult(parent_id, uri, Path(latest), rows, out_dir)


def _self_train_round(config: Config, latest: Path, round_dir: Path, round_: int, epochs: int,
                      uri: str, parent_id: str, parent_name: str,
                      progress: bool) -> dict[str, Any]:
    """Pseudo-label with `latest`, train on labelled + pseudo-labelled; the round's row."""
    st = config.self_train
    try:
        labelled = pseudo_label(
            latest, config.data.unlabelled, round_dir, method=st.method, distance=st.distance,
            batch_size=st.batch_size, progress=progress, k1=st.k1, k2=st.k2, knn=st.knn,
            eps=st.eps, eps_pairs=st.eps_pairs, min_samples=st.min_samples,
            threshold=st.threshold, clusters=st.clusters, min_cluster_size=st.min_cluster_size,
            seed=config.train.seed + round_,
        )
    except ClusteringError as err:
        raise ClusteringError(f"round {round_}: {as_config_keys(str(err))}") from None
    backbone = export_backbone(latest, round_dir / "backbone.pth", config)
    round_config = config.replace(**{
        "data.extra_train": [*config.data.extra_train, str(labelled.csv)],
        "model.pretrained": str(backbone),
        "train.epochs": epochs,
        "train.resume_from": "",
        "tracking.run_name": f"{parent_name}-round-{round_}",
    })
    checkpoint, metrics, run_id = _train_round(round_config, uri, parent_id, round_, progress)
    report = labelled.report
    child = RunLogger(uri, run_id)
    child.log_metrics({f"pseudo_{k}": v for k, v in report.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}, 0)
    child.log_artifact(round_dir / "report.json", "pseudo_labels")
    for path in report["pictures"].values():
        child.log_artifact(path, "pseudo_labels")
    return {
        "round": round_, "run_id": run_id, "checkpoint": str(checkpoint),
        **_eval_metrics(metrics),
        **{k: report[k] for k in CURVE_KEYS if k in report},
        "eps": report.get("eps"), "threshold": report.get("threshold"),
        "pseudo_labels": str(labelled.csv),
    }


def as_config_keys(message: str) -> str:
    """A pseudo-label message's flags as the `self_train.*` keys of the same settings
    ("try --eps 0.4 or --method kmeans" -> "try --set self_train.eps=0.4 or ...")."""
    return re.sub(r"--([a-z][a-z-]*) (\S+?)([,;)]?)(?=\s|$)",
                  lambda m: f"--set self_train.{m.group(1).replace('-', '_')}={m.group(2)}"
                            f"{m.group(3)}", message)


def _log_round(parent: RunLogger, row: dict[str, Any]) -> None:
    parent.log_metrics({k: row[k] for k in CURVE_KEYS if row.get(k) is not None}, row["round"])


def _round_line(row: dict[str, Any]) -> str:
    line = f"[self-train] round {row['round']}:"
    if "mAP" in row:
        line += f" mAP {row['mAP']:.4f} rank1 {row['rank1']:.4f}"
    if "num_clusters" in row:
        line += f" | {row['num_clusters']} pseudo ids, {row['num_outliers']} outliers"
    if "ari" in row:
        line += f", ARI {row['ari']:.4f} NMI {row['nmi']:.4f}"
    return line


def _write_summary(out_dir: Path, rows: list[dict[str, Any]], parent: RunLogger,
                   title: str) -> None:
    (out_dir / "rounds.json").write_text(json.dumps(rows, indent=2))
    columns = sorted({k for r in rows for k in r}, key=lambda k: (k != "round", k))
    with (out_dir / "rounds.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)
    pictures.plot_rounds(rows, out_dir / "self_train_curves.png", title)
    for name in ("rounds.json", "rounds.csv", "self_train_curves.png"):
        parent.log_artifact(out_dir / name)
