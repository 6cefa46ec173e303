"""CLIP's text transformer: the text encoder of Stable Diffusion, (B, 77) ids -> (B, 77, 768).

CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision", Sec. 2.4) encodes text with a GPT-2-style transformer: token plus learned
position embeddings, pre-LayerNorm blocks of *causal* (masked) multi-head self-attention and
an MLP, and a final LayerNorm. CLIP itself keeps only the state at the end token, projected
into the joint image-text space. Stable Diffusion (Rombach et al. 2022, Sec. 3.3) keeps
instead every token's final state, `last_hidden_state` (B, 77, 768), as the context of the
UNet's cross-attention: no pooling, no projection, no padding mask (padding sits after the
end token, and the causal mask keeps it from changing the tokens before it).

SD v1 uses OpenAI's ViT-L/14 text tower (12 layers, width 768, quick-GELU) and keeps it frozen;
RoentGen fine-tunes it together with the UNet, which is why `gradient_checkpointing` is here.
SD 2 uses OpenCLIP ViT-H/14 (width 1024, exact GELU) up to its penultimate layer, stored as a
23-layer model with the same parameter names.
"""
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from .configs import CLIPTextConfig


def quick_gelu(x):
    """OpenAI CLIP's sigmoid approximation of GELU (Hendrycks & Gimpel 2016, Sec. 2)."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}  # F.gelu: the exact (erf) GELU of OpenCLIP


class Embeddings(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embedding = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        nn.init.normal_(self.token_embedding.weight, std=0.02)  # CLIP's initialisation
        nn.init.normal_(self.position_embedding.weight, std=0.01)

    def forward(self, input_ids):  # (B, L) -> (B, L, D)
        L, max_len = input_ids.shape[1], self.position_embedding.num_embeddings
        if L > max_len:
            raise ValueError(f"input_ids has {L} tokens but the text encoder takes at most "
                             f"{max_len}: tokenize with max_length={max_len}")
        return self.token_embedding(input_ids) + self.position_embedding.weight[:L]


class SelfAttention(nn.Module):
    """Causal multi-head self-attention: token i attends to tokens 0..i only."""

    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.heads = c.num_attention_heads
        D = c.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x):  # (B, L, D)
        q, k, v = (rearrange(proj(x), "b l (h d) -> b h l d", h=self.heads)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))  # (B, heads, L, D / heads)
        # softmax(q k^T / sqrt(d) + causal mask) v
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(rearrange(out, "b h l d -> b l (h d)"))


class MLP(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)
        self.act = ACTIVATIONS[c.hidden_act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))  # (B, L, 768) -> (B, L, 3072) -> (B, L, 768)


class EncoderLayer(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.self_attn, self.mlp = SelfAttention(c), MLP(c)
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextModel(nn.Module):
    """input_ids (B, L<=77) -> last_hidden_state (B, L, hidden_size), the context SD's UNet
    attends to.

    Parameter names are the published ones (`text_model.encoder.layers.0.self_attn.q_proj.weight`),
    so a diffusers text_encoder/ file loads with strict=True once the old, unused
    `text_model.embeddings.position_ids` buffer is dropped.
    """

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False  # set True to trade compute for memory when training
        # ModuleDicts are only containers here: they give the parameters their published names.
        self.text_model = nn.ModuleDict({
            "embeddings": Embeddings(config),
            "encoder": nn.ModuleDict({"layers": nn.ModuleList(
                EncoderLayer(config) for _ in range(config.num_hidden_layers))}),
            "final_layer_norm": nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps),
        })

    def forward(self, input_ids: torch.LongTensor) -> torch.Tensor:
        x = self.text_model.embeddings(input_ids)  # (B, 77) -> (B, 77, 768)
        for layer in self.text_model.encoder.layers:
            if self.gradient_checkpointing and self.training:
                # keep only x; recompute the layer in backward
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return self.text_model.final_layer_norm(x)  # (B, 77, 768)
