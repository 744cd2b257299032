#!/usr/bin/env bash
# Install the Debian packages a target of the Makefile needs, when they are missing.
#
#   scripts/install-system-packages.sh demo    python3.11 with venv (the demo needs nothing else)
#   scripts/install-system-packages.sh test    also what the tests drive for real: Prometheus
#                                              (prometheus, promtool), docker-compose 1.29, a Docker
#                                              Engine (docker.io) and debootstrap (stand-in base
#                                              images where no registry is reachable, docker/build-image.sh)
#
# As root it runs apt-get itself; otherwise with sudo when sudo works without a password prompt
# (or with one on a terminal); otherwise it prints the one command to run and exits 1.
# Nothing is done when everything is already there, so `make test` stays quick on a set-up machine.
set -euo pipefail

target=${1:-test}
missing=()    # Debian package names
need() {      # need PACKAGE TEST...: the package is missing unless the test command succeeds
    local package=$1
    shift
    "$@" >/dev/null 2>&1 || missing+=("$package")
}

python=${PYTHON:-python3.11}
case $target in
    demo | test) ;;
    *) echo "$0: the target is demo or test, not $target" >&2; exit 2 ;;
esac
if ! command -v "$python" >/dev/null 2>&1; then
    missing+=(python3 python3-venv)
else
    # Debian splits ensurepip (what `python -m venv` needs) into python3.11-venv.
    need python3-venv "$python" -c "import ensurepip"
fi
if [[ $target == test ]]; then
    need prometheus command -v prometheus
    need prometheus command -v promtool
    need docker-compose command -v docker-compose
    need docker.io command -v dockerd
    need debootstrap command -v debootstrap
fi
# Each package once (prometheus appears twice when both binaries are missing).
packages=()
for package in "${missing[@]}"; do
    [[ " ${packages[*]} " == *" $package "* ]] || packages+=("$package")
done
((${#packages[@]} == 0)) && exit 0
missing=("${packages[@]}")

command_line="apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${missing[*]}"
if ! command -v apt-get >/dev/null 2>&1; then
    echo "genserve: missing system packages (Debian names): ${missing[*]}; install them with your package manager" >&2
    exit 1
fi
if [[ $(id -u) == 0 ]]; then
    run=(bash -c)
elif command -v sudo >/dev/null 2>&1 && { sudo -n true 2>/dev/null || [[ -t 0 ]]; }; then
    run=(sudo bash -c)
else
    echo "genserve: missing system packages ${missing[*]}; run: sudo bash -c '$command_line'" >&2
    exit 1
fi
echo "==> installing the system packages ${missing[*]} (apt-get)" >&2
"${run[@]}" "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ${missing[*]} >/dev/null"
