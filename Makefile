# The README's two commands are `make demo` and `make test`; both install first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV := $(shell command -v uv 2>/dev/null)

.PHONY: install demo test lint constraints clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	@if [ -z "$(UV)" ]; then $(PY) -m pip install --quiet uv; fi
	@test -x $(BIN)/python || $(PY) -m uv venv --python $(PY) $(VENV)
	VIRTUAL_ENV=$(VENV) $(PY) -m uv pip install --python $(BIN)/python -c constraints.txt -e ".[dev]"
	@touch $@

demo: install
	$(BIN)/aidkd demo

test: install
	$(BIN)/python -m pytest tests

lint: install
	$(BIN)/ruff check src tests benchmarks

# Re-pin after editing pyproject.toml dependencies (no index URLs or hashes are written).
constraints:
	$(PY) -m uv pip compile pyproject.toml --extra dev -c requirements-pins.in \
	  --no-header --no-annotate --python-version 3.11 -o constraints.txt

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info

# docs/config.md is generated from the config dataclasses (tests/test_docs.py checks it is up to date).
.PHONY: docs
docs: install
	$(BIN)/python -m aidkd.engine.config_docs > docs/config.md.tmp && mv docs/config.md.tmp docs/config.md
