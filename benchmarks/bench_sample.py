"""Sampling speed and memory: minroentgen vs diffusers on the same random full-size SD v1.5 weights.

    python benchmarks/bench_sample.py                  # CPU, fp32, 512x512 (about 5 minutes on 2 cores)
    python benchmarks/bench_sample.py --device cuda --dtype fp16

Times one guided UNet step (batch 2), the VAE decode and a short sampling run (PNDM, --steps steps,
guidance 4, text encoding included), each in both implementations in this one process; prints both,
the ratio (minroentgen / diffusers: below 1 is faster) and the peak extra memory, and appends the
table to benchmarks/RESULTS.md. Needs diffusers and transformers (the test extra) and ../shared.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import check_args, compare, machine, sd15_configs, write_results  # noqa: E402

from minroentgen.pipeline import StableDiffusion  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="fp32", choices=DTYPES, help="precision of both models (default fp32)")
    p.add_argument("--size", type=int, default=512, help="image size in pixels; latents are size/8 (default 512)")
    p.add_argument("--steps", type=int, default=3, help="denoising steps of the short sampling run (default 3)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the median is shown")
    p.add_argument("--no-write", action="store_true", help="print only, do not append to RESULTS.md")
    args = p.parse_args()
    check_args(p, args, positive=("size", "steps", "repeats"))
    from oracle import diffusers_pipeline

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cfg = sd15_configs()
    keep = lambda d: {k: v for k, v in d.items() if not k.startswith("_")}  # noqa: E731
    print("building random SD v1.5 weights in diffusers ...", flush=True)
    ref = diffusers_pipeline({"unet": keep(cfg["unet"]), "vae": keep(cfg["vae"]),
                              "text_encoder": keep(cfg["text_encoder"])}, perturb=0.0)
    folder = Path("/tmp/minroentgen-bench-sd15")
    if not folder.exists():
        ref.save_pretrained(folder)
    ours = StableDiffusion.from_pretrained(folder, device=device, dtype=dtype)
    ref = ref.to(device, dtype)
    ref.set_progress_bar_config(disable=True)

    h = args.size // 8
    g = torch.Generator("cpu").manual_seed(0)
    x = torch.randn(2, 4, h, h, generator=g).to(device, dtype)
    t = torch.tensor(500, device=device)
    ctx = torch.randn(2, 77, 768, generator=g).to(device, dtype)
    z = torch.randn(1, 4, h, h, generator=g).to(device, dtype)

    jobs = {
        f"guided UNet step (batch 2, {h}x{h} latent)": (
            lambda: ours.unet(x, t, ctx), lambda: ref.unet(x, t, encoder_hidden_states=ctx).sample),
        f"VAE decode (1x4x{h}x{h} -> {args.size}x{args.size})": (
            lambda: ours.vae.decode(z), lambda: ref.vae.decode(z).sample),
        f"sample {args.steps} PNDM steps at {args.size}, guidance 4": (
            lambda: ours("small left pleural effusion", steps=args.steps, guidance=4.0, scheduler="pndm",
                         height=args.size, width=args.size, progress=False),
            lambda: ref("small left pleural effusion", num_inference_steps=args.steps, guidance_scale=4.0,
                        height=args.size, width=args.size, generator=torch.Generator("cpu").manual_seed(0),
                        output_type="pt")),
    }
    rows = []
    with torch.inference_mode():
        for name, (mine, theirs) in jobs.items():
            print(f"timing {name} ...", flush=True)
            (tm, mm), (td, md) = compare(mine, theirs, device, args.repeats)
            rows.append((name, f"{tm:.3f} s", f"{td:.3f} s", f"{tm / td:.2f}",
                         f"{mm / 2**20:.0f} MiB", f"{md / 2**20:.0f} MiB"))
    title = f"Sampling, SD v1.5 size, {machine()}, {args.dtype}, torch {torch.__version__}"
    header = ("what", "minroentgen", "diffusers", "ratio", "peak extra mem (ours)", "peak extra mem (diffusers)")
    write_results(title, rows, header, save=not args.no_write)


if __name__ == "__main__":
    main()
