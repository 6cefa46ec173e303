"""Training speed and memory: one step of minroentgen's recipe vs the diffusers equivalent, same weights.

    python benchmarks/bench_train.py --size tiny                       # CPU, seconds
    python benchmarks/bench_train.py --size sd15 --resolution 256 --sequential   # CPU: both need ~28 GB together
    python benchmarks/bench_train.py --size sd15 --device cuda --precision bf16 --batch 8

One optimizer step = VAE encode (frozen) -> noise at random timesteps -> text encoder (frozen) -> UNet ->
MSE on the noise -> backward -> gradient clipping -> AdamW, as diffusers' train_text_to_image does it with
UNet2DConditionModel + DDPMScheduler + torch.optim.AdamW. minroentgen's step is `training.Denoiser`
with its own schedulers and models. Prints images per second, the ratio (minroentgen / diffusers: above
1 is faster) and the peak extra memory, and appends the table to benchmarks/RESULTS.md.
"""
import argparse
import gc
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import REFERENCE, check_args, compare, machine, measure, median_and_peak, sd15_configs, write_results  # noqa: E402

from minroentgen.pipeline import StableDiffusion  # noqa: E402
from minroentgen.configs import SchedulerConfig  # noqa: E402
from minroentgen.noise_schedule import NoiseSchedule  # noqa: E402
from minroentgen.tokenizer import CLIPTokenizer  # noqa: E402
from minroentgen.training import Denoiser  # noqa: E402


def configs(size: str) -> dict:
    if size == "tiny":
        return json.loads((REFERENCE / "tiny_test_configs.json").read_text())["sd1"]
    return {k: {n: v for n, v in c.items() if not n.startswith("_")}
            for k, c in sd15_configs().items() if k in ("unet", "vae", "text_encoder")}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny", choices=["tiny", "sd15"], help="model size (default tiny)")
    p.add_argument("--resolution", type=int, default=None, help="image side (default 32 tiny, 512 sd15)")
    p.add_argument("--batch", type=int, default=2, help="images per step (default 2)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="autocast dtype around the forward pass; weights stay fp32 (default fp32)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps; the median is shown (default 3)")
    p.add_argument("--compile", action="store_true", help="torch.compile both UNets (as train.py --compile); "
                   "the untimed first step compiles")
    p.add_argument("--sequential", type=int, nargs="?", const=2, default=0, metavar="ROUNDS",
                   help="build, time and free one implementation at a time, in ROUNDS alternating rounds (default 2) "
                   "after an untimed round, instead of holding both: for memory that cannot hold both models with "
                   "their AdamW states (full SD v1.5: about 14 GB each); the machine's load must stay steady")
    p.add_argument("--no-write", action="store_true", help="print only, do not append to RESULTS.md")
    args = p.parse_args()
    check_args(p, args, positive=("resolution", "batch", "repeats"))
    from diffusers import DDPMScheduler as RefDDPM
    from diffusers import StableDiffusionPipeline
    from oracle import diffusers_pipeline

    device = torch.device(args.device)
    res = args.resolution or (32 if args.size == "tiny" else 512)
    folder = Path(f"/tmp/minroentgen-bench-train-{args.size}")
    if not folder.exists():
        diffusers_pipeline(configs(args.size), perturb=0.0).save_pretrained(folder)
    g = torch.Generator("cpu").manual_seed(0)
    pixels = (torch.rand(args.batch, 3, res, res, generator=g) * 2 - 1).to(device)
    ids = CLIPTokenizer.from_folder(folder / "tokenizer")(["small left pleural effusion"] * args.batch).to(device)
    amp = dict(device_type=device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision),
               enabled=args.precision != "fp32")
    fused = {"fused": True} if device.type == "cuda" else {}

    def draws(z):
        return (torch.randn(z.shape, generator=g).to(device),
                torch.randint(0, 1000, (z.shape[0],), generator=g).to(device))

    def make_ours():
        ours = StableDiffusion.from_pretrained(folder, device=device)
        ours.unet.train().requires_grad_(True)
        if args.compile:
            ours.unet.compile()
        opt = torch.optim.AdamW(ours.unet.parameters(), lr=1e-5, weight_decay=1e-2, **fused)
        denoiser = Denoiser(ours.unet, ours.text_encoder, NoiseSchedule(SchedulerConfig()), train_text_encoder=False)

        def step():
            with torch.no_grad():
                z = ours.vae.encode(pixels).sample(g) * ours.vae.config.scaling_factor
            noise, t = draws(z)
            with torch.autocast(**amp):
                loss = denoiser(z, ids, noise, t)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(ours.unet.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    def make_ref():  # diffusers' train_text_to_image.py, without its data loading
        ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, local_files_only=True).to(device)
        ref_sched = RefDDPM.from_config(ref.scheduler.config)
        ref.unet.train().requires_grad_(True)
        if args.compile:
            ref.unet.compile()
        ref.vae.requires_grad_(False)
        ref.text_encoder.requires_grad_(False)
        opt = torch.optim.AdamW(ref.unet.parameters(), lr=1e-5, weight_decay=1e-2, **fused)

        def step():
            with torch.no_grad():
                z = ref.vae.encode(pixels).latent_dist.sample(g) * ref.vae.config.scaling_factor
            noise, t = draws(z)
            noisy = ref_sched.add_noise(z, noise, t)
            with torch.autocast(**amp):
                with torch.no_grad():
                    context = ref.text_encoder(ids)[0]
                pred = ref.unet(noisy, t, context).sample
                loss = F.mse_loss(pred.float(), noise.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(ref.unet.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    how = f"one at a time, {args.sequential} alternating rounds" if args.sequential else "alternated"
    print(f"timing one training step, {args.size} at {res}x{res}, batch {args.batch}, {how} ...", flush=True)
    if args.sequential:  # the untimed first round leaves both timed ones in memory a predecessor freed
        runs = {make_ours: [], make_ref: []}
        for i, make in enumerate([make_ref] + [make_ours, make_ref] * args.sequential):
            result = measure(make(), device, args.repeats if i else 1)
            gc.collect()  # this model and its optimizer state are gone before the next is built
            if i:
                runs[make].append(result)
        (tm, mm), (td, md) = median_and_peak(runs[make_ours]), median_and_peak(runs[make_ref])
    else:
        (tm, mm), (td, md) = compare(make_ours(), make_ref(), device, args.repeats)
    rows = [(f"{args.size} UNet step, batch {args.batch} at {res} ({how})", f"{args.batch / tm:.3g} img/s",
             f"{args.batch / td:.3g} img/s", f"{td / tm:.2f}", f"{mm / 2**20:.0f} MiB", f"{md / 2**20:.0f} MiB")]
    compiled = ", compiled" if args.compile else ""
    title = f"Training, {machine()}, {args.precision}{compiled}, torch {torch.__version__}"
    header = ("what", "minroentgen", "diffusers", "speed ratio", "peak extra mem (ours)", "peak extra mem (diffusers)")
    write_results(title, rows, header, save=not args.no_write)


if __name__ == "__main__":
    main()
