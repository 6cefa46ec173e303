"""RoentGen's claim 3: fine-tuning teaches the text encoder radiology (a linear probe).

RoentGen's abstract: after fine-tuning, the text encoder's representation of "certain diseases like
pneumothorax" improved by 25% (the metric is not stated). Here: a linear probe (logistic regression)
on each text encoder's output for phantom reports -> their findings, fitted on --train reports and
scored on --test others (AUROC per finding; accuracy of the side of an effusion and of a pneumothorax),
for the encoders compared: a random one of the same shape (the floor), the embedded default's, and
those of the models experiments/finetune_parts.py fine-tuned with and without --train-text-encoder.

    python experiments/text_probe.py --encoders default=weights/default both=exp/parts/both/final
    python experiments/text_probe.py --style clinical --encoders ...     # reports in the shifted style

The feature of a report is the mean of the encoder's last hidden states (what the UNet attends to)
over its tokens up to the end token. Writes OUT/text_probe_<style>.json and .md.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from minroentgen.clip import CLIPTextModel
from minroentgen.phantoms import phantom as P
from minroentgen.phantoms import reader as R
from minroentgen.phantoms import reports as PR
from minroentgen.pipeline import StableDiffusion
from minroentgen.weights import WeightsError
from chart import chart

TRAIN_SEED, TEST_SEED = 5_151, 6_161  # report streams
SIDES = {"effusion_side": ("pleural_effusion", ["left", "right"]), "pneumothorax_side": ("pneumothorax", ["left", "right"])}


def reports(n: int, seed: int, style: str) -> tuple:
    """n (report, labels) of the phantoms' label distribution, in the writer's `style`."""
    rng = np.random.default_rng(seed)
    labels = [P.sample_labels(rng) for _ in range(n)]
    return [PR.write_report(lab, rng, style=style) for lab in labels], labels


@torch.no_grad()
def features(encoder, tokenizer, texts: list, batch: int = 128) -> torch.Tensor:
    """Mean last hidden state over each report's tokens, start to end token: (N, D)."""
    out = []
    for i in range(0, len(texts), batch):
        ids = tokenizer(texts[i:i + batch])  # (B, 77)
        h = encoder(ids).float()  # (B, 77, D)
        first_end = (ids == tokenizer.eos_id).int().argmax(1)  # (B,)
        mask = (torch.arange(ids.shape[1])[None] <= first_end[:, None]).float()  # (B, 77)
        out.append((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))
    return torch.cat(out)


def probe(x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, steps: int = 300, l2: float = 1e-3):
    """Logistic regression (L-BFGS, L2) on standardised features; returns test scores."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x, x_test = (x - mu) / sd, (x_test - mu) / sd
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w + b, y) + l2 * w.square().sum()
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        return (x_test @ w + b).numpy()


def scores(feat: torch.Tensor, labels: list, feat_test: torch.Tensor, labels_test: list) -> dict:
    """AUROC per finding; side accuracy (left vs right) among the reports that have the finding."""
    res = {}
    for f in P.FINDINGS:
        y, y_test = (torch.tensor([float(f in lab) for lab in ls]) for ls in (labels, labels_test))
        res[f] = R.auroc(probe(feat, y, feat_test), y_test.numpy() > 0)
    for name, (f, sides) in SIDES.items():
        keep = [i for i, lab in enumerate(labels) if lab.get(f, {}).get("side") in sides]
        keep_t = [i for i, lab in enumerate(labels_test) if lab.get(f, {}).get("side") in sides]
        y = torch.tensor([float(labels[i][f]["side"] == "left") for i in keep])
        y_test = np.array([labels_test[i][f]["side"] == "left" for i in keep_t])
        res[name] = float(((probe(feat[keep], y, feat_test[keep_t]) > 0) == y_test).mean())
    return res


def plot(results: dict, path: Path, style: str):
    """Mean AUROC, the two hardest findings and both side accuracies, per encoder."""
    names = list(results)
    series = [("mean AUROC", lambda r: np.mean([r[f] for f in P.FINDINGS])), ("nodule", lambda r: r["nodule"]),
              ("pneumothorax", lambda r: r["pneumothorax"]), ("eff. side", lambda r: r["effusion_side"]),
              ("PTX side", lambda r: r["pneumothorax_side"])]
    chart(path, [{"title": f"linear probe on {style} reports", "x_label": "text encoder", "x_names": names,
                  "series": [{"name": n, "x": list(range(len(names))), "y": [float(f(results[k])) for k in names]}
                             for n, f in series]}])


def load(path) -> StableDiffusion:
    try:
        return StableDiffusion.from_pretrained(path)
    except (WeightsError, OSError) as e:
        sys.exit(f"{Path(sys.argv[0]).name}: error: {e}")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="experiments/text_probe.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoders", nargs="+", required=True, metavar="NAME=WEIGHTS",
                    help="text encoders to probe: a name and a model folder (its text_encoder/ and tokenizer/)")
    ap.add_argument("--style", default="classic", choices=["classic", "clinical", "mixed"],
                    help="the report writer's style (default classic)")
    ap.add_argument("--train", type=int, default=2000, help="reports the probe is fitted on (default 2000)")
    ap.add_argument("--test", type=int, default=2000, help="reports it is scored on (default 2000)")
    ap.add_argument("--out", type=Path, default=Path("docs/experiments"), help="output folder")
    a = ap.parse_args(argv)
    t0 = time.time()
    texts, labels = reports(a.train, TRAIN_SEED, a.style)
    texts_t, labels_t = reports(a.test, TEST_SEED, a.style)
    specs = [spec.split("=", 1) if "=" in spec else ap.error(f"--encoders {spec!r}: give NAME=WEIGHTS")
             for spec in a.encoders]
    models = [(name, sd.text_encoder, sd.tokenizer) for name, sd in ((n, load(p)) for n, p in specs)]
    torch.manual_seed(0)  # the floor: a random encoder of the first one's shape
    models.insert(0, ("random", CLIPTextModel(models[0][1].config).eval(), models[0][2]))
    results = {}
    for name, enc, tokenizer in models:
        results[name] = scores(features(enc, tokenizer, texts), labels, features(enc, tokenizer, texts_t), labels_t)
        print(name, {k: round(v, 3) for k, v in results[name].items()}, f"({time.time() - t0:.0f} s)", flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    meta = {**{k: str(v) for k, v in vars(a).items()}, "seconds": round(time.time() - t0)}
    (a.out / f"text_probe_{a.style}.json").write_text(json.dumps({"settings": meta, "results": results}, indent=1))
    cols = list(P.FINDINGS) + list(SIDES)
    lines = ["| text encoder | mean AUROC | " + " | ".join(c.replace("_", " ") for c in cols) + " |",
             "|" + " --- |" * (len(cols) + 2)]
    for name, r in results.items():
        lines.append(f"| {name} | {np.mean([r[f] for f in P.FINDINGS]):.3f} | "
                     + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")
    (a.out / f"text_probe_{a.style}.md").write_text("\n".join(lines) + "\n")
    plot(results, a.out / f"text_probe_{a.style}.png", a.style)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
