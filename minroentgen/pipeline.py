"""Prompt -> chest X-ray: encode the text, run the guided denoising loop, decode the latents.

This is Stable Diffusion inference (Rombach et al. 2022, Sec. 3.3) as RoentGen samples it
(Chambon et al. 2022: PNDM, 75 steps, classifier-free guidance scale 4):

    prompt --tokenizer--> ids (B, 77) --text_encoder--> context (B, 77, 768)
    noise (B, 4, H/8, W/8) --[scheduler loop over unet(latents, t, context), guided]--> latents
    latents / 0.18215 --vae.decode--> image (B, 3, H, W) in [-1, 1]

Classifier-free guidance (Ho & Salimans 2022, eq. 6): the UNet runs on the prompt and on the
negative prompt (empty by default) in one batch, and the two predictions (noise, or v) are
extrapolated, pred = pred_neg + g * (pred_prompt - pred_neg); g = 1 + w of the paper's
(1 + w) eps_c - w eps_u.
Guiding v is the same as guiding eps: at a fixed z_t, v is affine in eps and the weights g, 1 - g
sum to 1. Guidance rescale (Lin et al. 2024, Sec. 3.4) then pulls the guided prediction's spread
back towards the prompt branch's, which large g inflates on zero-terminal-SNR models.
"""
import json
import math
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .clip import CLIPTextModel
from .configs import SCHEDULER_PRESETS, CLIPTextConfig, SchedulerConfig, UNetConfig, VAEConfig
from .schedulers import make_scheduler
from .tokenizer import CLIPTokenizer
from .unet import UNet2DConditionModel
from .vae import AutoencoderKL
from .weights import WeightsError, check_state_dict, load_checkpoint, save_pretrained

SCHEDULER_NAMES = {"PNDMScheduler": "pndm", "DDIMScheduler": "ddim", "DDPMScheduler": "ddpm"}


@dataclass(frozen=True)
class SamplingDefaults:
    """How a model wants to be sampled; a weights folder may override these in `sampling.json`.
    The fallbacks are the paper's settings: PNDM, 75 steps, guidance 4."""
    scheduler: str = "pndm"
    steps: int = 75
    guidance: float = 4.0
    guidance_rescale: float = 0.0  # phi of Lin et al. 2024 (they use 0.7); 0 turns it off
    height: int = 512
    width: int = 512
    # the prompts the model was trained on, when train.py --prompt-template made them (e.g.
    # RoentGen-v2's "{age} year old {race} {sex}. {report}"); a note for users, sampling ignores it
    prompt_template: str | None = None

    def __post_init__(self):  # a sampling.json can say anything
        if self.scheduler not in SCHEDULER_NAMES.values():
            raise ValueError(f"scheduler must be one of {', '.join(SCHEDULER_NAMES.values())}, "
                             f"got {self.scheduler!r}")
        for name in ("steps", "height", "width"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if type(self.guidance) not in (int, float) or not 0 <= self.guidance < math.inf:
            raise ValueError(f"guidance must be a finite number >= 0, got {self.guidance!r}")
        if type(self.guidance_rescale) not in (int, float) or not 0 <= self.guidance_rescale <= 1:
            raise ValueError("guidance_rescale must be a number from 0 to 1, "
                             f"got {self.guidance_rescale!r}")
        if self.prompt_template is not None and type(self.prompt_template) is not str:
            raise ValueError(f"prompt_template must be text, got {self.prompt_template!r}")


def _build(model_cls, config, state_dict, source: str, device, dtype):
    """Make a model without random init (meta tensors), then fill every parameter from the file."""
    with torch.device("meta"):
        model = model_cls(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_state_dict(expected, state_dict, source)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


class StableDiffusion:
    """The four parts of Stable Diffusion and the sampling loop that ties them together."""

    def __init__(self, tokenizer, text_encoder, unet, vae, scheduler_config,
                 defaults=SamplingDefaults()):
        self.tokenizer, self.text_encoder, self.unet, self.vae = tokenizer, text_encoder, unet, vae
        self.scheduler_config, self.defaults = scheduler_config, defaults

    @classmethod
    def from_pretrained(cls, path, config_dir=None, device="cpu", dtype=torch.float32):
        """Load a diffusers folder or an original single-file checkpoint (see `weights.py`)."""
        ckpt = load_checkpoint(path, config_dir=config_dir)
        parts = {
            "text_encoder": (CLIPTextModel, CLIPTextConfig),
            "unet": (UNet2DConditionModel, UNetConfig),
            "vae": (AutoencoderKL, VAEConfig),
        }
        def config(name, config_cls):
            try:
                return config_cls.from_dict(ckpt.configs.get(name) or {})
            except (ValueError, TypeError) as e:
                raise WeightsError(f"{ckpt.source}: {name} config: {e}") from None

        models = {name: _build(model_cls, config(name, config_cls), ckpt.state_dicts[name],
                               f"{ckpt.source} ({name})", device, dtype)
                  for name, (model_cls, config_cls) in parts.items()}
        tokenizer = (CLIPTokenizer.from_folder(ckpt.tokenizer_dir) if ckpt.tokenizer_dir
                     else CLIPTokenizer.default())
        # a single file without a scheduler config gets SD's, as diffusers' from_single_file does
        scheduler_config = (config("scheduler", SchedulerConfig) if "scheduler" in ckpt.configs
                            else SCHEDULER_PRESETS["sd15"])
        unet_size, vae = models["unet"].config.sample_size, models["vae"].config
        # diffusers' default size
        size = unet_size * vae.downsample_factor if unet_size else vae.sample_size
        if scheduler_config.class_name not in SCHEDULER_NAMES:
            warnings.warn(f"{path}: its scheduler {scheduler_config.class_name} is not implemented "
                          "here; sampling with PNDM on the same noise schedule (choose with "
                          "--scheduler pndm, ddim or ddpm)")
        defaults = SamplingDefaults(scheduler=SCHEDULER_NAMES.get(scheduler_config.class_name,
                                                                  "pndm"),
                                    height=size, width=size)
        folder = path if Path(path).is_dir() or config_dir is None else config_dir
        sampling = Path(folder) / "sampling.json"
        if sampling.is_file():
            try:
                defaults = replace(defaults, **json.loads(sampling.read_text()))
            except (ValueError, TypeError) as e:
                raise WeightsError(f"{sampling}: not a valid sampling.json ({e}); "
                                   "fix or delete it") from None
        return cls(tokenizer, models["text_encoder"], models["unet"], models["vae"],
                   scheduler_config, defaults)

    def save_pretrained(self, folder):
        """Write a diffusers folder that `StableDiffusionPipeline.from_pretrained` loads too."""
        models = {"text_encoder": self.text_encoder, "unet": self.unet, "vae": self.vae}
        save_pretrained(
            folder,
            configs={k: m.config.to_dict() for k, m in models.items()},
            state_dicts={k: m.state_dict() for k, m in models.items()},
            tokenizer=self.tokenizer,
            scheduler_config=self.scheduler_config.to_dict(),
            sampling={k: v for k, v in asdict(self.defaults).items() if v is not None},
        )

    def compile(self):
        """torch.compile the UNet in place (the part that runs every step), on CUDA with CUDA
        graphs: the sampling loop's shapes are fixed. The text encoder and VAE run once an image."""
        self.unet.compile(mode="reduce-overhead" if self.device.type == "cuda" else None)
        return self

    @property
    def device(self):
        return self.unet.conv_in.weight.device

    @property
    def dtype(self):
        return self.unet.conv_in.weight.dtype

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts).to(self.device)  # (B, 77)
        return self.text_encoder(ids)  # (B, 77, D)

    @torch.no_grad()
    def __call__(self, prompt: str, n=1, seed=0, negative="", steps=None, guidance=None,
                 scheduler=None, height=None, width=None, eta=0.0, guidance_rescale=None,
                 progress=True) -> torch.Tensor:
        """Sample `n` images of one prompt; returns (n, 3, H, W) in [-1, 1], float32 on the CPU.
        `eta` (DDIM only) adds fresh noise to each step: 0 is deterministic DDIM, 1 is DDPM-like.

        Seed s draws the initial latents as
        `torch.randn((n, C, H//f, W//f), generator=torch.Generator("cpu").manual_seed(s))`,
        so the same seed gives the same picture here and in diffusers.

        `prompt` may be a list of texts and `seed` a list as long, one seed each: they are
        sampled in one batch, (len * n, 3, H, W), each prompt's n images drawn exactly as that
        prompt alone with its seed.
        """
        d = self.defaults
        steps = d.steps if steps is None else steps
        guidance = d.guidance if guidance is None else guidance
        height, width = d.height if height is None else height, d.width if width is None else width
        phi = d.guidance_rescale if guidance_rescale is None else guidance_rescale
        scheduler = scheduler or d.scheduler
        f = self.vae.config.downsample_factor
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f} (the VAE's downsampling), "
                             f"got {height}x{width}")
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if not 0 <= guidance < math.inf:
            raise ValueError("guidance must be finite and >= 0 (1 or less turns guidance off), "
                             f"got {guidance}")
        if not 0 <= phi <= 1:
            raise ValueError(f"guidance_rescale must be from 0 to 1, got {phi}")
        if eta and scheduler != "ddim":
            raise ValueError(f"eta={eta} is DDIM's noise level; the {scheduler} sampler has none: "
                             "sample with ddim, or leave eta at 0")
        if negative and guidance <= 1:
            raise ValueError("a negative prompt is the unconditional branch of guidance, which "
                             f"guidance {guidance} "
                             f"turns off; give guidance > 1 or no negative prompt")
        sched = make_scheduler(scheduler, self.scheduler_config)
        sched.set_timesteps(steps)

        prompts, seeds = (([prompt], [seed]) if isinstance(prompt, str)
                          else (list(prompt), list(seed)))
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts need {len(prompts)} seeds, got {len(seeds)}")
        guided = guidance > 1.0  # as diffusers: guidance 1 (or less) means the prompt alone
        context = self.encode_prompt([negative] * len(prompts) + prompts if guided else prompts)
        # [neg x P*n, prompt_1 x n, ..., prompt_P x n]
        context = context.repeat_interleave(n, dim=0)

        # one generator per prompt, for the initial noise and any step noise
        generator = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        shape = (n, self.unet.config.in_channels, height // f, width // f)
        # z at timesteps[0] ~ N(0, I): pure noise only where that is T - 1 on a zero-terminal-SNR
        # schedule ("trailing" spacing, Lin et al. 2024, Sec. 3.3); SD's "leading" 75 starts at 963
        latents = torch.cat([torch.randn(shape, generator=g) for g in generator])
        latents = latents.to(self.device)  # fp32 in any model dtype: the sampler's sums need it
        for t in tqdm(sched.timesteps, desc="denoising", disable=not progress, leave=False):
            x = torch.cat([latents, latents]) if guided else latents  # (2n or n, 4, h, w)
            # noise, or v for a v-prediction model; guided and stepped in fp32 (a copy even in
            # fp32: a CUDA-graphed UNet overwrites its output at its next call)
            pred = self.unet(x.to(self.dtype), t.to(self.device), context)
            pred = pred.to(torch.float32, copy=True)
            if guided:
                pred_neg, pred_prompt = pred.chunk(2)
                pred = pred_neg + guidance * (pred_prompt - pred_neg)
                if phi:
                    pred = rescale_guidance(pred, pred_prompt, phi)
            step_kwargs = {"eta": eta} if eta else {}
            latents = sched.step(pred, t, latents, generator=generator, **step_kwargs)
        image = self.vae.decode((latents / self.vae.config.scaling_factor).to(self.dtype))
        # (n, 3, H, W)
        if not torch.isfinite(image).all():  # it would be saved as a black picture
            raise ValueError("the sample holds NaN or infinity: in fp16 most often an overflow "
                             "(try --dtype fp32 or bf16); else damaged weights (re-download "
                             "them) or far too large guidance")
        return image.float().cpu()


def cuda_speedups(device):
    """On CUDA: TF32 for fp32 matrix products (convolutions use it by default) and cuDNN's search
    for the fastest kernels of the fixed shapes of training and sampling. Elsewhere nothing."""
    if torch.device(device).type == "cuda":
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.benchmark = True


def rescale_guidance(pred: torch.Tensor, pred_prompt: torch.Tensor, phi: float) -> torch.Tensor:
    """Lin et al. 2024, Sec. 3.4: scale the guided prediction to the prompt branch's standard
    deviation (per sample), then mix phi of that with 1 - phi of the unscaled one (as diffusers'
    `guidance_rescale`)."""
    dims = list(range(1, pred.ndim))
    rescaled = pred * (pred_prompt.std(dim=dims, keepdim=True) / pred.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * pred


def to_grayscale_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W) uint8: to [0, 255] as diffusers does
    (round(255 * clamp(x/2 + 0.5))) per channel, then the mean of the three channels."""
    rgb = ((images / 2 + 0.5).clamp(0, 1) * 255).round()
    return rgb.mean(dim=1).round().to(torch.uint8)


def image_grid(gray: torch.Tensor, cols: int) -> torch.Tensor:
    """(B, H, W) uint8 -> one (rows*H, cols*W) sheet, `cols` images a row, unused cells black."""
    B, H, W = gray.shape
    rows = -(-B // cols)
    sheet = torch.zeros(rows * cols, H, W, dtype=gray.dtype)
    sheet[:B] = gray
    return sheet.view(rows, cols, H, W).transpose(1, 2).reshape(rows * H, cols * W)
