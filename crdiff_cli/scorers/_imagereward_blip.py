"""Import ImageReward's own BLIP modules (``image-reward`` 1.5) on current transformers, without its extras.

Why not ``import ImageReward``: the package ``__init__`` imports everything it ships, including
ReFL training (accelerate, datasets, diffusers' training utilities, torchvision) and the Aesthetic
score (OpenAI's ``clip``, which is not on PyPI), none of which scoring needs. The three modules that
define the reward model's network are ``models/BLIP/{med,vit,blip}.py``, and they break or drag in
heavy imports on their own:

* ``med.py`` (the BERT text encoder with cross-attention) imports ``apply_chunking_to_forward``,
  ``find_pruneable_heads_and_indices`` and ``prune_linear_layer`` from ``transformers.modeling_utils``:
  transformers moved them to ``pytorch_utils`` and 5.x dropped the second one. It calls
  ``get_head_mask`` and ``invert_attention_mask``, methods transformers 5 removed from
  ``PreTrainedModel``, and it calls ``init_weights()`` without ``post_init()``, which in transformers 5
  fails on the missing ``all_tied_weights_keys``.
* ``vit.py`` (the ViT-L image encoder) and ``blip.py`` import timm and fairscale. timm imports
  torchvision at import time, and torchvision must be binary-matched to the installed torch (PyPI's
  torchvision wheel does not even load next to a CPU-only torch build). Of those imports, the network
  uses only timm's ``PatchEmbed``, ``trunc_normal_`` and ``DropPath``; the rest serve training,
  checkpoint download or ``.npz`` loading.

So the modules are loaded from the installed package's folder under a private package name (the
package's ``__init__`` files never run), with, during that import only, ``sys.modules`` mapping timm,
fairscale and ``transformers.modeling_utils`` to small stand-ins; the previous entries are restored
afterwards, so the rest of the process never sees the stand-ins (nor the process-wide
``warnings.filterwarnings("ignore")`` that ``blip.py`` runs on import). Nothing in site-packages is edited.
The stand-ins reproduce timm's modules' parameter names and inference behaviour, so the official
``ImageReward.pt`` state dict loads unchanged. Names the scoring path never calls raise if called.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from crdiff_cli.errors import CrdiffError

PACKAGE = "crdiff_cli.scorers._imagereward_pkg"  # the private name of ImageReward/models/BLIP
INSTALL_HINT = "pip install --no-deps image-reward==1.5 (--no-deps keeps your torch; crdiff needs none of its dependencies)"


def _unavailable(*args, **kwargs):
    raise NotImplementedError("not available in crdiff's ImageReward loader (training, download or .npz loading only)")


class PatchEmbed(nn.Module):
    """timm 0.6's ``PatchEmbed`` as ImageReward's ViT uses it: conv patches, flattened to tokens."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        self.img_size, self.patch_size = (img_size, img_size), (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def _stand_ins() -> dict[str, types.ModuleType]:
    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils

    helpers = ("apply_chunking_to_forward", "find_pruneable_heads_and_indices", "prune_linear_layer")
    # The real modeling_utils, plus the helpers it no longer exports (module __getattr__, PEP 562).
    modeling = _module(modeling_utils.__name__, __getattr__=lambda name: getattr(modeling_utils, name),
                       **{h: getattr(modeling_utils, h, None) or getattr(pytorch_utils, h, _unavailable)
                          for h in helpers})
    return {
        "transformers.modeling_utils": modeling,
        "timm": _module("timm"),
        "timm.models": _module("timm.models"),
        "timm.models.hub": _module("timm.models.hub", download_cached_file=_unavailable),
        "timm.models.vision_transformer": _module("timm.models.vision_transformer", _cfg=_unavailable,
                                                  PatchEmbed=PatchEmbed),
        "timm.models.registry": _module("timm.models.registry", register_model=_unavailable),
        # Stochastic depth is the identity at inference, the only mode the scorer runs.
        "timm.models.layers": _module("timm.models.layers", trunc_normal_=nn.init.trunc_normal_, DropPath=nn.Identity),
        "timm.models.helpers": _module("timm.models.helpers", named_apply=_unavailable, adapt_input_conv=_unavailable),
        "fairscale": _module("fairscale"),
        "fairscale.nn": _module("fairscale.nn"),
        "fairscale.nn.checkpoint": _module("fairscale.nn.checkpoint"),
        "fairscale.nn.checkpoint.checkpoint_activations": _module(
            "fairscale.nn.checkpoint.checkpoint_activations", checkpoint_wrapper=_unavailable),
    }


def _invert_attention_mask(self, encoder_attention_mask):
    """transformers 4.x ``ModuleUtilsMixin.invert_attention_mask``: 1/0 mask -> additive 0/-inf bias."""
    mask = encoder_attention_mask
    mask = mask[:, None, :, :] if mask.dim() == 3 else mask[:, None, None, :]
    mask = mask.to(dtype=self.dtype)
    return (1.0 - mask) * torch.finfo(self.dtype).min


def _get_head_mask(self, head_mask, num_hidden_layers):
    """transformers 4.x ``get_head_mask`` for the only case used here: no head mask."""
    if head_mask is not None:
        raise NotImplementedError("head masks are not supported by crdiff's ImageReward loader")
    return [None] * num_hidden_layers


def blip_modules() -> types.ModuleType:
    """The private package holding ImageReward's ``med``, ``vit`` and ``blip`` modules, imported once."""
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    spec = importlib.util.find_spec("ImageReward")
    if spec is None or not spec.submodule_search_locations:
        raise CrdiffError(f"the ImageReward scorer needs the image-reward package: {INSTALL_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "models" / "BLIP"
    if not all((folder / f"{name}.py").is_file() for name in ("med", "vit", "blip")):
        raise CrdiffError(f"the installed image-reward package has no models/BLIP/{{med,vit,blip}}.py in {folder}; "
                          f"reinstall it: pip install --force-reinstall --no-deps image-reward==1.5")
    stand_ins = _stand_ins()
    saved = {name: sys.modules.get(name) for name in stand_ins}
    package = _module(PACKAGE, __path__=[str(folder)], __package__=PACKAGE)
    sys.modules.update(stand_ins)
    sys.modules[PACKAGE] = package
    try:
        with warnings.catch_warnings():  # blip.py runs warnings.filterwarnings("ignore") on import
            for name in ("med", "vit", "blip"):
                setattr(package, name, importlib.import_module(f"{PACKAGE}.{name}"))
    except BaseException:
        for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
            del sys.modules[name]
        raise
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    bert = package.med.BertPreTrainedModel
    for name, method in (("invert_attention_mask", _invert_attention_mask), ("get_head_mask", _get_head_mask)):
        if not hasattr(bert, name):
            setattr(bert, name, method)
    bert.all_tied_weights_keys = {}  # set by post_init() in transformers 5; a bare BERT encoder ties nothing
    return package
