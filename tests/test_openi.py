"""The Open-I real-impression benchmark: MeSH major terms -> phantom labels, the impression check,
reading the reports (tgz, folder), the frozen selection and evaluate.py --openi end to end."""
import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import torch

import evaluate as script
from minroentgen.phantoms import judge as E
from minroentgen.phantoms import openi as O
from minroentgen.phantoms import reader as R


def report_xml(impression: str, majors, minors=(), findings="The lungs are clear.") -> str:
    """A report in the layout of NLMCXR_reports.tgz's ecgen-radiology/*.xml (trimmed)."""
    mesh = "".join(f"\n      <major>{t}</major>" for t in majors) + "".join(f"\n      <minor>{t}</minor>" for t in minors)
    return f"""<?xml version="1.0" encoding="utf-8"?>
<eCitation>
   <meta type="rr"/>
   <uId id="CXR1"/>
   <MedlineCitation Owner="Indiana University" Status="supplied by publisher">
      <Article PubModel="Electronic">
         <Abstract>
            <AbstractText Label="COMPARISON">None.</AbstractText>
            <AbstractText Label="INDICATION">Chest pain</AbstractText>
            <AbstractText Label="FINDINGS">{findings}</AbstractText>
            <AbstractText Label="IMPRESSION">{impression}</AbstractText>
         </Abstract>
      </Article>
   </MedlineCitation>
   <MeSH>{mesh}
   </MeSH>
   <parentImage id="CXR1_1_IM-0001-3001"><figureId>F1</figureId></parentImage>
</eCitation>
"""


def write_tgz(path: Path, reports: dict) -> Path:
    """{name: (impression, majors[, minors])} -> a .tgz of ecgen-radiology/NAME, as the Open-I download."""
    with tarfile.open(path, "w:gz") as tar:
        for name, r in reports.items():
            data = report_xml(*r).encode()
            info = tarfile.TarInfo(f"ecgen-radiology/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


STUDIES = {  # name: (impression, major terms[, minor terms]) -> the labels the rule gives (None: excluded)
    "1.xml": ("Mild cardiomegaly. Small left pleural effusion.", ["Cardiomegaly/mild", "Pleural Effusion/left/small"],
              {"pleural_effusion": {"side": "left", "size": "small"}, "cardiomegaly": {}}),
    "2.xml": ("Mild cardiomegaly. Small left pleural effusion.",  # an unmappable term
              ["Cardiomegaly/mild", "Pleural Effusion/left/small", "Thoracic Vertebrae/degenerative"], None),
    "3.xml": ("Cardiomegaly. No pleural effusion or pneumothorax.",  # the effusion is negated
              ["Cardiomegaly", "Pleural Effusion/right/small"], None),
    "4.xml": ("Small right apical pneumothorax, new since the prior study.", ["Pneumothorax/apex/right/small"],
              {"pneumothorax": {"side": "right", "size": "small"}}),
    "5.xml": ("No acute cardiopulmonary disease.", ["normal"], {}),
    "6.xml": ("Possible right lower lobe pneumonia.", ["Pneumonia/lower lobe/right"], None),  # hedged
    "7.xml": ("Left lower lobe pneumonia.", ["Pneumonia/lower lobe/left"], {"consolidation": {"zone": "left lower"}}),
    "8.xml": ("Cardiomegaly.", ["Cardiomegaly", "Implanted Medical Device/left"], None),  # the device not said
    "9.xml": ("Stable cardiomegaly. Left-sided pacemaker and right PICC line.",
              ["Cardiomegaly", "Implanted Medical Device/left", "Catheters, Indwelling/right"], ["Lung/hypoinflation"],
              {"cardiomegaly": {}, "support_devices": {"devices": ["central_venous_line", "pacemaker"]}}),
    "10.xml": ("Cardiomegaly with a small right effusion.", ["Cardiomegaly"], None),  # says what no term does
    "11.xml": ("Small right lower lobe nodule.", ["Nodule/lung/lower lobe/right/small"],
               {"nodule": {"zone": "right lower", "size": "small"}}),
    "12.xml": ("Pleural effusions.", ["Pleural Effusion/bilateral"], None),  # no size: the phantom needs one
}


def _reports():
    return {k: (v[0], v[1], *(v[2:-1])) for k, v in STUDIES.items()}


@pytest.mark.parametrize("name", list(STUDIES))
def test_the_rule_on_reports_in_the_real_layout(tmp_path, name):
    reports = O.read_reports(write_tgz(tmp_path / "r.tgz", _reports()))
    impression, majors = reports[name]
    assert impression == STUDIES[name][0] and majors == STUDIES[name][1]  # minor terms are not read
    labels = O.select_study(impression, majors)
    assert labels == STUDIES[name][-1]
    assert labels is None or E.label_problem(labels) is None


def test_qualifiers_give_side_size_and_zone():
    m = O.map_term
    assert m("Pleural Effusion/bilateral/small") == ("pleural_effusion", {"side": "bilateral", "size": "small"})
    assert m("Pleural Effusion/base/left/moderate") == ("pleural_effusion", {"side": "left", "size": "moderate"})
    assert m("Pneumothorax/left/large") == ("pneumothorax", {"side": "left", "size": "large"})
    assert m("Consolidation/lung/base/right") == ("consolidation", {"zone": "right lower"})
    assert m("Consolidation/lung/upper lobe/left") == ("consolidation", {"zone": "left upper"})
    assert m("Nodule/lung/upper lobe/left/small") == ("nodule", {"zone": "left upper", "size": "small"})
    assert m("Mass/lung/base/right/large") == ("nodule", {"zone": "right lower", "size": "large"})
    for term in ("Pneumothorax/left/moderate", "Pleural Effusion/right", "Pleural Effusion/left/small/focal",
                 "Consolidation/lung/middle lobe/right", "Airspace Disease/lung/base/bilateral",
                 "Nodule/lung/lower lobe/right", "Cardiomegaly/borderline", "Tube, Inserted", "Opacity/lung/base/left"):
        assert m(term) is None, term
    assert O.labels_of(["Pleural Effusion/left/small", "Pleural Effusion/right/small"]) is None  # they disagree


def test_negations_and_hedges():
    yes = ["Small left effusion without pneumothorax.", "1. No pneumothorax. 2. Small left pleural effusion.",
           "No cardiomegaly with bilateral small pleural effusions."]
    no = ["No pneumothorax, consolidation, or pleural effusion.", "Right effusion has resolved.",
          "Possible small left effusion.", "Negative for effusion.", "Small pericardial effusion."]
    assert all(O.affirmed(t, "pleural_effusion") for t in yes), yes
    assert not any(O.affirmed(t, "pleural_effusion") for t in no), no
    assert O.affirmed("The heart is enlarged.", "cardiomegaly") and not O.affirmed("The heart is not enlarged.", "cardiomegaly")


def test_reading_a_folder_halves_and_the_normal_cap(tmp_path, monkeypatch):
    folder = tmp_path / "openi"
    (folder / "ecgen-radiology").mkdir(parents=True)
    for name, r in _reports().items():
        (folder / "ecgen-radiology" / name).write_text(report_xml(*r))
    assert O.read_reports(folder) == O.read_reports(write_tgz(tmp_path / "r.tgz", _reports()))
    assert {O.half_of(f"{k}.xml") for k in range(20)} == {"dev", "heldout"}
    assert O.half_of("1.xml") == O.half_of("1.xml")
    normals = {f"{k}.xml": ("No acute disease.", ["normal"]) for k in range(100, 140)}
    monkeypatch.setattr(O, "NORMALS_PER_HALF", 3)
    kept = O.select(normals)
    assert [s["half"] for s in kept].count("dev") == 3 and [s["half"] for s in kept].count("heldout") == 3
    with pytest.raises(O.OpenIError, match="no ecgen-radiology"):
        O.read_reports(tmp_path)
    with pytest.raises(O.OpenIError, match="no such file"):
        O.read_reports(tmp_path / "missing.tgz")
    (tmp_path / "bad.tgz").write_text("not a tar")
    with pytest.raises(O.OpenIError, match="not a readable"):
        O.read_reports(tmp_path / "bad.tgz")


def _real_reports():
    """The real Open-I reports: $OPENI_REPORTS (a .tgz or folder), else an installed torchxrayvision's copy."""
    for source in (os.environ.get("OPENI_REPORTS"), "torchxrayvision"):
        if source:
            try:
                return O.read_reports(source)
            except O.OpenIError:
                pass
    pytest.skip("no Open-I reports here: set OPENI_REPORTS to NLMCXR_reports.tgz, or install torchxrayvision")


def test_frozen_selection_is_what_the_rule_selects():
    frozen = O.load()
    assert all(E.label_problem(s["labels"]) is None for s in frozen)
    assert all(s["half"] == O.half_of(s["id"]) for s in frozen)
    assert O.select(_real_reports()) == frozen


# ----------------------------------------------------------------------------- evaluate.py --openi

@pytest.fixture
def reader():
    if not R.WEIGHTS.exists():
        pytest.skip(f"{R.WEIGHTS} is missing: run `python -m minroentgen.phantoms.reader --train`")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield R.load()
    torch.set_num_threads(threads)


def test_evaluate_openi_end_to_end(reader, tmp_path, capsys, monkeypatch):
    from minroentgen.training import random_model
    tgz = write_tgz(tmp_path / "NLMCXR_reports.tgz", _reports())
    dev = next(k for k in STUDIES if STUDIES[k][-1] and O.half_of(k) == "dev")
    held = next(k for k in STUDIES if STUDIES[k][-1] and O.half_of(k) == "heldout")
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"studies": [{"id": k, "half": O.half_of(k), "labels": STUDIES[k][-1]}
                                             for k in (held, dev)]}))
    monkeypatch.setattr(O, "BENCHMARK", bench)
    random_model("tiny", 32, seed=0).save_pretrained(tmp_path / "tiny")
    script.main(["--openi", str(tgz), "--weights", str(tmp_path / "tiny"), "--seeds", "2", "--steps", "2",
                 "--heldout", "8", "--out", str(tmp_path / "eval")])
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert [(r["text"], r["wording"], r["labels"]) for r in res["prompts"]] == \
        [(STUDIES[k][0], O.half_of(k), STUDIES[k][-1]) for k in (dev, held)]  # the dev half first
    assert {g["wording"] for g in res["groups"]} == {"dev", "heldout"}
    assert "| heldout |" in (tmp_path / "eval" / "table.md").read_text()
    script.main(["--openi", str(tgz), "--half", "heldout", "--real", "--seeds", "2", "--heldout", "8",
                 "--out", str(tmp_path / "real")])
    res = json.loads((tmp_path / "real" / "results.json").read_text())
    assert [r["text"] for r in res["prompts"]] == [STUDIES[held][0]] and res["prompts"][0]["present"] == 2
    capsys.readouterr()

    def error(argv):
        with pytest.raises(SystemExit) as e:  # sys.exit(message), or argparse's error on stderr
            script.main(argv + ["--real", "--out", str(tmp_path / "err")])
        return f"{e.value.code} {capsys.readouterr().err}"
    assert "no such file" in error(["--openi", str(tmp_path / "nowhere.tgz")])
    assert "lacks 1 of the 2 frozen reports" in error(["--openi", str(write_tgz(tmp_path / "part.tgz",
                                                                                {dev: STUDIES[dev][:2]}))])
    assert "--half needs --openi" in error(["--half", "dev"])
    assert "holds no ecgen-radiology/" in error(["--openi", str(tmp_path)])


def test_torchxrayvision_copy_is_found_without_importing_it(tmp_path, monkeypatch):
    package = tmp_path / "site" / "torchxrayvision"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('torchxrayvision was imported')\n")
    write_tgz(package / "data" / "NLMCXR_reports.tgz", _reports())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert O.locate("torchxrayvision") == package / "data" / "NLMCXR_reports.tgz"
    assert O.read_reports("torchxrayvision")["1.xml"][0] == STUDIES["1.xml"][0]
    monkeypatch.setattr(O.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(O.OpenIError, match="not installed"):
        O.locate("torchxrayvision")
