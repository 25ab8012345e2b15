"""Runs: one run's folder and manifest, its input checks, its steps (prepare, train, rl, evaluate), rescoring and
re-judging, and the papermill contract of the step notebooks."""
