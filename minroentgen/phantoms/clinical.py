"""The "clinical" report style (issue 30): only constructions of real chest X-ray impressions that
the classic style (classic.py) lacks: negation lists, numbered items, Fleischner-glossary synonyms
("mass", "airspace disease"), device names (AICD, PICC), XXXX de-identification tokens, hedges,
comparisons, lower or upper case.

Written from general radiology usage and the Fleischner Society glossary (Hansell et al., Radiology
2008: a nodule is <= 3 cm, a mass > 3 cm; "airspace disease", "infiltrate" for consolidation), never
from the benchmark's reports. A finding is a noun phrase (CLINICAL_NP) put into a frame: plain, a
comparison with a prior study dated by the de-identification token XXXX (as in Open-I), a hedge.
The devices' words say only what phantoms draw (findings.py): the central line comes down the
RIGHT neck into the SVC; the pacemaker sits on the LEFT chest wall, two leads in the right heart.
"""
import re

import numpy as np

from .classic import SHORT, capitalise, pick

CLINICAL_SIZES = {"pleural_effusion": {"small": ["small", "small", "tiny", "trace"],
                                       "moderate": ["moderate"], "large": ["large"]},
                  "pneumothorax": {"small": ["small", "small", "tiny", "trace"],
                                   "large": ["large"]},
                  "nodule": {"small": ["small", "subcentimeter", "6 mm", "8 mm"],
                             "large": ["large", "3 cm"]},
                  "mass": {"large": ["large", "4 cm", "5 cm"]}}
AREA = {"upper": ["upper lobe", "upper lung", "apical"],
        "lower": ["basilar", "lower lobe", "lower lung"]}
CLINICAL_NP = {  # {lobe}: "left lower lobe"; {area}: "basilar", "apical", ... (AREA) of that zone
    "pleural_effusion": ["{size} {side} pleural effusion", "{size} {side} effusion",
                         "{size} {side}-sided pleural effusion",
                         "{size} amount of {side} pleural fluid"],
    "bilateral_effusion": ["{size} bilateral pleural effusions", "{size} bilateral effusions",
                           "{size} amount of bilateral pleural fluid"],
    "pneumothorax": ["{size} {side} pneumothorax", "{size} {side} apical pneumothorax",
                     "{size} {side}-sided pneumothorax",
                     "{size} amount of {side} apical pleural air"],
    "cardiomegaly": ["cardiomegaly", "mild cardiomegaly", "enlarged cardiac silhouette",
                     "cardiac enlargement", "moderate cardiomegaly"],
    "consolidation": ["{lobe} airspace disease", "{side} {area} airspace disease",
                      "{lobe} airspace opacity", "{side} {area} opacity", "{lobe} infiltrate",
                      "{side} {area} consolidation", "focal {lobe} consolidation",
                      "{side} {area} airspace opacity"],
    "edema": ["interstitial edema", "pulmonary vascular congestion with interstitial edema",
              "alveolar edema", "interstitial pulmonary edema", "mild pulmonary edema",
              "vascular congestion and mild edema"],
    "nodule": ["{size} {lobe} nodule", "{size} {side} {area} nodule",
               "{size} {lobe} pulmonary nodule", "{size} {side} {area} nodular opacity"],
    "mass": ["{lobe} mass", "{side} {area} mass", "{size} {lobe} mass"],  # > 3 cm: large only
}
FRAMES = ["{Np}.", "{Np}.", "{Np} again seen.", "Stable {np}.",
          "{Np}, essentially unchanged from XXXX.", "{Np}, stable since XXXX.", "New {np}.",
          "{Np}, new compared with the prior study.", "Interval improvement in {np}.",
          "Likely {np}.", "Findings compatible with {np}."]
CLINICAL_SAY = {  # hedges of one finding (or variant), besides the FRAMES
    "small_effusion": ["Blunting of the {side} costophrenic angle, likely {np}.",
                       "Blunting of the {side} costophrenic angle, which may represent {np}."],
    "small_bilateral_effusion": ["Blunting of both costophrenic angles, likely {np}."],
    "pneumothorax": ["{Np} without evidence of tension."],
    "cardiomegaly": ["Heart size is enlarged.", "The cardiac silhouette is enlarged.",
                     "Heart size is mildly enlarged."],
    "consolidation": ["{Np}, possibly pneumonia.", "{Np}, which may represent pneumonia.",
                      "{Np}, worrisome for pneumonia.", "{Np}, compatible with pneumonia.",
                      "Likely {lobe} pneumonia."],
    "edema": ["{Np}, compatible with CHF.", "{Np}, likely fluid overload.", "CHF with {np}.",
              "Fluid overload with {np}."],
    "nodule": ["{Np}, recommend CT for further evaluation."],
    "small_nodule": ["{Np}, which may represent a granuloma."],
    "mass": ["{Np}, concerning for neoplasm."],
}
CLINICAL_DEVICE_NP = {
    "endotracheal_tube": ["ET tube", "ETT", "endotracheal tube"],
    "central_venous_line": ["right IJ central line", "right internal jugular central line",
                            "right IJ catheter", "central venous catheter", "PICC line",
                            "right-sided PICC", "right IJ dialysis catheter",
                            "right IJ XXXX catheter", "XXXX catheter"],
    "pacemaker": ["AICD", "dual-lead pacemaker", "pacer", "cardiac device", "ICD", "defibrillator",
                  "dual-lead ICD", "pacemaker"],
}
DEVICE_FRAMES = ["{Np} in place.", "{Np} in satisfactory position.", "Stable {np}.",
                 "{Np}, unchanged from XXXX.", "Interval placement of {np}."]
CLINICAL_DEVICE_SAY = {
    "endotracheal_tube": ["{Np} tip {cm} cm above the carina.",
                          "{Np} with tip {cm} cm above the carina."],
    "central_venous_line": ["{Np} tip in the SVC.", "{Np} with tip in the SVC.",
                            "{Np} terminating in the SVC."],
    "pacemaker": ["Left chest wall {np}.",
                  "Left-sided {np} with leads in the right atrium and right ventricle.",
                  "{Np} with leads in expected position."],
}
NEG_NOUNS = {  # absent findings in real negation lists: "No X or Y.", "Negative for X, Y or Z."
    "pleural_effusion": ["pleural effusion", "effusion", "large effusion", "pleural fluid"],
    "pneumothorax": ["pneumothorax"], "cardiomegaly": ["cardiomegaly"],
    "consolidation": ["focal consolidation", "focal airspace disease", "infiltrate", "pneumonia"],
    "edema": ["edema", "pulmonary edema", "CHF", "vascular congestion"],
    "nodule": ["nodule", "mass", "pulmonary nodule", "suspicious pulmonary nodule"],
}
NEG_FRAMES = ["No {list}.", "No {list}.", "No evidence of {list}.", "Negative for {list}.",
              "No definite {list}.", "No {list} is seen."]
NEG_ONE = ["{Noun} is not seen.", "{Noun} is not identified.", "{Noun} not seen."]
NORMAL_HEART = ["Heart size is normal.", "Normal heart size.", "Heart size within normal limits."]
CLINICAL_NORMAL = ["No acute cardiopulmonary abnormality.", "No acute cardiopulmonary disease.",
                   "No acute disease.", "No active disease.", "Negative chest x-ray.",
                   "No acute pulmonary findings."]
OTHERWISE = ["Otherwise no significant interval change.", "Otherwise unchanged from XXXX.",
             "Otherwise stable since XXXX."]  # stability remarks, only beside a finding


def write_clinical(labels: dict, rng: np.random.Generator) -> str:
    """An impression in real report style: negation lists ("No X or Y", "Negative for ...", "X is
    not seen", "... without X"), negatives first or last, numbered items ("1. No pneumothorax.
    2. ..."), the synonyms of CLINICAL_NP, hedges and comparisons with XXXX dates, lower or upper
    case, no final period. Every finding present is stated with its side, size and zone; normal
    statements only when nothing but devices is present; only absent findings are negated."""
    disease = [n for n in labels if n != "support_devices"]
    absent = [n for n in NEG_NOUNS if n not in labels]
    absent = list(rng.permutation(absent)[: int(rng.integers(0, 4))]) if absent else []
    said = [clinical_finding(n, labels[n], rng) for n in disease]
    rng.shuffle(said)
    if absent and said and rng.random() < 0.25:  # "Small left effusion without pneumothorax."
        said[0] = (said[0][1] + pick(rng, [" without ", ", no "]) + neg_list(absent, rng) + ".",)
        absent = []
    said = [s[0] for s in said]
    if not disease:
        said.append(pick(rng, CLINICAL_NORMAL))
    elif rng.random() < 0.15:
        said.append(pick(rng, OTHERWISE))
    if "support_devices" in labels:
        devices = clinical_devices(labels["support_devices"]["devices"], rng)
        said = devices + said if rng.random() < 0.3 else said + devices
    if len(absent) > 1 and rng.random() < 0.3:  # one sentence each
        negs = [negation([n], rng) for n in absent]
    else:
        negs = [negation(absent, rng)] if absent else []
    said = negs + said if rng.random() < 0.5 else said + negs  # "No pneumothorax. Small ..."
    said = [re.sub(*SHORT[0], s, flags=re.I) if rng.random() < 0.2 else s for s in said]  # "RLL"
    if len(said) > 1 and rng.random() < 0.35:
        said = [f"{k}. {s}" for k, s in enumerate(said, 1)]
    if rng.random() < 0.1:
        said.insert(0, "Comparison XXXX.")
    text = " ".join(said)
    case = rng.random()
    if case < 0.1:
        text = text.lower().replace("xxxx", "XXXX")
    elif case < 0.2:
        text = text.upper()
    return text[:-1] if rng.random() < 0.2 else text


def clinical_finding(name: str, attrs: dict, rng) -> tuple:
    """(sentence, its noun phrase capitalised) for a finding present: the size word drawn once,
    "mass" only for a large nodule, costophrenic blunting only for a small effusion."""
    large = name == "nodule" and attrs["size"] == "large"
    keys = ["mass"] if large and rng.random() < 0.5 else [name]
    sizes = CLINICAL_SIZES.get(keys[0], {}).get(attrs.get("size"), [""])
    if name == "pleural_effusion" and attrs["side"] == "bilateral":  # no "trace bilateral"
        keys, sizes = ["bilateral_effusion"], [w for w in sizes if w != "trace"]
    if attrs.get("size") == "small" and name != "pneumothorax":
        keys.append("small_" + keys[0].replace("pleural_", ""))
    zone = attrs.get("zone", "")
    side, level = zone.split() if zone else (attrs.get("side", ""), "")
    words = dict(side=side, Side=side.capitalize(), size=pick(rng, sizes), lobe=f"{zone} lobe",
                 area=pick(rng, AREA[level]) if level else "")
    np_ = pick(rng, CLINICAL_NP[keys[0]]).format(**words)
    sentence = pick(rng, FRAMES + [t for k in keys for t in CLINICAL_SAY.get(k, [])])
    return capitalise(sentence.format(np=np_, Np=capitalise(np_), **words)), capitalise(np_)


def clinical_devices(devices: list, rng) -> list:
    """One sentence per device, or (half the time, if several) one sentence listing them."""
    names = [pick(rng, CLINICAL_DEVICE_NP[d]) for d in devices]
    order = rng.permutation(len(devices))
    if len(devices) > 1 and rng.random() < 0.5:
        listed = [names[k] for k in order]
        listed = ", ".join(listed[:-1]) + " and " + listed[-1]
        return [capitalise(pick(rng, DEVICE_FRAMES).format(np=listed, Np=capitalise(listed)))]
    return [capitalise(pick(rng, DEVICE_FRAMES + CLINICAL_DEVICE_SAY[devices[k]]).format(
        np=names[k], Np=capitalise(names[k]), cm=pick(rng, ["3", "4", "5"]))) for k in order]


def negation(names: list, rng) -> str:
    """A sentence negating the absent findings `names`."""
    if names == ["cardiomegaly"] and rng.random() < 0.5:
        return pick(rng, NORMAL_HEART)
    if len(names) == 1 and rng.random() < 0.3:
        return capitalise(pick(rng, NEG_ONE).format(Noun=pick(rng, NEG_NOUNS[names[0]])))
    return pick(rng, NEG_FRAMES).format(list=neg_list(names, rng))


def neg_list(names: list, rng) -> str:
    """"X", "X or Y", "X, Y or Z" (sometimes "X, Y, or Z")."""
    nouns = [pick(rng, NEG_NOUNS[n]) for n in names]
    if len(nouns) == 1:
        return nouns[0]
    last = pick(rng, [" or ", ", or "]) if len(nouns) > 2 else " or "
    return ", ".join(nouns[:-1]) + last + nouns[-1]
