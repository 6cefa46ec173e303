"""Does the text control the picture? Generate from a fixed prompt set, read with the phantom reader.

The paper's question (Chambon et al. 2022, Sec. 4): does a prompt's finding appear, on the side it
names, and nothing else; are the images realistic (FID) and diverse (MS-SSIM between samples of one
prompt)? Here the phantom reader (`reader.py`) is the radiologist and its features give the FID.

Every image (a sample, or a phantom of any size) is brought to the reader's 128x128 input (area
averaging down, bilinear up) and judged, measured and compared there, so samples and phantoms take
the same path. The real-phantom baseline (`sd=None`) puts phantoms rendered with each prompt's
labels in place of samples: it validates the judge and gives the FID/MS-SSIM floor at the same N.
"""
import json
import textwrap
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from . import phantom as P
from . import reports as PR
from . import reader as R
from ..metrics import fid, mean_pairwise_ms_ssim
from ..pipeline import image_grid, to_grayscale_uint8

THRESHOLDS = {"present": 0.9, "place": 0.9, "unprompted": 0.1}  # the pass marks
HELDOUT_SEED, REFERENCE_SEED, REAL_SEED = 31_337, 27_182, 14_142  # phantom streams no one trains on


# ----------------------------------------------------------------------------- prompts

@dataclass(frozen=True)
class Prompt:
    text: str
    labels: dict   # what the image should show, in phantom's label format
    group: str     # the table's row: a finding, or "normal"
    wording: str   # "trained" (a phantom report sentence) or "unseen" (our paraphrase)


UNSEEN = {  # paraphrases that phantom's report writer never produces (tests check it)
    "pleural_effusion": "Pleural effusion on the {side}, {size} in volume.",
    "bilateral_effusion": "Pleural fluid on both sides, {size} in volume.",
    "pneumothorax": "Pneumothorax on the {side}, {size} in extent.",
    "cardiomegaly": "Enlargement of the heart.",
    "consolidation": "Airspace consolidation of the {zone} lung.",
    "edema": "Signs of pulmonary edema in both lungs.",
    "endotracheal_tube": "An endotracheal tube is present.",
    "central_venous_line": "A central venous catheter is seen.",
    "pacemaker": "A pacemaker is present.",
    "nodule": "Pulmonary nodule of {size} size in the {zone} lung.",
    "normal": "Normal chest radiograph.",
}


def _cases():
    """(template key, labels): every finding, side, zone and size, each device, and a normal study."""
    for side in ("left", "right", "bilateral"):
        for size in ("small", "moderate", "large"):
            key = "bilateral_effusion" if side == "bilateral" else "pleural_effusion"
            yield key, {"pleural_effusion": {"side": side, "size": size}}
    yield from (("pneumothorax", {"pneumothorax": {"side": side, "size": size}})
                for side in ("left", "right") for size in ("small", "large"))
    yield "cardiomegaly", {"cardiomegaly": {}}
    yield from (("consolidation", {"consolidation": {"zone": zone}}) for zone in P.ZONES)
    yield "edema", {"edema": {}}
    yield from ((d, {"support_devices": {"devices": [d]}}) for d in P.DEVICES)
    yield from (("nodule", {"nodule": {"zone": zone, "size": size}}) for zone in P.ZONES for size in ("small", "large"))
    yield "normal", {}


def _prompts() -> list:
    out = []
    for key, labels in _cases():
        attrs = next(iter(labels.values()), {})
        trained = PR.NORMAL[0] if key == "normal" else PR.fill(PR.SAY[key][0], attrs)
        group = next(iter(labels), "normal")
        out += [Prompt(trained, labels, group, "trained"), Prompt(PR.fill(UNSEEN[key], attrs), labels, group, "unseen")]
    return out


PROMPTS = _prompts()  # 31 label sets x 2 wordings


def load_prompts(path) -> list:
    """A prompt set from a JSON file {"wording": name, "prompts": [[text, labels], ...]}, labels in
    phantom's format (e.g. docs/blind_prompts.json). Raises ValueError, naming the entry, on bad input."""
    want = '{"wording": NAME, "prompts": [["Small left pneumothorax.", {"pneumothorax": {"side": "left", ...}}], ...]}'
    try:
        data = json.loads(Path(path).read_text())
        pairs, wording = list(data["prompts"]), str(data.get("wording", Path(path).stem))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read prompts from {path} ({e!r}); want {want}") from None
    if not pairs:
        raise ValueError(f"{path}: the prompt list is empty; want {want}")
    for k, pair in enumerate(pairs):
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)):
            raise ValueError(f"{path}: prompt {k} is not [text, labels]: {pair!r}; want {want}")
        problem = label_problem(pair[1])
        if problem:
            raise ValueError(f"{path}: prompt {k} ({pair[0]!r}): {problem}")
    return [Prompt(text, labels, next(iter(labels), "normal"), wording) for text, labels in pairs]


def label_problem(labels) -> str | None:
    """Why `labels` is not a label dict phantom could draw, or None: known findings, each with exactly the
    attributes the reader judges (side, size, zone; a list of devices for support devices) and values it knows."""
    if not isinstance(labels, dict):
        return f"labels must be a JSON object ({{}} for a normal study), got {labels!r}"
    for name, attrs in labels.items():
        if name not in P.FINDINGS:
            return f"unknown finding {name!r}; the phantom's are {', '.join(P.FINDINGS)}"
        allowed = {"devices": P.DEVICES} if name == "support_devices" else \
            {a: R.HEADS[h] for h, (f, a) in R.OF.items() if f == name}
        if not isinstance(attrs, dict) or set(attrs) != set(allowed):
            return f"{name} takes exactly {{{', '.join(allowed)}}}, got {attrs!r}"
        for a, v in attrs.items():
            if not ((isinstance(v, list) and v and set(v) <= set(allowed[a])) if a == "devices" else v in allowed[a]):
                return f"{name} {a} {v!r} is not {'a non-empty list of ' if a == 'devices' else 'one of '}" \
                       f"{', '.join(allowed[a])}"
    return None


def spread(prompts: list, k: int) -> list:
    """k prompts spread evenly over the list (for quick runs)."""
    return [prompts[i] for i in np.linspace(0, len(prompts) - 1, min(k, len(prompts))).round().astype(int)]


# ----------------------------------------------------------------------------- images

def _labels_seed(labels: dict) -> int:
    return zlib.crc32(json.dumps(labels, sort_keys=True).encode())


def resize(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (N, H, W) -> float (N, 1, size, size) in [0, 1]: area averaging down, bilinear up."""
    x = torch.from_numpy(np.asarray(images)).float().div(255).unsqueeze(1)
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="area" if x.shape[-1] > size else "bilinear")


def _at(img: np.ndarray, size: int) -> np.ndarray:
    """A uint8 phantom (H, W) at `size` px, as a uint8 image like a sample's."""
    return img if img.shape[-1] == size else resize(img[None], size)[0, 0].mul(255).round().to(torch.uint8).numpy()


def phantom_at(labels: dict, size: int, rng) -> np.ndarray:
    """A phantom with `labels` at `size` px; below phantom's smallest size it is rendered larger and shrunk."""
    return _at(P.render(labels, max(size, P.MIN_SIZE), rng), size)


def heldout(n: int, size: int, progress: bool = False) -> np.ndarray:
    """n phantoms of a data set no one trains on (natural mix of findings), (n, size, size) uint8."""
    return np.stack([_at(P.make(HELDOUT_SEED, k, max(size, P.MIN_SIZE)).image, size)
                     for k in tqdm(range(n), desc="held-out phantoms", disable=not progress)])


def heldout_features(reader, n: int, size: int, progress: bool = False) -> torch.Tensor:
    """Reader features (n, 512) of n held-out phantoms at `size` px: the FID's reference."""
    return read(reader, resize(heldout(n, size, progress), R.SIZE))[1]


def phantoms_like(labels: dict, n: int, size: int, stream: int) -> np.ndarray:
    """n phantoms showing exactly `labels` (different patients), (n, size, size) uint8."""
    rngs = [np.random.default_rng([stream, _labels_seed(labels), i]) for i in range(n)]
    return np.stack([phantom_at(labels, size, rng) for rng in rngs])


@torch.no_grad()
def through_vae(vae, images: np.ndarray) -> np.ndarray:
    """Phantoms (N, H, W) uint8 -> encoded and decoded by `vae` (posterior mean), (N, H, W) uint8: what the
    autoencoder alone keeps of each finding, a ceiling on what any sample of the model can show."""
    w = next(vae.parameters())
    x = torch.from_numpy(np.asarray(images)).to(w.device, w.dtype).div(127.5).sub(1)  # (N, H, W) in [-1, 1]
    x = x[:, None].expand(-1, 3, -1, -1)  # (N, 3, H, W)
    return to_grayscale_uint8(vae.decode(vae.encode(x).mode()).float().cpu()).numpy()


def samples_of(sd, prompt: str, n: int, seed: int, **settings) -> np.ndarray:
    """n samples of one prompt as (n, H, W) uint8: the images of `sample.py PROMPT --n n --seed seed`."""
    return to_grayscale_uint8(sd(prompt, n=n, seed=seed, progress=False, **settings)).numpy()


# ----------------------------------------------------------------------------- judging

def read(reader, x: torch.Tensor):
    """Reader probabilities per head and (N, 512) features of images (N, 1, 128, 128) in [0, 1]."""
    prob = R.predict(reader, x[:, 0].mul(255).numpy())
    with torch.no_grad():
        return prob, reader.eval().features(x).double()


def judge(prob: dict, labels: dict) -> dict:
    """Counts for one prompt's samples. Read = findings with p > 0.5, plus the devices with p > 0.5 when
    support devices are read. present: every asked finding (and asked device) read; place/size: the
    side or zone / size head agrees, counted among the present; unprompted: anything read that was not
    asked, support devices included (a device no one asked for is a failure of text control too);
    unprompted_by: how many samples read each unasked finding or device; missed_by: how many lacked each
    asked one."""
    found = prob["present"] > 0.5  # (N, 7)
    device = (prob["devices"] > 0.5) & found[:, [P.FINDINGS.index("support_devices")]]  # (N, 3)
    asked_f = torch.tensor([f in labels for f in P.FINDINGS])
    asked_d = torch.tensor([d in labels.get("support_devices", {}).get("devices", []) for d in P.DEVICES])
    present = found[:, asked_f].all(1) & device[:, asked_d].all(1)
    extra_f, extra_d = found & ~asked_f, device & ~asked_d

    def by_name(f, d):  # samples per finding or device, the devices by name
        return {name: int(k) for name, k in zip(P.FINDINGS + P.DEVICES, torch.cat([f, d], 1).sum(0))
                if k and name != "support_devices"}
    c = {"n": len(found), "present": int(present.sum()) if labels else None,
         "unprompted": int((extra_f.any(1) | extra_d.any(1)).sum()), "unprompted_by": by_name(extra_f, extra_d),
         "missed_by": by_name(~found & asked_f, ~device & asked_d)}
    for kind, attrs in (("place", ("side", "zone")), ("size", ("size",))):
        heads = [h for h, (f, a) in R.OF.items() if f in labels and a in attrs]
        ok = present.clone()
        for h in heads:
            f, a = R.OF[h]
            ok &= prob[h].argmax(1) == R.HEADS[h].index(labels[f][a])
        c[kind], c[kind + "_of"] = (int(ok.sum()), c["present"]) if heads else (None, None)
    return c


def run(sd, reader, prompts=PROMPTS, seeds: int = 16, seed: int = 0, steps=None, guidance=None,
        scheduler=None, guidance_rescale=None, size: int = 128, heldout_n: int = 1000, progress: bool = True,
        reconstruct: bool = False, held_feat=None):
    """Generate `seeds` samples per prompt at the model's size (or, with sd=None, render `size`-px
    phantoms of its labels; with reconstruct=True, those phantoms through the model's VAE), read and
    measure them. Returns (report, images): report = {"prompts": rows, "groups": rows} (JSON-able),
    images = one (seeds, H, W) uint8 array per prompt. held_feat: `heldout_features` computed once for
    several runs at the same size (else computed here)."""
    if sd is not None:
        size = sd.defaults.height
    norm = R.SIZE  # everything is judged at the reader's input size
    if held_feat is None:
        held_feat = heldout_features(reader, heldout_n, size, progress)
    rows, images, feats, ref_feats, refs = [], [], [], [], {}
    for p in tqdm(prompts, desc="prompts", disable=not progress):
        if sd is None or reconstruct:
            imgs = phantoms_like(p.labels, seeds, size, REAL_SEED)
            imgs = through_vae(sd.vae, imgs) if reconstruct else imgs
        else:
            imgs = samples_of(sd, p.text, seeds, seed, steps=steps, guidance=guidance, scheduler=scheduler,
                              guidance_rescale=guidance_rescale)
        key = json.dumps(p.labels, sort_keys=True)
        if key not in refs:  # real phantoms of the same labels, shared by both wordings
            x_ref = resize(phantoms_like(p.labels, seeds, size, REFERENCE_SEED), norm)
            refs[key] = (read(reader, x_ref)[1], mean_pairwise_ms_ssim(x_ref))
        x = resize(imgs, norm)
        prob, feat = read(reader, x)
        rows.append({"text": p.text, "wording": p.wording, "group": p.group, "labels": p.labels,
                     **judge(prob, p.labels), "ms_ssim": mean_pairwise_ms_ssim(x), "ms_ssim_real": refs[key][1]})
        images.append(imgs)
        feats.append(feat)
        ref_feats.append(refs[key][0])
    groups = []
    for wording in dict.fromkeys(p.wording for p in prompts):
        names = list(dict.fromkeys(p.group for p in prompts if p.wording == wording))
        for name in names + ["all"]:
            idx = [i for i, p in enumerate(prompts) if p.wording == wording and name in ("all", p.group)]
            groups.append(_group(wording, name, [rows[i] for i in idx], torch.cat([feats[i] for i in idx]),
                                 torch.cat([ref_feats[i] for i in idx]), held_feat))
    return {"prompts": rows, "groups": groups}, images


def _group(wording, name, rows, feat, ref_feat, held_feat) -> dict:
    def rate(key):
        den = sum(r[key + "_of" if key in ("place", "size") else "n"] or 0 for r in rows if r[key] is not None)
        return sum(r[key] for r in rows if r[key] is not None) / den if den else None
    samples, unprompted_by = sum(r["n"] for r in rows), Counter()
    for r in rows:
        unprompted_by.update(r["unprompted_by"])
    return {"wording": wording, "group": name, "prompts": len(rows), "samples": samples,
            **{k: rate(k) for k in ("present", "place", "size", "unprompted")},
            "unprompted_by": {k: v / samples for k, v in unprompted_by.items()},
            "fid_heldout": fid(feat, held_feat), "fid_same": fid(feat, ref_feat),
            "ms_ssim": float(np.mean([r["ms_ssim"] for r in rows])),
            "ms_ssim_real": float(np.mean([r["ms_ssim_real"] for r in rows]))}


# ----------------------------------------------------------------------------- outputs

def table(report: dict) -> str:
    """The groups as a markdown table, pass marks on the thresholded columns."""
    def pct(v, ok=None):
        return "–" if v is None else f"{100 * v:.0f}%" + ("" if ok is None else " ✓" if ok(v) else " ✗")
    t = THRESHOLDS
    lines = ["| wording | finding | prompts | samples | present (≥90%) | side/zone (≥90%) | size | unprompted (≤10%) "
             "| most often unprompted | FID vs held-out | FID vs same findings | MS-SSIM | MS-SSIM real |",
             "|" + " --- |" * 13]
    for g in report["groups"]:
        top = sorted(g["unprompted_by"].items(), key=lambda kv: -kv[1])[:2]
        lines.append(" | ".join([
            f"| {g['wording']}", "**all**" if g["group"] == "all" else g["group"].replace("_", " "),
            str(g["prompts"]), str(g["samples"]), pct(g["present"], lambda v: v >= t["present"]),
            pct(g["place"], lambda v: v >= t["place"]), pct(g["size"]),
            pct(g["unprompted"], lambda v: v <= t["unprompted"]),
            ", ".join(f"{k.replace('_', ' ')} {pct(v)}" for k, v in top) or "–",
            f"{g['fid_heldout']:.1f}", f"{g['fid_same']:.1f}",
            f"{g['ms_ssim']:.3f}", f"{g['ms_ssim_real']:.3f} |"]))
    return "\n".join(lines) + "\n"


def write_grid(path, prompts: list, images: list, cell: int = 128, label_width: int = 260):
    """A prompt-by-seed picture: one row per prompt (its wording and text on the left), one column per sample."""
    cols, head = len(images[0]), 16
    cells = resize(np.concatenate(images), cell)[:, 0].mul(255).round().to(torch.uint8)  # (prompts * cols, cell, cell)
    sheet = Image.new("L", (label_width + cols * cell, head + len(prompts) * cell), 255)
    sheet.paste(Image.fromarray(image_grid(cells, cols).numpy()), (label_width, head))
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    for j in range(cols):
        draw.text((label_width + j * cell + 4, 2), f"sample {j}", fill=0, font=font)
    for i, p in enumerate(prompts):
        text = f"[{p.wording}]\n" + "\n".join(textwrap.wrap(p.text, 40))
        draw.multiline_text((4, head + i * cell + 4), text, fill=0, font=font)
    sheet.save(path)
