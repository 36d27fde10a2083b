"""The Tune sweep: search space, searcher choice, concurrency, and a reduced end-to-end sweep."""

from __future__ import annotations

import csv
import math
import sys
import uuid
from pathlib import Path

import pytest
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter
from ray.tune.search.sample import Categorical, Float, LogUniform

from reid_platform.config import Config, ConfigError, TuneConfig, load_config
from reid_platform.tuning import (
    build_scheduler,
    build_search_alg,
    choose_search,
    max_concurrent_trials,
    run_sweep,
    search_space,
)

from conftest import REPO, tiny_config_overrides

SWEEP_CONFIGS = ["sweep.yaml", "sweep_demo.yaml"]


def test_search_space_has_the_loss_knobs_within_bounds():
    cfg = TuneConfig(
        margin_min=0.2,
        margin_max=0.8,
        id_weight_min=0.1,
        id_weight_max=0.9,
        triplet_weight_min=0.3,
        triplet_weight_max=0.7,
        lr_min=1e-5,
        lr_max=1e-3,
    )
    space = search_space(cfg)
    assert set(space) == {
        "loss.margin",
        "loss.soft_margin",
        "loss.id_weight",
        "loss.triplet_weight",
        "train.lr",
    }
    for key, (low, high) in {
        "loss.margin": (0.2, 0.8),
        "loss.id_weight": (0.1, 0.9),
        "loss.triplet_weight": (0.3, 0.7),
        "train.lr": (1e-5, 1e-3),
    }.items():
        assert isinstance(space[key], Float)
        assert (space[key].lower, space[key].upper) == (low, high)
    assert isinstance(space["train.lr"].get_sampler(), LogUniform)
    assert isinstance(space["loss.soft_margin"], Categorical)
    assert sorted(space["loss.soft_margin"].categories) == [False, True]
    # every key is a config key: a sample applies to a Config
    sample = {k: (v.sample() if hasattr(v, "sample") else v) for k, v in space.items()}
    config = Config().replace(**sample)
    assert config.loss.margin == sample["loss.margin"]
    assert config.train.lr == sample["train.lr"]


def test_search_space_options_and_bad_ranges():
    space = search_space(TuneConfig(soft_margin_choice=False, search_lr=False))
    assert set(space) == {"loss.margin", "loss.id_weight", "loss.triplet_weight"}
    with pytest.raises(ConfigError, match="tune.margin_min"):
        search_space(TuneConfig(margin_min=1.0, margin_max=0.5))
    with pytest.raises(ConfigError, match="tune.lr_min"):
        search_space(TuneConfig(lr_min=0.0))


def test_searcher_is_optuna_when_installed():
    assert choose_search("auto") == "optuna"
    search_alg, method = build_search_alg(Config(), max_concurrent=3)
    assert method == "optuna"
    assert isinstance(search_alg, ConcurrencyLimiter) and search_alg.max_concurrent == 3


def test_searcher_falls_back_to_random_without_optuna(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` now raises ImportError
    assert choose_search("auto") == "random"
    assert choose_search("random") == "random"
    with pytest.raises(ConfigError, match="optuna is not installed"):
        choose_search("optuna")
    search_alg, method = build_search_alg(Config(), max_concurrent=2)
    assert method == "random"
    assert isinstance(search_alg, BasicVariantGenerator)


def test_concurrent_trials_follow_the_cluster_resources():
    config = Config().replace(
        **{"train.num_workers": 2, "train.cpus_per_worker": 4, "tune.num_samples": 16}
    )
    assert max_concurrent_trials(config, {"CPU": 32.0, "GPU": 4.0}, use_gpu=True) == 2
    assert max_concurrent_trials(config, {"CPU": 32.0}, use_gpu=False) == 4
    assert max_concurrent_trials(config, {"CPU": 2.0}, use_gpu=False) == 1  # at least one
    few = config.replace(**{"tune.num_samples": 3})
    assert max_concurrent_trials(few, {"CPU": 64.0}, use_gpu=False) == 3
    fixed = config.replace(**{"tune.max_concurrent": 5})
    assert max_concurrent_trials(fixed, {"CPU": 2.0}, use_gpu=False) == 5


def test_asha_counts_epochs_and_grace_in_evaluations():
    config = Config().replace(
        **{
            "train.epochs": 40,
            "train.eval_every": 5,
            "tune.grace_period": 2,
            "tune.reduction_factor": 3,
        }
    )
    scheduler = build_scheduler(config)
    assert scheduler._time_attr == "epoch"
    assert scheduler._max_t == 40
    assert scheduler._brackets[0]._rungs[-1][0] == 10  # first rung: 2 evaluations x 5 epochs
    with pytest.raises(ConfigError, match="reduction_factor"):
        build_scheduler(config.replace(**{"tune.reduction_factor": 1}))


@pytest.mark.parametrize("name", SWEEP_CONFIGS)
def test_sweep_configs_load(name):
    config = load_config(REPO / "configs" / name)
    search_space(config.tune)
    build_scheduler(config)
    assert config.train.eval_every == 1  # ASHA needs the score at every epoch


def test_resume_without_a_sweep_is_a_user_error(workspace, monkeypatch, capsys):
    import tune as tune_job  # jobs/tune.py

    import _cli

    name = f"no-such-sweep-{uuid.uuid4().hex[:6]}"
    monkeypatch.setattr(sys, "argv", ["tune.py", "--resume", "--set", f"name={name}"])
    with pytest.raises(SystemExit) as exit_info:
        _cli.run_main(tune_job.main)
    assert exit_info.value.code == 2
    assert "no sweep to resume" in capsys.readouterr().err


@pytest.mark.slow
def test_sweep_end_to_end(ray_session, tiny_market, workspace):
    from mlflow.tracking import MlflowClient

    overrides = {
        **tiny_config_overrides(),
        "name": f"sweep-test-{uuid.uuid4().hex[:6]}",
        "data.format": "market1501",
        "data.root": str(tiny_market),
        "train.num_workers": 1,
        "train.epochs": 2,
        "train.batches_per_epoch": 2,
        "tune.num_samples": 2,
        "tune.max_concurrent": 2,
    }
    config = load_config(
        REPO / "configs" / "sweep_demo.yaml", [f"{k}={v}" for k, v in overrides.items()]
    )
    result = run_sweep(config, progress=False)

    # results CSV: one row per trial
    with result.results_csv.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    assert all(r["mlflow_run_id"] for r in rows)
    assert {r["status"] for r in rows} <= {"completed", "early_stopped"}
    best_row = max(rows, key=lambda r: float(r["score"]))

    # best config: loadable as is, loss values of the best trial
    assert result.best_config_path == workspace / "tune" / config.name / "best_config.yaml"
    best = load_config(result.best_config_path)
    assert best.loss.margin == pytest.approx(float(best_row["loss.margin"]))
    assert best.loss.id_weight == pytest.approx(float(best_row["loss.id_weight"]))
    assert best.loss.triplet_weight == pytest.approx(float(best_row["loss.triplet_weight"]))
    assert best.loss.soft_margin == (best_row["loss.soft_margin"] == "True")
    assert best.train.lr == pytest.approx(float(best_row["train.lr"]))
    assert result.best_metrics["score"] == pytest.approx(float(best_row["score"]))

    # MLflow: the parent with the outputs, one child per trial with params and curves
    client = MlflowClient(result.tracking_uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"best_config.yaml", "results.csv", "score_vs_params.png"} <= artifacts
    assert parent.data.metrics["best_score"] == pytest.approx(result.best_metrics["score"])
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'",
    )
    assert {c.info.run_id for c in children} == {r["mlflow_run_id"] for r in rows}
    for child in children:
        row = next(r for r in rows if r["mlflow_run_id"] == child.info.run_id)
        assert float(child.data.params["loss.margin"]) == pytest.approx(float(row["loss.margin"]))
        assert child.info.status == "FINISHED"
        curve = client.get_metric_history(child.info.run_id, "loss")
        # Workers log every epoch to MLflow themselves; a trial ASHA stops may have logged one
        # more epoch than Tune saw before it ended the trial.
        assert len(curve) >= int(row["epochs"]) >= 1
        assert len(curve) <= config.train.epochs
        assert not math.isnan(child.data.metrics["score"])

    # running it again resumes the (finished) experiment: same best config, no new trials
    again = run_sweep(config, progress=False)
    assert again.best_config_path == result.best_config_path
    assert again.parent_run_id == result.parent_run_id
    assert again.best_params == pytest.approx(result.best_params)
    assert Path(again.plot).is_file()


@pytest.mark.slow
def test_orphaned_placement_groups_are_released(ray_session):
    """The placement group of a dead actor (an ASHA-stopped trial's TrainController) is
    removed; one the driver holds is left alone."""
    import time

    from ray.util.placement_group import (
        placement_group,
        placement_group_table,
        remove_placement_group,
    )

    from reid_platform.tuning import remove_orphaned_placement_groups

    ray = ray_session

    @ray.remote(num_cpus=0)
    class Creator:
        def make(self) -> str:
            pg = placement_group([{"CPU": 0.1}])
            ray.get(pg.ready())
            return pg.id.hex()

    creator = Creator.remote()
    orphan = ray.get(creator.make.remote())
    kept = placement_group([{"CPU": 0.1}])
    ray.get(kept.ready())
    ray.kill(creator)
    deadline = time.monotonic() + 30
    while placement_group_table()[orphan]["state"] != "REMOVED":
        assert time.monotonic() < deadline, "the dead actor's placement group was not removed"
        remove_orphaned_placement_groups()
        time.sleep(0.5)
    assert placement_group_table(kept)["state"] == "CREATED"
    remove_placement_group(kept)
