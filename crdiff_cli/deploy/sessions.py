"""ONNX Runtime sessions for a pipeline folder's components, fed and read as numpy.

A :class:`Component` casts each input to the dtype its graph declares (an fp16 UNet takes fp16 latents) and
returns float32, so the runner's arithmetic is the same whatever the folder's dtype. On a GPU provider the
UNet is run through IO binding: the prompt embeddings (the largest input, the same at every step) are copied
to the device once per request (:meth:`Component.keep`), and each step moves only the latents, which the
numpy scheduler needs on the host anyway. On the CPU provider the bound and plain paths give identical
outputs. A component holds no per-request state: what :meth:`Component.keep` returns travels with the request,
so one instance serves concurrent requests (ONNX Runtime sessions are thread-safe).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from crdiff_cli.errors import CrdiffError, first_line

PROVIDERS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
_DEVICES = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda"}
_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
          "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def providers_for(provider: str | None) -> list[str]:
    """ONNX Runtime providers in order of preference: ``provider`` if forced (with what it falls back to), else
    TensorRT, CUDA, CPU, whichever this ONNX Runtime has."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if provider is None:
        return [p for p in PROVIDERS.values() if p in available]
    if provider not in PROVIDERS:
        raise CrdiffError(f"unknown --provider {provider!r}; use one of {', '.join(PROVIDERS)}")
    if PROVIDERS[provider] not in available:
        raise CrdiffError(f"ONNX Runtime provider {PROVIDERS[provider]} is not available here (available: "
                          f"{', '.join(available)}); install onnxruntime-gpu for cuda/tensorrt")
    fallbacks = list(PROVIDERS.values())[list(PROVIDERS).index(provider) + 1:]
    return [PROVIDERS[provider]] + [p for p in fallbacks if p in available]


def with_settings(providers: list[str], model: Path) -> list:
    """``providers`` as ``InferenceSession`` takes them for ``model``: TensorRT with an engine cache of its own in
    crdiff's cache folder, so an engine is built once per model and shape, not in every process.

    The folder is keyed by the model's bytes (the ``.onnx`` and its external data, SHA-256 cached by size and
    modification time): ONNX Runtime names a cached engine by the file name and graph structure, not the weights,
    so two folders' ``unet/model.onnx`` (other ratios, k or fine-tune) would otherwise share one engine.
    """
    if PROVIDERS["tensorrt"] not in providers:
        return providers
    import hashlib

    from crdiff_cli.storage.cache import cache_dir
    from crdiff_cli.storage.digest_cache import file_sha256

    model = Path(model)
    parts = sorted(model.parent.glob(model.name + "*"))  # NAME.onnx with NAME.onnx.data or model.onnx_data
    key = hashlib.sha256("".join(file_sha256(p) for p in parts).encode()).hexdigest()[:32]
    engines = cache_dir() / "tensorrt-engines" / key
    engines.mkdir(parents=True, exist_ok=True)
    settings = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(engines),
                "trt_timing_cache_enable": True, "trt_timing_cache_path": str(engines.parent)}
    return [(p, settings) if p == PROVIDERS["tensorrt"] else p for p in providers]


def session_options(fold_masks: bool = True, threads: int | None = None):
    """SessionOptions: quiet logging; ``fold_masks=False`` keeps the UNet's masks computed per call.

    At session creation ONNX Runtime constant-folds every node whose inputs are all initializers, so each in-graph
    ``Where(|W| > t, W, 0)`` becomes a precomputed masked copy (the pruned pass as fast as the dense one, a second
    resident copy of the target weights). ``fold_masks=False`` disables that optimizer and weight prepacking (a
    prepacked MatMul keeps its own copy, and the original must stay for the masks).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: folding warnings would be printed per node
    if not fold_masks:
        options.add_session_config_entry("optimization.disable_specified_optimizers", "ConstantFolding")
        options.add_session_config_entry("session.disable_prepacking", "1")
    if threads:
        options.intra_op_num_threads = threads
    return options


class Component:
    """One ONNX model of the folder: ``component(name=array, ...)`` -> its outputs by name, float32."""

    def __init__(self, path: Path, providers: list[str], threads: int | None = None, bind: bool | None = None,
                 dtype: str = "float32"):
        import onnxruntime as ort

        try:
            self.session = ort.InferenceSession(str(path), session_options(threads=threads),
                                                providers=with_settings(providers, path))
        except Exception as exc:  # ORT raises its own Fail / InvalidGraph / NoSuchFile / NotImplemented types
            hint = "; this fp16 model needs a provider with fp16 kernels for its ops (cuda, tensorrt)" if (
                dtype == "float16") else ""
            raise CrdiffError(f"ONNX Runtime cannot load {path} on {providers[0]} ({first_line(exc)}){hint}") from None
        self.path = Path(path)
        self.inputs = {i.name: _NUMPY[i.type] for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.device = _DEVICES.get(self.session.get_providers()[0], "cpu")
        self.bind = self.device != "cpu" if bind is None else bind

    def keep(self, **arrays: np.ndarray) -> dict:
        """Inputs that stay the same for a request's calls, ready to pass as ``kept=``: on the bound path copied
        to the device once, else cast once."""
        import onnxruntime as ort

        cast = cast_inputs(self.inputs, arrays)
        if self.bind:
            return {name: ort.OrtValue.ortvalue_from_numpy(a, self.device, 0) for name, a in cast.items()}
        return cast

    def __call__(self, kept: dict | None = None, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        kept = kept or {}
        given = set(kept) | set(feeds)
        if given != set(self.inputs):
            raise CrdiffError(f"{self.path} takes {', '.join(self.inputs)}, not {', '.join(sorted(given))}; the "
                              "folder's graphs do not match this crdiff: re-bake it")
        if self.bind:
            return self._run_bound(kept, feeds)
        results = self.session.run(None, {**kept, **cast_inputs(self.inputs, feeds)})
        return {name: np.asarray(r, dtype=np.float32) for name, r in zip(self.outputs, results)}

    def _run_bound(self, kept: dict, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        binding = self.session.io_binding()
        for name, value in kept.items():
            binding.bind_ortvalue_input(name, value)
        for name, array in cast_inputs(self.inputs, feeds).items():
            binding.bind_cpu_input(name, array)
        for name in self.outputs:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        return {name: np.asarray(r, dtype=np.float32) for name, r in zip(self.outputs, binding.copy_outputs_to_cpu())}


def cast_inputs(input_types: dict, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``feeds`` in the dtypes a graph declares (``input_types``: name -> numpy dtype or its name), contiguous, a
    0-d timestep kept 0-d (``np.ascontiguousarray`` would make it 1-d)."""
    return {name: np.require(array, dtype=input_types[name], requirements="C") for name, array in feeds.items()}
