"""Baked dual-UNet artifacts (installed as ``crdiff_cli.exporters``; see docs/artifacts.md).

One concept per module, data flowing one way:

- :mod:`.metadata`: the self-description every artifact carries (spec, k, config, weights hash).
- :mod:`.safetensors_artifact`: dense weights + metadata; loads back into the live PyTorch path.
- :mod:`.onnx_graph`: the torch module traced into the dual graph, and the graph's inputs.
- :mod:`.onnx_artifact`: the ONNX export (external data, metadata, weights digest) and its checks.
- :mod:`.onnx_policy`: the policy graph (input ``poa_pass``: both passes, dense or pruned), from three traces.
- :mod:`.onnx_runtime`: ONNX Runtime sessions (providers, mask folding) and the pipeline adapter.
- :mod:`.validate`: comparing an artifact with the live dual UNet (Optimum-style named errors).
- :mod:`.bake`: export, then validate, then rename into place.
- :mod:`.artifacts`: artifacts by path: format, metadata, attaching one to a pipeline.
- :mod:`.onnx_components`: the text encoders and the VAE as ONNX graphs (ONNX Runtime / Optimum names).
- :mod:`.onnx_pipeline`: a whole pipeline folder (:mod:`crdiff_cli.deploy` runs it without torch), verified.
- :mod:`.tensorrt`: the TensorRT demo's UNet conventions and the engine-building recipe.
"""
