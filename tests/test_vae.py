"""AutoencoderKL parity with diffusers on random weights (fp32), key/shape coverage, configs."""
import math

import pytest
import torch
from conftest import load_reference_json

from minroentgen.configs import VAE_PRESETS as PRESETS
from minroentgen.configs import VAEConfig
from minroentgen.vae import AutoencoderKL, DiagonalGaussian

diffusers = pytest.importorskip("diffusers")
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution  # noqa: E402


def randomise_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter, so that no default init (GroupNorm weight 1, bias 0) hides a bug:
    weights ~ N(0, 1/fan_in) keep activations O(1); norm scales ~ 1 + N(0, 0.3^2); biases ~ N(0, 0.3^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim > 1:
                p.copy_(noise / math.sqrt(p[0].numel()))
            else:
                p.copy_(0.3 * noise + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return model


def reference_vae(config: dict, seed: int = 0):
    return randomise_(diffusers.AutoencoderKL.from_config(config), seed).eval()


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def assert_nontrivial(t: torch.Tensor):
    assert torch.isfinite(t).all() and t.std() > 0.05, "output is trivial: parity would prove nothing"


# ----------------------------------------------------------------------------- parity, tiny

@pytest.fixture(scope="module")
def tiny_pair():
    cfg = load_reference_json("tiny_test_configs.json")["sd1"]["vae"]
    ref = reference_vae(cfg)
    ours = AutoencoderKL(VAEConfig.from_dict(cfg)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@torch.no_grad()
def test_tiny_encode_sample_mode_decode_match_diffusers(tiny_pair):
    ref, ours = tiny_pair
    f = ours.config.downsample_factor
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    theirs, mine = ref.encode(x).latent_dist, ours.encode(x)
    assert mine.mean.shape == (2, 4, 32 // f, 32 // f)
    for a, b in ((mine.mean, theirs.mean), (mine.logvar, theirs.logvar), (mine.std, theirs.std),
                 (mine.mode(), theirs.mode())):
        assert_nontrivial(b)
        assert (a - b).abs().max() <= 1e-5
    s_mine = mine.sample(torch.Generator().manual_seed(7))
    s_theirs = theirs.sample(torch.Generator().manual_seed(7))
    assert (s_mine - s_theirs).abs().max() <= 1e-5
    assert (s_mine - mine.mean).abs().max() > 0.1  # the noise is really there

    z = torch.randn(2, 4, 16, 16)
    img_mine, img_theirs = ours.decode(z), ref.decode(z).sample
    assert img_mine.shape == (2, 3, 16 * f, 16 * f)
    assert_nontrivial(img_theirs)
    assert (img_mine - img_theirs).abs().max() <= 1e-5


@torch.no_grad()
def test_tiny_forward_matches_diffusers(tiny_pair):
    ref, ours = tiny_pair
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    rec, posterior = ours(x, generator=torch.Generator().manual_seed(3))
    theirs = ref(x, sample_posterior=True, generator=torch.Generator().manual_seed(3)).sample
    assert (rec - theirs).abs().max() <= 1e-5
    rec_mode, _ = ours(x, sample_posterior=False)
    assert (rec_mode - ref(x).sample).abs().max() <= 1e-5
    assert (rec_mode - rec).abs().max() > 1e-3  # sampling changed the latent
    assert posterior.kl().shape == (1,)


def test_sample_uses_the_generator_only():
    moments = torch.randn(2, 8, 4, 4)
    a = DiagonalGaussian(moments).sample(torch.Generator().manual_seed(1))
    b = DiagonalGaussian(moments).sample(torch.Generator().manual_seed(1))
    c = DiagonalGaussian(moments).sample(torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_sample_on_gpu_with_cpu_generator_matches_diffusers():
    moments = torch.randn(2, 8, 4, 4, device="cuda", dtype=torch.float16)
    a = DiagonalGaussian(moments).sample(torch.Generator().manual_seed(1))
    b = DiagonalGaussianDistribution(moments).sample(torch.Generator().manual_seed(1))
    assert a.device == moments.device and a.dtype == torch.float16 and torch.equal(a, b)


def test_kl_matches_formula_and_diffusers():
    moments = torch.randn(3, 8, 5, 6, dtype=torch.float64)
    moments[:, 4:] *= 2  # spread the log-variances
    moments[0, 4, 0, 0], moments[1, 5, 0, 0] = 50.0, -50.0  # clamped to [-30, 20], as LDM
    q = DiagonalGaussian(moments)
    mean, logvar = moments[:, :4], moments[:, 4:].clamp(-30, 20)
    direct = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))
    assert q.kl().shape == (3,)
    torch.testing.assert_close(q.kl(), direct, rtol=1e-12, atol=0)
    torch.testing.assert_close(q.kl(), DiagonalGaussianDistribution(moments).kl(), rtol=1e-12, atol=0)
    # N(0, I) has KL 0
    assert DiagonalGaussian(torch.zeros(1, 8, 2, 2)).kl().abs().max() == 0


# ----------------------------------------------------------------------------- full size

def test_sd15_names_and_shapes_equal_the_real_checkpoint():
    with torch.device("meta"):
        model = AutoencoderKL(PRESETS["sd15"])
    ours = {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()}
    assert ours == load_reference_json("sd15_diffusers_vae.json")["tensors"]
    assert sum(p.numel() for p in model.parameters()) == 83_653_863
    assert PRESETS["sd15"].downsample_factor == 8


@pytest.mark.slow
@torch.no_grad()
def test_sd15_encode_decode_match_diffusers():
    ref = reference_vae(PRESETS["sd15"].to_dict())
    with torch.device("meta"):
        ours = AutoencoderKL(PRESETS["sd15"]).eval()
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    theirs, mine = ref.encode(x).latent_dist, ours.encode(x)
    assert mine.mean.shape == (1, 4, 8, 8)
    for a, b in ((mine.mean, theirs.mean), (mine.logvar, theirs.logvar)):
        assert_nontrivial(b)
        assert max_rel(a, b) <= 1e-4
    z = torch.randn(1, 4, 8, 8)
    img_theirs = ref.decode(z).sample
    assert_nontrivial(img_theirs)
    assert max_rel(ours.decode(z), img_theirs) <= 1e-4


# ----------------------------------------------------------------------------- configs

def test_from_dict_reads_diffusers_configs():
    sd15 = load_reference_json("sd15_configs.json")
    assert VAEConfig.from_dict(sd15["hub"]["vae"]) == PRESETS["sd15"]
    assert VAEConfig.from_dict(sd15["expanded"]["vae"]) == PRESETS["sd15"]
    tiny = load_reference_json("tiny_test_configs.json")["sd1"]["vae"]
    assert VAEConfig.from_dict(tiny) == PRESETS["tiny"]
    assert VAEConfig.from_dict(dict(diffusers.AutoencoderKL.from_config(tiny).config)) == PRESETS["tiny"]
    assert VAEConfig.from_dict(PRESETS["sd15"].to_dict()) == PRESETS["sd15"]


@pytest.mark.parametrize("name", ["sd15", "tiny"])
def test_to_dict_builds_the_same_network_in_diffusers(name):
    config = PRESETS[name]
    with torch.device("meta"):
        theirs = diffusers.AutoencoderKL.from_config(config.to_dict())
        ours = AutoencoderKL(config)
    assert {k: v.shape for k, v in theirs.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    assert VAEConfig.from_dict(dict(theirs.config)) == config


@pytest.mark.parametrize("key, value", [
    ("shift_factor", 0.1159), ("latents_mean", [0.0] * 4), ("use_quant_conv", False),
    ("use_post_quant_conv", False), ("mid_block_add_attention", False), ("act_fn", "gelu"),
    ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
    ("up_block_types", ["UpDecoderBlock2D"]), ("bogus_key", 1),
])
def test_unsupported_config_raises(key, value):
    d = {**PRESETS["tiny"].to_dict(), key: value}
    with pytest.raises(ValueError, match=key):
        VAEConfig.from_dict(d)


def test_compiles_without_graph_breaks(tiny_pair):
    _, ours = tiny_pair
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        moments = torch.compile(lambda x: ours.encode(x).mean, backend="eager", fullgraph=True)(x)
        image = torch.compile(ours.decode, backend="eager", fullgraph=True)(moments)
        torch.testing.assert_close(image, ours.decode(ours.encode(x).mean), rtol=0, atol=0)
