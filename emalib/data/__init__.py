"""Data: the registry of public sources, chat JSONL validation, question sets and package-made stand-ins."""
