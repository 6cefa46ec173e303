"""data.py: report sections, the three dataset layouts, preprocessing, bad input, truncation.

Every dataset here is a tiny fake in the official layout, built in a tmp folder; report texts are
written in the style of MIMIC-CXR and Open-I (Open-I's first report is the public CXR1 text)."""
import csv
import gzip
import json
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minroentgen.data import Pair, openi_report, read_pairs, read_views
from minroentgen.dataset import ImageReportDataset, default_workers, load_image
from minroentgen.report_text import extract_impression, report_sections

# ----------------------------------------------------------------------------- report texts

MIMIC_FULL = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)
 
 INDICATION:  ___F with new onset ascites  // eval for infection
 
 TECHNIQUE:  Chest PA and lateral
 
 COMPARISON:  None.
 
 FINDINGS: 
 
 There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral
 nodular opacities that most likely represent nipple shadows. The
 cardiomediastinal silhouette is normal.  Clips project over the left lung,
 potentially within the breast.
 
 IMPRESSION: 
 
 No acute cardiopulmonary process.
"""

MIMIC_FINDINGS_ONLY = """                                 FINAL REPORT
 HISTORY:  ___-year-old man with shortness of breath.
 
 FINDINGS:  Portable AP upright chest radiograph was obtained.  Moderate
 cardiomegaly is stable.  Small bilateral pleural effusions, left greater than
 right, are new since ___.
"""

MIMIC_NO_SECTION = """                                 FINAL REPORT
 INDICATION:  ___ year old woman with fever.
 
 COMPARISON:  ___
 
 Single portable view of the chest is compared to the previous exam from ___.
 Again there are bilateral pleural effusions with overlying atelectasis.
"""

MIMIC_TWO_IMPRESSIONS = """                                 FINAL REPORT
 WET READ: ___ ___ 3:14 PM
  Right lower lobe opacity.
 
 FINDINGS:  Right lower lobe opacity concerning for pneumonia.
 
 IMPRESSION:  Right lower lobe pneumonia.
 
 ADDENDUM:  Discussed with Dr. ___.
 
 IMPRESSION:  Right lower lobe pneumonia; follow-up radiographs recommended
 after treatment to document resolution.
 
 IMPRESSION: 
"""

MIMIC_LONG = """                                 FINAL REPORT
 INDICATION:  ___ with chest pain.
 
 IMPRESSION: 
 
 1. Endotracheal tube terminates approximately 4 cm above the carina.  Enteric
 tube courses below the diaphragm with its tip in the stomach.  Right internal
 jugular central venous catheter terminates in the mid superior vena cava.
 2. Moderate right and small left pleural effusions with adjacent bibasilar
 atelectasis, increased since the prior study.  Superimposed infection at the
 lung bases cannot be excluded.  3. Mild pulmonary vascular congestion without
 frank edema.  4. Stable moderate cardiomegaly.  No pneumothorax.
"""

# Written only under COMPARISON, no paragraph break in it: the official fallback's last step.
MIMIC_COMPARISON_ONLY = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PORTABLE AP)
 
 INDICATION:  ___ year old woman with new right IJ line.
 
 COMPARISON:  Chest radiograph ___ at 05:12.  Right internal jugular line
 ends in the low superior vena cava.  No pneumothorax.
"""

# Ends in an empty IMPRESSION heading: it is dropped, and the last paragraph is taken before it.
MIMIC_EMPTY_IMPRESSION_AT_END = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PORTABLE AP)
 
 INDICATION:  ___ year old man intubated for airway protection.
 
 COMPARISON:  ___
 
 Endotracheal tube ends 5 cm above the carina.  Nasogastric tube ends in the
 stomach.  Lungs are clear.
 
 IMPRESSION: 
 
"""


def test_impression_rules_of_the_official_parser():
    # impression > findings > last paragraph > comparison; empty impression/findings dropped first
    assert extract_impression(MIMIC_COMPARISON_ONLY) == (
        "Chest radiograph ___ at 05:12. Right internal jugular line ends in the low superior vena cava. "
        "No pneumothorax.")
    assert extract_impression(MIMIC_EMPTY_IMPRESSION_AT_END) == (
        "Endotracheal tube ends 5 cm above the carina. Nasogastric tube ends in the stomach. Lungs are clear.")
    empty_findings = MIMIC_COMPARISON_ONLY + " \n FINDINGS: \n \n"
    assert extract_impression(empty_findings) == extract_impression(MIMIC_COMPARISON_ONLY)
    for heading in ("COMPARISION", "REFERENCE EXAM"):  # typo and synonym of the dataset's parser
        assert extract_impression(f"FINAL REPORT\n {heading}:  Prior of ___.\n") == "Prior of ___."
    # a last paragraph beats the comparison (MIMIC_NO_SECTION's COMPARISON is "___")
    assert extract_impression(MIMIC_NO_SECTION).startswith("Single portable view")


def test_impression_rules():
    assert extract_impression(MIMIC_FULL) == "No acute cardiopulmonary process."
    assert extract_impression(MIMIC_FINDINGS_ONLY) == (  # no impression: findings, whitespace made single
        "Portable AP upright chest radiograph was obtained. Moderate cardiomegaly is stable. Small bilateral "
        "pleural effusions, left greater than right, are new since ___.")
    assert extract_impression(MIMIC_NO_SECTION) == (  # neither: the last section after its first paragraph
        "Single portable view of the chest is compared to the previous exam from ___. "
        "Again there are bilateral pleural effusions with overlying atelectasis.")
    # the last non-empty impression wins (the empty one at the end is dropped); ___ marks are kept
    assert extract_impression(MIMIC_TWO_IMPRESSIONS) == ("Right lower lobe pneumonia; follow-up radiographs "
                                                         "recommended after treatment to document resolution.")
    # normalised heading names
    for heading in ("CONCLUSION", "FINDINGS AND IMPRESSION", "IMPRESSIONS", "IMPRESSON"):
        text = f"FINAL REPORT\n FINDINGS:  Lungs are clear.\n \n {heading}:  No pneumonia.\n"
        assert extract_impression(text) == "No pneumonia.", heading
    assert extract_impression("FINAL REPORT\n CHEST, PA AND LATERAL:  Lungs are clear.\n") == "Lungs are clear."
    names = [name for name, _ in report_sections(MIMIC_FULL)]
    assert names == ["preamble", "examination", "indication", "technique", "comparison", "findings", "impression"]
    assert extract_impression("No headings at all, one paragraph.") == ""  # nothing to stand in: empty


# ----------------------------------------------------------------------------- MIMIC-CXR layout

# (subject, study, dicom_id, ViewPosition, split); studies get the reports below
MIMIC_IMAGES = [
    ("10000032", "50414267", "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", "PA", "train"),
    ("10000032", "50414267", "174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962", "LATERAL", "train"),
    ("10000032", "53189527", "2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab", "AP", "train"),
    ("10000898", "50771383", "68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714", "AP", "train"),
    ("10000898", "50771383", "b0a1d1a5-8a5e0b3f-0b9e4b55-31f2e1a7-5c1c4f9e", "LL", "train"),
    ("10000898", "50771383", "c3b4e9f2-7e0c1a2d-6f5b8a9c-0d1e2f3a-4b5c6d7e", "", "train"),
    ("10000764", "57375967", "096052b7-d256dc40-453a102b-fa7d01c6-1b22c6b4", "AP", "validate"),
    ("11000011", "51029426", "e084de3b-be89b11e-20fe3f9f-9c8d8dfe-4cfd202c", "PA", "test"),
]
MIMIC_REPORTS = {"50414267": MIMIC_FULL, "53189527": MIMIC_FINDINGS_ONLY, "50771383": MIMIC_TWO_IMPRESSIONS,
                 "57375967": MIMIC_NO_SECTION, "51029426": MIMIC_FULL}


def write_csv(path, header, rows):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def save_gray(path, size=(20, 16), value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size[::-1], value, dtype=np.uint8)).save(path)


def report_name(subject, study):
    return f"files/p{subject[:2]}/p{subject}/s{study}.txt"


def write_mimic_jpg(root, gz=".gz"):
    """MIMIC-CXR-JPG v2.0.0 as PhysioNet ships it: images and .csv.gz tables, no reports."""
    for subject, study, dicom, _, _ in MIMIC_IMAGES:
        save_gray(root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg")
    write_csv(root / f"mimic-cxr-2.0.0-metadata.csv{gz}",
              ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
               "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
               "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"],
              [[d, s, st, "CHEST (PA AND LAT)", v, 16, 20, 21800506, 213014.531, "CHEST (PA AND LAT)",
                "postero-anterior", "Erect"] for s, st, d, v, _ in MIMIC_IMAGES])
    write_csv(root / f"mimic-cxr-2.0.0-split.csv{gz}", ["dicom_id", "study_id", "subject_id", "split"],
              [[d, st, s, sp] for s, st, d, _, sp in MIMIC_IMAGES])
    write_csv(root / f"mimic-cxr-2.0.0-chexpert.csv{gz}", ["subject_id", "study_id", "Atelectasis"],
              [[s, st, ""] for s, st, *_ in MIMIC_IMAGES])


def write_mimic_reports(where: str, root, skip=()):
    """MIMIC-CXR's reports (mimic-cxr-reports.zip: files/pXX/pNNNNNNNN/sNNNNNNNN.txt): "zip" beside
    the image folder, "folder": that zip unpacked beside it, "inside": unpacked into the image folder.
    Returns what to pass as reports= (None: found in the image folder)."""
    texts = {report_name(subject, study): MIMIC_REPORTS[study] for subject, study, *_ in MIMIC_IMAGES
             if study not in skip}
    if where == "zip":
        with zipfile.ZipFile(root.parent / "mimic-cxr-reports.zip", "w", zipfile.ZIP_DEFLATED) as z:
            for name, text in texts.items():
                z.writestr(name, text)
        return root.parent / "mimic-cxr-reports.zip"
    base = root.parent / "mimic-cxr-reports" if where == "folder" else root
    for name, text in texts.items():
        (base / name).parent.mkdir(parents=True, exist_ok=True)
        (base / name).write_text(text)
    return base if where == "folder" else None


@pytest.fixture(params=[("", "inside"), (".gz", "folder"), (".gz", "zip")], ids=["csv-inside", "gz-folder", "gz-zip"])
def mimic(tmp_path, request):
    """(MIMIC-CXR-JPG folder, reports= for it)."""
    gz, where = request.param
    root = tmp_path / "mimic-cxr-jpg"
    write_mimic_jpg(root, gz)
    return root, write_mimic_reports(where, root)


def test_mimic_frontal_official_split(mimic):
    root, reports = mimic

    def pairs(split):
        return [(str(p.image.relative_to(root)), p.report) for p in read_pairs(root, split=split, reports=reports)]

    assert pairs("train") == [  # the lateral, LL and view-less images are gone
        ("files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg",
         "No acute cardiopulmonary process."),
        ("files/p10/p10000032/s53189527/2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab.jpg",
         extract_impression(MIMIC_FINDINGS_ONLY)),
        ("files/p10/p10000898/s50771383/68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714.jpg",
         extract_impression(MIMIC_TWO_IMPRESSIONS))]
    assert pairs("validate") == [("files/p10/p10000764/s57375967/096052b7-d256dc40-453a102b-fa7d01c6-1b22c6b4.jpg",
                                  extract_impression(MIMIC_NO_SECTION))]
    assert [p for p, _ in pairs("test")] == [
        "files/p11/p11000011/s51029426/e084de3b-be89b11e-20fe3f9f-9c8d8dfe-4cfd202c.jpg"]
    with pytest.raises(ValueError, match="official splits are train, validate, test"):
        read_pairs(root, split="val")
    dataset = ImageReportDataset(read_pairs(root, "mimic-cxr", reports=reports), resolution=8)
    assert len(dataset) == 3 and dataset[0]["pixel_values"].shape == (3, 8, 8)


def test_mimic_reports_zip_read_in_place_from_a_read_only_mount(tmp_path):
    root = tmp_path / "mimic-cxr-jpg"
    write_mimic_jpg(root)
    zipped = write_mimic_reports("zip", root)
    (root / zipped.name).write_bytes(zipped.read_bytes())  # also found inside the image folder
    before = sorted(tmp_path.rglob("*"))
    for path in [root, *root.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        for reports in (zipped, None):
            assert [p.report for p in read_pairs(root, reports=reports)][0] == "No acute cardiopulmonary process."
    finally:
        for path in [root, *root.rglob("*")]:
            path.chmod(0o755)
    assert sorted(tmp_path.rglob("*")) == before  # nothing unpacked anywhere


def test_mimic_without_reports_says_what_to_download(tmp_path):
    root = tmp_path / "mimic-cxr-jpg"
    write_mimic_jpg(root)
    with pytest.raises(ValueError) as error:
        ImageReportDataset(read_pairs(root), resolution=8)
    message = str(error.value)
    assert "\n" not in message and "skipped 3: 3 missing report" in message
    assert "download mimic-cxr-reports.zip from MIMIC-CXR v2.0.0" in message and "--reports" in message
    images_only = ImageReportDataset(read_pairs(root), resolution=8, needs_report=False)  # train_vae.py
    assert len(images_only) == 3
    with pytest.raises(ValueError, match="--reports .*nowhere does not exist; MIMIC-CXR-JPG holds no reports"):
        read_pairs(root, reports=tmp_path / "nowhere")
    (tmp_path / "half.zip").write_bytes(b"PK\x03\x04 half a download")
    with pytest.raises(ValueError, match="half.zip: not a readable zip .*download mimic-cxr-reports.zip again"):
        read_pairs(root, reports=tmp_path / "half.zip")
    damaged = tmp_path / "damaged.zip"
    data = bytearray(write_mimic_reports("zip", root).read_bytes())
    first = zipfile.ZipFile(root.parent / "mimic-cxr-reports.zip").infolist()[0]
    data[first.header_offset + 30 + len(first.filename) + 5] ^= 0xFF  # a flipped bit inside its deflated text
    damaged.write_bytes(data)
    with pytest.raises(ValueError, match="damaged.zip: files/p10/p10000032/s50414267.txt is damaged .*again"):
        read_pairs(root, reports=damaged)  # a member's checksum fails
    with pytest.raises(ValueError, match="--reports is for MIMIC-CXR only"):
        read_pairs(tmp_path / "x.csv", "csv", reports=tmp_path)


@pytest.mark.parametrize("where", ["folder", "zip"])
def test_mimic_missing_report_is_missing_not_empty(tmp_path, where):
    root = tmp_path / "mimic-cxr-jpg"
    write_mimic_jpg(root)
    reports = write_mimic_reports(where, root, skip={"53189527"})
    dataset = ImageReportDataset(read_pairs(root, reports=reports), resolution=8)
    assert len(dataset) == 2 and list(dataset.skipped) == ["missing report"]
    assert [p.name for p in dataset.skipped["missing report"]] == ["2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab.jpg"]
    assert "1 missing report" in dataset.summary() and "mimic-cxr-reports.zip" in dataset.summary()


def test_mimic_damaged_tables_are_one_line_errors(tmp_path):
    root = tmp_path / "mimic-cxr-jpg"
    write_mimic_jpg(root)
    write_mimic_reports("inside", root)
    split = root / "mimic-cxr-2.0.0-split.csv.gz"
    whole = split.read_bytes()
    split.write_bytes(whole[: len(whole) // 2])  # a half-downloaded file: EOFError inside gzip
    with pytest.raises(ValueError, match=r"split.csv.gz cannot be read \(EOFError.*download it again") as error:
        read_pairs(root)
    assert "\n" not in str(error.value)
    split.write_bytes(whole)
    write_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", ["dicom_id", "subject_id", "study_id", "Rows"], [["a", 1, 2, 3]])
    with pytest.raises(ValueError, match="metadata.csv.gz has no column 'ViewPosition'; use"):
        read_pairs(root)
    for table in root.glob("mimic-cxr-2.0.0-split.csv*"):
        table.unlink()
    with pytest.raises(ValueError, match="lacks mimic-cxr-2.0.0-split.csv"):
        read_pairs(root)
    for table in root.glob("mimic-cxr-2.0.0-metadata.csv*"):
        table.unlink()
    with pytest.raises(ValueError, match="none of the known layouts"):
        read_pairs(root)


# ----------------------------------------------------------------------------- Open-I layout

def openi_xml(n, sections, image_ids):
    abstract = "".join(f'<AbstractText Label="{label}">{text}</AbstractText>' if text is not None else
                       f'<AbstractText Label="{label}"/>' for label, text in sections.items())
    images = "".join(f'<parentImage id="{i}"><figureId>F{k}</figureId><caption>Xray Chest PA and Lateral</caption>'
                     f'<url>/hadoop/storage/radiology/extract/{i}.jpg</url></parentImage>'
                     for k, i in enumerate(image_ids, start=1))
    return (f'<?xml version="1.0" encoding="utf-8"?><eCitation><meta type="rr"/><uId id="CXR{n}"/>'
            '<MedlineCitation Owner="Indiana University" Status="supplied by publisher"><Article PubModel="Electronic">'
            f'<ArticleTitle>Indiana University Chest X-ray Collection</ArticleTitle><Abstract>{abstract}</Abstract>'
            f'</Article></MedlineCitation><MeSH><major>normal</major></MeSH>{images}</eCitation>')


OPENI_REPORTS = {
    1: ({"COMPARISON": "None.", "INDICATION": "Positive TB test",
         "FINDINGS": "The cardiac silhouette and mediastinum size are within normal limits. There is no pulmonary "
                     "edema. There is no focal consolidation. There are no XXXX of a pleural effusion. There is no "
                     "evidence of pneumothorax.",
         "IMPRESSION": "Normal chest x-XXXX."}, ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"]),
    2: ({"COMPARISON": "Chest radiographs XXXX.", "INDICATION": "XXXX-year-old male, chest pain.",
         "FINDINGS": "The cardiomediastinal silhouette is within normal limits for size and contour. The lungs are "
                     "normally inflated without evidence of focal airspace disease, pleural effusion, or "
                     "pneumothorax. Stable calcified granuloma within the right upper lung.",
         "IMPRESSION": None}, ["CXR2_IM-0652-1001", "CXR2_IM-0652-2001"]),
    3: ({"FINDINGS": "Heart size normal. Lungs are clear.", "IMPRESSION": "No acute disease."}, []),
    4: ({"COMPARISON": None, "FINDINGS": "  ", "IMPRESSION": None}, ["CXR4_IM-2050-1001"]),
}


@pytest.fixture
def openi(tmp_path):
    root = tmp_path / "NLMCXR"
    (root / "ecgen-radiology").mkdir(parents=True)
    for n, (sections, ids) in OPENI_REPORTS.items():
        (root / "ecgen-radiology" / f"{n}.xml").write_text(openi_xml(n, sections, ids))
        for i in ids:
            save_gray(root / "NLMCXR_png" / f"{i}.png")
    return root


def test_openi_report(openi):
    def report(n):
        return openi_report(openi / "ecgen-radiology" / f"{n}.xml")

    assert report(1) == ("Normal chest x-XXXX.", ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"])
    assert report(2)[0].startswith("The cardiomediastinal silhouette")  # empty IMPRESSION: FINDINGS
    assert report(3) == ("No acute disease.", [])
    assert report(4) == ("", ["CXR4_IM-2050-1001"])


def test_openi_without_view_table_warns_and_keeps_all(openi):
    with pytest.warns(UserWarning, match="no view table given, so every image is used.*pass --view-table "
                      "nlmcxr_dicom_metadata.csv.gz"):
        pairs = read_pairs(openi)
    assert [(p.image.name, p.report[:20]) for p in pairs] == [
        ("CXR1_1_IM-0001-3001.png", "Normal chest x-XXXX."), ("CXR1_1_IM-0001-4001.png", "Normal chest x-XXXX."),
        ("CXR2_IM-0652-1001.png", "The cardiomediastina"), ("CXR2_IM-0652-2001.png", "The cardiomediastina"),
        ("CXR4_IM-2050-1001.png", "")]
    assert all(p.image.is_file() for p in pairs)  # found under NLMCXR_png/
    dataset = ImageReportDataset(pairs, resolution=8)
    assert len(dataset) == 4 and dataset.skipped == {"empty report": [pairs[-1].image]}


DICOM_COLUMNS = ["imageid", "Bits Stored", "Columns", "Modality", "Photometric Interpretation", "Rows",
                 "View Position", "filename"]  # some of nlmcxr_dicom_metadata.csv.gz's 200 columns, in its order


def dicom_row(imageid, view):
    return [imageid, 12, 2320, "CR", "MONOCHROME1", 2828, view, f"./{imageid[3:]}.dcm"]


@pytest.mark.parametrize("suffix", ["csv", "csv.gz"])
def test_openi_view_table_keeps_frontal_and_says_what_it_dropped(openi, tmp_path, suffix):
    table = tmp_path / f"nlmcxr_dicom_metadata.{suffix}"
    # the table names the XML's CXR1_1_IM-0001-3001 without the "_1", as the real one does
    write_csv(table, DICOM_COLUMNS, [dicom_row("CXR1_IM-0001-3001", "PA"), dicom_row("CXR1_IM-0001-4001", "LL"),
                                     dicom_row("CXR2_IM-0652-1001", ""), dicom_row("CXR2_IM-0652-2001", "LARGE LATERAL"),
                                     dicom_row("CXR4_IM-2050-1001", "AP")])
    with pytest.warns(UserWarning) as caught:
        pairs = read_pairs(openi, view_table=table)
    assert [p.image.name for p in pairs] == ["CXR1_1_IM-0001-3001.png", "CXR4_IM-2050-1001.png"]
    message, = [str(w.message) for w in caught]
    assert message.startswith("Open-I view table: kept 2 frontal (PA/AP) of 5 images; dropped 2 lateral, "
                              "1 blank View Position (view unknown: add nlmcxr_tsne_pa.csv.gz")
    # a blank DICOM view is filled from the image-clustering table given after it; its "L" is lateral
    tsne = tmp_path / "nlmcxr_tsne_pa.csv.gz"
    write_csv(tsne, ["imageid", "tsne-view"], [["CXR1_1_IM-0001-3001", "L"], ["CXR2_IM-0652-1001", "PA"]])
    with pytest.warns(UserWarning, match=r"kept 3 frontal \(PA/AP\) of 5 images; dropped 2 lateral$"):
        pairs = read_pairs(openi, view_table=[table, tsne])
    assert [p.image.name for p in pairs] == ["CXR1_1_IM-0001-3001.png", "CXR2_IM-0652-1001.png", "CXR4_IM-2050-1001.png"]
    with pytest.warns(UserWarning, match="kept 1 .* of 5 images; dropped 1 lateral, 3 not in the view table$"):
        assert [p.image.name for p in read_pairs(openi, view_table=tsne)] == ["CXR2_IM-0652-1001.png"]


def test_openi_view_table_errors(openi, tmp_path):
    table = tmp_path / "views.csv"
    write_csv(table, ["imageid", "view"], [["CXR1_1_IM-0001-3001", "PA"]])
    with pytest.raises(ValueError, match="views.csv has no column 'View Position' or 'tsne-view'; a view table needs"):
        read_pairs(openi, view_table=table)
    with pytest.raises(ValueError, match="nowhere.csv.gz does not exist; a view table needs"):
        read_pairs(openi, view_table=tmp_path / "nowhere.csv.gz")
    with pytest.raises(ValueError, match=f"{tmp_path} is a folder; a view table needs"):
        read_pairs(openi, view_table=tmp_path)


def test_real_openi_tables_if_present():
    """torchxrayvision's own tables (pip download torchxrayvision; unzip; TXV_DATA=.../torchxrayvision/data)."""
    data = Path(os.environ.get("TXV_DATA", "/nonexistent"))
    if not (data / "nlmcxr_dicom_metadata.csv.gz").is_file():
        pytest.skip("set TXV_DATA to torchxrayvision's data/ folder to run this")
    dicom = read_views([data / "nlmcxr_dicom_metadata.csv.gz"])
    assert dicom["CXR1_IM-0001-3001"] in ("PA", "AP", "LL", "LATERAL", "RL", "")
    both = read_views([data / "nlmcxr_dicom_metadata.csv.gz", data / "nlmcxr_tsne_pa.csv.gz"])
    filled = [k for k, v in dicom.items() if not v and both[k] == "PA"]
    assert len(filled) > 1000  # the t-SNE table calls about 1,100 blank ones PA


# ----------------------------------------------------------------------------- csv / jsonl

def test_csv_and_jsonl_paths_relative_to_file(tmp_path, monkeypatch):
    folder = tmp_path / "phantoms"
    save_gray(folder / "images" / "0000.png")
    save_gray(folder / "images" / "0001.png")
    rows = [{"image": "images/0000.png", "report": "Small left  pleural\neffusion.", "labels": '{"effusion": 1}'},
            {"image": "images/0001.png", "report": "No acute cardiopulmonary process.", "labels": "{}"}]
    write_csv(folder / "reports.csv", ["labels", "image", "report"], [[r["labels"], r["image"], r["report"]] for r in rows])
    (folder / "reports.jsonl").write_text("".join(json.dumps({**r, "age": 61}) + "\n" for r in rows) + "\n")
    monkeypatch.chdir(tmp_path)  # the paths must not depend on the working folder
    expected = [Pair(folder / "images/0000.png", "Small left pleural effusion."),
                Pair(folder / "images/0001.png", "No acute cardiopulmonary process.")]
    assert read_pairs("phantoms/reports.csv") == expected
    assert read_pairs(folder / "reports.jsonl", dataset="csv") == expected
    write_csv(folder / "bad.csv", ["path", "report"], [["images/0000.png", "Normal."]])
    with pytest.raises(ValueError, match="row 1 lacks an 'image' or 'report' column"):
        read_pairs(folder / "bad.csv")
    with pytest.raises(ValueError, match="--view-table is for Open-I only"):
        read_pairs(folder / "reports.csv", view_table=folder / "reports.csv")
    (folder / "broken.jsonl").write_text(json.dumps(rows[0]) + "\n\n" + '{"image": "a.png", "report": }\n')
    with pytest.raises(ValueError, match=r"broken.jsonl line 3: not valid JSON \(Expecting value\); each line"):
        read_pairs(folder / "broken.jsonl")
    (folder / "list.jsonl").write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="list.jsonl: row 1 lacks an 'image' or 'report' column"):
        read_pairs(folder / "list.jsonl")
    (folder / "excel.csv").write_bytes(b"\xef\xbb\xbfimage,report\nimages/0000.png,5\n")  # a byte-order mark
    assert read_pairs(folder / "excel.csv") == [Pair(folder / "images/0000.png", "5")]
    (folder / "binary.csv").write_bytes(b"image,report\n\xff\xfe\x00a.png,x\n")
    with pytest.raises(ValueError, match=r"binary.csv: not UTF-8 text \(byte \d+: invalid start byte\)"):
        read_pairs(folder / "binary.csv")


def test_unknown_layouts(tmp_path):
    with pytest.raises(ValueError, match="does not exist: expected a .csv/.jsonl file"):
        read_pairs(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="is none of the known layouts.*ecgen-radiology"):
        read_pairs(tmp_path)
    with pytest.raises(ValueError, match="dataset='chexpert'"):
        read_pairs(tmp_path, dataset="chexpert")
    with pytest.raises(ValueError, match="lacks ecgen-radiology/"):
        read_pairs(tmp_path, dataset="openi")


# ----------------------------------------------------------------------------- preprocessing

def test_load_image_8bit_shape_range_channels(tmp_path):
    rng = np.random.default_rng(0)
    save = tmp_path / "noise.png"
    Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(save)
    x = load_image(save, 40)  # no resize: exactly the pixels, scaled
    assert x.shape == (3, 40, 40) and x.dtype == torch.float32
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])
    expected = torch.from_numpy(np.asarray(Image.open(save), dtype=np.float32)) / 255 * 2 - 1
    torch.testing.assert_close(x[0], expected, atol=1e-6, rtol=0)
    y = load_image(save, 16)  # resized: still in range, not constant
    assert y.shape == (3, 16, 16) and y.min() >= -1 and y.max() <= 1 and y.std() > 0.05


def test_load_image_16bit_keeps_contrast(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (64, 1))  # a horizontal 16-bit gradient
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    assert Image.open(tmp_path / "ramp16.png").mode.startswith("I")
    x = load_image(tmp_path / "ramp16.png", 64)[0]
    assert x.min() == -1 and x.max() == 1  # the full range, not clipped at 255
    assert torch.all(x[:, 1:] > x[:, :-1])  # every column brighter than the one before
    torch.testing.assert_close(x[0], torch.from_numpy(ramp[0] / 65535 * 2 - 1).float(), atol=1e-6, rtol=0)
    twelve = (np.tile(np.arange(64), (64, 1)) * 65).astype(np.uint16)  # 12-bit data (0..4095) in a 16-bit PNG
    Image.fromarray(twelve).save(tmp_path / "twelve.png")
    y = load_image(tmp_path / "twelve.png", 64)[0]  # divided by 4095, not 65535: not almost black
    torch.testing.assert_close(y[0], torch.from_numpy(twelve[0] / 4095 * 2 - 1).float(), atol=1e-6, rtol=0)
    dim = (np.tile(np.arange(64), (64, 1)) * 50 + 1000).astype(np.uint16)  # 1000..4150: 13 bits
    Image.fromarray(dim).save(tmp_path / "dim16.png")
    z = load_image(tmp_path / "dim16.png", 64)[0]
    torch.testing.assert_close(z[0], torch.from_numpy(dim[0] / 8191 * 2 - 1).float(), atol=1e-6, rtol=0)


def test_load_image_modes_agree(tmp_path):
    gray = np.random.default_rng(1).integers(0, 256, (24, 24), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "l.png")
    Image.fromarray(gray).convert("RGB").save(tmp_path / "rgb.png")
    Image.fromarray(gray).convert("RGB").save(tmp_path / "rgb.jpg", quality=100)
    Image.merge("RGBA", [Image.fromarray(gray)] * 3 + [Image.new("L", (24, 24), 0)]).save(tmp_path / "rgba.png")
    Image.merge("LA", [Image.fromarray(gray), Image.new("L", (24, 24), 255)]).save(tmp_path / "la.png")
    reference = load_image(tmp_path / "l.png", 16)
    for name in ("rgb.png", "rgba.png", "la.png"):
        torch.testing.assert_close(load_image(tmp_path / name, 16), reference, atol=1e-6, rtol=0)
    assert (load_image(tmp_path / "rgb.jpg", 16) - reference).abs().max() < 0.05  # lossy, but the same picture


@pytest.mark.parametrize("size, resolution, marker, box", [
    ((24, 16), 16, [(5, 11)], (5, 7)),              # wide, no resize: columns 4..19 kept
    ((16, 24), 16, [(9, 3)], (5, 3)),               # tall: rows 4..19 kept
    ((48, 32), 16, [(r, c) for r in range(9, 13) for c in range(21, 25)], (5, 7)),  # wide, halved: 4x4 -> about 1 pixel
])
def test_center_crop_geometry(tmp_path, size, resolution, marker, box):
    w, h = size
    img = np.zeros((h, w), dtype=np.uint8)
    for r, c in marker:
        img[r, c] = 255
    if w > h:  # markers at the ends of the long side: cropped away
        img[h // 2, [0, w - 1]] = 255
    else:
        img[[0, h - 1], w // 2] = 255
    Image.fromarray(img).save(tmp_path / "marker.png")
    x = load_image(tmp_path / "marker.png", resolution, crop="center")[0]
    assert divmod(int(x.argmax()), resolution) == box and x.max() > 0.9
    assert x.min() >= -1 and x.max() <= 1  # bicubic overshoots at the marker's edges: clamped
    if resolution == min(w, h):  # no resize: the marker is the one bright pixel left
        assert (x > -1).sum() == 1


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_pad_keeps_the_whole_chest(tmp_path, fmt):
    """The default: zero-pad the short side to square, then resize (RoentGen-v2); nothing is cut."""
    tall = np.full((64, 32), 200, dtype=np.uint8)  # a 32 wide, 64 high frontal film, bright
    tall[:4], tall[-4:] = 255, 255  # apices and costophrenic angles: the ends of the long side
    Image.fromarray(tall).save(tmp_path / f"tall.{fmt}", quality=95)
    x = load_image(tmp_path / f"tall.{fmt}", 32)[0]  # halved: the film is 16 wide, centred, black around it
    assert torch.equal(load_image(tmp_path / f"tall.{fmt}", 32, crop="pad")[0], x)
    assert (x[:, :8] == -1).all() and (x[:, 24:] == -1).all()  # the padding is zeros: black
    assert (x[:2, 8:24] > 0.9).all() and (x[-2:, 8:24] > 0.9).all()  # both ends of the long side kept
    assert (x[8:24, 9:23] - (200 / 255 * 2 - 1)).abs().max() < 0.05
    cut = load_image(tmp_path / f"tall.{fmt}", 32, crop="center")[0]
    assert (cut > 0.5).all() and (cut[:2] < 0.9).all()  # centre crop: the whole width, both ends lost
    with pytest.raises(ValueError, match="crop='middle': use 'pad'"):
        load_image(tmp_path / f"tall.{fmt}", 32, crop="middle")


def test_jpeg_decoded_at_reduced_size_looks_the_same(tmp_path, monkeypatch):
    """Draft mode decodes a 2544x3056 JPEG at 1/4 for R = 128 (and never below R): same picture."""
    y, x = np.mgrid[0:3056, 0:2544]
    film = (128 + 100 * np.sin(x / 300) * np.cos(y / 400)).astype(np.uint8)
    Image.fromarray(film).save(tmp_path / "big.jpg", quality=95)
    with Image.open(tmp_path / "big.jpg") as img:
        img.draft("L", (128, 128))
        assert img.size == (318, 382)  # 1/8: both sides still >= 128
    resized = []
    real = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda self, *a, **k: resized.append(self.size) or real(self, *a, **k))
    fast = load_image(tmp_path / "big.jpg", 128)[0]
    assert resized == [(318, 382)]  # load_image decoded it at 1/8
    full = Image.fromarray(film).resize((107, 128), Image.Resampling.BICUBIC)  # no draft, pad by hand
    slow = torch.full((128, 128), -1.0)
    slow[:, 10:117] = torch.from_numpy(np.asarray(full, dtype=np.float32)) / 255 * 2 - 1
    assert (fast - slow).abs().mean() < 0.01 and (fast - slow).abs().max() < 0.1


# ----------------------------------------------------------------------------- bad input

@pytest.fixture
def messy(tmp_path):
    good = tmp_path / "good.png"
    save_gray(good)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "corrupt.png").write_bytes(b"this is not an image at all, just text" * 10)
    save_gray(tmp_path / "other.png")
    return [Pair(good, "Normal chest."), Pair(tmp_path / "missing.png", "Left pleural effusion."),
            Pair(tmp_path / "empty.png", "Cardiomegaly."), Pair(tmp_path / "corrupt.png", "Right pneumothorax."),
            Pair(tmp_path / "other.png", "   "), Pair(good, "No acute process.")]


def test_bad_pairs_counted_and_skipped(messy, tmp_path):
    dataset = ImageReportDataset(messy, resolution=8)
    assert [p.report for p in dataset.pairs] == ["Normal chest.", "No acute process."]
    assert dataset.skipped == {"missing image": [tmp_path / "missing.png"], "zero-byte image": [tmp_path / "empty.png"],
                               "unreadable image": [tmp_path / "corrupt.png"], "empty report": [tmp_path / "other.png"]}
    summary = dataset.summary()
    assert "\n" not in summary and summary.startswith("2 of 6 image-report pairs used; skipped 4: 1 missing image (")
    assert str(tmp_path / "corrupt.png") in summary and "no tokenizer" in summary
    images_only = ImageReportDataset(messy, resolution=8, needs_report=False)  # train_vae.py reads no report
    assert [p.image for p in images_only.pairs] == [messy[0].image, tmp_path / "other.png", messy[0].image]
    item = dataset[1]
    assert item["report"] == "No acute process." and item["pixel_values"].shape == (3, 8, 8)


def test_strict_and_nothing_usable(messy, tmp_path):
    with pytest.raises(ValueError) as error:
        ImageReportDataset(messy, resolution=8, strict=True)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"pair 2 of 6: missing image {tmp_path / 'missing.png'}")
    with pytest.raises(ValueError, match=r"no usable image-report pair among the 4 read: skipped 4: 1 missing image"):
        ImageReportDataset(messy[1:5], resolution=8)
    with pytest.raises(ValueError, match="no usable image-report pair among the 0 read"):
        ImageReportDataset([], resolution=8)
    with pytest.raises(ValueError, match="positive multiple of 8"):
        ImageReportDataset(messy, resolution=100)


def test_truncated_file_found_at_load_time(tmp_path):
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])  # the header reads, the pixels do not
    pairs = [Pair(tmp_path / "cut.png", "Truncated file."), Pair(tmp_path / "whole.png", "Whole file.")]
    dataset = ImageReportDataset(pairs, resolution=16)
    assert len(dataset) == 2
    with pytest.warns(UserWarning, match="cannot decode .*cut.png.*using the next pair"):
        item = dataset[0]
    assert item["report"] == "Whole file."
    with pytest.raises(ValueError, match="cannot decode .*cut.png.*strict"):
        ImageReportDataset(pairs, resolution=16, strict=True)[0]


def test_dataloader_batches(messy):
    loader = torch.utils.data.DataLoader(ImageReportDataset(messy, resolution=8), batch_size=2)
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (2, 3, 8, 8) and batch["report"] == ["Normal chest.", "No acute process."]


# ----------------------------------------------------------------------------- truncation

class WordTokenizer:
    """Stub: one token per word, room for 5 between start and end."""
    max_length = 7

    def num_tokens(self, text):
        return len(text.split())


def test_truncation_counted_with_stub(messy):
    long = "one two three four five six seven"
    pairs = [Pair(messy[0].image, long), Pair(messy[0].image, "one two three"), Pair(messy[0].image, long),
             Pair(messy[0].image, "a b c d e f")]
    dataset = ImageReportDataset(pairs, resolution=8, tokenizer=WordTokenizer())
    assert [p.report for p in dataset.pairs] == [p.report for p in pairs]  # kept whole: the tokenizer cuts
    assert (dataset.num_truncated, dataset.num_truncated_reports) == (3, 2)
    assert dataset.summary().endswith("2 reports (3 pairs) longer than 5 tokens, cut there by the tokenizer")


def test_training_and_sample_cut_a_long_report_alike(messy):
    """One rule: CLIP's tokenizer cuts at the 75th token, inside a word if need be (transformers'
    truncation=True), and a training example of a long impression has exactly sample.py's ids."""
    tokenizer = pytest.importorskip("minroentgen.tokenizer").CLIPTokenizer.default()
    training = pytest.importorskip("minroentgen.training")
    long = extract_impression(MIMIC_LONG)
    assert tokenizer.num_tokens(long) > 75
    dataset = ImageReportDataset([Pair(messy[0].image, long)], resolution=8, tokenizer=tokenizer)
    assert dataset.pairs[0].report == long and dataset.num_truncated == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # training says it once, in the summary, not at every example
        example = training.PositionDataset(dataset, tokenizer, 0, (4, 1, 1), 1000, 0.0)[0]
    with pytest.warns(UserWarning, match="prompt truncated"):
        sampled = tokenizer(long)  # what sample.py feeds the text encoder
    assert torch.equal(example["input_ids"], sampled[0])
    # the reference cut: the first 75 BPE tokens of the whole text, then <|endoftext|>, even mid-word
    ids = tokenizer._tokenizer.encode(long, add_special_tokens=False).ids
    assert sampled[0].tolist() == [tokenizer.bos_id, *ids[:75], tokenizer.eos_id]
    # a report whose 75th token ends inside a word: whole-word cutting would differ from sample.py
    vocab = {i: t for t, i in tokenizer._tokenizer.get_vocab().items()}
    mid = "Pneumomediastinum. " * 40
    mid_ids = tokenizer._tokenizer.encode(mid, add_special_tokens=False).ids
    assert not vocab[mid_ids[74]].endswith("</w>")  # the 75th token is not a word's end
    example = training.PositionDataset(ImageReportDataset([Pair(messy[0].image, mid)], 8, tokenizer), tokenizer, 0,
                                       (4, 1, 1), 1000, 0.0)[0]
    assert example["input_ids"].tolist() == [tokenizer.bos_id, *mid_ids[:75], tokenizer.eos_id]


def test_reads_what_phantom_writes(tmp_path):
    phantom = pytest.importorskip("minroentgen.phantoms.phantom")
    if not hasattr(phantom, "write_dataset"):
        pytest.skip("phantom.write_dataset is not there yet")
    phantom.write_dataset(tmp_path / "phantoms", 3, size=64)
    dataset = ImageReportDataset(read_pairs(tmp_path / "phantoms" / "reports.csv"), resolution=32)
    assert len(dataset) == 3 and dataset.skipped == {}
    assert dataset[2]["pixel_values"].shape == (3, 32, 32) and dataset[2]["report"]


def test_cached_latents_skip_decoding(messy, tmp_path):
    """train.py --cache-latents marks cached images in shared memory; workers then decode nothing."""
    dataset = ImageReportDataset(messy, resolution=8)
    dataset.skip_pixels = torch.zeros(len(dataset), dtype=torch.bool).share_memory_()
    dataset.skip_pixels[0] = True
    messy[0].image.unlink()  # the file is gone: decoding it would fail
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        item = dataset[0]
    assert item["report"] == "Normal chest." and torch.equal(item["pixel_values"], torch.zeros(3, 8, 8))


def test_default_workers_share_the_cores(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_workers() == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert default_workers() == 1


@pytest.mark.usefixtures("one_thread")
def test_train_cache_latents_decodes_each_image_once(tmp_path, monkeypatch):
    phantom = pytest.importorskip("minroentgen.phantoms.phantom")
    train = pytest.importorskip("train")
    from minroentgen import dataset
    phantom.write_dataset(tmp_path / "phantoms", n=8, size=64, seed=0)
    decoded = []
    real = dataset.load_image
    monkeypatch.setattr(dataset, "load_image", lambda path, *a, **k: decoded.append(path) or real(path, *a, **k))
    args = ["--data", str(tmp_path / "phantoms" / "reports.csv"), "--init", "tiny", "--resolution", "32",
            "--batch-size", "4", "--max-steps", "4", "--num-workers", "0", "--sample-every", "0", "--val-prompts",
            "--save-every", "100", "--ema-decay", "0"]
    train.main([*args, "--out", str(tmp_path / "cached"), "--cache-latents"])
    assert len(decoded) == 8  # 2 epochs of 8 images, each decoded once
    train.main([*args, "--out", str(tmp_path / "plain")])
    assert len(decoded) == 8 + 16
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
              for run in ("cached", "plain")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)  # the same training, without the decoding


@pytest.mark.usefixtures("one_thread")
def test_train_cli_errors_are_one_line_and_help_names_the_downloads(openi, tmp_path, capsys):
    train = pytest.importorskip("train")
    base = ["--init", "tiny", "--resolution", "32", "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as error:
        train.main(["--data", str(openi), "--view-table", str(tmp_path), *base])
    assert str(error.value) == f"train.py: error: {tmp_path} is a folder; a view table needs the columns 'imageid' " \
                               "and 'View Position' (or 'tsne-view'), like torchxrayvision's nlmcxr_dicom_metadata.csv.gz"
    root = tmp_path / "mimic-cxr-jpg"
    write_mimic_jpg(root)
    with pytest.raises(SystemExit) as error:  # no reports anywhere
        train.main(["--data", str(root), *base])
    assert "\n" not in str(error.value) and "3 missing report" in str(error.value)
    assert "--reports" in str(error.value) and "mimic-cxr-reports.zip" in str(error.value)
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    usage = " ".join(capsys.readouterr().out.split())
    for words in ("MIMIC-CXR-JPG v2.0.0", "mimic-cxr-reports.zip of MIMIC-CXR v2.0.0", "--reports", "NLMCXR_png.tgz",
                  "NLMCXR_reports.tgz", "nlmcxr_dicom_metadata.csv.gz", "nlmcxr_tsne_pa.csv.gz",
                  "pad = zero-pad the short side", "(default, as RoentGen-v2)"):
        assert words in usage, words


# ----------------------------------------------------------------------------- prompt templates

V2 = "{age} year old {race} {sex}. {report}"  # RoentGen-v2's


def test_demographic_words_as_roentgen_v2_writes_them():
    from minroentgen import prompts
    # MIMIC-IV's race strings -> RoentGen-v2's one capitalised word; unknowns -> None
    races = {"WHITE": "WHITE", "White": "WHITE", "white - other european": "WHITE",
             "BLACK/AFRICAN AMERICAN": "BLACK", "BLACK/CAPE VERDEAN": "BLACK",
             "African American": "BLACK", "ASIAN - CHINESE": "ASIAN", "HISPANIC OR LATINO": "HISPANIC",
             "HISPANIC/LATINO - PUERTO RICAN": "HISPANIC", "SOUTH AMERICAN": "HISPANIC",
             "AMERICAN INDIAN/ALASKA NATIVE": "OTHER", "MULTIPLE RACE/ETHNICITY": "OTHER",
             "OTHER": "OTHER", "UNKNOWN": None, "UNABLE TO OBTAIN": None,
             "PATIENT DECLINED TO ANSWER": None, "  ": None, None: None}
    assert {r: prompts.race(r) for r in races} == races
    sexes = {"F": "female", "f": "female", "Female": "female", "M": "male", "MALE": "male",
             "U": None, "": None}
    assert {s: prompts.sex(s) for s in sexes} == sexes
    ages = {"65": "65", 65: "65", "64.9": "64", 91.0: "91", "": None, "abc": None, "-3": None,
            "nan": None}
    assert {a: prompts.age(a) for a in ages} == ages
    # one race a patient: the most frequent known one; unknowns never count
    black = [("2180-01-01", "WHITE"), ("2181-01-01", "BLACK/AFRICAN AMERICAN"),
             ("2182-01-01", "BLACK/CAPE VERDEAN")] + [("", "UNKNOWN")] * 3
    assert prompts.patient_race(black) == "BLACK"
    # a tie: the race of the latest admission (not the last row, not the alphabetically first)
    tie = [("2181-05-05", "WHITE - RUSSIAN"), ("2180-01-01", "HISPANIC OR LATINO")]
    assert prompts.patient_race(tie) == "WHITE"
    assert prompts.patient_race([("", "WHITE"), ("", "ASIAN")]) == "ASIAN"  # no times: alphabetical
    assert prompts.patient_race([("2180-01-01", "UNABLE TO OBTAIN")]) is None


@pytest.fixture
def demographic_table(tmp_path):
    """A CSV of 5 images with age, gender and race columns (and one more, site); 2 are unusable."""
    for name in "abcde":
        save_gray(tmp_path / f"{name}.png")
    write_csv(tmp_path / "data.csv", ["image", "report", "age", "gender", "race", "site"], [
        ["a.png", "Small left pleural effusion.", "65", "F", "White", "ward 1"],
        ["b.png", "No acute process.", "40.7", "m", "BLACK/AFRICAN AMERICAN", "ED"],
        ["c.png", "Cardiomegaly.", "", "F", "ASIAN", "ICU"],
        ["d.png", "Right pneumothorax.", "70", "U", "UNKNOWN", "ICU"],
        ["e.png", "Normal chest.", "33", "M", "Hispanic/Latino - Dominican", "ED"]])
    return tmp_path / "data.csv"


def test_template_filled_from_csv_columns(demographic_table, tmp_path):
    dataset = ImageReportDataset(read_pairs(demographic_table), resolution=8, template=V2)
    assert [p.report for p in dataset.pairs] == ["65 year old WHITE female. Small left pleural effusion.",
                                                 "40 year old BLACK male. No acute process.",
                                                 "33 year old HISPANIC male. Normal chest."]
    assert dataset[1]["report"] == "40 year old BLACK male. No acute process."  # what training reads
    assert dataset.skipped == {"missing age": [tmp_path / "c.png"],
                               "missing race and sex": [tmp_path / "d.png"]}
    summary = dataset.summary()
    assert "\n" not in summary
    assert summary.startswith("3 of 5 image-report pairs used; skipped 2: 1 missing age (")
    assert "1 missing race and sex" in summary
    # any other column is a field as written, {{ }} are braces; without a template the report alone
    site = ImageReportDataset(read_pairs(demographic_table), resolution=8,
                              template="{{{site}}} {gender}: {report}")
    assert site.pairs[0].report == "{ward 1} F: Small left pleural effusion." and len(site.pairs) == 5
    plain = ImageReportDataset(read_pairs(demographic_table), resolution=8)
    assert plain.pairs[0].report == "Small left pleural effusion."
    with pytest.raises(ValueError) as error:
        ImageReportDataset(read_pairs(demographic_table), resolution=8, template=V2, strict=True)
    assert str(error.value).startswith(f"pair 3 of 5: missing age {tmp_path / 'c.png'} (strict")


def test_template_from_jsonl_prefers_age_and_sex_over_anchor_age_and_gender(tmp_path):
    save_gray(tmp_path / "a.png")
    rows = [{"image": "a.png", "report": "Normal.", "age": 70, "anchor_age": 50, "sex": "female",
             "gender": "M", "race": "asian - korean"},
            {"image": "a.png", "report": "Edema.", "anchor_age": 80, "gender": "M", "race": "OTHER"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = ImageReportDataset(read_pairs(tmp_path / "d.jsonl"), resolution=8, template=V2)
    # the table has an age (and a sex) key, so row 2, which lacks them, misses them
    assert [p.report for p in dataset.pairs] == ["70 year old ASIAN female. Normal."]
    assert list(dataset.skipped) == ["missing age and sex"]
    (tmp_path / "e.jsonl").write_text(json.dumps(rows[1]) + "\n")
    dataset = ImageReportDataset(read_pairs(tmp_path / "e.jsonl"), resolution=8, template=V2)
    assert [p.report for p in dataset.pairs] == ["80 year old OTHER male. Edema."]


@pytest.mark.parametrize("template, says", [
    ("{age} year old {ethnicity} {sex}. {report}",
     "uses {ethnicity}, which this data lacks; available: {report}, {age}, {gender}, {race}, {site}, "
     "{sex} (age, sex and race come"),
    ("{age:>3} {report}", "{age:>3} is not a plain named field"),
    ("{age!r} {report}", "{age!r} is not a plain named field"),
    ("{} {report}", "{} is not a plain named field"),
    ("{age.real} {report}", "{age.real} is not a plain named field"),
    ("{age {report}", "write {{ and }} for a literal brace"),
    (" ", "--prompt-template is empty"),
])
def test_bad_templates_are_one_line_errors(template, says, demographic_table):
    with pytest.raises(ValueError) as error:
        ImageReportDataset(read_pairs(demographic_table), resolution=8, template=template)
    assert says in str(error.value) and "\n" not in str(error.value)


MIMIC_IV_PATIENTS = [("10000032", "F", 52), ("10000898", "M", 91), ("10000764", "F", 40)]
MIMIC_IV_ADMISSIONS = [  # 10000032: BLACK twice, WHITE once, unknown 3 times; 10000898: a tie
    ("10000032", "2180-01-01 10:00:00", "WHITE"), ("10000032", "2180-02-01 10:00:00", "BLACK/AFRICAN AMERICAN"),
    ("10000032", "2180-03-01 10:00:00", "BLACK/CAPE VERDEAN"), ("10000032", "2180-04-01 10:00:00", "UNKNOWN"),
    ("10000032", "2180-05-01 10:00:00", "UNKNOWN"), ("10000032", "2180-06-01 10:00:00", "UNABLE TO OBTAIN"),
    ("10000898", "2181-05-05 08:00:00", "WHITE - RUSSIAN"),
    ("10000898", "2180-01-01 08:00:00", "HISPANIC OR LATINO"), ("10000764", "2180-01-01 08:00:00", "ASIAN")]


def write_mimic_iv(folder, gz=".gz", module="hosp", race_column="race", patients=MIMIC_IV_PATIENTS,
                   admissions=MIMIC_IV_ADMISSIONS):
    """MIMIC-IV's patients and admissions tables (the columns read, and a few more)."""
    (folder / module).mkdir(parents=True, exist_ok=True)
    write_csv(folder / module / f"patients.csv{gz}", ["subject_id", "gender", "anchor_age", "anchor_year"],
              [[s, g, a, 2180] for s, g, a in patients])
    write_csv(folder / module / f"admissions.csv{gz}", ["subject_id", "hadm_id", "admittime", race_column],
              [[s, 20000000 + n, t, r] for n, (s, t, r) in enumerate(admissions)])
    return folder


@pytest.mark.parametrize("gz, module, race_column, give", [
    (".gz", "hosp", "race", "root"), ("", "hosp", "race", "hosp"), (".gz", "core", "ethnicity", "root")],
    ids=["gz-root", "csv-hosp", "v1-core-ethnicity"])
def test_mimic_joined_with_mimic_iv(gz, module, race_column, give, tmp_path):
    root = tmp_path / "mimic-cxr-jpg"
    write_mimic_jpg(root)
    reports = write_mimic_reports("zip", root)
    mimic_iv = write_mimic_iv(tmp_path / "mimiciv" / "3.1", gz, module, race_column)
    demographics = mimic_iv if give == "root" else mimic_iv / module
    plain = read_pairs(root, reports=reports)
    dataset = ImageReportDataset(read_pairs(root, reports=reports, demographics=demographics),
                                 resolution=8, template=V2)
    # train split, frontal: two images of 10000032 (2 BLACK over 1 WHITE; 3 unknowns do not count),
    # one of 10000898 (WHITE and HISPANIC once each: the latest admission's); anchor_age is the age
    assert [p.report for p in dataset.pairs] == [f"52 year old BLACK female. {plain[0].report}",
                                                 f"52 year old BLACK female. {plain[1].report}",
                                                 f"91 year old WHITE male. {plain[2].report}"]
    assert [p.image for p in dataset.pairs] == [p.image for p in plain]
    validate = read_pairs(root, split="validate", reports=reports, demographics=demographics)
    dataset = ImageReportDataset(validate, resolution=8, template="{sex}, {age}: {report}")
    assert [p.report for p in dataset.pairs] == [f"female, 40: {validate[0].report}"]


def test_mimic_patients_missing_from_mimic_iv_are_skipped_and_counted(tmp_path):
    root = tmp_path / "mimic-cxr-jpg"
    write_mimic_jpg(root)
    write_mimic_reports("inside", root)
    mimic_iv = write_mimic_iv(tmp_path / "mimiciv", patients=[("10000032", "F", 52)],  # not 10000898
                              admissions=[("10000032", "2180-01-01", "UNKNOWN"),
                                          ("10000898", "2180-01-01", "ASIAN")])
    pairs = read_pairs(root, demographics=mimic_iv)
    assert [p.fields for p in pairs] == [{"age": "52", "sex": "female", "race": None}] * 2 + \
        [{"age": None, "sex": None, "race": "ASIAN"}]
    dataset = ImageReportDataset(pairs, resolution=8, template="{race} {report}")
    assert [p.report.split()[0] for p in dataset.pairs] == ["ASIAN"]
    assert dataset.summary().startswith("1 of 3 image-report pairs used; skipped 2: 2 missing race (")
    dataset = ImageReportDataset(pairs, resolution=8, template="{age} {sex} {report}")
    assert list(dataset.skipped) == ["missing age and sex"] and len(dataset.pairs) == 2
    with pytest.raises(ValueError, match=r"^pair 1 of 3: missing race .*02aa804e.* \(strict"):
        ImageReportDataset(pairs, resolution=8, template=V2, strict=True)
    with pytest.raises(ValueError, match=r"no usable image-report pair among the 3 read: skipped 3: "
                                         r"2 missing race"):
        ImageReportDataset(pairs, resolution=8, template=V2)
    # without --demographics MIMIC-CXR has only the report; wrong folders are one-line errors
    with pytest.raises(ValueError, match=r"uses \{age\}, \{race\}, \{sex\}, which this data lacks; "
                                         r"available: \{report\} \(.*--demographics"):
        ImageReportDataset(read_pairs(root), resolution=8, template=V2)
    for bad, says in ((tmp_path, "lacks hosp/patients.csv.gz: give MIMIC-IV's folder"),
                      (tmp_path / "nowhere", "nowhere does not exist"),
                      (mimic_iv / "hosp" / "patients.csv.gz", "is a file")):
        with pytest.raises(ValueError, match=says):
            read_pairs(root, demographics=bad)
    (mimic_iv / "hosp" / "admissions.csv.gz").write_bytes(b"\x1f\x8b\x08\x00broken")
    with pytest.raises(ValueError, match="admissions.csv.gz cannot be read .* download it again"):
        read_pairs(root, demographics=mimic_iv)
    write_csv(mimic_iv / "hosp" / "admissions.csv.gz", ["subject_id", "admittime"], [["10000032", ""]])
    with pytest.raises(ValueError, match="admissions.csv.gz has no column 'race' or 'ethnicity'"):
        read_pairs(root, demographics=mimic_iv)
    with pytest.raises(ValueError, match="--demographics .* is for MIMIC-CXR only; give age, sex and race"):
        read_pairs(tmp_path / "x.csv", "csv", demographics=mimic_iv)
