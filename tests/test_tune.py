"""The Tune sweep: search space from config, searcher, scheduler, console, plot, a sweep."""

from __future__ import annotations

import csv
import logging
import math
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter
from ray.tune.search.sample import Categorical, Float, Integer, LogUniform

from reid_platform.config import Config, ConfigError, load_config
from reid_platform.models import ModelError
from reid_platform.tuning import (
    PlacementGroupCleanupUnavailable,
    ReleaseStoppedTrainRuns,
    SweepReporter,
    apply_params,
    build_scheduler,
    build_search_alg,
    check_searched_values,
    choose_search,
    config_value,
    drawn_tick_labels,
    max_concurrent_trials,
    remove_orphaned_placement_groups,
    run_sweep,
    score_figure,
    search_space,
)

from conftest import REPO, tiny_config_overrides

SWEEP_CONFIGS = ["sweep.yaml", "sweep_demo.yaml"]

# A space over keys of every kind: a float range, a log range, a quantised int, a randint, a
# choice of strings, of booleans and of lists.
WIDE_SPACE = [
    "tune.space.data.augment.erasing_p={type: uniform, low: 0.0, high: 0.7}",
    "tune.space.model.pooling={type: choice, values: [avg, gem]}",
    "tune.space.data.augment.pad={type: quniform, low: 0, high: 12, q: 4}",
    "tune.space.train.epochs={type: randint, low: 2, high: 5}",
    "tune.space.train.milestones={type: choice, values: [[10, 20], [30]]}",
    "tune.space.train.weight_decay={type: qloguniform, low: 1e-5, high: 1e-3, q: 1e-5}",
]


def test_default_space_is_the_loss_search():
    space = search_space(Config().tune)
    assert list(space) == [
        "loss.margin",
        "loss.soft_margin",
        "loss.id_weight",
        "loss.triplet_weight",
        "train.lr",
    ]
    for key, (low, high) in {
        "loss.margin": (0.1, 1.0),
        "loss.id_weight": (0.05, 1.0),
        "loss.triplet_weight": (0.05, 1.0),
        "train.lr": (1e-4, 1e-3),
    }.items():
        assert isinstance(space[key], Float)
        assert (space[key].lower, space[key].upper) == (low, high)
    assert isinstance(space["train.lr"].get_sampler(), LogUniform)
    assert isinstance(space["loss.soft_margin"], Categorical)
    assert space["loss.soft_margin"].categories == [False, True]


def test_any_config_key_can_be_searched():
    config = load_config(None, WIDE_SPACE)
    space = search_space(config.tune)
    assert isinstance(space["train.epochs"], Integer)
    pads, epochs, milestones, decays = set(), set(), set(), []
    rng = np.random.default_rng(0)
    for _ in range(60):
        params = {k: d.sample(random_state=rng) for k, d in space.items()}
        trial = apply_params(config, params)
        assert 0.0 <= trial.data.augment.erasing_p <= 0.7
        assert trial.model.pooling in ("avg", "gem")
        assert isinstance(trial.data.augment.pad, int) and trial.data.augment.pad % 4 == 0
        assert isinstance(trial.train.epochs, int) and 2 <= trial.train.epochs <= 4  # 5 excluded
        assert trial.train.milestones in ((10, 20), (30,))
        assert 1e-5 <= trial.train.weight_decay <= 1e-3 + 1e-9
        assert trial.train.weight_decay / 1e-5 == pytest.approx(
            round(trial.train.weight_decay / 1e-5)
        )
        # every searched key of the trial's config holds the sampled value
        assert config_value(trial, "data.augment.erasing_p") == params["data.augment.erasing_p"]
        pads.add(trial.data.augment.pad)
        epochs.add(trial.train.epochs)
        milestones.add(trial.train.milestones)
        decays.append(trial.train.weight_decay)
    assert pads == {0, 4, 8, 12} and epochs == {2, 3, 4} and len(milestones) == 2
    # log-uniform: about as many draws below the geometric middle (1e-4) as above it
    assert 15 <= sum(d < 1e-4 for d in decays) <= 45


def test_optuna_proposes_from_the_config_space():
    """Optuna takes only scalar categories: a choice of lists still works (as YAML labels)."""
    config = load_config(None, [*WIDE_SPACE, "tune.num_samples=4"])
    search_alg, method = build_search_alg(config, max_concurrent=2)
    assert method == "optuna" and isinstance(search_alg, ConcurrencyLimiter)
    assert search_alg.set_search_properties("score", "max", search_space(config.tune, method))
    first, second = search_alg.suggest("t1"), search_alg.suggest("t2")
    assert search_alg.suggest("t3") is None  # two trials running: the limit holds the third
    for params in (first, second):
        assert set(params) == set(config.tune.space)
        trial = apply_params(config, params)
        assert trial.train.milestones in ((10, 20), (30,))
        assert 0.0 <= trial.data.augment.erasing_p <= 0.7
        assert isinstance(trial.data.augment.pad, int) and trial.data.augment.pad % 4 == 0
        # Optuna proposes a qloguniform key unrounded: the trial rounds it to q
        assert trial.train.weight_decay / 1e-5 == pytest.approx(
            round(trial.train.weight_decay / 1e-5)
        )
    search_alg.on_trial_complete("t1", {"score": 0.5})
    assert search_alg.suggest("t3") is not None  # a slot freed


@pytest.mark.parametrize(
    "override,message",
    [
        ("tune.space.train.epoch={type: randint, low: 1, high: 4}", "did you mean 'train.epochs'"),
        ("tune.space.train.epochs={type: choice, values: [a, b]}", "choice value 'a'.*integer"),
        ("tune.space.train.epochs={type: uniform, low: 1, high: 4}", "integer; use.*randint"),
        ("tune.space.model.pooling={type: uniform, low: 0, high: 1}",
         r"\['avg', 'gem', 'max', 'netvlad'\].*choice"),
        ("tune.space.model.pooling={type: choice, values: [avg, mean]}", "'mean'.*not allowed"),
        ("tune.space.loss.soft_margin={type: choice, values: [1, 0]}", "true or false"),
        ("tune.space.train.lr={type: loguniform, low: 0, high: 0.1}", "0 < low"),
        ("tune.space.train.lr={type: uniform, low: 0.1, high: 0.01}", "must be below high"),
        ("tune.space.train.lr={type: quniform, low: 0, high: 1}", "step q > 0"),
        ("tune.space.data.augment.pad={type: quniform, low: 1, high: 9, q: 4}", "multiples of q=4"),
        ("tune.space.train.lr={type: uniform, high: 1}", "needs low and high"),
        ("tune.space.train.lr={type: uniform, low: 0, high: 1, values: [1]}", "not values"),
        ("tune.space.train.lr={type: choice, low: 0, values: [1]}", "values` only"),
        ("tune.space.train.lr={type: choice, values: []}", "needs `values`"),
        ("tune.space.train.lr={type: choice, values: [0.1, 0.1]}", "repeat"),
        ("tune.space.train.lr={type: normal, low: 0, high: 1}", "'normal' is not allowed"),
        ("tune.space.train.lr={kind: uniform}", "unknown config key 'tune.space.train.lr.kind'"),
        ("tune.space.train={type: uniform, low: 0, high: 1}", "section, not a value"),
        ("tune.space.name={type: choice, values: [a, b]}", "cannot be searched"),
        ("tune.space.tune.num_samples={type: randint, low: 1, high: 4}", "cannot be searched"),
        ("tune.space.data.augment.erasing_p.high=0.5", "erasing_p.type is required"),
    ],
)
def test_bad_space_is_an_error_naming_the_key(override, message):
    key = override.split("=")[0].removeprefix("tune.space.").rsplit(".high", 1)[0]
    with pytest.raises(ConfigError, match=message) as info:
        load_config(None, [override])
    assert f"tune.space.{key}" in str(info.value)


def test_space_overrides_add_change_and_remove_keys(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("tune:\n  space:\n    loss.margin: {type: uniform, low: 0.2, high: 0.4}\n")
    from_file = load_config(path)
    assert list(from_file.tune.space) == ["loss.margin"]  # a YAML space replaces the default
    changed = load_config(
        path,
        [
            "tune.space.loss.margin.high=0.6",
            "tune.space.model.pooling={type: choice, values: [avg, gem]}",
        ],
    )
    assert (changed.tune.space["loss.margin"].low, changed.tune.space["loss.margin"].high) == (
        0.2,
        0.6,
    )
    assert changed.tune.space["model.pooling"].values == ("avg", "gem")
    # without a space in the file, --set adds to the default one; null removes a key
    added = load_config(None, ["tune.space.model.pooling={type: choice, values: [avg, gem]}"])
    assert list(added.tune.space) == [*Config().tune.space, "model.pooling"]
    removed = load_config(None, ["tune.space.train.lr=null"])
    assert "train.lr" not in removed.tune.space and len(removed.tune.space) == 4
    # choice values take the key's type: YAML's `on` for train.amp is the literal "on"
    amp = load_config(None, ["tune.space.train.amp={type: choice, values: [on, off]}"])
    assert amp.tune.space["train.amp"].values == ("on", "off")
    with pytest.raises(ConfigError, match="tune.space is empty"):
        search_space(load_config(None, ["tune.space={}"]).tune)


def test_old_sweep_keys_say_how_to_write_the_space(tmp_path):
    old = {
        "tune": {
            "num_samples": 4,
            "margin_min": 0.2,
            "margin_max": 0.8,
            "soft_margin_choice": False,
            "lr_min": 1e-5,
            "lr_max": 1e-3,
        }
    }
    path = tmp_path / "old_sweep.yaml"
    path.write_text(yaml.safe_dump(old))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    for key in ("tune.margin_min", "tune.margin_max", "tune.soft_margin_choice", "tune.lr_max"):
        assert key in message
    # the YAML in the message is a working config that searches what the old keys did
    snippet = message[message.index("tune:\n") :]
    fixed = tmp_path / "fixed.yaml"
    fixed.write_text(snippet)
    space = load_config(fixed).tune.space
    assert list(space) == ["loss.margin", "loss.id_weight", "loss.triplet_weight", "train.lr"]
    assert (space["loss.margin"].low, space["loss.margin"].high) == (0.2, 0.8)
    assert (space["loss.id_weight"].low, space["loss.id_weight"].high) == (0.05, 1.0)
    assert space["train.lr"].type == "loguniform"
    assert (space["train.lr"].low, space["train.lr"].high) == (1e-5, 1e-3)
    with pytest.raises(ConfigError, match=r"(?s)tune\.search_lr.*loss\.soft_margin") as info:
        load_config(None, ["tune.search_lr=false"])
    assert "train.lr" not in str(info.value)  # search_lr: false searched no lr


def test_space_searches_a_field_of_a_named_loss_entry():
    """`loss.extra` is a list of named entries: a sweep varies one field of one entry, adding
    the entry to trials whose base config does not have it."""
    config = load_config(
        None,
        ["tune.space={loss.extra.circle.weight: {type: uniform, low: 0.1, high: 0.9}}"],
    )
    trial = apply_params(config, {"loss.extra.circle.weight": 0.25})
    (circle,) = trial.loss.extra
    assert (circle.name, circle.weight) == ("circle", 0.25)
    with pytest.raises(ConfigError, match="did you mean 'loss.extra.circle.weight'"):
        load_config(None, ["tune.space.loss.extra.circle.wieght={type: uniform, low: 0, high: 1}"])
    with pytest.raises(ConfigError, match=r"loss\.extra\.<entry name>\.<field>"):
        load_config(None, ["tune.space.loss.extra.circle={type: uniform, low: 0, high: 1}"])


def test_searched_backbones_are_checked_before_any_trial():
    good = load_config(None, ["tune.space.model.backbone={type: choice, values: [resnet18]}"])
    check_searched_values(good)
    bad = load_config(
        None, ["tune.space.model.backbone={type: choice, values: [resnet18, resnet_18]}"]
    )
    with pytest.raises(ModelError, match=r"tune.space.model.backbone.*'resnet_18'"):
        check_searched_values(bad)


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


def test_asha_stops_on_epochs_after_the_grace_evaluations():
    config = Config().replace(
        **{
            "train.epochs": 40,
            "train.eval_every": 5,
            "tune.grace_period": 2,
            "tune.reduction_factor": 3,
        }
    )
    scheduler = build_scheduler(config)
    scheduler.set_search_properties("score", "max")
    good, bad, late = (Trial("reid_trial", trial_id=i, stub=True) for i in ("good", "bad", "late"))
    for trial in (good, bad, late):
        scheduler.on_trial_add(None, trial)

    def report(trial: Trial, epoch: int, score: float) -> str:
        return scheduler.on_trial_result(None, trial, {"epoch": epoch, "score": score})

    # first evaluation (epoch 5): no trial is judged before 2 evaluations
    assert report(good, 5, 0.9) == report(bad, 5, 0.0) == TrialScheduler.CONTINUE
    # Tune's own iteration counter is not the clock: only `epoch` is
    assert scheduler.on_trial_result(None, bad, {"training_iteration": 10, "score": 0.0}) == (
        TrialScheduler.CONTINUE
    )
    # epoch 10 = 2 evaluations x 5 epochs: the first rung; the weaker trial stops there
    assert report(good, 10, 0.9) == TrialScheduler.CONTINUE
    assert report(bad, 10, 0.1) == TrialScheduler.STOP
    # the next rung is at 30 (10 x reduction factor 3)
    assert report(good, 20, 0.9) == TrialScheduler.CONTINUE
    assert report(late, 10, 0.95) == TrialScheduler.CONTINUE
    assert report(late, 30, 0.95) == TrialScheduler.CONTINUE
    assert report(good, 30, 0.5) == TrialScheduler.STOP
    # a trial reaching the last epoch ends by itself (it must log its checkpoint first)
    assert report(late, 40, 0.95) == TrialScheduler.CONTINUE
    with pytest.raises(ConfigError, match="reduction_factor"):
        build_scheduler(config.replace(**{"tune.reduction_factor": 1}))


def test_asha_runs_to_the_most_epochs_a_searched_range_gives():
    config = load_config(
        None,
        [
            "train.epochs=2",
            "train.eval_every=1",
            "tune.space.train.epochs={type: randint, low: 2, high: 7}",
        ],
    )
    scheduler = build_scheduler(config)  # rungs at epochs 1, 2 and 4 (max 6, rf 2)
    scheduler.set_search_properties("score", "max")
    leader, follower = Trial("t", trial_id="a", stub=True), Trial("t", trial_id="b", stub=True)
    for trial in (leader, follower):
        scheduler.on_trial_add(None, trial)

    def report(trial: Trial, epoch: int, score: float) -> str:
        return scheduler.on_trial_result(None, trial, {"epoch": epoch, "score": score})

    assert [report(leader, e, 1.0) for e in (1, 2, 4, 6)] == [TrialScheduler.CONTINUE] * 4
    assert report(follower, 1, 1.0) == report(follower, 2, 1.0) == TrialScheduler.CONTINUE
    # judged again at epoch 4: past train.epochs=2, within the searched 2..6 epochs
    assert report(follower, 4, 0.0) == TrialScheduler.STOP


@pytest.mark.parametrize("name", SWEEP_CONFIGS)
def test_sweep_configs_load(name):
    config = load_config(REPO / "configs" / name)
    assert config.tune.space == Config().tune.space  # the loss knobs, written out
    build_scheduler(config)
    assert config.train.eval_every == 1  # ASHA needs the score at every epoch


def test_trial_table_columns_and_resource_line():
    keys = ["loss.margin", "train.seed", "data.synthetic.seed", "train.lr"]
    reporter = SweepReporter("mAP", keys, {"CPU": 4.0, "GPU": 2.0})
    # the searched keys, short where unambiguous; the optimised metric first, then the others
    assert reporter.columns["params"] == {
        "loss.margin": "margin",
        "train.seed": "train.seed",
        "data.synthetic.seed": "data.synthetic.seed",
        "train.lr": "lr",
    }
    assert list(reporter.columns["metrics"]) == ["mAP", "epoch", "rank1"]
    running = Trial("reid_trial", trial_id="a1", stub=True)
    running.set_status(Trial.RUNNING)
    pending = Trial("reid_trial", trial_id="b2", stub=True)
    assert reporter.resource_line([running, pending], {"CPU": 16.0, "GPU": 4.0}) == (
        "Resources: 1 trial(s) running, their Ray Train workers hold 4/16 CPUs, 2/4 GPUs"
    )


def plot_rows(space, n: int = 12) -> list[dict]:
    """Trial rows as the sweep writes them: the trial's value of every searched key."""
    flow = yaml.safe_dump(space, default_flow_style=True, sort_keys=False)
    config = load_config(None, [f"tune.space={flow}"])
    domains = search_space(config.tune)
    rng = np.random.default_rng(1)
    rows = []
    for i in range(n):
        trial = apply_params(config, {k: d.sample(random_state=rng) for k, d in domains.items()})
        rows.append(
            {
                "status": ("completed", "early_stopped", "error")[i % 3],
                "score": math.nan if i % 3 == 2 else float(rng.uniform()),
                **{k: config_value(trial, k) for k in domains},
            }
        )
    return config, rows


def overlapping_tick_labels(fig) -> list[tuple[str, str, str]]:
    """(panel, label, label) for every pair of drawn x tick labels whose boxes intersect."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    found = []
    for ax in fig.axes:
        labels = drawn_tick_labels(ax)
        boxes = [t.get_window_extent(renderer) for t in labels]
        for i in range(len(labels)):
            for j in range(i + 1, len(labels)):
                if boxes[i].overlaps(boxes[j]):
                    found.append((ax.get_xlabel(), labels[i].get_text(), labels[j].get_text()))
    return found


def test_plot_has_a_panel_per_searched_key():
    import matplotlib.pyplot as plt

    space = {
        "loss.margin": {"type": "uniform", "low": 0.1, "high": 1.0},
        "train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-3},  # within one decade
        "train.weight_decay": {"type": "loguniform", "low": 1e-7, "high": 1e-1},  # six
        "model.pooling": {"type": "choice", "values": ["avg", "gem"]},
        "loss.soft_margin": {"type": "choice", "values": [False, True]},
        "model.backbone": {
            "type": "choice",
            "values": ["resnet18", "seresnext50_32x4d", "resnetrs420", "resnet50_gn", "dla34"],
        },
        "train.epochs": {"type": "randint", "low": 2, "high": 60},
    }
    config, rows = plot_rows(space)
    fig = score_figure(rows, config.tune.space, "score", title="sweep x")
    try:
        panels = {ax.get_xlabel(): ax for ax in fig.axes}
        assert list(panels) == list(space)  # one panel per key, in the space's order
        assert panels["train.lr"].get_xscale() == "log"
        assert panels["train.weight_decay"].get_xscale() == "log"
        assert panels["loss.margin"].get_xscale() == "linear"
        fig.canvas.draw()
        # categories are labelled by their values, in order, at 0..n-1
        for key in ("model.pooling", "loss.soft_margin", "model.backbone"):
            ticks = [t.get_text() for t in panels[key].get_xticklabels()]
            expected = [str(v).lower() if isinstance(v, bool) else v for v in space[key]["values"]]
            assert ticks == expected
            assert list(panels[key].get_xticks()) == list(range(len(expected)))
        assert overlapping_tick_labels(fig) == []
        # each trial with a score is a point at its own value (errored trials have none)
        margin = panels["loss.margin"]
        plotted = sorted(x for c in margin.collections[:2] for x, _ in c.get_offsets())
        assert plotted == pytest.approx(
            sorted(r["loss.margin"] for r in rows if not math.isnan(r["score"]))
        )
        # the whole searched range is shown, not just where trials landed
        low, high = margin.get_xlim()
        assert low < 0.1 and high > 1.0
        pooling = panels["model.pooling"]
        xs = [x for c in pooling.collections for x, _ in c.get_offsets()]
        assert all(abs(x - round(x)) < 0.3 for x in xs)  # at (near) a category
    finally:
        plt.close(fig)


def test_resume_without_a_sweep_is_a_user_error(workspace, monkeypatch, capsys):
    import tune as tune_job  # jobs/tune.py

    import _cli

    name = f"no-such-sweep-{uuid.uuid4().hex[:6]}"
    monkeypatch.setattr(sys, "argv", ["tune.py", "--resume", "--set", f"name={name}"])
    with pytest.raises(SystemExit) as exit_info:
        _cli.run_main(tune_job.main)
    assert exit_info.value.code == 2
    assert "no sweep to resume" in capsys.readouterr().err


def make_placement_group_table_unavailable(monkeypatch) -> None:
    """As if Ray's private placement-group table were gone (a Ray upgrade renamed it); the
    rest of its GCS accessor (cluster resources...) keeps working."""
    from ray._private.state import state as gcs_state

    connect = gcs_state._connect_and_get_accessor

    class WithoutPlacementGroupTable:
        def __getattr__(self, name):
            if name == "get_placement_group_table":
                raise AttributeError(f"'GlobalStateAccessor' object has no attribute {name!r}")
            return getattr(connect(), name)

    monkeypatch.setattr(gcs_state, "_connect_and_get_accessor", WithoutPlacementGroupTable)


def cleanup_warnings(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "reid_platform.tuning" and "placement groups" in r.getMessage()
    ]


def test_placement_group_cleanup_unavailable_warns_once(monkeypatch, caplog):
    make_placement_group_table_unavailable(monkeypatch)
    with pytest.raises(PlacementGroupCleanupUnavailable, match="AttributeError"):
        remove_orphaned_placement_groups()
    callback = ReleaseStoppedTrainRuns(every_s=0.0)
    with caplog.at_level(logging.WARNING, logger="reid_platform.tuning"):
        for iteration in range(5):
            callback.on_step_begin(iteration, [])  # no exception reaches Tune
    (warning,) = cleanup_warnings(caplog)
    assert "ray-project/ray#54305" in warning and "AttributeError" in warning


@pytest.mark.slow
def test_sweep_end_to_end(ray_session, tiny_market, workspace, monkeypatch, caplog, capsys):
    """A sweep over loss knobs plus an augmentation and a pooling key; the placement-group
    clean-up is unavailable throughout (the sweep must finish anyway, with one warning)."""
    from mlflow.tracking import MlflowClient

    make_placement_group_table_unavailable(monkeypatch)
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
        "tune.space.data.augment.erasing_p": "{type: uniform, low: 0.0, high: 0.5}",
        "tune.space.model.pooling": "{type: choice, values: [avg, gem]}",
    }
    config = load_config(
        REPO / "configs" / "sweep_demo.yaml", [f"{k}={v}" for k, v in overrides.items()]
    )
    keys = list(config.tune.space)
    assert len(keys) == 7
    with caplog.at_level(logging.WARNING, logger="reid_platform.tuning"):
        result = run_sweep(config, progress=False)
    assert len(cleanup_warnings(caplog)) == 1

    # results CSV: one row per trial, a column per searched key holding the trial's value
    with result.results_csv.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    assert set(keys) <= set(rows[0])
    assert all(r["mlflow_run_id"] for r in rows)
    assert {r["status"] for r in rows} <= {"completed", "early_stopped"}
    for row in rows:
        assert 0.0 <= float(row["data.augment.erasing_p"]) <= 0.5
        assert row["model.pooling"] in ("avg", "gem")
        assert row["loss.soft_margin"] in ("True", "False")
        assert 1e-4 <= float(row["train.lr"]) <= 1e-3
    best_row = max(rows, key=lambda r: float(r["score"]))

    # best config: loadable as is, named after the sweep, the best trial's values
    assert result.best_config_path == workspace / "tune" / config.name / "best_config.yaml"
    best = load_config(result.best_config_path)
    assert best.name == f"{config.name}-best"
    assert best.model.pooling == best_row["model.pooling"]
    assert best.loss.soft_margin == (best_row["loss.soft_margin"] == "True")
    for key in ("loss.margin", "loss.id_weight", "loss.triplet_weight", "train.lr"):
        assert config_value(best, key) == pytest.approx(float(best_row[key]))
    assert best.data.augment.erasing_p == pytest.approx(float(best_row["data.augment.erasing_p"]))
    assert best.train.epochs == config.train.epochs  # the rest is the sweep's base config
    assert result.best_metrics["score"] == pytest.approx(float(best_row["score"]))

    # MLflow: the parent with the outputs, one child per trial with params and curves
    client = MlflowClient(result.tracking_uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"best_config.yaml", "results.csv", "score_vs_params.png"} <= artifacts
    assert parent.data.metrics["best_score"] == pytest.approx(result.best_metrics["score"])
    assert parent.data.tags["best.model.pooling"] == best_row["model.pooling"]
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'",
    )
    assert {c.info.run_id for c in children} == {r["mlflow_run_id"] for r in rows}
    for child in children:
        row = next(r for r in rows if r["mlflow_run_id"] == child.info.run_id)
        for key in keys:  # the trial's values, as results.csv has them
            assert child.data.params[key] == row[key], key
        assert child.data.tags["tune_status"] == row["status"]
        assert child.info.status == "FINISHED"
        curve = client.get_metric_history(child.info.run_id, "loss")
        # Workers log every epoch to MLflow themselves; a trial ASHA stops may have logged one
        # more epoch than Tune saw before it ended the trial.
        assert len(curve) >= int(row["epochs"]) >= 1
        assert len(curve) <= config.train.epochs
        assert not math.isnan(child.data.metrics["score"])

    # the console: the trial table has the metric and the searched keys; no TensorBoard
    out = capsys.readouterr().out
    header = [line for line in out.splitlines() if line.startswith("| Trial name")][-1]
    columns = {c.strip() for c in header.strip("|").split("|")}
    assert {"score", "rank1", "mAP", "erasing_p", "pooling", "margin", "lr"} <= columns
    assert "loss_id" not in columns
    assert "Resources: " in out and "Logical resource usage" not in out
    assert "tensorboard" not in out.lower()
    assert not list(Path(result.experiment_path).rglob("events.out.tfevents*"))

    # running it again resumes the (finished) experiment: same best config, no new trials
    again = run_sweep(config, progress=False)
    assert again.best_config_path == result.best_config_path
    assert again.parent_run_id == result.parent_run_id
    assert again.best_params == result.best_params
    assert Path(again.plot).is_file()


@pytest.mark.slow
def test_orphaned_placement_groups_are_released(ray_session):
    """The placement group of a dead actor (an ASHA-stopped trial's TrainController) is
    removed; one the driver holds is left alone."""

    from ray.util.placement_group import (
        placement_group,
        placement_group_table,
        remove_placement_group,
    )

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
