"""The training recipe of RoentGen: fine-tune Stable Diffusion's UNet (and text encoder) on
image-report pairs.

Objective (LDM, Rombach et al. 2022, Eq. 3; DDPM, Ho et al. 2020, Eq. 14 "simple" loss). One step is
DDPM's Algorithm 1 on the frozen VAE's latents; where each line happens:

    x0, report ~ data;  t ~ U{0, T-1};  eps ~ N(0, I)    PositionDataset (draws by position, below;
                                                         t counts from 0: the paper's t - 1)
    z0 = scaling_factor * (mean + std * eps_q)           encode_latents: the VAE's posterior sample
    z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps         Denoiser.forward: schedule.add_noise
    pred = eps_theta(z_t, t, tau(report))                Denoiser.forward: unet(z_t, t, context),
                                                         tau = the text encoder
    loss = || eps - pred ||^2   (or v - pred)            Denoiser.forward
    gradient step on the UNet (and the text encoder)     train.py

Randomness is a function of the sample's position in the training stream, not of the process that
draws it: position p = 0, 1, 2, ... is dataset index perm_e[p mod N] of epoch e = p // N, and its
timestep, noise, posterior sample, text-dropout coin and text augmentation come from a generator
seeded with (seed, p).
Step s consumes positions [s G, (s+1) G) of a global batch G, split into fixed slices per process
and micro-batch. So a resumed run needs only the step number, and one process or many, with or
without gradient accumulation, see the same samples with the same noise and average the same G
losses.
"""
import hashlib
import json
import math
import re
import shutil
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from . import clip, unet, vae
from .configs import CLIP_PRESETS, SCHEDULER_PRESETS, UNET_PRESETS, VAE_PRESETS, VAEConfig
from .pipeline import SamplingDefaults, StableDiffusion, image_grid, to_grayscale_uint8
from .tokenizer import CLIPTokenizer
from .vae import DiagonalGaussian
from .weights import (DIFFUSERS_VERSION, WeightsError, check_state_dict, read_state_dict,
                      written_atomically)


# ----------------------------------------------------------------------------- the objective

class Denoiser(nn.Module):
    """UNet + text encoder -> the denoising loss; the module DDP wraps, so gradients of both sync.

    snr_gamma weighs each example's loss by min(SNR_t, gamma) / SNR_t (v-prediction: / (SNR_t + 1)),
    Min-SNR weighting (Hang et al. 2023, ICCV; diffusers' train_text_to_image --snr_gamma): the eps
    loss is an x0 loss weighted by SNR_t, and capping that weight at gamma keeps the nearly clean
    timesteps from dominating. The text encoder is LDM's tau_theta."""

    def __init__(self, unet_model, text_encoder, schedule, train_text_encoder: bool,
                 snr_gamma: float | None = None):
        super().__init__()
        self.unet, self.text_encoder, self.train_text_encoder = (
            unet_model, text_encoder, train_text_encoder)
        self.schedule = schedule  # a NoiseSchedule: add_noise, target and snr
        self.snr_gamma = snr_gamma

    def forward(self, latents, input_ids, noise, timesteps) -> torch.Tensor:
        """latents z0 (B, C, h, w), already scaled; input_ids (B, 77); noise like latents;
        timesteps (B,)."""
        noisy = self.schedule.add_noise(latents, noise, timesteps)  # z_t, DDPM Eq. 4
        with torch.set_grad_enabled(self.train_text_encoder and torch.is_grad_enabled()):
            context = self.text_encoder(input_ids)  # tau(report), (B, 77, D)
        prediction = self.unet(noisy, timesteps, context)  # (B, C, h, w)
        target = self.schedule.target(latents, noise, timesteps)  # eps, or v
        if not self.snr_gamma:
            return F.mse_loss(prediction.float(), target.float())
        snr = self.schedule.snr(timesteps)  # (B,)
        epsilon = self.schedule.config.prediction_type == "epsilon"
        weight = snr.clamp(max=self.snr_gamma) / (snr if epsilon else snr + 1)
        return ((prediction.float() - target.float()).square().mean(dim=(1, 2, 3)) * weight).mean()


@torch.no_grad()
def encode_latents(vae_model, pixels, indices, posterior_eps,
                   cache: dict | None = None) -> torch.Tensor:
    """Pixels (B, 3, H, W) -> scaled latents z0 (B, C, h, w) in fp32. The posterior moments of each
    dataset index are memoised in `cache` (on the CPU) when one is given; the posterior sample is
    drawn with the position's `posterior_eps` either way, so cached and uncached runs train on the
    same z0."""
    todo = [j for j, i in enumerate(indices) if cache is None or i not in cache]
    moments = [None] * len(indices)
    if todo:
        posterior = vae_model.encode(pixels[todo])
        fresh = torch.cat([posterior.mean, posterior.logvar], dim=1)  # (b, 2C, h, w): the moments
        for j, m in zip(todo, fresh):
            moments[j] = m
        if cache is not None:  # one copy to the CPU (a wait for the GPU) per batch
            cache.update(zip([indices[j] for j in todo], fresh.cpu()))
    device = pixels.device
    moments = torch.stack([m if m is not None else cache[i].to(device)
                           for i, m in zip(indices, moments)])
    posterior = DiagonalGaussian(moments.float())
    z = posterior.mean + posterior.std * posterior_eps.to(device)  # the reparameterised sample
    return z * vae_model.config.scaling_factor  # (B, C, h, w)


# --------------------------------------------------------------------------- randomness by position

def generator(seed: int, kind: str, n: int) -> torch.Generator:
    """A CPU generator that depends only on (seed, kind, n): e.g. ("sample", position),
    ("epoch", e)."""
    digest = hashlib.sha256(f"{seed}/{kind}/{n}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


class PositionDataset(torch.utils.data.Dataset):
    """Position p -> the example at dataset index perm_{p // N}[p % N] and all of its random draws:
    {"index", "pixel_values" (3, R, R), "input_ids" (77,), "timestep" (), "noise" and
    "posterior_eps" (C, h, w)}. With probability `text_dropout` the report is replaced by ""
    (Ho & Salimans 2022, classifier-free guidance: the model also learns the unconditional
    prediction); otherwise each of its sentences is augmented with probability `text_augment`
    (see augment_report)."""

    def __init__(self, dataset, tokenizer, seed: int, latent_shape: tuple, num_train_timesteps: int,
                 text_dropout: float, text_augment: float = 0.0):
        self.dataset, self.tokenizer, self.seed = dataset, tokenizer, seed
        self.latent_shape, self.T, self.text_dropout = (
            latent_shape, num_train_timesteps, text_dropout)
        self.text_augment = text_augment
        self.words = vocabulary_words(tokenizer) if text_augment else []
        self._perm = (None, None)  # (epoch, permutation) of the last epoch asked for

    def index(self, p: int) -> int:
        epoch, n = divmod(p, len(self.dataset))
        if self._perm[0] != epoch:
            self._perm = (epoch, torch.randperm(len(self.dataset),
                                                generator=generator(self.seed, "epoch", epoch)))
        return int(self._perm[1][n])

    def __getitem__(self, p: int) -> dict:
        i = self.index(p)
        g = generator(self.seed, "sample", p)
        t = torch.randint(0, self.T, (), generator=g)
        drop = torch.rand((), generator=g) < self.text_dropout
        noise = torch.randn(self.latent_shape, generator=g)
        posterior_eps = torch.randn(self.latent_shape, generator=g)
        example = self.dataset[i]
        report = "" if drop else augment_report(example["report"], self.text_augment, g, self.words)
        # a long report is cut as sample.py cuts it; the dataset counted them
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "prompt truncated")
            input_ids = self.tokenizer([report])[0]
        return {"index": i, "pixel_values": example["pixel_values"], "input_ids": input_ids,
                "timestep": t, "noise": noise, "posterior_eps": posterior_eps}


def vocabulary_words(tokenizer: CLIPTokenizer) -> list:
    """The whole words of the tokenizer's vocabulary in plain letters, 3 or more (CLIP: about
    30,000), sorted."""
    return sorted(w[:-4] for w in tokenizer.vocabulary()
                  if w.endswith("</w>") and w[:-4].isascii() and w[:-4].isalpha() and len(w) > 6)


def augment_report(report: str, p: float, g: torch.Generator, words: list) -> str:
    """Easy data augmentation of the text (EDA, Wei & Zou 2019), one sentence at a time so that a
    finding keeps its side, size and zone: with probability p a sentence gets one of a random
    vocabulary word inserted, two of its words swapped, or its words shuffled. The text encoder then
    reads a finding from the words of its sentence rather than from one fixed word order, and learns
    to pass over words it was never taught ("Signs of pulmonary edema."). p = 0 returns the report
    unchanged and draws nothing."""
    if not p:
        return report
    out = []
    for sentence in re.split(r"(?<=[.!?])\s+", report.strip()):
        w, end = (sentence[:-1], sentence[-1]) if sentence[-1:] in ".!?" else (sentence, "")
        w = w.split()
        if w and torch.rand((), generator=g) < p:
            op = int(torch.randint(3, (), generator=g))
            if op == 0:  # random insertion
                word = words[int(torch.randint(len(words), (), generator=g))]
                w.insert(int(torch.randint(len(w) + 1, (), generator=g)), word)
            elif op == 1:  # random swap
                a, b = torch.randint(len(w), (2,), generator=g).tolist()
                w[a], w[b] = w[b], w[a]
            else:  # shuffle
                w = [w[k] for k in torch.randperm(len(w), generator=g).tolist()]
            sentence = " ".join(w) + end
        out.append(sentence)
    return " ".join(out)


class StepSampler:
    """Batches of positions for one process: step s, micro-batch k of rank r takes the m positions
    s G + (r A + k) m + [0, m), with G = m A W (micro-batch m, accumulation A, world size W)."""

    def __init__(self, start_step: int, micro_batch: int, accumulation: int, world_size: int,
                 rank: int):
        self.start, self.m, self.A, self.W, self.r = (
            start_step, micro_batch, accumulation, world_size, rank)

    def __iter__(self):
        G, s = self.m * self.A * self.W, self.start
        while True:
            for k in range(self.A):
                first = s * G + (self.r * self.A + k) * self.m
                yield list(range(first, first + self.m))
            s += 1


# ----------------------------------------------------------------------------- models, optimisation

PRESET_NAMES = sorted(UNET_PRESETS.keys() & VAE_PRESETS.keys()
                      & CLIP_PRESETS.keys())  # "sd15", "small", "tiny"


def random_model(preset: str, resolution: int, seed: int, device="cpu",
                 vae_model=None) -> StableDiffusion:
    """A Stable Diffusion with random weights from the modules' PRESETS (to train small models from
    scratch). `vae_model` (e.g. one trained by train_vae.py, see `load_vae`) replaces the preset's
    random VAE."""
    vae_config = VAE_PRESETS[preset] if vae_model is None else vae_model.config
    unet_config = replace(UNET_PRESETS[preset],
                          sample_size=resolution // vae_config.downsample_factor)
    if vae_config.latent_channels != unet_config.in_channels:
        raise ValueError(f"the VAE has {vae_config.latent_channels} latent channels but the "
                         f"{preset!r} UNet takes {unet_config.in_channels}; train the VAE with "
                         f"latent_channels={unet_config.in_channels}")
    with torch.random.fork_rng(devices=[]):  # nn.Module initialisers draw from the global generator
        torch.manual_seed(seed)
        models = [clip.CLIPTextModel(CLIP_PRESETS[preset]), unet.UNet2DConditionModel(unet_config),
                  vae_model or vae.AutoencoderKL(vae_config)]  # built last: the other draws do not
                                                               # depend on it
    models = [m.to(device).eval().requires_grad_(False) for m in models]
    return StableDiffusion(CLIPTokenizer.default(), *models, SCHEDULER_PRESETS["sd15"],
                           SamplingDefaults(height=resolution, width=resolution))


class EMA:
    """Exponential moving average of the trained parameters (shadow weights, kept in fp32), with the
    warm-up decay min(decay, (1 + step) / (10 + step)) of the LDM code (`LitEma`)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: p.detach().float().clone() for k, p in model.named_parameters()
                       if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int):
        d = min(self.decay, (1 + step) / (10 + step))
        for k, p in model.named_parameters():
            if k in self.shadow:
                self.shadow[k].lerp_(p.float(), 1 - d)  # shadow = d * shadow + (1 - d) * p

    @torch.no_grad()
    def copy_to(self, model: nn.Module):
        for k, p in model.named_parameters():
            if k in self.shadow:
                p.copy_(self.shadow[k])

    @contextmanager
    def applied(self, model: nn.Module):
        """Swap the EMA weights in for the duration of the block (e.g. to sample), then swap
        back."""
        live = {k: p.detach().clone() for k, p in model.named_parameters() if k in self.shadow}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for k, p in model.named_parameters():
                    if k in live:
                        p.copy_(live[k])

    def state_dict(self) -> dict:
        return dict(self.shadow)

    def load_state_dict(self, state: dict):
        if state.keys() != self.shadow.keys():
            raise ValueError(f"EMA weights hold {len(state)} tensors, the model trains "
                             f"{len(self.shadow)}; was the checkpoint written with another "
                             "--train-text-encoder setting?")
        for k, v in state.items():
            self.shadow[k].copy_(v)


def auto_precision(device: torch.device) -> str:
    """train.py's --precision auto: bf16 on GPUs that compute it natively (A100, H100, ...), fp16
    with the gradient scaler on older ones (V100, T4), fp32 elsewhere."""
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


def mixed_precision(precision: str, device: torch.device) -> tuple:
    """--precision -> (what "auto" picks here, the autocast context of the forward passes, the
    gradient scaler: enabled for fp16 only). Weights and optimizer states stay fp32."""
    precision = auto_precision(device) if precision == "auto" else precision
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    return precision, autocast, torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def load_optimizer(opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, state: dict):
    """A checkpoint's optimizer and scaler states, whatever device and precision wrote them: `fused`
    stays what this run chose for its device (a CPU run's False must not reach a GPU), and a
    checkpoint without scaler state (bf16, fp32) leaves an fp16 run a fresh scaler."""
    saved = state["optimizer"]
    groups = [{**g, "fused": opt.defaults.get("fused")} for g in saved["param_groups"]]
    opt.load_state_dict({**saved, "param_groups": groups})  # state placed as fused needs it
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])


def default_micro_batch(per_process: int, resolution: int) -> int:
    """Images a process forwards at once unless told: the largest divisor of its share of the batch
    up to 8 x (512 / resolution)^2 (the paper's 8 images at 512 per A100, as many pixels at other
    sizes); gradient accumulation makes up the rest."""
    cap = max(1, 8 * 512**2 // resolution**2)
    return max(m for m in range(1, min(per_process, cap) + 1) if per_process % m == 0)


def lr_factor(step: int, warmup: int, max_steps: int, schedule: str) -> float:
    """Multiplier of the base learning rate at (0-based) `step`: linear warm-up over `warmup` steps,
    then constant, or a half cosine down to 0 at `max_steps` (Loshchilov & Hutter 2017, SGDR,
    Eq. 5)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, max_steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------- checkpoints

VAE_WEIGHTS = "diffusion_pytorch_model.safetensors"


def save_vae(folder: Path, model: vae.AutoencoderKL):
    """Write a diffusers `vae/` folder (config.json, diffusion_pytorch_model.safetensors), which
    `load_vae` and `diffusers.AutoencoderKL.from_pretrained` read; built beside `folder` and
    renamed."""
    with written_atomically(folder) as tmp:
        tmp.mkdir(parents=True)
        config = {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION,
                  **model.config.to_dict()}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  str(tmp / VAE_WEIGHTS), metadata={"format": "pt"})


def load_vae(path, device="cpu") -> vae.AutoencoderKL:
    """A diffusers `vae/` folder, or a folder holding one (a diffusers pipeline, train_vae.py's
    --out) -> a frozen AutoencoderKL in eval mode."""
    path = Path(path)
    folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
    if not (folder / "config.json").is_file() or not (folder / VAE_WEIGHTS).is_file():
        raise WeightsError(f"{path}: no vae/config.json and vae/{VAE_WEIGHTS}; give a diffusers "
                           "vae/ folder, a folder holding one, or train_vae.py's --out")
    try:
        config = VAEConfig.from_dict(json.loads((folder / "config.json").read_text()))
    except (ValueError, TypeError) as e:
        raise WeightsError(f"{folder / 'config.json'}: {e}") from None
    model = vae.AutoencoderKL(config)
    state_dict = read_state_dict(folder / VAE_WEIGHTS)
    check_state_dict({k: v.shape for k, v in model.state_dict().items()}, state_dict,
                     folder / VAE_WEIGHTS)
    model.load_state_dict(state_dict)
    return model.to(device).eval().requires_grad_(False)


def checkpoint_path(out: Path, step: int) -> Path:
    return Path(out) / f"checkpoint-{step:06d}"


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted(Path(out).glob("checkpoint-[0-9]*[0-9]")) if Path(out).is_dir() else []
    return found[-1] if found else None


def save_checkpoint(folder: Path, sd: StableDiffusion, ema: EMA | None, state: dict, keep: int = 0):
    """`folder` = what `sd.save_pretrained` writes, a diffusers folder of the trained weights (so
    `sample.py --weights folder` works), plus `ema.safetensors` and `training_state.pt` (step,
    optimizer, scaler). Built under a temporary name and renamed, so a crash never leaves half a
    checkpoint under the real name. Keeps the last `keep` (0: all)."""
    folder = Path(folder)
    # the same step saved again (e.g. after a resume) is replaced
    with written_atomically(folder) as tmp:
        sd.save_pretrained(tmp)
        if ema is not None:
            save_file({k: v.contiguous() for k, v in ema.state_dict().items()},
                      str(tmp / "ema.safetensors"))
        torch.save(state, tmp / "training_state.pt")
    for stale in sorted(folder.parent.glob("checkpoint-[0-9]*[0-9]"))[:-keep] if keep else []:
        shutil.rmtree(stale)


def load_training_state(folder: Path) -> tuple[dict, dict | None]:
    """(training_state.pt as saved, the EMA tensors or None) of a checkpoint folder."""
    folder = Path(folder)
    if not (folder / "training_state.pt").is_file():
        raise WeightsError(f"{folder}: not a checkpoint (no training_state.pt); give a "
                           f"checkpoint-NNNNNN folder that train.py or train_vae.py wrote")
    try:
        state = torch.load(folder / "training_state.pt", map_location="cpu", weights_only=True)
        ema_file = folder / "ema.safetensors"
        return state, load_file(ema_file) if ema_file.is_file() else None
    except Exception as e:
        raise WeightsError(f"{folder}: damaged checkpoint "
                           f"({str(e).strip()[:100] or type(e).__name__}); resume from an earlier "
                           f"checkpoint-NNNNNN folder") from None


def find_resume(out: Path, resume, max_steps: int) -> tuple[Path, dict, dict | None]:
    """The checkpoint `--resume` means (the latest in `out` for resume "latest" or True, else the
    folder given) with its training state and EMA tensors, read once; one-line errors for what
    cannot continue."""
    folder = latest_checkpoint(out) if resume in ("latest", True) else Path(resume)
    if folder is None:
        raise WeightsError(f"--resume: no checkpoint-NNNNNN folder in {out}; "
                           "run without --resume to start")
    state, ema_state = load_training_state(folder)
    if state["step"] > max_steps:
        raise ValueError(f"--resume: {folder} is at step {state['step']}, past --max-steps "
                         f"{max_steps}; give a larger --max-steps")
    return folder, state, ema_state


def blown_up(params, step: int, out: Path) -> str | None:
    """Why the weights must not be saved (NaN or infinity in them, e.g. after a last update gone
    wrong), or None."""
    if all(torch.isfinite(p).all() for p in params):
        return None
    return (f"the weights hold NaN or infinity after step {step}; not saved (last good checkpoint: "
            f"{latest_checkpoint(out) or 'none'}); try a lower --lr")


def check_out(out: Path, resume: bool):
    """A new run must not write into an old one's folder: its checkpoints, final weights and log
    would mix."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    found = [p.name for p in (*sorted(out.glob("checkpoint-[0-9]*[0-9]")), out / "final",
                              out / "vae", out / "log.jsonl") if p.exists()] if out.is_dir() else []
    if found and not resume:
        raise ValueError(f"--out {out} already holds a run ({', '.join(found[:3])}); add --resume "
                         f"to continue it, or give a new --out")


def check_ranges(parser, args, at_least_1=(), at_least_0=(), positive=()):
    """parser.error for the first numeric flag out of its range (NaN and infinity are out of every
    range) or a --seed outside [0, 2**63)."""
    for keys, ok, what in ((at_least_1, lambda v: v >= 1, "at least 1"),
                           (at_least_0, lambda v: v >= 0, "at least 0"),
                           (positive, lambda v: v > 0, "positive")):
        for key in keys:
            value = getattr(args, key)
            if value is not None and not (math.isfinite(value) and ok(value)):
                parser.error(f"--{key.replace('_', '-')} must be {what} and finite, got {value}")
    if not 0 <= args.seed < 2**63:
        parser.error(f"--seed must be from 0 to 2**63 - 1, got {args.seed}")


def save_grid(images: torch.Tensor, path: Path, cols: int):
    """(B, 3, H, W) in [-1, 1] -> one grayscale PNG, `cols` images a row."""
    sheet = image_grid(to_grayscale_uint8(images), cols)  # (rows*H, cols*W) uint8
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet.numpy()).save(path)


def append_log(path: Path, record: dict):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
