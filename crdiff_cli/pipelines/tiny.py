"""Embedded tiny models: real diffusers pipelines built from config with seeded random weights.

``tiny`` is SD1.5-shaped (one CLIP text encoder, PNDM scheduler) and ``tiny-sdxl`` SDXL-shaped (two
text encoders, ``text_time`` added conditioning, Euler scheduler). Both have cross-attention
transformer blocks in the down, mid and up blocks, so every pruning group has targets. They need no
download (the tokenizer's vocabulary is the 256 byte-level symbols, generated here), build in about a
second, and are cached on disk as ordinary diffusers folders, so every loading path is the real one.
They are for tests and demos: their images are noise-like by construction.
"""

from __future__ import annotations

from pathlib import Path

from crdiff_cli.storage.cache import cache_dir

TINY_MODELS = {"tiny": "sd15", "tiny-sdxl": "sdxl"}
_VERSION = "v1"  # bump when the architecture or seeding below changes
_SEED = 20260405
_HIDDEN = 32  # text encoder width; the SDXL pair is 2 x 32 = 64 cross-attention channels


def tiny_model_path(name: str) -> Path:
    """The diffusers folder of tiny model ``name``, building it on first use (atomically)."""
    from crdiff_cli.storage.atomic import clean_stale, share, staging

    target = cache_dir() / "tiny" / f"{name}-{_VERSION}"
    if not (target / "model_index.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(target.parent)
        with staging(target) as tmp:
            build_tiny_pipeline(name).save_pretrained(tmp, safe_serialization=True)
            share(tmp)  # a shared cache (another account, a Docker build user) must be able to read it
            try:
                tmp.rename(target)
            except OSError:  # built concurrently by another process: keep theirs
                pass
    return target


def clip_tokenizer(max_length: int = 77):
    """A CLIP BPE tokenizer whose vocabulary is just the byte-level alphabet (no merges, no files)."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def clip_text_config(with_projection: bool = False):
    """A small CLIP text encoder config matching :func:`clip_tokenizer`'s special tokens."""
    from transformers import CLIPTextConfig

    tok = clip_tokenizer()
    return CLIPTextConfig(vocab_size=len(tok), hidden_size=_HIDDEN, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, projection_dim=_HIDDEN,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)


def build_tiny_pipeline(name: str):
    """Build tiny model ``name`` in memory, deterministically (the global RNG is left untouched)."""
    import torch
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {sorted(TINY_MODELS)}")
    sdxl = name == "tiny-sdxl"
    betas = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=2 * _HIDDEN if sdxl else _HIDDEN, attention_head_dim=(2, 4),
            norm_num_groups=16,
            **(dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                    projection_class_embeddings_input_dim=6 * 8 + _HIDDEN) if sdxl else {}))
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16, 16),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=1, norm_num_groups=8, sample_size=64)
        text_encoder = CLIPTextModel(clip_text_config())
        if not sdxl:
            return StableDiffusionPipeline(
                vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet,
                scheduler=PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False, **betas),
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(with_projection=True))
        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=clip_tokenizer(),
            tokenizer_2=clip_tokenizer(), unet=unet,
            scheduler=EulerDiscreteScheduler(timestep_spacing="leading", **betas))
