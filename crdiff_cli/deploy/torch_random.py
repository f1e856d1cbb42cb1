"""PyTorch's CPU random generator in numpy: ``torch.randn`` bit for bit, without importing torch.

diffusers seeds a pipeline with ``torch.Generator("cpu").manual_seed(seed)`` and draws the initial latents
(and an ancestral sampler's noise at every step) with ``torch.randn(shape, generator=g)``. The torch-free
ONNX runner must start from the same numbers, or a seed gives a different image than ``crdiff generate``::

    g = TorchCpuGenerator(seed)
    latents = g.randn((1, 4, 64, 64))        # == torch.randn((1, 4, 64, 64), generator=torch_g).numpy()
    noise = g.randn((1, 4, 64, 64))          # the next draw of the same stream, as torch continues it

What torch 2.13 does, from its sources (``ATen/core/MT19937RNGEngine.h``, ``ATen/CPUGeneratorImpl.cpp``,
``ATen/core/DistributionsHelper.h``, ``ATen/native/cpu/DistributionTemplates.h``, ``avx_mathfun.h``) and checked
against the wheel's own headers and outputs:

- ``manual_seed(s)`` accepts ``-2**63 <= s < 2**64`` (a negative seed wraps to uint64) and seeds a standard
  mt19937 with ``init_genrand(s & 0xffffffff)``: seeds equal modulo 2**32 give the same stream.
- a float32 uniform is one 32-bit output: ``(r & (2**24 - 1)) * 2**-24``; a double uses ``random64()``, two
  outputs ``(first << 32) | second`` masked to 53 bits.
- ``randn`` of n >= 16 elements (``normal_fill``): n uniforms first, then Box-Muller on each block of 16, in
  place, pairing element ``j`` (``u1 = 1 - u``) with ``j + 8`` (``u2``): ``radius * cos(2 pi u2)`` and
  ``radius * sin(2 pi u2)``, ``radius = sqrt(-2 log u1)``. When ``n % 16 != 0`` the last 16 elements are drawn
  afresh (16 more uniforms) and transformed again, so a draw consumes ``n + 16`` outputs then, else ``n``.
- fp16/bf16 ``randn`` (n >= 16) computes in float32 block by block and rounds each block to the dtype; blocks
  are drawn as needed, so the tail costs ``16 * (n // 16) + 16`` outputs: the same values as float32 except
  for the last 16 elements, and a different state afterwards.
- ``randn`` of n < 16 elements: per element ``normal_distribution<double>`` (u1, u2 from ``random64``,
  ``r = sqrt(-2 log1p(-u2))``, cosine returned and the sine *cached in the generator* for the next small
  draw), rounded to float32 (then to fp16). Draws of >= 16 elements neither use nor clear that cache;
  ``manual_seed`` clears it.

The Box-Muller arithmetic depends on the CPU kernel torch dispatches to (``torch.backends.cpu.get_cpu_capability()``):

- ``"avx2"`` (the default here; torch's AVX2 *and* AVX512 capabilities, i.e. nearly every x86-64 machine): the
  AVX2 ``NormalFill16<float>`` with Cephes' ``log256_ps``/``sincos256_ps`` in float32, compiled with FMA
  contraction. Reproduced operation by operation, with each contracted multiply-add rounded once: bit-identical,
  checked over every one of the 2**24 possible u1 and u2 values.
- ``"default"`` (torch's DEFAULT capability: ``ATEN_CPU_CAPABILITY=default``, x86 without AVX2, and, by the
  sources, ARM): the scalar kernel with the C library's ``logf``/``cosf``/``sinf``, which are not correctly
  rounded and differ between libms. Here they are computed in float64 and rounded, so about 1.5% of the values
  differ from glibc's by up to 3 float32 ulps (max abs difference 4.8e-7); the generator state stays exact.

The module imports numpy and the standard library only (a test checks that torch stays unimported).
"""

from __future__ import annotations

import math
import operator

import numpy as np

__all__ = ["VARIANTS", "TorchCpuGenerator"]

VARIANTS = ("avx2", "avx512", "default")  # torch's CPU capability names; avx512 runs the avx2 kernel

_F32, _F64 = np.float32, np.float64
_MASK24 = (1 << 24) - 1
_MASK53 = (1 << 53) - 1
_SUPPORTED = (np.dtype(np.float32), np.dtype(np.float16))

# avx_mathfun.h's constants, rounded to float32 as its _PS256_CONST tables are.
_LOG_P = tuple(_F32(v) for v in (7.0376836292E-2, -1.1514610310E-1, 1.1676998740E-1, -1.2420140846E-1,
                                 1.4249322787E-1, -1.6668057665E-1, 2.0000714765E-1, -2.4999993993E-1,
                                 3.3333331174E-1))
_LOG_Q1, _LOG_Q2 = _F32(-2.12194440e-4), _F32(0.693359375)
_SQRTHF = _F32(0.707106781186547524)
_MIN_NORM_POS = np.array(0x00800000, np.int32).view(_F32)
_FOPI = _F32(1.27323954473516)
_MINUS_DP = (_F32(-0.78515625), _F32(-2.4187564849853515625e-4), _F32(-3.77489497744594108e-8))
_SIN_P = (_F32(-1.9515295891E-4), _F32(8.3321608736E-3), _F32(-1.6666654611E-1))
_COS_P = (_F32(2.443315711809948E-005), _F32(-1.388731625493765E-003), _F32(4.166664568298827E-002))
_TWO_PI_F32 = _F32(2.0 * math.pi)  # _mm256_set1_ps(2.0f * c10::pi<double>)
_ONE, _HALF, _ZERO, _MINUS_TWO = _F32(1), _F32(0.5), _F32(0), _F32(-2)


def _fma(a, b, c) -> np.ndarray:
    """``a * b + c`` in float32 rounded once, as the FMA instructions GCC contracts torch's kernel into.

    The float32 product is exact in float64; the float64 sum is rounded to odd (its error from Knuth's TwoSum
    decides), and a round-to-odd double has enough extra bits (53 >= 24 + 2) that rounding it to float32 is
    the correctly rounded fused result: no double-rounding error, unlike ``float32(float64(a * b) + c)``.
    """
    p = np.asarray(a, _F32).astype(_F64) * np.asarray(b, _F32).astype(_F64)
    c = np.broadcast_to(np.asarray(c, _F32).astype(_F64), p.shape)
    s = p + c
    bv = s - p
    err = (p - (s - bv)) + (c - bv)
    fix = (err != 0) & ((s.view(np.int64) & 1) == 0)
    if fix.any():
        s = s.copy()
        s[fix] = np.nextafter(s[fix], np.copysign(np.inf, err[fix]))
    return s.astype(_F32)


def _log256_ps(x: np.ndarray) -> np.ndarray:
    """avx_mathfun.h's ``log256_ps`` (Cephes logf) for x in (0, 1], with the FMAs the compiler formed."""
    x = np.maximum(x, _MIN_NORM_POS)
    bits = x.view(np.int32)
    e = ((bits >> 23) - 0x7F).astype(_F32) + _ONE
    x = ((bits & ~0x7F800000) | _HALF.view(np.int32)).view(_F32)  # the mantissa, in [0.5, 1)
    small = x < _SQRTHF
    tmp = np.where(small, x, _ZERO)
    x = x - _ONE
    e = e - np.where(small, _ONE, _ZERO)
    x = x + tmp
    z = x * x
    y = np.full_like(x, _LOG_P[0])
    for p in _LOG_P[1:]:
        y = _fma(y, x, p)
    y = y * x
    y = _fma(y, z, e * _LOG_Q1)  # y*z + e*q1: the first product (y*z) is the one fused
    y = y - z * _HALF
    x = x + y
    return x + e * _LOG_Q2


def _sincos256_ps(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """avx_mathfun.h's ``sincos256_ps`` (Cephes sinf/cosf) for x >= 0, with the FMAs the compiler formed."""
    y = x * _FOPI
    j = (y.astype(np.int32) + 1) & ~1  # cvttps truncates; j = (j + 1) & ~1 as in Cephes
    y = j.astype(_F32)
    sign_sin = (j & 4) << 29
    sign_cos = (~(j - 2) & 4) << 29
    sine_poly = (j & 2) == 0
    for dp in _MINUS_DP:  # "extended precision modular arithmetic": x - y * pi/4 in three parts
        x = _fma(y, dp, x)
    z = x * x
    yc = np.full_like(x, _COS_P[0])
    for p in _COS_P[1:]:
        yc = _fma(yc, z, p)
    yc = _fma(yc * z, z, -(z * _HALF)) + _ONE
    ys = np.full_like(x, _SIN_P[0])
    for p in _SIN_P[1:]:
        ys = _fma(ys, z, p)
    ys = _fma(ys * z, x, x)
    s = np.where(sine_poly, ys, yc)
    c = np.where(sine_poly, yc, ys)
    return (s.view(np.int32) ^ sign_sin).view(_F32), (c.view(np.int32) ^ sign_cos).view(_F32)


def _box_muller_avx2(u: np.ndarray) -> np.ndarray:
    """torch's AVX2 ``NormalFill16<float>`` on rows of 16 float32 uniforms: the normals, row by row."""
    u1 = _ONE - u[:, :8]
    radius = np.sqrt(_MINUS_TWO * _log256_ps(u1))
    sin, cos = _sincos256_ps(_TWO_PI_F32 * u[:, 8:])
    # _mm256_fmadd_ps(n, std=1, mean=0): exact, except that it turns a -0 into +0.
    return np.concatenate([radius * cos, radius * sin], axis=1) + _ZERO


def _box_muller_scalar(u: np.ndarray) -> np.ndarray:
    """torch's scalar ``NormalFill16`` (libm logf/cosf/sinf), approximated with float64 functions rounded."""
    u1 = _ONE - u[:, :8]
    radius = np.sqrt(_MINUS_TWO * np.log(u1.astype(_F64)).astype(_F32))
    theta = (2.0 * math.pi * u[:, 8:].astype(_F64)).astype(_F32)  # 2.0f * pi<double> * u2: a double product
    theta = theta.astype(_F64)
    cos, sin = np.cos(theta).astype(_F32), np.sin(theta).astype(_F32)
    return np.concatenate([radius * cos, radius * sin], axis=1) + _ZERO


def _seed32(seed: int) -> int:
    """The 32 bits torch's mt19937 uses of a seed, refusing what ``manual_seed`` refuses (outside int64/uint64)."""
    seed = operator.index(seed)
    if not -(1 << 63) <= seed < (1 << 64):
        raise ValueError(f"seed {seed} is out of range: torch.Generator.manual_seed takes -2**63 <= seed < 2**64")
    return seed & 0xFFFFFFFF


def _init_genrand(seed32: int) -> np.ndarray:
    """mt19937's ``init_genrand``: the 624-word key torch's ``init_with_uint32`` builds."""
    key = [seed32]
    for i in range(1, 624):
        prev = key[-1]
        key.append((1812433253 * (prev ^ (prev >> 30)) + i) & 0xFFFFFFFF)
    return np.array(key, dtype=np.uint32)


class TorchCpuGenerator:
    """``torch.Generator("cpu").manual_seed(seed)`` and the draws diffusers makes from it, in numpy.

    ``variant`` names the torch CPU kernel to reproduce (see the module docstring): ``"avx2"``/``"avx512"``
    (bit-identical) or ``"default"`` (approximate Box-Muller, exact stream). Not thread-safe: one generator per
    request, as diffusers uses one per image.
    """

    def __init__(self, seed: int, variant: str = "avx2"):
        name = str(variant).lower()
        if name not in VARIANTS:
            raise ValueError(f"variant {variant!r}: expected one of {', '.join(VARIANTS)}")
        self.variant = "default" if name == "default" else "avx2"
        self._box_muller = _box_muller_scalar if self.variant == "default" else _box_muller_avx2
        self.manual_seed(seed)

    def manual_seed(self, seed: int) -> TorchCpuGenerator:
        """Re-seed, as ``torch.Generator.manual_seed``: a fresh stream and no cached small-draw normal."""
        seed32 = _seed32(seed)
        self._initial_seed = operator.index(seed) % (1 << 64)
        # numpy's MT19937 is the same engine; pos=624 makes the first draw twist the state, as torch's left_=1.
        self._bits = np.random.MT19937()
        self._bits.state = {"bit_generator": "MT19937", "state": {"key": _init_genrand(seed32), "pos": 624}}
        self._next_normal: float | None = None
        return self

    def initial_seed(self) -> int:
        """The seed as torch reports it (``Generator.initial_seed()``: a negative seed wrapped to uint64)."""
        return self._initial_seed

    def _uint32(self, n: int) -> np.ndarray:
        """The engine's next n 32-bit outputs (torch's ``random()``), as uint32."""
        return self._bits.random_raw(n).astype(np.uint32)

    def _uniform_rows(self, rows: int) -> np.ndarray:
        """``rows`` x 16 float32 uniforms in [0, 1), one output each: torch's ``uniform_real_distribution<float>``."""
        return ((self._uint32(16 * rows) & _MASK24).astype(_F32) * _F32(2.0 ** -24)).reshape(rows, 16)

    def rand(self, shape: int | tuple[int, ...]) -> np.ndarray:
        """``torch.rand(shape, generator=g)`` in float32: one output per element, in order."""
        shape = _shape(shape)
        n = math.prod(shape)
        if n == 0:
            return np.zeros(shape, _F32)
        return ((self._uint32(n) & _MASK24).astype(_F32) * _F32(2.0 ** -24)).reshape(shape)

    def randn(self, shape: int | tuple[int, ...], dtype=np.float32) -> np.ndarray:
        """What ``torch.randn(shape, generator=g, dtype=dtype)`` gives on CPU, advancing the stream as it does.

        ``dtype``: float32 or float16 (fp16 pipelines draw their latents in fp16, which torch computes in float32
        per block and rounds); anything else is refused, since numpy has no bfloat16 and float64 runs libm's
        double functions in a different kernel.
        """
        shape = _shape(shape)
        try:
            dt = np.dtype(dtype)
        except TypeError as exc:
            raise ValueError(f"dtype {dtype!r}: randn supports float32 and float16") from exc
        if dt not in _SUPPORTED:
            raise ValueError(f"dtype {dt}: randn supports float32 and float16")
        n = math.prod(shape)
        if n == 0:
            return np.zeros(shape, dt)
        if n < 16:
            out = self._normal_distribution(n)
        elif dt == np.float32:
            out = self._normal_fill_float(n)
        else:
            out = self._normal_fill_reduced(n)
        return out.astype(dt).reshape(shape)

    def _normal_fill_float(self, n: int) -> np.ndarray:
        """float32 ``normal_fill``: all n uniforms first, then the blocks; a partial tail redraws the last 16."""
        full = n // 16
        u = (self._uint32(n) & _MASK24).astype(_F32) * _F32(2.0 ** -24)
        out = np.empty(n, _F32)  # a partial tail's uniforms are never transformed, only overwritten
        out[:16 * full] = self._box_muller(u[:16 * full].reshape(full, 16)).reshape(-1)
        if n % 16:
            out[n - 16:] = self._box_muller(self._uniform_rows(1)).reshape(-1)
        return out

    def _normal_fill_reduced(self, n: int) -> np.ndarray:
        """fp16/bf16 ``normal_fill``: float32 blocks drawn one at a time; a partial tail is one more block."""
        full = n // 16
        out = np.empty(n, _F32)
        out[:16 * full] = self._box_muller(self._uniform_rows(full)).reshape(-1)
        if n % 16:
            out[n - 16:] = self._box_muller(self._uniform_rows(1)).reshape(-1)
        return out

    def _normal_distribution(self, n: int) -> np.ndarray:
        """n < 16: ``normal_distribution<double>`` per element, with the generator's cached second normal."""
        out = np.empty(n, _F64)
        for i in range(n):
            if self._next_normal is not None:
                value, self._next_normal = self._next_normal, None
            else:
                w = self._uint32(4).astype(np.uint64)
                a = (int(w[0]) << 32 | int(w[1])) & _MASK53
                b = (int(w[2]) << 32 | int(w[3])) & _MASK53
                u1, u2 = a * 2.0 ** -53, b * 2.0 ** -53
                r = math.sqrt(-2.0 * math.log1p(-u2))
                theta = 2.0 * math.pi * u1
                self._next_normal = r * math.sin(theta)
                value = r * math.cos(theta)
            out[i] = value + 0.0  # transformation::normal: value * 1 + 0
        return out.astype(_F32)  # static_cast<float>; fp16 is then rounded from float, as c10::Half(float)


def _shape(shape: int | tuple[int, ...]) -> tuple[int, ...]:
    """A torch-style size: an int or a sequence of non-negative ints."""
    dims = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    try:
        dims = tuple(operator.index(d) for d in dims)
    except TypeError as exc:
        raise ValueError(f"shape {shape!r}: expected ints") from exc
    if any(d < 0 for d in dims):
        raise ValueError(f"shape {shape!r}: negative dimension")
    return dims
