"""The downloader and `genserve-data`, against a loopback HTTP mirror of ../shared/data."""

from __future__ import annotations

import gzip
import hashlib
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from genserve.training.data import download as dl
from genserve.training.data.cli import main
from genserve.training.data.errors import ChecksumError, DatasetError, DownloadError
from genserve.training.data.registry import load_dataset

MNIST_FILES = [spec.path for spec in dl.SOURCES["mnist"]]
FACES = "olivetti-faces/olivettifaces.mat"


@dataclass
class Mirror:
    """A loopback HTTP server over `root` that honours `Range: bytes=N-` and logs every request."""

    root: Path
    url: str = ""
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    bytes_sent: list[int] = field(default_factory=list)
    ignore_range: bool = False  # answer 200 with the whole file, like servers without Range support
    stop_after: int | None = None  # send only this many body bytes, then drop the connection
    delay: float = 0.0  # seconds to wait before answering


def _handler(mirror: Mirror) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            wanted = self.headers.get("Range")
            mirror.requests.append((self.path, wanted))
            time.sleep(mirror.delay)
            path = (mirror.root / unquote(urlsplit(self.path).path).lstrip("/")).resolve()
            if not path.is_relative_to(mirror.root.resolve()) or not path.is_file():
                self.send_error(404)
                return
            data = path.read_bytes()
            start = 0
            match = re.fullmatch(r"bytes=(\d+)-", wanted or "")
            if match and not mirror.ignore_range:
                start = int(match.group(1))
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if mirror.stop_after is not None:
                body = body[: mirror.stop_after]
            self.wfile.write(body)
            mirror.bytes_sent.append(len(body))

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def serve() -> Iterator[Callable[[Path], Mirror]]:
    """Start loopback mirrors of given folders; all are shut down after the test."""
    servers: list[ThreadingHTTPServer] = []

    def start(root: Path) -> Mirror:
        mirror = Mirror(root)
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(mirror))
        server.daemon_threads = True
        server.block_on_close = False
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        mirror.url = f"http://127.0.0.1:{server.server_address[1]}"
        return mirror

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def mirror(serve, shared_data) -> Mirror:
    return serve(shared_data)


@pytest.fixture(autouse=True)
def _no_env_mirror(monkeypatch):
    monkeypatch.delenv("GENSERVE_DATA_URL", raising=False)


def quiet(_: str) -> None:
    pass


def test_download_mnist_verifies_and_loads(mirror, shared_data, tmp_path):
    paths = dl.download("mnist", tmp_path, mirror.url, timeout=10, log=quiet)
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == MNIST_FILES
    for name in MNIST_FILES:
        assert (tmp_path / name).read_bytes() == (shared_data / name).read_bytes()
    assert not list(tmp_path.rglob("*.part"))
    assert [path for path, _ in mirror.requests] == [f"/{name}" for name in MNIST_FILES]
    assert load_dataset("mnist", tmp_path).train_images.shape == (60000, 1, 28, 28)
    dl.download("mnist", tmp_path, mirror.url, log=quiet)  # present and verified: nothing fetched
    assert len(mirror.requests) == 4


def test_resume_continues_a_partial_file_with_range(mirror, shared_data, tmp_path):
    whole = (shared_data / FACES).read_bytes()
    part = tmp_path / (FACES + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(whole[:500_000])
    messages: list[str] = []
    dl.download("faces", tmp_path, mirror.url, log=messages.append)
    assert mirror.requests == [(f"/{FACES}", "bytes=500000-")]
    assert mirror.bytes_sent == [len(whole) - 500_000]  # only the rest came over the wire
    assert (tmp_path / FACES).read_bytes() == whole and not part.exists()
    assert any("resuming at byte 500000" in m for m in messages)


def test_interrupted_download_keeps_part_then_resumes(mirror, shared_data, tmp_path):
    mirror.stop_after = 300_000
    with pytest.raises(DownloadError, match="rerun the same command to resume") as info:
        dl.download("faces", tmp_path, mirror.url, timeout=10, log=quiet)
    assert not isinstance(info.value, ChecksumError)
    part = tmp_path / (FACES + ".part")
    assert part.stat().st_size == 300_000 and not (tmp_path / FACES).exists()
    mirror.stop_after = None
    dl.download("faces", tmp_path, mirror.url, timeout=10, log=quiet)
    assert mirror.requests[-1] == (f"/{FACES}", "bytes=300000-")
    assert (tmp_path / FACES).read_bytes() == (shared_data / FACES).read_bytes()


def test_server_ignoring_range_restarts_from_zero(mirror, shared_data, tmp_path):
    mirror.ignore_range = True
    part = tmp_path / (FACES + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"stale bytes that must not be kept")
    dl.download("faces", tmp_path, mirror.url, log=quiet)
    assert mirror.requests[0][1] == "bytes=33-"
    assert (tmp_path / FACES).read_bytes() == (shared_data / FACES).read_bytes()


def test_complete_part_is_finished_after_416(mirror, shared_data, tmp_path):
    part = tmp_path / (FACES + ".part")
    part.parent.mkdir(parents=True)
    shutil.copyfile(shared_data / FACES, part)
    dl.download("faces", tmp_path, mirror.url, log=quiet)
    assert mirror.bytes_sent == []  # answered 416: nothing left to send
    assert (tmp_path / FACES).read_bytes() == (shared_data / FACES).read_bytes()


def test_resumed_part_from_another_file_is_redone(mirror, shared_data, tmp_path):
    whole = (shared_data / FACES).read_bytes()
    part = tmp_path / (FACES + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\x00" * 1000)  # same length as a real prefix, wrong content
    dl.download("faces", tmp_path, mirror.url, log=quiet)
    assert [r[1] for r in mirror.requests] == ["bytes=1000-", None]
    assert (tmp_path / FACES).read_bytes() == whole


def _corrupt_mirror(shared_data: Path, root: Path) -> Path:
    """A mirror whose Olivetti file has 16 flipped bytes and whose MNIST labels decode to other content."""
    data = bytearray((shared_data / FACES).read_bytes())
    data[1000:1016] = bytes(b ^ 0xFF for b in data[1000:1016])
    (root / "olivetti-faces").mkdir(parents=True)
    (root / FACES).write_bytes(bytes(data))
    labels = bytearray(gzip.decompress((shared_data / "mnist/t10k-labels-idx1-ubyte.gz").read_bytes()))
    labels[100] = (labels[100] + 1) % 10
    shutil.copytree(shared_data / "mnist", root / "mnist")
    (root / "mnist/t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(labels)))
    return root


def test_corrupt_file_is_rejected_and_nothing_kept(serve, shared_data, tmp_path):
    bad = serve(_corrupt_mirror(shared_data, tmp_path / "mirror"))
    data = tmp_path / "data"
    with pytest.raises(ChecksumError, match="not the one on record") as info:
        dl.download("faces", data, bad.url, log=quiet)
    assert "nothing was written" in str(info.value)
    assert not (data / FACES).exists() and not (data / (FACES + ".part")).exists()
    with pytest.raises(ChecksumError, match="content sha256"):
        dl.download("mnist", data, bad.url, log=quiet)
    assert not (data / "mnist/t10k-labels-idx1-ubyte.gz").exists()
    assert (data / "mnist/train-images-idx3-ubyte.gz").exists()  # the good files before it stay


def test_users_file_is_never_deleted(serve, mirror, shared_data, tmp_path):
    dest = tmp_path / FACES
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"the user's own file")
    bad = serve(_corrupt_mirror(shared_data, tmp_path / "mirror"))
    with pytest.raises(ChecksumError):
        dl.download("faces", tmp_path, bad.url, log=quiet)
    assert dest.read_bytes() == b"the user's own file"
    dl.download("faces", tmp_path, mirror.url, log=quiet)
    assert dest.read_bytes() == (shared_data / FACES).read_bytes()
    assert (tmp_path / (FACES + ".corrupt")).read_bytes() == b"the user's own file"


def test_http_error_is_clear(serve, tmp_path):
    empty = serve(tmp_path / "empty")
    with pytest.raises(DownloadError, match=r"olivettifaces\.mat: HTTP 404"):
        dl.download("faces", tmp_path / "data", empty.url, log=quiet)


def test_unreachable_server_is_clear(tmp_path):
    with pytest.raises(DownloadError, match="cannot download .*GENSERVE_DATA_URL"):
        dl.download("faces", tmp_path, "http://127.0.0.1:9", timeout=5, log=quiet)  # discard port: closed


def test_timeout(mirror, tmp_path):
    mirror.delay = 2.0
    start = time.perf_counter()
    with pytest.raises(DownloadError, match="timed out"):
        dl.download("faces", tmp_path, mirror.url, timeout=0.3, log=quiet)
    assert time.perf_counter() - start < 2.0


def test_only_http_urls(tmp_path):
    with pytest.raises(DownloadError, match="only http"):
        dl.fetch_verified("file:///etc/passwd", tmp_path / "x", dl.SOURCES["faces"][0], log=quiet)


def test_textures_need_a_mirror(tmp_path):
    with pytest.raises(DownloadError, match="pass --base-url URL .*brodatz/D1.gif"):
        dl.download("textures", tmp_path, None, log=quiet)
    assert not (tmp_path / "brodatz").exists() or not list((tmp_path / "brodatz").iterdir())


def test_textures_and_cifar_from_env_mirror(mirror, shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("GENSERVE_DATA_URL", mirror.url + "/")
    dl.download("textures", tmp_path, log=quiet)
    assert len(list((tmp_path / "brodatz").glob("D*.gif"))) == 112
    assert load_dataset("textures", tmp_path, image_size=64).num_classes == 112
    dl.download("cifar10-jpg", tmp_path, log=quiet)
    assert (tmp_path / "cifar10-jpg/cifar10-jpg.tar.gz").stat().st_size == 19433725


def test_urls():
    spec = dl.SOURCES["mnist"][0]
    assert spec.url_for(None) == "https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz"
    assert spec.url_for("http://127.0.0.1:1/base/") == "http://127.0.0.1:1/base/mnist/train-images-idx3-ubyte.gz"
    assert dl.SOURCES["fashion-mnist"][3].url_for(None).startswith(dl.FASHION_MNIST_URL)
    assert dl.SOURCES["cifar10"][0].url_for(None) == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    assert dl.SOURCES["faces"][0].url_for(None) == "https://cs.nyu.edu/~roweis/data/olivettifaces.mat"
    with pytest.raises(DatasetError, match="choose one of"):
        dl.download("imagenet", "/nonexistent", log=quiet)
    assert dl.download("mnist-5k", "/nonexistent", log=quiet) == []


def test_checksum_table_matches_the_shared_data(shared_data):
    sums = {}
    for line in (shared_data / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        sums[name.removeprefix("./")] = digest
    for name, specs in dl.SOURCES.items():
        for spec in specs:
            if name == "cifar10":  # the official pickle tarball is not in shared/data
                assert not (shared_data / spec.path).exists()
                continue
            assert dl.verify_file(shared_data / spec.path, spec).ok, spec.path
            if spec.content_sha256 is None:
                assert sums[spec.path] in spec.sha256
    brodatz = {spec.path for spec in dl.SOURCES["textures"]}
    assert brodatz == {name for name in sums if name.startswith("brodatz/")}
    # MNIST content hashes are of the official bytes: the README's official md5s agree
    for name, md5 in (("train-images", "6bbc9ace898e44ae57da46a324031adb"), ("t10k-images", "2646ac647ad5339dbf082846283269ea")):
        raw = gzip.decompress((shared_data / f"mnist/{name}-idx3-ubyte.gz").read_bytes())
        assert hashlib.md5(raw).hexdigest() == md5


def test_verify_file_states(shared_data, tmp_path):
    spec = dl.SOURCES["mnist"][3]  # t10k labels
    plain = tmp_path / "t10k-labels-idx1-ubyte"
    plain.write_bytes(gzip.decompress((shared_data / spec.path).read_bytes()))
    assert dl.verify_file(plain, spec).state == "ok"  # the uncompressed content counts
    truncated = tmp_path / "t.gz"
    truncated.write_bytes((shared_data / spec.path).read_bytes()[:-100])
    assert dl.verify_file(truncated, spec).state == "incomplete"
    assert dl.verify_file(tmp_path / "absent", spec).state == "missing"
    assert dl.check_local(tmp_path / "none", spec).state == "missing"


def test_cli_download_verify_list(mirror, tmp_path, capsys):
    data = str(tmp_path)
    assert main(["download", "faces", "mnist", "--data-dir", data, "--base-url", mirror.url]) == 0
    assert main(["verify", "faces", "mnist", "--data-dir", data]) == 0
    out = capsys.readouterr().out
    assert "faces: ok" in out and "mnist: ok" in out
    assert main(["verify", "cifar10", "--data-dir", data]) == 1
    assert f"fix: genserve-data download cifar10 --data-dir {data}" in capsys.readouterr().out
    (tmp_path / FACES).write_bytes(b"broken")
    assert main(["verify", "faces", "--data-dir", data]) == 1
    assert main(["list", "--data-dir", data]) == 0
    listing = capsys.readouterr().out
    assert re.search(r"^mnist +ok: 4 files verified", listing, re.M)
    assert re.search(r"^faces +corrupt: .*olivettifaces.mat: mismatch", listing, re.M)
    assert re.search(r"^textures +missing", listing, re.M)
    assert main(["download", "faces", "--data-dir", data, "--base-url", mirror.url + "/nowhere"]) == 1
    assert "HTTP 404" in capsys.readouterr().err


def test_cli_list_of_the_shared_data(shared_data, capsys):
    assert main(["list", "--data-dir", str(shared_data)]) == 0
    listing = capsys.readouterr().out
    for name in ("mnist", "fashion-mnist", "cifar10", "faces", "textures", "mnist-5k"):
        assert re.search(rf"^{name} +ok", listing, re.M), listing
