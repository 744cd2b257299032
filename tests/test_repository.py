"""The model repository: atomic publishing, listing, verification, retention and model names.

No torch here: versions are built from small fake files, as a tool other than genserve-export would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from genserve.export import (
    FORMAT_VERSION,
    FileEntry,
    InvalidNameError,
    Manifest,
    ManifestError,
    PartSpec,
    Repository,
    RepositoryError,
    TensorSpec,
    VariantSpec,
    VerificationError,
    VersionNotFoundError,
    default_model_name,
    graph_metadata,
    keep_versions,
    sanitize_name,
    validate_model_name,
)
from genserve.export.repository import REMOVING_PREFIX, STAGING_PREFIX


def fake_manifest(name: str, version: int, fp16: bool = False) -> Manifest:
    variants = {"fp32": VariantSpec("decoder.onnx", "float32", ("CPUExecutionProvider",))}
    if fp16:
        variants["fp16"] = VariantSpec("decoder.fp16.onnx", "float16", ("CUDAExecutionProvider",))
    return Manifest(
        name=name,
        version=version,
        kind="vae",
        created_at="2025-01-01T00:00:00+00:00",
        image_shape=(1, 28, 28),
        latent_dim=16,
        prior={"distribution": "normal", "mean": 0.0, "std": 1.0, "dim": 16},
        dataset="mnist",
        class_names=[str(i) for i in range(10)],
        parts={
            "decoder": PartSpec(
                (TensorSpec("latents", "float32", ("batch", 16)),),
                (TensorSpec("images", "float32", ("batch", 1, 28, 28), (0.0, 1.0)),),
                variants,
            )
        },
        training={"final_metrics": {"test_loss": 100.0}},
    )


def fake_builder(fp16: bool = False, calls: list[int] | None = None, name: str | None = None):
    def build(staging: Path, version: int) -> Manifest:
        if calls is not None:
            calls.append(version)
        manifest = fake_manifest(name or NAME, version, fp16)
        (staging / "decoder.onnx").write_bytes(b"graph for version %d" % version)
        if fp16:
            (staging / "decoder.fp16.onnx").write_bytes(b"half graph")
        return manifest

    return build


NAME = "mnist-vae"


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository(tmp_path / "repo", create=True)


def publish(repo: Repository, n: int = 1, name: str = NAME) -> list[int]:
    return [repo.publish(name, fake_builder(name=name)) for _ in range(n)]


# --- names --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mnist-vae", "mnist-5k-vae", "a", "0", "celeba_64.v2", "x" * 128])
def test_valid_names(name: str) -> None:
    assert validate_model_name(name) == name


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "empty"),
        ("Mnist", "characters"),
        ("a/b", "path separator"),
        ("a\\b", "path separator"),
        ("..", "'..'"),
        ("a..b", "'..'"),
        ("../etc", "path separator"),
        (".hidden", "characters"),
        ("-x", "characters"),
        ("a b", "characters"),
        ("x" * 129, "longer"),
        ("vae\n", "characters"),
    ],
)
def test_invalid_names_are_refused_with_reason(name: str, why: str, repo: Repository) -> None:
    with pytest.raises(InvalidNameError, match="invalid model name") as info:
        validate_model_name(name)
    assert why in str(info.value) and "e.g. 'mnist-vae'" in str(info.value)
    with pytest.raises(InvalidNameError):
        repo.versions(name)
    with pytest.raises(InvalidNameError):
        repo.publish(name, fake_builder())
    assert not list(repo.root.iterdir())  # nothing created, not even staging


def test_default_model_name() -> None:
    assert default_model_name("vae", "mnist") == "mnist-vae"
    assert default_model_name("vae", "mnist-5k") == "mnist-5k-vae"
    assert default_model_name("dense-vae", "CelebA 64") == "celeba-64-dense-vae"
    assert default_model_name("vae", "my data...set/") == "my-data.set-vae"  # single '.' and '-'


@pytest.mark.parametrize(
    ("raw", "name"),
    [
        ("genserve-127.0.0.1-8001", "genserve-127.0.0.1-8001"),
        ("genserve-[::1]-8001", "genserve-1-8001"),  # runs of other characters become one '-'
        ("--My..Model__", "my.model"),
        ("a" * 200, "a" * 128),
    ],
)
def test_sanitize_name(raw: str, name: str) -> None:
    assert sanitize_name(raw) == name


def test_sanitize_name_with_nothing_left_says_so() -> None:
    with pytest.raises(InvalidNameError, match="invalid serving holder name '': it is empty"):
        sanitize_name("///", "serving holder name")


# --- publishing and listing ---------------------------------------------------------------------
def test_publish_creates_increasing_versions_that_verify(repo: Repository) -> None:
    assert publish(repo, 3) == [1, 2, 3]
    assert repo.models() == [NAME]
    assert repo.versions(NAME) == [1, 2, 3]
    assert repo.latest(NAME) == 3
    for version in (1, 2, 3):
        manifest = repo.verify(NAME, version)
        assert manifest.version == version and manifest.format_version == FORMAT_VERSION
        assert repo.part_path(NAME, version, "decoder") == repo.root / NAME / str(version) / "decoder.onnx"
    assert not [p for p in repo.root.iterdir() if p.name.startswith(".")]  # staging gone
    assert oct((repo.root / NAME / "1").stat().st_mode & 0o777) == "0o755"


def test_listing_ignores_non_versions_and_reports_invalid_ones(repo: Repository) -> None:
    publish(repo, 2)
    model = repo.root / NAME
    for junk in (".staging-x", "latest", "01", "3.tmp", "4\n", ".removing-1-ab"):
        (model / junk).mkdir()
    (model / "7").write_text("a file, not a directory")
    (model / "5").mkdir()  # a version directory without manifest: invalid, never served
    (repo.root / ".staging-abc").mkdir()
    (repo.root / "README").write_text("not a model")
    assert repo.models() == [NAME]
    assert repo.versions(NAME) == [1, 2, 5]
    assert repo.latest(NAME) == 2
    status = {s.version: s for s in repo.status(NAME)}
    assert status[1].valid and status[2].valid and not status[5].valid
    assert "no manifest.json" in status[5].error and "never served" in status[5].error
    with pytest.raises(ManifestError, match="no manifest.json"):
        repo.verify(NAME, 5)


def test_unknown_model_and_version(repo: Repository, tmp_path: Path) -> None:
    assert repo.versions("nothing-here") == []
    assert repo.latest("nothing-here") is None
    publish(repo)
    with pytest.raises(VersionNotFoundError, match=r"no version 9 .*versions: \[1\]"):
        repo.load_manifest(NAME, 9)
    with pytest.raises(ValueError, match="positive integer"):
        repo.load_manifest(NAME, 0)
    with pytest.raises(KeyError, match="no part 'encoder'"):
        repo.part_path(NAME, 1, "encoder")
    with pytest.raises(KeyError, match="no 'fp16' variant"):
        repo.part_path(NAME, 1, "decoder", "fp16")
    with pytest.raises(RepositoryError, match="does not exist"):
        Repository(tmp_path / "missing").models()


def test_number_taken_concurrently_is_skipped(repo: Repository) -> None:
    publish(repo)
    calls: list[int] = []
    inner = fake_builder(calls=calls)

    def racing_build(staging: Path, version: int) -> Manifest:
        if not calls:  # another publisher takes version 2 while we build it
            other = repo.root / NAME / str(version)
            other.mkdir()
            (other / "x").write_text("someone else's")
        return inner(staging, version)

    assert repo.publish(NAME, racing_build) == 3
    assert calls == [2, 3]
    assert repo.verify(NAME, 3).version == 3  # rebuilt for the number it got


def test_concurrent_publishers_get_distinct_versions(repo: Repository) -> None:
    barrier = threading.Barrier(6)

    def one(_: int) -> int:
        barrier.wait()
        return repo.publish(NAME, fake_builder())

    with ThreadPoolExecutor(6) as pool:
        versions = sorted(pool.map(one, range(6)))
    assert versions == [1, 2, 3, 4, 5, 6]
    for version in versions:
        repo.verify(NAME, version)


def test_failed_build_leaves_nothing_visible(repo: Repository) -> None:
    def broken(staging: Path, version: int) -> Manifest:
        (staging / "decoder.onnx").write_bytes(b"half")
        raise RuntimeError("exporter died")

    with pytest.raises(RuntimeError, match="exporter died"):
        repo.publish(NAME, broken)
    assert repo.versions(NAME) == []
    assert not [p for p in repo.root.iterdir() if p.name.startswith(STAGING_PREFIX)]


def test_builder_mistakes_are_refused(repo: Repository) -> None:
    def wrong_version(staging: Path, version: int) -> Manifest:
        return fake_builder()(staging, version + 1)

    with pytest.raises(RepositoryError, match="expected 'mnist-vae' version 1"):
        repo.publish(NAME, wrong_version)

    def nested(staging: Path, version: int) -> Manifest:
        (staging / "sub").mkdir()
        return fake_builder()(staging, version)

    with pytest.raises(RepositoryError, match="not a plain file"):
        repo.publish(NAME, nested)

    def unlisted_part(staging: Path, version: int) -> Manifest:
        return fake_manifest(NAME, version)  # names decoder.onnx but writes nothing

    with pytest.raises(ManifestError, match="decoder.onnx' is not listed in files"):
        repo.publish(NAME, unlisted_part)
    assert repo.versions(NAME) == []


# --- verification -------------------------------------------------------------------------------
def test_altered_file_fails_verification_with_hashes(repo: Repository) -> None:
    publish(repo)
    manifest = repo.verify(NAME, 1)
    path = repo.part_path(NAME, 1, "decoder")
    path.write_bytes(path.read_bytes() + b"!")
    with pytest.raises(VerificationError) as info:
        repo.verify(NAME, 1)
    message = str(info.value)
    assert "decoder.onnx" in message and manifest.files["decoder.onnx"].sha256 in message
    assert "altered" in message and "re-export" in message


def test_read_part_checks_what_it_returns(repo: Repository) -> None:
    publish(repo)
    manifest = repo.verify(NAME, 1)
    assert repo.read_part(manifest, "decoder") == b"graph for version 1"
    repo.part_path(NAME, 1, "decoder").write_bytes(b"graph for version 2")
    with pytest.raises(VerificationError, match=f"manifest expects {manifest.files['decoder.onnx'].sha256}"):
        repo.read_part(manifest, "decoder")


def test_missing_and_unlisted_files_fail_verification(repo: Repository) -> None:
    publish(repo, 2)
    repo.part_path(NAME, 1, "decoder").unlink()
    with pytest.raises(VerificationError, match="decoder.onnx is listed in the manifest but missing"):
        repo.verify(NAME, 1)
    (repo.root / NAME / "2" / "extra.onnx").write_bytes(b"x")
    with pytest.raises(VerificationError, match=r"does not list: \['extra.onnx'\]"):
        repo.verify(NAME, 2)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: "{not json", "not valid JSON"),
        (lambda m: json.dumps({**m, "format_version": FORMAT_VERSION + 1}), "upgrade genserve"),
        (lambda m: json.dumps({k: v for k, v in m.items() if k != "kind"}), "required field kind is missing"),
        (lambda m: json.dumps({**m, "version": 2}), "lies in mnist-vae/1"),
        (lambda m: json.dumps({**m, "name": "../mnist-vae"}), "invalid model name"),
        (lambda m: json.dumps({**m, "image": {**m["image"], "shape": [1, 28]}}), "image.shape"),
        (
            lambda m: json.dumps({**m, "files": {**m["files"], "../evil": m["files"]["decoder.onnx"]}}),
            "plain file names",
        ),
        (
            lambda m: json.dumps(
                {**m, "parts": {"decoder": {**m["parts"]["decoder"], "inputs": [{"name": "z", "dtype": "int8", "shape": ["batch", 2]}]}}}
            ),
            r"parts.decoder.inputs\[0\].dtype",
        ),
    ],
)
def test_invalid_manifest_is_reported(repo: Repository, edit, message: str) -> None:
    publish(repo)
    path = repo.root / NAME / "1" / "manifest.json"
    path.write_text(edit(json.loads(path.read_text())))
    with pytest.raises(ManifestError, match=message):
        repo.verify(NAME, 1)
    assert repo.latest(NAME) is None


def test_manifest_round_trip_and_graph_metadata() -> None:
    manifest = fake_manifest(NAME, 3, fp16=True)
    manifest = manifest.with_files(
        {f: FileEntry("0" * 64, 1) for f in ("decoder.onnx", "decoder.fp16.onnx")}
    )
    again = Manifest.from_json(manifest.to_json())
    assert again == manifest
    meta = graph_metadata(manifest, "decoder", "fp16")
    assert meta["genserve.model"] == NAME and meta["genserve.part"] == "decoder"
    assert json.loads(meta["genserve.version"]) == 3
    assert json.loads(meta["genserve.image_shape"]) == [1, 28, 28]
    assert json.loads(meta["genserve.prior"])["distribution"] == "normal"
    assert meta["genserve.weights_dtype"] == "float16"


# --- retention ----------------------------------------------------------------------------------
def test_keep_removes_oldest(repo: Repository) -> None:
    publish(repo, 5)
    assert repo.keep_versions(NAME, 2) == [1, 2, 3]
    assert repo.versions(NAME) == [4, 5]
    assert not [p for p in (repo.root / NAME).iterdir() if p.name.startswith(REMOVING_PREFIX)]
    assert keep_versions(repo.root, NAME, 2) == []


def test_keep_never_removes_protected_or_served_versions(repo: Repository) -> None:
    publish(repo, 6)
    marker = repo.mark_serving(NAME, [2], holder="server-a")
    repo.mark_serving(NAME, [3], holder="server-b")
    assert json.loads(marker.read_text())["versions"] == [2]
    assert repo.serving_versions(NAME) == {2, 3}
    assert repo.keep_versions(NAME, 1, protect={4}) == [1, 5]
    assert repo.versions(NAME) == [2, 3, 4, 6]
    repo.clear_serving(NAME, "server-a")
    assert repo.keep_versions(NAME, 1) == [2, 4]
    assert repo.versions(NAME) == [3, 6]


def test_keep_with_corrupt_serving_mark_removes_nothing(repo: Repository) -> None:
    publish(repo, 3)
    repo.mark_serving(NAME, [1])
    (repo.root / NAME / ".serving" / "default.json").write_text("{garbage")
    with pytest.raises(RepositoryError, match="serving mark .* unreadable"):
        repo.keep_versions(NAME, 1)
    assert repo.versions(NAME) == [1, 2, 3]


def test_keep_counts_only_valid_versions(repo: Repository) -> None:
    publish(repo, 3)
    (repo.root / NAME / "4").mkdir()  # broken newest: does not count, is not removed
    assert repo.keep_versions(NAME, 1) == [1, 2]
    assert repo.versions(NAME) == [3, 4]


def test_keep_argument_checks(repo: Repository) -> None:
    publish(repo)
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="keep must be a positive integer"):
            repo.keep_versions(NAME, bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidNameError):
        repo.mark_serving(NAME, [1], holder="../x")


def test_stale_staging_and_unfinished_removals_are_cleaned(repo: Repository) -> None:
    old, fresh = repo.root / f"{STAGING_PREFIX}old", repo.root / f"{STAGING_PREFIX}fresh"
    for d in (old, fresh):
        d.mkdir()
        (d / "decoder.onnx").write_bytes(b"x")
    hour_ago = time.time() - 7200
    for p in (old / "decoder.onnx", old):
        os.utime(p, (hour_ago, hour_ago))
    publish(repo)
    removing = repo.root / NAME / f"{REMOVING_PREFIX}1-dead"
    removing.mkdir()
    cleaned = repo.clean_stale()
    assert removing in cleaned and not removing.exists()
    assert not old.exists() and fresh.exists()
    assert repo.versions(NAME) == [1]


def test_repository_api_imports_neither_torch_nor_onnx() -> None:
    """The server imports `export` for the repository API; it must stay light."""
    code = "import sys, export; export.Repository('.'); print(sorted({'torch', 'onnx', 'onnxruntime'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
