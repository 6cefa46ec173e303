"""train.py and minroentgen/training.py: a tiny model (`--init tiny`) on 32-pixel phantoms, a few steps each."""
import csv
import json
import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sample
import train
import train_vae
from minroentgen import checkpoints, optimization, training
from minroentgen.phantoms import phantom
from minroentgen.data import read_pairs
from minroentgen.dataset import ImageReportDataset
from minroentgen.pipeline import StableDiffusion
from minroentgen.tokenizer import CLIPTokenizer
from minroentgen.vae import AutoencoderKL

ROOT = Path(__file__).resolve().parents[1]
BASE = ["--resolution", "32", "--batch-size", "4", "--lr", "1e-3", "--warmup", "2",
        "--num-workers", "0", "--log-every", "1", "--sample-every", "0", "--val-prompts"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# Adam divides each gradient by its running RMS, so it hides a wrongly scaled gradient, and it blows the
# float noise of gradients that are zero in theory (conv biases before a GroupNorm) up to +-lr. Plain SGD
# without clipping moves the weights by lr x the gradient: equal weights then mean equal gradients.
SGD_PATCH = "torch.optim.AdamW = lambda params, lr, weight_decay, fused: torch.optim.SGD(params, lr=lr)"
NO_CLIP = ["--max-grad-norm", "1e9", "--lr", "0.1"]


@pytest.fixture
def sgd(monkeypatch):
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, weight_decay, fused: torch.optim.SGD(params, lr=lr))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """8 phantoms (64 px, trained at 32) in a CSV: 2 steps of batch 4 make an epoch."""
    out = tmp_path_factory.mktemp("phantoms")
    phantom.write_dataset(out, n=8, size=64, seed=0)
    return out / "reports.csv"


def run(data, out, *extra, start=("--init", "tiny")):
    train.main(["--data", str(data), "--out", str(out), *map(str, start), *BASE, *map(str, extra)])
    return losses(out)


def losses(out) -> dict[int, float]:
    """step -> loss of log.jsonl; a step logged twice (after a resume) keeps its last value."""
    lines = (Path(out) / "log.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def tensors(folder, part="unet") -> dict:
    name = "model.safetensors" if part == "text_encoder" else "diffusion_pytorch_model.safetensors"
    return load_file(Path(folder) / part / name)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """30 steps on the phantoms, EMA on, a validation grid at step 20 and at the end."""
    out = tmp_path_factory.mktemp("run")
    train.main(["--data", str(data), "--out", str(out), "--init", "tiny", *BASE, "--max-steps", "30",
                "--save-every", "15",
                "--sample-every", "15", "--val-prompts", "small left pleural effusion", "normal chest",
                "--val-steps", "3", "--ema-decay", "0.9"])
    return out


def test_loss_falls_when_overfitting_a_few_phantoms(trained):
    loss = losses(trained)
    assert sorted(loss) == list(range(1, 31))
    first, last = sum(loss[s] for s in range(1, 6)) / 5, sum(loss[s] for s in range(26, 31)) / 5
    assert last < 0.6 * first, (first, last)
    record = json.loads((trained / "log.jsonl").read_text().splitlines()[0])
    assert record.keys() == {"step", "loss", "lr", "images_per_second", "time"}
    assert (trained / "samples" / "step-000015.png").is_file() and (trained / "samples" / "step-000030.png").is_file()
    assert sorted(p.name for p in trained.glob("checkpoint-*")) == ["checkpoint-000015", "checkpoint-000030"]


def test_final_loads_in_sample_py_and_diffusers_and_trains_on(trained, data, tmp_path):
    import diffusers

    final = trained / "final"
    sample.main(["small left pleural effusion", "--weights", str(final), "--steps", "2", "--out", str(tmp_path)])
    assert len(list(tmp_path.glob("*.png"))) == 1
    ours = StableDiffusion.from_pretrained(final)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(final, local_files_only=True)
    for part in ("unet", "vae"):
        theirs = getattr(pipe, part).state_dict()
        assert max_diff(getattr(ours, part).state_dict(), theirs) == 0
    theirs = {k if k.startswith("text_model.") else "text_model." + k: v
              for k, v in pipe.text_encoder.state_dict().items() if not k.endswith("position_ids")}
    assert max_diff(ours.text_encoder.state_dict(), theirs) == 0
    assert json.loads((final / "sampling.json").read_text())["height"] == 32
    # it is also a starting point for more fine-tuning
    assert sorted(run(data, tmp_path / "finetune", "--max-steps", "2", start=("--weights", final))) == [1, 2]
    assert max_diff(tensors(tmp_path / "finetune" / "final"), tensors(final)) > 0
    # final/ holds the EMA weights, not the last step's
    assert max_diff(tensors(final), tensors(trained / "checkpoint-000030")) > 1e-4
    ema = load_file(trained / "checkpoint-000030" / "ema.safetensors")
    assert max_diff({k: ema["unet." + k] for k in tensors(final)}, tensors(final)) == 0


def test_vae_and_untrained_text_encoder_never_change(trained, data, tmp_path):
    start = training.random_model("tiny", 32, seed=0)
    for part in ("vae", "text_encoder"):
        assert max_diff(tensors(trained / "final", part), getattr(start, part).state_dict()) == 0
    run(data, tmp_path, "--max-steps", "3", "--train-text-encoder", "--ema-decay", "0")
    assert max_diff(tensors(tmp_path / "final", "text_encoder"), start.text_encoder.state_dict()) > 1e-4
    assert max_diff(tensors(tmp_path / "final", "vae"), start.vae.state_dict()) == 0


def test_freeze_unet_trains_only_the_text_encoder(data, tmp_path):
    start = training.random_model("tiny", 32, seed=0)
    run(data, tmp_path, "--max-steps", "3", "--train-text-encoder", "--freeze-unet", "--ema-decay", "0")
    assert max_diff(tensors(tmp_path / "final", "text_encoder"), start.text_encoder.state_dict()) > 1e-4
    assert max_diff(tensors(tmp_path / "final"), start.unet.state_dict()) == 0


def test_ctrl_c_then_resume_gives_the_uninterrupted_losses_and_weights(data, tmp_path, monkeypatch):
    extra = ["--max-steps", "6", "--save-every", "100", "--text-dropout", "0.5", "--train-text-encoder"]
    whole = run(data, tmp_path / "whole", *extra)

    append = checkpoints.append_log

    def interrupt_at_step_3(path, record):
        append(path, record)
        if record["step"] == 3:
            signal.raise_signal(signal.SIGINT)  # as Ctrl-C: the run finishes the step, saves and stops

    monkeypatch.setattr(checkpoints, "append_log", interrupt_at_step_3)
    part = run(data, tmp_path / "part", *extra)
    monkeypatch.setattr(checkpoints, "append_log", append)
    assert sorted(part) == [1, 2, 3] and (tmp_path / "part" / "checkpoint-000003").is_dir()
    assert not (tmp_path / "part" / "final").exists()
    resumed = run(data, tmp_path / "part", *extra, "--resume")
    assert resumed == whole  # exactly
    for component in ("unet", "text_encoder"):
        assert max_diff(tensors(tmp_path / "part" / "final", component),
                        tensors(tmp_path / "whole" / "final", component)) == 0


def test_resume_with_more_steps_and_from_a_named_checkpoint(data, tmp_path):
    constant = ["--lr-schedule", "constant", "--save-every", "2"]
    whole = run(data, tmp_path / "whole", "--max-steps", "6", *constant, "--keep", "0")
    run(data, tmp_path / "part", "--max-steps", "4", *constant)  # a shorter first run, then more steps
    assert run(data, tmp_path / "part", "--max-steps", "6", *constant, "--resume") == whole
    assert max_diff(tensors(tmp_path / "part" / "final"), tensors(tmp_path / "whole" / "final")) == 0
    named = tmp_path / "whole" / "checkpoint-000002"
    again = run(data, tmp_path / "whole", "--max-steps", "6", *constant, "--resume", named)
    assert again == whole


def test_old_runs_are_never_overwritten_and_bad_resumes_are_one_line_errors(data, tmp_path):
    out = tmp_path / "run"
    run(data, out, "--max-steps", "2", "--save-every", "1", "--keep", "0")
    log = (out / "log.jsonl").read_text()

    def says(*extra, to=out):
        with pytest.raises(SystemExit) as e:
            run(data, to, *extra)
        assert e.value.code.startswith("train.py: error: ") and "\n" not in e.value.code
        return e.value.code

    assert "already holds a run (checkpoint-000001, checkpoint-000002, final); add --resume" in says("--max-steps", "4")
    assert (out / "log.jsonl").read_text() == log and sorted(p.name for p in out.iterdir()) == [
        "checkpoint-000001", "checkpoint-000002", "final", "log.jsonl"]
    assert "is at step 2, past --max-steps 1" in says("--max-steps", "1", "--resume")
    (tmp_path / "file").write_text("x")
    assert f"--out {tmp_path / 'file'} is a file" in says(to=tmp_path / "file")
    assert "nowhere: not a checkpoint (no training_state.pt)" in says("--resume", tmp_path / "nowhere")
    state = out / "checkpoint-000002" / "training_state.pt"
    state.write_bytes(state.read_bytes()[:200])
    assert "checkpoint-000002: damaged checkpoint" in says("--max-steps", "3", "--resume")
    assert (out / "log.jsonl").read_text() == log


def test_weights_that_blew_up_are_never_saved(data, tmp_path, monkeypatch):
    def nan_gradients(params, max_norm):  # a last update gone wrong while its loss was still finite
        for p in params:
            p.grad.fill_(float("nan"))
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", nan_gradients)
    with pytest.raises(SystemExit, match="the weights hold NaN or infinity after step 1; not saved"):
        run(data, tmp_path, "--max-steps", "1")
    assert not (tmp_path / "final").exists() and not list(tmp_path.glob("checkpoint-*"))


def test_cached_latents_and_loader_workers_give_the_same_losses(data, tmp_path):
    plain = run(data, tmp_path / "plain", "--max-steps", "5")  # 2.5 epochs: later epochs read the cache
    cached = run(data, tmp_path / "cached", "--max-steps", "5", "--cache-latents", "--num-workers", "2")
    assert max(abs(plain[s] - cached[s]) for s in plain) <= 1e-6


def test_gradient_accumulation_equals_the_full_batch(data, tmp_path, sgd):
    full = run(data, tmp_path / "full", "--max-steps", "3", *NO_CLIP)
    accumulated = run(data, tmp_path / "acc", "--max-steps", "3", "--micro-batch-size", "1", *NO_CLIP)
    assert max(abs(full[s] - accumulated[s]) for s in full) <= 1e-5
    assert max_diff(tensors(tmp_path / "full" / "final"), tensors(tmp_path / "acc" / "final")) <= 1e-5
    assert max_diff(tensors(tmp_path / "full" / "final"), training.random_model("tiny", 32, 0).unet.state_dict()) > 1e-3
    other_seed = run(data, tmp_path / "seed", "--max-steps", "3", "--seed", "1", *NO_CLIP)
    assert max(abs(full[s] - other_seed[s]) for s in full) > 1e-3  # the comparison can see a difference


def test_crash_while_saving_leaves_the_previous_checkpoint(data, tmp_path, monkeypatch):
    save, calls = torch.save, []

    def crash_on_second(obj, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        save(obj, path, *a, **k)

    monkeypatch.setattr(training.torch, "save", crash_on_second)
    with pytest.raises(OSError, match="disk full"):
        run(data, tmp_path, "--max-steps", "6", "--save-every", "2")
    monkeypatch.setattr(training.torch, "save", save)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000002", "log.jsonl"]  # no temporary folder
    state, ema = checkpoints.load_training_state(tmp_path / "checkpoint-000002")
    assert state["step"] == 2 and ema is not None
    StableDiffusion.from_pretrained(tmp_path / "checkpoint-000002")


def test_nan_loss_stops_with_a_message_and_keeps_the_last_checkpoint(data, tmp_path, monkeypatch):
    forward, calls = training.Denoiser.forward, []

    def nan_at_step_4(self, *args):
        calls.append(1)
        loss = forward(self, *args)
        return loss * float("nan") if len(calls) == 4 else loss

    monkeypatch.setattr(training.Denoiser, "forward", nan_at_step_4)
    with pytest.raises(SystemExit) as e:
        run(data, tmp_path, "--max-steps", "6", "--save-every", "3")
    message = str(e.value.code)
    assert message.startswith("train.py: error: loss is nan at step 4") and "checkpoint-000003" in message
    assert "\n" not in message
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-000003"]
    assert not (tmp_path / "final").exists()


def torchrun(tmp_path, *argv, patch=""):
    """train.py's main in 2 processes over gloo (SGD patched in, see SGD_PATCH); each process appends
    its rank to tmp_path/ema-ranks when it makes an EMA."""
    script = tmp_path / "train_sgd.py"
    script.write_text(f"import os, sys, torch\nsys.path.insert(0, {str(ROOT)!r})\n{SGD_PATCH}\n{patch}\n"
                      "import train\nfrom minroentgen import optimization\nmake = optimization.EMA.__init__\n"
                      "def recorded(self, *a):\n"
                      f"    open({str(tmp_path / 'ema-ranks')!r}, 'a').write(os.environ['RANK'])\n"
                      "    make(self, *a)\n"
                      "optimization.EMA.__init__ = recorded\ntrain.main()\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           "--init", "tiny", *BASE, *map(str, argv)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(data, tmp_path, sgd):
    """2 processes x 2 accumulated micro-batches of 1 = 4 images, with a checkpoint and validation
    samples (rank 0 alone, the other waiting) mid-run: the same losses and weights as one process."""
    extra = ["--max-steps", "3", *NO_CLIP, "--save-every", "2", "--sample-every", "2", "--val-prompts", "x",
             "--val-steps", "1"]
    single = run(data, tmp_path / "one", *extra)
    done = torchrun(tmp_path, "--data", data, "--out", tmp_path / "two", *extra, "--micro-batch-size", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "batch 4 = 1 x 2 accumulation x 2 processes" in done.stdout
    double = losses(tmp_path / "two")
    assert max(abs(single[s] - double[s]) for s in single) <= 1e-5
    assert max_diff(tensors(tmp_path / "one" / "final"), tensors(tmp_path / "two" / "final")) <= 1e-5
    assert (tmp_path / "ema-ranks").read_text() == "0"  # final/ holds EMA weights: rank 0's are right
    assert (tmp_path / "two" / "samples" / "step-000002.png").is_file()


@pytest.mark.slow
def test_torchrun_nan_validation_on_rank_0_ends_every_process(data, tmp_path):
    patch = ("from minroentgen.vae import AutoencoderKL\n"
             "AutoencoderKL.decode = lambda self, z: torch.full((len(z), 3, 32, 32), float('nan'))")
    done = torchrun(tmp_path, "--data", data, "--out", tmp_path / "out", "--max-steps", "3",
                    "--sample-every", "1", "--val-prompts", "x", "--val-steps", "1", patch=patch)
    assert done.returncode != 0
    assert "train.py: error: the validation samples at step 1 hold NaN or infinity" in done.stderr
    assert "train.py: error: stopped: rank 0 failed (its message is above)" in done.stderr  # not killed
    assert sorted(losses(tmp_path / "out")) == [1]


def test_step_sampler_splits_each_global_batch_into_disjoint_slices():
    G, steps = 12, 2
    seen = []
    for rank in range(2):
        it = iter(training.StepSampler(start_step=1, micro_batch=3, accumulation=2, world_size=2, rank=rank))
        seen += [p for _ in range(2 * steps) for p in next(it)]
    assert sorted(seen) == list(range(G, G * (steps + 1)))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_loss_is_diffusers_train_text_to_image_weighting(prediction_type):
    diffusers = pytest.importorskip("diffusers")
    from diffusers.training_utils import compute_snr
    from minroentgen.configs import SchedulerConfig
    from minroentgen.noise_schedule import NoiseSchedule
    sd = training.random_model("tiny", 32, seed=0)
    ours = NoiseSchedule(SchedulerConfig(prediction_type=prediction_type))
    theirs = diffusers.DDPMScheduler.from_config(ours.config.__dict__)
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(6, 4, 4, 4, generator=g), torch.randn(6, 4, 4, 4, generator=g)
    t = torch.tensor([0, 3, 40, 300, 700, 999])  # SNR from ~1e3 down to ~5e-3, on both sides of gamma
    ids = sd.tokenizer(["left effusion", "", "cardiomegaly", "no pneumothorax", "edema", "nodule"])
    assert torch.allclose(ours.snr(t), compute_snr(theirs, t), rtol=1e-6)
    with torch.no_grad():  # the example's loss, as train_text_to_image.py --snr_gamma 5 computes it
        snr = compute_snr(theirs, t)
        weights = torch.stack([snr, 5 * torch.ones_like(t)], dim=1).min(dim=1)[0]
        weights = weights / snr if prediction_type == "epsilon" else weights / (snr + 1)
        target = noise if prediction_type == "epsilon" else theirs.get_velocity(latents, noise, t)
        prediction = sd.unet(theirs.add_noise(latents, noise, t), t, sd.text_encoder(ids))
        expected = (torch.nn.functional.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3)) * weights).mean()
        plain = training.Denoiser(sd.unet, sd.text_encoder, ours, False)(latents, ids, noise, t)
        weighted = training.Denoiser(sd.unet, sd.text_encoder, ours, False, snr_gamma=5)(latents, ids, noise, t)
    assert weighted.item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(weighted.item() - plain.item()) > 0.1 * plain.item()  # the weighting changes the loss


def test_snr_gamma_reaches_the_loss(data, tmp_path):
    plain, weighted = run(data, tmp_path / "plain", "--max-steps", "1"), run(data, tmp_path / "snr", "--max-steps", "1",
                                                                              "--snr-gamma", "5")
    assert weighted[1] < 0.9 * plain[1]  # the same batch: min(SNR, 5) / SNR <= 1 weighs every example down or not at all


def test_zero_snr_trains_v_prediction_and_saves_the_schedule(data, tmp_path):
    plain = run(data, tmp_path / "plain", "--max-steps", "1")
    zsnr = run(data, tmp_path / "zsnr", "--max-steps", "1", "--zero-snr")
    assert abs(zsnr[1] - plain[1]) > 0.05 * plain[1]  # the same batch, another target (v)
    final = tmp_path / "zsnr" / "final"
    config = json.loads((final / "scheduler" / "scheduler_config.json").read_text())
    assert config["rescale_betas_zero_snr"] is True and config["prediction_type"] == "v_prediction"
    assert config["timestep_spacing"] == "trailing" and config["_class_name"] == "DDIMScheduler"
    assert json.loads((final / "model_index.json").read_text())["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert json.loads((final / "sampling.json").read_text())["scheduler"] == "ddim"
    assert sorted(run(data, tmp_path / "zsnr", "--max-steps", "2", "--resume")) == [1, 2]  # the schedule resumes


REPORT = "Small left pleural effusion. The heart is enlarged. Right internal jugular line, tip in the SVC. No pneumothorax."


def sentences(report: str) -> list:
    return [s.rstrip(".").split() for s in report.split(". ")]


def test_text_augment_changes_words_within_sentences_only():
    words = training.vocabulary_words(training.CLIPTokenizer.default())
    assert len(words) > 20000 and "heart" in words and all(w.isascii() and w.isalpha() for w in words)
    g = torch.Generator().manual_seed(0)
    assert training.augment_report(REPORT, 0.0, g, words) == REPORT
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())  # p = 0 draws nothing
    kinds, changed = set(), 0
    for seed in range(100):
        out = training.augment_report(REPORT, 0.5, torch.Generator().manual_seed(seed), words)
        assert out.endswith(".") and len(sentences(out)) == 4
        for before, after in zip(sentences(REPORT), sentences(out)):
            if after == before:
                continue
            changed += 1
            if len(after) == len(before) + 1:  # one vocabulary word inserted, the others in order
                extra = next(i for i in range(len(after)) if after[:i] + after[i + 1:] == before)
                kinds.add("insert") if after[extra] in words else pytest.fail(f"{after[extra]} inserted")
            else:
                assert sorted(after) == sorted(before)  # a finding keeps its side, size and zone
                kinds.add("swap" if sum(a != b for a, b in zip(after, before)) == 2 else "shuffle")
    assert kinds == {"insert", "swap", "shuffle"} and 0.3 < changed / 400 < 0.5


def test_text_augment_changes_only_the_text_of_a_training_example(data):
    tokenizer = training.CLIPTokenizer.default()
    dataset = ImageReportDataset(read_pairs(data), 32, tokenizer)
    plain, aug = (training.PositionDataset(dataset, tokenizer, 0, (4, 4, 4), 1000, 0.0, p) for p in (0.0, 1.0))
    a, b = plain[3], aug[3]
    assert not torch.equal(a["input_ids"], b["input_ids"])
    assert all(torch.equal(a[k], b[k]) for k in ("timestep", "noise", "posterior_eps", "pixel_values"))


def test_text_augment_reaches_the_loss(data, tmp_path):
    plain, aug = run(data, tmp_path / "plain", "--max-steps", "1"), run(data, tmp_path / "aug", "--max-steps", "1",
                                                                         "--text-augment", "1")
    assert aug[1] != plain[1]  # the same images, noise and timesteps; other token ids


def test_prompt_template_trains_on_the_patients_demographics(data, tmp_path, monkeypatch, capsys):
    """RoentGen-v2's prompts from a table's age, gender and race columns: what the tokenizer is given is
    the filled template; a pair without a known race is skipped and counted; final/ records the template."""
    with open(data, newline="") as f:
        rows = list(csv.DictReader(f))
    people = [("65", "F", "WHITE"), ("40", "M", "BLACK/AFRICAN AMERICAN"), ("71", "M", "ASIAN - CHINESE"),
              ("23", "F", "HISPANIC OR LATINO"), ("88", "F", "White"), ("52", "M", "UNKNOWN"), ("30", "M", "black"),
              ("47", "F", "OTHER")]
    table = tmp_path / "demographics.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "report", "anchor_age", "gender", "race"])
        writer.writerows([data.parent / row["image"], row["report"], *person] for row, person in zip(rows, people))
    words = {"F": "female", "M": "male"}
    races = ["WHITE", "BLACK", "ASIAN", "HISPANIC", "WHITE", None, "BLACK", "OTHER"]
    expected = {f"{age} year old {race} {words[sex]}. {row['report']}"
                for row, (age, sex, _), race in zip(rows, people, races) if race}
    seen, tokenize = [], CLIPTokenizer.__call__
    monkeypatch.setattr(CLIPTokenizer, "__call__",
                        lambda self, prompts: seen.extend(prompts) or tokenize(self, prompts))
    template = "{age} year old {race} {sex}. {report}"
    capsys.readouterr()
    run(table, tmp_path / "run", "--max-steps", "2", "--text-dropout", "0", "--prompt-template", template)
    assert set(seen) == expected and len(seen) == 8  # 2 steps of 4: the 7 usable pairs, one of them twice
    printed = capsys.readouterr().out
    assert "7 of 8 image-report pairs used; skipped 1: 1 missing race (" in printed
    assert "prompts from --prompt-template, e.g. '" in printed
    assert '"your prompt" --age ... --race ... --sex ...)' in printed  # sample.py's patient flags
    assert json.loads((tmp_path / "run" / "final" / "sampling.json").read_text())["prompt_template"] == template
    with pytest.raises(SystemExit, match="was trained with --prompt-template '{age} year old {race} {sex}. "
                                         "{report}'; give the same"):
        run(table, tmp_path / "run", "--max-steps", "3", "--resume", "--prompt-template", "{report}")


def test_lr_schedule_and_ema():
    assert optimization.lr_factor(0, 4, 100, "cosine") == 0.25 and optimization.lr_factor(3, 4, 100, "cosine") == 1
    assert optimization.lr_factor(52, 4, 100, "cosine") == pytest.approx(0.5)
    assert optimization.lr_factor(99, 4, 100, "constant") == 1 and optimization.lr_factor(100, 4, 100, "cosine") == 0
    model = torch.nn.Linear(2, 1)
    ema = optimization.EMA(model, decay=0.5)
    before = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=100)  # decay = min(0.5, 101 / 110)
    assert torch.allclose(ema.shadow["weight"], before + 0.5)
    with ema.applied(model):
        assert torch.allclose(model.weight, before + 0.5)
    assert torch.allclose(model.weight, before + 1)


@pytest.mark.parametrize("extra, says", [
    (["--data", "nowhere.csv", "--init", "tiny"], "nowhere.csv"),
    (["--data", "DATA", "--init", "tiny", "--weights", "w"], "exactly one of --weights"),
    (["--data", "DATA"], "exactly one of --weights"),
    (["--data", "DATA", "--init", "tiny", "--batch-size", "5", "--micro-batch-size", "2"], "not a multiple"),
    (["--data", "DATA", "--init", "tiny", "--resume"], "--resume: no checkpoint"),
    (["--data", "BAD", "--init", "tiny"], "no usable image-report pair"),
    (["--data", "DATA", "--weights", "missing-weights"], "missing-weights"),
    (["--data", "DATA", "--init", "tiny", "--snr-gamma", "0"], "--snr-gamma must be positive"),
    (["--data", "DATA", "--init", "tiny", "--keep", "-1"], "--keep must be at least 0 and finite, got -1"),
    (["--data", "DATA", "--init", "tiny", "--lr", "-0.001"], "--lr must be positive"),
    (["--data", "DATA", "--init", "tiny", "--lr", "nan"], "--lr must be positive and finite, got nan"),
    (["--data", "DATA", "--init", "tiny", "--lr", "inf"], "--lr must be positive and finite, got inf"),
    (["--data", "DATA", "--weights", ""], "exactly one of --weights"),
    (["--data", "DATA", "--init", "tiny", "--val-steps", "5000"], "--val-steps must be at most 1000"),
    (["--data", "DATA", "--init", "tiny", "--seed", "-1"], "--seed must be from 0"),
    (["--data", "DATA", "--init", "tiny", "--freeze-unet"], "give --train-text-encoder too"),
    (["--data", "DATA", "--init", "tiny", "--text-augment", "1.5"], "--text-augment is a probability: it must be in [0, 1], got 1.5"),
    (["--data", "DATA", "--init", "tiny", "--prompt-template", "{age} year old {report}"],
     "--prompt-template uses {age}, which this data lacks; available: {report}, {labels} (age, sex and race come"),
    (["--data", "DATA", "--init", "tiny", "--demographics", "mimic-iv"], "--demographics fills the fields of "
     "--prompt-template; give it too"),
    (["--data", "DATA", "--init", "tiny", "--prompt-template", "{report}", "--demographics", "mimic-iv"],
     "--demographics (MIMIC-IV) is for MIMIC-CXR only; give age, sex and race as columns of the table"),
])
def test_bad_input_gets_a_one_line_error(extra, says, data, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("image,report\nmissing.png,small effusion\n")
    argv = [{"DATA": str(data), "BAD": str(bad)}.get(a, a) for a in extra]
    with pytest.raises(SystemExit) as e:
        train.main([*argv, "--out", str(tmp_path / "out"), "--num-workers", "0"])
    message = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("train.py: error: ") and says in message and "\n" not in message


def test_auto_precision_is_fp16_where_a_gpu_lacks_bf16(monkeypatch):
    """V100/T4 have no native bf16: --precision auto must not pick it there."""
    support = {}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: support["bf16"])
    assert optimization.auto_precision(torch.device("cpu")) == "fp32"
    for native, expected in ((True, "bf16"), (False, "fp16")):
        support["bf16"] = native
        assert optimization.auto_precision(torch.device("cuda")) == expected


def test_default_micro_batch_holds_the_papers_pixels_per_gpu():
    assert optimization.default_micro_batch(256, 512) == 8  # one GPU: 8 x 32 accumulation
    assert optimization.default_micro_batch(32, 512) == 8 and optimization.default_micro_batch(12, 512) == 6
    assert optimization.default_micro_batch(7, 512) == 7 and optimization.default_micro_batch(9, 512) == 3
    assert optimization.default_micro_batch(256, 256) == 32 and optimization.default_micro_batch(256, 1024) == 2
    assert optimization.default_micro_batch(16, 32) == 16 and optimization.default_micro_batch(5, 4096) == 1


def test_out_of_gpu_memory_is_a_one_line_error_naming_the_remedies(data, tmp_path, monkeypatch, capsys):
    def out_of_memory(self, *args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(training.Denoiser, "forward", out_of_memory)
    asked = []
    monkeypatch.setattr(optimization, "default_micro_batch", lambda *a: asked.append(a) or 1)  # as at 2048 px
    with pytest.raises(SystemExit) as e:
        run(data, tmp_path, "--max-steps", "2")
    assert asked == [(4, 32)] and "batch 4 = 1 x 4 accumulation x 1 processes" in capsys.readouterr().out
    message = str(e.value.code)
    assert message.startswith("train.py: error: out of GPU memory at --micro-batch-size 1")
    assert "--gradient-checkpointing" in message and "\n" not in message


def test_resume_in_another_precision_and_on_another_device(data, tmp_path, monkeypatch):
    """bf16 -> fp16 (no scaler state yet: a fresh scaler) -> bf16; a GPU run's fused AdamW resumed on
    the CPU runs unfused, as this run chose for its device."""
    out = tmp_path / "run"
    run(data, out, "--max-steps", "2", "--precision", "bf16")
    run(data, out, "--max-steps", "3", "--precision", "fp16", "--resume")
    state, _ = checkpoints.load_training_state(out / "checkpoint-000003")
    assert state["scaler"]["scale"] > 0
    for group in state["optimizer"]["param_groups"]:
        group["fused"] = True  # as written on a GPU
    torch.save(state, out / "checkpoint-000003" / "training_state.pt")
    made = []

    class Recorded(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)
    monkeypatch.setattr(torch.optim, "AdamW", Recorded)
    assert sorted(run(data, out, "--max-steps", "4", "--precision", "bf16", "--resume")) == [1, 2, 3, 4]
    assert [g["fused"] for g in made[0].param_groups] == [False]


def test_load_optimizer_sets_fused_for_this_device():
    model = torch.nn.Linear(2, 2)
    cpu_run = torch.optim.AdamW(model.parameters(), fused=False)
    model(torch.ones(1, 2)).sum().backward()
    cpu_run.step()
    gpu_run = torch.optim.AdamW(model.parameters(), fused=True)  # fused=True: what train.py asks on CUDA
    checkpoints.load_optimizer(gpu_run, torch.amp.GradScaler("cpu", enabled=True),
                            {"optimizer": cpu_run.state_dict(), "scaler": {}})
    assert gpu_run.param_groups[0]["fused"] is True and gpu_run.state_dict()["state"][0]["step"] == 1


def test_only_log_steps_wait_for_the_device(data, tmp_path, monkeypatch, sgd):
    """Reading a number out of a tensor (.item(), .tolist(), bool(), float()) makes the host wait for
    the GPU: train.py does it once a --log-every step, not every step (the loader's CPU index lists
    aside, which are not floating point)."""
    reads = []

    def counting(original):
        def read(self, *args):
            reads.append(self.is_floating_point())
            return original(self, *args)
        return read
    for name in ("item", "tolist", "__bool__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name)))
    counts = {}
    for steps in (2, 6):
        reads.clear()
        found = run(data, tmp_path / str(steps), "--max-steps", steps, "--log-every", 3,
                    "--micro-batch-size", 2)
        assert sorted(found) == sorted({3, 6, steps} & set(range(1, steps + 1)))
        counts[steps] = sum(reads)
    assert counts[6] == counts[2] + 1, counts  # one more log step, no reads for the other 4 steps


def test_nan_validation_samples_are_a_one_line_error(data, tmp_path, monkeypatch):
    monkeypatch.setattr(AutoencoderKL, "decode",
                        lambda self, z: torch.full((len(z), 3, 32, 32), float("nan")))
    with pytest.raises(SystemExit) as e:
        run(data, tmp_path, "--max-steps", "3", "--sample-every", "1", "--val-prompts", "x",
            "--val-steps", "1")
    message = str(e.value.code)
    assert message.startswith("train.py: error: the validation samples at step 1 hold NaN or infinity")
    assert "\n" not in message and sorted(losses(tmp_path)) == [1]


def test_torchrun_setup_waits_an_hour_and_wants_a_gpu_a_process(data, tmp_path, monkeypatch):
    argv = ["--data", str(data), "--out", str(tmp_path), "--init", "tiny", *BASE]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit) as e:  # torchrun --nproc_per_node 2 on a machine with one GPU
        train.main([*argv, "--device", "cuda"])
    assert e.value.code == ("train.py: error: process 1 on this machine has no GPU of its own (1 here); "
                            "start at most 1 (torchrun --nproc_per_node 1)")
    seen = {}

    def init_process_group(backend, timeout=None):
        seen.update(backend=backend, timeout=timeout)
        raise RuntimeError("stop here")
    monkeypatch.setattr(torch.distributed, "init_process_group", init_process_group)
    with pytest.raises(RuntimeError, match="stop here"):
        train.main([*argv, "--device", "cpu"])
    assert seen == {"backend": "gloo", "timeout": timedelta(hours=1)}  # rank 0 may write 16 GB alone


def test_cuda_speedups_only_on_cuda(data, tmp_path, monkeypatch):
    from minroentgen import pipeline
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    precision = torch.get_float32_matmul_precision()
    pipeline.cuda_speedups(torch.device("cpu"))
    assert (torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()) == (False, precision)
    try:
        pipeline.cuda_speedups(torch.device("cuda", 1))
        assert torch.backends.cudnn.benchmark and torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(precision)
    asked = []  # train.py, train_vae.py and sample.py ask for them with their device
    monkeypatch.setattr(pipeline, "cuda_speedups", asked.append)
    run(data, tmp_path / "train", "--max-steps", "1", "--device", "cpu")
    train_vae.main(["--data", str(data), "--out", str(tmp_path / "vae"), "--init", "tiny",
                    "--resolution", "32", "--batch-size", "4", "--max-steps", "1", "--num-workers", "0",
                    "--device", "cpu"])
    sample.main(["x", "--weights", str(tmp_path / "train" / "final"), "--steps", "1", "--device", "cpu",
                 "--out", str(tmp_path / "samples")])
    assert asked == [torch.device("cpu")] * 3


@pytest.mark.slow
def test_compile_gives_the_eager_losses(data, tmp_path, sgd, monkeypatch):
    """--compile (torch.compile of the UNet, in place: checkpoints keep their names); about two
    minutes of compiling on a CPU."""
    eager = run(data, tmp_path / "eager", "--max-steps", "2", *NO_CLIP)
    asked, compile_module = [], torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: asked.append(
        type(self).__name__) or compile_module(self, *a, **k))
    compiled = run(data, tmp_path / "compiled", "--max-steps", "2", *NO_CLIP, "--compile")
    assert asked == ["UNet2DConditionModel"]
    assert max(abs(eager[s] - compiled[s]) for s in eager) <= 1e-4
    assert max_diff(tensors(tmp_path / "eager" / "final"), tensors(tmp_path / "compiled" / "final")) <= 1e-4
