"""Generate a synthetic data set: chest X-rays sampled from a table of reports.

    python generate.py --reports phantoms/reports.csv --out synthetic
    python generate.py --reports docs/blind_prompts.json --out synthetic --per-report 4 --batch-size 16
    python train.py --data synthetic/reports.csv ...     # train.py (and read_pairs) read what it writes

--reports is a .csv or .jsonl (optionally .gz) with a `report` column (other columns are ignored, but
`labels` is copied through), or a prompt file {"prompts": [[text, labels], ...]} like
docs/blind_prompts.json. --out gets images/<row>-<k>.png (8-bit grayscale, as sample.py writes them) and
reports.csv with the columns image (relative to the CSV), report, seed and, when the input has them, labels.

A model trained with `train.py --prompt-template` (sampling.json's prompt_template, e.g. RoentGen-v2's
"{age} year old {race} {sex}. {report}") is sampled on that template filled from each row's columns
(age or anchor_age, sex or gender, race, as minroentgen/prompts.py reads them for training); a row
missing a field is counted and skipped. reports.csv then also has the template's columns and the
prompt each image was sampled from (train.py --prompt-template fills the same prompt again).

Seeds: row r (counted from 0) has the seed S = (seed * 2654435761 + r) mod 2**32, its `seed` column
(0, 1, 2, ... for --seed 0; the multiplier keeps runs with other base seeds on other seeds; torch's CPU
generator reads only 32 bits of a seed). Its K images are those of `python sample.py REPORT --seed S --n K`
with the same weights and settings (within one grey level: a batch of several rows may round differently).
Rows are sampled in fixed batches of batch-size // K rows, so a run stopped part way (Ctrl-C, a crash,
--limit) continues, when started again with the same arguments, where it stopped and writes the same
bytes as a run that never stopped. Files are written under a temporary name and renamed when complete.
OUT/run.json holds the run's settings: a folder holding another run is refused.
"""
import argparse
import csv
import hashlib
import json
import math
import sys
import warnings
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from minroentgen import prompts
from minroentgen.data import read_rows
from minroentgen.phantoms.judge import load_prompts
from minroentgen.pipeline import StableDiffusion, to_grayscale_uint8
from minroentgen.report_text import clean
from minroentgen.weights import WeightsError, written_atomically
from sample import DEFAULT_WEIGHTS, DTYPES, pick_device

PROG = "generate.py"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reports", required=True, help="a .csv/.jsonl[.gz] table with a report column "
                   "(labels copied through), or a prompt file (.json) like docs/blind_prompts.json")
    p.add_argument("--out", required=True, help="output folder: images/, reports.csv and run.json; a new or "
                   "empty folder, or one of a run with the same arguments to continue it")
    p.add_argument("--per-report", type=int, default=1, metavar="K", help="images per report (default 1)")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="images per UNet batch, whole "
                   "reports: B // K reports at a time, at least one (default 8; part of the run's identity)")
    p.add_argument("--seed", type=int, default=0, help="base seed, 0 to 2**32 - 1: row r (from 0) gets the "
                   "seed (seed * 2654435761 + r) mod 2**32, that of `sample.py --seed` (default 0)")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N reports, rounded up to a whole "
                   "batch; run again without it (or with a larger N) to continue (default: all)")
    p.add_argument("--weights", help="a diffusers folder or an original single-file checkpoint; default: "
                   "the embedded model in weights/default")
    p.add_argument("--steps", type=int, help="denoising steps (default: the weights' setting, else 75)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale; 1 turns guidance off "
                   "(default: the weights' setting, else 4)")
    p.add_argument("--scheduler", choices=["pndm", "ddim", "ddpm"],
                   help="sampler (default: the weights' scheduler, else pndm)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="where to run (default auto: cuda, then mps, then cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="precision (default auto: fp16 on cuda, fp32 elsewhere)")
    args = p.parse_args(argv)
    for name in ("per_report", "batch_size", "limit", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.guidance is not None and not 0 <= args.guidance < math.inf:
        p.error(f"--guidance must be a finite number >= 0 (1 or less turns guidance off), got {args.guidance}")
    if not 0 <= args.seed < 2**32:
        p.error(f"--seed must be from 0 to 2**32 - 1, got {args.seed}")
    if args.weights == "" or args.out == "" or args.reports == "":
        p.error("--reports, --out and --weights must not be empty; give a path")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        p.error(f"--out {args.out} is a file; give a folder")
    return args


def row_seed(seed: int, row: int) -> int:
    """Row `row`'s seed: distinct for every row of a run, and far from those of nearby base seeds."""
    return (seed * 2654435761 + row) % 2**32


def read_reports(path: Path) -> tuple[list[tuple[str, str]], bool, list | None]:
    """[(report, labels as JSON text)] of a table or prompt file, whether it has labels, and each
    row's fields for a prompt template (prompts.table_fields; None for a prompt file)."""
    if not path.is_file():
        raise ValueError(f"--reports {path} {'is a folder' if path.is_dir() else 'does not exist'}; give a file")
    if path.suffix == ".json":
        return [(p.text, json.dumps(p.labels)) for p in load_prompts(path)], True, None
    rows = read_rows(path)
    if not rows:
        raise ValueError(f"{path} holds no rows; want a report column, one report a row")
    out = []
    for n, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or "report" not in row:
            raise ValueError(f"{path}: row {n} has no 'report' column")
        report, labels = clean(str(row["report"] or "")), row.get("labels")
        if not report:
            raise ValueError(f"{path}: row {n} has an empty report")
        labels = "" if labels is None else labels if isinstance(labels, str) else json.dumps(labels)
        out.append((report, labels))
    columns = list(dict.fromkeys(c for row in rows for c in row))
    return out, any("labels" in row for row in rows), [prompts.table_fields(r, columns) for r in rows]


def apply_template(template: str, rows: list, fields: list | None, path: Path):
    """The rows to sample for a model trained on `template`: [(prompt, labels)], the report of
    each, the template's fields of each ({name: value}), and the note of the rows skipped for a
    missing field (or ""); a field that no row has is a one-line ValueError."""
    names = [n for n in prompts.template_fields(template) if n != "report"]
    lacking = [n for n in names if fields is None or n not in fields[0]]
    if lacking:
        what = "a prompt file, without columns" if fields is None else "a table without them"
        raise ValueError(f"the model was trained on prompts {template!r}; --reports {path} is {what}: "
                         f"give a CSV/JSONL with the column{'s' * (len(lacking) > 1)} "
                         f"{', '.join(lacking)} ({prompts.WHERE})")
    kept, reports, values, missing, where = [], [], [], {}, []
    for n, ((report, labels), f) in enumerate(zip(rows, fields), start=1):
        gaps = [name for name in names if f[name] is None]
        for name in gaps:
            missing[name] = missing.get(name, 0) + 1
        if gaps:
            where.append(n)
            continue
        kept.append((prompts.fill(template, {**f, "report": report}), labels))
        reports.append(report)
        values.append({name: f[name] for name in names})
    if not kept:
        raise ValueError(f"--reports {path}: no row has every field of the model's prompt template "
                         f"{template!r} ({', '.join(f'{k} missing {v}' for k, v in missing.items())})")
    rows_at = ", ".join(map(str, where[:5])) + (", ..." if len(where) > 5 else "")
    note = (f"{len(kept)} of {len(rows)} reports used; skipped {len(where)}: "
            + ", ".join(f"{v} missing {k}" for k, v in missing.items()) + f" (rows {rows_at})"
            if where else "")
    return kept, reports, values, note


def check_run(out: Path, run: dict):
    """Write out/run.json, or check that the one there is this run's."""
    path = out / "run.json"
    if not path.is_file():
        if out.is_dir() and any(out.iterdir()):
            raise ValueError(f"--out {out} holds files but no run.json of generate.py; "
                             "give a new or empty folder")
        out.mkdir(parents=True, exist_ok=True)
        with written_atomically(path) as tmp:
            tmp.write_text(json.dumps(run, indent=1) + "\n")
        return
    try:
        old = json.loads(path.read_text())
    except ValueError:
        raise ValueError(f"{path} is damaged (not JSON); give a new --out") from None
    differ = sorted(k for k in run.keys() | old.keys() if run.get(k) != old.get(k))
    if differ:
        raise ValueError(f"--out {out} holds another run (its {', '.join(differ)} differ); give a new --out, "
                         "or the same arguments to continue that run")


def generate(args):
    """Sample the rows not done yet, then write reports.csv (see the module's docstring)."""
    device = pick_device(args.device, prog=PROG)
    auto = torch.float16 if device.type == "cuda" else torch.float32
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else auto
    out, K = Path(args.out), args.per_report
    rows, has_labels, fields = read_reports(Path(args.reports))
    sd = StableDiffusion.from_pretrained(args.weights or DEFAULT_WEIGHTS, device=device, dtype=dtype)
    template, reports = sd.defaults.prompt_template, [report for report, _ in rows]
    if template is not None:  # sample the filled template; the report column keeps the report
        rows, reports, values, note = apply_template(template, rows, fields, Path(args.reports))
        if note:
            print(note)
    d = sd.defaults
    settings = dict(steps=args.steps or d.steps, scheduler=args.scheduler or d.scheduler,
                    guidance=d.guidance if args.guidance is None else args.guidance,
                    height=d.height, width=d.width)
    rows_sha = hashlib.sha256(json.dumps(rows).encode()).hexdigest()
    check_run(out, dict(reports_sha256=rows_sha, rows=len(rows), seed=args.seed, per_report=K,
                        batch_size=args.batch_size, weights=args.weights or "default",
                        device=device.type, dtype=str(dtype).removeprefix("torch."), **settings,
                        **({} if template is None else {"prompt_template": template})))

    R = max(1, args.batch_size // K)  # rows a batch; batch b holds rows b*R .. b*R + R - 1, always
    n_rows = len(rows) if args.limit is None else min(len(rows), -(-args.limit // R) * R)
    digits = max(5, len(str(len(rows) - 1)))
    names = [[f"images/{r:0{digits}d}-{k}.png" for k in range(K)] for r in range(n_rows)]
    batches = [range(b, min(b + R, n_rows)) for b in range(0, n_rows, R)]
    todo = [rs for rs in batches if not all((out / name).is_file() for r in rs for name in names[r])]
    (out / "images").mkdir(exist_ok=True)
    for stale in (out / "images").glob(".*.tmp*"):  # left by a killed run (written_atomically's names)
        stale.unlink()
    done = n_rows * K - sum(len(rs) * K for rs in todo)
    bar = tqdm(total=n_rows * K, initial=done, unit="img", desc="generating")
    for rs in todo:
        images = sd([rows[r][0] for r in rs], n=K, seed=[row_seed(args.seed, r) for r in rs],
                    progress=False, **settings)
        for name, pixels in zip([name for r in rs for name in names[r]], to_grayscale_uint8(images)):
            with written_atomically(out / name) as tmp:
                Image.fromarray(pixels.numpy()).save(tmp, format="PNG")
        bar.update(len(rs) * K)
    bar.close()

    with written_atomically(out / "reports.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        extra = [] if template is None else [*values[0], "prompt"]  # the template's fields
        writer.writerow(["image", "report", "seed"] + ["labels"] * has_labels + extra)
        for r in range(n_rows):
            prompt, labels = rows[r]
            more = [] if template is None else [*values[r].values(), prompt]
            writer.writerows([name, reports[r], row_seed(args.seed, r)] + [labels] * has_labels + more
                             for name in names[r])
    left = f"; {len(rows) - n_rows} reports left (run again without --limit)" if n_rows < len(rows) else ""
    print(f"{n_rows} reports, {n_rows * K} images: {out / 'reports.csv'}{left}")


def main(argv=None):
    args = parse_args(argv)
    warnings.showwarning = lambda message, *_, **__: print(f"{PROG}: warning: {message}", file=sys.stderr)
    try:
        generate(args)
    except (ValueError, OSError, WeightsError) as e:
        sys.exit(f"{PROG}: error: {e}")

if __name__ == "__main__":
    main()
