# The two commands of the README. Both set up .venv first (idempotent; quick once installed).
PY := .venv/bin/python

.PHONY: quickstart test setup setup-dev

quickstart: setup
	$(PY) -m emalib run params/quickstart.yaml

test: setup-dev
	$(PY) -m pytest -q

setup:
	bash scripts/setup.sh

setup-dev:
	bash scripts/setup.sh dev
