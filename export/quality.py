"""Quality labels measured on a version's exported ONNX graphs through onnxruntime.

What is measured follows the model's declared metric families (training/models/base.py):

    samples         fid_domain, class_coverage    samples drawn from the model's prior, decoded by the
                                                  generator (or decoder) graph, judged by the per-dataset
                                                  domain classifier of training/evaluation/ (labelled
                                                  datasets only)
    likelihood      test_elbo_nats, test_nll_nats test images through the encoder graph, posterior
                                                  samples through the decoder graph, the model's own
                                                  likelihood (training/models/likelihood.py)
    reconstruction  test_psnr_db                  test images (noisy for the denoiser) through the
                                                  encoder and decoder graphs, or the denoiser graph

and, only where requested (QualityConfig.extra_metrics, genserve-export --quality-metrics), for any
model that can sample:

    fid_inception   the standard FID (Inception-v3 pool3, training/evaluation/inception.py) of the same
                    prior samples against the same real test images as fid_domain; slow on a CPU

The torch model only supplies what a graph cannot: prior samples, the likelihood's form (and a learned
decoder std), and the training config (binarisation, noise). The numbers describe the graphs' outputs.
The same pass measures the sample-health references the server normalises by (export/sample_stats.py).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from genserve.export.labels import GraphRef, QualityLabel
from genserve.export.sample_stats import DIVERSITY_ROWS, diversity, nonfinite_count, saturated_count
from genserve.training.config import TrainConfig
from genserve.training.data.loader import fixed_test_loader
from genserve.training.data.types import ImageDataset
from genserve.training.evaluation.reconstruction import per_image_mse, psnr_db
from genserve.training.models import GenerativeModel

DEFAULT_SAMPLES = 500  # a few seconds on a CPU for every kind; FIDs from 500 samples are biased but comparable
DEFAULT_NLL_K = 10
RUN_BATCH = 100
PROVIDER = "CPUExecutionProvider"  # labels are measured on CPU, so every producer's numbers agree
EXTRA_METRICS = ("fid_inception",)  # measured only where requested: seconds per sample on a CPU


class QualityError(Exception):
    """The graphs could not be measured (e.g. they produce NaN on the reference inputs)."""


@dataclass(frozen=True)
class QualityConfig:
    """How labels are measured (saved in the manifest's quality.config)."""

    samples: int = DEFAULT_SAMPLES  # samples (or test images) per label; 0 measures nothing
    nll_k: int = DEFAULT_NLL_K  # importance samples per image for test_nll_nats; 0: no NLL label
    seed: int = 0  # prior samples and posterior noise
    diversity_rows: int = DIVERSITY_ROWS
    extra_metrics: tuple[str, ...] = ()  # opt-in labels (EXTRA_METRICS) besides the model's defaults

    def __post_init__(self) -> None:
        if isinstance(self.extra_metrics, str) or not isinstance(self.extra_metrics, list | tuple):
            raise ValueError(f"quality extra_metrics must be a list of metric names, got {self.extra_metrics!r}")
        object.__setattr__(self, "extra_metrics", tuple(self.extra_metrics))  # a YAML or JSON list
        unknown = [m for m in self.extra_metrics if m not in EXTRA_METRICS]
        if unknown:
            raise ValueError(f"unknown opt-in quality metric {', '.join(map(repr, unknown))}; choose from "
                             f"{', '.join(EXTRA_METRICS)} (the model's default labels are always measured)")
        if len(set(self.extra_metrics)) != len(self.extra_metrics):
            raise ValueError(f"quality extra_metrics names a metric twice: {list(self.extra_metrics)}")
        for name in ("samples", "nll_k", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"quality {name} must be a non-negative integer, got {value!r}")
        if 0 < self.samples < 2:
            raise ValueError(f"quality samples must be 0 (no labels) or at least 2, got {self.samples}")
        if self.extra_metrics and self.samples == 0:
            raise ValueError(f"{', '.join(self.extra_metrics)} was requested but quality samples is 0 (no labels); "
                             "measure on at least 2 samples (--quality-samples N)")
        if self.diversity_rows < 2:
            raise ValueError(f"diversity rows must be at least 2, got {self.diversity_rows}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "extra_metrics": list(self.extra_metrics)}


Graphs = dict[str, tuple[str, bytes]]  # part -> (file name, the bytes published)


class _Session:
    def __init__(self, part: str, file: str, data: bytes):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(data, sess_options=options, providers=[PROVIDER])
        self.ref = GraphRef(part, file, hashlib.sha256(data).hexdigest())
        self.input = self.session.get_inputs()[0].name

    def __call__(self, rows: np.ndarray) -> list[np.ndarray]:
        outputs = []
        for start in range(0, len(rows), RUN_BATCH):
            chunk = np.ascontiguousarray(rows[start : start + RUN_BATCH], dtype=np.float32)
            outputs.append(self.session.run(None, {self.input: chunk}))
        result = [np.concatenate([o[i] for o in outputs]) for i in range(len(outputs[0]))]
        bad = sum(nonfinite_count(r) for r in result)
        if bad:
            raise QualityError(
                f"{self.ref.file} computed {bad} NaN or infinite values on {len(rows)} reference inputs; "
                "the graph is damaged or the model diverged, so it has no quality to label"
            )
        return result


class QualityMeter:
    """Prepared before publishing (dataset, classifier, prior samples); measure() runs on the bytes."""

    def __init__(self, model: GenerativeModel, train_config: TrainConfig, dataset: ImageDataset, config: QualityConfig):
        check_requested(model, config)
        self.model, self.train_config, self.dataset, self.config = model, train_config, dataset, config
        self.reference = {"dataset": dataset.name, "split": "test"}
        from genserve.training.trainer import (
            resolve_binarize,  # as the run trained and measured its test losses
        )

        self.binarize = resolve_binarize(train_config)

    def measure(self, graphs: Graphs) -> dict[str, Any]:
        """The manifest's quality section for these graph bytes: labels and sample-health references."""
        sessions = {part: _Session(part, file, data) for part, (file, data) in graphs.items()}
        families = self.model.metric_families
        labels: list[QualityLabel] = []
        self.notes: list[str] = []
        health: dict[str, dict[str, float]] = {}
        sampler = sessions.get("generator") or (sessions.get("decoder") if self.model.can_sample else None)
        if sampler is not None:
            samples = sampler(self._prior_latents())[0]
            health[sampler.ref.part] = self._health(samples)
            if "samples" in families:
                labels += self._sample_labels(samples, sampler.ref)
            if "fid_inception" in self.config.extra_metrics:
                labels.append(self._inception_label(samples, sampler.ref))
        elif self.config.extra_metrics:
            raise QualityError(f"{', '.join(self.config.extra_metrics)} needs a generator or decoder graph to "
                               f"sample from; this version has {', '.join(sorted(sessions)) or 'none'}")
        if "likelihood" in families:
            labels += self._likelihood_labels(sessions["encoder"], sessions["decoder"])
        if "reconstruction" in families:
            label, outputs, part = self._reconstruction_label(sessions)
            labels.append(label)
            health.setdefault(part, self._health(outputs))
        return {
            "labels": [label.to_dict() for label in labels],
            "sample_health": {"parts": health, "diversity_rows": self.config.diversity_rows},
            "measured_with": {"runtime": "onnxruntime", "version": ort.__version__, "provider": PROVIDER},
            "config": self.config.to_dict(),
            "notes": self.notes,
        }

    # --- helpers --------------------------------------------------------------------------------
    def _settings(self, **extra: Any) -> dict[str, Any]:
        return {"samples": self.config.samples, "seed": self.config.seed, "reference": self.reference, **extra}

    def _prior_latents(self) -> np.ndarray:
        generator = torch.Generator().manual_seed(self.config.seed)
        return self.model.prior_sample(self.config.samples, generator).float().cpu().numpy()

    def _health(self, images: np.ndarray) -> dict[str, float]:
        rows = self.config.diversity_rows
        batches = [images[i : i + rows] for i in range(0, len(images) - rows + 1, rows)] or [images]
        figures = [d for b in batches if (d := diversity(b, rows)) is not None]
        return {
            "diversity": float(np.mean(figures)) if figures else 0.0,
            "saturated_fraction": saturated_count(images) / images.size,
        }

    def _test_images(self) -> torch.Tensor:
        return self.dataset.test_images[: self.config.samples]

    def _loader(self, noisy: bool):
        noise = self.train_config.noise_factor if noisy else None
        return fixed_test_loader(self._test_images(), None, RUN_BATCH, binarize=self.binarize,
                                 noise_factor=noise)

    # --- samples: fid_domain and class_coverage -----------------------------------------------
    def _sample_labels(self, samples: np.ndarray, graph: GraphRef) -> list[QualityLabel]:
        from genserve.training.evaluation.classifier import VERSION, domain_classifier
        from genserve.training.evaluation.sample_quality import (
            classifier_dataset,
            domain_metrics,
            real_subset,
        )

        dataset = self.dataset
        if dataset.num_classes < 2 or dataset.train_labels is None or dataset.test_labels is None:
            self.notes.append(f"no fid_domain or class_coverage: {dataset.name} has no class labels for the domain classifier")
            return []
        labelled = classifier_dataset(dataset, self.train_config)
        classifier, accuracy = domain_classifier(labelled, "cpu")
        extractor = {"name": "domain_classifier", "version": VERSION, "sha256": _weights_sha256(classifier),
                     "test_accuracy": accuracy, "features": classifier.hidden.out_features}
        u8 = _quantised(samples)
        real = real_subset(dataset.test_images, self.config.samples)
        metrics = domain_metrics(u8, real, labelled, ["fid_domain", "class_coverage"], torch.device("cpu"))
        reference = {**self.reference, "images": len(real)}
        settings = self._settings(feature_extractor=extractor["sha256"], reference=reference, quantised="uint8")
        common = {"samples": len(u8), "reference": reference, "feature_extractor": extractor, "graphs": (graph,),
                  "settings": settings}
        return [
            QualityLabel("fid_domain", metrics["fid_domain"], "lower", "", **common),
            QualityLabel("class_coverage", metrics["class_coverage_entropy_nats"], "higher", "nats", **common,
                         details={"shares": metrics["class_coverage"],
                                  "max_entropy_nats": metrics["class_coverage_max_entropy_nats"]}),
        ]

    # --- samples, where requested: fid_inception -----------------------------------------------
    def _inception_label(self, samples: np.ndarray, graph: GraphRef) -> QualityLabel:
        from genserve.training.evaluation.inception import InceptionWeightsError, extractor_identity
        from genserve.training.evaluation.sample_quality import inception_fid, real_subset

        u8 = _quantised(samples)
        real = real_subset(self.dataset.test_images, self.config.samples)  # the same images as fid_domain's
        try:
            extractor = extractor_identity()
            value = inception_fid(u8, real, torch.device("cpu"))
        except InceptionWeightsError as error:
            raise QualityError(f"fid_inception: {error}") from error
        reference = {**self.reference, "images": len(real)}
        settings = self._settings(feature_extractor=extractor["sha256"], reference=reference, quantised="uint8")
        return QualityLabel("fid_inception", value, "lower", "", samples=len(u8), reference=reference,
                            feature_extractor=extractor, graphs=(graph,), settings=settings)

    # --- likelihood: test ELBO and importance-sampled NLL ---------------------------------------
    def _likelihood_labels(self, encoder: _Session, decoder: _Session) -> list[QualityLabel]:
        from genserve.training.models.likelihood import gaussian_kl, standard_normal_log_prob

        model = self.model
        generator = torch.Generator().manual_seed(self.config.seed)
        log_likelihood = _from_probabilities(model.log_likelihood)
        elbo, nll, count = 0.0, [], 0
        k = self.config.nll_k
        for batch in self._loader(noisy=False):
            x = batch.images.float()
            mean, logvar = (torch.from_numpy(o) for o in encoder(batch.inputs.numpy())[:2])
            std = torch.exp(0.5 * logvar)
            eps = torch.randn(mean.shape, generator=generator)
            recon = -log_likelihood(torch.from_numpy(decoder((mean + std * eps).numpy())[0]), x)
            elbo += (recon + gaussian_kl(mean, logvar)).sum().item()
            count += len(x)
            if k:
                eps = torch.randn((k, *mean.shape), generator=generator)
                z = mean + std * eps
                probs = torch.from_numpy(decoder(z.flatten(0, 1).numpy())[0])
                log_px_z = log_likelihood(probs, x.expand(k, *x.shape).flatten(0, 1)).view(k, -1)
                log_qz = -0.5 * (eps.square() + logvar + math.log(2 * math.pi)).sum(-1)
                nll.append(-(torch.logsumexp(log_px_z + standard_normal_log_prob(z) - log_qz, 0) - math.log(k)))
        likelihood = {"likelihood": model.likelihood, "binarized": self.binarize}
        if getattr(model, "log_sigma", None) is not None:
            likelihood["decoder_log_sigma"] = round(float(model.log_sigma.detach()), 6)
        reference = {**self.reference, "images": count}
        common = {"samples": count, "reference": reference, "feature_extractor": None,
                  "graphs": (encoder.ref, decoder.ref)}
        labels = [QualityLabel("test_elbo_nats", elbo / count, "lower", "nats",
                               settings=self._settings(reference=reference, posterior_samples=1, **likelihood),
                               **common)]
        if k:
            labels.append(QualityLabel("test_nll_nats", torch.cat(nll).mean().item(), "lower", "nats",
                                       settings=self._settings(reference=reference, importance_samples=k, **likelihood),
                                       **common))
        return labels

    # --- reconstruction: PSNR -------------------------------------------------------------------
    def _reconstruction_label(self, sessions: dict[str, _Session]) -> tuple[QualityLabel, np.ndarray, str]:
        chain = [sessions["denoiser"]] if "denoiser" in sessions else [sessions["encoder"], sessions["decoder"]]
        mse, outputs = [], []
        for batch in self._loader(noisy=self.model.noisy_inputs):
            rows = batch.inputs.numpy()
            for session in chain:
                rows = session(rows)[0]
            outputs.append(rows)
            mse.append(per_image_mse(torch.from_numpy(rows), batch.images))
        mse_all = torch.cat(mse)
        extra: dict[str, Any] = {"binarized": self.binarize}
        if self.model.noisy_inputs:
            extra["noise_factor"] = self.train_config.noise_factor
        reference = {**self.reference, "images": len(mse_all)}
        label = QualityLabel(
            "test_psnr_db", psnr_db(mse_all).mean().item(), "higher", "dB", samples=len(mse_all),
            reference=reference, feature_extractor=None, graphs=tuple(s.ref for s in chain),
            settings=self._settings(reference=reference, **extra),
        )
        return label, np.concatenate(outputs), chain[-1].ref.part


def _quantised(samples: np.ndarray) -> torch.Tensor:
    """Graph outputs as 8-bit images, as if saved as PNGs (as training/evaluation measures samples)."""
    return torch.from_numpy((np.clip(samples, 0, 1) * 255).round().astype(np.uint8))


def _weights_sha256(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _from_probabilities(log_likelihood: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """The model's log p(x|z) from logits, applied to a decoder graph's probabilities: the logits are
    recovered as log(p / (1 - p)) in float64, p clamped to [1e-12, 1 - 1e-12] (a float32 sigmoid
    rounds to exactly 0 or 1 far out)."""

    def from_probabilities(probabilities: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        p = probabilities.double().clamp(1e-12, 1 - 1e-12)
        return log_likelihood(torch.log(p) - torch.log1p(-p), images.double()).float()

    return from_probabilities


def unmeasured_reason(model: GenerativeModel, dataset: ImageDataset | None, config: QualityConfig,
                      parts: Sequence[str]) -> str | None:
    """Why no labels can be measured (None when they can)."""
    if config.samples == 0:
        return "quality labels were not measured (--quality-samples 0)"
    if dataset is None:
        return "the run's dataset could not be loaded"
    if not model.metric_families:
        return f"{model.kind} declares no metric families"
    if "likelihood" in model.metric_families and not {"encoder", "decoder"} <= set(parts):
        return "the likelihood needs an encoder and a decoder graph"
    return None


def check_requested(model: GenerativeModel, config: QualityConfig) -> None:
    """Fail before any work when an opt-in label cannot be measured for this model (QualityError)."""
    if not config.extra_metrics:
        return
    if not model.can_sample:
        from genserve.training.models import model_classes

        can = [kind for kind, cls in model_classes().items() if cls.can_sample]
        raise QualityError(
            f"{', '.join(config.extra_metrics)} measures samples drawn from the model, and {model.kind} cannot "
            f"sample (it has no prior to draw from); the kinds that can: {', '.join(can)}. Drop --quality-metrics "
            "for this run"
        )
    if "fid_inception" in config.extra_metrics:
        from genserve.training.evaluation.inception import InceptionWeightsError, weights_path

        try:
            weights_path()  # the file's hashes are checked when it is read
        except InceptionWeightsError as error:
            raise QualityError(str(error)) from error
