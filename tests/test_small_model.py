"""The "small" presets of the embedded default model: the reference libraries build the same networks,
give the same outputs on the same random weights, and the weights fit the 50 MB budget in fp16."""
import json

import pytest
import torch

from minroentgen import configs as C
from minroentgen import training

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

BUDGET = 50 * 10**6  # bytes of fp16 weights for all three networks (issue 5)


@pytest.fixture(scope="module")
def small():
    return training.random_model("small", 128, seed=0)


def test_presets_round_trip_through_their_config_json():
    for presets, config_cls in ((C.VAE_PRESETS, C.VAEConfig), (C.UNET_PRESETS, C.UNetConfig),
                                (C.CLIP_PRESETS, C.CLIPTextConfig)):
        config = presets["small"]
        assert config_cls.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_weights_fit_the_budget_in_fp16(small):
    sizes = {name: 2 * sum(p.numel() for p in getattr(small, name).parameters())
             for name in ("text_encoder", "unet", "vae")}
    assert sum(sizes.values()) <= BUDGET, sizes
    assert sizes["unet"] > 2 * 10**6  # a few million parameters, not a toy
    assert small.vae.config.downsample_factor == 4 and small.unet.config.sample_size == 32


@pytest.mark.slow
@torch.no_grad()
def test_same_outputs_as_diffusers_and_transformers(small):
    g = torch.Generator().manual_seed(0)
    ref_vae = diffusers.AutoencoderKL.from_config(small.vae.config.to_dict()).eval()
    ref_vae.load_state_dict(small.vae.state_dict(), strict=True)
    z = torch.randn(1, 4, 32, 32, generator=g)
    expected = ref_vae.decode(z).sample  # (1, 3, 128, 128)
    assert expected.shape == (1, 3, 128, 128) and expected.std() > 1e-3
    assert (small.vae.decode(z) - expected).abs().max() <= 1e-5

    ref_unet = diffusers.UNet2DConditionModel.from_config(small.unet.config.to_dict()).eval()
    ref_unet.load_state_dict(small.unet.state_dict(), strict=True)
    x, t, context = torch.randn(2, 4, 32, 32, generator=g), torch.tensor([10, 900]), torch.randn(2, 77, 128, generator=g)
    expected = ref_unet(x, t, context).sample
    assert expected.std() > 1e-3
    assert (small.unet(x, t, context) - expected).abs().max() <= 1e-5

    ref_text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**small.text_encoder.config.to_dict())).eval()
    loaded = ref_text.load_state_dict({k.removeprefix("text_model."): v for k, v in small.text_encoder.state_dict().items()},
                                      strict=False)
    assert not loaded.unexpected_keys and all("position_ids" in k for k in loaded.missing_keys)  # a buffer, in some versions
    ids = small.tokenizer(["small left pleural effusion", ""])
    expected = ref_text(ids).last_hidden_state  # (2, 77, 128)
    assert (small.text_encoder(ids) - expected).abs().max() <= 1e-5


def test_samples_a_128_pixel_image(small):
    image = small("small left pleural effusion", steps=2, progress=False)
    assert image.shape == (1, 3, 128, 128) and torch.isfinite(image).all()
