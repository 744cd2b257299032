"""How the Open Inference Protocol names what genserve serves: every exported graph is a model
named `<model>.<part>` (e.g. mnist-vae.decoder), its versions written as decimal strings ("" for
the newest). The inference service reads names and versions through these helpers only."""

from __future__ import annotations

import re

from genserve.export.manifest import PART_NAMES
from genserve.serving.errors import InvalidArgument, NotFound
from genserve.serving.models import ModelManager, check_name
from genserve.serving.versions import Lease

_VERSION_TEXT = re.compile(r"[0-9]{1,18}")  # ASCII digits only ("²" and "١" are str.isdigit()), within int64


def split_oip_name(oip_name: str) -> tuple[str, str]:
    """`mnist-vae.decoder` -> ("mnist-vae", "decoder"); InvalidArgument/NotFound when malformed."""
    model, dot, part = oip_name.rpartition(".")
    if not dot or part not in PART_NAMES:
        raise NotFound(
            f"no model {oip_name!r}: inference models are named <model>.<part> with part one of "
            f"{', '.join(PART_NAMES)} (e.g. mnist-vae.decoder)"
        )
    return check_name(model), part


def parse_version(text: str) -> int | None:
    """An inference-protocol version string ("" = newest) -> int or None; InvalidArgument if not a number."""
    if text == "":
        return None
    if not _VERSION_TEXT.fullmatch(text) or int(text) < 1:
        shown = text if len(text) <= 40 else f"{text[:40]}... ({len(text)} characters)"
        raise InvalidArgument(
            f"version must be a positive integer of at most 18 ASCII digits (or empty for the newest), got {shown!r}"
        )
    return int(text)


def use_graph(manager: ModelManager, oip_name: str, version: str = "") -> Lease:
    """`async with use_graph(...) as graph`: lease the graph an inference-protocol model name
    (`<model>.<part>`) and version string name."""
    model, part = split_oip_name(oip_name)
    loaded = manager.resolve(model, parse_version(version))
    graph = loaded.graph(part)
    if graph is None:
        raise NotFound(f"model {model!r} version {loaded.version} has no part {part!r}; it has {sorted(loaded.graphs)}")
    return Lease(loaded, graph)
