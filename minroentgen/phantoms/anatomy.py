"""The phantoms' normal anatomy: a patient's proportions, the pixel grid in patient coordinates, the lungs.

Geometry lives in normalised *patient* coordinates (u, v), both about [-1, 1]:
  u: horizontal; u > 0 is the PATIENT'S LEFT, which (radiological convention: the viewer faces
     the patient) is drawn on the IMAGE'S RIGHT. `SIDE_SIGN["left"] == +1` encodes this once.
  v: vertical, top of the image at -1, feet at +1.
phantom.render draws the picture from these pieces; findings.py adds the findings.
"""
from dataclasses import dataclass

import numpy as np

SIDE_SIGN = {"left": +1.0, "right": -1.0}  # patient's left -> image right (u > 0)


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


def branch(r, start, s, angle, length, width, value, depth, segs):
    """Vascular tree: a segment from `start`, then two thinner daughters (recursive, `depth` levels),
    appended to segs as (start, end, width, value). angle 0 points laterally (to side s), < 0 upwards."""
    end = start + length * np.array([s * np.cos(angle), np.sin(angle)])
    segs.append((*start, *end, width, value))
    if depth > 1:
        for da in (-1, 1):
            branch(r, end, s, angle + da * r.uniform(0.25, 0.55), length * r.uniform(0.65, 0.85),
                   width * 0.75, value * 0.8, depth - 1, segs)
