"""The torch module that is traced into the ONNX dual graph, and the graph's input/output contract.

One forward runs the UNet twice on the same inputs, dense then pruned, and returns
``e_d + k * (e_p - e_d)`` with ``k`` a constant. The two passes share every parameter, so the traced
graph holds each weight once (the TorchScript exporter deduplicates shared parameters); in the pruned
pass each target weight is ``where(|W| > t, W, 0)`` computed from that same initializer, ``t`` a
constant of W's dtype.

Why linears are rewritten for the trace: ``nn.Linear`` exports as ``MatMul(x, Transpose(W))``. Left
so, the runtime must either constant-fold the transposes (ONNX Runtime then also folds the masks of
the pruned pass: a second resident copy of every target) or transpose every weight on every call.
During export each ``nn.Linear`` is therefore swapped for :class:`_MatMulLinear`, whose parameter is
the weight stored transposed (``[in, out]``, a view: no copy), so the graph is ``MatMul(x, Wt)`` and
the mask ``where(|Wt| > t, Wt, 0)`` needs no transpose either (masking commutes with transposing).
The UNet's own modules are put back afterwards.

Policy graphs (:mod:`.onnx_policy`) are assembled from three traces: this module at ``k = 0`` (the dense
pass alone) and at ``k = 1`` (the pruned pass alone), and :class:`Combination`, its last step alone.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from crdiff_cli.dual.unet import Branch
from crdiff_cli.errors import CrdiffError
from crdiff_cli.pruning.spec import PruneSpec, check_matches
from crdiff_cli.pruning.targets import group_of, require_plain

OUTPUT = "out_sample"
DELTA = "poa_delta"  # policy graphs: e_p - e_d when both passes run, zeros in one-pass steps
PASS = "poa_pass"  # policy graphs: the int64 [1] input that says which passes a step runs
PASS_BOTH, PASS_DENSE, PASS_PRUNED = 0, 1, 2  # its values: both passes (POA), the dense one alone, the pruned one
PASS_VALUES = ("poa:dense", "poa:pruned")  # policy graphs: e_d and e_p, the inputs of the traced Combination


def input_names(sdxl: bool) -> list[str]:
    """Graph inputs, named as diffusers' / Optimum's ONNX UNets name them."""
    return ["sample", "timestep", "encoder_hidden_states"] + (["text_embeds", "time_ids"] if sdxl else [])


def dynamic_axes(sdxl: bool) -> dict[str, dict[int, str]]:
    """Batch, latent height/width and text length are dynamic; ``timestep`` has length 1 or batch."""
    axes = {"sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "timestep_batch"},
            "encoder_hidden_states": {0: "batch", 1: "sequence"}, OUTPUT: {0: "batch", 2: "height", 3: "width"}}
    if sdxl:
        axes.update(text_embeds={0: "batch"}, time_ids={0: "batch"})
    return axes


def is_sdxl(config) -> bool:
    return dict(config).get("addition_embed_type") == "text_time"


def example_inputs(config, batch: int, height: int, width: int, *, dtype=torch.float32, sequence: int = 77,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random UNet inputs (latent ``height`` x ``width``) in graph-input order, keyed by input name."""
    config = dict(config)
    gen = torch.Generator().manual_seed(seed)
    inputs = {"sample": torch.randn(batch, config["in_channels"], height, width, generator=gen),
              "timestep": torch.randint(0, 1000, (1,), generator=gen).float(),
              "encoder_hidden_states": torch.randn(batch, sequence, config["cross_attention_dim"], generator=gen)}
    if is_sdxl(config):
        time_dim = config["addition_time_embed_dim"]
        text_dim = config["projection_class_embeddings_input_dim"] - 6 * time_dim
        inputs["text_embeds"] = torch.randn(batch, text_dim, generator=gen)
        sizes = [8.0 * height, 8.0 * width, 0.0, 0.0, 8.0 * height, 8.0 * width]
        inputs["time_ids"] = torch.tensor([sizes] * batch)
    return {name: t.to(dtype) if name != "timestep" else t for name, t in inputs.items()}


def trace_shape(config) -> tuple[int, int]:
    """A latent size for tracing that is NOT a multiple of the UNet's downsampling factor.

    diffusers then passes explicit upsample sizes taken from the skip connections, which the trace
    keeps as shape computations: the graph accepts any latent size, not only multiples of 8.
    """
    factor = 2 ** (len(dict(config)["block_out_channels"]) - 1)
    return 3 * factor + 1, 2 * factor + 1


class _MatMulLinear(nn.Module):
    """``nn.Linear`` as ``x @ Wt + b`` on the transposed weight, masked by ``threshold`` in the pruned pass."""

    def __init__(self, linear: nn.Linear, threshold: float | None, branch: Branch):
        super().__init__()
        self.weight_t = nn.Parameter(linear.weight.detach().t(), requires_grad=False)
        self.bias = linear.bias
        self.threshold = threshold
        self.branch = branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_t
        if self.branch.pruned and self.threshold is not None:
            weight = torch.where(weight.abs() > self.threshold, weight, 0.0)
        out = torch.matmul(x, weight)
        return out if self.bias is None else out + self.bias


class DualGraph(nn.Module):
    """``e_d + k (e_p - e_d)`` over one UNet, written so that tracing yields the shared-weight graph.

    The combination follows ``torch.lerp`` (what the live :class:`~crdiff_cli.dual.unet.DualUNet`
    uses) formula for formula: ``e_d + k (e_p - e_d)`` for ``|k| < 0.5``, else
    ``e_p - (e_p - e_d)(1 - k)``; ``k = 0`` exports the dense UNet alone, ``k = 1`` the pruned one.
    """

    def __init__(self, unet: nn.Module, k: float, branch: Branch, any_pruned: bool):
        super().__init__()
        self.unet = unet
        self.k = float(k)
        self.branch = branch
        self.any_pruned = any_pruned
        self.sdxl = is_sdxl(unet.config)

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        args = (sample, timestep, encoder_hidden_states, text_embeds, time_ids)
        if self.k == 0 or not self.any_pruned:
            return self._run(False, *args)
        if self.k == 1:
            return self._run(True, *args)
        return combine(self._run(False, *args), self._run(True, *args), self.k)

    def variant(self, k: float) -> "DualGraph":
        """The same UNet and masks at another ``k``: ``0`` traces the dense pass alone, ``1`` the pruned one."""
        return DualGraph(self.unet, k, self.branch, self.any_pruned).eval()

    def combination(self) -> "Combination":
        """This graph's last step alone (what a policy graph's both-passes step ends with)."""
        return Combination(self.k, self.any_pruned).eval()

    def _run(self, pruned: bool, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if self.sdxl else None
        self.branch.pruned = pruned
        try:
            return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]
        finally:
            self.branch.pruned = False


def combine(dense: torch.Tensor, pruned: torch.Tensor, k: float) -> torch.Tensor:
    """``e_d + k (e_p - e_d)``, formula for formula as ``torch.lerp`` computes it (see :class:`DualGraph`)."""
    if abs(k) < 0.5:
        return dense + k * (pruned - dense)
    return pruned - (pruned - dense) * (1.0 - k)


class Combination(nn.Module):
    """:class:`DualGraph`'s last step alone, on the two passes' outputs: ``(its output, e_p - e_d)``.

    Traced on inputs named :data:`PASS_VALUES` for a policy graph, whose both-passes step it computes.
    """

    def __init__(self, k: float, any_pruned: bool):
        super().__init__()
        self.k = float(k)
        self.any_pruned = any_pruned

    def forward(self, dense: torch.Tensor, pruned: torch.Tensor):
        delta = pruned - dense
        if self.k == 0 or not self.any_pruned:
            return dense, delta
        if self.k == 1:
            return pruned, delta
        return combine(dense, pruned, self.k), delta


def combination_inputs(config, dtype) -> dict[str, torch.Tensor]:
    """Example inputs of :class:`Combination`: two outputs of the UNet at the trace shape, batch 2."""
    config = dict(config)
    return {name: torch.zeros(2, config["out_channels"], *trace_shape(config), dtype=dtype) for name in PASS_VALUES}


def combination_axes() -> dict[str, dict[int, str]]:
    """:class:`Combination`'s inputs and outputs have the UNet output's dynamic axes."""
    return {name: {0: "batch", 2: "height", 3: "width"} for name in (*PASS_VALUES, OUTPUT, DELTA)}


@contextmanager
def dual_graph(unet: nn.Module, spec: PruneSpec, k: float):
    """Yield a :class:`DualGraph` over ``unet`` (linears swapped for export); restore ``unet`` after."""
    require_plain(unet)
    check_matches(unet, spec)
    thresholds = spec.thresholds()
    branch = Branch()
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for name, module in list(unet.named_modules()):
            if isinstance(module, nn.Conv2d) and group_of(name):
                raise CrdiffError(f"target {name} is a Conv2d; the ONNX exporter masks Linear targets only "
                                  "(diffusers' SD UNets have no Conv2d targets)")
            if isinstance(module, nn.Linear):
                group = group_of(name)
                parent_name, _, child = name.rpartition(".")
                parent = unet.get_submodule(parent_name)
                parent._modules[child] = _MatMulLinear(module, thresholds[group] if group else None, branch)
                swapped.append((parent, child, module))
        yield DualGraph(unet, k, branch, any(t is not None for t in thresholds.values())).eval()
    finally:
        for parent, child, module in reversed(swapped):
            parent._modules[child] = module
