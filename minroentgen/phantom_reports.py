"""Radiology-style impressions for the phantoms, derived from their labels (see phantom.py).

Each finding has several paraphrases in real report phrasing; a report states every finding present
(side, size, zone filled in from the labels, so it can never contradict them), negates a few absent
ones ("No pneumothorax."), uses a normal-study phrase when nothing but devices is present, and varies
the sentence order, as radiologists do.
"""
import numpy as np

# Paraphrases per finding; {side} {size} {zone} come from the labels, so a sentence cannot contradict them.
SAY = {
    "pleural_effusion": ["{size} {side} pleural effusion.", "{Side}-sided effusion, {size}.",
                         "There is a {size} {side} pleural effusion.", "{size} {side} effusion."],
    "bilateral_effusion": ["{size} bilateral pleural effusions.", "Bilateral {size} effusions.",
                           "{size} pleural effusions on both sides.", "There are {size} bilateral pleural effusions."],
    "small_effusion": ["Blunting of the {side} costophrenic angle, likely a small effusion."],
    "small_bilateral_effusion": ["Blunting of both costophrenic angles, likely small bilateral effusions."],
    "pneumothorax": ["{size} {side} pneumothorax.", "{Side}-sided pneumothorax, {size}.",
                     "There is a {size} {side} pneumothorax.", "{size} {side} pneumothorax with a visible pleural line."],
    "cardiomegaly": ["Cardiomegaly.", "The heart is enlarged.", "Enlarged cardiac silhouette.",
                     "The cardiac silhouette is enlarged."],
    "consolidation": ["Consolidation in the {zone} lobe.", "{zone} lobe consolidation.",
                      "Patchy opacity in the {zone} zone, concerning for pneumonia.",
                      "{zone} zone airspace opacity, consistent with pneumonia."],
    "edema": ["Pulmonary edema.", "Bilateral perihilar haziness, consistent with pulmonary edema.",
              "Findings consistent with pulmonary edema.", "Perihilar opacities suggesting pulmonary edema."],
    "endotracheal_tube": ["Endotracheal tube in standard position.", "The endotracheal tube terminates above the carina.",
                          "ET tube in place."],
    "central_venous_line": ["Right internal jugular central venous line with tip in the SVC.",
                            "Central venous catheter in place.", "Central line terminates in the SVC."],
    "pacemaker": ["Left-sided pacemaker with leads in the heart.", "Cardiac pacemaker in place.",
                  "Dual-lead pacemaker."],
    "nodule": ["{size} nodule in the {zone} lobe.", "A {size} {zone} lobe nodule.", "{zone} zone nodular opacity, {size}.",
               "There is a {size} pulmonary nodule in the {zone} zone."],
}
NEGATE = {  # said only of findings that are absent
    "pleural_effusion": ["No pleural effusion.", "No effusion."],
    "pneumothorax": ["No pneumothorax."],
    "cardiomegaly": ["Heart size is normal.", "Normal heart size.", "The cardiac silhouette is normal in size."],
    "consolidation": ["No focal consolidation."],
    "edema": ["No pulmonary edema.", "No evidence of pulmonary edema."],
    "nodule": ["No pulmonary nodules."],
}
NORMAL = ["No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality.", "Lungs are clear.",
          "No acute intrathoracic process.", "The lungs are clear without focal consolidation, effusion, or pneumothorax."]


def write_report(labels: dict, rng: np.random.Generator) -> str:
    """An impression derived from the labels: one paraphrased sentence per finding, a few negations of
    absent findings, a normal-study phrase when nothing but devices is present; sentence order varies."""
    said = []
    for name, attrs in labels.items():
        if name == "support_devices":
            said += [pick(rng, SAY[d]) for d in attrs["devices"]]
            continue
        key = name
        if name == "pleural_effusion":
            key = "bilateral_effusion" if attrs["side"] == "bilateral" else name
            if attrs["size"] == "small" and rng.random() < 0.3:
                key = "small_" + key.replace("pleural_effusion", "effusion")
        said.append(fill(pick(rng, SAY[key]), attrs))
    rng.shuffle(said)
    if not set(labels) - {"support_devices"}:
        said.insert(int(rng.integers(len(said) + 1)), pick(rng, NORMAL))
    absent = [n for n in NEGATE if n not in labels]
    negs = [pick(rng, NEGATE[n]) for n in rng.permutation(absent)[: int(rng.integers(0, 3))]]
    if "No pleural effusion." in negs and "No pneumothorax." in negs:
        negs = [n for n in negs if n not in ("No pleural effusion.", "No pneumothorax.")] + ["No pleural effusion or pneumothorax."]
    said = said + negs
    if rng.random() < 0.3:
        rng.shuffle(said)
    return " ".join(said)


def pick(rng, options: list) -> str:
    return options[int(rng.integers(len(options)))]


def fill(template: str, attrs: dict) -> str:
    zone = attrs.get("zone", "")
    text = template.format(side=attrs.get("side", ""), Side=attrs.get("side", "").capitalize(),
                           size=attrs.get("size", ""), zone=zone)
    return text[0].upper() + text[1:]
