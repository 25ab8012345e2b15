# The commands of the README. Both set up .venv first (idempotent; quick once installed).
PY := .venv/bin/python

.PHONY: quickstart test test-fast lab setup setup-dev

quickstart: setup
	$(PY) -m emalib run params/quickstart.yaml

# Every tier (tests/conftest.py): the fast unit tests, integration and e2e; the layers contract first (seconds).
test: setup-dev
	@echo "JupyterLab $$($(PY) -m jupyter lab --version)"
	.venv/bin/lint-imports --no-cache --no-logo
	$(PY) -m pytest -q

# The default tier alone: no embedded model, subprocess, notebook, server or cluster (about a minute on 2 idle cores).
test-fast: setup-dev
	$(PY) -m pytest -q -m "not integration and not e2e"

# The notebooks in JupyterLab with the project's kernel (the .venv's Python), served from the project root
# (--allow-root only when run as root, as in a container).
lab: setup
	$(PY) -m jupyter lab --ServerApp.root_dir=. --ServerApp.default_url=/lab/tree/notebooks $(if $(filter 0,$(shell id -u)),--allow-root,)

setup:
	bash scripts/setup.sh

setup-dev:
	bash scripts/setup.sh dev
