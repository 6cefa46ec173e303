"""Reference pipelines for the tests: random-weight Stable Diffusion written by diffusers/transformers."""
import json
import shutil
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SD15_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "set_alpha_to_one": False, "skip_prk_steps": True,
                  "steps_offset": 1, "clip_sample": False}


def write_tokenizer_folder(folder: Path, pad_token="<|endoftext|>") -> Path:
    """The real CLIP vocabulary as a diffusers `tokenizer/` folder (what the SD v1.5 repo holds)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(ROOT / "minroentgen" / "clip_bpe" / name, folder / name)
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"model_max_length": 77, "pad_token": pad_token, "bos_token": "<|startoftext|>",
         "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer"}))
    return folder


def randomize_(model: torch.nn.Module, scale=0.05, seed=0):
    """Perturb every parameter, so zero-initialised layers (conv_out, proj_out, ...) take part too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if not scale:
            return model
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def diffusers_pipeline(cfg: dict, scheduler="PNDMScheduler", seed=0, perturb=0.05):
    """A random-weight `StableDiffusionPipeline` from a `tiny_test_configs.json` entry (or full-size configs);
    `perturb` adds noise to every parameter on top of the libraries' own initialisation."""
    import diffusers
    import transformers

    torch.manual_seed(seed)
    unet = randomize_(diffusers.UNet2DConditionModel(**cfg["unet"]), perturb, seed)
    vae = randomize_(diffusers.AutoencoderKL(**cfg["vae"]), perturb, seed + 1)
    text_encoder = randomize_(transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg["text_encoder"])), perturb, seed + 2)
    tok_dir = write_tokenizer_folder(Path(tempfile.mkdtemp()) / "tokenizer")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tok_dir)
    sched = getattr(diffusers, scheduler).from_config(SD15_SCHEDULER)
    return diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
