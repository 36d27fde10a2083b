"""Published benchmarks read as their archives unpack: tiny trees in the official layouts.

Each fixture writes the folders, lists and file names of the official archive (a few 8x4
images instead of thousands) next to the extra files the archive carries, so the readers are
tested against what users download.
"""

from __future__ import annotations

import io
import logging
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from reid_platform.config import ConfigError, load_config
from reid_platform.data.formats import (
    DatasetError,
    Sample,
    detect_format,
    load_cuhk03,
    load_dataset,
    load_dukemtmc,
    load_folder,
    load_msmt17,
    load_vehicleid,
    load_veri776,
    stratified_test_ids,
)
from reid_platform.data.root import load_config_dataset, resolve_data_root


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 8), (90, 120, 150)).save(buffer, format="JPEG")
    return buffer.getvalue()


JPEG = _jpeg()


def touch_images(folder: Path, names: list[str]) -> None:
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(JPEG)  # every reader tested here goes by names, not pixels


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def triples(samples: list[Sample]) -> list[tuple[str, int, int]]:
    return sorted((Path(s.path).name, s.pid, s.camid) for s in samples)


# ---- DukeMTMC-reID -------------------------------------------------------------------------


@pytest.fixture
def duke_tree(tmp_path) -> Path:
    """`DukeMTMC-reID.zip` unpacked: one folder with the three splits and its license files."""
    root = tmp_path / "DukeMTMC-reID"
    touch_images(root / "bounding_box_train", [
        "0001_c2_f0046182.jpg", "0001_c5_f0051341.jpg", "0002_c1_f0044971.jpg",
        "0002_c1_f0045027.jpg", "0002_c8_f0168547.jpg",
    ])
    touch_images(root / "query", ["0005_c2_f0046985.jpg", "0019_c1_f0047421.jpg"])
    touch_images(root / "bounding_box_test", [
        "0005_c5_f0051781.jpg", "0005_c2_f0047103.jpg", "0019_c6_f0087113.jpg",
        "0021_c7_f0106219.jpg",  # a gallery-only identity (Duke's distractor ids)
    ])
    for name in ("CITATION.txt", "LICENSE_DukeMTMC.txt", "LICENSE_DukeMTMC-reID.txt"):
        (root / name).write_text("text")
    return tmp_path


def test_dukemtmc_official_layout(duke_tree):
    dataset = load_dukemtmc(duke_tree)  # the folder the zip was unpacked in
    assert dataset.root == duke_tree / "DukeMTMC-reID" and dataset.name == "DukeMTMC-reID"
    assert triples(dataset.train) == [
        ("0001_c2_f0046182.jpg", 1, 1), ("0001_c5_f0051341.jpg", 1, 4),
        ("0002_c1_f0044971.jpg", 2, 0), ("0002_c1_f0045027.jpg", 2, 0),
        ("0002_c8_f0168547.jpg", 2, 7),
    ]
    assert triples(dataset.query) == [
        ("0005_c2_f0046985.jpg", 5, 1), ("0019_c1_f0047421.jpg", 19, 0),
    ]
    assert Counter(s.pid for s in dataset.gallery) == {5: 2, 19: 1, 21: 1}
    assert {s.split for s in dataset.gallery} == {"gallery"} and not dataset.notes
    assert dataset.query[0].item_id == "query/0005_c2_f0046985.jpg"
    assert detect_format(duke_tree) == "market1501"  # same layout, same reader
    assert triples(load_dataset(duke_tree, "dukemtmc").gallery) == triples(dataset.gallery)


def test_dukemtmc_missing_split_names_folder(duke_tree):
    for path in (duke_tree / "DukeMTMC-reID" / "query").iterdir():
        path.unlink()
    (duke_tree / "DukeMTMC-reID" / "query").rmdir()
    with pytest.raises(DatasetError, match=r"DukeMTMC-reID/query: missing; a DukeMTMC-reID tree"):
        load_dukemtmc(duke_tree)


# ---- MSMT17 --------------------------------------------------------------------------------

MSMT17_TRAIN = {  # list file -> (image path under the train folder, pid)
    "list_train.txt": [
        ("0000/0000_000_01_0303morning_0015_0.jpg", 0),
        ("0000/0000_001_01_0303morning_0016_0.jpg", 0),
        ("0000/0000_002_07_0303noon_0901_1.jpg", 0),
        ("0001/0001_000_03_0303morning_0422_0.jpg", 1),
        ("0001/0001_001_15_0303afternoon_1021_2.jpg", 1),
    ],
    "list_val.txt": [
        ("0002/0002_000_02_0303morning_0101_0.jpg", 2),
        ("0002/0002_001_04_0303morning_0102_0.jpg", 2),
    ],
}
MSMT17_TEST = {
    "list_query.txt": [
        ("0000/0000_000_05_0303morning_0321_0.jpg", 0),
        ("0001/0001_000_11_0303noon_0222_0.jpg", 1),
    ],
    "list_gallery.txt": [
        ("0000/0000_001_06_0303morning_0522_0.jpg", 0),
        ("0000/0000_002_05_0303morning_0323_0.jpg", 0),
        ("0001/0001_001_12_0303noon_0301_1.jpg", 1),
        ("0002/0002_000_14_0303afternoon_0001_0.jpg", 2),
    ],
}


MSMT17_VERSIONS_TRAIN = {"MSMT17_V1": "train", "MSMT17_V2": "mask_train_v2"}
MSMT17_VERSIONS_TEST = {"MSMT17_V1": "test", "MSMT17_V2": "mask_test_v2"}


def make_msmt17(parent: Path, version: str) -> Path:
    """`MSMT17_V1.tar.gz` (train/, test/) or `MSMT17_V2.tar.gz` (mask_*_v2/) unpacked."""
    train_dir, test_dir = MSMT17_VERSIONS_TRAIN[version], MSMT17_VERSIONS_TEST[version]
    base = parent / version
    for lists, folder in ((MSMT17_TRAIN, train_dir), (MSMT17_TEST, test_dir)):
        for list_name, rows in lists.items():
            touch_images(base / folder, [path for path, _ in rows])
            write_lines(base / list_name, [f"{path} {pid}" for path, pid in rows])
    return base


@pytest.mark.parametrize("version", ["MSMT17_V1", "MSMT17_V2"])
def test_msmt17_official_layout(tmp_path, version):
    base = make_msmt17(tmp_path / "msmt17", version)
    # the not-listed image is not read (lists are the protocol)
    touch_images(base / MSMT17_VERSIONS_TRAIN[version], ["0009/0009_000_01_0303morning_0001_0.jpg"])
    for root in (tmp_path / "msmt17", base):
        dataset = load_msmt17(root)
        assert dataset.root == base and dataset.name == version
        assert triples(dataset.train) == [
            ("0000_000_01_0303morning_0015_0.jpg", 0, 0),
            ("0000_001_01_0303morning_0016_0.jpg", 0, 0),
            ("0000_002_07_0303noon_0901_1.jpg", 0, 6),
            ("0001_000_03_0303morning_0422_0.jpg", 1, 2),
            ("0001_001_15_0303afternoon_1021_2.jpg", 1, 14),
        ]
        assert triples(dataset.query) == [
            ("0000_000_05_0303morning_0321_0.jpg", 0, 4),
            ("0001_000_11_0303noon_0222_0.jpg", 1, 10),
        ]
        assert [s.pid for s in dataset.gallery] == [0, 0, 1, 2]
        assert [s.camid for s in dataset.gallery] == [5, 4, 11, 13]
        assert all(Path(s.path).is_file() for s in dataset.gallery)
    assert dataset.query[0].item_id.startswith(MSMT17_VERSIONS_TEST[version] + "/0000/")
    with_val = load_msmt17(base, include_val=True)
    assert len(with_val.train) == 7 and Counter(s.pid for s in with_val.train)[2] == 2
    assert detect_format(tmp_path / "msmt17") == "msmt17"
    loaded = load_dataset(base, "msmt17", msmt17_include_val=True)
    assert triples(loaded.train) == triples(with_val.train)
    assert load_msmt17(base, need_train=False).train == []



def test_msmt17_errors_name_list_and_line(tmp_path):
    base = make_msmt17(tmp_path, "MSMT17_V1")
    query_list = base / "list_query.txt"
    lines = query_list.read_text().splitlines()
    write_lines(query_list, [*lines, "0001/0001_004_02_0303noon_0001_0.jpg 1"])
    with pytest.raises(DatasetError, match=re.escape(f"{query_list}:3: ") + ".*does not exist"
                       r".*\(1 listed image\(s\) missing"):
        load_msmt17(base)
    for bad, message in [
        ("0001/0001_004_02_0303noon_0001_0.jpg", "expected '<image path> <pid>'"),
        ("0001/0001_004_02_0303noon_0001_0.jpg one", "pid 'one' must be an integer"),
        ("0001/person.jpg 1", "'0001/person.jpg' does not follow the MSMT17 name rule"),
    ]:
        write_lines(query_list, [*lines, bad])
        with pytest.raises(DatasetError, match=re.escape(f"{query_list}:3: {message}")):
            load_msmt17(base)
    (base / "list_query.txt").unlink()
    with pytest.raises(DatasetError, match="not an MSMT17 tree; expected MSMT17_V1/"):
        load_msmt17(tmp_path)


# ---- CUHK03-NP -----------------------------------------------------------------------------

CUHK03_NP = {
    "labeled": {
        "bounding_box_train": ["0001_c1_1.png", "0001_c1_2.png", "0001_c2_1.png",
                               "0003_c1_1.png", "0003_c2_1.png", "0003_c2_2.png"],
        "query": ["0005_c1_1.png", "0008_c2_1.png"],
        "bounding_box_test": ["0005_c2_1.png", "0005_c2_2.png", "0008_c1_1.png"],
    },
    "detected": {  # the detector lost a box: detected counts differ from labeled ones
        "bounding_box_train": ["0001_c1_1.png", "0001_c2_1.png",
                               "0003_c1_1.png", "0003_c2_1.png", "0003_c2_2.png"],
        "query": ["0005_c1_1.png", "0008_c2_1.png"],
        "bounding_box_test": ["0005_c2_1.png", "0008_c1_1.png", "0008_c1_2.png"],
    },
}


@pytest.fixture
def cuhk03_tree(tmp_path) -> Path:
    """`cuhk03-np.zip` unpacked: labeled/ and detected/, each in the Market-1501 layout."""
    for variant, folders in CUHK03_NP.items():
        for folder, names in folders.items():
            touch_images(tmp_path / "cuhk03-np" / variant / folder, names)
    return tmp_path


@pytest.mark.parametrize("variant", ["labeled", "detected"])
def test_cuhk03_np_official_layout(cuhk03_tree, variant):
    expected = CUHK03_NP[variant]
    for root in (cuhk03_tree, cuhk03_tree / "cuhk03-np", cuhk03_tree / "cuhk03-np" / variant):
        dataset = load_cuhk03(root, variant)
        assert dataset.root == cuhk03_tree / "cuhk03-np" / variant
        assert dataset.name == f"cuhk03-np-{variant}"
        for split, folder in (("train", "bounding_box_train"), ("query", "query"),
                              ("gallery", "bounding_box_test")):
            samples = getattr(dataset, split)
            assert sorted(Path(s.path).name for s in samples) == sorted(expected[folder])
            for s in samples:
                name = Path(s.path).name
                assert (s.pid, s.camid) == (int(name[:4]), int(name[6]) - 1)
    assert dataset.num_train_pids == 2 and {s.camid for s in dataset.train} == {0, 1}
    assert detect_format(cuhk03_tree) == "cuhk03"
    loaded = load_dataset(cuhk03_tree, "cuhk03", cuhk03_variant=variant)
    assert triples(loaded.gallery) == triples(dataset.gallery)


def test_cuhk03_variant_errors(cuhk03_tree):
    with pytest.raises(DatasetError, match="this is the labeled half of CUHK03-NP but the "
                       "detected one was asked for"):
        load_cuhk03(cuhk03_tree / "cuhk03-np" / "labeled", "detected")
    with pytest.raises(DatasetError, match=r"must be one of \['labeled', 'detected'\]"):
        load_cuhk03(cuhk03_tree, "classic")
    with pytest.raises(DatasetError, match="not a CUHK03-NP tree; expected detected/bounding"):
        load_cuhk03(cuhk03_tree / "cuhk03-np" / "labeled" / "query", "detected")


# ---- VeRi-776 ------------------------------------------------------------------------------

VERI = {
    ("image_train", "name_train.txt"): [
        "0001_c001_00016450_0.jpg", "0001_c002_00016460_0.jpg", "0002_c001_00018230_1.jpg",
        "0002_c019_00065770_0.jpg",
    ],
    ("image_query", "name_query.txt"): ["0002_c002_00030600_0.jpg", "0010_c020_00086640_0.jpg"],
    ("image_test", "name_test.txt"): [
        "0002_c002_00030605_1.jpg", "0002_c003_00084145_0.jpg", "0010_c004_00021190_0.jpg",
        "0013_c010_00045000_0.jpg",
    ],
}


@pytest.fixture
def veri_tree(tmp_path) -> Path:
    """`VeRi.zip` unpacked: three image folders, their name lists and the label files."""
    root = tmp_path / "VeRi"
    for (folder, list_name), names in VERI.items():
        touch_images(root / folder, names)
        write_lines(root / list_name, names)
    for name in ("camera_ID.txt", "gt_image.txt", "jk_image.txt", "train_label.xml"):
        (root / name).write_text("")
    return tmp_path


def test_veri776_official_layout(veri_tree):
    root = veri_tree / "VeRi"
    touch_images(root / "image_train", ["0003_c005_00001000_0.jpg"])  # in no list: ignored
    dataset = load_veri776(veri_tree)
    assert dataset.root == root and dataset.name == "VeRi"
    assert triples(dataset.train) == [
        ("0001_c001_00016450_0.jpg", 1, 0), ("0001_c002_00016460_0.jpg", 1, 1),
        ("0002_c001_00018230_1.jpg", 2, 0), ("0002_c019_00065770_0.jpg", 2, 18),
    ]
    assert triples(dataset.query) == [("0002_c002_00030600_0.jpg", 2, 1),
                                      ("0010_c020_00086640_0.jpg", 10, 19)]
    assert [(s.pid, s.camid) for s in dataset.gallery] == [(2, 1), (2, 2), (10, 3), (13, 9)]
    assert dataset.gallery[0].item_id == "image_test/0002_c002_00030605_1.jpg"
    assert dataset.notes == [
        f"{root}: ignored 1 image(s) not in name_train.txt (e.g. "
        "image_train/0003_c005_00001000_0.jpg)"
    ]
    assert detect_format(veri_tree) == "veri776"
    # without the lists, every image of a folder is read
    (root / "name_train.txt").unlink()
    assert len(load_dataset(root, "veri776").train) == 5


def test_veri776_errors_name_list_and_line(veri_tree):
    root = veri_tree / "VeRi"
    write_lines(root / "name_query.txt", [*VERI[("image_query", "name_query.txt")],
                                          "0011_c003_00001111_0.jpg"])
    with pytest.raises(DatasetError, match=re.escape(f"{root / 'name_query.txt'}:3: ")
                       + ".*0011_c003_00001111_0.jpg does not exist"):
        load_veri776(root)
    write_lines(root / "name_query.txt", ["0002_x002_00030600_0.jpg"])
    with pytest.raises(DatasetError, match=re.escape(f"{root / 'name_query.txt'}:1: ")
                       + ".*VeRi-776 name rule"):
        load_veri776(root)
    with pytest.raises(DatasetError, match="image_train: missing; a VeRi-776 tree"):
        load_veri776(root / "image_query")


# ---- VehicleID -----------------------------------------------------------------------------


@pytest.fixture
def vehicleid_tree(tmp_path) -> Path:
    """`VehicleID_V1.0` unpacked: image/, attribute/ and train_test_split/ lists."""
    root = tmp_path / "VehicleID_V1.0"
    train = [(f"{n:07d}", 1 + n // 3) for n in range(1, 10)]  # vehicles 1..4
    tests = {  # the test lists nest: 1600 holds 800's vehicles and more
        800: [(f"{n:07d}", 100 + n % 3) for n in range(20, 29)],
        1600: [(f"{n:07d}", 100 + n % 5) for n in range(20, 35)],
        2400: [(f"{n:07d}", 100 + n % 7) for n in range(20, 41)],
    }
    touch_images(root / "image", [f"{name}.jpg" for name, _ in train])
    touch_images(root / "image", [f"{name}.jpg" for name, _ in tests[2400]])
    split = root / "train_test_split"
    write_lines(split / "train_list.txt", [f"{name} {vid}" for name, vid in train])
    for size, rows in tests.items():
        write_lines(split / f"test_list_{size}.txt", [f"{name} {vid}" for name, vid in rows])
    write_lines(root / "attribute" / "model_attr.txt", ["1 3"])
    return tmp_path


@pytest.mark.parametrize("size,vehicles,images", [(800, 3, 9), (1600, 5, 15), (2400, 7, 21)])
def test_vehicleid_official_layout(vehicleid_tree, size, vehicles, images):
    dataset = load_vehicleid(vehicleid_tree, size)
    assert dataset.name == f"VehicleID_V1.0-{size}"
    assert len(dataset.train) == 9 and dataset.num_train_pids == 4
    assert {s.camid for s in dataset.train} == {0}
    # the protocol: one random image of every test vehicle in the gallery, the rest query
    assert len(dataset.gallery) == vehicles and len(dataset.query) == images - vehicles
    assert Counter(s.pid for s in dataset.gallery) == {100 + v: 1 for v in range(vehicles)}
    assert {s.pid for s in dataset.query} == {100 + v for v in range(vehicles)}
    assert not {s.path for s in dataset.query} & {s.path for s in dataset.gallery}
    assert {s.camid for s in dataset.query} == {0} and {s.camid for s in dataset.gallery} == {1}
    assert dataset.gallery[0].item_id.startswith("image/00000")
    # the draw is reproducible per trial and differs between trials
    again = load_vehicleid(vehicleid_tree / "VehicleID_V1.0", size)
    assert triples(again.gallery) == triples(dataset.gallery)
    draws = {tuple(triples(load_vehicleid(vehicleid_tree, size, t).gallery)) for t in range(6)}
    assert len(draws) > 1
    assert detect_format(vehicleid_tree) == "vehicleid"
    loaded = load_dataset(vehicleid_tree, "vehicleid", vehicleid_test_size=size)
    assert triples(loaded.query) == triples(dataset.query)


def test_vehicleid_errors(vehicleid_tree):
    root = vehicleid_tree / "VehicleID_V1.0"
    with pytest.raises(DatasetError, match=r"test_list_3200.txt: missing; the test sizes here "
                       r"are \[800, 1600, 2400\]"):
        load_vehicleid(root, 3200)
    listing = root / "train_test_split" / "test_list_800.txt"
    write_lines(listing, ["0000020 100", "0000021"])
    with pytest.raises(DatasetError, match=re.escape(f"{listing}:2: expected '<image name> "
                                                     "<vehicle id>'")):
        load_vehicleid(root)
    write_lines(listing, ["0000020 100", "0009999 100"])
    with pytest.raises(DatasetError, match=re.escape(f"{listing}:2: ") + ".*0009999.jpg does not"):
        load_vehicleid(root)
    with pytest.raises(DatasetError, match="not a VehicleID tree"):
        load_vehicleid(root / "image")


# ---- folder split stratified by image count ------------------------------------------------


def test_stratified_test_ids_mix_rare_and_frequent_identities():
    counts = {f"small{n}": 2 for n in range(4)} | {f"large{n}": 30 for n in range(4)}
    counts |= {"single": 1}
    held_out = stratified_test_ids(counts, 0.5)
    assert len(held_out) == 4 and "single" not in held_out
    assert sum(name.startswith("small") for name in held_out) == 2  # two of each stratum
    assert stratified_test_ids(counts, 0.5) == held_out  # stable
    assert len(stratified_test_ids(counts, 0.25)) == 2
    assert stratified_test_ids(counts, 0.0) == set()
    assert len(stratified_test_ids(counts, 0.01)) == 1  # any positive fraction holds one out
    assert stratified_test_ids(counts, 1.0) == set(counts) - {"single"}


def test_tiny_folder_split_is_stratified(tmp_path):
    root = tmp_path / "ids"
    sizes = {"ant": 2, "bee": 2, "cat": 3, "dog": 3, "eel": 9, "fox": 9}
    for ident, n in sizes.items():
        touch_images(root / ident, [f"{k}.jpg" for k in range(n)])
    dataset = load_folder(root, test_fraction=0.5)
    test_ids = {s.meta["identity"] for s in dataset.query}
    train_ids = {s.meta["identity"] for s in dataset.train}
    assert len(test_ids) == 3 and train_ids == set(sizes) - test_ids
    # one identity of each size on either side
    assert sorted(sizes[i] for i in test_ids) == [2, 3, 9] == sorted(sizes[i] for i in train_ids)
    assert len(dataset.query) == 3 and len(dataset.gallery) == 14 - 3


# ---- ignored files are reported once -------------------------------------------------------


def test_ignored_files_and_empty_identity_folders_reported_once(tmp_path, caplog):
    root = tmp_path / "ids"
    for ident in ("a", "b", "c"):
        touch_images(root / ident, ["0.jpg", "1.jpg"])
    (root / "a" / "notes.txt").write_text("")
    (root / "b" / "Thumbs.db").write_text("")
    (root / "empty1").mkdir()
    (root / "empty2").mkdir()
    (root / "labels.xlsx").write_text("")
    config = load_config(None, [f"data.root={root}", "data.format=folder"])
    with caplog.at_level(logging.WARNING, logger="reid_platform.data.root"):
        dataset = load_config_dataset(config)
    assert dataset.notes == [  # one line per reason, in the order first met
        f"{root}: ignored 2 non-image file(s) (e.g. a/notes.txt)",
        f"{root}: ignored 2 identity folder(s) without images (e.g. empty1/)",
        f"{root}: ignored 1 file(s) outside identity folders (e.g. labels.xlsx)",
    ]
    assert [r.getMessage() for r in caplog.records] == [
        f"[data] warning: {note}" for note in dataset.notes
    ]
    caplog.clear()
    load_config_dataset(config, report=False)
    assert not caplog.records


def test_market_ignored_files_reported(tmp_path):
    root = tmp_path / "market"
    touch_images(root / "bounding_box_train",
                 ["0002_c1s1_000151_00.jpg", "0002_c2s1_000201_01.jpg"])
    touch_images(root / "query", ["0005_c1s2_000101_00.jpg", "._0005_c1s2_000101_00.jpg"])
    touch_images(root / "bounding_box_test", ["0005_c3s1_000301_00.jpg"])
    for folder in ("bounding_box_train", "bounding_box_test"):
        (root / folder / "Thumbs.db").write_text("")
    dataset = load_dataset(root, "market1501")
    assert len(dataset.query) == 1
    assert dataset.notes == [
        f"{root}: ignored 2 non-image file(s) (e.g. bounding_box_train/Thumbs.db)",
        f"{root}: ignored 1 hidden file(s) (e.g. query/._0005_c1s2_000101_00.jpg)",
    ]


# ---- cross-domain evaluation ---------------------------------------------------------------


def test_cross_domain_train_on_one_evaluate_on_another(tiny_market, duke_tree, tmp_path):
    config = load_config(None, [f"data.root={tiny_market}", "data.format=market1501",
                                f"data.eval_root={duke_tree}"])
    config = resolve_data_root(config, progress=False)
    assert config.data.eval_root == str(duke_tree.resolve())
    dataset = load_config_dataset(config)
    market = load_dataset(tiny_market, "market1501")
    assert triples(dataset.train) == triples(market.train)  # trained on Market-1501
    duke = load_dukemtmc(duke_tree)
    assert triples(dataset.query) == triples(duke.query)  # evaluated on Duke
    assert triples(dataset.gallery) == triples(duke.gallery)
    assert dataset.root == market.root and dataset.eval_root == duke.root
    assert "query and gallery from DukeMTMC-reID at" in dataset.summary()
    explicit = config.replace(**{"data.eval_format": "dukemtmc"})
    assert triples(load_config_dataset(explicit).query) == triples(duke.query)

    # a folder-per-identity target: every identity is a test identity, singles distract
    target = tmp_path / "target"
    touch_images(target / "x", ["0.jpg", "1.jpg", "2.jpg"])
    touch_images(target / "y", ["0.jpg", "1.jpg"])
    touch_images(target / "z", ["0.jpg"])
    dataset = load_config_dataset(config.replace(**{"data.eval_root": str(target)}))
    assert sorted(s.meta["identity"] for s in dataset.query) == ["x", "y"]
    assert Counter(s.meta["identity"] for s in dataset.gallery) == {"x": 2, "y": 1, "z": 1}
    assert triples(dataset.train) == triples(market.train)


def test_cross_domain_target_needs_no_training_split(tiny_market, tmp_path):
    target = tmp_path / "veri_test_only"
    for (folder, list_name), names in VERI.items():
        if folder != "image_train":
            touch_images(target / folder, names)
            write_lines(target / list_name, names)
    config = load_config(None, [f"data.root={tiny_market}", "data.format=market1501",
                                f"data.eval_root={target}", "data.eval_format=veri776"])
    dataset = load_config_dataset(config)
    assert len(dataset.query) == 2 and len(dataset.gallery) == 4 and dataset.train


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["data.eval_format=veri776"], "data.eval_format=veri776 needs data.eval_root"),
        (["data.max_images_per_id=2", "data.num_instances=4"],
         r"data.max_images_per_id=2 must be 0 \(off\) or at least data.num_instances=4"),
        (["data.max_images_per_id=-1"], "data.max_images_per_id=-1"),
        (["data.test_fraction=1.5"], r"data.test_fraction=1.5 must be in \[0, 1\]"),
        (["data.csv_encoding=klingon"], "data.csv_encoding='klingon' is not a known"),
        (["data.vehicleid_trial=-1"], "data.vehicleid_trial=-1"),
    ],
)
def test_contradicting_data_keys_are_config_errors(tiny_market, overrides, message):
    config = load_config(None, [f"data.root={tiny_market}", "data.format=market1501",
                                *overrides])
    with pytest.raises(ConfigError, match=message):
        resolve_data_root(config, progress=False)
    with pytest.raises(ConfigError, match=message):
        load_config_dataset(config)


def test_evaluation_of_a_checkpoint_on_another_dataset(tiny_market, veri_tree, tmp_path):
    """jobs/evaluate.py's pipeline: a Market-1501 checkpoint scored on VeRi-776's test set."""
    import torch

    from reid_platform.checkpoint import save_checkpoint
    from reid_platform.evaluation import EvalOptions
    from reid_platform.evaluation.pipeline import read_checkpoint_input, run_evaluation
    from reid_platform.models import build_model

    config = load_config(None, [
        "model.backbone=test_resnet", f"data.root={tiny_market}", "data.format=market1501",
        "data.height=64", "data.width=32", "data.loader_workers=0",
    ])
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "ckpt", build_model(config.model, num_classes=12), config,
                           epoch=1)
    stored = read_checkpoint_input(path)
    target = stored.config.replace(**{"data.eval_root": str(veri_tree)})  # --set data.eval_root
    outcome = run_evaluation(
        [replace(stored, config=target)], EvalOptions(), tmp_path / "out", device="cpu",
        scatter="pca", progress=False,
    )
    report = outcome.report
    assert (report["num_query"], report["num_gallery"]) == (2, 4)  # VeRi's, not Market's
    raw = report["variants"]["raw"]
    # both queries have a match from another camera (0002_c002's same-camera twin is junk)
    assert raw["num_valid_queries"] == 2 and raw["num_skipped_queries"] == 0


def test_named_format_finds_the_archive_folder_among_many(tmp_path, duke_tree):
    holder = tmp_path / "datasets"
    holder.mkdir()
    (duke_tree / "DukeMTMC-reID").rename(holder / "DukeMTMC-reID")
    for n in range(20):
        (holder / f"other{n:02d}").mkdir()
    assert len(load_dukemtmc(holder).train) == 5
    # detection does not probe folders with that many subfolders (a folder per identity)
    assert detect_format(holder) == "folder"
