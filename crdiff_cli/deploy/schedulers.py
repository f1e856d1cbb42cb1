"""Numpy twins of diffusers' schedulers, for the torch-free ONNX Runtime runner.

Each class re-implements one diffusers 0.42 scheduler class for the configurations Stable Diffusion models use, with
diffusers' arithmetic: the same float32 operations in the same order where diffusers computes with float32 torch
tensors, float64 where diffusers computes with numpy (its sigma interpolation and Karras sigmas). Two torch kernels
are reproduced bit for bit, so that ``alphas_cumprod`` is diffusers' exactly: ``torch.linspace`` (float32, one
fused multiply-add per element) and ``torch.cumprod`` (accumulated in float64 on CPU). Not reproduced: torch's
float32 ``sqrt`` (also ``x ** 0.5``), ``log`` and ``exp``, which x86 builds of torch compute with MKL's vector math
(0-d tensors too), up to ~0.75 unit in the last place off the correctly rounded results used here. So sigma
tables and per-step coefficients differ from torch's by one ulp now and then, and samples by a few float32 ulps
(~3e-7 relative per step); Euler's Karras timesteps, interpolated on log(sigma), by ~1e-4.

Construction mirrors ``SomeScheduler.from_config(base_config)``: keys of the target class are read from the base
model's scheduler config (which may belong to another class), the other keys are ignored and missing keys take
the target class's diffusers defaults. A config value these twins do not implement raises ``ValueError`` with a
one-line message (shown to users as is) rather than sampling something else than diffusers would.

Nothing here imports torch, diffusers or transformers: only numpy and the standard library.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

__all__ = ["SCHEDULER_NAMES", "NumpyScheduler", "make_scheduler"]

# The ``--scheduler`` names with a numpy twin (crdiff_cli.pipelines.schedulers has the full list).
SCHEDULER_NAMES = ("pndm", "ddim", "euler", "euler-trailing", "euler-a", "dpm++")

# Config changes a name implies, as crdiff_cli.pipelines.schedulers.SCHEDULER_OPTIONS (passed to from_config).
_NAME_OPTIONS = {"euler-trailing": {"timestep_spacing": "trailing"}}

_F32 = np.float32
_ONE = np.float32(1.0)

# The __init__ defaults of the diffusers classes (diffusers 0.42.1), as from_config fills in missing keys.
_COMMON_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None,
}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --- the noise schedule (betas), as diffusers builds it with torch float32 tensors ---------------------------------

def _fma32(a: np.float32, b: np.ndarray, c: np.float32) -> np.ndarray:
    """``a * b + c`` rounded once to float32 (a fused multiply-add), for float32 ``a``, ``c`` and integers ``b``.

    The product is exact in float64; the sum's float64 rounding error (TwoSum) settles the rare float32 ties
    where rounding twice (to float64, then to float32) would differ from one rounding."""
    p = np.float64(a) * np.asarray(b, dtype=np.float64)
    c64 = np.float64(c)
    s = p + c64
    bv = s - p
    err = (p - (s - bv)) + (c64 - bv)
    r = s.astype(np.float32)
    r64 = r.astype(np.float64)
    other = np.nextafter(r, np.where(s > r64, np.float32(np.inf), np.float32(-np.inf))).astype(np.float32)
    other64 = other.astype(np.float64)
    tie = (err != 0) & (s != r64) & ((r64 + other64) * 0.5 == s)
    return np.where(tie & (np.sign(err) == np.sign(other64 - s)), other, r).astype(np.float32)


def _torch_linspace32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` on CPU (x86 builds), bit for bit.

    torch computes ``start + step * i`` for the first half and ``end - step * (steps - 1 - i)`` for the second,
    in float32, compiled to fused multiply-adds (numpy's float64 ``linspace`` differs in the last bits)."""
    start32, end32 = _F32(start), _F32(end)
    if steps == 1:
        return np.array([start32], dtype=np.float32)
    step = _F32((end32 - start32) / _F32(steps - 1))
    index = np.arange(steps, dtype=np.int64)
    half = steps // 2
    out = np.empty(steps, dtype=np.float32)
    out[:half] = _fma32(step, index[:half], start32)
    out[half:] = _fma32(-step, steps - 1 - index[half:], end32)
    return out


def _cumprod32(values: np.ndarray) -> np.ndarray:
    """``torch.cumprod`` of a float32 CPU tensor: the running product is kept in float64, each output rounded."""
    return np.cumprod(values.astype(np.float64)).astype(np.float32)


def _betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """diffusers' ``betas_for_alpha_bar`` (cosine, "squaredcos_cap_v2"): python floats, then float32."""
    def alpha_bar_fn(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar_fn(t2) / alpha_bar_fn(t1), max_beta))
    return np.array(betas, dtype=np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """diffusers' ``rescale_zero_terminal_snr`` in float32 (https://huggingface.co/papers/2305.08891)."""
    alphas = _ONE - betas
    alphas_bar_sqrt = np.sqrt(_cumprod32(alphas))
    first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = alphas_bar_sqrt - last
    alphas_bar_sqrt = alphas_bar_sqrt * (first / (first - last))
    alphas_bar = alphas_bar_sqrt * alphas_bar_sqrt
    alphas = np.concatenate([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (_ONE - alphas).astype(np.float32)


# --- the base class ------------------------------------------------------------------------------------------------

class NumpyScheduler:
    """A diffusers scheduler in numpy: ``set_timesteps``, then per timestep ``scale_model_input`` and ``step``.

    Attributes: ``name`` (the ``--scheduler`` name), ``config`` (the resolved config: every key of the diffusers
    class, as ``from_config`` would set it), ``timesteps`` (after ``set_timesteps``; the dtype diffusers' values
    have: int64, or float32 for the Euler schedulers), ``init_noise_sigma`` (what the starting noise is multiplied
    by), ``order`` (UNet calls per step; 1 for all of these) and ``num_inference_steps``.

    Inputs and outputs are float32 arrays, as diffusers' pipelines feed float32 latents."""

    diffusers_class: ClassVar[str] = ""
    _DEFAULTS: ClassVar[dict[str, Any]] = {}
    _PREDICTION_TYPES: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction")
    # With rescale_betas_zero_snr, the Euler and DPM classes set the last alphas_cumprod to 2**-24 (a finite sigma).
    _zero_snr_floor: ClassVar[bool] = False
    order: int = 1

    def __init__(self, name: str, config: dict[str, Any], hidden: dict[str, Any] | None = None):
        """Use :func:`make_scheduler`. ``config`` holds every key of ``_DEFAULTS``; ``hidden`` the base config's
        other keys (diffusers keeps them in ``scheduler.config``, where a few classes look them up)."""
        self.name = name
        self.config = config
        self._hidden = hidden or {}
        self.timesteps: np.ndarray | None = None
        self.num_inference_steps: int | None = None
        self._begin_index: int | None = None
        self._validate_common()
        self._validate()
        self.alphas_cumprod = self._make_alphas_cumprod()

    # --- config checks: one line naming the key, the value and what is supported ---

    def _refuse(self, key: str, supported: str) -> None:
        raise ValueError(f"{self.name} scheduler ({self.diffusers_class}): {key}={self.config[key]!r} is not "
                         f"supported by the numpy scheduler; supported: {supported}")

    def _require(self, key: str, allowed: tuple) -> None:
        value = self.config[key]
        if isinstance(value, (list, dict)) or value not in allowed or type(value) is not type(allowed[0]):
            self._refuse(key, ", ".join(repr(v) for v in allowed))

    def _require_false(self, key: str) -> None:
        if self.config[key]:
            self._refuse(key, "false")

    def _require_bool(self, key: str) -> None:
        if not isinstance(self.config[key], bool):
            self._refuse(key, "true or false")

    def _require_int(self, key: str, minimum: int) -> None:
        value = self.config[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            self._refuse(key, f"an integer >= {minimum}")

    def _require_number(self, key: str, optional: bool = False) -> None:
        value = self.config[key]
        if not (_number(value) or (optional and value is None)):
            self._refuse(key, "a number" + (" or null" if optional else ""))

    def _validate_common(self) -> None:
        self._require_int("num_train_timesteps", 1)
        trained = self.config["trained_betas"]
        if trained is not None:
            betas = np.asarray(trained, dtype=object) if isinstance(trained, (list, tuple)) else np.asarray(trained)
            if (betas.ndim != 1 or len(betas) != self.config["num_train_timesteps"]
                    or not all(_number(b) or isinstance(b, np.number) for b in betas.tolist())):
                self._refuse("trained_betas", "null or a list of num_train_timesteps numbers")
        else:
            self._require("beta_schedule", ("linear", "scaled_linear", "squaredcos_cap_v2"))
            self._require_number("beta_start")
            self._require_number("beta_end")
        self._require("prediction_type", self._PREDICTION_TYPES)
        self._require("timestep_spacing", ("leading", "trailing", "linspace"))
        self._require_int("steps_offset", 0)
        if "rescale_betas_zero_snr" in self.config:
            self._require_bool("rescale_betas_zero_snr")

    def _validate(self) -> None:
        """The class's own keys (subclasses)."""

    def _make_alphas_cumprod(self) -> np.ndarray:
        """``alphas_cumprod`` as the diffusers class builds it in ``__init__`` (float32)."""
        cfg = self.config
        n = cfg["num_train_timesteps"]
        if cfg["trained_betas"] is not None:
            betas = np.array(cfg["trained_betas"], dtype=np.float32)
        elif cfg["beta_schedule"] == "linear":
            betas = _torch_linspace32(cfg["beta_start"], cfg["beta_end"], n)
        elif cfg["beta_schedule"] == "scaled_linear":
            root = _torch_linspace32(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n)
            betas = root * root
        else:
            betas = _betas_for_alpha_bar(n)
        rescale = cfg.get("rescale_betas_zero_snr", False)
        if rescale:
            betas = _rescale_zero_terminal_snr(betas)
        alphas_cumprod = _cumprod32(_ONE - betas)
        if rescale and self._zero_snr_floor:
            alphas_cumprod[-1] = 2.0 ** -24
        return alphas_cumprod

    # --- the API ---

    @property
    def init_noise_sigma(self) -> float:
        """The standard deviation of the starting noise (pipelines multiply ``randn`` latents by it)."""
        return 1.0

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Set ``timesteps`` for ``num_inference_steps`` steps and forget the previous run's state (a new image)."""
        if (not isinstance(num_inference_steps, (int, np.integer)) or isinstance(num_inference_steps, bool)
                or not 1 <= num_inference_steps <= self.config["num_train_timesteps"]):
            raise ValueError(f"{self.name} scheduler: num_inference_steps={num_inference_steps!r} must be an integer "
                             f"from 1 to num_train_timesteps ({self.config['num_train_timesteps']})")
        self.num_inference_steps = int(num_inference_steps)
        self._begin_index = None
        self._set_timesteps(int(num_inference_steps))

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the step counter at ``begin_index`` (call after ``set_timesteps``), as diffusers' SDXL pipelines
        do with 0. Without it, the Euler and DPM schedulers find their first step by looking the first timestep up,
        taking the second match if it is repeated (as SD1.x/2.x pipelines leave it). No effect on PNDM and DDIM."""
        self._begin_index = int(begin_index)

    def _set_timesteps(self, n: int) -> None:
        raise NotImplementedError

    def scale_model_input(self, sample: np.ndarray, timestep) -> np.ndarray:
        """The UNet's input for ``sample`` at ``timestep`` (unchanged for the DDPM-style schedulers)."""
        return np.asarray(sample, dtype=np.float32)

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray,
             noise: Callable[[tuple], np.ndarray] | None = None) -> np.ndarray:
        """The sample at the next (less noisy) timestep, float32. ``timestep`` is the element of ``timesteps``
        the UNet was called with. ``noise(shape)`` gives the fresh standard normal noise ancestral schedulers add
        (diffusers draws it with ``torch.randn(shape, generator=...)``); other schedulers ignore it."""
        if self.timesteps is None:
            raise ValueError(f"{self.name} scheduler: call set_timesteps before step")
        return self._step(np.asarray(model_output, dtype=np.float32), timestep,
                          np.asarray(sample, dtype=np.float32), noise)

    def _step(self, model_output, timestep, sample, noise) -> np.ndarray:
        raise NotImplementedError

    def _check_step_index(self) -> None:
        """For the schedulers that count their steps (as diffusers: the first call looks its timestep up, later
        ones add one): past the last timestep the sigmas run out."""
        if self._step_index >= len(self.timesteps):
            raise ValueError(f"{self.name} scheduler: step called after its last timestep ({len(self.timesteps)}; "
                             "call set_timesteps for a new run)")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} ({self.diffusers_class})>"


# --- PNDM (PLMS) ---------------------------------------------------------------------------------------------------

class PndmScheduler(NumpyScheduler):
    """``PNDMScheduler`` with ``skip_prk_steps=True`` (linear multistep only), Stable Diffusion 1.x's default.

    Its ``timesteps`` has one more entry than the step count from 2 steps on (``[961, 921, 921, 881, ...]``): the
    warm-up's first step is a trial step to the second timestep, redone from the first sample with the average of
    the two model outputs (a Heun step), so the second timestep gets two UNet calls."""

    diffusers_class = "PNDMScheduler"
    _DEFAULTS = {**_COMMON_DEFAULTS, "skip_prk_steps": False, "set_alpha_to_one": False,
                 "prediction_type": "epsilon", "timestep_spacing": "leading", "steps_offset": 0}

    def _validate(self) -> None:
        if not self.config["skip_prk_steps"]:
            self._refuse("skip_prk_steps", "true (Runge-Kutta warm-up steps are not implemented)")
        self._require_bool("set_alpha_to_one")

    def __init__(self, name, config, hidden=None):
        super().__init__(name, config, hidden)
        self.final_alpha_cumprod = _ONE if config["set_alpha_to_one"] else self.alphas_cumprod[0]
        self._reset()

    def _reset(self) -> None:
        self.ets: list[np.ndarray] = []
        self.counter = 0
        self.cur_sample: np.ndarray | None = None

    def _set_timesteps(self, n: int) -> None:
        cfg, train = self.config, self.config["num_train_timesteps"]
        if cfg["timestep_spacing"] == "linspace":
            base = np.linspace(0, train - 1, n).round().astype(np.int64)
        elif cfg["timestep_spacing"] == "leading":
            base = (np.arange(0, n) * (train // n)).round()
            base += cfg["steps_offset"]
        else:
            base = np.round(np.arange(train, 0, -train / n))[::-1].astype(np.int64)
            base -= 1
        plms = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].copy()
        self.timesteps = np.concatenate([np.array([]), plms]).astype(np.int64)
        self._reset()

    def _step(self, model_output, timestep, sample, noise):
        timestep = int(timestep)
        ratio = self.config["num_train_timesteps"] // self.num_inference_steps
        prev_timestep = timestep - ratio
        if self.counter != 1:
            self.ets = self.ets[-3:]
            self.ets.append(model_output.copy())
        else:
            prev_timestep = timestep
            timestep = timestep + ratio
        ets = self.ets
        if len(ets) == 1 and self.counter == 0:
            self.cur_sample = sample.copy()
        elif len(ets) == 1 and self.counter == 1:
            model_output = (model_output + ets[-1]) / _F32(2)
            sample = self.cur_sample
            self.cur_sample = None
        elif len(ets) == 2:
            model_output = (_F32(3) * ets[-1] - ets[-2]) / _F32(2)
        elif len(ets) == 3:
            model_output = (_F32(23) * ets[-1] - _F32(16) * ets[-2] + _F32(5) * ets[-3]) / _F32(12)
        else:
            model_output = _F32(1 / 24) * (_F32(55) * ets[-1] - _F32(59) * ets[-2] + _F32(37) * ets[-3]
                                           - _F32(9) * ets[-4])
        prev_sample = self._prev_sample(sample, timestep, prev_timestep, model_output)
        self.counter += 1
        return prev_sample

    def _prev_sample(self, sample, timestep, prev_timestep, model_output):
        """Formula (9) of the PNDM paper, as diffusers' ``_get_prev_sample``."""
        alpha_t = self.alphas_cumprod[timestep]
        alpha_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_t = _ONE - alpha_t
        beta_prev = _ONE - alpha_prev
        if self.config["prediction_type"] == "v_prediction":
            model_output = np.sqrt(alpha_t) * model_output + np.sqrt(beta_t) * sample
        sample_coeff = np.sqrt(alpha_prev / alpha_t)
        denom = alpha_t * np.sqrt(beta_prev) + np.sqrt(alpha_t * beta_t * alpha_prev)
        return sample_coeff * sample - (alpha_prev - alpha_t) * model_output / denom


# --- DDIM ----------------------------------------------------------------------------------------------------------

class DdimScheduler(NumpyScheduler):
    """``DDIMScheduler`` with ``eta=0`` (deterministic), what diffusers' pipelines use by default."""

    diffusers_class = "DDIMScheduler"
    _DEFAULTS = {**_COMMON_DEFAULTS, "clip_sample": True, "set_alpha_to_one": True, "steps_offset": 0,
                 "prediction_type": "epsilon", "thresholding": False, "dynamic_thresholding_ratio": 0.995,
                 "clip_sample_range": 1.0, "sample_max_value": 1.0, "timestep_spacing": "leading",
                 "rescale_betas_zero_snr": False}
    _PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

    def _validate(self) -> None:
        self._require_false("thresholding")
        self._require_bool("clip_sample")
        self._require_number("clip_sample_range")
        self._require_bool("set_alpha_to_one")

    def __init__(self, name, config, hidden=None):
        super().__init__(name, config, hidden)
        self.final_alpha_cumprod = _ONE if config["set_alpha_to_one"] else self.alphas_cumprod[0]

    def _set_timesteps(self, n: int) -> None:
        cfg, train = self.config, self.config["num_train_timesteps"]
        if cfg["timestep_spacing"] == "linspace":
            timesteps = np.linspace(0, train - 1, n).round()[::-1].copy().astype(np.int64)
        elif cfg["timestep_spacing"] == "leading":
            timesteps = (np.arange(0, n) * (train // n)).round()[::-1].copy().astype(np.int64)
            timesteps += cfg["steps_offset"]
        else:
            timesteps = np.round(np.arange(train, 0, -train / n)).astype(np.int64)
            timesteps -= 1
        self.timesteps = timesteps

    def _step(self, model_output, timestep, sample, noise):
        cfg = self.config
        timestep = int(timestep)
        prev_timestep = timestep - cfg["num_train_timesteps"] // self.num_inference_steps
        alpha_t = self.alphas_cumprod[timestep]
        alpha_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_t = _ONE - alpha_t
        if cfg["prediction_type"] == "epsilon":
            pred_original = (sample - np.sqrt(beta_t) * model_output) / np.sqrt(alpha_t)
            pred_epsilon = model_output
        elif cfg["prediction_type"] == "sample":
            pred_original = model_output
            pred_epsilon = (sample - np.sqrt(alpha_t) * pred_original) / np.sqrt(beta_t)
        else:
            pred_original = np.sqrt(alpha_t) * sample - np.sqrt(beta_t) * model_output
            pred_epsilon = np.sqrt(alpha_t) * model_output + np.sqrt(beta_t) * sample
        if cfg["clip_sample"]:
            limit = _F32(cfg["clip_sample_range"])
            pred_original = np.clip(pred_original, -limit, limit)
        # eta = 0: diffusers still computes the (zero) noise scale, which keeps a NaN variance NaN
        beta_prev = _ONE - alpha_prev
        with np.errstate(invalid="ignore"):
            variance = beta_prev / beta_t * (_ONE - alpha_t / alpha_prev)
            std_dev_t = _F32(0.0) * np.sqrt(variance)
            direction = np.sqrt(_ONE - alpha_prev - std_dev_t * std_dev_t) * pred_epsilon
        return np.sqrt(alpha_prev) * pred_original + direction


# --- Euler ---------------------------------------------------------------------------------------------------------

_SIGMA_SCHEDULE_KEYS = ("use_exponential_sigmas", "use_beta_sigmas")


def _sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """diffusers' ``_sigma_to_t`` (numpy in diffusers too), called per sigma as diffusers does."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low = log_sigmas[low_idx]
    high = log_sigmas[high_idx]
    w = (low - log_sigma) / (low - high)
    w = np.clip(w, 0, 1)
    t = (1 - w) * low_idx + w * high_idx
    return t.reshape(sigma.shape)


class _SigmaScheduler(NumpyScheduler):
    """What the Euler-type classes share: sigmas, float32 timesteps and the step counter."""

    _zero_snr_floor = True

    def __init__(self, name, config, hidden=None):
        super().__init__(name, config, hidden)
        self._train_sigmas = np.sqrt((_ONE - self.alphas_cumprod) / self.alphas_cumprod)
        self.sigmas = np.concatenate([self._train_sigmas[::-1], [0.0]]).astype(np.float32)
        self._step_index: int | None = None

    def _spaced_timesteps(self, n: int) -> np.ndarray:
        """``timesteps`` (float32) for the config's ``timestep_spacing``."""
        cfg, train = self.config, self.config["num_train_timesteps"]
        if cfg["timestep_spacing"] == "linspace":
            return np.linspace(0, train - 1, n, dtype=np.float32)[::-1].copy()
        if cfg["timestep_spacing"] == "leading":
            timesteps = (np.arange(0, n) * (train // n)).round()[::-1].copy().astype(np.float32)
            timesteps += cfg["steps_offset"]
            return timesteps
        timesteps = np.arange(train, 0, -train / n).round().copy().astype(np.float32)
        timesteps -= 1
        return timesteps

    @property
    def init_noise_sigma(self) -> float:
        max_sigma = self.sigmas.max()
        if self.config["timestep_spacing"] in ("linspace", "trailing"):
            return float(max_sigma)
        return float(np.sqrt(max_sigma * max_sigma + _ONE))

    def _init_step_index(self, timestep) -> None:
        """The first call's position in ``timesteps`` (diffusers takes the second match when there are two)."""
        if self._begin_index is not None:
            self._step_index = self._begin_index
            return
        indices = np.nonzero(self.timesteps == np.asarray(timestep).astype(self.timesteps.dtype))[0]
        if len(indices) == 0:
            raise ValueError(f"{self.name} scheduler: timestep {timestep!r} is not one of its timesteps")
        self._step_index = int(indices[1 if len(indices) > 1 else 0])

    def scale_model_input(self, sample, timestep):
        """``sample / sqrt(sigma**2 + 1)``, the k-diffusion input scaling."""
        if self.timesteps is None:
            raise ValueError(f"{self.name} scheduler: call set_timesteps before scale_model_input")
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self._step_index]
        return np.asarray(sample, dtype=np.float32) / np.sqrt(sigma * sigma + _ONE)

    def _v_to_x0(self, model_output, sample, sigma):
        scale = sigma * sigma + _ONE
        return model_output * (-sigma / np.sqrt(scale)) + sample / scale


class EulerScheduler(_SigmaScheduler):
    """``EulerDiscreteScheduler`` (no churn: ``s_churn=0`` as pipelines call it), linear interpolation, with or
    without Karras sigmas."""

    diffusers_class = "EulerDiscreteScheduler"
    _DEFAULTS = {**_COMMON_DEFAULTS, "prediction_type": "epsilon", "interpolation_type": "linear",
                 "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
                 "sigma_min": None, "sigma_max": None, "timestep_spacing": "linspace", "timestep_type": "discrete",
                 "steps_offset": 0, "rescale_betas_zero_snr": False, "final_sigmas_type": "zero"}
    _PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "original_sample")

    def _validate(self) -> None:
        cfg = self.config
        self._require("interpolation_type", ("linear",))
        if cfg["use_karras_sigmas"] is not None:
            self._require_bool("use_karras_sigmas")
        for key in _SIGMA_SCHEDULE_KEYS:
            self._require_false(key)
        self._require_number("sigma_min", optional=True)
        self._require_number("sigma_max", optional=True)
        if cfg["timestep_type"] != "discrete" and cfg["prediction_type"] == "v_prediction":
            self._refuse("timestep_type", "'discrete' with v_prediction")
        self._require("final_sigmas_type", ("zero", "sigma_min"))

    def _set_timesteps(self, n: int) -> None:
        cfg = self.config
        timesteps = self._spaced_timesteps(n)
        sigmas = self._train_sigmas  # float32, as diffusers' np.array of a float32 tensor
        log_sigmas = np.log(sigmas)
        sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)
        if cfg["use_karras_sigmas"]:
            sigmas = _karras_sigmas(sigmas, n, cfg["sigma_min"], cfg["sigma_max"])
            timesteps = np.array([_sigma_to_t(sigma, log_sigmas) for sigma in sigmas])
        if cfg["final_sigmas_type"] == "sigma_min":
            sigma_last = self._train_sigmas[0]
        else:
            sigma_last = 0
        self.sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
        self.timesteps = timesteps.astype(np.float32)
        self._step_index = None

    def _step(self, model_output, timestep, sample, noise):
        if self._step_index is None:
            self._init_step_index(timestep)
        self._check_step_index()
        sigma = self.sigmas[self._step_index]
        sigma_hat = sigma * _ONE  # gamma = 0: no churn
        prediction = self.config["prediction_type"]
        if prediction in ("sample", "original_sample"):
            pred_original = model_output
        elif prediction == "epsilon":
            pred_original = sample - sigma_hat * model_output
        else:
            pred_original = self._v_to_x0(model_output, sample, sigma)
        derivative = (sample - pred_original) / sigma_hat
        dt = self.sigmas[self._step_index + 1] - sigma_hat
        self._step_index += 1
        return sample + derivative * dt


def _karras_sigmas(in_sigmas: np.ndarray, n: int, sigma_min, sigma_max) -> np.ndarray:
    """diffusers' ``_convert_to_karras`` (numpy float64): ``in_sigmas`` descending; config bounds win if set."""
    sigma_min = sigma_min if sigma_min is not None else in_sigmas[-1].item()
    sigma_max = sigma_max if sigma_max is not None else in_sigmas[0].item()
    rho = 7.0
    ramp = np.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


class EulerAncestralScheduler(_SigmaScheduler):
    """``EulerAncestralDiscreteScheduler``: an Euler step to ``sigma_down``, plus fresh noise of ``sigma_up``."""

    diffusers_class = "EulerAncestralDiscreteScheduler"
    _DEFAULTS = {**_COMMON_DEFAULTS, "prediction_type": "epsilon", "timestep_spacing": "linspace",
                 "steps_offset": 0, "rescale_betas_zero_snr": False}

    def _set_timesteps(self, n: int) -> None:
        timesteps = self._spaced_timesteps(n)
        sigmas = np.interp(timesteps, np.arange(0, len(self._train_sigmas)), self._train_sigmas)
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self.timesteps = timesteps
        self._step_index = None

    def _step(self, model_output, timestep, sample, noise):
        if noise is None:
            raise ValueError(f"{self.name} scheduler adds fresh noise at every step: pass noise=callable(shape)")
        if self._step_index is None:
            self._init_step_index(timestep)
        self._check_step_index()
        sigma = self.sigmas[self._step_index]
        if self.config["prediction_type"] == "epsilon":
            pred_original = sample - sigma * model_output
        else:
            pred_original = self._v_to_x0(model_output, sample, sigma)
        sigma_from, sigma_to = sigma, self.sigmas[self._step_index + 1]
        from2, to2 = sigma_from * sigma_from, sigma_to * sigma_to
        with np.errstate(invalid="ignore"):
            sigma_up = np.sqrt(to2 * (from2 - to2) / from2)
            sigma_down = np.sqrt(to2 - sigma_up * sigma_up)
        derivative = (sample - pred_original) / sigma
        prev_sample = sample + derivative * (sigma_down - sigma)
        fresh = np.asarray(noise(tuple(model_output.shape)), dtype=np.float32)
        if fresh.shape != model_output.shape:
            raise ValueError(f"{self.name} scheduler: noise gave shape {fresh.shape}, expected {model_output.shape}")
        self._step_index += 1
        return prev_sample + fresh * sigma_up


# --- DPM-Solver++ multistep ----------------------------------------------------------------------------------------

def _log32(x: np.float32) -> np.float32:
    """float32 ``log``, correctly rounded (torch's, MKL's on x86, is off by one ulp now and then); log(0) = -inf."""
    with np.errstate(divide="ignore"):
        return _F32(np.log(np.float64(x)))


def _exp32(x: np.float32) -> np.float32:
    """float32 ``exp``, correctly rounded (as ``_log32``)."""
    return _F32(np.exp(np.float64(x)))


class DpmSolverScheduler(NumpyScheduler):
    """``DPMSolverMultistepScheduler`` with ``algorithm_type="dpmsolver++"`` (DPM++ 2M by default: order 2,
    midpoint, first order at the last steps), with or without Karras sigmas, final sigma zero or sigma_min.

    Orders 1-3 and ``solver_type="heun"`` are implemented too; the SDE variants are not."""

    diffusers_class = "DPMSolverMultistepScheduler"
    _DEFAULTS = {**_COMMON_DEFAULTS, "solver_order": 2, "prediction_type": "epsilon", "thresholding": False,
                 "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0, "algorithm_type": "dpmsolver++",
                 "solver_type": "midpoint", "lower_order_final": True, "euler_at_final": False,
                 "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
                 "use_lu_lambdas": False, "use_flow_sigmas": False, "flow_shift": 1.0, "final_sigmas_type": "zero",
                 "lambda_min_clipped": -float("inf"), "variance_type": None, "timestep_spacing": "linspace",
                 "steps_offset": 0, "rescale_betas_zero_snr": False, "use_dynamic_shifting": False,
                 "time_shift_type": "exponential"}
    _PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
    _zero_snr_floor = True

    def _validate(self) -> None:
        cfg = self.config
        # diffusers' own renames when a DEIS or UniPC config is turned into this class (DEIS's after the check
        # that refuses a zero final sigma for the algorithms other than dpmsolver++)
        if cfg["algorithm_type"] == "deis":
            if cfg["final_sigmas_type"] == "zero":
                self._refuse("final_sigmas_type", "'sigma_min' with algorithm_type 'deis' (as diffusers)")
            cfg["algorithm_type"] = "dpmsolver++"
        if cfg["solver_type"] in ("logrho", "bh1", "bh2"):
            cfg["solver_type"] = "midpoint"
        self._require("algorithm_type", ("dpmsolver++",))
        self._require("solver_type", ("midpoint", "heun"))
        self._require("solver_order", (1, 2, 3))
        self._require_false("thresholding")
        self._require_bool("lower_order_final")
        self._require_bool("euler_at_final")
        self._require_bool("use_karras_sigmas")
        for key in (*_SIGMA_SCHEDULE_KEYS, "use_lu_lambdas", "use_flow_sigmas"):
            self._require_false(key)
        self._require("final_sigmas_type", ("zero", "sigma_min"))
        self._require_number("lambda_min_clipped")
        if cfg["variance_type"] is not None:
            self._refuse("variance_type", "null")

    def __init__(self, name, config, hidden=None):
        super().__init__(name, config, hidden)
        self._train_sigmas = np.sqrt((_ONE - self.alphas_cumprod) / self.alphas_cumprod)
        self.sigmas = self._train_sigmas
        self._reset()

    def _reset(self) -> None:
        self.model_outputs: list[np.ndarray | None] = [None] * self.config["solver_order"]
        self.lower_order_nums = 0
        self._step_index: int | None = None

    def _last_timestep(self) -> int:
        """``num_train_timesteps`` less the steps whose log-SNR is below ``lambda_min_clipped`` (none by default)."""
        cfg = self.config
        if cfg["lambda_min_clipped"] == -float("inf"):
            return cfg["num_train_timesteps"]
        with np.errstate(divide="ignore"):
            alpha_t = np.sqrt(self.alphas_cumprod).astype(np.float64)
            sigma_t = np.sqrt(_ONE - self.alphas_cumprod).astype(np.float64)
            lambda_t = (np.log(alpha_t).astype(np.float32) - np.log(sigma_t).astype(np.float32))
        clipped = int(np.searchsorted(lambda_t[::-1], _F32(cfg["lambda_min_clipped"]), side="left"))
        return cfg["num_train_timesteps"] - clipped

    def _set_timesteps(self, n: int) -> None:
        cfg = self.config
        last = self._last_timestep()
        if cfg["timestep_spacing"] == "linspace":
            timesteps = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
        elif cfg["timestep_spacing"] == "leading":
            ratio = last // (n + 1)
            timesteps = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
            timesteps += cfg["steps_offset"]
        else:
            ratio = cfg["num_train_timesteps"] / n
            timesteps = np.arange(last, 0, -ratio).round().copy().astype(np.int64)
            timesteps -= 1
        sigmas = self._train_sigmas
        log_sigmas = np.log(sigmas)
        if cfg["use_karras_sigmas"]:
            sigmas = _karras_sigmas(np.flip(sigmas).copy(), n, self._hidden.get("sigma_min"),
                                    self._hidden.get("sigma_max"))
            timesteps = np.array([_sigma_to_t(sigma, log_sigmas) for sigma in sigmas])
            if cfg["beta_schedule"] != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)
        sigma_last = self._train_sigmas[0] if cfg["final_sigmas_type"] == "sigma_min" else 0
        self.sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
        self.timesteps = timesteps.astype(np.int64)
        self.num_inference_steps = len(timesteps)
        self._reset()

    def _init_step_index(self, timestep) -> None:
        if self._begin_index is not None:
            self._step_index = self._begin_index
            return
        candidates = np.nonzero(self.timesteps == np.asarray(timestep).astype(np.int64))[0]
        if len(candidates) == 0:
            self._step_index = len(self.timesteps) - 1
        else:
            self._step_index = int(candidates[1 if len(candidates) > 1 else 0])

    @staticmethod
    def _alpha_sigma(sigma: np.float32) -> tuple[np.float32, np.float32]:
        alpha_t = _ONE / np.sqrt(sigma * sigma + _ONE)
        return alpha_t, sigma * alpha_t

    @classmethod
    def _lambda(cls, sigma: np.float32) -> tuple[np.float32, np.float32, np.float32]:
        alpha, sigma_t = cls._alpha_sigma(sigma)
        return alpha, sigma_t, _log32(alpha) - _log32(sigma_t)

    def _x0(self, model_output, sample):
        """``convert_model_output`` for dpmsolver++: the predicted clean sample."""
        prediction = self.config["prediction_type"]
        if prediction == "sample":
            return model_output
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[self._step_index])
        if prediction == "epsilon":
            return (sample - sigma_t * model_output) / alpha_t
        return alpha_t * sample - sigma_t * model_output

    def _step(self, model_output, timestep, sample, noise):
        cfg = self.config
        if self._step_index is None:
            self._init_step_index(timestep)
        self._check_step_index()
        count = len(self.timesteps)
        lower_order_final = self._step_index == count - 1 and (
            cfg["euler_at_final"] or (cfg["lower_order_final"] and count < 15) or cfg["final_sigmas_type"] == "zero")
        lower_order_second = self._step_index == count - 2 and cfg["lower_order_final"] and count < 15
        x0 = self._x0(model_output, sample)
        order = cfg["solver_order"]
        self.model_outputs = [*self.model_outputs[1:], x0]
        with np.errstate(divide="ignore", invalid="ignore"):
            if order == 1 or self.lower_order_nums < 1 or lower_order_final:
                prev_sample = self._first_order(x0, sample)
            elif order == 2 or self.lower_order_nums < 2 or lower_order_second:
                prev_sample = self._second_order(sample)
            else:
                prev_sample = self._third_order(sample)
        if self.lower_order_nums < order:
            self.lower_order_nums += 1
        self._step_index += 1
        return prev_sample

    def _first_order(self, x0, sample):
        i = self._step_index
        alpha_t, sigma_t, lambda_t = self._lambda(self.sigmas[i + 1])
        _, sigma_s, lambda_s = self._lambda(self.sigmas[i])
        h = lambda_t - lambda_s
        return sigma_t / sigma_s * sample - alpha_t * (_exp32(-h) - _ONE) * x0

    def _second_order(self, sample):
        i = self._step_index
        alpha_t, sigma_t, lambda_t = self._lambda(self.sigmas[i + 1])
        _, sigma_s0, lambda_s0 = self._lambda(self.sigmas[i])
        _, _, lambda_s1 = self._lambda(self.sigmas[i - 1])
        m0, m1 = self.model_outputs[-1], self.model_outputs[-2]
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        d0, d1 = m0, (_ONE / r0) * (m0 - m1)
        phi = alpha_t * (_exp32(-h) - _ONE)
        if self.config["solver_type"] == "midpoint":
            return sigma_t / sigma_s0 * sample - phi * d0 - _F32(0.5) * phi * d1
        return sigma_t / sigma_s0 * sample - phi * d0 + alpha_t * ((_exp32(-h) - _ONE) / h + _ONE) * d1

    def _third_order(self, sample):
        i = self._step_index
        alpha_t, sigma_t, lambda_t = self._lambda(self.sigmas[i + 1])
        _, sigma_s0, lambda_s0 = self._lambda(self.sigmas[i])
        _, _, lambda_s1 = self._lambda(self.sigmas[i - 1])
        _, _, lambda_s2 = self._lambda(self.sigmas[i - 2])
        m0, m1, m2 = self.model_outputs[-1], self.model_outputs[-2], self.model_outputs[-3]
        h, h_0, h_1 = lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
        r0, r1 = h_0 / h, h_1 / h
        d1_0, d1_1 = (_ONE / r0) * (m0 - m1), (_ONE / r1) * (m1 - m2)
        d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
        d2 = (_ONE / (r0 + r1)) * (d1_0 - d1_1)
        e = _exp32(-h) - _ONE
        return (sigma_t / sigma_s0 * sample - alpha_t * e * m0 + alpha_t * (e / h + _ONE) * d1
                - alpha_t * ((e + h) / (h * h) - _F32(0.5)) * d2)


# --- construction --------------------------------------------------------------------------------------------------

_CLASSES: dict[str, type[NumpyScheduler]] = {
    "pndm": PndmScheduler, "ddim": DdimScheduler, "euler": EulerScheduler, "euler-trailing": EulerScheduler,
    "euler-a": EulerAncestralScheduler, "dpm++": DpmSolverScheduler,
}
_BY_CLASS_NAME = {"PNDMScheduler": "pndm", "DDIMScheduler": "ddim", "EulerDiscreteScheduler": "euler",
                  "EulerAncestralDiscreteScheduler": "euler-a", "DPMSolverMultistepScheduler": "dpm++"}


def make_scheduler(name: str | None, config: dict[str, Any]) -> NumpyScheduler:
    """The scheduler ``name`` (a ``--scheduler`` name) made from a base model's scheduler config, as
    ``getattr(diffusers, cls).from_config(config, **options)`` makes it: the target class's keys are read from
    ``config``, other keys are ignored, missing keys (and those listed in ``_use_default_values``) take the
    target class's defaults. ``name=None``: the class the config names in ``_class_name``.

    Raises ``ValueError`` (one line) for an unknown name or class, or a config value not implemented here."""
    if not isinstance(config, dict):
        raise ValueError(f"scheduler config must be a dict, not {type(config).__name__}")
    if name is None:
        class_name = config.get("_class_name")
        if class_name not in _BY_CLASS_NAME:
            raise ValueError(f"the model's scheduler {class_name!r} has no numpy implementation; choose a scheduler "
                             f"name: {', '.join(SCHEDULER_NAMES)}")
        name = _BY_CLASS_NAME[class_name]
    elif name not in _CLASSES:
        raise ValueError(f"scheduler {name!r} has no numpy implementation; supported: {', '.join(SCHEDULER_NAMES)}")
    cls = _CLASSES[name]
    defaults_used = set(config.get("_use_default_values") or ())
    given = {k: v for k, v in config.items() if k not in defaults_used and k != "_use_default_values"}
    options = _NAME_OPTIONS.get(name, {})
    resolved = {key: options.get(key, given.get(key, default)) for key, default in cls._DEFAULTS.items()}
    hidden = {k: v for k, v in given.items() if k not in cls._DEFAULTS}
    return cls(name, resolved, hidden)
