#!/usr/bin/env bash
# Train the demo models on the embedded mnist-5k digits and publish them into a model repository.
#
#   scripts/bootstrap-models.sh REPOSITORY RUNS_DIR
#
# Trains RUNS_DIR/vae (the default conv VAE) and RUNS_DIR/dae (denoiser), then exports them with
# genserve-export as the next version of mnist-vae and mnist-dae (an atomic publish: a server
# polling REPOSITORY loads the new version before it takes traffic). Used by scripts/demo.sh, by
# the server container on an empty repository (scripts/entrypoint-server.sh) and by the trainer
# container (scripts/entrypoint-trainer.sh).
#
# Environment (defaults are the settings of `make demo`):
#   GENSERVE_MODELS="vae dae"   which of the two to train and publish
#   DEMO_EPOCHS=15              epochs per model
#   GENSERVE_BATCH_SIZE=32      batch size
#   GENSERVE_TRAIN_LIMIT=       use only the first N training images (unset: all 4,500)
#   GENSERVE_NLL_K=50 GENSERVE_NLL_IMAGES=500   the VAE's final importance-sampled NLL
#   GENSERVE_EXPORT_MAX_BATCH=  largest batch of the export's parity check (unset: genserve-export's 64)
#   GENSERVE_KEEP=              then keep only the newest N versions (never one a server serves)
#   GENSERVE_GATE=              1: genserve-export --gate (a version whose quality labels regress the
#                               latest published one's is refused; the others are still exported, exit 3)
#   GENSERVE_GATE_TOLERANCE=    space-separated METRIC=FRACTION for --gate-tolerance (e.g. test_psnr_db=0.05)
#   GENSERVE_DEVICE=auto        training device (auto: CUDA when present)
#   GENSERVE_BIN=               directory holding genserve-train/-export (default: PATH, else .venv/bin)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${GENSERVE_BIN:-}" ]]; then
    PATH="$GENSERVE_BIN:$PATH"
elif ! command -v genserve-train >/dev/null 2>&1 && [[ -x "$ROOT/.venv/bin/genserve-train" ]]; then
    PATH="$ROOT/.venv/bin:$PATH"
fi
export PATH

if [[ $# -ne 2 ]]; then
    echo "usage: $0 REPOSITORY RUNS_DIR" >&2
    exit 2
fi
repository=$1
runs=$2
models=${GENSERVE_MODELS:-vae dae}
epochs=${DEMO_EPOCHS:-15}
common=(--dataset mnist-5k --epochs "$epochs" --batch-size "${GENSERVE_BATCH_SIZE:-32}"
        --device "${GENSERVE_DEVICE:-auto}")
[[ -n "${GENSERVE_TRAIN_LIMIT:-}" ]] && common+=(--limit "$GENSERVE_TRAIN_LIMIT")
export_args=()
[[ -n "${GENSERVE_EXPORT_MAX_BATCH:-}" ]] && export_args+=(--max-batch "$GENSERVE_EXPORT_MAX_BATCH")
[[ -n "${GENSERVE_KEEP:-}" ]] && export_args+=(--keep "$GENSERVE_KEEP")
[[ "${GENSERVE_GATE:-}" == 1 ]] && export_args+=(--gate)
for tolerance in ${GENSERVE_GATE_TOLERANCE:-}; do export_args+=(--gate-tolerance "$tolerance"); done

say() { echo "==> [bootstrap] $*" >&2; }

mkdir -p "$repository" "$runs"
for kind in $models; do
    case $kind in
        vae) extra=(--nll-k "${GENSERVE_NLL_K:-50}" --nll-images "${GENSERVE_NLL_IMAGES:-500}") ;;
        dae) extra=() ;;
        *) echo "$0: GENSERVE_MODELS may name vae and dae, not $kind" >&2; exit 2 ;;
    esac
    say "training $kind on mnist-5k ($epochs epochs) into $runs/$kind"
    genserve-train "$kind" "${common[@]}" "${extra[@]}" --out "$runs/$kind"
done
status=0
for kind in $models; do
    say "exporting $runs/$kind as mnist-$kind into $repository"
    genserve-export "$runs/$kind" --repository "$repository" --name "mnist-$kind" "${export_args[@]}" || {
        rc=$?
        [[ $rc -eq 3 ]] || exit $rc
        say "the quality gate refused mnist-$kind (see above); its published versions are unchanged"
        status=3
    }
done
say "done: $(cd "$repository" && ls -d mnist-*/[0-9]* 2>/dev/null | tr '\n' ' ')"
exit $status
