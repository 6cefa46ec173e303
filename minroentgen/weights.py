"""Reading and writing Stable Diffusion weights in both public layouts (see layouts.py).

`load_checkpoint` takes a diffusers folder or an original single file and returns the state dicts
in diffusers naming with the configs (read from the folder, or inferred from the tensors' shapes);
`save_pretrained` writes a diffusers folder, `save_original` a single file, both atomically.
Files are read as tensors only: `.ckpt`/`.bin` go through `torch.load(weights_only=True)`, which
never runs pickled code.
"""
import json
import os
import pickle
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .layouts import (OPENCLIP_PREFIX, WeightsError, count, diffusers_to_original, few,
                      original_to_diffusers, text_model_prefixed)


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
            # a class or function the pickle wants to run
            refused = re.search(r"GLOBAL (\S+)", str(e))
            if refused:  # e.g. old Lightning .ckpt files also pickle their callbacks
                raise WeightsError(f"{path}: loading needs to run pickled code ({refused[1]}), "
                                   "which this loader never does; use the .safetensors release of "
                                   "these weights, or re-save just the state_dict where you trust "
                                   "the file") from None
            raise WeightsError(f"{path}: file is corrupt or not a checkpoint; "
                               "re-download it") from None
        except Exception as e:
            reason = _one_line(e) if str(e).strip() else "unexpected end of file"
            raise WeightsError(f"{path}: file is truncated or not a checkpoint ({reason}); "
                               "re-download it") from None
    else:
        raise WeightsError(f"{path}: unknown extension {path.suffix!r}; "
                           f"expected .safetensors, .ckpt, .bin, .pt or .pth")
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]  # PyTorch Lightning training checkpoints nest the weights
    if not isinstance(sd, dict) or not sd:
        raise WeightsError(f"{path}: not a checkpoint (holds {type(sd).__name__}, "
                           "expected a dict of tensors)")
    not_tensors = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise WeightsError(f"{path}: not a state dict: {len(not_tensors)} entries are not tensors "
                           f"({few(not_tensors)}); save model.state_dict() instead")
    return sd



# --------------------------------------------------------------------------------------------------
# Configs: what the shapes tell, plus SD v1's values for what they cannot (heads, norms, scale).
# --------------------------------------------------------------------------------------------------
SD1_UNET = {"act_fn": "silu", "attention_head_dim": 8, "center_input_sample": False,
            "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0,
            "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
            "sample_size": 64, "upcast_attention": False}
SD1_VAE = {"act_fn": "silu", "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215}
SD1_TEXT = {"hidden_act": "quick_gelu", "layer_norm_eps": 1e-05, "attention_dropout": 0.0,
            "dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02,
            "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}


SD1_WIDTHS = {"unet": [320, 640, 1280, 1280], "vae": [128, 256, 512, 512]}
# what only SD v1's widths let us guess
UNKNOWABLE = {"unet": "attention_head_dim", "vae": "scaling_factor"}


def _unknowable(source: str, what: str) -> WeightsError:
    return WeightsError(f"{source}: {what} cannot be read from the shapes; pass the diffusers "
                        "folder these weights came from as the config "
                        "(sample.py/train.py --config DIR)")


def _not_this(sd: dict, missing: str, what: str) -> WeightsError:
    return WeightsError(f"{what}: no {missing} among its {len(sd)} keys ({few(sd)}); "
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
    n, L = count(sd, "down_blocks."), count(sd, "down_blocks.0.resnets.")
    _shape(sd, "down_blocks.0.resnets.0.conv1.weight", what)
    proj_in = _first(sd, ".proj_in.weight", what)  # the first spatial transformer
    attn = [count(sd, f"down_blocks.{i}.attentions.") > 0 for i in range(n)]
    up_attn = [count(sd, f"up_blocks.{i}.attentions.") > 0 for i in range(n)]
    return {"in_channels": _shape(sd, "conv_in.weight", what)[1],
            "out_channels": _shape(sd, "conv_out.weight", what)[0],
            "block_out_channels": [_shape(sd, f"down_blocks.{i}.resnets.0.conv1.weight", what)[0]
                                   for i in range(n)],
            "layers_per_block": L,
            "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
            "mid_block_type": ("UNetMidBlock2DCrossAttn" if count(sd, "mid_block.attentions.")
                               else "UNetMidBlock2D"),
            "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn],
            "cross_attention_dim": sd[_first(sd, ".attn2.to_k.weight", what)].shape[1],
            "use_linear_projection": sd[proj_in].ndim == 2,  # Linear in SD 2.x, 1x1 conv in SD v1
            "transformer_layers_per_block": count(sd, proj_in.removesuffix("proj_in.weight")
                                                  + "transformer_blocks.")}


def _vae_shapes(sd: dict, what: str) -> dict:
    n = count(sd, "encoder.down_blocks.")
    _shape(sd, "encoder.down_blocks.0.resnets.0.conv1.weight", what)
    return {"in_channels": _shape(sd, "encoder.conv_in.weight", what)[1],
            "out_channels": _shape(sd, "decoder.conv_out.weight", what)[0],
            "latent_channels": _shape(sd, "decoder.conv_in.weight", what)[1],
            "block_out_channels": [
                _shape(sd, f"encoder.down_blocks.{i}.resnets.0.conv1.weight", what)[0]
                for i in range(n)],
            "layers_per_block": count(sd, "encoder.down_blocks.0.resnets."),
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
            "use_quant_conv": "quant_conv.weight" in sd,
            "use_post_quant_conv": "post_quant_conv.weight" in sd,
            "mid_block_add_attention": count(sd, "encoder.mid_block.attentions.") > 0}


def _text_shapes(sd: dict, what: str) -> dict:
    vocab_size, hidden = _shape(sd, "text_model.embeddings.token_embedding.weight", what)
    return {"vocab_size": vocab_size, "hidden_size": hidden,
            "max_position_embeddings": _shape(sd, "text_model.embeddings.position_embedding.weight",
                                              what)[0],
            "num_hidden_layers": count(sd, "text_model.encoder.layers."),
            "intermediate_size": _shape(sd, "text_model.encoder.layers.0.mlp.fc1.weight", what)[0]}


def infer_configs(components: dict, config: dict | None = None,
                  source: str = "checkpoint") -> dict[str, dict]:
    """{"unet", "vae", "text_encoder"} state dicts (diffusers naming) -> config.json dicts.
    `config` ({component: config.json dict}, e.g. a diffusers folder's) replaces SD v1's guesses;
    a value that contradicts the shapes is an error."""
    config = config or {}
    out = {}
    for name, shapes_of, defaults in (("unet", _unet_shapes, SD1_UNET),
                                      ("vae", _vae_shapes, SD1_VAE),
                                      ("text_encoder", _text_shapes, SD1_TEXT)):
        shapes = shapes_of(components[name], f"{source}: {name}")
        given = config.get(name, {})
        if name == "text_encoder":  # the shapes cannot tell the heads; CLIP's are 64 channels wide
            hidden = shapes["hidden_size"]
            if hidden % 64 and "num_attention_heads" not in given:
                raise _unknowable(source, f"the text encoder is {hidden} wide, not a multiple of "
                                          "CLIP's 64-wide attention heads, so its head count")
            defaults = {**defaults, "num_attention_heads": hidden // 64, "projection_dim": hidden}
        elif shapes["block_out_channels"] != SD1_WIDTHS[name] and UNKNOWABLE[name] not in given:
            raise _unknowable(source, f"the {name} is {shapes['block_out_channels']} wide, not "
                                      f"Stable Diffusion v1's {SD1_WIDTHS[name]}, so its "
                                      f"{UNKNOWABLE[name]}")  # SD v1's guess fits SD v1
        for key in shapes.keys() & given.keys():
            said = list(given[key]) if isinstance(given[key], (list, tuple)) else given[key]
            if said != shapes[key]:
                raise WeightsError(f"{source}: {name} config says {key}={given[key]!r} but the "
                                   f"weights have {shapes[key]!r}; "
                                   "use the config that came with these weights")
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
        problems.append(f"{len(missing)} missing keys ({few(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({few(unexpected)})")
    if wrong:
        k = wrong[0]
        problems.append(f"{len(wrong)} of another shape ({k}: file {list(got[k].shape)}, model "
                        f"{list(expected[k])}{', ...' if len(wrong) > 1 else ''})")
    if problems:
        raise WeightsError(f"{source}: {', '.join(problems)}; the file does not fit this model: "
                           f"check the config, or that the file holds this component")


# --------------------------------------------------------------------------------------------------
# Whole checkpoints: a diffusers folder or an original single file.
# --------------------------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    configs: dict[str, dict]  # "unet", "vae", "text_encoder"
                              # (+ "scheduler" when the source has one)
    state_dicts: dict[str, dict]  # "unet", "vae", "text_encoder" in diffusers naming
                                  # (`text_model.*`)
    tokenizer_dir: Path | None  # vocab.json + merges.txt and/or tokenizer.json, when the source
                                # has them
    source: Path


# Full precision first; the *.fp16.* variants (same keys, float16) only when nothing else is there.
WEIGHT_FILES = {"unet": ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                         "diffusion_pytorch_model.fp16.safetensors",
                         "diffusion_pytorch_model.fp16.bin"],
                "text_encoder": ["model.safetensors", "pytorch_model.bin",
                                 "model.fp16.safetensors", "pytorch_model.fp16.bin"]}
WEIGHT_FILES["vae"] = WEIGHT_FILES["unet"]
CONFIG_FILES = {"unet": "unet/config.json", "vae": "vae/config.json",
                "text_encoder": "text_encoder/config.json",
                "scheduler": "scheduler/scheduler_config.json"}
# diffusers < 0.15 named the VAE attention query/key/value/proj_attn (the SD v1.5 repo's files still
# do).
OLD_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _read_configs(folder: Path) -> dict[str, dict]:
    """All four configs of a diffusers folder: without one, the model would be built on guesses."""
    configs = {}
    for name, rel in CONFIG_FILES.items():
        if not (folder / rel).is_file():
            raise WeightsError(f"{folder}: no {rel}; a diffusers folder holds "
                               f"{', '.join(CONFIG_FILES.values())}: copy the missing file from "
                               "where these weights came from")
        try:
            configs[name] = json.loads((folder / rel).read_text())
        except ValueError as e:
            raise WeightsError(f"{folder / rel}: not valid JSON ({_one_line(e)}); "
                               "re-download it") from None
        if not isinstance(configs[name], dict):
            raise WeightsError(f"{folder / rel}: holds a {type(configs[name]).__name__}, not a "
                               "JSON object; re-download it")
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
            raise WeightsError(f"{folder}: no {name}/{files[0]} (nor .bin/.fp16 variants); "
                               "expected a diffusers folder (unet/, vae/, text_encoder/, "
                               "tokenizer/, scheduler/) or a single checkpoint file")
        state_dicts[name] = read_state_dict(found)
    state_dicts["text_encoder"] = text_model_prefixed(state_dicts["text_encoder"])
    state_dicts["vae"] = _modern_vae_names(state_dicts["vae"])
    return state_dicts


def load_checkpoint(path, config_dir=None, use_ema: bool = False) -> Checkpoint:
    """A diffusers folder or an original single file -> Checkpoint in diffusers naming.
    config_dir: a diffusers folder whose configs (and tokenizer) replace what the shapes cannot
    tell."""
    path = Path(path)
    if config_dir is not None and not Path(config_dir).is_dir():
        raise WeightsError(f"{config_dir}: no such folder; config_dir must be a diffusers folder "
                           f"(unet/config.json, ...)")
    if path.is_dir():
        state_dicts, config_dir = _read_folder(path), config_dir or path
    else:
        sd = read_state_dict(path)
        if config_dir is None and any(k.startswith(OPENCLIP_PREFIX) for k in sd):
            raise WeightsError(f"{path}: an SD 2.x single file; whether it predicts noise "
                               "(2.x-base, 512 px) or v (768-v) is not in its weights: pass the "
                               "diffusers folder of the same model as the config (sample.py/"
                               "train.py --config DIR)")
        state_dicts = original_to_diffusers(sd, use_ema=use_ema, source=str(path))
    given = _read_configs(Path(config_dir)) if config_dir is not None else {}
    configs = infer_configs(state_dicts, given, source=str(path))
    if "scheduler" in given:
        configs["scheduler"] = given["scheduler"]
    tokenizer = Path(config_dir) / "tokenizer" if config_dir is not None else None
    # transformers >= 5 writes tokenizer.json only; older versions vocab.json + merges.txt
    if tokenizer is not None and not ((tokenizer / "vocab.json").is_file()
                                      or (tokenizer / "tokenizer.json").is_file()):
        tokenizer = None
    return Checkpoint(configs, state_dicts, tokenizer, path)


# What StableDiffusionPipeline.from_pretrained expects to find; this layout is diffusers 0.42's.
DIFFUSERS_VERSION = "0.42.1"
SD1_TOKENIZER_CONFIG = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
                        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                        "do_lower_case": True, "errors": "replace", "add_prefix_space": False}


def _save_tensors(sd: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata={"format": "pt"})


def _write_json(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextmanager
def written_atomically(path):
    """Yield a temporary path beside `path` to write a file or a folder at; renamed to `path` only
    when the block ends without error (an older `path` is swapped out only then), deleted otherwise.
    So a crash never leaves half a file or folder under the real name."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
        if tmp.is_dir() and path.exists():
            old = path.with_name(f".{path.name}.old{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def save_pretrained(folder, configs: dict, state_dicts: dict, tokenizer, scheduler_config: dict,
                    sampling: dict | None = None) -> Path:
    """Write a diffusers folder that `StableDiffusionPipeline.from_pretrained(folder)` loads.
    `tokenizer`: a tokenizer folder to copy, or an object whose `save(folder)` writes one;
    `sampling`: this package's sampling defaults, kept in `sampling.json` (diffusers ignores it).
    The folder is built beside `folder` and renamed into place: a crash never leaves half of one."""
    folder = Path(folder)
    if "_class_name" not in scheduler_config:
        raise ValueError("scheduler_config needs its _class_name (e.g. 'PNDMScheduler') for "
                         "model_index.json")
    with written_atomically(folder) as tmp:
        for name, cls in (("unet", "UNet2DConditionModel"), ("vae", "AutoencoderKL")):
            config = {"_class_name": cls, "_diffusers_version": DIFFUSERS_VERSION, **configs[name]}
            _write_json(config, tmp / name / "config.json")
            _save_tensors(state_dicts[name], tmp / name / "diffusion_pytorch_model.safetensors")
        _write_json({**configs["text_encoder"], "architectures": ["CLIPTextModel"],
                     "model_type": "clip_text_model"}, tmp / "text_encoder" / "config.json")
        _save_tensors(text_model_prefixed(state_dicts["text_encoder"]),
                      tmp / "text_encoder" / "model.safetensors")
        if hasattr(tokenizer, "save"):
            tokenizer.save(tmp / "tokenizer")
        else:
            shutil.copytree(tokenizer, tmp / "tokenizer")
        # else transformers pads to 1e30 tokens
        if not (tmp / "tokenizer" / "tokenizer_config.json").exists():
            _write_json(SD1_TOKENIZER_CONFIG, tmp / "tokenizer" / "tokenizer_config.json")
        if sampling is not None:
            _write_json(sampling, tmp / "sampling.json")
        _write_json(scheduler_config, tmp / "scheduler" / "scheduler_config.json")
        _write_json({"_class_name": "StableDiffusionPipeline",
                     "_diffusers_version": DIFFUSERS_VERSION,
                     "unet": ["diffusers", "UNet2DConditionModel"],
                     "vae": ["diffusers", "AutoencoderKL"],
                     "text_encoder": ["transformers", "CLIPTextModel"],
                     "tokenizer": ["transformers", "CLIPTokenizer"],
                     "scheduler": ["diffusers", scheduler_config["_class_name"]],
                     "safety_checker": [None, None], "feature_extractor": [None, None],
                     "requires_safety_checker": False}, tmp / "model_index.json")
    return folder


def save_original(path, components: dict, openclip: bool = False) -> Path:
    """Write {"unet", "vae", "text_encoder"} (diffusers naming) as one original-layout
    .safetensors file (openclip=True: SD 2.x's, its text encoder in OpenCLIP's layout)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: save_original writes .safetensors only; name the file "
                         "*.safetensors")
    with written_atomically(path) as tmp:
        _save_tensors(diffusers_to_original(components, openclip), tmp)
    return path
