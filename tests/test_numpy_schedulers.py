"""The numpy schedulers of the ONNX runner (crdiff_cli.deploy.schedulers) against diffusers' own, the oracle.

Each case builds ``getattr(diffusers, cls).from_config(cfg, **options)`` (as ``crdiff --scheduler`` does) and
``make_scheduler(name, cfg)`` from a base model's scheduler config (SD1.5's PNDM, SD2.1-v's DDIM, SDXL's Euler, and
variants), then runs whole sampling loops of 1, 2, 7 and 25 steps where the "UNet" output of every step is a seeded
random float32 tensor, the same array for both.

Ancestral noise: diffusers' ``step(..., generator=g)`` draws ``torch.randn(shape, generator=g)`` (``randn_tensor``
with a CPU generator); ours calls ``noise(shape)``, which draws ``torch.randn(shape, generator=g2)`` from a second
generator seeded identically. Both draw the same shapes in the same order, so the two streams are the same numbers,
with nothing monkeypatched.

Tolerances. On CPU, torch computes float32 ``sqrt`` (also ``x ** 0.5``), ``log`` and ``exp`` with MKL's vector math
(even for 0-d tensors), which is up to ~0.75 unit in the last place off the correctly rounded result numpy gives.
So the sigma tables and the per-step coefficients differ by one ulp now and then, and the samples by a few ulp:

- per step, with both fed diffusers' previous sample (a whole loop, multistep history included), every
  ``prev_sample`` is within 1e-6 of diffusers' times max(1, the largest magnitude of the step's input or output
  sample): the random model outputs drive the latents to |x| ~ 20-40, where one float32 ulp is ~2e-6, and an
  Euler step from sigma 14.6 cancels most of its input;
- free-running (each fed its own previous sample) the trajectories drift apart by a few more ulp over 25 steps,
  checked at 3e-6 times max(1, the largest magnitude of the trajectory so far: 4096 for a zero-terminal-SNR
  Euler's first sample);
- timesteps are equal exactly, except Euler's Karras timesteps, which are floats interpolated on log(sigma) of
  that one-ulp-different sigma table (within 1e-3 of a timestep).
"""

from __future__ import annotations

import inspect
import math
import subprocess
import sys
import textwrap
import warnings

import diffusers
import numpy as np
import pytest
import torch

from crdiff_cli.deploy.schedulers import SCHEDULER_NAMES, make_scheduler
from crdiff_cli.pipelines.schedulers import SCHEDULER_OPTIONS, SCHEDULERS

diffusers.utils.logging.set_verbosity_error()
# diffusers' np.array(tensor) calls warn under numpy 2 (not ours)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# The base models' scheduler/scheduler_config.json, as on the Hub.
SD15 = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
        "clip_sample": False}
SD21V = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
         "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
         "prediction_type": "v_prediction", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
         "trained_betas": None}
SDXL = {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
        "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
        "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
        "use_karras_sigmas": False}
BASES = {"sd15": SD15, "sd21v": SD21V, "sdxl": SDXL}

STEP_COUNTS = (1, 2, 7, 25)
SHAPE = (2, 4, 8, 8)  # a batch of two small latents
PER_STEP_TOL = 1e-6
FREE_TOL = 3e-6


def _cases():
    """(name, base, overrides): every name on every base, per timestep spacing (None: the config's or the class
    default), with and without Karras sigmas and each final sigma where the class has them."""
    for name in SCHEDULER_NAMES:
        for base in BASES:
            spacings = (None,) if name == "euler-trailing" else (None, "leading", "trailing", "linspace")
            for spacing in spacings:
                karras = (False, True) if name in ("euler", "euler-trailing", "dpm++") else (False,)
                finals = ("zero", "sigma_min") if name == "dpm++" else (None,)
                for use_karras in karras:
                    for final in finals:
                        overrides = {}
                        if spacing:
                            overrides["timestep_spacing"] = spacing
                        if use_karras:
                            overrides["use_karras_sigmas"] = True
                        if final:
                            overrides["final_sigmas_type"] = final
                        yield name, base, overrides


# Less common configurations a model may ship: beta schedules, zero-terminal-SNR, other prediction types, solver
# orders, configs of other classes (UniPC, DEIS), diffusers' ``_use_default_values`` and "hidden" keys.
LINEAR = {"_class_name": "DDPMScheduler", "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
          "num_train_timesteps": 1000, "clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True}
ZSNR = {**SD21V, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
EXTRA_CASES = [
    *[(name, "linear", {}) for name in SCHEDULER_NAMES],
    *[(name, "linear", {"num_train_timesteps": 500, "steps_offset": 0, "timestep_spacing": spacing})
      for name in ("pndm", "ddim", "euler", "dpm++") for spacing in ("leading", "trailing")],
    *[(name, "sd15", {"beta_schedule": "squaredcos_cap_v2"}) for name in ("ddim", "euler", "euler-a", "dpm++")],
    *[(name, "sd15", {"trained_betas": "scaled"}) for name in SCHEDULER_NAMES],
    *[(name, "zsnr", {}) for name in ("ddim", "euler", "euler-a", "dpm++")],
    ("pndm", "sd15", {"set_alpha_to_one": True}),
    ("pndm", "sd21v", {"timestep_spacing": "trailing"}),
    ("ddim", "sd15", {"set_alpha_to_one": True, "timestep_spacing": "trailing"}),
    ("ddim", "sd15", {"clip_sample": True}),
    ("ddim", "sd15", {"clip_sample": True, "clip_sample_range": 2.5, "prediction_type": "sample"}),
    ("euler", "sd15", {"prediction_type": "sample"}),
    ("euler", "sdxl", {"final_sigmas_type": "sigma_min"}),
    ("euler", "sdxl", {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}),
    ("euler", "sdxl", {"timestep_type": "continuous"}),
    ("euler", "sdxl", {"_use_default_values": ["timestep_spacing"]}),
    ("euler-a", "sd21v", {"timestep_spacing": "trailing"}),
    ("dpm++", "sd15", {"solver_order": 1}),
    ("dpm++", "sd15", {"solver_order": 3}),
    ("dpm++", "sd21v", {"solver_order": 3, "final_sigmas_type": "sigma_min"}),
    ("dpm++", "sd15", {"solver_type": "heun"}),
    ("dpm++", "sd15", {"lower_order_final": False, "final_sigmas_type": "sigma_min"}),
    ("dpm++", "sd15", {"euler_at_final": True, "final_sigmas_type": "sigma_min"}),
    ("dpm++", "sd15", {"prediction_type": "sample"}),
    ("dpm++", "sd15", {"lambda_min_clipped": -2.5}),
    ("dpm++", "sdxl", {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}),  # hidden keys for DPM
    ("dpm++", "sd15", {"_class_name": "UniPCMultistepScheduler", "solver_type": "bh2", "solver_order": 2}),
    ("dpm++", "sd15", {"_class_name": "DEISMultistepScheduler", "algorithm_type": "deis", "solver_type": "logrho",
                       "final_sigmas_type": "sigma_min"}),
]


def _config(base: str, overrides: dict) -> dict:
    cfg = dict({**BASES, "linear": LINEAR, "zsnr": ZSNR}[base])
    cfg.update(overrides)
    if cfg.get("trained_betas") == "scaled":  # SD's betas, as a plain list
        cfg["trained_betas"] = (np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2).tolist()
    return cfg


def _pair(name: str, cfg: dict):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffusers' deprecation notes (DEIS/UniPC options)
        oracle = getattr(diffusers, SCHEDULERS[name]).from_config(cfg, **SCHEDULER_OPTIONS.get(name, {}))
    return oracle, make_scheduler(name, cfg)


def _close(ours: np.ndarray, ref: np.ndarray, tol: float, *inputs: np.ndarray) -> float:
    """How far ``ours`` is from ``ref``, in units of ``tol * max(1, max |ref|, max |inputs|)`` (passes at <= 1)."""
    scale = max(1.0, *(float(np.abs(a).max()) for a in (ref, *inputs)))
    return float(np.abs(ours - ref).max()) / (tol * scale)


def _compare_loop(name: str, cfg: dict, steps: int, seed: int = 0) -> None:
    """One sampling loop of diffusers' scheduler and two of ours: ``ours_forced`` fed diffusers' sample at each
    step (the per-step check), ``ours`` its own (the free-running check)."""
    oracle, ours = _pair(name, cfg)
    oracle.set_timesteps(steps)
    ours.set_timesteps(steps)
    expected = oracle.timesteps.numpy()
    assert ours.timesteps.dtype == expected.dtype
    if name.startswith("euler") and cfg.get("use_karras_sigmas"):
        np.testing.assert_allclose(ours.timesteps, expected, rtol=0, atol=1e-3)
    else:
        np.testing.assert_array_equal(ours.timesteps, expected)
    assert math.isclose(ours.init_noise_sigma, float(oracle.init_noise_sigma), rel_tol=1e-6, abs_tol=1e-6)

    rng = np.random.default_rng(seed)
    start = rng.standard_normal(SHAPE, dtype=np.float32)
    ref = torch.from_numpy(start) * oracle.init_noise_sigma
    free = (start * np.float32(ours.init_noise_sigma)).astype(np.float32)
    assert _close(free, ref.numpy(), PER_STEP_TOL) <= 1
    largest = float(np.abs(free).max())  # the free-running check is relative to the largest sample so far
    ours_forced = make_scheduler(name, cfg)
    ours_forced.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    noise_a, noise_b = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    ancestral = {"generator": generator} if name == "euler-a" else {}

    for t_ref, t_ours in zip(oracle.timesteps, ours.timesteps):
        scaled = oracle.scale_model_input(ref, t_ref).numpy()
        assert _close(ours_forced.scale_model_input(ref.numpy(), t_ours), scaled, PER_STEP_TOL) <= 1
        ours.scale_model_input(free, t_ours)
        model_output = rng.standard_normal(SHAPE, dtype=np.float32)
        previous = ref.numpy().copy()
        ref = oracle.step(torch.from_numpy(model_output.copy()), t_ref, ref, **ancestral).prev_sample
        expected = ref.numpy()
        forced = ours_forced.step(model_output, t_ours, previous, noise=lambda shape: torch.randn(
            shape, generator=noise_a, dtype=torch.float32).numpy())
        free = ours.step(model_output, t_ours, free, noise=lambda shape: torch.randn(
            shape, generator=noise_b, dtype=torch.float32).numpy())
        assert forced.dtype == np.float32 and free.dtype == np.float32
        assert _close(forced, expected, PER_STEP_TOL, previous) <= 1, f"step at t={t_ref}"
        largest = max(largest, float(np.abs(expected).max()))
        assert np.abs(free - expected).max() <= FREE_TOL * max(1.0, largest), f"free-running at t={t_ref}"


def _case_id(case) -> str:
    name, base, overrides = case
    return "-".join([name, base, *(f"{k}={v}" for k, v in overrides.items())]).replace(" ", "")


@pytest.mark.parametrize("name,base,overrides", list(_cases()), ids=map(_case_id, _cases()))
def test_matches_diffusers(name, base, overrides):
    for steps in STEP_COUNTS:
        _compare_loop(name, _config(base, overrides), steps)


@pytest.mark.parametrize("name,base,overrides", EXTRA_CASES, ids=map(_case_id, EXTRA_CASES))
def test_matches_diffusers_other_configs(name, base, overrides):
    for steps in STEP_COUNTS:
        _compare_loop(name, _config(base, overrides), steps)


@pytest.mark.parametrize("name", ["pndm", "ddim", "euler", "euler-a", "dpm++"])
def test_noise_schedule_is_diffusers(name):
    """The float32 tables agree: alphas_cumprod bit for bit (torch.linspace and torch.cumprod reproduced) but with
    zero-terminal-SNR rescaling (torch's sqrt, amplified near t=999), sigmas within one ulp (torch's sqrt)."""
    for cfg in (SD15, LINEAR, _config("sd15", {"beta_schedule": "squaredcos_cap_v2"}), ZSNR):
        oracle, ours = _pair(name, cfg)
        rescaled = cfg.get("rescale_betas_zero_snr", False)
        if rescaled:
            np.testing.assert_allclose(ours.alphas_cumprod, oracle.alphas_cumprod.numpy(), rtol=2e-5, atol=0)
        else:
            np.testing.assert_array_equal(ours.alphas_cumprod, oracle.alphas_cumprod.numpy())
        if hasattr(ours, "sigmas"):
            oracle.set_timesteps(30)
            ours.set_timesteps(30)
            np.testing.assert_allclose(ours.sigmas, oracle.sigmas.numpy(), rtol=2e-5 if rescaled else 2.5e-7, atol=0)


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_schedules_for_every_step_count(name):
    """timesteps (and sigmas, init_noise_sigma) for 1-60 steps and the extremes, every spacing: the rounding and
    range arithmetic of each spacing, including the counts where ``np.arange`` with a float step is ragged."""
    for base in ("sd15", "sdxl"):
        for spacing in ("leading", "trailing", "linspace"):
            for karras in ((False, True) if name in ("euler", "dpm++") else (False,)):
                oracle, ours = _pair(name, _config(base, {"timestep_spacing": spacing, "use_karras_sigmas": karras}))
                for steps in (*range(1, 61), 333, 999, 1000):
                    oracle.set_timesteps(steps)
                    ours.set_timesteps(steps)
                    expected = oracle.timesteps.numpy()
                    if karras and name == "euler":
                        np.testing.assert_allclose(ours.timesteps, expected, rtol=0, atol=1e-3)
                    else:
                        np.testing.assert_array_equal(ours.timesteps, expected)
                    if hasattr(ours, "sigmas"):
                        np.testing.assert_allclose(ours.sigmas, oracle.sigmas.numpy(), rtol=2.5e-7, atol=0)
                    assert math.isclose(ours.init_noise_sigma, float(oracle.init_noise_sigma), rel_tol=1e-6)


def test_torch_linspace_and_cumprod_reproduced():
    """The two torch kernels the betas go through, bit for bit, beyond the configs above."""
    from crdiff_cli.deploy.schedulers import _cumprod32, _torch_linspace32

    rng = np.random.default_rng(7)
    cases = [(0.0, 1.0, 1), (0.0, 1.0, 2), (0.0, 0.02, 1000), (-3.0, 7.5, 33), (0.02, 0.0001, 999), (1e-8, 1.0, 4097)]
    cases += [(float(a), float(b), int(n)) for a, b, n in zip(rng.uniform(-1, 1, 40), rng.uniform(-1, 1, 40),
                                                               rng.integers(1, 3000, 40))]
    for start, end, steps in cases:
        expected = torch.linspace(start, end, steps, dtype=torch.float32).numpy()
        np.testing.assert_array_equal(_torch_linspace32(start, end, steps), expected, err_msg=str((start, end, steps)))
    values = (1 - rng.uniform(0, 0.03, 2000)).astype(np.float32)
    np.testing.assert_array_equal(_cumprod32(values), torch.cumprod(torch.from_numpy(values), 0).numpy())


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_defaults_are_diffusers(name):
    """Missing keys take the diffusers class's __init__ defaults (fails when a diffusers upgrade changes one)."""
    from crdiff_cli.deploy.schedulers import _CLASSES

    parameters = inspect.signature(getattr(diffusers, SCHEDULERS[name]).__init__).parameters
    expected = {key: p.default for key, p in parameters.items() if key != "self"}
    assert _CLASSES[name]._DEFAULTS == expected


def test_class_from_config():
    """name None: the class the config names; the --scheduler name is recorded."""
    assert make_scheduler(None, SD15).name == "pndm"
    assert make_scheduler(None, SD21V).name == "ddim"
    assert make_scheduler(None, SDXL).name == "euler"
    assert make_scheduler(None, {**SDXL, "_class_name": "EulerAncestralDiscreteScheduler"}).name == "euler-a"
    assert make_scheduler(None, {**SDXL, "_class_name": "DPMSolverMultistepScheduler"}).name == "dpm++"
    trailing = make_scheduler(None, {**SDXL, "timestep_spacing": "trailing"})
    assert trailing.name == "euler" and trailing.config["timestep_spacing"] == "trailing"
    assert make_scheduler("euler-trailing", SDXL).config["timestep_spacing"] == "trailing"
    assert make_scheduler("ddim", SD15).config["clip_sample"] is False  # from the PNDM config
    assert make_scheduler("ddim", SDXL).config["set_alpha_to_one"] is False
    assert make_scheduler("ddim", {"_class_name": "DDIMScheduler"}).config["clip_sample"] is True  # DDIM's default
    deis = {**SD15, "algorithm_type": "deis", "final_sigmas_type": "sigma_min"}
    assert make_scheduler("dpm++", deis).config["algorithm_type"] == "dpmsolver++"
    assert deis["algorithm_type"] == "deis"  # the caller's config is left alone

    for config, named in (({**SD15, "_class_name": "LMSDiscreteScheduler"}, "LMSDiscreteScheduler"),
                          ({k: v for k, v in SD15.items() if k != "_class_name"}, "None")):
        with pytest.raises(ValueError) as info:
            make_scheduler(None, config)
        message = str(info.value)
        assert named in message and "euler-a" in message and "dpm++" in message and "\n" not in message
    with pytest.raises(ValueError, match="'lms'.*pndm, ddim"):
        make_scheduler("lms", SD15)


REFUSED = [
    ("pndm", {"skip_prk_steps": False}, "skip_prk_steps"),
    ("pndm", {"prediction_type": "sample"}, "prediction_type"),
    ("pndm", {"num_train_timesteps": 0}, "num_train_timesteps"),
    ("ddim", {"thresholding": True}, "thresholding"),
    ("ddim", {"timestep_spacing": "karras"}, "timestep_spacing"),
    ("ddim", {"beta_schedule": "sigmoid"}, "beta_schedule"),
    ("ddim", {"steps_offset": None}, "steps_offset"),
    ("euler", {"interpolation_type": "log_linear"}, "interpolation_type"),
    ("euler", {"use_exponential_sigmas": True}, "use_exponential_sigmas"),
    ("euler", {"use_beta_sigmas": True}, "use_beta_sigmas"),
    ("euler", {"timestep_type": "continuous", "prediction_type": "v_prediction"}, "timestep_type"),
    ("euler", {"final_sigmas_type": "sigma_max"}, "final_sigmas_type"),
    ("euler", {"trained_betas": [0.1, 0.2]}, "trained_betas"),
    ("euler-trailing", {"prediction_type": "flow_prediction"}, "prediction_type"),
    ("euler-a", {"prediction_type": "sample"}, "prediction_type"),
    ("dpm++", {"algorithm_type": "sde-dpmsolver++"}, "algorithm_type"),
    ("dpm++", {"algorithm_type": "dpmsolver"}, "algorithm_type"),
    ("dpm++", {"solver_order": 4}, "solver_order"),
    ("dpm++", {"thresholding": True}, "thresholding"),
    ("dpm++", {"use_lu_lambdas": True}, "use_lu_lambdas"),
    ("dpm++", {"use_flow_sigmas": True}, "use_flow_sigmas"),
    ("dpm++", {"variance_type": "learned_range"}, "variance_type"),
    ("dpm++", {"prediction_type": "flow_prediction"}, "prediction_type"),
]


@pytest.mark.parametrize("name,overrides,key", REFUSED)
def test_unsupported_config_refused(name, overrides, key):
    """What is not implemented is refused with one line naming the key, the value and what works."""
    with pytest.raises(ValueError) as info:
        make_scheduler(name, {**SD15, **overrides})
    message = str(info.value)
    assert f"{key}={overrides[key]!r}" in message and "supported" in message and "\n" not in message


def test_misuse_refused():
    scheduler = make_scheduler("euler-a", SDXL)
    sample = np.zeros(SHAPE, np.float32)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(sample, 999, sample, noise=lambda shape: np.zeros(shape, np.float32))
    scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match="noise"):
        scheduler.step(sample, scheduler.timesteps[0], sample)
    for steps in (0, 1001, 2.5):
        with pytest.raises(ValueError, match="num_inference_steps"):
            scheduler.set_timesteps(steps)
    for name in ("euler", "euler-a", "dpm++"):  # one step too many: a clear error, not an IndexError
        scheduler = make_scheduler(name, SDXL)
        scheduler.set_timesteps(2)
        with pytest.raises(ValueError, match="after its last timestep"):
            for t in (*scheduler.timesteps, scheduler.timesteps[-1]):
                scheduler.step(sample, t, sample, noise=lambda shape: np.zeros(shape, np.float32))


def _run(scheduler, steps: int, seed: int, stop: int | None = None) -> np.ndarray:
    """A loop with seeded model outputs (and noise), optionally abandoned after ``stop`` steps."""
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(steps)
    sample = rng.standard_normal(SHAPE, dtype=np.float32) * np.float32(scheduler.init_noise_sigma)
    for i, t in enumerate(scheduler.timesteps):
        if i == stop:
            break
        scheduler.scale_model_input(sample, t)
        sample = scheduler.step(rng.standard_normal(SHAPE, dtype=np.float32), t, sample,
                                noise=lambda shape: torch.randn(shape, generator=generator).numpy())
    return sample


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_set_timesteps_restarts(name):
    """set_timesteps starts a new image: the multistep history and step counter are forgotten, so a run after
    an abandoned one (or after a finished one) equals a fresh scheduler's."""
    fresh = _run(make_scheduler(name, SD15), 7, seed=3)
    reused = make_scheduler(name, SD15)
    _run(reused, 7, seed=5, stop=4)
    np.testing.assert_array_equal(_run(reused, 7, seed=3), fresh)
    np.testing.assert_array_equal(_run(reused, 7, seed=3), fresh)
    _run(reused, 25, seed=5)
    np.testing.assert_array_equal(_run(reused, 7, seed=3), fresh)


@pytest.mark.parametrize("begin", [None, 0])
def test_repeated_first_timestep(begin):
    """DPM++ with Karras sigmas on a cosine schedule repeats its first timestep. diffusers then starts at the
    second match (SD1.x/2.x pipelines) and runs out of sigmas at the last step, or at 0 with set_begin_index(0)
    (SDXL pipelines); ours does the same, with a ValueError instead of an IndexError."""
    cfg = _config("sd15", {"beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": True})
    oracle, ours = _pair("dpm++", cfg)
    oracle.set_timesteps(7)
    ours.set_timesteps(7)
    assert list(ours.timesteps[:3]) == [998, 998, 998]
    if begin is not None:
        oracle.set_begin_index(begin)
        ours.set_begin_index(begin)
    rng = np.random.default_rng(0)
    sample = rng.standard_normal(SHAPE, dtype=np.float32)
    for i, t in enumerate(ours.timesteps):
        model_output = rng.standard_normal(SHAPE, dtype=np.float32)
        if begin is None and i == len(ours.timesteps) - 1:
            with pytest.raises(IndexError):
                oracle.step(torch.from_numpy(model_output), torch.tensor(t), torch.from_numpy(sample))
            with pytest.raises(ValueError, match="after its last timestep"):
                ours.step(model_output, t, sample)
            return
        expected = oracle.step(torch.from_numpy(model_output), torch.tensor(t), torch.from_numpy(sample)).prev_sample
        sample_ours = ours.step(model_output, t, sample)
        assert _close(sample_ours, expected.numpy(), PER_STEP_TOL, sample) <= 1
        sample = expected.numpy()


def test_pndm_calls_the_unet_once_more():
    """PNDM (PLMS) evaluates the first timestep twice: n+1 UNet calls for n > 1 steps, as diffusers."""
    scheduler = make_scheduler("pndm", SD15)
    for steps, count in ((1, 1), (2, 3), (25, 26)):
        scheduler.set_timesteps(steps)
        assert len(scheduler.timesteps) == count
    assert list(scheduler.timesteps[:3]) == [961, 921, 921]


def test_no_torch_import():
    """The module runs where torch, diffusers and transformers cannot be imported (and imports none of them)."""
    script = textwrap.dedent("""
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "diffusers", "transformers"):
                    raise ImportError(f"{name} is blocked")
                return None

        sys.meta_path.insert(0, Block())
        import numpy as np
        from crdiff_cli.deploy import schedulers

        config = {"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                  "beta_end": 0.012, "steps_offset": 1, "skip_prk_steps": True, "use_karras_sigmas": True}
        for name in schedulers.SCHEDULER_NAMES:
            scheduler = schedulers.make_scheduler(name, config)
            scheduler.set_timesteps(3)
            sample = np.ones((1, 4, 2, 2), np.float32)
            for t in scheduler.timesteps:
                sample = scheduler.step(scheduler.scale_model_input(sample, t), t, sample,
                                        noise=lambda shape: np.zeros(shape, np.float32))
        loaded = [m for m in ("torch", "diffusers", "transformers") if m in sys.modules]
        assert not loaded, loaded
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
