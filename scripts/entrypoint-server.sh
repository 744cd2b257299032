#!/usr/bin/env bash
# The server container's entrypoint (and what scripts/demo.sh and tests/test_compose.py run).
#
#   scripts/entrypoint-server.sh [GENSERVE-SERVE FLAGS...]   serve GENSERVE_REPOSITORY; when it holds no
#                                                           model version yet, first train and publish the
#                                                           demo models (scripts/bootstrap-models.sh)
#   scripts/entrypoint-server.sh healthcheck [HOST:PORT]      exit 0 iff grpc.health.v1 says SERVING
#
# Environment:
#   GENSERVE_REPOSITORY=/models   model repository (created if missing)
#   GENSERVE_HOST=127.0.0.1       listen address (the container sets 0.0.0.0)
#   GENSERVE_PORT=8001            gRPC port (0: any free port; see the `listening` log line)
#   GENSERVE_METRICS_PORT=8002    Prometheus /metrics port
#   GENSERVE_POLL_INTERVAL=       seconds between repository scans (unset: the server's default, 5)
#   GENSERVE_CONFIG=              a genserve-serve YAML/TOML config file
#   GENSERVE_BOOTSTRAP=1          0: never train; serve whatever the repository holds
#   GENSERVE_RUNS=                where bootstrap training runs go (default: a temporary directory)
#   plus bootstrap-models.sh's variables (DEMO_EPOCHS, GENSERVE_TRAIN_LIMIT, ...).
# Flags given on the command line are passed to genserve-serve last, so they win.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${GENSERVE_BIN:-}" ]]; then
    PATH="$GENSERVE_BIN:$PATH"
elif ! command -v genserve-serve >/dev/null 2>&1 && [[ -x "$ROOT/.venv/bin/genserve-serve" ]]; then
    PATH="$ROOT/.venv/bin:$PATH"
fi
export PATH

say() { echo "==> [server] $*" >&2; }

healthcheck() {
    # grpc.health.v1 Check on the overall service (""): no grpc_health_probe binary needed.
    python - "${1:-127.0.0.1:${GENSERVE_PORT:-8001}}" "${GENSERVE_HEALTH_TIMEOUT:-3}" <<'PY'
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

address, timeout = sys.argv[1], float(sys.argv[2])
with grpc.insecure_channel(address) as channel:
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
    except grpc.RpcError as error:
        print(f"{address}: {error.code().name}", file=sys.stderr)
        sys.exit(1)
status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
print(f"{address}: {status}")
sys.exit(0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1)
PY
}

if [[ "${1:-}" == healthcheck ]]; then
    shift
    healthcheck "$@"
    exit
fi

repository=${GENSERVE_REPOSITORY:-/models}
mkdir -p "$repository"

has_models() {
    # A published version: REPO/NAME/N/manifest.json (staging and removal directories start with a dot).
    compgen -G "$repository/[a-z0-9]*/[1-9]*/manifest.json" >/dev/null
}

if [[ "${GENSERVE_BOOTSTRAP:-1}" != 0 ]] && ! has_models; then
    # One bootstrap at a time per repository (several replicas, or a restart mid-way); the lock file's
    # name starts with a dot, so the repository ignores it.
    exec 9>"$repository/.bootstrap.lock"
    flock 9
    if ! has_models; then
        runs=${GENSERVE_RUNS:-}
        if [[ -z "$runs" ]]; then
            runs=$(mktemp -d "${TMPDIR:-/tmp}/genserve-bootstrap.XXXXXX")
        else
            runs="$runs/bootstrap-$(date -u +%Y%m%dT%H%M%SZ)"
        fi
        say "the repository $repository holds no model: training the demo models first (runs in $runs)"
        "$ROOT/scripts/bootstrap-models.sh" "$repository" "$runs"
    fi
    flock -u 9
    exec 9>&-
fi

args=(--repository "$repository" --host "${GENSERVE_HOST:-127.0.0.1}" --port "${GENSERVE_PORT:-8001}"
      --metrics-port "${GENSERVE_METRICS_PORT:-8002}")
[[ -n "${GENSERVE_POLL_INTERVAL:-}" ]] && args+=(--poll-interval "$GENSERVE_POLL_INTERVAL")
[[ -n "${GENSERVE_CONFIG:-}" ]] && args+=(--config "$GENSERVE_CONFIG")

if [[ "${GENSERVE_CUDA_FROM_PIP:-0}" == 1 ]]; then
    # The GPU image gets CUDA and cuDNN from pip (nvidia-* wheels); onnxruntime-gpu finds them here.
    cuda_libs=$(python -c 'import glob, os, sys
print(":".join(sorted(d for p in sys.path for d in glob.glob(os.path.join(p, "nvidia", "*", "lib")))))')
    if [[ -n "$cuda_libs" ]]; then
        export LD_LIBRARY_PATH="$cuda_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
fi

say "genserve-serve ${args[*]} $*"
# exec: genserve-serve gets SIGTERM itself (graceful shutdown, exit 0).
exec genserve-serve "${args[@]}" "$@"
