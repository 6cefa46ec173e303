"""A training run's folder (--out of train.py and train_vae.py): checkpoints written atomically,
resuming from one, log.jsonl, sample grids, and the diffusers vae/ folder of a trained VAE.
"""
import json
import shutil
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from . import vae
from .configs import VAEConfig
from .optimization import EMA
from .pipeline import StableDiffusion, image_grid, to_grayscale_uint8
from .weights import (DIFFUSERS_VERSION, WeightsError, check_state_dict, read_state_dict,
                      written_atomically)

VAE_WEIGHTS = "diffusion_pytorch_model.safetensors"


def save_vae(folder: Path, model: vae.AutoencoderKL):
    """Write a diffusers `vae/` folder (config.json, diffusion_pytorch_model.safetensors), which
    `load_vae` and `diffusers.AutoencoderKL.from_pretrained` read; built beside `folder` and
    renamed."""
    with written_atomically(folder) as tmp:
        tmp.mkdir(parents=True)
        config = {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION,
                  **model.config.to_dict()}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  str(tmp / VAE_WEIGHTS), metadata={"format": "pt"})


def load_vae(path, device="cpu") -> vae.AutoencoderKL:
    """A diffusers `vae/` folder, or a folder holding one (a diffusers pipeline, train_vae.py's
    --out) -> a frozen AutoencoderKL in eval mode."""
    path = Path(path)
    folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
    if not (folder / "config.json").is_file() or not (folder / VAE_WEIGHTS).is_file():
        raise WeightsError(f"{path}: no vae/config.json and vae/{VAE_WEIGHTS}; give a diffusers "
                           "vae/ folder, a folder holding one, or train_vae.py's --out")
    try:
        config = VAEConfig.from_dict(json.loads((folder / "config.json").read_text()))
    except (ValueError, TypeError) as e:
        raise WeightsError(f"{folder / 'config.json'}: {e}") from None
    model = vae.AutoencoderKL(config)
    state_dict = read_state_dict(folder / VAE_WEIGHTS)
    check_state_dict({k: v.shape for k, v in model.state_dict().items()}, state_dict,
                     folder / VAE_WEIGHTS)
    model.load_state_dict(state_dict)
    return model.to(device).eval().requires_grad_(False)


def checkpoint_path(out: Path, step: int) -> Path:
    return Path(out) / f"checkpoint-{step:06d}"


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted(Path(out).glob("checkpoint-[0-9]*[0-9]")) if Path(out).is_dir() else []
    return found[-1] if found else None


def save_checkpoint(folder: Path, sd: StableDiffusion, ema: EMA | None, state: dict, keep: int = 0):
    """`folder` = what `sd.save_pretrained` writes, a diffusers folder of the trained weights (so
    `sample.py --weights folder` works), plus `ema.safetensors` and `training_state.pt` (step,
    optimizer, scaler). Built under a temporary name and renamed, so a crash never leaves half a
    checkpoint under the real name. Keeps the last `keep` (0: all)."""
    folder = Path(folder)
    # the same step saved again (e.g. after a resume) is replaced
    with written_atomically(folder) as tmp:
        sd.save_pretrained(tmp)
        if ema is not None:
            save_file({k: v.contiguous() for k, v in ema.state_dict().items()},
                      str(tmp / "ema.safetensors"))
        torch.save(state, tmp / "training_state.pt")
    for stale in sorted(folder.parent.glob("checkpoint-[0-9]*[0-9]"))[:-keep] if keep else []:
        shutil.rmtree(stale)


def load_training_state(folder: Path) -> tuple[dict, dict | None]:
    """(training_state.pt as saved, the EMA tensors or None) of a checkpoint folder."""
    folder = Path(folder)
    if not (folder / "training_state.pt").is_file():
        raise WeightsError(f"{folder}: not a checkpoint (no training_state.pt); give a "
                           f"checkpoint-NNNNNN folder that train.py or train_vae.py wrote")
    try:
        state = torch.load(folder / "training_state.pt", map_location="cpu", weights_only=True)
        ema_file = folder / "ema.safetensors"
        return state, load_file(ema_file) if ema_file.is_file() else None
    except Exception as e:
        raise WeightsError(f"{folder}: damaged checkpoint "
                           f"({str(e).strip()[:100] or type(e).__name__}); resume from an earlier "
                           f"checkpoint-NNNNNN folder") from None


def find_resume(out: Path, resume, max_steps: int) -> tuple[Path, dict, dict | None]:
    """The checkpoint `--resume` means (the latest in `out` for resume "latest" or True, else the
    folder given) with its training state and EMA tensors, read once; one-line errors for what
    cannot continue."""
    folder = latest_checkpoint(out) if resume in ("latest", True) else Path(resume)
    if folder is None:
        raise WeightsError(f"--resume: no checkpoint-NNNNNN folder in {out}; "
                           "run without --resume to start")
    state, ema_state = load_training_state(folder)
    if state["step"] > max_steps:
        raise ValueError(f"--resume: {folder} is at step {state['step']}, past --max-steps "
                         f"{max_steps}; give a larger --max-steps")
    return folder, state, ema_state


def load_optimizer(opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, state: dict):
    """A checkpoint's optimizer and scaler states, whatever device and precision wrote them: `fused`
    stays what this run chose for its device (a CPU run's False must not reach a GPU), and a
    checkpoint without scaler state (bf16, fp32) leaves an fp16 run a fresh scaler."""
    saved = state["optimizer"]
    groups = [{**g, "fused": opt.defaults.get("fused")} for g in saved["param_groups"]]
    opt.load_state_dict({**saved, "param_groups": groups})  # state placed as fused needs it
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])


def blown_up(params, step: int, out: Path) -> str | None:
    """Why the weights must not be saved (NaN or infinity in them, e.g. after a last update gone
    wrong), or None."""
    if all(torch.isfinite(p).all() for p in params):
        return None
    return (f"the weights hold NaN or infinity after step {step}; not saved (last good checkpoint: "
            f"{latest_checkpoint(out) or 'none'}); try a lower --lr")


def check_out(out: Path, resume: bool):
    """A new run must not write into an old one's folder: its checkpoints, final weights and log
    would mix."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    found = [p.name for p in (*sorted(out.glob("checkpoint-[0-9]*[0-9]")), out / "final",
                              out / "vae", out / "log.jsonl") if p.exists()] if out.is_dir() else []
    if found and not resume:
        raise ValueError(f"--out {out} already holds a run ({', '.join(found[:3])}); add --resume "
                         f"to continue it, or give a new --out")


def save_grid(images: torch.Tensor, path: Path, cols: int):
    """(B, 3, H, W) in [-1, 1] -> one grayscale PNG, `cols` images a row."""
    sheet = image_grid(to_grayscale_uint8(images), cols)  # (rows*H, cols*W) uint8
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet.numpy()).save(path)


def append_log(path: Path, record: dict):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
