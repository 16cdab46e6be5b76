# Two commands do everything on a fresh machine:  make demo   and   make test
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch, pinned; GPU users: make TORCH_SPEC= (keep the torch already in .venv)
TORCH_SPEC ?= torch==2.13.0

export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export PREFECT_HOME ?= $(CURDIR)/.cache/prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo demo-lambda0 test bench bench-eval clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(if $(TORCH_SPEC),$(BIN)/python -m pip install -q "$(TORCH_SPEC)")
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/lalora run configs/demo.yaml --out runs/demo

demo-lambda0: install
	$(BIN)/lalora run configs/demo.yaml --out runs/demo-lambda0 --set lalora.lambda=0

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/curvature.py --json

bench-eval: install
	$(BIN)/python benchmarks/evaluation.py --json

clean:
	rm -rf runs .cache .pytest_cache
