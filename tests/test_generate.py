"""generate.py: deterministic, resumable, each row sample.py's picture for its seed, read by train.py."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import generate
import sample
from minroentgen.data import read_pairs
from minroentgen.phantoms.judge import load_prompts
from minroentgen.pipeline import StableDiffusion

pytestmark = pytest.mark.usefixtures("one_thread")
ROWS = [("Small left pleural effusion.", {"pleural_effusion": {"side": "left", "size": "small"}}),
        ("Moderate cardiomegaly.", {"cardiomegaly": {}}),
        ("No acute cardiopulmonary process.", {}),
        ("Large right pneumothorax.", {"pneumothorax": {"side": "right", "size": "large"}}),
        ("Moderate cardiomegaly.", {"cardiomegaly": {}})]  # a repeated report still gets its own seed


def table(tmp_path, rows=ROWS):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"report": r, "labels": lab, "other": 1}) + "\n" for r, lab in rows))
    return path


def run(reports, out, *extra):
    generate.main(["--reports", str(reports), "--out", str(out), "--steps", "2", *extra])


def files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_command_same_bytes_readable_by_train(tmp_path):
    reports = table(tmp_path, ROWS[:3])
    run(reports, tmp_path / "a", "--batch-size", "2")
    run(reports, tmp_path / "b", "--batch-size", "2")
    a = files(tmp_path / "a")
    assert a == files(tmp_path / "b") and len(a) == 3 + 2  # 3 images, reports.csv, run.json
    pairs = read_pairs(tmp_path / "a" / "reports.csv")  # what train.py reads
    assert [p.report for p in pairs] == [r for r, _ in ROWS[:3]] and all(p.image.is_file() for p in pairs)
    with open(tmp_path / "a" / "reports.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [json.loads(r["labels"]) for r in rows] == [lab for _, lab in ROWS[:3]]
    assert [int(r["seed"]) for r in rows] == [0, 1, 2]
    run(reports, tmp_path / "c", "--batch-size", "2", "--seed", "1")  # another base seed, other pictures
    assert all(a[k] != v for k, v in files(tmp_path / "c").items() if k.suffix == ".png")


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm"])  # ddpm draws noise at every step, too
def test_a_row_is_what_sample_py_gives_for_its_seed(tmp_path, scheduler):
    reports = table(tmp_path, ROWS[:2])
    run(reports, tmp_path / "gen", "--per-report", "2", "--batch-size", "4", "--seed", "3",
        "--scheduler", scheduler)  # both rows in one batch
    with open(tmp_path / "gen" / "reports.csv", newline="") as f:
        row = list(csv.DictReader(f))[3]  # row 1, its second image
    assert int(row["seed"]) == (3 * 2654435761 + 1) % 2**32
    sample.main([row["report"], "--seed", row["seed"], "--n", "2", "--steps", "2", "--scheduler", scheduler,
                 "--out", str(tmp_path / "alone")])
    alone = np.asarray(Image.open(next((tmp_path / "alone").glob(f"*_seed{row['seed']}_img1.png"))), dtype=int)
    ours = np.asarray(Image.open(tmp_path / "gen" / row["image"]), dtype=int)
    assert ours.shape == alone.shape and np.abs(ours - alone).max() <= 1


def test_resume_gives_the_bytes_of_an_uninterrupted_run(tmp_path, monkeypatch):
    reports = table(tmp_path)  # 5 rows, batches of 2: rows 0-1, 2-3, 4
    run(reports, tmp_path / "whole", "--batch-size", "2")

    out = tmp_path / "stopped"
    run(reports, out, "--batch-size", "2", "--limit", "1")  # rounded up to the whole first batch
    assert len(read_pairs(out / "reports.csv")) == 2
    batches, call = [], StableDiffusion.__call__

    def crash_on_third_batch(sd, prompts, **kw):
        batches.append(prompts)
        if len(batches) == 2:
            raise KeyboardInterrupt
        return call(sd, prompts, **kw)

    monkeypatch.setattr(StableDiffusion, "__call__", crash_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        run(reports, out, "--batch-size", "2")
    assert batches == [[ROWS[2][0], ROWS[3][0]], [ROWS[4][0]]]  # batch 1 skipped: it was done
    assert not any(p.name.startswith(".") for p in out.rglob("*"))  # no temporary file left behind
    batches.clear()
    run(reports, out, "--batch-size", "2")
    assert batches == [[ROWS[4][0]]]  # only what was left
    assert files(out) == files(tmp_path / "whole")


def test_a_crash_while_writing_leaves_no_file_counted_as_done(tmp_path, monkeypatch):
    reports = table(tmp_path, ROWS[:1])
    save = Image.Image.save

    def half_then_crash(image, fp, *args, **kw):
        Path(fp).write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", half_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run(reports, tmp_path / "out", "--steps", "1")
    assert [p.name for p in tmp_path.joinpath("out").rglob("*") if p.is_file()] == ["run.json"]
    monkeypatch.setattr(Image.Image, "save", save)
    (tmp_path / "out" / "images" / ".00000-0.png.tmp1").write_bytes(b"\x89PNG half")  # as kill -9 leaves it
    run(reports, tmp_path / "out", "--steps", "1")
    assert [p.name for p in (tmp_path / "out" / "images").iterdir()] == ["00000-0.png"]
    assert Image.open(tmp_path / "out" / "images" / "00000-0.png").size == (128, 128)


def test_prompt_file_and_another_runs_folder(tmp_path, capsys):
    prompts = Path(__file__).parents[1] / "docs" / "blind_prompts.json"
    run(prompts, tmp_path / "p", "--limit", "1", "--batch-size", "1", "--steps", "1")
    with open(tmp_path / "p" / "reports.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    first = load_prompts(prompts)[0]
    assert [(r["report"], json.loads(r["labels"])) for r in rows] == [(first.text, first.labels)]
    with pytest.raises(SystemExit) as e:  # the same folder, other settings: refused, naming them
        run(prompts, tmp_path / "p", "--limit", "1", "--batch-size", "1", "--steps", "3")
    assert "holds another run (its steps differ)" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("case", ["missing", "empty", "no report column", "empty report", "bad json",
                                  "out is a file", "out holds other files", "per-report 0"])
def test_bad_input_is_a_one_line_error(tmp_path, capsys, case):
    reports, out, extra = tmp_path / "r.csv", tmp_path / "out", []
    reports.write_text("report,labels\nSmall left pleural effusion.,{}\n")
    if case == "empty":
        reports.write_text("report,labels\n")
    if case == "no report column":
        reports.write_text("text\nSmall left pleural effusion.\n")
    if case == "empty report":
        reports.write_text("report\nCardiomegaly.\n  \n")
    if case == "bad json":
        reports = tmp_path / "r.json"
        reports.write_text('{"prompts": [["Cardiomegaly.", {"heart": {}}]]}')
    if case == "out is a file":
        out.write_text("x")
    if case == "out holds other files":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    if case == "per-report 0":
        extra = ["--per-report", "0"]
    with pytest.raises(SystemExit) as e:
        generate.main(["--reports", str(tmp_path / "none.csv" if case == "missing" else reports),
                       "--out", str(out), *extra])
    message = str(e.value) if e.value.code != 2 else capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("generate.py: error: ") and "\n" not in message
    assert not (tmp_path / "out" / "run.json").exists()
