"""Dataset formats users have, read as they ship into one list of `Sample`s per split.

| format | what the archive unpacks to (the root may also be the folder holding it) |
|---|---|
| `market1501` | `bounding_box_train/`, `query/`, `bounding_box_test/`, `PPPP_cCsS_FFFFFF_NN.jpg` |
| `dukemtmc` | DukeMTMC-reID: the Market-1501 layout, `PPPP_cC_fFFFFFFF.jpg` |
| `msmt17` | `MSMT17_V1/{train,test}/` or `MSMT17_V2/{mask_train_v2,mask_test_v2}/` + `list_*.txt` |
| `cuhk03` | cuhk03-np (new protocol): `{labeled,detected}/` each in the Market-1501 layout |
| `veri776` | `image_train/`, `image_query/`, `image_test/` + `name_{train,query,test}.txt` |
| `vehicleid` | `image/*.jpg` + `train_test_split/{train_list,test_list_800,...}.txt` |
| `folder` | `root/<identity>/*.jpg` or `root/{train,query,gallery}/<identity>/*.jpg` |
| `csv` | a manifest `path,pid,camid,split[,x,y,w,h][,id][,extra...]`, paths relative to it |

pid -1 is junk and pid 0 a distractor (both kept in the gallery, never in training or as
queries). A malformed tree, list or manifest raises `DatasetError` naming the file (and line)
and the rule. What a reader skips (files that are not images, empty identity folders, images
no list names) is counted in `ReidDataset.notes`, one line per reason with a count and an
example, for the caller to report once.
"""

from __future__ import annotations

import codecs
import csv
import io
import math
import os
import re
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
MARKET_NAME = re.compile(r"^(-1|\d+)_c(\d+)(?:s(\d+))?_.*$")
SPLITS = ("train", "query", "gallery")
FORMATS = ("market1501", "dukemtmc", "msmt17", "cuhk03", "veri776", "vehicleid", "folder", "csv")


class DatasetError(ValueError):
    """A dataset tree or manifest breaks a rule; the message names the file or line."""


@dataclass(frozen=True)
class Sample:
    """One image: `pid` and `camid` as in the source (train pids relabelled by `balance`)."""

    path: str
    pid: int
    camid: int
    split: str
    box: tuple[int, int, int, int] | None = None  # x, y, w, h crop in pixels
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    item_id: str = ""  # stable string id: path relative to the root unless the manifest says


@dataclass
class ReidDataset:
    """Train, query and gallery samples of one dataset (or, cross-domain, of two).

    `notes` lists what the reader skipped, one line per reason. With a cross-domain
    evaluation, `eval_name` and `eval_root` say where query and gallery come from.
    """

    name: str
    root: Path
    train: list[Sample]
    query: list[Sample]
    gallery: list[Sample]
    notes: list[str] = field(default_factory=list)
    eval_name: str = ""
    eval_root: Path | None = None

    @property
    def num_train_pids(self) -> int:
        return len({s.pid for s in self.train})

    def summary(self) -> str:
        def line(split: str, samples: list[Sample]) -> str:
            pids = {s.pid for s in samples}
            cams = {s.camid for s in samples}
            return (
                f"  {split:<8} {len(pids):>6} ids {len(samples):>8} images {len(cams):>4} cameras"
            )

        lines = [f"dataset {self.name} at {self.root}"]
        if self.eval_root is not None:
            lines.append(f"  query and gallery from {self.eval_name} at {self.eval_root}")
        return "\n".join(lines + [line(n, getattr(self, n)) for n in SPLITS])


class _Skipped:
    """What a reader left out, by reason: a count and the first example of each."""

    def __init__(self, root: Path):
        self.root = root
        self._seen: dict[str, tuple[int, str]] = {}

    def add(self, reason: str, path: Path) -> None:
        count, example = self._seen.get(reason, (0, ""))
        if not example:
            inside = path.is_relative_to(self.root)
            example = str(path.relative_to(self.root) if inside else path)
            example += "/" if path.is_dir() else ""
        self._seen[reason] = (count + 1, example)

    def notes(self) -> list[str]:
        return [
            f"{self.root}: ignored {count} {reason} (e.g. {example})"
            for reason, (count, example) in self._seen.items()
        ]


class _Listing:
    """Existence checks for the images a list names, reading each folder once (one stat per
    image is slow for 100k+ images on a network file system); missing ones are counted."""

    def __init__(self) -> None:
        self._names: dict[Path, set[str]] = {}
        self.missing = 0
        self.first_missing = ""

    def names(self, folder: Path) -> set[str]:
        if folder not in self._names:
            try:
                self._names[folder] = set(os.listdir(folder))
            except OSError:
                self._names[folder] = set()
        return self._names[folder]

    def check(self, path: Path, where: str) -> None:
        if path.name not in self.names(path.parent):
            self.missing += 1
            self.first_missing = self.first_missing or f"{where}: {path} does not exist"

    def raise_if_missing(self, hint: str) -> None:
        if self.missing:
            raise DatasetError(
                f"{self.first_missing} ({self.missing} listed image(s) missing in all); {hint}"
            )


MAX_HOLDER_SUBFOLDERS = 16


def _find_layout(
    root: Path, has_layout: Callable[[Path], bool], max_subfolders: int = 0
) -> Path | None:
    """`root` if it has the layout, else its only subfolder that has it (archives unpack into
    a versioned folder, and users point at either), else None.

    With `max_subfolders`, a folder with more subfolders than that is not searched
    (`detect_format`: such a folder is a dataset itself, a folder per identity, and probing
    every subfolder for every layout would cost seconds).
    """
    if has_layout(root):
        return root
    subfolders = []
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.is_dir():
                subfolders.append(Path(entry.path))
                if max_subfolders and len(subfolders) > max_subfolders:
                    return None
    inner = [p for p in sorted(subfolders) if has_layout(p)]
    return inner[0] if len(inner) == 1 else None


def _require_dir(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset root does not exist or is not a directory")
    return root


def _read_text(path: Path, encoding: str = "utf-8", hint: str = "") -> str:
    """The text of a list or manifest; a UTF-8 byte-order mark is dropped.

    Raises:
        DatasetError: unreadable, or bytes that are not valid `encoding` (naming the line).
    """
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DatasetError(f"{path}: cannot read ({err.strerror})") from None
    try:
        codec = codecs.lookup(encoding).name
    except LookupError:
        raise DatasetError(f"{path}: unknown text encoding {encoding!r}") from None
    if codec == "utf-8" and data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]  # Excel writes one; positions stay byte offsets
    try:
        return data.decode(codec)
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - data.rfind(b"\n", 0, err.start)
        raise DatasetError(
            f"{path}:{line}: byte 0x{data[err.start]:02x} (byte {column} of the line) is not valid "
            f"{codec} (the file is in another encoding, e.g. latin-1){hint}"
        ) from None


def _list_lines(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, whitespace-separated fields) of the non-blank lines of a list file."""
    if not path.is_file():
        raise DatasetError(f"{path}: list file missing")
    text = _read_text(path, hint="; convert it to UTF-8")
    return [(n, line.split()) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]


# ---- Market-1501 layout (Market-1501, DukeMTMC-reID, CUHK03-NP) ---------------------------

MARKET_DIRS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}


def _is_market(path: Path) -> bool:
    return (path / "bounding_box_train").is_dir() or (path / "bounding_box_test").is_dir()


def parse_market_name(path: Path) -> tuple[int, int]:
    """(pid, camid) from a Market-1501/Duke/CUHK03-NP style file name; camid is 0-based."""
    match = MARKET_NAME.match(path.name)
    if match is None:
        raise DatasetError(
            f"{path}: file name does not follow the Market-1501 rule PPPP_cCsS_FFFFFF_NN.jpg "
            "(person id, camera, sequence)"
        )
    pid, cam = int(match.group(1)), int(match.group(2))
    if cam < 1:
        raise DatasetError(f"{path}: camera number must start at 1, got c{cam}")
    return pid, cam - 1


def _read_market_layout(root: Path, what: str, need_train: bool) -> ReidDataset:
    skipped = _Skipped(root)
    splits: dict[str, list[Sample]] = {}
    for split, folder in MARKET_DIRS.items():
        splits[split] = []
        if split == "train" and not need_train:
            continue
        directory = root / folder
        if not directory.is_dir():
            raise DatasetError(
                f"{directory}: missing; a {what} tree has {', '.join(MARKET_DIRS.values())}"
            )
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            path = Path(entry.path)
            if entry.name.startswith("."):
                skipped.add("hidden file(s)", path)  # ._* copies macOS leaves behind
                continue
            if not entry.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
                skipped.add("non-image file(s)", path)  # Market-1501 ships Thumbs.db files
                continue
            pid, camid = parse_market_name(path)
            if split != "gallery" and pid <= 0:
                continue  # junk and distractors never train or query
            splits[split].append(
                Sample(str(path), pid, camid, split, item_id=str(path.relative_to(root)))
            )
        if not splits[split]:
            raise DatasetError(f"{directory}: no images with valid identities found")
    return ReidDataset(
        root.name, root, splits["train"], splits["query"], splits["gallery"], skipped.notes()
    )


def load_market1501(root: str | Path, *, need_train: bool = True) -> ReidDataset:
    """Read a Market-1501 tree (Zheng et al., ICCV 2015): 751 training identities (12936
    images), 750 test identities (3368 queries, 19732 gallery images with distractors).

    The layout and name rule as torchreid's `torchreid/data/datasets/image/market1501.py`
    reads them: `bounding_box_train/`, `query/`, `bounding_box_test/`, names
    `PPPP_cCsS_FFFFFF_NN.jpg` (person, camera 1-6, sequence, frame, box); pid -1 is junk,
    0 a distractor. The archive unpacks into `Market-1501-v15.09.15/`: its parent works too.

    Args:
        root: the tree (or the folder holding it).
        need_train: False reads query and gallery only (train is then empty).

    Raises:
        DatasetError: a split folder is missing or empty, or a file name breaks the rule.
    """
    root = _require_dir(root)
    return _read_market_layout(_find_layout(root, _is_market) or root, "Market-1501", need_train)


def load_dukemtmc(root: str | Path, *, need_train: bool = True) -> ReidDataset:
    """Read DukeMTMC-reID (Zheng et al., ICCV 2017): 702 training identities (16522 images),
    702 test identities (2228 queries, 17661 gallery images incl. 408 distractor ids).

    The Market-1501 layout (as torchreid's `dukemtmcreid.py` reads it) unpacked into
    `DukeMTMC-reID/`, names `PPPP_cC_fFFFFFFF.jpg` (person, camera 1-8, frame).

    Raises:
        DatasetError: as `load_market1501`.
    """
    root = _require_dir(root)
    return _read_market_layout(
        _find_layout(root, _is_market) or root, "DukeMTMC-reID", need_train
    )


CUHK03_VARIANTS = ("labeled", "detected")


def load_cuhk03(
    root: str | Path, variant: str = "detected", *, need_train: bool = True
) -> ReidDataset:
    """Read CUHK03 under the new protocol (Zhong et al., CVPR 2017): 767 training and 700
    test identities; labeled boxes 7368 / 1400 / 5328 images (train / query / gallery),
    detected boxes 7365 / 1400 / 5332.

    The layout is the cuhk03-np archive of the re-ranking authors (person-re-ranking,
    `CUHK03-NP/`): `cuhk03-np/{labeled,detected}/` each in the Market-1501 layout with
    names `PPPP_cC_N.png` (camera 1 or 2 of a camera pair), read as the CUHK03-NP readers of
    the public toolkits read it (pid and camera from the name). torchreid's and fast-reid's
    `cuhk03.py` build the same 767/700 split from the raw `cuhk-03.mat` instead.

    Args:
        root: `cuhk03-np/` (holding `labeled/` and `detected/`), its parent, or the variant
            folder itself.
        variant: "labeled" (hand-drawn boxes) or "detected" (DPM detector boxes, the
            toolkits' default and the harder setting).
        need_train: False reads query and gallery only.

    Raises:
        DatasetError: no such variant folder, or one that breaks the Market-1501 rules.
    """
    if variant not in CUHK03_VARIANTS:
        raise DatasetError(f"CUHK03 variant {variant!r} must be one of {list(CUHK03_VARIANTS)}")
    root = _require_dir(root)
    if root.name in CUHK03_VARIANTS and _is_market(root):
        if root.name != variant:
            raise DatasetError(
                f"{root}: this is the {root.name} half of CUHK03-NP but the {variant} one was "
                f"asked for (data.cuhk03_variant); point at the folder holding both"
            )
        base = root
    else:
        holder = _find_layout(root, lambda p: _is_market(p / variant))
        if holder is None:
            raise DatasetError(
                f"{root}: not a CUHK03-NP tree; expected {variant}/bounding_box_train, "
                f"{variant}/query and {variant}/bounding_box_test (the cuhk03-np archive)"
            )
        base = holder / variant
    dataset = _read_market_layout(base, f"CUHK03-NP {variant}", need_train)
    dataset.name = f"{base.parent.name}-{variant}"
    return dataset


# ---- MSMT17 --------------------------------------------------------------------------------

# version folder -> (train images, test images); V2 blurs the faces, nothing else changes
MSMT17_VERSIONS = {"MSMT17_V1": ("train", "test"), "MSMT17_V2": ("mask_train_v2", "mask_test_v2")}


def _msmt17_dirs(folder: Path) -> tuple[Path, Path] | None:
    if not (folder / "list_query.txt").is_file():
        return None
    for train_dir, test_dir in MSMT17_VERSIONS.values():
        if (folder / test_dir).is_dir():
            return folder / train_dir, folder / test_dir
    return None


def _read_msmt17_list(
    list_path: Path, image_dir: Path, split: str, base: Path, listing: _Listing
) -> list[Sample]:
    samples = []
    for line_no, fields in _list_lines(list_path):
        where = f"{list_path}:{line_no}"
        if len(fields) != 2:
            raise DatasetError(f"{where}: expected '<image path> <pid>', got {' '.join(fields)!r}")
        rel, pid_text = fields
        try:
            pid = int(pid_text)
        except ValueError:
            raise DatasetError(f"{where}: pid {pid_text!r} must be an integer") from None
        parts = Path(rel).name.split("_")
        if len(parts) < 3 or not parts[2].isdigit() or int(parts[2]) < 1:
            raise DatasetError(
                f"{where}: {rel!r} does not follow the MSMT17 name rule "
                "PPPP_NNN_CC_DATETIME_FRAME.jpg (camera 01-15 in the third field)"
            )
        path = image_dir / rel
        listing.check(path, where)
        samples.append(
            Sample(str(path), pid, int(parts[2]) - 1, split, item_id=str(path.relative_to(base)))
        )
    if not samples:
        raise DatasetError(f"{list_path}: the list is empty")
    return samples


def load_msmt17(
    root: str | Path, include_val: bool = False, *, need_train: bool = True
) -> ReidDataset:
    """Read MSMT17 (Wei et al., CVPR 2018): 1041 training identities (32621 images: 30248 in
    `list_train.txt`, 2373 in `list_val.txt`), 3060 test identities (11659 queries, 82161
    gallery images), 15 cameras.

    The layout as torchreid's and fast-reid's `msmt17.py` read it: `MSMT17_V1/` with
    `train/`, `test/` or `MSMT17_V2/` with `mask_train_v2/`, `mask_test_v2/`, and in both the
    lists `list_{train,val,query,gallery}.txt` of lines `<pid>/<image name> <pid>`; the camera
    is the third field of the name (`0000_000_01_0303morning_0015_0.jpg`: camera 1). pids
    are kept as listed (train and test count from 0 separately; they never meet).

    Args:
        root: `MSMT17_V1/` or `MSMT17_V2/`, or the folder holding one of them.
        include_val: also train on `list_val.txt` (the toolkits leave it out by default, as
            the published numbers do).
        need_train: False reads query and gallery only.

    Raises:
        DatasetError: not an MSMT17 tree, a malformed list line, or listed images missing.
    """
    root = _require_dir(root)
    base = _find_layout(root, lambda p: _msmt17_dirs(p) is not None)
    if base is None:
        raise DatasetError(
            f"{root}: not an MSMT17 tree; expected MSMT17_V1/ (train/, test/) or MSMT17_V2/ "
            "(mask_train_v2/, mask_test_v2/) with list_train.txt, list_val.txt, "
            "list_query.txt, list_gallery.txt"
        )
    train_dir, test_dir = _msmt17_dirs(base)
    listing = _Listing()
    lists = [("query", test_dir, "list_query.txt"), ("gallery", test_dir, "list_gallery.txt")]
    if need_train:
        lists[:0] = [("train", train_dir, "list_train.txt")]
        if include_val:
            lists.insert(1, ("train", train_dir, "list_val.txt"))
    splits: dict[str, list[Sample]] = {s: [] for s in SPLITS}
    for split, image_dir, list_name in lists:
        splits[split] += _read_msmt17_list(base / list_name, image_dir, split, base, listing)
    listing.raise_if_missing(f"is {base} a complete MSMT17 download?")
    return ReidDataset(base.name, base, splits["train"], splits["query"], splits["gallery"])


# ---- VeRi-776 ------------------------------------------------------------------------------

VERI_SPLITS = {
    "train": ("image_train", "name_train.txt"),
    "query": ("image_query", "name_query.txt"),
    "gallery": ("image_test", "name_test.txt"),
}
VERI_NAME = re.compile(r"^(\d+)_c(\d+)_.*$")


def load_veri776(root: str | Path, *, need_train: bool = True) -> ReidDataset:
    """Read VeRi-776 (Liu et al., ECCV 2016): 576 training vehicles (37778 images), 200 test
    vehicles (1678 queries, 11579 gallery images), 20 cameras.

    The layout as fast-reid's `fastreid/data/datasets/veri.py` reads it: `image_train/`,
    `image_query/`, `image_test/`, names `VVVV_cCCC_FFFFFFFF_N.jpg` (vehicle, camera 1-20,
    frame); the vehicle and camera come from the name. The archive's lists
    `name_train.txt`, `name_query.txt`, `name_test.txt` say which images belong to a split:
    a listed image that is missing is an error, an image no list names is ignored (and
    reported); without a list, every image of the folder is read. The Market-1501 protocol
    used for evaluation is VeRi's own: gallery images of the query's vehicle taken by the
    query's camera are ignored.

    Args:
        root: the `VeRi/` folder, or the folder holding it.
        need_train: False reads query and gallery only.

    Raises:
        DatasetError: a folder missing, a name breaking the rule, or listed images missing.
    """
    root = _require_dir(root)
    base = _find_layout(root, lambda p: (p / "image_test").is_dir()) or root
    skipped = _Skipped(base)
    listing = _Listing()
    splits: dict[str, list[Sample]] = {s: [] for s in SPLITS}
    for split, (folder, list_name) in VERI_SPLITS.items():
        if split == "train" and not need_train:
            continue
        directory, list_path = base / folder, base / list_name
        if not directory.is_dir():
            raise DatasetError(
                f"{directory}: missing; a VeRi-776 tree has image_train/, image_query/, "
                "image_test/ (and name_train.txt, name_query.txt, name_test.txt)"
            )
        on_disk = sorted(n for n in listing.names(directory) if not n.startswith("."))
        if list_path.is_file():
            names = []
            for line_no, fields in _list_lines(list_path):
                if len(fields) != 1:
                    raise DatasetError(
                        f"{list_path}:{line_no}: expected one image name, got {' '.join(fields)!r}"
                    )
                names.append((f"{list_path}:{line_no}", fields[0]))
            for name in sorted(set(on_disk) - {n for _, n in names}):
                if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                    skipped.add(f"image(s) not in {list_name}", directory / name)
                else:
                    skipped.add("non-image file(s)", directory / name)
        else:
            names = []
            for n in on_disk:
                if Path(n).suffix.lower() in IMAGE_SUFFIXES:
                    names.append((str(directory / n), n))
                else:
                    skipped.add("non-image file(s)", directory / n)
        for where, name in names:
            match = VERI_NAME.match(name)
            if match is None or int(match.group(2)) < 1:
                raise DatasetError(
                    f"{where}: {name!r} does not follow the VeRi-776 name rule "
                    "VVVV_cCCC_FFFFFFFF_N.jpg (vehicle id, camera from 1)"
                )
            path = directory / name
            listing.check(path, where)
            samples = splits[split]
            samples.append(
                Sample(str(path), int(match.group(1)), int(match.group(2)) - 1, split,
                       item_id=f"{folder}/{name}")
            )
        if not splits[split]:
            raise DatasetError(f"{directory}: no images")
    listing.raise_if_missing(f"is {base} a complete VeRi-776 download?")
    return ReidDataset(
        base.name, base, splits["train"], splits["query"], splits["gallery"], skipped.notes()
    )


# ---- VehicleID -----------------------------------------------------------------------------


def _read_vehicleid_list(list_path: Path, image_dir: Path, base: Path, listing: _Listing):
    """[(image path, vehicle id, where)] of a VehicleID list `<image name> <vehicle id>`."""
    rows = []
    for line_no, fields in _list_lines(list_path):
        where = f"{list_path}:{line_no}"
        if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
            raise DatasetError(
                f"{where}: expected '<image name> <vehicle id>' (e.g. '0000001 1'), "
                f"got {' '.join(fields)!r}"
            )
        path = image_dir / f"{fields[0]}.jpg"
        listing.check(path, where)
        rows.append((path, int(fields[1])))
    if not rows:
        raise DatasetError(f"{list_path}: the list is empty")
    return rows


def load_vehicleid(
    root: str | Path, test_size: int = 800, trial: int = 0, *, need_train: bool = True
) -> ReidDataset:
    """Read PKU VehicleID (Liu et al., CVPR 2016): 13164 training vehicles (113346 images);
    test lists of 800, 1600 and 2400 vehicles (6493, 13377, 19777 images).

    The layout as fast-reid's `fastreid/data/datasets/vehicleid.py` reads it: `image/` with
    `NNNNNNN.jpg`, `train_test_split/train_list.txt` and `test_list_{800,1600,2400}.txt`,
    lines `<image name without .jpg> <vehicle id>`. There are no cameras.

    VehicleID ships no query / gallery split. Its protocol draws, for every test vehicle,
    one image at random into the gallery and makes the others queries (published numbers
    average 10 such draws). Here the draw is seeded by (`test_size`, `trial`), so training's
    evaluation and `jobs/evaluate.py` see the same split; run trials 0-9 and average them to
    reproduce the protocol. Queries get camid 0 and the gallery camid 1, so no gallery image
    is ignored as same-camera junk: each query has exactly one true match.

    Args:
        root: `VehicleID_V1.0/`, or the folder holding it.
        test_size: which `test_list_<size>.txt` to test on (800, 1600 or 2400).
        trial: which random gallery draw (0, 1, ...).
        need_train: False reads the test list only.

    Raises:
        DatasetError: a list missing or malformed, or listed images missing.
    """
    root = _require_dir(root)
    base = _find_layout(root, lambda p: (p / "train_test_split").is_dir())
    if base is None or not (base / "image").is_dir():
        raise DatasetError(
            f"{root}: not a VehicleID tree; expected image/ and train_test_split/ (with "
            "train_list.txt and test_list_800.txt, test_list_1600.txt, test_list_2400.txt)"
        )
    split_dir, image_dir = base / "train_test_split", base / "image"
    test_list = split_dir / f"test_list_{test_size}.txt"
    if not test_list.is_file():
        sizes = sorted(int(m.group(1)) for p in split_dir.glob("test_list_*.txt")
                       if (m := re.fullmatch(r"test_list_(\d+)\.txt", p.name)))
        raise DatasetError(
            f"{test_list}: missing; the test sizes here are {sizes} (data.vehicleid_test_size)"
        )
    listing = _Listing()
    train = []
    if need_train:
        train = [
            Sample(str(p), vid, 0, "train", item_id=str(p.relative_to(base)))
            for p, vid in _read_vehicleid_list(split_dir / "train_list.txt", image_dir, base,
                                               listing)
        ]
    test = _read_vehicleid_list(test_list, image_dir, base, listing)
    listing.raise_if_missing(f"is {base} a complete VehicleID download?")
    by_vid: dict[int, list[int]] = defaultdict(list)
    for index, (_, vid) in enumerate(test):
        by_vid[vid].append(index)
    rng = np.random.default_rng([test_size, trial])
    in_gallery = {int(rng.choice(by_vid[vid])) for vid in sorted(by_vid)}
    query, gallery = [], []
    for index, (path, vid) in enumerate(test):
        split = "gallery" if index in in_gallery else "query"
        (gallery if split == "gallery" else query).append(
            Sample(str(path), vid, 1 if split == "gallery" else 0, split,
                   item_id=str(path.relative_to(base)))
        )
    return ReidDataset(f"{base.name}-{test_size}", base, train, query, gallery)


# ---- folder per identity ------------------------------------------------------------------


def _images_by_identity(directory: Path, skipped: _Skipped) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        path = Path(entry.path)
        if not entry.is_dir():
            skipped.add("file(s) outside identity folders", path)
            continue
        images = []
        for inner in sorted(os.scandir(path), key=lambda e: e.name):
            if inner.is_file() and Path(inner.name).suffix.lower() in IMAGE_SUFFIXES:
                if not inner.name.startswith("."):
                    images.append(Path(inner.path))
                    continue
            skipped.add("non-image file(s)", Path(inner.path))
        if images:
            out[entry.name] = images
        else:
            skipped.add("identity folder(s) without images", path)
    return out


def _stable_fraction(text: str) -> float:
    return zlib.crc32(text.encode()) / 2**32


def stratified_test_ids(image_counts: dict[str, int], test_fraction: float) -> set[str]:
    """Identities to hold out: `test_fraction` of those with 2+ images, spread over image counts.

    Identities are ordered by (image count, a stable hash of the name) and every
    1/test_fraction-th one is taken (systematic sampling), so train and test get the same
    mix of rare and frequent identities and exactly round(test_fraction * eligible) of
    them, even for a handful of identities, where a hash alone may hold out none, all, or
    only the large ones. The hash keeps the choice stable across runs and machines.

    Args:
        image_counts: {identity name: number of images}.
        test_fraction: in [0, 1]; any positive fraction holds out at least one identity.

    Returns:
        The held-out identity names (identities with one image never are: a test identity
        needs a query and a gallery image).
    """
    eligible = sorted((n, _stable_fraction(name), name) for name, n in image_counts.items()
                      if n >= 2)
    count = min(len(eligible), int(test_fraction * len(eligible) + 0.5))
    if test_fraction > 0 and eligible:
        count = max(count, 1)
    if count == 0:
        return set()
    positions = ((np.arange(count) + 0.5) * len(eligible) / count).astype(int)
    return {eligible[i][2] for i in positions}


def load_folder(
    root: str | Path, test_fraction: float = 0.5, *, need_train: bool = True
) -> ReidDataset:
    """Read `root/<identity>/*` (split by identity) or `root/{train,query,gallery}/<identity>/*`.

    Without explicit splits, `test_fraction` of the identities with 2+ images are held out,
    stratified by image count (`stratified_test_ids`); of each test identity the first image
    is the query and the rest the gallery. With `need_train=False` (a cross-domain target)
    every identity is a test identity and single-image ones join the gallery as distractors.
    Without cameras, query images get camid 0 and gallery images camid 1, so the
    Market-1501 protocol (same pid + same camera is junk) still evaluates.
    """
    root = _require_dir(root)
    skipped = _Skipped(root)
    names: dict[str, dict[str, list[Path]]] = {s: {} for s in SPLITS}
    if (root / "train").is_dir() or (root / "query").is_dir():
        for split in SPLITS:
            if split == "train" and not need_train:
                continue
            if not (root / split).is_dir():
                raise DatasetError(
                    f"{root / split}: missing; a tree split by folders has train/, query/ and "
                    "gallery/, each with <identity>/ folders"
                )
            names[split] = _images_by_identity(root / split, skipped)
    else:
        by_id = _images_by_identity(root, skipped)
        held_out = stratified_test_ids(
            {ident: len(images) for ident, images in by_id.items()},
            test_fraction if need_train else 1.0,
        )
        for ident, images in by_id.items():
            if ident in held_out:
                names["query"][ident] = images[:1]
                names["gallery"][ident] = images[1:]
            elif need_train:
                names["train"][ident] = images
            else:
                names["gallery"][ident] = images  # a distractor
    all_ids = sorted({i for split in names.values() for i in split})
    if not all_ids:
        raise DatasetError(f"{root}: no identity folders with images (expected root/<id>/*.jpg)")
    pid_of = {ident: n for n, ident in enumerate(all_ids)}
    splits: dict[str, list[Sample]] = {}
    for split in SPLITS:
        camid = 1 if split == "gallery" else 0
        splits[split] = [
            Sample(
                str(p),
                pid_of[ident],
                camid,
                split,
                item_id=str(p.relative_to(root)),
                meta={"identity": ident},
            )
            for ident, images in names[split].items()
            for p in images
        ]
        if not splits[split] and (split != "train" or need_train):
            raise DatasetError(f"{root}: the {split} split is empty")
    return ReidDataset(
        root.name, root, splits["train"], splits["query"], splits["gallery"], skipped.notes()
    )


# ---- CSV manifest -------------------------------------------------------------------------

CSV_REQUIRED = ("path", "pid", "camid", "split")
CSV_BOX = ("x", "y", "w", "h")


def parse_box(row: dict[str, str], where: str) -> tuple[int, int, int, int] | None:
    """The x,y,w,h columns of a manifest row in pixels (None when all four are empty).

    Raises:
        DatasetError: naming `where` (file:line) for a value that is not a finite number, a
            negative corner or an empty box.
    """
    if all(row[c] == "" for c in CSV_BOX):
        return None
    values = []
    for column in CSV_BOX:
        try:
            value = float(row[column])
        except ValueError:
            raise DatasetError(
                f"{where}: box x,y,w,h must be numbers, got {column}={row[column]!r}"
            ) from None
        if not math.isfinite(value):
            raise DatasetError(
                f"{where}: box {column}={row[column]!r} must be a finite number of pixels"
            )
        values.append(int(round(value)))
    x, y, w, h = values
    if w <= 0 or h <= 0 or x < 0 or y < 0:
        raise DatasetError(f"{where}: box {(x, y, w, h)} needs x,y >= 0 and w,h > 0")
    return x, y, w, h


def check_unique_ids(samples: Sequence[Sample], where: str, what: str = "ids") -> None:
    """Refuse two samples with one `item_id` (an index or a pseudo-label file keys on it).

    Raises:
        DatasetError: naming `where`, the id and both paths.
    """
    seen: dict[str, str] = {}
    for sample in samples:
        if sample.item_id in seen:
            raise DatasetError(
                f"{where}: id {sample.item_id!r} is used by both {seen[sample.item_id]} and "
                f"{sample.path}; {what} must be unique"
            )
        seen[sample.item_id] = sample.path


def load_csv(
    manifest: str | Path,
    *,
    need_train: bool = True,
    need_test: bool = True,
    allow_outside_root: bool = False,
    encoding: str = "utf-8",
) -> ReidDataset:
    """Read a CSV manifest `path,pid,camid,split[,x,y,w,h][,id][,extra...]`.

    Paths are relative to the CSV's folder, the dataset root; a path that leads outside it
    (`../..`, an absolute path) is refused unless `allow_outside_root` (the check is on the
    written path: symlinks inside the root are followed). `split` is train, query or
    gallery; box columns (all four or none) crop the region of interest, in pixels; an `id`
    column gives item ids; any other column is kept as metadata. camid may be empty: query
    then gets 0 and gallery 1. The file is `encoding` (a UTF-8 byte-order mark is accepted);
    bytes that are not are an error naming the line, as the encoding cannot be guessed
    reliably (latin-1 decodes any bytes, wrongly).

    Args:
        manifest: the CSV file, or a folder holding exactly one.
        need_train: the train split must have rows (not for an evaluation-only dataset).
        need_test: query and gallery must have rows (not for an extra training source).

    Raises:
        DatasetError: naming the file and line of the first row that breaks a rule.
    """
    manifest = Path(manifest)
    if manifest.is_dir():
        found = sorted(manifest.glob("*.csv"))
        if len(found) != 1:
            raise DatasetError(
                f"{manifest}: expected exactly one .csv manifest, found {len(found)}"
            )
        manifest = found[0]
    if not manifest.is_file():
        raise DatasetError(f"{manifest}: manifest does not exist")
    base = manifest.parent
    base_abs = Path(os.path.abspath(base))
    text = _read_text(
        manifest, encoding, hint="; save it as UTF-8 (iconv -f latin1 -t utf-8) or set "
        "data.csv_encoding to its encoding"
    )
    splits: dict[str, list[Sample]] = {s: [] for s in SPLITS}
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in CSV_REQUIRED if c not in header]
        if missing:
            raise DatasetError(
                f"{manifest}: header lacks column(s) {missing}; "
                f"expected {','.join(CSV_REQUIRED)}[,x,y,w,h], got {','.join(header)}"
            )
        has_box = [c in header for c in CSV_BOX]
        if any(has_box) and not all(has_box):
            raise DatasetError(f"{manifest}: box columns must be all of x,y,w,h or none")
        extra = [c for c in header if c not in (*CSV_REQUIRED, *CSV_BOX, "id")]
        for row in reader:
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            where = f"{manifest}:{reader.line_num}"
            split = row["split"]
            if split not in SPLITS:
                raise DatasetError(f"{where}: split {split!r} must be one of {list(SPLITS)}")
            try:
                pid = int(row["pid"])
            except ValueError:
                raise DatasetError(f"{where}: pid {row['pid']!r} must be an integer") from None
            camid_raw = row["camid"]
            try:
                camid = int(camid_raw) if camid_raw != "" else (1 if split == "gallery" else 0)
            except ValueError:
                raise DatasetError(f"{where}: camid {camid_raw!r} must be an integer") from None
            if not row["path"]:
                raise DatasetError(f"{where}: path is empty")
            path = base / row["path"]
            resolved = Path(os.path.normpath(base_abs / row["path"]))
            if not allow_outside_root and not resolved.is_relative_to(base_abs):
                raise DatasetError(
                    f"{where}: path {row['path']!r} leads outside the dataset root {base_abs} "
                    f"(to {resolved}); set data.allow_outside_root: true to allow it"
                )
            box = parse_box(row, where) if all(has_box) else None
            if split != "gallery" and pid < 0:
                continue  # junk in the manifest: gallery only
            meta = {c: row[c] for c in extra}
            splits[split].append(
                Sample(
                    str(path),
                    pid,
                    camid,
                    split,
                    box=box,
                    meta=meta,
                    item_id=row.get("id") or row["path"],
                )
            )
    except csv.Error as err:
        raise DatasetError(f"{manifest}:{reader.line_num}: not valid CSV ({err})") from None
    for split, samples in splits.items():
        needed = need_train if split == "train" else need_test
        if not samples and needed:
            raise DatasetError(f"{manifest}: no rows with split={split}")
    return ReidDataset(manifest.stem, base, splits["train"], splits["query"], splits["gallery"])


# ---- entry point and balancing -----------------------------------------------------------


def detect_format(root: str | Path) -> str:
    """Guess the format (one of FORMATS but `dukemtmc`, read as `market1501`) from the disk.

    Raises:
        DatasetError: nothing at `root`.
    """
    root = Path(root)
    if root.is_file() and root.suffix.lower() == ".csv":
        return "csv"
    if not root.is_dir():
        raise DatasetError(f"{root}: no dataset here (expected a directory or a .csv manifest)")
    layouts = [
        ("msmt17", lambda p: _msmt17_dirs(p) is not None),
        ("vehicleid", lambda p: (p / "train_test_split").is_dir()),
        ("veri776", lambda p: (p / "image_test").is_dir()),
        ("cuhk03", lambda p: any(_is_market(p / v) for v in CUHK03_VARIANTS)),
        ("market1501", _is_market),
    ]
    for name, has_layout in layouts:
        if _find_layout(root, has_layout, MAX_HOLDER_SUBFOLDERS) is not None:
            return name
    if len(list(root.glob("*.csv"))) == 1:
        return "csv"
    return "folder"


def load_dataset(
    root: str | Path,
    fmt: str = "auto",
    test_fraction: float = 0.5,
    *,
    need_train: bool = True,
    allow_outside_root: bool = False,
    csv_encoding: str = "utf-8",
    cuhk03_variant: str = "detected",
    msmt17_include_val: bool = False,
    vehicleid_test_size: int = 800,
    vehicleid_trial: int = 0,
) -> ReidDataset:
    """Read a dataset in any of FORMATS (or `auto`: `detect_format`; `synthetic` is a
    Market-1501 tree). The keyword options go to the formats they name (see each reader).

    Args:
        need_train: False reads query and gallery only (a cross-domain evaluation target).

    Raises:
        DatasetError: an unknown format, or a tree the format's reader refuses.
    """
    if fmt in ("auto", ""):
        fmt = detect_format(root)
    readers: dict[str, Callable[[], ReidDataset]] = {
        "market1501": lambda: load_market1501(root, need_train=need_train),
        "synthetic": lambda: load_market1501(root, need_train=need_train),
        "dukemtmc": lambda: load_dukemtmc(root, need_train=need_train),
        "msmt17": lambda: load_msmt17(root, msmt17_include_val, need_train=need_train),
        "cuhk03": lambda: load_cuhk03(root, cuhk03_variant, need_train=need_train),
        "veri776": lambda: load_veri776(root, need_train=need_train),
        "vehicleid": lambda: load_vehicleid(
            root, vehicleid_test_size, vehicleid_trial, need_train=need_train
        ),
        "folder": lambda: load_folder(root, test_fraction, need_train=need_train),
        "csv": lambda: load_csv(
            root, need_train=need_train, allow_outside_root=allow_outside_root,
            encoding=csv_encoding,
        ),
    }
    if fmt not in readers:
        raise DatasetError(f"data.format {fmt!r} is not known; choose one of {list(FORMATS)}")
    return readers[fmt]()


def balance(
    samples: list[Sample],
    drop_single_image_ids: bool = True,
    oversample_min: int = 0,
    oversample_max: int = 0,
    oversample_p: float = 0.0,
    seed: int = 0,
) -> tuple[list[Sample], dict[int, int]]:
    """Prepare training samples: drop single-image ids, relabel 0..N-1, oversample rare ids.

    Under-sampling of frequent identities (`data.max_images_per_id`) is not done here but
    per epoch in `PKBatchSampler`, so every epoch sees a different subset.

    Args:
        samples: training samples with source pids.
        drop_single_image_ids: identities with one image cannot form a positive pair.
        oversample_min, oversample_max, oversample_p: each identity with between min and max
            images (inclusive) is duplicated with probability p (a competition trick for
            long-tailed data); 0 turns it off.
        seed: makes the oversampling draw reproducible.

    Returns:
        (samples with contiguous pids 0..N-1, {source pid: new pid}).
    """
    counts = Counter(s.pid for s in samples)
    if drop_single_image_ids:
        samples = [s for s in samples if counts[s.pid] >= 2]
    if not samples:
        raise DatasetError("no training identity has at least 2 images")
    pid_map = {pid: n for n, pid in enumerate(sorted({s.pid for s in samples}))}
    out = [replace(s, pid=pid_map[s.pid]) for s in samples]
    if oversample_p > 0 and oversample_max >= oversample_min > 0:
        rng = np.random.default_rng(seed)
        by_pid: dict[int, list[Sample]] = defaultdict(list)
        for s in out:
            by_pid[s.pid].append(s)
        for pid in sorted(by_pid):
            group = by_pid[pid]
            if oversample_min <= len(group) <= oversample_max and rng.random() < oversample_p:
                out.extend(group)
    return out, pid_map
