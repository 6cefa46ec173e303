"""CLIP's byte-pair-encoding tokenizer: prompt -> (B, 77) token ids.

CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision", Sec. 2.4) reads text as a lower-cased byte-pair encoding (Sennrich et al. 2016)
with a 49,152-token vocabulary (49,408 in vocab.json: each of the 256 byte symbols also appears
with `</w>`), bracketed by `<|startoftext|>` and `<|endoftext|>` and cut to 77 tokens. Stable
Diffusion keeps that tokenizer and pads every prompt to the full 77 tokens, so the text encoder
always sees a (B, 77) batch. RoentGen feeds it the impression section of a radiology report, and a
long report loses everything past the 75th token: `num_tokens` lets a data loader count how
often that happens.

The pipeline, built from the `tokenizers` library's parts, gives the same ids as
transformers' `CLIPTokenizer`:
  1. normalize: Unicode NFC, every run of whitespace to one space, lower case;
  2. split with CLIP's regex: contractions ('s 't 're 've 'm 'll 'd), runs of letters,
     single digits, runs of other non-space symbols; whitespace is dropped;
  3. map each UTF-8 byte of a piece to a printable symbol (GPT-2's byte-level trick), so
     no text is ever out of vocabulary;
  4. merge symbol pairs in the order of merges.txt; the last symbol of a piece carries the
     end-of-word suffix `</w>` ("cat" -> "cat</w>", id 2368).
The special tokens (and the pad token) are matched whole in the raw text before all this.

Differences from OpenAI's original `SimpleTokenizer` (what CLIP was trained with), shared
with transformers:
  - OpenAI cleans the text first with `ftfy.fix_text` and a double `html.unescape`; this
    pipeline does not. So curly quotes (’ -> '), ligatures (ﬁ -> fi), full-width letters
    (Ａ -> a) and HTML entities (&amp; -> &) give other ids here. Plain ASCII text without HTML
    entities, such as radiology reports, is not affected.
  - Lower-casing is per character (`tokenizers`' Lowercase), while OpenAI uses Python's
    `str.lower`, which writes a word-final capital sigma as ς: "ΟΔΟΣ" -> "οδοσ" here,
    "οδος" there.
  - The pad token is a special token: SD 2 pads with "!", so a "!" in an SD 2 prompt becomes
    id 0 rather than "!</w>" (256). SD v1 pads with `<|endoftext|>` and is unaffected.
The one difference from transformers: special-token text typed in a prompt is matched
case-sensitively ("<|endoftext|>" -> 49407, "<|ENDOFTEXT|>" -> byte pieces); transformers
also matches upper-case variants of a token that the folder's special_tokens_map.json marks
`"normalized": true` (SD 2's <|endoftext|>). Every other text, accents, Greek letters, µ, °,
dashes and emoji included, gives the same ids.
"""
import json
import tempfile
import warnings
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

BPE_FOLDER = Path(__file__).parent / "clip_bpe"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
NO_LIMIT = int(1e30)  # transformers' model_max_length for a tokenizer saved without one
# CLIP's pre-tokenization regex (special tokens, contractions, letters, one digit, symbols).
CLIP_SPLIT = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
              r"""[^\s\p{L}\p{N}]+""")


class CLIPTokenizer:
    """Text -> (B, max_length) ids: <|startoftext|> + BPE tokens + <|endoftext|> + padding."""

    def __init__(self, vocab_path, merges_path, pad_token=EOS, max_length=77):
        for file in (vocab_path, merges_path):
            if not Path(file).is_file():
                raise FileNotFoundError(
                    f"{file} not found: a CLIP tokenizer needs vocab.json and merges.txt "
                    "(CLIPTokenizer.default() uses the copies shipped with minroentgen)")
        if max_length < 2:
            raise ValueError(f"max_length={max_length} leaves no room for the start and end "
                             "tokens: use 77")
        self.pad_token, self.max_length = pad_token, max_length
        bpe = BPE.from_file(str(vocab_path), str(merges_path), end_of_word_suffix="</w>",
                            unk_token=EOS)
        self._tokenizer = Tokenizer(bpe)
        self._tokenizer.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        self._tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed",
                                 invert=True),  # keep matches, drop the rest
            # bytes -> printable symbols; its GPT-2 split changes only an upper-case "<|ENDOFTEXT|>"
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        self.bos_id, self.eos_id, self.pad_id = (bpe.token_to_id(t) for t in (BOS, EOS, pad_token))
        if None in (self.bos_id, self.eos_id, self.pad_id):
            raise ValueError(f"{vocab_path} lacks {BOS!r}, {EOS!r} or the pad token {pad_token!r}: "
                             "use CLIP's vocab.json")
        # Matched whole in the raw text, before normalization, as transformers does.
        self._tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                            for t in (BOS, EOS, pad_token)])

    def vocabulary(self) -> list:
        """Every token of the vocabulary (word-final ones end in "</w>"), special tokens
        included."""
        return list(self._tokenizer.get_vocab())

    @classmethod
    def default(cls):
        """CLIP's vocabulary as shipped with the package, padded like SD v1 (<|endoftext|>, 77
        tokens)."""
        return cls(BPE_FOLDER / "vocab.json", BPE_FOLDER / "merges.txt")

    @classmethod
    def from_folder(cls, path):
        """A diffusers `tokenizer/` folder: vocab.json and merges.txt (or the tokenizer.json that
        transformers >= 5 writes instead), and, when present, tokenizer_config.json and
        special_tokens_map.json for the pad token and model_max_length (the map wins, as in
        transformers)."""
        path = Path(path)
        settings = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (path / name).exists():
                settings.update(json.loads((path / name).read_text()))
        pad = settings.get("pad_token", EOS)
        pad = pad["content"] if isinstance(pad, dict) else pad
        max_length = settings.get("model_max_length", 77)
        max_length = 77 if max_length >= NO_LIMIT else max_length  # CLIP's context length
        if (path / "vocab.json").exists() or not (path / "tokenizer.json").exists():
            return cls(path / "vocab.json", path / "merges.txt", pad, max_length)
        # take the BPE vocabulary and merges out of tokenizer.json
        with tempfile.TemporaryDirectory() as tmp:
            Tokenizer.from_file(str(path / "tokenizer.json")).model.save(tmp)
            return cls(Path(tmp) / "vocab.json", Path(tmp) / "merges.txt", pad, max_length)

    def save(self, folder):
        """Write a folder that both `from_folder` and transformers'
        `CLIPTokenizer.from_pretrained` read."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._tokenizer.model.save(str(folder))  # vocab.json, merges.txt
        special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS,
                   "pad_token": self.pad_token}
        (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.max_length,
                  **special}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))

    def num_tokens(self, text: str) -> int:
        """How many BPE tokens `text` has, without the start and end tokens."""
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def __call__(self, prompts) -> torch.LongTensor:
        """str or list of str -> (B, max_length) int64 ids. Longer prompts are cut (with a warning)
        so that <|endoftext|> stays the last token, as transformers does with truncation=True."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        room = self.max_length - 2  # tokens left between <|startoftext|> and <|endoftext|>
        ids = torch.full((len(prompts), self.max_length), self.pad_id, dtype=torch.long)  # (B, 77)
        encodings = self._tokenizer.encode_batch(prompts, add_special_tokens=False)
        for i, (prompt, enc) in enumerate(zip(prompts, encodings)):
            kept = enc.ids[:room]
            if len(enc.ids) > room:
                # the kept text's last words
                tail = " ".join(prompt[: enc.offsets[room - 1][1]].split()[-6:])
                warnings.warn(f"prompt truncated to {self.max_length} tokens: dropped "
                              f"{len(enc.ids) - room} tokens after '... {tail}'", stacklevel=2)
            ids[i, : len(kept) + 2] = torch.tensor([self.bos_id, *kept, self.eos_id])
        return ids
