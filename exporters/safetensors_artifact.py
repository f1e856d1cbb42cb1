"""The safetensors artifact: the dense UNet's weights once, and the metadata table in the header.

Tensors are the UNet's ``state_dict()`` under diffusers' own names and layouts, so the file is also a
plain diffusers UNet checkpoint; the header's ``__metadata__`` carries the :mod:`.metadata` table
(config, spec, k, ...). The pruned twin costs nothing on disk: it is the dense weights masked by the
stored thresholds when the file is loaded. Loading needs no base model: the UNet is rebuilt from the
stored config, and its weights are re-hashed against the stored SHA-256 so corruption is caught.
"""

from __future__ import annotations

from pathlib import Path

from crdiff_cli.errors import first_line
from crdiff_cli.exporters.metadata import ArtifactError, ArtifactMetadata, weights_sha256


def save_safetensors(unet, meta: ArtifactMetadata, path: Path) -> None:
    """Write ``unet``'s dense weights and ``meta`` to ``path`` (the caller makes it atomic)."""
    from safetensors.torch import save_file

    state = unet._modules.get("unet", unet).state_dict()  # a DualUNet's UNet: its state is the dense one
    save_file({name: t.contiguous() for name, t in state.items()}, str(path), metadata={"format": "pt", **meta.to_strings()})


def read_safetensors_metadata(path: Path) -> ArtifactMetadata:
    """The metadata of a safetensors artifact, reading only its header."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            table = f.metadata()
    except Exception as exc:  # safetensors raises its own error types for damaged headers
        raise ArtifactError(f"{path} is not a readable safetensors file ({first_line(exc)}); it may be "
                            "truncated or corrupt") from None
    return ArtifactMetadata.from_strings(table, str(path))


def load_safetensors_unet(path: Path, *, check_hash: bool = True):
    """``(unet, meta)``: the dense UNet rebuilt from the artifact alone, in the artifact's dtype."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    meta = read_safetensors_metadata(path)
    try:
        state = load_file(str(path))
    except Exception as exc:
        raise ArtifactError(f"cannot read the weights in {path} ({first_line(exc)}); it may be truncated") from None
    if check_hash and weights_sha256(state) != meta.base_unet_sha256:
        raise ArtifactError(f"the weights in {path} do not match the SHA-256 in its metadata; the file is corrupt")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(meta.unet_config)
    try:
        unet.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ArtifactError(f"the weights in {path} do not fit its UNet config ({first_line(exc)})") from None
    check_targets(unet, meta, path)
    return unet.eval().requires_grad_(False), meta


def check_targets(unet, meta: ArtifactMetadata, origin) -> None:
    """Refuse an artifact whose listed target weights differ from what the target rule finds in ``unet``."""
    from crdiff_cli.pruning.targets import target_weights

    found = {g: [name for name, _ in ws] for g, ws in target_weights(unet).items()}
    if found != meta.target_names:
        raise ArtifactError(f"the target weights listed in {origin} differ from this crdiff's target rule; "
                            "re-bake it with this version")
