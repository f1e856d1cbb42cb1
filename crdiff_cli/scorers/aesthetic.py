"""Aesthetic Score (``aesthetic:HEAD``): an image-only predictor, an MLP head on a frozen image embedding.

Two published predictors, told apart by the head's parameter names:

* **LAION aesthetic predictor v2** (``sac+logos+ava1-l14-linearMSE.pth``): the L2-normalised CLIP
  ViT-L/14 image embedding (768-d, ``openai/clip-vit-large-patch14``) into an MLP
  ``768-1024-128-64-16-1`` whose parameters are ``layers.{0,2,4,6,7}``. The usual "Aesthetic Score"
  (Table 7's ~5-6 on a 1-10 scale).
* **aesthetic-predictor v2.5** (``aesthetic_predictor_v2_5.pth``, the one CR-Diff's code lists): the
  L2-normalised pooled SigLIP so400m image embedding (1152-d, ``google/siglip-so400m-patch14-384``)
  into an MLP ``1152-1024-128-64-16-1``, parameters ``scoring_head.{0,2,4,6,8}`` (or the same under
  ``layers.`` as saved by its package).

The backbone is a folder beside the head named like its hub repository (``clip-vit-large-patch14/``
or ``siglip-so400m-patch14-384/``, saved with ``save_pretrained`` including the image processor), else
that hub id from the local Hugging Face cache: nothing is downloaded. The head is read with
``torch.load(weights_only=True)`` (or safetensors): a pickle never runs code. The score's name says
which predictor it came from (``aesthetic-v2:...`` or ``aesthetic-v2.5:...``). Prompts are ignored.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from crdiff_cli.errors import CrdiffError
from crdiff_cli.scorers import check_batch

BACKBONES = {"v2": "openai/clip-vit-large-patch14", "v2.5": "google/siglip-so400m-patch14-384"}
_V2_LINEARS = (0, 2, 4, 6, 7)
_V25_LINEARS = (0, 2, 4, 6, 8)


def read_head(path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """``(version, state dict with keys "<i>.weight"/"<i>.bias")`` of a head file, safely."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CrdiffError(f"cannot read aesthetic head {path} ({type(exc).__name__}); pass the predictor's .pth "
                          "state dict (sac+logos+ava1-l14-linearMSE.pth or aesthetic_predictor_v2_5.pth)") from None
    if not isinstance(state, dict):
        raise CrdiffError(f"{path} holds a {type(state).__name__}, not a state dict of an aesthetic head")
    for prefix, version, linears in (("scoring_head.", "v2.5", _V25_LINEARS), ("layers.scoring_head.", "v2.5",
                                     _V25_LINEARS), ("layers.", "v2", _V2_LINEARS)):
        body = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if body and all(f"{i}.weight" in body for i in linears):
            if version == "v2" and f"{_V25_LINEARS[-1]}.weight" in body:
                version, linears = "v2.5", _V25_LINEARS  # v2.5 saved by its package under "layers."
            return version, {f"{n}.{p}": body[f"{i}.{p}"] for n, i in enumerate(linears) for p in ("weight", "bias")}
    raise CrdiffError(f"{path} is neither a LAION v2 (layers.*) nor a v2.5 (scoring_head.*) aesthetic head")


def mlp_head(state: dict[str, torch.Tensor]) -> nn.Sequential:
    """The head's five linear layers (dropout is the identity at inference, so it is left out)."""
    layers = [nn.Linear(state[f"{n}.weight"].shape[1], state[f"{n}.weight"].shape[0]) for n in range(5)]
    head = nn.Sequential(*layers)
    head.load_state_dict(state)
    return head.float().eval()


class AestheticScorer:
    """``head(normalize(embed(image)))``, one float per image."""

    def __init__(self, name: str, embed, head: nn.Module, image_processor, device: str = "cpu"):
        self.name = name
        self.embed = embed
        self.head = head.to(device)
        self.image_processor = image_processor
        self.device = device

    def score(self, images, prompts):
        check_batch(images, prompts)
        if not images:
            return []
        pixels = self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            emb = self.embed(pixels.to(self.device)).float()
            emb = emb / emb.norm(dim=-1, keepdim=True)
            return self.head(emb).squeeze(-1).cpu().tolist()


def _backbone_source(head_path: Path, version: str) -> str:
    beside = head_path.parent / BACKBONES[version].split("/")[1]
    return str(beside) if beside.is_dir() else BACKBONES[version]


def _siglip_processor_class():
    """The PIL-backed SigLIP image processor (same pixels with or without torchvision, as for CLIP)."""
    try:
        from transformers import SiglipImageProcessorPil
        return SiglipImageProcessorPil
    except ImportError:
        from transformers import SiglipImageProcessor
        return SiglipImageProcessor


def _load_backbone(version: str, source: str, device: str):
    """``(embed(pixels) -> image embedding, image processor)`` from a local folder or the cache."""
    from crdiff_cli.scorers.clip import _image_processor_class

    try:
        if version == "v2":
            from transformers import CLIPModel
            model = CLIPModel.from_pretrained(source, local_files_only=True).float().to(device).eval()
            processor = _image_processor_class().from_pretrained(source, local_files_only=True)
            return (lambda px: model.visual_projection(model.vision_model(pixel_values=px).pooler_output)), processor
        from transformers import SiglipVisionModel
        model = SiglipVisionModel.from_pretrained(source, local_files_only=True).float().to(device).eval()
        processor = _siglip_processor_class().from_pretrained(source, local_files_only=True)
        return (lambda px: model(pixel_values=px).pooler_output), processor
    except (OSError, ValueError) as exc:
        raise CrdiffError(f"aesthetic {version} needs its image backbone {source!r} locally ({type(exc).__name__}); "
                          f"save it with save_pretrained beside the head or put {BACKBONES[version]} in the Hugging "
                          "Face cache (nothing is downloaded)") from None


def load(arg: str | None, device: str) -> AestheticScorer:
    """Factory of ``aesthetic:HEAD``."""
    if not arg:
        raise CrdiffError("metric 'aesthetic' needs its head: aesthetic:PATH (LAION v2 or v2.5 .pth)")
    path = Path(arg).expanduser()
    if not path.is_file():
        raise CrdiffError(f"aesthetic head {arg} does not exist; pass the predictor's .pth file")
    version, state = read_head(path)
    source = _backbone_source(path, version)
    embed, processor = _load_backbone(version, source, device)
    return AestheticScorer(f"aesthetic-{version}:{path.resolve()}", embed, mlp_head(state), processor, device)
