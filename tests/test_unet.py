"""UNet parity with diffusers' UNet2DConditionModel on random weights, key coverage against the real
checkpoints' key lists, config round trips, gradient checkpointing and torch.compile tracing."""
import gc
import json

import pytest
import torch
from conftest import load_reference_json
from diffusers import UNet2DConditionModel as DiffusersUNet

import minroentgen.unet as unet
from minroentgen.configs import UNET_PRESETS as PRESETS
from minroentgen.configs import UNetConfig
from minroentgen.unet import UNet2DConditionModel


def randomise_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random values, so no layer hides behind zero init (biases, conv_out) or
    one init (norm scales): weights ~ N(0, 1/fan_in), which keeps activations O(1) through the net,
    norm scales 1 + 0.1 N(0, 1), biases 0.1 N(0, 1). Each parameter is a window at a random offset
    into one shared normal draw: 860M fresh normals take 10-25 s on 2 cores, this takes about 2 s."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    pool = torch.randn(2 * max(p.numel() for p in params.values()), generator=g)
    with torch.no_grad():
        for name, p in params.items():
            start = int(torch.randint(pool.numel() - p.numel() + 1, (), generator=g))
            noise = pool[start:start + p.numel()].view_as(p)
            if p.ndim > 1:
                p.copy_(noise * p[0].numel() ** -0.5)
            else:
                p.copy_(0.1 * noise + (1.0 if name.endswith("weight") else 0.0))
    return model


def reference_and_ours(config: dict, meta: bool = False):
    """diffusers' UNet from a config.json dict with random weights, and ours holding the same tensors.
    meta=True skips both libraries' own (slow, overwritten anyway) initialisation."""
    if meta:
        with torch.device("meta"):
            ref = DiffusersUNet.from_config(config)
        ref = ref.to_empty(device="cpu")
    else:
        ref = DiffusersUNet.from_config(config)
    randomise_(ref).eval()
    with torch.device("meta"):
        ours = UNet2DConditionModel(UNetConfig.from_dict(dict(ref.config)))
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    return ref, ours.eval()


def inputs(cfg: UNetConfig, h=8, w=8, seed=1):
    """Batch 2 with a different timestep per element, and a 77-token context."""
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, cfg.in_channels, h, w, generator=g)
    context = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
    return sample, torch.tensor([10, 981]), context


TINY_VARIANTS = {  # tiny_test_configs.json entries, plus the options SD does not use but diffusers has
    "sd1": ("sd1", {}),
    "sd2": ("sd2", {}),
    # norm_eps 0.1: large next to the activations' variance, so an ignored norm_eps shows
    "sd1-other-options": ("sd1", {"flip_sin_to_cos": False, "freq_shift": 1, "upcast_attention": True, "norm_eps": 0.1}),
    # With 32 groups over 32 channels each GroupNorm group is one channel, so it removes any per-channel
    # constant: conv1/time_emb_proj of the 32-channel ResBlocks have no effect. 16 groups bring them in.
    "sd1-16-groups": ("sd1", {"norm_num_groups": 16}),
}


@pytest.mark.parametrize("variant", TINY_VARIANTS)
@pytest.mark.parametrize("size", [(8, 8), (9, 6)], ids=["8x8", "9x6"])
def test_tiny_matches_diffusers(tiny_configs, variant, size):
    name, overrides = TINY_VARIANTS[variant]
    ref, ours = reference_and_ours({**tiny_configs[name]["unet"], **overrides})
    sample, t, context = inputs(ours.config, *size)
    with torch.no_grad():
        expected = ref(sample, t, context).sample
        got = ours(sample, t, context)
    assert got.shape == (2, 4, *size)
    assert expected.std() > 0.1 and (expected[0] - expected[1]).abs().max() > 0.1  # not trivially equal / zero
    assert (got - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_transformer_norm_eps_on_small_inputs(tiny_configs, name):
    """The spatial transformer's fixed constants, GroupNorm eps 1e-6 and LayerNorm eps 1e-5, only
    matter where a group's variance is that small: compare those blocks alone on inputs of size 1e-3."""
    ref, ours = reference_and_ours(tiny_configs[name]["unet"])
    g = torch.Generator().manual_seed(3)
    x, tokens = 1e-3 * torch.randn(2, 32, 8, 8, generator=g), 1e-3 * torch.randn(2, 64, 32, generator=g)
    context = torch.randn(2, 77, 32, generator=g)
    ref_block, our_block = ref.down_blocks[0].attentions[0], ours.down_blocks[0].attentions[0]
    with torch.no_grad():
        expected = ref_block(x, encoder_hidden_states=context, return_dict=False)[0]
        assert (our_block(x, context) - expected).abs().max() <= 1e-5
        expected = ref_block.transformer_blocks[0](tokens, encoder_hidden_states=context)
        assert (our_block.transformer_blocks[0](tokens, context) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_timestep_forms_agree(tiny_configs, name):
    """A python number, a 0-d tensor and a (B,) tensor of the same timestep give the same output."""
    _, ours = reference_and_ours(tiny_configs[name]["unet"])
    sample, _, context = inputs(ours.config)
    with torch.no_grad():
        out = [ours(sample, t, context) for t in (500, torch.tensor(500), torch.tensor([500, 500]))]
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])


def test_channels_last_latents_run_as_contiguous(tiny_configs):
    """The VAE hands out its latents as a channels-last view; the UNet must not carry that layout through
    every layer (a CPU training step of SD v1.5 ran 20% slower so): same output, contiguous activations."""
    ref, ours = reference_and_ours(tiny_configs["sd1"]["unet"])
    sample, t, context = inputs(ours.config)
    layouts = []
    ours.down_blocks[0].resnets[0].register_forward_hook(lambda m, i, o: layouts.append(o.is_contiguous()))
    with torch.no_grad():
        expected = ref(sample, t, context).sample
        got = ours(sample.to(memory_format=torch.channels_last), t, context)
    assert layouts == [True] and (got - expected).abs().max() <= 1e-5


def test_every_parameter_matters(tiny_configs):
    """Perturbing any one parameter tensor by 1% noise moves the output far beyond the parity
    tolerance, so the parity tests above would catch a wrong, unused or swapped weight.
    (16 groups: see TINY_VARIANTS.)"""
    _, ours = reference_and_ours({**tiny_configs["sd1"]["unet"], "norm_num_groups": 16})
    sample, t, context = inputs(ours.config)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        base = ours(sample, t, context)
        for name, p in ours.named_parameters():
            noise = 0.01 * torch.randn(p.shape, generator=g)
            p.add_(noise)
            assert (ours(sample, t, context) - base).abs().max() > 1e-4, name
            p.sub_(noise)


@pytest.mark.slow
def test_sd15_full_size_matches_diffusers():
    """Full SD v1.5 size on an 8x8 latent, batch 2, 77-token context: relative error <= 1e-4."""
    ref, ours = reference_and_ours(PRESETS["sd15"].to_dict(), meta=True)
    sample, t, context = inputs(ours.config, 8, 8)
    with torch.no_grad():
        expected = ref(sample, t, context).sample
        got = ours(sample, t, context)
    assert expected.std() > 0.1
    assert (got - expected).abs().max() / expected.abs().max() <= 1e-4
    del ref, ours
    gc.collect()


@pytest.mark.parametrize("name, manifest", [("sd15", "sd15_diffusers_unet.json"), ("sd21", "sd21_diffusers_unet.json")])
def test_state_dict_matches_real_checkpoint_keys(name, manifest):
    """Every key and shape of the published diffusers UNet file, and nothing else."""
    expected = {k: shape for k, (shape, _) in load_reference_json(manifest)["tensors"].items()}
    with torch.device("meta"):
        model = UNet2DConditionModel(PRESETS[name])
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == expected


@pytest.mark.parametrize("name, file", [("sd15", "sd15_configs.json"), ("sd21", "sd21_configs.json")])
def test_published_configs_read_as_presets(name, file):
    configs = load_reference_json(file)
    assert UNetConfig.from_dict(configs["hub"]["unet"]) == PRESETS[name]
    assert UNetConfig.from_dict(configs["expanded"]["unet"]) == PRESETS[name]


@pytest.mark.parametrize("name, preset", [("sd1", "tiny"), ("sd2", "tiny-sd2")])
def test_diffusers_model_config_reads_as_preset(tiny_configs, name, preset):
    model = DiffusersUNet.from_config(tiny_configs[name]["unet"])
    assert UNetConfig.from_dict(dict(model.config)) == PRESETS[preset]


@pytest.mark.parametrize("name", PRESETS)
def test_to_dict_builds_the_same_network_in_diffusers(name):
    config = json.loads(json.dumps(PRESETS[name].to_dict()))  # it is plain JSON
    with torch.device("meta"):
        ref = DiffusersUNet.from_config(config)
        ours = UNet2DConditionModel(PRESETS[name])
    assert UNetConfig.from_dict(dict(ref.config)) == PRESETS[name]
    assert {k: v.shape for k, v in ref.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}


def test_num_attention_heads_is_the_head_count():
    cfg = UNetConfig.from_dict({**PRESETS["sd21"].to_dict(), "attention_head_dim": 64, "num_attention_heads": [5, 10, 20, 20]})
    assert cfg == PRESETS["sd21"]
    assert UNetConfig.from_dict({"transformer_layers_per_block": [1, 1, 1, 1], "only_cross_attention": False}) == UNetConfig()


@pytest.mark.parametrize("key, value", [
    ("down_block_types", ["CrossAttnDownBlock2D", "AttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]),
    ("up_block_types", ["UpBlock2D", "CrossAttnUpBlock2D"]),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("class_embed_type", "timestep"),
    ("addition_embed_type", "text_time"),
    ("transformer_layers_per_block", [1, 2, 10, 10]),
    ("layers_per_block", [2, 2, 2, 1]),
    ("attention_head_dim", [5, 10]),
    ("resnet_time_scale_shift", "scale_shift"),
    ("no_such_key", 1),
])
def test_unsupported_config_raises(key, value):
    with pytest.raises(ValueError, match=key) as err:
        UNetConfig.from_dict({**PRESETS["sd15"].to_dict(), key: value})
    assert "\n" not in str(err.value)


def test_gradient_checkpointing_same_output_and_gradients(tiny_configs, monkeypatch):
    _, ours = reference_and_ours(tiny_configs["sd1"]["unet"])
    ours.train().requires_grad_(True)
    sample, t, context = inputs(ours.config)
    calls = []
    monkeypatch.setattr(unet, "checkpoint", lambda *a, **k: calls.append(1) or torch.utils.checkpoint.checkpoint(*a, **k))

    def run(checkpointing):
        ours.gradient_checkpointing = checkpointing
        ours.zero_grad()
        out = ours(sample, t, context)
        (out ** 2).mean().backward()
        return out.detach(), {k: p.grad.clone() for k, p in ours.named_parameters()}

    out, grads = run(False)
    assert not calls
    out_ckpt, grads_ckpt = run(True)
    blocks = sum(isinstance(m, (unet.ResBlock, unet.SpatialTransformer)) for m in ours.modules())
    assert len(calls) == blocks > 0
    assert torch.allclose(out, out_ckpt, atol=1e-6)
    for k in grads:
        assert torch.allclose(grads[k], grads_ckpt[k], atol=1e-6, rtol=1e-5), k
    with torch.no_grad():  # eval mode never checkpoints
        calls.clear()
        ours.eval()(sample, t, context)
    assert not calls


def test_compiles_fullgraph(tiny_configs):
    """torch.compile(fullgraph=True) traces forward in one graph (no .item(), no data-dependent
    branches). The 'eager' backend checks the tracing only; inductor's C++ build is too slow for CPU CI."""
    _, ours = reference_and_ours(tiny_configs["sd2"]["unet"])
    sample, t, context = inputs(ours.config)
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert torch.allclose(compiled(sample, t, context), ours(sample, t, context), atol=1e-6)
        assert torch.allclose(compiled(sample, 7, context), ours(sample, 7, context), atol=1e-6)


def test_skip_channels_are_the_docstring_table():
    """The table in UNet2DConditionModel's docstring, checked against the built SD v1.5 UNet."""
    with torch.device("meta"):
        model = UNet2DConditionModel(PRESETS["sd15"])
    ins = [[r.conv1.in_channels for r in level.resnets] for level in model.up_blocks]
    assert ins == [[2560, 2560, 2560], [2560, 2560, 1920], [1920, 1280, 960], [960, 640, 640]]
    for row in ins:
        assert " ".join(map(str, row)).replace(" ", "/") in UNet2DConditionModel.__doc__
