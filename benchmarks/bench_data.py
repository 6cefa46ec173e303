"""Data loading speed: images/s on one core, decoding and preprocessing a chest X-ray file to (3, R, R).

    python benchmarks/bench_data.py                  # MIMIC-sized JPEGs and Open-I-sized PNGs at 512
    python benchmarks/bench_data.py --resolution 256 --no-write

Synthesizes X-ray-like 8-bit grayscale files (smooth anatomy-like shading plus noise): JPEGs of
MIMIC-CXR-JPG's most common size, 2544x3056, quality 95, about 1.5 MB as the real ones average (570 GB for
377,110 files), and PNGs of the most common DICOM size of Open-I's images, 2320x2828 (about 3 MB). Times
`minroentgen.data.load_image` before issue 25 (centre crop, decoded at full size, resized in float32: kept
below as `load_image_before`) and now (JPEG draft decoding, 8-bit resizing after an integer reduction; pad and
centre), alternating, in this one process on one thread, per CPU second: one DataLoader worker's rate.
Prints the better of two medians of --repeats runs and appends the table to benchmarks/RESULTS.md.
"""
import argparse
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import write_results  # noqa: E402

from minroentgen.dataset import load_image  # noqa: E402


def load_image_before(path, resolution: int) -> torch.Tensor:
    """load_image as it was before issue 25 (commit fcd153f), for the comparison."""
    with Image.open(path) as img:
        if img.mode.startswith("I"):
            gray = np.asarray(img, dtype=np.float32) / 65535
        else:
            gray = np.asarray(img.convert("L"), dtype=np.float32) / 255
    h, w = gray.shape
    side = min(h, w)
    left, top = (w - side) // 2, (h - side) // 2
    square = Image.fromarray(gray).resize((resolution, resolution), Image.Resampling.BICUBIC,
                                          box=(left, top, left + side, top + side))
    x = torch.from_numpy(np.array(square)) * 2 - 1
    return x.clamp(-1, 1).expand(3, -1, -1).contiguous()


def film(width: int, height: int, seed: int) -> np.ndarray:
    """An X-ray-like 8-bit image: bright mediastinum and ribs-like bands over dark lungs, plus noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    body = 90 + 80 * np.exp(-(((x - width / 2) / (0.12 * width)) ** 2))  # the mediastinum
    ribs = 25 * np.sin(y / (0.03 * height) + 0.4 * np.sin(x / (0.1 * width))) ** 2
    noise = rng.normal(0, 2, (height, width))  # a 2544x3056 JPEG of about 1.5 MB
    return np.clip(body + ribs + noise, 0, 255).astype(np.uint8)


def rate(fn, paths, resolution, repeats) -> float:
    """Median images per CPU second of this process (so other jobs on the machine count less) over
    `repeats` passes through all files."""
    times = []
    for _ in range(repeats):
        t = time.process_time()
        for p in paths:
            fn(p, resolution)
        times.append(time.process_time() - t)
    return len(paths) / statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=512, help="output side (default 512)")
    p.add_argument("--files", type=int, default=6, help="files of each kind (default 6)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes; the median is shown (default 3)")
    p.add_argument("--no-write", action="store_true", help="print only, do not append to RESULTS.md")
    args = p.parse_args()
    if min(args.resolution, args.files, args.repeats) < 1:
        p.error("--resolution, --files and --repeats must be at least 1")
    torch.set_num_threads(1)
    R = args.resolution
    with tempfile.TemporaryDirectory() as tmp:
        kinds = {}
        for name, (w, h), fmt in (("MIMIC-CXR-JPG JPEG 2544x3056", (2544, 3056), "jpg"),
                                  ("Open-I-sized PNG 2320x2828", (2320, 2828), "png")):
            kinds[name] = [Path(tmp) / f"{fmt}{i}.{fmt}" for i in range(args.files)]
            for i, path in enumerate(kinds[name]):
                Image.fromarray(film(w, h, i)).save(path, quality=95)
        rows = []
        for name, paths in kinds.items():
            load_image_before(paths[0], R), load_image(paths[0], R)  # warm up
            runs = {"before": [], "pad": [], "center": []}
            for _ in range(2):  # alternate, so a busy machine slows all alike
                runs["before"].append(rate(load_image_before, paths, R, args.repeats))
                runs["pad"].append(rate(lambda f, r: load_image(f, r, "pad"), paths, R, args.repeats))
                runs["center"].append(rate(lambda f, r: load_image(f, r, "center"), paths, R, args.repeats))
            best = {k: max(v) for k, v in runs.items()}  # the run least disturbed by other jobs
            rows.append((f"{name} -> {R}", f"{best['before']:.1f} img/s", f"{best['pad']:.1f} img/s",
                         f"{best['center']:.1f} img/s", f"{best['pad'] / best['before']:.2f}x"))
    import PIL
    title = (f"Data loading, one core (1 thread), Pillow {PIL.__version__}, torch {torch.__version__} "
             f"({date.today()})")
    write_results(title, rows, ("file -> resolution", "before (centre crop, full decode, float resize)",
                                "now, --crop pad (default)", "now, --crop center", "speed-up (pad / before)"),
                  save=not args.no_write)


if __name__ == "__main__":
    main()
