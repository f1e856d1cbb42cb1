"""A POA policy carried out by the torch-free runner, step by step, over a policy graph.

A folder baked with a partial policy (``--poa-interval``, ``--poa-outside``, ``--poa-refresh``) has the UNet
graph with the one-pass switch (input ``poa_pass``: 0 both passes, giving ``out_sample`` and ``poa_delta``;
1 the dense pass; 2 the pruned one). Which one a step runs follows :class:`~crdiff_cli.dual.poa_policy.PoaPolicy`
exactly as the live :class:`~crdiff_cli.dual.poa_steps.PoaSteps` does: the step is the timestep's position among
the schedule's distinct timesteps (PNDM's repeated one is one step), a cached step runs the pass
:func:`~crdiff_cli.dual.poa_policy.cached_pass` picks plus the last measured difference, in the form
``torch.lerp`` takes on that side, and an image never reuses another image's difference (one instance per
request). As in the live dual UNet, a step whose result is one pass anyway (k = 0 or 1, or nothing pruned) runs
only that pass.
"""

from __future__ import annotations

import numpy as np

from crdiff_cli.dual.poa_policy import PoaPolicy, cached_pass

PASSES = {"both": 0, "dense": 1, "cached-dense": 1, "pruned": 2, "cached-pruned": 2}  # the graph's poa_pass values


class PolicySteps:
    """``steps(unet, kept, t, **inputs)`` -> the UNet output of step ``t`` under ``policy``."""

    def __init__(self, policy: PoaPolicy, k: float, timesteps: np.ndarray, pruned: bool = True):
        self.policy, self.k, self.pruned = policy, np.float32(k), pruned
        self.one_minus_k = np.float32(1.0 - float(k))  # as torch.lerp's weight (1 - k), rounded once
        values = np.asarray(timesteps).reshape(-1)
        self.distinct = values[np.r_[True, values[1:] != values[:-1]]] if values.size else values
        self.delta: np.ndarray | None = None  # e_p - e_d of the last step that ran both passes

    def __call__(self, unet, kept, t, **inputs: np.ndarray) -> np.ndarray:
        kind = self.plan(t)
        out = unet(kept, **inputs, poa_pass=np.array([PASSES[kind]], dtype=np.int64))
        sample = next(iter(out.values()))
        if kind == "both":
            self.delta = out["poa_delta"] if self.policy.refresh > 1 else None
            return sample
        if kind == "cached-dense":
            return sample + self.k * self.delta
        if kind == "cached-pruned":
            return sample - self.delta * self.one_minus_k
        return sample

    def plan(self, t) -> str:
        """The passes step ``t`` runs: ``both``, ``dense``, ``pruned``, or ``cached-dense``/``cached-pruned``."""
        if not self.pruned:
            return "dense"
        step = int(np.flatnonzero(self.distinct == t)[0])
        kind = self.policy.step_kind(step, len(self.distinct))
        if kind == "cached":
            kind = "both" if self.delta is None else "cached-" + cached_pass(float(self.k))
        if kind == "both" and float(self.k) in (0.0, 1.0):  # lerp's result is one pass: run only that one
            kind = "dense" if float(self.k) == 0.0 else "pruned"
        return kind
