"""Tests of the synthetic Market-1501 generator: layout, naming, splits, determinism, caching."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest

from reid_platform.data import synthetic
from reid_platform.data.synthetic import SPLIT_DIRS, ensure_synthetic, generate_market_tree

MARKET_NAME = re.compile(r"^(-1|\d{4})_c(\d)s(\d)_(\d{6})_(\d{2})\.jpg$")
SMALL = dict(num_train_ids=8, num_test_ids=6, num_cameras=3, num_distractors=4, num_junk=2)


def _parse(root: Path, split: str) -> list[tuple[str, int, int]]:
    """Returns (file name, pid, camid) for every file of a split, asserting Market naming."""
    out = []
    for path in sorted((root / split).iterdir()):
        m = MARKET_NAME.match(path.name)
        assert m is not None, f"{split}/{path.name} does not follow Market-1501 naming"
        out.append((path.name, int(m[1]), int(m[2])))
    return out


def _read_tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_market_tree(tmp_path_factory.mktemp("syn") / "market", **SMALL, progress=False)


def test_layout_and_naming(tree: Path) -> None:
    assert sorted(p.name for p in tree.iterdir()) == sorted([*SPLIT_DIRS, ".complete"])
    marker = json.loads((tree / ".complete").read_text())
    for split in SPLIT_DIRS:
        files = _parse(tree, split)
        assert len(files) == marker["counts"][split] > 0
        for name, _, camid in files:
            assert 1 <= camid <= SMALL["num_cameras"], name
    # Built in a temporary sibling and renamed: nothing may be left next to the tree.
    assert [p.name for p in tree.parent.iterdir()] == ["market"]


def test_splits_are_disjoint_and_complete(tree: Path) -> None:
    train = _parse(tree, "bounding_box_train")
    query = _parse(tree, "query")
    gallery = _parse(tree, "bounding_box_test")
    n_train, n_test = SMALL["num_train_ids"], SMALL["num_test_ids"]
    train_ids = {pid for _, pid, _ in train}
    test_ids = {pid for _, pid, _ in gallery if pid > 0}
    assert train_ids == set(range(1, n_train + 1))
    assert test_ids == set(range(n_train + 1, n_train + n_test + 1))
    assert {pid for _, pid, _ in query} == test_ids
    assert train_ids.isdisjoint(test_ids)
    # Distractors and junk only in the gallery, as in Market-1501.
    assert sum(pid == 0 for _, pid, _ in gallery) == SMALL["num_distractors"]
    assert sum(pid == -1 for _, pid, _ in gallery) == SMALL["num_junk"]
    assert all(pid > 0 for _, pid, _ in train + query)
    # Every identity is seen by at least two cameras.
    cams = defaultdict(set)
    for _, pid, camid in train + gallery:
        cams[pid].add(camid)
    assert all(len(cams[pid]) >= 2 for pid in train_ids | test_ids)
    # No two files of the tree share a name, even across splits.
    names = [name for name, _, _ in train + query + gallery]
    assert len(names) == len(set(names))


def test_every_query_has_cross_camera_match(tree: Path) -> None:
    gallery_cams = defaultdict(set)
    for _, pid, camid in _parse(tree, "bounding_box_test"):
        gallery_cams[pid].add(camid)
    for name, pid, camid in _parse(tree, "query"):
        assert gallery_cams[pid] - {camid}, f"query {name} has no gallery match in another camera"


def test_images_decode_with_requested_size(tmp_path: Path) -> None:
    root = generate_market_tree(
        tmp_path / "small",
        num_train_ids=2,
        num_test_ids=2,
        num_cameras=2,
        num_distractors=1,
        num_junk=1,
        height=96,
        width=48,
        progress=False,
    )
    paths = list(root.rglob("*.jpg"))
    assert paths
    for path in paths:
        img = cv2.imread(str(path))
        assert img is not None, path
        assert img.shape == (96, 48, 3), path


def test_deterministic_by_seed(tmp_path: Path) -> None:
    a = _read_tree(generate_market_tree(tmp_path / "a", **SMALL, seed=3, progress=False))
    b = _read_tree(generate_market_tree(tmp_path / "b", **SMALL, seed=3, progress=False))
    c = _read_tree(generate_market_tree(tmp_path / "c", **SMALL, seed=4, progress=False))
    assert a == b
    shared = set(a) & set(c)
    # The file plan also depends on the seed; where names coincide, pixels must still differ.
    assert a != c
    assert all(a[k] != c[k] for k in shared if k.endswith(".jpg"))


def test_identity_does_not_depend_on_the_rest_of_the_tree() -> None:
    # A pid's appearance comes from its own RNG stream: growing the dataset does not change it.
    seed, pid = 5, 7
    first = synthetic.sample_identity(np.random.default_rng([seed, pid]))
    again = synthetic.sample_identity(np.random.default_rng([seed, pid]))
    other = synthetic.sample_identity(np.random.default_rng([seed, pid + 1]))
    assert first == again
    assert first != other


def test_ensure_synthetic_is_idempotent_and_regenerates(tmp_path: Path) -> None:
    root = tmp_path / "cached"
    ensure_synthetic(root, **SMALL, progress=False)

    def snapshot() -> dict[Path, tuple[int, int]]:
        # A rebuild renames a new directory into place: inodes and mtimes would change.
        return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in [root, *root.rglob("*")]}

    before = snapshot()
    # Defaults spelt out explicitly, a str root and a list range count as the same request.
    assert ensure_synthetic(root, **SMALL, seed=0, progress=False) == root
    assert ensure_synthetic(str(root), **SMALL, images_per_id_per_camera=[1, 3]) == root
    assert snapshot() == before

    ensure_synthetic(root, **{**SMALL, "num_test_ids": 3}, progress=False)
    marker = json.loads((root / ".complete").read_text())
    assert marker["params"]["num_test_ids"] == 3
    assert {pid for _, pid, _ in _parse(root, "query")} == {9, 10, 11}

    # A non-empty folder without our marker may be someone's data: refused, left intact.
    # (Generation renames a finished tree into place, so ours always has the marker.)
    (root / ".complete").unlink()
    before = snapshot()
    with pytest.raises(ValueError, match="holds no synthetic dataset .* refusing to overwrite"):
        ensure_synthetic(root, **SMALL, progress=False)
    assert snapshot() == before
    assert [p.name for p in tmp_path.iterdir()] == ["cached"]
    # An empty folder is fine to generate into.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (ensure_synthetic(empty, **SMALL, progress=False) / ".complete").exists()

    with pytest.raises(TypeError):
        ensure_synthetic(empty, num_people=3)


@pytest.mark.parametrize(
    "bad",
    [
        dict(num_cameras=1),
        dict(num_cameras=10),
        dict(num_train_ids=0),
        dict(num_train_ids=9000, num_test_ids=1000),
        dict(images_per_id_per_camera=(3, 2)),
        dict(num_junk=-1),
    ],
)
def test_rejects_bad_parameters(tmp_path: Path, bad: dict) -> None:
    with pytest.raises(ValueError):
        generate_market_tree(tmp_path / "bad", **bad, progress=False)
    assert not list(tmp_path.iterdir())


def _centre_histogram(path: Path) -> np.ndarray:
    """Normalised HSV histogram of the central body region (the background is camera noise)."""
    img = cv2.imread(str(path))
    h, w = img.shape[:2]
    hsv = cv2.cvtColor(img[h // 8 : h * 7 // 8, w // 4 : w * 3 // 4], cv2.COLOR_BGR2HSV)
    hist = cv2.calcHist([hsv], [0, 1, 2], None, [8, 4, 4], [0, 180, 0, 256, 0, 256]).ravel()
    return hist / hist.sum()


def test_images_carry_identity(tree: Path) -> None:
    files = _parse(tree, "bounding_box_train")
    hists = np.stack([_centre_histogram(tree / "bounding_box_train" / n) for n, _, _ in files])
    pids = np.array([pid for _, pid, _ in files])
    camids = np.array([camid for _, _, camid in files])
    dist = np.abs(hists[:, None] - hists[None]).sum(-1)  # (N, N) L1 distance
    same = pids[:, None] == pids[None]
    # Cross-camera pairs only: identity must survive the change of viewing conditions.
    cross = camids[:, None] != camids[None]
    same_mean = dist[same & cross].mean()
    diff_mean = dist[~same & cross].mean()
    assert same_mean < 0.85 * diff_mean, (same_mean, diff_mean)
