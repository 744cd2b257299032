# The two commands of README.md:
#   make demo   install everything, then run the main job end to end on the embedded mnist-5k dataset:
#               train, export, serve, call the server, read /metrics, stop
#   make test   install everything, then run the test suite (what .ci/run runs)
# "Everything" includes the Debian packages when missing (scripts/install-system-packages.sh: apt-get
# as root, else sudo, else one line naming the command): python3.11 with venv for both; for the tests
# also prometheus, docker-compose, docker.io and debootstrap, which they drive for real.
#   make image  build the genserve:$(ORT) Docker image (docker/build-image.sh; needs a running engine)
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# onnxruntime (CPU) by default; `make ORT=gpu ...` installs onnxruntime-gpu instead (never both).
ORT ?= cpu
DEMO_DIR ?= runs/demo
DEMO_EPOCHS ?= 15
REPO ?= $(DEMO_DIR)/repository
PORT ?= 8001
METRICS_PORT ?= 8002
export GENSERVE_DATA ?= $(abspath ../shared/data)
# Decoded datasets, the Docker build's debootstrap tarball and wheelhouse: kept between runs (gitignored).
export GENSERVE_CACHE ?= $(abspath .cache/genserve)
export GENSERVE_DOCKER_CACHE ?= $(abspath .cache/docker)

.PHONY: install demo serve test lint image system-packages-demo system-packages-test

system-packages-demo:
	PYTHON=$(PYTHON) bash scripts/install-system-packages.sh demo

system-packages-test:
	PYTHON=$(PYTHON) bash scripts/install-system-packages.sh test

$(BIN)/.installed-$(ORT): pyproject.toml | system-packages-demo
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$(ORT),dev]'
	rm -f $(BIN)/.installed-*
	touch $@

install: $(BIN)/.installed-$(ORT)

demo: install
	GENSERVE_BIN=$(abspath $(BIN)) DEMO_DIR=$(DEMO_DIR) DEMO_EPOCHS=$(DEMO_EPOCHS) bash scripts/demo.sh

serve: install
	$(BIN)/genserve-serve --repository $(REPO) --port $(PORT) --metrics-port $(METRICS_PORT)

# TESTS: run only these test files (default: the whole suite).
test: install system-packages-test
	$(BIN)/python -m pytest -q --timeout 600 $(TESTS)

image: install system-packages-test
	bash docker/build-image.sh $(ORT)

lint: install
	$(BIN)/ruff check .
