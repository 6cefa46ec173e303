"""RoentGen's claim 2: which parts to fine-tune. UNet only, text encoder only, or both.

RoentGen (Chambon et al. 2022) fine-tuned Stable Diffusion's UNet, its text encoder, or both, and found
both best for fidelity and for correctness of the findings. Here: from the same start (the embedded
default), the same data, steps and learning rate, fine-tune on reports in a style the start never read
(the writer's "clinical" style: negation lists, numbered items, radiology's synonyms, de-identified
XXXX tokens; `python -m minroentgen.phantoms --style mixed` writes it beside the classic one), then
judge each model with the phantom reader (minroentgen/phantoms/judge.py) on held-out prompts of the
new style (written before any model was fine-tuned), on evaluate.py's trained wording (what the start
knew: is it kept?) and, with --openi, on the dev half of the real Open-I impressions.

    python -m minroentgen.phantoms --n 4000 --size 128 --reports 4 --style mixed --out exp/mixed
    python experiments/finetune_parts.py --data exp/mixed/reports.csv --out exp/parts --openi torchxrayvision

Each variant trains with train.py into OUT/<variant>/ (skipped when OUT/<variant>/final exists, so
variants can run in parallel with --variants) and is judged into OUT/<variant>/results.json; the
table of every judged variant goes to OUT/finetune_parts.md and docs/experiments/.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from minroentgen.phantoms import judge as E
from minroentgen.phantoms import openi
from minroentgen.phantoms import reader as R
from minroentgen.phantoms import reports as PR
from minroentgen.pipeline import StableDiffusion
from chart import chart

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"start": None, "unet": [], "text": ["--train-text-encoder", "--freeze-unet"],
            "both": ["--train-text-encoder"]}
PROMPT_SETS = ("clinical", "trained", "openi dev")
PROMPTS_SEED = 2_027


def write_prompts(path: Path):
    """The held-out prompts: one clinical-style report for each label set of evaluate.py's prompts."""
    rng = np.random.default_rng(PROMPTS_SEED)
    labels = list({json.dumps(p.labels, sort_keys=True): p.labels for p in E.PROMPTS}.values())
    prompts = [[PR.write_report(lab, rng, style="clinical"), lab] for lab in labels]
    path.write_text(json.dumps({"wording": "clinical", "prompts": prompts}, indent=1) + "\n")


def train(a, variant: str):
    """The stage-13 recipe (weights/README.md), shortened to --steps, with this variant's parts."""
    cmd = [sys.executable, str(ROOT / "train.py"), "--data", str(a.data), "--weights", str(a.start),
           "--zero-snr", "--resolution", "128", "--batch-size", "16", "--max-steps", str(a.steps),
           "--lr", str(a.lr), "--warmup", "50", "--cache-latents", "--text-augment", "0.4",
           "--save-every", str(a.steps), "--sample-every", "0", "--log-every", "50",
           "--out", str(a.out / variant), *VARIANTS[variant]]
    print(" ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode:
        sys.exit(f"finetune_parts.py: error: train.py failed for the {variant} variant (its message is above)")


def judge(a, variant: str) -> dict:
    sd = StableDiffusion.from_pretrained(a.start if variant == "start" else a.out / variant / "final")
    reader = R.load()
    held_feat = E.heldout_features(reader, a.heldout, sd.defaults.height)  # shared by the prompt sets
    sets = {"clinical": E.load_prompts(a.prompts),
            "trained": E.spread([p for p in E.PROMPTS if p.wording == "trained"], a.trained)}
    if a.openi:
        sets["openi dev"] = openi.prompts(a.openi, ("dev",))
    res = {}
    for name, prompts in sets.items():
        report, _ = E.run(sd, reader, prompts, seeds=a.seeds, held_feat=held_feat, progress=False)
        g = next(g for g in report["groups"] if g["group"] == "all")
        res[name] = {k: g[k] for k in ("prompts", "samples", "present", "place", "unprompted", "fid_heldout",
                                       "ms_ssim")}
        print(variant, name, {k: round(v, 3) for k, v in res[name].items()}, flush=True)
    return res


def table(out: Path) -> str:
    lines = ["| fine-tuned | prompts | present | side/zone | unprompted | FID vs held-out | MS-SSIM |",
             "|" + " --- |" * 7]
    for variant in VARIANTS:
        f = out / variant / "results.json"
        if not f.exists():
            continue
        res = json.loads(f.read_text())
        for name in PROMPT_SETS:
            if name in res:
                r = res[name]
                lines.append(f"| {variant} | {name} ({r['prompts']} x {r['samples'] // r['prompts']}) | "
                             f"{100 * r['present']:.0f}% | {100 * r['place']:.0f}% | {100 * r['unprompted']:.1f}% | "
                             f"{r['fid_heldout']:.1f} | {r['ms_ssim']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(out: Path, path: Path):
    """Present, side/zone and unprompted of each judged variant, one panel per prompt set."""
    done = [v for v in VARIANTS if (out / v / "results.json").exists()]
    res = {v: json.loads((out / v / "results.json").read_text()) for v in done}
    panels = [{"title": f"{name} prompts", "x_label": "fine-tuned parts", "x_names": done,
               "series": [{"name": label, "x": list(range(len(done))), "y": [res[v][name][k] for v in done]}
                          for k, label in (("present", "present"), ("place", "side/zone"),
                                           ("unprompted", "unprompted"))]}
              for name in PROMPT_SETS if all(name in res[v] for v in done)]
    chart(path, panels)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="experiments/finetune_parts.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="training table (a phantom reports.csv)")
    ap.add_argument("--start", type=Path, default=ROOT / "weights" / "default", help="the common start "
                    "(default weights/default)")
    ap.add_argument("--out", type=Path, required=True, help="runs and results, one folder per variant")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"which to train and judge "
                    f"(default {','.join(VARIANTS)}; start = the start, not fine-tuned)")
    ap.add_argument("--steps", type=int, default=500, help="optimizer steps per variant (default 500)")
    ap.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default 2e-4, stage 13's)")
    ap.add_argument("--prompts", type=Path, default=ROOT / "docs" / "clinical_prompts.json",
                    help="held-out prompts in the new style (default docs/clinical_prompts.json)")
    ap.add_argument("--write-prompts", action="store_true", help="write the held-out prompts to --prompts "
                    "and stop (done once, before any variant was trained; committed)")
    ap.add_argument("--trained", type=int, default=16, help="prompts of evaluate.py's trained wording (default 16)")
    ap.add_argument("--openi", help="judge the dev half of the Open-I benchmark too, read from this path "
                    "(evaluate.py --openi's argument)")
    ap.add_argument("--seeds", type=int, default=8, help="samples per prompt (default 8)")
    ap.add_argument("--heldout", type=int, default=1000, help="held-out phantoms for the FID (default 1000)")
    a = ap.parse_args(argv)
    if a.write_prompts:
        return write_prompts(a.prompts)
    t0 = time.time()
    for variant in a.variants.split(","):
        if variant not in VARIANTS:
            ap.error(f"unknown variant {variant!r}: choose from {', '.join(VARIANTS)}")
        if variant != "start" and not (a.out / variant / "final").exists():
            train(a, variant)
        if not (a.out / variant / "results.json").exists():
            (a.out / variant).mkdir(parents=True, exist_ok=True)
            res = judge(a, variant) | {"seconds": round(time.time() - t0), "threads": torch.get_num_threads()}
            (a.out / variant / "results.json").write_text(json.dumps(res, indent=1))
    text = table(a.out)
    (a.out / "finetune_parts.md").write_text(text)
    plot(a.out, a.out / "finetune_parts.png")
    print(text)


if __name__ == "__main__":
    main()
