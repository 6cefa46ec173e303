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
import os
import sys
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist

from minroentgen import pipeline
from minroentgen.trainer import check_ranges, error, train
from minroentgen.training import PRESET_NAMES

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
    a("--init", choices=PRESET_NAMES, help="start from random weights of a named config instead (train from scratch)")
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
    check_ranges(p, args, at_least_1=("max_steps", "batch_size", "resolution", "save_every", "log_every",
                                      "val_steps", "micro_batch_size"),
                 at_least_0=("keep", "sample_every", "warmup", "weight_decay", "num_workers"),
                 positive=("lr", "max_grad_norm", "snr_gamma"))
    for flag, value in (("--text-dropout", args.text_dropout), ("--text-augment", args.text_augment)):
        if not 0 <= value <= 1:
            p.error(f"{flag} is a probability: it must be in [0, 1], got {value}")
    if not 0 <= args.ema_decay < 1:
        p.error(f"--ema-decay must be in [0, 1) (0 turns the EMA off), got {args.ema_decay}")
    return args


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


if __name__ == "__main__":
    main()
