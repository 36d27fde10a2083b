"""Where a config's images are: an absolute `data.root`, generating the synthetic set if asked."""

from __future__ import annotations

from pathlib import Path

from reid_platform.config import Config, ConfigError
from reid_platform.data.extra import merge_extra_train
from reid_platform.data.formats import ReidDataset, load_dataset


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


def resolve_data_root(config: Config, progress: bool = True) -> Config:
    """The config with an absolute `data.root`, generating the synthetic dataset if asked.

    Absolute because workers, other nodes and `ray job` copies of the working dir need it.
    Training and evaluation both call this, so they use the same synthetic tree.

    Raises:
        ConfigError: no root for a real format, or a synthetic root that holds other data.
    """
    data = config.data
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


def load_config_dataset(config: Config) -> ReidDataset:
    """The train / query / gallery samples of `config.data` (root already resolved).

    Training, its evaluation and `jobs/evaluate.py` all read their data through this one call.
    The training samples of `data.extra_train` join the training split with ids of their own
    (`reid_platform.data.extra.merge_extra_train`).

    Raises:
        DatasetError: the dataset or an extra training source is missing or malformed.
    """
    data = config.data
    dataset = load_dataset(data.root, data.format, data.test_fraction)
    return merge_extra_train(dataset, data.extra_train)
