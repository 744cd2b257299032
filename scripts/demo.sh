#!/usr/bin/env bash
# The main job (`make demo`): on a fresh clone, end to end on the embedded mnist-5k digits:
#   1. train a conv VAE and a denoiser (the default recipes), pictures in DEMO_DIR/{vae,dae}/plots/
#   2. export them as mnist-vae and mnist-dae into DEMO_DIR/repository
#   3. serve the repository on 127.0.0.1 (free ports) and wait for grpc health SERVING
#   4. call it with genserve-client: pictures in DEMO_DIR/client/
#   5. read /metrics and show the key series
#   6. stop the server with SIGTERM and check that it exited 0
#
# Environment: DEMO_DIR (default runs/demo, relative to the current directory; wiped first),
# DEMO_EPOCHS (default 15), GENSERVE_BIN (the venv's bin directory; default: PATH, else .venv/bin),
# DEMO_SERVER_TIMEOUT (seconds to wait for the server, default 180).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${GENSERVE_BIN:-}" ]]; then
    PATH="$GENSERVE_BIN:$PATH"
elif ! command -v genserve-train >/dev/null 2>&1 && [[ -x "$ROOT/.venv/bin/genserve-train" ]]; then
    PATH="$ROOT/.venv/bin:$PATH"
fi
export PATH
for tool in genserve-train genserve-export genserve-serve genserve-client python; do
    command -v "$tool" >/dev/null || { echo "demo: $tool not found; run 'make install' or set GENSERVE_BIN" >&2; exit 2; }
done

demo_dir=$(realpath -m "${DEMO_DIR:-runs/demo}")
export DEMO_EPOCHS=${DEMO_EPOCHS:-15}
timeout_s=${DEMO_SERVER_TIMEOUT:-180}
case "$demo_dir" in
    / | "$ROOT" | "$HOME" | "$(dirname "$ROOT")") echo "demo: refusing to wipe DEMO_DIR=$demo_dir" >&2; exit 2 ;;
esac

started=$SECONDS
step() { printf '\n==> [demo %3ds] %s\n' "$((SECONDS - started))" "$*"; }
fail() { echo "demo: FAILED: $*" >&2; exit 1; }

server_pid=
server_log="$demo_dir/server.log"
cleanup() {
    local status=$?
    if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
        echo "demo: stopping the server (pid $server_pid)" >&2
        kill -TERM "$server_pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$server_pid" 2>/dev/null || true
    fi
    if [[ $status -ne 0 && -f "$server_log" ]]; then
        echo "demo: last lines of $server_log:" >&2
        tail -n 20 "$server_log" >&2
    fi
}
trap cleanup EXIT

step "1/6 clean $demo_dir"
rm -rf "$demo_dir"
mkdir -p "$demo_dir/client"

step "2/6 train (mnist-5k, $DEMO_EPOCHS epochs, batch 32) and export mnist-vae, mnist-dae into $demo_dir/repository"
"$ROOT/scripts/bootstrap-models.sh" "$demo_dir/repository" "$demo_dir"

step "3/6 serve $demo_dir/repository on 127.0.0.1 (log: $server_log)"
GENSERVE_REPOSITORY="$demo_dir/repository" GENSERVE_HOST=127.0.0.1 GENSERVE_PORT=0 GENSERVE_METRICS_PORT=0 \
    GENSERVE_BOOTSTRAP=0 "$ROOT/scripts/entrypoint-server.sh" --grace-period 5 >"$server_log" 2>&1 &
server_pid=$!
deadline=$((SECONDS + timeout_s))
ports=
until [[ -n "$ports" ]]; do
    kill -0 "$server_pid" 2>/dev/null || fail "the server exited before listening"
    ((SECONDS < deadline)) || fail "the server did not listen within ${timeout_s}s"
    sleep 0.5
    ports=$(sed -n 's/.* listening .* port=\([0-9]*\) metrics_port=\([0-9]*\).*/\1 \2/p' "$server_log" | head -n 1)
done
read -r port metrics_port <<<"$ports"
address="127.0.0.1:$port"
echo "listening on $address, metrics on http://127.0.0.1:$metrics_port/metrics; waiting for SERVING"
until "$ROOT/scripts/entrypoint-server.sh" healthcheck "$address" >/dev/null 2>&1; do
    kill -0 "$server_pid" 2>/dev/null || fail "the server exited while loading the models"
    ((SECONDS < deadline)) || fail "the server was not SERVING within ${timeout_s}s"
    sleep 0.5
done
"$ROOT/scripts/entrypoint-server.sh" healthcheck "$address"

step "4/6 call the server with genserve-client (pictures in $demo_dir/client/)"
client() { genserve-client --address "$address" "$@"; }
out="$demo_dir/client"
client models
client generate mnist-vae -n 64 --seed 1 -o "$out/samples.png"
client reconstruct mnist-vae --dataset mnist-5k --split test --limit 16 -o "$out/reconstructions.png"
client denoise mnist-dae --dataset mnist-5k --split test --limit 16 --noise 0.5 --seed 1 -o "$out/denoised.png"
client encode mnist-vae --dataset mnist-5k --split test --limit 500 -o "$out/latents.npy" --plot "$out/latents.png"
client interpolate mnist-vae --dataset mnist-5k --offset 9 --steps 10 --spherical -o "$out/interpolation.png"  # a 3 into a 0

step "5/6 metrics (all of them in $out/metrics.txt)"
python -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())' \
    "http://127.0.0.1:$metrics_port/metrics" >"$out/metrics.txt"
show() {  # the series named $1 (a regular expression); an empty result fails the demo
    local lines
    lines=$(grep -E "^($1)(\{| )" "$out/metrics.txt") || fail "no $1 series in /metrics"
    printf '%s\n' "$lines"
}
echo "-- requests by method, model and status"
show genserve_requests_total
echo "-- batches run (batch size histogram count) and rows per part"
show 'genserve_inference_batch_size_count|genserve_inference_batch_size_sum'
echo "-- execution provider in use, models ready"
show 'genserve_execution_provider_info|genserve_models_ready'
grep -qE '^genserve_requests_total\{.*method="Generate".*code="OK".*\} [1-9]' "$out/metrics.txt" ||
    grep -qE '^genserve_requests_total\{.*code="OK".*method="Generate".*\} [1-9]' "$out/metrics.txt" ||
    fail "no successful Generate request counted"

step "6/6 stop the server (SIGTERM) and check its exit status"
kill -TERM "$server_pid"
status=0
wait "$server_pid" || status=$?
server_pid=
[[ $status -eq 0 ]] || fail "the server exited with status $status after SIGTERM"
grep -q ' stopped' "$server_log" || fail "the server log has no 'stopped' event"
echo "the server shut down cleanly (exit 0)"

step "done in $((SECONDS - started))s"
echo "training pictures: $demo_dir/vae/plots/ $demo_dir/dae/plots/"
echo "client pictures:   $(cd "$out" && ls ./*.png | sed 's|^\./||' | tr '\n' ' ')(in $out/)"
echo "model repository:  $demo_dir/repository (serve it: genserve-serve --repository $demo_dir/repository)"
