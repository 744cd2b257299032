"""Calls refused at c=64 on one connection for two per-connection stream limits, interleaved rounds.

    .venv/bin/python -m benchmarks.stream_limit_bench [--rounds 4] [--limits 100,1024]

gRPC counts a stream against `grpc.max_concurrent_streams` until the server has freed the call,
which lags the response while the event loop is busy; a new stream past the limit is refused
(RST_STREAM REFUSED_STREAM, which the client sees as UNAVAILABLE). This runs peer_bench's c=64 cells
(the tritonclient load generator, one connection) against genserve with each limit and prints the
errors beside the rate (docs/benchmarks.md, "REFUSED_STREAM").
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks import peer_bench


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stream_limit_bench", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--limits", default="100,1024", help="limits.max_streams_per_connection values, comma-separated")
    p.add_argument("--duration", type=float, default=3.0, help="seconds per cell")
    args = p.parse_args(argv)
    repository = peer_bench.default_repository()
    inputs = peer_bench.decoder_inputs(repository)
    cells = [c for c in peer_bench.CELLS if "c=64" in c.label]
    limits = [int(v) for v in args.limits.split(",")]
    totals = {limit: [0, 0] for limit in limits}  # errors, calls
    with tempfile.TemporaryDirectory(prefix="genserve-streams-") as tmp:
        for round_index in range(args.rounds):
            for limit in limits if round_index % 2 == 0 else limits[::-1]:
                workdir = Path(tmp) / f"round{round_index}"
                workdir.mkdir(exist_ok=True)
                server = peer_bench.GenserveServer(f"streams{limit}", peer_bench.ROOT, repository, workdir,
                                                   limits={"max_streams_per_connection": limit})
                try:
                    server.wait_ready(list(peer_bench.MODELS.values()))
                    for spec in cells:
                        result = peer_bench.measure(server, spec, args.duration, round_index, inputs)
                        errors = sum(result.errors.values())
                        totals[limit][0] += errors
                        totals[limit][1] += result.ok + errors
                        print(f"round {round_index} limit {limit:5d} {spec.label:38} {result.per_s:8,.0f}/s "
                              f"errors {result.errors or '-'}  load {result.load_avg:.2f}", flush=True)
                finally:
                    server.stop()
    print("\n" + peer_bench.markdown(["max_streams_per_connection", "calls refused", "of calls"],
                                     [[str(limit), f"{e:,}", f"{c:,} ({100 * e / max(c, 1):.2f} %)"]
                                      for limit, (e, c) in totals.items()]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
