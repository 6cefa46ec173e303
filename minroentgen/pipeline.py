"""Prompt -> chest X-ray: encode the text, run the guided denoising loop, decode the latents.

This is Stable Diffusion inference (Rombach et al. 2022, Sec. 3.3) as RoentGen samples it
(Chambon et al. 2022: PNDM, 75 steps, classifier-free guidance scale 4):

    prompt --tokenizer--> ids (B, 77) --text_encoder--> context (B, 77, 768)
    noise (B, 4, H/8, W/8) --[scheduler loop over unet(latents, t, context), guided]--> latents
    latents / 0.18215 --vae.decode--> image (B, 3, H, W) in [-1, 1]

Classifier-free guidance (Ho & Salimans 2022, eq. 6): the UNet runs on the prompt and on the
negative prompt (empty by default) in one batch, and the two predictions (noise, or v) are extrapolated,
pred = pred_neg + g * (pred_prompt - pred_neg); g = 1 + w of the paper's (1 + w) eps_c - w eps_u.
"""
import json
import math
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .clip import CLIPTextConfig, CLIPTextModel
from .schedulers import SchedulerConfig, make_scheduler
from .tokenizer import CLIPTokenizer
from .unet import UNet2DConditionModel, UNetConfig
from .vae import AutoencoderKL, VAEConfig
from .weights import WeightsError, check_state_dict, load_checkpoint, save_pretrained

SCHEDULER_NAMES = {"PNDMScheduler": "pndm", "DDIMScheduler": "ddim", "DDPMScheduler": "ddpm"}


@dataclass(frozen=True)
class SamplingDefaults:
    """How a model wants to be sampled; a weights folder may override these in `sampling.json`.
    The fallbacks are the paper's settings: PNDM, 75 steps, guidance 4."""
    scheduler: str = "pndm"
    steps: int = 75
    guidance: float = 4.0
    height: int = 512
    width: int = 512

    def __post_init__(self):  # a sampling.json can say anything
        if self.scheduler not in SCHEDULER_NAMES.values():
            raise ValueError(f"scheduler must be one of {', '.join(SCHEDULER_NAMES.values())}, got {self.scheduler!r}")
        for name in ("steps", "height", "width"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if type(self.guidance) not in (int, float) or not 0 <= self.guidance < math.inf:
            raise ValueError(f"guidance must be a finite number >= 0, got {self.guidance!r}")


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

    def __init__(self, tokenizer, text_encoder, unet, vae, scheduler_config, defaults=SamplingDefaults()):
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
        tokenizer = CLIPTokenizer.from_folder(ckpt.tokenizer_dir) if ckpt.tokenizer_dir else CLIPTokenizer.default()
        scheduler_config = config("scheduler", SchedulerConfig)
        unet_size, vae = models["unet"].config.sample_size, models["vae"].config
        size = unet_size * vae.downsample_factor if unet_size else vae.sample_size  # diffusers' default size
        if scheduler_config.class_name not in SCHEDULER_NAMES:
            warnings.warn(f"{path}: its scheduler {scheduler_config.class_name} is not implemented here; sampling "
                          f"with PNDM on the same noise schedule (choose with --scheduler pndm, ddim or ddpm)")
        defaults = SamplingDefaults(scheduler=SCHEDULER_NAMES.get(scheduler_config.class_name, "pndm"),
                                    height=size, width=size)
        sampling = Path(path if Path(path).is_dir() or config_dir is None else config_dir) / "sampling.json"
        if sampling.is_file():
            try:
                defaults = replace(defaults, **json.loads(sampling.read_text()))
            except (ValueError, TypeError) as e:
                raise WeightsError(f"{sampling}: not a valid sampling.json ({e}); fix or delete it") from None
        return cls(tokenizer, models["text_encoder"], models["unet"], models["vae"], scheduler_config, defaults)

    def save_pretrained(self, folder):
        """Write a diffusers folder that `StableDiffusionPipeline.from_pretrained` loads too."""
        models = {"text_encoder": self.text_encoder, "unet": self.unet, "vae": self.vae}
        save_pretrained(
            folder,
            configs={k: m.config.to_dict() for k, m in models.items()},
            state_dicts={k: m.state_dict() for k, m in models.items()},
            tokenizer=self.tokenizer,
            scheduler_config=self.scheduler_config.to_dict(),
            sampling=asdict(self.defaults),
        )

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
                 scheduler=None, height=None, width=None, eta=0.0, progress=True) -> torch.Tensor:
        """Sample `n` images of one prompt; returns (n, 3, H, W) in [-1, 1], float32 on the CPU.

        Seed s draws the initial latents as
        `torch.randn((n, C, H//f, W//f), generator=torch.Generator("cpu").manual_seed(s))`,
        so the same seed gives the same picture here and in diffusers.

        `prompt` may be a list of texts and `seed` a list as long, one seed each: they are sampled in one
        batch, (len * n, 3, H, W), each prompt's n images drawn exactly as that prompt alone with its seed.
        """
        d = self.defaults
        steps, guidance = d.steps if steps is None else steps, d.guidance if guidance is None else guidance
        height, width = d.height if height is None else height, d.width if width is None else width
        f = self.vae.config.downsample_factor
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f} (the VAE's downsampling), got {height}x{width}")
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if not 0 <= guidance < math.inf:
            raise ValueError(f"guidance must be finite and >= 0 (1 or less turns guidance off), got {guidance}")
        if negative and guidance <= 1:
            raise ValueError(f"a negative prompt is the unconditional branch of guidance, which guidance {guidance} "
                             f"turns off; give guidance > 1 or no negative prompt")
        sched = make_scheduler(scheduler or d.scheduler, self.scheduler_config)
        sched.set_timesteps(steps)

        prompts, seeds = ([prompt], [seed]) if isinstance(prompt, str) else (list(prompt), list(seed))
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts need {len(prompts)} seeds, got {len(seeds)}")
        guided = guidance > 1.0  # as diffusers: guidance 1 (or less) means the prompt alone
        context = self.encode_prompt([negative] * len(prompts) + prompts if guided else prompts)
        context = context.repeat_interleave(n, dim=0)  # [neg x P*n, prompt_1 x n, ..., prompt_P x n]

        generator = [torch.Generator("cpu").manual_seed(s) for s in seeds]  # one per prompt, also for steps
        shape = (n, self.unet.config.in_channels, height // f, width // f)
        latents = torch.cat([torch.randn(shape, generator=g) for g in generator]).to(self.device, self.dtype)
        for t in tqdm(sched.timesteps, desc="denoising", disable=not progress, leave=False):
            x = torch.cat([latents, latents]) if guided else latents  # (2n or n, 4, h, w)
            pred = self.unet(x, t.to(self.device), context)  # noise, or v for a v-prediction model
            if guided:
                pred_neg, pred_prompt = pred.chunk(2)
                pred = pred_neg + guidance * (pred_prompt - pred_neg)
            step_kwargs = {"eta": eta} if eta else {}
            latents = sched.step(pred, t, latents, generator=generator, **step_kwargs)
        image = self.vae.decode(latents / self.vae.config.scaling_factor)  # (n, 3, H, W)
        if not torch.isfinite(image).all():  # it would be saved as a black picture
            raise ValueError("the sample holds NaN or infinity: the weights are damaged (re-download them) or the "
                             "guidance scale is far too large")
        return image.float().cpu()


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
