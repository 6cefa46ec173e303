"""experiments/: each script end to end at a toy size, and the pieces whose numbers the README quotes."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import chart  # noqa: E402
import sweep  # noqa: E402
import synthetic_data  # noqa: E402
import text_probe  # noqa: E402
from minroentgen.phantoms import phantom  # noqa: E402
from minroentgen.phantoms import reader as R  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_probe_finds_a_linear_signal_and_not_noise():
    g = torch.Generator().manual_seed(0)
    x, x_test = torch.randn(400, 16, generator=g), torch.randn(400, 16, generator=g)
    y, y_test = (x[:, 3] + 0.3 * x[:, 5] > 0).float(), (x_test[:, 3] + 0.3 * x_test[:, 5] > 0).numpy()
    assert R.auroc(text_probe.probe(x, y, x_test), y_test) > 0.98
    noise = (torch.rand(400, generator=g) > 0.5).float()
    assert abs(R.auroc(text_probe.probe(x, noise, x_test), y_test) - 0.5) < 0.1


def test_features_average_a_report_up_to_its_end_token_only():
    from minroentgen.pipeline import StableDiffusion
    sd = StableDiffusion.from_pretrained(ROOT / "weights" / "default")
    ids = sd.tokenizer(["small left pleural effusion"])  # (1, 77)
    h = sd.text_encoder(ids)[0]  # (77, D)
    n = int((ids[0] == sd.tokenizer.eos_id).int().argmax()) + 1  # start, words, end
    got = text_probe.features(sd.text_encoder, sd.tokenizer, ["small left pleural effusion"])[0]
    assert torch.allclose(got, h[:n].mean(0), atol=1e-5) and not torch.allclose(got, h.mean(0), atol=1e-3)


def test_synthetic_data_runs_and_scores_every_condition(tmp_path):
    phantom.write_dataset(tmp_path / "syn", n=12, size=128, seed=3)  # real phantoms stand in for samples
    synthetic_data.main(["--synthetic", str(tmp_path / "syn" / "reports.csv"), "--real", "8", "--amounts",
                         "4,12", "--seeds", "2", "--steps", "2", "--test", "40", "--out", str(tmp_path / "out")])
    res = json.loads((tmp_path / "out" / "synthetic_data.json").read_text())["results"]
    assert set(res) == {"real 8", "real 8 + synthetic 4", "real 8 + synthetic 12", "synthetic 8 only",
                        "synthetic 12 only", "synthetic 12, then real 8", "real 8, twice the steps",
                        "real 12 (upper bound)"}
    assert all(len(r["runs"]) == 2 and 0 <= r["mean_auroc"] <= 1 for r in res.values())
    assert (tmp_path / "out" / "synthetic_data.png").stat().st_size > 1000


def test_synthetic_data_reads_images_and_labels_of_generate_py(tmp_path):
    phantom.write_dataset(tmp_path, n=3, size=256, seed=1)
    x, labels = synthetic_data.load_synthetic(tmp_path / "reports.csv")
    assert x.shape == (3, 1, R.SIZE, R.SIZE) and labels == [phantom.make(1, k, 256).labels for k in range(3)]
    (tmp_path / "plain.csv").write_text("image,report\nimages/00000.png,x\n")
    with pytest.raises(SystemExit, match="no labels column"):
        synthetic_data.load_synthetic(tmp_path / "plain.csv")


def test_sweep_runs_each_setting_once_and_charts_it(tmp_path):
    sweep.main(["--steps", "2,3", "--guidance", "1,4", "--prompts", "1", "--seeds", "2", "--heldout", "8",
                "--out", str(tmp_path)])
    res = json.loads((tmp_path / "sweep.json").read_text())["results"]
    assert [(r["sweep"], r["steps"], r["guidance"]) for r in res] == [
        ("steps", 2, 4.0), ("steps", 3, 4.0), ("guidance", 25, 1.0), ("guidance", 25, 4.0)]
    assert all(0 <= r["present"] <= 1 and r["fid_heldout"] > 0 for r in res)
    assert (tmp_path / "sweep.png").stat().st_size > 1000


def test_chart_ticks_are_round_and_span_the_range():
    ticks = chart._ticks(0.61, 0.93)
    assert ticks[0] >= 0.61 and ticks[-1] <= 0.93 and 3 <= len(ticks) <= 6
    assert np.allclose(np.diff(ticks), ticks[1] - ticks[0])


def test_finetune_parts_trains_only_the_asked_parts_and_tabulates_them(tmp_path):
    import finetune_parts
    from safetensors.torch import load_file
    phantom.write_dataset(tmp_path / "data", n=4, size=128, seed=5, style="mixed")
    prompts = tmp_path / "prompts.json"
    finetune_parts.main(["--data", "x", "--out", "x", "--prompts", str(prompts), "--write-prompts"])
    assert len(json.loads(prompts.read_text())["prompts"]) == len({json.dumps(p.labels, sort_keys=True)
                                                                   for p in finetune_parts.E.PROMPTS})
    text = json.loads(prompts.read_text())
    prompts.write_text(json.dumps({**text, "prompts": text["prompts"][:1]}))
    finetune_parts.main(["--data", str(tmp_path / "data" / "reports.csv"), "--out", str(tmp_path / "parts"),
                         "--variants", "text", "--steps", "1", "--prompts", str(prompts), "--trained", "1",
                         "--seeds", "2", "--heldout", "8"])
    start, tuned = (load_file(ROOT / "weights" / "default" / "unet" / "diffusion_pytorch_model.safetensors"),
                    load_file(tmp_path / "parts" / "text" / "final" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(start[k].float(), tuned[k].float()) for k in start)  # the UNet stayed frozen
    table = (tmp_path / "parts" / "finetune_parts.md").read_text()
    assert "| text | clinical (1 x 2) |" in table and "| text | trained (1 x 2) |" in table
    assert (tmp_path / "parts" / "finetune_parts.png").exists()


def test_heldout_features_computed_once_give_the_same_report():
    from minroentgen.phantoms import judge as E
    reader, prompts = R.load(), E.PROMPTS[:2]
    alone, _ = E.run(None, reader, prompts, seeds=2, heldout_n=8, progress=False)
    shared, _ = E.run(None, reader, prompts, seeds=2, progress=False,
                      held_feat=E.heldout_features(reader, 8, 128))
    assert alone == shared
