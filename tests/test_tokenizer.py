"""CLIP tokenizer: same ids as transformers' CLIPTokenizer on radiology text, padding, truncation, save."""
import filecmp
import itertools
import json
import random
import shutil
import warnings

import pytest
import torch

from conftest import load_reference_json, reference
from minroentgen.tokenizer import BPE_FOLDER, CLIPTokenizer

transformers = pytest.importorskip("transformers")

SIZES = ["small", "moderate", "large", "trace", "SMALL", "tiny"]
FINDINGS = ["pleural effusion", "pneumothorax", "consolidation", "atelectasis", "nodule", "opacity"]
SIDES = ["left", "right", "bilateral", "Right", "LEFT"]
PLACES = ["lower lobe", "upper lobe", "lung base", "apex", "costophrenic angle", "hilum"]
DEVICES = ["NG tube", "ET tube", "PICC line", "Dobhoff tube", "right IJ catheter", "pacemaker leads"]
MEASURES = ["5 mm", "3.2 cm", "12mm", "1.5cm", "0.8 x 1.1 cm", "10-15 mm", "2,5 cm", "~4 cm", "<1 cm", ">= 3 cm"]
LEVELS = ["T12", "T4-T5", "L1", "C7", "T10/T11", "2nd rib"]
EXTRAS = [  # non-ASCII, punctuation runs, de-identification marks, odd whitespace
    "Dr. ___ was notified at ___ on ___.", "Compared to prior (___) -- no change...", "?? pneumonia!!",
    "s/p CABG; PA/AP views.", "Nodule ~8 µm?? no: 8 mm.", "angle of 30° – unchanged",
    "Lésion pulmonaire étendue.", "α1-antitrypsin deficiency; β-blocker; Δ since prior", "ΜΙΚΡΗ ΣΥΛΛΟΓΗ ΥΓΡΟΥ",
    "Größe: 4 cm — stable", "naïve café-au-lait ½ cm", "cafe\u0301 (decomposed é)",
    "\tMild   cardiomegaly.\n\nNo   edema.\r\n", "IMPRESSION:\n1. No acute process.\n2. ___",
    "It's the patient's 3rd study; they're stable, we'll see.", "FINDINGS — ETT 4.5 cm above the carina.",
    "“Curly quotes” and ’apostrophes’ … ellipsis", "HR 80/min, SpO₂ 95 %, T 38.5 °C", "   ", "",
    "literal <|endoftext|> and <|ENDOFTEXT|> in a report",
]


def radiology_sentences():
    """A few hundred short and long radiology prompts with the variations that can trip a tokenizer."""
    rng = random.Random(0)
    short = [f"{s} {side} {f}" for s, side, f in itertools.product(SIZES[:3], SIDES[:3], FINDINGS)]  # 54
    located = [f"{rng.choice(SIZES)} {f} in the {rng.choice(SIDES)} {rng.choice(PLACES)}, measuring {m}."
               for f, m in itertools.product(FINDINGS, MEASURES)]  # 60
    devices = [f"{d} tip at the level of {lv}; s/p removal of the prior {rng.choice(DEVICES)}."
               for d, lv in itertools.product(DEVICES, LEVELS)]  # 36
    pool = short + located + devices + EXTRAS
    reports = ["IMPRESSION: " + " ".join(rng.sample(pool, rng.randint(4, 14))) for _ in range(50)]  # often > 77 tokens
    variants = []
    for text in rng.sample(pool, 40):  # case and whitespace variants of the same text
        variants += [text.upper(), "  " + text.replace(" ", "\n\t ") + "\n", text.replace(".", "...")]
    return pool + reports + variants


@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip_bpe")
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(reference(f"clip_bpe/{name}"), folder / name)
    return folder


def reference_ids(hf, prompts):
    return torch.tensor(hf(prompts, padding="max_length", max_length=77, truncation=True).input_ids)


def encode_quietly(tok, prompts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tok(prompts)


def test_shipped_files_are_the_reference_vocabulary():
    for name in ("vocab.json", "merges.txt"):
        assert filecmp.cmp(BPE_FOLDER / name, reference(f"clip_bpe/{name}"), shallow=False)


def test_known_ids():
    tok = CLIPTokenizer.default()
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.max_length) == (49406, 49407, 49407, 77)
    ids = tok("a photo of a cat")
    assert ids.shape == (1, 77) and ids.dtype == torch.long
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids[0, 7:] == 49407).all()
    assert tok(["a photo of a cat", ""]).shape == (2, 77)


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_matches_transformers_on_radiology_text(bpe_folder, pad_token):
    prompts = radiology_sentences()
    tok = CLIPTokenizer(bpe_folder / "vocab.json", bpe_folder / "merges.txt", pad_token=pad_token)
    counts = [tok.num_tokens(p) for p in prompts]
    assert len(prompts) >= 200 and sum(c > 75 for c in counts) >= 20 and sum(c < 10 for c in counts) >= 20
    assert sum(not p.isascii() for p in prompts) >= 20
    hf = transformers.CLIPTokenizer.from_pretrained(bpe_folder, pad_token=pad_token)
    ours, theirs = encode_quietly(tok, prompts), reference_ids(hf, prompts)
    mismatched = [p for p, a, b in zip(prompts, ours, theirs) if not torch.equal(a, b)]
    assert not mismatched, f"{len(mismatched)} prompts differ, e.g. {mismatched[:3]}"
    assert counts == [len(hf(p, add_special_tokens=False).input_ids) for p in prompts]


@pytest.mark.parametrize("version, pad_id", [("sd15", 49407), ("sd21", 0)])
def test_published_tokenizer_folders(tmp_path, bpe_folder, version, pad_id):
    """SD v1 pads with <|endoftext|>; SD 2 pads with "!" (id 0), read from the folder's json files."""
    hub = load_reference_json(f"{version}_configs.json")["hub"]
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(bpe_folder / name, tmp_path / name)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(hub["tokenizer"]))
    if "tokenizer_special_tokens_map" in hub:
        (tmp_path / "special_tokens_map.json").write_text(json.dumps(hub["tokenizer_special_tokens_map"]))
    tok = CLIPTokenizer.from_folder(tmp_path)
    assert (tok.pad_id, tok.max_length) == (pad_id, 77)
    hf = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    # The one known difference (see the module docstring): SD 2's special_tokens_map.json marks
    # <|endoftext|> "normalized": true, so transformers also matches it in upper case; we do not.
    upper = "no <|ENDOFTEXT|> here"
    differs = version == "sd21"
    assert (hf(upper, add_special_tokens=False).input_ids.count(49407) == 1) == differs
    n = tok.num_tokens(upper)
    assert n > 3 and 49407 not in tok(upper)[0, 1 : n + 1]
    prompts = [p for p in radiology_sentences()[::2] if not (differs and "<|ENDOFTEXT|>" in p)]
    ids = encode_quietly(tok, prompts)
    assert ids[0, -1] == pad_id
    assert torch.equal(ids, reference_ids(hf, prompts))


def test_truncation_warning():
    tok = CLIPTokenizer.default()
    report = "Heart size is normal. " * 12 + "Small effusion in the right lower lobe. No pneumothorax. " * 3
    dropped = tok.num_tokens(report) - 75
    assert dropped > 0
    message = rf"^prompt truncated to 77 tokens: dropped {dropped} tokens after '\.\.\. .*'$"
    with pytest.warns(UserWarning, match=message) as record:
        ids = tok(["no acute disease", report])
    assert len(record) == 1 and "\n" not in str(record[0].message)
    assert ids[1, -1] == tok.eos_id and ids[1, -2] != tok.eos_id
    kept_text = str(record[0].message).split("after '... ")[1][:-1]  # the last words before the cut
    decoded = transformers.CLIPTokenizer.from_pretrained(BPE_FOLDER).decode(ids[1, 1:76])
    assert len(kept_text.split()) == 6 and decoded.replace(" ", "").endswith(kept_text.lower().replace(" ", ""))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok(["x " * 75])  # exactly 75 tokens fit: no warning
    with pytest.warns(UserWarning, match="dropped 1 tokens"):
        tok(["x " * 76])


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_save_round_trips_through_transformers(tmp_path, pad_token):
    tok = CLIPTokenizer(BPE_FOLDER / "vocab.json", BPE_FOLDER / "merges.txt", pad_token=pad_token)
    tok.save(tmp_path)
    hf = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    assert (hf.pad_token_id, hf.model_max_length) == (tok.pad_id, 77)
    prompts = radiology_sentences()[::7]
    ids = encode_quietly(tok, prompts)
    assert torch.equal(ids, reference_ids(hf, prompts))
    assert torch.equal(ids, encode_quietly(CLIPTokenizer.from_folder(tmp_path), prompts))


def test_bad_input_is_reported(tmp_path):
    with pytest.raises(ValueError, match="pad token"):
        CLIPTokenizer(BPE_FOLDER / "vocab.json", BPE_FOLDER / "merges.txt", pad_token="<pad>")
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        CLIPTokenizer.from_folder(tmp_path)


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_reads_a_folder_saved_by_transformers(tmp_path, bpe_folder, pad_token):
    """transformers >= 5 saves tokenizer.json (no vocab.json / merges.txt) and, unless told, model_max_length 1e30."""
    hf = transformers.CLIPTokenizer.from_pretrained(bpe_folder, pad_token=pad_token)
    hf.save_pretrained(tmp_path)
    assert not (tmp_path / "vocab.json").exists() and (tmp_path / "tokenizer.json").exists()
    tok = CLIPTokenizer.from_folder(tmp_path)
    assert (tok.pad_id, tok.max_length) == (hf.pad_token_id, 77)
    prompts = radiology_sentences()[::3]
    assert torch.equal(encode_quietly(tok, prompts), reference_ids(hf, prompts))
