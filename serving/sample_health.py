"""Sample health: what every execution of an image-producing graph (Generate, Decode, Reconstruct's
decoder, the denoiser) put out, as Prometheus series per model, version and part.

    genserve_sample_values_total            pixel values produced
    genserve_sample_nonfinite_values_total  of them NaN or infinite   (fraction: the ratio of the rates)
    genserve_sample_saturated_values_total  of them within half an 8-bit step of 0 or 1
    genserve_sample_diversity_ratio         per execution of 2+ rows: the mean pairwise distance of its
                                            first rows (export/sample_stats.py) / the same figure measured at
                                            export on the version's reference samples (a histogram; ~1 is
                                            normal, ~0 is a collapsed generator)

Measured right after onnxruntime returns, in the thread that ran the graph (serving/versions.py's
`checked_run`, the batcher's run function): the executor's, or the event loop's for a batch short
enough to run inline (inline_execution_us, serving/batcher.py; the observation counts towards that time);
docs/benchmarks.md has the cost per sample.
"""

from __future__ import annotations

import math

import numpy as np

from genserve.export.labels import health_references
from genserve.export.manifest import Manifest
from genserve.export.sample_stats import DIVERSITY_ROWS, diversity, nonfinite_count, saturated_count
from genserve.serving.metrics import ServerMetrics


class SampleHealth:
    """The health series of one served part; `observe` is safe to call from any thread."""

    def __init__(self, metrics: ServerMetrics, model: str, version: int, part: str, value_range: tuple[float, float],
                 reference_diversity: float | None, rows: int = DIVERSITY_ROWS):
        labels = (model, str(version), part)
        self._values = metrics.sample_values.labels(*labels)
        self._nonfinite = metrics.sample_nonfinite.labels(*labels)
        self._saturated = metrics.sample_saturated.labels(*labels)
        self._diversity = metrics.sample_diversity.labels(*labels)
        self.low, self.high = value_range
        # No reference (an older manifest, or a collapsed reference): the raw figure is recorded.
        self.reference = reference_diversity if reference_diversity and reference_diversity > 0 else 1.0
        self.rows = rows

    def observe(self, images: np.ndarray, finite_rows: np.ndarray | None = None) -> None:
        """`finite_rows` (N,) bool, when the caller has checked the batch already (serving/versions.py)."""
        self._values.inc(images.size)
        if finite_rows is not None:
            finite = bool(finite_rows.all())
        else:  # one summing pass proves the common case (no NaN or infinity) without a boolean temporary
            finite = math.isfinite(float(np.add.reduce(images, axis=None)))
        if not finite:
            self._nonfinite.inc(nonfinite_count(images))
        self._saturated.inc(saturated_count(images, self.low, self.high))
        figure = diversity(images, self.rows)
        if figure is not None:
            self._diversity.observe(figure / self.reference)


def sample_health(metrics: ServerMetrics, manifest: Manifest, part: str) -> SampleHealth | None:
    """The health recorder of one part of a version, or None for a part that does not output images."""
    value_range = manifest.part(part).outputs[0].value_range
    if value_range is None:  # latents (an encoder): nothing to judge
        return None
    references = health_references(manifest.quality, part)
    rows = manifest.quality.get("sample_health", {}).get("diversity_rows", DIVERSITY_ROWS)
    rows = rows if isinstance(rows, int) and not isinstance(rows, bool) and 2 <= rows <= 64 else DIVERSITY_ROWS
    return SampleHealth(metrics, manifest.name, manifest.version, part, value_range, references.get("diversity"), rows)
