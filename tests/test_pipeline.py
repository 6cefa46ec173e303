"""End to end: `sample.py` gives the same PNG as diffusers' StableDiffusionPipeline on the same weights."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from oracle import diffusers_pipeline

PROMPT = "small left pleural effusion"
KW = dict(steps=6, guidance=4.0, seed=3, n=2, size=32)


@pytest.fixture(scope="module")
def sources(tiny_configs, tmp_path_factory):
    """The same random tiny pipeline as a safetensors folder, a .bin folder and an original single file."""
    from minroentgen.weights import load_checkpoint, save_original

    pipe = diffusers_pipeline(tiny_configs["sd1"])
    root = tmp_path_factory.mktemp("weights")
    pipe.save_pretrained(root / "safetensors", safe_serialization=True)
    pipe.save_pretrained(root / "bin", safe_serialization=False)
    save_original(root / "single.safetensors", load_checkpoint(root / "safetensors").state_dicts)
    return pipe, root


def reference_gray(pipe, scheduler, negative=None, **extra):
    """diffusers' images as our PNGs hold them: uint8 per channel, then the channel mean."""
    import diffusers

    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(PROMPT, negative_prompt=negative, num_inference_steps=KW["steps"], guidance_scale=KW["guidance"],
                  **extra,
                  generator=torch.Generator("cpu").manual_seed(KW["seed"]), num_images_per_prompt=KW["n"],
                  height=KW["size"], width=KW["size"], output_type="np").images  # (n, H, W, 3) in [0, 1]
    rgb = np.round(images * 255)
    return np.round(rgb.mean(axis=-1))


def read_pngs(paths) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p), dtype=np.float64) for p in paths])


def run_sample(weights, scheduler, out, extra=()):
    args = [PROMPT, "--weights", str(weights), "--scheduler", scheduler, "--steps", str(KW["steps"]),
            "--guidance", str(KW["guidance"]), "--seed", str(KW["seed"]), "--n", str(KW["n"]),
            "--height", str(KW["size"]), "--width", str(KW["size"]), "--out", str(out), *extra]
    sample.main(args)
    return [out / f"small-left-pleural-effusion_seed{KW['seed']}_img{i}.png" for i in range(KW["n"])]


@pytest.mark.parametrize("scheduler", ["PNDMScheduler", "DDIMScheduler", "DDPMScheduler"])
def test_same_png_as_diffusers(sources, scheduler, tmp_path):
    pipe, root = sources
    expected = reference_gray(pipe, scheduler)
    assert expected.std() > 1, "reference images are flat: the test would not see a difference"
    name = {"PNDMScheduler": "pndm", "DDIMScheduler": "ddim", "DDPMScheduler": "ddpm"}[scheduler]
    for source in ("safetensors", "bin", "single.safetensors"):
        extra = ("--config", str(root / "safetensors")) if source.startswith("single") else ()
        paths = run_sample(root / source, name, tmp_path / source, extra)
        got = read_pngs(paths)
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1, f"{source} with {name}"


def zero_snr_reference(pipe, folder, **extra):
    """Save `pipe` with a zero-terminal-SNR v-prediction DDIM scheduler (as `train.py --zero-snr`
    saves a model) to `folder`; diffusers' images with it."""
    import diffusers

    original = pipe.scheduler
    pipe.scheduler = diffusers.DDIMScheduler.from_config(original.config, rescale_betas_zero_snr=True,
                                                         prediction_type="v_prediction", timestep_spacing="trailing")
    try:
        pipe.save_pretrained(folder, safe_serialization=True)
        return reference_gray(pipe, "DDIMScheduler", **extra)
    finally:
        pipe.scheduler = original


def test_zero_terminal_snr_model_same_png_as_diffusers(sources, tmp_path):
    """A model as `train.py --zero-snr` saves it: v-prediction on rescaled betas, DDIM from t = 999."""
    expected = zero_snr_reference(sources[0], tmp_path / "zsnr")
    sd_schedule = reference_gray(sources[0], "DDIMScheduler")
    assert np.abs(expected - sd_schedule).max() > 1, "the schedule changed nothing"
    paths = run_sample(tmp_path / "zsnr", "ddim", tmp_path / "out")
    got = read_pngs(paths)
    assert np.abs(got - expected).max() <= 1
    with pytest.raises(SystemExit, match="ddim or ddpm"):
        run_sample(tmp_path / "zsnr", "pndm", tmp_path / "pndm")


def test_guidance_rescale_same_png_as_diffusers(sources, tmp_path):
    """Lin et al. 2024's guidance rescale on a zero-terminal-SNR model, as diffusers' `guidance_rescale`."""
    expected = zero_snr_reference(sources[0], tmp_path / "zsnr", guidance_rescale=0.7)
    plain = zero_snr_reference(sources[0], tmp_path / "plain")
    assert np.abs(expected - plain).max() > 1, "rescaling changed nothing: the test could not fail"
    paths = run_sample(tmp_path / "zsnr", "ddim", tmp_path / "out", ("--guidance-rescale", "0.7"))
    got = read_pngs(paths)
    assert np.abs(got - expected).max() <= 1
    (tmp_path / "zsnr" / "sampling.json").write_text('{"guidance_rescale": 0.7}')  # a model's own setting
    paths = run_sample(tmp_path / "zsnr", "ddim", tmp_path / "out2")
    got = read_pngs(paths)
    assert np.abs(got - expected).max() <= 1


def test_switching_sampler_reads_missing_keys_as_diffusers(sources, tmp_path):
    """A PNDM config has no clip_sample; diffusers' DDIM built from it clips x0 (its default), so ours must."""
    import diffusers

    pipe, root = sources
    original = pipe.scheduler
    pipe.scheduler = diffusers.PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                             skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    try:
        assert "clip_sample" not in pipe.scheduler.config
        pipe.save_pretrained(tmp_path / "pndm", safe_serialization=True)
        expected = reference_gray(pipe, "DDIMScheduler")  # DDIMScheduler.from_config(pndm.config)
        assert pipe.scheduler.config.clip_sample
    finally:
        pipe.scheduler = original
    assert np.abs(expected - reference_gray(pipe, "DDIMScheduler")).max() > 1, "clipping changed nothing"
    paths = run_sample(tmp_path / "pndm", "ddim", tmp_path / "out")
    got = read_pngs(paths)
    assert np.abs(got - expected).max() <= 1


def test_eta_is_ddim_only(sources):
    from minroentgen.pipeline import StableDiffusion

    sd = StableDiffusion.from_pretrained(sources[1] / "safetensors")
    for name in ("pndm", "ddpm"):
        with pytest.raises(ValueError, match=f"eta=0.5 is DDIM's noise level; the {name} sampler has none"):
            sd("x", steps=2, scheduler=name, eta=0.5, progress=False)
    assert sd("x", steps=2, scheduler="ddim", eta=0.5, progress=False).shape[0] == 1


def test_negative_prompt_is_the_unconditional_branch(sources, tmp_path):
    pipe, root = sources
    expected = reference_gray(pipe, "DDIMScheduler", negative="no acute cardiopulmonary process")
    paths = run_sample(root / "safetensors", "ddim", tmp_path, ("--negative", "no acute cardiopulmonary process"))
    got = read_pngs(paths)
    assert np.abs(got - expected).max() <= 1
    plain = reference_gray(pipe, "DDIMScheduler")
    assert np.abs(plain - expected).max() > 1, "the negative prompt changed nothing: the test cannot fail"


def test_outputs_metadata_grid_and_no_overwrite(sources, tmp_path, capsys):
    _, root = sources
    first = run_sample(root / "safetensors", "ddim", tmp_path)
    again = run_sample(root / "safetensors", "ddim", tmp_path)  # same names: must not overwrite
    printed = capsys.readouterr().out.split()
    assert len(printed) == 2 * (KW["n"] + 1)  # n images and a grid, twice
    assert len({*printed}) == len(printed) and all((tmp_path / p).exists() or Image.open(p) for p in printed)
    assert any("grid" in p for p in printed)
    info = Image.open(first[0]).text
    assert info["prompt"] == PROMPT and info["seed"] == str(KW["seed"]) and info["scheduler"] == "ddim"
    assert {"negative_prompt", "steps", "guidance", "weights"} <= info.keys()
    assert Image.open(first[0]).mode == "L"
    assert again == first and sorted(tmp_path.glob("*_v2.png"))


@pytest.mark.parametrize("argv, message", [
    ([], "at least one prompt"),
    (["x", "--height", "-8"], "positive"),
    (["x", "--steps", "0"], "at least 1"),
    (["x", "--n", "0"], "at least 1"),
    (["x", "--guidance", "nan"], "--guidance must be a finite number >= 0"),
    (["x", "--guidance", "inf"], "--guidance must be a finite number >= 0"),
    (["x", "--seed", "-1"], "--seed must be from 0"),
])
def test_bad_arguments_get_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_bad_settings_are_one_line_errors(sources, tmp_path, capsys):
    from minroentgen.pipeline import StableDiffusion
    folder = shutil.copytree(sources[1] / "safetensors", tmp_path / "w")
    for bad, says in (({"steps": "many"}, "steps must be a positive integer, got 'many'"),
                      ({"guidance": None}, "guidance must be a finite number >= 0, got None"),
                      ({"guidance": float("inf")}, "guidance must be a finite number >= 0, got inf"),
                      ({"scheduler": "euler"}, "scheduler must be one of pndm, ddim, ddpm"),
                      ({"guidance_rescale": 1.5}, "guidance_rescale must be a number from 0 to 1, got 1.5"),
                      ({"prompt_template": ["{report}"]}, r"prompt_template must be text, got \['\{report\}'\]"),
                      ({"stepz": 3}, "unexpected keyword argument 'stepz'")):
        (folder / "sampling.json").write_text(json.dumps(bad))
        with pytest.raises(SystemExit, match=rf"sample.py: error: .*sampling.json: not a valid sampling.json .*{says}"):
            sample.main(["x", "--weights", str(folder), "--out", str(tmp_path / "out")])
    (folder / "sampling.json").write_text('{"steps": 3}')  # a single file's --config folder brings its settings
    assert StableDiffusion.from_pretrained(sources[1] / "single.safetensors", config_dir=folder).defaults.steps == 3
    (folder / "sampling.json").unlink()
    sd = StableDiffusion.from_pretrained(folder)
    with pytest.raises(ValueError, match="steps must be at least 1, got 0"):  # 0 is not "the default"
        sd("x", steps=0, progress=False)
    with pytest.raises(ValueError, match="a negative prompt is the unconditional branch of guidance"):
        sd("x", steps=1, guidance=1.0, negative="edema", progress=False)
    with torch.no_grad():
        sd.text_encoder.text_model.final_layer_norm.weight.fill_(float("nan"))  # damaged weights, header intact
    with pytest.raises(ValueError, match="the sample holds NaN or infinity: in fp16 most often an overflow"):
        sd("x", steps=1, progress=False)
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "_class_name": "EulerDiscreteScheduler"}))
    with pytest.warns(UserWarning, match="EulerDiscreteScheduler is not implemented here; sampling with PNDM"):
        assert StableDiffusion.from_pretrained(folder).defaults.scheduler == "pndm"
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        sample.main(["x", "--weights", str(folder), "--out", str(tmp_path / "file")])
    assert f"--out {tmp_path / 'file'} is a file" in capsys.readouterr().err


def test_file_names_keep_the_letters_of_accented_prompts():
    assert sample.slug("Épanchement pleural gauche, modéré.") == "epanchement-pleural-gauche-modere"
    assert sample.slug("  ...  ") == "prompt"


def test_size_the_model_cannot_take_is_refused(sources, tmp_path, capsys):
    _, root = sources
    with pytest.raises(SystemExit, match="multiple"):
        sample.main(["x", "--weights", str(root / "safetensors"), "--height", "33", "--out", str(tmp_path)])


def test_missing_weights_say_what_to_do(tmp_path):
    with pytest.raises(SystemExit, match=r"\S"):
        sample.main(["x", "--weights", str(tmp_path / "nowhere"), "--out", str(tmp_path)])


def test_without_weights_points_to_where_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setattr(sample, "DEFAULT_WEIGHTS", tmp_path / "default")  # as on a checkout without the default
    with pytest.raises(SystemExit, match="weights/README.md"):
        sample.main(["small left pleural effusion", "--out", str(tmp_path)])


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_runs_close_to_fp32(sources, tmp_path, dtype):
    """Reduced precision is for GPUs; on the CPU it must still run and stay near the fp32 picture."""
    _, root = sources
    ref = run_sample(root / "safetensors", "ddim", tmp_path / "fp32")
    half = run_sample(root / "safetensors", "ddim", tmp_path / dtype, ("--dtype", dtype))
    for a, b in zip(ref, half):
        diff = np.abs(np.asarray(Image.open(a), dtype=float) - np.asarray(Image.open(b), dtype=float))
        assert diff.mean() < 8, f"{dtype} drifted {diff.mean():.1f} grey levels on average"


def test_embedded_default_samples_without_flags(tmp_path):
    """The README's first command: no --weights, the model in weights/default (a few steps here)."""
    if not sample.DEFAULT_WEIGHTS.exists():
        pytest.skip("no embedded default model in this checkout")
    sample.main(["small left pleural effusion", "--steps", "3", "--out", str(tmp_path)])
    image = Image.open(tmp_path / "small-left-pleural-effusion_seed0_img0.png")
    assert image.mode == "L" and image.size == (128, 128) and np.asarray(image).std() > 5


def test_reduced_precision_keeps_latents_and_sampler_in_fp32(sources, monkeypatch):
    """The UNet and VAE may run in bf16; the latents and every sampler step stay fp32."""
    from minroentgen import pipeline
    from minroentgen.pipeline import StableDiffusion

    dtypes, make = [], pipeline.make_scheduler

    def recording(name, config):
        sampler = make(name, config)
        step = sampler.step
        sampler.step = lambda pred, t, sample, **kw: (dtypes.append((pred.dtype, sample.dtype)),
                                                      step(pred, t, sample, **kw))[1]
        return sampler
    monkeypatch.setattr(pipeline, "make_scheduler", recording)
    sd = StableDiffusion.from_pretrained(sources[1] / "safetensors", dtype=torch.bfloat16)
    assert sd.unet.conv_in.weight.dtype == torch.bfloat16
    sd("x", steps=3, scheduler="ddim", progress=False, height=32, width=32)
    assert dtypes == [(torch.float32, torch.float32)] * 3


@pytest.mark.slow
def test_compile_samples_the_eager_image(sources, tmp_path, monkeypatch):
    """sample.py --compile: torch.compile of the UNet (plain on a CPU: about a minute of compiling)."""
    _, root = sources
    eager = read_pngs(run_sample(root / "safetensors", "pndm", tmp_path / "eager"))
    modes, compile_module = [], torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, mode=None: modes.append(
        (type(self).__name__, mode)) or compile_module(self, mode=mode))
    compiled = read_pngs(run_sample(root / "safetensors", "pndm", tmp_path / "compiled", ("--compile",)))
    assert modes == [("UNet2DConditionModel", None)]  # CUDA graphs ("reduce-overhead") on CUDA only
    assert np.abs(compiled - eager).max() <= 1 and eager.std() > 5
