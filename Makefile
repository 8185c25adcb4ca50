# Two entry points: `make demo` and `make test`. Each creates the virtual environment and
# installs what it needs on first use (pip resolves torch and torchvision together).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,postgres]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/gauntlet demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python bench/attacks.py
	$(BIN)/python bench/whitebox.py
	$(BIN)/python bench/autoattack.py
	$(BIN)/python bench/pate.py
	$(BIN)/python bench/shards.py
	$(BIN)/python bench/chaos.py
	$(BIN)/python bench/web.py
	$(BIN)/python bench/scheduler.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
