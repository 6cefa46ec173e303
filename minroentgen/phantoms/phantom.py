"""Procedural frontal (PA) chest radiograph phantoms with radiology-style reports and labels.

Offline stand-in for MIMIC-CXR: image-report pairs whose labels say exactly which findings are
shown and where, so a text-to-image model can be trained and checked on a CPU. Not part of the model.

Geometry lives in normalised *patient* coordinates (u, v) (anatomy.py: u > 0 is the patient's
left, drawn on the image's right); the findings are drawn by findings.py. The picture is a density
map D (soft tissue ~1, aerated lung ~0.3, bone and metal more) turned into brightness like film:
1 - exp(-k D). Bright = dense (bone, heart, fluid); dark = air.

    python -m minroentgen.phantoms --n 10000 --size 256 --out data/phantoms --seed 0
    python -m minroentgen.phantoms --n 10000 --out data/phantoms_mixed --reports 2 --style mixed
    python -m minroentgen.phantoms --grid docs/phantoms.png
    python -m minroentgen.phantoms --n 10000 --out data/phantoms_v2 --demographics  # + age, sex, race
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

from . import demographics as DG
from .anatomy import SIDE_SIGN, Grid, branch, dome, lung_level, sample_patient, soft
from .findings import FIND, Layers
from .reports import STYLES, write_report

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


# ----------------------------------------------------------------------------- rendering

def render(labels: dict, size: int = 256, rng: np.random.Generator | None = None,
           person: DG.Person | None = None) -> np.ndarray:
    """Render one PA radiograph showing exactly `labels`; (size, size) uint8.
    The anatomy comes from `rng` alone, so the same seed with other labels is the same patient.
    `person` (demographics.py) adds the signs of age and sex; None draws the picture as ever."""
    check_size(size)
    rng = np.random.default_rng() if rng is None else rng
    p = sample_patient(rng)
    if person is not None:
        p = DG.aged_heart(p, person)
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
    if person is None:
        knob = 0.06 * np.exp(-(((v + 0.33) / 0.08) ** 2))  # aortic knob, on the patient's left
        mediastinum = soft(u + 0.1, 0.02) * soft(0.11 + knob - u, 0.02)
    else:  # the aorta unfolds with age
        knob = DG.aortic_knob(v, person)
        mediastinum = soft(u + 0.1 + DG.ascending_aorta(v, person), 0.02) * soft(0.11 + knob - u, 0.02)
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
    if person is not None:
        D += DG.breast_shadows(g, p, person) * body

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
    if person is not None:
        bones *= DG.bone_density(person)  # osteopenia with age (devices, added later, keep theirs)

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


# ----------------------------------------------------------------------------- data set

@dataclass
class Phantom:
    image: np.ndarray  # (size, size) uint8
    report: str
    labels: dict
    person: DG.Person | None = None  # age, sex and race, with demographics=True


def make(seed: int, index: int, size: int = 256, style: str = "classic",
         demographics: bool = False) -> Phantom:
    """Phantom number `index` of data set `seed`: independent of every other index; its labels and
    image do not depend on the report `style` (reports.STYLES). demographics=True gives the patient
    an age, sex and race (demographics.py) from a fourth stream: the same labels, report and
    anatomy as without, plus the signs of age and sex."""
    streams = np.random.SeedSequence([seed, index]).spawn(4 if demographics else 3)
    r_labels, r_image, r_report = (np.random.default_rng(s) for s in streams[:3])
    labels = sample_labels(r_labels)
    person = DG.sample_person(np.random.default_rng(streams[3])) if demographics else None
    return Phantom(render(labels, size, r_image, person), write_report(labels, r_report, style), labels,
                   person)


def generate(n: int, size: int = 256, seed: int = 0):
    """Yield phantoms 0..n-1 of data set `seed`."""
    check_size(size)
    for k in range(n):
        yield make(seed, k, size)


def _write_one(job):
    out, name, seed, k, size, reports, style, demographics = job
    ph = make(seed, k, size, style, demographics)
    Image.fromarray(ph.image).save(out / name)
    more = np.random.default_rng([seed, k, 1])  # the further reports of one study: a stream of their own
    texts = [ph.report] + [write_report(ph.labels, more, style) for _ in range(reports - 1)]
    person = list(ph.person.fields().values()) if demographics else []
    return [(name, text, json.dumps(ph.labels), *person) for text in texts]


def write_dataset(out: Path, n: int, size: int = 256, seed: int = 0, workers: int = 1,
                  reports: int = 1, style: str = "classic", demographics: bool = False):
    """PNGs in out/images and out/reports.csv (image relative to the CSV, report, labels as JSON), with
    `reports` rows per image, each its own wording of the same labels (as if several radiologists read
    the study; the first is make()'s) in the report `style` (reports.write_report; images and
    labels do not depend on it). demographics=True: patients with an age, sex and race (make()),
    written as the further columns age, sex, race (what `train.py --prompt-template` fills in).
    Byte-identical for given arguments, whatever the number of workers."""
    check_size(size)
    if style not in STYLES:
        raise ValueError(f"report style must be one of {STYLES}, got {style!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    if (out / "reports.csv").exists():
        raise ValueError(f"{out} already holds a data set (reports.csv); give a new --out, or delete it first")
    (out / "images").mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(n - 1)))
    jobs = [(out, f"images/{k:0{width}d}.png", seed, k, size, reports, style, demographics)
            for k in range(n)]
    with open(out / "reports.csv", "w", newline="") as f, \
            (multiprocessing.Pool(workers) if workers > 1 else contextlib.nullcontext()) as pool:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["image", "report", "labels"] + ["age", "sex", "race"] * demographics)
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
    ap = argparse.ArgumentParser(prog="python -m minroentgen.phantoms", description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="number of phantoms to write (default 1000)")
    ap.add_argument("--size", type=int, default=256, help=f"image side in pixels, {MIN_SIZE}-{MAX_SIZE} (default 256)")
    ap.add_argument("--out", type=Path, help="output folder: images/*.png and reports.csv")
    ap.add_argument("--seed", type=int, default=0, help="data set seed; same seed, same bytes (default 0)")
    ap.add_argument("--workers", type=int, default=multiprocessing.cpu_count(),
                    help="processes rendering in parallel; does not change the output (default: all cores)")
    ap.add_argument("--reports", type=int, default=1, metavar="K",
                    help="rows per image, each a different report of the same findings (default 1)")
    ap.add_argument("--style", choices=STYLES, default="classic",
                    help="the reports' wording: classic = the phrasing of every data set written "
                         "before issue 30 (the same bytes as before); clinical = only real "
                         "radiologists' constructions (negation lists, numbered impressions, "
                         "synonyms such as 'airspace disease', 'AICD', 'PICC', XXXX "
                         "de-identification tokens, hedges, comparisons, lower/upper case); "
                         "mixed = each report either, with probability 1/2. Images and labels are "
                         "the same for every style (default classic)")
    ap.add_argument("--demographics", action="store_true",
                    help="give each patient an age (20-90), a sex and a race (demographics.py): "
                         "breast shadows for women; with age an unfolded aorta, less dense bones and "
                         "a larger heart within the normal range; race is NOT visible. Written as "
                         "the columns age, sex, race (for train.py --prompt-template); labels, "
                         "reports and anatomy stay those of the same seed without it. With --grid: "
                         "a grid of ages and sexes instead")
    ap.add_argument("--grid", type=Path, metavar="PATH", help="write the labelled grid of findings to PATH instead")
    a = ap.parse_args(argv)
    try:
        if a.grid and a.demographics:
            DG.write_grid(a.grid, a.size, a.seed)
        elif a.grid:
            write_grid(a.grid, a.size, a.seed)
        elif a.out is None:
            ap.error("give --out DIR (or --grid PATH)")
        elif a.n < 1 or a.seed < 0 or a.workers < 1 or a.reports < 1:
            ap.error("--n, --workers and --reports must be >= 1 and --seed >= 0")
        else:
            write_dataset(a.out, a.n, a.size, a.seed, a.workers, a.reports, a.style, a.demographics)
    except ValueError as e:
        sys.exit(f"{ap.prog}: error: {e}")


if __name__ == "__main__":
    main()
