# The two commands of README.md:
#   make demo   install everything, then run the main job end to end on the embedded mnist-5k dataset
#   make test   install everything, then run the test suite
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# onnxruntime (CPU) by default; `make ORT=gpu ...` installs onnxruntime-gpu instead (never both).
ORT ?= cpu
DEMO_DIR ?= runs/demo
DEMO_EPOCHS ?= 3
export GENSERVE_DATA ?= $(abspath ../shared/data)

.PHONY: install demo test lint clean-demo

$(BIN)/.installed-$(ORT): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$(ORT),dev]'
	rm -f $(BIN)/.installed-*
	touch $@

install: $(BIN)/.installed-$(ORT)

demo: install
	rm -rf $(DEMO_DIR)
	$(BIN)/genserve-train vae --dataset mnist-5k --epochs $(DEMO_EPOCHS) --batch-size 32 --latent-dim 2 --nll-k 50 --nll-images 500 --out $(DEMO_DIR)/vae
	$(BIN)/genserve-train dae --dataset mnist-5k --epochs $(DEMO_EPOCHS) --batch-size 32 --out $(DEMO_DIR)/dae
	$(BIN)/genserve-export $(DEMO_DIR)/vae --repository $(DEMO_DIR)/repository --name mnist-vae
	$(BIN)/genserve-export $(DEMO_DIR)/dae --repository $(DEMO_DIR)/repository --name mnist-dae
	@echo "pictures: $(DEMO_DIR)/vae/plots $(DEMO_DIR)/dae/plots  models: $(DEMO_DIR)/repository"

test: install
	$(BIN)/python -m pytest -q --timeout 600

lint: install
	$(BIN)/ruff check .
