# Every target creates the venv first (idempotent: a stamp file records the installed state).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-unit bench-quality bench-systems clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: install
	$(BIN)/hpc-mto launch --run-dir runs/demo-$$(date +%Y%m%d-%H%M%S)

test: install
	$(BIN)/python -m pytest -q -ra tests

bench-quality: install
	$(BIN)/python bench/quality.py

bench-systems: install
	$(BIN)/python bench/systems.py

clean:
	rm -rf runs .pytest_cache
