"""Image-report pairs (data.py) -> training examples: `ImageReportDataset`.

RoentGen (Chambon et al. 2022, Sec. "Data") trains at 512x512 with the impression cut to CLIP's 77
tokens. Each image goes (with `template=`, the prompt is the report with the patient's fields in
front, as RoentGen-v2's; see prompts.py):
  image -> grayscale -> square (zero-padded, or centre-cropped) -> bicubic resize to (R, R)
  -> [-1, 1] -> 3 equal channels.

Choices where the paper is silent:
  - Reports are kept whole: the tokenizer cuts a report past 75 tokens (77 with start and end) at
    the 75th token, inside a word if it falls there, as transformers' CLIPTokenizer does with
    truncation=True (RoentGen-v2's training) and as sample.py does. So an impression given to
    sample.py is exactly what training saw. `ImageReportDataset` counts such reports.
  - Square: zero-padding (RoentGen-v2) by default, so chest walls, apices and costophrenic angles
    are all kept; crop="center" cuts the long side to the short one (a median 18% of Open-I frontal
    images).
  - Colour images (RGB, RGBA, LA, palette) are converted to luminance, alpha dropped: X-rays are
    gray.
  - 16-bit PNGs (Pillow mode I;16 or I) are divided by 2^b - 1, b the fewest bits (at least 8) that
    hold the image's largest value: 12-bit DICOM data in a 16-bit PNG by 4095, full 16-bit by 65535.
    Dividing 12-bit data by 65535 would leave it almost black.
  - Speed (benchmarks/bench_data.py): JPEGs are decoded at reduced size (Pillow's draft mode:
    libjpeg's DCT scaling by 1/2, 1/4 or 1/8, keeping both sides at least R; a 2544x3056 MIMIC image
    decodes at 636x764 for R = 512), and a large reduction starts with an integer box reduction
    (Pillow's reducing_gap=2: bicubic for the last factor of 2 or more; a mean difference of 0.05
    gray levels).
  - Bad pairs are counted and skipped; `ImageReportDataset.summary()` is the one line to print.
"""
import os
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import prompts as P
from .data import Pair
from .report_text import REPORTS_HINT

CROPS = ("pad", "center")
BICUBIC = Image.Resampling.BICUBIC


def load_image(path, resolution: int, crop: str = "pad") -> torch.Tensor:
    """An image file -> (3, R, R) float32 in [-1, 1]: grayscale (16-bit: divided by its bit depth's
    maximum, see the module docstring; 8-bit by 255), made square by zero-padding the short side
    (crop="pad") or cutting the long one (crop="center"), bicubic resize (antialiased when
    shrinking), the gray channel copied 3 times. JPEGs are decoded at a reduced size that stays
    >= R."""
    if crop not in CROPS:
        raise ValueError(f"crop={crop!r}: use 'pad' (zero-pad to square, RoentGen-v2) or 'center'")
    with Image.open(path) as img:
        # JPEG only (a no-op otherwise): DCT-domain downscaling
        img.draft("L", (resolution, resolution))
        # 16-bit PNG: I;16 (or I in older Pillow); never through "L", which clips
        if img.mode.startswith("I"):
            a = np.asarray(img)
            top = 2 ** max(8, int(a.max()).bit_length()) - 1  # 12-bit data: 4095
            gray, scale = Image.fromarray(a.astype(np.float32) / top), 1.0
        else:  # L, RGB, RGBA, LA, P, 1: luminance, alpha dropped; resized as 8 bits
            gray, scale = img.convert("L"), 1 / 255
    w, h = gray.size
    if crop == "center":
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        square = gray.resize((resolution, resolution), BICUBIC,
                             box=(left, top, left + side, top + side),
                             reducing_gap=2.0)  # crop, then resize
    else:  # resize the long side to R, then pad: the same as padding first, without the padded
           # pixels' cost
        side = max(w, h)
        size = (max(1, round(w * resolution / side)), max(1, round(h * resolution / side)))
        square = Image.new(gray.mode, (resolution, resolution), 0)
        square.paste(gray.resize(size, BICUBIC, reducing_gap=2.0), ((resolution - size[0]) // 2,
                                                                    (resolution - size[1]) // 2))
    x = torch.from_numpy(np.array(square, dtype=np.float32)) * (2 * scale) - 1  # (R, R)
    return x.clamp(-1, 1).expand(3, -1, -1).contiguous()  # (3, R, R); bicubic can overshoot,
                                                          # hence the clamp


def pair_problem(pair: Pair, needs_report: bool = True) -> str | None:
    """Why a pair cannot be used, or None. Opens only the image's header (cheap)."""
    if needs_report and pair.report is None:
        return "missing report"
    if needs_report and not pair.report.strip():
        return "empty report"
    if not pair.image.is_file():
        return "missing image"
    if pair.image.stat().st_size == 0:
        return "zero-byte image"
    try:
        with Image.open(pair.image):
            return None
    except Exception:  # Pillow raises many types for a file that is not an image
        return "unreadable image"


def default_workers() -> int:
    """DataLoader workers for one training process: the CPU cores it may use, shared among the
    training processes of this machine (torchrun's LOCAL_WORLD_SIZE), minus one for the process
    itself."""
    cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else os.cpu_count() or 1)
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1)


class ImageReportDataset(torch.utils.data.Dataset):
    """Checked pairs -> {"pixel_values": (3, R, R) in [-1, 1], "report": str}.

    Every pair is checked up front (`pair_problem`): bad ones are skipped and counted in `skipped`
    (reason -> image paths), or with strict=True the first one stops the run. With a tokenizer
    (anything with `num_tokens(text)` and `max_length`, e.g. `CLIPTokenizer.default()`), reports
    longer than max_length - 2 tokens are counted (`num_truncated` pairs, `num_truncated_reports`
    distinct texts) and kept whole: the tokenizer cuts them. `summary()` is the one line a training
    script prints. An image whose header reads but whose pixels do not (a truncated file) is found
    only when loaded: it is named in a warning and the next pair stands in (strict=True: an error).
    needs_report=False keeps images without a report (the VAE reads none). `skip_pixels`, when set
    to a bool tensor over the pairs (shared memory, so DataLoader workers see it), marks images not
    to decode: their latents are cached; their pixel_values are zeros. template: a prompt template
    over the pairs' fields and {report} (prompts.py; e.g. RoentGen-v2's
    "{age} year old {race} {sex}. {report}"): each kept pair's report becomes its filled prompt,
    and a pair missing a field the template needs is skipped as "missing <field>"."""

    def __init__(self, pairs, resolution: int, tokenizer=None, strict: bool = False,
                 needs_report: bool = True, crop: str = "pad", template: str | None = None):
        if resolution <= 0 or resolution % 8:
            raise ValueError(f"resolution={resolution}: use a positive multiple of 8 "
                             "(SD's VAE downsamples by 8), e.g. 512")
        if crop not in CROPS:
            raise ValueError(f"crop={crop!r}: use 'pad' (zero-pad to square, RoentGen-v2) "
                             "or 'center'")
        pairs = list(pairs)
        self.resolution, self.strict, self.crop, self.num_read = (
            resolution, strict, crop, len(pairs))
        self.template, needed = template, []
        if template is not None and pairs:
            available = dict.fromkeys(name for p in pairs for name in (p.fields or {}))
            needed = [n for n in P.check_template(template, available) if n != "report"]
        self.skip_pixels = None
        self.skipped: dict[str, list[Path]] = {}
        self.pairs = []
        for n, pair in enumerate(pairs, start=1):
            problem = pair_problem(pair, needs_report)
            if not problem and template is not None:
                fields = pair.fields or {}
                if missing := [name for name in needed if fields.get(name) is None]:
                    problem = f"missing {' and '.join(missing)}"
                else:
                    pair = replace(pair, report=P.fill(template, {**fields, "report": pair.report}))
            if problem and strict:
                raise ValueError(f"pair {n} of {len(pairs)}: {problem} {pair.image} (strict: fix "
                                 "or remove it, or run without --strict to skip bad pairs)")
            if problem:
                self.skipped.setdefault(problem, []).append(pair.image)
            else:
                self.pairs.append(pair)
        if not self.pairs:
            raise ValueError(f"no usable image-report pair among the {len(pairs)} read: "
                             f"{self._skipped_text()}")
        self.num_truncated = self.num_truncated_reports = self.max_tokens = None
        if tokenizer is not None:
            self.max_tokens = tokenizer.max_length - 2
            reports = {p.report or "" for p in self.pairs}  # a study's images share one
            long = {text for text in reports if tokenizer.num_tokens(text) > self.max_tokens}
            self.num_truncated = sum((p.report or "") in long for p in self.pairs)
            self.num_truncated_reports = len(long)

    def _skipped_text(self) -> str:
        if not self.skipped:
            return "none skipped"
        parts = [f"{len(paths)} {reason} ({', '.join(str(p) for p in paths[:3])}"
                 f"{', ...' if len(paths) > 3 else ''})"
                 for reason, paths in self.skipped.items()]
        hint = f" ({REPORTS_HINT})" if "missing report" in self.skipped else ""
        return f"skipped {sum(map(len, self.skipped.values()))}: " + "; ".join(parts) + hint

    def summary(self) -> str:
        """One line: pairs kept, pairs skipped by reason with the first few named, reports
        truncated."""
        truncated = ("reports not checked for length (no tokenizer)"
                     if self.num_truncated is None else
                     f"{self.num_truncated_reports} reports ({self.num_truncated} pairs) longer "
                     f"than {self.max_tokens} tokens, cut there by the tokenizer")
        return (f"{len(self.pairs)} of {self.num_read} image-report pairs used; "
                f"{self._skipped_text()}; {truncated}")

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        if self.skip_pixels is not None and self.skip_pixels[i]:
            zeros = torch.zeros(3, self.resolution, self.resolution)
            return {"pixel_values": zeros, "report": self.pairs[i].report or ""}
        # a pair that fails to decode gives way to the next one
        for j in range(i, i + len(self.pairs)):
            pair = self.pairs[j % len(self.pairs)]
            try:
                return {"pixel_values": load_image(pair.image, self.resolution, self.crop),
                        "report": pair.report or ""}
            except (OSError, SyntaxError) as e:  # what Pillow raises for a damaged file
                message = (f"cannot decode {pair.image}: "
                           f"{' '.join(str(e).split()) or type(e).__name__}")
                if self.strict:
                    raise ValueError(f"{message} (strict: fix or remove it)") from None
                warnings.warn(f"{message}; using the next pair instead", stacklevel=2)
        raise ValueError("no image of the dataset decodes: check the image files")
