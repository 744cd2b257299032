#!/usr/bin/env bash
# Build genserve's image (docker/Dockerfile) on a Docker Engine, also where no image registry is
# reachable (air-gapped sites, this project's CI):
#
#   docker/build-image.sh [cpu|gpu]       builds genserve:cpu (default) or genserve:gpu
#
# 1. Base images: python:3.11-slim and prom/prometheus are used when present or when a pull works;
#    when a pull fails, a stand-in is built from Debian's packages instead (a `debootstrap
#    --variant=minbase bookworm` root filesystem imported with `docker import`, plus bookworm's
#    python3 3.11 or its prometheus package). The images used go into IMAGES_ENV (below), which
#    docker-compose reads with `--env-file`.
# 2. CA bundle: the bundle pip on this host trusts (`pip config get global.cert`, else $PIP_CERT, else
#    Debian's /etc/ssl/certs/ca-certificates.crt; override with GENSERVE_CA_BUNDLE) goes to pip in the
#    build as the BuildKit secret `pip-ca` (a TLS-inspecting proxy, a private index). Never in a layer.
# 3. Wheelhouse (cpu only): torch==2.13.0's CPU wheel, fetched on this host with `pip download` (the
#    host may reach indexes or hold wheels the build containers cannot), handed to the build as the
#    image genserve-wheelhouse:local (the Dockerfile's WHEELHOUSE stage).
#
# Environment:
#   DOCKER               the docker client (default: Debian's docker.io client when installed, since a
#                        newer client without the buildx plugin cannot use BuildKit; else `docker`)
#   GENSERVE_DOCKER_CACHE  kept between runs: the debootstrap tarball and the wheelhouse
#                        (default .cache/docker in the repository, gitignored)
#   IMAGES_ENV           where to write GENSERVE_BASE_IMAGE= and PROMETHEUS_IMAGE= (default
#                        $GENSERVE_DOCKER_CACHE/images.env)
#   DEBIAN_MIRROR        for debootstrap (default http://deb.debian.org/debian)
#   GENSERVE_PULL_TIMEOUT  seconds a pull may take before the stand-in is used (default 60)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ort=${1:-cpu}
case $ort in
    cpu | gpu) ;;
    *) echo "$0: the variant is cpu or gpu, not $ort" >&2; exit 2 ;;
esac
cache=${GENSERVE_DOCKER_CACHE:-$ROOT/.cache/docker}
images_env=${IMAGES_ENV:-$cache/images.env}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
python_image=python:3.11-slim
prometheus_image=$(sed -n 's/.*image: \${PROMETHEUS_IMAGE:-\(.*\)}.*/\1/p' "$ROOT/docker-compose.yml")
standin_debian=genserve-standin/debian:bookworm
standin_python=genserve-standin/python:3.11-bookworm
standin_prometheus=genserve-standin/prometheus:bookworm
mkdir -p "$cache"

say() { echo "==> [build-image] $*" >&2; }
fail() { echo "build-image: $*" >&2; exit 1; }

if [[ -z "${DOCKER:-}" ]]; then
    DOCKER=$(dpkg -L docker.io 2>/dev/null | grep 'bin/docker$' | head -n 1 || true)
    DOCKER=${DOCKER:-docker}
fi
command -v "$DOCKER" >/dev/null || fail "no docker client ($DOCKER); install Debian's docker.io (make test does)"
"$DOCKER" info >/dev/null 2>&1 || fail "no Docker Engine answers $DOCKER info; start dockerd (as root: dockerd >/var/log/dockerd.log 2>&1 &)"
export DOCKER_BUILDKIT=1
docker() { "$DOCKER" "$@"; }
have_image() { docker image inspect "$1" >/dev/null 2>&1; }

pull() {  # pull IMAGE: true when the image is here afterwards
    have_image "$1" && return 0
    say "pulling $1"
    timeout "${GENSERVE_PULL_TIMEOUT:-60}" "$DOCKER" pull -q "$1" >/dev/null 2>&1 && have_image "$1"
}

debian_standin() {
    have_image "$standin_debian" && return
    local tarball="$cache/debootstrap-bookworm-minbase.tar"
    if [[ ! -s $tarball ]]; then
        command -v debootstrap >/dev/null || fail "debootstrap is missing (apt-get install debootstrap; make test does)"
        [[ $(id -u) == 0 ]] || fail "debootstrap needs root to build the stand-in base image; run this as root once"
        local rootfs
        rootfs=$(mktemp -d "$cache/rootfs.XXXXXX")
        say "no registry: building a Debian bookworm root filesystem with debootstrap (about a minute; cached in $tarball)"
        debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$cache/debootstrap.log" 2>&1 \
            || fail "debootstrap failed; see $cache/debootstrap.log"
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        tar -C "$rootfs" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
        rm -rf "$rootfs"
    fi
    docker import --change 'CMD ["bash"]' --message "debootstrap --variant=minbase bookworm $mirror" \
        "$tarball" "$standin_debian" >/dev/null
}

standin() {  # standin TAG OFFICIAL DOCKERFILE: build TAG from the Debian stand-in
    have_image "$1" && return
    debian_standin
    say "building $1, a stand-in for $2 from Debian bookworm's packages"
    docker build -q -t "$1" --label "org.opencontainers.image.description=stand-in for $2 built from Debian bookworm packages" - <<<"$3" >/dev/null
}

apt_install='RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends'
if pull "$python_image"; then
    base=$python_image
else
    base=$standin_python
    standin "$base" "$python_image" "FROM $standin_debian
$apt_install python3 python3-venv ca-certificates && rm -rf /var/lib/apt/lists/*"
fi
if pull "$prometheus_image"; then
    prometheus=$prometheus_image
else
    prometheus=$standin_prometheus
    standin "$prometheus" "$prometheus_image" "FROM $standin_debian
$apt_install prometheus && rm -rf /var/lib/apt/lists/* \\
    && mkdir -p /prometheus /etc/prometheus && chown nobody:nogroup /prometheus
USER nobody
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT [\"/usr/bin/prometheus\"]
CMD [\"--config.file=/etc/prometheus/prometheus.yml\", \"--storage.tsdb.path=/prometheus\"]"
fi
printf 'GENSERVE_BASE_IMAGE=%s\nPROMETHEUS_IMAGE=%s\n' "$base" "$prometheus" >"$images_env"

ca=${GENSERVE_CA_BUNDLE:-}
if [[ -z $ca ]]; then
    host_python=$ROOT/.venv/bin/python
    [[ -x $host_python ]] || host_python=${PYTHON:-python3.11}
    ca=$("$host_python" -m pip config get global.cert 2>/dev/null || true)
    ca=${ca:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}
fi
[[ -s $ca ]] || fail "the CA bundle $ca does not exist; set GENSERVE_CA_BUNDLE to the one pip should trust"

build_args=(--build-arg "ORT=$ort" --build-arg "BASE_IMAGE=$base")
if [[ $ort == cpu ]]; then
    wheelhouse=$cache/wheelhouse
    mkdir -p "$wheelhouse"
    if ! compgen -G "$wheelhouse/torch-2.13.0+cpu-*.whl" >/dev/null; then
        say "fetching torch==2.13.0's CPU wheel into $wheelhouse (pip download on this host)"
        host_python=$ROOT/.venv/bin/python
        [[ -x $host_python ]] || host_python=${PYTHON:-python3.11}
        "$host_python" -m pip download --quiet --no-deps --only-binary :all: --dest "$wheelhouse" torch==2.13.0 \
            || "$host_python" -m pip download --quiet --no-deps --only-binary :all: --dest "$wheelhouse" \
                --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
            || fail "pip download torch==2.13.0 failed (no index, and no wheel in pip's find-links)"
        # A PyPI torch wheel is the CUDA build (GBs of nvidia-* packages): never put it in a CPU image.
        compgen -G "$wheelhouse/torch-2.13.0+cpu-*.whl" >/dev/null \
            || fail "pip download torch==2.13.0 gave $(ls "$wheelhouse"), not the CPU wheel (torch-2.13.0+cpu-*.whl); put that wheel into $wheelhouse"
    fi
    # Only the torch wheel goes into the wheelhouse image (anything else there stays out). It is
    # rebuilt only when the wheel changed: sending 200 MB to the engine takes a while on a busy machine.
    wheels=$(cd "$wheelhouse" && stat -c '%n:%s' torch-2.13.0+cpu-*.whl | tr '\n' ' ')
    if [[ $(docker image inspect -f '{{index .Config.Labels "genserve.wheels"}}' genserve-wheelhouse:local 2>/dev/null) != "$wheels" ]]; then
        say "wheelhouse image genserve-wheelhouse:local from $wheelhouse"
        docker build -q -t genserve-wheelhouse:local --label "genserve.wheels=$wheels" -f - "$wheelhouse" >/dev/null <<<'FROM scratch
COPY torch-2.13.0+cpu-*.whl /'
    fi
    build_args+=(--build-arg WHEELHOUSE=genserve-wheelhouse:local)
else
    build_args+=(--build-arg TORCH_INDEX_URL=https://pypi.org/simple)
fi

say "building genserve:$ort (base $base)"
docker build -f "$ROOT/docker/Dockerfile" -t "genserve:$ort" "${build_args[@]}" \
    --secret "id=pip-ca,src=$ca" --progress=plain "$ROOT"
say "built genserve:$ort ($(docker image inspect -f '{{.Size}}' "genserve:$ort" | awk '{printf "%.0f MB", $1 / 1e6}')); images in $images_env"
