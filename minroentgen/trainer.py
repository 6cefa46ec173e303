"""train.py's training loop: RoentGen's fine-tuning (Chambon et al. 2022) of the UNet (and text
encoder) of a Stable Diffusion on image-report pairs, the VAE frozen.

Each optimizer step averages the loss of training.py's Denoiser (DDPM Algorithm 1) over the global
batch: micro-batches with gradient accumulation, one process or many (DistributedDataParallel); then
gradient clipping, AdamW, the EMA update (optimization.py). Checkpoints, the log and validation
samples go to --out (checkpoints.py); Ctrl-C saves a checkpoint that --resume continues exactly.
"""
import json
import math
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from . import checkpoints as C
from . import optimization as O
from . import training as T
from .data import read_pairs
from .dataset import ImageReportDataset, default_workers
from .noise_schedule import NoiseSchedule
from .pipeline import StableDiffusion
from .prompts import template_fields


def error(message: str):
    """train.py's one-line error: the message on stderr, exit status 1."""
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


def train(args, device, world, rank):
    """The run train.py's flags `args` ask for, in this process (`rank` of `world`) on `device`."""
    out, G = Path(args.out), args.batch_size
    if G % world:
        error(f"--batch-size {G} is not a multiple of the {world} processes")
    micro = args.micro_batch_size or O.default_micro_batch(G // world, args.resolution)
    if G % (micro * world):
        error(f"--batch-size {G} is not a multiple of --micro-batch-size {micro} x {world} "
              "processes")
    accumulation = G // (micro * world)
    precision, autocast, scaler = O.mixed_precision(args.precision, device)
    log = print if rank == 0 else (lambda *a: None)

    resume = state = ema_state = None
    try:
        C.check_out(out, args.resume)
        if args.resume:
            resume, state, ema_state = C.find_resume(out, args.resume, args.max_steps)
        source = resume or args.weights
        if source:
            sd = StableDiffusion.from_pretrained(source, args.config, device)
        else:
            vae_model = C.load_vae(args.vae, device) if args.vae else None
            sd = T.random_model(args.init, args.resolution, args.seed, device, vae_model)
        pairs = read_pairs(args.data, args.dataset, args.split, args.view_table, args.reports,
                           args.demographics)
        dataset = ImageReportDataset(pairs, args.resolution, sd.tokenizer, args.strict,
                                     crop=args.crop, template=args.prompt_template)
    except ValueError as e:  # WeightsError included
        error(str(e))
    if resume and (was := sd.defaults.prompt_template) != args.prompt_template:
        how = f"with --prompt-template {was!r}" if was else "without --prompt-template"
        error(f"--resume: {resume} was trained {how}; give the same")
    # into every sampling.json
    sd.defaults = replace(sd.defaults, prompt_template=args.prompt_template)
    log(dataset.summary())
    if args.prompt_template:
        log(f"prompts from --prompt-template, e.g. {dataset.pairs[0].report!r}")
    # the checkpoints then carry the new schedule (a resume keeps it)
    if args.zero_snr and not resume:
        sd.scheduler_config = replace(sd.scheduler_config, rescale_betas_zero_snr=True,
                                      prediction_type="v_prediction", timestep_spacing="trailing",
                                      class_name="DDIMScheduler")
        if sd.defaults.scheduler == "pndm":
            sd.defaults = replace(sd.defaults, scheduler="ddim")

    # Train the UNet (and the text encoder); the VAE stays frozen (LDM Sec. 3.3, RoentGen).
    trained = (([] if args.freeze_unet else [sd.unet])
               + ([sd.text_encoder] if args.train_text_encoder else []))
    for m in trained:
        m.train().requires_grad_(True)
        m.gradient_checkpointing = args.gradient_checkpointing
        if args.compile:
            m.compile()  # in place: parameter names and checkpoints stay as they are
    schedule = NoiseSchedule(sd.scheduler_config)
    denoiser = T.Denoiser(sd.unet, sd.text_encoder, schedule, args.train_text_encoder,
                          args.snr_gamma)
    model = denoiser
    if world > 1:  # gradients of the UNet and the text encoder are averaged over processes in
        # backward, in place in DDP's all-reduce buckets (no second copy of the gradients)
        model = DistributedDataParallel(denoiser,
                                        device_ids=[device] if device.type == "cuda" else None,
                                        gradient_as_bucket_view=True)
    params = [p for p in denoiser.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay,
                            fused=device.type == "cuda")
    # only rank 0 samples and saves, so only it keeps the EMA weights
    ema = O.EMA(denoiser, args.ema_decay) if args.ema_decay > 0 and rank == 0 else None
    start = 0
    if resume:
        if (state["batch_size"], state["seed"]) != (G, args.seed):
            error(f"--resume: {resume} was trained with --batch-size {state['batch_size']} "
                  f"--seed {state['seed']}; use the same values to continue its data order")
        try:
            C.load_optimizer(opt, scaler, state)
            if ema is not None:
                ema.load_state_dict(ema_state if ema_state is not None else {})
        except ValueError as e:
            error(f"--resume: {resume} does not fit this run ({e}); use the same "
                  "--train-text-encoder, --freeze-unet and --ema-decay")
        start = state["step"]
        # their copies in CPU memory (about 12 GB at SD size) are not needed now
        state = ema_state = None
        log(f"resuming from {resume} at step {start}")
    log(f"training {sum(p.numel() for p in params) / 1e6:.1f}M parameters; batch {G} = {micro} x "
        f"{accumulation} accumulation x {world} processes; {precision} on {device}")

    f = sd.vae.config.downsample_factor
    latent_shape = (sd.vae.config.latent_channels, args.resolution // f, args.resolution // f)
    data = T.PositionDataset(dataset, sd.tokenizer, args.seed, latent_shape,
                             schedule.config.num_train_timesteps, args.text_dropout,
                             args.text_augment)
    sampler = T.StepSampler(start, micro, accumulation, world, rank)
    cache = {} if args.cache_latents else None
    # workers skip decoding images whose latents are cached (shared memory flags)
    if cache is not None:
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
        C.save_checkpoint(C.checkpoint_path(out, step), sd, ema, state, args.keep)

    def save(step):
        if problem := C.blown_up(params, step, out):
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
            lr = args.lr * O.lr_factor(step, args.warmup, args.max_steps, args.lr_schedule)
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
                    # set after caching: a worker never skips too early
                    dataset.skip_pixels[b["index"]] = True
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
            # under DDP the gradients stay views of its buckets
            opt.zero_grad(set_to_none=world == 1)
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
                    kept = C.latest_checkpoint(out)
                    error(f"loss is {loss_value} at step {step}; stopped without saving (last "
                          f"good checkpoint: {kept or 'none'}); try a lower --lr or --precision "
                          "fp32/bf16")
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
                if rank == 0:
                    now = time.time()
                    speed = G * (step - step_log) / max(now - t_log, 1e-9)
                    record = {"step": step, "loss": loss_value, "lr": lr,
                              "images_per_second": speed, "time": now}
                    C.append_log(out / "log.jsonl", record)
                    tqdm.write(f"step {step}: loss {loss_value:.4f}, lr {lr:.2e}, "
                               f"{speed:.1f} img/s")
                    t_log, step_log = now, step
            if step % args.save_every == 0 and step < args.max_steps:
                save(step)
            if args.sample_every and step % args.sample_every == 0 and step < args.max_steps:
                on_rank_0(validate, sd, denoiser, ema, args, step, autocast)
            if world == 1:
                stopping = stop.asked
    except torch.cuda.OutOfMemoryError:
        error(f"out of GPU memory at --micro-batch-size {micro} ({args.resolution} px); give a "
              f"smaller one (gradient accumulation keeps the batch at {G}) or add "
              "--gradient-checkpointing")
    finally:
        bar.close()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    if step > start or C.latest_checkpoint(out) != C.checkpoint_path(out, step):
        save(step)
    if step < args.max_steps:
        log(f"stopped at step {step}; continue with the same command and --resume")
        return
    if rank == 0:
        if problem := validate(sd, denoiser, ema, args, step, autocast):
            error(problem)
        with ema.applied(denoiser) if ema is not None else nullcontext():
            sd.save_pretrained(out / "final")
        flags = "".join(f" --{f} ..." for f in template_fields(args.prompt_template or "{report}")
                        if f != "report")  # a --prompt-template's patient: sample.py --age ...
        log(f"wrote {out / 'final'} (python sample.py --weights {out / 'final'} \"your prompt\"{flags})")


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
        kept = C.latest_checkpoint(args.out)
        return (f"the validation samples at step {step} hold NaN or infinity: the model diverged "
                f"or overflowed (last checkpoint: {kept or 'none'}); try a lower --lr or "
                "--precision fp32/bf16")
    for m in trained:
        m.train()
    C.save_grid(images, Path(args.out) / "samples" / f"step-{step:06d}.png",
                cols=min(4, len(images)))
    return None


def check_ranges(parser, args, at_least_1=(), at_least_0=(), positive=()):
    """parser.error for the first numeric flag out of its range (NaN and infinity are out of every
    range) or a --seed outside [0, 2**63); train.py's and train_vae.py's flags."""
    for keys, ok, what in ((at_least_1, lambda v: v >= 1, "at least 1"),
                           (at_least_0, lambda v: v >= 0, "at least 0"),
                           (positive, lambda v: v > 0, "positive")):
        for key in keys:
            value = getattr(args, key)
            if value is not None and not (math.isfinite(value) and ok(value)):
                parser.error(f"--{key.replace('_', '-')} must be {what} and finite, got {value}")
    if not 0 <= args.seed < 2**63:
        parser.error(f"--seed must be from 0 to 2**63 - 1, got {args.seed}")
