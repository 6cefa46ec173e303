"""The GPU check: does everything the researcher runs work, and how fast, on this device?

    python benchmarks/gpu_check.py                         # a CUDA GPU, about 10 minutes
    python benchmarks/gpu_check.py --device cpu --quick    # the same checks, small, on a CPU

Each check prints PASS or FAIL with its figure and limit; the exit code is 1 if any failed.
  1. samples of the embedded default in fp32 / fp16 / bf16 on --device against CPU fp32: at most
     2 / 4 / 16 grey levels apart, no NaN; on CUDA also sample.py --compile (CUDA graphs) in fp16
     against eager: at most 4 grey levels, and the time of a 25-step sample each way;
  2. train.py losses in bf16 and fp16 against fp32 (tiny preset, phantoms): within 5% on average;
     on CUDA also bf16 with --compile against bf16;
  3. the compiled UNet (torch.compile) against eager: the same output (relative 1e-3) and its speed;
  4. (not --quick) full-size SD v1.5 training at 512 in bf16 with the text encoder trained:
     images/s and peak memory at micro-batch 8 and 16, with and without gradient checkpointing;
  5. (not --quick) bench_sample.py and bench_train.py (eager and --compile) against diffusers on the
     same device, written to benchmarks/RESULTS.md with the device's name.
Targets on an H100 (../shared/DESIGN.md "Speed", diffusers 0.42.1): guided UNet step at batch 2,
512 px, fp16 eager <= 25 ms (diffusers 47), compiled <= 5 ms (6.6); 50-step sample eager <= 1.5 s
(2.45), compiled <= 0.35 s (0.47); training at batch 8, bf16, fused AdamW >= 80 img/s (59.7).
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from minroentgen.configs import UNET_PRESETS  # noqa: E402
from minroentgen.pipeline import StableDiffusion, to_grayscale_uint8  # noqa: E402
from minroentgen.unet import UNet2DConditionModel  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GREY_LIMIT = {"fp32": 2, "fp16": 4, "bf16": 16}
failed = []


def report(name: str, ok: bool, detail: str):
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
    if not ok:
        failed.append(name)


def check_sampling(device: str, quick: bool):
    """1. The embedded default on the device in each precision against CPU fp32."""
    weights, kw = ROOT / "weights" / "default", dict(n=2, seed=0, progress=False)
    kw["steps"] = 5 if quick else 25
    ref = StableDiffusion.from_pretrained(weights)("small left pleural effusion", **kw)
    ref = to_grayscale_uint8(ref).int()
    for name, dtype in DTYPES.items():
        try:
            sd = StableDiffusion.from_pretrained(weights, device=device, dtype=dtype)
            got = to_grayscale_uint8(sd("small left pleural effusion", **kw)).int()
        except (RuntimeError, ValueError) as e:  # NaN samples are a ValueError
            report(f"sampling {name}", False, str(e).splitlines()[0])
            continue
        diff = int((got - ref).abs().max())
        report(f"sampling {name}", diff <= GREY_LIMIT[name],
               f"{diff} grey levels from CPU fp32 (limit {GREY_LIMIT[name]})")
    if device == "cuda":  # what sample.py --compile does: the UNet compiled, with CUDA graphs
        sd = StableDiffusion.from_pretrained(weights, device=device, dtype=torch.float16)
        kw["steps"] = 25

        def sample():
            return to_grayscale_uint8(sd("small left pleural effusion", **kw)).int()
        eager, eager_s = sample(), timed(sample, device, 3)
        t0 = time.perf_counter()
        try:
            compiled = sd.compile() and sample()
        except (RuntimeError, ValueError) as e:  # torch.compile's errors are RuntimeErrors
            return report("sampling fp16 compiled", False, str(e).splitlines()[0])
        first_s, compiled_s = time.perf_counter() - t0, timed(sample, device, 3)
        diff = int((compiled - eager).abs().max())
        report("sampling fp16 compiled", diff <= 4, f"{diff} grey levels from eager (limit 4); 25 steps, "
               f"2 images: eager {eager_s:.2f} s, compiled {compiled_s:.2f} s (first {first_s:.0f} s)")


def train_losses(data: Path, out: Path, device: str, precision: str, steps: int, extra=()) -> list:
    subprocess.run([sys.executable, str(ROOT / "train.py"), "--data", str(data / "reports.csv"),
                    "--init", "tiny", "--resolution", "64", "--batch-size", "4", "--lr", "1e-4",
                    "--max-steps", str(steps), "--precision", precision, "--device", device,
                    "--log-every", "1", "--sample-every", "0", "--save-every", str(steps),
                    "--num-workers", "0", "--out", str(out), *extra], check=True, capture_output=True)
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def check_training_precision(device: str, quick: bool, tmp: Path):
    """2. The same training run in bf16 and fp16 autocast against fp32."""
    data = tmp / "phantoms"
    subprocess.run([sys.executable, "-m", "minroentgen.phantoms", "--n", "32", "--size", "64",
                    "--out", str(data), "--workers", "1"], check=True, capture_output=True, cwd=ROOT)
    steps = 3 if quick else 30
    losses = {"fp32": train_losses(data, tmp / "fp32", device, "fp32", steps)}
    runs = [("bf16", "fp32", ()), ("fp16", "fp32", ())]
    if device == "cuda":  # torch.compile: minutes on a CPU
        runs.append(("bf16", "bf16", ("--compile",)))
    for precision, against, extra in runs:
        name = " ".join((precision, *extra))
        if against not in losses:
            report(f"train.py {name}", False, f"no {against} run to compare with")
            continue
        try:
            got = losses[name] = train_losses(data, tmp / name.replace(" ", ""), device, precision,
                                              steps, extra)
        except subprocess.CalledProcessError as e:
            report(f"train.py {name}", False, e.stderr.decode().strip().splitlines()[-1])
            continue
        ref = losses[against]
        rel = sum(abs(a - b) / abs(b) for a, b in zip(got, ref)) / len(ref)
        report(f"train.py {name}", len(got) == len(ref) and rel <= 0.05,
               f"losses {rel:.2%} from {against} on average over {len(ref)} steps (limit 5%)")


def timed(fn, device: str, repeats: int) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


@torch.no_grad()
def check_compile(device: str, quick: bool):
    """3. torch.compile(UNet) against eager: same numbers, and the speed of a guided step."""
    config, side = (UNET_PRESETS["tiny"], 8) if quick else (UNET_PRESETS["sd15"], 64)
    dtype = torch.float32 if device == "cpu" else torch.float16
    unet = UNet2DConditionModel(config).to(device, dtype).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, side, side, generator=g).to(device, dtype)
    ctx = torch.randn(2, 77, config.cross_attention_dim, generator=g).to(device, dtype)
    t = torch.tensor(500, device=device)
    compiled = torch.compile(unet, fullgraph=True, mode=None if device == "cpu" else "reduce-overhead")
    eager_out, compiled_out = unet(x, t, ctx), compiled(x, t, ctx)
    rel = float((compiled_out - eager_out).abs().max() / eager_out.abs().max())
    limit = 1e-3 if dtype == torch.float32 else 1e-2
    report("compiled UNet", rel <= limit, f"relative difference {rel:.1e} (limit {limit:.0e})")
    repeats = 3 if quick else 20
    eager_s, compiled_s = timed(lambda: unet(x, t, ctx), device, repeats), timed(
        lambda: compiled(x, t, ctx), device, repeats)
    print(f"      guided UNet step ({side}x{side} latent, batch 2): eager {eager_s * 1e3:.1f} ms, "
          f"compiled {compiled_s * 1e3:.1f} ms")


def check_sd15_training(device: str):
    """4. Full-size training throughput and memory at 512 in bf16 (a GPU's job)."""
    for micro in (8, 16):
        for ckpt in ((), ("--gradient-checkpointing",)):
            cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--size", "sd15",
                   "--device", device, "--precision", "bf16", "--batch", str(micro), "--repeats", "5"]
            r = subprocess.run(cmd + list(ckpt), capture_output=True, text=True)
            tail = (r.stdout + r.stderr).strip().splitlines()[-4:]
            report(f"SD v1.5 training, micro-batch {micro}{' + checkpointing' if ckpt else ''}",
                   r.returncode == 0, " | ".join(tail))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="default cuda")
    p.add_argument("--quick", action="store_true", help="small models and few steps (minutes on a CPU)")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but this torch build sees no CUDA GPU; use --device cpu --quick")
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"gpu_check on {name}, torch {torch.__version__}{', quick' if args.quick else ''}")
    with tempfile.TemporaryDirectory() as tmp:
        check_sampling(args.device, args.quick)
        check_training_precision(args.device, args.quick, Path(tmp))
        check_compile(args.device, args.quick)
        if not args.quick:
            check_sd15_training(args.device)
            train = ["bench_train.py", "--size", "sd15", "--precision", "bf16", "--batch", "8"]
            for bench in (["bench_sample.py", "--dtype", "fp16", "--steps", "50"], train,
                          [*train, "--compile"]):
                r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / bench[0]), *bench[1:],
                                    "--device", args.device])
                report(bench[0], r.returncode == 0, "table appended to benchmarks/RESULTS.md")
    print(f"{len(failed)} failed: {', '.join(failed)}" if failed else "all checks passed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
