"""The version manifest (manifest.json) and the ONNX metadata derived from it: the format in one place.

Both the exporter (which writes it) and the server (which reads it) use these classes, so the
schema is defined and validated here only. No torch and no onnx imports: the server loads this.
See docs/model-repository.md for the field-by-field description.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Any

from genserve.export.files import dump_json
from genserve.export.labels import LabelError, check_quality
from genserve.export.naming import InvalidNameError, validate_model_name

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
METADATA_PREFIX = "genserve."
BATCH_DIM = "batch"  # the symbolic name of the dynamic batch axis in every graph
PART_NAMES = ("encoder", "decoder", "generator", "denoiser")
VARIANTS = ("fp32", "fp16")
DTYPES = ("float32", "float16")
MAX_MANIFEST_BYTES = 1 << 20  # a real manifest is a few kB; a bigger one is refused unread
MAX_JSON_DEPTH = 32  # nesting of objects and lists; real manifests nest 6 deep
MAX_DIMENSION = (1 << 31) - 1  # any one tensor or image dimension
_INT64 = 1 << 63
# the prior fields each distribution the server samples needs (serving/latents.py samples them)
PRIOR_REQUIRED = {"normal": (), "uniform": ("low", "high"), "gaussian_mixture": ("std", "weights", "means")}


class RepositoryError(Exception):
    """Base class of everything the model repository raises."""


class VerificationError(RepositoryError):
    """A version is not servable: a file is missing, altered or unlisted, or the manifest is invalid."""


class ManifestError(VerificationError):
    """manifest.json is missing, is not JSON, or does not follow the schema."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. `shape` holds "batch" for the dynamic batch axis, ints elsewhere."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]
    value_range: tuple[float, float] | None = None  # (0.0, 1.0) for images; None for latents

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "value_range": None if self.value_range is None else list(self.value_range),
        }


@dataclass(frozen=True)
class VariantSpec:
    """One ONNX file of a part. Every variant has the part's inputs and outputs (float32 I/O)."""

    file: str
    weights_dtype: str  # "float32" or "float16"; computation runs in this precision inside the graph
    providers: tuple[str, ...]  # execution providers the variant is meant for, best first

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "weights_dtype": self.weights_dtype, "providers": list(self.providers)}


@dataclass(frozen=True)
class PartSpec:
    """One servable part: its I/O signature and its files ("fp32" always, "fp16" with --fp16)."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    variants: dict[str, VariantSpec]

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "variants": {k: v.to_dict() for k, v in self.variants.items()},
        }


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Manifest:
    """What one model version is. `training`, `exporter` and `parity` are informational records."""

    name: str
    version: int
    kind: str
    created_at: str  # ISO 8601, UTC
    image_shape: tuple[int, int, int]  # (C, H, W); images are float32 NCHW in [0, 1]
    latent_dim: int | None
    prior: dict[str, Any] | None  # model.prior_spec(); None for kinds without a prior (ae, dae)
    dataset: str | None
    class_names: list[str] | None
    parts: dict[str, PartSpec]
    files: dict[str, FileEntry] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    exporter: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    # measured quality labels, sample-health references and the gate's decision (export/labels.py)
    quality: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    value_range = (0.0, 1.0)

    # --- access ---------------------------------------------------------------------------------
    def part(self, part: str) -> PartSpec:
        if part not in self.parts:
            raise KeyError(f"{self.name} version {self.version} has no part {part!r}; it has {sorted(self.parts)}")
        return self.parts[part]

    def file_for(self, part: str, variant: str = "fp32") -> str:
        """The file name of one part's variant, with a clear error when it is not there."""
        variants = self.part(part).variants
        if variant not in variants:
            raise KeyError(
                f"{self.name} version {self.version} part {part!r} has no {variant!r} variant; "
                f"it has {sorted(variants)} (fp16 variants exist only when exported with --fp16)"
            )
        return variants[variant].file

    def with_files(self, files: dict[str, FileEntry]) -> Manifest:
        return replace(self, files=dict(files))

    # --- JSON -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        c, h, w = self.image_shape
        return {
            "format_version": self.format_version,
            "name": self.name,
            "version": self.version,
            "kind": self.kind,
            "created_at": self.created_at,
            "image": {
                "shape": [c, h, w],
                "channels": c,
                "height": h,
                "width": w,
                "dtype": "float32",
                "layout": "NCHW",
                "value_range": list(self.value_range),
            },
            "latent": {"dim": self.latent_dim, "prior": self.prior},
            "dataset": self.dataset,
            "class_names": self.class_names,
            "num_classes": len(self.class_names) if self.class_names else 0,
            "parts": {name: spec.to_dict() for name, spec in self.parts.items()},
            "files": {name: {"sha256": e.sha256, "bytes": e.bytes} for name, e in self.files.items()},
            "training": self.training,
            "exporter": self.exporter,
            "parity": self.parity,
            "quality": self.quality,
        }

    def to_json(self) -> bytes:
        return dump_json(self.to_dict())

    @classmethod
    def from_json(cls, text: str | bytes, where: str = MANIFEST_NAME) -> Manifest:
        if len(text) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{where} is {len(text)} bytes, over the limit of {MAX_MANIFEST_BYTES} bytes")
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError, int digit limit
            raise ManifestError(f"{where} is not valid JSON: {str(error)[:200]}") from None
        return cls.from_dict(data, where)

    @classmethod
    def from_dict(cls, data: Any, where: str = MANIFEST_NAME) -> Manifest:
        """Parse and validate; raises ManifestError naming the offending field."""
        d = _Reader(where)
        _check_values(data, where)
        data = d.obj(data, "")
        fmt = d.integer(data, "format_version")
        if fmt > FORMAT_VERSION or fmt < 1:
            raise ManifestError(
                f"{where}: format_version {fmt} is not supported by this genserve (it reads 1..{FORMAT_VERSION}); "
                "upgrade genserve to serve this version"
            )
        image = d.obj(d.get(data, "image"), "image")
        shape = d.get(image, "shape", "image.")
        if not (isinstance(shape, list) and len(shape) == 3 and all(_is_dimension(v) for v in shape)):
            raise ManifestError(
                f"{where}: image.shape must be [C, H, W] with integers in 1..{MAX_DIMENSION}, got {_short(shape)}"
            )
        latent = d.obj(d.get(data, "latent"), "latent")
        latent_dim = latent.get("dim")
        if latent_dim is not None and not _is_dimension(latent_dim):
            raise ManifestError(f"{where}: latent.dim must be an integer in 1..{MAX_DIMENSION} or null, got {latent_dim!r}")
        prior = latent.get("prior")
        if prior is not None:
            _check_prior(d, prior)
        class_names = data.get("class_names")
        if class_names is not None and not (
            isinstance(class_names, list) and all(isinstance(c, str) for c in class_names)
        ):
            raise ManifestError(f"{where}: class_names must be a list of strings or null")
        dataset = data.get("dataset")
        if dataset is not None and not isinstance(dataset, str):
            raise ManifestError(f"{where}: dataset must be a string or null")
        name = d.text(data, "name")
        try:
            validate_model_name(name)
        except InvalidNameError as error:
            raise ManifestError(f"{where}: {error}") from error
        version = d.integer(data, "version")
        if version < 1:
            raise ManifestError(f"{where}: version must be a positive integer, got {version}")

        parts_raw = d.obj(d.get(data, "parts"), "parts")
        if not parts_raw:
            raise ManifestError(f"{where}: parts is empty; a version needs at least one part")
        parts = {name: _parse_part(d, name, raw) for name, raw in parts_raw.items()}

        files: dict[str, FileEntry] = {}
        for fname, entry in d.obj(d.get(data, "files"), "files").items():
            entry = d.obj(entry, f"files.{fname}")
            sha = d.text(entry, "sha256", f"files.{fname}.")
            if len(sha) != 64 or any(ch not in "0123456789abcdef" for ch in sha):
                raise ManifestError(f"{where}: files.{fname}.sha256 is not a lowercase hex sha256: {sha!r}")
            size = d.integer(entry, "bytes", f"files.{fname}.")
            if "/" in fname or "\\" in fname or fname in ("", ".", "..") or fname == MANIFEST_NAME:
                raise ManifestError(f"{where}: files lists {fname!r}; entries are plain file names in the version dir")
            files[fname] = FileEntry(sha, size)
        for pname, spec in parts.items():
            for vname, variant in spec.variants.items():
                if variant.file not in files:
                    raise ManifestError(
                        f"{where}: parts.{pname}.variants.{vname}.file {variant.file!r} is not listed in files"
                    )
        quality = d.obj(data.get("quality", {}), "quality")
        try:
            check_quality(quality, files, where)
        except LabelError as error:
            raise ManifestError(str(error)) from None
        return cls(
            name=name,
            version=version,
            kind=d.text(data, "kind"),
            created_at=d.text(data, "created_at"),
            image_shape=(shape[0], shape[1], shape[2]),
            latent_dim=latent_dim,
            prior=prior,
            dataset=dataset,
            class_names=class_names,
            parts=parts,
            files=files,
            training=d.obj(data.get("training", {}), "training"),
            exporter=d.obj(data.get("exporter", {}), "exporter"),
            parity=d.obj(data.get("parity", {}), "parity"),
            quality=quality,
            format_version=fmt,
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_dimension(value: Any) -> bool:
    return _is_int(value) and 0 < value <= MAX_DIMENSION


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _check_values(data: Any, where: str) -> None:
    """Refuse what JSON allows but the server cannot carry: nesting deeper than MAX_JSON_DEPTH,
    strings that are not valid UTF-8 (lone surrogates such as "\\ud800": protobuf cannot send them),
    integers outside int64 and NaN or infinite numbers. Iterative: a deep manifest cannot overflow the stack."""
    stack: list[tuple[Any, int, str]] = [(data, 1, "")]
    while stack:
        value, depth, path = stack.pop()
        if isinstance(value, dict | list):
            if depth > MAX_JSON_DEPTH:
                raise ManifestError(f"{where}: nested more than {MAX_JSON_DEPTH} levels deep (at {path or 'the top'})")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str):
                    _check_text(key, f"{path}.{_short(key, 40)}", where)
                stack.append((item, depth + 1, f"{path}.{key}" if isinstance(key, str) else f"{path}[{key}]"))
        elif isinstance(value, str):
            _check_text(value, path, where)
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, int) and not -_INT64 <= value < _INT64:
            raise ManifestError(f"{where}: {path.lstrip('.') or 'a value'} is an integer outside the 64-bit range")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ManifestError(f"{where}: {path.lstrip('.') or 'a value'} is {value}; numbers must be finite")


def _check_text(text: str, path: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ManifestError(f"{where}: {path.lstrip('.') or 'a string'} holds a lone surrogate (not valid UTF-8)") from None


def _check_prior(d: _Reader, prior: Any) -> None:
    """The prior spec Generate samples from: fields of the right types for the distributions this
    server samples (an unknown distribution is kept: Generate then says it cannot sample it)."""
    prior = d.obj(prior, "latent.prior")
    distribution = d.text(prior, "distribution", "latent.prior.")
    dim = d.get(prior, "dim", "latent.prior.")
    if not _is_dimension(dim):
        raise d.fail(f"latent.prior.dim must be an integer in 1..{MAX_DIMENSION}, got {_short(dim)}")

    def number_or_vector(key: str, value: Any) -> None:
        if _is_number(value) or (isinstance(value, list) and len(value) == dim and all(_is_number(v) for v in value)):
            return
        raise d.fail(f"latent.prior.{key} must be a finite number or a list of {dim} finite numbers, got {_short(value)}")

    if distribution not in PRIOR_REQUIRED:
        return
    for key in PRIOR_REQUIRED[distribution]:
        d.get(prior, key, "latent.prior.")
    for key in ("mean", "std", "low", "high"):
        if key in prior:
            number_or_vector(key, prior[key])
    if "std" in prior and min(_as_list(prior["std"])) < 0:
        raise d.fail(f"latent.prior.std must not be negative, got {_short(prior['std'])}")
    if distribution == "gaussian_mixture":
        weights, means = d.get(prior, "weights", "latent.prior."), d.get(prior, "means", "latent.prior.")
        if not (isinstance(weights, list) and weights and all(_is_number(w) and w >= 0 for w in weights) and sum(weights) > 0):
            raise d.fail(f"latent.prior.weights must be a non-empty list of non-negative numbers, got {_short(weights)}")
        if not (
            isinstance(means, list) and len(means) == len(weights)
            and all(isinstance(m, list) and len(m) == dim and all(_is_number(v) for v in m) for m in means)
        ):
            raise d.fail(f"latent.prior.means must be {len(weights)} lists of {dim} finite numbers, got {_short(means)}")


def _as_list(value: Any) -> list[float]:
    return value if isinstance(value, list) else [value]


class _Reader:
    """Typed field access that raises ManifestError with the manifest path and the field name."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, message: str) -> ManifestError:
        return ManifestError(f"{self.where}: {message}")

    def get(self, data: dict[str, Any], key: str, prefix: str = "") -> Any:
        if key not in data:
            raise self.fail(f"required field {prefix}{key} is missing")
        return data[key]

    def obj(self, value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(f"{path or 'the manifest'} must be a JSON object, got {type(value).__name__}")
        return value

    def text(self, data: dict[str, Any], key: str, prefix: str = "") -> str:
        value = self.get(data, key, prefix)
        if not isinstance(value, str) or not value:
            raise self.fail(f"{prefix}{key} must be a non-empty string, got {value!r}")
        return value

    def integer(self, data: dict[str, Any], key: str, prefix: str = "") -> int:
        value = self.get(data, key, prefix)
        if not _is_int(value):
            raise self.fail(f"{prefix}{key} must be an integer, got {value!r}")
        return value


def _parse_tensor(d: _Reader, raw: Any, path: str) -> TensorSpec:
    raw = d.obj(raw, path)
    dtype = d.text(raw, "dtype", f"{path}.")
    if dtype not in DTYPES:
        raise d.fail(f"{path}.dtype must be one of {DTYPES}, got {dtype!r}")
    shape = d.get(raw, "shape", f"{path}.")
    if not (
        isinstance(shape, list)
        and shape
        and shape[0] == BATCH_DIM
        and all(_is_dimension(v) for v in shape[1:])
    ):
        raise d.fail(f"{path}.shape must be [\"{BATCH_DIM}\", ints in 1..{MAX_DIMENSION}...], got {_short(shape)}")
    value_range = raw.get("value_range")
    if value_range is not None and not (
        isinstance(value_range, list) and len(value_range) == 2 and all(isinstance(v, int | float) for v in value_range)
    ):
        raise d.fail(f"{path}.value_range must be [low, high] or null, got {value_range!r}")
    return TensorSpec(
        d.text(raw, "name", f"{path}."),
        dtype,
        tuple(shape),
        None if value_range is None else (float(value_range[0]), float(value_range[1])),
    )


def _parse_part(d: _Reader, name: str, raw: Any) -> PartSpec:
    path = f"parts.{name}"
    if name not in PART_NAMES:
        raise d.fail(f"{path}: unknown part; parts are {', '.join(PART_NAMES)}")
    raw = d.obj(raw, path)
    tensors = {}
    for key in ("inputs", "outputs"):
        items = d.get(raw, key, f"{path}.")
        if not isinstance(items, list) or not items:
            raise d.fail(f"{path}.{key} must be a non-empty list")
        tensors[key] = tuple(_parse_tensor(d, item, f"{path}.{key}[{i}]") for i, item in enumerate(items))
    variants_raw = d.obj(d.get(raw, "variants", f"{path}."), f"{path}.variants")
    if "fp32" not in variants_raw:
        raise d.fail(f"{path}.variants must include \"fp32\"")
    variants = {}
    for vname, vraw in variants_raw.items():
        vpath = f"{path}.variants.{vname}"
        if vname not in VARIANTS:
            raise d.fail(f"{vpath}: unknown variant; variants are {', '.join(VARIANTS)}")
        vraw = d.obj(vraw, vpath)
        weights = d.text(vraw, "weights_dtype", f"{vpath}.")
        if weights not in DTYPES:
            raise d.fail(f"{vpath}.weights_dtype must be one of {DTYPES}, got {weights!r}")
        providers = vraw.get("providers", [])
        if not (isinstance(providers, list) and all(isinstance(p, str) for p in providers)):
            raise d.fail(f"{vpath}.providers must be a list of execution provider names")
        variants[vname] = VariantSpec(d.text(vraw, "file", f"{vpath}."), weights, tuple(providers))
    return PartSpec(tensors["inputs"], tensors["outputs"], variants)


def graph_metadata(manifest: Manifest, part: str, variant: str) -> dict[str, str]:
    """The key manifest fields as ONNX metadata_props, so a graph file on its own says what it is."""
    spec = manifest.part(part)
    values: dict[str, Any] = {
        "format_version": manifest.format_version,
        "model": manifest.name,
        "version": manifest.version,
        "kind": manifest.kind,
        "part": part,
        "variant": variant,
        "weights_dtype": spec.variants[variant].weights_dtype,
        "inputs": [t.to_dict() for t in spec.inputs],
        "outputs": [t.to_dict() for t in spec.outputs],
        "image_shape": list(manifest.image_shape),
        "value_range": list(manifest.value_range),
        "latent_dim": manifest.latent_dim,
        "prior": manifest.prior,
        "dataset": manifest.dataset,
        "class_names": manifest.class_names,
        "created_at": manifest.created_at,
        "exporter_git_commit": manifest.exporter.get("git_commit"),
    }
    # Strings stay plain; everything else is JSON, so `json.loads` recovers numbers, lists and null.
    return {
        METADATA_PREFIX + key: value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        for key, value in values.items()
    }
