"""The denoising UNet of Stable Diffusion (LDM paper: Rombach et al. 2022, Sec. 3.3, Fig. 3,
App. E.2).

eps_theta(z_t, t, c) predicts the noise in a latent z_t (B, 4, h, w) at timestep t, conditioned on
the text context c (B, 77, 768) from CLIP. It is the DDPM UNet (Ho et al. 2020, App. B): ResBlocks
that see a timestep embedding, a down path that halves the resolution per level, a middle, and an up
path that doubles it again, taking in the down path's activations through concatenated skip
connections. LDM adds a spatial transformer after the ResBlocks of most levels; its cross-attention
reads c (LDM Sec. 3.3), which is how the prompt steers the image.

Module names equal the keys of a diffusers `unet/diffusion_pytorch_model.safetensors`, so such a
file loads with `load_state_dict(strict=True)`:

    conv_in -> down_blocks.{i}.{resnets,attentions}.{j}, .downsamplers.0 -> mid_block.resnets.0,
    .attentions.0, .resnets.1 -> up_blocks.{i}.{resnets,attentions}.{j}, .upsamplers.0
    -> conv_norm_out, conv_out        (time_embedding feeds every ResBlock)

Any latent size works (each upsampler resizes to the skip it meets, as diffusers does); SD's latents
are multiples of 8, where every level halves exactly.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .configs import UNetConfig

# ----------------------------------------------------------------------------- building blocks

def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool,
                       freq_shift: float) -> torch.Tensor:
    """Sinusoidal features of the timestep, as the Transformer's positional encoding ("Attention is
    all you need", Vaswani et al. 2017, Sec. 3.5) and DDPM (Ho et al. 2020, App. B): angles t * f_i
    with frequencies f_i = 10000^(-i / (dim/2 - freq_shift)), i < dim/2, then [sin, cos] (or
    [cos, sin]). t (B,) -> (B, dim), in fp32 whatever the model's dtype (fp16 would round large
    t * f_i badly)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device)
                      / (half - freq_shift))
    angles = t.float()[:, None] * freqs  # (B, dim/2)
    return torch.cat([angles.cos(), angles.sin()] if flip_sin_to_cos
                     else [angles.sin(), angles.cos()], dim=-1)


class TimestepEmbedding(nn.Module):
    """The MLP on the sinusoidal features: Linear -> SiLU -> Linear, (B, C0) -> (B, 4 C0)."""

    def __init__(self, dim: int, out: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim, out)
        self.linear_2 = nn.Linear(out, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResBlock(nn.Module):
    """The DDPM/LDM residual block (diffusers' ResnetBlock2D): GroupNorm-SiLU-conv, plus a
    per-channel projection of the timestep embedding, GroupNorm-SiLU-conv, and the input added back
    (through a 1x1 conv when the channel count changes). SD sets dropout to 0, so it has none."""

    def __init__(self, cin: int, cout: int, temb: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x (B, cin, h, w), emb (B, temb) already through SiLU -> (B, cout, h, w)."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.conv_shortcut(x) + h


class Attention(nn.Module):
    """Multi-head scaled dot-product attention ("Attention is all you need", Eq. 1, Sec. 3.2.2):
    self-attention when `context` is None, else cross-attention with keys and values from the text
    (LDM Sec. 3.3). No biases on q, k, v; `to_out` is a list because diffusers keeps a dropout at
    index 1."""

    def __init__(self, dim: int, context_dim: int, heads: int, upcast: bool):
        super().__init__()
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, dim), context (B, L, context_dim) -> (B, N, dim)."""
        context = x if context is None else context
        # (B, heads, N or L, dim/heads)
        q, k, v = (p.unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for p in (self.to_q(x), self.to_k(context), self.to_v(context)))
        if self.upcast:  # in fp32 even under autocast, then back to the working dtype
            with torch.autocast(q.device.type, enabled=False):
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](out.transpose(1, 2).flatten(2))  # (B, N, dim)


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020, "GLU Variants Improve Transformer", Eq. 5): one Linear
    computes both the value and the gate, out = value * GELU(gate)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)  # (B, N, inner) each
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """The transformer's position-wise MLP with a GEGLU of 4x inner width."""

    def __init__(self, dim: int):
        super().__init__()
        # index 1 is diffusers' dropout slot, kept empty so the weights are named net.0 and net.2
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block (diffusers' BasicTransformerBlock): self-attention over the
    image tokens, cross-attention to the text, feed-forward; each added back to its input."""

    def __init__(self, dim: int, context_dim: int, heads: int, upcast: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, dim, heads, upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim, heads, upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """LDM's spatial transformer (diffusers' Transformer2DModel): GroupNorm, proj_in, one
    transformer block over the h*w pixels as tokens, proj_out, plus the input."""

    def __init__(self, channels: int, context_dim: int, heads: int, groups: int, linear: bool,
                 upcast: bool):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(channels, context_dim, heads, upcast)])
        self.proj_out = (nn.Linear(channels, channels) if linear
                         else nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x (B, C, h, w), context (B, L, context_dim) -> (B, C, h, w)."""
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, h*w, C)
        # a 1x1 conv (SD1) is a Linear over the tokens (SD2): only the weight's shape differs
        h = F.linear(h, self.proj_in.weight.flatten(1), self.proj_in.bias)
        h = self.transformer_blocks[0](h, context)
        h = F.linear(h, self.proj_out.weight.flatten(1), self.proj_out.bias)
        return x + h.transpose(1, 2).unflatten(2, x.shape[2:])  # (B, C, h, w)


class Downsample(nn.Module):
    """Stride-2 3x3 conv: (B, C, h, w) -> (B, C, ceil(h/2), ceil(w/2))."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour resize to `size` (2x, or the odd size of the skip it meets), then a 3x3
    conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: torch.Size) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))  # (B, C, *size)


def _level(**children: list[nn.Module]) -> nn.Module:
    """One resolution level (diffusers' CrossAttnDownBlock2D, UpBlock2D, mid block, ...) as a plain
    holder of named module lists; `UNet2DConditionModel.forward` runs them."""
    level = nn.Module()
    for name, modules in children.items():
        level.add_module(name, nn.ModuleList(modules))
    return level


# ----------------------------------------------------------------------------- the UNet

class UNet2DConditionModel(nn.Module):
    """eps_theta(z_t, t, c) of LDM Eq. 3 (noise, or v for a v-prediction model). Set
    `gradient_checkpointing = True` to recompute every ResBlock and spatial transformer in the
    backward pass while training (less memory, more time).

    The skip connections in SD v1.5 (64x64 latents, channels 320/640/1280/1280, 2 ResBlocks a
    level). The down path pushes 12 activations (channels @ side), in this order:

        conv_in                      320 @ 64
        down 0: ResBlock, ResBlock   320 @ 64, 320 @ 64;   Downsample  320 @ 32
        down 1: ResBlock, ResBlock   640 @ 32, 640 @ 32;   Downsample  640 @ 16
        down 2: ResBlock, ResBlock  1280 @ 16, 1280 @ 16;  Downsample 1280 @ 8
        down 3: ResBlock, ResBlock  1280 @ 8, 1280 @ 8

    Each up-path ResBlock pops the latest and concatenates it to h (h + skip channels):

        up 0 (@ 8):   1280+1280, 1280+1280, 1280+1280  -> 1280, then Upsample
        up 1 (@ 16):  1280+1280, 1280+1280, 1280+640   -> 1280, then Upsample
        up 2 (@ 32):  1280+640,  640+640,   640+320    -> 640,  then Upsample
        up 3 (@ 64):  640+320,   320+320,   320+320    -> 320

    so the up levels' ResBlocks take 2560/2560/2560, 2560/2560/1920, 1920/1280/960, 960/640/640.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        self.gradient_checkpointing = False
        # heads per level: config.json's misnamed attention_head_dim (see configs.UNetConfig)
        ch, heads, n = c.block_out_channels, c.heads, len(c.block_out_channels)
        temb = 4 * ch[0]

        def resnet(cin, cout):
            return ResBlock(cin, cout, temb, c.norm_num_groups, c.norm_eps)

        def transformer(channels, h):
            return SpatialTransformer(channels, c.cross_attention_dim, h, c.norm_num_groups,
                                      c.use_linear_projection, c.upcast_attention)

        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb)

        skips = [ch[0]]  # channels of the activations the down path hands to the up path
        self.down_blocks = nn.ModuleList()
        for i, (kind, cout) in enumerate(zip(c.down_block_types, ch)):
            cins = [skips[-1]] + [cout] * (c.layers_per_block - 1)
            self.down_blocks.append(_level(
                resnets=[resnet(cin, cout) for cin in cins],
                attentions=([transformer(cout, heads[i]) for _ in cins]
                            if kind.startswith("CrossAttn") else []),
                downsamplers=[Downsample(cout)] if i < n - 1 else []))
            skips += [cout] * (c.layers_per_block + (i < n - 1))

        self.mid_block = _level(resnets=[resnet(ch[-1], ch[-1]), resnet(ch[-1], ch[-1])],
                                attentions=[transformer(ch[-1], heads[-1])])

        self.up_blocks = nn.ModuleList()
        cin = ch[-1]
        for i, (kind, cout) in enumerate(zip(c.up_block_types, reversed(ch))):
            resnets = []
            for _ in range(c.layers_per_block + 1):  # each takes one skip, concatenated on channels
                resnets.append(resnet(cin + skips.pop(), cout))
                cin = cout
            self.up_blocks.append(_level(
                resnets=resnets,
                attentions=([transformer(cout, heads[-1 - i]) for _ in resnets]
                            if kind.startswith("CrossAttn") else []),
                upsamplers=[Upsample(cout)] if i < n - 1 else []))

        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, ch[0], eps=c.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], c.out_channels, 3, padding=1)

    def _run(self, module: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training:
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float,
                encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """sample z_t (B, in_channels, h, w); timestep: a number, a 0-d or a (B,) tensor;
        encoder_hidden_states c (B, L, cross_attention_dim) -> predicted noise, or v
        (B, out_channels, h, w)."""
        c, context = self.config, encoder_hidden_states
        t = torch.as_tensor(timestep, device=sample.device).expand(sample.shape[0])  # (B,)
        t_emb = timestep_embedding(t, self.conv_in.out_channels, c.flip_sin_to_cos, c.freq_shift)
        # (B, 4 C0); the SiLU that starts every ResBlock's time projection is applied here, once
        emb = F.silu(self.time_embedding(t_emb.to(self.conv_in.weight.dtype)))

        # (speed) .contiguous(): the VAE's latents are a channels-last view; left so, every layer
        # here would run channels-last, ~20% slower on a CPU (benchmarks/RESULTS.md)
        h = self.conv_in(sample.contiguous())  # (B, C0, h, w)
        skips = [h]
        for level in self.down_blocks:
            for j, resnet in enumerate(level.resnets):
                h = self._run(resnet, h, emb)
                if level.attentions:
                    h = self._run(level.attentions[j], h, context)
                skips.append(h)
            for down in level.downsamplers:
                h = down(h)  # (B, C, h/2, w/2)
                skips.append(h)

        mid = self.mid_block
        h = self._run(mid.resnets[0], h, emb)
        h = self._run(mid.attentions[0], h, context)
        h = self._run(mid.resnets[1], h, emb)

        for level in self.up_blocks:
            for j, resnet in enumerate(level.resnets):
                # (B, C + C_skip, h, w) -> (B, C', h, w)
                h = self._run(resnet, torch.cat([h, skips.pop()], dim=1), emb)
                if level.attentions:
                    h = self._run(level.attentions[j], h, context)
            for up in level.upsamplers:
                h = up(h, skips[-1].shape[2:])  # (B, C', 2h, 2w)

        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, out_channels, h, w)
