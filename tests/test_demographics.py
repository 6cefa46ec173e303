"""Phantoms with an age and a sex (opt-in), their reader, evaluate.py --demographics, and the
prompt template of a model trained with --prompt-template in train.py, sample.py and generate.py."""
import csv
import hashlib
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import generate
import sample
import train
from minroentgen.phantoms import demographic_fidelity as DF
from minroentgen.phantoms import demographic_reader as DR
from minroentgen.phantoms import demographics as DG
from minroentgen.phantoms import phantom as P
from minroentgen.phantoms import reader as R
from minroentgen.prompts import V2_TEMPLATE
from minroentgen.training import random_model

pytestmark = pytest.mark.usefixtures("one_thread")
S = 128

# sha256 of default phantoms before demographics existed (demo branch at 5dd28e9): image, report
# and labels of make(3, k, 128) for k < 12; and render() of {} and cardiomegaly at 96 px, seeds 0-2
DEFAULT_SHA256 = {"make": "5b3af46a4249205ddde70e4c99fba0e13505a6cdb7d115e37a2d89ff8f488450",
                  "render": "33366929328a3e7376467a84c9572b119f230d6500ded11257b129388a32da93"}


def test_default_phantoms_are_byte_identical_to_before():
    h = hashlib.sha256()
    for k in range(12):
        ph = P.make(3, k, 128)
        assert ph.person is None
        h.update(ph.image.tobytes() + ph.report.encode() + json.dumps(ph.labels).encode())
    assert h.hexdigest() == DEFAULT_SHA256["make"]
    h = hashlib.sha256()
    for labels in ({}, {"cardiomegaly": {}}):
        for s in range(3):
            h.update(P.render(labels, 96, np.random.default_rng(s)).tobytes())
    assert h.hexdigest() == DEFAULT_SHA256["render"]


def test_demographics_change_only_the_picture():
    people = []
    for k in range(40):
        plain, demo = P.make(5, k, 64), P.make(5, k, 64, demographics=True)
        assert demo.labels == plain.labels and demo.report == plain.report
        assert not np.array_equal(demo.image, plain.image)
        assert np.array_equal(P.make(5, k, 64, demographics=True).image, demo.image)
        people.append(demo.person)
    assert {p.sex for p in people} == {"female", "male"} and len({p.race for p in people}) >= 4
    ages = [p.age for p in people]
    assert 20 <= min(ages) < 40 and 70 < max(ages) <= 90


def test_dataset_gets_age_sex_race_columns(tmp_path):
    P.write_dataset(tmp_path / "d", 3, 64, seed=1, reports=2, demographics=True)
    rows = list(csv.DictReader(open(tmp_path / "d" / "reports.csv")))
    assert list(rows[0]) == ["image", "report", "labels", "age", "sex", "race"] and len(rows) == 6
    for row, k in zip(rows[::2], range(3)):
        person = P.make(1, k, 64, demographics=True).person
        assert (row["age"], row["sex"], row["race"]) == (str(person.age), person.sex, person.race)
        assert json.loads(row["labels"]) == P.make(1, k, 64).labels


def two(seed, first: dict, second: dict):
    """The same normal patient rendered as two people: (second - first) as float."""
    a, b = (P.render({}, S, np.random.default_rng(seed), DG.Person(**p)).astype(float)
            for p in (first, second))
    return b - a


@pytest.mark.parametrize("seed", range(3))
def test_age_and_sex_show_where_a_radiologist_looks(seed):
    young = dict(age=25, sex="male", race="WHITE", breast=1.0)
    d = two(seed, young, dict(young, age=85))
    lateral_upper = d[S // 8: S // 3, S // 8: S // 3]  # patient's right upper zone: ribs only change
    assert lateral_upper.mean() < -2  # less dense bones
    assert d[S // 5: S // 3, S // 2: 3 * S // 4].max() > 40  # the knob grows into the left upper lung
    woman = dict(age=30, sex="female", race="WHITE", breast=1.0)
    d = two(seed, dict(woman, sex="male"), woman)
    lower_lateral = np.r_[d[int(0.55 * S): int(0.75 * S), S // 10: S // 4].ravel(),
                          d[int(0.55 * S): int(0.75 * S), 3 * S // 4: 9 * S // 10].ravel()]
    assert lower_lateral.mean() > 8  # breast shadows, both sides
    assert abs(d[S // 8: S // 3].mean()) < 0.5  # nothing in the upper zones


def test_the_aged_heart_stays_normal():
    rng = np.random.default_rng(0)
    for _ in range(200):
        p, age = P.sample_patient(rng), int(rng.integers(20, 91))
        q = DG.aged_heart(p, DG.Person(age, "male", "WHITE", 1.0))
        assert p.ctr_normal <= q.ctr_normal <= 0.50 and q.ctr_enlarged == p.ctr_enlarged
        if age == 90:
            assert q.ctr_normal >= 0.46
    with pytest.raises(ValueError, match="age must be from 20 to 90"):
        DG.Person(95, "male", "WHITE", 1.0)


@pytest.fixture(scope="module")
def dreader():
    if not DR.WEIGHTS.exists():
        pytest.skip(f"{DR.WEIGHTS} is missing: run "
                    "`python -m minroentgen.phantoms.demographic_reader --train`")
    return DR.load()


def test_demographic_reader_reads_fresh_phantoms(dreader):
    images, female, age = DR.phantoms(96, 777, sizes=(S,))
    s = DR.scores(*DR.predict(dreader, images), female, age)
    assert s["sex_accuracy"] >= 0.85 and s["age_mae"] < 12, s  # chance: 0.5 and 17.5 years


def test_evaluate_demographics_real_and_tiny_model(dreader, tmp_path, capsys):
    evaluate.main(["--demographics", "--real", "--limit", "6", "--seeds", "4",
                   "--out", str(tmp_path / "real")])
    res = json.loads((tmp_path / "real" / "results.json").read_text())
    cases = DF.cases()
    assert [r["text"] for r in res["prompts"]] == [c.text for c in evaluate.E.spread(cases, 6)]
    everything = res["groups"][-1]
    assert everything["group"] == "all" and everything["samples"] == 24
    assert everything["sex_accuracy"] >= 0.75 and everything["age_mae"] < 15, everything
    assert cases[0].text == "25 year old WHITE female. No acute cardiopulmonary process."
    random_model("tiny", 32, seed=0).save_pretrained(tmp_path / "tiny")
    out = capsys.readouterr().out
    evaluate.main(["--demographics", "--weights", str(tmp_path / "tiny"), "--limit", "2", "--seeds", "2",
                   "--steps", "2", "--out", str(tmp_path / "tiny_eval")])
    res = json.loads((tmp_path / "tiny_eval" / "results.json").read_text())
    assert res["settings"]["size"] == 32 and len(res["prompts"]) == 2
    assert {"sex_accuracy", "age_mae", "age_within_10", "present"} <= set(res["groups"][-1])
    assert "| **all** |" in (tmp_path / "tiny_eval" / "table.md").read_text() and "wrote" in out
    with pytest.raises(SystemExit):
        evaluate.main(["--demographics", "--reconstruct"])
    assert "--demographics has its own prompts" in capsys.readouterr().err


# ----------------------------------------------------------------------------- templates

@pytest.fixture(scope="module")
def v2_model(tmp_path_factory):
    """train.py --prompt-template on demographic phantoms, one step of a tiny model."""
    root = tmp_path_factory.mktemp("v2")
    P.write_dataset(root / "data", 4, 64, seed=0, demographics=True)
    train.main(["--data", str(root / "data" / "reports.csv"), "--out", str(root / "run"),
                "--init", "tiny", "--resolution", "32", "--batch-size", "4", "--num-workers", "0", "--sample-every", "0",
                "--val-prompts", "--max-steps", "1", "--prompt-template", V2_TEMPLATE])
    saved = json.loads((root / "run" / "final" / "sampling.json").read_text())
    assert saved["prompt_template"] == V2_TEMPLATE
    return root / "run" / "final"


def test_train_fine_tunes_an_sd2_folder_on_the_v2_template(tiny_configs, tmp_path):
    """RoentGen-v2's setting in small: a diffusers SD 2.x folder (v-prediction, exact-GELU text
    encoder) fine-tuned, UNet and text encoder, on "{age} year old {race} {sex}. {report}"; the result
    keeps the template and SD 2's configs, and diffusers loads it."""
    diffusers = pytest.importorskip("diffusers")
    from oracle import diffusers_pipeline
    pipe = diffusers_pipeline(tiny_configs["sd2"])
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    pipe.save_pretrained(tmp_path / "sd2", safe_serialization=True)
    P.write_dataset(tmp_path / "data", 4, 64, seed=0, demographics=True)
    train.main(["--data", str(tmp_path / "data" / "reports.csv"), "--out", str(tmp_path / "run"),
                "--weights", str(tmp_path / "sd2"), "--resolution", "32", "--batch-size", "4",
                "--num-workers", "0", "--sample-every", "0", "--val-prompts", "--max-steps", "1",
                "--train-text-encoder", "--lr", "1e-3", "--prompt-template", V2_TEMPLATE])
    final = tmp_path / "run" / "final"
    assert json.loads((final / "sampling.json").read_text())["prompt_template"] == V2_TEMPLATE
    tuned = diffusers.StableDiffusionPipeline.from_pretrained(final, safety_checker=None)
    assert tuned.scheduler.config.prediction_type == "v_prediction"
    assert tuned.text_encoder.config.hidden_act == "gelu"  # SD 2's OpenCLIP, not SD 1's quick_gelu
    before, after = pipe.text_encoder.state_dict(), tuned.text_encoder.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the text encoder trained


def sample_png(argv, tmp_path):
    sample.main([*argv, "--steps", "2", "--out", str(tmp_path)])
    (path,) = [p for p in tmp_path.glob("*.png") if not p.name.startswith("grid")]
    return Image.open(path).text["prompt"]


def test_sample_fills_the_models_template(v2_model, tmp_path, capsys):
    prompt = sample_png(["Small left pleural effusion.", "--weights", str(v2_model), "--age", "64.9",
                         "--sex", "F", "--race", "white"], tmp_path / "a")
    assert prompt == "64 year old WHITE female. Small left pleural effusion."
    for extra, says in ((["--age", "64", "--sex", "F"],
                         "trained on prompts '{age} year old {race} {sex}. {report}': give --race"),
                        ([], "give --age, --race, --sex")):
        with pytest.raises(SystemExit, match=says):
            sample.main(["Edema.", "--weights", str(v2_model), *extra, "--out", str(tmp_path / "b")])
    plain = tmp_path / "plain"
    random_model("tiny", 32, seed=0).save_pretrained(plain)
    with pytest.raises(SystemExit, match="--sex: this model has no prompt template"):
        sample.main(["Edema.", "--weights", str(plain), "--sex", "male", "--out", str(tmp_path / "c")])
    assert sample_png(["Edema.", "--weights", str(plain)], tmp_path / "d") == "Edema."  # as before
    with pytest.raises(SystemExit):
        sample.main(["Edema.", "--sex", "x"])
    assert "--sex 'x' is not female or male (or F, M)" in capsys.readouterr().err


def test_generate_fills_the_template_from_the_columns(v2_model, tmp_path, capsys):
    table = tmp_path / "in.csv"
    table.write_text("report,anchor_age,gender,race\nEdema.,70,M,BLACK/AFRICAN AMERICAN\n"
                     "Cardiomegaly.,50,F,UNKNOWN\nSmall left pleural effusion.,33,F,ASIAN\n")
    generate.main(["--reports", str(table), "--out", str(tmp_path / "out"), "--steps", "2",
                   "--weights", str(v2_model)])
    assert "2 of 3 reports used; skipped 1: 1 missing race (rows 2)" in capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "out" / "reports.csv")))
    assert [(r["report"], r["prompt"], r["age"], r["sex"], r["race"]) for r in rows] == [
        ("Edema.", "70 year old BLACK male. Edema.", "70", "male", "BLACK"),
        ("Small left pleural effusion.", "33 year old ASIAN female. Small left pleural effusion.", "33",
         "female", "ASIAN")]
    (tmp_path / "no_age.csv").write_text("report,sex,race\nEdema.,M,WHITE\n")
    with pytest.raises(SystemExit, match="trained on prompts .*; --reports .*no_age.csv is a table "
                                         "without them: give a CSV/JSONL with the column age"):
        generate.main(["--reports", str(tmp_path / "no_age.csv"), "--out", str(tmp_path / "o2"),
                       "--weights", str(v2_model)])
