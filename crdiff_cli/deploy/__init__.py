"""Running a baked ONNX pipeline folder without torch: ONNX Runtime, numpy, tokenizers and Pillow only.

- :mod:`.folder`: the folder's layout and ``crdiff.json``, checked (digests) before anything loads.
- :mod:`.tokenizer`: CLIP tokenization with the ``tokenizers`` library, as transformers pads and truncates.
- :mod:`.schedulers`: numpy twins of diffusers' schedulers.
- :mod:`.torch_random`: PyTorch's CPU generator in numpy, so a seed gives the latents ``crdiff generate`` uses.
- :mod:`.sessions`: ONNX Runtime sessions for the components, with IO binding for the UNet on GPU providers.
- :mod:`.poa_steps`: a baked POA policy carried out step by step over the UNet's one-pass switch.
- :mod:`.runner`: :class:`~crdiff_cli.deploy.runner.OnnxCrdiffPipeline`, load once and call per request.
- :mod:`.triton`: a Triton Inference Server model repository around the same runner.

Nothing in this package imports torch, diffusers or transformers (a test runs it where they cannot be imported).
"""

from __future__ import annotations


def __getattr__(name: str):
    if name == "OnnxCrdiffPipeline":
        from crdiff_cli.deploy.runner import OnnxCrdiffPipeline

        return OnnxCrdiffPipeline
    raise AttributeError(name)


__all__ = ["OnnxCrdiffPipeline"]
