# Two commands on a fresh machine:  `make run` (the gateway, embedded default)  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Tests read MNIST from here; point it elsewhere with `make test DATA=/path/to/data`.
DATA ?= $(abspath ../shared/data)

.PHONY: run test rebuild-mnist clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# The gateway alone: no torch.
$(VENV)/.gateway: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	touch $@

# Training and tests: the CPU build of torch first (a bare `torch` would pull a multi-GB CUDA build).
$(VENV)/.dev: pyproject.toml | $(PY)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[train,eval,dev]'
	@# Prometheus (and promtool) for tests/deploy: installed when missing, as root with apt-get; any
	@# failure here is ignored (those tests then skip with the reason).
	@# checkov (tests/deploy/test_checkov.py) in a virtual environment of its own: it pins dependencies
	@# that clash with the project's. A failure here is ignored (that test then skips and says why).
	-[ -x .venv-checkov/bin/checkov ] || { $(PYTHON) -m venv .venv-checkov && .venv-checkov/bin/pip install -q checkov; } || true
	@# MLServer (tests/e2e/test_mlserver_upstream.py, a real upstream) likewise: it pins fastapi<0.116.
	-[ -x .venv-mlserver/bin/mlserver ] || { $(PYTHON) -m venv .venv-mlserver && .venv-mlserver/bin/pip install -q 'mlserver>=1.6,<2' onnxruntime; } || true
	@# A real Triton (the server nvidia-pytriton ships, CPU) and tritonclient, tests/e2e/test_triton.py: likewise.
	-[ -x .venv-triton/bin/python ] && .venv-triton/bin/python -c 'import pytriton, onnxruntime' 2>/dev/null || { $(PYTHON) -m venv .venv-triton && .venv-triton/bin/pip install -q 'nvidia-pytriton>=0.5' onnxruntime; } || true
	-command -v prometheus >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; } || true
	touch $@

run: $(VENV)/.gateway
	$(VENV)/bin/magnet serve

test: $(VENV)/.dev
	MAGNET_TEST_DATA=$(DATA) $(PY) -m pytest

# Rebuilds models/mnist from scratch (several hours on 2 cores: the autoencoders run to 400 epochs; see docs/results/mnist-bundle.md).
rebuild-mnist: $(VENV)/.dev
	$(VENV)/bin/magnet train mnist --data-dir $(DATA) --out models/mnist --work-dir runs/mnist --fresh

clean:
	rm -rf $(VENV) .venv-checkov .venv-mlserver .venv-triton runs .pytest_cache
