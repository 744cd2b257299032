"""Quality labels: what a version's samples measured, with the protocol that measured them.

The manifest's `quality` section (docs/model-repository.md, "Quality labels") holds a list of labels,
each one metric measured on the version's own ONNX graphs through onnxruntime, plus the sample-health
references the server normalises by. Two labels are comparable (the publishing gate compares them)
only when their metric and their `protocol` are equal: the protocol is a hash of everything that
decides the number other than the graph (sample count, seed, reference split, feature extractor).
No torch and no onnx imports: the server reads this.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

BETTER = ("lower", "higher")
PROTOCOL_HEX = 16  # characters of the sha256 kept as the protocol id


class LabelError(ValueError):
    """A quality section or label does not follow the format."""


def protocol_id(metric: str, settings: dict[str, Any]) -> str:
    """The id of a measurement protocol: a sha256 of the metric and its settings as canonical JSON."""
    text = json.dumps({"metric": metric, **settings}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:PROTOCOL_HEX]


@dataclass(frozen=True)
class GraphRef:
    """A graph a label was measured on: the part, its file in the version and the file's sha256."""

    part: str
    file: str
    sha256: str

    def to_dict(self) -> dict[str, str]:
        return {"part": self.part, "file": self.file, "sha256": self.sha256}


@dataclass(frozen=True)
class QualityLabel:
    """One measured metric of one version.

    `settings` is the protocol in plain data (samples, seed, reference split, feature extractor and
    its hash, ...); `protocol` is protocol_id(metric, settings). `details` holds extras that are not
    the value (e.g. per-class shares); nothing compares them."""

    metric: str
    value: float
    better: str  # "lower" or "higher"
    unit: str
    samples: int
    reference: dict[str, Any]  # {"dataset", "split", "images"}: what the samples are compared with
    feature_extractor: dict[str, Any] | None  # {"name", "version", "sha256"}; None where none is used
    graphs: tuple[GraphRef, ...]
    settings: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def protocol(self) -> str:
        return protocol_id(self.metric, self.settings)

    def worse_by(self, earlier: QualityLabel) -> float:
        """How much worse this value is than `earlier`'s, in the metric's unit (negative: better)."""
        difference = self.value - earlier.value
        return difference if self.better == "lower" else -difference

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "value": self.value,
            "better": self.better,
            "unit": self.unit,
            "samples": self.samples,
            "reference": self.reference,
            "feature_extractor": self.feature_extractor,
            "graphs": [g.to_dict() for g in self.graphs],
            "protocol": self.protocol,
            "settings": self.settings,
            "details": self.details,
        }

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> QualityLabel:
        if not isinstance(raw, dict):
            raise LabelError(f"{where} must be an object")

        def need(key: str, kind: type | tuple[type, ...]) -> Any:
            if key not in raw:
                raise LabelError(f"{where}.{key} is missing")
            value = raw[key]
            if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
                raise LabelError(f"{where}.{key} has the wrong type ({type(value).__name__})")
            return value

        metric = need("metric", str)
        value = need("value", (int, float))
        if not math.isfinite(value):
            raise LabelError(f"{where}.value must be finite, got {value}")
        better = need("better", str)
        if better not in BETTER:
            raise LabelError(f"{where}.better must be one of {BETTER}, got {better!r}")
        samples = need("samples", int)
        if samples < 1:
            raise LabelError(f"{where}.samples must be positive, got {samples}")
        extractor = raw.get("feature_extractor")
        if extractor is not None and not isinstance(extractor, dict):
            raise LabelError(f"{where}.feature_extractor must be an object or null")
        graphs = []
        for i, g in enumerate(need("graphs", list)):
            if not (isinstance(g, dict) and all(isinstance(g.get(k), str) for k in ("part", "file", "sha256"))):
                raise LabelError(f"{where}.graphs[{i}] must be {{\"part\", \"file\", \"sha256\"}} strings")
            graphs.append(GraphRef(g["part"], g["file"], g["sha256"]))
        label = cls(
            metric=metric,
            value=float(value),
            better=better,
            unit=raw.get("unit", "") if isinstance(raw.get("unit", ""), str) else "",
            samples=samples,
            reference=need("reference", dict),
            feature_extractor=extractor,
            graphs=tuple(graphs),
            settings=need("settings", dict),
            details=raw.get("details", {}) if isinstance(raw.get("details", {}), dict) else {},
        )
        if raw.get("protocol", label.protocol) != label.protocol:
            raise LabelError(
                f"{where}.protocol is {raw.get('protocol')!r} but its settings hash to {label.protocol!r}; "
                "a producer must write protocol = sha256 of the canonical JSON of {metric, **settings}, first 16 hex"
            )
        return label


def labels_of(quality: dict[str, Any], where: str = "quality") -> list[QualityLabel]:
    """The labels of a manifest's quality section (an empty section has none)."""
    raw = quality.get("labels", [])
    if not isinstance(raw, list):
        raise LabelError(f"{where}.labels must be a list")
    labels = [QualityLabel.from_dict(item, f"{where}.labels[{i}]") for i, item in enumerate(raw)]
    seen: set[str] = set()
    for label in labels:
        if label.metric in seen:
            raise LabelError(f"{where}.labels has {label.metric!r} twice; one label per metric")
        seen.add(label.metric)
    return labels


def check_quality(quality: Any, files: dict[str, Any], where: str) -> None:
    """Validate a manifest's quality section: labels parse, and every graph they name is a listed
    file with the listed sha256 (a label describes exactly the bytes that are served)."""
    if not isinstance(quality, dict):
        raise LabelError(f"{where}: quality must be a JSON object")
    for label in labels_of(quality, f"{where}: quality"):
        for graph in label.graphs:
            entry = files.get(graph.file)
            if entry is None or entry.sha256 != graph.sha256:
                raise LabelError(
                    f"{where}: quality label {label.metric!r} was measured on {graph.file} with sha256 "
                    f"{graph.sha256[:12]}..., which is not a file of this version with that hash"
                )
    health = quality.get("sample_health", {})
    parts = health.get("parts", {}) if isinstance(health, dict) else None
    if not isinstance(parts, dict) or not all(
        isinstance(figures, dict)
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in figures.values())
        for figures in parts.values()
    ):
        raise LabelError(f"{where}: quality.sample_health.parts must map part names to {{name: number}}")


def health_references(quality: dict[str, Any], part: str) -> dict[str, float]:
    """One part's sample-health references measured at export (e.g. "diversity"); {} when none were."""
    figures = quality.get("sample_health", {}).get("parts", {}).get(part, {})
    return {name: float(value) for name, value in figures.items()}
