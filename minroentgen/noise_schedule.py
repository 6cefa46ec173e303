"""The noise schedule and the forward process q(x_t | x_0): what training and every sampler share.

DDPM (Ho et al. 2020) fixes variances beta_1..beta_T (T = 1000) and noises a clean sample x0 in one
jump (eq. 4):

    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,  abar_t = prod_{s<=t} (1 - beta_s),  eps ~ N(0, I)

The network learns eps (DDPM eq. 14) or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans & Ho
2022, Sec. 4). SD's schedule ends at abar_T = 0.0047, not 0: `zero_terminal_snr` (Lin et al. 2024)
makes the last step pure noise, and then needs v-prediction; sampling starts from pure noise only
if its first timestep is T - 1 too ("trailing" spacing, Lin et al. Sec. 3.3). x here is LDM's
latent z; timesteps count from 0 (t = 0..T-1 is the paper's 1..T).
"""
import torch

from .configs import SchedulerConfig


def zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas whose last step leaves no signal (Lin et al. 2024, "Common Diffusion Noise Schedules
    and Sample Steps are Flawed", Alg. 1). On SD's schedule training never shows the network pure
    noise, and samples started from it come out washed out. sqrt(abar_t) is shifted so that it ends
    at 0, then scaled so that it starts where it did. Then eps cannot be predicted at t = T: use
    v-prediction."""
    root = torch.cumprod(1 - betas, dim=0).sqrt()  # sqrt(abar_t), (T,)
    first, last = root[0].clone(), root[-1].clone()
    abar = ((root - last) * (first / (first - last))) ** 2
    return 1 - torch.cat([abar[:1], abar[1:] / abar[:-1]])  # beta_t = 1 - abar_t / abar_{t-1}


class NoiseSchedule:
    """betas and abar_t (fp32, on the CPU), the forward process and the training targets."""

    def __init__(self, config: SchedulerConfig):
        self.config = c = config
        if c.beta_schedule == "linear":  # DDPM's
            self.betas = torch.linspace(c.beta_start, c.beta_end, c.num_train_timesteps,
                                        dtype=torch.float32)
        else:  # "scaled_linear": linear in sqrt(beta), as in the LDM code
            self.betas = torch.linspace(c.beta_start**0.5, c.beta_end**0.5, c.num_train_timesteps,
                                        dtype=torch.float32) ** 2
        if c.rescale_betas_zero_snr:
            self.betas = zero_terminal_snr(self.betas)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # abar_t, (T,)
        self._abar_on_device = self.alphas_cumprod  # (speed) a copy where last used: no host sync

    def abar(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """abar_t for t (B,), shaped (B, 1, ..., 1) to broadcast over x, in x's dtype and device."""
        if self._abar_on_device.device != x.device:  # copied once, so later calls do no host sync
            self._abar_on_device = self.alphas_cumprod.to(x.device)
        return self._abar_on_device.to(x.dtype)[t.to(x.device)].view(-1, *[1] * (x.ndim - 1))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """A sample of q(x_t | x0) (DDPM eq. 4): sqrt(abar_t) x0 + sqrt(1 - abar_t) eps;
        t (B,) long."""
        abar = self.abar(t, x0)
        return abar**0.5 * x0 + (1 - abar) ** 0.5 * noise

    def get_velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans & Ho 2022, Sec. 4)."""
        abar = self.abar(t, x0)
        return abar**0.5 * noise - (1 - abar) ** 0.5 * x0

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network learns to output: eps (DDPM eq. 14) or v, per `prediction_type`."""
        return (noise if self.config.prediction_type == "epsilon"
                else self.get_velocity(x0, noise, t))

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio of x_t, abar_t / (1 - abar_t) (Kingma et al. 2021, VDM), (B,)."""
        abar = self.abar(t, t.float())  # (B,) in fp32: t.float() only lends dtype, device, ndim
        return abar / (1 - abar)

    def x0_and_eps(self, pred: torch.Tensor, x_t: torch.Tensor, abar_t: torch.Tensor):
        """The network's x0 and eps estimates: from eps, x0 = (x_t - sqrt(1 - abar_t) eps) /
        sqrt(abar_t) (DDIM eq. 9, "predicted x0"); from v (Salimans & Ho 2022, Sec. 4),
        x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v and eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t.
        abar_t is a 0-dim tensor (one timestep)."""
        if self.config.prediction_type == "epsilon":
            return (x_t - (1 - abar_t) ** 0.5 * pred) / abar_t**0.5, pred
        return (abar_t**0.5 * x_t - (1 - abar_t) ** 0.5 * pred,
                abar_t**0.5 * pred + (1 - abar_t) ** 0.5 * x_t)
