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
             patient's age, sex and race (mimic_iv.py).
  openi      an IU X-ray / Open-I folder: ecgen-radiology/<n>.xml reports (NLMCXR_reports.tgz) and
             their PNG images anywhere below it (NLMCXR_png.tgz, named after the XML's
             `parentImage id`).

dataset.py's `ImageReportDataset` turns the pairs into training examples.

Choices where the paper is silent:
  - Report text: the section MIMIC-CXR's own parser (MIT-LCP/mimic-cxr, txt/) takes: the last
    impression, else findings, else the last paragraph, else the comparison (see
    report_text.py), with every run of whitespace made one space. De-identification marks
    (MIMIC's `___`, Open-I's `XXXX`) are kept: removing them leaves broken sentences, and CLIP reads
    them as ordinary symbols.
"""
import re
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import prompts as P
from .mimic_iv import read_mimic_iv
from .report_text import MimicReports, clean, extract_impression
from .tables import read_csv, read_rows

FRONTAL = {"PA", "AP"}
# DICOM View Position (and "LARGE LATERAL"), the t-SNE table's "L"
LATERAL = {"LL", "RL", "LATERAL", "L"}
MIMIC_SPLITS = ("train", "validate", "test")


@dataclass(frozen=True)
class Pair:
    image: Path
    report: str | None  # None: the report file is missing (an empty string: it has no usable text)
    # what a --prompt-template may use besides the report (prompts.py): name -> text, None when
    # unknown; the same names for every pair of a data set
    fields: dict | None = field(default=None, compare=False)


def _mimic_table(root: Path, name: str, columns) -> list[dict]:
    for path in (root / name, root / f"{name}.gz"):
        if path.is_file():
            return read_csv(path, columns, f"use {name}.gz as MIMIC-CXR-JPG v2.0.0 ships it")
    raise ValueError(f"{root} lacks {name}.gz (or {name}): copy it from MIMIC-CXR-JPG v2.0.0 "
                     "into that folder")


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
        rows = read_csv(Path(table), ["imageid", list(VIEW_COLUMNS)],
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
