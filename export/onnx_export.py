"""One servable part (an nn.Module) -> one checked ONNX graph with a dynamic batch axis and fixed I/O names."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import onnx
import torch
from torch import nn

from genserve.export.manifest import BATCH_DIM, PART_NAMES, TensorSpec

OPSET = 18
EXAMPLE_BATCH = 2  # torch.export specialises sizes 0 and 1, so trace with 2 to keep the batch axis dynamic
IMAGE_RANGE = (0.0, 1.0)
_MAX_PROTO_BYTES = 2**31 - 1  # protobuf's limit for a single-file graph
_NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._dynamo", "torch._export", "torch.fx", "onnxscript")


class ExportError(RuntimeError):
    """A part could not be turned into a valid ONNX graph; the message says which and why."""


@dataclass(frozen=True)
class PartSignature:
    """A part's graph inputs and outputs (batch axis symbolic)."""

    part: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input(self) -> TensorSpec:
        return self.inputs[0]


def _image_spec(name: str, image_shape: tuple[int, int, int]) -> TensorSpec:
    return TensorSpec(name, "float32", (BATCH_DIM, *image_shape), IMAGE_RANGE)


def _vector_spec(name: str, dim: int) -> TensorSpec:
    return TensorSpec(name, "float32", (BATCH_DIM, dim))


def input_spec(part: str, image_shape: tuple[int, int, int], latent_dim: int) -> TensorSpec:
    """The one input of each part kind. The denoiser's input is not called "images" because ONNX
    value names are unique per graph and every image-producing graph outputs "images"."""
    if part == "encoder":
        return _image_spec("images", image_shape)
    if part == "denoiser":
        return _image_spec("noisy_images", image_shape)
    if part == "decoder":
        return _vector_spec("latents", latent_dim)
    if part == "generator":
        return _vector_spec("noise", latent_dim)
    raise ExportError(f"unknown servable part {part!r}; servable_parts() keys must be among {', '.join(PART_NAMES)}")


def example_input(spec: TensorSpec, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform [0, 1] images or standard normal latents, float32, (batch, ...)."""
    shape = (batch, *spec.shape[1:])
    if spec.value_range == IMAGE_RANGE:
        return torch.rand(shape, generator=generator)
    return torch.randn(shape, generator=generator)


def as_tuple(outputs: torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return tuple(outputs) if isinstance(outputs, tuple | list) else (outputs,)


def describe_part(part: str, module: nn.Module, image_shape: tuple[int, int, int], latent_dim: int) -> PartSignature:
    """Run the part once on an example batch and name and check its outputs."""
    spec = input_spec(part, image_shape, latent_dim)
    example = example_input(spec, EXAMPLE_BATCH, torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            outputs = as_tuple(module(example))
    except Exception as error:
        raise ExportError(
            f"part {part!r} fails on an example {spec.name} tensor of shape {tuple(example.shape)}: {error}. "
            f"servable parts must take {spec.name} shaped {list(spec.shape)}"
        ) from error
    for out in outputs:
        if not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or out.shape[0] != EXAMPLE_BATCH:
            got = f"{out.dtype} {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise ExportError(
                f"part {part!r} must return float32 tensors with the batch first, got {got}"
            )
    shapes = [tuple(o.shape[1:]) for o in outputs]
    if part == "encoder":
        names = {1: ("codes",), 2: ("mean", "logvar")}.get(len(outputs))
        if names is None or any(len(s) != 1 for s in shapes):
            raise ExportError(
                f"encoder must return codes (B, D) or (mean, logvar) each (B, D), got shapes {shapes}"
            )
        outs = tuple(_vector_spec(n, s[0]) for n, s in zip(names, shapes, strict=True))
    else:
        if len(outputs) != 1 or shapes[0] != tuple(image_shape):
            raise ExportError(
                f"{part} must return one image batch (B, {', '.join(map(str, image_shape))}), got shapes {shapes}"
            )
        outs = (_image_spec("images", image_shape),)
    return PartSignature(part, (spec,), outs)


class _Graph(nn.Module):
    """What gets exported: the part with tuple outputs, optionally float16 inside with float32 I/O."""

    def __init__(self, part: nn.Module, fp16: bool):
        super().__init__()
        self.part = copy.deepcopy(part).half().eval() if fp16 else part
        self.fp16 = fp16

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.fp16:
            x = x.to(torch.float16)
        # float32 outputs either way, so clients need not care which variant the server runs.
        return tuple(o.to(torch.float32) for o in as_tuple(self.part(x)))


@contextlib.contextmanager
def quiet_exporter() -> Iterator[io.StringIO]:
    """Silence the exporter's warnings, log lines and prints; yields what was captured."""
    captured = io.StringIO()
    handler = logging.StreamHandler(captured)
    saved = []
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate))
        logger.setLevel(logging.ERROR)
        logger.addHandler(handler)
        logger.propagate = False
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            warnings.simplefilter("ignore")
            yield captured
    finally:
        for logger, level, propagate in saved:
            logger.setLevel(level)
            logger.removeHandler(handler)
            logger.propagate = propagate


def export_part(module: nn.Module, signature: PartSignature, *, fp16: bool = False, opset: int = OPSET) -> onnx.ModelProto:
    """Export with the dynamo exporter, fix the I/O names and the batch axis, and run the full checker."""
    variant = "fp16" if fp16 else "fp32"
    what = f"part {signature.part!r} ({variant})"
    graph = _Graph(module, fp16).eval()
    example = example_input(signature.input, EXAMPLE_BATCH, torch.Generator().manual_seed(0))
    with quiet_exporter() as log:
        try:
            program = torch.onnx.export(
                graph,
                (example,),
                dynamo=True,
                opset_version=opset,
                input_names=[t.name for t in signature.inputs],
                output_names=[t.name for t in signature.outputs],
                dynamic_shapes=({0: torch.export.Dim(BATCH_DIM, min=1)},),
                optimize=True,
                verbose=False,
            )
        except Exception as error:
            tail = "\n".join(log.getvalue().strip().splitlines()[-20:])
            raise ExportError(
                f"torch.onnx (dynamo) could not export {what}: {type(error).__name__}: {error}"
                + (f"\nexporter log (last lines):\n{tail}" if tail else "")
                + "\nParts must be traceable by torch.export: no data-dependent Python control flow, "
                "and batch-size-independent reshapes (x.view(x.shape[0], -1), nn.Flatten)."
            ) from error
    proto = program.model_proto
    _check_io(proto, signature, what)
    if proto.ByteSize() > _MAX_PROTO_BYTES:
        raise ExportError(f"{what} is over 2 GB; graphs with external weight files are not supported yet")
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise ExportError(f"the ONNX graph of {what} fails onnx.checker (full check): {error}") from error
    return proto


def _check_io(proto: onnx.ModelProto, signature: PartSignature, what: str) -> None:
    """Names, float32 element type and a symbolic batch axis named "batch" on every input and output."""
    for kind, values, specs in (
        ("input", proto.graph.input, signature.inputs),
        ("output", proto.graph.output, signature.outputs),
    ):
        names = [v.name for v in values]
        if names != [s.name for s in specs]:
            raise ExportError(f"{what}: graph {kind}s are {names}, expected {[s.name for s in specs]}")
        for value, spec in zip(values, specs, strict=True):
            tensor = value.type.tensor_type
            if tensor.elem_type != onnx.TensorProto.FLOAT:
                raise ExportError(f"{what}: {kind} {value.name!r} is not float32")
            dims = tensor.shape.dim
            fixed = [d.dim_value for d in dims[1:]]
            if len(dims) != len(spec.shape) or fixed != list(spec.shape[1:]):
                raise ExportError(f"{what}: {kind} {value.name!r} has shape {onnx.helper.printable_type(value.type)}")
            if not dims[0].dim_param:
                raise ExportError(
                    f"{what}: the batch axis of {kind} {value.name!r} is fixed to {dims[0].dim_value}; "
                    "the part must not hard-code the batch size (use x.view(x.shape[0], ...), nn.Flatten or nn.Unflatten)"
                )
            dims[0].dim_param = BATCH_DIM  # one name for the batch axis in every graph


def with_metadata(proto: onnx.ModelProto, metadata: dict[str, str]) -> bytes:
    """The serialised graph with `metadata` as its metadata_props (replacing earlier genserve keys)."""
    tagged = onnx.ModelProto()
    tagged.CopyFrom(proto)
    kept = [(p.key, p.value) for p in tagged.metadata_props if p.key not in metadata]
    del tagged.metadata_props[:]
    for key, value in [*kept, *sorted(metadata.items())]:
        entry = tagged.metadata_props.add()
        entry.key, entry.value = key, value
    return tagged.SerializeToString()
