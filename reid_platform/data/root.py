"""Where a config's images are, and the one call that reads them: `load_config_dataset`."""

from __future__ import annotations

import codecs
import logging
from pathlib import Path

from reid_platform.config import Config, ConfigError, DataConfig
from reid_platform.data.extra import merge_extra_train
from reid_platform.data.formats import ReidDataset, load_dataset

logger = logging.getLogger(__name__)


def synthetic_root(config: Config) -> Path:
    """The default folder of the synthetic dataset `config.data.synthetic` describes.

    One folder per parameter set, under the workspace, so training and evaluation of the same
    config find (or generate) the same tree.
    """
    s = config.data.synthetic
    return config.workspace_dir / "data" / (
        f"synthetic-{s.num_train_ids}-{s.num_test_ids}-{s.num_cameras}-"
        f"{s.min_images_per_camera}to{s.max_images_per_camera}-"
        f"{s.height}x{s.width}-seed{s.seed}"
    )


def check_data_config(data: DataConfig) -> None:
    """The rules between `data.*` keys that their types alone cannot say.

    Raises:
        ConfigError: naming the key, its value and what is allowed.
    """
    cap = data.max_images_per_id
    if cap < 0 or 0 < cap < data.num_instances:
        raise ConfigError(
            f"data.max_images_per_id={cap} must be 0 (off) or at least "
            f"data.num_instances={data.num_instances} (K images of an identity per batch)"
        )
    if not 0.0 <= data.test_fraction <= 1.0:
        raise ConfigError(f"data.test_fraction={data.test_fraction} must be in [0, 1]")
    if data.eval_format != "auto" and not data.eval_root:
        raise ConfigError(
            f"data.eval_format={data.eval_format} needs data.eval_root (the dataset to "
            "evaluate on; empty evaluates on data.root)"
        )
    if data.vehicleid_test_size < 1 or data.vehicleid_trial < 0:
        raise ConfigError(
            f"data.vehicleid_test_size={data.vehicleid_test_size} must be >= 1 (800, 1600, "
            f"2400) and data.vehicleid_trial={data.vehicleid_trial} >= 0"
        )
    try:
        codecs.lookup(data.csv_encoding)
    except LookupError:
        raise ConfigError(
            f"data.csv_encoding={data.csv_encoding!r} is not a known text encoding "
            "(e.g. utf-8, latin-1, cp1252)"
        ) from None


def resolve_data_root(config: Config, progress: bool = True) -> Config:
    """The config with absolute `data.root` (and `data.eval_root`), generating the synthetic
    dataset if asked.

    Absolute because workers, other nodes and `ray job` copies of the working dir need it.
    Training and evaluation both call this, so they use the same synthetic tree.

    Raises:
        ConfigError: no root for a real format, a synthetic root that holds other data, or
            `data.*` keys that contradict each other (`check_data_config`).
    """
    data = config.data
    check_data_config(data)
    root = data.root
    if data.format == "synthetic":
        from reid_platform.data.synthetic import ensure_synthetic

        s = data.synthetic
        root = root or str(synthetic_root(config))
        try:
            ensure_synthetic(
                root, num_train_ids=s.num_train_ids, num_test_ids=s.num_test_ids,
                num_cameras=s.num_cameras,
                images_per_id_per_camera=(s.min_images_per_camera, s.max_images_per_camera),
                height=s.height, width=s.width, seed=s.seed, progress=progress,
            )
        except ValueError as err:
            raise ConfigError(f"data.root / data.synthetic: {err}") from None
    elif not root:
        raise ConfigError(
            f"data.root is empty; data.format={data.format} needs a dataset path "
            "(--set data.root=/path/to/dataset)"
        )
    overrides = {"data.root": str(Path(root).expanduser().resolve())}
    if data.eval_root:
        overrides["data.eval_root"] = str(Path(data.eval_root).expanduser().resolve())
    if data.extra_train:
        overrides["data.extra_train"] = [
            _existing(p, f"data.extra_train[{i}]") for i, p in enumerate(data.extra_train)
        ]
    if data.unlabelled:
        overrides["data.unlabelled"] = _existing(data.unlabelled, "data.unlabelled")
    return config.replace(**overrides)


def _existing(path: str, key: str) -> str:
    resolved = Path(path).expanduser().resolve()
    if not resolved.exists():
        raise ConfigError(f"{key}={path!r}: no such file or directory")
    return str(resolved)


def load_config_dataset(config: Config, report: bool = True) -> ReidDataset:
    """The train / query / gallery samples of `config.data` (roots already resolved).

    Training, its evaluation and `jobs/evaluate.py` all read their data through this one call.
    With `data.eval_root` (cross-domain), train comes from `data.root` and query / gallery
    from `data.eval_root` (`data.eval_format`), whose own training split is not read.

    The training samples of `data.extra_train` join the training split with ids of their own
    (`reid_platform.data.extra.merge_extra_train`).

    Args:
        report: log what the readers skipped (ignored files, empty identity folders), one
            warning line per reason with a count and an example; callers that load the same
            dataset again (every training worker after the driver) pass False.

    Raises:
        ConfigError: `data.*` keys that contradict each other.
        DatasetError: a dataset or an extra training source is missing or malformed.
    """
    data = config.data
    check_data_config(data)
    options = {
        "allow_outside_root": data.allow_outside_root,
        "csv_encoding": data.csv_encoding,
        "cuhk03_variant": data.cuhk03_variant,
        "msmt17_include_val": data.msmt17_include_val,
        "vehicleid_test_size": data.vehicleid_test_size,
        "vehicleid_trial": data.vehicleid_trial,
    }
    dataset = load_dataset(data.root, data.format, data.test_fraction, **options)
    if data.eval_root:
        target = load_dataset(
            data.eval_root, data.eval_format, data.test_fraction, need_train=False, **options
        )
        dataset = ReidDataset(
            dataset.name, dataset.root, dataset.train, target.query, target.gallery,
            notes=dataset.notes + target.notes, eval_name=target.name, eval_root=target.root,
        )
    dataset = merge_extra_train(dataset, data.extra_train)
    if report:
        for note in dataset.notes:
            logger.warning("[data] warning: %s", note)
    return dataset
