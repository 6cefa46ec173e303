"""The walkthrough notebooks (notebooks/NN_*.ipynb) run top to bottom, and are committed with the outputs that
running them gives, so that what a student reads on GitHub is what the code does.

`test_committed` reads the committed files only: every code cell ran, once, in order (execution counts 1, 2, 3,
...), shows something, raised nothing; each notebook shows a figure, and its gallery figure (the cell tagged
"gallery") is the one in docs/. `test_runs_as_committed` executes each notebook in a fresh kernel and compares every
cell's text with the committed one: the words exactly, the numbers to the last digit printed (one unit of slack, for
another CPU's rounding; whole numbers exactly), and the figures by count. Everything the notebooks draw is seeded
and they run single-threaded, so on one machine a re-run prints the same. Refresh with `python notebooks/run.py`.
"""
import base64
import copy
import importlib.util
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("notebooks_run", ROOT / "notebooks" / "run.py")
run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run)

NOTEBOOKS = run.notebooks()
NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def outputs(cell) -> list:
    """A code cell's outputs as (kind, text): consecutive stdout chunks joined (how a kernel splits a stream varies),
    stderr left out (warnings name temporary paths), results and displays by their text/plain, figures as
    ("image", "")."""
    out = []
    for o in cell.get("outputs", []):
        if o["output_type"] == "stream":
            if o["name"] != "stdout":
                continue
            if out and out[-1][0] == "stdout":
                out[-1] = ("stdout", out[-1][1] + o["text"])
            else:
                out.append(("stdout", o["text"]))
        elif o["output_type"] == "error":
            out.append(("error", f"{o['ename']}: {o['evalue']}"))
        elif "image/png" in o.get("data", {}):
            out.append(("image", ""))
        else:
            out.append((o["output_type"], o.get("data", {}).get("text/plain", "")))
    return out


def problems(nb, gallery_file: Path | None = None) -> list:
    """What is wrong with a committed notebook on its face (no execution): empty list if nothing."""
    found = []
    code = [c for c in nb.cells if c.cell_type == "code"]
    for k, cell in enumerate(code, 1):
        if cell.get("execution_count") != k:
            found.append(f"code cell {k}: execution count {cell.get('execution_count')}, not {k} (not run top to bottom)")
        if not cell.get("outputs"):
            found.append(f"code cell {k}: no outputs")
        found += [f"code cell {k}: {text}" for kind, text in outputs(cell) if kind == "error"]
    if not any(kind == "image" for cell in code for kind, _ in outputs(cell)):
        found.append("no figure")
    if gallery_file is not None:
        png = run.gallery_png(nb)
        if png is None:
            found.append("no figure in a cell tagged 'gallery'")
        elif not gallery_file.is_file() or gallery_file.read_bytes() != png:
            found.append(f"{gallery_file.name} is not the gallery cell's figure")
    return found


def _same_text(a: str, b: str) -> bool:
    """The same words; numbers equal, or, if they have decimals, within one unit of the last digit printed."""
    if NUMBER.split(a) != NUMBER.split(b):
        return False
    na, nb_ = NUMBER.findall(a), NUMBER.findall(b)
    if len(na) != len(nb_):
        return False
    for x, y in zip(na, nb_):
        if x == y:
            continue
        if not re.search(r"[.eE]", x + y):  # whole numbers (counts, shapes, ids) must agree exactly
            return False
        mantissa = x.lower().split("e")[0]
        unit = 10.0 ** -len(mantissa.split(".")[1]) if "." in mantissa else 1.0
        unit *= 10.0 ** int(x.lower().split("e")[1]) if "e" in x.lower() else 1.0
        if abs(float(x) - float(y)) > unit * 1.000001:
            return False
    return True


def differences(committed, executed) -> list:
    """Where executing a notebook gives other outputs than the committed ones: empty list if nowhere."""
    a = [c for c in committed.cells if c.cell_type == "code"]
    b = [c for c in executed.cells if c.cell_type == "code"]
    if [c.source for c in a] != [c.source for c in b]:
        return ["the code cells differ"]
    found = []
    for k, (ca, cb) in enumerate(zip(a, b), 1):
        oa, ob = outputs(ca), outputs(cb)
        if [kind for kind, _ in oa] != [kind for kind, _ in ob]:
            found.append(f"code cell {k}: outputs {[kind for kind, _ in oa]} committed, {[kind for kind, _ in ob]} now")
            continue
        for (kind, ta), (_, tb) in zip(oa, ob):
            if not _same_text(ta, tb):
                found.append(f"code cell {k}: committed {kind}\n{ta}\nnow\n{tb}")
    return found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed(path):
    assert problems(nbformat.read(path, as_version=4), run.gallery_path(path)) == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_runs_as_committed(path):
    committed = nbformat.read(path, as_version=4)
    assert differences(committed, run.execute(path)) == [], f"{path.name} is stale: run python notebooks/run.py {path}"


def test_stale_notebooks_are_caught():
    """The checks above fail on a notebook whose outputs were cleared, edited, cut or run out of order."""
    nb = nbformat.read(NOTEBOOKS[0], as_version=4)
    gallery = run.gallery_path(NOTEBOOKS[0])
    assert problems(nb, gallery) == [] and differences(nb, nb) == []
    code = [c for c in nb.cells if c.cell_type == "code"]
    printing = next(k for k, c in enumerate(code) if any(kind == "stdout" and NUMBER.search(t) for kind, t in outputs(c)))
    stream = next(o for o in code[printing].outputs if o["output_type"] == "stream" and o["name"] == "stdout"
                  and NUMBER.search(o["text"]))

    cleared = copy.deepcopy(nb)
    for c in cleared.cells:
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None
    assert problems(cleared, gallery) and differences(cleared, nb)

    for edit in (lambda s: s.replace(NUMBER.findall(s)[-1], str(int(float(NUMBER.findall(s)[-1])) + 7), 1),
                 lambda s: s + "and a line the code no longer prints\n", lambda s: ""):
        edited = copy.deepcopy(nb)
        out = next(o for o in [c for c in edited.cells if c.cell_type == "code"][printing].outputs
                   if o["output_type"] == "stream" and o["text"] == stream["text"])
        out["text"] = edit(out["text"])
        assert differences(edited, nb), edit

    no_figure = copy.deepcopy(nb)
    for c in no_figure.cells:
        if c.cell_type == "code":
            c.outputs = [o for o in c.outputs if "image/png" not in o.get("data", {})]
    assert differences(no_figure, nb) and problems(no_figure, gallery)

    reordered = copy.deepcopy(nb)
    [c for c in reordered.cells if c.cell_type == "code"][1].execution_count = 7
    assert problems(reordered, gallery)

    other_png = copy.deepcopy(nb)
    for c in other_png.cells:
        if "gallery" in c.get("metadata", {}).get("tags", []):
            for o in c.outputs:
                if "image/png" in o.get("data", {}):
                    o["data"]["image/png"] = base64.b64encode(b"not the figure").decode()
    assert problems(other_png, gallery)

    assert _same_text("loss 0.0208", "loss 0.0209") and not _same_text("loss 0.0208", "loss 0.0210")
    assert not _same_text("7 of 8", "6 of 8") and not _same_text("(1, 4, 32, 32)", "(1, 4, 64, 64)")
