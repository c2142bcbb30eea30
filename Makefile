# The two commands: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: demo test unit lint load drill bench clean

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
	rm -rf $(VENV) .seidra .seidra-load build *.egg-info

# docs/reliability.md's load run: 200 realtime clients over 5,000 batch jobs, tiny model, one local cluster.
LOAD_ARGS ?= --realtime-clients 200 --requests-per-client 3 --batch-jobs 5000 --steps 2 --size 64
load: $(STAMP)
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-1} SEIDRA_HOME=$${SEIDRA_HOME:-$(CURDIR)/.seidra-load} \
		$(BIN)/python -m bench.load --up $(LOAD_ARGS) --out $${SEIDRA_HOME:-$(CURDIR)/.seidra-load}/load-report.json

# The GPU-fault drill of docs/gpu-fault-drill.md, on this machine.
drill: $(STAMP)
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-1} SEIDRA_HOME=$${SEIDRA_HOME:-$(CURDIR)/.seidra} $(BIN)/python -m serve_app.drill

# docs/benchmarks.md's figures: each run appends a dated result (machine, command, table, raw JSON).
# The serving scenarios bring SEIDRA up on a Ray head of their own (SEIDRA_MODEL, else the tiny model);
# BENCH_ARGS sets their sizes (python -m bench.serving --help).
BENCH_ARGS ?=
bench: $(STAMP)
	$(BIN)/python -m bench.core_scale --steps 60 --record docs/benchmarks.md
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-1} SEIDRA_HOME=$${SEIDRA_HOME:-$(CURDIR)/.seidra} \
		$(BIN)/python -m bench.serving $(BENCH_ARGS) --record docs/benchmarks.md
