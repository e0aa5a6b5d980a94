# Two entry points on a fresh machine: `make run` (set up, then run the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
MERGEKIT_VENV ?= build/mergekit-venv

.PHONY: setup run test lint mergekit

setup: $(VENV)/.installed

# Plain pip + venv: pip takes the pinned torch/torchvision from this machine's local wheel store.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

# mergekit, the peer the merge recipes are checked against, in its own venv on the project's torch (no download).
mergekit: $(MERGEKIT_VENV)/.installed

$(MERGEKIT_VENV)/.installed: $(VENV)/.installed benchmarks/mergekit_venv.sh
	bash benchmarks/mergekit_venv.sh $(MERGEKIT_VENV)

run: setup
	$(VENV)/bin/soups run

test: setup mergekit
	$(VENV)/bin/python -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
