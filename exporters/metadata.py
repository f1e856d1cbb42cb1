"""What every crdiff artifact says about itself: a flat ``{str: str}`` table shared by both formats.

A baked dual UNet is the dense weights plus a :class:`~crdiff_cli.pruning.spec.PruneSpec` plus ``k``
(the pruned twin is fully determined by the dense weights, the target rule and three
thresholds). The same table goes into a safetensors header (``__metadata__``) and into an ONNX
model's ``metadata_props``, so one reader serves both formats and another runtime needs nothing but
``docs/artifacts.md``. Thresholds are stored twice: as the bit pattern in the weights' dtype (the
exact value, authoritative) and as a decimal (for people); a reader checks that they agree.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass

from crdiff_cli import __version__
from crdiff_cli.dual.poa_policy import PoaPolicy
from crdiff_cli.errors import CrdiffError
from crdiff_cli.pruning.ratios import GROUPS, Ratios
from crdiff_cli.pruning.resolution import Resolution
from crdiff_cli.pruning.spec import GroupSpec, PruneSpec

FORMAT = "crdiff-dual-unet"
FORMAT_VERSION = 1
HASH_METHOD = "crdiff-tensors-sha256/1"
PREFIX = "crdiff."
UNET_CLASS = "UNet2DConditionModel"

# safetensors' dtype names: used for the weights hash and in docs/artifacts.md
SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
                      "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


class ArtifactError(CrdiffError):
    """A file that is not a readable crdiff artifact (corrupt, truncated, foreign or inconsistent)."""


@dataclass(frozen=True)
class ArtifactMetadata:
    """Everything besides the dense weights that a baked dual UNet needs, and where it came from."""

    spec: PruneSpec
    k: float
    resolution: Resolution
    family: str
    unet_config: dict
    base_unet_sha256: str
    target_names: dict[str, list[str]]
    crdiff_version: str = __version__
    poa: PoaPolicy = PoaPolicy()  # the POA policy baked in: generate follows it unless told otherwise
    poa_switch: bool = False  # ONNX: the graph has a ``poa_pass`` input and serves one-pass steps too

    @classmethod
    def describe(cls, unet, spec: PruneSpec, k: float, resolution: Resolution, family: str,
                 poa: PoaPolicy | None = None, poa_switch: bool = False) -> "ArtifactMetadata":
        """The metadata of baking the plain (unparametrized) ``unet`` with ``spec``, ``k`` and ``poa``."""
        from crdiff_cli.pruning.spec import check_matches

        names = {g: [name for name, _ in ws] for g, ws in check_matches(unet, spec).items()}
        return cls(spec=spec, k=float(k), resolution=resolution, family=family,
                   unet_config=comparable_config(unet.config), base_unet_sha256=weights_sha256(unet.state_dict()),
                   target_names=names, poa=poa or PoaPolicy(), poa_switch=poa_switch)

    @property
    def dtype(self) -> str:
        return self.spec.dtype

    def to_strings(self) -> dict[str, str]:
        """The flat string table written into the artifact (keys prefixed ``crdiff.``)."""
        groups = {g: {"ratio": s.ratio, "layers": s.layers, "targets": s.targets, "pruned": s.pruned}
                  for g, s in self.spec.groups.items()}
        thresholds = {g: None if s.threshold is None else
                      {"bits": threshold_bits(s.threshold, self.dtype), "value": s.threshold}
                      for g, s in self.spec.groups.items()}
        table = {
            "format": FORMAT, "format_version": str(FORMAT_VERSION), "crdiff_version": self.crdiff_version,
            "family": self.family, "resolution": str(self.resolution), "k": repr(float(self.k)),
            "ratios": _json(self.spec.ratios.as_dict()), "dtype": self.dtype, "thresholds": _json(thresholds),
            "groups": _json(groups), "target_weights": _json(self.target_names), "unet_class": UNET_CLASS,
            "unet_config": _json(self.unet_config), "base_unet_sha256": self.base_unet_sha256,
            "base_unet_hash_method": HASH_METHOD,
            "poa": _json({**self.poa.to_dict(), "switch": self.poa_switch}),
        }
        return {PREFIX + key: value for key, value in table.items()}

    @classmethod
    def from_strings(cls, table: dict[str, str] | None, origin: str) -> "ArtifactMetadata":
        """Parse :meth:`to_strings`' table; a missing or foreign table raises :class:`ArtifactError`."""
        table = table or {}
        fmt = table.get(PREFIX + "format")
        if fmt != FORMAT:
            raise ArtifactError(f"{origin} is not a crdiff artifact (no \"{PREFIX}format\": \"{FORMAT}\" in its "
                                "metadata); bake one with `crdiff bake`")
        version = table.get(PREFIX + "format_version")
        if version != str(FORMAT_VERSION):
            raise ArtifactError(f"{origin} is a crdiff artifact of format version {version}, this crdiff reads "
                                f"version {FORMAT_VERSION}; re-bake it or upgrade crdiff")
        try:
            return cls._parse({k.removeprefix(PREFIX): v for k, v in table.items() if k.startswith(PREFIX)})
        except ArtifactError as exc:
            raise ArtifactError(f"{origin}: {exc}") from None
        except (KeyError, TypeError, ValueError, AttributeError, struct.error) as exc:  # struct: bits out of range
            # (a ParameterError from a damaged POA policy is a ValueError too)
            raise ArtifactError(f"{origin} has damaged crdiff metadata ({type(exc).__name__}: {exc}); "
                                "re-bake it") from None

    @classmethod
    def _parse(cls, t: dict[str, str]) -> "ArtifactMetadata":
        dtype = t["dtype"]
        ratios = Ratios.from_dict(json.loads(t["ratios"]))
        groups = json.loads(t["groups"])
        thresholds = json.loads(t["thresholds"])
        specs = {}
        for g in GROUPS:
            entry = thresholds[g]
            threshold = None if entry is None else threshold_from_bits(entry["bits"], dtype)
            if entry is not None and threshold != float(entry["value"]):
                raise ArtifactError(f"the {g} threshold's bits {entry['bits']} and value {entry['value']} disagree")
            gs = groups[g]
            specs[g] = GroupSpec(float(gs["ratio"]), int(gs["layers"]), int(gs["targets"]), threshold, int(gs["pruned"]))
            if specs[g].ratio != ratios[g]:
                raise ArtifactError(f"the {g} ratio is {ratios[g]} in 'ratios' but {specs[g].ratio} in 'groups'")
        if t["unet_class"] != UNET_CLASS:
            raise ArtifactError(f"holds a {t['unet_class']}; crdiff artifacts hold a {UNET_CLASS}")
        if t["base_unet_hash_method"] != HASH_METHOD:
            raise ArtifactError(f"uses weights hash {t['base_unet_hash_method']!r}, this crdiff knows {HASH_METHOD!r}")
        poa = json.loads(t["poa"]) if "poa" in t else None  # artifacts baked before policies: full POA
        return cls(spec=PruneSpec(ratios, specs, dtype), k=float(t["k"]), resolution=Resolution.parse(t["resolution"]),
                   family=t["family"], unet_config=json.loads(t["unet_config"]),
                   base_unet_sha256=t["base_unet_sha256"], target_names=json.loads(t["target_weights"]),
                   crdiff_version=t["crdiff_version"], poa=PoaPolicy.from_dict(poa),
                   poa_switch=bool(poa and poa.get("switch")))


def comparable_config(config) -> dict:
    """A UNet config as plain JSON data without diffusers' private ``_`` keys (paths, versions)."""
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))


_STRUCT = {"float32": ("<f", "<I", 8), "float16": ("<e", "<H", 4)}


def threshold_bits(value: float, dtype: str) -> str:
    """The bit pattern of ``value`` in ``dtype`` as hex (``0x`` + 8 digits for fp32, 4 for fp16/bf16)."""
    if dtype == "bfloat16":
        return f"0x{struct.unpack('<I', struct.pack('<f', value))[0] >> 16:04x}"
    fmt, int_fmt, digits = _STRUCT[dtype]
    return f"0x{struct.unpack(int_fmt, struct.pack(fmt, value))[0]:0{digits}x}"


def threshold_from_bits(bits: str, dtype: str) -> float:
    """Inverse of :func:`threshold_bits`: the exact value, as a Python float."""
    pattern = int(bits, 16)
    if dtype == "bfloat16":
        return struct.unpack("<f", struct.pack("<I", pattern << 16))[0]
    if dtype not in _STRUCT:
        raise ArtifactError(f"unsupported weights dtype {dtype!r}")
    fmt, int_fmt, _ = _STRUCT[dtype]
    return struct.unpack(fmt, struct.pack(int_fmt, pattern))[0]


def weights_sha256(state_dict) -> str:
    """SHA-256 over a state dict, independent of file format (method ``crdiff-tensors-sha256/1``).

    For each tensor in ascending order of name (Python string order): one line of compact JSON
    ``{"name":...,"dtype":"F32","shape":[...]}`` plus ``\\n``, then the tensor's raw bytes, row-major,
    little-endian. It is what a safetensors artifact holds, so a reader can re-check it.
    """
    import torch

    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        dtype = SAFETENSORS_DTYPES[str(tensor.dtype).removeprefix("torch.")]
        digest.update(_json({"name": name, "dtype": dtype, "shape": list(tensor.shape)}).encode() + b"\n")
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _json(value) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)
