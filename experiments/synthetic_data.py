"""RoentGen's claim 1: synthetic images help a classifier when real ones are few.

RoentGen (Chambon et al. 2022, abstract): +5% for a classifier trained on synthetic and real images
together, +3% on a larger purely synthetic set; RoentGen-v2 (2025): synthetic pre-training then real
fine-tuning +6.5%, naive mixing +2.7%. Here, in the phantom world: a classifier with the phantom
reader's architecture (minroentgen/phantoms/reader.py), trained from scratch, on a small set of real
phantoms, on real + synthetic, on synthetic only, and pre-trained on synthetic then fine-tuned on real;
scored by AUROC per finding on 1,000 held-out real phantoms, over several seeds.

    python -m minroentgen.phantoms --n 1600 --size 128 --seed 778 --out exp/reports     # reports + labels
    python generate.py --reports exp/reports/reports.csv --out exp/synthetic           # their samples
    python experiments/synthetic_data.py --synthetic exp/synthetic/reports.csv

Writes OUT/synthetic_data.json, .md (the table) and .png (the curve over the amount of synthetic data).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from minroentgen.data import read_rows
from minroentgen.phantoms import phantom as P
from minroentgen.phantoms import reader as R
from chart import chart

REAL_SEED, TEST_SEED = 777, 31_339  # phantom data sets: the small real set, the held-out test set


def load_synthetic(path: Path) -> tuple:
    """generate.py's reports.csv -> images (N, 1, 128, 128) in [0, 1] and the labels copied through."""
    try:
        rows = read_rows(path)
    except (OSError, ValueError) as e:
        sys.exit(f"synthetic_data.py: error: cannot read --synthetic {path}: {e}")
    if not rows or "labels" not in rows[0]:
        sys.exit(f"synthetic_data.py: error: {path} has no labels column: generate it from a phantom "
                 "reports.csv (python -m minroentgen.phantoms --out DIR), whose labels generate.py copies")
    imgs = [np.asarray(Image.open(path.parent / r["image"]).convert("L").resize((R.SIZE, R.SIZE), Image.BOX))
            for r in rows]
    return R.to_tensor(np.stack(imgs)), [json.loads(r["labels"]) for r in rows]


def subset(data: tuple, n: int) -> tuple:
    x, t = data
    return x[:n], {k: v[:n] for k, v in t.items()}


def join(*sets) -> tuple:
    return torch.cat([x for x, _ in sets]), {k: torch.cat([t[k] for _, t in sets]) for k in sets[0][1]}


def train(sets: list, steps: int, batch: int, seed: int) -> R.PhantomReader:
    """A fresh classifier fitted on each data set in turn (pre-training, then fine-tuning), its device
    heads then refitted on the last set, as the reader's are (reader.refit_devices)."""
    torch.manual_seed(seed)
    model = R.PhantomReader()
    g = torch.Generator().manual_seed(seed)
    for x, t in sets:
        R.fit(model, x, t, steps, batch, g)
    R.refit_devices(model, x, t["devices"], g, verbose=False)
    return model


def main(argv=None):
    ap = argparse.ArgumentParser(prog="experiments/synthetic_data.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synthetic", type=Path, required=True, help="generate.py's OUT/reports.csv (with labels)")
    ap.add_argument("--real", type=int, default=200, help="real phantoms in the small set (default 200)")
    ap.add_argument("--amounts", default="200,400,800,1600", help="synthetic images added to the real set "
                    "(default 200,400,800,1600; the largest is also the synthetic-only and pre-training set)")
    ap.add_argument("--seeds", type=int, default=3, help="training seeds per condition (default 3)")
    ap.add_argument("--steps", type=int, default=1000, help="optimiser steps per training stage (default 1000)")
    ap.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    ap.add_argument("--test", type=int, default=1000, help="held-out real phantoms scored (default 1000)")
    ap.add_argument("--out", type=Path, default=Path("docs/experiments"), help="output folder (default docs/experiments)")
    a = ap.parse_args(argv)
    amounts = [int(k) for k in a.amounts.split(",")]
    big = max(amounts)
    t0 = time.time()
    syn = load_synthetic(a.synthetic)
    if len(syn[0]) < big:
        sys.exit(f"synthetic_data.py: error: {a.synthetic} has {len(syn[0])} images; --amounts needs {big}")
    syn = (syn[0], R.targets(syn[1]))
    imgs, labels, _ = R.phantoms(big, REAL_SEED)  # the first --real of them are the small real set
    real_all = (R.to_tensor(imgs), R.targets(labels))
    real = subset(real_all, a.real)
    test_imgs, test_labels, _ = R.phantoms(a.test, TEST_SEED)
    conditions = {f"real {a.real}": [real]}
    conditions |= {f"real {a.real} + synthetic {k}": [join(real, subset(syn, k))] for k in amounts}
    conditions |= {f"synthetic {a.real} only": [subset(syn, a.real)], f"synthetic {big} only": [subset(syn, big)],
                   f"synthetic {big}, then real {a.real}": [subset(syn, big), real],
                   f"real {a.real}, twice the steps": [real, real], f"real {big} (upper bound)": [real_all]}
    results = {}
    for name, sets in conditions.items():
        runs = []
        for seed in range(a.seeds):
            model = train(sets, a.steps, a.batch, seed)
            res = R.evaluate(model, test_imgs, test_labels)
            runs.append({f: res[f"auroc/{f}"] for f in P.FINDINGS})
        mean = [np.mean(list(r.values())) for r in runs]
        results[name] = {"runs": runs, "mean_auroc": float(np.mean(mean)), "sd": float(np.std(mean, ddof=1)),
                         "min": float(np.min(mean)), "max": float(np.max(mean))}
        print(f"{name}: mean AUROC {results[name]['mean_auroc']:.3f} +- {results[name]['sd']:.3f} "
              f"({time.time() - t0:.0f} s)", flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) for k, v in vars(a).items()} | {"seconds": round(time.time() - t0)}
    (a.out / "synthetic_data.json").write_text(json.dumps({"settings": settings, "results": results}, indent=1))
    (a.out / "synthetic_data.md").write_text(table(results))
    plot(results, a.out / "synthetic_data.png", a.real, amounts, a.seeds, a.test)
    print(table(results))


def plot(results: dict, path: Path, real: int, amounts: list, seeds: int, test: int):
    """Mean AUROC against the images added to the small real set: synthetic, or (one point) real."""
    big, rows = max(amounts), [results[f"real {real}"]] + [results[f"real {real} + synthetic {k}"] for k in amounts]
    chart(path, [{"title": f"mean AUROC on {test} held-out real phantoms", "x_label": f"images added to "
                  f"{real} real (mean, min-max over {seeds} seeds)", "series": [
                      {"name": "synthetic", "x": [0] + amounts, "y": [r["mean_auroc"] for r in rows],
                       "lo": [r["min"] for r in rows], "hi": [r["max"] for r in rows]},
                      {"name": "synthetic only", "x": [real, big],
                       "y": [results[f"synthetic {n} only"]["mean_auroc"] for n in (real, big)]},
                      {"name": "real", "x": [big - real], "y": [results[f"real {big} (upper bound)"]["mean_auroc"]],
                       "lo": [results[f"real {big} (upper bound)"]["min"]],
                       "hi": [results[f"real {big} (upper bound)"]["max"]]}]}])


def table(results: dict) -> str:
    """Conditions as rows: mean AUROC over findings (mean, sd over seeds), then each finding's mean."""
    head = "| training data | mean AUROC | sd | " + " | ".join(f.replace("_", " ") for f in P.FINDINGS) + " |"
    lines = [head, "|" + " --- |" * (3 + len(P.FINDINGS))]
    for name, r in results.items():
        per = [np.mean([run[f] for run in r["runs"]]) for f in P.FINDINGS]
        lines.append(f"| {name} | {r['mean_auroc']:.3f} | {r['sd']:.3f} | " + " | ".join(f"{v:.3f}" for v in per) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
