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
from crdiff_cli.deploy.sessions import cast_inputs


class TritonPythonModel:
    """Triton's Python model interface: ``initialize``, ``execute``, ``finalize``."""

    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb_utils

        from crdiff_cli.deploy.runner import OnnxCrdiffPipeline
        from crdiff_cli.deploy.triton import MARKER, locate_in, model_name, pipeline_dir

        self.pb = pb_utils  # Triton's module, only importable inside its Python backend
        name = json.loads(args["model_config"])["name"]
        repository = Path(args["model_repository"]).parent
        record = json.loads((repository / MARKER).read_text(encoding="utf-8"))

        def model(component: str, path: Path) -> TritonModel:
            remote = model_name(name, component)
            return TritonModel(pb_utils, remote, record["outputs"][remote], record["input_types"][remote])

        self.pipe = OnnxCrdiffPipeline.from_folder(pipeline_dir(repository, name), locate=locate_in(repository, name),
                                                   models=model)

    def execute(self, requests: list) -> list:
        """One image per request; an absent optional input (or 0) means crdiff generate's default."""
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
                                  negative_prompt=value("negative_prompt", None),
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


class TritonModel:
    """One ONNX model of the repository called through Triton, with :class:`~crdiff_cli.deploy.sessions.Component`'s
    interface: named numpy inputs in (cast to the types the graph declares), float32 outputs by name."""

    def __init__(self, pb, model: str, outputs: list[str], input_types: dict[str, str]):
        self.pb, self.model, self.outputs, self.input_types = pb, model, outputs, input_types

    def keep(self, **arrays: np.ndarray) -> dict:
        return arrays  # Triton copies a request's inputs itself: nothing to keep on a device from here

    def __call__(self, kept: dict | None = None, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        pb = self.pb
        feeds = cast_inputs(self.input_types, {**(kept or {}), **feeds})
        request = pb.InferenceRequest(model_name=self.model, inputs=[pb.Tensor(n, a) for n, a in feeds.items()],
                                      requested_output_names=self.outputs,
                                      preferred_memory=pb.PreferredMemory(pb.TRITONSERVER_MEMORY_CPU, 0))
        response = request.exec()
        if response.has_error():
            raise pb.TritonModelException(response.error().message())
        return {n: np.asarray(pb.get_output_tensor_by_name(response, n).as_numpy(), dtype=np.float32)
                for n in self.outputs}

