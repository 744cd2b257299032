"""The publishing gate: a new version may not regress the quality of the latest published one.

Only labels with the same metric and the same protocol are compared (export/labels.py). A label is
worse by more than its metric's tolerance, a fraction of the earlier value (default 5%; per metric
in DEFAULT_TOLERANCES, each overridable): the version is refused, unless forced, which the manifest
records. No torch imports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from genserve.export.labels import QualityLabel, labels_of
from genserve.export.manifest import Manifest

DEFAULT_TOLERANCE = 0.05
# FIDs from a few hundred samples move more between good checkpoints than likelihoods do.
DEFAULT_TOLERANCES = {"fid_domain": 0.10, "fid_inception": 0.10, "class_coverage": 0.05, "test_elbo_nats": 0.02,
                      "test_nll_nats": 0.02, "test_psnr_db": 0.02}


class QualityGateError(Exception):
    """The new version regresses a comparable label beyond its tolerance (and was not forced)."""


@dataclass(frozen=True)
class GateConfig:
    """Whether to gate, whether to publish a regression anyway, and per-metric relative tolerances."""

    enabled: bool = False
    force: bool = False
    tolerances: dict[str, float] = field(default_factory=dict)  # metric -> fraction; overrides the defaults

    def __post_init__(self) -> None:
        for metric, value in self.tolerances.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"the gate tolerance of {metric} must be a non-negative fraction (0.05 = 5%), got {value!r}")

    def tolerance(self, metric: str) -> float:
        return float(self.tolerances.get(metric, DEFAULT_TOLERANCES.get(metric, DEFAULT_TOLERANCE)))

    def to_dict(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "force": self.force,
                "tolerances": {**DEFAULT_TOLERANCES, **{k: float(v) for k, v in self.tolerances.items()}}}


def parse_tolerance(text: str) -> tuple[str, float]:
    """'METRIC=FRACTION' (e.g. fid_domain=0.2) -> (metric, fraction)."""
    metric, sep, value = text.partition("=")
    try:
        fraction = float(value)
    except ValueError:
        fraction = math.nan
    if not sep or not metric or not math.isfinite(fraction) or fraction < 0:
        raise ValueError(f"a gate tolerance is METRIC=FRACTION with a fraction >= 0 (fid_domain=0.2 allows 20%), got {text!r}")
    return metric, fraction


def _compare(new: QualityLabel, old: QualityLabel, tolerance: float) -> dict[str, Any]:
    worse = new.worse_by(old)
    relative = worse / abs(old.value) if old.value else (math.inf if worse > 0 else 0.0)
    return {
        "metric": new.metric,
        "protocol": new.protocol,
        "better": new.better,
        "previous": old.value,
        "new": new.value,
        "worse_by": worse,
        "worse_by_fraction": relative if math.isfinite(relative) else None,
        "tolerance": tolerance,
        "passed": relative <= tolerance,
    }


def _describe(c: dict[str, Any], unit: str, version: int) -> str:
    fraction = c["worse_by_fraction"]
    percent = f"{100 * fraction:.1f}%" if fraction is not None else "from zero"
    unit = f" {unit}" if unit else ""
    return (f"{c['metric']} ({c['better']} is better) went from {c['previous']:.4g} (version {version}) to "
            f"{c['new']:.4g}{unit}: {c['worse_by']:.4g}{unit} worse ({percent}), beyond the tolerance of "
            f"{100 * c['tolerance']:g}%")


def check_gate(name: str, version: int, quality: dict[str, Any], previous: Manifest | None,
               config: GateConfig) -> tuple[dict[str, Any], list[str]]:
    """(the gate record for the manifest, warnings); raises QualityGateError on an unforced regression."""
    record: dict[str, Any] = {**config.to_dict(), "against_version": None, "comparisons": [], "forced": False}
    if not config.enabled:
        return record, []
    if previous is None:
        return record, [f"quality gate: {name} has no published version to compare with; publishing version {version}"]
    record["against_version"] = previous.version
    earlier = {(label.metric, label.protocol): label for label in labels_of(previous.quality)}
    new_labels = labels_of(quality)
    units = {label.metric: label.unit for label in new_labels}
    comparisons = [
        _compare(label, earlier[label.metric, label.protocol], config.tolerance(label.metric))
        for label in new_labels
        if (label.metric, label.protocol) in earlier
    ]
    record["comparisons"] = comparisons
    if not comparisons:
        return record, [
            f"quality gate: version {version} has no label comparable with version {previous.version}'s "
            f"(same metric and protocol; new: {sorted(units) or 'none'}, version {previous.version}: "
            f"{sorted({m for m, _ in earlier}) or 'none'}); publishing without a comparison"
        ]
    failed = [c for c in comparisons if not c["passed"]]
    if not failed:
        return record, []
    reasons = "; ".join(_describe(c, units[c["metric"]], previous.version) for c in failed)
    if config.force:
        record["forced"] = True
        return record, [f"quality gate: forced past a regression: {reasons}"]
    needed = " ".join(
        f"--gate-tolerance {c['metric']}={math.ceil(100 * c['worse_by_fraction'] + 1) / 100:g}"
        for c in failed if c["worse_by_fraction"] is not None
    )
    raise QualityGateError(
        f"quality gate refused {name} version {version}: {reasons}. Nothing was published. Publish anyway "
        f"with --force (recorded in the manifest as forced)" + (f", or allow it with {needed}" if needed else "")
    )
