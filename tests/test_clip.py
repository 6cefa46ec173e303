"""CLIP text encoder: same last_hidden_state as transformers' CLIPTextModel, published key names, configs."""
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import minroentgen.clip as clip
from conftest import load_reference_json
from minroentgen.clip import CLIPTextModel
from minroentgen.configs import CLIP_PRESETS as PRESETS
from minroentgen.configs import CLIPTextConfig
from minroentgen.tokenizer import CLIPTokenizer

transformers = pytest.importorskip("transformers")

TINY_SD2 = dataclasses.replace(PRESETS["tiny"], hidden_act="gelu")


def published_keys(state_dict):
    """transformers >= 5.6 writes CLIPTextModel keys without the `text_model.` prefix; the published files have it."""
    return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in state_dict.items()}


def reference_model(config: CLIPTextConfig, spread=None):
    """transformers' CLIPTextModel with its own random weights or, with `spread`, with large ones, so
    that every nonlinearity (softmax, LayerNorm, the activation) works far from its linear regime."""
    hf = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config.to_dict())).eval()
    if spread is None:
        return hf
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            noise = spread * torch.randn(p.shape, generator=g)
            if name.endswith("proj.weight") or ".fc" in name and name.endswith("weight"):
                noise /= p.shape[1] ** 0.5  # Linear: keep activations O(spread)
            p.copy_(noise + (1.0 if "layer_norm" in name and name.endswith("weight") else 0.0))
    return hf


def ours_from(hf, tmp_path) -> CLIPTextModel:
    """Save the reference with save_pretrained and load that file into ours with strict=True."""
    hf.save_pretrained(tmp_path)
    model = CLIPTextModel(CLIPTextConfig.from_dict(json.loads((tmp_path / "config.json").read_text()))).eval()
    model.load_state_dict(published_keys(load_file(tmp_path / "model.safetensors")), strict=True)
    return model


def id_batches():
    g = torch.Generator().manual_seed(1)
    prompts = ["small left pleural effusion", "", "Stable position of the NG tube; no pneumothorax. " * 3]
    return [
        CLIPTokenizer.default()(prompts),  # (3, 77): start, text, end, padding
        torch.randint(0, 49408, (2, 77), generator=g),  # random ids, any position
        torch.randint(0, 49408, (4, 9), generator=g),  # shorter than 77: positions 0..8 only
    ]


@pytest.mark.parametrize("config", [PRESETS["tiny"], TINY_SD2], ids=["quick_gelu", "gelu"])
def test_tiny_matches_transformers(tmp_path, config):
    hf = reference_model(config, spread=1.0)
    ours = ours_from(hf, tmp_path)
    with torch.no_grad():
        for ids in id_batches():
            expected = hf(input_ids=ids).last_hidden_state
            got = ours(ids)
            assert got.shape == expected.shape == (*ids.shape, config.hidden_size)
            assert (got - expected).abs().max() <= 1e-5
            assert expected.std() > 0.5 and (expected[0] - expected[1]).abs().max() > 0.5  # not trivial
        # The tolerance is tight enough to see the wrong activation.
        for layer in ours.text_model.encoder.layers:
            layer.mlp.act = F.gelu if config.hidden_act == "quick_gelu" else clip.quick_gelu
        assert (ours(ids) - hf(input_ids=ids).last_hidden_state).abs().max() > 1e-3


def test_attention_is_causal():
    model = CLIPTextModel(PRESETS["tiny"]).eval()
    ids = torch.randint(0, 49408, (2, 77))
    changed = ids.clone()
    changed[:, 40] = (ids[:, 40] + 1) % 49408
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert torch.equal(a[:, :40], b[:, :40])  # earlier tokens never see later ones
    assert (a[:, 40:] - b[:, 40:]).abs().amax(dim=-1).min() > 1e-4  # every later token does


@pytest.mark.slow
def test_full_size_matches_transformers():
    hf = reference_model(PRESETS["sd15"])  # transformers' own initialisation
    ours = CLIPTextModel(PRESETS["sd15"]).eval()
    ours.load_state_dict(published_keys(hf.state_dict()), strict=True)
    ids = id_batches()[0][:2]
    with torch.no_grad():
        expected, got = hf(input_ids=ids).last_hidden_state, ours(ids)
    assert got.shape == (2, 77, 768)
    assert (got - expected).abs().max() / expected.abs().max() <= 1e-4
    assert expected.std() > 0.1


@pytest.mark.parametrize("config", [PRESETS["sd15"], PRESETS["tiny"], TINY_SD2], ids=["sd15", "tiny", "tiny_gelu"])
def test_to_dict_loads_in_transformers(tmp_path, config):
    d = config.to_dict()
    assert d["architectures"] == ["CLIPTextModel"] and d["model_type"] == "clip_text_model"
    hf_config = transformers.CLIPTextConfig(**d)
    assert CLIPTextConfig.from_dict(hf_config.to_dict()) == config
    if config is PRESETS["sd15"]:
        return  # the same shapes are checked below on the meta device
    # Our config.json and our prefixed weights: transformers loads both, with nothing missing or left over.
    ours = CLIPTextModel(config).eval()
    (tmp_path / "config.json").write_text(json.dumps(d))
    save_file(ours.state_dict(), tmp_path / "model.safetensors")
    hf, info = transformers.CLIPTextModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    ids = id_batches()[0]
    with torch.no_grad():
        assert (hf.eval()(input_ids=ids).last_hidden_state - ours(ids)).abs().max() <= 1e-5


@pytest.mark.parametrize("version", ["sd15", "sd21"])
def test_published_configs_and_keys(version):
    """The published text_encoder/config.json builds a model whose keys and shapes are the published file's."""
    config = CLIPTextConfig.from_dict(load_reference_json(f"{version}_configs.json")["hub"]["text_encoder"])
    if version == "sd15":
        assert config == PRESETS["sd15"]
    else:
        assert (config.hidden_act, config.hidden_size, config.num_hidden_layers) == ("gelu", 1024, 23)
    manifest = load_reference_json(f"{version}_diffusers_text_encoder.json")
    with torch.device("meta"):
        model = CLIPTextModel(config)
    ours = {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()}
    assert ours == manifest["tensors"]
    assert set(manifest.get("optional", {})) == {"text_model.embeddings.position_ids"}


def test_tiny_preset_is_the_reference_tiny_config(tiny_configs):
    assert CLIPTextConfig.from_dict(tiny_configs["sd1"]["text_encoder"]) == PRESETS["tiny"]
    assert CLIPTextConfig.from_dict(tiny_configs["sd2"]["text_encoder"]) == TINY_SD2


@pytest.mark.parametrize("key, value, message", [
    ("hidden_act", "relu", "hidden_act"),
    ("attention_dropout", 0.1, "attention_dropout"),
    ("model_type", "clip", "model_type"),
    ("num_attention_heads", 5, "num_attention_heads"),
])
def test_bad_config_values_are_reported(key, value, message):
    with pytest.raises(ValueError, match=message):
        CLIPTextConfig.from_dict({**PRESETS["tiny"].to_dict(), key: value})


def test_too_many_tokens_are_reported():
    with pytest.raises(ValueError, match="at most 77"):
        CLIPTextModel(PRESETS["tiny"])(torch.zeros(1, 78, dtype=torch.long))


def test_gradient_checkpointing_gives_the_same_gradients(monkeypatch):
    model = CLIPTextModel(PRESETS["tiny"]).train()
    ids = id_batches()[0]
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = flag
        model(ids).square().mean().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7)
    calls = []
    monkeypatch.setattr(clip, "checkpoint", lambda fn, *a, **kw: calls.append(kw) or fn(*a))
    model(ids)
    assert calls == [{"use_reentrant": False}] * PRESETS["tiny"].num_hidden_layers
    model.eval()(ids)  # no checkpointing outside training
    assert len(calls) == PRESETS["tiny"].num_hidden_layers


def test_compiles_to_one_graph():
    model = CLIPTextModel(PRESETS["tiny"]).eval()
    ids = id_batches()[0]
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), model(ids))
