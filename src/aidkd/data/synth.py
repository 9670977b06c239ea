"""Procedural synthetic driving scenes in KITTI layout (numpy + PIL only, deterministic for a seed).

Scenes: sky / road / roadside with a perspective road (vanishing point, lane marks), buildings and trees on the
horizon, roadside clutter (poles, signs, bollards, bins, bushes, barriers) as distractors with the same colour
palette as the objects. Objects: cars (rear/front or side view: body, cabin, dark windows, wheels, lights),
pedestrians (head, torso, arms, legs), cyclists (rider on two wheels, side or rear view), and some vans and
trucks (KITTI ignore classes). Colours are random for every class, so the class is given by the *shape*.

Geometry: a flat ground plane; an object whose ground contact is at depth parameter ``t`` (1 at the bottom
row, 0 at the horizon) has ``K * t`` pixels a metre (``K = 0.28 * height``), so far objects are small and high.
Objects are drawn back to front; ``occluded`` is set from the covered fraction of the object's silhouette
(``< 0.1`` -> 0, ``< 0.5`` -> 1, else 2) and ``truncated`` is the fraction of the silhouette outside the image
(the box is the silhouette's box clipped to the image, so ``truncated > 0`` only for boxes touching the border).
Objects whose box is lower than ``min_label_height`` px, or that are >= 90 % covered, and groups of tiny far
cars are labelled ``DontCare``.

Hard instances (``hard_fraction`` of the Car/Pedestrian/Cyclist objects): one or two of low contrast, blur,
small (far) and heavy occlusion (an occluder is placed in front). Mislabelled instances (``mislabel_fraction``):
the class is swapped for another of Car/Pedestrian/Cyclist, or the box is shifted/rescaled badly -- the label is
wrong on purpose. ``synth_meta.json`` (next to ``training/``) records, per frame and label line, the true class
and box, the hard/mislabel flags, the covered fraction and the draw order.
"""
from __future__ import annotations

import colorsys
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .kitti import KITTI_DEFAULT_CLASSES, format_kitti_line, split_stems
from .structures import DatasetError, ObjectAnnotation

__all__ = ["SYNTH_CLASS_PROBS", "generate_synth", "occlusion_level", "render_scene"]

#: Class frequencies of generated (non-DontCare-group) objects.
SYNTH_CLASS_PROBS = {"Car": 0.50, "Pedestrian": 0.22, "Cyclist": 0.14, "Van": 0.08, "Truck": 0.06}
POSITIVE = KITTI_DEFAULT_CLASSES
# object dims in metres: (height, width (rear view), length (side view))
_DIMS = {
    "Car": ((1.40, 1.62), (1.60, 1.85), (3.8, 4.7)),
    "Van": ((1.90, 2.40), (1.85, 2.05), (4.5, 5.4)),
    "Truck": ((2.80, 3.60), (2.35, 2.60), (6.0, 10.0)),
    "Pedestrian": ((1.50, 1.92), (0.45, 0.70), (0.50, 0.90)),
    "Cyclist": ((1.60, 1.90), (0.50, 0.65), (1.60, 1.85)),
}
_SS = 3  # supersampling of sprites


def occlusion_level(covered: float) -> int:
    """KITTI ``occluded`` from the covered fraction of the silhouette: <0.1 -> 0, <0.5 -> 1, else 2."""
    return 0 if covered < 0.1 else (1 if covered < 0.5 else 2)


# ----------------------------------------------------------------------------------------------- colours
def _rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return int(r * 255), int(g * 255), int(b * 255)


def _rand_color(rng: np.random.Generator) -> tuple[int, int, int]:
    """Any colour: 30 % greys/black/white, else saturated; the same palette for every class and clutter."""
    if rng.random() < 0.3:
        v = rng.uniform(0.08, 0.95)
        return _rgb(rng.random(), rng.uniform(0, 0.12), v)
    return _rgb(rng.random(), rng.uniform(0.25, 0.95), rng.uniform(0.2, 0.95))


def _shade(c, f: float) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, v * f))) for v in c)


def _a(c, alpha: int = 255) -> tuple[int, int, int, int]:
    return (int(c[0]), int(c[1]), int(c[2]), alpha)


_SKIN = [(255, 224, 196), (234, 192, 160), (198, 145, 108), (141, 85, 54), (90, 56, 37), (224, 172, 105)]


# ----------------------------------------------------------------------------------------------- sprite pen
class _Pen:
    """Draw in fractions of the sprite box (x right, y down, both 0..1), supersampled."""

    def __init__(self, w: int, h: int, mirror: bool = False):
        self.w, self.h = w, h
        self.W, self.H = w * _SS, h * _SS
        self.img = Image.new("RGBA", (self.W, self.H), (0, 0, 0, 0))
        self.d = ImageDraw.Draw(self.img)
        self.mirror = mirror

    def _x(self, x: float) -> float:
        return (1.0 - x if self.mirror else x) * self.W

    def poly(self, pts, fill) -> None:
        self.d.polygon([(self._x(x), y * self.H) for x, y in pts], fill=_a(fill))

    def rect(self, x0, y0, x1, y1, fill, r: float = 0.0) -> None:
        a, b = sorted((self._x(x0), self._x(x1)))
        y0p, y1p = y0 * self.H, y1 * self.H
        box = [a, y0p, max(a, b - 1), max(y0p, y1p - 1)]
        if r > 0:
            rad = r * min(b - a, y1p - y0p)
            if rad >= 1:
                self.d.rounded_rectangle(box, radius=rad, fill=_a(fill))
                return
        self.d.rectangle(box, fill=_a(fill))

    def ellipse(self, cx, cy, rx, ry, fill=None, outline=None, width_h: float = 0.0) -> None:
        """``rx`` in fractions of the width, ``ry`` of the height."""
        x = self._x(cx)
        box = [x - rx * self.W, (cy - ry) * self.H, x + rx * self.W, (cy + ry) * self.H]
        width = max(1, round(width_h * self.H)) if outline is not None else 0
        self.d.ellipse(box, fill=_a(fill) if fill is not None else None,
                       outline=_a(outline) if outline is not None else None, width=width)

    def circle(self, cx, cy, r_h, **kw) -> None:
        """A circle of radius ``r_h`` (fraction of the height)."""
        self.ellipse(cx, cy, r_h * self.H / self.W, r_h, **kw)

    def line(self, pts, width_h: float, fill) -> None:
        width = max(1, round(width_h * self.H))
        self.d.line([(self._x(x), y * self.H) for x, y in pts], fill=_a(fill), width=width, joint="curve")

    def result(self) -> np.ndarray:
        small = self.img.resize((self.w, self.h), Image.BOX)
        return np.asarray(small, dtype=np.float32)


# ----------------------------------------------------------------------------------------------- objects
def _draw_car(p: _Pen, rng, view: str) -> None:
    body = _rand_color(rng)
    glass = _rgb(rng.uniform(0.5, 0.7), rng.uniform(0.1, 0.4), rng.uniform(0.08, 0.3))
    tyre = _rgb(0, 0, rng.uniform(0.05, 0.15))
    cabin = _shade(body, rng.uniform(0.8, 1.0))
    if view == "rear":
        front = rng.random() < 0.35
        p.rect(0.05, 0.7, 0.25, 1.0, tyre)
        p.rect(0.75, 0.7, 0.95, 1.0, tyre)
        ti = rng.uniform(0.1, 0.2)
        p.poly([(ti, 0.0), (1 - ti, 0.0), (0.97, 0.42), (0.03, 0.42)], cabin)
        p.poly([(ti + 0.05, 0.06), (1 - ti - 0.05, 0.06), (0.9, 0.38), (0.1, 0.38)], glass)
        p.rect(0.0, 0.36, 1.0, 0.9, body, r=0.25)
        light = (rng.integers(230, 256), rng.integers(200, 250), rng.integers(150, 230)) if front else \
            (rng.integers(150, 240), rng.integers(0, 40), rng.integers(0, 40))
        lw = rng.uniform(0.12, 0.2)
        p.rect(0.03, 0.46, 0.03 + lw, 0.58, light)
        p.rect(0.97 - lw, 0.46, 0.97, 0.58, light)
        if front:
            p.rect(0.3, 0.5, 0.7, 0.66, _shade(body, 0.35))
        p.rect(0.38, 0.62 if front else 0.6, 0.62, 0.72, (225, 225, 215))
        p.rect(0.02, 0.78, 0.98, 0.87, _shade(body, 0.55))
        return
    # side view (also used, foreshortened, for oblique cars)
    r = rng.uniform(0.17, 0.21)
    rx = r * p.H / p.W
    back = rng.uniform(0.04, 0.14)
    p.poly([(0.16, 0.42), (0.3 - back, 0.03), (0.66, 0.03), (0.8, 0.42)], cabin)
    p.poly([(0.21, 0.4), (0.32 - back, 0.09), (0.47, 0.09), (0.47, 0.4)], glass)
    p.poly([(0.5, 0.4), (0.5, 0.09), (0.64, 0.09), (0.75, 0.4)], glass)
    p.rect(0.0, 0.36, 1.0, 1.0 - r * 0.9, body, r=0.3)
    p.line([(0.49, 0.42), (0.49, 0.75)], 0.02, _shade(body, 0.5))
    p.rect(0.965, 0.44, 1.0, 0.54, (240, 235, 200))
    p.rect(0.0, 0.44, 0.03, 0.54, (200, 20, 20))
    for cx in (0.02 + rx + 0.12, 0.98 - rx - 0.1):
        p.circle(cx, 1.0 - r, r, fill=tyre)
        p.circle(cx, 1.0 - r, r * 0.5, fill=_rgb(0, 0, rng.uniform(0.45, 0.8)))


def _draw_van(p: _Pen, rng, view: str) -> None:
    body = _rand_color(rng)
    glass = _rgb(0.6, 0.3, rng.uniform(0.08, 0.3))
    tyre = (25, 25, 25)
    if view == "rear":
        p.rect(0.06, 0.8, 0.24, 1.0, tyre)
        p.rect(0.76, 0.8, 0.94, 1.0, tyre)
        p.rect(0.0, 0.0, 1.0, 0.88, body, r=0.12)
        p.rect(0.08, 0.08, 0.47, 0.38, glass)
        p.rect(0.53, 0.08, 0.92, 0.38, glass)
        p.line([(0.5, 0.05), (0.5, 0.82)], 0.015, _shade(body, 0.5))
        p.rect(0.03, 0.5, 0.12, 0.66, (200, 20, 20))
        p.rect(0.88, 0.5, 0.97, 0.66, (200, 20, 20))
        return
    r = 0.16
    rx = r * p.H / p.W
    p.poly([(0.0, 0.02), (0.72, 0.02), (0.94, 0.36), (1.0, 0.42), (1.0, 0.88), (0.0, 0.88)], body)
    p.poly([(0.74, 0.08), (0.91, 0.36), (0.76, 0.36)], glass)
    nwin = int(rng.integers(0, 3))
    for k in range(nwin):
        x0 = 0.06 + k * 0.22
        p.rect(x0, 0.1, x0 + 0.18, 0.36, glass)
    for cx in (rx + 0.08, 1.0 - rx - 0.08):
        p.circle(cx, 1.0 - r, r, fill=tyre)
        p.circle(cx, 1.0 - r, r * 0.45, fill=(150, 150, 150))


def _draw_truck(p: _Pen, rng, view: str) -> None:
    box_c, cab_c = _rand_color(rng), _rand_color(rng)
    tyre = (22, 22, 22)
    if view == "rear":
        p.rect(0.05, 0.84, 0.3, 1.0, tyre)
        p.rect(0.7, 0.84, 0.95, 1.0, tyre)
        p.rect(0.0, 0.0, 1.0, 0.86, box_c)
        p.line([(0.5, 0.02), (0.5, 0.84)], 0.01, _shade(box_c, 0.5))
        p.rect(0.02, 0.84, 0.98, 0.9, (40, 40, 40))
        p.rect(0.03, 0.74, 0.12, 0.82, (210, 30, 20))
        p.rect(0.88, 0.74, 0.97, 0.82, (210, 30, 20))
        return
    r = 0.12
    rx = r * p.H / p.W
    p.rect(0.0, 0.0, 0.74, 0.8, box_c)
    p.poly([(0.76, 0.22), (0.93, 0.22), (1.0, 0.45), (1.0, 0.86), (0.76, 0.86)], cab_c)
    p.poly([(0.8, 0.27), (0.92, 0.27), (0.97, 0.45), (0.8, 0.45)], (40, 50, 60))
    p.rect(0.0, 0.8, 1.0, 0.86, (35, 35, 35))
    for cx in (rx + 0.05, rx + 0.05 + 2.3 * rx, 1.0 - rx - 0.05):
        p.circle(cx, 1.0 - r, r, fill=tyre)


def _draw_person(p: _Pen, rng, view: str, y0: float = 0.0, y1: float = 1.0, x_c: float = 0.5,
                 legs: bool = True) -> None:
    """A standing person between rows y0..y1 (fractions); view 'front' or 'side'."""
    H = y1 - y0

    def Y(v):
        return y0 + v * H

    skin = _SKIN[int(rng.integers(len(_SKIN)))]
    hair = _rgb(rng.uniform(0.02, 0.1), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.5))
    top, pants = _rand_color(rng), _rand_color(rng)
    shoes = _rgb(0, 0, rng.uniform(0.05, 0.3))
    hr = 0.065 * H
    if legs:
        if view == "front":
            p.rect(x_c - 0.2, Y(0.5), x_c - 0.03, Y(0.96), pants)
            p.rect(x_c + 0.03, Y(0.5), x_c + 0.2, Y(0.96), pants)
            p.rect(x_c - 0.22, Y(0.94), x_c - 0.03, Y(1.0), shoes)
            p.rect(x_c + 0.03, Y(0.94), x_c + 0.22, Y(1.0), shoes)
        else:
            stride = rng.uniform(0.05, 0.42)
            for s in (-stride, stride):
                p.line([(x_c, Y(0.52)), (x_c + s * 0.5, Y(0.75)), (x_c + s, Y(0.97))], 0.085 * H, pants)
                p.rect(x_c + s - 0.06, Y(0.95), x_c + s + 0.14, Y(1.0), shoes)
    if view == "front":
        p.poly([(x_c - 0.3, Y(0.16)), (x_c + 0.3, Y(0.16)), (x_c + 0.24, Y(0.54)), (x_c - 0.24, Y(0.54))], top)
        arm = top if rng.random() < 0.6 else skin
        p.rect(x_c - 0.44, Y(0.17), x_c - 0.3, Y(0.5), arm)
        p.rect(x_c + 0.3, Y(0.17), x_c + 0.44, Y(0.5), arm)
    else:
        p.rect(x_c - 0.2, Y(0.15), x_c + 0.2, Y(0.55), top, r=0.2)
        swing = rng.uniform(-0.3, 0.3)
        p.line([(x_c, Y(0.18)), (x_c + swing * 0.6, Y(0.36)), (x_c + swing, Y(0.5))], 0.06 * H, top)
        if rng.random() < 0.2:  # bag
            p.rect(x_c + 0.15, Y(0.35), x_c + 0.42, Y(0.55), _rand_color(rng))
    p.rect(x_c - 0.06, Y(0.11), x_c + 0.06, Y(0.17), skin)
    p.circle(x_c, Y(0.0) + hr, hr, fill=skin)
    p.ellipse(x_c, Y(0.0) + hr * 0.7, hr * p.H / p.W * 1.05, hr * 0.75, fill=hair)


def _draw_pedestrian(p: _Pen, rng, view: str) -> None:
    _draw_person(p, rng, view)


def _draw_cyclist(p: _Pen, rng, view: str) -> None:
    tyre = _rgb(0, 0, rng.uniform(0.03, 0.2))
    frame = _rand_color(rng)
    if view == "rear":
        p.ellipse(0.5, 0.8, 0.09, 0.2, fill=tyre)
        p.line([(0.08, 0.47), (0.92, 0.47)], 0.02, frame)
        _draw_person(p, rng, "front", y0=0.0, y1=0.8, legs=False)
        pants = _rand_color(rng)
        p.rect(0.28, 0.4, 0.44, 0.72, pants)
        p.rect(0.56, 0.4, 0.72, 0.68, pants)
        return
    r = rng.uniform(0.19, 0.23)
    rx = r * p.H / p.W
    rear_c, front_c = (rx + 0.01, 1.0 - r), (1.0 - rx - 0.01, 1.0 - r)
    for c in (rear_c, front_c):
        p.circle(c[0], c[1], r, outline=tyre, width_h=0.035)
    seat, bb, head = (0.4, 0.5), (0.47, 1.0 - r), (0.74, 0.46)
    for a, b in ((rear_c, seat), (seat, bb), (bb, rear_c), (bb, head), (head, front_c), (seat, head)):
        p.line([a, b], 0.025, frame)
    top, pants = _rand_color(rng), _rand_color(rng)
    skin = _SKIN[int(rng.integers(len(_SKIN)))]
    lean = rng.uniform(0.0, 0.12)
    shoulder = (0.5 + lean, 0.2)
    p.line([(0.4, 0.5), (0.52, 0.62), (0.46, 0.84)], 0.06, pants)
    p.line([(0.4, 0.5), (0.58, 0.58), (0.52, 0.7)], 0.06, pants)
    p.line([(0.4, 0.5), shoulder], 0.11, top)
    p.line([shoulder, (0.66, 0.36), head], 0.04, top)
    hr = 0.07
    p.circle(shoulder[0] + 0.06, hr, hr, fill=skin)
    if rng.random() < 0.5:  # helmet
        p.ellipse(shoulder[0] + 0.06, hr * 0.7, hr * p.H / p.W * 1.15, hr * 0.8, fill=_rand_color(rng))


_DRAW = {"Car": _draw_car, "Van": _draw_van, "Truck": _draw_truck, "Pedestrian": _draw_pedestrian,
         "Cyclist": _draw_cyclist}


# ----------------------------------------------------------------------------------------------- clutter
def _draw_clutter(p: _Pen, rng, kind: str) -> None:
    c = _rand_color(rng)
    if kind == "pole":
        p.rect(0.35, 0.0, 0.65, 1.0, _rgb(0, 0, rng.uniform(0.2, 0.7)) if rng.random() < 0.7 else c)
    elif kind == "sign":
        p.rect(0.44, 0.25, 0.56, 1.0, (110, 110, 115))
        shape = rng.integers(3)
        if shape == 0:
            p.circle(0.5, 0.12, 0.12, fill=c)
        elif shape == 1:
            p.rect(0.0, 0.0, 1.0, 0.24, c)
        else:
            p.poly([(0.5, 0.0), (1.0, 0.26), (0.0, 0.26)], c)
    elif kind == "bollard":
        p.rect(0.1, 0.12, 0.9, 1.0, c)
        p.circle(0.5, 0.14, 0.14, fill=_shade(c, rng.uniform(0.5, 1.3)))
    elif kind == "bin":
        p.rect(0.05, 0.12, 0.95, 1.0, c, r=0.1)
        p.rect(0.0, 0.0, 1.0, 0.14, _shade(c, 0.6))
        if rng.random() < 0.5:
            p.rect(0.15, 0.3, 0.85, 0.45, _shade(c, 0.35))
    elif kind == "bush":
        g = _rgb(rng.uniform(0.2, 0.4), rng.uniform(0.4, 0.8), rng.uniform(0.2, 0.55))
        for _ in range(6):
            cx, cy = rng.uniform(0.25, 0.75), rng.uniform(0.4, 0.7)
            p.ellipse(cx, cy, rng.uniform(0.15, 0.25), rng.uniform(0.25, 0.3),
                      fill=_shade(g, rng.uniform(0.7, 1.2)))
        p.ellipse(0.5, 0.55, 0.5, 0.45, fill=g)
    elif kind == "barrier":
        p.rect(0.0, 0.0, 1.0, 1.0, c if rng.random() < 0.5 else (150, 150, 150))
        if rng.random() < 0.5:
            for k in range(0, 10, 2):
                p.poly([(k / 10, 0.0), ((k + 1) / 10, 0.0), ((k + 0.4) / 10, 1.0), ((k - 0.6) / 10, 1.0)],
                       (200, 30, 30) if rng.random() < 0.5 else (230, 230, 230))
    elif kind == "tyres":
        for k in range(3):
            p.circle(0.5, 1.0 - 0.17 - k * 0.33, 0.17, fill=(25, 25, 25))
            p.circle(0.5, 1.0 - 0.17 - k * 0.33, 0.07, fill=(90, 90, 90))
    elif kind == "board":
        p.rect(0.1, 0.4, 0.16, 1.0, (90, 90, 90))
        p.rect(0.84, 0.4, 0.9, 1.0, (90, 90, 90))
        p.rect(0.0, 0.0, 1.0, 0.45, c)
        p.rect(0.1, 0.08, 0.6, 0.2, _rand_color(rng))


# clutter kinds: (height m range, width m range)
_CLUTTER = {"pole": ((3.0, 7.0), (0.12, 0.3)), "sign": ((2.0, 3.0), (0.5, 0.9)), "bollard": ((0.7, 1.2), (0.15, 0.3)),
            "bin": ((0.9, 1.4), (0.6, 1.3)), "bush": ((0.6, 1.6), (1.0, 3.0)), "barrier": ((0.7, 1.1), (2.0, 7.0)),
            "tyres": ((0.9, 1.2), (0.4, 0.6)), "board": ((2.0, 3.5), (2.0, 4.0))}


# ----------------------------------------------------------------------------------------------- background
def _smooth_noise(rng, h: int, w: int, cells: int) -> np.ndarray:
    small = rng.standard_normal((max(2, h // cells), max(2, w // cells))).astype(np.float32)
    img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32)


def _background(rng, W: int, H: int) -> tuple[np.ndarray, dict]:
    yh = H * rng.uniform(0.30, 0.47)
    vx = W * rng.uniform(0.3, 0.7)
    hw_b = W * rng.uniform(0.35, 0.8)
    ys = np.arange(H, dtype=np.float32)[:, None] + 0.5
    xs = np.arange(W, dtype=np.float32)[None, :] + 0.5
    img = np.zeros((H, W, 3), np.float32)

    weather = rng.random()
    if weather < 0.55:
        c_top = np.array(_rgb(rng.uniform(0.55, 0.62), rng.uniform(0.3, 0.7), rng.uniform(0.6, 0.95)), np.float32)
    elif weather < 0.85:
        c_top = np.array(_rgb(0.6, rng.uniform(0, 0.1), rng.uniform(0.5, 0.85)), np.float32)
    else:
        c_top = np.array(_rgb(rng.uniform(0.7, 0.95), rng.uniform(0.2, 0.5), rng.uniform(0.3, 0.7)), np.float32)
    c_hor = np.clip(c_top * rng.uniform(1.0, 1.3) + rng.uniform(0, 30), 0, 255)
    a = np.clip(ys / max(yh, 1.0), 0, 1)[..., None]
    img[:] = c_top * (1 - a) + c_hor * a

    ground_kind = rng.random()
    if ground_kind < 0.45:
        c_side = np.array(_rgb(rng.uniform(0.18, 0.33), rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.6)), np.float32)
    elif ground_kind < 0.75:
        c_side = np.array(_rgb(rng.uniform(0.06, 0.12), rng.uniform(0.15, 0.45), rng.uniform(0.4, 0.7)), np.float32)
    else:
        c_side = np.array(_rgb(0, 0, rng.uniform(0.4, 0.7)), np.float32)
    g = float(rng.uniform(55, 125))
    c_road = np.array([g, g, g], np.float32) + rng.uniform(-6, 6, 3).astype(np.float32)
    t = np.clip((ys - yh) / (H - yh), 0, None)  # (H,1)
    below = ys >= yh
    left, right = vx - hw_b * t, vx + hw_b * t
    road = below & (xs >= left) & (xs <= right)
    img = np.where(below[..., None], c_side, img)
    if rng.random() < 0.7:  # sidewalks
        sw = hw_b * t * rng.uniform(0.12, 0.3)
        walk = below & ~road & (xs >= left - sw) & (xs <= right + sw)
        c_walk = np.array(_rgb(0, 0, rng.uniform(0.45, 0.75)), np.float32)
        img = np.where(walk[..., None], c_walk, img)
    img = np.where(road[..., None], c_road, img)
    tex = _smooth_noise(rng, H, W, 6) * rng.uniform(3, 12) + _smooth_noise(rng, H, W, 2) * rng.uniform(2, 6)
    img += (tex * below)[..., None]

    # lane marks (dashed, perspective)
    mark = np.array((235, 235, 225) if rng.random() < 0.7 else (225, 195, 60), np.float32)
    lanes = [-1 / 3, 1 / 3] if rng.random() < 0.6 else [0.0]
    if rng.random() < 0.5:
        lanes += [-0.97, 0.97]
    phase = rng.uniform(0, 1)
    tt = np.maximum(t, 1e-3)
    dash = ((1.0 / tt * rng.uniform(1.5, 3.0) + phase) % 1.0) < 0.5
    lane_alpha = np.zeros((H, W), np.float32)
    for lane in lanes:
        xc = vx + lane * hw_b * t
        half = np.maximum(0.35, 0.012 * hw_b * t)
        alpha = np.clip(half + 0.5 - np.abs(xs - xc), 0, 1)
        if abs(lane) < 0.9:
            alpha = alpha * dash
        np.maximum(lane_alpha, alpha, out=lane_alpha)
    lane_alpha = (lane_alpha * below * 0.85)[..., None]
    img = img * (1 - lane_alpha) + mark * lane_alpha
    # road patches / shadows
    for _ in range(int(rng.integers(0, 4))):
        cy = yh + (H - yh) * rng.uniform(0.2, 1.0)
        cx = rng.uniform(0, W)
        ry, rx = (H - yh) * rng.uniform(0.03, 0.12), W * rng.uniform(0.03, 0.15)
        m = np.clip(1.0 - ((xs - cx) / rx) ** 2 - ((ys - cy) / ry) ** 2, 0, 1) ** 0.5 * below
        img *= (1 - m * rng.uniform(0.1, 0.35))[..., None]

    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(pil)
    # buildings and trees along the horizon
    x = rng.uniform(-W * 0.1, 0)
    while x < W:
        bw = W * rng.uniform(0.04, 0.2)
        kind = rng.random()
        if kind < 0.55:
            bh = yh * rng.uniform(0.15, 0.9)
            c = _rand_color(rng)
            d.rectangle([x, yh - bh, x + bw, yh + 0.5], fill=c)
            win = _rgb(rng.uniform(0.5, 0.7), rng.uniform(0, 0.4), rng.uniform(0.05, 0.4))
            step = max(2.0, bh / rng.uniform(2, 6))
            wy = yh - bh + step * 0.3
            while wy + step * 0.4 < yh - 1:
                wx = x + bw * 0.1
                while wx + bw * 0.12 < x + bw:
                    d.rectangle([wx, wy, wx + max(1.0, bw * 0.12), wy + max(1.0, step * 0.4)], fill=win)
                    wx += bw * rng.uniform(0.2, 0.3)
                wy += step
        elif kind < 0.85:
            th = yh * rng.uniform(0.2, 0.7)
            green = _rgb(rng.uniform(0.2, 0.4), rng.uniform(0.3, 0.8), rng.uniform(0.15, 0.5))
            d.rectangle([x + bw * 0.45, yh - th * 0.5, x + bw * 0.55, yh + 0.5], fill=(80, 60, 40))
            for _ in range(4):
                cx, cy = x + bw * rng.uniform(0.2, 0.8), yh - th * rng.uniform(0.5, 0.9)
                r = bw * rng.uniform(0.2, 0.45)
                d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=_shade(green, rng.uniform(0.7, 1.2)))
        x += bw * rng.uniform(0.8, 1.6)
    img = np.asarray(pil, dtype=np.float32).copy()
    return img, {"yh": float(yh), "vx": float(vx), "hw_b": float(hw_b), "K": 0.28 * H}


# ----------------------------------------------------------------------------------------------- scene
def _choose(rng, probs: dict) -> str:
    keys = list(probs)
    p = np.array([probs[k] for k in keys], np.float64)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def _sample_t(rng) -> float:
    if rng.random() < 0.65:
        return float(math.exp(rng.uniform(math.log(0.09), math.log(1.12))))
    return float(rng.uniform(0.25, 1.1))


def _sample_object_t(rng, min_t: float) -> float:
    """An object's depth parameter, redrawn until it is >= ``min_t`` (no extra draws for ``min_t <= 0.09``)."""
    t = _sample_t(rng)
    while t < min_t:
        t = _sample_t(rng)
    return t


def _class_probs(classes: Sequence[str] | None) -> dict[str, float]:
    """``SYNTH_CLASS_PROBS`` restricted to ``classes`` (their relative frequencies kept); all of them for None."""
    if classes is None:
        return SYNTH_CLASS_PROBS
    unknown = [c for c in classes if c not in SYNTH_CLASS_PROBS]
    if unknown or not classes:
        raise ValueError(f"synth classes must be a non-empty subset of {list(SYNTH_CLASS_PROBS)}, got {list(classes)}")
    return {c: p for c, p in SYNTH_CLASS_PROBS.items() if c in classes}


def _place(rng, cls: str, geo: dict, W: int, t: float) -> float:
    """Lateral world position (metres from the road centre line)."""
    Wr = geo["hw_b"] / geo["K"]  # road half width in metres
    u = rng.random()
    if u < 0.15:  # anywhere in view (also partly outside: truncation)
        k = geo["K"] * t
        return float(rng.uniform((-geo["vx"] - 0.1 * W) / k, (W * 1.1 - geo["vx"]) / k))
    if cls in ("Car", "Van", "Truck"):
        if rng.random() < 0.75:
            lane = rng.choice([-0.75, -0.25, 0.25, 0.75])
            return float(lane * Wr + rng.normal(0, 0.3))
        return float(rng.choice([-1, 1]) * (Wr + rng.uniform(0.8, 2.0)))
    if cls == "Pedestrian":
        if rng.random() < 0.75:
            return float(rng.choice([-1, 1]) * (Wr + rng.uniform(0.3, 3.5)))
        return float(rng.uniform(-Wr, Wr))
    return float(rng.choice([-1, 1]) * (Wr - rng.uniform(-0.5, 1.5)))  # cyclists near the road edge


def _view(rng, cls: str) -> str:
    if cls in ("Car", "Van", "Truck"):
        return "rear" if rng.random() < 0.55 else "side"
    if cls == "Pedestrian":
        return "front" if rng.random() < 0.5 else "side"
    return "rear" if rng.random() < 0.3 else "side"


def _object_size(rng, cls: str, view: str) -> tuple[float, float, float, float]:
    """(h, w, l) in metres and the sprite width in metres for the view."""
    (h0, h1), (w0, w1), (l0, l1) = _DIMS[cls]
    h, w, l_ = rng.uniform(h0, h1), rng.uniform(w0, w1), rng.uniform(l0, l1)
    if cls == "Pedestrian":
        width = w if view == "front" else l_
    elif view == "rear":
        width = w
    else:
        width = l_ * (1.0 if rng.random() < 0.6 else rng.uniform(0.55, 0.85))  # side or oblique
    return h, w, l_, width


def _spec(rng, cls, geo, W, H, t, X=None, view=None, hard=()):
    view = view or _view(rng, cls)
    h_m, w_m, l_m, width_m = _object_size(rng, cls, view)
    X = _place(rng, cls, geo, W, t) if X is None else X
    k = geo["K"] * t
    return {"cls": cls, "view": view, "t": t, "X": X, "dims": (h_m, w_m, l_m), "k": k,
            "yb": geo["yh"] + t * (H - geo["yh"]), "cx": geo["vx"] + X * k,
            "w_px": width_m * k, "h_px": h_m * k, "hard": list(hard), "mirror": bool(rng.random() < 0.5)}


def render_scene(rng: np.random.Generator | int, width: int = 320, height: int = 96, hard_fraction: float = 0.2,
                 mislabel_fraction: float = 0.05, min_objects: int = 1, max_objects: int = 10,
                 min_label_height: float | None = None, dontcare: bool = True, clutter: int = 5,
                 noise: tuple[float, float] = (2.0, 7.0), classes: Sequence[str] | None = None,
                 min_t: float = 0.0):
    """Render one scene: ``(image uint8[H, W, 3], labels: list[ObjectAnnotation], meta: dict)``.

    ``labels`` are what the KITTI label file says (mislabels included); ``meta["objects"][i]`` describes
    ``labels[i]`` (``true_cls``, ``true_box``, ``hard``, ``mislabel`` in {None, 'class', 'box'}, ``covered``,
    ``order``: draw order, larger is nearer); ``meta["occluders"]`` lists unlabelled foreground clutter
    (``box``, ``order``).

    ``classes`` limits the generated objects to those classes (default: all of ``SYNTH_CLASS_PROBS``); ``min_t``
    > 0.09 keeps objects near, hence large (depth parameter ``t >= min_t``; hard "small" objects stay small).
    Both defaults leave the scenes of a seed unchanged.
    """
    if not 0.0 <= min_t <= 1.0:
        raise ValueError(f"min_t must be in [0, 1], got {min_t}")
    probs = _class_probs(classes)
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    W, H = int(width), int(height)
    min_h = float(min_label_height) if min_label_height is not None else max(5.0, 0.06 * H)
    img, geo = _background(rng, W, H)

    specs: list[dict] = []
    n = int(rng.integers(min_objects, max_objects + 1))
    for _ in range(n):
        cls = _choose(rng, probs)
        hard: list[str] = []
        if cls in POSITIVE and rng.random() < hard_fraction:
            kinds = ["low_contrast", "blur", "small", "occlusion"]
            hard = [kinds[i] for i in rng.choice(4, size=int(rng.integers(1, 3)), replace=False)]
        t = _sample_object_t(rng, min_t)
        if "small" in hard:
            h_m = float(np.mean(_DIMS[cls][0]))
            t = float(rng.uniform(1.0, 1.7) * min_h / (geo["K"] * h_m))
        s = _spec(rng, cls, geo, W, H, t, hard=hard)
        specs.append(s)
        if "occlusion" in hard:  # something in front covering much of it
            t2 = t * rng.uniform(1.04, 1.25)
            if rng.random() < 0.5 and "Car" in probs:  # an occluding car is labelled, so only if Car is generated
                occ = _spec(rng, "Car", geo, W, H, t2, view="rear" if rng.random() < 0.5 else "side")
                frac = rng.uniform(0.5, 0.8)
                side = 1 if rng.random() < 0.5 else -1
                occ["cx"] = s["cx"] + side * (s["w_px"] / 2 + occ["w_px"] / 2 - frac * s["w_px"])
                occ["X"] = (occ["cx"] - geo["vx"]) / occ["k"]
                specs.append(occ)
            else:
                kind = "barrier" if rng.random() < 0.5 else "bush"
                k2 = geo["K"] * t2
                specs.append({"cls": None, "kind": kind, "t": t2, "yb": geo["yh"] + t2 * (H - geo["yh"]),
                              "cx": s["cx"] + rng.uniform(-0.2, 0.2) * s["w_px"],
                              "w_px": s["w_px"] * rng.uniform(1.0, 1.6),
                              "h_px": max(s["h_px"] * rng.uniform(0.55, 0.8), 0.7 * k2), "mirror": False})
    if dontcare and rng.random() < 0.35:  # a group of tiny far cars under one DontCare box
        t0 = rng.uniform(0.05, 0.1)
        X0 = rng.uniform(-1, 1) * geo["hw_b"] / geo["K"]
        for j in range(int(rng.integers(2, 5))):
            s = _spec(rng, "Car", geo, W, H, t0 * rng.uniform(0.9, 1.1), X=X0 + j * rng.uniform(1.5, 2.5))
            s["group"] = 1
            specs.append(s)
    for _ in range(int(rng.integers(0, clutter + 1))):
        kind = list(_CLUTTER)[int(rng.integers(len(_CLUTTER)))]
        t = _sample_t(rng)
        (h0, h1), (w0, w1) = _CLUTTER[kind]
        k = geo["K"] * t
        Wr = geo["hw_b"] / geo["K"]
        X = rng.choice([-1, 1]) * (Wr + rng.uniform(0.2, 4.0)) if rng.random() < 0.8 else rng.uniform(-Wr, Wr)
        specs.append({"cls": None, "kind": kind, "t": t, "yb": geo["yh"] + t * (H - geo["yh"]),
                      "cx": geo["vx"] + X * k, "w_px": rng.uniform(w0, w1) * k, "h_px": rng.uniform(h0, h1) * k,
                      "mirror": False})

    order = sorted(range(len(specs)), key=lambda i: (specs[i]["yb"], i))
    owner = np.full((H, W), -1, np.int32)
    drawn: list[dict] = []
    for rank, i in enumerate(order):
        s = specs[i]
        wi, hi = max(2, round(s["w_px"])), max(2, round(s["h_px"]))
        x0, y0 = round(s["cx"] - wi / 2), round(s["yb"] - hi)
        if x0 >= W or y0 >= H or x0 + wi <= 0 or y0 + hi <= 0 or wi > 8 * W or hi > 8 * H:
            continue
        pen = _Pen(wi, hi, mirror=s["mirror"])
        if s["cls"] is None:
            _draw_clutter(pen, rng, s["kind"])
        else:
            _DRAW[s["cls"]](pen, rng, s["view"])
        spr = pen.result()
        if s["cls"] is not None and "blur" in s["hard"]:
            bl = Image.fromarray(np.clip(spr, 0, 255).astype(np.uint8))
            bl = bl.filter(ImageFilter.GaussianBlur(rng.uniform(0.8, 1.8)))
            spr = np.asarray(bl, dtype=np.float32)
        # crop to the image
        cx0, cy0, cx1, cy1 = max(0, x0), max(0, y0), min(W, x0 + wi), min(H, y0 + hi)
        sub = spr[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
        alpha = sub[..., 3:4] / 255.0
        rgb = sub[..., :3]
        region = img[cy0:cy1, cx0:cx1]
        if s["cls"] is not None and "low_contrast" in s["hard"]:
            mean = region.reshape(-1, 3).mean(0)
            rgb = mean + rng.uniform(0.15, 0.35) * (rgb - mean)
        # shading gradient + a soft shadow under vehicles
        grad = 1.0 + rng.uniform(-0.25, 0.25) * (np.linspace(-0.5, 0.5, hi, dtype=np.float32)[cy0 - y0:cy1 - y0])
        rgb = rgb * grad[:, None, None]
        if s["cls"] in ("Car", "Van", "Truck"):
            sy0, sy1 = max(0, int(s["yb"] - 0.06 * hi)), min(H, int(s["yb"] + 0.06 * hi) + 1)
            if sy1 > sy0:
                img[sy0:sy1, cx0:cx1] *= rng.uniform(0.55, 0.8)
        img[cy0:cy1, cx0:cx1] = region * (1 - alpha) + rgb * alpha
        sil_full = spr[..., 3] > 127.5
        if not sil_full.any():
            sil_full = spr[..., 3] > 0
        sil_in = sil_full[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
        owner_val = len(drawn) if s["cls"] is not None else -2 - rank
        owner[cy0:cy1, cx0:cx1][sil_in] = owner_val
        rows, cols = np.nonzero(sil_full)
        full_box = (x0 + cols.min(), y0 + rows.min(), x0 + cols.max() + 1, y0 + rows.max() + 1) if len(rows) else \
            (x0, y0, x0 + wi, y0 + hi)
        box = (max(0, full_box[0]), max(0, full_box[1]), min(W, full_box[2]), min(H, full_box[3]))
        drawn.append({"spec": s, "rank": rank, "box": box, "n_full": int(sil_full.sum()),
                      "n_in": int(sil_in.sum()), "owner": owner_val})

    # global illumination and sensor noise
    img *= 1.0 + 0.15 * _smooth_noise(rng, H, W, 40)[..., None]
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(*noise))
    image = np.clip(img + 0.5, 0, 255).astype(np.uint8)

    labels: list[ObjectAnnotation] = []
    metas: list[dict] = []
    occluders: list[dict] = []
    group_boxes: list[tuple] = []
    focal = 0.58 * W
    for d in drawn:
        s = d["spec"]
        if s["cls"] is None:
            if d["n_in"] > 0:
                occluders.append({"box": [float(v) for v in d["box"]], "order": d["rank"], "kind": s["kind"]})
            continue
        if d["n_in"] == 0 or d["box"][2] - d["box"][0] < 1 or d["box"][3] - d["box"][1] < 1:
            continue
        visible = int((owner == d["owner"]).sum())
        covered = round(1.0 - visible / d["n_in"], 4)
        truncated = 1.0 - d["n_in"] / max(d["n_full"], 1)
        box = tuple(float(v) for v in d["box"])
        if s.get("group"):
            group_boxes.append(box)
            continue
        cls = s["cls"]
        meta = {"true_cls": cls, "true_box": list(box), "hard": s["hard"], "mislabel": None,
                "covered": covered, "truncated_exact": round(truncated, 4), "order": d["rank"],
                "view": s["view"]}
        if box[3] - box[1] < min_h or covered >= 0.9:
            cls = "DontCare"
        if cls == "DontCare":
            labels.append(ObjectAnnotation(cls="DontCare", box=box, truncated=-1.0, occluded=-1, alpha=-10.0,
                                           extra=(-1.0, -1.0, -1.0, -1000.0, -1000.0, -1000.0, -10.0)))
            meta["hard"] = []
            metas.append(meta)
            continue
        h_m, w_m, l_m = s["dims"]
        z = focal / s["k"]
        xw = (s["cx"] - W / 2) * z / focal
        if s["view"] == "side":
            ry = math.pi if s["mirror"] else 0.0
        else:  # seen from behind (moving away) or from the front
            ry = math.pi / 2 if s["view"] == "front" else -math.pi / 2
        alpha = ry - math.atan2(xw, z)
        alpha = (alpha + math.pi) % (2 * math.pi) - math.pi
        if cls in POSITIVE and rng.random() < mislabel_fraction:
            others = [c for c in POSITIVE if c != cls and c in probs]  # swap only to a generated class
            if rng.random() < 0.5 and others:
                cls = others[int(rng.integers(len(others)))]
                meta["mislabel"] = "class"
            else:
                bw, bh = box[2] - box[0], box[3] - box[1]
                nw, nh = bw * rng.uniform(0.6, 1.5), bh * rng.uniform(0.6, 1.5)
                cx = (box[0] + box[2]) / 2 + rng.choice([-1, 1]) * rng.uniform(0.3, 0.6) * bw
                cy = (box[1] + box[3]) / 2 + rng.choice([-1, 1]) * rng.uniform(0.15, 0.4) * bh
                jb = (max(0.0, cx - nw / 2), max(0.0, cy - nh / 2), min(float(W), cx + nw / 2),
                      min(float(H), cy + nh / 2))
                if jb[2] - jb[0] >= 2 and jb[3] - jb[1] >= 2 or not others:
                    box = tuple(round(v, 2) for v in jb)
                    meta["mislabel"] = "box"
                else:
                    cls = others[int(rng.integers(len(others)))]
                    meta["mislabel"] = "class"
        labels.append(ObjectAnnotation(
            cls=cls, box=box, truncated=round(truncated, 2), occluded=occlusion_level(covered),
            alpha=round(alpha, 2),
            extra=(round(h_m, 2), round(w_m, 2), round(l_m, 2), round(xw, 2), 1.65, round(z, 2), round(ry, 2))))
        metas.append(meta)
    if group_boxes:
        gb = (min(b[0] for b in group_boxes), min(b[1] for b in group_boxes), max(b[2] for b in group_boxes),
              max(b[3] for b in group_boxes))
        labels.append(ObjectAnnotation(cls="DontCare", box=gb, truncated=-1.0, occluded=-1, alpha=-10.0,
                                       extra=(-1.0, -1.0, -1.0, -1000.0, -1000.0, -1000.0, -10.0)))
        metas.append({"true_cls": "DontCare", "true_box": list(gb), "hard": [], "mislabel": None, "covered": 0.0,
                      "truncated_exact": 0.0, "order": -1, "view": "group"})
    return image, labels, {"objects": metas, "occluders": occluders, "horizon": geo["yh"]}


#: the image sides generate_synth accepts: an 8192 x 8192 scene is ~200 MB in memory, 100000 x 100000 would be 30 GB
MIN_SIDE, MAX_SIDE = 16, 8192


def generate_synth(out_dir: str | Path, num_images: int, seed: int = 0, width: int = 320, height: int = 96,
                   hard_fraction: float = 0.2, mislabel_fraction: float = 0.05, val_fraction: float = 0.2,
                   min_objects: int = 1, max_objects: int = 10, dontcare: bool = True, clutter: int = 5,
                   write_meta: bool = True, classes: Sequence[str] | None = None, min_t: float = 0.0) -> Path:
    """Write ``num_images`` synthetic scenes in KITTI layout under ``out_dir`` and return ``out_dir``.

    ``out_dir`` must be missing, empty or a folder this function wrote (its ``.aidkd_synth`` marker, written
    first): anything else raises :class:`DatasetError` naming the folder, so a real dataset is never overwritten.

    ``training/image_2/NNNNNN.png``, ``training/label_2/NNNNNN.txt`` (15 KITTI fields), ``ImageSets/train.txt``
    and ``val.txt`` (the :func:`aidkd.data.kitti.split_stems` split, 80/20 by default) and, with
    ``write_meta``, ``synth_meta.json``. Image ``i`` depends only on ``(seed, i)`` and the options, and the same
    arguments give byte-identical files. Stale ``*.png``/``*.txt`` from an earlier run in those folders are removed.
    ``classes`` and ``min_t`` (see :func:`render_scene`) make an easier set: fewer classes, nearer (larger) objects.
    """
    if num_images < 0:
        raise ValueError("num_images must be >= 0")
    if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
        raise ValueError(f"image size {width}x{height}: width and height must be in [{MIN_SIDE}, {MAX_SIDE}] pixels")
    for name, v in (("hard_fraction", hard_fraction), ("mislabel_fraction", mislabel_fraction)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {v}")
    out = Path(out_dir)
    claim_synth_folder(out, {"seed": seed, "num_images": num_images, "width": width, "height": height,
                             "hard_fraction": hard_fraction, "mislabel_fraction": mislabel_fraction})
    img_dir, lbl_dir, sets = out / "training" / "image_2", out / "training" / "label_2", out / "ImageSets"
    for d in (img_dir, lbl_dir, sets):
        d.mkdir(parents=True, exist_ok=True)
    for p in list(img_dir.glob("*.png")) + list(lbl_dir.glob("*.txt")):
        p.unlink()
    stems, frames = [], {}
    for i in range(num_images):
        stem = f"{i:06d}"
        rng = np.random.default_rng([int(seed), i])
        image, labels, meta = render_scene(rng, width, height, hard_fraction=hard_fraction,
                                           mislabel_fraction=mislabel_fraction, min_objects=min_objects,
                                           max_objects=max_objects, dontcare=dontcare, clutter=clutter,
                                           classes=classes, min_t=min_t)
        Image.fromarray(image).save(img_dir / f"{stem}.png", format="PNG", optimize=False)
        (lbl_dir / f"{stem}.txt").write_text("".join(format_kitti_line(o) + "\n" for o in labels),
                                             encoding="utf-8")
        stems.append(stem)
        frames[stem] = meta
    train, val = split_stems(stems, val_fraction=val_fraction, seed=seed)
    (sets / "train.txt").write_text("".join(s + "\n" for s in train), encoding="utf-8")
    (sets / "val.txt").write_text("".join(s + "\n" for s in val), encoding="utf-8")
    if write_meta:
        info = {"generator": "aidkd.data.synth", "seed": seed, "num_images": num_images, "width": width,
                "height": height, "hard_fraction": hard_fraction, "mislabel_fraction": mislabel_fraction,
                "classes": list(_class_probs(classes)), "min_t": min_t, "max_objects": max_objects,
                "clutter": clutter, "frames": frames}
        (out / "synth_meta.json").write_text(json.dumps(info, separators=(",", ":")), encoding="utf-8")
    return out


def claim_synth_folder(out: Path, params: dict) -> None:
    """Refuse a non-empty folder aidkd did not generate; otherwise write the marker that makes it aidkd's."""
    from .layout import SYNTH_MARKER, detect_layout, is_synth_folder

    if out.is_file():
        raise DatasetError(f"cannot generate synthetic scenes in {out}: it is a file", file=out)
    if out.is_dir() and any(out.iterdir()) and not is_synth_folder(out):
        layout = detect_layout(out)
        hint = {"kitti": "; it looks like a KITTI dataset: set data.format: kitti to train on it",
                "coco": "; it looks like a COCO dataset: set data.format: coco",
                "yolo": "; it looks like a YOLO dataset: set data.format: yolo"}.get(layout, "")
        raise DatasetError(f"refusing to generate synthetic scenes in {out}: the folder holds files aidkd did not "
                           f"generate (no {SYNTH_MARKER} marker){hint}; use an empty or new folder", file=out)
    out.mkdir(parents=True, exist_ok=True)
    (out / SYNTH_MARKER).write_text(json.dumps({"generator": "aidkd.data.synth", **params}, sort_keys=True) + "\n",
                                    encoding="utf-8")
