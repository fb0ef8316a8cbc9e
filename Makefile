# One way to run everything; CI (.ci/run) calls `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)

# The web console's browser packages (corral/web/package.json), from npm, never copied in: the
# server serves an allow-list of their files from corral/web/node_modules (docs/console.md).
WEB := corral/web
NODE_STAMP := $(WEB)/node_modules/.installed-$(shell cksum < $(WEB)/package-lock.json | cut -d' ' -f1)
# The browser tests drive Debian's chromium (tests/browser), not a browser build of Playwright's.
CHROMIUM := /usr/bin/chromium

.PHONY: venv run test lint typecheck unit bench clean browser

$(STAMP): pyproject.toml constraints.txt
	@$(PY) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Corral needs Python 3.11 or newer")'
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

# npm ci empties node_modules first, so the stamp inside it goes with any older install
$(NODE_STAMP): $(WEB)/package.json $(WEB)/package-lock.json
	@command -v npm >/dev/null || { echo "the web console's packages need npm (Debian: apt-get install npm)"; exit 1; }
	cd $(WEB) && npm ci --no-audit --no-fund --loglevel=error
	@touch $(NODE_STAMP)

venv: $(STAMP) $(NODE_STAMP)

# Debian's chromium for the browser tests, when it is missing (root: apt-get; the package lists
# are refreshed only when the install fails without them).
browser:
	@test -x $(CHROMIUM) || { \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q chromium chromium-driver || \
	  { apt-get update -q && apt-get install -y -q chromium chromium-driver; }; }

# The server on SQLite under ./corral-data, with a simulated fleet of 50 devices.
run: venv
	$(BIN)/python -m corral.devrun

lint: venv
	$(BIN)/ruff check corral tests bench

typecheck: venv
	$(BIN)/mypy corral

# Test files run two at a time (mostly waiting on real servers and agents); a file stays on one
# worker so that its module-scoped servers are shared as written.
test: lint typecheck browser
	$(BIN)/pytest -q -p no:cacheprovider -n 2 --dist loadfile --durations=25

bench: venv
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
