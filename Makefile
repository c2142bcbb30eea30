# The two commands: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: demo test unit lint drill clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch is pinned in pyproject.toml to the CPU build that pip finds on this machine's disk.
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-1} SEIDRA_HOME=$${SEIDRA_HOME:-$(CURDIR)/.seidra} $(BIN)/python -m serve_app.demo

test: $(STAMP) lint
	scripts/install-test-services.sh
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# The control plane (scheduling/, storage/) is linted, formatted and type-checked (mypy --strict).
lint: $(STAMP)
	$(BIN)/ruff check scheduling storage
	$(BIN)/ruff format --check scheduling storage
	$(BIN)/mypy scheduling storage

unit: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit

clean:
	rm -rf $(VENV) .seidra build *.egg-info

# The GPU-fault drill of docs/gpu-fault-drill.md, on this machine.
drill: $(STAMP)
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-1} SEIDRA_HOME=$${SEIDRA_HOME:-$(CURDIR)/.seidra} $(BIN)/python -m serve_app.drill
