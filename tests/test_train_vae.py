"""train_vae.py: a tiny VAE (`--init tiny`) on 32-pixel phantoms, and train.py starting from it (--vae)."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
import train_vae
from minroentgen import checkpoints
from minroentgen.phantoms import phantom
from minroentgen.data import read_pairs
from minroentgen.dataset import ImageReportDataset
from minroentgen.configs import VAEConfig
from minroentgen.vae import AutoencoderKL

BASE = ["--init", "tiny", "--resolution", "32", "--batch-size", "4", "--warmup", "5", "--num-workers", "0",
        "--log-every", "1", "--sample-every", "1000", "--save-every", "1000"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """16 phantoms (64 px, trained at 32) in a CSV: 4 steps of batch 4 make an epoch."""
    out = tmp_path_factory.mktemp("phantoms")
    phantom.write_dataset(out, n=16, size=64, seed=0)
    return out / "reports.csv"


def run(data, out, *extra, start=BASE) -> dict[int, float]:
    train_vae.main(["--data", str(data), "--out", str(out), *map(str, start), *map(str, extra)])
    return losses(out)


def losses(out) -> dict[int, float]:
    """step -> loss of log.jsonl; a step logged twice (after a resume) keeps its last value."""
    return {r["step"]: r["loss"] for r in map(json.loads, (Path(out) / "log.jsonl").read_text().splitlines())}


def weights(folder) -> dict:
    return load_file(Path(folder) / "vae" / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """40 steps (10 epochs of the 16 phantoms); checkpoints and reconstruction grids at 20 and 40."""
    out = tmp_path_factory.mktemp("vae")
    run(data, out, "--max-steps", "40", "--save-every", "20", "--sample-every", "20")
    return out


def test_reconstruction_loss_falls(trained):
    records = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 41))
    l1 = [r["l1"] for r in records]
    assert sum(l1[-5:]) / 5 < 0.6 * sum(l1[:5]) / 5, l1
    assert records[-1]["val_psnr"] > records[19]["val_psnr"] > 0 and "val_l1" in records[-1]
    assert sorted(p.name for p in trained.glob("checkpoint-*")) == ["checkpoint-000020", "checkpoint-000040"]
    assert sorted(p.name for p in (trained / "samples").iterdir()) == ["step-000020.png", "step-000040.png"]
    assert not list(trained.glob(".*"))  # no temporary folders left


@torch.no_grad()
def test_saved_vae_loads_here_and_in_diffusers_with_its_scaling_factor(trained, data):
    diffusers = pytest.importorskip("diffusers")
    theirs = diffusers.AutoencoderKL.from_pretrained(trained / "vae", local_files_only=True).eval()
    config = json.loads((trained / "vae" / "config.json").read_text())
    ours = AutoencoderKL(VAEConfig.from_dict(config)).eval()
    ours.load_state_dict(weights(trained), strict=True)
    assert checkpoints.load_vae(trained).config == ours.config
    x = torch.stack([ImageReportDataset(read_pairs(data), 32)[i]["pixel_values"] for i in range(4)])
    mine, expected = ours.decode(ours.encode(x).mode()), theirs.decode(theirs.encode(x).latent_dist.mode()).sample
    assert (mine - expected).abs().max() <= 1e-5 and (expected - x).abs().mean() < 0.5
    assert weights(trained).keys() == weights(trained / "checkpoint-000040").keys()
    assert all(torch.equal(v, weights(trained / "checkpoint-000040")[k]) for k, v in weights(trained).items())
    # scaling_factor = 1 / std of posterior samples of the first 4 batches, drawn with diffusers here
    dataset = ImageReportDataset(read_pairs(data), 32)
    g = torch.Generator().manual_seed(0)
    z = [theirs.encode(torch.stack([dataset[j]["pixel_values"] for j in range(i, i + 4)])).latent_dist.sample(g)
         for i in range(0, 16, 4)]
    assert config["scaling_factor"] == pytest.approx(1 / torch.cat(z).std().item(), rel=1e-5)
    assert abs(config["scaling_factor"] - 0.18215) > 0.01  # measured, not the preset's


def test_same_seed_same_losses_and_resume_continues_exactly(data, tmp_path, monkeypatch):
    whole = run(data, tmp_path / "whole", "--max-steps", "6")
    assert run(data, tmp_path / "again", "--max-steps", "6") == whole
    assert max(abs(a - b) for a, b in zip(whole.values(), run(data, tmp_path / "seed", "--max-steps", "6",
                                                                "--seed", "1").values())) > 1e-4
    append = checkpoints.append_log

    def crash_at_step_4(path, record):
        if record["step"] == 4:
            raise OSError("power cut")
        append(path, record)

    monkeypatch.setattr(checkpoints, "append_log", crash_at_step_4)
    with pytest.raises(OSError, match="power cut"):
        run(data, tmp_path / "part", "--max-steps", "6", "--save-every", "3")
    monkeypatch.setattr(checkpoints, "append_log", append)
    assert run(data, tmp_path / "part", "--max-steps", "6", "--save-every", "3", "--resume") == whole
    assert all(torch.equal(v, weights(tmp_path / "whole")[k]) for k, v in weights(tmp_path / "part").items())


def test_kl_weight_weighs_the_kl_per_pixel_value(data, tmp_path):
    train_vae.main(["--data", str(data), "--out", str(tmp_path), *BASE, "--max-steps", "1", "--kl-weight", "0.5"])
    r = json.loads((tmp_path / "log.jsonl").read_text())
    assert r["kl"] > 1 and r["loss"] == pytest.approx(r["l1"] + 0.5 * r["kl"] / (3 * 32 * 32), rel=1e-6)


def test_an_old_run_is_not_overwritten(data, tmp_path):
    run(data, tmp_path, "--max-steps", "2")
    with pytest.raises(SystemExit, match="already holds a run .*add --resume"):
        run(data, tmp_path, "--max-steps", "3")
    with pytest.raises(SystemExit, match="is at step 2, past --max-steps 1"):
        run(data, tmp_path, "--max-steps", "1", "--resume")


def test_starts_from_given_weights(trained, data, tmp_path):
    scratch = run(data, tmp_path / "scratch", "--max-steps", "1")
    tuned = run(data, tmp_path / "tuned", "--max-steps", "1", start=["--weights", trained, *BASE[2:]])
    assert tuned[1] < 0.8 * scratch[1]


def test_decoder_only_keeps_the_encoder_and_so_the_latents(trained, data, tmp_path):
    run(data, tmp_path, "--max-steps", "4", "--decoder-only", start=["--weights", trained, *BASE[2:]])
    before, after = weights(trained), weights(tmp_path)
    for key in before:  # the encoder side bit for bit, every decoder tensor moved
        same = torch.equal(before[key], after[key])
        assert same == key.startswith(("encoder.", "quant_conv.")), key
    config = lambda folder: json.loads((folder / "vae" / "config.json").read_text())
    assert config(tmp_path)["scaling_factor"] == config(trained)["scaling_factor"]
    state, _ = checkpoints.load_training_state(checkpoints.latest_checkpoint(tmp_path))
    assert state["decoder_only"] is True
    with pytest.raises(SystemExit, match="was trained with --decoder-only"):  # a resume keeps the mode it was run with
        run(data, tmp_path, "--max-steps", "6", "--resume", start=["--weights", trained, *BASE[2:]])


def test_train_py_takes_the_trained_vae(trained, data, tmp_path):
    train.main(["--data", str(data), "--out", str(tmp_path), "--init", "tiny", "--vae", str(trained),
                "--resolution", "32", "--batch-size", "4", "--max-steps", "2", "--num-workers", "0",
                "--sample-every", "0", "--val-prompts"])
    assert all(torch.equal(v, weights(trained)[k]) for k, v in weights(tmp_path / "final").items())
    assert (json.loads((tmp_path / "final" / "vae" / "config.json").read_text())["scaling_factor"]
            == json.loads((trained / "vae" / "config.json").read_text())["scaling_factor"])


@pytest.mark.parametrize("script, extra, says", [
    (train_vae, ["--data", "nowhere.csv", "--init", "tiny"], "nowhere.csv"),
    (train_vae, ["--data", "DATA"], "exactly one of --init"),
    (train_vae, ["--data", "DATA", "--init", "tiny", "--weights", "w"], "exactly one of --init"),
    (train_vae, ["--data", "DATA", "--weights", "missing-vae"], "missing-vae: no vae/config.json"),
    (train_vae, ["--data", "DATA", "--init", "tiny", "--resume"], "--resume: no checkpoint"),
    (train_vae, ["--data", "DATA", "--init", "tiny", "--decoder-only"], "--decoder-only keeps a trained encoder"),
    (train_vae, ["--data", "DATA", "--init", "tiny", "--resolution", "36"], "multiple of 8"),
    (train_vae, ["--data", "DATA", "--init", "tiny", "--max-steps", "0"], "--max-steps must be at least 1"),
    (train_vae, ["--data", "DATA", "--init", "tiny", "--keep", "-1"], "--keep must be at least 0"),
    (train_vae, ["--data", "DATA", "--init", "tiny", "--kl-weight", "-1"], "--kl-weight must be at least 0"),
    (train_vae, ["--data", "DATA", "--weights", ""], "exactly one of --init"),
    (train, ["--data", "DATA", "--weights", "w", "--vae", "v"], "--vae replaces the random VAE of --init"),
    (train, ["--data", "DATA", "--init", "tiny", "--vae", "missing-vae"], "missing-vae: no vae/config.json"),
])
def test_bad_input_gets_a_one_line_error(script, extra, says, data, tmp_path, capsys):
    argv = [str(data) if a == "DATA" else a for a in extra]
    with pytest.raises(SystemExit) as e:
        script.main([*argv, "--out", str(tmp_path / "out"), "--num-workers", "0"])
    message = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith(f"{script.__name__}.py: error: ") and says in message and "\n" not in message


def test_bf16_and_fp16_train_close_to_fp32_and_resume_in_another_precision(data, tmp_path):
    fp32 = run(data, tmp_path / "fp32", "--max-steps", "3", "--precision", "fp32")
    for precision in ("bf16", "fp16"):  # autocast runs on the CPU too
        got = run(data, tmp_path / precision, "--max-steps", "3", "--precision", precision)
        assert got != fp32, precision
        assert max(abs(got[s] - fp32[s]) / fp32[s] for s in fp32) < 0.01, (precision, got, fp32)
    resumed = run(data, tmp_path / "bf16", "--max-steps", "4", "--precision", "fp16", "--resume")
    state, _ = checkpoints.load_training_state(tmp_path / "bf16" / "checkpoint-000004")
    assert sorted(resumed) == [1, 2, 3, 4] and state["scaler"]["scale"] > 0  # a fresh scaler
    resumed = run(data, tmp_path / "bf16", "--max-steps", "5", "--precision", "bf16", "--resume")
    assert sorted(resumed)[-1] == 5


def test_gradient_checkpointing_keeps_fewer_activations_for_the_same_gradients(data, tmp_path, monkeypatch):
    from minroentgen import vae
    from minroentgen.configs import VAE_PRESETS
    model = AutoencoderKL(VAE_PRESETS["tiny"]).train()
    g = torch.Generator().manual_seed(0)
    x, eps = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.randn(2, 4, 16, 16, generator=g)

    def backward(checkpointing: bool):
        model.encoder.gradient_checkpointing = model.decoder.gradient_checkpointing = checkpointing
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel()) or t, lambda t: t):
            loss = train_vae.vae_loss(model, x, eps, 1e-6)[0]
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        return sum(kept), grads
    (plain, plain_grads), (checkpointed, grads) = backward(False), backward(True)
    assert checkpointed < plain / 2, (checkpointed, plain)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain_grads, grads))
    calls, wrapped = [], vae.checkpoint
    monkeypatch.setattr(vae, "checkpoint", lambda *a, **k: calls.append(1) or wrapped(*a, **k))
    without = run(data, tmp_path / "plain", "--max-steps", "2")
    assert not calls
    with_it = run(data, tmp_path / "checkpointed", "--max-steps", "2", "--gradient-checkpointing")
    assert calls and max(abs(without[s] - with_it[s]) for s in without) <= 1e-6


def test_out_of_gpu_memory_is_a_one_line_error(data, tmp_path, monkeypatch):
    def out_of_memory(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(train_vae, "vae_loss", out_of_memory)
    with pytest.raises(SystemExit) as e:
        run(data, tmp_path, "--max-steps", "2")
    assert e.value.code == ("train_vae.py: error: out of GPU memory at --batch-size 4 (32 px); give a "
                            "smaller one or add --gradient-checkpointing")


def test_only_log_steps_wait_for_the_device(data, tmp_path, monkeypatch):
    """Reading a number out of a float tensor makes the host wait for the GPU: once a logged step.
    (SGD: AdamW on the CPU reads its per-tensor step counts, which live on the CPU.)"""
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, fused=None: torch.optim.SGD(params, lr=lr))
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _read=original: reads.append(
            self.is_floating_point()) or _read(self, *a))
    counts = {}
    for steps in (2, 6):
        reads.clear()
        assert sorted(run(data, tmp_path / str(steps), "--max-steps", steps, "--log-every", 3)) == [
            s for s in (2, 3, 6) if s <= steps and (s % 3 == 0 or s == steps)]
        counts[steps] = sum(reads)
    assert counts[6] == counts[2] + 1, counts  # one more logged step, no reads for the other 4 steps
