"""Server RSS under large rejected requests (issue 18, High 1): before the calls, right after, and idle.

Starts `python -m genserve.serving.cli` on an empty repository in a subprocess (so the client's own memory
is not counted), sends CALLS Encode requests of SIZE MiB, CONCURRENCY at a time, that the server
rejects (no token on a token-protected server, or an unknown model on an open one), and prints
the server's RSS as a table. Run from the repository root:

    nice -n 15 .venv/bin/python -m benchmarks.hardening_memory [--calls 24 --size 32 --concurrency 4]

Point PYTHONPATH at another checkout to measure its server instead (the "before" figures).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from genserve.serving.protos import genserve_pb2 as pb
from genserve.serving.protos import genserve_pb2_grpc

MiB = 1 << 20


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB


def _wait_for_port(port: int, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"the server did not listen on port {port}")


def measure(case: str, calls: int, size_mib: int, concurrency: int) -> tuple[float, float, float, set[str]]:
    """(RSS before, right after the calls, after 5 s idle) in MiB, and the status codes seen."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "repo").mkdir()
        port = _free_port()
        args = [sys.executable, "-m", "genserve.serving.cli", "--repository", str(root / "repo"), "--port", str(port),
                "--no-metrics", "--poll-interval", "0", "--log-level", "error"]
        if case == "no token":
            (root / "token").write_text("s3cret\n")
            args += ["--auth-token-file", str(root / "token")]
        server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_for_port(port)
            time.sleep(1.0)
            before = _rss_mib(server.pid)
            request = pb.EncodeRequest(model="no-such-model", images=pb.Images(tensor=pb.Tensor(
                dtype=pb.DATA_TYPE_UINT8, shape=[size_mib * MiB], data=b"\x01" * (size_mib * MiB))))
            options = [("grpc.max_send_message_length", 256 * MiB)]
            codes: set[str] = set()
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
                stub = genserve_pb2_grpc.GenserveStub(channel)

                def one(_: int) -> None:
                    try:
                        stub.Encode(request, timeout=120)
                        codes.add("OK")
                    except grpc.RpcError as error:
                        codes.add(error.code().name)

                with ThreadPoolExecutor(concurrency) as pool:
                    list(pool.map(one, range(calls)))
            after = _rss_mib(server.pid)
            time.sleep(5.0)
            idle = _rss_mib(server.pid)
        finally:
            server.terminate()
            server.wait(30)
    return before, after, idle, codes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=24)
    parser.add_argument("--size", type=int, default=32, help="MiB per request")
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    print(f"{args.calls} Encode calls of {args.size} MiB, {args.concurrency} at a time; server RSS in MiB")
    print(f"{'case':<22} {'before':>8} {'after calls':>12} {'idle 5 s':>9}  codes")
    for case in ("no token", "unknown model (open)"):
        before, after, idle, codes = measure(case, args.calls, args.size, args.concurrency)
        print(f"{case:<22} {before:>8.0f} {after:>12.0f} {idle:>9.0f}  {','.join(sorted(codes))}")


if __name__ == "__main__":
    main()
