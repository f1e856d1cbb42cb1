"""CLIP-family scorers: ``clip:MODEL``, ``pickscore:MODEL`` and the embedded ``tiny``.

All three are ``scale * cosine(image embedding, text embedding)`` with a transformers ``CLIPModel``;
they differ only in weights and scale:

* ``clip``: scale 100, the usual CLIP score. Unlike torchmetrics' ``CLIPScore`` we do not clamp
  negative cosines to 0: the search compares scores, and a clamp only discards ordering. For a real
  CLIP model and a matching prompt the cosine is positive, so the values agree.
* ``pickscore``: scale ``logit_scale.exp()`` of the model, as in PickScore's reference code (a CLIP-H
  fine-tuned on Pick-a-Pic; its ``logit_scale.exp()`` is about 100 too).
* ``tiny``: the ``clip`` code on a seeded random tiny CLIP built in memory, so the search runs end to
  end offline on the project's tiny diffusion models. Its scores are meaningless but deterministic.

MODEL is a folder saved with ``save_pretrained`` (model, tokenizer and image processor) or a hub id
already in the local Hugging Face cache: nothing is downloaded. PickScore's authors load the processor
from ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, so ``pickscore`` falls back to that (cached) when
MODEL has no tokenizer or image processor files.

Images are preprocessed by the model's own image processor settings, always with the PIL backend:
transformers 5's default CLIP processor backend needs torchvision (and falls back to PIL with a
warning without it); pinning PIL gives the same pixels on every machine, with or without torchvision.
Text is padded to the model's full context so a batch scores exactly like its images one by one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, CLIPConfig, CLIPModel, CLIPVisionConfig

from crdiff_cli.errors import CrdiffError
from crdiff_cli.pipelines.tiny import clip_text_config, clip_tokenizer
from crdiff_cli.scorers import check_batch

PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIP_SCALE = 100.0
_TINY_SEED = 20260406
_TINY_WIDTH = 32


class ClipScorer:
    """``scale * cos(image, text)`` with a ``CLIPModel``; ``scale=None`` uses the model's logit scale."""

    def __init__(self, name, model, tokenizer, image_processor, *, device="cpu", scale=None):
        self.name = name
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.device = device
        self.scale = model.logit_scale.detach().exp().item() if scale is None else float(scale)
        self.max_length = model.config.text_config.max_position_embeddings

    def score(self, images, prompts):
        check_batch(images, prompts)
        if not images:
            return []
        pixels = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        text = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                              return_tensors="pt")
        m = self.model
        with torch.no_grad():
            image_emb = m.visual_projection(m.vision_model(pixel_values=pixels.to(self.device)).pooler_output)
            text_emb = m.text_projection(m.text_model(input_ids=text["input_ids"].to(self.device),
                                                      attention_mask=text["attention_mask"].to(self.device)
                                                      ).pooler_output)
            cos = torch.nn.functional.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1)
        return (self.scale * cos).cpu().tolist()


def _image_processor_class():
    """The PIL-backed CLIP image processor (its transformers 5 name; in 4.x the default one is PIL)."""
    try:
        from transformers import CLIPImageProcessorPil
        return CLIPImageProcessorPil
    except ImportError:
        from transformers import CLIPImageProcessor
        return CLIPImageProcessor


def _load_pretrained(kind: str, model_id: str, processor_fallback: str | None = None):
    """``(model, tokenizer, image_processor)`` from a local folder or the local hub cache, offline."""
    try:
        model = CLIPModel.from_pretrained(model_id, local_files_only=True).float()  # scores in fp32, whatever the file
    except (OSError, ValueError) as e:
        raise CrdiffError(f"{kind} model {model_id!r} not found locally ({type(e).__name__}); pass a folder saved "
                          f"with save_pretrained or a hub id already in the Hugging Face cache (nothing is "
                          f"downloaded)") from e
    sources = [model_id] + ([processor_fallback] if processor_fallback else [])
    for source in sources:
        try:
            return (model, AutoTokenizer.from_pretrained(source, local_files_only=True),
                    _image_processor_class().from_pretrained(source, local_files_only=True))
        except (OSError, ValueError):
            continue
    raise CrdiffError(f"{kind} needs a tokenizer and an image processor (tokenizer files and preprocessor_config.json)"
                      f" in {' or '.join(repr(s) for s in sources)}; none found locally")


def _model_id(arg: str) -> str:
    """A local folder as an absolute path (for loading and for records), else the hub id as given."""
    path = Path(arg).expanduser()
    return str(path.resolve()) if path.is_dir() else arg


def load_clip(arg: str | None, device: str) -> ClipScorer:
    """Factory of ``clip:MODEL``."""
    if not arg:
        raise CrdiffError("scorer 'clip' needs a model: clip:MODEL (a CLIP folder or a cached hub id)")
    model_id = _model_id(arg)
    return ClipScorer(f"clip:{model_id}", *_load_pretrained("clip", model_id), device=device, scale=CLIP_SCALE)


def load_pickscore(arg: str | None, device: str) -> ClipScorer:
    """Factory of ``pickscore:MODEL``."""
    if not arg:
        raise CrdiffError("scorer 'pickscore' needs a model: pickscore:MODEL (e.g. a PickScore_v1 folder)")
    model_id = _model_id(arg)
    return ClipScorer(f"pickscore:{model_id}", *_load_pretrained("pickscore", model_id, PICKSCORE_PROCESSOR),
                      device=device)


def tiny_clip():
    """``(model, tokenizer, image_processor)`` of the ``tiny`` scorer, built in memory deterministically.

    The weights come from a fixed seed inside ``fork_rng``, so the caller's global RNG is untouched.
    The text side is :func:`crdiff_cli.pipelines.tiny.clip_tokenizer` (a byte-level vocabulary, no files).
    """
    vision = CLIPVisionConfig(hidden_size=_TINY_WIDTH, intermediate_size=2 * _TINY_WIDTH, num_hidden_layers=2,
                              num_attention_heads=4, image_size=32, patch_size=8, projection_dim=_TINY_WIDTH)
    config = CLIPConfig(text_config=clip_text_config().to_dict(), vision_config=vision.to_dict(),
                        projection_dim=_TINY_WIDTH)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TINY_SEED)
        model = CLIPModel(config)
    processor = _image_processor_class()(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model.eval(), clip_tokenizer(), processor


def load_tiny(arg: str | None, device: str) -> ClipScorer:
    """Factory of ``tiny``."""
    if arg:
        raise CrdiffError(f"scorer 'tiny' takes no argument (got {arg!r}): use the spec 'tiny'")
    return ClipScorer("tiny", *tiny_clip(), device=device, scale=CLIP_SCALE)
