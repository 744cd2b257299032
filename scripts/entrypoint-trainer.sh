#!/usr/bin/env bash
# The trainer container's entrypoint (one-shot; also run by tests/test_compose.py): train the demo
# models again and publish them as the next versions in the shared repository. A server polling the
# repository (GENSERVE_POLL_INTERVAL) verifies, loads and warms the new version up, then switches
# requests to it; the old version finishes its in-flight calls and is unloaded.
#
#   scripts/entrypoint-trainer.sh
#
# Environment: GENSERVE_REPOSITORY=/models; GENSERVE_RUNS=/runs (each run goes to a new
# RUNS/train-<UTC time>-<pid>/ directory: checkpoints, metrics, TensorBoard, pictures);
# GENSERVE_KEEP (e.g. 3: delete older versions, never one a server serves); and
# bootstrap-models.sh's GENSERVE_MODELS, DEMO_EPOCHS, GENSERVE_TRAIN_LIMIT, GENSERVE_DEVICE, ...
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
repository=${GENSERVE_REPOSITORY:-/models}
runs="${GENSERVE_RUNS:-/runs}/train-$(date -u +%Y%m%dT%H%M%SZ)-$$"

echo "==> [trainer] training ${GENSERVE_MODELS:-vae dae} into $runs, publishing into $repository" >&2
"$ROOT/scripts/bootstrap-models.sh" "$repository" "$runs"
echo "==> [trainer] published; servers polling $repository switch to the new versions" >&2
