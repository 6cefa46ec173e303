"""Timing and memory helpers shared by the benchmarks (never used by tests)."""
import json
import platform
import statistics
import threading
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


def sd15_configs() -> dict:
    """The SD v1.5 component configs (diffusers' `expanded` form) from ../shared/reference."""
    return json.loads((REFERENCE / "sd15_configs.json").read_text())["expanded"]


def check_args(parser, args, positive=("repeats",)):
    """parser.error for a --device this machine lacks or a count below 1."""
    if args.device not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but this torch build sees no CUDA GPU; use --device cpu")
    for name in positive:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakMemory:
    """Peak extra memory while the block runs: CUDA allocator peak on a GPU, else resident set size
    sampled every 2 ms (the CPU allocator returns big buffers to the OS, so RSS tracks activations)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self.peak = _rss_bytes()
            self.running = True
            self.thread = threading.Thread(target=self._poll, daemon=True)
            self.thread.start()
        return self

    def _poll(self):
        while self.running:
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.extra = torch.cuda.max_memory_allocated() - self.base
        else:
            self.running = False
            self.thread.join()
            self.extra = self.peak - self.base


def _timed(fn, device):
    """Seconds of one `fn()` call and the peak extra memory in bytes."""
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        fn()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    return seconds, mem.extra


def median_and_peak(runs: list[tuple]) -> tuple:
    """(seconds, bytes) runs -> (median seconds, largest peak)."""
    return statistics.median(t for t, _ in runs), max(m for _, m in runs)


def compare(mine, theirs, device, repeats=3, warmup=1):
    """Median seconds and peak extra memory of two implementations of the same work, timed in
    alternation (mine, theirs, mine, ...) so that a change in the machine's load hits both alike.
    Returns ((seconds, bytes) of mine, (seconds, bytes) of theirs)."""
    for _ in range(warmup):
        mine(), theirs()
    runs = {mine: [], theirs: []}
    for _ in range(repeats):
        for fn in (mine, theirs):
            runs[fn].append(_timed(fn, device))
    return median_and_peak(runs[mine]), median_and_peak(runs[theirs])


def measure(fn, device, repeats=3, warmup=1):
    """Median seconds and peak extra memory (bytes) of `fn()` alone: for implementations that cannot be in
    memory together; the machine's load must then be steady between the two measurements."""
    for _ in range(warmup):
        fn()
    return median_and_peak([_timed(fn, device) for _ in range(repeats)])


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def write_results(title: str, rows: list[tuple], header: tuple, save=True):
    """Print a markdown table and, if `save`, append it to RESULTS.md (newest last)."""
    lines = [f"\n## {title}\n", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if not save:
        return
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nWritten by the scripts in this folder; newest sections last.\n")
    with RESULTS.open("a") as f:
        f.write(text)
