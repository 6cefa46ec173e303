"""Real radiologists' words: Open-I (IU X-ray) impressions as a text-control benchmark.

Each prompt is a real report's IMPRESSION; its phantom labels come from the report's MeSH *major*
terms (the `<MeSH><major>` elements of ecgen-radiology/*.xml, e.g. "Pleural Effusion/left/small":
a heading, then qualifiers). Minor terms are not read. The rule is conservative: a study is kept
only if

  1. it has an IMPRESSION and at least one major term, and EVERY major term maps to a phantom label
     by the table below (its qualifiers supply side, size and zone; a qualifier the table does not
     allow for that heading excludes the study, as does a missing side/size/zone);
  2. the impression affirms each label: the finding's words (WORDS) occur in a clause that does not
     negate or hedge them ("no", "without", "negative for", "resolved", "removed", "possible",
     "cannot exclude", "versus", ..., scoped to the end of the clause: "but", "however", "with",
     ";", "." end it; or "has resolved", "is not seen", "no longer" after them);
  3. the impression affirms no finding or device the labels lack (WORDS again), so a sample that
     draws what the text says is never counted unprompted; "normal" studies affirm none.

  major term (heading)                 label                  qualifiers allowed (others exclude)
  normal (the only term)               {}                     -
  Pleural Effusion                     pleural_effusion       left|right|bilateral and small|moderate|
                                         {side, size}         large (both needed); base, costophrenic
                                                              angle, posterior
  Pneumothorax                         pneumothorax           left|right and small|large; apex
                                         {side, size}
  Cardiomegaly                         cardiomegaly           none, mild, moderate, severe ("borderline"
                                                              excludes)
  Pulmonary Edema                      edema                  none, interstitial, mild, moderate,
                                                              bilateral, diffuse
  Consolidation, Airspace Disease,     consolidation {zone}   left|right and upper lobe (upper) or lower
    Pneumonia (the airspace                                   lobe|base (lower); lung, focal. Middle
    consolidation the phantom draws)                          lobe, lingula, bilateral, patchy... exclude
  Nodule                               nodule {zone, size:    zone as above (apex: upper); "small"
                                         small}               needed; lung, round
  Mass (Fleischner: > 3 cm; the        nodule {zone, size:    zone as above; lung, large, round
    phantom's large nodule is 3-4 cm)    large}
  Tube, Inserted                       endotracheal_tube      trachea or "trachea, carina" (needed)
  Catheters, Indwelling                central_venous_line    none, left, right, thorax, anterior
  Implanted Medical Device             pacemaker (named in    none, left, right, thorax, heart
                                         the impression: 2.)
Devices are merged into one support_devices label. Two terms that give one finding different
attributes (a left and a right effusion) exclude the study. Anything else (Opacity, Granuloma,
Pulmonary Atelectasis, Pulmonary Congestion, Infiltrate, Surgical Instruments, No Indexing...)
excludes it.

Halves: a study is "dev" or "heldout" by the parity of sha256("openi:" + id); no choice is ever
made on the held-out half. Normal studies are far more common than the rest (about 1,200 of 3,955),
so each half keeps only the NORMALS_PER_HALF normal ones of smallest hash.

The frozen selection (ids, labels, halves; never the report text) is docs/openi_benchmark.json;
the texts are read at evaluation time from the user's copy of the Open-I reports:

    python -m minroentgen.phantoms.openi NLMCXR_reports.tgz --out docs/openi_benchmark.json
    python evaluate.py --openi NLMCXR_reports.tgz          # or a folder holding ecgen-radiology/,
    python evaluate.py --openi torchxrayvision             # or the copy in that package's data/
"""
import argparse
import hashlib
import importlib.util
import json
import re
import sys
import tarfile
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

from . import phantom as P

BENCHMARK = Path(__file__).resolve().parents[2] / "docs" / "openi_benchmark.json"
NORMALS_PER_HALF = 10
SIDES = ("left", "right")
LEVELS = {"upper lobe": "upper", "apex": "upper", "lower lobe": "lower", "base": "lower"}

# ----------------------------------------------------------------------------- reading the reports


class OpenIError(ValueError):
    pass


def locate(path) -> Path:
    """PATH as given (a .tgz or a folder), or "torchxrayvision": that installed package's
    data/NLMCXR_reports.tgz, found without importing the package."""
    if str(path) == "torchxrayvision":
        spec = importlib.util.find_spec("torchxrayvision")
        if spec is None or not spec.submodule_search_locations:
            raise OpenIError("torchxrayvision is not installed here; give the path of NLMCXR_reports.tgz")
        path = Path(list(spec.submodule_search_locations)[0]) / "data" / "NLMCXR_reports.tgz"
    path = Path(path)
    if not path.exists():
        raise OpenIError(f"{path}: no such file or folder; give NLMCXR_reports.tgz, a folder holding "
                         "ecgen-radiology/, or torchxrayvision")
    return path


def _xmls(path: Path):
    """(file name, XML bytes) of every ecgen-radiology/*.xml in a .tgz or a folder."""
    if path.is_dir():
        folder = path / "ecgen-radiology"
        if not folder.is_dir():
            raise OpenIError(f"{path} holds no ecgen-radiology/ folder (the unpacked NLMCXR_reports.tgz)")
        for f in sorted(folder.glob("*.xml")):
            yield f.name, f.read_bytes()
        return
    try:
        with tarfile.open(path) as tar:
            for m in tar:
                parts = m.name.split("/")
                if m.isfile() and len(parts) >= 2 and parts[-2] == "ecgen-radiology" and m.name.endswith(".xml"):
                    yield parts[-1], tar.extractfile(m).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise OpenIError(f"{path} is not a readable .tgz of the Open-I reports ({e})") from None


def _clean(text) -> str:
    return " ".join((text or "").split())


def read_reports(path) -> dict:
    """{id (the XML's file name): (impression, [major MeSH terms])} of every Open-I report."""
    reports = {}
    for name, data in _xmls(locate(path)):
        try:
            root = ET.fromstring(data)
        except ET.ParseError as e:
            raise OpenIError(f"{path}: {name} is not valid XML ({e})") from None
        sections = {el.get("Label", "").upper(): _clean(el.text) for el in root.iter("AbstractText")}
        majors = [_clean(m.text) for mesh in root.iter("MeSH") for m in mesh.iter("major")]
        reports[name] = (sections.get("IMPRESSION", ""), majors)
    if not reports:
        raise OpenIError(f"{path} holds no ecgen-radiology/*.xml reports")
    return reports


# ----------------------------------------------------------------------------- terms -> labels

def _zone(q: set):
    """(zone, the qualifiers used) from one side and one level, or None."""
    sides, levels = q & set(SIDES), {LEVELS[k] for k in q & set(LEVELS)}
    if len(sides) != 1 or len(levels) != 1:
        return None
    return f"{sides.pop()} {levels.pop()}", q & (set(SIDES) | set(LEVELS))


def map_term(term: str):
    """One major term -> (finding, attributes) in phantom's format (a device as ("device", name)), or None."""
    head, *rest = term.split("/")
    q = set(rest)

    def only(allowed, used=frozenset()):  # every qualifier is allowed or used
        return q - set(used) <= set(allowed)

    if head == "Pleural Effusion":
        side, size = q & {"left", "right", "bilateral"}, q & {"small", "moderate", "large"}
        if len(side) == 1 and len(size) == 1 and only({"base", "costophrenic angle", "posterior"}, side | size):
            return "pleural_effusion", {"side": side.pop(), "size": size.pop()}
    elif head == "Pneumothorax":
        side, size = q & set(SIDES), q & {"small", "large"}
        if len(side) == 1 and len(size) == 1 and only({"apex"}, side | size):
            return "pneumothorax", {"side": side.pop(), "size": size.pop()}
    elif head == "Cardiomegaly" and only({"mild", "moderate", "severe"}):
        return "cardiomegaly", {}
    elif head == "Pulmonary Edema" and only({"interstitial", "mild", "moderate", "bilateral", "diffuse"}):
        return "edema", {}
    elif head in ("Consolidation", "Airspace Disease", "Pneumonia"):
        z = _zone(q)
        if z and only({"lung", "focal"}, z[1]):
            return "consolidation", {"zone": z[0]}
    elif head in ("Nodule", "Mass"):
        z, size = _zone(q), "small" if head == "Nodule" else "large"
        if z and (size in q or head == "Mass") and only({"lung", "round", size}, z[1]):
            return "nodule", {"zone": z[0], "size": size}
    elif head == "Tube, Inserted" and q and only({"trachea", "trachea, carina"}):
        return "device", "endotracheal_tube"
    elif head == "Catheters, Indwelling" and only({"left", "right", "thorax", "anterior"}):
        return "device", "central_venous_line"
    elif head == "Implanted Medical Device" and only({"left", "right", "thorax", "heart"}):
        return "device", "pacemaker"
    return None


def labels_of(majors: list):
    """Phantom labels of a study's major terms, or None when any term is unmappable or two disagree."""
    if majors == ["normal"]:
        return {}
    labels, devices = {}, set()
    for term in majors:
        m = map_term(term)
        if m is None:
            return None
        if m[0] == "device":
            devices.add(m[1])
        elif labels.setdefault(m[0], m[1]) != m[1]:
            return None
    if devices:
        labels["support_devices"] = {"devices": [d for d in P.DEVICES if d in devices]}
    return {f: labels[f] for f in P.FINDINGS if f in labels} if labels else None


# ----------------------------------------------------------------------------- affirmed in the impression

WORDS = {  # what names each finding or device in an impression (regular expressions, lower case)
    "pleural_effusion": r"(?<!pericardial )effusion|pleural fluid",
    "pneumothorax": r"pneumothora|\bptx\b",
    "cardiomegaly": r"cardiomegaly|(heart|cardiac)( \w+){0,4} (is |are )?(enlarge|prominent)"
                    r"|(enlarge\w*|prominent) (heart|cardiac)",
    "consolidation": r"consolidat|air ?space (disease|opacit)|pneumonia|infiltrat",
    "edema": r"o?edema",
    "nodule": r"nodul|\bmass",
    "endotracheal_tube": r"endotracheal|\bet tube|\bett\b",
    "central_venous_line": r"catheter|\bpicc\b|central (venous )?line|\bport\b|\bcvc\b",
    "pacemaker": r"pacemaker|\bpacer|defibrillator|\baicd\b|\bicd\b|pacing",
}
NEGATE_BEFORE = (r"\bno\b|\bnot\b|without|negative|free of|clear of|resolv|resolution|remov|absen|"
                 r"rule out|ruled out|exclud|cannot|can not|rather than|instead of|"
                 r"possibl|question|\?|\bmay\b|might|could|versus|\bvs\b|differential|suspicio|concern|"
                 r"suggest|consider|equivocal|borderline|likely|probabl")
NEGATE_AFTER = (r"resolv|remov|not seen|not identified|not visualized|no longer|cleared|exclud|"
                r"\bnot\b|versus|\bvs\b|\?|unlikely|less likely")
CLAUSE_END = r"\bbut\b|however|although|though|except|apart from|aside from|otherwise|\bwith\b|whereas|;|:"
SENTENCE = re.compile(r"(?<!\d)\.(?!\d)|\n|(?:^|\s)\d+\)")


def _clauses(text: str):
    for sentence in SENTENCE.split(text.lower()):
        yield from re.split(CLAUSE_END, sentence)


def affirmed(text: str, name: str) -> bool:
    """Whether the impression names finding or device `name` in a clause that neither negates nor hedges it."""
    for clause in _clauses(text):
        for m in re.finditer(WORDS[name], clause):
            if not re.search(NEGATE_BEFORE, clause[:m.end()]) and not re.search(NEGATE_AFTER, clause[m.end():]):
                return True
    return False


def _asked(labels: dict) -> set:
    return {f for f in labels if f != "support_devices"} | set(labels.get("support_devices", {}).get("devices", []))


def select_study(impression: str, majors: list):
    """Phantom labels of a study the rule keeps (module docstring), or None."""
    labels = labels_of(majors) if impression else None
    if labels is None:
        return None
    said = {name for name in WORDS if affirmed(impression, name)}
    return labels if said == _asked(labels) else None


def half_of(study_id: str) -> str:
    return ("dev", "heldout")[int(_hash(study_id), 16) % 2]


def _hash(study_id: str) -> str:
    return hashlib.sha256(f"openi:{study_id}".encode()).hexdigest()


def select(reports: dict) -> list:
    """[{"id", "half", "labels"}] of the studies the rule keeps, normals capped per half, sorted by id."""
    kept = [(i, select_study(*reports[i])) for i in reports]
    kept = [(i, labels) for i, labels in kept if labels is not None]
    keep_normal = set()
    for h in ("dev", "heldout"):
        normal = sorted((_hash(i), i) for i, labels in kept if not labels and half_of(i) == h)
        keep_normal |= {i for _, i in normal[:NORMALS_PER_HALF]}
    out = [{"id": i, "half": half_of(i), "labels": labels} for i, labels in kept if labels or i in keep_normal]
    def number(s):  # "12.xml" -> 12
        stem = s["id"].split(".")[0]
        return int(stem) if stem.isdigit() else 0
    return sorted(out, key=lambda s: (number(s), s["id"]))


def group_of(labels: dict) -> str:
    """The table's row: the one finding, "normal", or "two or more" findings."""
    return next(iter(labels)) if len(labels) == 1 else "normal" if not labels else "two_or_more"


# ----------------------------------------------------------------------------- the frozen benchmark

def load(path=None) -> list:
    path = BENCHMARK if path is None else path
    try:
        return json.loads(Path(path).read_text())["studies"]
    except (OSError, ValueError, KeyError) as e:
        raise OpenIError(f"cannot read the frozen Open-I selection {path} ({e!r})") from None


def prompts(source, halves=("dev", "heldout"), path=None) -> list:
    """judge.Prompt of each frozen study in `halves`: its impression read from `source`, its frozen
    labels, wording = its half (the table's row set)."""
    from .judge import Prompt
    studies = [s for s in load(path) if s["half"] in halves]
    reports = read_reports(source)
    missing = [s["id"] for s in studies if not reports.get(s["id"], ("",))[0]]
    if missing:
        raise OpenIError(f"{source} lacks {len(missing)} of the {len(studies)} frozen reports (or their "
                         f"IMPRESSION), e.g. {', '.join(missing[:3])}: is it the Open-I NLMCXR_reports.tgz?")
    order = [*P.FINDINGS, "two_or_more", "normal"]  # the table's rows: one finding, several, none
    studies.sort(key=lambda s: (halves.index(s["half"]), order.index(group_of(s["labels"]))))
    return [Prompt(reports[s["id"]][0], s["labels"], group_of(s["labels"]), s["half"]) for s in studies]


def summary(studies: list) -> str:
    lines = []
    for h in ("dev", "heldout"):
        c = Counter(group_of(s["labels"]) for s in studies if s["half"] == h)
        groups = ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
        lines.append(f"{h}: {sum(c.values())} studies ({groups})")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m minroentgen.phantoms.openi", description=__doc__.split("\n\n")[0])
    ap.add_argument("source", help="NLMCXR_reports.tgz, a folder holding ecgen-radiology/, or torchxrayvision")
    ap.add_argument("--out", type=Path, help="write the selection here (e.g. docs/openi_benchmark.json)")
    a = ap.parse_args(argv)
    try:
        studies = select(read_reports(a.source))
    except OpenIError as e:
        sys.exit(f"{ap.prog}: error: {e}")
    print(summary(studies))
    if a.out:
        about = ("Open-I (IU X-ray, NLMCXR_reports.tgz) studies kept by the rule of minroentgen/phantoms/openi.py: "
                 "ids are the report XML names, labels come from the MeSH major terms, halves from a hash of the id. "
                 "The report text is not stored here: evaluate.py --openi reads it from the user's copy.")
        rows = ",\n".join("  " + json.dumps(s) for s in studies)
        a.out.write_text(f'{{"about": {json.dumps(about)},\n "studies": [\n{rows}\n]}}\n')
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
