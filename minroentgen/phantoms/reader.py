"""A small CNN that reads phantom radiographs: which findings, which side, which zone.

It is the project's judge of whether a generated image shows what its prompt asked for, and its
penultimate features (B, 512) give a "phantom FID". Trained on freshly generated phantoms only, half
of them blurred, since generated pictures are often softer than the phantoms:

    python -m minroentgen.phantoms.reader --train            # writes weights/phantom_reader.safetensors
    python -m minroentgen.phantoms.reader --refit-devices    # only the device heads, the rest frozen (how the committed one was updated)
    python -m minroentgen.phantoms.reader --eval --n 1000    # AUROC per finding on fresh held-out phantoms, sharp and blurred

Every input is resampled to 128x128 (area averaging), so one network reads any phantom size.
"""
import argparse
import multiprocessing
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from . import phantom as P
from ..weights import WeightsError, check_state_dict, read_state_dict, written_atomically

SIZE = 128
SEED = 12345  # the training phantoms' data set
WEIGHTS = Path(__file__).resolve().parents[2] / "weights" / "phantom_reader.safetensors"
# Output heads: name -> classes. "present" and "devices" are independent sigmoids, the rest softmaxes
# that are trained and scored only where their finding is present.
HEADS = {"present": list(P.FINDINGS), "effusion_side": ["left", "right", "bilateral"],
         "effusion_size": ["small", "moderate", "large"], "pneumothorax_side": ["left", "right"],
         "pneumothorax_size": ["small", "large"], "consolidation_zone": list(P.ZONES),
         "nodule_zone": list(P.ZONES), "nodule_size": ["small", "large"], "devices": list(P.DEVICES)}
OF = {"effusion_side": ("pleural_effusion", "side"), "effusion_size": ("pleural_effusion", "size"),
      "pneumothorax_side": ("pneumothorax", "side"), "pneumothorax_size": ("pneumothorax", "size"),
      "consolidation_zone": ("consolidation", "zone"), "nodule_zone": ("nodule", "zone"), "nodule_size": ("nodule", "size")}


def conv(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class PhantomReader(nn.Module):
    """A 4x4 patch stem (128 -> 32), three stride-2 stages (-> 4), then a 2x2 average pool that keeps
    left/right and upper/lower apart. About 20 MFLOP an image, so it trains on a laptop CPU."""

    def __init__(self, widths=(16, 32, 64, 128)):
        super().__init__()
        layers = [nn.Conv2d(1, widths[0], 4, 4), nn.ReLU(inplace=True), conv(widths[0], widths[0], 1)]
        for cin, cout in zip(widths[:-1], widths[1:]):
            layers += [conv(cin, cout, 2), conv(cout, cout, 1)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(4 * widths[-1], sum(len(v) for v in HEADS.values()))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) in [0, 1] -> (B, 512) penultimate features."""
        x = F.interpolate(x, size=(SIZE, SIZE), mode="area") if x.shape[-1] != SIZE else x
        x = self.body((x - 0.5) / 0.25)  # (B, 128, 4, 4)
        return F.adaptive_avg_pool2d(x, 2).flatten(1)  # (B, 512)

    def forward(self, x: torch.Tensor) -> dict:
        logits = self.head(self.features(x))  # (B, 30)
        return dict(zip(HEADS, logits.split([len(v) for v in HEADS.values()], dim=1)))


def targets(labels: list) -> dict:
    """Label dicts -> tensors per head (-1 where a softmax head does not apply)."""
    t = {"present": torch.tensor([[float(f in lab) for f in P.FINDINGS] for lab in labels]),
         "devices": torch.tensor([[float(d in lab.get("support_devices", {}).get("devices", [])) for d in P.DEVICES]
                                  for lab in labels])}
    for head, (name, attr) in OF.items():
        t[head] = torch.tensor([HEADS[head].index(lab[name][attr]) if name in lab else -1 for lab in labels])
    return t


def blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur of each image (B, 1, H, W) with its own sigma (B,) in pixels (0 leaves it as is).
    Training on blurred phantoms teaches the reader that softness is not a finding: without it, a
    tube-free phantom blurred by 2 px was read as carrying a tube 8% of the time (17% with a pneumothorax)."""
    k = 2 * int(3 * float(sigma.max()) + 0.5) + 1
    d = torch.arange(k, dtype=x.dtype) - k // 2
    g = torch.exp(-d**2 / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))
    g = (g / g.sum(1, keepdim=True))[:, None]  # (B, 1, k)
    y = F.pad(x.transpose(0, 1), (k // 2,) * 4, mode="replicate")  # (1, B, H + k - 1, W + k - 1): one group per image
    y = F.conv2d(F.conv2d(y, g[..., None], groups=len(x)), g[:, :, None], groups=len(x))
    return y.transpose(0, 1)  # (B, 1, H, W)


def loss_fn(out: dict, t: dict) -> torch.Tensor:
    has_dev = t["present"][:, P.FINDINGS.index("support_devices")] > 0
    loss = F.binary_cross_entropy_with_logits(out["present"], t["present"])
    if has_dev.any():
        loss = loss + F.binary_cross_entropy_with_logits(out["devices"][has_dev], t["devices"][has_dev])
    for head in OF:
        if (t[head] >= 0).any():
            loss = loss + F.cross_entropy(out[head], t[head], ignore_index=-1)
    return loss


def to_tensor(images) -> torch.Tensor:
    """uint8 (B, H, W) -> float (B, 1, H, W) in [0, 1]."""
    return torch.from_numpy(np.asarray(images)).float().div(255).unsqueeze(1)


def _phantom(job):
    seed, k, size, demographics = job
    ph = P.make(seed, k, size, demographics=demographics)
    f = size // SIZE  # sizes here are multiples of 128: average f x f blocks, as the reader's resize does
    img = ph.image.reshape(SIZE, f, SIZE, f).mean((1, 3)).round().astype(np.uint8)
    return img, ph.labels, ph.person


def phantoms(n: int, seed: int, sizes=(SIZE,), workers: int = 2, demographics: bool = False,
             progress: bool = False):
    """n phantoms of data set `seed`, sizes cycling through `sizes`, as 128x128 uint8, labels and
    patients (P.make's person: None unless demographics, see demographic_reader.py)."""
    if any(s % SIZE for s in sizes):
        raise ValueError(f"phantom sizes for the reader must be multiples of {SIZE}, got {sizes}")
    jobs = [(seed, k, sizes[k % len(sizes)], demographics) for k in range(n)]
    with multiprocessing.Pool(workers) as pool:
        res = list(tqdm(pool.imap(_phantom, jobs, chunksize=32), total=n, desc="phantoms", disable=not progress))
    return np.stack([r[0] for r in res]), [r[1] for r in res], [r[2] for r in res]


@torch.no_grad()
def predict(model: PhantomReader, images, batch: int = 256) -> dict:
    """uint8 images (B, H, W) -> probabilities per head."""
    model.eval()
    outs = [model(to_tensor(images[i:i + batch])) for i in range(0, len(images), batch)]
    prob = {h: torch.cat([o[h] for o in outs]).sigmoid() if h in ("present", "devices")
            else torch.cat([o[h] for o in outs]).softmax(1) for h in HEADS}
    prob["present"][:, P.FINDINGS.index("support_devices")] = prob["devices"].amax(1)  # any device read (refit_devices)
    return prob


def auroc(score: np.ndarray, truth: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    pos, neg = score[truth], score[~truth]
    return float(((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean()))


def evaluate(model: PhantomReader, images, labels) -> dict:
    """AUROC per finding; accuracy of each attribute head on the phantoms that have that finding."""
    prob, t = predict(model, images), targets(labels)
    res = {f"auroc/{f}": auroc(prob["present"][:, i].numpy(), t["present"][:, i].numpy() > 0)
           for i, f in enumerate(P.FINDINGS)}
    for head in OF:
        m = t[head] >= 0
        res[f"acc/{head}"] = float((prob[head][m].argmax(1) == t[head][m]).float().mean())
    return res


def train(steps: int = 2500, n: int = 12000, batch: int = 64, seed: int = SEED, out: Path = WEIGHTS):
    """Train on n fresh phantoms (half rendered at 128, half at 256 and downsampled), then refit the device heads."""
    torch.manual_seed(seed)
    t0 = time.time()
    images, labels, _ = phantoms(n, seed, sizes=(SIZE, 256))
    print(f"generated {n} phantoms in {time.time() - t0:.0f} s")
    x, t = to_tensor(images), targets(labels)
    model = PhantomReader()
    g = torch.Generator().manual_seed(seed)
    fit(model, x, t, steps, batch, g, log_every=100)
    refit_devices(model.eval(), x, t["devices"], g)
    save(model, out)
    return model


def fit(model: nn.Module, x: torch.Tensor, t: dict, steps: int, batch: int, g: torch.Generator,
        lr: float = 3e-3, log_every: int = 0, loss_fn=loss_fn) -> nn.Module:
    """AdamW with a one-cycle learning rate on images x (N, 1, 128, 128) and targets t (a dict of
    tensors, first axis N; loss_fn(model(xb), t[idx])), each batch drawn with replacement and
    augmented: exposure jitter, a shift of up to 4 pixels, half blurred."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(len(x), (batch,), generator=g)
        xb = x[idx]
        xb = xb * (0.9 + 0.2 * torch.rand(batch, 1, 1, 1, generator=g))  # exposure jitter
        xb = torch.roll(xb, tuple(torch.randint(-4, 5, (2,), generator=g).tolist()), dims=(2, 3))  # small shift
        sigma = torch.rand(batch, generator=g) * 2.5 * (torch.rand(batch, generator=g) < 0.5)  # half of them blurred
        xb = blur(xb, sigma)
        loss = loss_fn(model(xb), {k: v[idx] for k, v in t.items()})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step} loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
    return model.eval()


def refit_devices(model: PhantomReader, x: torch.Tensor, devices: torch.Tensor, g: torch.Generator,
                  steps: int = 500, verbose: bool = True):
    """Refit the output rows of the device heads on every phantom, with devices or without, the body frozen.

    Trained only where devices are present, they needed the support-devices head to say whether any are,
    and that head missed 17% of phantoms with a tube and a central line (each alone: 0-5%). Refitted, each
    device head reads its device on its own (`predict`), and the features, hence every FID, stay the same."""
    sigma = torch.rand(len(x), generator=g) * 2.5 * (torch.rand(len(x), generator=g) < 0.5)  # half blurred, as in train
    with torch.no_grad():
        f = torch.cat([model.features(blur(x[i:i + 256], sigma[i:i + 256])) for i in range(0, len(x), 256)])  # (n, 512)
    rows = slice(-len(P.DEVICES), None)  # "devices" is the last head
    w, b = (p[rows].detach().clone().requires_grad_() for p in (model.head.weight, model.head.bias))
    opt = torch.optim.Adam([w, b], lr=1e-2)
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(f @ w.T + b, devices)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        model.head.weight[rows], model.head.bias[rows] = w, b
    if verbose:
        print(f"device heads refitted on all {len(x)} phantoms: loss {loss.item():.4f}")


def save(model: nn.Module, path: Path):
    """A reader's weights as safetensors, written atomically (also demographic_reader.py's)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with written_atomically(path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))


def load(path: Path = WEIGHTS, model: nn.Module | None = None, what: str = "phantom reader"):
    """The reader at path into model (default: a PhantomReader), in eval mode; a one-line
    WeightsError for a missing, damaged or foreign file."""
    model = PhantomReader() if model is None else model
    state_dict = read_state_dict(path)
    check_state_dict({k: v.shape for k, v in model.state_dict().items()}, state_dict, f"{path} ({what})")
    model.load_state_dict(state_dict)
    return model.eval()


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m minroentgen.phantoms.reader", description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", action="store_true", help="train on fresh phantoms and save the weights")
    ap.add_argument("--refit-devices", action="store_true", help="refit only the device heads of the saved weights "
                    "on the training phantoms, the rest frozen (train does this last; this updates an older reader)")
    ap.add_argument("--eval", action="store_true", help="score the saved weights on fresh held-out phantoms")
    ap.add_argument("--steps", type=int, default=2500, help="training steps (default 2500)")
    ap.add_argument("--n", type=int, help="phantoms to train on (default 12000) or to evaluate on (default 1000)")
    ap.add_argument("--weights", type=Path, default=WEIGHTS, help="weights file (default "
                    "weights/phantom_reader.safetensors; --train and --refit-devices replace it: give another path "
                    "to keep the committed reader, whose figures the READMEs quote)")
    a = ap.parse_args(argv)
    if not (a.train or a.refit_devices or a.eval):
        ap.error("give --train, --refit-devices and/or --eval")
    for flag, value in (("--steps", a.steps), ("--n", a.n)):
        if value is not None and value < 1:
            ap.error(f"{flag} must be at least 1, got {value}")
    torch.set_num_threads(1)  # small convolutions: one thread is faster than two on a busy CPU
    try:
        run(a)
    except WeightsError as e:
        raise SystemExit(f"{ap.prog}: error: {e}") from None


def run(a):
    if a.train:
        train(a.steps, a.n or 12000, out=a.weights)
    elif a.refit_devices:
        model = load(a.weights)
        images, labels = phantoms(a.n or 12000, SEED, sizes=(SIZE, 256))
        refit_devices(model, to_tensor(images), targets(labels)["devices"], torch.Generator().manual_seed(SEED))
        save(model, a.weights)
    if a.eval:
        model = load(a.weights)
        for size in (SIZE, 256):
            images, labels = phantoms(a.n or 1000, 999_999, sizes=(size,))
            for k, v in evaluate(model, images, labels).items():
                print(f"{size}px {k}: {v:.3f}")
        blurred = blur(to_tensor(images), torch.full((len(images),), 2.0))[:, 0].mul(255).round().to(torch.uint8)
        for k, v in evaluate(model, blurred.numpy(), labels).items():
            print(f"blurred (2 px) {k}: {v:.3f}")


if __name__ == "__main__":
    main()
