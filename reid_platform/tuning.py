"""Ray Tune sweeps over any config keys (`tune.space`; by default the loss knobs and the lr).

Every trial is a full Ray Train run: a Tune *function trainable* (`reid_trial`) builds a
`TorchTrainer` and calls `.fit()`; a `TuneReportCallback` forwards the trainer's evaluation
reports to Tune, where ASHA stops the weak trials early and Optuna's TPE (random search when
Optuna is missing) proposes the next ones. `run_sweep(config)` is what `jobs/tune.py` calls.

Where a sweep named N lives (W = workspace, S = `tune.storage_path` or W/tune):
    S/N/                          Tune's experiment: its state and one folder per trial
    S/N/train/<trial_id>/         that trial's Ray Train run (checkpoints; resumed on restore)
    W/tune/N/sweep_config.yaml    the sweep's config as first started (a resume reuses it)
    W/tune/N/results.csv          one row per trial: searched values, metrics, MLflow run
    W/tune/N/score_vs_params.png  the metric against each searched key, one panel per key
    W/tune/N/best_config.yaml     the best trial's config, named N-best; `jobs/train.py
                                  --config` takes it

MLflow: one parent run for the sweep, one child run per trial (its params; the workers log its
per-epoch curves); the parent gets the best trial's config, the CSV and the plot.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import Any

import ray
import yaml
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune import CLIReporter
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, SearchAlgorithm
from ray.tune.search.sample import Domain

from reid_platform.config import (
    Config,
    ConfigError,
    Distribution,
    TuneConfig,
    load_config,
    save_config,
)
from reid_platform.models import ModelError, check_backbone
from reid_platform.runtime import init_ray
from reid_platform.tracking import RunLogger, ensure_experiment, resolve_tracking_uri, start_run
from reid_platform.training.trainer import (
    build_trainer,
    prepare_data,
    resolve_use_gpu,
    scale_swa,
)

# Metrics the training loop reports at every evaluation; all of them are higher-is-better.
EVAL_METRICS = ("score", "rank1", "rank5", "rank10", "rank20", "mAP", "mINP")
TRIAL_TAG = "tune_trial_id"
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 512 * 1024**2}  # bytes
# The trial table's metric columns, besides `tune.metric`.
TABLE_METRICS = ("epoch", "rank1", "mAP")

logger = logging.getLogger(__name__)


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


def search_space(tune_cfg: TuneConfig, searcher: str = "random") -> dict[str, Domain]:
    """Tune domains keyed by the dotted config key each one overrides (`tune.space`).

    The space was checked against the config when it loaded (`config.check_search_space`).
    A choice among lists (e.g. `train.milestones`) is offered to Tune as their YAML
    spellings ("[40, 70]"), since Optuna only handles scalar categories; and Optuna cannot
    quantise a log range, so with `searcher="optuna"` a qloguniform key is a plain
    loguniform one. `apply_params` turns both back (it rounds to `q`).

    Args:
        tune_cfg: the sweep settings; `space` is what is searched.
        searcher: "optuna" or "random" (`choose_search`).

    Returns:
        e.g. {"loss.margin": uniform(0.1, 1.0), "loss.soft_margin": choice([False, True]),
        "train.lr": loguniform(1e-4, 1e-3)}.

    Raises:
        ConfigError: the space is empty.
    """
    if not tune_cfg.space:
        raise ConfigError(
            "tune.space is empty: nothing to search; e.g. tune.space: "
            "{loss.margin: {type: uniform, low: 0.1, high: 1.0}}"
        )
    return {
        key: tune.loguniform(dist.low, dist.high)
        if searcher == "optuna" and dist.type == "qloguniform"
        else _domain(dist)
        for key, dist in tune_cfg.space.items()
    }


def _domain(dist: Distribution) -> Domain:
    low, high, q = dist.low, dist.high, dist.q
    if dist.type == "choice":
        return tune.choice([_choice_label(v) for v in dist.values])
    if dist.type == "randint":
        return tune.randint(int(low), int(high))  # high excluded
    if dist.type == "uniform":
        return tune.uniform(low, high)
    if dist.type == "quniform":
        return tune.quniform(low, high, q)
    if dist.type == "loguniform":
        return tune.loguniform(low, high)
    return tune.qloguniform(low, high, q)


def _choice_label(value: Any) -> Any:
    """A choice value as Tune sees it: scalars as they are, lists as YAML ("[40, 70]")."""
    if isinstance(value, tuple):
        return yaml.safe_dump(list(value), default_flow_style=True).strip()
    return value


def apply_params(config: Config, params: Mapping[str, Any]) -> Config:
    """The trial's config: `config` with a sample of its search space applied.

    Args:
        params: {dotted key: value} as Tune proposes them (a trial's `config`).
    """
    overrides = {}
    for key, value in params.items():
        dist = config.tune.space.get(key)
        if dist is not None and dist.type == "choice":
            value = {_choice_label(v): v for v in dist.values}.get(value, value)
        elif dist is not None and dist.q is not None:
            # to a multiple of q as Ray's quantised domains do, also where a searcher did not
            value = float(f"{round(value / dist.q) * dist.q:.12g}")
        overrides[key] = value
    return config.replace(**overrides)


def config_value(config: Config, key: str) -> Any:
    """The value of a dotted key, e.g. `config_value(cfg, "loss.margin") == cfg.loss.margin`."""
    return reduce(getattr, key.split("."), config)


def max_trial_epochs(config: Config) -> int:
    """The most epochs a trial can run: `train.epochs`, or the top of its range if searched."""
    dist = config.tune.space.get("train.epochs")
    if dist is None:
        return config.train.epochs
    if dist.type == "choice":
        return max(dist.values)
    if dist.type == "randint":
        return int(dist.high) - 1
    return int(round(dist.high / dist.q) * dist.q)  # quniform/qloguniform with an integer q


def check_searched_values(config: Config) -> None:
    """What the driver can check of the searched values beyond their types, before any trial
    starts: every backbone a choice names is a timm model.

    Raises:
        ModelError: naming `tune.space.model.backbone` and the unknown name.
    """
    dist = config.tune.space.get("model.backbone")
    for name in dist.values if dist is not None else ():
        try:
            check_backbone(name)
        except ModelError as err:
            raise ModelError(f"tune.space.model.backbone: {err}") from None


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

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created" per sweep

    # TPE samples at random for its first n_startup_trials (Optuna's default 10 would make a
    # short sweep purely random).
    startup = min(10, max(2, config.tune.num_samples // 3))
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
    return ConcurrencyLimiter(OptunaSearch(sampler=sampler), max_concurrent), method


def build_scheduler(config: Config) -> ASHAScheduler:
    """ASHA on `epoch`: a trial may be stopped after `tune.grace_period` evaluations."""
    epochs = max_trial_epochs(config)
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


class PlacementGroupCleanupUnavailable(RuntimeError):
    """Ray's private placement-group table cannot be read (the API changed or failed)."""


class ReleaseStoppedTrainRuns(tune.Callback):
    """Free the workers' placement groups of Train runs whose trial ASHA stopped.

    Works around ray-project/ray#54305: Tune stops a trial by ending its actor, and the
    TrainController that actor owns dies before it removes its workers' placement group; Ray
    keeps a placement group until its creator actor *and* job are gone, i.e. until the sweep
    ends, so the next trials would wait for those CPUs/GPUs forever. Ray Train's own cleaner
    actor asks the State API, which fails where several Ray instances share a host; so the
    driver also removes, every few seconds, the placement groups of this job whose creator
    actor is dead. Where that is impossible (see `remove_orphaned_placement_groups`) it says
    so once and the sweep carries on without it.
    """

    _unavailable = False  # also for instances pickled in a sweep started by older code

    def __init__(self, every_s: float = 5.0):
        self.every_s = every_s
        self._last = 0.0

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if self._unavailable or time.monotonic() - self._last < self.every_s:
            return
        self._last = time.monotonic()
        try:
            remove_orphaned_placement_groups()
        except PlacementGroupCleanupUnavailable as err:
            self._unavailable = True
            logger.warning(
                "[tune] cannot release the placement groups of trials ASHA stopped (%s): "
                "their CPUs/GPUs stay reserved until the sweep ends, so later trials may wait "
                "for them (ray-project/ray#54305); the sweep continues",
                err,
            )


def remove_orphaned_placement_groups() -> int:
    """Remove this job's placement groups whose creator actor has died; returns how many.

    Reads Ray's GCS placement-group table, a private API (pinned by `ray==2.60.*`): the
    public `placement_group_table()` leaves out the creator.

    Raises:
        PlacementGroupCleanupUnavailable: that API is missing or failed (the sweep's callback
            then stops trying: a best-effort clean-up must not end a sweep).
    """
    try:
        from ray._private.state import state as gcs_state
        from ray.core.generated import gcs_pb2
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        table = gcs_state._connect_and_get_accessor().get_placement_group_table()
        job_id = ray.get_runtime_context().get_job_id()
        live = (
            gcs_pb2.PlacementGroupTableData.PENDING,
            gcs_pb2.PlacementGroupTableData.CREATED,
            gcs_pb2.PlacementGroupTableData.RESCHEDULING,
        )
        orphans = []
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
                orphans.append(ray.PlacementGroupID(pg.placement_group_id))
        for pg_id in orphans:
            remove_placement_group(PlacementGroup(pg_id))
    except Exception as err:  # noqa: BLE001 - any failure of the private API means "unavailable"
        raise PlacementGroupCleanupUnavailable(f"{type(err).__name__}: {err}") from err
    return len(orphans)


class SweepReporter(CLIReporter):
    """Tune's trial table with the optimised metric and the searched keys as its columns.

    Tune's own resource line counts what the trial processes ask for, which is nothing (each
    only waits on its TorchTrainer, whose workers hold the CPUs/GPUs): this one counts the
    workers of the running trials instead.
    """

    def __init__(self, metric: str, keys: list[str], per_trial: Mapping[str, float]):
        # Tune sets the metric and mode itself (from tune.TuneConfig); refuses them here.
        self.columns = {
            "params": _short_names(keys),  # config key -> header
            "metrics": {metric: metric, **{m: m for m in TABLE_METRICS if m != metric}},
        }
        super().__init__(
            metric_columns=dict(self.columns["metrics"]),
            parameter_columns=dict(self.columns["params"]),
            max_report_frequency=30,
            print_intermediate_tables=True,
            max_column_length=24,
            sort_by_metric=True,
        )
        self.per_trial = dict(per_trial)

    def report(self, trials: list, done: bool, *sys_info: str) -> None:
        # sys_info: (the scheduler's summary, Tune's resource line): replace the latter. Drop
        # "Result logdir", a staging folder under /tmp/ray, not where the sweep is stored.
        text = self._progress_str(trials, done, *sys_info[:1], self.resource_line(trials))
        self._print("\n".join(s for s in text.split("\n") if not s.startswith("Result logdir")))

    def resource_line(self, trials: list, cluster: Mapping[str, float] | None = None) -> str:
        """e.g. "Resources: 2 trial(s) running, their Ray Train workers hold 4/8 CPUs".

        Args:
            trials: Tune's trials; those RUNNING hold `per_trial` each.
            cluster: the cluster's resources; default `ray.cluster_resources()`.
        """
        running = sum(t.status == "RUNNING" for t in trials)
        if cluster is None:
            cluster = ray.cluster_resources() if ray.is_initialized() else {}
        held = ", ".join(
            f"{running * need:g}/{cluster.get(name, 0.0):g} {name}s"
            for name, need in self.per_trial.items()
        )
        return f"Resources: {running} trial(s) running, their Ray Train workers hold {held}"


def _short_names(keys: list[str]) -> dict[str, str]:
    """Column headers: the last part of each key ("lr"), the whole key where that repeats."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (short if last.count(short) == 1 else k) for k, short in zip(keys, last)}


@contextlib.contextmanager
def _tune_console() -> Iterator[None]:
    """Tune's classic console (it honours `RunConfig(progress_reporter=...)`, the newer one
    ignores it) and no automatic TensorBoard logger (we track in MLflow; Tune's JSON and CSV
    loggers, which its result analysis reads, are passed explicitly)."""
    wanted = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}
    saved = {name: os.environ.get(name) for name in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


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
    # as jobs/train.py does: SWA over every epoch of a short trial is scaled down, with a word
    config = scale_swa(apply_params(Config.from_dict(base_config), params))
    context = tune.get_context()
    trial_id = context.get_trial_id()
    run_id = child_run(config, tracking_uri, parent_run_id, trial_id, context.get_trial_name())
    run_log = RunLogger(tracking_uri, run_id)
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
        run_log.end("FAILED")
        raise
    run_log.end()


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
        try:
            started_with = load_config(saved_config)
        except ConfigError as err:
            raise ConfigError(
                f"{saved_config} (the config this sweep started with): {err}"
            ) from None
        if _comparable(config) != _comparable(started_with):
            print(
                f"[tune] {experiment_path} exists: resuming it with its own config "
                f"{saved_config} (set another `name` to start a new sweep)",
                flush=True,
            )
        config = started_with
    else:
        config, _ = prepare_data(config, progress=progress)
        check_searched_values(config)
        save_config(config, saved_config)
    search_space(config.tune)  # an empty space is an error before any trial starts
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
    per_trial = trial_resources(config, use_gpu)
    concurrent = max_concurrent_trials(config, ray.cluster_resources(), use_gpu)
    if restoring:
        # The searcher, scheduler, concurrency limit and console come back from the saved state.
        method = choose_search(config.tune.search)
        print(f"[tune] resuming {experiment_path}", flush=True)
        tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_errored=True)
    else:
        search_alg, method = build_search_alg(config, concurrent)
        workers = config.train.num_workers
        print(
            f"[tune] {config.tune.num_samples} trials of {', '.join(config.tune.space)}; "
            f"{concurrent} at a time, each a Ray Train run of {workers} worker(s) holding "
            + ", ".join(f"{v / workers:g} {k}" for k, v in per_trial.items())
            + f" each; search {method}, ASHA on {config.tune.metric} -> {experiment_path}",
            flush=True,
        )
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(config.tune, method),
            tune_config=tune.TuneConfig(
                metric=config.tune.metric,
                mode="max",
                search_alg=search_alg,
                scheduler=scheduler,
                num_samples=config.tune.num_samples,
                trial_dirname_creator=trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=config.name,
                storage_path=storage,
                callbacks=[JsonLoggerCallback(), CSVLoggerCallback(), ReleaseStoppedTrainRuns()],
                progress_reporter=SweepReporter(
                    config.tune.metric, list(config.tune.space), per_trial
                ),
                verbose=1,  # the trial table; the trials' progress lines come from Ray Train
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
    with _tune_console():
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
    """One row per trial, its searched values as the trial's config holds them; also closes
    child runs ASHA stopped (their process was killed)."""
    metric = config.tune.metric
    keys = list(config.tune.space)
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
        params = {k: v for k, v in (result.config or {}).items() if k in keys}
        trial_config = apply_params(config, params) if len(params) == len(keys) else None
        if result.error is not None:
            status = "error"
        elif trial_config is None or epoch < trial_config.train.epochs:
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
        row.update({k: config_value(trial_config, k) if trial_config else math.nan for k in keys})
        rows.append(row)
    return rows


def _csv_value(value: Any) -> Any:
    """Lists (a choice of `train.milestones`) as YAML, like they are written in a config."""
    if isinstance(value, tuple):
        return yaml.safe_dump(list(value), default_flow_style=True).strip()
    return value


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
    keys = list(config.tune.space)
    results_csv = out_dir / "results.csv"
    with results_csv.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: _csv_value(v) for k, v in row.items()} for row in rows)
    scored = [r for r in rows if not math.isnan(float(r[metric]))]
    if not scored:
        RunLogger(uri, parent_run_id).end("FAILED")
        raise RuntimeError(
            f"no trial of sweep {config.name} reported {metric}; see "
            f"{results_csv} and the trial errors under {experiment_path}"
        )
    best = max(scored, key=lambda r: r[metric])  # the metric at each trial's last report
    best_params = {k: best[k] for k in keys}
    # Named after the sweep, so that retraining it lands in its own MLflow experiment.
    best_config = config.replace(
        **best_params, **{"name": f"{config.name}-best", "tracking.run_name": ""}
    )
    best_path = out_dir / "best_config.yaml"
    save_config(best_config, best_path)
    header = (
        f"# Best trial {best['trial_id']} of sweep {config.name} ({metric} "
        f"{best[metric]:.4f} after {best['epochs']} epochs); searched: "
        + ", ".join(f"{k}={_csv_value(v)}" for k, v in best_params.items())
        + "\n"
    )
    best_path.write_text(header + best_path.read_text())
    plot = plot_scores(
        rows,
        config.tune.space,
        metric,
        out_dir / "score_vs_params.png",
        title=f"sweep {config.name}: {len(rows)} trials, best {metric} {best[metric]:.4f}",
    )

    parent = RunLogger(uri, parent_run_id)
    for path in (best_path, results_csv, plot):
        parent.log_artifact(path)
    best_metrics = {k: float(best[k]) for k in (metric, "rank1", "mAP", "mINP")}
    parent.log_metrics({f"best_{k}": v for k, v in best_metrics.items()}, step=0)
    parent.set_tags(
        {
            "best_trial_id": best["trial_id"],
            "best_run_id": best["mlflow_run_id"],
            **{f"best.{k}": str(_csv_value(v)) for k, v in best_params.items()},
        }
    )
    parent.end()
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


# ---- the plot ----------------------------------------------------------------------------

STATUS_COLORS = {"completed": "tab:blue", "early_stopped": "tab:orange", "error": "tab:red"}


def score_figure(
    rows: list[dict[str, Any]], space: Mapping[str, Distribution], metric: str, title: str = ""
) -> Any:
    """One scatter panel per searched key: each trial's last `metric` against its value.

    Ranges span the whole searched interval (log axis for loguniform/qloguniform); choices
    are categories in the order they were listed; tick labels never overlap.

    Args:
        rows: trial rows with `metric`, "status" and every key of `space` (trial values).
        space: the searched keys and their distributions (`tune.space`).
        metric: the optimised metric.
        title: a title above the panels (e.g. the sweep's name).
        title: a title above the panels (e.g. the sweep's name).

    Returns:
        The matplotlib Figure (caller closes it).
    """
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    keys = list(space)
    ncols = min(len(keys), 3)
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(3.6 * ncols, 3.2 * nrows + 0.5),
        dpi=100,
        squeeze=False,
        sharey=True,
        layout="constrained",
    )
    scored = [r for r in rows if not math.isnan(float(r[metric]))]
    best = max(scored, key=lambda r: r[metric], default=None)
    for ax, key in zip(axes.flat, keys):
        xs = _x_positions(space[key], [r[key] for r in rows])
        for status, color in STATUS_COLORS.items():
            pts = [
                (x, float(r[metric]))
                for x, r in zip(xs, rows)
                if r["status"] == status and not math.isnan(x) and not math.isnan(float(r[metric]))
            ]
            if pts:
                ax.scatter(*zip(*pts), s=24, color=color, label=status.replace("_", " "))
        if best is not None:
            ax.scatter(
                [xs[rows.index(best)]],
                [float(best[metric])],
                s=160,
                marker="*",
                color="gold",
                edgecolors="black",
                zorder=3,
                label="best",
            )
        _format_axis(ax, space[key])
        ax.set_xlabel(key)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(keys) :]:
        ax.remove()
    for row in axes:
        row[0].set_ylabel(f"{metric} (last report)")
    legend = {}  # one legend for all panels, above them: label -> handle
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    if legend:
        fig.legend(legend.values(), legend.keys(), loc="outside lower center", ncol=len(legend))
    if title:
        fig.suptitle(title)
    _declutter_tick_labels(
        fig, [ax for ax, key in zip(axes.flat, keys) if space[key].type == "choice"]
    )
    return fig


def plot_scores(
    rows: list[dict[str, Any]],
    space: Mapping[str, Distribution],
    metric: str,
    path: str | Path,
    title: str = "",
) -> Path:
    """Save `score_figure(rows, space, metric, title)` as a PNG at `path`."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = score_figure(rows, space, metric, title)
    fig.savefig(path)
    plt.close(fig)
    return path


def _x_positions(dist: Distribution, values: list[Any]) -> list[float]:
    """Where each trial's value goes on its panel's x axis (NaN: no value)."""
    if dist.type != "choice":
        return [float(v) for v in values]
    # categories at 0..n-1; the trials that share one are spread around it (0, +d, -d, +2d,
    # -2d, ...; d = 0.06, within +-0.24) so that all of them show
    seen: dict[int, int] = {}
    xs = []
    for v in values:
        if v not in dist.values:
            xs.append(math.nan)
            continue
        i = dist.values.index(v)
        k = seen.get(i, 0)
        xs.append(i + 0.06 * ((k + 1) // 2) * (1 if k % 2 else -1))
        seen[i] = (k + 1) % 9
    return xs


def _label(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return _csv_value(value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _format_axis(ax: Any, dist: Distribution) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    if dist.type == "choice":
        n = len(dist.values)
        ax.set_xticks(range(n), [_label(v) for v in dist.values])
        ax.set_xlim(-0.5, n - 0.5)
        return
    low, high = dist.low, dist.high - (1 if dist.type == "randint" else 0)
    if "log" in dist.type:
        ax.set_xscale("log")
        ax.set_xlim(low / 1.15, high * 1.15)
        decades = math.log10(high / low)
        subs = (1.0, 2.0, 5.0) if decades <= 2 else (1.0,)
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs, numticks=6))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:.0e}".replace("e-0", "e-")))
        ax.xaxis.set_minor_formatter(NullFormatter())
        return
    pad = 0.05 * (high - low) if high > low else 0.5
    ax.set_xlim(low - pad, high + pad)
    integer = dist.type == "randint" or (dist.q is not None and dist.q.is_integer())
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=integer))


def drawn_tick_labels(ax: Any) -> list[Any]:
    """The x tick labels (major and minor) a drawn figure shows: in view and not empty."""
    low, high = sorted(ax.get_xlim())
    ticks = ax.xaxis.get_major_ticks() + ax.xaxis.get_minor_ticks()
    return [
        t.label1
        for t in ticks
        if t.label1.get_visible() and t.label1.get_text() and low <= t.get_loc() <= high
    ]


def _labels_overlap(ax: Any, renderer: Any) -> bool:
    boxes = sorted(
        (t.get_window_extent(renderer) for t in drawn_tick_labels(ax)), key=lambda b: b.x0
    )
    return any(a.x1 > b.x0 for a, b in zip(boxes, boxes[1:]))


def _declutter_tick_labels(fig: Any, categorical: list[Any]) -> None:
    """Turn x tick labels that would overlap: on the `categorical` axes upright (every
    category keeps its label), elsewhere slanted; then, while they still overlap, drop every
    other label."""
    fig.draw_without_rendering()  # lays out and sizes the text, draws no pixels
    renderer = fig.canvas.get_renderer()
    crowded = [ax for ax in fig.axes if _labels_overlap(ax, renderer)]
    for ax in crowded:
        upright = ax in categorical
        ax.tick_params(axis="x", labelrotation=90 if upright else 35)
        if not upright:
            for label in ax.get_xticklabels():
                label.set_horizontalalignment("right")
                label.set_rotation_mode("anchor")
    while crowded:
        fig.draw_without_rendering()
        crowded = [ax for ax in crowded if _labels_overlap(ax, renderer)]
        for ax in crowded:
            for label in drawn_tick_labels(ax)[1::2]:
                label.set_visible(False)
