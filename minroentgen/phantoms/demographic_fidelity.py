"""Demographic fidelity: do samples show the age and sex that their prompts ask for?

RoentGen-v2 (Moroianu et al. 2025, arXiv 2508.16783) checks its samples' sex, age and race, predicted
by classifiers on the image, against the prompt's (its inference discards samples that disagree); here the demographic reader
(demographic_reader.py) reads sex and age (phantoms show no race, so race is only written into the
prompt, never judged). A fixed grid: every age of AGES x both sexes x each report of REPORTS, the
race cycling through RoentGen-v2's words, each prompt the model's saved template (sampling.json's
prompt_template, else prompts.V2_TEMPLATE) filled with them. Per prompt: sex accuracy, age mean
absolute error, ages within 10 years; and, beside them, text control as judge.py reads it (the
report's finding present, anything unprompted) with the phantom reader.

The real baseline (sd=None) renders demographic phantoms of the same age, sex and findings in place
of samples: how well the reader reads real phantoms, the ceiling of the samples' scores.
"""
import zlib
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from .. import prompts as T
from . import demographic_reader as DR
from . import demographics as DG
from . import judge as E
from . import phantom as P
from . import reader as R

AGES = (25, 45, 65, 85)
LABELS = ({}, {"pleural_effusion": {"side": "left", "size": "small"}}, {"cardiomegaly": {}})
REPORTS = [(p.text, p.labels) for lab in LABELS for p in E.PROMPTS  # judge.py's trained wording
           if p.wording == "trained" and p.labels == lab]
REAL_SEED = 26_026  # phantoms of the baseline: a stream no reader trains on


@dataclass(frozen=True)
class Case:
    text: str      # the prompt
    report: str
    labels: dict
    age: int
    sex: str
    race: str
    wording: str = "demographic"  # for judge.write_grid


def cases(template: str | None = None) -> list:
    """The grid of prompts: REPORTS x AGES x sexes, race cycling; `template` (None: the v2 one)
    may use age, sex, race and report only (else a one-line ValueError)."""
    template = template or T.V2_TEMPLATE
    T.check_template(template, ["age", "sex", "race"])
    out = []
    for report, labels in REPORTS:
        for age in AGES:
            for sex in DG.SEXES:
                race = T.RACES[len(out) % 4]  # WHITE, BLACK, ASIAN, HISPANIC in turn
                fields = {"age": str(age), "sex": sex, "race": race, "report": report}
                out.append(Case(T.fill(template, fields), report, labels, age, sex, race))
    return out


def real_images(case: Case, n: int, size: int) -> np.ndarray:
    """n demographic phantoms (different patients) of the case's findings, age and sex, uint8."""
    key = zlib.crc32(f"{case.labels}|{case.age}|{case.sex}".encode())
    imgs = []
    for i in range(n):
        rng = np.random.default_rng([REAL_SEED, key, i])
        person = DG.sample_person(rng, age=case.age, sex=case.sex, race=case.race)
        imgs.append(E._at(P.render(case.labels, max(size, P.MIN_SIZE), rng, person), size))
    return np.stack(imgs)


def run(sd, dreader, reader, cases_: list, seeds: int = 8, seed: int = 0, size: int = 128,
        progress: bool = True, **settings):
    """Sample `seeds` images per case (or, sd=None, render demographic phantoms at `size` px), read
    them at the readers' 128 px. Returns ({"prompts": rows, "groups": rows}, images per case)."""
    rows, images = [], []
    for c in tqdm(cases_, desc="demographic prompts", disable=not progress):
        imgs = real_images(c, seeds, size) if sd is None else \
            E.samples_of(sd, c.text, seeds, seed, **settings)
        x = E.resize(imgs, R.SIZE)[:, 0].mul(255).numpy()  # as judge.py reads: area down, bilinear up
        p_female, age = DR.predict(dreader, x)
        n = len(imgs)
        rows.append({"text": c.text, "report": c.report, "age": c.age, "sex": c.sex, "race": c.race,
                     **DR.scores(p_female, age, np.full(n, c.sex == "female"), np.full(n, c.age)),
                     "age_read": float(np.mean(age)), "n": n,
                     "finding": E.judge(R.predict(reader, x), c.labels)})
        images.append(imgs)
    return {"prompts": rows, "groups": groups(rows)}, images


def groups(rows: list) -> list:
    """Means over the prompts of each sex, each age and all (every prompt has the same n)."""
    def mean(sel, key):
        return float(np.mean([r[key] for r in sel]))

    def present(sel):
        asked = [r["finding"] for r in sel if r["finding"]["present"] is not None]
        return sum(f["present"] for f in asked) / sum(f["n"] for f in asked) if asked else None
    out = []
    for name, sel in ([(s, [r for r in rows if r["sex"] == s]) for s in DG.SEXES]
                      + [(f"age {a}", [r for r in rows if r["age"] == a]) for a in AGES]
                      + [("all", rows)]):
        if sel:
            out.append({"group": name, "prompts": len(sel), "samples": sum(r["n"] for r in sel),
                        **{k: mean(sel, k) for k in ("sex_accuracy", "age_mae", "age_within_10",
                                                     "age_read")},
                        "present": present(sel),
                        "unprompted": sum(r["finding"]["unprompted"] for r in sel)
                        / sum(r["n"] for r in sel)})
    return out


def table(report: dict) -> str:
    """The groups as a markdown table."""
    def pct(v):
        return "–" if v is None else f"{100 * v:.0f}%"
    lines = ["| group | prompts | samples | sex accuracy | age MAE (years) | age within 10 years "
             "| mean age read | finding present | unprompted |", "|" + " --- |" * 9]
    for g in report["groups"]:
        lines.append(f"| {'**all**' if g['group'] == 'all' else g['group']} | {g['prompts']} | "
                     f"{g['samples']} | {pct(g['sex_accuracy'])} | {g['age_mae']:.1f} | "
                     f"{pct(g['age_within_10'])} | {g['age_read']:.0f} | {pct(g['present'])} | "
                     f"{pct(g['unprompted'])} |")
    return "\n".join(lines) + "\n"
