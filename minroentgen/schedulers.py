"""Samplers: DDPM, DDIM and PNDM (PLMS) walk back from noise, with diffusers' semantics.

Each holds the noise schedule (noise_schedule.py: abar_t, the forward process) and steps from x_t to
x_prev over a few of the 1000 training timesteps, given the network's prediction (eps or v):

    DDPM  (Ho et al. 2020, eqs. 6-7): the Gaussian posterior q(x_prev | x_t, x0), mean plus noise.
    DDIM  (Song et al. 2021, eq. 12): the same marginals without (eta=0) or with (eta>0) fresh
          noise.
    PNDM  (Liu et al. 2022): a linear multistep method (PLMS) over DDIM-like "transfer" steps.

Every sampler follows diffusers' `DDPMScheduler` / `DDIMScheduler` / `PNDMScheduler` exactly
(same timesteps, same formulas, same random draws), so a seed gives the same picture in both.
"""
import numpy as np
import torch

from .configs import SchedulerConfig
from .noise_schedule import NoiseSchedule


class Sampler:
    """The timesteps to visit and the bookkeeping shared by the three samplers."""

    def __init__(self, config: SchedulerConfig):
        # keys the file left out take this sampler's diffusers defaults (e.g. DDIM clips x0)
        self.config = c = config.for_sampler(type(self).__name__)
        self.schedule = NoiseSchedule(c)
        self.alphas_cumprod = self.schedule.alphas_cumprod  # abar_t, (T,)
        # abar "after the last step": 1 (a clean image), or SD's choice abar_0
        self.final_alpha_cumprod = (torch.tensor(1.0) if c.set_alpha_to_one
                                    else self.alphas_cumprod[0])
        self.num_inference_steps = None
        self.timesteps = torch.arange(c.num_train_timesteps - 1, -1, -1)  # all, until set_timesteps

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
            raise ValueError(f"{n} steps with the scheduler's "
                             f"steps_offset={self.config.steps_offset} give timestep "
                             f"{timesteps[0]}, past the last training timestep {T - 1}; "
                             "use fewer steps")
        self.num_inference_steps = n
        self.timesteps = torch.from_numpy(timesteps.copy())

    def _stride(self) -> int:
        """DDIM and PNDM step from t to t - T // n (whatever the spacing, as diffusers does)."""
        if self.num_inference_steps is None:
            raise ValueError(f"call {type(self).__name__}.set_timesteps(num_inference_steps) "
                             "before step()")
        return self.config.num_train_timesteps // self.num_inference_steps

    def _abar_at(self, t: int) -> torch.Tensor:
        """abar_t as a 0-dim fp32 tensor; t < 0 means "after the last step"."""
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha_cumprod

    def _predict_x0_eps(self, model_output, sample, abar_t):
        """x0 and eps from the prediction (NoiseSchedule.x0_and_eps); `clip_sample` clamps x0
        only."""
        x0, eps = self.schedule.x0_and_eps(model_output, sample, abar_t)
        return (x0.clamp(-1, 1) if self.config.clip_sample else x0), eps


def _randn_like(x: torch.Tensor, generator) -> torch.Tensor:
    """N(0, I) noise shaped like x, drawn on the generator's device (so a CPU generator gives the
    same numbers for any x.device, as diffusers' `randn_tensor`) and moved to x's device. A list
    of generators draws equal slices of the batch, one each (several prompts, each with its own
    seed)."""
    if isinstance(generator, list):
        parts = x.chunk(len(generator))
        return torch.cat([_randn_like(part, g) for part, g in zip(parts, generator)])
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


class DDPMScheduler(Sampler):
    """Ancestral sampling from the posterior q(x_prev | x_t, x0) (Ho et al. 2020, eqs. 6-7), x0
    predicted from the network's output: the same as Algorithm 2's eq. 11 with sigma^2 = beta~
    when x0 is not clipped. Steps go to the next listed timestep (DDIM and PNDM: t - T // n).
    Timesteps count from 0 here (diffusers'), from 1 in the paper: "t > 0" is the paper's t > 1."""

    def __init__(self, config: SchedulerConfig):
        super().__init__(config)
        self.final_alpha_cumprod = torch.tensor(1.0)  # DDPM always ends on x0 itself (abar = 1)

    def step(self, model_output, timestep, sample, generator=None) -> torch.Tensor:
        """x_prev = mu~(x_t, x0) + sigma_t z, with eq. 7's mean and variance for the stride
        t -> prev; noise is drawn (with `generator`) whenever t > 0."""
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
            variance = torch.clamp((1 - abar_prev) / (1 - abar_t) * beta_t,
                                   min=1e-20)  # beta~ (eq. 7)
            prev_sample = prev_sample + variance**0.5 * _randn_like(model_output, generator)
        return prev_sample


class DDIMScheduler(Sampler):
    """Denoising diffusion implicit models (Song et al. 2021, eq. 12)."""

    def step(self, model_output, timestep, sample, eta: float = 0.0,
             generator=None) -> torch.Tensor:
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


class PNDMScheduler(Sampler):
    """Pseudo linear multistep (PLMS) sampling (Liu et al. 2022, "Pseudo Numerical Methods for
    Diffusion Models on Manifolds"), as in SD's code (`skip_prk_steps`: no Runge-Kutta warm-up).

    Each step is the paper's "transfer" phi(x_t, e, t, prev) (eq. 9), a DDIM step, fed with an
    Adams-Bashforth combination e of the last (up to four) predictions: the 4th order is the paper's
    eq. 12; the lower orders while the history fills, and the first step taken twice (a trapezoid/
    Heun step) instead of the paper's Runge-Kutta warm-up, are CompVis's `plms.py`, which SD ships.
    That is why `timesteps` repeats its second entry (t_0, t_1, t_1, t_2, ...):

        call 1   at t_0:  e_0 = net(x_{t_0});  x' = phi(x_{t_0}, e_0, t_0, t_1)          (a guess)
        call 2   at t_1:  e' = net(x');        x_{t_1} = phi(x_{t_0}, (e_0 + e')/2, t_0, t_1)
        call k+2 at t_k (k >= 1):  e_k = net(x_{t_k});  e = AB(e_k, e_{k-1}, ...) of order
                          min(k + 1, 4);  x_{t_{k+1}} = phi(x_{t_k}, e, t_k, t_{k+1})

    State, reset by `set_timesteps`: `history` (the last predictions, newest last), `x_first`
    (x_{t_0}, kept from call 1 for the redo in call 2), `calls` (how many steps were taken).
    """

    def __init__(self, config: SchedulerConfig):
        # diffusers' PNDMScheduler has no such option (it would ignore it)
        if config.rescale_betas_zero_snr:
            raise ValueError("the PNDM sampler does not support a zero-terminal-SNR schedule "
                             "(rescale_betas_zero_snr); sample with ddim or ddpm")
        super().__init__(config)
        self.calls, self.history, self.x_first = 0, [], None

    def set_timesteps(self, num_inference_steps: int):
        """t_0, t_1, t_1, t_2, ..., t_{n-1}; also starts a fresh sampling loop (clears the
        history)."""
        super().set_timesteps(num_inference_steps)
        ts = self.timesteps
        self.timesteps = torch.cat([ts[:1], ts[1:2], ts[1:]])
        self.calls, self.history, self.x_first = 0, [], None

    def step(self, model_output, timestep, sample, generator=None) -> torch.Tensor:
        """One PLMS step on the model outputs (eps or v); `generator` is unused (PNDM is
        deterministic)."""
        t = int(timestep)
        stride = self._stride()
        prev = t - stride
        if self.calls == 1:  # call 2: redo the first step from x_{t_0} with the averaged prediction
            e = (model_output + self.history[-1]) / 2
            sample, self.x_first = self.x_first, None
            t, prev = t + stride, t  # timestep says t_1 (where x' is); the redo starts at t_0
        else:
            self.history = self.history[-3:] + [model_output]
            h = self.history[::-1]  # newest first
            if len(h) == 1:  # call 1: a plain step, to be redone
                e = h[0]
                self.x_first = sample
            elif len(h) == 2:  # Adams-Bashforth of orders 2, 3, 4 (eq. 12)
                e = (3 * h[0] - h[1]) / 2
            elif len(h) == 3:
                e = (23 * h[0] - 16 * h[1] + 5 * h[2]) / 12
            else:  # (parity) 1/24 * (...), not (...) / 24: diffusers' rounding
                e = 1 / 24 * (55 * h[0] - 59 * h[1] + 37 * h[2] - 9 * h[3])
        self.calls += 1
        return self._transfer(sample, t, prev, e)

    def _transfer(self, sample, t, prev, model_output):
        """phi (eq. 9): x_prev = sqrt(abar_prev / abar_t) x_t
        - (abar_prev - abar_t) eps / (abar_t sqrt(1 - abar_prev)
                                      + sqrt(abar_t (1 - abar_t) abar_prev))."""
        abar_t, abar_prev = self.alphas_cumprod[t], self._abar_at(prev)
        _, eps = self._predict_x0_eps(model_output, sample, abar_t)
        denom = abar_t * (1 - abar_prev) ** 0.5 + (abar_t * (1 - abar_t) * abar_prev) ** 0.5
        return (abar_prev / abar_t) ** 0.5 * sample - (abar_prev - abar_t) * eps / denom


SCHEDULERS = {"pndm": PNDMScheduler, "ddim": DDIMScheduler, "ddpm": DDPMScheduler}


def make_scheduler(name: str, config: SchedulerConfig) -> Sampler:
    """A fresh sampler by name: "pndm" (the paper's, and SD v1.5's default), "ddim" or "ddpm"."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; use one of {sorted(SCHEDULERS)}")
    return SCHEDULERS[name](config)
