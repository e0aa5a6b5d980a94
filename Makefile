# Two entry points on a fresh machine: `make run` (set up, then run the main job) and `make test`.
PYTHON ?= python3
VENV := .venv

.PHONY: setup run test lint

setup: $(VENV)/.installed

# Plain pip + venv: pip takes the pinned torch/torchvision from this machine's local wheel store.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

run: setup
	$(VENV)/bin/soups run

test: setup
	$(VENV)/bin/python -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
