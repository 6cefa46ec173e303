"""Image-report pairs for fine-tuning: chest X-rays with the impression of their report.

RoentGen (Chambon et al. 2022, Sec. "Data"; Bluethgen et al. 2024) fine-tunes Stable Diffusion on
frontal (PA/AP) MIMIC-CXR radiographs at 512x512, each with the impression section of its report as
the prompt, cut to CLIP's 77 tokens. This module turns three layouts into `Pair(image, report)`
lists:

  csv        a .csv or .jsonl file (optionally .gz) with `image` (a path relative to the file) and
             `report` columns; other columns (e.g. age, sex or gender, race) are fields a prompt
             template may use. `python -m minroentgen.phantoms` writes this.
  mimic-cxr  two PhysioNet downloads. MIMIC-CXR-JPG v2.0.0 (the images):
             files/pXX/pNNNNNNNN/sNNNNNNNN/<dicom_id>.jpg, mimic-cxr-2.0.0-metadata.csv.gz
             (ViewPosition) and mimic-cxr-2.0.0-split.csv.gz (the official split). It holds no
             reports: they are mimic-cxr-reports.zip of MIMIC-CXR v2.0.0
             (files/pXX/pNNNNNNNN/sNNNNNNNN.txt), read from the zip itself or from the folder it was
             unpacked into (`reports=`, train.py --reports), or found next to the study folders, or
             as mimic-cxr-reports.zip in the images' folder. With MIMIC-IV's folder
             (`demographics=`, train.py --demographics) each image's subject_id brings its
             patient's age, sex and race (`read_mimic_iv`).
  openi      an IU X-ray / Open-I folder: ecgen-radiology/<n>.xml reports (NLMCXR_reports.tgz) and
             their PNG images anywhere below it (NLMCXR_png.tgz, named after the XML's
             `parentImage id`).

and `ImageReportDataset` turns the pairs into training examples (with `template=`, the prompt is
the report with the patient's fields in front, as RoentGen-v2's; see prompts.py):
  image -> grayscale -> square (zero-padded, or centre-cropped) -> bicubic resize to (R, R)
  -> [-1, 1] -> 3 equal channels.

Choices where the paper is silent:
  - Report text: the section MIMIC-CXR's own parser (MIT-LCP/mimic-cxr, txt/) takes: the last
    impression, else findings, else the last paragraph, else the comparison (see
    report_text.py), with every run of whitespace made one space. De-identification marks
    (MIMIC's `___`, Open-I's `XXXX`) are kept: removing them leaves broken sentences, and CLIP reads
    them as ordinary symbols.
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
import csv
import gzip
import json
import os
import re
import warnings
import xml.etree.ElementTree as ET
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import prompts as P
from .report_text import REPORTS_HINT, MimicReports, clean, extract_impression

FRONTAL = {"PA", "AP"}
# DICOM View Position (and "LARGE LATERAL"), the t-SNE table's "L"
LATERAL = {"LL", "RL", "LATERAL", "L"}
MIMIC_SPLITS = ("train", "validate", "test")
CROPS = ("pad", "center")
BICUBIC = Image.Resampling.BICUBIC


@dataclass(frozen=True)
class Pair:
    image: Path
    report: str | None  # None: the report file is missing (an empty string: it has no usable text)
    # what a --prompt-template may use besides the report (prompts.py): name -> text, None when
    # unknown; the same names for every pair of a data set
    fields: dict | None = field(default=None, compare=False)


# ----------------------------------------------------------------------------- readers

def _open_text(path: Path):
    # utf-8-sig: spreadsheet programs start a CSV with a byte-order mark
    return (gzip.open(path, "rt", newline="", encoding="utf-8-sig") if path.suffix == ".gz"
            else open(path, newline="", encoding="utf-8-sig"))


def _read_csv(path: Path, columns=(), what="") -> list[dict]:
    """Rows of a .csv(.gz); a missing, damaged or half-downloaded file or a missing column is a
    one-line ValueError naming the file (what: how to get it right)."""
    if not path.is_file():
        raise ValueError(f"{path} {'is a folder' if path.is_dir() else 'does not exist'}; "
                         f"{what or 'give a CSV file'}")
    try:
        with _open_text(path) as f:
            reader = csv.DictReader(f)
            rows = list(reader)
    except (OSError, EOFError, zlib.error, csv.Error, UnicodeDecodeError) as e:
        raise ValueError(f"{path} cannot be read ({type(e).__name__}: "
                         f"{' '.join(str(e).split())}): damaged or half-downloaded? "
                         f"download it again") from None
    for need in columns:  # a name, or a list of names one of which will do
        options = [need] if isinstance(need, str) else need
        if not set(options) & set(reader.fieldnames or ()):
            raise ValueError(f"{path} has no column {' or '.join(map(repr, options))}"
                             f"{'; ' + what if what else ''}")
    return rows


def _mimic_table(root: Path, name: str, columns) -> list[dict]:
    for path in (root / name, root / f"{name}.gz"):
        if path.is_file():
            return _read_csv(path, columns, f"use {name}.gz as MIMIC-CXR-JPG v2.0.0 ships it")
    raise ValueError(f"{root} lacks {name}.gz (or {name}): copy it from MIMIC-CXR-JPG v2.0.0 "
                     "into that folder")


def _csv_rows(path: Path):
    """The header, then every row (a list) of a .csv(.gz), read as a stream (MIMIC-IV's tables
    are large); a damaged file is a one-line ValueError."""
    try:
        with _open_text(path) as f:
            yield from csv.reader(f)
    except (OSError, EOFError, zlib.error, csv.Error, UnicodeDecodeError) as e:
        raise ValueError(f"{path} cannot be read ({type(e).__name__}: "
                         f"{' '.join(str(e).split())}): damaged or half-downloaded? "
                         f"download it again") from None


def _columns(path: Path, header: list, *names):
    """A getter row -> the value of the first of `names` in the header ("" for a short row)."""
    i = next((header.index(n) for n in names if n in header), None)
    if i is None:
        raise ValueError(f"{path} has no column {' or '.join(map(repr, names))}; use the table "
                         "as MIMIC-IV ships it")
    return lambda row: row[i].strip() if i < len(row) else ""


def _mimic_iv_table(folder: Path, name: str) -> Path:
    for sub in ("hosp", "core", ""):  # v2.0 and later: hosp/; v1.0: core/; or the folder itself
        for gz in (".gz", ""):
            if (path := folder / sub / f"{name}.csv{gz}").is_file():
                return path
    raise ValueError(f"--demographics {folder} lacks hosp/{name}.csv.gz: give MIMIC-IV's folder "
                     "(holding hosp/) or its hosp/ folder")


def read_mimic_iv(folder, subjects=None) -> dict[str, dict]:
    """subject_id -> {"age", "sex", "race"} (prompts.py's words; None where unknown) from MIMIC-IV:
    hosp/patients.csv(.gz) (gender, anchor_age) and hosp/admissions.csv(.gz) (race; `ethnicity`
    in v1.0), one race a patient by `prompts.patient_race` over their admissions. folder: MIMIC-IV's
    folder or its hosp/. subjects: read only these (a set of ids)."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file" if folder.exists() else "does not exist"
        raise ValueError(f"--demographics {folder} {what}; give MIMIC-IV's folder (holding hosp/) "
                         "or its hosp/ folder")
    patients, admissions = (_mimic_iv_table(folder, n) for n in ("patients", "admissions"))
    out = {}
    rows = _csv_rows(patients)
    header = next(rows, [])
    subject, gender, anchor_age = (_columns(patients, header, n)
                                   for n in ("subject_id", "gender", "anchor_age"))
    for row in rows:
        if subjects is None or subject(row) in subjects:
            out[subject(row)] = {"age": P.age(anchor_age(row)), "sex": P.sex(gender(row)),
                                 "race": None}
    rows = _csv_rows(admissions)
    header = next(rows, [])
    subject, race = _columns(admissions, header, "subject_id"), _columns(admissions, header, "race",
                                                                          "ethnicity")
    when = _columns(admissions, header, "admittime") if "admittime" in header else lambda row: ""
    races = {}
    for row in rows:
        if subjects is None or subject(row) in subjects:
            races.setdefault(subject(row), []).append((when(row), race(row)))
    for s, seen in races.items():
        out.setdefault(s, {"age": None, "sex": None})["race"] = P.patient_race(seen)
    return out


def read_mimic(root: Path, split: str, reports=None, demographics=None) -> list[Pair]:
    """Frontal (ViewPosition PA or AP) images of one official split, each with its study's
    impression (report None: the study has no report file). reports: mimic-cxr-reports.zip or its
    unpacked folder (default: reports next to the study folders, or ROOT/mimic-cxr-reports.zip).
    demographics: MIMIC-IV's folder (see `read_mimic_iv`): each pair's fields are then the age, sex
    and race of its subject_id (all None for a patient MIMIC-IV lacks)."""
    if split not in MIMIC_SPLITS:
        raise ValueError(f"split={split!r}: MIMIC-CXR's official splits are "
                         f"{', '.join(MIMIC_SPLITS)}")
    if reports is None:
        reports = (root / "mimic-cxr-reports.zip" if (root / "mimic-cxr-reports.zip").is_file()
                   else root)
    texts = MimicReports(Path(reports))
    split_of = {row["dicom_id"]: row["split"]
                for row in _mimic_table(root, "mimic-cxr-2.0.0-split.csv", ["dicom_id", "split"])}
    pairs, impressions, subjects = [], {}, []
    needed = ["dicom_id", "subject_id", "study_id", "ViewPosition"]
    for row in _mimic_table(root, "mimic-cxr-2.0.0-metadata.csv", needed):
        if row["ViewPosition"] not in FRONTAL or split_of.get(row["dicom_id"]) != split:
            continue
        subjects.append(row["subject_id"])
        subject, study = row["subject_id"], row["study_id"]
        folder = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
        if study not in impressions:  # one report per study, shared by its images
            text = texts.text(subject, study)
            impressions[study] = None if text is None else extract_impression(text)
        pairs.append(Pair(folder / f"{row['dicom_id']}.jpg", impressions[study]))
    if demographics is not None:
        patients = read_mimic_iv(demographics, set(subjects))
        unknown = {"age": None, "sex": None, "race": None}
        pairs = [replace(p, fields=patients.get(s, unknown)) for p, s in zip(pairs, subjects)]
    return pairs


def openi_report(xml_path) -> tuple[str, list[str]]:
    """An Open-I report XML -> (IMPRESSION, or FINDINGS when that is missing or empty; the ids of
    its images, i.e. the PNG names without .png)."""
    root = ET.parse(xml_path).getroot()
    sections = {el.get("Label", "").upper(): clean(el.text or "")
                for el in root.iter("AbstractText")}
    text = sections.get("IMPRESSION") or sections.get("FINDINGS") or ""
    return text, [el.get("id") for el in root.iter("parentImage")]


def openi_key(image_id: str) -> str:
    """An Open-I image id as the DICOM table names it: the XML's "CXR1_1_IM-0001-3001" is the
    table's "CXR1_IM-0001-3001" (the "_<k>" after the report number is dropped)."""
    return re.sub(r"^(CXR\d+)_\d+_", r"\1_", image_id)


VIEW_COLUMNS = ("View Position", "tsne-view")


def read_views(tables) -> dict[str, str]:
    """Image key (`openi_key`) -> view, from CSVs with `imageid` and `View Position`
    (torchxrayvision's nlmcxr_dicom_metadata.csv.gz, the DICOM headers) or `tsne-view` (its
    nlmcxr_tsne_pa.csv.gz, views from image clustering). The first table with a non-blank view for
    an image decides; blank: ""."""
    views = {}
    for table in tables:
        rows = _read_csv(Path(table), ["imageid", list(VIEW_COLUMNS)],
                         "a view table needs the columns 'imageid' and 'View Position' "
                         "(or 'tsne-view'), like torchxrayvision's nlmcxr_dicom_metadata.csv.gz")
        column = next(c for c in VIEW_COLUMNS if c in rows[0]) if rows else None
        for row in rows:
            key, view = openi_key(row["imageid"].strip()), (row[column] or "").strip().upper()
            if not views.get(key):
                views[key] = view
    return views


def read_openi(root: Path, view_table=None) -> list[Pair]:
    """Every (image, report) link of ecgen-radiology/*.xml. With view tables (a path or a list; see
    `read_views`) only images they call PA or AP; a warning says how many were dropped and why. A
    blank View Position (2,586 of torchxrayvision's table: the DICOM header does not say) means an
    unknown view, so the image is dropped, unless a later table (nlmcxr_tsne_pa.csv.gz) names its
    view."""
    if not (root / "ecgen-radiology").is_dir():
        raise ValueError(f"{root} lacks ecgen-radiology/: unpack NLMCXR_reports.tgz (and the PNGs) "
                         "into that folder")
    tables = ([] if view_table is None else [view_table] if isinstance(view_table, (str, Path))
              else list(view_table))
    if not tables:
        warnings.warn("Open-I: no view table given, so every image is used, lateral views included "
                      "(the report XML has no per-image view); pass --view-table "
                      "nlmcxr_dicom_metadata.csv.gz (from the torchxrayvision package; view_table= "
                      "in Python) to keep frontal images only", stacklevel=3)
    views = read_views(tables) if tables else None
    pngs = {png.stem: png for png in root.rglob("*.png")}
    pairs, dropped = [], {"lateral": 0, "blank View Position": 0, "other view": 0,
                          "not in the view table": 0}
    for xml_path in sorted((root / "ecgen-radiology").glob("*.xml")):
        text, image_ids = openi_report(xml_path)
        for i in image_ids:
            view = None if views is None else views.get(openi_key(i))
            if views is None or view in FRONTAL:
                pairs.append(Pair(pngs.get(i, root / f"{i}.png"), text))
            else:
                dropped["not in the view table" if view is None else
                        "blank View Position" if not view else
                        "lateral" if view in LATERAL or "LATERAL" in view else "other view"] += 1
    if views is not None:
        if len(tables) == 1:
            hint = " (view unknown: add nlmcxr_tsne_pa.csv.gz after it to --view-table to take " \
                   "the views image clustering gives them)"
            dropped = {(k + hint if k.startswith("blank") else k): n for k, n in dropped.items()}
        why = ", ".join(f"{n} {reason}" for reason, n in dropped.items() if n)
        warnings.warn(f"Open-I view table: kept {len(pairs)} frontal (PA/AP) of "
                      f"{len(pairs) + sum(dropped.values())} images; dropped {why or 'none'}",
                      stacklevel=3)
    return pairs


def _json_lines(path: Path, lines) -> list:
    rows = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as e:
            raise ValueError(f"{path} line {n}: not valid JSON ({e.msg}); each line must be one "
                             'object, {"image": "a.png", "report": "..."}') from None
    return rows


def read_rows(path: Path) -> list:
    """The rows of a .csv (dicts) or .jsonl (JSON values) file, optionally .gz."""
    try:
        with _open_text(path) as f:
            return _json_lines(path, f) if ".jsonl" in path.suffixes else list(csv.DictReader(f))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); "
                         "save it as UTF-8") from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise ValueError(f"{path} cannot be read ({type(e).__name__}: {e}): "
                         "damaged or cut short?") from None


def read_table(path: Path) -> list[Pair]:
    """A .csv or .jsonl (optionally .gz) with `image` (relative to the file) and `report`
    columns. The other columns are each pair's fields (`prompts.table_fields`)."""
    rows = read_rows(path)
    pairs = []
    columns = list(dict.fromkeys(c for row in rows if isinstance(row, dict) for c in row))
    for n, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or not {"image", "report"} <= row.keys():
            raise ValueError(f"{path}: row {n} lacks an 'image' or 'report' column; the file needs "
                             "both (image: a path relative to the file, report: the text)")
        pairs.append(Pair(path.parent / str(row["image"] or ""), clean(str(row["report"] or "")),
                          P.table_fields(row, columns)))
    return pairs


def infer_dataset(path: Path) -> str:
    """"csv", "mimic-cxr" or "openi" from what the path holds."""
    if path.is_file() and path.name.endswith((".csv", ".jsonl", ".csv.gz", ".jsonl.gz")):
        return "csv"
    if (path / "files").is_dir() and any((path / f"mimic-cxr-2.0.0-metadata.csv{gz}").is_file()
                                         for gz in ("", ".gz")):
        return "mimic-cxr"
    if (path / "ecgen-radiology").is_dir():
        return "openi"
    what = "does not exist" if not path.exists() else "is none of the known layouts"
    raise ValueError(f"{path} {what}: expected a .csv/.jsonl file with image and report columns, a "
                     "MIMIC-CXR-JPG folder (files/ and mimic-cxr-2.0.0-metadata.csv[.gz]) or an "
                     "Open-I folder (ecgen-radiology/)")


def read_pairs(path, dataset=None, split="train", view_table=None, reports=None,
               demographics=None) -> list[Pair]:
    """All image-report pairs of a dataset, unchecked (`ImageReportDataset` checks them).
    dataset: "csv", "mimic-cxr", "openi" or None to infer it from the path. split: MIMIC-CXR's
    official split (train, validate, test); a csv file is one split already and Open-I has none, so
    they ignore it. view_table: Open-I only, see `read_openi`. reports, demographics (MIMIC-IV's
    folder): MIMIC-CXR only, see `read_mimic`."""
    path = Path(path).absolute()  # image paths then do not depend on the working folder
    dataset = dataset or infer_dataset(path)
    if dataset not in ("csv", "mimic-cxr", "openi"):
        raise ValueError(f"dataset={dataset!r}: use 'csv', 'mimic-cxr', 'openi' or None "
                         "(inferred from the path)")
    if view_table is not None and dataset != "openi":
        raise ValueError(f"--view-table is for Open-I only; "
                         f"the {dataset} data says its views itself")
    if reports is not None and dataset != "mimic-cxr":
        raise ValueError(f"--reports is for MIMIC-CXR only; "
                         f"the {dataset} data holds its reports itself")
    if demographics is not None and dataset != "mimic-cxr":
        instead = ("give age, sex and race as columns of the table" if dataset == "csv"
                   else "Open-I has no demographics")
        raise ValueError(f"--demographics (MIMIC-IV) is for MIMIC-CXR only; {instead}")
    if dataset == "csv":
        return read_table(path)
    if dataset == "mimic-cxr":
        return read_mimic(path, split, reports, demographics)
    return read_openi(path, view_table)


# ----------------------------------------------------------------------------- images

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
