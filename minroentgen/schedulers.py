"""Noise schedules and samplers: DDPM, DDIM and PNDM (PLMS), with diffusers' semantics.

The forward process (Ho et al. 2020, "DDPM", eq. 4) noises a clean sample x0 in one jump:

    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,    abar_t = prod_{s<=t} (1 - beta_s)

A network learns to predict eps (or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0, Salimans & Ho 2022),
and a sampler walks back from pure noise over a few of the 1000 training timesteps:

    DDPM  (Ho et al. 2020, eqs. 6-7): the Gaussian posterior q(x_prev | x_t, x0), mean plus noise.
    DDIM  (Song et al. 2021, eq. 12): the same marginals without (eta=0) or with (eta>0) fresh noise.
    PNDM  (Liu et al. 2022): a linear multistep method (PLMS) over DDIM-like "transfer" steps.

SD's schedule ends at abar_T = 0.0047, not 0: `rescale_betas_zero_snr` (Lin et al. 2024) makes the last
step pure noise, as sampling starts, and then needs v-prediction (DDIM and DDPM; diffusers' PNDM lacks it).

Every sampler follows diffusers' `DDPMScheduler` / `DDIMScheduler` / `PNDMScheduler` exactly
(same timesteps, same formulas, same random draws), so a seed gives the same picture in both.
"""
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch


@dataclass(frozen=True)
class SchedulerConfig:
    """The keys of a diffusers `scheduler_config.json` that change the computation (defaults: SD v1.5)."""
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"  # or "linear"
    prediction_type: str = "epsilon"  # or "v_prediction"
    steps_offset: int = 1  # added to "leading" timesteps: SD samples 981, ..., 21, 1 rather than 980, ..., 0
    set_alpha_to_one: bool = False  # DDIM/PNDM: abar after the last step is 1 (else abar_0)
    clip_sample: bool = False  # DDPM/DDIM: clamp the predicted x0 to [-1, 1]
    skip_prk_steps: bool = True  # PNDM: start with PLMS warm-up steps, not Runge-Kutta ones
    timestep_spacing: str = "leading"  # or "trailing", "linspace"
    rescale_betas_zero_snr: bool = False  # shift and scale sqrt(abar_t) so that abar_T = 0 (Lin et al. 2024)
    variance_type: str = "fixed_small"  # DDPM: posterior variance beta~_t (eq. 7)
    class_name: str = "PNDMScheduler"  # `_class_name`: the sampler the config was saved with

    def __post_init__(self):
        allowed = {"beta_schedule": ("linear", "scaled_linear"), "prediction_type": ("epsilon", "v_prediction"),
                   "timestep_spacing": ("leading", "trailing", "linspace"), "skip_prk_steps": (True,),
                   "variance_type": ("fixed_small",)}
        for key, values in allowed.items():
            if getattr(self, key) not in values:
                raise ValueError(f"scheduler config: {key}={getattr(self, key)!r} is not supported; "
                                 f"use one of {list(values)}")
        if self.rescale_betas_zero_snr and self.prediction_type == "epsilon":  # x0 = (x_T - eps) / 0
            raise ValueError("scheduler config: rescale_betas_zero_snr needs prediction_type='v_prediction' "
                             "(at zero SNR, x0 cannot be recovered from a predicted eps)")

    @classmethod
    def from_dict(cls, d: dict) -> "SchedulerConfig":
        """Read a diffusers scheduler config; missing keys take SD v1.5's values (not diffusers' defaults)."""
        unsupported = {"trained_betas": None, "thresholding": False}
        if d.get("clip_sample"):
            unsupported["clip_sample_range"] = 1.0
        for key, value in unsupported.items():
            if d.get(key, value) != value:
                raise ValueError(f"scheduler config: {key}={d[key]!r:.40} is not supported; use {value!r}")
        kwargs = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        if "_class_name" in d:
            kwargs["class_name"] = d["_class_name"]
        return cls(**kwargs)

    def to_dict(self) -> dict:
        """A `scheduler_config.json` that diffusers' `<class_name>.from_config` loads to the same sampler."""
        d = asdict(self)
        return {"_class_name": d.pop("class_name"), **d}


PRESETS = {
    "sd15": SchedulerConfig(),
    "sd21": SchedulerConfig(prediction_type="v_prediction", class_name="DDIMScheduler"),  # SD 2.1 (768-v)
}


def zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas whose last step leaves no signal (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample
    Steps are Flawed", Alg. 1). SD's schedule ends at abar_T = 0.0047: training never shows the network pure
    noise, and samples started from it come out washed out. sqrt(abar_t) is shifted so that it ends at 0, then
    scaled so that it starts where it did. Then eps cannot be predicted at t = T: use v-prediction."""
    root = torch.cumprod(1 - betas, dim=0).sqrt()  # sqrt(abar_t), (T,)
    first, last = root[0].clone(), root[-1].clone()
    abar = ((root - last) * (first / (first - last))) ** 2
    return 1 - torch.cat([abar[:1], abar[1:] / abar[:-1]])  # beta_t = 1 - abar_t / abar_{t-1}


class Scheduler:
    """The noise schedule (betas, abar_t), the forward process and the training targets."""

    def __init__(self, config: SchedulerConfig):
        self.config = c = replace(config, class_name=type(self).__name__)  # to_dict names this sampler
        if c.beta_schedule == "linear":
            self.betas = torch.linspace(c.beta_start, c.beta_end, c.num_train_timesteps, dtype=torch.float32)
        else:  # "scaled_linear": linear in sqrt(beta), as in the LDM code
            self.betas = torch.linspace(c.beta_start**0.5, c.beta_end**0.5, c.num_train_timesteps,
                                        dtype=torch.float32) ** 2
        if c.rescale_betas_zero_snr:
            self.betas = zero_terminal_snr(self.betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # abar_t, (T,) fp32 on the CPU
        self.final_alpha_cumprod = torch.tensor(1.0) if c.set_alpha_to_one else self.alphas_cumprod[0]
        self.num_inference_steps = None
        self.timesteps = torch.arange(c.num_train_timesteps - 1, -1, -1)  # all of them, until set_timesteps
        self._abar_table = self.alphas_cumprod  # add_noise's copy, kept on the device it was last used on

    # --- training: forward process and targets ---

    def _abar(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """abar_t for t (B,), shaped (B, 1, ..., 1) to broadcast over x, in x's dtype on x's device."""
        if self._abar_table.device != x.device:  # copied once, so later calls do no host sync
            self._abar_table = self.alphas_cumprod.to(x.device)
        abar = self._abar_table.to(x.dtype)[t.to(x.device)]  # (B,)
        return abar.view(-1, *[1] * (x.ndim - 1))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Sample q(x_t | x0) (DDPM eq. 4): sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; t is a LongTensor (B,)."""
        abar = self._abar(t, x0)
        return abar**0.5 * x0 + (1 - abar) ** 0.5 * noise

    def get_velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans & Ho 2022, Sec. 4)."""
        abar = self._abar(t, x0)
        return abar**0.5 * noise - (1 - abar) ** 0.5 * x0

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio of x_t, abar_t / (1 - abar_t) (Kingma et al. 2021, Variational Diffusion
        Models), (B,) for t (B,)."""
        abar = self._abar(t, t.float())  # (B,) in fp32, from the table add_noise keeps on t's device
        return abar / (1 - abar)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network learns to output: eps (DDPM eq. 14) or v, per `prediction_type`."""
        return noise if self.config.prediction_type == "epsilon" else self.get_velocity(x0, noise, t)

    # --- sampling ---

    def set_timesteps(self, num_inference_steps: int):
        """Pick the timesteps to sample at, in descending order (a LongTensor on the CPU)."""
        n, T = num_inference_steps, self.config.num_train_timesteps
        if not 1 <= n <= T:
            raise ValueError(f"steps must be from 1 to {T} (the training timesteps), got {n}")
        if self.config.timestep_spacing == "leading":  # 0, r, 2r, ... plus the offset
            timesteps = np.arange(n)[::-1] * (T // n) + self.config.steps_offset
        elif self.config.timestep_spacing == "trailing":  # T-1, T-1-T/n, ... (rounded)
            timesteps = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
        else:  # "linspace": evenly from T-1 down to 0
            timesteps = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
        if timesteps[0] >= T:
            raise ValueError(f"{n} steps with the scheduler's steps_offset={self.config.steps_offset} give timestep "
                             f"{timesteps[0]}, past the last training timestep {T - 1}; use fewer steps")
        self.num_inference_steps = n
        self.timesteps = torch.from_numpy(timesteps.copy())

    def _stride(self) -> int:
        """DDIM and PNDM step from t to t - T // n (whatever the spacing, as diffusers does)."""
        if self.num_inference_steps is None:
            raise ValueError(f"call {type(self).__name__}.set_timesteps(num_inference_steps) before step()")
        return self.config.num_train_timesteps // self.num_inference_steps

    def _abar_at(self, t: int) -> torch.Tensor:
        """abar_t as a 0-dim fp32 tensor; t < 0 means "after the last step"."""
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha_cumprod

    def _predict_x0_eps(self, model_output, sample, abar_t):
        """The network's x0 and eps estimates: x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
        (from eq. 4), or from v: x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v,
        eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t. `clip_sample` clamps x0 only."""
        var_t = 1 - abar_t  # the variance of the noise in x_t
        if self.config.prediction_type == "epsilon":
            eps = model_output
            x0 = (sample - var_t**0.5 * eps) / abar_t**0.5
        else:
            x0 = abar_t**0.5 * sample - var_t**0.5 * model_output
            eps = abar_t**0.5 * model_output + var_t**0.5 * sample
        if self.config.clip_sample:
            x0 = x0.clamp(-1, 1)
        return x0, eps


def _randn_like(x: torch.Tensor, generator) -> torch.Tensor:
    """N(0, I) noise shaped like x, drawn on the generator's device (so a CPU generator gives the
    same numbers for any x.device, as diffusers' `randn_tensor`) and moved to x's device. A list of
    generators draws equal slices of the batch, one each (several prompts, each with its own seed)."""
    if isinstance(generator, list):
        return torch.cat([_randn_like(part, g) for part, g in zip(x.chunk(len(generator)), generator)])
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


class DDPMScheduler(Scheduler):
    """Ancestral sampling from the posterior q(x_prev | x_t, x0) (Ho et al. 2020, eqs. 6-7)."""

    def __init__(self, config: SchedulerConfig):
        super().__init__(config)
        self.final_alpha_cumprod = torch.tensor(1.0)  # DDPM always ends on x0 itself (abar = 1)

    def step(self, model_output, timestep, sample, generator=None) -> torch.Tensor:
        """x_prev = mu~(x_t, x0) + sigma_t z, with eq. 7's mean and variance for the stride t -> prev;
        noise is drawn (with `generator`) whenever t > 0."""
        t = int(timestep)
        ts = self.timesteps.tolist()
        i = ts.index(t)
        prev = ts[i + 1] if i + 1 < len(ts) else -1
        abar_t, abar_prev = self.alphas_cumprod[t], self._abar_at(prev)
        alpha_t = abar_t / abar_prev  # one "step" of the strided chain
        beta_t = 1 - alpha_t
        x0, _ = self._predict_x0_eps(model_output, sample, abar_t)
        x0_coeff = abar_prev**0.5 * beta_t / (1 - abar_t)
        xt_coeff = alpha_t**0.5 * (1 - abar_prev) / (1 - abar_t)
        prev_sample = x0_coeff * x0 + xt_coeff * sample  # mu~ (eq. 7)
        if t > 0:
            variance = torch.clamp((1 - abar_prev) / (1 - abar_t) * beta_t, min=1e-20)  # beta~ (eq. 7)
            prev_sample = prev_sample + variance**0.5 * _randn_like(model_output, generator)
        return prev_sample


class DDIMScheduler(Scheduler):
    """Denoising diffusion implicit models (Song et al. 2021, eq. 12)."""

    def step(self, model_output, timestep, sample, eta: float = 0.0, generator=None) -> torch.Tensor:
        """x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z, with
        sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev) (eq. 16)."""
        t = int(timestep)
        prev = t - self._stride()
        abar_t, abar_prev = self.alphas_cumprod[t], self._abar_at(prev)
        x0, eps = self._predict_x0_eps(model_output, sample, abar_t)
        variance = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
        sigma = eta * variance**0.5
        prev_sample = abar_prev**0.5 * x0 + (1 - abar_prev - sigma**2) ** 0.5 * eps
        if eta > 0:
            prev_sample = prev_sample + sigma * _randn_like(model_output, generator)
        return prev_sample


class PNDMScheduler(Scheduler):
    """Pseudo linear multistep (PLMS) sampling (Liu et al. 2022), as in SD's code (`skip_prk_steps`).

    Each step is the paper's "transfer" phi(x_t, eps, t, prev) (eq. 9), fed with an Adams-Bashforth
    combination of the last (up to four) eps predictions (eq. 12). The first step has no history, so
    instead of the paper's Runge-Kutta warm-up it is done twice: once with eps_t to reach x_prev',
    then again from x_t with the mean of eps_t and eps(x_prev'). So `timesteps` repeats its second entry.
    """

    def __init__(self, config: SchedulerConfig):
        if config.rescale_betas_zero_snr:  # diffusers' PNDMScheduler has no such option (it would ignore it)
            raise ValueError("the PNDM sampler does not support a zero-terminal-SNR schedule "
                             "(rescale_betas_zero_snr); sample with ddim or ddpm")
        super().__init__(config)
        self.counter, self.ets, self.cur_sample = 0, [], None

    def set_timesteps(self, num_inference_steps: int):
        """t_0, t_1, t_1, t_2, ..., t_{n-1}; also starts a fresh sampling loop (clears the history)."""
        super().set_timesteps(num_inference_steps)
        ts = self.timesteps
        self.timesteps = torch.cat([ts[:1], ts[1:2], ts[1:]])
        self.counter, self.ets, self.cur_sample = 0, [], None

    def step(self, model_output, timestep, sample, generator=None) -> torch.Tensor:
        """One PLMS step on the model outputs (eps or v); `generator` is unused (PNDM is deterministic)."""
        t = int(timestep)
        stride = self._stride()
        prev = t - stride
        if self.counter == 1:  # the first step again, from x_{t_0}, with the averaged eps (trapezoid)
            out = (model_output + self.ets[-1]) / 2
            sample, self.cur_sample = self.cur_sample, None
            t, prev = t + stride, t
        else:
            self.ets = self.ets[-3:] + [model_output]
            e = self.ets[::-1]  # newest first
            if len(e) == 1:  # Euler-like first try
                out = e[0]
                self.cur_sample = sample
            elif len(e) == 2:  # Adams-Bashforth of orders 2, 3, 4
                out = (3 * e[0] - e[1]) / 2
            elif len(e) == 3:
                out = (23 * e[0] - 16 * e[1] + 5 * e[2]) / 12
            else:
                out = 1 / 24 * (55 * e[0] - 59 * e[1] + 37 * e[2] - 9 * e[3])  # rounds as diffusers does
        self.counter += 1
        return self._transfer(sample, t, prev, out)

    def _transfer(self, sample, t, prev, model_output):
        """phi (eq. 9): x_prev = sqrt(abar_prev / abar_t) x_t
        - (abar_prev - abar_t) eps / (abar_t sqrt(1 - abar_prev) + sqrt(abar_t (1 - abar_t) abar_prev))."""
        abar_t, abar_prev = self.alphas_cumprod[t], self._abar_at(prev)
        _, eps = self._predict_x0_eps(model_output, sample, abar_t)
        denom = abar_t * (1 - abar_prev) ** 0.5 + (abar_t * (1 - abar_t) * abar_prev) ** 0.5
        return (abar_prev / abar_t) ** 0.5 * sample - (abar_prev - abar_t) * eps / denom


SCHEDULERS = {"pndm": PNDMScheduler, "ddim": DDIMScheduler, "ddpm": DDPMScheduler}


def make_scheduler(name: str, config: SchedulerConfig) -> Scheduler:
    """A fresh sampler by name: "pndm" (the paper's, and SD v1.5's default), "ddim" or "ddpm"."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; use one of {sorted(SCHEDULERS)}")
    return SCHEDULERS[name](config)
