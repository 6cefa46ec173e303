"""The optimisation around the training step (training.py): an EMA of the trained weights, mixed
precision, the micro-batch that gradient accumulation repeats, and the learning-rate schedule.
"""
import math
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn


class EMA:
    """Exponential moving average of the trained parameters (shadow weights, kept in fp32), with the
    warm-up decay min(decay, (1 + step) / (10 + step)) of the LDM code (`LitEma`)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: p.detach().float().clone() for k, p in model.named_parameters()
                       if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int):
        d = min(self.decay, (1 + step) / (10 + step))
        for k, p in model.named_parameters():
            if k in self.shadow:
                self.shadow[k].lerp_(p.float(), 1 - d)  # shadow = d * shadow + (1 - d) * p

    @torch.no_grad()
    def copy_to(self, model: nn.Module):
        for k, p in model.named_parameters():
            if k in self.shadow:
                p.copy_(self.shadow[k])

    @contextmanager
    def applied(self, model: nn.Module):
        """Swap the EMA weights in for the duration of the block (e.g. to sample), then swap
        back."""
        live = {k: p.detach().clone() for k, p in model.named_parameters() if k in self.shadow}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for k, p in model.named_parameters():
                    if k in live:
                        p.copy_(live[k])

    def state_dict(self) -> dict:
        return dict(self.shadow)

    def load_state_dict(self, state: dict):
        if state.keys() != self.shadow.keys():
            raise ValueError(f"EMA weights hold {len(state)} tensors, the model trains "
                             f"{len(self.shadow)}; was the checkpoint written with another "
                             "--train-text-encoder setting?")
        for k, v in state.items():
            self.shadow[k].copy_(v)


def auto_precision(device: torch.device) -> str:
    """train.py's --precision auto: bf16 on GPUs that compute it natively (A100, H100, ...), fp16
    with the gradient scaler on older ones (V100, T4), fp32 elsewhere."""
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


def mixed_precision(precision: str, device: torch.device) -> tuple:
    """--precision -> (what "auto" picks here, the autocast context of the forward passes, the
    gradient scaler: enabled for fp16 only). Weights and optimizer states stay fp32."""
    precision = auto_precision(device) if precision == "auto" else precision
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    return precision, autocast, torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def default_micro_batch(per_process: int, resolution: int) -> int:
    """Images a process forwards at once unless told: the largest divisor of its share of the batch
    up to 8 x (512 / resolution)^2 (the paper's 8 images at 512 per A100, as many pixels at other
    sizes); gradient accumulation makes up the rest."""
    cap = max(1, 8 * 512**2 // resolution**2)
    return max(m for m in range(1, min(per_process, cap) + 1) if per_process % m == 0)


def lr_factor(step: int, warmup: int, max_steps: int, schedule: str) -> float:
    """Multiplier of the base learning rate at (0-based) `step`: linear warm-up over `warmup` steps,
    then constant, or a half cosine down to 0 at `max_steps` (Loshchilov & Hutter 2017, SGDR,
    Eq. 5)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, max_steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
