"""Ray Tune sweeps of the loss knobs (triplet margin, ID/triplet weights, lr).

Every trial is a full Ray Train run: a Tune *function trainable* (`reid_trial`) builds a
`TorchTrainer` and calls `.fit()`; a `TuneReportCallback` forwards the trainer's evaluation
reports to Tune, where ASHA stops the weak trials early and Optuna's TPE (random search when
Optuna is missing) proposes the next ones. `run_sweep(config)` is what `jobs/tune.py` calls.

Where a sweep named N lives (W = workspace, S = `tune.storage_path` or W/tune):
    S/N/                          Tune's experiment: its state and one folder per trial
    S/N/train/<trial_id>/         that trial's Ray Train run (checkpoints; resumed on restore)
    W/tune/N/sweep_config.yaml    the sweep's config as first started (a resume reuses it)
    W/tune/N/results.csv          one row per trial: searched values, metrics, MLflow run
    W/tune/N/score_vs_params.png  the metric against each searched parameter
    W/tune/N/best_config.yaml     the best trial's config; `jobs/train.py --config` takes it

MLflow: one parent run for the sweep, one child run per trial (its params; the workers log its
per-epoch curves); the parent gets the best trial's config, the CSV and the plot.
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, SearchAlgorithm

from reid_platform.config import Config, ConfigError, TuneConfig, load_config, save_config
from reid_platform.runtime import init_ray
from reid_platform.tracking import (
    RunLogger,
    ensure_experiment,
    record_sweep_best,
    resolve_tracking_uri,
    start_run,
)
from reid_platform.training.trainer import build_trainer, prepare_data, resolve_use_gpu

# Metrics the training loop reports at every evaluation; all of them are higher-is-better.
EVAL_METRICS = ("score", "rank1", "rank5", "rank10", "rank20", "mAP", "mINP")
TRIAL_TAG = "tune_trial_id"
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 512 * 1024**2}  # bytes


@dataclass
class SweepResult:
    """What a finished sweep left behind."""

    best_config_path: Path
    best_metrics: dict[str, float]
    best_params: dict[str, Any]
    results_csv: Path
    plot: Path
    parent_run_id: str
    tracking_uri: str
    experiment_path: str
    search: str


class SweepInterrupted(RuntimeError):
    """The sweep stopped before every trial finished; running it again resumes it."""


# ---- search space, searcher, scheduler ---------------------------------------------------


def search_space(tune_cfg: TuneConfig) -> dict[str, Any]:
    """Tune domains keyed by the dotted config key each one overrides.

    Returns:
        e.g. {"loss.margin": uniform(0.1, 1.0), "loss.soft_margin": choice([False, True]),
        "loss.id_weight": ..., "loss.triplet_weight": ..., "train.lr": loguniform(...)}.

    Raises:
        ConfigError: a range is empty or (for lr) not positive.
    """
    for low, high, key in (
        (tune_cfg.margin_min, tune_cfg.margin_max, "margin"),
        (tune_cfg.id_weight_min, tune_cfg.id_weight_max, "id_weight"),
        (tune_cfg.triplet_weight_min, tune_cfg.triplet_weight_max, "triplet_weight"),
        (tune_cfg.lr_min, tune_cfg.lr_max, "lr"),
    ):
        if not (0 <= low < high) or (key == "lr" and low <= 0):
            raise ConfigError(
                f"tune.{key}_min={low} / tune.{key}_max={high}: expected 0 "
                f"{'<' if key == 'lr' else '<='} {key}_min < {key}_max"
            )
    space: dict[str, Any] = {
        "loss.margin": tune.uniform(tune_cfg.margin_min, tune_cfg.margin_max),
        "loss.id_weight": tune.uniform(tune_cfg.id_weight_min, tune_cfg.id_weight_max),
        "loss.triplet_weight": tune.uniform(
            tune_cfg.triplet_weight_min, tune_cfg.triplet_weight_max
        ),
    }
    if tune_cfg.soft_margin_choice:
        space["loss.soft_margin"] = tune.choice([False, True])
    if tune_cfg.search_lr:
        space["train.lr"] = tune.loguniform(tune_cfg.lr_min, tune_cfg.lr_max)
    return space


def choose_search(method: str) -> str:
    """`tune.search` -> "optuna" or "random": "auto" is Optuna when it imports, else random.

    Raises:
        ConfigError: "optuna" was asked for and is not installed.
    """
    if method == "random":
        return "random"
    try:
        import optuna  # noqa: F401
    except ImportError:
        if method == "optuna":
            raise ConfigError("tune.search=optuna but optuna is not installed") from None
        return "random"
    return "optuna"


def build_search_alg(config: Config, max_concurrent: int) -> tuple[SearchAlgorithm, str]:
    """The searcher with its concurrency limit; returns it and "optuna" or "random"."""
    method = choose_search(config.tune.search)
    seed = config.train.seed
    if method == "random":
        return BasicVariantGenerator(max_concurrent=max_concurrent, random_state=seed), method
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    # TPE samples at random for its first n_startup_trials (Optuna's default 10 would make a
    # short sweep purely random).
    startup = min(10, max(2, config.tune.num_samples // 3))
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
    return ConcurrencyLimiter(OptunaSearch(sampler=sampler), max_concurrent), method


def build_scheduler(config: Config) -> ASHAScheduler:
    """ASHA on `epoch`: a trial may be stopped after `tune.grace_period` evaluations."""
    epochs = config.train.epochs
    if epochs < 1:
        raise ConfigError(f"train.epochs={epochs}: a sweep needs at least 1 epoch per trial")
    if config.tune.reduction_factor < 2:
        raise ConfigError(f"tune.reduction_factor={config.tune.reduction_factor}: expected >= 2")
    if config.tune.grace_period < 1:
        raise ConfigError(f"tune.grace_period={config.tune.grace_period}: expected >= 1")
    grace = min(config.tune.grace_period * max(config.train.eval_every, 1), epochs)
    return ASHAScheduler(
        time_attr="epoch",
        max_t=epochs,
        grace_period=grace,
        reduction_factor=config.tune.reduction_factor,
        # A trial at its last epoch ends by itself: stopping it there would kill the trial
        # before its Train run logs the best checkpoint and releases its workers.
        stop_last_trials=False,
    )


def trial_resources(config: Config, use_gpu: bool) -> dict[str, float]:
    """What one trial's TorchTrainer holds: num_workers x (cpus_per_worker CPU [+ 1 GPU])."""
    train = config.train
    need = {"CPU": train.num_workers * train.cpus_per_worker}
    if use_gpu:
        need["GPU"] = float(train.num_workers)
    return need


def max_concurrent_trials(config: Config, cluster: Mapping[str, float], use_gpu: bool) -> int:
    """`tune.max_concurrent`, or (when 0) how many trials the cluster's resources hold now.

    Args:
        cluster: `ray.cluster_resources()`, e.g. {"CPU": 16.0, "GPU": 4.0}.
    """
    num_samples = max(config.tune.num_samples, 1)
    if config.tune.max_concurrent > 0:
        return min(config.tune.max_concurrent, num_samples)
    need = {k: v for k, v in trial_resources(config, use_gpu).items() if v > 0}
    if not need:
        return num_samples
    fits = min(int(cluster.get(k, 0.0) // v) for k, v in need.items())
    return max(1, min(fits, num_samples))


# ---- the trial ---------------------------------------------------------------------------


class EvaluationReportCallback(TuneReportCallback):
    """Forward to Tune only the reports that carry `metric` (the evaluation epochs).

    Tune rejects a result without the metric its searcher and scheduler use; the epochs in
    between still reach MLflow, which the workers log to directly.
    """

    def __init__(self, metric: str):
        super().__init__()
        self.metric = metric

    def after_report(self, run_context, metrics, checkpoint):
        # metrics: one dict per worker; rank 0 (first) is the one that evaluates.
        if metrics and self.metric in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


class ReleaseStoppedTrainRuns(tune.Callback):
    """Free the workers' placement groups of Train runs whose trial ASHA stopped.

    Tune stops a trial by ending its actor, and the TrainController that actor owns dies
    before it removes its workers' placement group; Ray keeps a placement group until its
    creator actor *and* job are gone, i.e. until the sweep ends, so the next trials would
    wait for those CPUs/GPUs forever. Ray Train's own cleaner actor asks the State API, which
    fails where several Ray instances share a host; so the driver also removes, every few
    seconds, the placement groups of this job whose creator actor is dead.
    """

    def __init__(self, every_s: float = 5.0):
        self.every_s = every_s
        self._last = 0.0

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if time.monotonic() - self._last >= self.every_s:
            self._last = time.monotonic()
            remove_orphaned_placement_groups()


def remove_orphaned_placement_groups() -> int:
    """Remove this job's placement groups whose creator actor has died; returns how many.

    Reads Ray's GCS placement-group table (a private API, pinned by `ray==2.60.*`): the public
    `placement_group_table()` leaves out the creator. Does nothing if that API changed.
    """
    try:
        from ray._private.state import state as gcs_state
        from ray.core.generated import gcs_pb2
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        job_id = ray.get_runtime_context().get_job_id()
        table = gcs_state._connect_and_get_accessor().get_placement_group_table()
    except Exception:  # noqa: BLE001 - a best-effort safety net
        return 0
    removed = 0
    live = (
        gcs_pb2.PlacementGroupTableData.PENDING,
        gcs_pb2.PlacementGroupTableData.CREATED,
        gcs_pb2.PlacementGroupTableData.RESCHEDULING,
    )
    for raw in table:
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        created_by_actor = not ray.ActorID(pg.creator_actor_id).is_nil()  # not by a driver
        if (
            pg.state in live
            and created_by_actor
            and pg.creator_actor_dead
            and not pg.is_detached
            and pg.creator_job_id.hex() == job_id
        ):
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
            removed += 1
    return removed


def child_run(config: Config, uri: str, parent_run_id: str, trial_id: str, trial_name: str) -> str:
    """The trial's MLflow child run: the one from before a resume, else a new one."""
    client = MlflowClient(uri)
    experiment_id = ensure_experiment(config, uri)
    found = client.search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.{TRIAL_TAG} = '{trial_id}'"
        ),
        max_results=1,
    )
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    return start_run(
        config,
        uri,
        run_name=trial_name,
        parent_run_id=parent_run_id,
        tags={TRIAL_TAG: trial_id, "tune_sweep": config.name},
    )


def trial_dirname(trial: tune.experiment.Trial) -> str:
    """Short trial folders (Tune's default spells out every searched value)."""
    return f"trial_{trial.trial_id}"


def reid_trial(
    params: dict[str, Any],
    base_config: dict[str, Any],
    tracking_uri: str,
    parent_run_id: str,
    train_storage: str,
) -> None:
    """One Tune trial: the base config with `params` applied, trained by a TorchTrainer.

    The trainer's run is named by the trial id under `train_storage`, so a restored trial
    continues from its latest checkpoint instead of starting over.
    """
    config = Config.from_dict(base_config).replace(**params)
    context = tune.get_context()
    trial_id = context.get_trial_id()
    run_id = child_run(config, tracking_uri, parent_run_id, trial_id, context.get_trial_name())
    logger = RunLogger(tracking_uri, run_id)
    trainer = build_trainer(
        config,
        tracking_uri,
        run_id,
        run_name=trial_id,
        storage_path=train_storage,
        callbacks=[EvaluationReportCallback(config.tune.metric)],
    )
    try:
        trainer.fit()
    except BaseException:
        logger.end("FAILED")
        raise
    logger.end()


# ---- the sweep ---------------------------------------------------------------------------


def sweep_paths(config: Config) -> tuple[Path, str, str]:
    """(output folder W/tune/<name>, Tune storage S, Tune experiment path S/<name>)."""
    out_dir = config.workspace_dir / "tune" / config.name
    storage = (config.tune.storage_path or str(config.workspace_dir / "tune")).rstrip("/")
    return out_dir, storage, f"{storage}/{config.name}"


def run_sweep(config: Config, resume: bool = False, progress: bool = True) -> SweepResult:
    """Run (or resume) the sweep the config describes and write out its best config.

    An experiment that already exists under the sweep's name is resumed with the config it
    was started with (`sweep_config.yaml`); a finished one is only summarised again.

    Args:
        config: the sweep (base training config + `tune` section).
        resume: require an experiment to resume (error if there is none).
        progress: show a progress bar while generating the synthetic dataset.

    Raises:
        ConfigError: bad `tune` settings, or `resume` without an experiment to resume.
        SweepInterrupted: the sweep stopped before all trials finished (run it again).
    """
    if config.tune.metric not in EVAL_METRICS:
        raise ConfigError(f"tune.metric={config.tune.metric!r}: choose one of {EVAL_METRICS}")
    out_dir, storage, experiment_path = sweep_paths(config)
    restoring = tune.Tuner.can_restore(experiment_path)
    saved_config = out_dir / "sweep_config.yaml"
    if resume and not restoring:
        raise ConfigError(f"--resume: no sweep to resume at {experiment_path}")
    needed = config.train.num_workers * config.train.cpus_per_worker
    init_ray(num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)))
    if restoring:
        if not saved_config.is_file():
            raise FileNotFoundError(
                f"{experiment_path} holds a sweep but {saved_config} is missing; choose "
                "another name (--set name=...) to start a new sweep"
            )
        if _comparable(config) != _comparable(load_config(saved_config)):
            print(
                f"[tune] {experiment_path} exists: resuming it with its own config "
                f"{saved_config} (set another `name` to start a new sweep)",
                flush=True,
            )
        config = load_config(saved_config)
    else:
        config, _ = prepare_data(config, progress=progress)
        save_config(config, saved_config)
    search_space(config.tune)  # validate the ranges before any trial starts
    scheduler = build_scheduler(config)

    uri = resolve_tracking_uri(config)
    parent_run_id = _parent_run(config, uri, out_dir)
    trainable = tune.with_resources(
        tune.with_parameters(
            reid_trial,
            base_config=config.to_dict(),
            tracking_uri=uri,
            parent_run_id=parent_run_id,
            train_storage=f"{experiment_path}/train",
        ),
        # The trial process only waits on its TorchTrainer, whose workers hold the CPUs/GPUs;
        # Tune refuses an all-zero request, so the trial asks for memory only.
        TRIAL_DRIVER_RESOURCES,
    )
    use_gpu = resolve_use_gpu(config)
    concurrent = max_concurrent_trials(config, ray.cluster_resources(), use_gpu)
    if restoring:
        # The searcher, scheduler and concurrency limit come back from the saved state.
        method = choose_search(config.tune.search)
        print(f"[tune] resuming {experiment_path}", flush=True)
        tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_errored=True)
    else:
        search_alg, method = build_search_alg(config, concurrent)
        print(
            f"[tune] {config.tune.num_samples} trials, {concurrent} at a time, search "
            f"{method}, ASHA on {config.tune.metric} -> {experiment_path}",
            flush=True,
        )
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(config.tune),
            tune_config=tune.TuneConfig(
                metric=config.tune.metric,
                mode="max",
                search_alg=search_alg,
                scheduler=scheduler,
                num_samples=config.tune.num_samples,
                trial_dirname_creator=trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=config.name, storage_path=storage, callbacks=[ReleaseStoppedTrainRuns()]
            ),
        )
    parent = RunLogger(uri, parent_run_id)
    parent.set_tags(
        {
            "tune_search": method,
            "tune_experiment": experiment_path,
            "tune_max_concurrent": str(concurrent),
        }
    )
    results = tuner.fit()

    # Tune marks the trials it interrupts (Ctrl+C, SIGTERM) as terminated in memory; the
    # saved experiment state tells them apart (they are pending there).
    saved = tune.ExperimentAnalysis(experiment_path).trials
    done = sum(t.status in ("TERMINATED", "ERROR") for t in saved)
    if done < config.tune.num_samples:
        parent.end("KILLED")
        raise SweepInterrupted(
            f"sweep {config.name} stopped with {done}/{config.tune.num_samples} trials done; "
            f"run the same command again to resume it ({experiment_path})"
        )
    return _summarise(config, results, uri, parent_run_id, out_dir, experiment_path, method)


# ---- results -----------------------------------------------------------------------------


def _comparable(config: Config) -> dict[str, Any]:
    data = config.to_dict()
    data["data"].pop("root", None)  # resolved to an absolute path when the sweep started
    return data


def _parent_run(config: Config, uri: str, out_dir: Path) -> str:
    """The sweep's parent MLflow run, reused across resumes (its id is kept in out_dir)."""
    id_file = out_dir / "parent_run_id"
    if id_file.is_file():
        run_id = id_file.read_text().strip()
        MlflowClient(uri).update_run(run_id, status="RUNNING")
        return run_id
    run_id = start_run(
        config,
        uri,
        run_name=f"{config.name}-sweep-{time.strftime('%Y%m%d-%H%M%S')}",
        tags={"tune_sweep": config.name, "tune_role": "parent"},
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    id_file.write_text(run_id)
    return run_id


def _trial_rows(
    config: Config, results: tune.ResultGrid, uri: str, parent_run_id: str
) -> list[dict[str, Any]]:
    """One row per trial; also closes child runs ASHA stopped (their process was killed)."""
    metric = config.tune.metric
    params = list(search_space(config.tune))
    client = MlflowClient(uri)
    experiment_id = ensure_experiment(config, uri)
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'"
    )
    run_of = {r.data.tags.get(TRIAL_TAG): r for r in runs}
    rows = []
    for result in results:
        metrics = result.metrics or {}
        # an errored trial may have no metrics: its folder is `trial_<id>` (trial_dirname)
        trial_id = metrics.get("trial_id") or Path(result.path).name.removeprefix("trial_")
        epoch = int(metrics.get("epoch", 0))
        history = result.metrics_dataframe
        best = (
            float(history[metric].max()) if history is not None and metric in history else math.nan
        )
        if result.error is not None:
            status = "error"
        elif epoch < config.train.epochs:
            status = "early_stopped"
        else:
            status = "completed"
        run = run_of.get(trial_id)
        if run is not None:
            client.set_tag(run.info.run_id, "tune_status", status)
            # A trial ASHA stops has its process ended: its run may be left RUNNING, or marked
            # FAILED by the interrupted trial function. Early stopping is not a failure.
            wanted = "FAILED" if status == "error" else "FINISHED"
            if run.info.status != wanted:
                client.set_terminated(run.info.run_id, wanted)
        row = {
            "trial_id": trial_id,
            "status": status,
            "mlflow_run_id": run.info.run_id if run else "",
            "epochs": epoch,
        }
        row.update({k: metrics.get(k, math.nan) for k in (metric, "rank1", "mAP", "mINP")})
        row[f"best_{metric}"] = best
        row.update({k: (result.config or {}).get(k, math.nan) for k in params})
        rows.append(row)
    return rows


def _summarise(
    config: Config,
    results: tune.ResultGrid,
    uri: str,
    parent_run_id: str,
    out_dir: Path,
    experiment_path: str,
    method: str,
) -> SweepResult:
    metric = config.tune.metric
    rows = _trial_rows(config, results, uri, parent_run_id)
    params = list(search_space(config.tune))
    results_csv = out_dir / "results.csv"
    with results_csv.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    scored = [r for r in rows if not math.isnan(float(r[metric]))]
    if not scored:
        RunLogger(uri, parent_run_id).end("FAILED")
        raise RuntimeError(
            f"no trial of sweep {config.name} reported {metric}; see "
            f"{results_csv} and the trial errors under {experiment_path}"
        )
    best = max(scored, key=lambda r: r[metric])  # the metric at each trial's last report
    best_params = {k: best[k] for k in params}
    best_config = config.replace(**best_params, **{"tracking.run_name": ""})
    best_path = out_dir / "best_config.yaml"
    save_config(best_config, best_path)
    header = (
        f"# Best trial {best['trial_id']} of sweep {config.name} ({metric} "
        f"{best[metric]:.4f} after {best['epochs']} epochs); searched: "
        + ", ".join(f"{k}={v}" for k, v in best_params.items())
        + "\n"
    )
    best_path.write_text(header + best_path.read_text())
    plot = plot_scores(rows, params, metric, out_dir / "score_vs_params.png")

    parent = RunLogger(uri, parent_run_id)
    for path in (best_path, results_csv, plot):
        parent.log_artifact(path)
    best_metrics = {k: float(best[k]) for k in (metric, "rank1", "mAP", "mINP")}
    parent.log_metrics({f"best_{k}": v for k, v in best_metrics.items()}, step=0)
    parent.set_tags(
        {
            "best_trial_id": best["trial_id"],
            "best_run_id": best["mlflow_run_id"],
            **{f"best.{k}": str(v) for k, v in best_params.items()},
        }
    )
    parent.end()
    # The best trial's model in the registry, tagged with this sweep (unless tracking.register
    # is false); its checkpoint is the one reported with the metric it was chosen by.
    record_sweep_best(best_config, uri, best["mlflow_run_id"],
                      _reported_checkpoint(results, best["trial_id"]), parent_run_id)
    return SweepResult(
        best_path,
        best_metrics,
        best_params,
        results_csv,
        plot,
        parent_run_id,
        uri,
        experiment_path,
        method,
    )


def _reported_checkpoint(results: tune.ResultGrid, trial_id: str) -> str | None:
    """The Ray Train checkpoint a trial last reported to Tune (its `checkpoint_path`)."""
    for result in results:
        if (result.metrics or {}).get("trial_id") == trial_id:
            return result.metrics.get("checkpoint_path")
    return None


def plot_scores(
    rows: list[dict[str, Any]], params: list[str], metric: str, path: str | Path
) -> Path:
    """Save one scatter per searched parameter: each trial's last `metric` against its value.

    Args:
        rows: trial rows with `metric`, "status" and every key of `params`.
        params: dotted config keys that were searched.
        path: output PNG path.
    """
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(
        1, len(params), figsize=(3.2 * len(params), 3.2), dpi=100, squeeze=False
    )
    colors = {"completed": "tab:blue", "early_stopped": "tab:orange", "error": "tab:red"}
    for ax, param in zip(axes[0], params):
        for status, color in colors.items():
            pts = [(float(r[param]), float(r[metric])) for r in rows if r["status"] == status]
            if pts:
                xs, ys = zip(*pts)
                ax.scatter(xs, ys, s=24, color=color, label=status.replace("_", " "))
        if param == "train.lr":
            ax.set_xscale("log")
        best = max(
            (r for r in rows if not math.isnan(float(r[metric]))),
            key=lambda r: r[metric],
            default=None,
        )
        if best is not None:
            ax.scatter(
                [float(best[param])],
                [float(best[metric])],
                s=160,
                marker="*",
                color="gold",
                edgecolors="black",
                zorder=3,
                label="best",
            )
        if isinstance(rows[0][param], bool):
            ax.set_xticks([0, 1], ["false", "true"])
            ax.set_xlim(-0.5, 1.5)
        ax.set_xlabel(param)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{metric} (last report)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
