"""The training step of RoentGen, which fine-tunes Stable Diffusion's UNet (and text encoder) on
image-report pairs: the loss, the stream of samples and their random draws, a random model to
train from scratch. trainer.py runs the steps; optimization.py and checkpoints.py serve it.

Objective (LDM, Rombach et al. 2022, Eq. 3; DDPM, Ho et al. 2020, Eq. 14 "simple" loss). One step is
DDPM's Algorithm 1 on the frozen VAE's latents; where each line happens:

    x0, report ~ data;  t ~ U{0, T-1};  eps ~ N(0, I)    PositionDataset (draws by position, below;
                                                         t counts from 0: the paper's t - 1)
    z0 = scaling_factor * (mean + std * eps_q)           encode_latents: the VAE's posterior sample
    z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps         Denoiser.forward: schedule.add_noise
    pred = eps_theta(z_t, t, tau(report))                Denoiser.forward: unet(z_t, t, context),
                                                         tau = the text encoder
    loss = || eps - pred ||^2   (or v - pred)            Denoiser.forward
    gradient step on the UNet (and the text encoder)     trainer.py

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
import re
import warnings
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import clip, unet, vae
from .configs import CLIP_PRESETS, SCHEDULER_PRESETS, UNET_PRESETS, VAE_PRESETS
from .pipeline import SamplingDefaults, StableDiffusion
from .tokenizer import CLIPTokenizer
from .vae import DiagonalGaussian


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


# ----------------------------------------------------------------------------- models

PRESET_NAMES = sorted(UNET_PRESETS.keys() & VAE_PRESETS.keys()
                      & CLIP_PRESETS.keys())  # "sd15", "small", "tiny"


def random_model(preset: str, resolution: int, seed: int, device="cpu",
                 vae_model=None) -> StableDiffusion:
    """A Stable Diffusion with random weights from the modules' PRESETS (to train small models from
    scratch). `vae_model` (e.g. one trained by train_vae.py, see `checkpoints.load_vae`) replaces
    the preset's random VAE."""
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
