"""Carrying out a POA policy call by call: where in the schedule a UNet call is, what it runs, how it combines.

A UNet call does not say which step it belongs to, only its timestep. The step is found by looking that
timestep up in the bound pipeline's scheduler (read at every call, so a scheduler swapped after binding is
the one used). That keeps no counter that could drift: a new image starts at step 0 again by itself, and
the steps of an interrupted run do not leak into the next.

The same object serves the live :class:`~crdiff_cli.dual.unet.DualUNet` and the ONNX Runtime UNet: each
asks :meth:`PoaSteps.plan` what to run and hands the outputs back to :meth:`PoaSteps.combine` (or, where the
runtime combines, :meth:`PoaSteps.keep`) or :meth:`PoaSteps.from_cache`. Combinations follow
``torch.lerp``'s formulas exactly, so a step with both passes gives the bits of full CR-Diff.
"""

from __future__ import annotations

import weakref

import torch

from crdiff_cli.dual.poa_policy import PoaPolicy, cached_pass
from crdiff_cli.errors import CrdiffError


class PoaSteps:
    """The policy, the pipeline whose scheduler says where a call is, the last difference, and a trace."""

    def __init__(self, policy: PoaPolicy | None = None):
        self.policy = policy or PoaPolicy()
        self._pipe = None
        self._delta: torch.Tensor | None = None  # e_p - e_d of the last step that ran both passes
        self._last_step = -1  # the step of the previous call: a smaller one starts a new run (a new image)
        self.trace: PoaTrace | None = None

    def bind(self, pipe) -> None:
        """Read the schedule from ``pipe.scheduler`` (a weak reference: the pipeline owns this UNet)."""
        self._pipe = weakref.ref(pipe)

    def position(self, timestep) -> tuple[int, int]:
        """``(step, steps)``: where ``timestep`` is in the bound pipeline's schedule of distinct timesteps."""
        pipe = self._pipe() if self._pipe is not None else None
        schedule = getattr(getattr(pipe, "scheduler", None), "timesteps", None)
        if schedule is None:
            raise CrdiffError("a POA window or refresh needs the pipeline's schedule; apply CR-Diff to the pipeline "
                              "(apply_crdiff(pipe, ...)) or call pipe.unet.poa.bind(pipe)")
        values = torch.as_tensor(timestep).reshape(-1)
        if values.numel() == 0 or not bool((values == values[0]).all()):
            raise CrdiffError(f"a POA window or refresh needs one timestep per UNet call, got {values.tolist()}")
        distinct = torch.unique_consecutive(torch.as_tensor(schedule).reshape(-1).cpu())
        found = (distinct == values[0].to(distinct.dtype).cpu()).nonzero()
        if found.numel() == 0:
            raise CrdiffError(f"timestep {values[0].item():g} is not in the pipeline scheduler's timesteps; a POA "
                              "window or refresh follows the bound pipeline's schedule (pipe.unet.poa.bind(pipe))")
        return int(found[0, 0]), len(distinct)

    def plan(self, timestep, k: float) -> tuple[str, int]:
        """What this call runs (``both``, ``dense``, ``pruned``, or ``cached-dense``/``cached-pruned``) and its step.

        Full CR-Diff plans ``both`` without looking the step up (unless tracing). A cached step with no
        difference measured yet in this run (an img2img run starting inside the window) runs both passes.
        """
        if self.policy.is_full and self.trace is None:
            return "both", -1
        step, steps = self.position(timestep)
        if step < self._last_step:  # a new image: never reuse another image's difference
            self._delta = None
        self._last_step = step
        kind = self.policy.step_kind(step, steps)
        if kind == "cached":
            if self._delta is None:
                return "both", step
            return "cached-" + cached_pass(k), step
        return kind, step

    def combine(self, dense: torch.Tensor, pruned: torch.Tensor, k: float, step: int, timestep=None) -> torch.Tensor:
        """``torch.lerp(dense, pruned, k)``; keeps ``pruned - dense`` for cached steps and the trace."""
        out = torch.lerp(dense, pruned, k)
        if self.policy.refresh > 1 or self.trace is not None:
            self.keep(pruned - dense, dense, out, step, timestep)
        return out

    def keep(self, delta: torch.Tensor, dense: torch.Tensor | None, out: torch.Tensor, step: int, timestep) -> None:
        """Remember a step's difference for cached steps (refresh > 1) and record it in the trace, if any.

        ``dense`` is needed only by the trace (a runtime that returns ``out`` and ``delta`` can pass None then)."""
        if self.policy.refresh > 1:
            self._delta = delta
        if self.trace is not None:
            self.trace.record(step, timestep, delta, dense, out)

    def from_cache(self, sample: torch.Tensor, k: float, kind: str) -> torch.Tensor:
        """One pass's output plus the last difference, in the form :func:`torch.lerp` uses on that side:
        ``e_d + k delta`` from the dense pass, ``e_p - delta (1 - k)`` from the pruned one."""
        delta = self._delta
        if delta.shape != sample.shape:
            raise CrdiffError(f"the cached POA difference is {tuple(delta.shape)} but this call's output is "
                              f"{tuple(sample.shape)}; a refresh policy needs the same batch at every step")
        delta = delta.to(sample.dtype)
        return sample + k * delta if kind == "cached-dense" else sample - delta * (1.0 - k)


class PoaTrace:
    """Per step where both passes ran: how big the difference is, how it turns, how much of the output it moves.

    ``delta_norm`` = ||delta||; ``cos_prev`` = cosine between this step's delta and the previous step's (None
    at a run's first step); ``share`` = ||e - e_d|| / ||e_d||, the relative change POA makes to the dense output.
    A run starts again whenever the step number does not increase; ``label`` names the current image.
    """

    def __init__(self):
        self.entries: list[dict] = []
        self.label: str | None = None
        self._previous: torch.Tensor | None = None
        self._previous_step = -1

    def record(self, step: int, timestep, delta: torch.Tensor, dense: torch.Tensor, out: torch.Tensor) -> None:
        flat = delta.detach().double().reshape(-1)
        if step <= self._previous_step or self._previous is None or self._previous.shape != flat.shape:
            cos = None
        else:
            cos = float(torch.nn.functional.cosine_similarity(flat, self._previous, dim=0))
        dense_norm = float(torch.linalg.vector_norm(dense.detach().double()))
        moved = float(torch.linalg.vector_norm((out - dense).detach().double()))
        self.entries.append({"image": self.label, "step": step, "timestep": None if timestep is None else
                             float(torch.as_tensor(timestep).reshape(-1)[0]), "delta_norm": float(flat.norm()),
                             "cos_prev": cos, "share": moved / dense_norm if dense_norm else None})
        self._previous, self._previous_step = flat, step
