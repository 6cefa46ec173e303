"""Image-report pairs for fine-tuning: chest X-rays with the impression of their report.

RoentGen (Chambon et al. 2022, Sec. "Data"; Bluethgen et al. 2024) fine-tunes Stable Diffusion on
frontal (PA/AP) MIMIC-CXR radiographs at 512x512, each with the impression section of its report as
the prompt, cut to CLIP's 77 tokens. This module turns three layouts into `Pair(image, report)` lists:

  csv        a .csv or .jsonl file (optionally .gz) with `image` (a path relative to the file) and
             `report` columns; other columns are ignored. `python -m minroentgen.phantoms` writes this format.
  mimic-cxr  a MIMIC-CXR-JPG v2.0.0 folder: files/pXX/pNNNNNNNN/sNNNNNNNN/<dicom_id>.jpg,
             mimic-cxr-2.0.0-metadata.csv[.gz] (ViewPosition) and -split.csv[.gz] (the official split),
             with the reports of MIMIC-CXR (mimic-cxr-reports.zip unpacked into the same folder puts
             them next to the study folders: files/p10/p10000032/s50414267.txt).
  openi      an IU X-ray / Open-I folder: ecgen-radiology/<n>.xml reports and their PNG images
             anywhere below the folder (named after the XML's `parentImage id`).

and `ImageReportDataset` turns the pairs into training examples:
  image -> grayscale -> central square -> bicubic resize to (R, R) -> [-1, 1] -> 3 equal channels.

Choices where the paper is silent:
  - Report text: the impression (fallback: findings, then the last paragraph as MIMIC-CXR's parser
    defines it), with every run of whitespace made one space; a report with none of these is "empty". De-identification marks (MIMIC's `___`, Open-I's `XXXX`) are kept as
    they are: removing them leaves broken sentences ("compared to ___ " -> "compared to"), and CLIP reads
    them as ordinary symbols.
  - A report longer than the tokenizer's 75 tokens (77 with start and end) is cut to its longest run of
    whole words that fits; the tokenizer would cut at the 75th token, sometimes inside a word.
  - Colour images (RGB, RGBA, LA, palette) are converted to luminance, alpha dropped: X-rays are gray.
  - 16-bit PNGs (Pillow mode I;16 or I) are divided by 65535, the full 16-bit range.
  - Bad pairs are counted and skipped; `ImageReportDataset.summary()` is the one line to print.
"""
import csv
import gzip
import json
import re
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

FRONTAL = {"PA", "AP"}
MIMIC_SPLITS = ("train", "validate", "test")


@dataclass(frozen=True)
class Pair:
    image: Path
    report: str


def clean(text: str) -> str:
    """Every run of whitespace (newlines included) -> one space."""
    return " ".join(text.split())


# ----------------------------------------------------------------------------- MIMIC-CXR reports

# A section heading, as MIMIC-CXR's own section parser (MIT-LCP/mimic-cxr, txt/) finds them:
# a line starting with one space, then capitals, then a colon: "\n IMPRESSION: ".
HEADING = re.compile(r"\n ([A-Z ()/,-]+):\s")
# Heading names that count as an impression or as findings besides those containing the word
# (typos included, as the dataset's parser lists them).
IMPRESSION_NAMES = {"conclusion", "conclusions", "impresson", "imprression", "imoression", "impressoin",
                    "imprssion", "impresion", "imperssion", "mpression", "impession"}
FINDINGS_NAMES = {"finding", "findins", "findindgs", "findgings", "findngs", "findnings", "finidngs"}
# Headings that name the view ("CHEST, PA AND LATERAL:", "PORTABLE AP VIEW:") introduce findings.
VIEW_HEADING = re.compile(r"chest|portable|pa and lat|lateral and pa|ap and lateral|lateral and ap|frontal and|"
                          r"two views|frontal view|pa view|ap view|one view|lateral view|bone window|"
                          r"frontal upright|frontal semi-upright|ribs")


def section_kind(heading: str) -> str:
    """Normalised section name: "FINDINGS AND IMPRESSION" -> "impression", "CONCLUSION" -> "impression",
    "CHEST, TWO VIEWS" -> "findings", "CLINICAL HISTORY" -> "history"."""
    name = heading.lower().strip()
    if name in IMPRESSION_NAMES:
        return "impression"
    if name in FINDINGS_NAMES:
        return "findings"
    for kind in ("impression", "findings", "history", "comparison", "addendum"):
        if kind in name:
            return kind
    return "findings" if VIEW_HEADING.search(name) else name


def report_sections(text: str) -> list[tuple[str, str]]:
    """A MIMIC-CXR report -> [(normalised name, text)], starting with the "preamble" before the first
    heading, or [("full report", text)] when there is no heading."""
    m = HEADING.search(text)
    if m is None:
        return [("full report", text)]
    sections = [("preamble", text[: m.start(1)])]
    while m:
        start = m.end()
        line_end = text.find("\n", start)  # look for the next heading after this line only
        following = HEADING.search(text, start if line_end == -1 else line_end)
        sections.append((section_kind(m.group(1)), text[start: following.start() if following else len(text)]))
        m = following
    return sections


def extract_impression(text: str) -> str:
    """The prompt RoentGen trains on: the last non-empty impression, else the last non-empty findings,
    else the last section's text after its first paragraph (paragraphs end at a "\\n \\n" line), else ""."""
    sections = report_sections(text)
    for kind in ("impression", "findings"):
        bodies = [body for name, body in sections if name == kind and body.strip()]
        if bodies:
            return clean(bodies[-1])
    return clean("\n \n".join(sections[-1][1].split("\n \n")[1:]))


# ----------------------------------------------------------------------------- readers

def _open_text(path: Path):
    # utf-8-sig: spreadsheet programs start a CSV with a byte-order mark
    return (gzip.open(path, "rt", newline="", encoding="utf-8-sig") if path.suffix == ".gz"
            else open(path, newline="", encoding="utf-8-sig"))


def _read_csv(path: Path) -> list[dict]:
    with _open_text(path) as f:
        return list(csv.DictReader(f))


def _mimic_table(root: Path, name: str) -> list[dict]:
    for path in (root / name, root / f"{name}.gz"):
        if path.is_file():
            return _read_csv(path)
    raise ValueError(f"{root} lacks {name} (or {name}.gz): copy it from MIMIC-CXR-JPG v2.0.0 into that folder")


def read_mimic(root: Path, split: str) -> list[Pair]:
    """Frontal (ViewPosition PA or AP) images of one official split, each with its study's impression."""
    if split not in MIMIC_SPLITS:
        raise ValueError(f"split={split!r}: MIMIC-CXR's official splits are {', '.join(MIMIC_SPLITS)}")
    split_of = {row["dicom_id"]: row["split"] for row in _mimic_table(root, "mimic-cxr-2.0.0-split.csv")}
    pairs, impressions = [], {}
    for row in _mimic_table(root, "mimic-cxr-2.0.0-metadata.csv"):
        if row["ViewPosition"] not in FRONTAL or split_of.get(row["dicom_id"]) != split:
            continue
        subject = row["subject_id"]
        study = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{row['study_id']}"
        if study not in impressions:  # one report per study, shared by its images
            report = study.with_name(study.name + ".txt")
            impressions[study] = extract_impression(report.read_text()) if report.is_file() else ""
        pairs.append(Pair(study / f"{row['dicom_id']}.jpg", impressions[study]))
    return pairs


def openi_report(xml_path) -> tuple[str, list[str]]:
    """An Open-I report XML -> (IMPRESSION, or FINDINGS when that is missing or empty; the ids of its
    images, i.e. the PNG names without .png)."""
    root = ET.parse(xml_path).getroot()
    sections = {el.get("Label", "").upper(): clean(el.text or "") for el in root.iter("AbstractText")}
    text = sections.get("IMPRESSION") or sections.get("FINDINGS") or ""
    return text, [el.get("id") for el in root.iter("parentImage")]


def read_openi(root: Path, view_table=None) -> list[Pair]:
    """Every (image, report) link of ecgen-radiology/*.xml; with a view table (a CSV with `imageid` and
    `View Position`, like torchxrayvision's nlmcxr_dicom_metadata.csv.gz) only the images it calls PA
    or AP, so images with a blank or unknown view are dropped too."""
    if not (root / "ecgen-radiology").is_dir():
        raise ValueError(f"{root} lacks ecgen-radiology/: unpack NLMCXR_reports.tgz (and the PNGs) into that folder")
    if view_table is None:
        views = None
        warnings.warn("Open-I: no view table given, so every image is used, lateral views included (the "
                      "report XML has no per-image view); pass view_table=nlmcxr_dicom_metadata.csv.gz "
                      "(from torchxrayvision) to keep frontal images only", stacklevel=3)
    else:
        rows = _read_csv(Path(view_table))
        if rows and not {"imageid", "View Position"} <= rows[0].keys():
            raise ValueError(f"{view_table}: a view table needs the columns 'imageid' and 'View Position'")
        views = {row["imageid"]: row["View Position"].strip() for row in rows}
    pngs = {png.stem: png for png in root.rglob("*.png")}
    pairs = []
    for xml_path in sorted((root / "ecgen-radiology").glob("*.xml")):
        text, image_ids = openi_report(xml_path)
        pairs += [Pair(pngs.get(i, root / f"{i}.png"), text)
                  for i in image_ids if views is None or views.get(i) in FRONTAL]
    return pairs


def _json_lines(path: Path, lines) -> list:
    rows = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as e:
            raise ValueError(f"{path} line {n}: not valid JSON ({e.msg}); each line must be one object, "
                             '{"image": "a.png", "report": "..."}') from None
    return rows


def read_rows(path: Path) -> list:
    """The rows of a .csv (dicts) or .jsonl (JSON values) file, optionally .gz."""
    try:
        with _open_text(path) as f:
            return _json_lines(path, f) if ".jsonl" in path.suffixes else list(csv.DictReader(f))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None


def read_table(path: Path) -> list[Pair]:
    """A .csv or .jsonl (optionally .gz) with `image` (relative to the file) and `report` columns."""
    rows = read_rows(path)
    pairs = []
    for n, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or not {"image", "report"} <= row.keys():
            raise ValueError(f"{path}: row {n} lacks an 'image' or 'report' column; the file needs both "
                             "(image: a path relative to the file, report: the text)")
        pairs.append(Pair(path.parent / str(row["image"] or ""), clean(str(row["report"] or ""))))
    return pairs


def infer_dataset(path: Path) -> str:
    """"csv", "mimic-cxr" or "openi" from what the path holds."""
    if path.is_file() and path.name.endswith((".csv", ".jsonl", ".csv.gz", ".jsonl.gz")):
        return "csv"
    if (path / "files").is_dir() and any((path / f"mimic-cxr-2.0.0-metadata.csv{gz}").is_file() for gz in ("", ".gz")):
        return "mimic-cxr"
    if (path / "ecgen-radiology").is_dir():
        return "openi"
    what = "does not exist" if not path.exists() else "is none of the known layouts"
    raise ValueError(f"{path} {what}: expected a .csv/.jsonl file with image and report columns, a MIMIC-CXR-JPG "
                     "folder (files/ and mimic-cxr-2.0.0-metadata.csv[.gz]) or an Open-I folder (ecgen-radiology/)")


def read_pairs(path, dataset=None, split="train", view_table=None) -> list[Pair]:
    """All image-report pairs of a dataset, unchecked (`ImageReportDataset` checks them).
    dataset: "csv", "mimic-cxr", "openi" or None to infer it from the path. split: MIMIC-CXR's official
    split (train, validate, test); a csv file is one split already and Open-I has none, so they ignore it.
    view_table: Open-I only, see `read_openi`."""
    path = Path(path).absolute()  # image paths then do not depend on the working folder
    dataset = dataset or infer_dataset(path)
    if dataset not in ("csv", "mimic-cxr", "openi"):
        raise ValueError(f"dataset={dataset!r}: use 'csv', 'mimic-cxr', 'openi' or None (inferred from the path)")
    if view_table is not None and dataset != "openi":
        raise ValueError(f"view_table is for Open-I only; the {dataset} data says its views itself")
    if dataset == "csv":
        return read_table(path)
    if dataset == "mimic-cxr":
        return read_mimic(path, split)
    return read_openi(path, view_table)


# ----------------------------------------------------------------------------- images

def load_image(path, resolution: int) -> torch.Tensor:
    """An image file -> (3, R, R) float32 in [-1, 1]: grayscale (16-bit divided by 65535, 8-bit by 255),
    central square crop, bicubic resize (antialiased when shrinking), the gray channel copied 3 times."""
    with Image.open(path) as img:
        if img.mode.startswith("I"):  # 16-bit PNG: I;16 (or I in older Pillow); never through "L", which clips at 255
            gray = np.asarray(img, dtype=np.float32) / 65535
        else:  # L, RGB, RGBA, LA, P, 1: luminance, alpha dropped
            gray = np.asarray(img.convert("L"), dtype=np.float32) / 255
    h, w = gray.shape
    side = min(h, w)
    left, top = (w - side) // 2, (h - side) // 2
    square = Image.fromarray(gray).resize((resolution, resolution), Image.Resampling.BICUBIC,
                                          box=(left, top, left + side, top + side))  # crop, then resize
    x = torch.from_numpy(np.array(square)) * 2 - 1  # (R, R)
    return x.clamp(-1, 1).expand(3, -1, -1).contiguous()  # (3, R, R); bicubic can overshoot, hence the clamp


def fit(text: str, tokenizer) -> str:
    """The longest run of whole words of `text` that fits the text encoder: at most max_length - 2 tokens
    (CLIP: 77 minus <|startoftext|> and <|endoftext|>). Words tokenize independently, so the count
    grows with every word and a binary search finds the cut."""
    room = tokenizer.max_length - 2
    if tokenizer.num_tokens(text) <= room:
        return text
    words = text.split()
    lo, hi = 0, len(words)  # words[:lo] fits, words[:hi + 1] does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if tokenizer.num_tokens(" ".join(words[:mid])) <= room else (lo, mid - 1)
    return " ".join(words[:lo])


def pair_problem(pair: Pair, needs_report: bool = True) -> str | None:
    """Why a pair cannot be used, or None. Opens only the image's header (cheap)."""
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


class ImageReportDataset(torch.utils.data.Dataset):
    """Checked pairs -> {"pixel_values": (3, R, R) in [-1, 1], "report": str}.

    Every pair is checked up front (`pair_problem`): bad ones are skipped and counted in `skipped`
    (reason -> image paths), or with strict=True the first one stops the run. With a tokenizer (anything
    with `num_tokens(text)` and `max_length`, e.g. `CLIPTokenizer.default()`), reports longer than
    max_length - 2 tokens are cut to whole words that fit and counted in `num_truncated`. `summary()` is
    the one line a training script prints. An image whose header reads but whose pixels do not (a
    truncated file) is found only when loaded: it is named in a warning and the next pair stands in
    (strict=True: an error). needs_report=False keeps images with an empty report (the VAE reads none)."""

    def __init__(self, pairs, resolution: int, tokenizer=None, strict: bool = False, needs_report: bool = True):
        if resolution <= 0 or resolution % 8:
            raise ValueError(f"resolution={resolution}: use a positive multiple of 8 (SD's VAE downsamples by 8), e.g. 512")
        pairs = list(pairs)
        self.resolution, self.strict, self.num_read = resolution, strict, len(pairs)
        self.skipped: dict[str, list[Path]] = {}
        self.pairs = []
        for n, pair in enumerate(pairs, start=1):
            problem = pair_problem(pair, needs_report)
            if problem and strict:
                raise ValueError(f"pair {n} of {len(pairs)}: {problem} {pair.image} (strict: fix or remove it, "
                                 "or run without --strict to skip bad pairs)")
            if problem:
                self.skipped.setdefault(problem, []).append(pair.image)
            else:
                self.pairs.append(pair)
        if not self.pairs:
            raise ValueError(f"no usable image-report pair among the {len(pairs)} read: {self._skipped_text()}")
        self.num_truncated, self.max_tokens = None, None
        if tokenizer is not None:
            self.max_tokens = tokenizer.max_length - 2
            fitted = {text: fit(text, tokenizer) for text in {p.report for p in self.pairs}}  # a study's images share one
            self.num_truncated = sum(fitted[p.report] != p.report for p in self.pairs)
            self.pairs = [Pair(p.image, fitted[p.report]) for p in self.pairs]

    def _skipped_text(self) -> str:
        if not self.skipped:
            return "none skipped"
        parts = [f"{len(paths)} {reason} ({', '.join(str(p) for p in paths[:3])}{', ...' if len(paths) > 3 else ''})"
                 for reason, paths in self.skipped.items()]
        return f"skipped {sum(map(len, self.skipped.values()))}: " + "; ".join(parts)

    def summary(self) -> str:
        """One line: pairs kept, pairs skipped by reason with the first few named, reports truncated."""
        truncated = ("reports not checked for length (no tokenizer)" if self.num_truncated is None else
                     f"{self.num_truncated} reports cut to {self.max_tokens} tokens")
        return f"{len(self.pairs)} of {self.num_read} image-report pairs used; {self._skipped_text()}; {truncated}"

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        for j in range(i, i + len(self.pairs)):  # a pair that fails to decode gives way to the next one
            pair = self.pairs[j % len(self.pairs)]
            try:
                return {"pixel_values": load_image(pair.image, self.resolution), "report": pair.report}
            except (OSError, SyntaxError) as e:  # what Pillow raises for a damaged file
                message = f"cannot decode {pair.image}: {' '.join(str(e).split()) or type(e).__name__}"
                if self.strict:
                    raise ValueError(f"{message} (strict: fix or remove it)") from None
                warnings.warn(f"{message}; using the next pair instead", stacklevel=2)
        raise ValueError("no image of the dataset decodes: check the image files")
