"""CLIP tokenization for the torch-free runner: the folder's ``tokenizer.json`` with the ``tokenizers`` library.

transformers' ``CLIPTokenizer`` is that same fast tokenizer plus call-time settings, which are reproduced here
from ``tokenizer_config.json``: every prompt is truncated to ``model_max_length`` (77) with its start and end
tokens kept, and padded to that length with the pad token (``<|endoftext|>`` for SD1.x/XL, ``!`` for SD2.x), as
Stable Diffusion pipelines call it (``padding="max_length", truncation=True``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from crdiff_cli.deploy.folder import PipelineFolderError, read_json


class ClipTokenizer:
    """``tokenizer(prompts)`` -> int64 ids of shape ``[len(prompts), model_max_length]``."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer

        folder = Path(folder)
        config = read_json(folder / "tokenizer_config.json")
        try:
            self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:  # tokenizers raises a plain Exception for a missing or damaged file
            raise PipelineFolderError(f"{folder / 'tokenizer.json'} cannot be read ({exc}); re-bake the "
                                      "folder") from None
        self.max_length = int(config.get("model_max_length", 77))
        pad = _token_text(config.get("pad_token", "<|endoftext|>"))
        pad_id = self.tokenizer.token_to_id(pad)
        if pad_id is None:
            raise PipelineFolderError(f"the pad token {pad!r} of {folder} is not in its vocabulary; re-bake the folder")
        self.tokenizer.enable_truncation(max_length=self.max_length)
        self.tokenizer.enable_padding(length=self.max_length, pad_id=pad_id, pad_token=pad)

    def __call__(self, prompts: list[str]) -> np.ndarray:
        return np.array([e.ids for e in self.tokenizer.encode_batch(list(prompts))], dtype=np.int64)


def _token_text(token) -> str:
    """A special token as tokenizer_config.json stores it: a string, or an AddedToken-like dict."""
    return token["content"] if isinstance(token, dict) else str(token)
