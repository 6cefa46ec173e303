"""The findings drawn into a phantom: one function per label, each changing the maps of `Layers`.

Each gets the pixel grid, the patient, its label's attributes and a random stream of its own (so the patient
stays the same with or without it); sides and zones are in patient coordinates (anatomy.py).
"""
from dataclasses import dataclass

import numpy as np

from .anatomy import SIDE_SIGN, Grid, Patient, lung_level, soft


@dataclass
class Layers:
    """The (size, size) maps a finding may change."""
    levels: dict          # side -> lung_level (read only)
    lungs: dict           # side -> lung-field mask (read only)
    field: np.ndarray     # how much lung air is subtracted from the soft tissue (fluid, pus fill it in)
    aerated: np.ndarray   # where vessel markings show (a pneumothorax rim has none)
    opacity: np.ndarray   # density added by findings
    bones: np.ndarray     # bone and metal density


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
