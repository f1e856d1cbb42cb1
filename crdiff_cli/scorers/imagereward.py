"""The ImageReward scorer (``imagereward[:CHECKPOINT]``), the reward model CR-Diff's search uses.

ImageReward (Xu et al. 2023, PyPI ``image-reward`` 1.5) is BLIP's ViT-L image encoder feeding, by
cross-attention, a BERT-base text encoder over the prompt; an MLP on the [CLS] feature gives the
reward, standardised with the training set's mean and std.

Route taken: the network is assembled from the package's own BLIP module classes (``create_vit`` /
``VisionTransformer`` and the cross-attention ``BertModel``), imported by :mod:`._imagereward_blip`,
which explains why ``import ImageReward`` itself cannot be used here (its ``__init__`` needs OpenAI
``clip``, torchvision and the ReFL training stack, and its BLIP modules predate transformers 5).
Only the thin ``ImageReward.ImageReward`` wrapper is rebuilt here, because its module imports
torchvision at the top: :class:`ImageRewardModel` has the same submodules under the same names
(``blip.visual_encoder``, ``blip.text_encoder``, ``blip.vision_proj``, ``blip.text_proj``,
``mlp.layers``), so the official ``ImageReward.pt`` state dict loads with every key matched; the
MLP width follows ``med_config.json``'s ``hidden_size`` (768 in the official file). Its scoring is
``ImageReward.score`` batched: prompts padded to its 35 tokens, the same tokenizer set-up, the same
standardisation.

Preprocessing follows CR-Diff's reference search code: each image is resized to 256x256 (bicubic),
then goes through ImageReward's own transform (bicubic resize of the short side to 224, centre crop
224, CLIP mean/std normalisation). After the 256x256 step that transform is exactly a bicubic resize
to 224x224, which PIL does here as torchvision does on PIL images. Images are converted to RGB first
(ImageReward converts after resizing; the same for the RGB images pipelines produce).

Files, all local (nothing is downloaded): ``CHECKPOINT`` is ``ImageReward.pt`` or a folder holding
it; ``med_config.json`` must sit beside it (both from the THUDM/ImageReward model repository). The
BERT tokenizer is the folder ``bert-base-uncased/`` beside the checkpoint (its ``vocab.txt`` suffices),
else ``bert-base-uncased`` from the Hugging Face cache, which is where ImageReward itself gets it.
Without ``CHECKPOINT`` the folder is ImageReward's own download folder, ``~/.cache/ImageReward``. The
checkpoint is a torch pickle of a state dict, read with ``weights_only=True`` (no code runs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from crdiff_cli.errors import CrdiffError
from crdiff_cli.scorers import check_batch
from crdiff_cli.scorers._imagereward_blip import blip_modules

CHECKPOINT = "ImageReward.pt"
MED_CONFIG = "med_config.json"
TOKENIZER_DIR = "bert-base-uncased"
BERT_HUB_IDS = ("bert-base-uncased", "google-bert/bert-base-uncased")  # old and current names of the repo
DEFAULT_DIR = Path("~/.cache/ImageReward")
REFERENCE_SIZE = 256  # CR-Diff's search resizes every generation to this square before scoring
IMAGE_SIZE = 224  # ImageReward's BLIP input
MAX_PROMPT_TOKENS = 35
REWARD_MEAN, REWARD_STD = 0.16717362830052426, 1.0333394966054072  # ImageReward's standardisation
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageRewardModel(nn.Module):
    """``ImageReward.ImageReward``'s network and forward pass, with its state-dict names."""

    def __init__(self, med_config: Path):
        super().__init__()
        package = blip_modules()
        visual_encoder, vision_width = package.blip.create_vit("large", IMAGE_SIZE)
        config = package.med.BertConfig.from_json_file(str(med_config))
        config.encoder_width = vision_width
        text_encoder = package.med.BertModel(config=config, add_pooling_layer=False)
        width = config.hidden_size
        self.blip = nn.ModuleDict(dict(  # BLIP_Pretrain's parameters, without its hub-bound tokenizer
            visual_encoder=visual_encoder, text_encoder=text_encoder,
            vision_proj=nn.Linear(vision_width, 256), text_proj=nn.Linear(width, 256)))
        self.mlp = nn.ModuleDict(dict(layers=nn.Sequential(
            nn.Linear(width, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))))

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image_embeds = self.blip["visual_encoder"](pixels)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = self.blip["text_encoder"](input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                                         encoder_attention_mask=image_atts, return_dict=True)
        rewards = self.mlp["layers"](text.last_hidden_state[:, 0, :].float()).squeeze(-1)
        return (rewards - REWARD_MEAN) / REWARD_STD


def to_reference_size(image: Image.Image) -> Image.Image:
    """CR-Diff's step before ImageReward: RGB, resized to 256x256."""
    return image.convert("RGB").resize((REFERENCE_SIZE, REFERENCE_SIZE), Image.Resampling.BICUBIC)


def ir_transform(image: Image.Image) -> torch.Tensor:
    """ImageReward's ``_transform(224)`` for a square RGB image: bicubic resize, to tensor, normalise."""
    image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
    return (pixels - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


class ImageRewardScorer:
    """ImageReward rewards for (image, prompt) pairs, batched."""

    def __init__(self, name: str, model: ImageRewardModel, tokenizer, device: str = "cpu"):
        self.name = name
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device

    def score(self, images, prompts):
        check_batch(images, prompts)
        if not images:
            return []
        pixels = torch.stack([ir_transform(to_reference_size(image)) for image in images])
        text = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS,
                              return_tensors="pt")
        with torch.no_grad():
            rewards = self.model(pixels.to(self.device), text["input_ids"].to(self.device),
                                 text["attention_mask"].to(self.device))
        return rewards.cpu().tolist()


def resolve_files(arg: str | None) -> tuple[Path, Path]:
    """``(checkpoint, med_config)`` for ``imagereward[:ARG]``, or a CrdiffError naming what is missing."""
    path = Path(arg).expanduser() if arg else DEFAULT_DIR.expanduser()
    if arg and not path.exists():
        raise CrdiffError(f"ImageReward checkpoint {arg!r} does not exist; use imagereward:PATH with PATH the "
                          f"{CHECKPOINT} file or a folder holding {CHECKPOINT} and {MED_CONFIG}")
    checkpoint = path / CHECKPOINT if path.is_dir() or not arg else path
    med_config = checkpoint.parent / MED_CONFIG
    missing = [p.name for p in (checkpoint, med_config) if not p.is_file()]
    if missing:
        raise CrdiffError(f"ImageReward files missing: {' and '.join(missing)} not in {checkpoint.parent}; put "
                          f"{CHECKPOINT} and {MED_CONFIG} (THUDM/ImageReward on the Hugging Face hub) there, or "
                          f"use imagereward:PATH (nothing is downloaded)")
    return checkpoint.resolve(), med_config.resolve()


def load_tokenizer(folder: Path):
    """The bert-base-uncased tokenizer, set up as ImageReward's ``init_tokenizer`` does, offline."""
    from huggingface_hub import try_to_load_from_cache
    from transformers import BertTokenizer

    local = folder / TOKENIZER_DIR
    if (local / "vocab.txt").is_file():
        source = local
    else:
        cached = [try_to_load_from_cache(repo, "vocab.txt") for repo in BERT_HUB_IDS]
        source = next((Path(p).parent for p in cached if isinstance(p, str)), None)
    if source is None:
        raise CrdiffError(f"ImageReward needs the bert-base-uncased tokenizer: put its vocab.txt in {local}/ or "
                          f"have bert-base-uncased in the Hugging Face cache (nothing is downloaded)")
    tokenizer = BertTokenizer.from_pretrained(str(source), local_files_only=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def load_model(checkpoint: Path, med_config: Path) -> ImageRewardModel:
    """The network of ``med_config`` with the weights of ``checkpoint``, every key matched."""
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:  # any failure here means the file is not a readable plain state dict
        raise CrdiffError(f"cannot read {checkpoint} as a state dict ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); pass the official {CHECKPOINT}") from e
    if not isinstance(state, dict):
        raise CrdiffError(f"{checkpoint} holds a {type(state).__name__}, not a state dict; pass the official "
                          f"{CHECKPOINT}")
    model = ImageRewardModel(med_config)
    expected = model.state_dict().keys()
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise CrdiffError(f"{checkpoint} is not an ImageReward state dict: {len(missing)} keys missing "
                          f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}); pass the "
                          f"official {CHECKPOINT}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CrdiffError(f"{checkpoint} does not fit the network of {med_config} (tensor shapes differ); pass "
                          f"the {MED_CONFIG} that came with it") from e
    return model.eval()


def load(arg: str | None, device: str) -> ImageRewardScorer:
    """Factory of ``imagereward[:CHECKPOINT]`` (see the module docstring for the files it reads)."""
    blip_modules()  # first: a missing package is the first thing to fix
    checkpoint, med_config = resolve_files(arg)
    tokenizer = load_tokenizer(checkpoint.parent)
    return ImageRewardScorer(f"imagereward:{checkpoint}", load_model(checkpoint, med_config), tokenizer, device)
