"""Prove text control: generate from a fixed prompt set, read the samples with the phantom reader.

For every finding, side, zone and size, each device and a normal study, in a wording the model was
trained on and in a paraphrase it was not, sample --seeds images and report (minroentgen/phantoms/judge.py):
the prompted finding present (pass >= 90%), on the prompted side or zone (>= 90%), unprompted
findings (<= 10%), phantom FID against held-out phantoms and against phantoms of the same findings,
and the mean pairwise MS-SSIM of one prompt's samples beside the same figure for real phantoms.

  python evaluate.py                                   # the default model in weights/default
  python evaluate.py --weights runs/tiny/final --seeds 4 --limit 10 --steps 20
  python evaluate.py --real                            # real phantoms in place of samples: the judge's baseline
  python evaluate.py --reconstruct                     # real phantoms through the model's VAE: its ceiling
  python evaluate.py --prompts docs/blind_prompts.json --seeds 8   # another prompt set
  python evaluate.py --openi NLMCXR_reports.tgz --seeds 8          # real Open-I impressions (docs/openi_benchmark.json)

Writes OUT/table.md, OUT/grid.png (prompts x samples) and OUT/results.json.

Demographic fidelity in RoentGen-v2's way (minroentgen/phantoms/demographic_fidelity.py):
sex accuracy and age error of samples, read by the demographic reader, against the age and sex
in their prompts ("{age} year old {race} {sex}. {report}", or the model's saved template):

  python evaluate.py --demographics --weights runs/v2/final --seeds 8
  python evaluate.py --demographics --real             # demographic phantoms: the reader's baseline

Your own images (minroentgen/folders.py): FID between two folders of PNG/JPEG X-rays and the MS-SSIM
diversity of the generated ones, as RoentGen's evaluation computes them; writes OUT/table.md and
OUT/results.json:

  python evaluate.py --real-dir REAL --fake-dir FAKE                 # phantom reader features
  python evaluate.py --real-dir REAL --fake-dir FAKE --features xrv  # torchxrayvision's DenseNet

Prompts of FAKE for MS-SSIM: FAKE/reports.csv if there is one (generate.py's: images by its `image`
column, the prompt its `report` column, in row order), else sample.py's file names
<prompt>_seed<S>_img<I>.png (by prompt, then S, I; its grid_*.png files are left out). The first 4
images of each prompt give its 6 pairs (RoentGen); prompts with fewer are counted and skipped.
"""
import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from minroentgen import folders
from minroentgen.phantoms import demographic_fidelity as DF
from minroentgen.phantoms import demographic_reader as DR
from minroentgen.phantoms import judge as E
from minroentgen.phantoms import openi
from minroentgen.phantoms import reader as R
from minroentgen.pipeline import StableDiffusion
from minroentgen.weights import WeightsError
from sample import pick_device

DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights" / "default"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--weights", type=Path, default=DEFAULT_WEIGHTS, help="the model to evaluate: a diffusers folder or a "
      "single file, anything sample.py --weights takes (default weights/default)")
    a("--real", action="store_true", help="judge real phantoms rendered with each prompt's labels instead of "
      "samples (no model needed): the baseline that validates the reader as a judge")
    a("--reconstruct", action="store_true", help="judge real phantoms encoded and decoded by the model's VAE "
      "instead of samples: what the autoencoder keeps of each finding, a ceiling on the samples' scores")
    a("--seeds", type=int, default=16, help="samples per prompt: the images of `sample.py PROMPT --n SEEDS "
      "--seed SEED`; MS-SSIM over all their pairs (default 16, 120 pairs)")
    a("--seed", type=int, default=0, help="seed of each prompt's initial noise (default 0)")
    a("--steps", type=int, help="denoising steps (default: the weights' setting, else 75 as in the paper)")
    a("--guidance", type=float, help="classifier-free guidance scale (default: the weights' setting, else 4)")
    a("--guidance-rescale", type=float, metavar="PHI", help="guidance rescale from 0 to 1 (Lin et al. 2024; "
      "default: the weights' setting, else 0)")
    a("--scheduler", choices=["pndm", "ddim", "ddpm"], help="sampler (default: the weights' scheduler, else pndm)")
    a("--size", type=int, help="with --real: the phantoms' side in pixels (default 128); otherwise the "
      "samples' side (default: the model's size). Everything is judged at the reader's 128x128")
    a("--prompts", type=Path, metavar="FILE", help="judge the prompts of a JSON file instead of the built-in set: "
      '{"wording": NAME, "prompts": [[text, labels], ...]} with phantom labels, e.g. docs/blind_prompts.json '
      "(paraphrases written by someone who saw neither the report writer nor the built-in set)")
    a("--openi", metavar="PATH", help="judge the real Open-I impressions of the frozen selection "
      "docs/openi_benchmark.json (minroentgen/phantoms/openi.py), read from PATH: the Open-I "
      "NLMCXR_reports.tgz, a folder holding ecgen-radiology/, or 'torchxrayvision' (that package's copy)")
    a("--half", choices=["dev", "heldout", "both"], default="both", help="with --openi: which half of the "
      "selection (default both, each its own rows)")
    a("--limit", type=int, help=f"evaluate only this many prompts, spread evenly over the {len(E.PROMPTS)} ({len(E.PROMPTS) // 2} with --real; quick runs)")
    a("--heldout", type=int, default=1000, help="held-out phantoms for the FID reference (default 1000)")
    a("--reader", type=Path, default=R.WEIGHTS, help="phantom reader weights (default weights/phantom_reader.safetensors)")
    a("--out", type=Path, default=Path("eval"), help="output folder for table.md, grid.png, results.json (default eval/)")
    a("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="where the model runs (default auto: cuda, mps, cpu)")
    a("--dtype", default="auto", choices=["auto", *DTYPES], help="model precision (default auto: fp16 on cuda, fp32 elsewhere)")
    a("--demographics", action="store_true", help="judge demographic fidelity instead of text "
      f"control: {len(DF.cases())} prompts (ages {', '.join(map(str, DF.AGES))} x female, male x "
      f"{len(DF.REPORTS)} reports, the race cycling) in the model's saved prompt template, else "
      "'{age} year old {race} {sex}. {report}'; sex accuracy and age error read by --demographic-reader")
    a("--demographic-reader", type=Path, default=DR.WEIGHTS, help="with --demographics: the reader "
      "of sex and age (default weights/phantom_demographics.safetensors)")
    a("--real-dir", type=Path, metavar="REAL", help="with --fake-dir: evaluate your own images "
      "instead of a model: FID of the PNG/JPEG images under REAL (subfolders too) against FAKE's")
    a("--fake-dir", type=Path, metavar="FAKE", help="with --real-dir: the generated images; FID "
      "against REAL's, and MS-SSIM over 4 images a prompt (prompts: see above)")
    a("--features", choices=["reader", "xrv"], help="with --real-dir: FID features of the phantom "
      "reader (default; --reader) or of torchxrayvision's densenet121-res224-all as RoentGen's "
      "evaluation (`pip install torchxrayvision`; its weights download on first use)")
    args = p.parse_args(argv)
    folder_problem = _folder_mode_problem(p, args)
    if folder_problem:
        p.error(folder_problem)
    if args.openi and args.prompts:
        p.error("--openi and --prompts exclude each other: each is a prompt set")
    if args.half != "both" and not args.openi:
        p.error("--half needs --openi")
    if args.demographics and (args.prompts or args.openi or args.reconstruct):
        p.error("--demographics has its own prompts; it takes neither --prompts, --openi nor --reconstruct")
    if args.real and args.reconstruct:
        p.error("--real and --reconstruct exclude each other: --real needs no model, --reconstruct uses its VAE")
    for name in ("seeds", "steps", "size", "limit"):
        if getattr(args, name) is not None and getattr(args, name) < (2 if name == "seeds" else 1):
            p.error(f"--{name} must be at least {2 if name == 'seeds' else 1}, got {getattr(args, name)}")
    if args.guidance_rescale is not None and not 0 <= args.guidance_rescale <= 1:
        p.error(f"--guidance-rescale must be from 0 to 1, got {args.guidance_rescale}")
    if args.heldout < 2:
        p.error(f"--heldout must be at least 2, got {args.heldout}")
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out} is a file; give a folder")
    if (args.out / "results.json").exists():
        p.error(f"--out {args.out} already holds results (results.json); give a new --out, or delete them first")
    if not 0 <= args.seed < 2**63:
        p.error(f"--seed must be from 0 to 2**63 - 1, got {args.seed}")
    return args


FOLDER_FLAGS = {"real_dir", "fake_dir", "features", "reader", "out", "device"}


def _folder_mode_problem(p, args):
    """Why the folder flags are misused, or None: both folders or neither, and no model flags."""
    if (args.real_dir is None) != (args.fake_dir is None):
        return "--real-dir and --fake-dir go together: give both folders"
    if args.real_dir is None:
        return "--features needs --real-dir and --fake-dir" if args.features else None
    for dest, value in vars(args).items():
        if dest not in FOLDER_FLAGS and value != p.get_default(dest):
            flag = "--" + dest.replace("_", "-")
            return f"{flag} is for a model's evaluation, not --real-dir/--fake-dir"
    return None


def evaluate_folders(args):
    """--real-dir/--fake-dir: FID and MS-SSIM diversity of your images (minroentgen/folders.py)."""
    if args.features != "xrv" and not args.reader.exists():
        sys.exit(f"evaluate.py: error: no phantom reader at {args.reader}: run "
                 "`python -m minroentgen.phantoms.reader --train`, or use --features xrv")
    device = pick_device(args.device, prog="evaluate.py")
    if args.features != "xrv":
        torch.set_num_threads(1)  # only the small reader runs: one thread is faster (see reader.py)

    def extractor():  # after the folders are checked: xrv may download its weights first
        if args.features == "xrv":
            return folders.xrv_extractor(device=device)
        return folders.reader_extractor(R.load(args.reader), device)
    try:
        args.out.mkdir(parents=True, exist_ok=True)  # now, not after a long run
    except OSError as e:
        sys.exit(f"evaluate.py: error: cannot write --out {args.out} ({e.strerror})")
    t0 = time.time()
    try:
        result = folders.evaluate(args.real_dir, args.fake_dir, extractor)
    except (folders.FolderError, WeightsError) as e:
        sys.exit(f"evaluate.py: error: {e}")
    result["seconds"] = round(time.time() - t0, 1)
    text = folders.table(result)
    (args.out / "table.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    print(text)
    print(f"wrote {args.out}/table.md, results.json")


def load_model(args):
    if not args.weights.exists():
        hint = "train one (README) or pass --weights, or use --real" if args.weights == DEFAULT_WEIGHTS else "check the path"
        sys.exit(f"evaluate.py: error: no weights at {args.weights}: {hint}")
    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available() or name == "mps" and not torch.backends.mps.is_available():
        sys.exit(f"evaluate.py: error: --device {name} is not available here; use --device cpu")
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else torch.float16 if name == "cuda" else torch.float32
    try:
        return StableDiffusion.from_pretrained(args.weights, device=name, dtype=dtype)
    except WeightsError as e:
        sys.exit(f"evaluate.py: error: {e}")


def settings_of(args, sd) -> dict:
    """Sampling settings: the flags, else the model's defaults (all None for real phantoms)."""
    settings = {"steps": args.steps, "guidance": args.guidance, "scheduler": args.scheduler,
                "guidance_rescale": args.guidance_rescale}
    if sd is not None:
        d = sd.defaults
        settings = {"steps": args.steps or d.steps, "guidance": d.guidance if args.guidance is None else args.guidance,
                    "scheduler": args.scheduler or d.scheduler, "guidance_rescale": (
                        d.guidance_rescale if args.guidance_rescale is None else args.guidance_rescale)}
        if args.size:
            sd.defaults = replace(d, height=args.size, width=args.size)
    return settings


def make_out(args):
    try:
        args.out.mkdir(parents=True, exist_ok=True)  # now, not after a long run
    except OSError as e:
        sys.exit(f"evaluate.py: error: cannot write --out {args.out} ({e.strerror})")


def evaluate_demographics(args):
    """--demographics: sex and age of samples (or phantoms) against their prompts."""
    if not args.demographic_reader.exists():
        sys.exit(f"evaluate.py: error: no demographic reader at {args.demographic_reader}: run "
                 "`python -m minroentgen.phantoms.demographic_reader --train`")
    if args.real:
        torch.set_num_threads(1)  # only the small readers run: one thread is faster (see reader.py)
    sd = None if args.real else load_model(args)
    try:
        cases = DF.cases(None if sd is None else sd.defaults.prompt_template)
        readers = DR.load(args.demographic_reader), R.load(args.reader)
    except (ValueError, WeightsError) as e:
        sys.exit(f"evaluate.py: error: --demographics: {e}")
    cases = E.spread(cases, args.limit) if args.limit else cases
    make_out(args)
    settings, t0 = settings_of(args, sd), time.time()
    report, images = DF.run(sd, *readers, cases, seeds=args.seeds, seed=args.seed,
                            size=args.size or 128, **settings)
    source = "demographic phantoms (baseline)" if sd is None else str(args.weights)
    report["settings"] = {"source": source, "seeds": args.seeds, "seed": args.seed,
                          "size": images[0].shape[-1], "seconds": round(time.time() - t0, 1), **settings}
    head = (f"Demographic fidelity of {source}: {len(cases)} prompts x {args.seeds} samples at "
            f"{images[0].shape[-1]} px, e.g. {cases[0].text!r}; sex and age read by "
            f"{args.demographic_reader.name}, findings by {args.reader.name}.\n\n")
    (args.out / "table.md").write_text(head + DF.table(report))
    (args.out / "results.json").write_text(json.dumps(report, indent=1))
    E.write_grid(args.out / "grid.png", cases, images)
    print(head + DF.table(report))
    print(f"wrote {args.out}/table.md, grid.png, results.json")


def main(argv=None):
    args = parse_args(argv)
    if args.real_dir is not None:
        return evaluate_folders(args)
    if not args.reader.exists():
        sys.exit(f"evaluate.py: error: no phantom reader at {args.reader}: run `python -m minroentgen.phantoms.reader --train`")
    if args.demographics:
        return evaluate_demographics(args)
    if args.real:
        torch.set_num_threads(1)  # only the small reader runs: one thread is faster (see reader.py)
    try:
        if args.openi:
            halves = ("dev", "heldout") if args.half == "both" else (args.half,)
            prompts = openi.prompts(args.openi, halves)
        else:
            prompts = E.load_prompts(args.prompts) if args.prompts else E.PROMPTS
    except ValueError as e:
        sys.exit(f"evaluate.py: error: {e}")
    sd = None if args.real else load_model(args)
    make_out(args)
    phantoms = args.real or args.reconstruct  # phantoms read no text: one wording
    if phantoms and not (args.prompts or args.openi):
        prompts = [p for p in prompts if p.wording == "trained"]
    prompts = E.spread(prompts, args.limit) if args.limit else prompts
    settings = settings_of(args, sd)
    t0 = time.time()
    try:
        report, images = E.run(sd, R.load(args.reader), prompts, seeds=args.seeds, seed=args.seed,
                               size=args.size or 128, heldout_n=args.heldout, reconstruct=args.reconstruct, **settings)
    except ValueError as e:
        sys.exit(f"evaluate.py: error: {e}")
    source = ("real phantoms (baseline)" if sd is None else
              f"real phantoms through the VAE of {args.weights}" if args.reconstruct else str(args.weights))
    report["settings"] = {"source": source, "seeds": args.seeds, "seed": args.seed, "heldout": args.heldout,
                          "size": images[0].shape[-1], "seconds": round(time.time() - t0, 1), **settings}
    s = report["settings"]
    head = (f"Text control of {source}: {len(prompts)} prompt{'s' * (len(prompts) != 1)} x {args.seeds} samples at {s['size']} px"
            + ("" if phantoms else f", {s['scheduler']} {s['steps']} steps, guidance {s['guidance']}"
               + (f" rescaled {s['guidance_rescale']}" if s["guidance_rescale"] else ""))
            + f"; FID vs {args.heldout} held-out phantoms and vs {args.seeds} phantoms per label set"
            + (" (real phantoms ignore the text: one wording)" if phantoms else
               " (FID of small sets is biased upwards: compare with `evaluate.py --real`)") + ".\n\n")
    (args.out / "table.md").write_text(head + E.table(report))
    (args.out / "results.json").write_text(json.dumps(report, indent=1))
    E.write_grid(args.out / "grid.png", prompts, images)
    print(head + E.table(report))
    print(f"wrote {args.out}/table.md, grid.png, results.json")


if __name__ == "__main__":
    main()
