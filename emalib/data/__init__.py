"""Data: the registry of public sources, chat JSONL validation, question sets, trigger probes, package-made stand-ins,
RL prompts and the benign tasks' data and scorers (`emalib.data.tasks`)."""
