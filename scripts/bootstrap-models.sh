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

for kind in $models; do
    case $kind in
        vae | dae) ;;
        *) echo "$0: GENSERVE_MODELS may name vae and dae, not $kind" >&2; exit 2 ;;
    esac
done

build() {  # build KIND: train it, then export it; exit status 3 when the quality gate refuses it
    local kind=$1 extra=()
    [[ $kind == vae ]] && extra=(--nll-k "${GENSERVE_NLL_K:-50}" --nll-images "${GENSERVE_NLL_IMAGES:-500}")
    say "training $kind on mnist-5k ($epochs epochs) into $runs/$kind"
    genserve-train "$kind" "${common[@]}" "${extra[@]}" --out "$runs/$kind" || return 1
    say "exporting $runs/$kind as mnist-$kind into $repository"
    local rc=0
    genserve-export "$runs/$kind" --repository "$repository" --name "mnist-$kind" "${export_args[@]}" || rc=$?
    [[ $rc -eq 3 ]] && say "the quality gate refused mnist-$kind (see above); its published versions are unchanged"
    return $rc
}

mkdir -p "$repository" "$runs"
read -r -a kinds <<<"$models"
cores=$(nproc 2>/dev/null || echo 1)
status=0
record() {  # record KIND RC: the script's status from one build's (3, a gate refusal, unless something failed)
    case $2 in
        0) ;;
        3) [[ $status -eq 0 ]] && status=3 ;;
        *) say "building $1 failed (exit $2; see its lines above)"; status=1 ;;
    esac
}
# Without a GPU the models are built side by side, one thread each: small-batch training uses a
# second core poorly, so on 2 cores both take about the time of the slower one alone.
if [[ ${#kinds[@]} -gt 1 && $cores -gt 1 && ${GENSERVE_DEVICE:-auto} != cuda ]] && ! command -v nvidia-smi >/dev/null 2>&1; then
    threads=$(( cores / ${#kinds[@]} > 0 ? cores / ${#kinds[@]} : 1 ))
    pids=()
    for kind in "${kinds[@]}"; do
        # each line says which model it is about; pipefail gives build's status, not sed's
        (OMP_NUM_THREADS=$threads build "$kind" 2>&1 | sed -u "s/^/[$kind] /") &
        pids+=($!)
    done
    for i in "${!pids[@]}"; do
        rc=0
        wait "${pids[$i]}" || rc=$?
        record "${kinds[$i]}" "$rc"
    done
else
    for kind in "${kinds[@]}"; do
        rc=0
        build "$kind" || rc=$?
        record "$kind" "$rc"
    done
fi
[[ $status -eq 1 ]] && exit 1
say "done: $(cd "$repository" && ls -d mnist-*/[0-9]* 2>/dev/null | tr '\n' ' ')"
exit $status
