"""Sample chest X-rays from radiology text.

    python sample.py "small left pleural effusion"
    python sample.py "moderate cardiomegaly" "no acute cardiopulmonary process" --n 4 --seed 7
    python sample.py "right upper lobe consolidation" --weights path/to/roentgen  # a diffusers folder
    python sample.py "left pneumothorax" --weights v1-5-pruned-emaonly.safetensors  # a single file

Without --weights the small model embedded in weights/default is used. See weights/README.md for
Stable Diffusion v1.x and RoentGen's own weights.

A model trained with `train.py --prompt-template` (its sampling.json's prompt_template, e.g.
"{age} year old {race} {sex}. {report}") is given each PROMPT as the report of that template, the
patient from --age, --sex and --race:

    python sample.py "Small left pleural effusion." --weights runs/v2/final --age 65 --sex F --race WHITE
"""
import argparse
import re
import sys
import unicodedata
import warnings
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from minroentgen import pipeline
from minroentgen import prompts as templates
from minroentgen.pipeline import StableDiffusion, image_grid, to_grayscale_uint8
from minroentgen.weights import WeightsError

DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights" / "default"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="one or more radiology texts, e.g. a report's impression")
    p.add_argument("--weights", help="a diffusers folder or an original single-file checkpoint "
                   "(.safetensors/.ckpt); default: the embedded model in weights/default")
    p.add_argument("--config", help="a diffusers folder whose config files describe a single-file checkpoint's "
                   "architecture where its tensor shapes cannot (e.g. attention heads of a non-standard model)")
    p.add_argument("--n", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the weights' setting, else 75 as in the paper)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale; 1 turns guidance off "
                   "(default: the weights' setting, else 4 as in the paper)")
    p.add_argument("--guidance-rescale", type=float, metavar="PHI", help="guidance rescale phi from 0 to 1 "
                   "(Lin et al. 2024, Sec. 3.4; they use 0.7 with zero-terminal-SNR models); 0 turns it off "
                   "(default: the weights' setting, else 0)")
    p.add_argument("--scheduler", choices=["pndm", "ddim", "ddpm"],
                   help="sampler (default: the weights' scheduler, else pndm as in the paper)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise; the same seed gives the same "
                   "image here and in diffusers (default 0). torch's CPU generator uses the seed's low 32 bits, "
                   "so seeds that differ by a multiple of 2**32 give the same image")
    p.add_argument("--negative", default="", help="negative prompt, the unconditional branch of guidance (default: empty)")
    p.add_argument("--height", type=int, help="image height in pixels, a multiple of 8 for SD (default: the model's size)")
    p.add_argument("--width", type=int, help="image width in pixels, a multiple of 8 (default: the model's size)")
    p.add_argument("--out", default="samples", help="output folder (default samples/); existing files are never overwritten")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="where to run (default auto: cuda, then mps, then cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="precision (default auto: fp16 on cuda, fp32 elsewhere; fp32 on cuda "
                   "multiplies matrices in TF32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet, with CUDA graphs on cuda: "
                   "faster steps once the first image has waited for the compiling (a minute or more); "
                   "the text encoder and the VAE run once an image and stay as they are")
    for name, example in DEMOGRAPHICS.items():
        p.add_argument(f"--{name}", help=f"fills {{{name}}} of the prompt template of a model trained "
                       f"with train.py --prompt-template, around each PROMPT: {example}")
    args = p.parse_args(argv)
    for name, example in DEMOGRAPHICS.items():
        value = getattr(args, name)
        if value is not None and getattr(templates, name)(value) is None:
            p.error(f"--{name} {value!r} is not {example.split(';')[0]}")
    if not args.prompts:
        p.error('give at least one prompt, e.g. python sample.py "small left pleural effusion"')
    if args.n < 1:
        p.error(f"--n must be at least 1, got {args.n}")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be at least 1, got {args.steps}")
    for side in ("height", "width"):
        v = getattr(args, side)
        if v is not None and v < 1:
            p.error(f"--{side} must be positive, got {v}")
    if args.guidance is not None and not 0 <= args.guidance < float("inf"):
        p.error(f"--guidance must be a finite number >= 0 (1 or less turns guidance off), got {args.guidance}")
    if args.guidance_rescale is not None and not 0 <= args.guidance_rescale <= 1:
        p.error(f"--guidance-rescale must be from 0 to 1, got {args.guidance_rescale}")
    if args.weights == "" or args.out == "":
        p.error("--weights and --out must not be empty; give a path")
    if not 0 <= args.seed < 2**63:
        p.error(f"--seed must be from 0 to 2**63 - 1, got {args.seed}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        p.error(f"--out {args.out} is a file; give a folder")
    return args


DEMOGRAPHICS = {"age": "a number of years from 0 to 150, e.g. 65", "sex": "female or male (or F, M)",
                "race": "WHITE, BLACK, ASIAN, HISPANIC or OTHER; MIMIC-IV's strings are mapped as "
                        "minroentgen/prompts.py says"}


def templated(template: str | None, report: str, given: dict) -> str:
    """The prompt for a model trained on `template` around `report`, its fields from `given`
    (--age/--sex/--race, normalised); without a template the report itself. A field the template
    needs but was not given, or one given that it does not use, is a one-line ValueError."""
    flags = [f"--{n}" for n in DEMOGRAPHICS if given.get(n) is not None]
    if template is None:
        if flags:
            raise ValueError(f"{', '.join(flags)}: this model has no prompt template (it was trained "
                             "without --prompt-template); write the patient into the prompt instead")
        return report
    names = [n for n in templates.template_fields(template) if n != "report"]
    cannot = [n for n in names if n not in DEMOGRAPHICS]
    if cannot:
        raise ValueError(f"this model's prompt template {template!r} needs "
                         f"{', '.join('{' + n + '}' for n in cannot)}, which sample.py cannot fill "
                         "(only --age, --sex, --race)")
    missing = [f"--{n}" for n in names if given.get(n) is None]
    if missing:
        raise ValueError(f"this model was trained on prompts {template!r}: give {', '.join(missing)}")
    unused = [f for f in flags if f[2:] not in names]
    if unused:
        raise ValueError(f"{', '.join(unused)}: this model's prompt template {template!r} has no "
                         "such field")
    return templates.fill(template, {"report": report, **given})


def pick_device(name: str, prog="sample.py") -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit(f"{prog}: error: --device cuda, but this torch build sees no CUDA GPU; use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        sys.exit(f"{prog}: error: --device mps, but MPS is not available here; use --device cpu")
    return torch.device(name)


def slug(text: str) -> str:
    """A file name from a prompt, at most 60 characters cut at a word's end:
    "Épanchement pleural gauche" -> "epanchement-pleural-gauche"."""
    plain = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()  # accents dropped, letters kept
    words = re.sub(r"[^a-z0-9]+", "-", plain.lower()).strip("-")
    return (words if len(words) <= 60 else words[:61].rsplit("-", 1)[0][:60]) or "prompt"


def image_stem(prompt: str, seed: int, i: int) -> str:
    """"small-left-pleural-effusion_seed0_img1": image 1 of --n for this prompt and --seed."""
    return f"{slug(prompt)}_seed{seed}_img{i}"


def grid_stem(prompts: list, seed: int) -> str:
    """"grid_small-left-pleural-effusion_seed0", or "grid_<first>_and-2-more_seed0" for 3 prompts."""
    more = f"_and-{len(prompts) - 1}-more" if len(prompts) > 1 else ""
    return f"grid_{slug(prompts[0])}{more}_seed{seed}"


def free_path(folder: Path, stem: str) -> Path:
    """`folder/stem.png`, or `stem_v2.png`, `stem_v3.png`, ... if taken: never overwrite."""
    path, k = folder / f"{stem}.png", 2
    while path.exists():
        path, k = folder / f"{stem}_v{k}.png", k + 1
    return path


def main(argv=None):
    args = parse_args(argv)
    warnings.showwarning = lambda message, *_, **__: print(f"sample.py: warning: {message}", file=sys.stderr)
    weights = Path(args.weights) if args.weights else DEFAULT_WEIGHTS
    if not args.weights and not weights.exists():
        sys.exit("sample.py: error: no embedded default model in weights/default yet. Point --weights at a "
                 "Stable Diffusion v1.x or RoentGen diffusers folder or single file; weights/README.md says where to get them.")
    device = pick_device(args.device)
    pipeline.cuda_speedups(device)
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.float16 if device.type == "cuda" else torch.float32)
    try:
        sd = StableDiffusion.from_pretrained(weights, config_dir=args.config, device=device, dtype=dtype)
    except WeightsError as e:
        sys.exit(f"sample.py: error: {e}")
    given = {n: getattr(templates, n)(getattr(args, n)) for n in DEMOGRAPHICS
             if getattr(args, n) is not None}  # normalised: F -> female, 64.9 -> 64, ...
    try:
        texts = [templated(sd.defaults.prompt_template, prompt, given) for prompt in args.prompts]
    except ValueError as e:
        sys.exit(f"sample.py: error: {e}")
    if args.compile:
        sd.compile()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    d = sd.defaults
    settings = dict(steps=args.steps or d.steps, guidance=d.guidance if args.guidance is None else args.guidance,
                    guidance_rescale=(d.guidance_rescale if args.guidance_rescale is None
                                      else args.guidance_rescale),
                    scheduler=args.scheduler or d.scheduler, height=args.height or d.height, width=args.width or d.width)
    written = []
    for prompt in texts:
        try:
            images = sd(prompt, n=args.n, seed=args.seed, negative=args.negative, **settings)
        except ValueError as e:
            sys.exit(f"sample.py: error: {e}")
        for i, pixels in enumerate(to_grayscale_uint8(images)):
            meta = PngInfo()
            for key, value in dict(prompt=prompt, negative_prompt=args.negative, seed=args.seed,
                                   weights=str(weights), index=i, **settings).items():
                meta.add_text(key, str(value))
            path = free_path(out, image_stem(prompt, args.seed, i))
            Image.fromarray(pixels.numpy()).save(path, pnginfo=meta)
            written.append((path, pixels))
    if len(written) > 1:  # a row per prompt; with --n 1 all prompts in one row
        path = free_path(out, grid_stem(texts, args.seed))
        cols = args.n if args.n > 1 else len(written)
        Image.fromarray(image_grid(torch.stack([g for _, g in written]), cols=cols).numpy()).save(path)
        written.append((path, None))
    for path, _ in written:
        print(path)


if __name__ == "__main__":
    main()
