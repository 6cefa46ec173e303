"""The models' hyperparameters, and their translation from and to diffusers' config.json files.

Plumbing, not the model: each network (clip.py, unet.py, vae.py) and the noise schedule take one of
these frozen dataclasses. Fields carry the config.json keys (so `from_dict(json.load(f))` reads a
downloaded model), defaults are the reference libraries' defaults (so a key left out means the same
here), and named presets hold the sizes used in this project: SD v1.5's, SD 2.1's, the tests' tiny
ones and the embedded default's small ones. Keys whose other values the code does not implement are
refused with a one-line error rather than silently computing something else.
"""
from dataclasses import asdict, dataclass, field, fields, replace

# clip.py: OpenAI CLIP's sigmoid GELU (SD v1), exact GELU (SD 2)
ACTIVATIONS = ("quick_gelu", "gelu")


# ----------------------------------------------------------------------------- CLIP text encoder

@dataclass(frozen=True)
class CLIPTextConfig:
    """Fields and defaults as in transformers' CLIPTextConfig (a text_encoder/config.json); the
    defaults are CLIP ViT-B/32's text tower, so a config.json that leaves a key out means the same
    here."""
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"  # OpenAI CLIP (SD v1); "gelu" for OpenCLIP (SD 2)
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not implemented: "
                             f"use one of {sorted(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPTextConfig":
        """Read a transformers text_encoder/config.json; keys that do not change the output
        of the text model (token ids, projection_dim, init scales, versions) are ignored."""
        if d.get("model_type", "clip_text_model") != "clip_text_model":
            raise ValueError(f"model_type={d['model_type']!r}: expected a CLIP text model config "
                             "('clip_text_model')")
        if d.get("attention_dropout", 0.0) != 0.0:
            raise ValueError(f"attention_dropout={d['attention_dropout']} is not implemented: "
                             "set it to 0.0")
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def to_dict(self) -> dict:
        """A config.json that transformers' CLIPTextModel.from_pretrained builds the same model
        from."""
        return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **asdict(self)}


CLIP_PRESETS = {
    # OpenAI CLIP ViT-L/14 text tower, as in SD v1.x (and RoentGen): 123M parameters.
    "sd15": CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                           num_attention_heads=12),
    # The text encoder of the tiny SD1-style test pipeline: real vocabulary, 32 wide, 2 layers.
    "tiny": CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=4),
    # The embedded default model's text encoder: real vocabulary, 128 wide (the token table is 6.3M
    # of its 7.1M parameters), 4 layers, CLIP's 64-wide heads and 4x MLP.
    "small": CLIPTextConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                            num_attention_heads=2),
}


# ----------------------------------------------------------------------------- UNet

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")  # with / without spatial transformers
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

# config.json keys that must hold one of these values (diffusers' defaults, SD's settings): the code
# implements only them. A per-block list passes when each entry does.
_UNET_FIXED = {
    "mid_block_type": ("UNetMidBlock2DCrossAttn",), "act_fn": ("silu",),
    "center_input_sample": (False,), "downsample_padding": (1,), "mid_block_scale_factor": (1,),
    "dropout": (0,), "conv_in_kernel": (3,), "conv_out_kernel": (3,),
    "transformer_layers_per_block": (1,), "reverse_transformer_layers_per_block": (None,),
    "only_cross_attention": (False,), "mid_block_only_cross_attention": (None, False),
    "dual_cross_attention": (False,), "cross_attention_norm": (None,),
    "attention_type": ("default",), "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,), "resnet_out_scale_factor": (1,),
    "time_embedding_type": ("positional",), "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,), "timestep_post_act": (None,), "time_cond_proj_dim": (None,),
    "class_embed_type": (None,), "num_class_embeds": (None,), "class_embeddings_concat": (False,),
    "projection_class_embeddings_input_dim": (None,), "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,), "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,),
}
# config.json keys that do not change what the network computes.
_UNET_IGNORED = {"addition_embed_type_num_heads"}  # used only with an addition_embed_type


@dataclass(frozen=True)
class UNetConfig:
    """Fields are diffusers' `UNet2DConditionModel` config.json keys (but one); defaults are
    diffusers' defaults, so a config.json that leaves a key out means the same here as there.

    The one exception: SD's config.json says `attention_head_dim` for what is the number of
    attention HEADS per level (a naming slip diffusers kept for compatibility): 8 in SD1
    (head size 320/8 = 40 ...), (5, 10, 20, 20) in SD2 (64-channel heads). Here it is
    `num_attention_heads`; the JSON name lives only in `from_dict`/`to_dict`."""
    sample_size: int | None = None  # latent side used in training (64 for 512-pixel images)
    in_channels: int = 4
    out_channels: int = 4
    flip_sin_to_cos: bool = True  # timestep features ordered [cos, sin] (SD) instead of [sin, cos]
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    num_attention_heads: int | tuple[int, ...] = 8  # config.json: attention_head_dim (see above)
    use_linear_projection: bool = False  # proj_in/proj_out: 1x1 convs (SD1) or Linear (SD2)
    upcast_attention: bool = False  # attention in fp32 (SD 2.1, whose fp16 attention overflows)

    def __post_init__(self):
        n = len(self.block_out_channels)
        for key, kinds in (("down_block_types", DOWN_BLOCK_TYPES),
                           ("up_block_types", UP_BLOCK_TYPES)):
            types = getattr(self, key)
            if len(types) != n or any(t not in kinds for t in types):
                raise ValueError(f"UNet config: {key}={list(types)} is not supported; use {n} "
                                 f"entries (one per block_out_channels entry) from {list(kinds)}")
        for key in ("layers_per_block", "cross_attention_dim"):
            if not isinstance(getattr(self, key), int):
                raise ValueError(f"UNet config: {key}={getattr(self, key)!r} is not supported; "
                                 "use one int for all blocks")
        if not isinstance(self.num_attention_heads, int) and len(self.num_attention_heads) != n:
            raise ValueError(f"UNet config: attention_head_dim={list(self.num_attention_heads)} "
                             f"needs {n} entries (one per block_out_channels entry) or one int")

    @property
    def heads(self) -> tuple[int, ...]:
        """Attention heads per level of the down path (the up path uses them reversed)."""
        h = self.num_attention_heads
        return (h,) * len(self.block_out_channels) if isinstance(h, int) else tuple(h)

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        """Read a diffusers `unet/config.json` dict."""
        names = {f.name for f in fields(cls)} - {"num_attention_heads"}
        known = (names | _UNET_FIXED.keys() | _UNET_IGNORED
                 | {"attention_head_dim", "num_attention_heads"})
        for key, value in d.items():
            values = value if isinstance(value, (list, tuple)) else [value]
            if key in _UNET_FIXED and any(v not in _UNET_FIXED[key] for v in values):
                raise ValueError(f"UNet config: {key}={value!r} is not supported "
                                 f"(only {_UNET_FIXED[key][0]!r})")
            if key not in known and not key.startswith("_"):
                raise ValueError(f"UNet config: unknown key {key!r}; "
                                 "is this a UNet2DConditionModel config.json?")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
        # the correctly named key wins, as in diffusers; else the misnamed one holds the heads
        heads = d.get("num_attention_heads") or d.get("attention_head_dim")
        if heads is not None:
            kwargs["num_attention_heads"] = tuple(heads) if isinstance(heads, list) else heads
        return cls(**kwargs)

    def to_dict(self) -> dict:
        """A config.json that `diffusers.UNet2DConditionModel.from_config` builds into the same
        network."""
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        # diffusers refuses num_attention_heads here
        d["attention_head_dim"] = d.pop("num_attention_heads")
        return {"_class_name": "UNet2DConditionModel", **d,
                "mid_block_type": "UNetMidBlock2DCrossAttn"}


_SD15 = UNetConfig(sample_size=64, in_channels=4, out_channels=4, flip_sin_to_cos=True,
                   freq_shift=0, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                   up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                   block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                   norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768,
                   num_attention_heads=8, use_linear_projection=False, upcast_attention=False)
_TINY = replace(_SD15, sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32)
UNET_PRESETS = {
    # SD v1.x `unet/config.json` (v1.4 and v1.5 are identical; RoentGen fine-tunes this): 859.5M
    # parameters.
    "sd15": _SD15,
    # SD 2.1 (768-v): OpenCLIP-H context of width 1024, 64-channel heads, Linear projections:
    # 865.9M.
    "sd21": replace(_SD15, sample_size=96, cross_attention_dim=1024,
                    num_attention_heads=(5, 10, 20, 20), use_linear_projection=True,
                    upcast_attention=True),
    # The tiny UNets of the tests (tiny_test_configs.json), SD1- and SD2-shaped.
    "tiny": _TINY,
    "tiny-sd2": replace(_TINY, num_attention_heads=(2, 4), use_linear_projection=True),
    # The embedded default model: 32x32 latents (128-pixel images, VAE "small"); cross-attention at
    # 16x16 and 8x8 only (SD1 has it at all but its lowest level; at 32x32 it would cost most):
    # 4.2M.
    "small": replace(_SD15, sample_size=32, block_out_channels=(32, 64, 128), layers_per_block=1,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                       "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                     cross_attention_dim=128, num_attention_heads=4),
}


# ----------------------------------------------------------------------------- VAE

# config.json keys that must hold exactly these values: the code implements only them.
_VAE_FIXED = {"act_fn": "silu", "shift_factor": None, "latents_mean": None, "latents_std": None,
          "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True}
# config.json keys that do not change what the network computes.
_VAE_IGNORED = {"force_upcast"}  # a pipeline hint: run the VAE in fp32 even in an fp16 pipeline


@dataclass(frozen=True)
class VAEConfig:
    """Fields are diffusers' `AutoencoderKL` config.json keys; defaults are diffusers' defaults, so
    a config.json that leaves a key out means the same here as there."""
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    sample_size: int = 32

    def __post_init__(self):
        n = len(self.block_out_channels)
        for key, kind in (("down_block_types", "DownEncoderBlock2D"),
                          ("up_block_types", "UpDecoderBlock2D")):
            types = getattr(self, key)
            if any(t != kind for t in types) or len(types) != n:
                raise ValueError(f"VAE config: {key}={list(types)} is not supported; "
                                 f"use {n} x '{kind}' (one per block_out_channels entry)")

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each side: 8 for SD."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        """Read a diffusers `vae/config.json` dict."""
        names = {f.name for f in fields(cls)}
        for key, value in d.items():
            if key in _VAE_FIXED and value != _VAE_FIXED[key]:
                raise ValueError(f"VAE config: {key}={value!r} is not supported "
                                 f"(only {_VAE_FIXED[key]!r})")
            if (key not in names and key not in _VAE_FIXED and key not in _VAE_IGNORED
                    and not key.startswith("_")):
                raise ValueError(f"VAE config: unknown key {key!r}; "
                                 "is this an AutoencoderKL config.json?")
        return cls(**{k: tuple(v) if isinstance(v, list) else v
                      for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        """A config.json that `diffusers.AutoencoderKL.from_config` builds into the same network."""
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        return {"_class_name": "AutoencoderKL", **d, **_VAE_FIXED}


VAE_PRESETS = {
    # SD v1.x `vae/config.json` (identical for v1.4, v1.5 and SD 2.x): 83.7M parameters.
    "sd15": VAEConfig(in_channels=3, out_channels=3, latent_channels=4,
                      block_out_channels=(128, 256, 512, 512),
                      layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                      up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
                      scaling_factor=0.18215, sample_size=512),
    # The tiny SD1-shaped VAE of the tests: two blocks, so latents are H/2 x W/2.
    "tiny": VAEConfig(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                      layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32,
                      scaling_factor=0.18215, sample_size=16),
    # The embedded default model's VAE (128-pixel phantoms): three blocks, so latents are H/4 x W/4
    # (32x32x4 at 128); 2.7M parameters. scaling_factor is a placeholder: train_vae.py measures it.
    "small": VAEConfig(in_channels=3, out_channels=3, latent_channels=4,
                       block_out_channels=(32, 64, 128),
                       layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 3,
                       up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=32,
                       scaling_factor=0.18215, sample_size=128),
}


# ----------------------------------------------------------------------------- noise schedule

@dataclass(frozen=True)
class SchedulerConfig:
    """The keys of a diffusers `scheduler_config.json` that change the computation (defaults:
    SD v1.5)."""
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"  # or "linear"
    prediction_type: str = "epsilon"  # or "v_prediction"
    steps_offset: int = 1  # added to "leading" timesteps: SD samples 981, ..., 21, 1 rather
                           # than 980, ..., 0
    set_alpha_to_one: bool = False  # DDIM/PNDM: abar after the last step is 1 (else abar_0)
    clip_sample: bool = False  # DDPM/DDIM: clamp the predicted x0 to [-1, 1]
    skip_prk_steps: bool = True  # PNDM: start with PLMS warm-up steps, not Runge-Kutta ones
    timestep_spacing: str = "leading"  # or "trailing", "linspace"
    rescale_betas_zero_snr: bool = False  # shift and scale sqrt(abar_t) so that abar_T = 0
                                          # (Lin et al. 2024)
    variance_type: str = "fixed_small"  # DDPM: posterior variance beta~_t (eq. 7)
    class_name: str = "PNDMScheduler"  # `_class_name`: the sampler the config was saved with
    # keys a file set; None: all
    given: frozenset | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if not self.skip_prk_steps:
            raise ValueError("scheduler config: skip_prk_steps=False (PNDM's Runge-Kutta warm-up, "
                             "diffusers' default when a config leaves the key out) is not "
                             'implemented; add "skip_prk_steps": true to scheduler_config.json, '
                             "or sample with ddim or ddpm")
        allowed = {"beta_schedule": ("linear", "scaled_linear"),
                   "prediction_type": ("epsilon", "v_prediction"),
                   "timestep_spacing": ("leading", "trailing", "linspace"),
                   "variance_type": ("fixed_small",)}
        for key, values in allowed.items():
            if getattr(self, key) not in values:
                raise ValueError(f"scheduler config: {key}={getattr(self, key)!r} is not "
                                 f"supported; use one of {list(values)}")
        # x0 = (x_T - eps) / 0
        if self.rescale_betas_zero_snr and self.prediction_type == "epsilon":
            raise ValueError("scheduler config: rescale_betas_zero_snr needs "
                             "prediction_type='v_prediction' (at zero SNR, x0 cannot be recovered "
                             "from a predicted eps)")

    @classmethod
    def from_dict(cls, d: dict) -> "SchedulerConfig":
        """Read a diffusers scheduler config. Keys every sampler has, when missing, take SD v1.5's
        values; those only some samplers have are filled by `for_sampler`, as diffusers would fill
        them."""
        unsupported = {"trained_betas": None, "thresholding": False}
        if d.get("clip_sample"):
            unsupported["clip_sample_range"] = 1.0
        for key, value in unsupported.items():
            if d.get(key, value) != value:
                raise ValueError(f"scheduler config: {key}={d[key]!r:.40} is not supported; "
                                 f"use {value!r}")
        kwargs = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        if "_class_name" in d:
            kwargs["class_name"] = d["_class_name"]
        return replace(cls(**kwargs), given=frozenset(kwargs))

    def for_sampler(self, class_name: str) -> "SchedulerConfig":
        """This config as diffusers' `<class_name>.from_config(config)` reads it: a key the file
        left out takes that sampler's default (a PNDM config has no clip_sample; DDIM clips x0
        unless told not to)."""
        missing = {k: v for k, v in SAMPLER_DEFAULTS[class_name].items()
                   if self.given is not None and k not in self.given}
        return replace(self, **missing, class_name=class_name)

    def to_dict(self) -> dict:
        """A `scheduler_config.json` that diffusers' `<class_name>.from_config` loads to the same
        sampler."""
        d = asdict(self)
        del d["given"]
        return {"_class_name": d.pop("class_name"), **d}


# diffusers' defaults for the keys that only some samplers have
SAMPLER_DEFAULTS = {"DDPMScheduler": {"clip_sample": True},
                    "DDIMScheduler": {"clip_sample": True, "set_alpha_to_one": True},
                    "PNDMScheduler": {"set_alpha_to_one": False, "skip_prk_steps": False}}


SCHEDULER_PRESETS = {
    "sd15": SchedulerConfig(),
    # SD 2.1 (768-v)
    "sd21": SchedulerConfig(prediction_type="v_prediction", class_name="DDIMScheduler"),
}
