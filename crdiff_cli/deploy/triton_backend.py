"""The Triton Python-backend model of a crdiff repository (:mod:`.triton`): a thin adapter over the runner.

It builds :class:`~crdiff_cli.deploy.runner.OnnxCrdiffPipeline` on the repository's pipeline folder with each
ONNX model called through Triton (an ``InferenceRequest`` per call, business logic scripting), and answers each
request with one image. It runs only inside Triton's Python backend, which provides
``triton_python_backend_utils``; the repository layout and the runner on it are tested without Triton.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from crdiff_cli import defaults


class TritonPythonModel:
    """Triton's Python model interface: ``initialize``, ``execute``, ``finalize``."""

    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb_utils

        from crdiff_cli.deploy.folder import RECORD
        from crdiff_cli.deploy.runner import OnnxCrdiffPipeline
        from crdiff_cli.deploy.triton import MARKER, locate_in, model_name, pipeline_dir

        self.pb = pb_utils
        name = json.loads(args["model_config"])["name"]
        repository = Path(args["model_repository"]).parent
        outputs = json.loads((repository / MARKER).read_text(encoding="utf-8"))["outputs"]
        dtypes = json.loads((pipeline_dir(repository, name) / RECORD).read_text(encoding="utf-8"))["components"]
        self.pipe = OnnxCrdiffPipeline.from_folder(
            pipeline_dir(repository, name), locate=locate_in(repository, name),
            models=lambda component, path: self._remote(model_name(name, component), outputs[model_name(
                name, component)], np.float16 if dtypes[component]["dtype"] == "float16" else np.float32))

    def _remote(self, model: str, outputs: list[str], dtype):
        """A callable that runs ``model`` in Triton: named numpy inputs in (floats cast to the graph's ``dtype``),
        float32 outputs by name."""
        pb = self.pb

        def call(**feeds: np.ndarray) -> dict[str, np.ndarray]:
            feeds = {n: a.astype(dtype) if a.dtype == np.float32 else a for n, a in feeds.items()}
            request = pb.InferenceRequest(model_name=model, inputs=[pb.Tensor(n, a) for n, a in feeds.items()],
                                          requested_output_names=outputs)
            response = request.exec()
            if response.has_error():
                raise pb.TritonModelException(response.error().message())
            return {n: np.asarray(pb.get_output_tensor_by_name(response, n).as_numpy(), dtype=np.float32)
                    for n in outputs}

        return call

    def execute(self, requests: list) -> list:
        pb = self.pb
        responses = []
        for request in requests:
            def value(name: str, default):
                tensor = pb.get_input_tensor_by_name(request, name)
                if tensor is None:
                    return default
                item = tensor.as_numpy().reshape(-1)[0]
                return item.decode("utf-8") if isinstance(item, bytes) else item.item()

            try:
                image = self.pipe(value("prompt", ""), seeds=int(value("seed", 0)),
                                  negative_prompt=value("negative_prompt", None) or None,
                                  steps=int(value("steps", 0)) or defaults.STEPS,
                                  guidance=float(value("guidance", 0.0)) or defaults.GUIDANCE,
                                  height=int(value("height", 0)) or None, width=int(value("width", 0)) or None,
                                  scheduler=value("scheduler", None) or None)[0]
                output = pb.Tensor("image", np.asarray(image, dtype=np.uint8))
                responses.append(pb.InferenceResponse(output_tensors=[output]))
            except Exception as exc:  # one bad request must not take the model down: report it in its response
                responses.append(pb.InferenceResponse(output_tensors=[], error=pb.TritonError(str(exc))))
        return responses

    def finalize(self) -> None:
        self.pipe = None
