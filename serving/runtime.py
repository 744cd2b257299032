"""onnxruntime sessions: which execution providers to ask for, and which one a session really got.

onnxruntime silently falls back to the CPU when a provider cannot be used (no CUDA library, no
GPU); `load_session` checks session.get_providers() afterwards, logs the result, and refuses the
CPU when a GPU is required. Sessions are run from a thread pool by the batcher, never on the loop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from genserve.serving.logs import log_event

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
GPU_PROVIDERS = (CUDA, TENSORRT)
log = logging.getLogger("genserve.runtime")


class GpuRequiredError(RuntimeError):
    """--require-gpu is set but onnxruntime would run this graph on the CPU."""


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


def requested_providers(choice: str, available: list[str] | None = None) -> list[str]:
    """The provider list to ask onnxruntime for: auto -> CUDA if available, else CPU;
    cuda -> CUDA, CPU; tensorrt -> TensorRT, CUDA, CPU; cpu -> CPU. Unavailable ones are left out."""
    available = available_providers() if available is None else available
    wanted = {
        "auto": [CUDA, CPU],
        "cpu": [CPU],
        "cuda": [CUDA, CPU],
        "tensorrt": [TENSORRT, CUDA, CPU],
    }[choice]
    return [p for p in wanted if p in available] or [CPU]


@dataclass
class GraphSession:
    """One ONNX graph with one input, ready to run; `providers` are those onnxruntime really uses."""

    path: Path
    session: ort.InferenceSession
    input_name: str
    output_names: list[str]
    providers: list[str]
    input_shape: list[int | str | None]  # the graph's own shapes; str or None for symbolic axes
    output_shapes: list[list[int | str | None]]

    @property
    def provider(self) -> str:
        """The provider that runs the graph (the first one onnxruntime kept)."""
        return self.providers[0]

    @property
    def on_gpu(self) -> bool:
        return self.provider in GPU_PROVIDERS

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        """Blocking: run the graph on one batch; outputs in graph order."""
        return self.session.run(self.output_names, {self.input_name: batch})


def load_session(
    path: Path,
    *,
    model_bytes: bytes | None = None,
    execution_provider: str = "auto",
    intra_op_threads: int = 0,
    cpu_memory_arena: bool = True,
    require_gpu: bool = False,
    what: str = "",
) -> GraphSession:
    """Create a session for `path` (from `model_bytes` when given: the bytes already read and
    checked, `path` then only names it); raises GpuRequiredError when require_gpu and it runs on the CPU."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    # The arena keeps the largest buffers a graph has needed (in power-of-two chunks): faster
    # executions, but a big conv model warmed up at a large batch holds hundreds of MiB for good.
    options.enable_cpu_mem_arena = cpu_memory_arena
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # Idle intra-op threads sleep instead of spinning: the batcher leaves gaps between executions.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    requested = requested_providers(execution_provider)
    model = str(path) if model_bytes is None else model_bytes
    session = ort.InferenceSession(model, sess_options=options, providers=requested)
    providers = list(session.get_providers())
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1:
        raise ValueError(f"{path} has {len(inputs)} inputs; genserve graphs have exactly one")
    graph = GraphSession(path, session, inputs[0].name, [o.name for o in outputs], providers,
                         list(inputs[0].shape), [list(o.shape) for o in outputs])
    fell_back = requested[0] != graph.provider
    log_event(
        log,
        "session_created",
        level=logging.WARNING if fell_back else logging.INFO,
        graph=what or str(path),
        requested=",".join(requested),
        providers=",".join(providers),
        fell_back=fell_back,
    )
    if require_gpu and not graph.on_gpu:
        raise GpuRequiredError(
            f"{what or path} would run on {graph.provider} (requested {requested}, onnxruntime has "
            f"{available_providers()}); --require-gpu refuses to serve on the CPU. Install onnxruntime-gpu "
            "with a matching CUDA, or drop --require-gpu"
        )
    return graph
