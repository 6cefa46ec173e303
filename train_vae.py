"""Train the autoencoder of a latent diffusion model from scratch: LDM's "first stage" (Rombach et al.
2022, Sec. 3.1 and App. G), on the images of an image-report dataset (the reports are not used).

LDM trained its KL autoencoders on L1 + LPIPS + a patch GAN (Esser et al. 2021, VQGAN) plus a KL term
of weight 1e-6. This script keeps the two cheap terms, for a posterior sample z = mean + std * eps:

    loss = |x - D(z)|_1 / (3 H W)  +  kl_weight * KL(q(z|x) || N(0, I)) / (3 H W)     (mean over the batch)

L1, as LDM's pixel term: L2 is minimised by the mean of the plausible images and blurs edges more
(Isola et al. 2017, pix2pix, Sec. 3.1). The perceptual and adversarial terms are left out: LPIPS needs a
pretrained VGG that cannot be downloaded here, and a GAN is a second network with its own schedule and
tricks; the price is blurrier fine texture than SD's VAE. LDM sums both terms over an image's pixels;
dividing both by the 3 H W pixel values keeps LDM's kl_weight and logs a per-pixel L1 (Adam does not see
a constant factor of the loss). The checkpoints and the final DIR/vae/ carry the latents' scaling factor,
1 / std of posterior samples of the first images (LDM Sec. 4.3.2, App. D.1 and G: SD's 0.18215).

AdamW at 1e-3 after a linear warm-up, cosine to 0. LDM's rate, 4.5e-6 per image of the global batch
(7.2e-5 at batch 16), was set for long runs with a GAN; from scratch without one it is slow: the L1 of
the tiny VAE on 16 phantoms after 100 steps is 0.27, 0.15, 0.11, 0.10 at 7.2e-5, 3e-4, 1e-3, 3e-3.

  python -m minroentgen.phantoms --n 2000 --size 128 --out phantoms128
  python train_vae.py --data phantoms128/reports.csv --init small --resolution 128 --out runs/vae
  python train.py --data phantoms128/reports.csv --init small --vae runs/vae --resolution 128 ... --out runs/ldm

--decoder-only fine-tunes the decoder of a trained VAE and keeps its encoder, hence the latent space and
its scaling factor, fixed: a diffusion model trained on its latents stays valid and may train meanwhile
(as Stability AI's sd-vae-ft-ema/ft-mse decoders were made for Stable Diffusion v1).
"""
import argparse
import json
import math
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from minroentgen import pipeline, vae
from minroentgen import checkpoints as C
from minroentgen import optimization as O
from minroentgen import training as T
from minroentgen.configs import VAE_PRESETS
from minroentgen.data import read_pairs
from minroentgen.dataset import ImageReportDataset, default_workers
from minroentgen.trainer import check_ranges


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="train_vae.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--data", required=True, help="a .csv/.jsonl file (image, report columns), a MIMIC-CXR-JPG or Open-I folder")
    a("--dataset", choices=["csv", "mimic-cxr", "openi"], help="the layout of --data (default: inferred from it)")
    a("--split", default="train", choices=["train", "validate", "test"],
      help="MIMIC-CXR only: the official split to train on (default train); no reports are needed")
    a("--view-table", nargs="+", metavar="CSV", help="Open-I only: keep frontal images, as train.py --view-table")
    a("--crop", choices=["pad", "center"], default="pad",
      help="pad (zero-pad to square, keeping the whole chest; default) or center (cut the long side), as train.py")
    a("--init", choices=sorted(VAE_PRESETS), help="start from random weights of a named VAE config (minroentgen/configs.py "
      "VAE_PRESETS): sd15 is SD's (84M parameters, downsampling f = 8), small the embedded default's (2.7M, f = 4), "
      "tiny the tests' (0.7M, f = 2)")
    a("--weights", help="start from a trained VAE instead: a diffusers vae/ folder or a folder holding one")
    a("--out", required=True, help="output folder: vae/ (the result), checkpoint-NNNNNN/, samples/, log.jsonl")
    a("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    a("--max-steps", type=int, default=20000, help="optimizer steps (default 20000)")
    a("--batch-size", type=int, default=16, help="images per step (default 16)")
    a("--resolution", type=int, default=128, help="image side in pixels (default 128)")
    a("--lr", type=float, default=1e-3, help="peak AdamW learning rate (default 1e-3, see above)")
    a("--warmup", type=int, default=200, help="linear warm-up steps, then a cosine decay (default 200)")
    a("--decoder-only", action="store_true", help="with --weights: train only the decoder (and post_quant_conv); "
      "the encoder, the latents and their scaling factor stay as they are (see above)")
    a("--kl-weight", type=float, default=1e-6, help="weight of the KL term (default 1e-6: LDM's KL-f4/f8 models)")
    a("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm to this (default 1.0)")
    a("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto", help="autocast dtype; "
      "weights stay fp32 (default auto: bf16 on GPUs with native bf16, fp16 with a gradient scaler on "
      "older ones, fp32 on CPU), as train.py")
    a("--gradient-checkpointing", action="store_true", help="recompute each encoder and decoder block in the "
      "backward pass: less memory (an SD-sized VAE at 512), slower")
    a("--seed", type=int, default=0, help="seeds data order, posterior noise and --init weights: a run repeats exactly (default 0)")
    a("--save-every", type=int, default=1000, help="write a checkpoint every N steps (default 1000)")
    a("--keep", type=int, default=2, help="keep the last N checkpoints, 0 = all (default 2)")
    a("--sample-every", type=int, default=500, help="save inputs above reconstructions every N steps (default 500)")
    a("--log-every", type=int, default=10, help="log the losses every N steps (default 10)")
    a("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default auto: CUDA if there is one")
    a("--num-workers", type=int, help="data loading processes (default: the CPU cores this process may use, minus one)")
    args = p.parse_args(argv)
    if not args.resume and (args.init is None) == (not args.weights):
        p.error("give exactly one of --init PRESET (random weights) and --weights VAE_FOLDER")
    if args.decoder_only and args.init:
        p.error("--decoder-only keeps a trained encoder: give --weights VAE_FOLDER instead of --init")
    for flag in ("out", "weights"):
        if getattr(args, flag) == "":
            p.error(f"--{flag} is empty; give a path")
    check_ranges(p, args, at_least_1=("max_steps", "batch_size", "resolution", "save_every", "sample_every",
                                      "log_every"),
                 at_least_0=("keep", "warmup", "kl_weight", "num_workers"), positive=("lr", "max_grad_norm"))
    return args


def error(message: str):
    sys.exit(f"train_vae.py: error: {message}")


class Images(T.PositionDataset):
    """Position p -> {"pixel_values" (3, R, R), "eps" (C, h, w)}: the image and the noise of its posterior
    sample depend only on (seed, p), as in train.py, so a run repeats exactly and resumes at any step."""

    def __getitem__(self, p: int) -> dict:
        eps = torch.randn(self.latent_shape, generator=T.generator(self.seed, "sample", p))
        return {"pixel_values": self.dataset[self.index(p)]["pixel_values"], "eps": eps}


class VAEFolder:
    """What `checkpoints.save_checkpoint` needs of a model: `save_pretrained(folder)`, here writing folder/vae/."""

    def __init__(self, model):
        self.model = model

    def save_pretrained(self, folder):
        C.save_vae(Path(folder) / "vae", self.model)


def vae_loss(model, x, eps, kl_weight: float, train_encoder: bool = True):
    """The loss above, the per-pixel L1 and the KL (per image) of a batch x (B, 3, H, W), noise eps (B, C, h, w)."""
    with torch.set_grad_enabled(train_encoder):  # a frozen encoder: its KL is a constant
        posterior = model.encode(x)
    reconstruction = model.decode(posterior.mean + posterior.std * eps)  # (B, 3, H, W)
    l1 = (reconstruction.float() - x).abs().mean()  # in fp32 under autocast too
    kl = posterior.kl().float().mean()
    return l1 + kl_weight * kl / x[0].numel(), l1, kl


@torch.no_grad()
def scaling_factor(model, dataset, batch_size: int, device, batches: int = 4) -> float:
    """1 / std of posterior samples z ~ q(z|x) over the first `batches` batches of images (LDM App. G)."""
    n, g = min(len(dataset), batches * batch_size), torch.Generator().manual_seed(0)
    z = [model.encode(torch.stack([dataset[j]["pixel_values"] for j in range(i, min(i + batch_size, n))]).to(device))
         .sample(g) for i in range(0, n, batch_size)]
    return 1.0 / torch.cat([t.flatten() for t in z]).std().item()


@torch.no_grad()
def reconstruct(model, x, path: Path) -> dict:
    """Save inputs (top row) above their reconstructions through the posterior mean; their L1 and PSNR."""
    reconstruction = model.decode(model.encode(x).mode()).clamp(-1, 1)
    C.save_grid(torch.cat([x, reconstruction]).cpu(), path, cols=len(x))
    mse = ((reconstruction - x) / 2).pow(2).mean().item()  # on the [0, 1] scale
    return {"val_l1": (reconstruction - x).abs().mean().item(), "val_psnr": 10 * math.log10(1 / max(mse, 1e-12))}


def main(argv=None):
    args = parse_args(argv)
    warnings.showwarning = lambda message, *_, **__: print(f"train_vae.py: warning: {message}", file=sys.stderr)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        error("--device cuda, but this torch build sees no CUDA GPU; use --device cpu")
    device, out = torch.device("cuda" if cuda else "cpu"), Path(args.out)
    pipeline.cuda_speedups(device)
    precision, autocast, scaler = O.mixed_precision(args.precision, device)
    try:
        C.check_out(out, args.resume)
        resume, state, _ = C.find_resume(out, True, args.max_steps) if args.resume else (None, None, None)
        if resume or args.weights:
            model = C.load_vae(resume or args.weights, device)
        else:
            with torch.random.fork_rng(devices=[]):  # nn.Module initialisers draw from the global generator
                torch.manual_seed(args.seed)
                model = vae.AutoencoderKL(replace(VAE_PRESETS[args.init], sample_size=args.resolution)).to(device)
        f = model.config.downsample_factor
        if args.resolution % f:
            raise ValueError(f"--resolution {args.resolution} is not a multiple of {f}, the VAE's downsampling")
        pairs = read_pairs(args.data, args.dataset, args.split, args.view_table)
        dataset = ImageReportDataset(pairs, args.resolution, needs_report=False, crop=args.crop)
    except ValueError as e:  # WeightsError included
        error(str(e))
    print(dataset.summary())
    model.train().requires_grad_(not args.decoder_only)
    for part in (model.decoder, model.post_quant_conv):
        part.requires_grad_(True)
    model.encoder.gradient_checkpointing = model.decoder.gradient_checkpointing = args.gradient_checkpointing
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=args.lr, fused=cuda)
    start = 0
    if resume:
        if (state["batch_size"], state["seed"]) != (args.batch_size, args.seed):
            error(f"--resume: {resume} was trained with --batch-size {state['batch_size']} --seed {state['seed']}; "
                  "use the same values to continue its data order")
        if state.get("decoder_only", False) != args.decoder_only:
            error(f"--resume: {resume} was trained {'with' if state.get('decoder_only') else 'without'} "
                  "--decoder-only; give the same to continue it")
        C.load_optimizer(opt, scaler, state)
        start = state["step"]
        print(f"resuming from {resume} at step {start}")
    latent_shape = (model.config.latent_channels, args.resolution // f, args.resolution // f)
    part = "its decoder" if args.decoder_only else "all"
    print(f"training a {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M-parameter VAE ({part}: "
          f"{sum(p.numel() for p in trained) / 1e6:.2f}M; latents {'x'.join(map(str, latent_shape))}) "
          f"in {precision} on {device}")

    data = Images(dataset, None, args.seed, latent_shape, 0, 0.0)
    batches = iter(torch.utils.data.DataLoader(data, batch_sampler=T.StepSampler(start, args.batch_size, 1, 1, 0),
                                               num_workers=default_workers() if args.num_workers is None else args.num_workers,
                                               pin_memory=cuda))
    shown = torch.stack([dataset[i]["pixel_values"] for i in range(min(8, len(dataset)))]).to(device)

    def save(step):  # the checkpoint's vae/config.json carries the scaling factor of its latents
        if problem := C.blown_up(trained, step, out):
            error(problem)
        if not args.decoder_only:
            model.config = replace(model.config, scaling_factor=scaling_factor(model, dataset, args.batch_size, device))
        state = {"step": step, "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                 "batch_size": args.batch_size, "seed": args.seed,
                 "decoder_only": args.decoder_only, "args": json.dumps(vars(args))}
        C.save_checkpoint(C.checkpoint_path(out, step), VAEFolder(model), None, state, args.keep)

    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=args.max_steps, initial=start, desc="training the VAE")
    step, t_log, step_log = start, time.time(), start
    try:  # the device runs ahead of this loop: only a step that logs waits for it (.tolist())
        while step < args.max_steps:
            lr = args.lr * O.lr_factor(step, args.warmup, args.max_steps, "cosine")
            for group in opt.param_groups:
                group["lr"] = lr
            b = next(batches)
            x, eps = (b[k].to(device, non_blocking=True) for k in ("pixel_values", "eps"))
            with autocast:
                loss, l1, kl = vae_loss(model, x, eps, args.kl_weight, not args.decoder_only)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(trained, args.max_grad_norm)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            step += 1
            bar.update()
            sample = step % args.sample_every == 0 or step == args.max_steps
            if step % args.log_every == 0 or sample:
                loss_value, l1_value, kl_value = torch.stack([loss, l1, kl]).tolist()
                if not math.isfinite(loss_value):
                    error(f"loss is {loss_value} at step {step}; stopped without saving (last good "
                          f"checkpoint: {C.latest_checkpoint(out) or 'none'}); try a lower --lr")
                bar.set_postfix(l1=f"{l1_value:.4f}", kl=f"{kl_value:.0f}", lr=f"{lr:.2e}")
                record = reconstruct(model, shown, out / "samples" / f"step-{step:06d}.png") if sample else {}
                now = time.time()
                record = {"step": step, "loss": loss_value, "l1": l1_value, "kl": kl_value, "lr": lr,
                          "images_per_second": args.batch_size * (step - step_log) / max(now - t_log, 1e-9),
                          "time": now, **record}
                C.append_log(out / "log.jsonl", record)
                t_log, step_log = now, step
            if step % args.save_every == 0 or step == args.max_steps:
                save(step)
    except torch.cuda.OutOfMemoryError:
        error(f"out of GPU memory at --batch-size {args.batch_size} ({args.resolution} px); give a "
              "smaller one or add --gradient-checkpointing")
    bar.close()
    C.save_vae(out / "vae", model)  # the last checkpoint's weights and scaling factor
    print(f"wrote {out / 'vae'}; scaling_factor = {model.config.scaling_factor:.5f} (1 / std of the latents, "
          f"in its config.json); next: python train.py --init PRESET --vae {out} ...")


if __name__ == "__main__":
    main()
