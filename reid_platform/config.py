"""One configuration object for every job: frozen dataclasses, YAML files, `--set` overrides.

The config is built once at the edge (a job's CLI), sent to Ray workers as a plain dict
(`to_dict`) and rebuilt there (`Config.from_dict`). Unknown keys and values of the wrong type
are errors that name the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
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


@dataclass(frozen=True)
class TuneConfig:
    """Ray Tune sweep of the loss knobs; see `reid_platform.tuning`."""

    num_samples: int = 8
    max_concurrent: int = 0  # 0 = derived from the cluster's resources
    search: Literal["auto", "optuna", "random"] = "auto"
    metric: str = "score"  # an evaluation metric, higher is better
    grace_period: int = 1  # ASHA: evaluations before a trial may be stopped
    reduction_factor: int = 2
    margin_min: float = 0.1
    margin_max: float = 1.0
    soft_margin_choice: bool = True
    id_weight_min: float = 0.05
    id_weight_max: float = 1.0
    triplet_weight_min: float = 0.05
    triplet_weight_max: float = 1.0
    lr_min: float = 1e-4
    lr_max: float = 1e-3
    search_lr: bool = True
    storage_path: str = ""  # Tune experiments + trial checkpoints; empty = <workspace>/tune


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

    # ---- conversions -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A plain, YAML- and JSON-serialisable dict (tuples become lists)."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        """Rebuild from a (possibly partial) nested dict; unknown keys are errors."""
        return _build(cls, data, prefix="")

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
    """
    parts = key.split(".")
    node, cls = data, Config
    for i, part in enumerate(parts[:-1]):
        hint = typing.get_type_hints(cls).get(part) if dataclasses.is_dataclass(cls) else None
        if _named_entry_type(hint) is not None:
            entries = node.get(part)
            node[part] = _set_named_entry(list(entries or []), parts[i + 1:], value, key)
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


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"key {prefix.rstrip('.') or '<root>'!r} must be a section (mapping)")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        allowed = ", ".join(f"{prefix}{name}" for name in fields)
        raise ConfigError(f"unknown config key {prefix + unknown[0]!r}; allowed here: {allowed}")
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
            raise ConfigError(f"{key}={value!r} must be a list of {item_type.__name__}")
        return tuple(_coerce(item_type, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: unsupported union type")  # not used by our dataclasses
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
