"""genserve-serve: serve a model repository over gRPC (genserve.v1 and the Open Inference Protocol).

    genserve-serve --repository REPO [--wait-for-repository] [--host 127.0.0.1] [--port 8001] [--metrics-port 8002]
                   [--config FILE] [--require-gpu] [--log-json] [--workers N]

Flags override the config file (YAML or TOML; see serving/config.py and docs/serving.md).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
from collections.abc import Coroutine
from typing import Any

from genserve.export.cli import missing_onnxruntime
from genserve.serving.config import ConfigError, ServerConfig, load_config
from genserve.serving.logs import configure_logging, log_event
from genserve.serving.worker_group import WorkerContext

STARTUP_FAILED = 1

log = logging.getLogger("genserve.cli")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genserve-serve", description=__doc__.splitlines()[0])
    p.add_argument("--repository", help="model repository (written by genserve-export); it must exist")
    p.add_argument("--wait-for-repository", action=argparse.BooleanOptionalAction, default=None,
                   help="start even when the repository does not exist yet, and load models once they are published")
    p.add_argument("--config", help="YAML or TOML config file; flags override it")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="gRPC port (default 8001; 0: any free port)")
    p.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (default 8002; 0: any free port)")
    p.add_argument("--no-metrics", action="store_true", help="do not serve /metrics")
    p.add_argument("--poll-interval", type=float, dest="poll_interval_s", help="seconds between repository scans (0: never)")
    p.add_argument("--grace-period", type=float, dest="grace_period_s", help="seconds in-flight calls get on shutdown")
    p.add_argument("--inference-threads", type=int, help="threads running onnxruntime sessions")
    p.add_argument("--workers", type=int, help="server processes sharing the port (SO_REUSEPORT), each with its "
                   "own event loop, sessions and batchers (default 1; docs/serving.md, 'Workers')")
    p.add_argument("--require-gpu", action=argparse.BooleanOptionalAction, default=None,
                   help="refuse to serve any graph on the CPU")
    p.add_argument("--log-json", action=argparse.BooleanOptionalAction, default=None, help="JSON log lines")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    p.add_argument("--tls-cert", help="PEM certificate chain (enables TLS)")
    p.add_argument("--tls-key", help="PEM private key")
    p.add_argument("--tls-client-ca", help="PEM CA bundle: require client certificates signed by it")
    p.add_argument("--auth-token-file", help="file holding the bearer token every call but health must send")
    p.add_argument("--serving-holder", help="name of this server's serving marks in the repository (default "
                   "genserve-HOST-PORT); each replica sharing a repository needs its own, e.g. the pod name")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if (missing := missing_onnxruntime()) is not None:
        print(f"genserve-serve: error: {missing}", file=sys.stderr)
        return 2
    overrides = {
        k: v for k, v in vars(args).items() if k not in ("config", "no_metrics", "tls_cert", "tls_key", "tls_client_ca")
    }
    overrides["tls"] = {"cert_file": args.tls_cert, "key_file": args.tls_key, "client_ca_file": args.tls_client_ca}
    try:
        config = load_config(args.config, **overrides)
    except ConfigError as error:
        print(f"genserve-serve: error: {error}", file=sys.stderr)
        return 2
    if args.no_metrics:
        config = dataclasses.replace(config, metrics_port=None)
    configure_logging(config.log_json, config.log_level)
    if config.workers > 1:
        from genserve.serving.workers import supervise

        return supervise(config)
    return run_server(config)


def run_server(config: ServerConfig, worker: WorkerContext | None = None) -> int:
    """Serve in this process (as one of the workers when `worker` is given) until SIGTERM/SIGINT;
    returns the exit status."""
    from genserve.serving.runtime import (
        GpuRequiredError,  # imports onnxruntime: only once it is known to be there
    )
    from genserve.serving.server import StartupError, serve  # imports the generated code

    try:
        return run_event_loop(serve(config, worker), config.event_loop)
    except GpuRequiredError as error:
        log_event(log, "gpu_required", level=logging.ERROR, error=str(error))
        return 3
    except StartupError as error:  # the message names what to change
        log_event(log, "startup_failed", level=logging.ERROR, error=str(error))
        return STARTUP_FAILED
    except (OSError, RuntimeError, ConfigError) as error:
        log_event(log, "failed", level=logging.ERROR, error=f"{type(error).__name__}: {error}")
        return 1


def run_event_loop(main: Coroutine[Any, Any, int], event_loop: str) -> int:
    """Run `main` on uvloop (auto: when it is installed) or on asyncio's own loop."""
    if event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if event_loop == "uvloop":
                main.close()
                raise ConfigError("event_loop: uvloop needs the uvloop package (pip install uvloop); "
                                  "or set event_loop: asyncio") from None
        else:
            return uvloop.run(main)
    return asyncio.run(main)


if __name__ == "__main__":
    sys.exit(main())
