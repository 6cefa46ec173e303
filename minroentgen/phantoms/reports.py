"""Radiology-style impressions for the phantoms, derived from their labels (see phantom.py), in
one of three styles: "classic" (classic.py, frozen: data sets and recipes depend on its bytes),
"clinical" (clinical.py, issue 30: constructions of real impressions that the classic one lacks)
or "mixed" (either).
"""
import numpy as np

from .classic import NORMAL, SAY, fill, write_classic  # NORMAL, SAY, fill: judge.py reads them here

STYLES = ("classic", "clinical", "mixed")


def write_report(labels: dict, rng: np.random.Generator, style: str = "classic") -> str:
    """An impression derived from the labels, in one of STYLES: "classic" (classic.py, the wording
    of every data set written before issue 30; byte-identical for a given rng), "clinical"
    (clinical.py, only real-report constructions) or "mixed" (classic if rng.random() < 0.5, else
    clinical)."""
    if style not in STYLES:
        raise ValueError(f"report style must be one of {STYLES}, got {style!r}")
    if style == "mixed":
        style = "classic" if rng.random() < 0.5 else "clinical"
    if style == "classic":
        return write_classic(labels, rng)
    from .clinical import write_clinical  # here: an older classic.py (weights/README's recipes) lacks its imports
    return write_clinical(labels, rng)
