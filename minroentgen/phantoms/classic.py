"""The "classic" report style: radiology-style impressions derived from the phantoms' labels.

Each finding has a dozen or more paraphrases in real report phrasing (word order, synonyms, prefixes and
hedges, the side before or after the noun; most written by a helper who never saw evaluate.py's unseen
prompts, so that those stay a test of wording the model was not taught); a report states every finding present
(side, size, zone filled in from the labels, so it can never contradict them), negates a few absent
ones ("No pneumothorax.", "No effusion or edema.", "..., without pulmonary edema."), sometimes lists two
or three devices in one sentence, uses a normal-study phrase when nothing but devices is present, and
varies the sentence order, the words for a size ("trace", "3 cm") and shorthand ("R PTX", "LLL"), as
radiologists do. Frozen: data sets and recipes depend on its bytes (reports.py picks the style).
"""
import re

import numpy as np

# Paraphrases per finding; {side} {size} {zone} come from the labels, so a sentence cannot contradict them
# (for a nodule or consolidation {side} and {end} name its zone another way: "left upper" = the left apex).
SAY = {
    "pleural_effusion": ["{size} {side} pleural effusion.", "{Side}-sided effusion, {size}.",
                         "There is a {size} {side} pleural effusion.", "{size} {side} effusion.",
                         "{size} pleural effusion on the {side}.",
                         "{Side}-sided pleural effusion, which appears {size}.",
                         "Effusion, {side}-sided, {size} in volume.",
                         "{size} layering {side} pleural fluid is noted.",
                         "Blunting of the {side} costophrenic angle, compatible with a {size} effusion.",
                         "Redemonstrated {size} {side} pleural effusion.", "New {size} effusion at the {side} base.",
                         "Evidence of a {size} {side}-sided pleural effusion.",
                         "{size} {side} pleural fluid collection is again seen.",
                         "Findings are compatible with a {size} pleural effusion at the {side} lung base.",
                         "Meniscus-shaped density at the {side} base, likely a {size} pleural effusion.",
                        "{size} pleural effusion in the {side} hemithorax.",
                        "Pleural effusion on the {side}, {size} and unchanged.",
                        "{size} effusion at the {side} lung base, new since the prior study.",
                        "Pleural fluid within the {side} pleural space, {size} in amount.",
                        "There is a {size} amount of pleural fluid layering in the {side} hemithorax.",
                        "Fluid is seen in the {side} pleural space, consistent with a {size} effusion.",
                        "{size} pleural effusion blunting the {side} costophrenic angle.",
                        "Persistent {size} pleural effusion at the {side} base, unchanged from prior.",
                        "A {size} effusion is present on the {side}, slightly increased compared with the prior exam.",
                        "Pleural effusion, {side}, {size}.",
                        "{size} pleural effusion tracking along the {side} lateral chest wall.",
                        "Pleural effusion within the {side} hemithorax, which is {size} and new since the prior "
                        "radiograph.",
                        "Effusion on the {side} side is {size}, without mediastinal shift.",
                        "A {size} pleural effusion is again seen at the base of the {side} lung.",
                        "Pleural effusion on the {side}, {size} in size.",
                        "Pleural effusion, {side}-sided, of {size} volume.",
                        "Effusion at the {side} base, {size}.",
                        "Pleural effusion on the {side} side, {size} in extent.",
                        "Effusion in the {side} pleural space, of {size} size.",
                        "Pleural effusion, {size}, layering at the {side} lung base.",
                        "Pleural fluid collection on the {side}, which appears {size} in volume.",
                        "Effusion is noted in the {side} hemithorax and is {size}."],
    "bilateral_effusion": ["{size} bilateral pleural effusions.", "Bilateral {size} effusions.",
                           "{size} pleural effusions on both sides.",
                           "There are {size} bilateral pleural effusions.",
                           "{size} pleural effusions are present bilaterally.",
                           "Bilateral {size} pleural effusions are again seen.",
                           "{size} effusions at both lung bases.",
                           "Blunting of both costophrenic angles, compatible with {size} bilateral effusions.",
                           "Redemonstrated {size} bilateral layering pleural fluid.",
                           "New {size} pleural effusions, bilateral.",
                           "Evidence of {size} bilateral pleural fluid collections.",
                           "Pleural effusions are noted on both sides and are {size}.",
                           "Findings of {size} bilateral effusions, likely layering on this supine film.",
                           "{size} fluid collections in both pleural spaces.",
                          "{size} pleural effusions in both hemithoraces.",
                          "Pleural effusions, bilateral, {size}.",
                          "{size} pleural effusions on the left and right, unchanged.",
                          "Pleural fluid layering within both pleural spaces, {size} in amount.",
                          "There are {size} effusions on the right and left sides without mediastinal shift.",
                          "{size} pleural effusions blunting both costophrenic angles, new since the prior study.",
                          "Pleural effusions involving both the left and right hemithoraces, each {size}.",
                          "Effusions of {size} volume are seen at the left and right lung bases, stable from prior."],
    "small_effusion": ["Blunting of the {side} costophrenic angle, likely a small effusion."],
    "small_bilateral_effusion": ["Blunting of both costophrenic angles, likely small bilateral effusions."],
    "pneumothorax": ["{size} {side} pneumothorax.", "{Side}-sided pneumothorax, {size}.",
                     "There is a {size} {side} pneumothorax.",
                     "{size} {side} pneumothorax with a visible pleural line.",
                     "There is a {size} {side} apical pneumothorax.", "{size} pneumothorax on the {side}.",
                     "{Side}-sided pneumothorax, which appears {size}.", "New {size} {side} pneumothorax is seen.",
                     "Redemonstrated {size} {side}-sided pneumothorax.",
                     "A visceral pleural line is seen at the {side} apex, compatible with a {size} pneumothorax.",
                     "Evidence of a {size} pneumothorax along the {side} lateral chest wall.",
                     "Deep sulcus sign on the {side}, suspicious for a {size} pneumothorax.",
                     "{size} {side} pneumothorax is again seen without mediastinal shift.",
                     "Pneumothorax at the {side} apex, {size} in size.",
                     "There is likely a {size} {side} pneumothorax.",
                    "{size} pneumothorax in the {side} hemithorax.",
                    "{size} apical pneumothorax on the {side}, new since the prior study.",
                    "Pneumothorax, {side}, {size}.",
                    "There is a {size} pneumothorax involving the {side} lung apex without mediastinal shift.",
                    "A {size} pneumothorax is seen within the {side} pleural space, unchanged from prior.",
                    "Pneumothorax on the {side} side, which is {size} and new since the prior radiograph.",
                    "{size} pneumothorax at the {side} lung apex with a visible visceral pleural line.",
                    "Persistent pneumothorax in the {side} chest, {size} in size.",
                    "There is a {size} pneumothorax on the {side}, slightly increased compared with the prior exam.",
                    "Pneumothorax is again seen at the {side} apex and remains {size}.",
                    "{size} pneumothorax over the {side} lung, without evidence of tension.",
                    "Pneumothorax tracking along the {side} lateral chest wall, {size} and stable.",
                    "Pneumothorax on the {side}, {size}.",
                    "Pneumothorax on the {side} side, {size} in extent.",
                    "Pneumothorax of {size} size on the {side}.",
                    "Pneumothorax, {side}-sided, {size} in amount.",
                    "Apical pneumothorax on the {side}, {size} in amount.",
                    "Pneumothorax is present on the {side} and is {size}.",
                    "Pneumothorax of {size} extent at the {side} apex with a visible pleural line.",
                    "Pneumothorax, {size}, at the {side} apex.",
                    "Pneumothorax identified on the {side} side, {size} in size, without tension.",
                    "Pneumothorax, {size} in amount, along the {side} lateral chest wall.",
                    "Pneumothorax in the {side} pleural space, of {size} size.",
                    "Pneumothorax noted at the {side} lung apex, {size} and new.",
                    "Pneumothorax, {side}-sided and {size}.",
                    "Pneumothorax is seen on the {side}, which appears {size} in extent."],
    "cardiomegaly": ["Cardiomegaly.", "The heart is enlarged.", "Enlarged cardiac silhouette.",
                     "The cardiac silhouette is enlarged.", "Cardiomegaly is present.",
                     "Mild cardiomegaly is noted.", "There is cardiac enlargement.",
                     "Stable cardiomegaly is again seen.", "Evidence of heart enlargement.",
                     "The cardiac silhouette is enlarged, compatible with cardiomegaly.",
                     "Findings of an enlarged heart."],
    "consolidation": ["Consolidation in the {zone} lobe.", "{zone} lobe consolidation.",
                      "Patchy opacity in the {zone} zone, concerning for pneumonia.",
                      "{zone} zone airspace opacity, consistent with pneumonia.",
                      "There is consolidation in the {zone} lobe.",
                      "Airspace opacity in the {zone} lung zone, compatible with pneumonia.",
                      "Focal consolidation of the {zone} lobe, suspicious for pneumonia.",
                      "New {zone} lobe airspace disease.",
                      "Redemonstrated {zone} lobe opacification compatible with consolidation.",
                      "Patchy opacities in the {zone} zone, likely pneumonia.",
                      "Evidence of {zone} lobe infiltrate, concerning for pneumonia.",
                      "Findings of airspace consolidation in the {zone} lobe.", "{zone} lobe pneumonia.",
                      "Dense consolidation with air bronchograms is seen in the {zone} lobe.",
                      "Ill-defined opacity in the {zone} lung, which may represent pneumonia.",
                      "Consolidation of the {zone} lung.",
                      "Consolidation of the airspaces is seen in the {zone} lung field.",
                      "Lobar consolidation involving the {zone} lobe.",
                      "Focal airspace opacity in the {zone} zone, compatible with pneumonia.",
                      "Consolidation is present within the {zone} lung field, with air bronchograms.",
                      "In the {zone} lung there is focal airspace consolidation.",
                      "{zone} lung zone consolidation, suspicious for infection.",
                      "Consolidation of the airspaces, {zone} lobe, likely pneumonia.",
                      "Focal airspace opacity projecting over the {zone} lung, which may reflect pneumonia.",
                      "The {zone} lobe is consolidated, consistent with lobar pneumonia.",
                      "Consolidation at the {side} {end}.", "Airspace opacity at the {side} lung {end}, likely pneumonia.",
                      "{Side} {end} consolidation, concerning for pneumonia.",
                      "Patchy airspace disease in the {side} {end}.",
                      "There is consolidation at the {side} lung {end}.",
                      "{Side} {end}: focal airspace consolidation.",
                      "Hazy opacity projecting over the {side} {end}, which may reflect pneumonia.",
                      "Pneumonia at the {side} {end}.",
                      "New consolidative opacity in the {side} lung {end}."],
    "edema": ["Pulmonary edema.", "Bilateral perihilar haziness, consistent with pulmonary edema.",
              "Findings consistent with pulmonary edema.", "Perihilar opacities suggesting pulmonary edema.",
              "Mild pulmonary edema.", "Findings are compatible with pulmonary edema.",
              "Pulmonary vascular congestion with mild interstitial edema.",
              "Evidence of diffuse alveolar pulmonary edema.", "New pulmonary edema is noted.",
              "Redemonstrated interstitial pulmonary edema.",
              "Kerley B lines and peribronchial cuffing suggest interstitial edema.",
              "Cephalization of the pulmonary vessels, likely mild edema.", "Findings of worsening pulmonary edema.",
              "Pulmonary edema is again seen, compatible with volume overload.",
              "Perihilar haziness suspicious for pulmonary edema."],
    "endotracheal_tube": ["Endotracheal tube in standard position.",
                          "The endotracheal tube terminates above the carina.", "ET tube in place.",
                          "The endotracheal tube tip is 4 cm above the carina.",
                          "ET tube terminates approximately 5 cm above the carina.",
                          "ET tube in satisfactory position.",
                          "New endotracheal tube with tip at the level of the clavicular heads.",
                          "Redemonstrated endotracheal tube, unchanged in position.",
                          "Interval placement of an endotracheal tube, tip well above the carina.",
                          "The patient is intubated, with the ET tube tip projecting over the mid trachea.",
                          "Endotracheal tube is noted, terminating 3 cm above the carina.",
                          "There is an endotracheal tube in appropriate position.",
                          "Endotracheal tube tip could be advanced 2 cm for optimal positioning."],
    "central_venous_line": ["Right internal jugular central venous line with tip in the SVC.",
                            "Central venous catheter in place.", "Central line terminates in the SVC.",
                            "Central venous catheter with tip in the superior vena cava.",
                            "There is a central venous line terminating at the cavoatrial junction.",
                            "Central line in place, tip in the distal SVC.",
                            "PICC-type central catheter with tip projecting over the mid SVC.",
                            "New central venous catheter is noted in standard position.",
                            "Redemonstrated internal jugular central venous catheter, unchanged.",
                            "A central line is seen, terminating in the superior vena cava.",
                            "Central venous catheter tip projects over the cavoatrial junction.",
                            "Peripherally inserted central catheter with its tip in the lower SVC.",
                            "Interval placement of a central venous line with tip at the SVC.",
                            "Subclavian central venous catheter terminates in the superior vena cava.",
                            "Tunneled central catheter is present, tip in satisfactory position.",
                            "Left subclavian central line, tip in the SVC.",
                            "Right IJ central line terminating in the lower SVC.",
                            "A left internal jugular central venous catheter ends at the cavoatrial junction.",
                            "Right subclavian central venous catheter in standard position."],
    "pacemaker": ["Left-sided pacemaker with leads in the heart.", "Cardiac pacemaker in place.",
                  "Dual-lead pacemaker.", "Dual-lead pacemaker in place.",
                  "Pacemaker generator projects over the anterior chest wall.",
                  "Redemonstrated pacemaker device, unchanged.", "There is a dual-chamber pacemaker.",
                  "Single-lead pacemaker is noted.", "Status post pacemaker placement.",
                  "New pacemaker with leads terminating in expected positions.",
                  "Transvenous pacemaker leads are seen, unchanged in position.",
                  "Pacemaker/ICD device is again seen.",
                  "Evidence of a chest wall pacemaker generator with intact leads.",
                  "Implanted pacemaker device with leads in stable position.",
                  "Pacemaker leads project over the right atrium and right ventricle.",
                  "Right-sided pacemaker with a single lead in the right ventricle.",
                  "Dual-chamber pacer with atrial and ventricular leads.",
                  "Pacemaker with its lead tip projecting over the right ventricle.",
                  "Left pectoral pacemaker generator, leads unchanged in the right heart."],
    "nodule": ["{size} nodule in the {zone} lobe.", "A {size} {zone} lobe nodule.",
               "{zone} zone nodular opacity, {size}.", "There is a {size} pulmonary nodule in the {zone} zone.",
               "There is a {size} pulmonary nodule in the {zone} lobe.", "A {size} {zone} lobe nodule is noted.",
               "{size} nodular density projecting over the {zone} lung zone.",
               "New {size} nodule in the {zone} zone, recommend CT for further evaluation.",
               "Redemonstrated {size} {zone} lobe nodule.",
               "Evidence of a {size} well-circumscribed nodule in the {zone} lobe.",
               "{size} {zone} lobe pulmonary nodule, suspicious for malignancy.",
               "A {size} nodule is again seen in the {zone} lung.",
               "Findings of a {size} calcified nodule in the {zone} lobe, likely granuloma.",
               "{size} spiculated nodule in the {zone} lobe is present.",
               "Ill-defined {size} nodular focus in the {zone} lobe.",
               "Pulmonary nodule in the {zone} lobe, {size}.",
               "Nodule in the {zone} lung field, {size} in size.",
               "Lung nodule of {size} diameter in the {zone} zone.",
               "Solitary pulmonary nodule in the {zone} lung, which is {size}.",
               "Nodular opacity within the {zone} lung zone, {size} in dimension.",
               "Rounded nodular opacity projecting over the {zone} lung field, which is {size} in overall dimension.",
               "Mass-like nodule, {size}, within the {zone} lobe.",
               "Nodule, {size}, in the {zone} lung.",
               "Pulmonary nodule of {size} size projecting over the {zone} lung zone.",
               "Nodule that is {size} in diameter, located in the {zone} lobe.",
               "Solitary pulmonary nodule, {size} on measurement, in the {zone} lung field.",
               "In the {zone} zone there is a nodular opacity, {size} in its greatest dimension.",
               "{zone} lung nodule, which measures {size}.",
               "The {zone} lobe contains a rounded opacity of {size} size, compatible with a pulmonary nodule.",
               "Lung nodule seen in the {zone} lung zone on the frontal view, {size} by measurement.",
               "Nodule of {size} dimension is identified at the {zone} lung, well circumscribed.",
               "{size} nodule at the {side} {end}.", "A {size} pulmonary nodule at the {side} lung {end}.",
               "{Side} {end}: {size} rounded nodule.", "{size} nodular opacity at the {side} lung {end}.",
               "There is a {size} nodule projecting over the {side} {end}.",
               "Nodule at the {side} {end}, {size}, recommend CT.",
               "{Side} {end} nodule, {size}.",
               "A {size} well-defined nodule is seen at the {side} lung {end}.",
               "Pulmonary nodule of {size} size at the {side} {end}.",
               "{size} spiculated mass-like nodule in the {side} lung {end}."],
}
# Other words for a size, in a quarter of the sentences that state one ("trace" only of fluid or air).
SIZES = {"pleural_effusion": {"small": ["trace", "tiny", "minimal"], "moderate": ["medium-sized", "moderate-volume"],
                              "large": ["massive", "very large", "large-volume"]},
         "pneumothorax": {"small": ["trace", "tiny", "minimal"], "large": ["very large", "moderate to large"]},
         "nodule": {"small": ["tiny", "subcentimeter", "5 mm", "7 mm"], "large": ["sizable", "3 cm", "4 cm"]}}
# Shorthand, in some sentences: "trace R PTX", "LLL consolidation", "L IJ CVC" (lobes always, the rest half the time).
SHORT = [(r"\b(right|left) (upper|lower) lobe\b", lambda m: f"{m[1][0]}{m[2][0]}L".upper()),
         (r"\bpneumothorax\b", "PTX"), (r"\b(right|left)(?=[ -][a-z])", lambda m: m[1][0].upper()),
         (r"\bendotracheal tube\b", "ETT"), (r"\bcentral venous (line|catheter)\b", "CVC"),
         (r"\binternal jugular\b", "IJ"), (r"\bsuperior vena cava\b", "SVC")]
# Absent findings named in a list: "No effusion or pneumothorax." or "..., without pulmonary edema."
NOUNS = {"pleural_effusion": ["pleural effusion", "effusion", "pleural fluid"], "pneumothorax": ["pneumothorax", "PTX"],
         "cardiomegaly": ["cardiomegaly", "cardiac enlargement"], "edema": ["pulmonary edema", "edema"],
         "consolidation": ["focal consolidation", "consolidation", "pneumonia"], "nodule": ["nodules", "suspicious nodule"]}
# Device names for one sentence that lists two or three devices ("Support devices: ETT and central line.").
DEVICE_NAMES = {"endotracheal_tube": ["endotracheal tube", "ET tube", "ETT"],
                "central_venous_line": ["central venous line", "right IJ central line", "left subclavian central line",
                                        "central venous catheter", "right subclavian central line"],
                "pacemaker": ["pacemaker", "dual-lead pacemaker", "left chest wall pacemaker", "cardiac pacer"]}
DEVICE_LISTS = ["Support devices: {list}.", "Lines and tubes: {list}, in standard position.", "{list} in place.",
                "Support devices including {list} are unchanged.", "Stable position of the {list}.",
                "Interval placement of {list}.", "Devices: {list}, each in expected position.",
                "The {list} are in satisfactory position."]
NEGATE = {  # said only of findings that are absent
    "pleural_effusion": ["No pleural effusion.", "No effusion.", "No pleural effusions are seen.",
                         "Costophrenic angles are clear without effusion.", "No evidence of pleural fluid."],
    "pneumothorax": ["No pneumothorax.", "No evidence of pneumothorax.", "No pneumothorax is identified.",
                     "No apical pneumothorax is seen."],
    "cardiomegaly": ["Heart size is normal.", "Normal heart size.", "The cardiac silhouette is normal in size.",
                     "No cardiomegaly.", "No cardiac enlargement is seen."],
    "consolidation": ["No focal consolidation.", "No airspace disease.", "No pneumonia is identified.",
                      "No focal opacity to suggest pneumonia."],
    "edema": ["No pulmonary edema.", "No evidence of pulmonary edema.", "No evidence of interstitial edema.",
              "No edema or vascular congestion.", "Pulmonary vasculature is normal without edema."],
    "nodule": ["No pulmonary nodules.", "No suspicious nodule is identified.", "No nodules or masses are seen.",
               "No discrete nodular lesion."],
}
NORMAL = ["No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality.", "Lungs are clear.",
          "No acute intrathoracic process.",
          "The lungs are clear without focal consolidation, effusion, or pneumothorax.", "The lungs are clear.",
          "The cardiomediastinal silhouette is within normal limits.", "No acute intrathoracic abnormality.",
          "Normal study without acute findings.", "Clear lungs with normal mediastinal contours.",
          "Unremarkable chest x-ray.",
          "The chest film is normal.",
          "This is an unremarkable study.",
          "Normal examination of the chest.",
          "The radiograph is unremarkable, with no acute abnormality.",
          "The x-ray of the chest appears normal.",
          "Unremarkable frontal chest radiograph.",
          "The examination is normal.",
          "Overall, a normal chest x-ray study."]


def write_classic(labels: dict, rng: np.random.Generator) -> str:
    """An impression derived from the labels: one paraphrased sentence per finding, a few negations of
    absent findings, a normal-study phrase when nothing but devices is present; sentence order varies."""
    said = []
    for name, attrs in labels.items():
        if name == "support_devices":
            devices = attrs["devices"]
            if len(devices) > 1 and rng.random() < 0.5:  # all in one sentence
                names = [pick(rng, DEVICE_NAMES[d]) for d in rng.permutation(devices)]
                listed = ", ".join(names[:-1]) + " and " + names[-1]
                said.append(capitalise(pick(rng, DEVICE_LISTS).format(list=listed)))
            else:
                said += [pick(rng, SAY[d]) for d in devices]
            continue
        key = name
        if name == "pleural_effusion":
            key = "bilateral_effusion" if attrs["side"] == "bilateral" else name
            if attrs["size"] == "small" and rng.random() < 0.3:
                key = "small_" + key.replace("pleural_effusion", "effusion")
        if "size" in attrs and rng.random() < 0.25:  # not "trace bilateral": blind set 2 has that prompt
            words = [w for w in SIZES[name][attrs["size"]] if attrs.get("side") != "bilateral" or w != "trace"]
            attrs = {**attrs, "size": pick(rng, words)}
        said.append(fill(pick(rng, SAY[key]), attrs))
    rng.shuffle(said)
    if not set(labels) - {"support_devices"}:
        said.insert(int(rng.integers(len(said) + 1)), pick(rng, NORMAL))
    absent = list(rng.permutation([n for n in NEGATE if n not in labels])[: int(rng.integers(0, 3))])
    negs = [pick(rng, NEGATE[n]) for n in absent]
    if absent and rng.random() < 0.5:  # named together, in a sentence of their own or after a finding's
        nouns = [pick(rng, NOUNS[n]) for n in absent]
        nouns = nouns[0] if len(nouns) == 1 else ", ".join(nouns[:-1]) + " or " + nouns[-1]
        negs = [f"No {nouns}."]
        plain = [k for k, sentence in enumerate(said) if " without " not in sentence and sentence not in NORMAL]
        if plain and rng.random() < 0.6:
            k = pick(rng, plain)
            joint = " without {}." if rng.random() < 0.5 else pick(rng, [", no {}.", "; no {}."])
            said[k], negs = said[k][:-1] + joint.format(nouns), []
    said = [shorten(s, rng) if s not in NORMAL and rng.random() < 0.3 else s for s in said + negs]
    if rng.random() < 0.3:
        rng.shuffle(said)
    prefix = pick(rng, ["IMPRESSION: ", "Impression: "]) if rng.random() < 0.1 else ""
    return prefix + " ".join(said)


def pick(rng, options: list) -> str:
    return options[int(rng.integers(len(options)))]


def fill(template: str, attrs: dict) -> str:
    zone = attrs.get("zone", "")
    side, level = zone.split() if zone else (attrs.get("side", ""), "")
    end = {"upper": "apex", "lower": "base"}.get(level, "")  # "nodule at the left apex" = zone "left upper"
    return capitalise(template.format(side=side, Side=side.capitalize(), size=attrs.get("size", ""), zone=zone, end=end))


def shorten(sentence: str, rng) -> str:
    for k, (pattern, short) in enumerate(SHORT):
        if k == 0 or rng.random() < 0.5:  # SHORT[0], the lobes: always
            sentence = re.sub(pattern, short, sentence, flags=re.I)
    return sentence


def capitalise(sentence: str) -> str:
    return sentence[0].upper() + sentence[1:]
