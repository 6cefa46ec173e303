"""Fine-tune Stable Diffusion on chest X-rays and their reports, as RoentGen did (Chambon et al. 2022).

The defaults are the paper's: 512x512 frontal images with their impressions, bf16, a global batch of 256,
60k steps, VAE frozen; give it SD v1.4 as --weights and add --train-text-encoder for its best variants.

  python train.py --data mimic-cxr-jpg/ --weights ~/models/sd-v1-4 --train-text-encoder --out runs/roentgen
  torchrun --nproc_per_node=8 train.py --data mimic-cxr-jpg/ --weights ~/models/sd-v1-4 --out runs/roentgen
  python -m minroentgen.phantoms --n 2000 --size 64 --out phantoms      # then, on a laptop CPU:
  python train.py --data phantoms/reports.csv --init tiny --resolution 32 --batch-size 16 --max-steps 2000 \\
                  --lr 1e-3 --warmup 100 --out runs/tiny
  python sample.py "small left pleural effusion" --weights runs/tiny/final

Real data (each a separate download; nothing is fetched at run time):
  MIMIC-CXR  the images: MIMIC-CXR-JPG v2.0.0 (PhysioNet, credentialed): --data is its folder, holding
             files/, mimic-cxr-2.0.0-metadata.csv.gz and mimic-cxr-2.0.0-split.csv.gz. The reports are
             not in it: mimic-cxr-reports.zip of MIMIC-CXR v2.0.0 (PhysioNet), given as --reports (the zip,
             read in place, or the folder it unpacks to); a zip or unpacked files/ in --data is found too.
  Open-I     NLMCXR_png.tgz (images) and NLMCXR_reports.tgz (ecgen-radiology/*.xml) from
             openi.nlm.nih.gov, unpacked into one folder given as --data. The views: --view-table
             nlmcxr_dicom_metadata.csv.gz (in the torchxrayvision package's data/ folder), optionally
             followed by nlmcxr_tsne_pa.csv.gz to name the views the DICOM headers leave blank.
"""
import argparse
import json
import math
import os
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from minroentgen import pipeline
from minroentgen import training as T
from minroentgen.data import read_pairs
from minroentgen.dataset import ImageReportDataset, default_workers
from minroentgen.pipeline import StableDiffusion
from minroentgen.noise_schedule import NoiseSchedule

# how long a process waits in a collective, e.g. while rank 0 alone writes a checkpoint (about 16 GB
# at SD size with the text encoder) or samples the validation prompts; torch's default is 10 minutes
DIST_TIMEOUT = timedelta(hours=1)
VAL_PROMPTS = ["No acute cardiopulmonary process.", "Small left pleural effusion.",
               "Large right pneumothorax.", "Cardiomegaly with mild pulmonary edema."]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="train.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--data", required=True, help="a .csv/.jsonl file (image, report columns), a MIMIC-CXR-JPG folder "
      "or an Open-I folder")
    a("--dataset", choices=["csv", "mimic-cxr", "openi"], help="the layout of --data (default: inferred from it)")
    a("--split", default="train", choices=["train", "validate", "test"],
      help="MIMIC-CXR only: the official split to train on (default train)")
    a("--reports", help="MIMIC-CXR only: mimic-cxr-reports.zip (MIMIC-CXR v2.0.0; read without unpacking) or the "
      "folder it unpacks to (default: reports in --data, or --data/mimic-cxr-reports.zip)")
    a("--view-table", nargs="+", metavar="CSV", help="Open-I only: keep the images these tables call PA or AP: "
      "nlmcxr_dicom_metadata.csv.gz from torchxrayvision (imageid, 'View Position'); a blank view is unknown and "
      "dropped unless a later table names it, e.g. its nlmcxr_tsne_pa.csv.gz (views by image clustering)")
    a("--crop", choices=["pad", "center"], default="pad", help="how an image becomes square: pad = zero-pad the "
      "short side, keeping the whole chest (default, as RoentGen-v2); center = cut the long side, losing chest "
      "wall, apices or costophrenic angles (a median 18%% of Open-I frontal images)")
    a("--strict", action="store_true", help="stop at the first bad image-report pair instead of skipping it")
    a("--prompt-template", metavar="TEMPLATE", help="train on prompts filled from this template, not the report "
      "alone: {report} is the impression; {age} (whole years), {sex} (female/male) and {race} (WHITE, BLACK, "
      "ASIAN, HISPANIC or OTHER) come from a table's columns (age or anchor_age; sex or gender, F/M; race) or, "
      "for MIMIC-CXR, from --demographics; a table's other columns are fields as written. RoentGen-v2's: "
      "\"{age} year old {race} {sex}. {report}\". A pair missing a field is skipped and counted (--strict: an "
      "error). Saved in final/sampling.json as prompt_template")
    a("--demographics", metavar="DIR", help="MIMIC-CXR with --prompt-template: MIMIC-IV (PhysioNet, credentialed), "
      "its folder or its hosp/ folder, holding patients.csv.gz (gender; anchor_age, the age RoentGen-v2 writes) "
      "and admissions.csv.gz (race: of a patient's admissions, the most frequent known race)")
    a("--weights", help="start from these weights: anything sample.py --weights loads (the paper: SD v1.4)")
    a("--config", help="with a single-file --weights: a diffusers folder whose configs describe its architecture "
      "where the tensor shapes cannot (as sample.py --config)")
    a("--init", choices=T.PRESET_NAMES, help="start from random weights of a named config instead (train from scratch)")
    a("--vae", help="with --init: a VAE trained by train_vae.py (its --out, or any diffusers vae/ folder) "
      "instead of the preset's random one; it stays frozen")
    a("--out", required=True, help="output folder: checkpoint-NNNNNN/, final/, samples/, log.jsonl")
    a("--resume", nargs="?", const="latest", help="continue from the latest checkpoint in --out, or from the "
      "checkpoint folder given; the weights then come from it (a --weights/--init also given is not used)")
    a("--max-steps", type=int, default=60000, help="optimizer steps in all (default 60000: the paper's best models)")
    a("--batch-size", type=int, default=256, help="global batch: images per optimizer step over all processes "
      "(default 256, the paper's; an A100 held 8 images at 512 in bf16)")
    a("--micro-batch-size", type=int, help="images per process per forward pass; the rest is gradient "
      "accumulation, batch = micro x accumulation x processes (default: the largest divisor of "
      "batch / processes up to 8 x (512 / resolution)^2: the paper's 8 per A100 at 512, as many "
      "pixels at other sizes; lower it, or add --gradient-checkpointing, if a GPU runs out of memory)")
    a("--resolution", type=int, default=512, help="image side in pixels (default 512, the paper's)")
    a("--train-text-encoder", action="store_true", help="train the CLIP text encoder too (the paper's best variants)")
    a("--freeze-unet", action="store_true", help="with --train-text-encoder: train only the text encoder, the "
      "UNet frozen (the paper's text-encoder-only variant; experiments/finetune_parts.py)")
    a("--lr", type=float, default=1e-5, help="peak AdamW learning rate (default 1e-5: RoentGen-v2's published "
      "recipe; the v1 paper does not publish its learning rate)")
    a("--lr-schedule", choices=["cosine", "constant"], default="cosine",
      help="after warm-up (default cosine, RoentGen-v2)")
    a("--warmup", type=int, default=500, help="linear warm-up steps (default 500, RoentGen-v2)")
    a("--weight-decay", type=float, default=1e-2, help="AdamW weight decay (default 1e-2, RoentGen-v2)")
    a("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm to this (default 1.0)")
    a("--ema-decay", type=float, default=0.9999, help="EMA of the trained weights; final/ holds the EMA weights; "
      "0 turns it off (default 0.9999, as Stable Diffusion's training)")
    a("--snr-gamma", type=float, help="Min-SNR loss weighting min(SNR, gamma) / SNR (Hang et al. 2023; 5 is "
      "their choice): less weight on the nearly clean timesteps, faster learning of what the text controls "
      "(default: off, the plain MSE of the paper)")
    a("--zero-snr", action="store_true", help="switch the noise schedule to zero terminal SNR with v-prediction "
      "(Lin et al. 2024; saved in the scheduler config, sampled with DDIM from t = 999): SD's schedule ends with "
      "a little signal left, which samples started from pure noise lack, so they come out washed out. "
      "Use it with the plain loss: Min-SNR gives the pure-noise step no weight")
    a("--text-dropout", type=float, default=0.1, help="probability of training on the empty prompt, so that "
      "classifier-free guidance keeps a matching unconditional model (default 0.1: Stable Diffusion v1 was "
      "trained with 10%% text dropping, per its model card; the RoentGen paper does not say)")
    a("--text-augment", type=float, default=0.0, help="probability that a report sentence gets a random "
      "vocabulary word inserted, two words swapped or its words shuffled (EDA, Wei & Zou 2019): teaches the text "
      "encoder to read findings from their words, not one word order, and to pass over words it never saw "
      "(default 0: the reports as written, as in the paper)")
    a("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto", help="autocast dtype; weights "
      "stay fp32 (default auto: bf16 on GPUs with native bf16 as in the paper, fp16 on older ones "
      "such as V100/T4, fp32 on CPU); fp16 uses a gradient scaler")
    a("--gradient-checkpointing", action="store_true",
      help="recompute activations in the backward pass: less memory, slower")
    a("--compile", action="store_true", help="torch.compile the UNet (and the trained text encoder): faster "
      "steps after a first one that compiles (minutes at SD size); without CUDA graphs, which DDP and "
      "gradient accumulation do not suit")
    a("--cache-latents", action="store_true", help="keep each image's VAE posterior in memory after its first "
      "use, so the VAE encodes every image once and the loaders decode it once (same losses as without; memory: "
      "8 x (R/8)^2 numbers an image, 64 KB at 512 in bf16)")
    a("--seed", type=int, default=0,
      help="seeds data order, noise, timesteps and --init weights: a run repeats exactly (default 0)")
    a("--save-every", type=int, default=1000, help="write a checkpoint every N steps (default 1000)")
    a("--keep", type=int, default=2, help="keep the last N checkpoints, 0 = all (default 2)")
    a("--sample-every", type=int, default=1000, help="sample the validation prompts every N steps, 0 = only at the end (default 1000)")
    a("--val-prompts", nargs="*", default=VAL_PROMPTS,
      help="validation prompts, one image each with seed 0, 1, ..., into OUT/samples/ (default: four, from "
      "a normal study to cardiomegaly with edema); give the flag with no prompt to skip sampling")
    a("--val-steps", type=int, default=25, help="DDIM steps for the validation samples (default 25)")
    a("--log-every", type=int, default=10, help="log loss, learning rate, images/s every N steps (default 10)")
    a("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default auto: CUDA if there is one")
    a("--num-workers", type=int, help="data loading processes per training process (default: the CPU cores "
      "this process may use, shared among the training processes on this machine, minus one for itself)")
    args = p.parse_args(argv)
    if args.resume is None and (not args.weights) == (args.init is None):
        p.error("give exactly one of --weights PATH (e.g. SD v1.4) and --init PRESET (random weights)")
    if args.vae is not None and not args.init:
        p.error("--vae replaces the random VAE of --init PRESET; --weights and --resume bring their own VAE")
    if args.freeze_unet and not args.train_text_encoder:
        p.error("--freeze-unet trains only the text encoder: give --train-text-encoder too")
    if args.demographics is not None and args.prompt_template is None:
        p.error("--demographics fills the fields of --prompt-template; give it too, e.g. "
                "--prompt-template \"{age} year old {race} {sex}. {report}\"")
    if args.val_steps > 1000:
        p.error(f"--val-steps must be at most 1000 (the training timesteps), got {args.val_steps}")
    for flag in ("out", "vae", "resume", "weights", "config"):
        if getattr(args, flag) == "":
            p.error(f"--{flag} is empty; give a path")
    T.check_ranges(p, args, at_least_1=("max_steps", "batch_size", "resolution", "save_every", "log_every",
                                        "val_steps", "micro_batch_size"),
                   at_least_0=("keep", "sample_every", "warmup", "weight_decay", "num_workers"),
                   positive=("lr", "max_grad_norm", "snr_gamma"))
    for flag, value in (("--text-dropout", args.text_dropout), ("--text-augment", args.text_augment)):
        if not 0 <= value <= 1:
            p.error(f"{flag} is a probability: it must be in [0, 1], got {value}")
    if not 0 <= args.ema_decay < 1:
        p.error(f"--ema-decay must be in [0, 1) (0 turns the EMA off), got {args.ema_decay}")
    return args


def error(message: str):
    sys.exit(f"train.py: error: {message}")


class StopFlag:
    """Ctrl-C (or SIGTERM, which torchrun and cluster schedulers send) once: finish the step (with
    several processes: the next --log-every step, so that all stop at the same one), save a
    checkpoint, exit. Ctrl-C twice: abort at once."""

    def __init__(self):
        self.asked = False

    def __call__(self, signum, frame):
        if self.asked and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.asked = True
        tqdm.write("interrupted: saving a checkpoint after this step (Ctrl-C again to abort)")


def main(argv=None):
    args = parse_args(argv)
    warnings.showwarning = lambda message, *_, **__: print(f"train.py: warning: {message}", file=sys.stderr)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        error("--device cuda, but this torch build sees no CUDA GPU; use --device cpu")
    if cuda and local_rank >= (gpus := torch.cuda.device_count()):
        error(f"process {local_rank} on this machine has no GPU of its own ({gpus} here); "
              f"start at most {gpus} (torchrun --nproc_per_node {gpus})")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    pipeline.cuda_speedups(device)
    if world > 1:  # started by torchrun: one process per GPU (or several on the CPU)
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=DIST_TIMEOUT)
    try:
        train(args, device, world, rank)
    finally:
        if world > 1:
            dist.destroy_process_group()


def train(args, device, world, rank):
    out, G = Path(args.out), args.batch_size
    if G % world:
        error(f"--batch-size {G} is not a multiple of the {world} processes")
    micro = args.micro_batch_size or T.default_micro_batch(G // world, args.resolution)
    if G % (micro * world):
        error(f"--batch-size {G} is not a multiple of --micro-batch-size {micro} x {world} processes")
    accumulation = G // (micro * world)
    precision, autocast, scaler = T.mixed_precision(args.precision, device)
    log = print if rank == 0 else (lambda *a: None)

    resume = state = ema_state = None
    try:
        T.check_out(out, args.resume)
        if args.resume:
            resume, state, ema_state = T.find_resume(out, args.resume, args.max_steps)
        source = resume or args.weights
        if source:
            sd = StableDiffusion.from_pretrained(source, args.config, device)
        else:
            vae_model = T.load_vae(args.vae, device) if args.vae else None
            sd = T.random_model(args.init, args.resolution, args.seed, device, vae_model)
        pairs = read_pairs(args.data, args.dataset, args.split, args.view_table, args.reports, args.demographics)
        dataset = ImageReportDataset(pairs, args.resolution, sd.tokenizer, args.strict, crop=args.crop,
                                     template=args.prompt_template)
    except ValueError as e:  # WeightsError included
        error(str(e))
    if resume and (was := sd.defaults.prompt_template) != args.prompt_template:
        how = f"with --prompt-template {was!r}" if was else "without --prompt-template"
        error(f"--resume: {resume} was trained {how}; give the same")
    sd.defaults = replace(sd.defaults, prompt_template=args.prompt_template)  # into every sampling.json
    log(dataset.summary())
    if args.prompt_template:
        log(f"prompts from --prompt-template, e.g. {dataset.pairs[0].report!r}")
    if args.zero_snr and not resume:  # the checkpoints then carry the new schedule (a resume keeps it)
        sd.scheduler_config = replace(sd.scheduler_config, rescale_betas_zero_snr=True, prediction_type="v_prediction",
                                      timestep_spacing="trailing", class_name="DDIMScheduler")
        if sd.defaults.scheduler == "pndm":
            sd.defaults = replace(sd.defaults, scheduler="ddim")

    # Train the UNet (and the text encoder); the VAE stays frozen (LDM Sec. 3.3, RoentGen).
    trained = ([] if args.freeze_unet else [sd.unet]) + ([sd.text_encoder] if args.train_text_encoder else [])
    for m in trained:
        m.train().requires_grad_(True)
        m.gradient_checkpointing = args.gradient_checkpointing
        if args.compile:
            m.compile()  # in place: parameter names and checkpoints stay as they are
    schedule = NoiseSchedule(sd.scheduler_config)
    denoiser = T.Denoiser(sd.unet, sd.text_encoder, schedule, args.train_text_encoder, args.snr_gamma)
    model = denoiser
    if world > 1:  # gradients of the UNet and the text encoder are averaged over processes in backward,
        # in place in DDP's all-reduce buckets (no second copy of the gradients)
        model = DistributedDataParallel(denoiser, device_ids=[device] if device.type == "cuda" else None,
                                        gradient_as_bucket_view=True)
    params = [p for p in denoiser.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, fused=device.type == "cuda")
    # only rank 0 samples and saves, so only it keeps the EMA weights
    ema = T.EMA(denoiser, args.ema_decay) if args.ema_decay > 0 and rank == 0 else None
    start = 0
    if resume:
        if (state["batch_size"], state["seed"]) != (G, args.seed):
            error(f"--resume: {resume} was trained with --batch-size {state['batch_size']} --seed {state['seed']}; "
                  "use the same values to continue its data order")
        try:
            T.load_optimizer(opt, scaler, state)
            if ema is not None:
                ema.load_state_dict(ema_state if ema_state is not None else {})
        except ValueError as e:
            error(f"--resume: {resume} does not fit this run ({e}); use the same --train-text-encoder, "
                  "--freeze-unet and --ema-decay")
        start = state["step"]
        state = ema_state = None  # their copies in CPU memory (about 12 GB at SD size) are not needed now
        log(f"resuming from {resume} at step {start}")
    log(f"training {sum(p.numel() for p in params) / 1e6:.1f}M parameters; batch {G} = {micro} x {accumulation} "
        f"accumulation x {world} processes; {precision} on {device}")

    f = sd.vae.config.downsample_factor
    latent_shape = (sd.vae.config.latent_channels, args.resolution // f, args.resolution // f)
    data = T.PositionDataset(dataset, sd.tokenizer, args.seed, latent_shape,
                             schedule.config.num_train_timesteps, args.text_dropout, args.text_augment)
    sampler = T.StepSampler(start, micro, accumulation, world, rank)
    cache = {} if args.cache_latents else None
    if cache is not None:  # workers skip decoding images whose latents are cached (shared memory flags)
        dataset.skip_pixels = torch.zeros(len(dataset), dtype=torch.bool).share_memory_()
    workers = default_workers() if args.num_workers is None else args.num_workers
    batches = iter(torch.utils.data.DataLoader(data, batch_sampler=sampler, num_workers=workers,
                                               pin_memory=device.type == "cuda"))

    def on_rank_0(work, *work_args):
        """work(*work_args) on rank 0 while the others wait (up to DIST_TIMEOUT); if it returns an
        error message, every process stops."""
        problem = work(*work_args) if rank == 0 else None
        if world > 1:
            failed = torch.tensor(float(problem is not None), device=device)
            dist.all_reduce(failed)
            if failed.item() and rank != 0:
                error("stopped: rank 0 failed (its message is above)")
        if problem:
            error(problem)

    def write_checkpoint(step):
        state = {"step": step, "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                 "batch_size": G, "seed": args.seed, "args": json.dumps(vars(args))}
        T.save_checkpoint(T.checkpoint_path(out, step), sd, ema, state, args.keep)

    def save(step):
        if problem := T.blown_up(params, step, out):
            error(problem)
        on_rank_0(write_checkpoint, step)

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    stop = StopFlag()
    previous_handlers = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    bar = tqdm(total=args.max_steps, initial=start, disable=rank != 0, desc="training")
    step, t_log, step_log, stopping = start, time.time(), start, False
    try:  # the device runs ahead of this loop: only a --log-every step waits for it (.tolist())
        while step < args.max_steps and not stopping:
            lr = args.lr * T.lr_factor(step, args.warmup, args.max_steps, args.lr_schedule)
            for group in opt.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for k in range(accumulation):
                b = next(batches)
                x = {key: v.to(device, non_blocking=True) for key, v in b.items() if key != "index"}
                with autocast:
                    latents = T.encode_latents(sd.vae, x["pixel_values"], b["index"].tolist(),
                                               x["posterior_eps"], cache)
                if cache is not None:
                    dataset.skip_pixels[b["index"]] = True  # set after caching: a worker never skips too early
                # the gradients are averaged over processes only after the last micro-batch
                sync = model.no_sync() if world > 1 and k < accumulation - 1 else nullcontext()
                with sync:
                    with autocast:
                        loss = model(latents, x["input_ids"], x["noise"], x["timestep"])
                    scaler.scale(loss / accumulation).backward()
                loss_sum += loss.detach() / accumulation
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=world == 1)  # under DDP the gradients stay views of its buckets
            if ema is not None:
                ema.update(denoiser, step)
            step += 1
            bar.update()
            if step % args.log_every == 0 or step == args.max_steps:
                totals = torch.stack([loss_sum, torch.full_like(loss_sum, stop.asked)])
                if world > 1:  # the loss summed over processes; all stop if one was asked to
                    dist.all_reduce(totals)
                loss_value, asked = totals.tolist()
                loss_value /= world  # the mean over the global batch
                stopping = asked > 0
                if not math.isfinite(loss_value):
                    kept = T.latest_checkpoint(out)
                    error(f"loss is {loss_value} at step {step}; stopped without saving (last good "
                          f"checkpoint: {kept or 'none'}); try a lower --lr or --precision fp32/bf16")
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
                if rank == 0:
                    now = time.time()
                    speed = G * (step - step_log) / max(now - t_log, 1e-9)
                    record = {"step": step, "loss": loss_value, "lr": lr, "images_per_second": speed,
                              "time": now}
                    T.append_log(out / "log.jsonl", record)
                    tqdm.write(f"step {step}: loss {loss_value:.4f}, lr {lr:.2e}, {speed:.1f} img/s")
                    t_log, step_log = now, step
            if step % args.save_every == 0 and step < args.max_steps:
                save(step)
            if args.sample_every and step % args.sample_every == 0 and step < args.max_steps:
                on_rank_0(validate, sd, denoiser, ema, args, step, autocast)
            if world == 1:
                stopping = stop.asked
    except torch.cuda.OutOfMemoryError:
        error(f"out of GPU memory at --micro-batch-size {micro} ({args.resolution} px); give a smaller one "
              f"(gradient accumulation keeps the batch at {G}) or add --gradient-checkpointing")
    finally:
        bar.close()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    if step > start or T.latest_checkpoint(out) != T.checkpoint_path(out, step):
        save(step)
    if step < args.max_steps:
        log(f"stopped at step {step}; continue with the same command and --resume")
        return
    if rank == 0:
        if problem := validate(sd, denoiser, ema, args, step, autocast):
            error(problem)
        with ema.applied(denoiser) if ema is not None else nullcontext():
            sd.save_pretrained(out / "final")
        log(f"wrote {out / 'final'} (python sample.py --weights {out / 'final'} \"your prompt\")")


def validate(sd, denoiser, ema, args, step, autocast) -> str | None:
    """Sample the validation prompts (seed i for prompt i, DDIM) with the EMA weights into a grid;
    an error message if the samples hold NaN or infinity."""
    if not args.val_prompts:
        return None
    trained = [m for m in (sd.unet, sd.text_encoder) if m.training]
    for m in trained:
        m.eval()
    try:
        with ema.applied(denoiser) if ema is not None else nullcontext(), autocast:
            images = torch.cat([sd(prompt, seed=i, steps=args.val_steps, scheduler="ddim",
                                   height=args.resolution, width=args.resolution, progress=False)
                                for i, prompt in enumerate(args.val_prompts)])
    except ValueError:  # the pipeline refuses samples that are not finite
        return (f"the validation samples at step {step} hold NaN or infinity: the model diverged or "
                f"overflowed (last checkpoint: {T.latest_checkpoint(args.out) or 'none'}); try a lower "
                "--lr or --precision fp32/bf16")
    for m in trained:
        m.train()
    T.save_grid(images, Path(args.out) / "samples" / f"step-{step:06d}.png", cols=min(4, len(images)))
    return None


if __name__ == "__main__":
    main()
