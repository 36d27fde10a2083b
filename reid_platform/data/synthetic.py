"""Synthetic person re-identification data written in the Market-1501 layout.

Real re-id datasets are large, licensed and slow to download, which makes them a poor fit for
unit tests, CI and smoke runs. This module draws simple people procedurally and writes them as
a Market-1501 tree (``bounding_box_train/``, ``query/``, ``bounding_box_test/``), so every
loader, trainer and evaluator in the package can run end to end on a laptop in seconds.

The data is built to be *learnable but not trivial*:

* An identity is an appearance: skin, hair, upper-body colour and pattern, lower-body colour
  and cut, shoes, accessory and body proportions. Palettes are shared and overlap between
  identities, so no single cue identifies a person.
* A camera is a viewing condition: lighting gain and colour cast, background, detector-box
  scale and position, preferred viewpoints (a backpack covers the back, a logo is only on the
  front), blur, sensor noise, JPEG quality and how often someone is partly occluded.

Everything is derived from seeded ``numpy.random.Generator`` streams, so the same seed gives
byte-identical files and a given pid looks the same wherever it is generated.

Typical use::

    root = ensure_synthetic("/data/synthetic_market", num_train_ids=60, num_test_ids=40)
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

# Bump when the drawing changes, so ensure_synthetic() rebuilds trees cached by older code.
GENERATOR_VERSION = 1

SPLIT_DIRS = ("bounding_box_train", "query", "bounding_box_test")
MARKER_NAME = ".complete"

# Tags that keep the RNG streams apart. Identities use the bare ``[seed, pid]`` (pid >= 1);
# these sit far above any 4-digit pid so the streams can never coincide.
_TAG_CAMERA = 2**32 - 1
_TAG_DISTRACTOR = 2**32 - 2
_TAG_JUNK = 2**32 - 3
_TAG_IMAGE = 2**32 - 4
_TAG_PLAN = 2**32 - 5

# Draw at twice the output size and shrink with INTER_AREA: cheap anti-aliasing, so edges look
# like camera images rather than pixel art.
_SUPERSAMPLE = 2

Color = tuple[int, int, int]

# Palettes are BGR (OpenCV order).
SKIN_TONES: tuple[Color, ...] = (
    (189, 214, 255),
    (160, 196, 241),
    (130, 170, 224),
    (105, 140, 198),
    (80, 110, 160),
    (55, 75, 115),
)
HAIR_COLORS: tuple[Color, ...] = (
    (20, 20, 20),
    (30, 40, 60),
    (40, 70, 110),
    (70, 120, 180),
    (150, 190, 220),
    (170, 170, 170),
    (40, 40, 140),
    (60, 50, 45),
)
# Shared by upper and lower body on purpose: a red shirt and red trousers look alike in a
# colour histogram, which is exactly the kind of ambiguity a re-id model must resolve.
CLOTHES_COLORS: tuple[Color, ...] = (
    (25, 25, 25),
    (235, 235, 235),
    (128, 128, 128),
    (90, 40, 20),
    (40, 40, 200),
    (40, 110, 30),
    (150, 190, 210),
    (40, 70, 110),
    (220, 170, 100),
    (40, 200, 230),
    (140, 50, 120),
    (180, 140, 240),
)
# Trousers are mostly dark or neutral in the wild; 10 of the 12 clothes colours.
LOWER_COLORS: tuple[Color, ...] = CLOTHES_COLORS[:10]
SHOE_COLORS: tuple[Color, ...] = (
    (20, 20, 20),
    (240, 240, 240),
    (60, 80, 120),
    (110, 110, 110),
    (40, 40, 180),
    (130, 70, 30),
    (30, 50, 70),
    (200, 200, 160),
)
PATTERNS = ("solid", "hstripes", "vstripes", "checks", "logo")
LOWER_STYLES = ("trousers", "shorts", "skirt")
ACCESSORIES = ("none", "backpack", "handbag", "hat")
HAIR_STYLES = ("short", "long", "bald")
VIEWS = ("front", "back", "left", "right")


@dataclass(frozen=True)
class Identity:
    """Appearance of one person; fixed for a pid, independent of camera and image.

    Attributes:
        skin, hair, upper, upper_secondary, lower, shoes, accessory_color: BGR colours.
        hair_style: one of ``HAIR_STYLES``.
        pattern: one of ``PATTERNS``; drawn in ``upper_secondary`` over ``upper``.
        pattern_period: stripe/check period as a fraction of person height.
        long_sleeves: sleeves down to the wrist, else skin below the elbow.
        lower_style: one of ``LOWER_STYLES``.
        accessory: one of ``ACCESSORIES``.
        bag_side: +1 if the handbag hangs on the person's left (viewer's right when
            facing the camera), -1 otherwise.
        height: person height as a fraction of the detector box height.
        width: body width multiplier (1.0 = average build).
    """

    skin: Color
    hair: Color
    hair_style: str
    upper: Color
    upper_secondary: Color
    pattern: str
    pattern_period: float
    long_sleeves: bool
    lower: Color
    lower_style: str
    shoes: Color
    accessory: str
    accessory_color: Color
    bag_side: int
    height: float
    width: float


@dataclass(frozen=True)
class Camera:
    """Viewing conditions of one camera; fixed for a camid, shared by all its images.

    Attributes:
        gain: global brightness multiplier.
        cast: per-channel (B, G, R) multipliers giving the camera its colour cast.
        background, floor: BGR base colours of the wall and the ground.
        scene_colors: BGR colours of the clutter rectangles in the background.
        floor_y: where the ground starts, as a fraction of image height.
        texture: amplitude of low-frequency background noise, in grey levels.
        scale: mean person scale inside the detector box (1.0 = fills the height).
        view_probs: probabilities of ``VIEWS`` (front, back, left, right).
        blur: Gaussian blur sigma in output pixels.
        noise: sensor noise standard deviation in grey levels.
        jpeg_quality: JPEG quality used for every image of this camera.
        occlusion_p: probability that an image is partly occluded.
    """

    gain: float
    cast: tuple[float, float, float]
    background: Color
    floor: Color
    scene_colors: tuple[Color, ...]
    floor_y: float
    texture: float
    scale: float
    view_probs: tuple[float, float, float, float]
    blur: float
    noise: float
    jpeg_quality: int
    occlusion_p: float


def _pick(rng: np.random.Generator, palette: tuple[Color, ...]) -> Color:
    return palette[int(rng.integers(len(palette)))]


def _jitter_color(rng: np.random.Generator, color: Color, amount: float) -> Color:
    """Returns ``color`` shifted by up to ``amount`` grey levels per channel."""
    shifted = np.asarray(color, np.float64) + rng.uniform(-amount, amount, 3)
    return tuple(int(v) for v in np.clip(shifted, 0, 255))  # type: ignore[return-value]


def sample_identity(rng: np.random.Generator) -> Identity:
    """Draws a random appearance.

    Args:
        rng: generator to draw from; use ``np.random.default_rng([seed, pid])`` so a pid
            always looks the same.

    Returns:
        The identity's appearance.
    """
    upper = _pick(rng, CLOTHES_COLORS)
    # The pattern colour must differ from the base colour or the pattern is invisible.
    secondary = upper
    while secondary == upper:
        secondary = _pick(rng, CLOTHES_COLORS)
    accessory = ACCESSORIES[int(rng.choice(4, p=[0.4, 0.25, 0.2, 0.15]))]
    return Identity(
        # Small per-identity colour shifts: two people with the "same" red shirt are not
        # pixel-identical, but close enough that colour alone cannot separate them.
        skin=_jitter_color(rng, _pick(rng, SKIN_TONES), 8),
        hair=_jitter_color(rng, _pick(rng, HAIR_COLORS), 8),
        hair_style=HAIR_STYLES[int(rng.choice(3, p=[0.55, 0.3, 0.15]))],
        upper=_jitter_color(rng, upper, 12),
        upper_secondary=_jitter_color(rng, secondary, 12),
        pattern=PATTERNS[int(rng.choice(5, p=[0.3, 0.2, 0.15, 0.15, 0.2]))],
        pattern_period=float(rng.uniform(0.04, 0.08)),
        long_sleeves=bool(rng.random() < 0.6),
        lower=_jitter_color(rng, _pick(rng, LOWER_COLORS), 12),
        lower_style=LOWER_STYLES[int(rng.choice(3, p=[0.6, 0.2, 0.2]))],
        shoes=_jitter_color(rng, _pick(rng, SHOE_COLORS), 8),
        accessory=accessory,
        accessory_color=_jitter_color(rng, _pick(rng, CLOTHES_COLORS), 12),
        bag_side=int(rng.choice([-1, 1])),
        height=float(rng.uniform(0.82, 0.97)),
        width=float(rng.uniform(0.82, 1.2)),
    )


def _tinted_grey(rng: np.random.Generator, lo: int, hi: int, tint: int) -> Color:
    """Returns a grey level in [lo, hi) shifted by up to ``tint`` per channel."""
    grey = rng.integers(lo, hi)
    return tuple(int(v) for v in np.clip(grey + rng.integers(-tint, tint + 1, 3), 0, 255))  # type: ignore[return-value]


def sample_camera(rng: np.random.Generator) -> Camera:
    """Draws random viewing conditions.

    Args:
        rng: generator to draw from; use ``np.random.default_rng([seed, TAG, camid])``.

    Returns:
        The camera's viewing conditions.
    """
    # Real scenes are mostly greyish (concrete, tiles, walls) with a tint; saturated
    # backgrounds would let whole-image colour statistics be dominated by the camera.
    background = _tinted_grey(rng, 100, 170, 25)
    floor = _tinted_grey(rng, 70, 140, 25)
    # Each camera prefers some viewpoints (a corridor camera sees backs, an entrance
    # camera faces) but every view stays possible.
    view_probs = 0.6 * rng.dirichlet(np.ones(4)) + 0.4 * np.full(4, 0.25)
    return Camera(
        gain=float(rng.uniform(0.75, 1.2)),
        cast=tuple(float(v) for v in rng.uniform(0.88, 1.12, 3)),  # type: ignore[arg-type]
        background=background,  # type: ignore[arg-type]
        floor=floor,  # type: ignore[arg-type]
        scene_colors=tuple(_tinted_grey(rng, 60, 190, 40) for _ in range(4)),
        floor_y=float(rng.uniform(0.55, 0.8)),
        texture=float(rng.uniform(4, 15)),
        scale=float(rng.uniform(0.9, 1.05)),
        view_probs=tuple(float(v) for v in view_probs / view_probs.sum()),  # type: ignore[arg-type]
        blur=float(rng.uniform(0.0, 1.2)),
        noise=float(rng.uniform(2, 8)),
        jpeg_quality=int(rng.integers(60, 96)),
        occlusion_p=float(rng.uniform(0.05, 0.3)),
    )


def _draw_background(camera: Camera, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Returns a (h, w, 3) uint8 scene: textured wall, ground, a few clutter rectangles."""
    img = np.empty((h, w, 3), np.float32)
    floor_row = int(h * (camera.floor_y + rng.uniform(-0.05, 0.05)))
    img[:floor_row] = _jitter_color(rng, camera.background, 10)
    img[floor_row:] = _jitter_color(rng, camera.floor, 10)
    # Clutter (doors, posters, benches): placed per image, coloured per camera, so the
    # background is camera-typical but never identical between two images.
    for _ in range(int(rng.integers(1, 5))):
        x0, y0 = int(rng.integers(-w // 4, w)), int(rng.integers(-h // 4, h))
        x1, y1 = x0 + int(rng.integers(w // 8, w // 2)), y0 + int(rng.integers(h // 10, h // 2))
        color = _jitter_color(rng, camera.scene_colors[int(rng.integers(4))], 15)
        cv2.rectangle(img, (x0, y0), (x1, y1), color, -1)
    # Low-frequency texture: upsampling a tiny random grid gives smooth blotches (dirt,
    # uneven walls) at the cost of one resize instead of per-pixel work.
    grid = rng.normal(0, camera.texture, (6, 3, 1)).astype(np.float32)
    img += cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)[:, :, None]
    cv2.line(img, (0, floor_row), (w, floor_row), (30, 30, 30), max(1, h // 128))
    return np.clip(img, 0, 255).astype(np.uint8)


def _torso_pattern(
    canvas: np.ndarray,
    mask: np.ndarray,
    identity: Identity,
    u: float,
    cx: float,
    top: float,
    view: str,
) -> None:
    """Paints the upper-body colour and pattern into ``canvas`` where ``mask`` is set."""
    h, w = mask.shape
    layer = np.empty_like(canvas)
    layer[:] = identity.upper
    period = max(2, int(identity.pattern_period * u))
    yy, xx = np.mgrid[0:h, 0:w]
    # Patterns are anchored at the person, not the image, so they move with the body.
    ry, rx = yy - int(top), xx - int(cx)
    if identity.pattern == "hstripes":
        sel = (ry // period) % 2 == 0
    elif identity.pattern == "vstripes":
        sel = (rx // period) % 2 == 0
    elif identity.pattern == "checks":
        sel = ((ry // period) + (rx // period)) % 2 == 0
    elif identity.pattern == "logo" and view == "front":
        # A chest print is only visible from the front: the same person looks plain from
        # the back, one of the viewpoint changes the model has to learn across.
        sel = (np.abs(rx) < 0.05 * u) & (ry > 0.22 * u) & (ry < 0.32 * u)
    else:
        sel = np.zeros((h, w), bool)
    layer[sel] = identity.upper_secondary
    body = mask > 0
    canvas[body] = layer[body]


def _draw_person(
    canvas: np.ndarray,
    identity: Identity,
    view: str,
    u: float,
    cx: float,
    top: float,
    rng: np.random.Generator,
) -> tuple[int, int, int, int]:
    """Draws a person of height ``u`` pixels, top of head at ``top``, centred at ``cx``.

    Front/back views draw a symmetric body; left/right draw a narrower profile with arms and
    legs in stride, mirrored by ``d``. Returns the body box (x0, y0, x1, y1) for occlusion.
    """
    h, w = canvas.shape[:2]
    d = {"left": -1, "right": 1}.get(view, 0)  # facing direction in profile, 0 if frontal
    side = d != 0

    def y(f: float) -> int:
        return int(round(top + f * u))

    def x(f: float) -> int:
        return int(round(cx + f * u))

    tw = (0.075 if side else 0.115) * identity.width  # torso half-width / u
    aw = max(2, int(0.05 * u))  # arm thickness in pixels
    lw = max(2, int((0.07 if side else 0.075) * identity.width * u))  # leg thickness

    # Long hair hangs behind the head and shoulders, so it goes first when seen from the front.
    if identity.hair_style == "long" and view == "front":
        cv2.rectangle(canvas, (x(-0.06), y(0.05)), (x(0.06), y(0.24)), identity.hair, -1)

    # Legs, then shoes; clothes go over them.
    hip, ankle = 0.5, 0.93
    if side:
        stride = rng.uniform(0.02, 0.09)
        legs = [
            ((x(0.0), y(hip)), (x(stride * d), y(ankle))),
            ((x(0.0), y(hip)), (x(-stride * d), y(ankle))),
        ]
    else:
        spread = 0.045 * identity.width + rng.uniform(-0.01, 0.01)
        legs = [
            ((x(-spread), y(hip)), (x(-spread * 1.2), y(ankle))),
            ((x(spread), y(hip)), (x(spread * 1.2), y(ankle))),
        ]
    bare_from = {"trousers": ankle, "shorts": 0.66, "skirt": 0.7}[identity.lower_style]
    for p0, p1 in legs:
        cv2.line(canvas, p0, p1, identity.skin, lw)
        if identity.lower_style != "skirt":
            # Cloth covers the leg from the hip down to bare_from.
            t = (bare_from - hip) / (ankle - hip)
            pm = (int(p0[0] + t * (p1[0] - p0[0])), int(p0[1] + t * (p1[1] - p0[1])))
            cv2.line(canvas, p0, pm, identity.lower, lw + 1)
    for _, p1 in legs:
        fwd = int(0.03 * u) * d  # shoes point where the person faces
        cv2.ellipse(
            canvas,
            (p1[0] + fwd, p1[1] + int(0.015 * u)),
            (int((0.05 if side else 0.035) * u), max(1, int(0.02 * u))),
            0,
            0,
            360,
            identity.shoes,
            -1,
        )
    # Hip block joins the legs to the torso; a skirt is a trapezoid flaring out.
    if identity.lower_style == "skirt":
        pts = np.array(
            [
                [x(-tw * 0.9), y(0.47)],
                [x(tw * 0.9), y(0.47)],
                [x(tw * 1.3), y(0.7)],
                [x(-tw * 1.3), y(0.7)],
            ],
            np.int32,
        )
        cv2.fillPoly(canvas, [pts], identity.lower)
    else:
        cv2.rectangle(canvas, (x(-tw * 0.9), y(0.46)), (x(tw * 0.9), y(0.56)), identity.lower, -1)

    # A profile backpack sticks out behind the body; draw it before the torso.
    if identity.accessory == "backpack" and side:
        cv2.rectangle(
            canvas,
            (x(-d * (tw + 0.07)), y(0.17)),
            (x(-d * tw * 0.5), y(0.42)),
            identity.accessory_color,
            -1,
        )

    # Torso: a hexagon with sloping shoulders, filled with the pattern via a mask.
    mask = np.zeros(canvas.shape[:2], np.uint8)
    torso = np.array(
        [
            [x(-tw * 0.8), y(0.15)],
            [x(tw * 0.8), y(0.15)],
            [x(tw), y(0.2)],
            [x(tw * 0.92), y(0.5)],
            [x(-tw * 0.92), y(0.5)],
            [x(-tw), y(0.2)],
        ],
        np.int32,
    )
    cv2.fillPoly(mask, [torso], 255)
    _torso_pattern(canvas, mask, identity, u, cx, top, view)

    # Arms: sleeve colour down to the elbow (or wrist), skin beyond, a hand at the end.
    sleeve_to = 0.9 if identity.long_sleeves else 0.4
    if side:
        swing = rng.uniform(-0.06, 0.06)
        arms = [((x(0.0), y(0.18)), (x(swing), y(0.47)))]
    else:
        arms = [
            ((x(s * (tw + 0.02)), y(0.18)), (x(s * (tw + 0.035 + rng.uniform(0, 0.02))), y(0.47)))
            for s in (-1, 1)
        ]
    for p0, p1 in arms:
        pm = (int(p0[0] + sleeve_to * (p1[0] - p0[0])), int(p0[1] + sleeve_to * (p1[1] - p0[1])))
        cv2.line(canvas, p0, p1, identity.skin, aw)
        cv2.line(canvas, p0, pm, identity.upper, aw + 1)
        cv2.circle(canvas, p1, max(1, aw // 2 + 1), identity.skin, -1)

    # Accessories over the torso.
    if identity.accessory == "backpack":
        if view == "back":
            cv2.rectangle(
                canvas,
                (x(-tw * 0.75), y(0.17)),
                (x(tw * 0.75), y(0.43)),
                identity.accessory_color,
                -1,
            )
            cv2.rectangle(
                canvas,
                (x(-tw * 0.55), y(0.3)),
                (x(tw * 0.55), y(0.4)),
                tuple(int(v * 0.7) for v in identity.accessory_color),
                -1,
            )
        elif view == "front":  # only the straps show
            for s in (-1, 1):
                cv2.line(
                    canvas,
                    (x(s * tw * 0.55), y(0.15)),
                    (x(s * tw * 0.6), y(0.33)),
                    identity.accessory_color,
                    max(1, int(0.02 * u)),
                )
    elif identity.accessory == "handbag":
        # Seen from the back the bag is on the other side of the image; in profile it hangs
        # at the hip in front of the body (s = 0 centres it and makes the strap vertical).
        s = 0 if side else identity.bag_side * (-1 if view == "back" else 1)
        bx = tw + 0.04
        cv2.line(
            canvas,
            (x(-s * tw * 0.6), y(0.16)),
            (x(s * bx), y(0.45)),
            identity.accessory_color,
            max(1, int(0.012 * u)),
        )
        cv2.rectangle(
            canvas,
            (x(s * bx - 0.05), y(0.44)),
            (x(s * bx + 0.05), y(0.56)),
            identity.accessory_color,
            -1,
        )

    # Head: skin face with hair over the top (all hair from behind).
    head_c = (x(0.01 * d), y(0.075))
    head_ax = (int(0.05 * u), int(0.065 * u))
    cv2.line(canvas, (x(0.0), y(0.12)), (x(0.0), y(0.16)), identity.skin, max(2, int(0.04 * u)))
    bald = identity.hair_style == "bald"
    face = identity.skin if (view != "back" or bald) else identity.hair
    cv2.ellipse(canvas, head_c, head_ax, 0, 0, 360, face, -1)
    if not bald and view != "back":
        # Hair cap: the upper half of the head, shifted backwards in profile.
        start, end = (180, 360) if not side else ((200, 380) if d < 0 else (160, 340))
        hair_ax = (head_ax[0] + 1, int(head_ax[1] * 0.8))
        cv2.ellipse(
            canvas,
            (head_c[0] - int(0.012 * u) * d, head_c[1] - int(0.01 * u)),
            hair_ax,
            0,
            start,
            end,
            identity.hair,
            -1,
        )
    if identity.hair_style == "long" and view != "front":
        # From behind it covers the neck; in profile it hangs at the back of the head.
        hx0, hx1 = (-0.05, 0.05) if not side else sorted((0.0, -0.055 * d))
        cv2.rectangle(canvas, (x(hx0), y(0.07)), (x(hx1), y(0.24)), identity.hair, -1)
    if identity.accessory == "hat":
        cv2.ellipse(
            canvas,
            (head_c[0], head_c[1] - int(0.02 * u)),
            (head_ax[0] + 2, int(head_ax[1] * 0.75)),
            0,
            180,
            360,
            identity.accessory_color,
            -1,
        )
        brim_x0 = x(-0.07) if not side else min(x(0.0), x(0.09 * d))
        brim_x1 = x(0.07) if not side else max(x(0.0), x(0.09 * d))
        cv2.rectangle(canvas, (brim_x0, y(0.045)), (brim_x1, y(0.06)), identity.accessory_color, -1)
    # Dark dots for eyes: a cheap cue that says which way the person faces at 64 px width.
    eyes = (-0.018, 0.018) if view == "front" else ((0.03 * d,) if side else ())
    for ex in eyes:
        cv2.circle(
            canvas, (head_c[0] + int(ex * u), head_c[1]), max(1, int(0.007 * u)), (30, 30, 30), -1
        )

    half = (tw + 0.06) * u
    return (int(cx - half), int(top), int(cx + half), int(top + 0.97 * u))


def render_image(
    identity: Identity | None,
    camera: Camera,
    rng: np.random.Generator,
    height: int = 128,
    width: int = 64,
    zoom: float = 1.0,
) -> np.ndarray:
    """Renders one detector crop of ``identity`` as seen by ``camera``.

    Args:
        identity: the person to draw, or None for a background-only crop (junk).
        camera: viewing conditions.
        rng: per-image generator for pose, position and noise jitter.
        height, width: output size in pixels.
        zoom: extra person scale; > 1 gives the partial-body crops of bad detections.

    Returns:
        (height, width, 3) uint8 BGR image.
    """
    hs, ws = height * _SUPERSAMPLE, width * _SUPERSAMPLE
    img = _draw_background(camera, rng, hs, ws)
    if identity is not None:
        view = VIEWS[int(rng.choice(4, p=camera.view_probs))]
        # Imperfect detector boxes: the person is not always centred nor the same size.
        u = hs * camera.scale * identity.height * zoom * rng.uniform(0.9, 1.08)
        cx = ws / 2 + rng.normal(0, 0.07) * ws
        top = (hs - u) / 2 + rng.normal(0, 0.04) * hs
        if zoom > 1:
            top -= rng.uniform(0, u - hs) if u > hs else 0
        x0, y0, x1, y1 = _draw_person(img, identity, view, u, cx, top, rng)
        if rng.random() < camera.occlusion_p:
            _occlude(img, rng, camera, (x0, y0, x1, y1))
    img = cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA)

    # Lighting: camera gain and cast, per-image brightness and a left-right light gradient.
    light = camera.gain * rng.uniform(0.85, 1.15)
    cast = np.asarray(camera.cast, np.float32) * rng.uniform(0.95, 1.05, 3).astype(np.float32)
    ramp = np.linspace(1 - 0.15, 1 + 0.15, width, dtype=np.float32)
    if rng.random() < 0.5:
        ramp = ramp[::-1]
    out = img.astype(np.float32) * (light * cast)[None, None, :] * ramp[None, :, None]
    sigma = camera.blur * rng.uniform(0.7, 1.3)
    if sigma > 0.3:
        out = cv2.GaussianBlur(out, (0, 0), sigma)
    out += rng.normal(0, camera.noise, out.shape).astype(np.float32)
    return np.clip(out, 0, 255).astype(np.uint8)


def _occlude(
    img: np.ndarray, rng: np.random.Generator, camera: Camera, box: tuple[int, int, int, int]
) -> None:
    """Covers 10-30% of the body box with an obstacle (bin, car, fence or passer-by)."""
    x0, y0, x1, y1 = box
    bw, bh = max(1, x1 - x0), max(1, y1 - y0)
    frac = rng.uniform(0.1, 0.3)
    color = _jitter_color(rng, camera.scene_colors[int(rng.integers(4))], 20)
    if rng.random() < 0.5:  # from the bottom, like a bench or a car bonnet
        cv2.rectangle(img, (x0 - bw, y1 - int(frac * bh)), (x1 + bw, img.shape[0]), color, -1)
    else:  # from one side, like a pillar or another pedestrian
        cut = int(frac * bw)
        if rng.random() < 0.5:
            cv2.rectangle(img, (0, y0), (x0 + cut, y1), color, -1)
        else:
            cv2.rectangle(img, (x1 - cut, y0), (img.shape[1], y1), color, -1)


@dataclass(frozen=True)
class _Job:
    """One image to write: where, who, and which RNG stream draws it."""

    split: str
    pid: int  # file-name pid: >= 1 real, 0 distractor, -1 junk
    camid: int
    frame: int
    serial: int  # index of the per-image RNG stream
    look: tuple[int, ...]  # RNG entropy of the appearance (identity, distractor or junk)

    @property
    def filename(self) -> str:
        pid = "-1" if self.pid == -1 else f"{self.pid:04d}"
        # Sequence is always 1 and box index 00: Market names, a single recording session.
        return f"{pid}_c{self.camid}s1_{self.frame:06d}_00.jpg"


def _plan(
    seed: int,
    num_train_ids: int,
    num_test_ids: int,
    images_per_id_per_camera: tuple[int, int],
    num_cameras: int,
    num_distractors: int,
    num_junk: int,
) -> list[_Job]:
    """Decides every file of the tree (split, pid, camera, frame) before drawing any."""
    rng = np.random.default_rng([seed, _TAG_PLAN])
    lo, hi = images_per_id_per_camera
    # Frame numbers increase per camera over the whole tree, so (pid, camid, frame) is unique
    # and file names never collide, as in a real recording.
    next_frame = {c: int(rng.integers(1, 1000)) for c in range(1, num_cameras + 1)}
    jobs: list[_Job] = []

    def add(split: str, pid: int, camid: int, look: tuple[int, ...]) -> None:
        jobs.append(_Job(split, pid, camid, next_frame[camid], len(jobs), look))
        next_frame[camid] += int(rng.integers(1, 60))

    def cameras_for_id() -> list[int]:
        # Every identity is seen by at least two cameras, so cross-camera matches exist.
        k = int(rng.integers(2, num_cameras + 1))
        return sorted(int(c) for c in rng.choice(np.arange(1, num_cameras + 1), k, False))

    for pid in range(1, num_train_ids + 1):
        for camid in cameras_for_id():
            for _ in range(int(rng.integers(lo, hi + 1))):
                add("bounding_box_train", pid, camid, (seed, pid))
    for pid in range(num_train_ids + 1, num_train_ids + num_test_ids + 1):
        cams = cameras_for_id()
        # The gallery holds the id in all of its cameras; queries come from a subset, so
        # every query has a gallery match in another camera (as in Market-1501).
        for camid in cams:
            for _ in range(int(rng.integers(lo, hi + 1))):
                add("bounding_box_test", pid, camid, (seed, pid))
        n_query = int(rng.integers(1, len(cams) + 1))
        for camid in sorted(int(c) for c in rng.choice(cams, n_query, False)):
            add("query", pid, camid, (seed, pid))
    for i in range(num_distractors):
        # Distractors are people nobody queries for: each is a fresh appearance, pid 0000.
        add(
            "bounding_box_test",
            0,
            int(rng.integers(1, num_cameras + 1)),
            (seed, _TAG_DISTRACTOR, i),
        )
    for i in range(num_junk):
        add("bounding_box_test", -1, int(rng.integers(1, num_cameras + 1)), (seed, _TAG_JUNK, i))
    return jobs


def _validate(
    num_train_ids: int,
    num_test_ids: int,
    images_per_id_per_camera: tuple[int, int],
    num_cameras: int,
    num_distractors: int,
    num_junk: int,
    height: int,
    width: int,
) -> None:
    if num_train_ids < 1 or num_test_ids < 1:
        raise ValueError(
            f"num_train_ids={num_train_ids}, num_test_ids={num_test_ids}: expected both >= 1"
        )
    if num_train_ids + num_test_ids > 9999:
        raise ValueError(
            f"num_train_ids + num_test_ids = {num_train_ids + num_test_ids}: Market-1501 "
            "file names hold 4-digit pids, expected <= 9999"
        )
    if not 2 <= num_cameras <= 9:
        raise ValueError(
            f"num_cameras={num_cameras}: expected 2..9 (every identity needs two cameras; "
            "Market-1501 names hold a single camera digit)"
        )
    lo, hi = images_per_id_per_camera
    if not 1 <= lo <= hi:
        raise ValueError(
            f"images_per_id_per_camera={images_per_id_per_camera}: expected 1 <= lo <= hi"
        )
    if num_distractors < 0 or num_junk < 0:
        raise ValueError(
            f"num_distractors={num_distractors}, num_junk={num_junk}: expected both >= 0"
        )
    if height < 32 or width < 16:
        raise ValueError(f"height={height}, width={width}: expected height >= 32, width >= 16")


def generate_market_tree(
    root: str | Path,
    num_train_ids: int = 60,
    num_test_ids: int = 40,
    images_per_id_per_camera: tuple[int, int] = (1, 3),
    num_cameras: int = 4,
    num_distractors: int = 20,
    num_junk: int = 5,
    height: int = 128,
    width: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Writes a synthetic Market-1501 tree of procedurally drawn people.

    Train pids are ``1..num_train_ids``, test pids follow; the two sets are disjoint. Every
    identity appears in 2..num_cameras cameras with ``images_per_id_per_camera`` (inclusive
    range) images per camera. ``bounding_box_test`` also gets ``num_distractors`` images with
    pid ``0000`` and ``num_junk`` with pid ``-1``. File names follow Market-1501:
    ``PPPP_cCsS_FFFFFF_NN.jpg``.

    The tree is built in ``<root>.tmp-<process id>`` and renamed into place, with a
    ``.complete`` JSON marker holding the parameters, so readers never see a half-written
    tree. An existing ``root`` is replaced. Same arguments give byte-identical files.

    Args:
        root: output directory.
        num_train_ids: identities in ``bounding_box_train``.
        num_test_ids: identities in ``query`` and ``bounding_box_test``.
        images_per_id_per_camera: (min, max) images of an identity per camera it appears in.
        num_cameras: cameras, 2..9.
        num_distractors: gallery images of unrelated people (pid 0).
        num_junk: gallery images of bad detections (pid -1).
        height, width: image size in pixels.
        seed: seed of every random choice.
        progress: show a tqdm progress bar.

    Returns:
        ``root`` as a Path.

    Raises:
        ValueError: if a count or size is out of range.
    """
    root = Path(os.path.abspath(root))  # "." has no name to build the temporary sibling from
    images_per_id_per_camera = tuple(int(v) for v in images_per_id_per_camera)  # type: ignore[assignment]
    _validate(
        num_train_ids,
        num_test_ids,
        images_per_id_per_camera,
        num_cameras,
        num_distractors,
        num_junk,
        height,
        width,
    )
    params = _params_for_marker(
        num_train_ids=num_train_ids,
        num_test_ids=num_test_ids,
        images_per_id_per_camera=images_per_id_per_camera,
        num_cameras=num_cameras,
        num_distractors=num_distractors,
        num_junk=num_junk,
        height=height,
        width=width,
        seed=seed,
    )
    jobs = _plan(
        seed,
        num_train_ids,
        num_test_ids,
        images_per_id_per_camera,  # type: ignore[arg-type]
        num_cameras,
        num_distractors,
        num_junk,
    )
    cameras = {
        c: sample_camera(np.random.default_rng([seed, _TAG_CAMERA, c]))
        for c in range(1, num_cameras + 1)
    }

    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        for split in SPLIT_DIRS:
            (tmp / split).mkdir(parents=True)
        counts = dict.fromkeys(SPLIT_DIRS, 0)
        identities: dict[tuple[int, ...], Identity] = {}
        if progress:
            print(f"[data] generating the synthetic dataset {root.name} ({len(jobs)} images, "
                  "once) ...", flush=True)
        # the bar only on a terminal (disable=None): in a log file it is one endless line
        for job in tqdm(jobs, desc=f"synthetic {root.name}", disable=None if progress else True,
                        unit="img", leave=False):
            if job.look not in identities:
                identities[job.look] = sample_identity(np.random.default_rng(list(job.look)))
            rng = np.random.default_rng([seed, _TAG_IMAGE, job.serial])
            camera = cameras[job.camid]
            if job.pid == -1:
                # Junk: half empty background, half a zoomed-in body fragment.
                person = identities[job.look] if rng.random() < 0.5 else None
                img = render_image(
                    person, camera, rng, height, width, zoom=float(rng.uniform(1.8, 3.0))
                )
            else:
                img = render_image(identities[job.look], camera, rng, height, width)
            ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, camera.jpeg_quality])
            if not ok:
                raise RuntimeError(f"cv2.imencode failed for {job.filename}")
            (tmp / job.split / job.filename).write_bytes(buf.tobytes())
            counts[job.split] += 1
        marker = {"version": GENERATOR_VERSION, "params": params, "counts": counts}
        (tmp / MARKER_NAME).write_text(json.dumps(marker, indent=2, sort_keys=True))
        _move_into_place(tmp, root, marker)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _move_into_place(tmp: Path, root: Path, marker: dict[str, Any]) -> None:
    """Renames ``tmp`` to ``root``, replacing an old tree; tolerates a concurrent writer."""
    old = root.with_name(f"{root.name}.old-{os.getpid()}")
    if root.exists():
        if not root.is_dir():
            raise FileExistsError(f"{root} exists and is not a directory")
        os.replace(root, old)
    try:
        os.rename(tmp, root)
    except OSError:
        # Another process (e.g. a second Ray worker) renamed its tree in first. Identical
        # parameters mean identical bytes, so theirs is as good as ours.
        if _read_marker(root) != marker:
            raise
    finally:
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)


def _params_for_marker(**params: Any) -> dict[str, Any]:
    # Through JSON once so tuples become lists and the dict compares equal to a re-read one.
    return json.loads(json.dumps(params, sort_keys=True))


def _read_marker(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def ensure_synthetic(root: str | Path, progress: bool = True, **params: Any) -> Path:
    """Returns ``root``, generating it first unless a complete tree with ``params`` is there.

    Cheap to call from every worker: it only reads the ``.complete`` marker when the tree is
    up to date; a missing marker, other parameters or an older generator version rebuild it.

    Args:
        root: output directory.
        progress: show a progress bar if generating.
        **params: keyword arguments of ``generate_market_tree`` (defaults filled in).

    Returns:
        ``root`` as a Path.

    Raises:
        TypeError: on a parameter ``generate_market_tree`` does not take.
    """
    root = Path(os.path.abspath(root))  # "." has no name to build the temporary sibling from
    bound = inspect.signature(generate_market_tree).bind(root, progress=progress, **params)
    bound.apply_defaults()
    wanted = {k: v for k, v in bound.arguments.items() if k not in ("root", "progress")}
    wanted["images_per_id_per_camera"] = tuple(int(v) for v in wanted["images_per_id_per_camera"])
    marker = _read_marker(root)
    if marker is None and root.is_dir() and any(root.iterdir()):
        # Regenerating replaces `root` entirely: never do that to data we did not write.
        raise ValueError(
            f"{root} is not empty and holds no synthetic dataset (no {MARKER_NAME} marker); "
            "refusing to overwrite it. With data.format=synthetic leave data.root empty or "
            "point it at a new folder; for a real dataset set data.format (market1501, folder, "
            "csv)"
        )
    if (
        marker is not None
        and marker.get("version") == GENERATOR_VERSION
        and marker.get("params") == _params_for_marker(**wanted)
    ):
        return root
    return generate_market_tree(root, progress=progress, **wanted)
