"""How the public Stable Diffusion weights are named, and how to read and write them.

The same three networks (LDM paper, Rombach et al. 2022, Fig. 3: UNet, VAE, CLIP text encoder)
are published in two layouts:

* the diffusers folder (RoentGen's release format): `unet/`, `vae/`, `text_encoder/`, one state
  dict each whose keys equal this package's module attribute names (`down_blocks.0.resnets.1.conv2`);
* the original CompVis single file (`v1-5-pruned-emaonly.safetensors`, `sd-v1-4.ckpt`): one state
  dict with the UNet under `model.diffusion_model.`, the VAE under `first_stage_model.` and the text
  encoder under `cond_stage_model.transformer.`, named after the LDM code (`input_blocks.4.0.in_layers.2`).

`unet_table` and `vae_table` line the two namings up, block by block. Files are read as tensors
only: `.ckpt`/`.bin` go through `torch.load(weights_only=True)`, which never runs pickled code.
"""
import json
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class WeightsError(ValueError):
    """A checkpoint that cannot be used. The message is one line: the file, what is wrong, the fix."""


def _one_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """One checkpoint file -> {key: tensor} (a top-level "state_dict" is unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file; check the path")
    if path.stat().st_size == 0:
        raise WeightsError(f"{path}: file is empty (0 bytes); re-download it")
    if path.suffix == ".safetensors":
        try:
            sd = load_file(path)
        except Exception as e:
            raise WeightsError(f"{path}: file is truncated or not a checkpoint (safetensors header "
                               f"unreadable: {_one_line(e)}); re-download it") from None
    elif path.suffix in (".ckpt", ".bin", ".pt", ".pth"):
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            refused = re.search(r"GLOBAL (\S+)", str(e))  # a class or function the pickle wants to run
            if refused:  # e.g. old Lightning .ckpt files also pickle their callbacks
                raise WeightsError(f"{path}: loading needs to run pickled code ({refused[1]}), which this loader "
                                   f"never does; use the .safetensors release of these weights, or re-save just "
                                   f"the state_dict where you trust the file") from None
            raise WeightsError(f"{path}: file is corrupt or not a checkpoint; re-download it") from None
        except Exception as e:
            reason = _one_line(e) if str(e).strip() else "unexpected end of file"
            raise WeightsError(f"{path}: file is truncated or not a checkpoint ({reason}); re-download it") from None
    else:
        raise WeightsError(f"{path}: unknown extension {path.suffix!r}; "
                           f"expected .safetensors, .ckpt, .bin, .pt or .pth")
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]  # PyTorch Lightning training checkpoints nest the weights
    if not isinstance(sd, dict) or not sd:
        raise WeightsError(f"{path}: not a checkpoint (holds {type(sd).__name__}, expected a dict of tensors)")
    not_tensors = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise WeightsError(f"{path}: not a state dict: {len(not_tensors)} entries are not tensors "
                           f"({_few(not_tensors)}); save model.state_dict() instead")
    return sd


def _few(keys, n=3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


# ---------------------------------------------------------------------------------------------------
# The rename tables: (original prefix, diffusers prefix) pairs; a key is renamed by its longest
# matching prefix, the rest of the key is the same in both layouts.
# ---------------------------------------------------------------------------------------------------

# LDM ResBlock = in_layers [GroupNorm, SiLU, Conv3x3], emb_layers [SiLU, Linear],
# out_layers [GroupNorm, SiLU, Dropout, Conv3x3], skip_connection (1x1 conv when channels change).
UNET_RESNET = [("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
               ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut.")]
# The VAE ResnetBlock already says norm1/conv1/norm2/conv2; only the shortcut differs.
VAE_RESNET = [("", ""), ("nin_shortcut.", "conv_shortcut.")]
# VAE mid-block attention: 1x1 convs [C, C, 1, 1] in the original, Linear [C, C] in diffusers.
VAE_ATTENTION = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."),
                 ("proj_out.", "to_out.0.")]


def _nest(original: str, diffusers: str, inner) -> list[tuple[str, str]]:
    return [(original + a, diffusers + b) for a, b in inner]


def unet_table(n_blocks: int, layers_per_block: int, up_attention: list[bool]) -> list[tuple[str, str]]:
    """UNet, LDM `openaimodel.UNetModel` -> diffusers `UNet2DConditionModel` (without `model.diffusion_model.`).

    The original numbers its blocks in two flat lists: `input_blocks` = [conv_in] then, per level,
    `layers_per_block` x [ResBlock, SpatialTransformer] and a downsampler (not after the last level);
    `output_blocks` = per level, `layers_per_block + 1` x [ResBlock, SpatialTransformer] with the
    upsampler after the last one. Inside a block, `.0` is the ResBlock, `.1` the transformer (if any)."""
    L = layers_per_block
    table = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
             ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out.")]
    for i in range(n_blocks):
        for j in range(L):
            k = 1 + i * (L + 1) + j
            table += _nest(f"input_blocks.{k}.0.", f"down_blocks.{i}.resnets.{j}.", UNET_RESNET)
            table.append((f"input_blocks.{k}.1.", f"down_blocks.{i}.attentions.{j}."))
        if i < n_blocks - 1:  # the downsampler is a block of its own: a stride-2 conv named `op`
            table.append((f"input_blocks.{(i + 1) * (L + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
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
        table += [(f"{part}.conv_in.", f"{part}.conv_in."), (f"{part}.norm_out.", f"{part}.conv_norm_out."),
                  (f"{part}.conv_out.", f"{part}.conv_out.")]
        table += _nest(f"{part}.mid.block_1.", f"{part}.mid_block.resnets.0.", VAE_RESNET)
        table += _nest(f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0.", VAE_ATTENTION)
        table += _nest(f"{part}.mid.block_2.", f"{part}.mid_block.resnets.1.", VAE_RESNET)
    for i in range(n_blocks):
        for j in range(layers_per_block):
            table += _nest(f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.", VAE_RESNET)
        if i < n_blocks - 1:
            table.append((f"encoder.down.{i}.downsample.conv.", f"encoder.down_blocks.{i}.downsamplers.0.conv."))
    for i in range(n_blocks):
        r = n_blocks - 1 - i
        for j in range(layers_per_block + 1):
            table += _nest(f"decoder.up.{r}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.", VAE_RESNET)
        if i < n_blocks - 1:
            table.append((f"decoder.up.{r}.upsample.conv.", f"decoder.up_blocks.{i}.upsamplers.0.conv."))
    return table


# Where each network lives in the single file. The text encoder is a transformers CLIPTextModel
# state dict either way (`text_model.*`); very old files lack the `text_model.` level.
PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
            "text_encoder": "cond_stage_model.transformer."}
# Tensors the single file may carry that inference never needs: the DDPM schedule of LDM's
# `register_schedule` (recomputed by schedulers.py), LitEma's counters and EMA copies, `logvar`.
SKIPPED = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
           "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
           "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
           "logvar"}
VAE_LINEARS = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")


def _rename(key: str, table: dict[str, str]):
    """Longest prefix of `key` (cut at a dot) found in `table`, swapped for its partner; None if none."""
    i = len(key)
    while (i := key.rfind(".", 0, i)) > 0:
        if key[:i + 1] in table:
            return table[key[:i + 1]] + key[i + 1:]
    return None


def _count(keys, prefix: str) -> int:
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
        raise WeightsError(f"{source}: {len(unknown)} unrecognised keys ({_few(unknown)}); "
                           f"this is not a Stable Diffusion v1 {what}")
    return out


def _text_model_prefixed(sd: dict) -> dict:
    """transformers >= 5.6 saves CLIPTextModel without the `text_model.` level; the published files have it."""
    return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()
            if not k.endswith("position_ids")}  # a buffer (arange), never a weight: its values are not used


def original_to_diffusers(sd: dict[str, torch.Tensor], use_ema: bool = False, source: str = "checkpoint") -> dict:
    """Original single-file state dict -> {"unet": sd, "vae": sd, "text_encoder": sd} in diffusers naming.
    use_ema=True takes the UNet from the `model_ema.*` copies of a training checkpoint."""
    if any(k.startswith("cond_stage_model.model.") for k in sd):
        raise WeightsError(f"{source}: SD 2.x single files (OpenCLIP text encoder) are not supported yet; "
                           f"use a diffusers folder")
    parts = {name: {} for name in PREFIXES}
    unknown = []
    for key, tensor in sd.items():
        name = next((n for n, p in PREFIXES.items() if key.startswith(p)), None)
        if name is not None:
            parts[name][key[len(PREFIXES[name]):]] = tensor
        elif key not in SKIPPED and not key.startswith("model_ema."):
            unknown.append(key)
    if unknown:
        raise WeightsError(f"{source}: {len(unknown)} unrecognised keys ({_few(unknown)}); "
                           f"this is not an original Stable Diffusion v1 checkpoint")
    for name, part in parts.items():
        if not part:
            raise WeightsError(f"{source}: no {PREFIXES[name]}* keys ({name}), first keys: {_few(sd)}; "
                               f"expected a full Stable Diffusion v1 checkpoint")
    unet = parts["unet"]
    if use_ema:  # LitEma names each copy after the parameter with its dots removed
        ema = {k: sd.get("model_ema." + ("diffusion_model." + k).replace(".", "")) for k in unet}
        if any(v is None for v in ema.values()):
            raise WeightsError(f"{source}: no EMA weights (model_ema.*) for the UNet; load it with use_ema=False")
        unet = ema
    n = sum(k.endswith(".0.op.weight") for k in unet) + 1  # one downsampler between two levels
    L = _count(unet, "input_blocks.") // n - 1  # input_blocks hold n * (L + 1) blocks
    up_attention = [f"output_blocks.{i * (L + 1)}.1.proj_in.weight" in unet for i in range(n)]
    vae = parts["vae"]
    vae = _convert(vae, vae_table(_count(vae, "encoder.down."), _count(vae, "encoder.down.0.block.")), source, "vae")
    vae = {k: v.reshape(v.shape[:2]) if k.endswith(VAE_LINEARS) else v for k, v in vae.items()}  # 1x1 conv -> Linear
    return {"unet": _convert(unet, unet_table(n, L, up_attention), source, "unet"), "vae": vae,
            "text_encoder": _text_model_prefixed(parts["text_encoder"])}


def diffusers_to_original(components: dict) -> dict[str, torch.Tensor]:
    """{"unet", "vae", "text_encoder"} in diffusers naming -> one original single-file state dict."""
    unet, vae, text = components["unet"], components["vae"], _text_model_prefixed(components["text_encoder"])
    n = _count(unet, "down_blocks.")
    up_attention = [_count(unet, f"up_blocks.{i}.attentions.") > 0 for i in range(n)]
    unet_back = {d: o for o, d in unet_table(n, _count(unet, "down_blocks.0.resnets."), up_attention)}
    vae_back = {d: o for o, d in vae_table(_count(vae, "encoder.down_blocks."),
                                           _count(vae, "encoder.down_blocks.0.resnets."))}
    out = {}
    for prefix, sd, table in (("model.diffusion_model.", unet, unet_back), ("first_stage_model.", vae, vae_back)):
        for key, tensor in sd.items():
            new = _rename(key, table)
            if new is None:
                raise WeightsError(f"{key}: not a key of a Stable Diffusion v1 UNet or VAE in diffusers naming")
            conv1x1 = sd is vae and key.endswith(VAE_LINEARS)  # Linear [C, C] -> 1x1 conv [C, C, 1, 1]
            out[prefix + new] = tensor.reshape(*tensor.shape, 1, 1) if conv1x1 else tensor
    out |= {"cond_stage_model.transformer." + k: v for k, v in text.items()}
    # the published files also carry the text encoder's position_ids buffer, arange(77)
    positions = text["text_model.embeddings.position_embedding.weight"].shape[0]
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(positions)[None]
    return out


# ---------------------------------------------------------------------------------------------------
# Configs: what the shapes tell, plus SD v1's values for what they cannot (heads, norms, scale).
# ---------------------------------------------------------------------------------------------------
SD1_UNET = {"act_fn": "silu", "attention_head_dim": 8, "center_input_sample": False, "downsample_padding": 1,
            "flip_sin_to_cos": True, "freq_shift": 0, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
            "norm_num_groups": 32, "sample_size": 64, "upcast_attention": False}
SD1_VAE = {"act_fn": "silu", "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215}
SD1_TEXT = {"hidden_act": "quick_gelu", "layer_norm_eps": 1e-05, "attention_dropout": 0.0, "dropout": 0.0,
            "initializer_factor": 1.0, "initializer_range": 0.02,
            "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}


def _not_this(sd: dict, missing: str, what: str) -> WeightsError:
    return WeightsError(f"{what}: no {missing} among its {len(sd)} keys ({_few(sd)}); "
                        f"these are not the weights of a Stable Diffusion {what.split(': ')[-1]}")


def _shape(sd: dict, key: str, what: str) -> tuple:
    if key not in sd:
        raise _not_this(sd, key, what)
    return tuple(sd[key].shape)


def _first(sd: dict, suffix: str, what: str) -> str:
    for key in sorted(sd):
        if key.endswith(suffix):
            return key
    raise _not_this(sd, "*" + suffix, what)


def _unet_shapes(sd: dict, what: str) -> dict:
    n, L = _count(sd, "down_blocks."), _count(sd, "down_blocks.0.resnets.")
    _shape(sd, "down_blocks.0.resnets.0.conv1.weight", what)
    proj_in = _first(sd, ".proj_in.weight", what)  # the first spatial transformer
    attn = [_count(sd, f"down_blocks.{i}.attentions.") > 0 for i in range(n)]
    up_attn = [_count(sd, f"up_blocks.{i}.attentions.") > 0 for i in range(n)]
    return {"in_channels": _shape(sd, "conv_in.weight", what)[1],
            "out_channels": _shape(sd, "conv_out.weight", what)[0],
            "block_out_channels": [_shape(sd, f"down_blocks.{i}.resnets.0.conv1.weight", what)[0] for i in range(n)],
            "layers_per_block": L,
            "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
            "mid_block_type": "UNetMidBlock2DCrossAttn" if _count(sd, "mid_block.attentions.") else "UNetMidBlock2D",
            "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn],
            "cross_attention_dim": sd[_first(sd, ".attn2.to_k.weight", what)].shape[1],
            "use_linear_projection": sd[proj_in].ndim == 2,  # Linear in SD 2.x, 1x1 conv in SD v1
            "transformer_layers_per_block": _count(sd, proj_in.removesuffix("proj_in.weight") + "transformer_blocks.")}


def _vae_shapes(sd: dict, what: str) -> dict:
    n = _count(sd, "encoder.down_blocks.")
    _shape(sd, "encoder.down_blocks.0.resnets.0.conv1.weight", what)
    return {"in_channels": _shape(sd, "encoder.conv_in.weight", what)[1],
            "out_channels": _shape(sd, "decoder.conv_out.weight", what)[0],
            "latent_channels": _shape(sd, "decoder.conv_in.weight", what)[1],
            "block_out_channels": [_shape(sd, f"encoder.down_blocks.{i}.resnets.0.conv1.weight", what)[0]
                                   for i in range(n)],
            "layers_per_block": _count(sd, "encoder.down_blocks.0.resnets."),
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "use_quant_conv": "quant_conv.weight" in sd, "use_post_quant_conv": "post_quant_conv.weight" in sd,
            "mid_block_add_attention": _count(sd, "encoder.mid_block.attentions.") > 0}


def _text_shapes(sd: dict, what: str) -> dict:
    vocab_size, hidden = _shape(sd, "text_model.embeddings.token_embedding.weight", what)
    return {"vocab_size": vocab_size, "hidden_size": hidden,
            "max_position_embeddings": _shape(sd, "text_model.embeddings.position_embedding.weight", what)[0],
            "num_hidden_layers": _count(sd, "text_model.encoder.layers."),
            "intermediate_size": _shape(sd, "text_model.encoder.layers.0.mlp.fc1.weight", what)[0]}


def infer_configs(components: dict, config: dict | None = None, source: str = "checkpoint") -> dict[str, dict]:
    """{"unet", "vae", "text_encoder"} state dicts (diffusers naming) -> config.json dicts.
    `config` ({component: config.json dict}, e.g. a diffusers folder's) replaces SD v1's guesses;
    a value that contradicts the shapes is an error."""
    config = config or {}
    out = {}
    for name, shapes_of, defaults in (("unet", _unet_shapes, SD1_UNET), ("vae", _vae_shapes, SD1_VAE),
                                      ("text_encoder", _text_shapes, SD1_TEXT)):
        shapes = shapes_of(components[name], f"{source}: {name}")
        given = config.get(name, {})
        if name == "text_encoder":  # the shapes cannot tell the heads; CLIP's are 64 channels wide
            hidden = shapes["hidden_size"]
            if hidden % 64 and "num_attention_heads" not in given:
                raise WeightsError(f"{source}: the text encoder is {hidden} wide, not a multiple of CLIP's 64-wide "
                                   f"attention heads, so its head count cannot be read from the shapes; pass the "
                                   f"diffusers folder these weights came from as the config (sample.py --config DIR)")
            defaults = {**defaults, "num_attention_heads": hidden // 64, "projection_dim": hidden}
        for key in shapes.keys() & given.keys():
            said = list(given[key]) if isinstance(given[key], (list, tuple)) else given[key]
            if said != shapes[key]:
                raise WeightsError(f"{source}: {name} config says {key}={given[key]!r} but the weights have "
                                   f"{shapes[key]!r}; use the config that came with these weights")
        out[name] = {**defaults, **shapes, **given}
    return out


def check_state_dict(expected: dict, got: dict, source) -> None:
    """Raise a one-line WeightsError unless `got` has exactly the keys and shapes of `expected`
    ({key: shape}, e.g. `{k: v.shape for k, v in model.state_dict().items()}`)."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    wrong = [k for k in expected if k in got and tuple(got[k].shape) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({_few(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({_few(unexpected)})")
    if wrong:
        k = wrong[0]
        problems.append(f"{len(wrong)} of another shape ({k}: file {list(got[k].shape)}, model {list(expected[k])}"
                        f"{', ...' if len(wrong) > 1 else ''})")
    if problems:
        raise WeightsError(f"{source}: {', '.join(problems)}; the file does not fit this model: "
                           f"check the config, or that the file holds this component")


# ---------------------------------------------------------------------------------------------------
# Whole checkpoints: a diffusers folder or an original single file.
# ---------------------------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    configs: dict[str, dict]  # "unet", "vae", "text_encoder" (+ "scheduler" when the source has one)
    state_dicts: dict[str, dict]  # "unet", "vae", "text_encoder" in diffusers naming (`text_model.*`)
    tokenizer_dir: Path | None  # vocab.json + merges.txt and/or tokenizer.json, when the source has them
    source: Path


# Full precision first; the *.fp16.* variants (same keys, float16) only when nothing else is there.
WEIGHT_FILES = {"unet": ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                         "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin"],
                "text_encoder": ["model.safetensors", "pytorch_model.bin",
                                 "model.fp16.safetensors", "pytorch_model.fp16.bin"]}
WEIGHT_FILES["vae"] = WEIGHT_FILES["unet"]
CONFIG_FILES = {"unet": "unet/config.json", "vae": "vae/config.json", "text_encoder": "text_encoder/config.json",
                "scheduler": "scheduler/scheduler_config.json"}
# diffusers < 0.15 named the VAE attention query/key/value/proj_attn (the SD v1.5 repo's files still do).
OLD_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _read_configs(folder: Path) -> dict[str, dict]:
    configs = {}
    for name, rel in CONFIG_FILES.items():
        if (folder / rel).is_file():
            try:
                configs[name] = json.loads((folder / rel).read_text())
            except ValueError as e:
                raise WeightsError(f"{folder / rel}: not valid JSON ({_one_line(e)}); re-download it") from None
    return configs


def _modern_vae_names(sd: dict) -> dict:
    out = {}
    for key, tensor in sd.items():
        head, _, leaf = key.rpartition(".")
        parent, _, name = head.rpartition(".")
        if ".attentions." in key and name in OLD_VAE_ATTENTION:
            key = f"{parent}.{OLD_VAE_ATTENTION[name]}.{leaf}"
        out[key] = tensor
    return out


def _read_folder(folder: Path) -> dict[str, dict]:
    state_dicts = {}
    for name, files in WEIGHT_FILES.items():
        found = next((folder / name / f for f in files if (folder / name / f).is_file()), None)
        if found is None:
            raise WeightsError(f"{folder}: no {name}/{files[0]} (nor .bin/.fp16 variants); expected a diffusers folder "
                               f"(unet/, vae/, text_encoder/, tokenizer/, scheduler/) or a single checkpoint file")
        state_dicts[name] = read_state_dict(found)
    state_dicts["text_encoder"] = _text_model_prefixed(state_dicts["text_encoder"])
    state_dicts["vae"] = _modern_vae_names(state_dicts["vae"])
    return state_dicts


def load_checkpoint(path, config_dir=None, use_ema: bool = False) -> Checkpoint:
    """A diffusers folder or an original single file -> Checkpoint in diffusers naming.
    config_dir: a diffusers folder whose configs (and tokenizer) replace what the shapes cannot tell."""
    path = Path(path)
    if config_dir is not None and not Path(config_dir).is_dir():
        raise WeightsError(f"{config_dir}: no such folder; config_dir must be a diffusers folder "
                           f"(unet/config.json, ...)")
    if path.is_dir():
        state_dicts, config_dir = _read_folder(path), config_dir or path
    else:
        state_dicts = original_to_diffusers(read_state_dict(path), use_ema=use_ema, source=str(path))
    given = _read_configs(Path(config_dir)) if config_dir is not None else {}
    configs = infer_configs(state_dicts, given, source=str(path))
    if "scheduler" in given:
        configs["scheduler"] = given["scheduler"]
    tokenizer = Path(config_dir) / "tokenizer" if config_dir is not None else None
    if tokenizer is not None and not ((tokenizer / "vocab.json").is_file() or (tokenizer / "tokenizer.json").is_file()):
        tokenizer = None  # transformers >= 5 writes tokenizer.json only; older versions vocab.json + merges.txt
    return Checkpoint(configs, state_dicts, tokenizer, path)


# What StableDiffusionPipeline.from_pretrained expects to find; this layout is diffusers 0.42's.
DIFFUSERS_VERSION = "0.42.1"
SD1_TOKENIZER_CONFIG = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
                        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                        "do_lower_case": True, "errors": "replace", "add_prefix_space": False}


def _save_tensors(sd: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata={"format": "pt"})


def _write_json(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def move_into_place(tmp: Path, folder: Path):
    """Rename the complete folder `tmp` to `folder`; an older `folder` is swapped out only then."""
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old{os.getpid()}")
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old)
    else:
        tmp.rename(folder)


def save_pretrained(folder, configs: dict, state_dicts: dict, tokenizer, scheduler_config: dict,
                    sampling: dict | None = None) -> Path:
    """Write a diffusers folder that `StableDiffusionPipeline.from_pretrained(folder)` loads.
    `tokenizer`: a tokenizer folder to copy, or an object whose `save(folder)` writes one;
    `sampling`: this package's sampling defaults, kept in `sampling.json` (diffusers ignores it).
    The folder is built beside `folder` and renamed into place: a crash never leaves half of one."""
    folder = Path(folder)
    if "_class_name" not in scheduler_config:
        raise ValueError("scheduler_config needs its _class_name (e.g. 'PNDMScheduler') for model_index.json")
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for name, cls in (("unet", "UNet2DConditionModel"), ("vae", "AutoencoderKL")):
            config = {"_class_name": cls, "_diffusers_version": DIFFUSERS_VERSION, **configs[name]}
            _write_json(config, tmp / name / "config.json")
            _save_tensors(state_dicts[name], tmp / name / "diffusion_pytorch_model.safetensors")
        _write_json({**configs["text_encoder"], "architectures": ["CLIPTextModel"], "model_type": "clip_text_model"},
                    tmp / "text_encoder" / "config.json")
        _save_tensors(_text_model_prefixed(state_dicts["text_encoder"]), tmp / "text_encoder" / "model.safetensors")
        if hasattr(tokenizer, "save"):
            tokenizer.save(tmp / "tokenizer")
        else:
            shutil.copytree(tokenizer, tmp / "tokenizer")
        if not (tmp / "tokenizer" / "tokenizer_config.json").exists():  # else transformers pads to 1e30 tokens
            _write_json(SD1_TOKENIZER_CONFIG, tmp / "tokenizer" / "tokenizer_config.json")
        if sampling is not None:
            _write_json(sampling, tmp / "sampling.json")
        _write_json(scheduler_config, tmp / "scheduler" / "scheduler_config.json")
        _write_json({"_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
                     "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                     "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                     "scheduler": ["diffusers", scheduler_config["_class_name"]],
                     "safety_checker": [None, None], "feature_extractor": [None, None],
                     "requires_safety_checker": False}, tmp / "model_index.json")
        move_into_place(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def save_original(path, components: dict) -> Path:
    """Write {"unet", "vae", "text_encoder"} (diffusers naming) as one original-layout .safetensors file."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: save_original writes .safetensors only; name the file *.safetensors")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        _save_tensors(diffusers_to_original(components), tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
