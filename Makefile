# The two commands of README.md:
#   make demo   install everything, then run the main job end to end on the embedded mnist-5k dataset:
#               train, export, serve, call the server, read /metrics, stop
#   make test   install everything, then run the test suite
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# onnxruntime (CPU) by default; `make ORT=gpu ...` installs onnxruntime-gpu instead (never both).
ORT ?= cpu
DEMO_DIR ?= runs/demo
DEMO_EPOCHS ?= 20
REPO ?= $(DEMO_DIR)/repository
PORT ?= 8001
METRICS_PORT ?= 8002
export GENSERVE_DATA ?= $(abspath ../shared/data)

.PHONY: install demo serve test lint

$(BIN)/.installed-$(ORT): pyproject.toml
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

test: install
	$(BIN)/python -m pytest -q --timeout 600

lint: install
	$(BIN)/ruff check .
