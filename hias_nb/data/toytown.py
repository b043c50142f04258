"""toytown: the embedded two-domain street-scene benchmark (procedural, generated from a seed).

Not part of the paper: a stand-in for GTA5 -> Cityscapes (docs/method.md §1.1, 7.2) that is small enough to train
on a CPU in minutes. Its design notes are in `docs/toytown.md`. Why one module over 600 lines: the generator is
one procedural drawing program (scene layout, each class's drawing, both domains' rendering); its parts share the
camera geometry and the palettes and are read together.

Every scene is drawn from one layout distribution: a road converging to a vanishing point, sidewalks, building
facades with windows, verges of terrain, walls/fences/hedges, trees, poles carrying lamps, traffic lights and
signs, cars/trucks/buses on lanes, sometimes a tram, persons, riders on bicycles/motorcycles and parked
two-wheelers, all with the 19 Cityscapes train ids (`hias_nb.classes.CITYSCAPES_CLASSES`).

Colours: walls, fences, buildings, signs, clothes and every vehicle are drawn in any hue (`COLOUR_RANGES`), so
colour does not tell those classes apart, as on photographs; paving is light and nearly grey (any tint), and road,
vegetation, terrain and sky keep a natural range. Paving, walls, fences, trucks, terrain, foliage (and, in the
photo look, the road) carry luminance patterns (`_class_patterns`) that colour operations keep.

Two domains:
- **source** (game-like): sharp edges, faint textures, the game's surface patterns (small tiles, brick walls,
  slatted fences, ribbed trucks) and sign faces (disc, square, triangle);
- **target** (photo-like): surfaces blended from the game's towards the photo's patterns (large slabs, concrete
  panels, wire-mesh fences, panelled trucks, patched asphalt) as far as the image's severity; sign faces disc,
  wide panel, diamond; natural colours moved (paving greyer, grass drier, foliage duller, sky paler),
  desaturation, stronger and coarser noise textures, a cast shadow, haze, a lighting gradient, gamma/contrast, a
  colour cast, blur and sensor noise; a slightly different camera (narrower field of view, so objects look
  larger) and different object frequencies (more pedestrians and two-wheelers, fewer trucks). The severity is
  drawn per target image (`draw_severity`: a mild majority and a hard tail), so the target is heterogeneous.

Thin and small classes (pole, traffic light, traffic sign, person, rider, motorcycle, bicycle) are rare, as in
real street data, but never thinner than `max(3, H // THIN_DIVISOR)` pixels, so they stay learnable.

Layout on disk::

    DIR/manifest.json
    DIR/{source,target}/{train,val}/{images,labels}/00000.png

Labels are uint8 grey PNGs with values 0..18 (drawn without anti-aliasing: no 255 in them).
"""

from __future__ import annotations

import colorsys
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from hias_nb.classes import CITYSCAPES_CLASSES
from hias_nb.errors import InputError

__all__ = [
    "DomainStyle",
    "SOURCE_STYLE",
    "TARGET_STYLE",
    "TARGET_SEVERITY",
    "SEVERITY_SHAPE",
    "draw_severity",
    "SPLITS",
    "VERSION",
    "render_scene",
    "split_counts",
    "generate_toytown",
    "ensure_toytown",
    "read_manifest",
    "generator_digest",
]

VERSION = 2
NUM_CLASSES = 19
SPLITS: tuple[str, ...] = ("source_train", "source_val", "target_train", "target_val")
# Per target image, severity = lo + (hi - lo) * Beta(a, b): a mild majority and a hard tail.
TARGET_SEVERITY: tuple[float, float] = (0.0, 1.0)
SEVERITY_SHAPE: tuple[float, float] = (1.3, 2.2)
DESATURATION = 0.4  # photo colours lose this fraction of their saturation at severity 1
THIN_DIVISOR = 14  # thin objects are at least max(3, H // THIN_DIVISOR) pixels wide
SHADOW_DARKENING = 0.45  # a cast shadow darkens the ground by up to this fraction (target only)
PNG_COMPRESS_LEVEL = 6  # fixed so that the same seed gives the same bytes

# Train ids, named for readability of the drawing code.
ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY = range(11)
PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE = range(11, 19)

CAMERA_HEIGHT = 1.6  # metres
FAR = 400.0  # metres: where ground strips end (they converge to the vanishing point)

# Per class, the range its instances' colours are drawn from, the same in both domains: (hue centre, hue
# half-width) in degrees, (saturation lo, hi), (value lo, hi) in HSV. Classes whose real counterparts come in
# any colour (buildings, walls, fences, signs, clothes, every vehicle) draw any hue with a wide saturation and
# value, so their colour says nothing about them and a model must learn their shape, texture and place, as on
# photographs; the strong view's hue, grey and solarise operations then erase no class. Ground, vegetation and
# sky keep a natural range (as on photographs, colour is one of their cues).
ANY_HUE = (0.0, 180.0)
COLOUR_RANGES: list[tuple[tuple[float, float], tuple[float, float], tuple[float, float]]] = [
    ((230.0, 30.0), (0.0, 0.15), (0.22, 0.42)),  # road: dark grey asphalt
    (ANY_HUE, (0.0, 0.2), (0.45, 0.78)),  # sidewalk: light paving, any tint
    (ANY_HUE, (0.05, 0.45), (0.35, 0.82)),  # building
    (ANY_HUE, (0.0, 0.5), (0.3, 0.9)),  # wall
    (ANY_HUE, (0.0, 0.6), (0.25, 0.8)),  # fence
    (ANY_HUE, (0.0, 0.12), (0.2, 0.55)),  # pole: grey metal, any faint tint
    (ANY_HUE, (0.0, 0.12), (0.08, 0.25)),  # traffic light: dark housing
    (ANY_HUE, (0.4, 1.0), (0.55, 1.0)),  # traffic sign
    ((110.0, 25.0), (0.4, 0.8), (0.25, 0.6)),  # vegetation
    ((75.0, 35.0), (0.3, 0.65), (0.4, 0.75)),  # terrain: grass to dry earth
    ((210.0, 15.0), (0.05, 0.6), (0.75, 1.0)),  # sky: blue to overcast
    (ANY_HUE, (0.0, 0.8), (0.15, 0.9)),  # person (clothes)
    (ANY_HUE, (0.0, 0.8), (0.15, 0.9)),  # rider (clothes)
    (ANY_HUE, (0.0, 0.85), (0.2, 0.95)),  # car
    (ANY_HUE, (0.0, 0.85), (0.2, 0.95)),  # truck
    (ANY_HUE, (0.0, 0.85), (0.2, 0.95)),  # bus
    (ANY_HUE, (0.0, 0.85), (0.2, 0.95)),  # train
    (ANY_HUE, (0.0, 0.9), (0.15, 0.95)),  # motorcycle
    (ANY_HUE, (0.0, 0.9), (0.15, 0.95)),  # bicycle
]


def _hsv_to_rgb(hue_deg: float, sat: float, val: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((hue_deg % 360.0) / 360.0, sat, val)
    return int(round(255 * r)), int(round(255 * g)), int(round(255 * b))


# A class's central colour: what the pretraining domain scales its random colours against (windows stay darker
# than their facade).
GAME_PALETTE = np.array([_hsv_to_rgb(h, sum(s) / 2, sum(v) / 2) for (h, _), s, v in COLOUR_RANGES], dtype=np.float32)
# Per class, the move (RGB, at severity 1) of the target's colours: as in GTA5 -> Cityscapes, paving turns
# greyer and darker and grass drier (large moves), foliage duller and skies paler (smaller ones); classes drawn
# in any hue are only desaturated (DESATURATION) and cast (the photo finish).
PHOTO_SHIFT = np.zeros((NUM_CLASSES, 3), dtype=np.float32)
PHOTO_SHIFT[SIDEWALK] = (-60, -60, -51)  # towards the road's grey
PHOTO_SHIFT[VEGETATION] = (6, -24, -3)  # olive
PHOTO_SHIFT[TERRAIN] = (45, -15, -37.5)  # dry, brown
PHOTO_SHIFT[SKY] = (24, 15, -6)  # paler, hazier

SKIN = [(236, 190, 150), (190, 140, 100), (120, 80, 55)]

# Texture amplitude per class (grey levels of a fine and a coarse noise field); target textures are stronger
# and coarser, as in photographs.
SOURCE_TEXTURE = np.array([3, 3, 3, 3, 3, 2, 2, 2, 6, 5, 1, 2, 2, 2, 2, 2, 2, 2, 2], dtype=np.float32)
TARGET_FINE = np.array([8, 7, 7, 6, 6, 4, 4, 4, 14, 12, 2, 5, 5, 4, 4, 4, 4, 5, 5], dtype=np.float32)
TARGET_COARSE = np.array([10, 8, 12, 8, 8, 4, 4, 4, 16, 14, 8, 4, 4, 6, 6, 6, 6, 4, 4], dtype=np.float32)


@dataclass(frozen=True)
class DomainStyle:
    """Layout and object statistics of one domain (the layout *distribution* is shared, its rates differ), and
    the look of its sign faces and surfaces."""

    horizon: tuple[float, float]  # horizon row as a fraction of H, drawn uniformly
    zoom: float  # near-ground depth in metres at the bottom row: larger = narrower view, bigger objects
    cars_per_lane: float  # Poisson mean, per driving lane and per parking lane
    p_truck: float  # chance a vehicle is a truck
    p_bus: float  # chance a vehicle is a bus
    p_train: float  # chance of a tram in the scene
    persons: float  # Poisson mean of pedestrian groups
    riders: float  # Poisson mean of riders (on a bicycle or motorcycle)
    p_motorcycle: float  # chance a two-wheeler is a motorcycle
    parked_two_wheelers: float  # Poisson mean
    pole_spacing: tuple[float, float]  # metres between poles along each kerb
    p_tree: float  # chance of a tree at each tree slot
    p_terrain: float  # chance a verge segment is terrain (else sidewalk)
    p_wall: float
    p_fence: float
    p_hedge: float
    sign_shapes: tuple[int, ...]  # sign faces drawn: 0 disc, 1 square, 2 triangle, 3 wide panel, 4 diamond
    photo_surfaces: bool  # surfaces take the photo's look (concrete walls, mesh fences, ...) as far as the severity


SOURCE_STYLE = DomainStyle(
    horizon=(0.36, 0.46), zoom=4.0, cars_per_lane=1.3, p_truck=0.14, p_bus=0.08, p_train=0.25, persons=2.2,
    riders=0.9, p_motorcycle=0.4, parked_two_wheelers=0.8, pole_spacing=(15.0, 28.0), p_tree=0.45,
    p_terrain=0.4, p_wall=0.25, p_fence=0.25, p_hedge=0.25, sign_shapes=(0, 1, 2), photo_surfaces=False,
)  # fmt: skip
TARGET_STYLE = DomainStyle(
    horizon=(0.38, 0.48), zoom=4.6, cars_per_lane=1.1, p_truck=0.08, p_bus=0.08, p_train=0.25, persons=2.8,
    riders=1.1, p_motorcycle=0.3, parked_two_wheelers=1.0, pole_spacing=(14.0, 26.0), p_tree=0.5,
    p_terrain=0.45, p_wall=0.2, p_fence=0.3, p_hedge=0.3, sign_shapes=(0, 3, 4), photo_surfaces=True,
)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------------------


class _Canvas:
    """Colour image and label map drawn with the same shapes (labels without anti-aliasing)."""

    def __init__(self, h: int, w: int, shade: Callable[[int, tuple], tuple[int, int, int]]):
        self.h, self.w = h, w
        self.img = Image.new("RGB", (w, h))
        self.lab = Image.new("L", (w, h))
        self.di = ImageDraw.Draw(self.img)
        self.dl = ImageDraw.Draw(self.lab)
        self.shade = shade

    def poly(self, pts: list[tuple[float, float]], cls: int, colour: tuple, label: bool = True) -> None:
        self.di.polygon(pts, fill=self.shade(cls, colour))
        if label:
            self.dl.polygon(pts, fill=cls)

    def rect(self, x0: float, y0: float, x1: float, y1: float, cls: int, colour: tuple, label: bool = True):
        """Axis-aligned box in pixel coordinates (inclusive of both ends after rounding)."""
        box = (round(min(x0, x1)), round(min(y0, y1)), round(max(x0, x1)), round(max(y0, y1)))
        self.di.rectangle(box, fill=self.shade(cls, colour))
        if label:
            self.dl.rectangle(box, fill=cls)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, cls: int, colour: tuple, width: int = 0):
        box = (round(cx - rx), round(cy - ry), round(cx + rx), round(cy + ry))
        if box[2] <= box[0] or box[3] <= box[1]:
            self.rect(*box, cls, colour)
            return
        if width:
            self.di.ellipse(box, outline=self.shade(cls, colour), width=width)
            self.dl.ellipse(box, outline=cls, width=width)
        else:
            self.di.ellipse(box, fill=self.shade(cls, colour))
            self.dl.ellipse(box, fill=cls)

    def line(self, pts: list[tuple[float, float]], cls: int, colour: tuple, width: int, label: bool = True) -> None:
        self.di.line(pts, fill=self.shade(cls, colour), width=width)
        if label:
            self.dl.line(pts, fill=cls, width=width)


@dataclass
class _Camera:
    """Pinhole camera looking along the road: world (X right, Y up, depth d) -> pixel (x, y)."""

    x_v: float  # vanishing point column
    y_h: float  # horizon row
    f: float  # pixels per metre at depth `zoom`
    zoom: float

    def s(self, d: float) -> float:
        return self.zoom / d

    def __call__(self, x: float, y: float, d: float) -> tuple[float, float]:
        s = self.zoom / d
        return self.x_v + self.f * x * s, self.y_h + self.f * (CAMERA_HEIGHT - y) * s

    def ppm(self, d: float) -> float:
        """Pixels per metre at depth d."""
        return self.f * self.zoom / d


def _jitter(rng: np.random.Generator, colour: tuple, amount: float = 18.0) -> tuple[int, int, int]:
    c = np.asarray(colour, dtype=np.float32) + rng.uniform(-amount, amount, 3) + rng.uniform(-amount, amount)
    return tuple(int(v) for v in np.clip(c, 0, 255))


def _pick(rng: np.random.Generator, colours: list[tuple]) -> tuple:
    return colours[int(rng.integers(len(colours)))]


def _colour(rng: np.random.Generator, cls: int) -> tuple[int, int, int]:
    """One instance's colour, drawn from its class's `COLOUR_RANGES` (uniform in hue, saturation, value)."""
    (hue, half), (s0, s1), (v0, v1) = COLOUR_RANGES[cls]
    return _hsv_to_rgb(hue + rng.uniform(-half, half), rng.uniform(s0, s1), rng.uniform(v0, v1))


def _ground_quad(cam: _Camera, x0: float, x1: float, d0: float, d1: float) -> list[tuple[float, float]]:
    return [cam(x0, 0, d0), cam(x1, 0, d0), cam(x1, 0, d1), cam(x0, 0, d1)]


def _facade(cam: _Camera, x: float, y0: float, y1: float, d0: float, d1: float) -> list[tuple[float, float]]:
    """A vertical wall in the plane X = x, from height y0 to y1 and depth d0 to d1."""
    return [cam(x, y0, d0), cam(x, y0, d1), cam(x, y1, d1), cam(x, y1, d0)]


class _Scene:
    """Samples one layout and draws it; `draws` collects depth-sorted street objects."""

    def __init__(self, rng: np.random.Generator, style: DomainStyle, canvas: _Canvas, cam: _Camera, photo: float):
        self.rng, self.style, self.cv, self.cam = rng, style, canvas, cam
        self.photo = photo  # how far surfaces have their photo look: 0 the game's, 1 the photo's
        self.min_px = max(3, canvas.h // THIN_DIVISOR)  # thinnest a pole-like object may be drawn
        self.draws: list[tuple[float, Callable[[], None]]] = []

    # -- helpers ------------------------------------------------------------------------------------------
    def vbar(self, x: float, y0: float, y1: float, d: float, width_m: float, cls: int, colour: tuple) -> None:
        """A vertical bar (pole, post) at world X = x, at least `min_px` pixels wide."""
        cx, ya = self.cam(x, y0, d)
        _, yb = self.cam(x, y1, d)
        w = max(self.min_px, round(width_m * self.cam.ppm(d)))
        x0 = round(cx - w / 2)
        self.cv.rect(x0, yb, x0 + w - 1, ya, cls, colour)

    def box(self, x: float, y0: float, y1: float, d: float, half_w: float, cls: int, colour: tuple, min_px=1):
        """A camera-facing box of width 2*half_w metres (at least `min_px` pixels) between heights y0, y1."""
        cx, ya = self.cam(x, y0, d)
        _, yb = self.cam(x, y1, d)
        w = max(min_px, round(2 * half_w * self.cam.ppm(d)))
        x0 = round(cx - w / 2)
        self.cv.rect(x0, yb, x0 + w - 1, ya, cls, colour)

    # -- the static street ---------------------------------------------------------------------------------
    def ground(self, xl: float, xr: float, sw_l: float, sw_r: float, bl: float, br: float) -> None:
        rng, cv, cam = self.rng, self.cv, self.cam
        near = cam.zoom * 0.3
        sidewalk = _colour(rng, SIDEWALK)
        road = _colour(rng, ROAD)
        cv.poly([(0, cam.y_h), (cv.w, cam.y_h), (cv.w, cv.h), (0, cv.h)], SIDEWALK, sidewalk)
        cv.poly(_ground_quad(cam, xl, xr, near, FAR), ROAD, road)
        # verges between sidewalk and facades: terrain or more pavement, in segments along the street
        terrain = _colour(rng, TERRAIN)
        for x0, x1 in ((bl, xl - sw_l), (xr + sw_r, br)):
            d = near
            while d < 150:
                seg = rng.uniform(6, 30)
                if rng.random() < self.style.p_terrain:
                    cv.poly(_ground_quad(cam, x0, x1, d, d + seg), TERRAIN, terrain)
                d += seg
        # kerbs: a lighter edge line on the sidewalk side (texture only, stays sidewalk)
        # lane markings: dashed centre line and sometimes a zebra crossing
        xc = (xl + xr) / 2
        mark = (235, 235, 225)
        d = near + rng.uniform(0, 6)
        while d < 80:
            cv.poly(_ground_quad(cam, xc - 0.08, xc + 0.08, d, d + 3), ROAD, mark)
            d += 8
        if rng.random() < 0.3:
            d = rng.uniform(7, 20)
            for x in np.arange(xl + 0.3, xr - 0.3, 1.0):
                cv.poly(_ground_quad(cam, x, x + 0.5, d, d + 3), ROAD, mark)

    def buildings(self, x: float, side: int) -> None:
        rng, cv, cam = self.rng, self.cv, self.cam
        blocks = []
        d = cam.zoom * 0.4
        while d < 110:
            length = rng.uniform(12, 32)
            if rng.random() > 0.12:  # else a gap (sky and whatever stands in front)
                blocks.append((d, d + length, rng.uniform(9, 24), _colour(rng, BUILDING)))
            d += length
        for d0, d1, h, colour in reversed(blocks):  # far first
            cv.poly(_facade(cam, x, 0, h, d0, d1), BUILDING, colour)
            window = tuple(int(v * 0.45) for v in colour)
            if rng.random() < 0.5:
                window = (60, 80, 110)
            mirrors = rng.random() < 0.6 * self.photo  # one draw in both looks: the layout does not depend on it
            if mirrors:  # photo: glass that mirrors the sky, lighter than the wall
                window = tuple(int(min(255, 0.4 * v + 140)) for v in colour)
            floor = rng.uniform(2.8, 3.6)
            bay = rng.uniform(2.4, 4.0)
            for y in np.arange(1.2 if rng.random() < 0.5 else floor, h - 1.5, floor):
                for dd in np.arange(d0 + 0.6, d1 - 1.2, bay):
                    cv.poly(_facade(cam, x, y, y + 1.4, dd, dd + 1.2), BUILDING, window)

    def boundary(self, x: float, side: int) -> None:
        """Walls, fences and hedges along the verge edge (in front of the facades)."""
        rng, cv, cam, st = self.rng, self.cv, self.cam, self.style
        d = cam.zoom * 0.4
        segments = []
        while d < 120:
            length = rng.uniform(5, 25)
            u = rng.random()
            if u < st.p_wall:
                segments.append((d, d + length, WALL, rng.uniform(1.4, 2.8)))
            elif u < st.p_wall + st.p_fence:
                segments.append((d, d + length, FENCE, rng.uniform(1.4, 2.4)))
            elif u < st.p_wall + st.p_fence + st.p_hedge:
                segments.append((d, d + length, VEGETATION, rng.uniform(1.2, 2.2)))
            d += length + rng.uniform(0, 10)
        for d0, d1, cls, h in reversed(segments):
            colour = _colour(rng, cls)
            cv.poly(_facade(cam, x, 0, h, d0, d1), cls, colour)
            if cls == FENCE:  # slats, same label: the game's texture of the class, fading with the photo look
                dark = tuple(int(v * (0.6 + 0.4 * self.photo)) for v in colour)
                for dd in np.arange(d0 + 0.3, d1 - 0.2, 0.6):  # inset: a slat never paints outside its fence
                    cv.line([cam(x, 0.15, dd), cam(x, h - 0.15, dd)], FENCE, dark, 1, label=False)  # look, not shape
            elif cls == WALL and rng.random() < 0.5:
                top = tuple(int(min(255, v * 1.2)) for v in colour)
                cv.poly(_facade(cam, x, h - 0.15, h, d0, d1), WALL, top)

    # -- street objects (depth-sorted) ---------------------------------------------------------------------
    def tree(self, x: float, d: float) -> None:
        rng = self.rng
        trunk = _jitter(rng, (90, 60, 30), 10)
        crown = _colour(rng, VEGETATION)
        r = rng.uniform(1.2, 2.4)
        h = rng.uniform(2.2, 3.5)

        def draw() -> None:
            self.vbar(x, 0, h + r * 0.5, d, 0.3, VEGETATION, trunk)
            cx, cy = self.cam(x, h + r * 0.8, d)
            ppm = self.cam.ppm(d)
            self.cv.ellipse(cx, cy, r * ppm, r * 0.9 * ppm, VEGETATION, crown)

        self.draws.append((d, draw))

    def pole(self, x: float, d: float, side: int) -> None:
        """A pole with a lamp arm, a traffic light or a sign."""
        rng = self.rng
        grey = _colour(rng, POLE)
        h = rng.uniform(4.0, 7.0)
        kind = rng.choice(4, p=[0.35, 0.3, 0.25, 0.1])  # lamp, light, sign, light over the road
        sign_colour = _colour(rng, SIGN)
        housing = _colour(rng, LIGHT)
        lamp = _pick(rng, [(230, 40, 30), (250, 190, 20), (40, 220, 90)])
        sign_h = rng.uniform(2.0, 3.0)
        shape = int(rng.choice(self.style.sign_shapes))

        def draw_light(xl: float, y_top: float) -> None:
            self.box(xl, y_top - 1.6, y_top, d, 0.4, LIGHT, housing, self.min_px)
            cx, cy = self.cam(xl, y_top - 0.3 - 0.3 * int(rng.integers(2)), d)
            ppm = self.cam.ppm(d)
            rl = max(0.5, 0.12 * ppm)
            self.cv.ellipse(cx, cy, rl, rl, LIGHT, lamp)

        def draw() -> None:
            cam, cv = self.cam, self.cv
            if kind == 3:  # mast arm over the road carrying the light
                self.vbar(x, 0, h, d, 0.3, POLE, grey)
                xa = x - side * rng.uniform(2.0, 4.0)
                w = max(self.min_px, round(0.15 * cam.ppm(d)))
                cv.line([cam(x, h - 0.2, d), cam(xa, h - 0.2, d)], POLE, grey, w)
                draw_light(xa, h - 0.2)
                return
            top = h if kind != 2 else sign_h + 0.8
            self.vbar(x, 0, top, d, 0.3, POLE, grey)
            if kind == 0:  # street lamp: an arm (pole) with a head (pole)
                xa = x - side * 1.2
                w = max(1, round(0.12 * cam.ppm(d)))
                cv.line([cam(x, h, d), cam(xa, h, d)], POLE, grey, w)
                self.box(xa, h - 0.25, h, d, 0.3, POLE, (200, 200, 190), self.min_px)
            elif kind == 1:
                draw_light(x, top + 1.6)
            else:
                ppm = cam.ppm(d)
                cx, cy = cam(x, sign_h + 0.4, d)
                r = max(2.0, 0.6 * ppm)
                if shape == 0:
                    cv.ellipse(cx, cy, r, r, SIGN, sign_colour)
                elif shape == 1:
                    cv.rect(cx - r, cy - r, cx + r, cy + r, SIGN, sign_colour)
                elif shape == 3:  # a wide information panel
                    cv.rect(cx - 1.6 * r, cy - 0.7 * r, cx + 1.6 * r, cy + 0.7 * r, SIGN, sign_colour)
                elif shape == 4:
                    cv.poly([(cx, cy - 1.2 * r), (cx + 1.2 * r, cy), (cx, cy + 1.2 * r), (cx - 1.2 * r, cy)], SIGN,
                            sign_colour)  # fmt: skip
                else:
                    cv.poly([(cx - r * 1.1, cy - r), (cx + r * 1.1, cy - r), (cx, cy + r)], SIGN, sign_colour)

        self.draws.append((d, draw))

    def vehicle(self, x: float, d: float, cls: int) -> None:
        """Rear face and the side face towards the camera of a car, truck, bus or tram."""
        rng = self.rng
        dims = {CAR: (0.9, 1.5, 4.4), TRUCK: (1.2, 3.2, 8.0), BUS: (1.25, 3.1, 12.0), TRAIN: (1.35, 3.6, 30.0)}
        half_w, height, length = dims[cls]
        body = _colour(rng, cls)
        glass = (40, 50, 66)
        dark = (24, 24, 24)

        def draw() -> None:
            cam, cv = self.cam, self.cv
            xs = x - np.sign(x) * half_w  # the side facing the camera
            body_top = height * (0.6 if cls == CAR else 1.0)
            if abs(x) > half_w:
                cv.poly(_facade(cam, xs, 0.25, body_top, d, d + length), cls, body)
                if cls == CAR:
                    cv.poly([cam(xs, body_top, d + 0.8), cam(xs, body_top, d + 3.6),
                             cam(xs + np.sign(x) * 0.2, height, d + 3.2),
                             cam(xs + np.sign(x) * 0.2, height, d + 1.3)], cls, glass)  # fmt: skip
                else:
                    cv.poly(_facade(cam, xs, height * 0.55, height * 0.85, d + 0.5, d + length - 0.5), cls,
                            glass if cls != TRUCK else tuple(int(v * 0.8) for v in body))  # fmt: skip
                    if cls in (BUS, TRAIN) and self.photo > 0:  # photo: separate panes between pillars
                        pillar = tuple(int(g + (c - g) * self.photo) for g, c in zip(glass, body, strict=True))
                        for dp in np.arange(d + 1.5, d + length - 0.5, 1.6):
                            cv.poly(_facade(cam, xs, height * 0.55, height * 0.85, dp, dp + 0.35), cls, pillar)
                for dw in (0.9, length - 0.9) if cls != TRAIN else (2.0, 4.0, length - 4.0, length - 2.0):
                    cx, cy = cam(xs, 0.35, d + dw)
                    r = max(1.0, 0.38 * cam.ppm(d + dw))
                    cv.ellipse(cx, cy, r, r, cls, dark)
            # rear face
            x0, y0 = cam(x - half_w, 0.15, d)
            x1, y1 = cam(x + half_w, body_top, d)
            cv.rect(x0, y0, x1, y1, cls, body)
            if cls == CAR:
                cv.poly([cam(x - half_w * 0.85, body_top, d), cam(x + half_w * 0.85, body_top, d),
                         cam(x + half_w * 0.65, height, d + 0.3), cam(x - half_w * 0.65, height, d + 0.3)],
                        cls, glass)  # fmt: skip
                for xl in (x - half_w * 0.75, x + half_w * 0.75):  # tail lights
                    self.box(xl, 0.6, 0.8, d, 0.15, cls, (230, 20, 20))
                self.box(x, 0.0, 0.3, d, half_w * 0.9, cls, dark)
            else:
                self.box(x, height * 0.5, height * 0.85, d, half_w * 0.8, cls, glass)
                self.box(x, 0.0, 0.2, d, half_w * 0.9, cls, dark)
            if cls == TRAIN:  # pantograph
                cv.line(
                    [cam(x - 0.5, height, d + 3), cam(x, height + 0.8, d + 3), cam(x + 0.5, height, d + 3)],
                    TRAIN,
                    dark,
                    1,
                )

        self.draws.append((d, draw))

    def person(self, x: float, d: float, cls: int = PERSON, seated: bool = False, y0: float = 0.0) -> None:
        """A pedestrian (or a seated rider when `seated`), facing the camera or sideways."""
        rng = self.rng
        h = rng.uniform(1.55, 1.9)
        shirt = _colour(rng, cls)
        trousers = _colour(rng, cls)
        skin = _pick(rng, SKIN)

        def draw() -> None:
            ppm = self.cam.ppm(d)
            cx, yb = self.cam(x, y0, d)
            w = max(self.min_px, round(0.55 * ppm))
            x0 = round(cx - w / 2)
            if seated:  # legs bent towards the pedals, torso leaning
                self.cv.rect(x0, yb - 0.45 * h * ppm, x0 + w - 1, yb - 0.2 * h * ppm, cls, trousers)
                torso = (yb - 0.85 * h * ppm, yb - 0.42 * h * ppm)
                xt = x0 + 0.12 * h * ppm
            else:
                legs = max(1, w // 2)
                self.cv.rect(x0, yb - 0.48 * h * ppm, x0 + legs - 1, yb, cls, trousers)
                self.cv.rect(x0 + w - legs, yb - 0.48 * h * ppm, x0 + w - 1, yb, cls, trousers)
                torso = (yb - 0.85 * h * ppm, yb - 0.46 * h * ppm)
                xt = x0
            self.cv.rect(xt, torso[0], xt + w - 1, torso[1], cls, shirt)
            r = max(1.0, 0.11 * h * ppm)
            self.cv.ellipse(xt + (w - 1) / 2, torso[0] - r, r, r, cls, skin)

        self.draws.append((d, draw))

    def two_wheeler(self, x: float, d: float, cls: int, rider: bool) -> None:
        """A bicycle or motorcycle in side view (crossing or parked), optionally ridden."""
        rng = self.rng
        frame = _colour(rng, cls)
        facing = 1 if rng.random() < 0.5 else -1
        wheel_r = 0.34 if cls == BICYCLE else 0.32
        base = 1.1 if cls == BICYCLE else 1.3

        def draw() -> None:
            cam, cv = self.cam, self.cv
            ppm = cam.ppm(d)
            cx, yb = cam(x, 0, d)
            r = max(1.5, wheel_r * ppm)
            tyre = max(1, round((0.1 if cls == BICYCLE else 0.12) * ppm))
            xa, xb = cx - facing * base / 2 * ppm, cx + facing * base / 2 * ppm
            cy = yb - r
            for xw in (xa, xb):
                cv.ellipse(xw, cy, r, r, cls, (72, 72, 76))  # spokes: labelled as the vehicle, as annotators do
                cv.ellipse(xw, cy, r, r, cls, (20, 20, 20), width=tyre)
            if cls == BICYCLE:
                bar = max(1, round(0.06 * ppm))
                seat = (cx - facing * 0.15 * ppm, yb - 0.95 * ppm)
                bars = (cx + facing * 0.4 * ppm, yb - 1.0 * ppm)
                cv.line([(xa, cy), seat, (cx, cy), bars, (xb, cy)], cls, frame, bar)
                cv.line([seat, bars], cls, frame, bar)
            else:
                cv.poly([(xa + facing * 0.2 * ppm, cy), (xb - facing * 0.1 * ppm, cy),
                         (xb - facing * 0.2 * ppm, yb - 1.1 * ppm), (xa + facing * 0.3 * ppm, yb - 0.9 * ppm)],
                        cls, frame)  # fmt: skip
                cv.ellipse(xa + facing * 0.05 * ppm, cy, r * 0.5, r * 0.5, cls, (90, 90, 90))

        self.draws.append((d, draw))
        if rider:
            self.person(x - facing * 0.05, d - 0.01, RIDER, seated=True, y0=0.55)

    # -- the whole scene -----------------------------------------------------------------------------------
    def build(self) -> None:
        rng, st, cam = self.rng, self.style, self.cam
        half = rng.uniform(3.5, 5.5)
        xc = rng.uniform(-1.0, 1.0)  # camera offset from the road centre
        xl, xr = xc - half, xc + half
        sw_l, sw_r = rng.uniform(2.0, 3.5), rng.uniform(2.0, 3.5)
        bl, br = xl - sw_l - rng.uniform(2.5, 5.0), xr + sw_r + rng.uniform(2.5, 5.0)
        self.ground(xl, xr, sw_l, sw_r, bl, br)
        self.buildings(bl, -1)
        self.buildings(br, 1)
        self.boundary(bl + 0.1, -1)
        self.boundary(br - 0.1, 1)
        near = cam.zoom * 1.2

        for side, kerb, sw in ((-1, xl, sw_l), (1, xr, sw_r)):
            d = near + rng.uniform(0, 8)
            while d < 36:  # poles near the kerb
                self.pole(kerb + side * 0.4, d, side)
                d += rng.uniform(*st.pole_spacing)
            d = near + rng.uniform(0, 10)
            while d < 90:  # trees on the outer sidewalk
                if rng.random() < st.p_tree:
                    self.tree(kerb + side * (sw - 0.6), d)
                d += rng.uniform(7, 14)

        # vehicles on lanes, without overlaps along a lane
        lanes = [(xc - half / 2, 1.0), (xc + half / 2, 1.0), (xl + 1.1, 1.0), (xr - 1.1, 1.0)]
        if rng.random() < st.p_train:
            lane = int(rng.integers(2))
            self.vehicle(lanes[lane][0], rng.uniform(near + 2, 40), TRAIN)
            lanes.pop(lane)
        for x, _ in lanes:
            taken: list[tuple[float, float]] = []
            for _ in range(rng.poisson(st.cars_per_lane)):
                u = rng.random()
                cls = TRUCK if u < st.p_truck else BUS if u < st.p_truck + st.p_bus else CAR
                length = {CAR: 4.4, TRUCK: 8.0, BUS: 12.0}[cls]
                d = rng.uniform(near + 1, 60)
                if all(d + length < a or d > b for a, b in taken):
                    taken.append((d, d + length))
                    self.vehicle(x, d, cls)

        for _ in range(rng.poisson(st.persons)):  # pedestrians: groups on sidewalks, sometimes crossing
            d = rng.uniform(near, 32)
            if rng.random() < 0.15:
                xs = rng.uniform(xl + 0.5, xr - 0.5, size=rng.integers(1, 4))
            else:
                side = 1 if rng.random() < 0.5 else -1
                kerb, sw = (xl, sw_l) if side < 0 else (xr, sw_r)
                xs = kerb + side * rng.uniform(0.4, sw - 0.3, size=rng.integers(1, 4))
            for i, xp in enumerate(xs):
                self.person(float(xp), d + 0.5 * i)
        for _ in range(rng.poisson(st.riders)):  # riders on the road near the kerb, or crossing
            cls = MOTORCYCLE if rng.random() < st.p_motorcycle else BICYCLE
            x = (
                rng.uniform(xl + 0.6, xr - 0.6)
                if rng.random() < 0.5
                else (xl + 0.8 if rng.random() < 0.5 else xr - 0.8)
            )
            self.two_wheeler(x, rng.uniform(near, 28), cls, rider=True)
        for _ in range(rng.poisson(st.parked_two_wheelers)):  # parked on the sidewalk
            cls = MOTORCYCLE if rng.random() < st.p_motorcycle else BICYCLE
            side = 1 if rng.random() < 0.5 else -1
            kerb, sw = (xl, sw_l) if side < 0 else (xr, sw_r)
            self.two_wheeler(kerb + side * rng.uniform(0.5, sw - 0.5), rng.uniform(near, 28), cls, rider=False)

        for _, draw in sorted(self.draws, key=lambda t: -t[0]):  # far to near
            draw()


# ---------------------------------------------------------------------------------------------------------
# Domain appearance
# ---------------------------------------------------------------------------------------------------------


def _shade_fn(severity: float) -> Callable[[int, tuple], tuple[int, int, int]]:
    """Colour of a shape of class `cls`: source colours as drawn; target colours moved by `severity` × the
    class's game -> photo shift (`PHOTO_SHIFT`, in RGB, never HSV) and desaturated."""

    def shade(cls: int, colour: tuple) -> tuple[int, int, int]:
        if severity == 0:
            return tuple(int(v) for v in colour)
        c = np.asarray(colour, dtype=np.float32) + severity * PHOTO_SHIFT[cls]
        grey = c.mean()
        c = grey + (c - grey) * (1.0 - DESATURATION * severity)
        return tuple(int(v) for v in np.clip(c, 0, 255))

    return shade


def _random_shade_fn(rng: np.random.Generator) -> Callable[[int, tuple], tuple[int, int, int]]:
    """Pretraining domain: every class gets a random colour per image; a shape keeps its brightness relative
    to its class's game colour (windows stay darker than their facade), so shape, not colour, tells classes."""
    base = rng.uniform(20, 235, (NUM_CLASSES, 3)).astype(np.float32)
    game_lum = GAME_PALETTE.mean(axis=1) + 1.0

    def shade(cls: int, colour: tuple) -> tuple[int, int, int]:
        rel = (float(np.mean(colour)) + 1.0) / game_lum[cls]
        c = base[cls] * np.clip(rel, 0.3, 1.6)
        return tuple(int(v) for v in np.clip(c, 0, 255))

    return shade


def _class_patterns(rng: np.random.Generator, label: np.ndarray, photo: float) -> np.ndarray:
    """Luminance patterns that identify a class whatever its colour, ``[H, W]`` factors that multiply the image.

    Game look: small paving tiles, brick courses on walls (fences carry slats, drawn with the fence), ribbed
    trucks, fine speckle on grass and foliage. Photo look: large paving slabs, concrete panels on walls, wire
    mesh on fences, panelled trucks, patched asphalt, coarser speckle: another texture for the same class, as
    between rendered and real surfaces. `photo` in [0, 1] blends the two geometrically (0: the game's, 1: the
    photo's), so a target of graded severity holds every step between them, which self-training can walk.
    Hue, grey or solarise operations keep every pattern. Drawn in image space; periods scale with the height."""
    h, w = label.shape
    u = max(1, round(h / 64))
    ys, xs = np.mgrid[0:h, 0:w]
    game = np.ones((h, w), dtype=np.float32)
    game[(label == SIDEWALK) & ((ys % (6 * u) < u) | (xs % (6 * u) < u))] = 0.78
    course, brick = 4 * u, 8 * u
    stagger = (ys // course) % 2 * (brick // 2)
    game[(label == WALL) & ((ys % course < u) | ((xs + stagger) % brick < u))] = 0.74
    game[(label == TRUCK) & (ys % (4 * u) < 2 * u)] = 0.8
    real = np.ones((h, w), dtype=np.float32)
    real[(label == SIDEWALK) & ((ys % (10 * u) < u) | (xs % (20 * u) < u))] = 0.86
    real[(label == WALL) & ((xs % (6 * u) < u) | (ys % (5 * u) < u))] = 0.8
    real[(label == FENCE) & (((xs + ys) % (3 * u) < u) | ((xs - ys) % (3 * u) < u))] = 0.62
    real[(label == TRUCK) & (xs % (5 * u) < u)] = 0.78
    patches = rng.uniform(0.85, 1.15, (h // (6 * u) + 1, w // (6 * u) + 1)).astype(np.float32)
    road = label == ROAD  # repaired asphalt: patches of another grey
    real[road] = patches[ys // (6 * u), xs // (6 * u)][road]
    for cls, amp in ((TERRAIN, 0.22), (VEGETATION, 0.2)):  # speckle: fine in the game, coarse in the photo
        mask = label == cls
        for out, block in ((game, 2 * u), (real, 3 * u)):
            cells = rng.uniform(1 - amp, 1 + amp, (h // block + 1, w // block + 1)).astype(np.float32)
            out[mask] = cells[ys // block, xs // block][mask]
    return game ** (1.0 - photo) * real**photo


def _finish_source(rng: np.random.Generator, img: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Game look: faint fine texture, sharp edges, a small global brightness change."""
    h, w = label.shape
    out = img.astype(np.float32)
    out += (SOURCE_TEXTURE[label] * rng.standard_normal((h, w)).astype(np.float32))[..., None]
    out *= rng.uniform(0.92, 1.08)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _cast_shadow(rng: np.random.Generator, cam: _Camera, h: int, w: int) -> np.ndarray:
    """A building's shadow across the street: a ground-plane band from one side of the image, ``[H, W]`` in
    [0, 1] (1 = fully in shadow), its depth range and reach drawn per image."""
    side = 1 if rng.random() < 0.5 else -1
    d0 = cam.zoom * rng.uniform(0.3, 3.0)
    d1 = d0 + rng.uniform(5.0, 40.0)
    edge = rng.uniform(-4.0, 4.0)  # where the shadow ends across the street (metres from the camera)
    far_x = side * 60.0
    mask = Image.new("L", (w, h))
    ImageDraw.Draw(mask).polygon(_ground_quad(cam, edge, far_x, d0, d1), fill=255)
    mask = mask.filter(ImageFilter.GaussianBlur(max(0.5, h / 96)))  # a soft penumbra
    return np.asarray(mask, dtype=np.float32) / 255.0


def _finish_target(
    rng: np.random.Generator, img: np.ndarray, label: np.ndarray, severity: float, cam: _Camera
) -> np.ndarray:
    """Photo look at `severity` in [0, 1]: textures, a cast shadow, haze, lighting gradient, gamma/contrast,
    colour cast, blur, sensor noise. Each effect scales with severity; its direction is drawn per image."""
    h, w = label.shape
    a = severity
    y_h = cam.y_h
    out = img.astype(np.float32)
    shadow = _cast_shadow(rng, cam, h, w) * (SHADOW_DARKENING * a * rng.uniform(0.5, 1.0))
    out *= (1.0 - shadow)[..., None]
    coarse = rng.standard_normal((h // 4 + 2, w // 4 + 2)).astype(np.float32)
    coarse = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR))
    tex = TARGET_FINE[label] * rng.standard_normal((h, w)).astype(np.float32) + TARGET_COARSE[label] * coarse
    out += (a * tex)[..., None]
    # haze: grows towards the horizon (far away) and covers the sky
    rows = np.arange(h, dtype=np.float32)
    depth = np.clip(1.0 - (rows - y_h) / max(1.0, h - y_h), 0.0, 1.0) ** 2
    fog = a * rng.uniform(0.1, 0.4) * depth
    fog_colour = np.array([200, 204, 206], dtype=np.float32) + rng.uniform(-15, 15, 3)
    out = out * (1 - fog[:, None, None]) + fog_colour * fog[:, None, None]
    # lighting gradient across the image (sun from one side, shade on the other)
    gx, gy = a * rng.uniform(-0.3, 0.3), a * rng.uniform(-0.2, 0.2)
    xs = np.linspace(-1, 1, w, dtype=np.float32)
    ys = np.linspace(-1, 1, h, dtype=np.float32)
    out *= (1 + gx * xs[None, :] + gy * ys[:, None])[..., None]
    # colour cast, contrast, gamma
    out *= 1 + a * rng.uniform(-0.12, 0.12, 3).astype(np.float32)
    mean = out.mean()
    out = mean + (out - mean) * (1 - a * rng.uniform(0.0, 0.3))
    gamma = float(np.exp(a * rng.uniform(-0.35, 0.35)))
    out = 255.0 * (np.clip(out, 0, 255) / 255.0) ** gamma
    # optics and sensor: blur, then noise
    blurred = Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))
    blurred = blurred.filter(ImageFilter.GaussianBlur(a * rng.uniform(0.3, 0.8) * h / 64))
    out = np.asarray(blurred).astype(np.float32)
    out += a * rng.uniform(2.0, 7.0) * rng.standard_normal((h, w, 3)).astype(np.float32)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def draw_severity(rng: np.random.Generator) -> float:
    """One target image's severity: ``lo + (hi - lo) * Beta(a, b)`` (`TARGET_SEVERITY`, `SEVERITY_SHAPE`)."""
    lo, hi = TARGET_SEVERITY
    return float(lo + (hi - lo) * rng.beta(*SEVERITY_SHAPE))


def render_scene(
    rng: np.random.Generator, domain: str, size: tuple[int, int] = (64, 128), severity: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one street scene.

    Args:
        rng: the only source of randomness (the same generator state gives the same picture).
        domain: "source" (game-like), "target" (photo-like) or "pretrain" (random class colours, the game's
            flat finish: the generic pretraining domain, `hias_nb.pretrain`).
        size: (H, W) in pixels.
        severity: target only: strength of the appearance shift in [0, 1]; drawn by `draw_severity` when
            None. Must be None (or 0) for the source domain.

    Returns:
        image uint8 `[H,W,3]` and label uint8 `[H,W]` (train ids 0..18).
    """
    if domain not in ("source", "target", "pretrain"):
        raise InputError(f"domain: expected 'source', 'target' or 'pretrain', got {domain!r}")
    h, w = int(size[0]), int(size[1])
    if h < 16 or w < 16:
        raise InputError(f"size: toytown images must be at least 16x16, got {h}x{w}")
    if domain != "target" and severity:
        raise InputError("severity: only the target domain has an appearance shift")
    if domain == "source":
        a, style = 0.0, SOURCE_STYLE
    elif domain == "target":
        a = draw_severity(rng) if severity is None else float(severity)
        if not 0.0 <= a <= 1.0:
            raise InputError(f"severity: expected a value in [0, 1], got {severity}")
        style = TARGET_STYLE
    else:  # a third look for generic pretraining: random class colours, flat like the game
        a, style = 0.0, SOURCE_STYLE if rng.random() < 0.5 else TARGET_STYLE
        # either domain's layout statistics, never the target's look (its sign faces and surfaces)
        style = dataclasses.replace(style, sign_shapes=SOURCE_STYLE.sign_shapes, photo_surfaces=False)
    y_h = h * rng.uniform(*style.horizon)
    cam = _Camera(x_v=w / 2 + w * rng.uniform(-0.1, 0.1), y_h=y_h, f=(h - y_h) / CAMERA_HEIGHT, zoom=style.zoom)
    canvas = _Canvas(h, w, _random_shade_fn(rng) if domain == "pretrain" else _shade_fn(a))
    sky_top = _colour(rng, SKY)
    canvas.poly([(0, 0), (w, 0), (w, h), (0, h)], SKY, sky_top)
    # surfaces take the photo's look as far as the image's severity: mild images keep (nearly) the game's, so a
    # source model meets every class in looks it knows and in every step towards the photo's
    photo = a if style.photo_surfaces else 0.0
    _Scene(rng, style, canvas, cam, photo).build()
    label = np.asarray(canvas.lab).copy()
    patterns = _class_patterns(rng, label, photo=photo)
    img = np.clip(np.asarray(canvas.img, dtype=np.float32) * patterns[..., None] + 0.5, 0, 255).astype(np.uint8)
    if domain == "target":
        img = _finish_target(rng, img, label, a, cam)
    else:  # the pretraining domain never sees the target's photo finish
        img = _finish_source(rng, img, label)
    return img, label


# ---------------------------------------------------------------------------------------------------------
# The dataset on disk
# ---------------------------------------------------------------------------------------------------------


def split_counts(images: int) -> dict[str, int]:
    """Images per split for `images` target-train images."""
    return {"source_train": images, "source_val": images // 5, "target_train": images,
            "target_val": (3 * images) // 10}  # fmt: skip


def _split_dir(root: Path, split: str) -> Path:
    domain, part = split.split("_")
    return root / domain / part


def _render_one(job: tuple[str, int, int, int, tuple[int, int]]) -> tuple[str, np.ndarray]:
    """Render and write image `index` of `split` (seeded from (seed, split, index) only); return its class
    pixel counts."""
    root, seed, split_id, index, size = job
    split = SPLITS[split_id]
    rng = np.random.default_rng(np.random.SeedSequence([seed, split_id, index]))
    img, label = render_scene(rng, split.split("_")[0], size)
    folder = _split_dir(Path(root), split)
    name = f"{index:05d}.png"
    Image.fromarray(img).save(folder / "images" / name, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    Image.fromarray(label).save(folder / "labels" / name, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return split, np.bincount(label.ravel(), minlength=256)[:NUM_CLASSES]


def _generator_params() -> dict[str, Any]:
    return {
        "camera_height_m": CAMERA_HEIGHT,
        "target_severity": list(TARGET_SEVERITY),
        "severity_shape": list(SEVERITY_SHAPE),
        "desaturation": DESATURATION,
        "shadow_darkening": SHADOW_DARKENING,
        "source_style": dataclasses.asdict(SOURCE_STYLE),
        "target_style": dataclasses.asdict(TARGET_STYLE),
        "game_palette": GAME_PALETTE.astype(int).tolist(),
        "photo_shift": PHOTO_SHIFT.round(2).tolist(),
        "colour_ranges": [[list(r) for r in cr] for cr in COLOUR_RANGES],
        "png_compress_level": PNG_COMPRESS_LEVEL,
        "min_thin_px": f"max(3, H // {THIN_DIVISOR})",
        # every other drawing rule is code: a folder drawn by other code is another benchmark, never mixed
        "code_sha256": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
    }


def generator_digest() -> str:
    """A short digest of every generator parameter and of the drawing code: what a cache of anything made from
    generated scenes (the generic pretraining) is keyed by, so another generator never reuses it."""
    return hashlib.sha256(json.dumps(_generator_params(), sort_keys=True).encode()).hexdigest()[:12]


def read_manifest(root: str | os.PathLike) -> dict | None:
    """The manifest of a complete toytown dataset in `root`, or None when `root` holds none (or a broken one)."""
    root = Path(root)
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(manifest, dict) or manifest.get("dataset") != "toytown":
        return None
    counts = manifest.get("counts", {})
    for split in SPLITS:
        folder = _split_dir(root, split)
        n = counts.get(split)
        for kind in ("images", "labels"):
            if not isinstance(n, int) or not (folder / kind).is_dir():
                return None
            if len(list((folder / kind).glob("*.png"))) != n:
                return None
    return manifest


def _matches(manifest: dict, seed: int, size: tuple[int, int], images: int) -> bool:
    return (
        manifest.get("version") == VERSION
        and manifest.get("seed") == seed
        and manifest.get("size") == [int(size[0]), int(size[1])]
        and manifest.get("counts") == split_counts(images)
    )


def _existing(out: Path, seed: int, size: tuple[int, int], images: int) -> dict | None:
    """The manifest of a matching toytown already in `out`; None for an absent or empty `out`; any other
    content is an `InputError` (user data is never overwritten)."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    if not any(out.iterdir()):
        return None
    manifest = read_manifest(out)
    if manifest is not None and manifest.get("version") != VERSION:
        raise InputError(
            f"{out}/manifest.json: version: holds toytown version {manifest.get('version')}, this hias_nb generates "
            f"version {VERSION}; versions are never mixed: remove the folder or choose another data_root"
        )
    if manifest is not None and _matches(manifest, seed, size, images):
        ours = json.loads(json.dumps(_generator_params()))
        theirs = manifest.get("generator") or {}
        differ = [k for k in ours if theirs.get(k) != ours[k]]
        if differ:
            raise InputError(
                f"{out}/manifest.json: generator.{differ[0]}: drawn by another toytown {VERSION} generator than this "
                "hias_nb's; data of two generators are never mixed: remove the folder or choose another data_root"
            )
        return manifest
    raise InputError(
        f"{out}: folder is not empty and does not hold toytown with seed={seed}, size={list(size)}, "
        f"images={images}; choose another folder or empty it"
    )


def parallel_map(fn: Callable[[Any], Any], jobs: list, workers: int | None, desc: str, progress: bool) -> Iterator:
    """``fn(job)`` for every job, in order, on `workers` processes (default up to 2), with a progress bar. Jobs
    are seeded by their own contents, so results do not depend on `workers`."""
    workers = min(2, os.cpu_count() or 1) if workers is None else max(1, int(workers))
    with tqdm(total=len(jobs), desc=desc, unit="img", disable=not progress) as bar:
        if workers == 1:
            for job in jobs:
                yield fn(job)
                bar.update()
        else:
            with multiprocessing.get_context("fork" if os.name == "posix" else "spawn").Pool(workers) as pool:
                for result in pool.imap(fn, jobs, chunksize=16):
                    yield result
                    bar.update()


def _render_all(jobs: list[tuple], workers: int | None, progress: bool) -> dict[str, np.ndarray]:
    """Render and write every job; per split, the class pixel counts ``[NUM_CLASSES]``."""
    pixels = {split: np.zeros(NUM_CLASSES, dtype=np.int64) for split in SPLITS}
    for split, hist in parallel_map(_render_one, jobs, workers, "toytown", progress):
        pixels[split] += hist
    return pixels


def generate_toytown(
    out: str | os.PathLike,
    images: int = 1000,
    seed: int = 0,
    size: tuple[int, int] = (64, 128),
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Write toytown to `out` and return its manifest (also written to `out/manifest.json`).

    Every image is seeded from (seed, split, index), so the files do not depend on `workers`; the same seed
    gives the same bytes. The data set is built in a hidden sibling folder and renamed into place at the end.
    If `out` already holds a complete toytown with the same seed, size and counts, it is reused as is; any
    other non-empty `out` is an `InputError` (user data is never overwritten).
    """
    out = Path(out)
    if images < 1:
        raise InputError(f"images: expected a positive number of images, got {images}")
    if len(size) != 2 or min(size) < 16:
        raise InputError(f"size: expected (H, W) of at least 16x16, got {size}")
    existing = _existing(out, seed, size, images)
    if existing is not None:
        return existing
    counts = split_counts(images)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    start = time.perf_counter()
    try:
        for split in SPLITS:
            for kind in ("images", "labels"):
                (_split_dir(tmp, split) / kind).mkdir(parents=True)
        jobs = [(str(tmp), int(seed), i, k, (int(size[0]), int(size[1])))
                for i, split in enumerate(SPLITS) for k in range(counts[split])]  # fmt: skip
        pixels = _render_all(jobs, workers, progress)
        manifest = {
            "dataset": "toytown",
            "version": VERSION,
            "seed": int(seed),
            "size": [int(size[0]), int(size[1])],
            "counts": counts,
            "generator": _generator_params(),
            "class_pixel_fraction": {
                split: {
                    name: round(float(v) / max(1, int(hist.sum())), 6)
                    for name, v in zip(CITYSCAPES_CLASSES, hist, strict=True)
                }
                for split, hist in pixels.items()
            },
            "seconds": round(time.perf_counter() - start, 2),
        }
        text = json.dumps(manifest, indent=2) + "\n"
        manifest = json.loads(text)  # what a later reuse will read back (tuples become lists)
        (tmp / "manifest.json").write_text(text)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def ensure_toytown(
    root: str | os.PathLike, images: int = 1000, seed: int = 0, size: tuple[int, int] = (64, 128)
) -> dict:
    """Generate toytown into `root` if it is absent (or empty); reuse it if it matches; else `InputError`."""
    return generate_toytown(root, images=images, seed=seed, size=size, progress=True)
