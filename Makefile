# One way to run everything; CI (.ci/run) calls `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)

.PHONY: venv run test lint typecheck unit bench clean

$(STAMP): pyproject.toml constraints.txt
	@$(PY) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Corral needs Python 3.11 or newer")'
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

venv: $(STAMP)

# The server on SQLite under ./corral-data, with a simulated fleet of 50 devices.
run: venv
	$(BIN)/python -m corral.devrun

lint: venv
	$(BIN)/ruff check corral tests bench

typecheck: venv
	$(BIN)/mypy corral

test: lint typecheck
	$(BIN)/pytest -q -p no:cacheprovider

bench: venv
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
