"""FID and MS-SSIM diversity of a user's own image folders: real X-rays against generated ones.

RoentGen's image metrics (Chambon et al. 2022) on any two folders of PNG/JPEG images, through
`metrics.py`:

  - FID between the folders. Features: the phantom reader's (`reader.features`, 512-d, at its
    128x128 input, as `phantoms/judge.py` uses them), or with `xrv` the penultimate features
    (1024-d) of torchxrayvision's DenseNet-121 `densenet121-res224-all`, the extractor of
    RoentGen's evaluation. Its input is torchxrayvision's own recipe: gray levels scaled to
    [-1024, 1024] (2048 * x / 255 - 1024 for 8 bits), a centre crop to a square, a resize to
    224x224 as its `XRayResizer` does it (scikit-image: Gaussian anti-aliasing when shrinking,
    bilinear, zero outside the image, clipped to the input's range), then `DenseNet.features2`
    (ReLU and global average pool after the last dense block).
  - MS-SSIM diversity as RoentGen's evaluation computes it: per prompt 4 generated images, the
    mean MS-SSIM of their 6 pairs (grayscale, data range 1, at the images' own size; torchmetrics'
    defaults, exactly so from 176 px, where all 5 scales fit), then the mean over prompts; lower is
    more diverse. Prompts come from the generated folder (`fake_images`).

Images: 8-bit gray, RGB(A) or palette (to luminance) or 16-bit gray (divided by 2^b - 1, b the
fewest bits, at least 8, that hold the image's largest value, as `dataset.py` reads them for
training), any size; every image goes to [0, 1]. torchxrayvision is not a dependency: it is
imported only for `xrv`.
"""
import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from .metrics import fid, mean_pairwise_ms_ssim

SUFFIXES = (".png", ".jpg", ".jpeg")
PER_PROMPT = 4  # RoentGen: 4 images a prompt, 6 pairs
XRV_WEIGHTS = "densenet121-res224-all"
XRV_SIZE = 224
# sample.py's names: <slug>_seed<S>_img<I>.png, _v2, _v3 ... when taken; its grids grid_<...>.png
SAMPLE_NAME = re.compile(
    r"(?P<prompt>[a-z0-9-]+)_seed(?P<seed>\d+)_img(?P<img>\d+)(?:_v(?P<v>\d+))?")
GRID_NAME = re.compile(r"grid_[a-z0-9-]+_seed\d+(?:_v\d+)?")


class FolderError(ValueError):
    """Bad input: a one-line message for the command line."""


# ----------------------------------------------------------------------------- reading

def list_images(folder, flag: str = "folder") -> list:
    """The PNG/JPEG files under `folder` (subfolders too), sorted by path; hidden ones (macOS's
    ._name.png companions, which are not images) left out. Raises FolderError if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FolderError(f"{flag} {folder} {'is a file' if folder.exists() else 'does not exist'}"
                          "; give a folder of images")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not paths:
        raise FolderError(f"{flag} {folder} holds no PNG or JPEG images")
    return paths


def read_gray(path) -> np.ndarray:
    """An image file -> (H, W) float64 in [0, 1] (the module docstring's rules)."""
    try:
        with Image.open(path) as img:
            if img.mode.startswith("I"):  # 16-bit PNG: I;16 (I in older Pillow); not via "L"
                a = np.asarray(img).astype(np.float64)
                if a.min() < 0:
                    raise ValueError(f"negative gray levels in mode {img.mode}")
                return a / (2 ** max(8, int(a.max()).bit_length()) - 1)  # 12-bit data: 4095
            return np.asarray(img.convert("L"), dtype=np.float64) / 255
    except Exception as e:  # Pillow raises many types for a file that is not an image
        raise FolderError(f"cannot read image {path} ({type(e).__name__}: {e})") from None


def center_crop(x: torch.Tensor) -> torch.Tensor:
    """(..., H, W) -> (..., S, S), S = min(H, W), cut as torchxrayvision's XRayCenterCrop cuts:
    from H // 2 - S // 2 and W // 2 - S // 2."""
    h, w = x.shape[-2:]
    s = min(h, w)
    top, left = h // 2 - s // 2, w // 2 - s // 2
    return x[..., top:top + s, left:left + s]


def _resize_matrix(n: int, size: int) -> torch.Tensor:
    """(size, n) float64: one axis of skimage's resize as a matrix. Output pixel centres fall on
    (o + 0.5) * n / size - 0.5, read by linear interpolation from the input, first blurred by a
    Gaussian of sigma (n / size - 1) / 2 if the axis shrinks (scipy.ndimage.gaussian_filter: radius
    int(4 sigma + 0.5)); pixels beyond the edge are 0 (mode constant; scipy's grid-constant)."""
    c = (torch.arange(size, dtype=torch.float64) + 0.5) * (n / size) - 0.5
    i0 = c.floor()
    w = (c - i0)[:, None]
    j = torch.arange(n, dtype=torch.float64)[None]  # (1, n)
    if n > size:
        sigma = (n / size - 1) / 2
        r = int(4.0 * sigma + 0.5)
        norm = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float64) / sigma) ** 2).sum()

        def tap(i):  # row of the blurred pixel i; shrinking, every i lies inside the image
            d = j - i[:, None]
            return torch.exp(-0.5 * (d / sigma) ** 2) / norm * (d.abs() <= r)
    else:
        def tap(i):
            return (j == i[:, None]).double()
    return (1 - w) * tap(i0) + w * tap(i0 + 1)


def resize_like_skimage(x: torch.Tensor, size: int) -> torch.Tensor:
    """(H, W) float64 -> (size, size) as skimage.transform.resize(x, (size, size), mode="constant",
    preserve_range=True), torchxrayvision's XRayResizer: Gaussian anti-aliasing on each shrinking
    axis, bilinear, zero outside the image (`_resize_matrix`, one matrix per axis), the result
    clipped to the input's range (skimage's clip=True; its widening of the range to the zero
    outside never applies here: every output pixel gives the image itself a weight over 1/4)."""
    h, w = x.shape
    y = _resize_matrix(h, size) @ x.double() @ _resize_matrix(w, size).T
    return y.clamp(x.min(), x.max())


# ----------------------------------------------------------------------------- features

@dataclass
class Extractor:
    """How one feature extractor sees an image: `prepare` takes (H, W) float64 in [0, 1] to a fixed
    (1, S, S) input, `features` a batch of them (B, 1, S, S) to (B, D)."""
    name: str
    description: str
    prepare: Callable
    features: Callable


def reader_extractor(reader, device="cpu") -> Extractor:
    """The phantom reader's 512 features at its 128x128 input: centre crop, then area averaging
    down or bilinear up (`phantoms.judge.resize`)."""
    from .phantoms.reader import SIZE
    reader = reader.to(device).eval()

    def prepare(img):
        x = center_crop(torch.from_numpy(img))[None, None]
        side = x.shape[-1]
        if side != SIZE:
            x = F.interpolate(x, size=(SIZE, SIZE), mode="area" if side > SIZE else "bilinear")
        return x[0].float()

    def features(x):
        return reader.features(x.to(device))
    return Extractor("reader", "phantom reader (512-d, 128x128)", prepare, features)


def xrv_densenet(weights=XRV_WEIGHTS):
    """torchxrayvision's DenseNet-121 in eval mode; weights=None gives its random initialisation
    (tests). Raises FolderError when the package or the weights cannot be had."""
    try:
        import torchxrayvision as xrv
    except ModuleNotFoundError as e:
        if e.name != "torchxrayvision":
            raise FolderError(f"torchxrayvision needs {e.name}, missing here ({e}); "
                              f"pip install torchxrayvision brings it") from None
        raise FolderError("--features xrv needs torchxrayvision: pip install torchxrayvision "
                          f"(its {XRV_WEIGHTS} weights, ~30 MB, download on first use)") from None
    except Exception as e:  # e.g. a torchvision built for another torch
        raise FolderError(f"torchxrayvision does not import here ({type(e).__name__}: {e}); "
                          "check that torchvision matches torch") from None
    try:
        return xrv.models.DenseNet(weights=weights).eval()
    except Exception as e:
        raise FolderError(f"cannot load torchxrayvision's {weights} weights ({type(e).__name__}: "
                          f"{e}); they download on first use to ~/.torchxrayvision/") from None


def xrv_extractor(model=None, device="cpu") -> Extractor:
    """DenseNet-121 `features2` (1024-d) on torchxrayvision's input: [-1024, 1024], centre crop,
    224x224 (the module docstring). `model`: the network, else `xrv_densenet()`."""
    model = (xrv_densenet() if model is None else model).to(device).eval()
    weights = getattr(model, "weights", None) or "random weights"

    def prepare(img):
        x = torch.from_numpy(img) * 2048 - 1024  # torchxrayvision's normalize: (2 x - 1) * 1024
        return resize_like_skimage(center_crop(x), XRV_SIZE)[None].float()

    def features(x):
        return model.features2(x.to(device))
    return Extractor("xrv", f"torchxrayvision DenseNet-121 {weights} (1024-d, 224x224)",
                     prepare, features)


@torch.no_grad()
def extract(paths, extractor: Extractor, batch: int = 32, desc: str = "features",
            progress: bool = True) -> torch.Tensor:
    """(N, D) float64 features of the image files `paths`, a progress bar over them."""
    out, buf = [], []
    for k, path in enumerate(tqdm(paths, desc=desc, unit="img", disable=not progress)):
        buf.append(extractor.prepare(read_gray(path)))
        if len(buf) == batch or k == len(paths) - 1:
            out.append(extractor.features(torch.stack(buf)).double().cpu())
            buf = []
    return torch.cat(out)


# ----------------------------------------------------------------------------- prompts

@dataclass
class Group:
    prompt: str
    paths: list  # in the order that picks the first PER_PROMPT


def fake_images(folder) -> tuple:
    """(image paths, prompt groups, how grouped) of a folder of generated images.

    FOLDER/reports.csv (generate.py's) present: its `image` column (relative to the CSV) lists the
    images, its `report` column is the prompt; a group's images in the CSV's row order. Otherwise
    every PNG/JPEG under the folder but sample.py's grids (grid_*.png), grouped by sample.py's names
    <prompt>_seed<S>_img<I>[_vK].png by <prompt> (its slug of the prompt: lower case, at most 60
    characters), ordered by S, then I, then K; other names are measured by FID only."""
    folder = Path(folder)
    table = folder / "reports.csv"
    if table.is_file():
        return *_from_table(table), "reports.csv"
    paths = [p for p in list_images(folder, "--fake-dir") if not GRID_NAME.fullmatch(p.stem)]
    if not paths:
        raise FolderError(f"--fake-dir {folder} holds only sample.py grids, no images")
    keyed = {}
    for p in paths:
        m = SAMPLE_NAME.fullmatch(p.stem)
        if m:
            order = (int(m["seed"]), int(m["img"]), int(m["v"] or 1), str(p))
            keyed.setdefault(m["prompt"], []).append((order, p))
    groups = [Group(k, [p for _, p in sorted(v)]) for k, v in keyed.items()]
    return paths, groups, "sample.py names"


def _from_table(table: Path) -> tuple:
    try:
        with open(table, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise FolderError(f"cannot read {table} ({e})") from None
    if not rows or not {"image", "report"} <= set(rows[0]):
        raise FolderError(f"{table} needs the columns image and report (generate.py's), one row "
                          "an image")
    paths, groups = [], {}
    for n, row in enumerate(rows, start=2):  # line 1 is the header
        path = table.parent / (row["image"] or "")
        if not row["image"] or not path.is_file():
            raise FolderError(f"{table} line {n}: no image at {path}")
        paths.append(path)
        groups.setdefault(row["report"], []).append(path)
    return paths, [Group(k, v) for k, v in groups.items()]


def diversity(groups: list, folder, progress: bool = True) -> dict:
    """RoentGen's MS-SSIM diversity: the first PER_PROMPT images of each group with that many, the
    mean MS-SSIM of their 6 pairs, then the mean and standard deviation (population) over the
    groups. Groups with fewer images are counted, not used."""
    used = [g for g in groups if len(g.paths) >= PER_PROMPT]
    rows = []
    for g in tqdm(used, desc="MS-SSIM", unit="prompt", disable=not progress):
        imgs = [read_gray(p) for p in g.paths[:PER_PROMPT]]
        if len({a.shape for a in imgs}) > 1:
            raise FolderError(f"prompt {g.prompt!r}: its images differ in size "
                              f"({', '.join(f'{a.shape[1]}x{a.shape[0]}' for a in imgs)}); "
                              "MS-SSIM compares images of one size")
        try:
            score = mean_pairwise_ms_ssim(torch.from_numpy(np.stack(imgs))[:, None],
                                          as_published=True)
        except ValueError as e:
            raise FolderError(f"prompt {g.prompt!r}: {e}") from None
        rows.append({"prompt": g.prompt, "ms_ssim": score,
                     "images": [str(p.relative_to(folder)) for p in g.paths[:PER_PROMPT]]})
    scores = [r["ms_ssim"] for r in rows]
    return {"mean": float(np.mean(scores)) if rows else None,
            "std": float(np.std(scores)) if rows else None,
            "groups_used": len(rows), "groups_skipped": len(groups) - len(rows),
            "per_prompt": PER_PROMPT, "prompts": rows}


# ----------------------------------------------------------------------------- the whole

def evaluate(real_dir, fake_dir, make_extractor: Callable, progress: bool = True) -> dict:
    """FID of the two folders and the generated folder's MS-SSIM diversity. `make_extractor()`
    gives the Extractor once the folders are found good (xrv may download its weights)."""
    real = list_images(real_dir, "--real-dir")
    fake, groups, grouping = fake_images(fake_dir)
    for flag, folder, paths in (("--real-dir", real_dir, real), ("--fake-dir", fake_dir, fake)):
        if len(paths) < 2:
            raise FolderError(f"FID needs at least 2 images; {flag} {folder} holds {len(paths)}")
    extractor = make_extractor()
    f_real = extract(real, extractor, desc=f"features {Path(real_dir).name}", progress=progress)
    f_fake = extract(fake, extractor, desc=f"features {Path(fake_dir).name}", progress=progress)
    return {"real_dir": str(real_dir), "fake_dir": str(fake_dir), "features": extractor.name,
            "feature_extractor": extractor.description, "n_real": len(real), "n_fake": len(fake),
            "fid": fid(f_real, f_fake), "grouping": grouping,
            "ms_ssim": diversity(groups, Path(fake_dir), progress)}


def table(r: dict) -> str:
    """The result as a markdown table and a note on the grouping."""
    m = r["ms_ssim"]
    ms = "–" if m["mean"] is None else f"{m['mean']:.3f} ± {m['std']:.3f}"
    lines = ["| real | generated | features | n real | n generated | FID | MS-SSIM (± sd over "
             "prompts) | prompts used |", "|" + " --- |" * 8,
             f"| {r['real_dir']} | {r['fake_dir']} | {r['feature_extractor']} | {r['n_real']} | "
             f"{r['n_fake']} | {r['fid']:.2f} | {ms} | {m['groups_used']} |"]
    note = (f"\nMS-SSIM: the first {m['per_prompt']} images of each prompt (grouped by "
            f"{r['grouping']}), mean over their {m['per_prompt'] * (m['per_prompt'] - 1) // 2} "
            "pairs, then over prompts; lower is more diverse.")
    if m["groups_skipped"]:
        note += f" {m['groups_skipped']} prompts with fewer than {m['per_prompt']} images skipped."
    if not m["groups_used"] and not m["groups_skipped"]:
        note = ("\nMS-SSIM: no prompts found: give generate.py's reports.csv or sample.py's names "
                "(<prompt>_seed<S>_img<I>.png) in the generated folder.")
    return "\n".join(lines) + "\n" + note + "\n"
