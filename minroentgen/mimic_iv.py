"""MIMIC-IV demographics for MIMIC-CXR: each subject_id's age, sex and race (prompts.py's words),
for RoentGen-v2's prompt template "{age} year old {race} {sex}. {report}" (train.py --demographics).
"""
from pathlib import Path

from . import prompts as P
from .tables import csv_rows


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
    rows = csv_rows(patients)
    header = next(rows, [])
    subject, gender, anchor_age = (_columns(patients, header, n)
                                   for n in ("subject_id", "gender", "anchor_age"))
    for row in rows:
        if subjects is None or subject(row) in subjects:
            out[subject(row)] = {"age": P.age(anchor_age(row)), "sex": P.sex(gender(row)),
                                 "race": None}
    rows = csv_rows(admissions)
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
