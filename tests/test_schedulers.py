"""Scheduler parity with diffusers' DDPM / DDIM / PNDM built from SD v1.5's scheduler config:
same timesteps, same samples after every step of a whole sampling loop, same forward process."""
from dataclasses import replace

import pytest
import torch
from conftest import load_reference_json

from minroentgen.configs import SCHEDULER_PRESETS as PRESETS
from minroentgen.configs import SchedulerConfig
from minroentgen.schedulers import make_scheduler

diffusers = pytest.importorskip("diffusers")

CLASSES = {"pndm": "PNDMScheduler", "ddim": "DDIMScheduler", "ddpm": "DDPMScheduler"}
TOL = 1e-6  # fp32, max abs over every intermediate sample


@pytest.fixture(scope="module")
def hub() -> dict:
    """SD v1.5's `scheduler/scheduler_config.json` as published (a PNDMScheduler)."""
    return load_reference_json("sd15_configs.json")["hub"]["scheduler"]


def pair(hub: dict, name: str, **overrides):
    """(ours, diffusers') sampler `name` from SD v1.5's config with `overrides`."""
    ours = make_scheduler(name, replace(SchedulerConfig.from_dict(hub), **overrides))
    theirs = getattr(diffusers, CLASSES[name]).from_config({**hub, **overrides})
    return ours, theirs


def fake_model(x: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str):
    """A stand-in network: a deterministic function of (x, t) that claims x0 = tanh(x) + a wiggle,
    expressed as eps or v; samples stay O(1), and an error in any step changes all later inputs."""
    abar = alphas_cumprod[t]
    x0 = torch.tanh(x) + 0.1 * torch.sin(3 * x + t / 97.0)
    eps = (x - abar**0.5 * x0) / (1 - abar) ** 0.5
    return eps if prediction_type == "epsilon" else abar**0.5 * eps - (1 - abar) ** 0.5 * x0


def run_loop(sched, steps, seed=None, theirs=False, prediction_type="epsilon", **step_kwargs):
    """A whole sampling loop; returns (timesteps, [initial noise, then the sample after each step],
    the generator's next draw, which shows that both sides consumed the same random numbers)."""
    if steps is not None:
        sched.set_timesteps(steps)
    alphas_cumprod = diffusers.DDPMScheduler.from_config(SchedulerConfig().to_dict()).alphas_cumprod
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(seed or 0)
    if seed is not None and not isinstance(sched, diffusers.PNDMScheduler):  # its step takes no generator
        step_kwargs["generator"] = generator
    samples = [x]
    for t in sched.timesteps:
        out = fake_model(x, t, alphas_cumprod, prediction_type)
        x = sched.step(out, t, x, **step_kwargs)
        x = x.prev_sample if theirs else x
        samples.append(x)
    return sched.timesteps, samples, torch.randn(3, generator=generator)


def assert_same_loop(ours, theirs, steps, seed=None, prediction_type="epsilon", **step_kwargs) -> float:
    ts_ours, ours_samples, ours_next = run_loop(ours, steps, seed, False, prediction_type, **step_kwargs)
    ts_theirs, theirs_samples, theirs_next = run_loop(theirs, steps, seed, True, prediction_type, **step_kwargs)
    assert torch.equal(ours_next, theirs_next), "the samplers drew different amounts of noise"
    assert ts_ours.dtype == torch.int64 and torch.equal(ts_ours, ts_theirs), (ts_ours, ts_theirs)
    assert len(ours_samples) == len(theirs_samples)
    diff = max((a - b).abs().max().item() for a, b in zip(ours_samples, theirs_samples))
    assert diff <= TOL, f"max abs diff {diff:.3g} over the loop"
    assert torch.isfinite(ours_samples[-1]).all() and (ours_samples[-1] - ours_samples[0]).abs().max() > 0.05
    return diff


# --- whole sampling loops ---

@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 10, 50, 75])
def test_pndm_loop(hub, steps):
    ours, theirs = pair(hub, "pndm")
    assert_same_loop(ours, theirs, steps)
    assert ours.timesteps[1] == ours.timesteps[2] if steps > 1 else len(ours.timesteps) == 1


@pytest.mark.parametrize("steps", [1, 10, 50, 75])
def test_ddim_loop(hub, steps):
    assert_same_loop(*pair(hub, "ddim"), steps)


@pytest.mark.parametrize("steps,eta", [(1, 1.0), (10, 0.5), (50, 1.0)])
def test_ddim_eta_loop_same_noise(hub, steps, eta):
    assert_same_loop(*pair(hub, "ddim"), steps, seed=7, eta=eta)


@pytest.mark.parametrize("steps", [None, 1, 25])  # None: all 1000 training timesteps, no set_timesteps
def test_ddpm_loop_same_noise(hub, steps):
    ours, theirs = pair(hub, "ddpm")
    assert_same_loop(ours, theirs, steps, seed=7)
    assert len(ours.timesteps) == (steps or 1000)


@pytest.mark.parametrize("name", ["pndm", "ddim", "ddpm"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timestep_spacings(hub, name, spacing):
    ours, theirs = pair(hub, name, timestep_spacing=spacing)
    assert_same_loop(ours, theirs, 10, seed=3)


@pytest.mark.parametrize("name", ["pndm", "ddim", "ddpm"])
def test_v_prediction(hub, name):
    ours, theirs = pair(hub, name, prediction_type="v_prediction")
    assert_same_loop(ours, theirs, 20, seed=3, prediction_type="v_prediction")


@pytest.mark.parametrize("name", ["ddim", "ddpm"])
@pytest.mark.parametrize("spacing", ["trailing", "leading"])
def test_zero_terminal_snr(hub, name, spacing):
    """Lin et al. 2024: the rescaled schedule ends at abar_T = 0, and v-prediction samples from pure noise."""
    zsnr = {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": spacing}
    ours, theirs = pair(hub, name, **zsnr)
    assert torch.equal(ours.schedule.betas, theirs.betas) and torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)
    assert ours.alphas_cumprod[-1] == 0 and ours.alphas_cumprod[0] == pair(hub, name)[0].alphas_cumprod[0]
    assert (ours.alphas_cumprod[:-1] > 0).all() and (ours.schedule.betas <= 1).all()
    assert_same_loop(ours, theirs, 10, seed=3, prediction_type="v_prediction")
    assert ours.timesteps[0] == (999 if spacing == "trailing" else 901)
    assert SchedulerConfig.from_dict(dict(theirs.config)) == ours.config  # saved and read back, either side
    assert ours.config.to_dict()["rescale_betas_zero_snr"] is True


def test_zero_terminal_snr_needs_v_prediction_and_no_pndm(hub):
    with pytest.raises(ValueError, match="v_prediction") as err:
        SchedulerConfig.from_dict({**hub, "rescale_betas_zero_snr": True})
    assert "\n" not in str(err.value)
    config = SchedulerConfig.from_dict({**hub, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"})
    with pytest.raises(ValueError, match="ddim or ddpm"):
        make_scheduler("pndm", config)


@pytest.mark.parametrize("name,overrides", [
    ("ddim", {"clip_sample": True}), ("ddpm", {"clip_sample": True}),
    ("ddim", {"set_alpha_to_one": True}), ("pndm", {"set_alpha_to_one": True}),
    ("ddim", {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}),
    ("pndm", {"steps_offset": 0}),
])
def test_other_config_values(hub, name, overrides):
    ours, theirs = pair(hub, name, **overrides)
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)
    assert_same_loop(ours, theirs, 10, seed=3)


@pytest.mark.parametrize("name", ["pndm", "ddim", "ddpm"])
@pytest.mark.parametrize("wrong", [{"steps_offset": 0}, {"beta_end": 0.0121}, {"set_alpha_to_one": True}])
def test_a_wrong_schedule_is_caught(hub, name, wrong):
    """The loop comparison notices an off-by-one offset, a nudged beta, a wrong final alpha."""
    if name == "ddpm" and "set_alpha_to_one" in wrong:
        pytest.skip("DDPM has no set_alpha_to_one")
    ours = make_scheduler(name, replace(SchedulerConfig.from_dict(hub), **wrong))
    _, theirs = pair(hub, name)
    with pytest.raises(AssertionError):
        assert_same_loop(ours, theirs, 10, seed=3)


@pytest.mark.parametrize("name", ["pndm", "ddim", "ddpm"])
def test_one_object_runs_several_loops(hub, name):
    """set_timesteps starts afresh (PNDM's history too): loop A, loop B, loop A again == loop A."""
    ours, _ = pair(hub, name)
    kwargs = {"seed": 5} if name != "pndm" else {}
    _, first, _ = run_loop(ours, 10, **kwargs)
    run_loop(ours, 7, **kwargs)
    _, again, _ = run_loop(ours, 10, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_step_needs_set_timesteps_and_valid_counts(hub):
    ddim = make_scheduler("ddim", SchedulerConfig())
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim.step(x, 981, x)
    for bad in (0, 1001, 1000):  # 1000 with steps_offset=1 would need timestep 1000
        with pytest.raises(ValueError, match="steps must be from 1 to 1000|steps with the scheduler.s steps_offset=1 give timestep 1000"):
            ddim.set_timesteps(bad)


# --- training: forward process and targets ---

@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("shape", [(6, 4, 8, 8), (6, 3), (6, 2, 3, 4, 5)])
def test_add_noise_velocity_target(hub, prediction_type, shape):
    ours, theirs = pair(hub, "ddpm", prediction_type=prediction_type)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    t = torch.tensor([0, 1, 500, 998, 999, 123])
    noisy = ours.schedule.add_noise(x0, noise, t)
    assert (noisy - theirs.add_noise(x0, noise, t)).abs().max() <= TOL
    assert (noisy - x0).abs().max() > 0.1 and noisy.shape == x0.shape
    v = ours.schedule.get_velocity(x0, noise, t)
    assert (v - theirs.get_velocity(x0, noise, t)).abs().max() <= TOL
    target = ours.schedule.target(x0, noise, t)
    assert torch.equal(target, noise if prediction_type == "epsilon" else v)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_add_noise_low_precision(hub, dtype):
    ours, theirs = pair(hub, "ddim")
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g).to(dtype), torch.randn(4, 4, 8, 8, generator=g).to(dtype)
    t = torch.randint(0, 1000, (4,), generator=g)
    for f in ("add_noise", "get_velocity"):
        a, b = getattr(ours.schedule, f)(x0, noise, t), getattr(theirs, f)(x0, noise, t)
        assert a.dtype == dtype and torch.equal(a, b)


def test_schedule_matches(hub):
    for name in CLASSES:
        ours, theirs = pair(hub, name)
        assert torch.equal(ours.schedule.betas, theirs.betas) and torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)
        assert ours.alphas_cumprod.dtype == torch.float32
        x = torch.randn(1, 4, 2, 2)  # so these samplers start from N(0, I) and feed x_t to the UNet as is
        assert theirs.init_noise_sigma == 1.0 and theirs.scale_model_input(x, 999) is x


# --- configs ---

def test_from_dict_reads_sd_configs(hub):
    assert SchedulerConfig.from_dict(hub) == PRESETS["sd15"]
    assert SchedulerConfig.from_dict({}) == PRESETS["sd15"]
    expanded = load_reference_json("sd15_configs.json")["expanded"]["scheduler"]
    assert SchedulerConfig.from_dict(expanded) == PRESETS["sd15"]
    sd21 = load_reference_json("sd21_configs.json")["hub"]["scheduler"]
    assert SchedulerConfig.from_dict(sd21) == PRESETS["sd21"]
    other = SchedulerConfig.from_dict({**hub, "_class_name": "EulerDiscreteScheduler"})  # kept, not refused:
    assert other.class_name == "EulerDiscreteScheduler"  # which sampler runs is make_scheduler's choice


@pytest.mark.parametrize("name", ["pndm", "ddim", "ddpm"])
@pytest.mark.parametrize("preset", ["sd15", "sd21"])
def test_to_dict_round_trip_with_diffusers(name, preset):
    ours = make_scheduler(name, PRESETS[preset])
    d = ours.config.to_dict()
    assert d["_class_name"] == CLASSES[name]
    theirs = getattr(diffusers, CLASSES[name]).from_config(d)
    for key, value in d.items():
        if key in theirs.config:
            assert theirs.config[key] == value, key
    assert SchedulerConfig.from_dict(dict(theirs.config)) == ours.config
    assert_same_loop(ours, theirs, 10, seed=3, prediction_type=PRESETS[preset].prediction_type)


@pytest.mark.parametrize("key,value", [
    ("beta_schedule", "squaredcos_cap_v2"), ("prediction_type", "sample"), ("timestep_spacing", "karras"),
    ("skip_prk_steps", False), ("variance_type", "fixed_large"), ("trained_betas", [0.1, 0.2]),
    ("thresholding", True),
])
def test_unsupported_config_values_raise(hub, key, value):
    with pytest.raises(ValueError, match=key) as err:
        SchedulerConfig.from_dict({**hub, key: value})
    assert "\n" not in str(err.value)


def test_clip_sample_range_checked_only_when_clipping(hub):
    SchedulerConfig.from_dict({**hub, "clip_sample_range": 2.0})  # unused without clip_sample
    with pytest.raises(ValueError, match="clip_sample_range"):
        SchedulerConfig.from_dict({**hub, "clip_sample": True, "clip_sample_range": 2.0})


def test_bad_scheduler_name():
    with pytest.raises(ValueError, match="ddim") as err:
        make_scheduler("euler", SchedulerConfig())
    assert "'euler'" in str(err.value) and "pndm" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_no_host_sync_and_cpu_generator(hub):
    ours, theirs = pair(hub, "ddpm", prediction_type="v_prediction")
    g = torch.Generator("cuda").manual_seed(0)
    x0, noise = (torch.randn(4, 4, 8, 8, generator=g, device="cuda", dtype=torch.float16) for _ in range(2))
    t = torch.randint(0, 1000, (4,), generator=g, device="cuda")
    ours.schedule.add_noise(x0, noise, t)  # the first call copies abar to the GPU
    torch.cuda.set_sync_debug_mode("error")
    try:
        noisy, target = ours.schedule.add_noise(x0, noise, t), ours.schedule.target(x0, noise, t)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(noisy, theirs.add_noise(x0, noise, t))
    assert torch.equal(target, theirs.get_velocity(x0, noise, t))
    # a seeded CPU generator gives the same DDPM loop on the GPU as on the CPU
    results = []
    for device in ("cpu", "cuda"):
        ours.set_timesteps(10)
        generator, x = torch.Generator().manual_seed(0), torch.ones(1, 4, 8, 8, device=device)
        for step_t in ours.timesteps:
            x = ours.step(0.5 * x, step_t, x, generator=generator)
        results.append(x.cpu())
    assert (results[0] - results[1]).abs().max() <= 1e-5
