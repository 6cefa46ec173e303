"""The KL-regularised autoencoder of Stable Diffusion (LDM paper: Rombach et al. 2022, Sec. 3.1,
App. G).

The encoder maps an image x in [-1, 1] of shape (B, 3, H, W) to a diagonal Gaussian over latents
(B, 4, H/f, W/f), f = `config.downsample_factor` (8 for SD: one halving between each two of the
4 levels); the decoder maps a latent back to an image. Diffusion runs on the latents,
multiplied by `config.scaling_factor` (0.18215 for SD v1, LDM Sec. 4.3.2, App. D.1 and G) so they
have roughly unit variance; encode/decode here do not apply that factor (diffusers does not either).

Module names equal the keys of a diffusers `vae/diffusion_pytorch_model.safetensors`, so such a file
loads with `load_state_dict(strict=True)`:

    encoder.conv_in -> encoder.down_blocks.{i}.resnets.{j}, .downsamplers.0 -> encoder.mid_block
    -> encoder.conv_norm_out, conv_out -> quant_conv  ==>  DiagonalGaussian
    post_quant_conv -> decoder.conv_in -> decoder.mid_block -> decoder.up_blocks.{i}.resnets.{j},
    .upsamplers.0 -> decoder.conv_norm_out, conv_out
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .configs import VAEConfig


# ----------------------------------------------------------------------------- posterior

class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))), the encoder's posterior (Kingma & Welling 2014,
    Sec. 2.4; LDM App. G). `moments` (B, 2C, h, w) holds the mean and log-variance stacked on
    channels."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, C, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)      # as LDM: keeps exp() finite
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * eps, eps ~ N(0, I) (the reparameterisation trick). eps is drawn on the
        generator's device in the posterior's dtype and then moved, as diffusers does, so a seeded
        CPU generator gives the same z as diffusers on any device."""
        device = self.mean.device if generator is None else generator.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device,
                          dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) = 1/2 sum(mean^2 + var - 1 - logvar) over C, h, w: shape (B,)."""
        return 0.5 * torch.sum(self.mean.pow(2) + torch.exp(self.logvar) - 1.0 - self.logvar,
                               dim=[1, 2, 3])


# ----------------------------------------------------------------------------- building blocks

def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """x + conv(silu(norm(conv(silu(norm(x)))))), with a 1x1 conv on the skip when channels change
    (LDM's ResnetBlock without a time embedding)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = (nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels
                              else nn.Identity())

    def forward(self, x):                                   # (B, Cin, H, W)
        h = self.conv1(F.silu(self.norm1(x)))               # (B, Cout, H, W)
        h = self.conv2(F.silu(self.norm2(h)))
        return self.conv_shortcut(x) + h


class Attention(nn.Module):
    """Single-head self-attention over all h*w pixels, with a residual (the VAE's mid-block
    attention)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = _norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # key `to_out.0`, as diffusers

    def forward(self, x):                                   # (B, C, h, w)
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)   # (B, h*w, C)
        q, k, v = (proj(h)[:, None] for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, h*w, C)
        h = F.scaled_dot_product_attention(q, k, v)[:, 0]  # (B, h*w, C), softmax(q k^T / sqrt(C)) v
        h = self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W)  # a channels-last view, no copy
        return h + x  # (parity) h first: the sum keeps h's layout, so later kernels round alike


class Downsample(nn.Module):
    """Stride-2 3x3 conv after zero-padding only right and bottom by one, as LDM:
    (H, W) -> (H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv: (H, W) -> (2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownEncoderBlock(nn.Module):
    """n ResnetBlocks, then (except in the last block) a Downsample:
    (B, Cin, H, W) -> (B, Cout, H/2, W/2)."""

    def __init__(self, in_channels: int, out_channels: int, n: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(in_channels if i == 0 else out_channels,
                                                 out_channels, groups) for i in range(n))
        self.downsamplers = nn.ModuleList([Downsample(out_channels)] if downsample else [])

    def forward(self, x):
        for layer in (*self.resnets, *self.downsamplers):
            x = layer(x)
        return x


class UpDecoderBlock(nn.Module):
    """n ResnetBlocks, then (except in the last block) an Upsample:
    (B, Cin, H, W) -> (B, Cout, 2H, 2W)."""

    def __init__(self, in_channels: int, out_channels: int, n: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(in_channels if i == 0 else out_channels,
                                                 out_channels, groups) for i in range(n))
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if upsample else [])

    def forward(self, x):
        for layer in (*self.resnets, *self.upsamplers):
            x = layer(x)
        return x


class MidBlock(nn.Module):
    """ResnetBlock -> Attention -> ResnetBlock at the lowest resolution."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups),
                                      ResnetBlock(channels, channels, groups)])
        self.attentions = nn.ModuleList([Attention(channels, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


# ----------------------------------------------------------------------------- encoder, decoder

class _Blocks(nn.Module):
    """Set `gradient_checkpointing = True` to keep only each block's input while training and
    recompute the block in the backward pass (less memory, more time)."""
    gradient_checkpointing = False

    def _run(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)


class Encoder(_Blocks):
    """(B, in_channels, H, W) -> (B, 2 * latent_channels, H/f, W/f): mean and logvar before
    quant_conv."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        ch, g, n = c.block_out_channels, c.norm_num_groups, len(c.block_out_channels)
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock(ch[max(i - 1, 0)], ch[i], c.layers_per_block, g, downsample=i < n - 1)
            for i in range(n))
        self.mid_block = MidBlock(ch[-1], g)
        self.conv_norm_out = _norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], 2 * c.latent_channels, 3, padding=1)

    def forward(self, x):                                   # (B, 3, H, W)
        x = self.conv_in(x)                                 # (B, ch[0], H, W)
        for block in self.down_blocks:
            x = self._run(block, x)                         # (B, ch[i], H/2^(i+1), W/2^(i+1));
                                                            # the last stays at H/f
        x = self._run(self.mid_block, x)                    # (B, ch[-1], H/f, W/f)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, 2*latent_channels, H/f, W/f)


class Decoder(_Blocks):
    """(B, latent_channels, h, w) -> (B, out_channels, h*f, w*f); the encoder mirrored, with one
    more ResnetBlock per level."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        ch, g, n = c.block_out_channels[::-1], c.norm_num_groups, len(c.block_out_channels)
        self.conv_in = nn.Conv2d(c.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g)
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock(ch[max(i - 1, 0)], ch[i], c.layers_per_block + 1, g, upsample=i < n - 1)
            for i in range(n))
        self.conv_norm_out = _norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], c.out_channels, 3, padding=1)

    def forward(self, z):                                   # (B, 4, h, w)
        x = self._run(self.mid_block, self.conv_in(z))      # (B, 512, h, w) for SD
        for block in self.up_blocks:
            x = self._run(block, x)                         # doubled after all but the last:
                                                            # (B, 128, 8h, 8w) at the end
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, 3, h*f, w*f)


class AutoencoderKL(nn.Module):
    """The KL-regularised autoencoder of LDM Sec. 3.1: encode -> DiagonalGaussian,
    decode -> image."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x (B, 3, H, W) in [-1, 1] -> q(z|x) over (B, latent_channels, H/f, W/f), unscaled."""
        return DiagonalGaussian(
            self.quant_conv(self.encoder(x)))  # moments (B, 2*latent_channels, H/f, W/f)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, latent_channels, h, w), unscaled (divide diffusion latents by scaling_factor first)
        -> image (B, 3, h*f, w*f), roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None,
                sample_posterior: bool = True):
        """Reconstruct x through a posterior sample (or its mean): returns (reconstruction,
        posterior) for the LDM autoencoder loss (reconstruction + KL weight * posterior.kl())."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior
