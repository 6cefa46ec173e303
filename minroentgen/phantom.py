"""Procedural frontal (PA) chest radiograph phantoms with radiology-style reports and labels.

Offline stand-in for MIMIC-CXR: image-report pairs whose labels say exactly which findings are
shown and where, so a text-to-image model can be trained and checked on a CPU. Not part of the model.

Geometry lives in normalised *patient* coordinates (u, v), both about [-1, 1]:
  u: horizontal; u > 0 is the PATIENT'S LEFT, which (radiological convention: the viewer faces
     the patient) is drawn on the IMAGE'S RIGHT. `SIDE_SIGN["left"] == +1` encodes this once.
  v: vertical, top of the image at -1, feet at +1.
The picture is a density map D (soft tissue ~1, aerated lung ~0.3, bone and metal more) turned into
brightness like film: 1 - exp(-k D). Bright = dense (bone, heart, fluid); dark = air.

    python -m minroentgen.phantom --n 10000 --size 256 --out data/phantoms --seed 0
    python -m minroentgen.phantom --grid docs/phantoms.png
"""
import argparse
import contextlib
import csv
import json
import multiprocessing
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from .phantom_reports import write_report

SIDE_SIGN = {"left": +1.0, "right": -1.0}  # patient's left -> image right (u > 0)
ZONES = ("right upper", "right lower", "left upper", "left lower")
DEVICES = ("endotracheal_tube", "central_venous_line", "pacemaker")
FINDINGS = ("pleural_effusion", "pneumothorax", "cardiomegaly", "consolidation", "edema",
            "support_devices", "nodule")
MIN_SIZE, MAX_SIZE = 64, 512


# ----------------------------------------------------------------------------- labels

def sample_labels(rng: np.random.Generator) -> dict:
    """About a third normal ({}), the rest 1-3 distinct findings with their attributes."""
    k = 0 if rng.random() < 1 / 3 else int(rng.integers(1, 4))
    labels = {}
    for name in sorted(rng.choice(len(FINDINGS), size=k, replace=False)):
        name = FINDINGS[name]
        if name == "pleural_effusion":
            labels[name] = {"side": str(rng.choice(["left", "right", "bilateral"])),
                            "size": str(rng.choice(["small", "moderate", "large"]))}
        elif name == "pneumothorax":
            labels[name] = {"side": str(rng.choice(["left", "right"])), "size": str(rng.choice(["small", "large"]))}
        elif name in ("cardiomegaly", "edema"):
            labels[name] = {}
        elif name == "consolidation":
            labels[name] = {"zone": str(rng.choice(ZONES))}
        elif name == "support_devices":
            mask = rng.random(3) < 0.4
            mask[rng.integers(3)] = True
            labels[name] = {"devices": [d for d, m in zip(DEVICES, mask) if m]}
        else:
            labels[name] = {"zone": str(rng.choice(ZONES)), "size": str(rng.choice(["small", "large"]))}
    return labels


# ----------------------------------------------------------------------------- anatomy

@dataclass(frozen=True)
class Patient:
    """One patient's anatomy in patient coordinates (drawn before, and independent of, the findings)."""
    lung_cx: float       # |u| of each lung's centre
    lung_rx: float       # lung half-width; the inner thorax spans |u| <= lung_cx + lung_rx
    lung_cy: float       # where the rounded apex ends and the straight lateral walls begin
    lung_ry: float       # apex height above lung_cy
    dome_right: float    # top of the right hemidiaphragm (v)
    dome_left: float     # top of the left one, usually a little lower (larger v)
    ctr_normal: float    # cardiothoracic ratio of this patient's heart, 0.40-0.50
    ctr_enlarged: float  # ... and if the label says cardiomegaly, 0.58-0.68
    body_w: float        # soft-tissue half-width
    angle: float         # slight rotation (radians)
    zoom: float
    shift: tuple         # (du, dv) patient-coordinate offset of the image centre
    exposure: float      # k in 1 - exp(-k D)
    gamma: float         # display contrast
    noise: float         # quantum-mottle standard deviation
    seed: int            # for vessel trees, texture and mottle

    def thorax_half_width(self) -> float:
        return self.lung_cx + self.lung_rx

    def heart_half_width(self, labels: dict) -> float:
        return self.cardiothoracic_ratio(labels) * self.thorax_half_width()

    def cardiothoracic_ratio(self, labels: dict) -> float:
        return self.ctr_enlarged if "cardiomegaly" in labels else self.ctr_normal


def sample_patient(rng: np.random.Generator) -> Patient:
    u = rng.uniform
    dome_right = u(0.38, 0.52)
    return Patient(lung_cx=u(0.40, 0.45), lung_rx=u(0.33, 0.38), lung_cy=u(-0.28, -0.18),
                   lung_ry=u(0.48, 0.56), dome_right=dome_right, dome_left=dome_right + u(0.0, 0.08),
                   ctr_normal=u(0.40, 0.50), ctr_enlarged=u(0.58, 0.68), body_w=u(0.88, 1.0),
                   angle=float(np.deg2rad(u(-4, 4))), zoom=u(0.95, 1.08), shift=(u(-0.04, 0.04), u(-0.04, 0.05)),
                   exposure=u(0.9, 1.3), gamma=u(0.85, 1.2), noise=u(0.01, 0.03),
                   seed=int(rng.integers(2**62)))


class Grid:
    """Pixel grid mapped to patient coordinates (with the patient's rotation, zoom and shift)."""

    def __init__(self, size: int, p: Patient):
        self.size, self.p = size, p
        self.x = (np.arange(size) + 0.5) / size * 2 - 1  # image columns (and rows), in [-1, 1]
        x, y = np.meshgrid(self.x, self.x)                # x: left -> right, y: top -> bottom
        c, s = np.cos(p.angle), np.sin(p.angle)
        self.u = ((c * x - s * y) / p.zoom + p.shift[0]).astype(np.float32)  # (size, size)
        self.v = ((s * x + c * y) / p.zoom + p.shift[1]).astype(np.float32)
        self.px = 2 / size / p.zoom  # one pixel in patient units

    def to_pixels(self, pts: np.ndarray) -> np.ndarray:
        """(k, 2) patient (u, v) -> (k, 2) pixel (column, row)."""
        p = self.p
        a, b = (pts[:, 0] - p.shift[0]) * p.zoom, (pts[:, 1] - p.shift[1]) * p.zoom
        c, s = np.cos(p.angle), np.sin(p.angle)
        xy = np.stack([c * a + s * b, -s * a + c * b], axis=1)
        return (xy + 1) / 2 * self.size - 0.5

    def stroke(self, out: np.ndarray, pts, width: float, value: float):
        """Draw a polyline (k, 2) into `out`, max-blended, Gaussian cross-section of half-width `width`."""
        pts = np.asarray(pts, dtype=np.float64)
        k = len(pts) - 1
        self.segments(out, pts[:-1], pts[1:], np.full(k, width), np.full(k, value))

    def segments(self, out, a, b, width, value, keep_integral: bool = False):
        """Draw segments a[i] -> b[i] ((k, 2) each). At low resolution a line stays at least a pixel
        wide (then dimmed if `keep_integral`, so faint vessels stay faint)."""
        w = np.maximum(width, 0.8 * self.px)
        value = value * width / w if keep_integral else value
        pa, pb = self.to_pixels(a), self.to_pixels(b)
        margin = (2.5 * w / self.px + 2)[:, None]
        lo = np.maximum(np.floor(np.minimum(pa, pb) - margin).astype(int), 0)
        hi = np.minimum(np.ceil(np.maximum(pa, pb) + margin).astype(int), self.size)
        for (j0, i0), (j1, i1), s, d, wi, vi in zip(lo, hi, a, b - a, w, value):
            if j1 <= j0 or i1 <= i0:
                continue
            du, dv = self.u[i0:i1, j0:j1] - np.float32(s[0]), self.v[i0:i1, j0:j1] - np.float32(s[1])
            t = np.clip((du * d[0] + dv * d[1]) / max(d @ d, 1e-12), 0, 1)
            dist2 = (du - t * d[0]) ** 2 + (dv - t * d[1]) ** 2
            np.maximum(out[i0:i1, j0:j1], vi * np.exp(-dist2 / wi**2), out=out[i0:i1, j0:j1])

    def noise(self, rng: np.random.Generator, cells: int) -> np.ndarray:
        """Smooth random field, about N(0, 1): a cells x cells lattice over the image, interpolated
        separably (smoothstep weights, no lattice creases). Same picture at every image size."""
        lat = rng.standard_normal((cells + 2, cells + 2)).astype(np.float32)
        f = (self.x + 1.3) / 2.6 * cells
        i = f.astype(int)
        t = f - i
        t = (t * t * (3 - 2 * t)).astype(np.float32)
        cols = lat[:, i] * (1 - t) + lat[:, i + 1] * t  # (cells + 2, size)
        return cols[i] * (1 - t)[:, None] + cols[i + 1] * t[:, None]  # (size, size)


def soft(x, width):
    """Soft step: 0 for x << 0, 1 for x >> 0; `width` sets the blur of the edge."""
    return 0.5 + 0.5 * np.tanh(x / width)


def lung_level(g: Grid, p: Patient, s: float, u=None, v=None):
    """< 1 inside the hemithorax on side s (ignoring heart and mediastinum), 1 on its boundary:
    a rounded apex on straight lateral walls, floored by that side's hemidiaphragm dome."""
    u = g.u if u is None else u
    v = g.v if v is None else v
    du, dv = (u - s * p.lung_cx) / p.lung_rx, np.minimum(v - p.lung_cy, 0) / p.lung_ry
    return np.maximum(np.sqrt(du**2 + dv**2), 1 + (v - dome(p, s, u)) / 0.2)


def dome(p: Patient, s: float, u):
    """Hemidiaphragm: a dome peaking mid-lung, falling to the costophrenic angle laterally."""
    top = p.dome_left if s > 0 else p.dome_right
    return top + 0.22 * ((u - s * (p.lung_cx - 0.02)) / p.lung_rx) ** 2


# ----------------------------------------------------------------------------- rendering

@dataclass
class Layers:
    """The (size, size) maps a finding may change."""
    levels: dict          # side -> lung_level (read only)
    lungs: dict           # side -> lung-field mask (read only)
    field: np.ndarray     # how much lung air is subtracted from the soft tissue (fluid, pus fill it in)
    aerated: np.ndarray   # where vessel markings show (a pneumothorax rim has none)
    opacity: np.ndarray   # density added by findings
    bones: np.ndarray     # bone and metal density


def render(labels: dict, size: int = 256, rng: np.random.Generator | None = None) -> np.ndarray:
    """Render one PA radiograph showing exactly `labels`; (size, size) uint8.
    The anatomy comes from `rng` alone, so the same seed with other labels is the same patient."""
    check_size(size)
    rng = np.random.default_rng() if rng is None else rng
    p = sample_patient(rng)
    g, r = Grid(size, p), np.random.default_rng(p.seed)
    u, v = g.u, g.v
    au = np.abs(u)

    # soft tissue: torso, shoulders and neck; a bit thicker in the middle
    shoulder = -0.88 + 0.25 * np.clip(au - 0.55, 0, None) ** 2 * 4
    body = soft(p.body_w - au, 0.03) * soft(v - shoulder, 0.04) + soft(0.2 - au, 0.03) * soft(shoulder - v, 0.04)
    D = body * (0.95 + 0.15 * np.sqrt(np.clip(1 - (u / p.body_w) ** 2, 0, 1)) + 0.03 * g.noise(r, 6))

    # heart (62% of its width on the patient's left = image right) and the mediastinal column
    hw = p.heart_half_width(labels)
    hu, hv = 0.24 * hw, p.dome_right - 0.04
    c, sn = np.cos(0.45), np.sin(0.45)  # long axis tilted down towards the apex (image right)
    ha = hw / np.sqrt(c**2 + (0.62 * sn) ** 2)  # semi-axes whose horizontal extent is exactly hw
    heart = soft(1 - np.hypot((c * (u - hu) + sn * (v - hv)) / ha, (c * (v - hv) - sn * (u - hu)) / (0.62 * ha)), 0.03)
    knob = 0.06 * np.exp(-(((v + 0.33) / 0.08) ** 2))  # aortic knob, on the patient's left
    mediastinum = soft(u + 0.1, 0.02) * soft(0.11 + knob - u, 0.02)
    hearts = np.maximum(heart, mediastinum)

    # lungs: each hemithorax minus heart and mediastinum
    levels = {side: lung_level(g, p, s) for side, s in SIDE_SIGN.items()}
    lungs = {side: soft(1 - L, 0.03) * (1 - hearts) for side, L in levels.items()}
    lung = lungs["left"] + lungs["right"]
    segs = []
    for side, s in SIDE_SIGN.items():
        for ang in np.deg2rad([-75, -45, -15, 15, 45, 70]) + r.uniform(-0.2, 0.2, 6):  # fan out of the hilum
            branch(r, np.array([s * 0.15, -0.08]), s, ang, 0.15, 0.011, 1.0, 4, segs)
    segs = np.array(segs)  # (k, 6): start u, v, end u, v, width, value
    vessels = np.zeros_like(u)
    g.segments(vessels, segs[:, 0:2], segs[:, 2:4], segs[:, 4], segs[:, 5], keep_integral=True)
    abdomen = soft(v - np.where(u > 0, dome(p, 1, u), dome(p, -1, u)), 0.015) * body
    gastric = soft(1 - np.hypot((u - 0.38) / 0.12, (v - p.dome_left - 0.14) / 0.06), 0.05)  # patient's left
    D += 0.12 * heart * (1 - abdomen) + 0.08 * abdomen - 0.35 * gastric * abdomen

    # airway: trachea down to the carina, then the main bronchi
    air = np.zeros_like(u)
    g.stroke(air, [(0.0, -1.2), (0.0, -0.3)], 0.035, 1.0)
    g.stroke(air, [(-0.16, -0.12), (0.0, -0.3), (0.15, -0.15)], 0.02, 0.7)
    D -= 0.4 * air * body

    # bones: spine with vertebral bodies, posterior ribs as a periodic family of arcs, clavicles
    spine = soft(0.07 - au, 0.012) * (0.8 + 0.2 * np.cos(2 * np.pi * (v / 0.13)))
    phase = (v - 0.03 - 0.6 * au**2 + 0.1 * au) / 0.17
    ribs = np.clip((np.cos(2 * np.pi * phase) - 0.35) / 0.65, 0, 1) ** 0.5
    ribs *= soft(au - 0.08, 0.02) * soft(p.thorax_half_width() + 0.06 - au, 0.02) * soft(v + 0.9, 0.05)
    ribs *= soft(0.65 - v + 0.3 * au, 0.05)
    bones = 0.3 * spine + 0.13 * ribs
    for s in SIDE_SIGN.values():
        g.stroke(bones, [(s * 0.07, -0.72), (s * 0.3, -0.78), (s * 0.62, -0.8)], 0.035, 0.45)

    # findings (each with its own random stream, so the patient stays the same); then air in the
    # lung fields and vessel markings wherever the lung is still aerated
    L = Layers(levels, lungs, lung.copy(), np.ones_like(u), np.zeros_like(u), bones)
    for i, name in enumerate(FINDINGS):
        if name in labels:
            FIND[name](g, p, labels[name], np.random.default_rng([p.seed, i]), L)
    D += -0.8 * L.field * (1 + 0.08 * g.noise(r, 10)) + 0.14 * vessels * L.aerated * lung + L.bones + L.opacity

    # film response, display window, quantum mottle
    img = 1 - np.exp(-p.exposure * np.clip(D, 0, None))
    lo, hi = 1 - np.exp(-p.exposure * np.array([0.15, 1.7]))
    img = np.clip((img - lo) / (hi - lo), 0, 1) ** p.gamma
    img = img + p.noise * r.standard_normal(img.shape)
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)


def branch(r, start, s, angle, length, width, value, depth, segs):
    """Vascular tree: a segment from `start`, then two thinner daughters (recursive, `depth` levels),
    appended to segs as (start, end, width, value). angle 0 points laterally (to side s), < 0 upwards."""
    end = start + length * np.array([s * np.cos(angle), np.sin(angle)])
    segs.append((*start, *end, width, value))
    if depth > 1:
        for da in (-1, 1):
            branch(r, end, s, angle + da * r.uniform(0.25, 0.55), length * r.uniform(0.65, 0.85),
                   width * 0.75, value * 0.8, depth - 1, segs)


def effusion(g: Grid, p: Patient, lab: dict, rng, L: Layers):
    """Dense basal opacity with a meniscus rising laterally, blunting the costophrenic angle."""
    height = {"small": 0.1, "moderate": 0.32, "large": 0.6}[lab["size"]]
    for side in (["left", "right"] if lab["side"] == "bilateral" else [lab["side"]]):
        s = SIDE_SIGN[side]
        lateral = np.clip((s * g.u - p.lung_cx + p.lung_rx) / (2 * p.lung_rx), 0, 1)
        top = (p.dome_left if s > 0 else p.dome_right) + 0.12 - height - 0.2 * lateral**2
        fluid = soft(g.v - top, 0.035) * soft(1.04 - L.levels[side] + 0.3 * soft(g.v - p.dome_right + 0.1, 0.1), 0.02)
        fluid *= soft(s * g.u - 0.02, 0.02)
        L.field *= 1 - fluid
        L.opacity += 0.25 * fluid


def pneumothorax(g: Grid, p: Patient, lab: dict, rng, L: Layers):
    """Lung collapses towards its hilum: a lucent rim without vessels, with a thin visceral pleural line."""
    s = SIDE_SIGN[lab["side"]]
    c = {"small": 0.82, "large": 0.6}[lab["size"]]
    hu, hv = s * 0.22, 0.35
    Lc = lung_level(g, p, s, hu + (g.u - hu) / c, hv + (g.v - hv) / c)
    inside = soft(1 - Lc, 0.02)
    rim = L.lungs[lab["side"]] * (1 - inside)
    L.aerated *= 1 - rim
    L.field += 0.2 * rim
    L.opacity += 0.18 * np.exp(-(((Lc - 1) / (1.2 * g.px / p.lung_rx + 0.006)) ** 2)) * L.lungs[lab["side"]]


def cardiomegaly(g: Grid, p: Patient, lab: dict, rng, L: Layers):
    """Drawn by the heart itself (Patient.heart_half_width reads the label): CTR 0.58-0.68."""


def consolidation(g: Grid, p: Patient, lab: dict, rng, L: Layers):
    """Patchy airspace opacity filling part of one lung zone."""
    side, zone = lab["zone"].split()
    s = SIDE_SIGN[side]
    cu, cv = s * (p.lung_cx + rng.uniform(-0.05, 0.1)), (-0.45 if zone == "upper" else 0.2) + rng.uniform(-0.05, 0.05)
    blob = np.exp(-(((g.u - cu) / 0.24) ** 2 + ((g.v - cv) / 0.2) ** 2) ** 2)
    patchy = np.clip(0.8 + 0.35 * g.noise(rng, 16), 0, 1) * blob * L.lungs[side]
    L.field *= 1 - 0.8 * patchy
    L.opacity += 0.08 * patchy


def edema(g: Grid, p: Patient, lab: dict, rng, L: Layers):
    """Bilateral perihilar ('bat-wing') haze."""
    for side, s in SIDE_SIGN.items():
        haze = np.exp(-(((g.u - s * 0.25) / 0.3) ** 2 + ((g.v + 0.02) / 0.38) ** 2))
        haze *= np.clip(0.8 + 0.3 * g.noise(rng, 12), 0, 1) * L.lungs[side]
        L.field *= 1 - 0.6 * haze
        L.opacity += 0.05 * haze


def support_devices(g: Grid, p: Patient, lab: dict, rng, L: Layers):
    """Metal and radio-opaque lines: brighter than bone."""
    metal = np.zeros_like(g.u)
    if "endotracheal_tube" in lab["devices"]:  # in the trachea, tip above the carina
        g.stroke(metal, [(0.0, -1.3), (0.0, -0.45 + rng.uniform(-0.05, 0.05))], 0.018, 0.9)
    if "central_venous_line" in lab["devices"]:  # right internal jugular into the SVC (image left)
        g.stroke(metal, bezier((-0.16, -1.2), (-0.2, -0.7), (-0.07, -0.2 + rng.uniform(-0.05, 0.05))), 0.011, 0.8)
    if "pacemaker" in lab["devices"]:  # generator below the LEFT clavicle (image right), leads into the heart
        gu, gv = 0.5 + rng.uniform(-0.05, 0.05), -0.62
        box = soft(0.1 - np.abs(g.u - gu), 0.012) * soft(0.07 - np.abs(g.v - gv), 0.012)
        np.maximum(metal, 1.3 * box, out=metal)
        g.stroke(metal, bezier((gu - 0.05, gv), (0.05, -0.7), (-0.02, 0.12)), 0.01, 0.9)
        g.stroke(metal, bezier((gu - 0.05, gv), (0.1, -0.5), (0.16, 0.32)), 0.01, 0.9)
    L.bones += metal


def nodule(g: Grid, p: Patient, lab: dict, rng, L: Layers):
    """Round, well-defined opacity in one lung zone."""
    side, zone = lab["zone"].split()
    s = SIDE_SIGN[side]
    radius = {"small": 0.05, "large": 0.085}[lab["size"]]
    cu, cv = s * (p.lung_cx + rng.uniform(0.0, 0.12)), (-0.42 if zone == "upper" else 0.22) + rng.uniform(-0.05, 0.05)
    disc = soft(radius - np.hypot(g.u - cu, g.v - cv), 0.01 + 0.5 * g.px)
    L.field *= 1 - 0.7 * disc
    L.opacity += 0.15 * disc


def bezier(a, b, c, k: int = 12) -> np.ndarray:
    t = np.linspace(0, 1, k)[:, None]
    return (1 - t) ** 2 * np.array(a) + 2 * t * (1 - t) * np.array(b) + t**2 * np.array(c)


FIND = {"pleural_effusion": effusion, "pneumothorax": pneumothorax, "cardiomegaly": cardiomegaly,
        "consolidation": consolidation, "edema": edema, "support_devices": support_devices, "nodule": nodule}


# ----------------------------------------------------------------------------- data set

@dataclass
class Phantom:
    image: np.ndarray  # (size, size) uint8
    report: str
    labels: dict


def make(seed: int, index: int, size: int = 256) -> Phantom:
    """Phantom number `index` of data set `seed`: independent of every other index."""
    r_labels, r_image, r_report = (np.random.default_rng(s) for s in np.random.SeedSequence([seed, index]).spawn(3))
    labels = sample_labels(r_labels)
    return Phantom(render(labels, size, r_image), write_report(labels, r_report), labels)


def generate(n: int, size: int = 256, seed: int = 0):
    """Yield phantoms 0..n-1 of data set `seed`."""
    check_size(size)
    for k in range(n):
        yield make(seed, k, size)


def _write_one(job):
    out, name, seed, k, size, reports = job
    ph = make(seed, k, size)
    Image.fromarray(ph.image).save(out / name)
    more = np.random.default_rng([seed, k, 1])  # the further reports of one study: a stream of their own
    texts = [ph.report] + [write_report(ph.labels, more) for _ in range(reports - 1)]
    return [(name, text, json.dumps(ph.labels)) for text in texts]


def write_dataset(out: Path, n: int, size: int = 256, seed: int = 0, workers: int = 1, reports: int = 1):
    """PNGs in out/images and out/reports.csv (image relative to the CSV, report, labels as JSON), with
    `reports` rows per image, each its own wording of the same labels (as if several radiologists read
    the study; the first is make()'s). Byte-identical for given arguments, whatever the number of workers."""
    check_size(size)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(n - 1)))
    jobs = [(out, f"images/{k:0{width}d}.png", seed, k, size, reports) for k in range(n)]
    with open(out / "reports.csv", "w", newline="") as f, \
            (multiprocessing.Pool(workers) if workers > 1 else contextlib.nullcontext()) as pool:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["image", "report", "labels"])
        done = pool.imap(_write_one, jobs, chunksize=8) if pool else map(_write_one, jobs)
        for rows in tqdm(done, total=n, desc="phantoms"):  # one image's rows, in order
            writer.writerows(rows)


GRID = [("normal", {}), ("normal (another patient)", {}),
        ("small left effusion", {"pleural_effusion": {"side": "left", "size": "small"}}),
        ("large right effusion", {"pleural_effusion": {"side": "right", "size": "large"}}),
        ("large right pneumothorax", {"pneumothorax": {"side": "right", "size": "large"}}),
        ("small left pneumothorax", {"pneumothorax": {"side": "left", "size": "small"}}),
        ("cardiomegaly", {"cardiomegaly": {}}),
        ("consolidation, right lower", {"consolidation": {"zone": "right lower"}}),
        ("edema", {"edema": {}}),
        ("ETT, central line, pacemaker", {"support_devices": {"devices": list(DEVICES)}}),
        ("large nodule, left upper", {"nodule": {"zone": "left upper", "size": "large"}}),
        ("cardiomegaly + bilat. effusions", {"pleural_effusion": {"side": "bilateral", "size": "moderate"},
                                             "cardiomegaly": {}})]


def write_grid(path: Path, size: int = 256, seed: int = 0, cols: int = 4):
    """A labelled picture of normal phantoms and one of each finding (the README's figure)."""
    check_size(size)
    font, pad = ImageFont.load_default(), 18
    rows = -(-len(GRID) // cols)
    sheet = Image.new("L", (cols * size, rows * (size + pad) + pad), 255)
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 3), "PA view: the patient's LEFT is on the image's RIGHT", fill=0, font=font)
    for k, (title, labels) in enumerate(GRID):
        x, y = (k % cols) * size, pad + (k // cols) * (size + pad)
        sheet.paste(Image.fromarray(render(labels, size, np.random.default_rng([seed, k]))), (x, y + pad))
        draw.text((x + 4, y + 3), title, fill=0, font=font)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def check_size(size: int):
    if not (isinstance(size, (int, np.integer)) and MIN_SIZE <= size <= MAX_SIZE):
        raise ValueError(f"phantom size must be an integer from {MIN_SIZE} to {MAX_SIZE}, got {size!r}")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m minroentgen.phantom", description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="number of phantoms to write (default 1000)")
    ap.add_argument("--size", type=int, default=256, help=f"image side in pixels, {MIN_SIZE}-{MAX_SIZE} (default 256)")
    ap.add_argument("--out", type=Path, help="output folder: images/*.png and reports.csv")
    ap.add_argument("--seed", type=int, default=0, help="data set seed; same seed, same bytes (default 0)")
    ap.add_argument("--workers", type=int, default=multiprocessing.cpu_count(),
                    help="processes rendering in parallel; does not change the output (default: all cores)")
    ap.add_argument("--reports", type=int, default=1, metavar="K",
                    help="rows per image, each a different report of the same findings (default 1)")
    ap.add_argument("--grid", type=Path, metavar="PATH", help="write the labelled grid of findings to PATH instead")
    a = ap.parse_args(argv)
    try:
        if a.grid:
            write_grid(a.grid, a.size, a.seed)
        elif a.out is None:
            ap.error("give --out DIR (or --grid PATH)")
        elif a.n < 1 or a.seed < 0 or a.workers < 1 or a.reports < 1:
            ap.error("--n, --workers and --reports must be >= 1 and --seed >= 0")
        else:
            write_dataset(a.out, a.n, a.size, a.seed, a.workers, a.reports)
    except ValueError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
