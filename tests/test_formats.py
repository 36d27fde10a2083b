"""Dataset formats (Market-1501, folder per id, CSV manifest), balancing, image decoding."""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reid_platform.data.dataset import (
    ImageDataset,
    ImageDecodeError,
    collate_skip_corrupt,
    decode_image,
    read_image,
)
from reid_platform.data.formats import (
    DatasetError,
    Sample,
    balance,
    detect_format,
    load_csv,
    load_dataset,
    load_folder,
    load_market1501,
    parse_market_name,
)
from reid_platform.data.transforms import build_eval_transform


def write_image(path: Path, height: int = 16, width: int = 8, seed: int = 0) -> np.ndarray:
    """A small noisy RGB image (JPEG or PNG by suffix); returns the pixels written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def make_tree(root: Path, files: dict[str, list[str]]) -> Path:
    for folder, names in files.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            write_image(root / folder / name)
    return root


MARKET_FILES = {
    "bounding_box_train": [
        "0002_c1s1_000151_00.jpg",
        "0002_c2s1_000201_01.jpg",
        "0007_c6s4_002202_00.jpg",
        "0000_c1s1_000001_00.jpg",  # distractor: never trains
        "-1_c1s1_000002_00.jpg",  # junk: never trains
    ],
    "query": ["0005_c1s2_000101_00.jpg", "-1_c2s1_000003_00.jpg"],
    "bounding_box_test": [
        "0005_c3s1_000301_00.jpg",
        "0000_c2s1_000401_00.jpg",
        "-1_c1s1_000501_00.jpg",
    ],
}


def triples(samples: list[Sample]) -> list[tuple[str, int, int]]:
    return [(Path(s.path).name, s.pid, s.camid) for s in samples]


# ---- Market-1501 ---------------------------------------------------------------------------


def test_tiny_market(tiny_market):
    dataset = load_market1501(tiny_market)
    assert dataset.num_train_pids == 12
    assert {s.pid for s in dataset.train} == set(range(1, 13))
    assert {s.pid for s in dataset.query} <= set(range(13, 21))
    gallery_pids = Counter(s.pid for s in dataset.gallery)
    assert gallery_pids[0] == 4 and gallery_pids[-1] == 2
    assert set(gallery_pids) - {0, -1} == set(range(13, 21))
    for split, folder in [
        ("train", "bounding_box_train"),
        ("query", "query"),
        ("gallery", "bounding_box_test"),
    ]:
        samples = getattr(dataset, split)
        assert len(samples) == len(list((tiny_market / folder).glob("*.jpg")))
        assert all(s.split == split and Path(s.path).is_file() for s in samples)
        assert all(s.item_id == f"{folder}/{Path(s.path).name}" for s in samples)
        assert {s.camid for s in samples} <= {0, 1, 2}
    assert detect_format(tiny_market) == "market1501"
    assert triples(load_dataset(tiny_market).gallery) == triples(dataset.gallery)
    assert "12 ids" in dataset.summary()


def test_market_hand_made_tree(tmp_path):
    root = make_tree(tmp_path / "market", MARKET_FILES)
    (root / "bounding_box_train" / "readme.txt").write_text("not an image")
    dataset = load_market1501(root)
    assert triples(dataset.train) == [
        ("0002_c1s1_000151_00.jpg", 2, 0),
        ("0002_c2s1_000201_01.jpg", 2, 1),
        ("0007_c6s4_002202_00.jpg", 7, 5),
    ]
    assert triples(dataset.query) == [("0005_c1s2_000101_00.jpg", 5, 0)]
    assert sorted(triples(dataset.gallery)) == sorted(
        [
            ("0005_c3s1_000301_00.jpg", 5, 2),
            ("0000_c2s1_000401_00.jpg", 0, 1),
            ("-1_c1s1_000501_00.jpg", -1, 0),
        ]
    )
    assert dataset.name == "market"


def test_market_versioned_subfolder(tmp_path):
    make_tree(tmp_path / "Market-1501-v15.09.15", MARKET_FILES)
    assert detect_format(tmp_path) == "market1501"
    dataset = load_market1501(tmp_path)
    assert dataset.root == tmp_path / "Market-1501-v15.09.15"
    assert len(dataset.train) == 3


@pytest.mark.parametrize(
    "name,pid,camid",
    [
        ("0001_c1s1_001051_00.jpg", 1, 0),
        ("-1_c3s2_000001_02.jpg", -1, 2),
        ("0000_c6s4_000002_00.jpg", 0, 5),
        ("0005_c2_f0046182.jpg", 5, 1),  # DukeMTMC-reID
        ("1234_c8_f0000001.jpg", 1234, 7),
    ],
)
def test_parse_market_name(name, pid, camid):
    assert parse_market_name(Path(name)) == (pid, camid)


def test_duke_tree(tmp_path):
    root = make_tree(
        tmp_path / "duke",
        {
            "bounding_box_train": ["0001_c2_f0046182.jpg", "0001_c5_f0051341.jpg"],
            "query": ["0005_c2_f0046985.jpg"],
            "bounding_box_test": ["0005_c5_f0051781.jpg", "0000_c1_f0001.jpg"],
        },
    )
    dataset = load_market1501(root)
    assert triples(dataset.train) == [
        ("0001_c2_f0046182.jpg", 1, 1),
        ("0001_c5_f0051341.jpg", 1, 4),
    ]
    assert triples(dataset.query) == [("0005_c2_f0046985.jpg", 5, 1)]


def test_market_missing_folder(tmp_path):
    files = {k: v for k, v in MARKET_FILES.items() if k != "query"}
    root = make_tree(tmp_path / "m", files)
    with pytest.raises(DatasetError, match=re.escape(str(root / "query")) + ": missing"):
        load_market1501(root)


@pytest.mark.parametrize("bad", ["person12.jpg", "0001_x1s1_000151_00.jpg", "abc_c1s1_0.jpg"])
def test_market_bad_file_name_names_the_file(tmp_path, bad):
    root = make_tree(tmp_path / "m", MARKET_FILES)
    write_image(root / "bounding_box_test" / bad)
    with pytest.raises(DatasetError, match=re.escape(str(root / "bounding_box_test" / bad))):
        load_market1501(root)


def test_market_camera_zero_and_empty_split(tmp_path):
    root = make_tree(tmp_path / "m", MARKET_FILES)
    write_image(root / "query" / "0005_c0s1_000001_00.jpg")
    with pytest.raises(DatasetError, match=r"0005_c0s1_000001_00\.jpg: camera number"):
        load_market1501(root)

    files = dict(MARKET_FILES, query=["-1_c2s1_000003_00.jpg"])  # only junk left
    root = make_tree(tmp_path / "m2", files)
    with pytest.raises(DatasetError, match=re.escape(str(root / "query")) + ": no images"):
        load_market1501(root)
    with pytest.raises(DatasetError, match="does not exist"):
        load_market1501(tmp_path / "nowhere")


# ---- folder per identity -------------------------------------------------------------------


def test_folder_with_splits(tmp_path):
    root = tmp_path / "folders"
    for split, ids in {"train": ["a", "b"], "query": ["c"], "gallery": ["c", "d"]}.items():
        for ident in ids:
            for n in range(2):
                write_image(root / split / ident / f"{n}.jpg")
    (root / "train" / "a" / "notes.txt").write_text("ignored")
    assert detect_format(root) == "folder"
    dataset = load_folder(root)
    names = {"a": 0, "b": 1, "c": 2, "d": 3}  # contiguous over all identities, sorted
    for split in ("train", "query", "gallery"):
        samples = getattr(dataset, split)
        assert all(s.pid == names[s.meta["identity"]] for s in samples)
        assert {s.camid for s in samples} == {1 if split == "gallery" else 0}
    assert len(dataset.train) == 4 and len(dataset.query) == 2 and len(dataset.gallery) == 4
    assert dataset.query[0].item_id == "query/c/0.jpg"


def test_folder_missing_split(tmp_path):
    root = tmp_path / "folders"
    write_image(root / "train" / "a" / "0.jpg")
    write_image(root / "query" / "a" / "0.jpg")
    with pytest.raises(DatasetError, match=re.escape(str(root / "gallery")) + ": missing"):
        load_folder(root)


def test_folder_per_identity_split_by_hash(tmp_path):
    root = tmp_path / "ids"
    idents = [f"id{n:02d}" for n in range(20)]
    for n, ident in enumerate(idents):
        for k in range(1 if n == 0 else 3):
            write_image(root / ident / f"{k}.png", seed=k)
    dataset = load_folder(root, test_fraction=0.5)
    train_ids = {s.meta["identity"] for s in dataset.train}
    query_ids = {s.meta["identity"] for s in dataset.query}
    assert train_ids and query_ids and not train_ids & query_ids
    assert "id00" in train_ids  # a single image cannot be split into query + gallery
    assert {s.meta["identity"] for s in dataset.gallery} == query_ids
    assert all(s.camid == 0 for s in dataset.query) and all(s.camid == 1 for s in dataset.gallery)
    # the first image of a test identity is its query, the others its gallery
    assert all(Path(s.path).name == "0.png" for s in dataset.query)
    assert len(dataset.gallery) == 2 * len(dataset.query)
    assert sorted({s.pid for split in (dataset.train, dataset.query) for s in split}) == list(
        range(20)
    )
    # stable: the same identities are held out every time
    again = load_folder(root, test_fraction=0.5)
    assert triples(again.query) == triples(dataset.query)
    with pytest.raises(DatasetError, match="query split is empty"):
        load_folder(root, test_fraction=0.0)


def test_folder_empty(tmp_path):
    (tmp_path / "empty" / "someone").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no identity folders"):
        load_folder(tmp_path / "empty")


# ---- CSV manifest --------------------------------------------------------------------------


def write_csv(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def csv_tree(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    pixels = {
        name: write_image(tmp_path / "img" / name, height=20, width=12, seed=n)
        for n, name in enumerate(["a.png", "b.png", "c.png", "d.png", "e.png"])
    }
    return tmp_path, pixels


def test_csv_manifest_with_boxes_ids_and_metadata(tmp_path):
    base, pixels = csv_tree(tmp_path)
    manifest = write_csv(
        base / "list.csv",
        [
            "path,pid,camid,split,x,y,w,h,id,source, colour",
            "img/a.png,3,0,train,2,3,4,5,item-a,cam-west,red",
            "img/b.png,3,1,train,,,,,item-b,cam-east,blue",
            "img/c.png,8,,query,0,0,12,20,,drone,",
            "img/d.png,8,,gallery,5.4,10.6,100,100,item-d,drone,green",
            "img/e.png,-1,2,gallery,,,,,item-e,x,y",
            "img/e.png,-1,2,train,,,,,item-e2,x,y",  # junk never trains
        ],
    )
    assert detect_format(manifest) == "csv" and detect_format(base) == "csv"
    dataset = load_csv(base)  # a folder holding one manifest
    assert dataset.name == "list" and dataset.root == base
    assert [(s.pid, s.camid, s.box, s.item_id) for s in dataset.train] == [
        (3, 0, (2, 3, 4, 5), "item-a"),
        (3, 1, None, "item-b"),
    ]
    assert dataset.train[0].meta == {"source": "cam-west", "colour": "red"}
    (query,) = dataset.query
    assert (query.camid, query.item_id, query.meta) == (
        0,
        "img/c.png",
        {"source": "drone", "colour": ""},
    )
    assert [(s.pid, s.camid, s.box) for s in dataset.gallery] == [
        (8, 1, (5, 11, 100, 100)),  # empty camid: gallery gets 1; box rounded
        (-1, 2, None),
    ]
    # the box crops the region of interest (x, y, w, h), clipped to the image
    crop = read_image(dataset.train[0].path, dataset.train[0].box)
    np.testing.assert_array_equal(crop, pixels["a.png"][3:8, 2:6])
    np.testing.assert_array_equal(read_image(dataset.train[1].path), pixels["b.png"])
    np.testing.assert_array_equal(read_image(query.path, query.box), pixels["c.png"])
    crop = read_image(dataset.gallery[0].path, dataset.gallery[0].box)
    np.testing.assert_array_equal(crop, pixels["d.png"][11:, 5:])

    # and the dataset serves the crop
    item = ImageDataset(dataset.train, build_eval_transform(10, 8))[0]
    assert item["image"].shape == (3, 10, 8) and item["pid"] == 3


def test_box_outside_image(tmp_path):
    path = tmp_path / "a.png"
    write_image(path, height=20, width=12)
    with pytest.raises(ImageDecodeError, match=re.escape(str(path)) + ".*outside"):
        read_image(path, (12, 0, 4, 4))


@pytest.mark.parametrize(
    "row,message",
    [
        ("img/b.png,1,0,val,,,,", "split 'val'"),
        ("img/b.png,one,0,train,,,,", "pid 'one'"),
        ("img/b.png,1,cam1,train,,,,", "camid 'cam1'"),
        ("img/b.png,1,0,train,a,b,c,d", "box x,y,w,h must be numbers"),
        ("img/b.png,1,0,train,0,0,0,5", "w,h > 0"),
        ("img/b.png,1,0,train,-1,0,4,5", "x,y >= 0"),
        ("img/b.png,1,0,train,0,0,4,-5", "w,h > 0"),
        ("img/b.png,1,0,train,inf,0,4,5", "box x='inf' must be a finite number"),
        ("img/b.png,1,0,train,0,0,nan,5", "box w='nan' must be a finite number"),
        ("img/b.png,1,0,train,0,-inf,4,5", "box y='-inf' must be a finite number"),
        ("img/b.png,1,0,train,0,0,1e999,5", "box w='1e999' must be a finite number"),
        ("img/b.png,1,0,train,0,,4,5", "box x,y,w,h must be numbers, got y=''"),
        (",1,0,train,,,,", "path is empty"),
    ],
)
def test_csv_errors_name_file_and_line(tmp_path, row, message):
    manifest = write_csv(
        tmp_path / "m.csv",
        ["path,pid,camid,split,x,y,w,h", "img/a.png,1,0,train,,,,", row],
    )
    with pytest.raises(
        DatasetError, match=re.escape(f"{manifest}:3: ") + ".*" + re.escape(message)
    ):
        load_csv(manifest)


def test_csv_header_errors(tmp_path):
    manifest = write_csv(tmp_path / "m.csv", ["path,pid,split", "a.png,1,train"])
    with pytest.raises(DatasetError, match=re.escape(str(manifest)) + r".*\['camid'\]"):
        load_csv(manifest)
    manifest = write_csv(tmp_path / "m.csv", ["path,pid,camid,split,x,y", "a.png,1,0,train,1,2"])
    with pytest.raises(DatasetError, match="all of x,y,w,h or none"):
        load_csv(manifest)
    manifest = write_csv(tmp_path / "m.csv", ["path,pid,camid,split", "a.png,1,0,train"])
    with pytest.raises(DatasetError, match="no rows with split=query"):
        load_csv(manifest)
    with pytest.raises(DatasetError, match="does not exist"):
        load_csv(tmp_path / "missing.csv")
    write_csv(tmp_path / "other.csv", ["path,pid,camid,split"])
    with pytest.raises(DatasetError, match="exactly one .csv manifest, found 2"):
        load_csv(tmp_path)


def test_load_dataset_unknown_format(tmp_path):
    with pytest.raises(DatasetError, match="'coco'"):
        load_dataset(tmp_path, fmt="coco")
    with pytest.raises(DatasetError, match="no dataset here"):
        detect_format(tmp_path / "nowhere")


# ---- balancing -----------------------------------------------------------------------------


def samples_with_counts(counts: dict[int, int]) -> list[Sample]:
    return [
        Sample(f"{pid}_{n}.jpg", pid, n % 2, "train")
        for pid, count in counts.items()
        for n in range(count)
    ]


def test_balance_drops_singles_and_relabels():
    samples = samples_with_counts({40: 3, 7: 1, 12: 2, 99: 5, 3: 1})
    out, pid_map = balance(samples)
    assert pid_map == {12: 0, 40: 1, 99: 2}
    assert Counter(s.pid for s in out) == {0: 2, 1: 3, 2: 5}
    assert all(
        s.path.startswith(f"{src}_") for s in out for src, new in pid_map.items() if s.pid == new
    )

    kept, pid_map = balance(samples, drop_single_image_ids=False)
    assert pid_map == {3: 0, 7: 1, 12: 2, 40: 3, 99: 4}
    assert len(kept) == len(samples)


def test_balance_oversampling():
    samples = samples_with_counts({1: 2, 2: 3, 3: 4, 4: 10})
    out, _ = balance(samples, oversample_min=2, oversample_max=4, oversample_p=1.0)
    assert Counter(s.pid for s in out) == {0: 4, 1: 6, 2: 8, 3: 10}  # ids with 2..4 doubled
    same, _ = balance(samples, oversample_min=2, oversample_max=4, oversample_p=0.0)
    assert len(same) == len(samples)
    # with p = 0.5, an id is duplicated whole or not at all, reproducibly per seed
    half, _ = balance(samples, oversample_min=2, oversample_max=4, oversample_p=0.5, seed=3)
    again, _ = balance(samples, oversample_min=2, oversample_max=4, oversample_p=0.5, seed=3)
    assert half == again
    counts = Counter(s.pid for s in half)
    base = {0: 2, 1: 3, 2: 4, 3: 10}
    assert all(counts[p] in (base[p], 2 * base[p]) for p in base) and counts[3] == 10


def test_balance_nothing_left():
    with pytest.raises(DatasetError, match="at least 2 images"):
        balance(samples_with_counts({1: 1, 2: 1}))


# ---- corrupt images ------------------------------------------------------------------------


@pytest.fixture
def corrupt_files(tmp_path) -> dict[str, Path]:
    good = tmp_path / "good.jpg"
    write_image(good, height=64, width=32)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"definitely not a jpeg" * 10)
    return {
        "good": good,
        "truncated": truncated,
        "garbage": garbage,
        "missing": tmp_path / "missing.jpg",
    }


@pytest.mark.parametrize(
    "kind,why",
    [("truncated", "cannot decode"), ("garbage", "not an image"), ("missing", "file not found")],
)
def test_read_image_errors_name_the_file(corrupt_files, kind, why):
    path = corrupt_files[kind]
    with pytest.raises(ImageDecodeError, match=re.escape(str(path)) + ": " + why):
        read_image(path)


def test_decode_image(corrupt_files):
    data = corrupt_files["good"].read_bytes()
    array = decode_image(data)
    assert array.shape == (64, 32, 3) and array.dtype == np.uint8
    np.testing.assert_array_equal(array, read_image(corrupt_files["good"]))
    with pytest.raises(ImageDecodeError, match="upload.jpg"):
        decode_image(data[: len(data) // 2], source="upload.jpg")
    with pytest.raises(ImageDecodeError, match="upload.jpg: not an image"):
        decode_image(b"xyz", source="upload.jpg")


def test_dataset_skips_corrupt_images(corrupt_files):
    samples = [
        Sample(str(corrupt_files["good"]), 1, 0, "train"),
        Sample(str(corrupt_files["truncated"]), 2, 0, "train"),
        Sample(str(corrupt_files["good"]), 3, 1, "train"),
        Sample(str(corrupt_files["garbage"]), 4, 1, "train"),
    ]
    dataset = ImageDataset(samples, build_eval_transform(32, 16))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate_skip_corrupt)
    (batch,) = list(loader)
    assert batch["image"].shape == (2, 3, 32, 16) and batch["image"].dtype == torch.float32
    assert batch["pid"].tolist() == [1, 3] and batch["camid"].tolist() == [0, 1]
    assert batch["index"].tolist() == [0, 2]
    assert len(batch["skipped"]) == 2
    assert str(corrupt_files["truncated"]) in batch["skipped"][0]
    assert str(corrupt_files["garbage"]) in batch["skipped"][1]

    all_bad = collate_skip_corrupt([dataset[1], dataset[3]])
    assert all_bad["image"] is None and all_bad["pid"] is None and len(all_bad["skipped"]) == 2


@pytest.mark.parametrize("outside", ["../../../../etc/passwd", "/etc/hostname", "img/../../x.png"])
def test_csv_paths_outside_the_root_are_refused(tmp_path, outside):
    base = tmp_path / "data"
    write_image(base / "img" / "a.png")
    manifest = write_csv(
        base / "m.csv",
        ["path,pid,camid,split", "img/a.png,1,0,train", "img/a.png,2,0,query",
         f"{outside},2,1,gallery"],
    )
    with pytest.raises(
        DatasetError,
        match=re.escape(f"{manifest}:4: path {outside!r} leads outside the dataset root {base}")
        + ".*data.allow_outside_root: true",
    ):
        load_csv(manifest)
    dataset = load_csv(manifest, allow_outside_root=True)
    assert [s.item_id for s in dataset.gallery] == [outside]
    assert os.path.normpath(dataset.gallery[0].path) == os.path.normpath(base / outside)


def test_csv_encodings_and_bom(tmp_path):
    rows = ["path,pid,camid,split,colour", "a.png,1,0,train,café", "a.png,2,0,query,thé",
            "a.png,2,1,gallery,crème"]
    latin = tmp_path / "latin.csv"
    latin.write_bytes("\n".join(rows).encode("latin-1"))
    # latin-1 bytes are not UTF-8: reliably detected, so the line and byte are named
    with pytest.raises(DatasetError, match=re.escape(f"{latin}:2: byte 0xe9 (byte 20 of the line) "
                                                     "is not valid utf-8") + ".*data.csv_encoding"):
        load_csv(latin)
    # which 8-bit encoding it is cannot be guessed: the user says so
    assert load_csv(latin, encoding="latin-1").train[0].meta == {"colour": "café"}
    bom = tmp_path / "bom" / "excel.csv"
    bom.parent.mkdir()
    bom.write_text("\n".join(rows), encoding="utf-8-sig")  # what Excel writes
    assert bom.read_bytes().startswith(b"\xef\xbb\xbf")
    dataset = load_csv(bom)
    assert [s.meta["colour"] for s in dataset.gallery] == ["crème"]
    assert dataset.train[0].pid == 1
    with pytest.raises(DatasetError, match="unknown text encoding 'klingon'"):
        load_csv(bom, encoding="klingon")


def test_csv_line_numbers_count_physical_lines(tmp_path):
    manifest = write_csv(
        tmp_path / "m.csv",
        ["path,pid,camid,split,note", "a.png,1,0,train,", "", 'a.png,1,0,train,"two',
         'lines"', "a.png,x,0,train,"],
    )
    with pytest.raises(DatasetError, match=re.escape(f"{manifest}:6: pid 'x'")):
        load_csv(manifest)
    huge = write_csv(tmp_path / "huge.csv", ["path,pid,camid,split", 'a.png,1,0,"' + "x" * 140_000])
    with pytest.raises(DatasetError, match=re.escape(f"{huge}:") + r"\d+: not valid CSV \(field"):
        load_csv(huge)


def test_config_reaches_the_csv_reader(tmp_path):
    from reid_platform.config import load_config
    from reid_platform.data.root import load_config_dataset

    base = tmp_path / "data"
    write_image(base / "a.png")
    manifest = base / "m.csv"
    manifest.write_bytes(
        b"path,pid,camid,split,who\na.png,1,0,train,Ren\xe9\na.png,1,0,train,x\n"
        b"a.png,2,0,query,y\n../outside.png,2,1,gallery,z\n"
    )
    config = load_config(None, [f"data.root={manifest}", "data.format=csv"])
    with pytest.raises(DatasetError, match=":2: byte 0xe9"):
        load_config_dataset(config)
    config = config.replace(**{"data.csv_encoding": "latin-1"})
    with pytest.raises(DatasetError, match=":5: path '../outside.png' leads outside"):
        load_config_dataset(config)
    config = config.replace(**{"data.allow_outside_root": True})
    dataset = load_config_dataset(config)
    assert dataset.train[0].meta == {"who": "René"} and len(dataset.gallery) == 1
