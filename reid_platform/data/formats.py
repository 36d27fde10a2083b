"""Dataset formats users have, read into one list of `Sample`s per split.

- Market-1501 layout (also DukeMTMC-reID, MSMT17 exported the same way): `bounding_box_train/`,
  `query/`, `bounding_box_test/`, file names `PPPP_cCsS_FFFFFF_NN.jpg`; pid -1 is junk, pid 0 a
  distractor (both kept in the gallery, never in training).
- Folder per identity: `root/<identity>/*.jpg`, or `root/{train,query,gallery}/<identity>/*.jpg`.
- CSV manifest: header `path,pid,camid,split[,x,y,w,h][,extra...]`, paths relative to the CSV.

A malformed tree or manifest raises `DatasetError` naming the file or line and the rule.
"""

from __future__ import annotations

import csv
import re
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
MARKET_NAME = re.compile(r"^(-1|\d+)_c(\d+)(?:s(\d+))?_.*$")
SPLITS = ("train", "query", "gallery")


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
    """Train, query and gallery samples of one dataset."""

    name: str
    root: Path
    train: list[Sample]
    query: list[Sample]
    gallery: list[Sample]

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

        return "\n".join(
            [f"dataset {self.name} at {self.root}"] + [line(n, getattr(self, n)) for n in SPLITS]
        )


# ---- Market-1501 --------------------------------------------------------------------------

MARKET_DIRS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}


def parse_market_name(path: Path) -> tuple[int, int]:
    """(pid, camid) from a Market-1501/Duke/MSMT style file name; camid is 0-based."""
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


def load_market1501(root: str | Path) -> ReidDataset:
    """Read a Market-1501 style tree.

    Raises:
        DatasetError: a split folder is missing or empty, or a file name breaks the rule.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset root does not exist or is not a directory")
    # Market-1501 zips unpack into a versioned subfolder: accept the parent too.
    if not (root / "bounding_box_train").is_dir():
        inner = [p for p in root.iterdir() if (p / "bounding_box_train").is_dir()]
        if len(inner) == 1:
            root = inner[0]
    splits: dict[str, list[Sample]] = {}
    for split, folder in MARKET_DIRS.items():
        directory = root / folder
        if not directory.is_dir():
            raise DatasetError(
                f"{directory}: missing; a Market-1501 tree has {', '.join(MARKET_DIRS.values())}"
            )
        samples = []
        for path in sorted(directory.iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if path.name.startswith("Thumbs"):
                continue
            pid, camid = parse_market_name(path)
            if split != "gallery" and pid <= 0:
                continue  # junk and distractors never train or query
            samples.append(
                Sample(str(path), pid, camid, split, item_id=str(path.relative_to(root)))
            )
        if not samples:
            raise DatasetError(f"{directory}: no images with valid identities found")
        splits[split] = samples
    return ReidDataset(root.name, root, splits["train"], splits["query"], splits["gallery"])


# ---- folder per identity ------------------------------------------------------------------


def _images_by_identity(directory: Path) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for sub in sorted(p for p in directory.iterdir() if p.is_dir()):
        images = sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if images:
            out[sub.name] = images
    return out


def _stable_fraction(text: str) -> float:
    return zlib.crc32(text.encode()) / 2**32


def load_folder(root: str | Path, test_fraction: float = 0.5) -> ReidDataset:
    """Read `root/<identity>/*` (split by identity) or `root/{train,query,gallery}/<identity>/*`.

    Without explicit splits, a stable hash of the identity name puts `test_fraction` of the
    identities in the test set; of each test identity the first image is the query and the rest
    the gallery. Without cameras, query images get camid 0 and gallery images camid 1, so the
    Market-1501 protocol (same pid + same camera is junk) still evaluates.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset root does not exist or is not a directory")
    names = {}
    if (root / "train").is_dir():
        for split in SPLITS:
            if not (root / split).is_dir():
                raise DatasetError(
                    f"{root / split}: missing; with a train/ folder, query/ and gallery/ are needed"
                )
            names[split] = _images_by_identity(root / split)
    else:
        by_id = _images_by_identity(root)
        names = {"train": {}, "query": {}, "gallery": {}}
        for ident, images in by_id.items():
            if _stable_fraction(ident) < test_fraction and len(images) >= 2:
                names["query"][ident] = images[:1]
                names["gallery"][ident] = images[1:]
            else:
                names["train"][ident] = images
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
        if not splits[split]:
            raise DatasetError(f"{root}: the {split} split is empty")
    return ReidDataset(root.name, root, splits["train"], splits["query"], splits["gallery"])


# ---- CSV manifest -------------------------------------------------------------------------

CSV_REQUIRED = ("path", "pid", "camid", "split")
CSV_BOX = ("x", "y", "w", "h")


def load_csv(manifest: str | Path, required_splits: tuple[str, ...] = SPLITS) -> ReidDataset:
    """Read a CSV manifest `path,pid,camid,split[,x,y,w,h][,id][,extra...]`.

    Paths are relative to the CSV's folder; `split` is train, query or gallery; box columns
    (all four or none) crop the region of interest; an `id` column gives item ids; any other
    column is kept as metadata. camid may be empty: query then gets 0 and gallery 1.

    Args:
        manifest: the CSV file, or a folder holding exactly one.
        required_splits: splits that must have rows (an extra training source needs only
            "train").
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
    splits: dict[str, list[Sample]] = {s: [] for s in SPLITS}
    with manifest.open(newline="") as handle:
        reader = csv.DictReader(handle)
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
        for line_no, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            where = f"{manifest}:{line_no}"
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
            box = None
            if all(has_box) and any(row[c] != "" for c in CSV_BOX):
                try:
                    box = tuple(int(round(float(row[c]))) for c in CSV_BOX)
                except ValueError:
                    raise DatasetError(f"{where}: box x,y,w,h must be numbers") from None
                if box[2] <= 0 or box[3] <= 0 or box[0] < 0 or box[1] < 0:
                    raise DatasetError(f"{where}: box {box} needs x,y >= 0 and w,h > 0")
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
    for split in required_splits:
        if not splits[split]:
            raise DatasetError(f"{manifest}: no rows with split={split}")
    return ReidDataset(manifest.stem, base, splits["train"], splits["query"], splits["gallery"])


# ---- entry point and balancing -----------------------------------------------------------


def detect_format(root: str | Path) -> str:
    """Guess `market1501`, `csv` or `folder` from what is on disk."""
    root = Path(root)
    if root.is_file() and root.suffix.lower() == ".csv":
        return "csv"
    if root.is_dir():
        if (root / "bounding_box_train").is_dir() or any(
            (p / "bounding_box_train").is_dir() for p in root.iterdir() if p.is_dir()
        ):
            return "market1501"
        if len(list(root.glob("*.csv"))) == 1:
            return "csv"
        return "folder"
    raise DatasetError(f"{root}: no dataset here (expected a directory or a .csv manifest)")


def load_dataset(root: str | Path, fmt: str = "auto", test_fraction: float = 0.5) -> ReidDataset:
    """Read a dataset in any supported format (`market1501`, `folder`, `csv`, or `auto`)."""
    if fmt in ("auto", ""):
        fmt = detect_format(root)
    if fmt in ("market1501", "synthetic"):
        return load_market1501(root)
    if fmt == "folder":
        return load_folder(root, test_fraction=test_fraction)
    if fmt == "csv":
        return load_csv(root)
    raise DatasetError(f"data.format {fmt!r} is not known; choose market1501, folder or csv")


def balance(
    samples: list[Sample],
    drop_single_image_ids: bool = True,
    oversample_min: int = 0,
    oversample_max: int = 0,
    oversample_p: float = 0.0,
    seed: int = 0,
) -> tuple[list[Sample], dict[int, int]]:
    """Prepare training samples: drop single-image ids, relabel 0..N-1, oversample rare ids.

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
