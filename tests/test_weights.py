"""weights.py: the original <-> diffusers rename tables, reading checkpoints, writing diffusers folders.

Names are checked against the real SD v1.5 key manifests (meta tensors, no weights) and, on the
tiny configs, against files written and read by diffusers itself (random weights)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the reference libraries must never reach for the hub

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, load_reference_json

from minroentgen import weights as W

MODELS = ("unet", "vae", "text_encoder")


def _meta(manifest: dict, *sections) -> dict:
    return {k: torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
            for s in sections for k, (shape, dtype) in manifest[s].items()}


def _shapes(sd: dict) -> dict:
    return {k: list(v.shape) for k, v in sd.items()}


def _assert_identical(got: dict, expected: dict):
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def _raises(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(W.WeightsError, match=match) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


# --------------------------------------------------------------------------------------------------
# SD v1.5 manifests: every real key consumed, every parameter filled, both directions.
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd15():
    original = load_reference_json("sd15_original.json")
    return SimpleNamespace(original=original, diffusers={m: load_reference_json(f"sd15_diffusers_{m}.json") for m in MODELS})


def test_original_to_diffusers_matches_the_sd15_manifests(sd15):
    sd = _meta(sd15.original, "tensors", "buffers", "extras_expected")
    parts = W.original_to_diffusers(sd)
    for m in MODELS:
        assert _shapes(parts[m]) == {k: shape for k, (shape, _) in sd15.diffusers[m]["tensors"].items()}, m
    assert sum(len(parts[m]) for m in MODELS) == len(sd15.original["tensors"])  # one-to-one


def test_diffusers_to_original_gives_back_the_original_keys(sd15):
    parts = {m: _meta(sd15.diffusers[m], "tensors") for m in MODELS}
    back = W.diffusers_to_original(parts)
    assert _shapes(back) == {k: shape for s in ("tensors", "buffers") for k, (shape, _) in sd15.original[s].items()}
    assert torch.equal(back["cond_stage_model.transformer.text_model.embeddings.position_ids"], torch.arange(77)[None])
    again = W.original_to_diffusers(back)
    for m in MODELS:
        assert _shapes(again[m]) == _shapes(parts[m])


def test_old_text_encoder_prefix_and_float_position_ids_are_accepted(sd15):
    sd = {k.replace("transformer.text_model.", "transformer."): v for k, v in _meta(sd15.original, "tensors").items()}
    sd["cond_stage_model.transformer.embeddings.position_ids"] = torch.zeros(1, 77)  # float, as in merged files
    parts = W.original_to_diffusers(sd)
    assert parts["text_encoder"].keys() == sd15.diffusers["text_encoder"]["tensors"].keys()


def test_infer_configs_gives_sd15_configs(sd15):
    configs = W.infer_configs({m: _meta(sd15.diffusers[m], "tensors") for m in MODELS})
    expanded = load_reference_json("sd15_configs.json")["expanded"]
    for m in MODELS:
        assert configs[m] == {k: expanded[m][k] for k in configs[m]}, m
    assert configs["unet"]["use_linear_projection"] is False and configs["text_encoder"]["num_attention_heads"] == 12
    hub = load_reference_json("sd15_configs.json")["hub"]
    configs = W.infer_configs({m: _meta(sd15.diffusers[m], "tensors") for m in MODELS}, {m: hub[m] for m in MODELS})
    assert all(configs[m] == {**configs[m], **hub[m]} for m in MODELS)


def test_infer_configs_on_sd21_shapes_and_its_published_configs():
    parts = {m: _meta(load_reference_json(f"sd21_diffusers_{m}.json"), "tensors") for m in MODELS}
    configs = W.infer_configs(parts)
    assert configs["unet"]["use_linear_projection"] is True and configs["unet"]["cross_attention_dim"] == 1024
    assert configs["text_encoder"]["num_hidden_layers"] == 23 and configs["text_encoder"]["num_attention_heads"] == 16
    hub = load_reference_json("sd21_configs.json")["hub"]
    configs = W.infer_configs(parts, {m: hub[m] for m in MODELS})  # agrees with the shapes, fills the rest
    for m in MODELS:
        assert configs[m] == {**configs[m], **hub[m]}
    assert configs["text_encoder"]["projection_dim"] == 512 and configs["unet"]["attention_head_dim"] == [5, 10, 20, 20]


def test_use_ema_takes_the_model_ema_copies(sd15):
    sd = _meta(sd15.original, "tensors")
    ema = {"model_ema." + k.removeprefix("model.").replace(".", ""): torch.empty(v.shape, device="meta")
           for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    plain, averaged = W.original_to_diffusers({**sd, **ema}), W.original_to_diffusers({**sd, **ema}, use_ema=True)
    key, original_key = "down_blocks.0.resnets.0.conv1.weight", "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    assert plain["unet"][key] is sd[original_key]
    assert averaged["unet"][key] is ema["model_ema.diffusion_modelinput_blocks10in_layers2weight"]
    _raises("no EMA weights", W.original_to_diffusers, sd, use_ema=True)


def test_unrecognised_and_missing_parts_are_errors(sd15):
    sd = _meta(sd15.original, "tensors")
    _raises("unrecognised keys .*model.diffusion_model.foo.weight", W.original_to_diffusers,
            {**sd, "model.diffusion_model.foo.weight": torch.empty(1)}, source="x.ckpt")
    _raises("unrecognised keys .*optimizer.state", W.original_to_diffusers, {**sd, "optimizer.state": torch.empty(1)})
    no_vae = {k: v for k, v in sd.items() if not k.startswith("first_stage_model.")}
    _raises(r"x.ckpt: no first_stage_model\.\* keys", W.original_to_diffusers, no_vae, source="x.ckpt")
    mixed = {**sd, "cond_stage_model.model.ln_final.weight": torch.empty(1)}  # both text layouts
    _raises(r"unrecognised keys .*cond_stage_model\.transformer\.", W.original_to_diffusers, mixed)


def test_config_that_contradicts_the_shapes_is_an_error(sd15):
    parts = {m: _meta(sd15.diffusers[m], "tensors") for m in MODELS}
    _raises(r"unet config says block_out_channels=\[32, 64\] but the weights have \[320, 640, 1280, 1280\]",
            W.infer_configs, parts, {"unet": {"block_out_channels": [32, 64]}})
    given = {"attention_head_dim": [5, 10, 20, 20], "block_out_channels": (320, 640, 1280, 1280)}
    configs = W.infer_configs(parts, {"unet": given})
    assert configs["unet"]["attention_head_dim"] == [5, 10, 20, 20]


def test_check_state_dict_names_missing_unexpected_and_misshaped_keys():
    expected = {"a.weight": (2, 3), "b.weight": (4,), "c.bias": (4,)}
    W.check_state_dict(expected, {"a.weight": torch.empty(2, 3), "b.weight": torch.empty(4), "c.bias": torch.empty(4)}, "f")
    got = {"a.weight": torch.empty(3, 2), "b.weight": torch.empty(4), "zzz": torch.empty(1)}
    msg = _raises("f.safetensors: 1 missing keys", W.check_state_dict, expected, got, "f.safetensors")
    assert "c.bias" in msg and "1 unexpected (zzz)" in msg and "a.weight: file [3, 2], model [2, 3]" in msg


# --------------------------------------------------------------------------------------------------
# Real files on the tiny configs, written and read by diffusers / transformers.
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_configs, tmp_path_factory):
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    cfg = tiny_configs["sd1"]
    torch.manual_seed(0)
    unet, vae = UNet2DConditionModel(**cfg["unet"]), AutoencoderKL(**cfg["vae"])
    text = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # no zero-initialised tensors: a swapped pair must show
        for model in (unet, vae, text):
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
    bpe = ROOT / "minroentgen" / "clip_bpe"
    tokenizer = CLIPTokenizer(vocab=str(bpe / "vocab.json"), merges=str(bpe / "merges.txt"), model_max_length=77)
    scheduler = PNDMScheduler.from_config(load_reference_json("sd15_configs.json")["hub"]["scheduler"])
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    root = tmp_path_factory.mktemp("tiny")
    pipe.save_pretrained(root / "st", safe_serialization=True)
    pipe.save_pretrained(root / "bin", safe_serialization=False)
    expected = {"unet": unet.state_dict(), "vae": vae.state_dict(),
                "text_encoder": {("" if k.startswith("text_model.") else "text_model.") + k: v
                                 for k, v in text.state_dict().items() if not k.endswith("position_ids")}}
    # transformers 5 writes model.safetensors whatever it is asked; older versions wrote this file,
    # with the `text_model.` prefix and the position_ids buffer
    (root / "bin" / "text_encoder" / "model.safetensors").unlink()
    torch.save({**expected["text_encoder"], "text_model.embeddings.position_ids": torch.arange(77)[None]},
               root / "bin" / "text_encoder" / "pytorch_model.bin")
    return SimpleNamespace(root=root, cfg=cfg, expected=expected, tokenizer=tokenizer)


def _assert_tiny_configs(configs, cfg):
    for m in MODELS:
        for k, v in cfg[m].items():
            if k not in ("bos_token_id", "eos_token_id", "pad_token_id"):
                assert configs[m][k] == v, (m, k)


@pytest.mark.parametrize("layout", ["st", "bin"])
def test_diffusers_folder_loads_identical_tensors(tiny, layout):
    ck = W.load_checkpoint(tiny.root / layout)
    for m in MODELS:
        _assert_identical(ck.state_dicts[m], tiny.expected[m])
    _assert_tiny_configs(ck.configs, tiny.cfg)
    assert ck.configs["scheduler"]["_class_name"] == "PNDMScheduler" and ck.tokenizer_dir == tiny.root / layout / "tokenizer"
    suffix = {"st": ".safetensors", "bin": ".bin"}[layout]
    assert all(p.suffix == suffix for m in MODELS for p in (tiny.root / layout / m).iterdir() if p.suffix != ".json")


def test_fp16_variant_and_old_vae_attention_names(tiny, tmp_path):
    from safetensors.torch import load_file, save_file
    folder = shutil.copytree(tiny.root / "st", tmp_path / "old")
    vae_file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    vae = {}
    for k, v in load_file(vae_file).items():
        for new, was in old.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{was}.")
        vae[k] = v
    assert "encoder.mid_block.attentions.0.query.weight" in vae
    save_file(vae, vae_file)
    unet_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    fp16 = folder / "unet" / "diffusion_pytorch_model.fp16.safetensors"
    save_file({k: v.half() for k, v in load_file(unet_file).items()}, fp16)
    unet_file.unlink()
    ck = W.load_checkpoint(folder)
    _assert_identical(ck.state_dicts["vae"], tiny.expected["vae"])
    _assert_identical(ck.state_dicts["unet"], {k: v.half() for k, v in tiny.expected["unet"].items()})


@pytest.fixture(scope="module")
def single_files(tiny):
    """The tiny model as original single files: .safetensors, and a Lightning-style .ckpt with
    EMA copies (+1, so they differ), LitEma counters, schedule buffers and a step counter."""
    sd = W.diffusers_to_original(tiny.expected)
    st = W.save_original(tiny.root / "tiny.safetensors", tiny.expected)
    ema = {"model_ema." + k.removeprefix("model.").replace(".", ""): v + 1
           for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    extras = {k: torch.rand(s) for k, (s, _) in load_reference_json("sd15_original.json")["extras_expected"].items()}
    ckpt = tiny.root / "tiny.ckpt"
    torch.save({"state_dict": {**sd, **ema, **extras}, "global_step": 7}, ckpt)
    return SimpleNamespace(st=st, ckpt=ckpt)


@pytest.mark.parametrize("kind", ["st", "ckpt"])
def test_single_file_loads_identical_tensors(tiny, single_files, kind):
    ck = W.load_checkpoint(getattr(single_files, kind), config_dir=tiny.root / "st")
    for m in MODELS:
        _assert_identical(ck.state_dicts[m], tiny.expected[m])
    _assert_tiny_configs(ck.configs, tiny.cfg)
    assert ck.tokenizer_dir == tiny.root / "st" / "tokenizer" and "scheduler" in ck.configs
    with pytest.raises(W.WeightsError, match="cannot be read from the shapes"):  # not SD v1's widths
        W.load_checkpoint(getattr(single_files, kind))
    components = W.original_to_diffusers(W.read_state_dict(getattr(single_files, kind)))
    known = {"text_encoder": {"num_attention_heads": 4}, "unet": {"attention_head_dim": 2},
             "vae": {"scaling_factor": 0.5}}
    with pytest.raises(W.WeightsError, match="head count cannot be read"):  # 32-wide CLIP: heads unknowable
        W.infer_configs(components, {k: v for k, v in known.items() if k != "text_encoder"})
    for name, key in (("unet", "attention_head_dim"), ("vae", "scaling_factor")):  # not SD v1's widths: no guess
        with pytest.raises(W.WeightsError, match=rf"the {name} is \[.*\] wide, not Stable Diffusion v1's .*{key} "
                                                 r"cannot be read from the shapes; pass .* --config DIR"):
            W.infer_configs(components, {k: v for k, v in known.items() if k != name})
    inferred = W.infer_configs(components, known)
    for m, keys in (("unet", ["block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
                              "cross_attention_dim", "use_linear_projection", "in_channels", "out_channels"]),
                    ("vae", ["block_out_channels", "layers_per_block", "latent_channels"]),
                    ("text_encoder", ["hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size",
                                      "max_position_embeddings", "hidden_act"])):
        assert {k: inferred[m][k] for k in keys} == {k: tiny.cfg[m][k] for k in keys}, m


def test_single_file_use_ema(tiny, single_files):
    ck = W.load_checkpoint(single_files.ckpt, config_dir=tiny.root / "st", use_ema=True)
    _assert_identical(ck.state_dicts["unet"], {k: v + 1 for k, v in tiny.expected["unet"].items()})


def test_single_file_names_agree_with_diffusers_own_loader(tiny, single_files):
    """diffusers' from_single_file was written against the real checkpoints: an independent check of the table."""
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_single_file(str(single_files.st), config=str(tiny.root / "st"),
                                                    local_files_only=True, safety_checker=None)
    got = {"unet": pipe.unet.state_dict(), "vae": pipe.vae.state_dict(),
           "text_encoder": {("" if k.startswith("text_model.") else "text_model.") + k: v
                            for k, v in pipe.text_encoder.state_dict().items() if not k.endswith("position_ids")}}
    for m in MODELS:
        _assert_identical(got[m], tiny.expected[m])


def test_save_pretrained_loads_in_diffusers(tiny, single_files, tmp_path):
    from diffusers import StableDiffusionPipeline
    ck = W.load_checkpoint(single_files.st, config_dir=tiny.root / "st")
    out = tmp_path / "saved"
    W.save_pretrained(out, ck.configs, ck.state_dicts, ROOT / "minroentgen" / "clip_bpe", ck.configs["scheduler"])
    W.save_pretrained(out, ck.configs, ck.state_dicts, ck.tokenizer_dir, ck.configs["scheduler"],
                      sampling={"steps": 75})  # replaces it
    assert sorted(os.listdir(tmp_path)) == ["saved"]  # no temporary or old folder left behind
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    got = {"unet": pipe.unet.state_dict(), "vae": pipe.vae.state_dict(),
           "text_encoder": {("" if k.startswith("text_model.") else "text_model.") + k: v
                            for k, v in pipe.text_encoder.state_dict().items() if not k.endswith("position_ids")}}
    for m in MODELS:
        _assert_identical(got[m], tiny.expected[m])
    assert type(pipe.scheduler).__name__ == "PNDMScheduler" and pipe.safety_checker is None
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert pipe.tokenizer.model_max_length == 77
    with open(out / "text_encoder" / "config.json") as f:
        assert json.load(f)["hidden_act"] == "quick_gelu"
    _assert_identical(W.load_checkpoint(out).state_dicts["text_encoder"], tiny.expected["text_encoder"])


class _TokenizerWriter:
    def save(self, folder):
        shutil.copytree(ROOT / "minroentgen" / "clip_bpe", folder)


@pytest.mark.parametrize("tokenizer", [ROOT / "minroentgen" / "clip_bpe", _TokenizerWriter()], ids=["folder", "writer"])
def test_save_pretrained_with_only_the_bpe_files_gives_a_77_token_tokenizer(tiny, single_files, tmp_path, tokenizer):
    from transformers import CLIPTokenizer
    ck = W.load_checkpoint(single_files.st, config_dir=tiny.root / "st")
    W.save_pretrained(tmp_path / "s", ck.configs, ck.state_dicts, tokenizer, ck.configs["scheduler"],
                      sampling={"steps": 75, "guidance_scale": 4.0})
    tok = CLIPTokenizer.from_pretrained(tmp_path / "s" / "tokenizer")
    assert tok.model_max_length == 77 and tok("a cat", padding="max_length").input_ids[-1] == 49407
    assert json.loads((tmp_path / "s" / "sampling.json").read_text()) == {"steps": 75, "guidance_scale": 4.0}
    assert W.load_checkpoint(tmp_path / "s").tokenizer_dir == tmp_path / "s" / "tokenizer"


def test_save_arguments_are_checked(tiny, tmp_path):
    with pytest.raises(ValueError, match="writes .safetensors only"):
        W.save_original(tmp_path / "x.ckpt", tiny.expected)
    with pytest.raises(ValueError, match="_class_name"):
        W.save_pretrained(tmp_path / "s", {}, tiny.expected, ROOT / "minroentgen" / "clip_bpe", {"beta_end": 0.012})
    assert not any(tmp_path.iterdir())


def test_save_pretrained_crash_keeps_the_old_folder(tiny, single_files, tmp_path, monkeypatch):
    ck = W.load_checkpoint(single_files.st, config_dir=tiny.root / "st")
    out = W.save_pretrained(tmp_path / "saved", ck.configs, ck.state_dicts, ck.tokenizer_dir, ck.configs["scheduler"])
    before = sorted(p.relative_to(out) for p in out.rglob("*"))

    def crash(sd, path):
        raise OSError("disk full")
    monkeypatch.setattr(W, "_save_tensors", crash)
    with pytest.raises(OSError):
        W.save_pretrained(out, ck.configs, ck.state_dicts, ck.tokenizer_dir, ck.configs["scheduler"])
    assert sorted(os.listdir(tmp_path)) == ["saved"] and sorted(p.relative_to(out) for p in out.rglob("*")) == before


# --------------------------------------------------------------------------------------------------
# Bad files: one-line errors that name the file.
# --------------------------------------------------------------------------------------------------
class _NotAWeight:
    pass


def test_bad_files_are_named_in_one_line_errors(tiny, tmp_path):
    whole = (tiny.root / "st" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    (tmp_path / "half.safetensors").write_bytes(whole[: len(whole) // 2])
    _raises(r"half.safetensors: file is truncated or not a checkpoint .*re-download",
            W.read_state_dict, tmp_path / "half.safetensors")
    whole = (tiny.root / "bin" / "unet" / "diffusion_pytorch_model.bin").read_bytes()
    (tmp_path / "half.ckpt").write_bytes(whole[: len(whole) // 2])
    _raises(r"half.ckpt: file is truncated or not a checkpoint", W.read_state_dict, tmp_path / "half.ckpt")
    for name in ("empty.safetensors", "empty.ckpt"):
        (tmp_path / name).write_bytes(b"")
        _raises(f"{name}: file is empty", W.load_checkpoint, tmp_path / name)
    g = torch.Generator().manual_seed(0)
    junk = bytes(torch.randint(0, 256, (4096,), generator=g, dtype=torch.uint8).tolist())
    for name in ("junk.safetensors", "junk.ckpt", "junk.bin"):
        (tmp_path / name).write_bytes(junk)
        _raises(f"{name}: file is (truncated|corrupt) or not a checkpoint", W.read_state_dict, tmp_path / name)
    torch.save({"state_dict": {"w": torch.ones(1)}, "callback": _NotAWeight()}, tmp_path / "code.ckpt")
    _raises(r"code.ckpt: loading needs to run pickled code.*_NotAWeight", W.read_state_dict, tmp_path / "code.ckpt")
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    _raises(r"list.pt: not a checkpoint \(holds list", W.read_state_dict, tmp_path / "list.pt")
    _raises(r"nope.safetensors: no such file", W.load_checkpoint, tmp_path / "nope.safetensors")
    (tmp_path / "weights.txt").write_text("hello")
    _raises(r"unknown extension '.txt'", W.read_state_dict, tmp_path / "weights.txt")


def test_other_models_and_incomplete_folders_are_clear_errors(tiny, single_files, tmp_path):
    from safetensors.torch import save_file
    resnet = {"conv1.weight": torch.ones(64, 3, 7, 7), "bn1.weight": torch.ones(64), "fc.weight": torch.ones(10, 512)}
    save_file(resnet, tmp_path / "resnet18.safetensors")
    _raises(r"resnet18.safetensors: 3 unrecognised keys \(bn1.weight, conv1.weight, fc.weight\); "
            r"this is not an original Stable Diffusion",
            W.load_checkpoint, tmp_path / "resnet18.safetensors")
    vae_only = {k.removeprefix("first_stage_model."): v for k, v in W.diffusers_to_original(tiny.expected).items()
                if k.startswith("first_stage_model.")}
    save_file(vae_only, tmp_path / "vae-ft-mse.safetensors")
    _raises(r"vae-ft-mse.safetensors: \d+ unrecognised keys \(decoder", W.load_checkpoint, tmp_path / "vae-ft-mse.safetensors")
    folder = shutil.copytree(tiny.root / "st", tmp_path / "no_unet", ignore=shutil.ignore_patterns("unet"))
    _raises(r"no_unet: no unet/diffusion_pytorch_model.safetensors .*expected a diffusers folder", W.load_checkpoint, folder)
    folder = shutil.copytree(tiny.root / "st", tmp_path / "swapped")
    weights = "diffusion_pytorch_model.safetensors"
    shutil.copy(folder / "vae" / weights, folder / "unet" / weights)  # a VAE where the UNet should be
    _raises(r"swapped: unet: no down_blocks.0.resnets.0.conv1.weight .*\(decoder.conv_in.bias.*"
            r"not the weights of a Stable Diffusion unet", W.load_checkpoint, folder)
    _raises(r"elsewhere: no such folder", W.load_checkpoint, tiny.root / "st", config_dir=tmp_path / "elsewhere")
    for rel in W.CONFIG_FILES.values():  # diffusers refuses such a folder too; guessing would sample garbage
        folder = shutil.copytree(tiny.root / "st", tmp_path / rel.replace("/", "_"))
        (folder / rel).unlink()
        _raises(rf"{folder.name}: no {rel}; a diffusers folder holds .*copy the missing file", W.load_checkpoint, folder)
        _raises(rf"{folder.name}: no {rel}", W.load_checkpoint, single_files.st, config_dir=folder)
    (folder / "scheduler" / "scheduler_config.json").write_text("[1, 2]")
    _raises(r"scheduler_config.json: holds a list, not a JSON object", W.load_checkpoint, folder)


# --------------------------------------------------------------------------------------------------
# SD 2.x single files: the text encoder in OpenCLIP's layout (fused q/k/v, 24 blocks, SD 2 uses 23)
# --------------------------------------------------------------------------------------------------

def test_original_to_diffusers_matches_the_sd21_manifests():
    original = load_reference_json("sd21_original.json")
    parts = W.original_to_diffusers(_meta(original, "tensors", "extras_expected"))
    for m in MODELS:
        expected = load_reference_json(f"sd21_diffusers_{m}.json")["tensors"]
        assert _shapes(parts[m]) == {k: shape for k, (shape, _) in expected.items()}, m
    # every real key is used but the block SD 2 never runs and CLIP's image-text head
    unused = [k for k in original["tensors"] if ".resblocks.23." in k or k.endswith(
        ("text_projection", "logit_scale"))]
    assert len(unused) == 12 + 2
    fused = sum(k.endswith("in_proj_weight") or k.endswith("in_proj_bias")
                for k in original["tensors"] if ".resblocks.23." not in k)
    assert sum(len(parts[m]) for m in MODELS) == len(original["tensors"]) - len(unused) + 2 * fused


@pytest.fixture(scope="module")
def sd2(tiny_configs, tmp_path_factory):
    """A tiny SD 2.x v-prediction pipeline whose text encoder has SD 2.1's 23 layers, as a diffusers
    folder, and as an original single file written by minroentgen (OpenCLIP layout, 24 blocks)."""
    import diffusers
    from oracle import diffusers_pipeline
    cfg = {**tiny_configs["sd2"], "text_encoder": {**tiny_configs["sd2"]["text_encoder"],
                                                   "num_hidden_layers": 23}}
    pipe = diffusers_pipeline(cfg)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config,
                                                        prediction_type="v_prediction")
    root = tmp_path_factory.mktemp("sd2")
    pipe.save_pretrained(root / "folder", safe_serialization=True)
    expected = W.load_checkpoint(root / "folder").state_dicts
    return SimpleNamespace(root=root, expected=expected,
                           file=W.save_original(root / "sd2.safetensors", expected, openclip=True))


def test_sd2_single_file_round_trip_and_diffusers_own_loader(sd2):
    raw = W.read_state_dict(sd2.file)
    assert "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight" in raw
    assert not any(k.startswith("cond_stage_model.transformer.") for k in raw)
    ck = W.load_checkpoint(sd2.file, config_dir=sd2.root / "folder")
    for m in MODELS:
        _assert_identical(ck.state_dicts[m], sd2.expected[m])
    assert ck.configs["text_encoder"]["hidden_act"] == "gelu"
    assert ck.configs["scheduler"]["prediction_type"] == "v_prediction"
    from diffusers import StableDiffusionPipeline  # written against the real SD 2 files
    pipe = StableDiffusionPipeline.from_single_file(str(sd2.file), config=str(sd2.root / "folder"),
                                                    local_files_only=True, safety_checker=None)
    got = {"unet": pipe.unet.state_dict(), "vae": pipe.vae.state_dict(),
           "text_encoder": W.text_model_prefixed(pipe.text_encoder.state_dict())}
    for m in MODELS:
        _assert_identical(got[m], sd2.expected[m])


def test_sd2_single_file_samples_as_its_folder(sd2, tmp_path):
    import sample
    args = ["small left pleural effusion", "--steps", "3", "--height", "32", "--width", "32",
            "--scheduler", "ddim"]
    sample.main([*args, "--weights", str(sd2.root / "folder"), "--out", str(tmp_path / "a")])
    sample.main([*args, "--weights", str(sd2.file), "--config", str(sd2.root / "folder"),
                 "--out", str(tmp_path / "b")])
    from PIL import Image
    a, b = (sorted((tmp_path / d).glob("*.png")) for d in "ab")
    assert len(a) == len(b) == 1
    pixels = [Image.open(f[0]).tobytes() for f in (a, b)]
    assert pixels[0] == pixels[1] and len(set(pixels[0])) > 10  # the same, and not a flat image


def test_sd2_single_file_without_its_config_says_why(sd2):
    _raises(r"an SD 2.x single file; whether it predicts noise \(2.x-base, 512 px\) or v \(768-v\) "
            r"is not in its weights: pass .* --config DIR", W.load_checkpoint, sd2.file)
