"""RoentGen's sampling settings trade fidelity for diversity: sweeps of steps and guidance scale.

The paper (Chambon et al. 2022, Sec. 4) plotted FID and MS-SSIM against the number of denoising steps and
the classifier-free guidance scale. Here the embedded default is swept the same way on evaluate.py's
prompts in the wording it was trained on (minroentgen/phantoms/judge.py), each setting read by the phantom
reader: text control (present, side/zone, unprompted), phantom FID against held-out phantoms and mean
pairwise MS-SSIM of one prompt's samples (lower = more diverse).

    python experiments/sweep.py                          # 16 prompts x 8 seeds per setting
    python experiments/sweep.py --steps 5,10,25,50 --guidance 1,2,4,7,10

Writes OUT/sweep.json, .md (the table) and .png (FID, MS-SSIM and present against each setting).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

from minroentgen.phantoms import judge as E
from minroentgen.phantoms import reader as R
from minroentgen.pipeline import StableDiffusion
from minroentgen.weights import WeightsError
from chart import chart

DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "default"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="experiments/sweep.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="model (default weights/default)")
    ap.add_argument("--steps", default="5,10,25,50", help="steps to sweep at the weights' guidance "
                    "(default 5,10,25,50)")
    ap.add_argument("--guidance", default="1,2,4,7,10", help="guidance scales to sweep at the weights' steps "
                    "(default 1,2,4,7,10; 1 = no guidance)")
    ap.add_argument("--prompts", type=int, default=16, help="prompts spread over evaluate.py's trained "
                    "wording (default 16)")
    ap.add_argument("--seeds", type=int, default=8, help="samples per prompt (default 8: 28 MS-SSIM pairs)")
    ap.add_argument("--heldout", type=int, default=1000, help="held-out phantoms for the FID (default 1000)")
    ap.add_argument("--out", type=Path, default=Path("docs/experiments"), help="output folder (default docs/experiments)")
    a = ap.parse_args(argv)
    try:
        sd = StableDiffusion.from_pretrained(a.weights)
    except (WeightsError, OSError) as e:
        sys.exit(f"sweep.py: error: {e}")
    d = sd.defaults
    prompts = E.spread([p for p in E.PROMPTS if p.wording == "trained"], a.prompts)
    reader = R.load()
    held_feat = E.heldout_features(reader, a.heldout, d.height)  # the same for every setting
    settings = [("steps", int(s), d.guidance) for s in a.steps.split(",")]
    settings += [("guidance", d.steps, float(g)) for g in a.guidance.split(",")]
    results, t0 = [], time.time()
    for sweep, steps, guidance in settings:
        done = next((r for r in results if (r["steps"], r["guidance"]) == (steps, guidance)), None)
        if done is None:
            t = time.time()
            report, _ = E.run(sd, reader, prompts, seeds=a.seeds, steps=steps, guidance=guidance,
                              held_feat=held_feat, progress=False)
            g = next(g for g in report["groups"] if g["group"] == "all")
            done = {"steps": steps, "guidance": guidance, "seconds": round(time.time() - t),
                    **{k: g[k] for k in ("present", "place", "unprompted", "fid_heldout", "fid_same", "ms_ssim",
                                         "ms_ssim_real")}}
        results.append({**done, "sweep": sweep})
        print(row(done), f"({time.time() - t0:.0f} s)", flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    meta = {"weights": str(a.weights), "scheduler": d.scheduler, "prompts": len(prompts), "seeds": a.seeds,
            "heldout": a.heldout, "seconds": round(time.time() - t0), "threads": torch.get_num_threads()}
    (a.out / "sweep.json").write_text(json.dumps({"settings": meta, "results": results}, indent=1))
    text = table(results)
    (a.out / "sweep.md").write_text(text)
    plot(results, a.out / "sweep.png", d)
    print(text)


def plot(results: list, path: Path, d):
    """FID, and MS-SSIM / present / unprompted, against steps and against guidance."""
    panels = []
    for sweep, label in (("steps", f"{d.scheduler} steps (guidance {d.guidance:g})"),
                         ("guidance", f"guidance scale ({d.steps} steps)")):
        rs = [r for r in results if r["sweep"] == sweep]
        x = [r[sweep] for r in rs]
        panels += [{"title": f"phantom FID vs held-out, by {sweep}", "x_label": label, "x_log": sweep == "steps",
                    "series": [{"name": "FID", "x": x, "y": [r["fid_heldout"] for r in rs]}]},
                   {"title": f"diversity and control, by {sweep}", "x_label": label, "x_log": sweep == "steps",
                    "series": [{"name": "MS-SSIM", "x": x, "y": [r["ms_ssim"] for r in rs]},
                               {"name": "present", "x": x, "y": [r["present"] for r in rs]},
                               {"name": "unprompted", "x": x, "y": [r["unprompted"] for r in rs]}]}]
    chart(path, panels)


def row(r: dict) -> str:
    return (f"| {r['steps']} | {r['guidance']:g} | {100 * r['present']:.0f}% | {100 * r['place']:.0f}% | "
            f"{100 * r['unprompted']:.1f}% | {r['fid_heldout']:.1f} | {r['ms_ssim']:.3f} | {r['seconds']} s |")


def table(results: list) -> str:
    lines = ["| steps | guidance | present | side/zone | unprompted | FID vs held-out | MS-SSIM | time |",
             "|" + " --- |" * 8]
    return "\n".join(lines + [row(r) for r in results]) + "\n"


if __name__ == "__main__":
    main()
