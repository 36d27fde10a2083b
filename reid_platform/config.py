"""One configuration object for every job: frozen dataclasses, YAML files, `--set` overrides.

The config is built once at the edge (a job's CLI), sent to Ray workers as a plain dict
(`to_dict`) and rebuilt there (`Config.from_dict`). Unknown keys and values of the wrong type
are errors that name the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration key or value is not allowed; the message names the key."""


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the synthetic dataset generated on first use (`data.format: synthetic`)."""

    num_train_ids: int = 60
    num_test_ids: int = 40
    num_cameras: int = 4
    min_images_per_camera: int = 1  # images of an identity per camera it appears in
    max_images_per_camera: int = 3
    height: int = 128
    width: int = 64
    seed: int = 0


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation; a probability of 0 turns a transform off."""

    flip_p: float = 0.5
    pad: int = 10
    color_jitter_p: float = 0.0
    brightness_contrast_p: float = 0.0
    erasing_p: float = 0.5
    random_patch_p: float = 0.0
    random_shift_p: float = 0.0
    channel_exchange_p: float = 0.0


@dataclass(frozen=True)
class DataConfig:
    """Where the images are and how batches are drawn."""

    root: str = ""  # empty = the synthetic dataset under the workspace
    format: Literal[
        "synthetic", "market1501", "dukemtmc", "msmt17", "cuhk03", "veri776", "vehicleid",
        "folder", "csv",
    ] = "synthetic"
    # Cross-domain evaluation: train on root/format, take query and gallery from eval_root
    # (auto = the format detected from what is on disk there).
    eval_root: str = ""
    eval_format: Literal[
        "auto", "market1501", "dukemtmc", "msmt17", "cuhk03", "veri776", "vehicleid",
        "folder", "csv",
    ] = "auto"
    height: int = 256
    width: int = 128
    num_ids_per_batch: int = 16  # P
    num_instances: int = 4  # K
    drop_single_image_ids: bool = True
    oversample_min: int = 0  # ids with oversample_min..oversample_max images are oversampled
    oversample_max: int = 0
    oversample_p: float = 0.0
    # Under-sampling: an identity contributes at most this many images per epoch, a new random
    # subset every epoch (0 = all; else >= num_instances).
    max_images_per_id: int = 0
    test_fraction: float = 0.5  # folder without explicit splits: share of ids held out
    allow_outside_root: bool = False  # csv: accept manifest paths leading outside its folder
    csv_encoding: str = "utf-8"  # csv: the manifest's text encoding (a UTF-8 BOM is accepted)
    cuhk03_variant: Literal["labeled", "detected"] = "detected"  # cuhk03: which boxes
    msmt17_include_val: bool = False  # msmt17: also train on list_val.txt
    vehicleid_test_size: int = 800  # vehicleid: test_list_<size>.txt (800, 1600, 2400)
    vehicleid_trial: int = 0  # vehicleid: which random one-image-per-id gallery draw
    loader_workers: int = 2
    cache: Literal["none", "ram"] = "none"  # ram: decode + resize each train image once
    eval_batch_size: int = 128
    # More training sources: CSV manifests (e.g. pseudo-label files) or dataset trees whose
    # training rows join the training split, their ids kept apart from the others.
    extra_train: tuple[str, ...] = ()
    unlabelled: str = ""  # images without labels, for jobs/self_train.py
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture, backbone, pooling, BNNeck and classifier head."""

    arch: Literal["bot", "mgn", "pcb"] = "bot"  # see reid_platform.models.ARCHS
    backbone: str = "resnet50"  # any timm model name
    # "" = random init; a local weights file (timm/torchvision state dict); or "timm" = timm's
    # hub cache (downloads when online; HF_HUB_OFFLINE=1 reads a cache prepared beforehand)
    pretrained: str = ""
    last_stride: int = 1  # ResNets only: 1 keeps 16x8 maps at 256x128
    pooling: Literal["avg", "gem", "max", "netvlad"] = "avg"
    gem_p: float = 3.0
    gem_learnable: bool = False
    netvlad_clusters: int = 64  # K; NetVLAD projects to embedding_dim (0 = backbone width)
    head: Literal["linear", "cosface", "arcface"] = "linear"
    head_scale: float = 30.0
    head_margin: float = 0.35
    embedding_dim: int = 0  # 0 = backbone width; else a linear reduction before the BNNeck
    ibn: Literal["none", "a", "b"] = "none"  # IBN-Net variant of a timm ResNet-family backbone
    non_local: tuple[int, ...] = ()  # non-local blocks per ResNet stage, e.g. [0, 2, 3, 0]
    patch_stride: int = 0  # ViT patch stride (0 = patch size; < patch size = overlapping)
    parts: tuple[str, ...] = ("1", "2", "3")  # MGN branches: N stripes, or RxC (e.g. 2x2)
    part_dim: int = 256  # MGN / PCB: width of every reduced global or part feature
    pcb_stripes: int = 6
    pcb_rpp: bool = False  # PCB refined part pooling


@dataclass(frozen=True)
class ExtraLoss:
    """One metric-learning loss of `loss.extra`, from pytorch-metric-learning.

    Each applies to the pre-BNNeck features of every metric branch (summed over branches),
    with embeddings gathered from every DDP rank before mining. Only the fields of its `name`
    are used.
    """

    name: Literal["contrastive", "circle", "multi_similarity", "xbm"]
    weight: float = 1.0
    # contrastive (Hadsell et al. 2006) on L2-normalised features
    pos_margin: float = 0.0
    neg_margin: float = 1.0
    # circle (Sun et al. 2020); m 0.25 and gamma 128 are the paper's re-ID setting
    margin: float = 0.25
    scale: float = 128.0
    # multi-similarity (Wang et al. 2019), the paper's alpha 2, beta 50, lambda 0.5 (base)
    alpha: float = 2.0
    beta: float = 50.0
    base: float = 0.5
    miner_epsilon: float = 0.1  # its pair miner (0 = no mining)
    # xbm: cross-batch memory (Wang et al. 2020) around `inner` (one of the losses above)
    inner: Literal["contrastive", "circle", "multi_similarity"] = "contrastive"
    memory_size: int = 1024


@dataclass(frozen=True)
class LossConfig:
    """Loss terms and their weights (total = id * ID + triplet * tri + center * center
    + the `extra` terms' weights times their values)."""

    id_weight: float = 1.0
    triplet_weight: float = 1.0
    center_weight: float = 0.0
    margin: float = 0.3
    soft_margin: bool = False
    distance: Literal["euclidean", "cosine"] = "euclidean"
    label_smoothing: float = 0.1
    center_lr: float = 0.5
    # e.g. [{name: circle, weight: 1.0}]; `--set loss.extra.circle.weight=0.5` sets (or adds)
    # the entry named circle
    extra: tuple[ExtraLoss, ...] = ()


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, schedule, SWA, evaluation cadence and Ray Train scaling."""

    epochs: int = 120
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 3.5e-4
    weight_decay: float = 5e-4
    momentum: float = 0.9
    scheduler: Literal["cosine", "multistep"] = "cosine"
    warmup_epochs: int = 10
    warmup_factor: float = 0.01
    milestones: tuple[int, ...] = (40, 70)
    gamma: float = 0.1
    min_lr_factor: float = 0.0  # cosine floor as a fraction of lr
    swa_epochs: int = 0  # average the weights of the last N epochs (0 = off)
    swa_lr_factor: float = 0.5  # constant lr (fraction of lr) during the SWA epochs
    freeze_backbone_iters: int = 0
    grad_clip: float = 0.0  # max gradient norm, 0 = off
    # mixed precision: auto = fp16 on GPU; on = fp16; bf16 (no loss scaling); off
    amp: Literal["auto", "on", "fp16", "bf16", "off"] = "auto"
    channels_last: Literal["auto", "on", "off"] = "auto"  # auto = on for CNNs on GPU
    compile: bool = False  # torch.compile the model (falls back with a warning)
    eval_every: int = 10
    batches_per_epoch: int = 0  # 0 = as many PK batches as the data gives
    num_workers: int = 2
    use_gpu: Literal["auto", "true", "false"] = "auto"
    cpus_per_worker: float = 1.0
    max_failures: int = 0
    seed: int = 0
    resume_from: str = ""  # a checkpoint to continue from (its epoch and optimizer)
    storage_path: str = ""  # Ray Train results/checkpoints; empty = <workspace>/ray_results
    # (on a multi-node cluster: s3://..., gs://... or an NFS path every node mounts)
    log_every: int = 0  # print a progress line every N iterations (0 = once per epoch)


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow: the experiment defaults to the config's name."""

    experiment: str = ""
    run_name: str = ""
    tracking_uri: str = ""  # empty: $MLFLOW_TRACKING_URI, else SQLite under the workspace


DistributionType = Literal["uniform", "quniform", "loguniform", "qloguniform", "randint", "choice"]
# Keys a sweep cannot vary: they name the sweep, its MLflow experiment and its outputs.
FIXED_IN_A_SWEEP = ("name", "workspace", "tracking.", "tune.")


@dataclass(frozen=True)
class Distribution:
    """How a sweep draws one config key: `{type, low, high[, q]}` or `{type: choice, values}`.

    - `uniform`: a float in [low, high]; `loguniform`: the same on a log scale (0 < low);
    - `quniform` / `qloguniform`: as above, rounded to a multiple of `q`;
    - `randint`: an integer in [low, high) (high excluded, as in Ray Tune and numpy);
    - `choice`: one of `values` (any values the key accepts: strings, booleans, lists...).

    `TuneConfig` checks each distribution against the key it draws (see `check_search_space`).
    """

    type: DistributionType
    low: float | None = None
    high: float | None = None
    q: float | None = None
    values: tuple[Any, ...] = ()


def default_search_space() -> dict[str, Distribution]:
    """The loss knobs of the recipe: triplet margin (hard or soft), ID/triplet weights, lr."""
    return {
        "loss.margin": Distribution("uniform", low=0.1, high=1.0),
        "loss.soft_margin": Distribution("choice", values=(False, True)),
        "loss.id_weight": Distribution("uniform", low=0.05, high=1.0),
        "loss.triplet_weight": Distribution("uniform", low=0.05, high=1.0),
        "train.lr": Distribution("loguniform", low=1e-4, high=1e-3),
    }


@dataclass(frozen=True)
class TuneConfig:
    """Ray Tune sweep: `space` maps dotted config keys to distributions; see
    `reid_platform.tuning`."""

    num_samples: int = 8
    max_concurrent: int = 0  # 0 = derived from the cluster's resources
    search: Literal["auto", "optuna", "random"] = "auto"
    metric: str = "score"  # an evaluation metric, higher is better
    grace_period: int = 1  # ASHA: evaluations before a trial may be stopped
    reduction_factor: int = 2
    # e.g. {"loss.margin": {type: uniform, low: 0.1, high: 1.0}}; a YAML `tune.space` replaces
    # this default, `--set tune.space.<key>=...` adds to (or with null removes from) it.
    space: dict[str, Distribution] = field(default_factory=default_search_space)
    storage_path: str = ""  # Tune experiments + trial checkpoints; empty = <workspace>/tune

    def __post_init__(self) -> None:
        # Validated here, so a bad sweep fails when its config loads, before any trial starts.
        object.__setattr__(self, "space", check_search_space(self.space))


@dataclass(frozen=True)
class SelfTrainConfig:
    """Self-training rounds on `data.unlabelled`; see `reid_platform.pseudo`."""

    rounds: int = 3  # pseudo-labelling rounds after round 0
    epochs: int = 0  # training epochs per round; 0 = train.epochs
    method: Literal["dbscan", "kmeans", "link"] = "dbscan"
    distance: Literal["jaccard", "cosine"] = "jaccard"  # dbscan / link; kmeans uses features
    k1: int = 20  # k-reciprocal neighbourhood of the Jaccard distance (SpCL: 30)
    k2: int = 6  # local query expansion of the Jaccard distance
    knn: int = 0  # candidate pairs per image in the sparse distance graph; 0 = k1
    eps: float = 0.0  # DBSCAN radius; 0 = from the data (eps_pairs)
    eps_pairs: float = 6.0  # auto eps: mean of the N * eps_pairs smallest pair distances
    min_samples: int = 4  # DBSCAN: neighbours (itself included) that make a core image
    threshold: float = 0.5  # link: nearest neighbour kept when its distance is below this
    clusters: int = 0  # kmeans: number of pseudo identities (required for kmeans)
    min_cluster_size: int = 2  # smaller clusters are outliers (dropped)
    batch_size: int = 64  # images per forward pass when embedding
    out: str = ""  # round outputs; empty = <workspace>/self_train/<name>-<time>


@dataclass(frozen=True)
class Config:
    """Everything a job needs; `name` names the MLflow experiment and the output folders."""

    name: str = "demo"
    workspace: str = ""  # empty: $REID_PLATFORM_HOME, else ~/reid-platform
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    self_train: SelfTrainConfig = field(default_factory=SelfTrainConfig)

    # ---- conversions -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A plain, YAML- and JSON-serialisable dict (tuples become lists)."""
        data = _plain(dataclasses.asdict(self))
        # A distribution lists only the fields it uses: {type: uniform, low: 0.1, high: 1.0}.
        data["tune"]["space"] = {
            key: {name: v for name, v in dist.items() if v is not None and v != []}
            for key, dist in data["tune"]["space"].items()
        }
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        """Rebuild from a (possibly partial) nested dict; unknown keys are errors."""
        return _build(cls, data, prefix="")

    @classmethod
    def from_saved(cls, data: dict[str, Any]) -> Config:
        """Rebuild the config stored in a checkpoint. A checkpoint written before `tune.space`
        holds the old sweep keys: they say nothing about the model, so they are dropped
        rather than refused (a config file with them is still an error that shows the fix)."""
        tune = data.get("tune")
        if isinstance(tune, dict) and any(k in tune for k in _LEGACY_TUNE_KEYS):
            data = {**data, "tune": {k: v for k, v in tune.items()
                                     if k not in _LEGACY_TUNE_KEYS}}
        return cls.from_dict(data)

    def replace(self, **overrides: Any) -> Config:
        """A copy with dotted-key overrides, e.g. `cfg.replace(**{"loss.margin": 0.5})`."""
        data = self.to_dict()
        for key, value in overrides.items():
            _set_dotted(data, key, value)
        return Config.from_dict(data)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, for MLflow params."""
        out: dict[str, Any] = {}

        def walk(node: dict[str, Any], prefix: str) -> None:
            for key, value in node.items():
                if isinstance(value, dict):
                    walk(value, f"{prefix}{key}.")
                else:
                    out[f"{prefix}{key}"] = value

        walk(self.to_dict(), "")
        return out

    @property
    def workspace_dir(self) -> Path:
        return resolve_workspace(self.workspace)

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or self.name


def resolve_workspace(workspace: str = "") -> Path:
    """The absolute workspace directory: config value, else $REID_PLATFORM_HOME, else ~.

    Absolute because `ray job submit` runs the job in a temporary copy of the working dir.
    """
    raw = workspace or os.environ.get("REID_PLATFORM_HOME") or "~/reid-platform"
    path = Path(raw).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults) and apply `key=value` overrides.

    Args:
        path: YAML file with a nested mapping of config sections; None = built-in defaults.
        overrides: strings like `train.epochs=2` or `loss.margin=0.5`; values parse as YAML.

    Raises:
        ConfigError: the file is missing or malformed, or a key/value is not allowed.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {path} must hold a mapping, got {type(loaded).__name__}"
            )
        data = loaded
    for key, value in parse_overrides(overrides or []).items():
        _set_dotted(data, key, value)
    return Config.from_dict(data)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key=value` strings (values parse as YAML) -> {dotted key: value}, in order.

    `Config.replace(**parse_overrides(items))` applies them to a config in hand.

    Raises:
        ConfigError: an item without `=`.
    """
    values: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.epochs=2)")
        key, raw = item.split("=", 1)
        try:
            values[key.strip()] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            values[key.strip()] = raw
    return values


def save_config(config: Config, path: str | Path) -> Path:
    """Write the resolved config as YAML (loadable again by `load_config`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return path


def config_key_type(key: str) -> Any:
    """The type annotation of a dotted leaf key, e.g. `int` for "train.epochs", `float` for
    "loss.extra.circle.weight" (a field of the named entry circle).

    Raises:
        ConfigError: the key does not exist (with the closest key, if any) or is a section.
    """
    cls: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            prefix = ".".join(parts[:i])
            suggestion = _did_you_mean(part, list(hints), f"{prefix}." if prefix else "")
            raise ConfigError(f"{key!r} is not a config key{suggestion}")
        cls = hints[part]
        entry = _named_entry_type(cls)
        if entry is not None and i < len(parts) - 1:
            # `loss.extra.<name>.<field>`: one field of a named entry
            if len(parts) != i + 3:
                raise ConfigError(f"{key!r}: expected {'.'.join(parts[:i + 1])}.<entry name>"
                                  ".<field>")
            fields = typing.get_type_hints(entry)
            if parts[-1] not in fields or parts[-1] == "name":
                prefix = ".".join(parts[:-1]) + "."
                raise ConfigError(f"{key!r} is not a config key"
                                  f"{_did_you_mean(parts[-1], list(fields), prefix)}")
            return fields[parts[-1]]
        if dataclasses.is_dataclass(cls) and i == len(parts) - 1:
            raise ConfigError(
                f"{key!r} is a config section, not a value; its keys: "
                + ", ".join(_leaf_hints(cls, f"{key}."))
            )
    return cls


def check_search_space(space: Mapping[str, Distribution]) -> dict[str, Distribution]:
    """Check every searched key and its distribution against the config.

    Returns:
        The space with each choice's values converted to the key's type (e.g. YAML `on` for
        `train.amp` becomes "on", a list for `train.milestones` a tuple).

    Raises:
        ConfigError: naming `tune.space.<key>`: an unknown key, a key a sweep cannot vary,
            a malformed range, or values the key does not accept.
    """
    checked = {}
    for key, dist in space.items():
        where = f"tune.space.{key}"
        if not isinstance(dist, Distribution):
            raise ConfigError(
                f"{where} must be a distribution like {{type: uniform, low: 0.1, high: 1.0}} "
                f"or {{type: choice, values: [a, b]}}, got {dist!r}"
            )
        try:
            hint = config_key_type(key)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        if any(key == fixed or key.startswith(fixed) for fixed in FIXED_IN_A_SWEEP):
            raise ConfigError(
                f"{where}: {key} cannot be searched (name, workspace, tracking.* and tune.* "
                "are the same for every trial of a sweep)"
            )
        checked[key] = _check_distribution(where, key, hint, dist)
    return checked


# ---- internals ---------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set `a.b.c` in the nested dict `data` (rooted at `Config`).

    Under a list of named entries (`loss.extra`) the next part names an entry:
    `loss.extra.circle.weight=0.5` sets that field of the entry named circle (adding the entry
    if there is none), `loss.extra.circle=null` removes it.

    Under a mapping field (`tune.space`) the rest of the key is one entry (a dotted config
    key), or an entry and one of its fields: `tune.space.loss.margin.high`. A mapping that
    `data` does not hold yet starts from the field's default, so an override adds to it.
    """
    parts = key.split(".")
    node, cls = data, Config
    for i, part in enumerate(parts[:-1]):
        hint = _field_hint(cls, part)
        if _named_entry_type(hint) is not None:
            entries = node.get(part)
            node[part] = _set_named_entry(list(entries or []), parts[i + 1:], value, key)
            return
        if typing.get_origin(hint) is dict:
            if part not in node:
                node[part] = _plain_default(cls, part)
            _set_entry(node[part], parts[i + 1 :], value, typing.get_args(hint)[1], key)
            return
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"key {key!r}: {part!r} is a value, not a section")
        node = child
        cls = hint if dataclasses.is_dataclass(hint) else None
    node[parts[-1]] = value


def _named_entry_type(hint: Any) -> type | None:
    """The entry dataclass of a `tuple[Entry, ...]` field whose entries have a `name`."""
    if typing.get_origin(hint) is not tuple:
        return None
    item = typing.get_args(hint)[0]
    if dataclasses.is_dataclass(item) and "name" in {f.name for f in dataclasses.fields(item)}:
        return item
    return None


def _set_named_entry(entries: list[Any], rest: list[str], value: Any, key: str) -> list[Any]:
    """`entries` with the entry named rest[0] set (rest = [name] or [name, field])."""
    name = rest[0]
    if len(rest) > 2:
        raise ConfigError(f"key {key!r}: expected <list>.<entry name>[.<field>]")
    for entry in entries:
        if not isinstance(entry, dict):
            raise ConfigError(f"key {key!r}: every entry must be a mapping, got {entry!r}")
    index = next((i for i, e in enumerate(entries) if e.get("name") == name), None)
    if len(rest) == 1:  # the whole entry
        if index is not None:
            entries.pop(index)
        if value is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"{key}={value!r} must be a mapping of the entry's fields")
            entries.insert(len(entries) if index is None else index, {**value, "name": name})
        return entries
    if index is None:
        entries.append({"name": name})
        index = len(entries) - 1
    entries[index] = {**entries[index], rest[1]: value}
    return entries


def _field_hint(cls: Any, name: str) -> Any:
    return typing.get_type_hints(cls).get(name) if dataclasses.is_dataclass(cls) else None


def _plain_default(cls: Any, name: str) -> dict[str, Any]:
    """The default of the mapping field `cls.name`, as plain dicts (what YAML would give)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return _plain(
        {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in default.items()}
    )


def _set_entry(mapping: Any, rest: list[str], value: Any, item: Any, key: str) -> None:
    """Set `rest` in a mapping field: the whole entry, or one field of a dataclass entry."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"key {key!r}: {key.removesuffix('.' + '.'.join(rest))} is not a mapping")
    item_fields = (
        [f.name for f in dataclasses.fields(item)] if dataclasses.is_dataclass(item) else []
    )
    if len(rest) == 1 or rest[-1] not in item_fields:
        mapping[".".join(rest)] = value
        return
    name = ".".join(rest[:-1])
    if mapping.get(name) is None:
        mapping[name] = {}
    if not isinstance(mapping[name], dict):
        raise ConfigError(f"key {key!r}: {name!r} is {mapping[name]!r}, not a mapping")
    mapping[name][rest[-1]] = value


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"key {prefix.rstrip('.') or '<root>'!r} must be a section (mapping)")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        explain = _REMOVED_KEYS.get(cls)
        error = explain(data, prefix) if explain else None
        if error is not None:
            raise error
        allowed = ", ".join(f"{prefix}{name}" for name in fields)
        raise ConfigError(
            f"unknown config key {prefix + unknown[0]!r}"
            f"{_did_you_mean(unknown[0], list(fields), prefix)}; "
            f"allowed here: {allowed}"
        )
    missing = [
        name
        for name, f in fields.items()
        if f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
        and name not in data
    ]
    if missing:
        raise ConfigError(f"{prefix}{missing[0]} is required")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{key}.")
    if origin is Literal:
        allowed = typing.get_args(hint)
        # YAML 1.1 reads true/on/yes and false/off/no as bools: map back to the literal.
        if isinstance(value, bool):
            spellings = ("true", "on", "yes") if value else ("false", "off", "no")
            value = next((s for s in spellings if s in allowed), value)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of {list(allowed)}")
        return value
    if origin is tuple:
        (item_type, _) = typing.get_args(hint)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            of = "" if item_type is Any else f" of {item_type.__name__}"
            raise ConfigError(f"{key}={value!r} must be a list{of}")
        return tuple(_coerce(item_type, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        (_, item_type) = typing.get_args(hint)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}={value!r} must be a mapping")
        out = {}
        for name, item in value.items():
            if not isinstance(name, str):
                raise ConfigError(f"{key}: key {name!r} must be a string")
            if item is not None:  # `--set tune.space.train.lr=null` removes an entry
                out[name] = _coerce(item_type, item, f"{key}.{name}")
        return out
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if len(args) != 2 or type(None) not in args:
            raise ConfigError(f"{key}: unsupported union type")  # only `X | None` is used
        if value is None:
            return None
        return _coerce(next(a for a in args if a is not type(None)), value, key)
    if hint is Any:
        # choice values: any YAML scalar or list, checked against their key later
        if isinstance(value, (list, tuple)):
            return tuple(_coerce(Any, v, f"{key}[{i}]") for i, v in enumerate(value))
        if isinstance(value, (bool, int, float, str)):
            return value
        raise ConfigError(f"{key}={value!r} must be a number, string, boolean or list")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}={value!r} must be an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads `1e-3` (no dot) as a string: accept numeric strings.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} must be a number")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r} must be a string")
    raise ConfigError(f"{key}: unsupported type {hint}")


def _leaf_hints(cls: Any, prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            out.update(_leaf_hints(hint, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = hint
    return out


def _did_you_mean(name: str, candidates: list[str], prefix: str = "") -> str:
    """A hint like " (did you mean 'train.epochs'?)" for "epoch" among a section's keys, or
    "" when nothing is close."""
    close = difflib.get_close_matches(name, candidates, n=1)
    return f" (did you mean {prefix + close[0]!r}?)" if close else ""


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return f"one of {list(typing.get_args(hint))}"
    if typing.get_origin(hint) is tuple:
        return "a list"
    return {bool: "true or false", str: "a string", int: "an integer"}.get(hint, str(hint))


def _check_distribution(where: str, key: str, hint: Any, dist: Distribution) -> Distribution:
    """One entry of `tune.space` (see `check_search_space`)."""
    if dist.type == "choice":
        if (dist.low, dist.high, dist.q) != (None, None, None):
            raise ConfigError(f"{where}: a choice takes `values` only, not low/high/q")
        if not dist.values:
            raise ConfigError(f"{where}: a choice needs `values`, e.g. values: [a, b]")
        values = []
        for value in dist.values:
            try:
                values.append(_coerce(hint, value, key))
            except ConfigError as err:
                raise ConfigError(f"{where}: choice value {value!r} does not fit: {err}") from None
        typed = [(type(v), v) for v in values]
        if len(set(typed)) < len(typed):
            raise ConfigError(f"{where}: choice values {list(dist.values)} repeat a value")
        return dataclasses.replace(dist, values=tuple(values))
    example = f"{{type: {dist.type}, low: ..., high: ...{', q: ...' if 'q' in dist.type else ''}}}"
    if dist.values:
        raise ConfigError(f"{where}: {dist.type} takes low/high, not values (or use type: choice)")
    if dist.low is None or dist.high is None:
        raise ConfigError(f"{where}: {dist.type} needs low and high: {example}")
    if not dist.low < dist.high:
        raise ConfigError(f"{where}: low={dist.low:g} must be below high={dist.high:g}")
    if "log" in dist.type and dist.low <= 0:
        raise ConfigError(f"{where}: {dist.type} needs 0 < low, got low={dist.low:g}")
    if dist.type.startswith("q"):
        if dist.q is None or dist.q <= 0:
            raise ConfigError(f"{where}: {dist.type} needs a step q > 0: {example}")
        if not all(math.isclose(b / dist.q, round(b / dist.q)) for b in (dist.low, dist.high)):
            raise ConfigError(
                f"{where}: low={dist.low:g} and high={dist.high:g} must be multiples of "
                f"q={dist.q:g}"
            )
    elif dist.q is not None:
        raise ConfigError(f"{where}: q is for quniform/qloguniform, not {dist.type}")
    if dist.type == "randint" and not (dist.low.is_integer() and dist.high.is_integer()):
        raise ConfigError(f"{where}: randint needs integer low and high (high excluded)")
    if hint is float:
        return dist
    if hint is int:
        if dist.type == "randint" or (dist.q is not None and dist.q.is_integer()):
            return dist
        raise ConfigError(
            f"{where}: {key} is an integer; use {{type: randint, low: ..., high: ...}} (high "
            f"excluded) or quniform with an integer q, not {dist.type}"
        )
    raise ConfigError(
        f"{where}: {key} takes {_describe(hint)}, not numbers from a {dist.type} range; use "
        "{type: choice, values: [...]}"
    )


# The sweep ranges that `tune.space` replaced: old key stem -> (searched key, distribution,
# default low, default high).
_LEGACY_TUNE_RANGES = {
    "margin": ("loss.margin", "uniform", 0.1, 1.0),
    "id_weight": ("loss.id_weight", "uniform", 0.05, 1.0),
    "triplet_weight": ("loss.triplet_weight", "uniform", 0.05, 1.0),
    "lr": ("train.lr", "loguniform", 1e-4, 1e-3),
}
_LEGACY_TUNE_KEYS = (
    *(f"{name}_{end}" for name in _LEGACY_TUNE_RANGES for end in ("min", "max")),
    "soft_margin_choice",
    "search_lr",
)


def _legacy_tune_keys_error(data: Mapping[str, Any], prefix: str) -> ConfigError | None:
    """The error for a `tune` section written before `tune.space`: it shows the YAML that
    searches exactly what the old keys did."""
    legacy = [k for k in _LEGACY_TUNE_KEYS if k in data]
    if not legacy:
        return None
    entries: dict[str, dict[str, Any]] = {}
    for name, (key, kind, low, high) in _LEGACY_TUNE_RANGES.items():
        if name == "lr" and not data.get("search_lr", True):
            continue
        entries[key] = {
            "type": kind,
            "low": _as_number(data.get(f"{name}_min", low)),
            "high": _as_number(data.get(f"{name}_max", high)),
        }
        if name == "margin" and data.get("soft_margin_choice", True):
            entries["loss.soft_margin"] = {"type": "choice", "values": [False, True]}
    lines = ["tune:", "  space:"] + [
        f"    {key}: " + yaml.safe_dump(spec, default_flow_style=True, sort_keys=False).strip()
        for key, spec in entries.items()
    ]
    old = ", ".join(f"{prefix}{k}" for k in legacy)
    return ConfigError(
        f"{old}: these keys were replaced by {prefix}space, which maps any config key to a "
        "distribution; to search what they searched, remove them and write:\n\n" + "\n".join(lines)
    )


def _as_number(value: Any) -> Any:
    """A float when `value` reads as one (YAML 1.1 leaves `1e-4` a string), else as it is."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


# Sections whose removed keys get an error that shows how to write them now.
_REMOVED_KEYS = {TuneConfig: _legacy_tune_keys_error}
