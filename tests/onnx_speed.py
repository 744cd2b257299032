"""Speed only, for tests that export many graphs in one process."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def fast_onnx_exports() -> Iterator[None]:
    """Share torch.onnx's op registry between exports: it is rebuilt from onnxscript sources (~1.3 s of
    CPU) on every export otherwise. Results are unchanged; subprocess tests run the public path unpatched."""
    try:
        from torch.onnx._internal.exporter import _registration

        original = _registration.ONNXRegistry.__dict__["from_torchlib"]
    except (ImportError, AttributeError, KeyError):  # another torch: just run slower
        yield
        return
    cache: dict[object, object] = {}

    def from_torchlib(cls, *args, **kwargs):
        key = (cls, args, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = original.__func__(cls, *args, **kwargs)
        return cache[key]

    _registration.ONNXRegistry.from_torchlib = classmethod(from_torchlib)
    try:
        yield
    finally:
        _registration.ONNXRegistry.from_torchlib = original
