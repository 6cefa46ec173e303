"""sample.py's file names: prompt slug cut at a word, seed and image index labelled, copies as _v2, and a grid
that names and shows every prompt (issue 25, point 8). A stand-in model: no weights needed."""

import pytest
import torch
from PIL import Image

import sample
from minroentgen.pipeline import SamplingDefaults

LONG = ("Mild pulmonary vascular congestion. Increased interstitial markings and pulmonary vascularity are "
        "consistent with edema.")


def test_slug_is_cut_at_a_word_without_a_dangling_dash():
    cut = sample.slug(LONG)
    assert cut == "mild-pulmonary-vascular-congestion-increased-interstitial"
    assert len(sample.slug(LONG[:-8] + "xx")) <= 60 and not sample.slug("a" * 59 + " bc").endswith("-")
    assert sample.slug("x" * 80) == "x" * 60 and "--" not in sample.slug("pulmonary vascularity are ------ here " * 3)
    assert sample.slug("Épanchement pleural gauche, modéré.") == "epanchement-pleural-gauche-modere"
    assert sample.slug("  ...  ") == "prompt"


def test_names_say_seed_and_index_and_copies(tmp_path):
    assert sample.image_stem("Small left pleural effusion.", 7, 2) == "small-left-pleural-effusion_seed7_img2"
    assert sample.grid_stem(["Small effusion", "Edema", "Normal"], 0) == "grid_small-effusion_and-2-more_seed0"
    assert sample.grid_stem(["Small effusion"], 3) == "grid_small-effusion_seed3"
    (tmp_path / "a_seed0_img0.png").touch()
    assert sample.free_path(tmp_path, "a_seed0_img0").name == "a_seed0_img0_v2.png"


class FakeModel:
    defaults = SamplingDefaults(steps=1, height=8, width=8)

    def __call__(self, prompt, n, seed, **_):
        return torch.full((n, 3, 8, 8), len(prompt) / 100.0)


@pytest.mark.parametrize("n, shape", [(1, (8, 24)), (2, (24, 16))])
def test_grid_shows_every_prompt(tmp_path, monkeypatch, capsys, n, shape):
    monkeypatch.setattr(sample.StableDiffusion, "from_pretrained", lambda *a, **k: FakeModel())
    sample.main(["Normal.", "Small effusion.", "Mild edema.", "--n", str(n), "--weights", "x", "--out", str(tmp_path)])
    printed = capsys.readouterr().out.split()
    assert [p.split("/")[-1] for p in printed[:2]] == ["normal_seed0_img0.png",
                                                       "normal_seed0_img1.png" if n == 2 else "small-effusion_seed0_img0.png"]
    grid = Image.open(printed[-1])
    assert printed[-1].endswith("grid_normal_and-2-more_seed0.png") and grid.size == shape[::-1]
