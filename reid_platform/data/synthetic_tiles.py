"""Synthetic cross-modal data: places seen from above as optical and SAR-like tiles.

Cross-modal retrieval (an optical tile as the query, SAR tiles of the same spot as the
gallery, and the reverse) needs data where the two modalities show the same place through
very different physics. This module draws procedural places and renders each one in every
requested modality:

* A *place* (the identity) is a layout: land cover (grass, a ploughed field or bare soil),
  roads, buildings (footprint, orientation, height, roof), trees and sometimes water.
* `optical`: colour; roofs from a palette, green vegetation, grey asphalt, blue-black water,
  sun shadows cast away from a per-image sun direction, haze, blur, sensor noise, JPEG.
* `sar`: grayscale backscatter; water and asphalt dark (specular), vegetation bright
  (volume scattering), buildings displaced toward the sensor (layover) with a bright
  double-bounce line along the wall that faces it and a radar shadow behind, ploughed
  furrows as strong directional texture; multiplicative gamma speckle (L looks) and log
  compression (dB), as SAR amplitude products are displayed.

So the edges differ (roads are bright-on-green in one and dark-on-grey in the other, shadows
fall on opposite sides, double-bounce lines exist only in SAR) and so do the textures
(speckle): a model trained without care matches within a modality far better than across.
Every acquisition jitters the footprint (shift, scale), so no two images are co-registered.

The tree is written as images plus `manifest.csv` (`path,pid,camid,split,modality`), read
by the CSV reader: camid is the modality's index (each modality is its own sensor); the test
identities' images of the first modality are the `query` split, the others the `gallery`.
Everything is drawn from seeded `numpy.random.Generator` streams: the same arguments give
byte-identical files.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from reid_platform.data.synthetic import MARKER_NAME, _move_into_place, _params_for_marker

# Bump when the drawing changes, so cached trees are rebuilt.
TILES_VERSION = 1
MANIFEST_NAME = "manifest.csv"
_TAG_IMAGE = 2**32 - 11
_TAG_PLAN = 2**32 - 12
_SUPERSAMPLE = 2

GROUNDS = ("grass", "field", "soil")
ROOFS = ("tiles", "concrete", "white", "dark", "metal")
# BGR (OpenCV order)
OPTICAL_GROUND = {"grass": (70, 150, 85), "field": (90, 170, 170), "soil": (90, 125, 160)}
OPTICAL_ROOF = {"tiles": (55, 70, 170), "concrete": (150, 150, 145), "white": (215, 215, 210),
                "dark": (70, 70, 75), "metal": (170, 160, 130)}
OPTICAL_ROAD, OPTICAL_WATER, OPTICAL_TREE = (125, 125, 130), (95, 60, 30), (40, 95, 45)
# SAR backscatter (linear intensity, sigma0-like)
SAR_GROUND = {"grass": 0.06, "field": 0.10, "soil": 0.035}
SAR_ROOF = {"tiles": 0.20, "concrete": 0.12, "white": 0.10, "dark": 0.15, "metal": 0.45}
SAR_ROAD, SAR_WATER, SAR_TREE, SAR_DOUBLE_BOUNCE, SAR_SHADOW = 0.008, 0.003, 0.30, 4.0, 0.001
SAR_DB_RANGE = (-30.0, 8.0)  # dB mapped to 0..255


@dataclass(frozen=True)
class Building:
    """A footprint (centre, size, angle in degrees; unit = tile side), height and roof."""

    cx: float
    cy: float
    w: float
    h: float
    angle: float
    height: float
    roof: str
    pitched: bool


@dataclass(frozen=True)
class Place:
    """One identity: what is on the ground. Coordinates are in tile units (0..1)."""

    ground: str
    furrow_angle: float  # degrees, for ploughed fields
    roads: tuple[tuple[float, float, float, float, float], ...]  # x0, y0, x1, y1, width
    buildings: tuple[Building, ...]
    trees: tuple[tuple[float, float, float], ...]  # cx, cy, radius
    water: tuple[tuple[float, float, float, float, float], ...]  # cx, cy, rx, ry, angle


def sample_place(rng: np.random.Generator) -> Place:
    """A random place; use `np.random.default_rng([seed, pid])` so a pid is always the same."""
    ground = GROUNDS[int(rng.integers(len(GROUNDS)))]
    roads = []
    for _ in range(int(rng.integers(1, 3))):
        angle = rng.uniform(0, np.pi)
        cx, cy = rng.uniform(0.2, 0.8, 2)
        dx, dy = np.cos(angle) * 1.5, np.sin(angle) * 1.5
        roads.append((cx - dx, cy - dy, cx + dx, cy + dy, float(rng.uniform(0.04, 0.09))))
    grid = rng.uniform(0, 90)  # buildings follow one street grid orientation
    buildings = []
    for _ in range(int(rng.integers(2, 6))):
        buildings.append(Building(
            cx=float(rng.uniform(0.1, 0.9)), cy=float(rng.uniform(0.1, 0.9)),
            w=float(rng.uniform(0.1, 0.28)), h=float(rng.uniform(0.08, 0.22)),
            angle=float(grid + rng.choice([0.0, 90.0]) + rng.normal(0, 4)),
            height=float(rng.uniform(0.03, 0.12)),
            roof=ROOFS[int(rng.integers(len(ROOFS)))], pitched=bool(rng.random() < 0.5),
        ))
    n = int(rng.integers(3, 12))
    trees = tuple((float(x), float(y), float(r)) for x, y, r in zip(
        rng.uniform(-0.05, 1.05, n), rng.uniform(-0.05, 1.05, n), rng.uniform(0.025, 0.06, n)))
    water = ()
    if rng.random() < 0.3:
        water = ((float(rng.uniform(0, 1)), float(rng.uniform(0, 1)), float(rng.uniform(0.12, 0.3)),
                  float(rng.uniform(0.08, 0.2)), float(rng.uniform(0, 180))),)
    return Place(ground, float(rng.uniform(0, 180)), tuple(roads), tuple(buildings), trees, water)


class _Frame:
    """Tile units -> pixels of one acquisition: a shift and a scale about the centre."""

    def __init__(self, rng: np.random.Generator, height: int, width: int):
        self.h, self.w = height, width
        self.scale = rng.uniform(0.93, 1.07)
        self.dx, self.dy = rng.uniform(-0.06, 0.06, 2)

    def xy(self, x: float, y: float) -> tuple[float, float]:
        return ((0.5 + (x - 0.5 + self.dx) * self.scale) * self.w,
                (0.5 + (y - 0.5 + self.dy) * self.scale) * self.h)

    def length(self, v: float) -> float:
        return v * self.scale * (self.h + self.w) / 2

    def box(self, b: Building, shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
        """The building's footprint corners (4, 2) int32, optionally shifted (tile units)."""
        cx, cy = self.xy(b.cx + shift[0], b.cy + shift[1])
        rect = ((cx, cy), (self.length(b.w), self.length(b.h)), b.angle)
        return np.round(cv2.boxPoints(rect)).astype(np.int32)


def _texture(rng: np.random.Generator, h: int, w: int, cells: int, amount: float) -> np.ndarray:
    """Smooth random (h, w) field in [-amount, amount]-ish: a small grid upsampled."""
    grid = rng.normal(0, amount, (cells, cells)).astype(np.float32)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)


def _furrows(h: int, w: int, angle: float, period: float) -> np.ndarray:
    """(h, w) stripes in [0, 1] across the given direction (ploughed field rows)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = xx * np.cos(np.radians(angle)) + yy * np.sin(np.radians(angle))
    return (0.5 + 0.5 * np.sin(2 * np.pi * t / max(period, 1.0))).astype(np.float32)


def render_optical(place: Place, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """One optical acquisition of `place`: (height, width, 3) uint8 BGR."""
    hs, ws = height * _SUPERSAMPLE, width * _SUPERSAMPLE
    frame = _Frame(rng, hs, ws)
    img = np.empty((hs, ws, 3), np.float32)
    img[:] = OPTICAL_GROUND[place.ground]
    img += _texture(rng, hs, ws, 8, 10)[:, :, None]
    if place.ground == "field":
        img *= (0.9 + 0.12 * _furrows(hs, ws, place.furrow_angle, frame.length(0.03)))[:, :, None]
    for cx, cy, rx, ry, angle in place.water:
        x, y = frame.xy(cx, cy)
        cv2.ellipse(img, (int(x), int(y)), (int(frame.length(rx)), int(frame.length(ry))),
                    angle, 0, 360, OPTICAL_WATER, -1)
    for x0, y0, x1, y1, width_ in place.roads:
        p0, p1 = frame.xy(x0, y0), frame.xy(x1, y1)
        thick = max(2, int(frame.length(width_)))
        cv2.line(img, tuple(map(int, p0)), tuple(map(int, p1)), OPTICAL_ROAD, thick)
        cv2.line(img, tuple(map(int, p0)), tuple(map(int, p1)), (190, 190, 190),
                 max(1, thick // 10))  # the centre line
    # The sun: shadows fall away from it, by the object's height
    sun = np.radians(rng.uniform(20, 70))
    shade = np.array([np.cos(sun), np.sin(sun)]) * rng.uniform(0.6, 1.0)
    shadow = np.zeros((hs, ws), np.uint8)
    for b in place.buildings:
        cast = frame.box(b, tuple(shade * b.height))
        cv2.fillConvexPoly(shadow, cv2.convexHull(np.concatenate([frame.box(b), cast])), 255)
    for cx, cy, r in place.trees:
        x, y = frame.xy(cx + shade[0] * r, cy + shade[1] * r)
        cv2.circle(shadow, (int(x), int(y)), int(frame.length(r)), 255, -1)
    img[shadow > 0] *= 0.55
    for b in place.buildings:
        corners = frame.box(b)
        roof = np.asarray(OPTICAL_ROOF[b.roof], np.float32) * rng.uniform(0.9, 1.1)
        cv2.fillPoly(img, [corners], tuple(float(v) for v in roof))
        if b.pitched:  # the ridge splits a lit and a shaded roof half
            mid = ((corners[0] + corners[1]) // 2, (corners[2] + corners[3]) // 2)
            half = np.array([corners[0], mid[0], mid[1], corners[3]], np.int32)
            cv2.fillPoly(img, [half], tuple(float(v) * 0.75 for v in roof))
    for cx, cy, r in place.trees:
        x, y = frame.xy(cx, cy)
        cv2.circle(img, (int(x), int(y)), int(frame.length(r)),
                   tuple(float(v) * rng.uniform(0.85, 1.15) for v in OPTICAL_TREE), -1)
    img = cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA)
    gain = rng.uniform(0.8, 1.2) * rng.uniform(0.92, 1.08, 3).astype(np.float32)
    haze = rng.uniform(0.0, 0.25)
    img = img * gain[None, None, :] * (1 - haze) + 170.0 * haze
    sigma = rng.uniform(0.0, 1.0)
    if sigma > 0.3:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    img += rng.normal(0, rng.uniform(2, 6), img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def render_sar(place: Place, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """One SAR-like acquisition of `place`: (height, width, 3) uint8, the three channels
    equal (grayscale, log-compressed speckled backscatter)."""
    hs, ws = height * _SUPERSAMPLE, width * _SUPERSAMPLE
    frame = _Frame(rng, hs, ws)
    sigma0 = np.full((hs, ws), SAR_GROUND[place.ground], np.float32)
    sigma0 *= np.exp(_texture(rng, hs, ws, 6, 0.25))
    if place.ground == "field":  # furrows facing the sensor modulate the return strongly
        sigma0 *= 0.3 + 1.7 * _furrows(hs, ws, place.furrow_angle, frame.length(0.03))
    for cx, cy, rx, ry, angle in place.water:
        x, y = frame.xy(cx, cy)
        cv2.ellipse(sigma0, (int(x), int(y)), (int(frame.length(rx)), int(frame.length(ry))),
                    angle, 0, 360, SAR_WATER, -1)
    for x0, y0, x1, y1, width_ in place.roads:
        p0, p1 = frame.xy(x0, y0), frame.xy(x1, y1)
        cv2.line(sigma0, tuple(map(int, p0)), tuple(map(int, p1)), SAR_ROAD,
                 max(2, int(frame.length(width_))))
    # The sensor looks from the left (mostly) or the right: tall things lean toward it
    # (layover) and hide what is behind them (radar shadow).
    look = -1.0 if rng.random() < 0.8 else 1.0  # -1: the sensor is on the left
    incidence = rng.uniform(0.6, 1.0)  # layover / shadow length per unit height
    for cx, cy, r in place.trees:
        x, y = frame.xy(cx - look * r * 0.8 * incidence, cy)
        cv2.circle(sigma0, (int(x), int(y)), int(frame.length(r)), SAR_SHADOW, -1)
    for cx, cy, r in place.trees:
        x, y = frame.xy(cx, cy)
        cv2.circle(sigma0, (int(x), int(y)), int(frame.length(r)),
                   SAR_TREE * rng.uniform(0.7, 1.3), -1)
    for b in place.buildings:
        shift = b.height * incidence
        behind = frame.box(b, (-look * shift, 0.0))
        cv2.fillConvexPoly(sigma0, cv2.convexHull(np.concatenate([frame.box(b), behind])),
                           SAR_SHADOW)
    for b in place.buildings:
        shift = b.height * incidence
        roof = frame.box(b, (look * shift, 0.0))  # layover toward the sensor
        cv2.fillPoly(sigma0, [roof], SAR_ROOF[b.roof] * rng.uniform(0.8, 1.25))
        ground = frame.box(b)
        # double bounce: the footprint's edge on the sensor's side, where the wall meets
        # the ground, returns far more than anything around it
        side = ground[np.argsort(ground[:, 0] * -look)[-2:]]
        cv2.line(sigma0, tuple(map(int, side[0])), tuple(map(int, side[1])),
                 SAR_DOUBLE_BOUNCE, max(1, int(frame.length(0.012))))
    sigma0 = cv2.resize(sigma0, (width, height), interpolation=cv2.INTER_AREA)
    looks = int(rng.integers(1, 5))
    speckled = sigma0 * rng.gamma(looks, 1.0 / looks, sigma0.shape).astype(np.float32)
    db = 10.0 * np.log10(np.maximum(speckled, 1e-6)) + rng.normal(0, 0.8)  # calibration
    lo, hi = SAR_DB_RANGE
    gray = np.clip((db - lo) / (hi - lo) * 255.0, 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


RENDERERS: dict[str, Callable[[Place, np.random.Generator, int, int], np.ndarray]] = {
    "optical": render_optical,
    "sar": render_sar,
}


def _validate(num_train_ids: int, num_test_ids: int, modalities: tuple[str, ...],
              images_per_id_per_modality: tuple[int, int], height: int, width: int) -> None:
    if num_train_ids < 1 or num_test_ids < 1:
        raise ValueError(
            f"num_train_ids={num_train_ids}, num_test_ids={num_test_ids}: expected both >= 1"
        )
    if len(modalities) < 2 or len(set(modalities)) != len(modalities):
        raise ValueError(
            f"modalities={list(modalities)}: expected two or more distinct modalities "
            f"among {sorted(RENDERERS)}"
        )
    unknown = [m for m in modalities if m not in RENDERERS]
    if unknown:
        raise ValueError(
            f"modality {unknown[0]!r} cannot be rendered; the synthetic tiles know "
            f"{sorted(RENDERERS)}"
        )
    lo, hi = images_per_id_per_modality
    if not 1 <= lo <= hi:
        raise ValueError(
            f"images per identity per modality {images_per_id_per_modality}: expected "
            "1 <= min <= max"
        )
    if height < 32 or width < 16:
        raise ValueError(f"height={height}, width={width}: expected height >= 32, width >= 16")


def generate_tiles_tree(
    root: str | Path,
    num_train_ids: int = 60,
    num_test_ids: int = 40,
    modalities: tuple[str, ...] = ("optical", "sar"),
    images_per_id_per_modality: tuple[int, int] = (1, 3),
    height: int = 64,
    width: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write a cross-modal tree: every place rendered `images_per_id_per_modality` (min, max
    inclusive) times in each modality, plus `manifest.csv` (see the module docstring).

    Train pids are 1..num_train_ids, test pids follow. Built in a temporary sibling and
    renamed into place with a `.complete` marker, like `generate_market_tree`.

    Raises:
        ValueError: a count, size or modality out of range.
    """
    root = Path(os.path.abspath(root))
    modalities = tuple(str(m) for m in modalities)
    images_per_id_per_modality = tuple(int(v) for v in images_per_id_per_modality)
    _validate(num_train_ids, num_test_ids, modalities, images_per_id_per_modality, height,
              width)
    params = _params_for_marker(
        kind="tiles", num_train_ids=num_train_ids, num_test_ids=num_test_ids,
        modalities=list(modalities), images_per_id_per_modality=images_per_id_per_modality,
        height=height, width=width, seed=seed,
    )
    plan_rng = np.random.default_rng([seed, _TAG_PLAN])
    lo, hi = images_per_id_per_modality
    jobs: list[tuple[int, str, int, str]] = []  # pid, modality, shot, split
    for pid in range(1, num_train_ids + num_test_ids + 1):
        test = pid > num_train_ids
        for index, modality in enumerate(modalities):
            split = ("query" if index == 0 else "gallery") if test else "train"
            for shot in range(int(plan_rng.integers(lo, hi + 1))):
                jobs.append((pid, modality, shot, split))
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        for split in ("train", "query", "gallery"):
            (tmp / split).mkdir(parents=True)
        if progress:
            print(f"[data] generating the synthetic cross-modal dataset {root.name} "
                  f"({len(jobs)} images, once) ...", flush=True)
        places: dict[int, Place] = {}
        rows = io.StringIO()
        writer = csv.writer(rows, lineterminator="\n")
        writer.writerow(["path", "pid", "camid", "split", "modality"])
        counts = dict.fromkeys(modalities, 0)
        for serial, (pid, modality, shot, split) in enumerate(
            tqdm(jobs, desc=f"synthetic {root.name}", disable=None if progress else True,
                 unit="img", leave=False)
        ):
            if pid not in places:
                places[pid] = sample_place(np.random.default_rng([seed, pid]))
            rng = np.random.default_rng([seed, _TAG_IMAGE, serial])
            img = RENDERERS[modality](places[pid], rng, height, width)
            ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 92])
            if not ok:
                raise RuntimeError(f"cv2.imencode failed for pid {pid} {modality}")
            path = f"{split}/{pid:04d}_{modality}_{shot:02d}.jpg"
            (tmp / path).write_bytes(buf.tobytes())
            writer.writerow([path, pid, modalities.index(modality), split, modality])
            counts[modality] += 1
        (tmp / MANIFEST_NAME).write_text(rows.getvalue())
        marker = {"version": TILES_VERSION, "params": params, "counts": counts}
        (tmp / MARKER_NAME).write_text(json.dumps(marker, indent=2, sort_keys=True))
        _move_into_place(tmp, root, marker)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def ensure_tiles(root: str | Path, progress: bool = True, **params) -> Path:
    """`root`, generating it first unless a complete tree with `params` is there (the
    cross-modal counterpart of `ensure_synthetic`; same refusal to overwrite foreign data).

    Raises:
        ValueError: `root` holds data this module did not write, or bad parameters.
    """
    import inspect

    from reid_platform.data.synthetic import _read_marker

    root = Path(os.path.abspath(root))
    bound = inspect.signature(generate_tiles_tree).bind(root, progress=progress, **params)
    bound.apply_defaults()
    wanted = {k: v for k, v in bound.arguments.items() if k not in ("root", "progress")}
    wanted["modalities"] = [str(m) for m in wanted["modalities"]]
    wanted["images_per_id_per_modality"] = tuple(
        int(v) for v in wanted["images_per_id_per_modality"])
    marker = _read_marker(root)
    if marker is None and root.is_dir() and any(root.iterdir()):
        raise ValueError(
            f"{root} is not empty and holds no synthetic dataset (no {MARKER_NAME} marker); "
            "refusing to overwrite it; leave data.root empty or point it at a new folder"
        )
    if (marker is not None and marker.get("version") == TILES_VERSION
            and marker.get("params") == _params_for_marker(kind="tiles", **wanted)):
        return root
    wanted["modalities"] = tuple(wanted["modalities"])
    return generate_tiles_tree(root, progress=progress, **wanted)
