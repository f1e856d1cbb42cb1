"""Validating an artifact against the live dual UNet: a separate, named step after export.

As in Optimum's ``validate_model_outputs``: seeded random inputs, the reference and the candidate
run on each, and a specific error for each way it can go wrong (:class:`ShapeMismatchError`,
:class:`ToleranceExceededError`). The error measure is relative to the output's scale,
``max|candidate - reference| / max|reference|`` per case, which stays meaningful where single
elements are near zero. Verification errors exit with code 1 (the artifact is wrong), not 2 (the
user's input is wrong).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from crdiff_cli.errors import CrdiffError
from crdiff_cli.exporters.onnx_graph import example_inputs
from crdiff_cli.pruning.resolution import Resolution

TOLERANCES = {"float32": 1e-4, "float16": 1e-2}
VAE_SCALE = 8  # latent pixels per image pixel in SD1.x/2.x/XL (and the tiny models)


class VerificationError(CrdiffError):
    """The artifact does not compute what the live dual UNet computes."""

    exit_code = 1


class ShapeMismatchError(VerificationError):
    """The artifact's output has another shape than the reference's."""


class ToleranceExceededError(VerificationError):
    """The artifact's output differs from the reference's by more than the tolerance."""


@dataclass(frozen=True)
class Case:
    """One verification input: batch size and latent height x width."""

    batch: int
    height: int
    width: int

    def __str__(self) -> str:
        return f"batch {self.batch}, latent {self.height}x{self.width}"


@dataclass(frozen=True)
class CaseResult:
    case: Case
    max_abs_error: float
    relative_error: float


@dataclass(frozen=True)
class VerificationReport:
    results: list[CaseResult]
    tolerance: float

    @property
    def max_relative_error(self) -> float:
        return max(r.relative_error for r in self.results)

    def summary(self) -> str:
        shapes = sorted({f"{r.case.height}x{r.case.width}" for r in self.results})
        batches = sorted({r.case.batch for r in self.results})
        return (f"max relative error {self.max_relative_error:.2e} (tolerance {self.tolerance:g}) over "
                f"{len(self.results)} cases: batch {', '.join(map(str, batches))} x latent {', '.join(shapes)}")


def verification_cases(resolution: Resolution) -> list[Case]:
    """Batch 1 and 2 at two latent sizes: the artifact's resolution, and an odd size about half of it.

    The second size is deliberately not a multiple of the UNet's downsampling factor, which is the
    path with explicit upsample sizes (the paper's 400x560 and 480x360 take it too).
    """
    height, width = resolution.height // VAE_SCALE, resolution.width // VAE_SCALE
    sizes = [(height, width), (height // 2 + 1, width // 2 + 3)]
    return [Case(batch, h, w) for h, w in sizes for batch in (1, 2)]


def unet_call(unet, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Call a diffusers-style UNet (or DualUNet) on graph-named inputs; returns the output sample."""
    added = {k: inputs[k] for k in ("text_embeds", "time_ids") if k in inputs} or None
    with torch.no_grad():
        return unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"],
                    added_cond_kwargs=added, return_dict=False)[0]


def validate_model_outputs(reference: Callable[[dict], torch.Tensor], candidate: Callable[[dict], torch.Tensor],
                           config, cases: list[Case], *, dtype: str = "float32",
                           tolerance: float | None = None) -> VerificationReport:
    """Compare ``candidate`` with ``reference`` on seeded random inputs for every case.

    Raises :class:`ShapeMismatchError` or :class:`ToleranceExceededError` (with the numbers) at the
    first failing case; returns the per-case errors otherwise.
    """
    tolerance = TOLERANCES[dtype] if tolerance is None else tolerance
    results = []
    for seed, case in enumerate(cases):
        inputs = example_inputs(config, case.batch, case.height, case.width, dtype=getattr(torch, dtype), seed=seed)
        expected = reference(inputs).float()
        got = candidate(inputs).float()
        if got.shape != expected.shape:
            raise ShapeMismatchError(f"verification failed: the artifact's output has shape {tuple(got.shape)}, "
                                     f"the live dual UNet's {tuple(expected.shape)} ({case})")
        max_abs = float((got - expected).abs().max())
        relative = max_abs / max(float(expected.abs().max()), torch.finfo(torch.float32).tiny)
        if not relative <= tolerance:  # also catches NaN
            raise ToleranceExceededError(f"verification failed: relative error {relative:.3g} exceeds {tolerance:g} "
                                         f"({case}, max abs error {max_abs:.3g})")
        results.append(CaseResult(case, max_abs, relative))
    return VerificationReport(results, tolerance)
