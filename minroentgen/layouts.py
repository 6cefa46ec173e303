"""The two public layouts of Stable Diffusion weights, and how their keys line up.

The same three networks (LDM paper, Rombach et al. 2022, Fig. 3: UNet, VAE, CLIP text encoder)
are published in two layouts:

* the diffusers folder (RoentGen's release format): `unet/`, `vae/`, `text_encoder/`, one state
  dict each whose keys equal this package's module attribute names
  (`down_blocks.0.resnets.1.conv2`);
* the original CompVis single file (`v1-5-pruned-emaonly.safetensors`, `sd-v1-4.ckpt`): one state
  dict with the UNet under `model.diffusion_model.`, the VAE under `first_stage_model.` and the text
  encoder under `cond_stage_model.transformer.`, named after the LDM code
  (`input_blocks.4.0.in_layers.2`).

SD 2.x single files keep their text encoder in OpenCLIP's layout under `cond_stage_model.model.`
instead (`OPENCLIP_BLOCK` below). `unet_table` and `vae_table` line the two namings up, block by
block; `original_to_diffusers` and `diffusers_to_original` convert whole state dicts. Reading and
writing files is weights.py's job.
"""
import math


import torch


class WeightsError(ValueError):
    """A checkpoint that cannot be used. The message is one line: the file, what is wrong, the
    fix."""


def few(keys, n=3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


# --------------------------------------------------------------------------------------------------
# The rename tables: (original prefix, diffusers prefix) pairs; a key is renamed by its longest
# matching prefix, the rest of the key is the same in both layouts.
# --------------------------------------------------------------------------------------------------

# LDM ResBlock = in_layers [GroupNorm, SiLU, Conv3x3], emb_layers [SiLU, Linear],
# out_layers [GroupNorm, SiLU, Dropout, Conv3x3], skip_connection (1x1 conv when channels change).
UNET_RESNET = [("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."),
               ("emb_layers.1.", "time_emb_proj."), ("out_layers.0.", "norm2."),
               ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut.")]
# The VAE ResnetBlock already says norm1/conv1/norm2/conv2; only the shortcut differs.
VAE_RESNET = [("", ""), ("nin_shortcut.", "conv_shortcut.")]
# VAE mid-block attention: 1x1 convs [C, C, 1, 1] in the original, Linear [C, C] in diffusers.
VAE_ATTENTION = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."),
                 ("proj_out.", "to_out.0.")]


def _nest(original: str, diffusers: str, inner) -> list[tuple[str, str]]:
    return [(original + a, diffusers + b) for a, b in inner]


def unet_table(n_blocks: int, layers_per_block: int,
               up_attention: list[bool]) -> list[tuple[str, str]]:
    """UNet, LDM `openaimodel.UNetModel` -> diffusers `UNet2DConditionModel` (without
    `model.diffusion_model.`).

    The original numbers its blocks in two flat lists: `input_blocks` = [conv_in] then, per level,
    `layers_per_block` x [ResBlock, SpatialTransformer] and a downsampler (not after the last
    level); `output_blocks` = per level, `layers_per_block + 1` x [ResBlock, SpatialTransformer]
    with the upsampler after the last one. Inside a block, `.0` is the ResBlock, `.1` the
    transformer (if any)."""
    L = layers_per_block
    table = [("time_embed.0.", "time_embedding.linear_1."),
             ("time_embed.2.", "time_embedding.linear_2."), ("input_blocks.0.0.", "conv_in."),
             ("out.0.", "conv_norm_out."), ("out.2.", "conv_out.")]
    for i in range(n_blocks):
        for j in range(L):
            k = 1 + i * (L + 1) + j
            table += _nest(f"input_blocks.{k}.0.", f"down_blocks.{i}.resnets.{j}.", UNET_RESNET)
            table.append((f"input_blocks.{k}.1.", f"down_blocks.{i}.attentions.{j}."))
        if i < n_blocks - 1:  # the downsampler is a block of its own: a stride-2 conv named `op`
            table.append((f"input_blocks.{(i + 1) * (L + 1)}.0.op.",
                          f"down_blocks.{i}.downsamplers.0.conv."))
    table += _nest("middle_block.0.", "mid_block.resnets.0.", UNET_RESNET)
    table.append(("middle_block.1.", "mid_block.attentions.0."))
    table += _nest("middle_block.2.", "mid_block.resnets.1.", UNET_RESNET)
    for i in range(n_blocks):
        for j in range(L + 1):
            k = i * (L + 1) + j
            table += _nest(f"output_blocks.{k}.0.", f"up_blocks.{i}.resnets.{j}.", UNET_RESNET)
            table.append((f"output_blocks.{k}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < n_blocks - 1:  # the upsampler sits after the last layer's ResBlock (and transformer)
            k, m = i * (L + 1) + L, 2 if up_attention[i] else 1
            table.append((f"output_blocks.{k}.{m}.conv.", f"up_blocks.{i}.upsamplers.0.conv."))
    return table


def vae_table(n_blocks: int, layers_per_block: int) -> list[tuple[str, str]]:
    """VAE, LDM `AutoencoderKL` -> diffusers `AutoencoderKL` (without `first_stage_model.`).

    The original decoder numbers its levels `up.{i}` from the highest resolution (like the encoder),
    diffusers' `up_blocks.{i}` in the order they run (lowest resolution first): reversed."""
    table = [("quant_conv.", "quant_conv."), ("post_quant_conv.", "post_quant_conv.")]
    for part in ("encoder", "decoder"):
        table += [(f"{part}.conv_in.", f"{part}.conv_in."),
                  (f"{part}.norm_out.", f"{part}.conv_norm_out."),
                  (f"{part}.conv_out.", f"{part}.conv_out.")]
        table += _nest(f"{part}.mid.block_1.", f"{part}.mid_block.resnets.0.", VAE_RESNET)
        table += _nest(f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0.", VAE_ATTENTION)
        table += _nest(f"{part}.mid.block_2.", f"{part}.mid_block.resnets.1.", VAE_RESNET)
    for i in range(n_blocks):
        for j in range(layers_per_block):
            table += _nest(f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.",
                           VAE_RESNET)
        if i < n_blocks - 1:
            table.append((f"encoder.down.{i}.downsample.conv.",
                          f"encoder.down_blocks.{i}.downsamplers.0.conv."))
    for i in range(n_blocks):
        r = n_blocks - 1 - i
        for j in range(layers_per_block + 1):
            table += _nest(f"decoder.up.{r}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.",
                           VAE_RESNET)
        if i < n_blocks - 1:
            table.append((f"decoder.up.{r}.upsample.conv.",
                          f"decoder.up_blocks.{i}.upsamplers.0.conv."))
    return table


# Where each network lives in the single file. The text encoder is a transformers CLIPTextModel
# state dict either way (`text_model.*`); very old files lack the `text_model.` level.
PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
            "text_encoder": "cond_stage_model.transformer."}
# Tensors the single file may carry that inference never needs: the DDPM schedule of LDM's
# `register_schedule` (recomputed by schedulers.py), LitEma's counters and EMA copies, `logvar`.
SKIPPED = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
           "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
           "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
           "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
           "logvar"}
VAE_LINEARS = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")


def _rename(key: str, table: dict[str, str]):
    """Longest prefix of `key` (cut at a dot) found in `table`, swapped for its partner; None if
    none."""
    i = len(key)
    while (i := key.rfind(".", 0, i)) > 0:
        if key[:i + 1] in table:
            return table[key[:i + 1]] + key[i + 1:]
    return None


def count(keys, prefix: str) -> int:
    """How many numbered children `prefix{n}.` the keys have."""
    return len({k[len(prefix):].split(".")[0] for k in keys if k.startswith(prefix)})


def _convert(sd: dict, table: list[tuple[str, str]], source: str, what: str) -> dict:
    """Rename every key of one network (its single-file prefix removed) with `table`."""
    lookup = dict(table)
    out, unknown = {}, []
    for key, tensor in sd.items():
        new = _rename(key, lookup)
        if new is None:
            unknown.append(PREFIXES[what] + key)
        else:
            out[new] = tensor
    if unknown:
        raise WeightsError(f"{source}: {len(unknown)} unrecognised keys ({few(unknown)}); "
                           f"this is not a Stable Diffusion v1 {what}")
    return out


# SD 2.x: OpenCLIP ViT-H/14's text tower. Per block, q, k and v are one fused projection
# (`attn.in_proj_weight` = cat(q, k, v) along dim 0). SD 2 conditions on the output of the
# penultimate block, then ln_final (LDM v2's FrozenOpenCLIPEmbedder, layer="penultimate"), so the
# file's last block is never run and diffusers' text_encoder/ holds one block fewer; so does
# CLIP's image-text head (`text_projection`, `logit_scale`), which SD does not use either.
OPENCLIP_PREFIX = "cond_stage_model.model."
OPENCLIP_TOP = [("token_embedding.", "text_model.embeddings.token_embedding."),
                ("ln_final.", "text_model.final_layer_norm.")]
OPENCLIP_BLOCK = [("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."),
                  ("attn.out_proj.", "self_attn.out_proj."), ("mlp.c_fc.", "mlp.fc1."),
                  ("mlp.c_proj.", "mlp.fc2.")]
OPENCLIP_HEAD = ("text_projection", "logit_scale")


def openclip_to_clip(sd: dict, source: str) -> dict:
    """OpenCLIP text tower (prefix removed) -> transformers CLIPTextModel keys, minus its last
    block (see above)."""
    n = count(sd, "transformer.resblocks.")
    keep = [f"transformer.resblocks.{i}." for i in range(n - 1)]
    table = dict(OPENCLIP_TOP + [(b + o, f"text_model.encoder.layers.{i}.{d}")
                                 for i, b in enumerate(keep) for o, d in OPENCLIP_BLOCK])
    out, unknown = {}, []
    for key, tensor in sd.items():
        block = key[:key.find(".", len("transformer.resblocks.")) + 1]
        if key in OPENCLIP_HEAD or block == f"transformer.resblocks.{n - 1}.":
            continue  # never run by SD 2
        if key == "positional_embedding":  # a bare parameter, (77, D)
            out["text_model.embeddings.position_embedding.weight"] = tensor
        elif block in keep and key.endswith(("attn.in_proj_weight", "attn.in_proj_bias")):
            layer = f"text_model.encoder.layers.{keep.index(block)}.self_attn."
            kind = key.rsplit("_", 1)[1]  # "weight" or "bias"
            for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3)):
                out[f"{layer}{name}.{kind}"] = part
        elif (new := _rename(key, table)) is not None:
            out[new] = tensor
        else:
            unknown.append(OPENCLIP_PREFIX + key)
    if unknown:
        raise WeightsError(f"{source}: {len(unknown)} unrecognised keys ({few(unknown)}); "
                           f"this is not an SD 2.x OpenCLIP text encoder")
    return out


def clip_to_openclip(sd: dict) -> dict:
    """The way back, for writing SD 2.x single files: the block SD 2 skips is written as a copy
    of the last one, and the image-text head as identity and CLIP's initial logit scale. `sd` has
    the `text_model.` prefix (`text_model_prefixed`)."""
    n = count(sd, "text_model.encoder.layers.")
    back = {d: o for o, d in OPENCLIP_TOP}
    back |= {f"text_model.encoder.layers.{i}.{d}": f"transformer.resblocks.{i}.{o}"
             for i in range(n + 1) for o, d in OPENCLIP_BLOCK}
    out = {"positional_embedding": sd["text_model.embeddings.position_embedding.weight"]}
    for i in range(n):
        layer = f"text_model.encoder.layers.{i}.self_attn."
        for kind in ("weight", "bias"):
            out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(
                [sd[f"{layer}{name}.{kind}"] for name in ("q_proj", "k_proj", "v_proj")])
    for key, tensor in sd.items():
        if (new := _rename(key, back)) is not None:  # all but positions and q/k/v, done above
            out[new] = tensor
    last = f"transformer.resblocks.{n - 1}."
    out |= {f"transformer.resblocks.{n}." + k[len(last):]: v.clone()  # the skipped block
            for k, v in list(out.items()) if k.startswith(last)}
    width = out["positional_embedding"].shape[1]
    out["text_projection"] = torch.eye(width)
    out["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    return out


def text_model_prefixed(sd: dict) -> dict:
    """transformers >= 5.6 saves CLIPTextModel without the `text_model.` level; the published
    files have it."""
    return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()
            # a buffer (arange), never a weight: its values are not used
            if not k.endswith("position_ids")}


def original_to_diffusers(sd: dict[str, torch.Tensor], use_ema: bool = False,
                          source: str = "checkpoint") -> dict:
    """Original single-file state dict -> {"unet": sd, "vae": sd, "text_encoder": sd} in diffusers
    naming. use_ema=True takes the UNet from the `model_ema.*` copies of a training checkpoint."""
    openclip = any(k.startswith(OPENCLIP_PREFIX) for k in sd)  # SD 2.x
    prefixes = PREFIXES | ({"text_encoder": OPENCLIP_PREFIX} if openclip else {})
    parts = {name: {} for name in prefixes}
    unknown = []
    for key, tensor in sd.items():
        name = next((n for n, p in prefixes.items() if key.startswith(p)), None)
        if name is not None:
            parts[name][key[len(prefixes[name]):]] = tensor
        elif key not in SKIPPED and not key.startswith("model_ema."):
            unknown.append(key)
    if unknown:
        raise WeightsError(f"{source}: {len(unknown)} unrecognised keys ({few(unknown)}); "
                           f"this is not an original Stable Diffusion checkpoint")
    for name, part in parts.items():
        if not part:
            raise WeightsError(f"{source}: no {prefixes[name]}* keys ({name}), first keys: "
                               f"{few(sd)}; expected a full Stable Diffusion checkpoint")
    unet = parts["unet"]
    if use_ema:  # LitEma names each copy after the parameter with its dots removed
        ema = {k: sd.get("model_ema." + ("diffusion_model." + k).replace(".", "")) for k in unet}
        if any(v is None for v in ema.values()):
            raise WeightsError(f"{source}: no EMA weights (model_ema.*) for the UNet; "
                               "load it with use_ema=False")
        unet = ema
    n = sum(k.endswith(".0.op.weight") for k in unet) + 1  # one downsampler between two levels
    L = count(unet, "input_blocks.") // n - 1  # input_blocks hold n * (L + 1) blocks
    up_attention = [f"output_blocks.{i * (L + 1)}.1.proj_in.weight" in unet for i in range(n)]
    vae = parts["vae"]
    vae = _convert(vae, vae_table(count(vae, "encoder.down."), count(vae, "encoder.down.0.block.")),
                   source, "vae")
    vae = {k: v.reshape(v.shape[:2]) if k.endswith(VAE_LINEARS) else v  # 1x1 conv -> Linear
           for k, v in vae.items()}
    text = parts["text_encoder"]
    text = openclip_to_clip(text, source) if openclip else text_model_prefixed(text)
    return {"unet": _convert(unet, unet_table(n, L, up_attention), source, "unet"), "vae": vae,
            "text_encoder": text}


def diffusers_to_original(components: dict, openclip: bool = False) -> dict[str, torch.Tensor]:
    """{"unet", "vae", "text_encoder"} in diffusers naming -> one original single-file state
    dict; openclip=True writes the text encoder in SD 2.x's OpenCLIP layout."""
    unet, vae, text = (components["unet"], components["vae"],
                       text_model_prefixed(components["text_encoder"]))
    n = count(unet, "down_blocks.")
    up_attention = [count(unet, f"up_blocks.{i}.attentions.") > 0 for i in range(n)]
    unet_back = {d: o for o, d in unet_table(n, count(unet, "down_blocks.0.resnets."),
                                             up_attention)}
    vae_back = {d: o for o, d in vae_table(count(vae, "encoder.down_blocks."),
                                           count(vae, "encoder.down_blocks.0.resnets."))}
    out = {}
    for prefix, sd, table in (("model.diffusion_model.", unet, unet_back),
                              ("first_stage_model.", vae, vae_back)):
        for key, tensor in sd.items():
            new = _rename(key, table)
            if new is None:
                raise WeightsError(f"{key}: not a key of a Stable Diffusion v1 UNet or VAE in "
                                   "diffusers naming")
            # Linear [C, C] -> 1x1 conv [C, C, 1, 1]
            conv1x1 = sd is vae and key.endswith(VAE_LINEARS)
            out[prefix + new] = tensor.reshape(*tensor.shape, 1, 1) if conv1x1 else tensor
    if openclip:
        return out | {OPENCLIP_PREFIX + k: v for k, v in clip_to_openclip(text).items()}
    out |= {"cond_stage_model.transformer." + k: v for k, v in text.items()}
    # the published files also carry the text encoder's position_ids buffer, arange(77)
    positions = text["text_model.embeddings.position_embedding.weight"].shape[0]
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = (
        torch.arange(positions)[None])
    return out
