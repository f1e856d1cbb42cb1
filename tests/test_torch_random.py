"""The numpy twin of torch's CPU generator gives torch's own ``randn`` bits, so the ONNX runner's seeds match.

torch is the oracle here (the module under test never imports it). Equality is of the bytes, so a -0.0
where torch has +0.0 counts as a difference. The exact tests need torch's AVX2 kernel (AVX2 or AVX512
capability, i.e. x86-64 with AVX2); the DEFAULT kernel is compared in a subprocess within its measured bound.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from crdiff_cli.deploy.torch_random import TorchCpuGenerator

CAPABILITY = torch.backends.cpu.get_cpu_capability()
exact = pytest.mark.skipif(CAPABILITY not in ("AVX2", "AVX512"),
                           reason=f"torch runs its {CAPABILITY} normal kernel here, reproduced only approximately")

SEEDS = (0, 1, 2**31 - 1, 2**32 + 5, 12345)
SHAPES = ((1, 4, 8, 8), (2, 4, 8, 8), (1, 4, 9, 7), (1, 4, 64, 64), (1, 4, 128, 128))
DTYPES = {np.float32: torch.float32, np.float16: torch.float16}


def same(ours: np.ndarray, theirs: torch.Tensor) -> bool:
    """Same shape, dtype and bytes (so +0.0 and -0.0 differ)."""
    theirs = theirs.numpy()
    return ours.shape == theirs.shape and ours.dtype == theirs.dtype and ours.tobytes() == theirs.tobytes()


def pair(seed: int) -> tuple[TorchCpuGenerator, torch.Generator]:
    return TorchCpuGenerator(seed), torch.Generator("cpu").manual_seed(seed)


@exact
@pytest.mark.parametrize("dtype", list(DTYPES), ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("seed", SEEDS)
def test_randn_is_torchs(seed, shape, dtype):
    """Latent shapes, including one whose size is not a multiple of 16 (its last 16 values are redrawn)."""
    ours, theirs = pair(seed)
    assert same(ours.randn(shape, dtype=dtype), torch.randn(shape, generator=theirs, dtype=DTYPES[dtype]))
    assert same(ours.rand(7), torch.rand(7, generator=theirs))  # and the state advanced by as many draws


@exact
@pytest.mark.parametrize("seed", SEEDS)
def test_an_ancestral_sampler_stream(seed):
    """The latents then a noise draw per step from the same generator, as Euler ancestral does."""
    ours, theirs = pair(seed)
    for _ in range(6):
        assert same(ours.randn((1, 4, 64, 64)), torch.randn((1, 4, 64, 64), generator=theirs))
    assert same(ours.rand(16), torch.rand(16, generator=theirs))


@exact
@pytest.mark.parametrize("seed", (3, 2**31 - 1))
def test_mixed_sizes_dtypes_and_the_cached_normal(seed):
    """Small draws (< 16 values) cache a second normal in the generator, which large draws neither use nor clear;
    fp16 tails draw 16 values fewer than float32 ones."""
    ours, theirs = pair(seed)
    calls = [(3, np.float32), ((1, 4, 9, 7), np.float32), (1, np.float32), (5, np.float16), ((2, 4, 8, 8), np.float16),
             ((1, 4, 9, 7), np.float16), (1, np.float16), ((2, 3), np.float32), (17, np.float32), (0, np.float32),
             ((2, 0, 3), np.float16), (15, np.float32), (16, np.float16)]
    for shape, dtype in calls:
        assert same(ours.randn(shape, dtype=dtype), torch.randn(shape, generator=theirs, dtype=DTYPES[dtype]))
    assert same(ours.rand(5), torch.rand(5, generator=theirs))
    ours.manual_seed(seed)
    theirs.manual_seed(seed)  # re-seeding clears the cached normal
    assert same(ours.randn(1), torch.randn(1, generator=theirs))


def test_seed_reduction_and_range():
    """torch takes -2**63 <= seed < 2**64 and seeds its mt19937 with the low 32 bits."""
    for seed in (5, 2**32 + 5, -1, 2**64 - 1, -(2**63)):
        ours, theirs = pair(seed)
        assert ours.initial_seed() == theirs.initial_seed()
        assert same(ours.rand(8), torch.rand(8, generator=theirs))
    assert np.array_equal(TorchCpuGenerator(2**32 + 5).rand(4), TorchCpuGenerator(5).rand(4))
    for seed in (2**64, -(2**63) - 1):
        with pytest.raises(ValueError, match="Overflow"):  # torch refuses them too, with a ValueError
            torch.Generator().manual_seed(seed)
        with pytest.raises(ValueError, match="out of range"):
            TorchCpuGenerator(seed)


def test_refusals():
    """Only float32 and float16 draws, torch-style shapes and the known kernel variants."""
    gen = TorchCpuGenerator(0)
    for dtype in (np.float64, np.int32, "bfloat16"):
        with pytest.raises(ValueError, match="float32 and float16"):
            gen.randn((1, 4, 8, 8), dtype=dtype)
    for shape in ((1, -4), (1.5, 2)):
        with pytest.raises(ValueError, match="shape"):
            gen.randn(shape)
    with pytest.raises(ValueError, match="variant"):
        TorchCpuGenerator(0, variant="neon")
    assert gen.randn(3).dtype == np.float32 and gen.randn(np.int64(20)).shape == (20,)


@exact
def test_every_kind_of_uniform_through_box_muller():
    """Box-Muller on chosen uniforms: 2**18 random 24-bit values for u1 and for u2, plus the edges (0, the top,
    powers of two, the octant boundaries of sin/cos). torch gets them through a crafted mt19937 state (the
    untempered outputs with left=624, so 623 outputs come out untwisted); all 2**24 values were checked this way
    once, which takes 15 s."""
    state = bytearray(torch.Generator().manual_seed(0).get_state().numpy().tobytes())
    if len(state) != 5056 or struct.unpack_from("<iiQ", state, 8) != (1, 1, 0):
        pytest.skip("torch's CPUGeneratorImplState layout changed")
    struct.pack_into("<i", state, 8, 624)  # left: 623 outputs before the next twist
    rng = np.random.default_rng(0)
    edges = [0, 1, 2, (1 << 24) - 1, (1 << 24) - 2, 1 << 23, 1 << 22, 1 << 12, (1 << 23) + 1, (1 << 23) - 1]
    octants = [round(k * 2**24 / 8) + d for k in range(1, 8) for d in (-1, 0, 1)]
    values = np.concatenate([edges, octants, rng.integers(0, 1 << 24, 1 << 18)]).astype(np.uint64)
    blocks = 38  # 38 * 16 = 608 <= 623
    n = -(-len(values) // (blocks * 8)) * blocks * 8
    u1 = np.resize(values, n).reshape(-1, blocks, 8)
    u2 = np.resize(rng.permutation(values), n).reshape(-1, blocks, 8)
    ours = TorchCpuGenerator(0)
    theirs = torch.Generator()
    for a, b in zip(u1, u2):
        outputs = np.concatenate([a, b], axis=1).reshape(-1)
        words = np.zeros(624, np.uint64)
        words[:len(outputs)] = _untemper(outputs)
        state[24:24 + 624 * 8] = words.tobytes()
        theirs.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
        uniforms = (outputs.astype(np.float32) * np.float32(2.0**-24)).reshape(blocks, 16)
        expected = ours._box_muller(uniforms).reshape(-1)
        assert expected.tobytes() == torch.randn(blocks * 16, generator=theirs).numpy().tobytes()


def _untemper(y: np.ndarray) -> np.ndarray:
    """The mt19937 state words whose tempered outputs are ``y`` (each tempering step inverted)."""
    y = y.astype(np.uint64)
    y ^= y >> np.uint64(18)
    y ^= (y << np.uint64(15)) & np.uint64(0xEFC60000)
    x = y.copy()
    for _ in range(5):
        x = y ^ ((x << np.uint64(7)) & np.uint64(0x9D2C5680))
    y = x & np.uint64(0xFFFFFFFF)
    x = y.copy()
    for _ in range(3):
        x = y ^ (x >> np.uint64(11))
    return x & np.uint64(0xFFFFFFFF)


DEFAULT_KERNEL = textwrap.dedent("""
    import json, numpy as np, torch
    from crdiff_cli.deploy.torch_random import TorchCpuGenerator
    worst, differing, total, state_ok = 0.0, 0, 0, True
    for seed in (0, 1, 12345):
        ours, theirs = TorchCpuGenerator(seed, variant="default"), torch.Generator().manual_seed(seed)
        for shape in ((1, 4, 64, 64), (1, 4, 9, 7), (1, 4, 64, 64)):
            a, b = ours.randn(shape), torch.randn(shape, generator=theirs).numpy()
            worst = max(worst, float(np.abs(a - b).max()))
            differing, total = differing + int((a != b).sum()), total + a.size
        state_ok &= np.array_equal(ours.rand(9), torch.rand(9, generator=theirs).numpy())
    print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "worst": worst,
                      "fraction": differing / total, "state_ok": bool(state_ok)}))
""")


def test_the_default_kernel_within_its_bound():
    """torch's scalar kernel uses libm's logf/cosf/sinf, which numpy's float64-then-rounded values match in
    ~98.5% of elements (measured: max abs difference 4.8e-7, at most 3 ulps); the stream stays exact."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    done = subprocess.run([sys.executable, "-c", DEFAULT_KERNEL], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["capability"] == "DEFAULT"
    assert result["worst"] <= 1e-6 and result["fraction"] < 0.03 and result["state_ok"], result


def test_importing_leaves_torch_out():
    """The runner's environment may not have torch: importing and drawing must not pull it in."""
    code = ("import sys\nfrom crdiff_cli.deploy.torch_random import TorchCpuGenerator\n"
            "g = TorchCpuGenerator(7); g.randn((1, 4, 9, 7)); g.randn(3); g.randn((2, 16), 'float16')\n"
            "TorchCpuGenerator(7, 'default').randn(40)\n"
            "sys.exit(1 if 'torch' in sys.modules else 0)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr or "torch was imported"
