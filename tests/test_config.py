"""Config: YAML + --set overrides, type coercion, errors naming the key, round trips."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from reid_platform.config import (
    Config,
    ConfigError,
    DataConfig,
    LossConfig,
    TrainConfig,
    load_config,
    save_config,
)

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((REPO / "configs").glob("*.yaml"))


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_without_file():
    config = load_config()
    assert config == Config()
    assert config.model.backbone == "resnet50" and config.data.num_ids_per_batch == 16


def test_yaml_and_overrides(tmp_path):
    path = write_yaml(
        tmp_path / "c.yaml",
        {"name": "exp", "loss": {"margin": 0.5}, "train": {"epochs": 7, "lr": 0.001}},
    )
    config = load_config(
        path,
        [
            "train.epochs=2",  # override wins over the file
            "loss.id_weight=1",  # int -> float
            "train.lr=1e-3",  # YAML 1.1 reads this as a string: still a number
            "train.warmup_epochs=3.0",  # integral float -> int
            "loss.soft_margin=true",
            "train.milestones=[10, 20]",  # list -> tuple
            "train.use_gpu=false",  # YAML bool -> the "false" literal
            "model.pretrained=",  # empty value -> empty string
            "tracking.run_name=123",  # number -> string
            "data.augment.flip_p=0",
        ],
    )
    assert config.name == "exp"
    assert config.train.epochs == 2 and isinstance(config.train.epochs, int)
    assert config.loss.margin == 0.5  # from the file
    assert config.loss.id_weight == 1.0 and isinstance(config.loss.id_weight, float)
    assert config.train.lr == pytest.approx(1e-3) and isinstance(config.train.lr, float)
    assert config.train.warmup_epochs == 3 and isinstance(config.train.warmup_epochs, int)
    assert config.loss.soft_margin is True
    assert config.train.milestones == (10, 20)
    assert config.train.use_gpu == "false"
    assert config.model.pretrained == ""
    assert config.tracking.run_name == "123"
    assert config.data.augment.flip_p == 0.0


def test_single_milestone_becomes_tuple():
    assert load_config(None, ["train.milestones=30"]).train.milestones == (30,)


@pytest.mark.parametrize(
    "override,key,value",
    [
        ("train.amp=on", "amp", "on"),  # YAML 1.1 reads on/off/yes/no as bools
        ("train.amp=off", "amp", "off"),
        ("train.amp=auto", "amp", "auto"),
        ("train.use_gpu=true", "use_gpu", "true"),
        ("train.use_gpu=no", "use_gpu", "false"),
    ],
)
def test_yaml_bools_map_back_to_literals(tmp_path, override, key, value):
    assert getattr(load_config(None, [override]).train, key) == value
    _, raw = override.split("=")
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  {key}: {raw}\n")  # unquoted in a file too
    config = load_config(path)
    assert getattr(config.train, key) == value
    assert load_config(save_config(config, tmp_path / "saved.yaml")) == config


def test_unknown_key_names_key_and_allowed_keys():
    with pytest.raises(ConfigError, match=r"'train\.epochz'") as info:
        load_config(None, ["train.epochz=3"])
    message = str(info.value)
    for allowed in ("train.epochs", "train.lr", "train.swa_epochs"):
        assert allowed in message
    with pytest.raises(ConfigError, match=r"'nosuch'.*allowed here: .*data"):
        Config.from_dict({"nosuch": 1})


def test_unknown_key_in_yaml_file(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"model": {"backbon": "resnet18"}})
    with pytest.raises(ConfigError, match=r"'model\.backbon'.*model\.backbone"):
        load_config(path)


@pytest.mark.parametrize(
    "override,key",
    [
        ("train.epochs=abc", "train.epochs"),
        ("train.epochs=2.5", "train.epochs"),
        ("train.epochs=true", "train.epochs"),
        ("loss.margin=big", "loss.margin"),
        ("loss.margin=true", "loss.margin"),
        ("loss.soft_margin=1", "loss.soft_margin"),
        ("model.backbone=[a, b]", "model.backbone"),
        ("train.milestones=abc", "train.milestones"),
        ("train.milestones=[10, x]", r"train.milestones\[1\]"),
        ("data=3", "data"),
    ],
)
def test_wrong_type_names_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


@pytest.mark.parametrize(
    "override,choices",
    [
        ("model.pooling=minmax", "['avg', 'gem', 'max', 'netvlad']"),
        ("model.head=softmax", "['linear', 'cosface', 'arcface']"),
        ("loss.distance=l1", "['euclidean', 'cosine']"),
        ("data.format=coco", "'market1501'"),
        ("train.use_gpu=maybe", "'auto', 'true', 'false'"),
    ],
)
def test_literal_choices(override, choices):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=key) as info:
        load_config(None, [override])
    assert "not allowed" in str(info.value) and choices in str(info.value)


def test_section_replaced_by_value():
    with pytest.raises(ConfigError, match="'loss'"):
        load_config(None, ["loss=1", "loss.margin=0.2"])


def test_bad_override_syntax_and_files(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.epochs"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listing)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == Config()


def non_default_config() -> Config:
    return Config(
        name="round",
        data=DataConfig(
            format="csv",
            height=64,
            augment=dataclasses.replace(DataConfig().augment, channel_exchange_p=0.3),
        ),
        loss=LossConfig(soft_margin=True, distance="cosine", center_weight=0.01),
        train=TrainConfig(milestones=(5, 9), scheduler="multistep", lr=1e-4, use_gpu="false"),
    )


def test_to_dict_from_dict_round_trip():
    config = non_default_config()
    data = config.to_dict()
    assert data["train"]["milestones"] == [5, 9]  # plain lists
    json.dumps(data)  # JSON-serialisable (sent to Ray workers)
    assert Config.from_dict(data) == config
    assert Config.from_dict({}) == Config()
    assert Config.from_dict({"loss": {"margin": 0.7}}).loss == LossConfig(margin=0.7)


def test_save_load_round_trip(tmp_path):
    config = non_default_config()
    path = save_config(config, tmp_path / "nested" / "resolved.yaml")
    assert path.is_file()
    assert load_config(path) == config


def test_replace_and_flat():
    config = Config().replace(**{"loss.margin": 0.5, "train.epochs": 3})
    assert config.loss.margin == 0.5 and config.train.epochs == 3
    with pytest.raises(ConfigError, match="loss.margn"):
        Config().replace(**{"loss.margn": 0.5})
    flat = config.flat()
    assert flat["loss.margin"] == 0.5 and flat["data.augment.flip_p"] == 0.5
    assert not any(isinstance(v, dict) for v in flat.values())


def test_experiment_name():
    assert Config(name="x").experiment_name == "x"
    assert load_config(None, ["name=x", "tracking.experiment=y"]).experiment_name == "y"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.name for p in CONFIG_FILES])
def test_shipped_configs_load(path):
    config = load_config(path)
    assert config.name and config != Config()
    # the file names only known keys, so it survives a save/load round trip too
    assert Config.from_dict(config.to_dict()) == config


def test_every_shipped_config_is_documented():
    readme = (REPO / "README.md").read_text()
    undocumented = [p.name for p in CONFIG_FILES if f"configs/{p.name}" not in readme]
    assert {p.name for p in CONFIG_FILES} >= {"demo.yaml", "market1501_bot.yaml"}
    assert not undocumented, f"configs missing from the README: {undocumented}"


# The published settings each recipe config claims (RECIPE.md; Luo et al. 2019 for BoT).
RECIPES = {
    "market1501_bot.yaml": {
        "model.backbone": "resnet50", "model.last_stride": 1, "data.height": 256,
        "data.width": 128, "data.num_ids_per_batch": 16, "data.num_instances": 4,
        "data.augment.flip_p": 0.5, "data.augment.pad": 10, "data.augment.erasing_p": 0.5,
        "loss.margin": 0.3, "loss.label_smoothing": 0.1, "loss.center_weight": 0.0005,
        "loss.center_lr": 0.5, "loss.id_weight": 1.0, "loss.triplet_weight": 1.0,
        "train.optimizer": "adam", "train.lr": 3.5e-4, "train.weight_decay": 5e-4,
        "train.warmup_epochs": 10, "train.warmup_factor": 0.01, "train.epochs": 120,
    },
    "market1501_competition.yaml": {
        "loss.id_weight": 0.1, "loss.triplet_weight": 0.9, "model.pooling": "gem",
        "data.height": 256, "data.width": 128,
    },
    # fast-reid configs/Market1501/mgn_R50-ibn.yml (Base-MGN.yml, Base-SBS.yml)
    "market1501_mgn.yaml": {
        "model.arch": "mgn", "model.backbone": "resnet50", "model.ibn": "a",
        "model.parts": ["1", "2", "3"], "model.part_dim": 256, "model.pooling": "max",
        "data.height": 384, "data.width": 128, "data.num_instances": 16,
        "loss.soft_margin": True, "loss.label_smoothing": 0.1, "train.epochs": 60,
        "train.lr": 3.5e-4, "train.weight_decay": 5e-4, "train.freeze_backbone_iters": 1000,
    },
    # fast-reid configs/Market1501/bagtricks_R50-ibn.yml (Base-bagtricks.yml)
    "market1501_ibn.yaml": {
        "model.arch": "bot", "model.backbone": "resnet50", "model.ibn": "a",
        "model.last_stride": 1, "data.height": 256, "data.width": 128,
        "train.scheduler": "multistep", "train.milestones": [40, 90], "train.epochs": 120,
        "loss.margin": 0.3,
    },
    # TransReID configs/Market/vit_base.yml with STRIDE_SIZE [12, 12]
    "market1501_vit.yaml": {
        "model.backbone": "vit_base_patch16_224", "model.patch_stride": 12,
        "data.height": 256, "data.width": 128, "train.optimizer": "sgd", "train.lr": 0.008,
        "train.weight_decay": 1e-4, "train.epochs": 120, "loss.soft_margin": True,
        "loss.label_smoothing": 0.0,
    },
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_configs_hold_the_published_settings(name):
    flat = load_config(REPO / "configs" / name).flat()
    wrong = {k: (flat[k], v) for k, v in RECIPES[name].items() if flat[k] != v}
    assert not wrong, f"{name}: (value, published) {wrong}"


@pytest.mark.parametrize(
    "override,suggestion",
    [
        ("train.epoch=3", "did you mean 'train.epochs'?"),
        ("model.backbon=resnet18", "did you mean 'model.backbone'?"),
        ("data.augment.erasing=0.1", "did you mean 'data.augment.erasing_p'?"),
        ("trian.epochs=3", "did you mean 'train'?"),
    ],
)
def test_unknown_key_suggests_the_closest_one(override, suggestion):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert suggestion in str(info.value)
    assert "allowed here" in str(info.value)  # the full list is still there


def test_unknown_key_without_a_close_match_suggests_nothing():
    with pytest.raises(ConfigError, match="unknown config key 'train.zzzzzz'") as info:
        load_config(None, ["train.zzzzzz=1"])
    assert "did you mean" not in str(info.value)


def test_mapping_field_holds_dataclasses_keyed_by_dotted_names(tmp_path):
    from reid_platform.config import Distribution

    path = write_yaml(
        tmp_path / "c.yaml",
        {
            "tune": {
                "space": {
                    "loss.margin": {"type": "uniform", "low": 0, "high": "1e-1"},
                    "model.pooling": {"type": "choice", "values": ["avg", "gem"]},
                    "train.lr": None,  # null: not an entry
                }
            }
        },
    )
    space = load_config(path).tune.space
    assert space == {
        "loss.margin": Distribution("uniform", low=0.0, high=0.1),
        "model.pooling": Distribution("choice", values=("avg", "gem")),
    }
    assert isinstance(space["loss.margin"].low, float)  # int -> float, as for any float key
    assert space["loss.margin"].q is None  # an optional field left out


@pytest.mark.parametrize(
    "space,message",
    [
        ("3", "'tune.space'=3 must be a mapping"),
        ("{1: {type: uniform, low: 0, high: 1}}", "tune.space: key 1 must be a string"),
        ("{loss.margin: 0.5}", "'tune.space.loss.margin' must be a section"),
        ("{loss.margin: {type: uniform, low: x, high: 1}}", "tune.space.loss.margin.low='x'"),
        ("{loss.margin: {low: 0, high: 1}}", "tune.space.loss.margin.type is required"),
        ("{model.pooling: {type: choice, values: [{a: 1}]}}", r"values\[0\].*number, string"),
        ("{model.pooling: {type: choice, values: avg}}", "values='avg' must be a list"),
    ],
)
def test_mapping_field_errors_name_the_entry(space, message):
    with pytest.raises(ConfigError, match=message.replace("'tune.space'", "tune.space")):
        load_config(None, [f"tune.space={space}"])


def test_overrides_reach_into_a_mapping_field(tmp_path):
    path = write_yaml(
        tmp_path / "c.yaml",
        {"tune": {"space": {"loss.margin": {"type": "uniform", "low": 0.1, "high": 0.5}}}},
    )
    config = load_config(
        path,
        [
            "tune.space.loss.margin.high=0.9",  # one field of an entry
            "tune.space.train.milestones={type: choice, values: [[10, 20], [30]]}",  # an entry
        ],
    )
    assert config.tune.space["loss.margin"].high == 0.9
    assert config.tune.space["loss.margin"].low == 0.1  # the rest of the entry stays
    assert config.tune.space["train.milestones"].values == ((10, 20), (30,))  # lists -> tuples
    # Config.replace takes the same paths
    replaced = config.replace(**{"tune.space.loss.margin": None})
    assert list(replaced.tune.space) == ["train.milestones"]
    with pytest.raises(ConfigError, match="not a mapping"):
        load_config(None, ["tune.space=3", "tune.space.loss.margin.high=1"])


def test_mapping_field_round_trips_compactly(tmp_path):
    config = load_config(
        None,
        [
            "tune.space.train.milestones={type: choice, values: [[10, 20], [30]]}",
            "tune.space.data.augment.pad={type: quniform, low: 0, high: 12, q: 4}",
        ],
    )
    data = config.to_dict()
    # a distribution lists only the fields it uses
    assert data["tune"]["space"]["loss.margin"] == {"type": "uniform", "low": 0.1, "high": 1.0}
    assert data["tune"]["space"]["train.milestones"] == {
        "type": "choice",
        "values": [[10, 20], [30]],
    }
    json.dumps(data)
    assert Config.from_dict(data) == config
    assert load_config(save_config(config, tmp_path / "saved.yaml")) == config
    flat = config.flat()
    assert flat["tune.space.data.augment.pad.q"] == 4.0
    assert flat["tune.space.loss.margin.type"] == "uniform"


def test_a_checkpoint_config_from_before_tune_space_still_loads():
    """Checkpoints store their config; one written before `tune.space` holds the old sweep
    keys, which say nothing about the model: it still loads (a config file with them does not)."""
    saved = Config().to_dict()
    saved["tune"] = {**saved["tune"], "margin_min": 0.1, "margin_max": 0.5, "search_lr": False}
    del saved["tune"]["space"]
    config = Config.from_saved(saved)
    assert config.model == Config().model and config.tune.space == Config().tune.space
    with pytest.raises(ConfigError, match="tune.margin_min.*replaced by tune.space"):
        Config.from_dict(saved)
