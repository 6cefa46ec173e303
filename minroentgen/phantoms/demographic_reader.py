"""A small CNN that reads a phantom patient's sex and age (demographics.py) off the radiograph.

The judge of demographic fidelity (demographic_fidelity.py), as RoentGen-v2 (arXiv 2508.16783)
checks its samples with classifiers of sex and age. The phantom reader's architecture (reader.py)
with two outputs: the logit of "female" and the age. Its own weights: the phantom reader, judge of
every committed figure, is untouched. Trained on fresh demographic phantoms (with findings, half
rendered at 256 and shrunk), half of them blurred as reader.py does:

    python -m minroentgen.phantoms.demographic_reader --train   # weights/phantom_demographics.safetensors
    python -m minroentgen.phantoms.demographic_reader --eval    # sex accuracy, age error, held out

Race is not read: the phantoms do not show it.
"""
import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import phantom as P
from . import reader as R
from ..weights import WeightsError

SEED, HELDOUT_SEED = 2508, 16_783  # training phantoms; fresh ones for --eval
WEIGHTS = R.WEIGHTS.with_name("phantom_demographics.safetensors")
AGE_MEAN, AGE_SCALE = 55.0, 20.0  # the age output is (age - 55) / 20


class DemographicReader(R.PhantomReader):
    """reader.PhantomReader's body; the head gives (female logit, normalised age)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(self.head.in_features, 2)

    def forward(self, x: torch.Tensor) -> dict:
        out = self.head(self.features(x))  # (B, 2)
        return {"female": out[:, 0], "age": out[:, 1] * AGE_SCALE + AGE_MEAN}


def phantoms(n: int, seed: int, sizes=(R.SIZE,), workers: int = 1, progress: bool = False):
    """n demographic phantoms of data set `seed` at 128 px (sizes cycling, each a multiple of 128),
    as uint8 (n, 128, 128), is-female (n,) bool and ages (n,) int."""
    images, _, people = R.phantoms(n, seed, sizes, workers, demographics=True, progress=progress)
    return images, np.array([p.sex == "female" for p in people]), np.array([p.age for p in people])


@torch.no_grad()
def predict(model: DemographicReader, images, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (B, H, W), any size -> P(female) (B,) and age in years (B,)."""
    model.eval()
    outs = [model(R.to_tensor(images[i:i + batch])) for i in range(0, len(images), batch)]
    return (torch.cat([o["female"] for o in outs]).sigmoid().numpy(),
            torch.cat([o["age"] for o in outs]).numpy())


def scores(p_female: np.ndarray, age: np.ndarray, female: np.ndarray, true_age: np.ndarray) -> dict:
    """Sex accuracy, age mean absolute error and the share of ages within 10 years."""
    err = np.abs(np.asarray(age, float) - np.asarray(true_age, float))
    return {"sex_accuracy": float(((np.asarray(p_female) > 0.5) == np.asarray(female)).mean()),
            "age_mae": float(err.mean()), "age_within_10": float((err <= 10).mean())}


def loss_fn(out: dict, t: dict) -> torch.Tensor:
    """Binary cross-entropy of sex + L1 of the normalised age."""
    return F.binary_cross_entropy_with_logits(out["female"], t["female"]) + \
        F.l1_loss(out["age"] / AGE_SCALE, t["age"] / AGE_SCALE)


def train(steps: int = 3000, n: int = 8000, out: Path = WEIGHTS, workers: int = 1, seed: int = SEED):
    """Train on n fresh demographic phantoms (half at 128, half at 256 shrunk) and save."""
    torch.manual_seed(seed)
    t0 = time.time()
    images, female, age = phantoms(n, seed, sizes=(R.SIZE, 256), workers=workers, progress=True)
    print(f"generated {n} phantoms in {time.time() - t0:.0f} s")
    t = {"female": torch.from_numpy(female).float(), "age": torch.from_numpy(age).float()}
    model = R.fit(DemographicReader(), R.to_tensor(images), t, steps, 64,
                  torch.Generator().manual_seed(seed), log_every=100, loss_fn=loss_fn)
    R.save(model, out)
    print(f"trained in {time.time() - t0:.0f} s: {out}")
    return model


def load(path: Path = WEIGHTS) -> DemographicReader:
    """Raises a one-line WeightsError for a missing, damaged or foreign file."""
    return R.load(path, DemographicReader(), "demographic reader")


def evaluate(model: DemographicReader, n: int = 1000, size: int = R.SIZE, workers: int = 1) -> dict:
    """Scores on n fresh demographic phantoms at `size` px, sharp and blurred by 2 px."""
    images, female, age = phantoms(n, HELDOUT_SEED, sizes=(size,), workers=workers)
    res = {"sharp": scores(*predict(model, images), female, age)}
    blurred = R.blur(R.to_tensor(images), torch.full((n,), 2.0))[:, 0].mul(255).round()
    res["blurred 2 px"] = scores(*predict(model, blurred.to(torch.uint8).numpy()), female, age)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m minroentgen.phantoms.demographic_reader",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", action="store_true", help="train on fresh demographic phantoms and save")
    ap.add_argument("--eval", action="store_true", help="score the saved weights on fresh held-out "
                    "phantoms: sex accuracy, age mean absolute error, ages within 10 years")
    ap.add_argument("--steps", type=int, default=3000, help="training steps of 64 (default 3000)")
    ap.add_argument("--n", type=int, help="phantoms to train on (default 8000) or to evaluate on "
                    "(default 1000)")
    ap.add_argument("--size", type=int, default=R.SIZE, help="with --eval: the phantoms' side, a "
                    "multiple of 128 (default 128, the default model's resolution)")
    ap.add_argument("--workers", type=int, default=1, help="processes rendering phantoms (default 1)")
    ap.add_argument("--weights", type=Path, default=WEIGHTS,
                    help="weights file (default weights/phantom_demographics.safetensors)")
    a = ap.parse_args(argv)
    if not (a.train or a.eval):
        ap.error("give --train and/or --eval")
    for flag, value in (("--steps", a.steps), ("--n", a.n), ("--workers", a.workers)):
        if value is not None and value < 1:
            ap.error(f"{flag} must be at least 1, got {value}")
    if a.size % R.SIZE or not P.MIN_SIZE <= a.size <= P.MAX_SIZE:
        ap.error(f"--size must be 128, 256 or 384 or 512, got {a.size}")
    torch.set_num_threads(1)  # small convolutions: one thread is faster on a busy CPU (reader.py)
    try:
        if a.train:
            train(a.steps, a.n or 8000, a.weights, a.workers)
        if a.eval:
            model = load(a.weights)
            for kind, s in evaluate(model, a.n or 1000, a.size, a.workers).items():
                print(f"{a.size}px {kind}: sex accuracy {s['sex_accuracy']:.3f}, age MAE "
                      f"{s['age_mae']:.1f} years, within 10 years {s['age_within_10']:.3f}")
    except WeightsError as e:
        raise SystemExit(f"{ap.prog}: error: {e}") from None


if __name__ == "__main__":
    main()
