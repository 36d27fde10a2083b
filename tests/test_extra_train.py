"""data.extra_train: more training sources merged into the training split, ids kept apart."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from reid_platform.config import Config, ConfigError
from reid_platform.data.extra import merge_extra_train
from reid_platform.data.formats import DatasetError, balance, load_csv
from reid_platform.data.root import load_config_dataset, resolve_data_root
from reid_platform.training.trainer import prepare_data


def write_manifest(path: Path, rows: list[tuple[str, int, int, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "pid", "camid", "split"])
        writer.writerows(rows)
    return path


def labelled_manifest(tmp_path: Path) -> Path:
    # Train pids 1, 2, 5 (two images each); query/gallery of pids 8, 9.
    rows = [(f"t{pid}_{n}.jpg", pid, n, "train") for pid in (1, 2, 5) for n in range(2)]
    rows += [("q8.jpg", 8, 0, "query"), ("g8.jpg", 8, 1, "gallery"),
             ("q9.jpg", 9, 0, "query"), ("g9.jpg", 9, 1, "gallery")]
    return write_manifest(tmp_path / "labelled" / "labelled.csv", rows)


def pseudo_manifest(path: Path, pids: list[int]) -> Path:
    # What jobs/pseudo_label.py writes: train rows only, pseudo ids from 0.
    return write_manifest(path, [(f"u{pid}_{n}.jpg", pid, "", "train")
                                 for pid in pids for n in range(3)])


def test_merge_keeps_every_source_apart_and_balance_relabels(tmp_path):
    dataset = load_csv(labelled_manifest(tmp_path))
    a = pseudo_manifest(tmp_path / "a" / "pseudo_labels.csv", [0, 1])  # 1 collides with labelled
    b = pseudo_manifest(tmp_path / "b" / "pseudo_labels.csv", [0, 7])  # 0 collides with a
    merged = merge_extra_train(dataset, [a, b])
    assert merged.query == dataset.query and merged.gallery == dataset.gallery
    assert len(merged.train) == 6 + 6 + 6
    by_source: dict[str, set[int]] = {}
    for s in merged.train:
        by_source.setdefault(s.meta.get("train_source", "labelled"), set()).add(s.pid)
    # labelled keeps 1, 2, 5; a: offset 6 -> {6, 7}; b: offset 8 -> {8, 9}
    assert by_source == {"labelled": {1, 2, 5}, str(a): {6, 7}, str(b): {8, 9}}
    # images of one source identity stay together
    assert {s.pid for s in merged.train if Path(s.path).name.startswith("u0_")} == {6, 8}
    train, pid_map = balance(merged.train)
    assert sorted({s.pid for s in train}) == list(range(7))
    assert pid_map == {1: 0, 2: 1, 5: 2, 6: 3, 7: 4, 8: 5, 9: 6}
    assert merge_extra_train(dataset, []) is dataset


def test_config_extra_train_reaches_training_data(tmp_path):
    labelled = labelled_manifest(tmp_path)
    pseudo = pseudo_manifest(tmp_path / "p" / "pseudo_labels.csv", [0, 1, 2])
    config = Config().replace(**{
        "data.format": "csv", "data.root": str(labelled), "data.extra_train": [str(pseudo)],
        "data.num_ids_per_batch": 6, "model.backbone": "test_resnet",
    })
    config, dataset = prepare_data(config, progress=False)  # what run_training does first
    assert config.data.extra_train == (str(pseudo.resolve()),)
    _, pid_map = balance(dataset.train)
    assert len(pid_map) == 3 + 3  # labelled + pseudo identities, none merged
    # the same through the one call evaluation uses
    assert len(load_config_dataset(config).train) == len(dataset.train) == 6 + 9


def test_extra_train_errors_name_the_source(tmp_path):
    labelled = labelled_manifest(tmp_path)
    base = Config().replace(**{"data.format": "csv", "data.root": str(labelled)})
    missing = tmp_path / "nope.csv"
    with pytest.raises(ConfigError, match=r"data.extra_train\[0\]=.*nope.csv.*no such file"):
        resolve_data_root(base.replace(**{"data.extra_train": [str(missing)]}))
    with pytest.raises(ConfigError, match="must be a list of str"):
        base.replace(**{"data.extra_train": {"a": "b.csv"}})

    no_train = write_manifest(tmp_path / "q.csv", [("q.jpg", 1, 0, "query")])
    with pytest.raises(DatasetError, match=r"q.csv: no rows with split=train"):
        load_config_dataset(base.replace(**{"data.extra_train": [str(no_train)]}))
    text = tmp_path / "labels.txt"
    text.write_text("x")
    with pytest.raises(DatasetError, match=r"labels.txt is a file but not a .csv manifest"):
        load_config_dataset(base.replace(**{"data.extra_train": [str(text)]}))
    # a source's query/gallery rows are allowed and ignored; a main manifest still needs all
    with pytest.raises(DatasetError, match="no rows with split=query"):
        load_csv(pseudo_manifest(tmp_path / "p.csv", [0]))


def test_a_market_tree_or_a_folder_with_a_manifest_is_a_source(tmp_path, tiny_market):
    dataset = load_csv(labelled_manifest(tmp_path))
    folder = tmp_path / "pseudo"
    pseudo_manifest(folder / "pseudo_labels.csv", [0, 1])
    merged = merge_extra_train(dataset, [tiny_market, folder])
    market = [s for s in merged.train if s.meta.get("train_source") == str(tiny_market)]
    assert len({s.pid for s in market}) == 12 and min(s.pid for s in market) == 6
    assert {s.pid for s in merged.train if s.meta.get("train_source") == str(folder)} == {18, 19}
    (tmp_path / "people" / "alice").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"people is neither a CSV manifest"):
        merge_extra_train(dataset, [tmp_path / "people"])
