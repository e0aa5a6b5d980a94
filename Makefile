# Two entry points on a fresh machine: `make run` (set up, then run the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
MERGEKIT_VENV ?= build/mergekit-venv

.PHONY: setup run test lint mergekit lock postgres

setup: $(VENV)/.installed

# Plain pip + venv, every version from the lock (pip takes the pinned torch/torchvision from this machine's
# local wheel store); then the checkout goes on the environment's path, with the `soups` command.
# After changing a dependency: `make lock` (installs the extras too, then freezes).
$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[dev]'
	$(VENV)/bin/python scripts/install_checkout.py
	touch $@

lock:
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[dev,ui]'
	( echo '# Every version `make` installs (pip install -c requirements.lock); regenerate with `make lock` after changing pyproject.toml.'; \
	  $(VENV)/bin/pip freeze --exclude-editable --disable-pip-version-check | grep -v '^-e ' ) > requirements.lock
	$(VENV)/bin/python scripts/install_checkout.py

# mergekit, the peer the merge recipes are checked against, in its own venv on the project's torch (no download).
mergekit: $(MERGEKIT_VENV)/.installed

$(MERGEKIT_VENV)/.installed: $(VENV)/.installed benchmarks/mergekit_venv.sh
	bash benchmarks/mergekit_venv.sh $(MERGEKIT_VENV)

run: setup
	$(VENV)/bin/soups run

# The stack tests run real PostgreSQL clusters: initdb and pg_ctl on PATH or in Debian's /usr/lib/postgresql/N/bin.
postgres:
	@$(VENV)/bin/python -c "from deployments.processes import require_postgres; require_postgres()"

test: setup mergekit postgres
	$(VENV)/bin/python -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
